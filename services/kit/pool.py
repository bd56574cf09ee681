"""A lean HTTP/1.1 client for the calls on a request's hot path: pooled keep-alive
connections, one asyncio protocol each, responses parsed by httptools (the parser
uvicorn uses). The gateway's proxy sends every proxied request through it, and the
generation service its ledger holds, captures and releases (services/generation/billing.py)
and its providers' streamed answers (services/generation/providers.py: paced reads,
`Response.read_any()` and `Response.hold()`).

Why not aiohttp here: profiled on the proxy path, an aiohttp request cost the gateway
~0.5 ms of CPU (request and response objects, timers, header multidicts, trace hooks),
about 4x what this client costs for the same exchange, and it was most of the
gateway's added latency (docs/ledger.md, "Through the gateway"). These calls need little
of it: a request head written in one piece, a body (bytes, or chunks it streams with
chunked encoding), and a response head, then the body buffered or streamed. aiohttp
stays for the rarer JSON calls (the gateway's `Upstreams.call`).

Timeouts: connecting (`connect_timeout`) and between reads of the response
(`read_timeout`, per wait, like aiohttp's `sock_read`). A connection idle for
`idle_seconds` is closed rather than reused: the services' uvicorn closes idle
keep-alive connections after 5 s, and a request sent on a connection the server is
closing would fail. A reused connection that dies before any byte of the answer is
retried once on a fresh one, for GET/HEAD/OPTIONS with no streamed body only.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

RETRY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
HIGH_WATER = 256 * 1024  # buffered response bytes before reading from the socket pauses


class UpstreamClosed(ConnectionError):
    """The connection ended before a complete answer."""


class BadResponse(ConnectionError):
    """The service's answer is not valid HTTP/1.1."""


class _Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.received_any = False
        self.error: BaseException | None = None
        # The response being read:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future[None] | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.done = False
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False
        # `hold()`: the socket left unread until this timer fires.
        self.held: asyncio.TimerHandle | None = None
        self.drain: asyncio.Future[None] | None = None
        self.head_only = False
        self.keep_alive = False
        # The read timeout: one timer per connection (see `expect`).
        self.deadline: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(f"invalid response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        if not self.done:
            self._fail(UpstreamClosed("the service closed the connection") if exc is None else exc)
        if self.drain is not None and not self.drain.done():
            self.drain.set_exception(UpstreamClosed("the service closed the connection"))

    def pause_writing(self) -> None:
        if self.drain is None or self.drain.done():
            self.drain = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)

    # -- httptools callbacks ------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        # Asked now: after the message completes, the parser has reset its state.
        self.keep_alive = self.parser.should_keep_alive()
        if self.head_only:
            # A HEAD answer has no body whatever its Content-Length says; this
            # connection is not reused (the parser would wait for that body).
            self.done = True
            self.close()
        if self.head is not None and not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            if self.held is None:
                self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.done = True
        self._wake()

    # -- the read timeout ---------------------------------------------------------

    def expect(self, timeout: float | None) -> None:
        """The wait about to start (the answer's head, or the next piece of its body)
        fails with TimeoutError after `timeout` seconds; `met()` when it ends.

        Like `asyncio.timeout` around the wait, without a timer made and cancelled
        per wait: the connection keeps one timer, armed for the earliest deadline
        it may have to enforce; when it fires for a deadline since pushed back (the
        connection answered and moved on to the next request), it is armed again
        for the new one."""
        if timeout is None:
            self.deadline = None
            return
        self.deadline = deadline = self.loop.time() + timeout
        if self.timer is None or self.timer_at > deadline:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = deadline
            self.timer = self.loop.call_at(deadline, self._expired)

    def met(self) -> None:
        self.deadline = None

    def _expired(self) -> None:
        self.timer = None
        deadline = self.deadline
        if deadline is None or self.closed:
            return
        if self.loop.time() < deadline:
            self.timer_at = deadline
            self.timer = self.loop.call_at(deadline, self._expired)
            return
        self.deadline = None
        self._fail(TimeoutError("the service did not answer in time"))
        self.close()

    def _disarm(self) -> None:
        self.deadline = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.held is not None:
            self.held.cancel()
            self.held = None

    # -- paced reads --------------------------------------------------------------

    def hold(self, seconds: float) -> None:
        """Leave the socket unread for `seconds`: what arrives meanwhile waits in the
        kernel and comes in one receive (one parse, one wake-up of the reader) when
        reading resumes. A timer callback, no task: the reader's read timeout still
        runs (a hold is far shorter than it)."""
        transport = self.transport
        if self.held is not None or self.closed or transport is None or transport.is_closing():
            return
        if not self.paused:
            transport.pause_reading()
        self.held = self.loop.call_later(seconds, self._unhold)

    def _unhold(self) -> None:
        self.held = None
        transport = self.transport
        if not self.paused and not self.closed and transport is not None:
            if not transport.is_closing():
                transport.resume_reading()

    # -- internals ----------------------------------------------------------------

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        if self.head is not None and not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # retrieved: a caller may have stopped waiting
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
            self.waiter.exception()

    def reset(self, head_only: bool) -> None:
        self.status = 0
        self.headers = []
        self.head = self.loop.create_future()
        self.chunks.clear()
        self.buffered = 0
        self.done = False
        self.received_any = False
        self.error = None
        self.head_only = head_only
        self.keep_alive = False

    def close(self) -> None:
        self.closed = True
        self._disarm()
        if self.transport is not None:
            self.transport.close()

    def reusable(self) -> bool:
        return (
            self.done
            and not self.closed
            and self.error is None
            and self.keep_alive
            and self.transport is not None
            and not self.transport.is_closing()
        )


class Response:
    """A service's answer: status and headers at once, the body read or streamed after.
    `release()` returns the connection to its pool (or closes it) and must be called."""

    __slots__ = ("_conn", "_pool", "_read_timeout", "status", "headers", "content_length")

    def __init__(self, conn: _Connection, pool: Pool, read_timeout: float | None) -> None:
        self._conn: _Connection | None = conn
        self._pool = pool
        self._read_timeout = read_timeout
        self.status = conn.status
        self.headers = conn.headers
        self.content_length: int | None = None
        for name, value in conn.headers:
            if name == b"content-length":
                self.content_length = int(value) if value.isdigit() else None
                break

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def _next(self, everything: bool = False) -> bytes | None:
        """The next piece of the body (`everything`: all the pieces received so far,
        joined), or None at its end."""
        conn = self._conn
        assert conn is not None
        while True:
            if conn.chunks:
                if everything and len(conn.chunks) > 1:
                    chunk = b"".join(conn.chunks)
                    conn.chunks.clear()
                else:
                    chunk = conn.chunks.popleft()
                conn.buffered -= len(chunk)
                if conn.paused and conn.buffered <= HIGH_WATER // 4 and conn.transport:
                    conn.paused = False
                    if conn.held is None:
                        conn.transport.resume_reading()
                return chunk
            if conn.done:
                return None
            if conn.error is not None:
                raise conn.error
            conn.waiter = conn.loop.create_future()
            conn.expect(self._read_timeout)
            try:
                await conn.waiter
            finally:
                conn.waiter = None
                conn.met()

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body (at most `limit` bytes of it, then the connection is dropped)."""
        parts: list[bytes] = []
        size = 0
        while (chunk := await self._next()) is not None:
            parts.append(chunk)
            size += len(chunk)
            if limit is not None and size >= limit:
                self.close()
                return b"".join(parts)[:limit]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self._next()) is not None:
            yield chunk

    async def read_any(self) -> bytes | None:
        """Every byte of the body received so far, in one piece (waiting for the next
        when there is none), or None at its end: a chunked body's pieces that came in
        one receive come out together."""
        return await self._next(everything=True)

    def hold(self, seconds: float) -> None:
        """Leave the connection's socket unread for `seconds` (paced reads: see
        `_Connection.hold`)."""
        if self._conn is not None:
            self._conn.hold(seconds)

    @property
    def complete(self) -> bool:
        """The whole body has been received (the connection can be reused)."""
        return self._conn is not None and self._conn.done

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.put(conn)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class Pool:
    """Keep-alive connections to one service, at `url` (http or https, with or without a
    path prefix: `target`s are appended to it)."""

    def __init__(self, url: str, *, connect_timeout: float, idle_seconds: float = 4.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if parts.scheme == "https" else None
        )
        self.port = parts.port or (443 if self.ssl else 80)
        self.authority = parts.netloc.rsplit("@", 1)[-1].encode()
        self.prefix = parts.path.rstrip("/").encode()
        self.connect_timeout = connect_timeout
        self.idle_seconds = idle_seconds
        self._idle: deque[_Connection] = deque()
        self._open: set[_Connection] = set()

    def put(self, conn: _Connection) -> None:
        if conn.held is not None:
            # Idle in the pool, it reads again (a server's close is seen).
            conn.held.cancel()
            conn._unhold()
        if conn.reusable():
            conn.idle_since = now = time.monotonic()
            self._idle.append(conn)
            # The least recently used, at the left, are the ones that go stale.
            while self._idle and now - self._idle[0].idle_since > self.idle_seconds:
                stale = self._idle.popleft()
                stale.close()
                self._open.discard(stale)
        else:
            conn.close()
            self._open.discard(conn)

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # the most recently used: the least likely to be closing
            if conn.closed or now - conn.idle_since > self.idle_seconds:
                conn.close()
                self._open.discard(conn)
                continue
            return conn
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            _, conn = await loop.create_connection(
                lambda: _Connection(loop), self.host, self.port, ssl=self.ssl
            )
        self._open.add(conn)
        return conn

    async def request(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes] | None,
        *,
        read_timeout: float | None,
    ) -> Response:
        """Send one request; return once the answer's head is in. Raises OSError (and its
        subclasses here) when the service cannot be reached or breaks the exchange,
        TimeoutError when it is too slow, and whatever a streamed body raises."""
        retry = method in RETRY_METHODS and not isinstance(body, AsyncIterator)
        while True:
            conn = self._take_idle()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            try:
                await self._exchange(conn, method, target, headers, body, read_timeout)
            except TimeoutError:  # an OSError too, but never retried
                conn.close()
                self._open.discard(conn)
                raise
            except OSError:
                conn.close()
                self._open.discard(conn)
                if reused and retry and not conn.received_any:
                    retry = False
                    continue
                raise
            except BaseException:
                conn.close()
                self._open.discard(conn)
                raise
            return Response(conn, self, read_timeout)

    async def _exchange(
        self,
        conn: _Connection,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes] | None,
        read_timeout: float | None,
    ) -> None:
        conn.reset(head_only=method == "HEAD")
        transport = conn.transport
        if transport is None or conn.closed or transport.is_closing():
            raise UpstreamClosed("the connection is closed")
        parts = [method.encode(), b" ", self.prefix, target, b" HTTP/1.1\r\nhost: "]
        parts += (self.authority, b"\r\n")
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if body is None:
            parts.append(b"\r\n")
            transport.write(b"".join(parts))
        elif isinstance(body, bytes):
            parts += (b"content-length: ", str(len(body)).encode(), b"\r\n\r\n", body)
            transport.write(b"".join(parts))
        else:
            parts.append(b"transfer-encoding: chunked\r\n\r\n")
            transport.write(b"".join(parts))
            async for chunk in body:
                if conn.error is not None:
                    break  # the service answered (or failed) before the body ended
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                if conn.drain is not None and not conn.drain.done():
                    await conn.drain
            else:
                transport.write(b"0\r\n\r\n")
        assert conn.head is not None
        conn.expect(read_timeout)
        try:
            await conn.head
        finally:
            conn.met()

    def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()
