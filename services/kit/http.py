"""uvicorn's httptools protocol, writing a response's head and body in one send, with
less work per request.

uvicorn writes the status line and headers when the app sends `http.response.start`
and the body on `http.response.body`: two writes, so two TCP segments and two
syscalls for every small JSON answer (on loopback the kernel also does the receiving
side's work in the sender's syscall). Here the head of a response with a
Content-Length body waits for the body and both go in one write: about a tenth of the
ledger's CPU per single debit (docs/ledger.md "The hot path").

Streamed responses (chunked: SSE, proxied streams), HEAD, and bodiless responses are
written as before, head first: a client waiting for a stream's headers is never held
back. If the app fails after its head (or returns without finishing), the held head
goes out before the connection is closed, as uvicorn would have written it.

Per request, compared with uvicorn's own protocol (docs/ledger.md, "The gateway's
added cost, cut again"):
- the held head lives on the request's cycle (`_Cycle`), with no object pointing
  back at it: an earlier version wrapped the transport in an object that held the
  cycle while the cycle held it, so every request left ~7 objects that only the
  cyclic garbage collector could free (a fifth of the gateway's CPU went to
  collections);
- the keep-alive timeout is one timer per connection, re-armed when it fires, instead
  of a timer made and cancelled for every response (same rule: a connection idle for
  `timeout_keep_alive` seconds is closed);
- a header name already seen valid is not matched against uvicorn's name regex (nor
  lower-cased) again; values still are checked, every time.

Every process `ku up` starts (`runner.HTTP_PROTOCOL`), compose's and the image's use
it: `--http services.kit.http:HttpProtocol`.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import Any

import httptools
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

# Header names responses were already sent with (each checked once against HEADER_RE),
# and their lower-case form.
_VALID_NAMES: dict[bytes, bytes] = {}
_MAX_VALID_NAMES = 1024


def _nothing() -> None:
    return None


class _Cycle(RequestResponseCycle):
    """uvicorn's request/response cycle; `send` holds a Content-Length response's head
    until the first piece of its body and writes them together."""

    held: bytes | None = None

    async def send(self, message: Any) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()

        if self.disconnected:
            return

        if not self.response_started:
            if message["type"] != "http.response.start":
                raise RuntimeError(
                    f"Expected ASGI message 'http.response.start', but got '{message['type']}'."
                )
            self.response_started = True
            self.waiting_for_100_continue = False
            status_code = message["status"]

            if self.access_log:
                self.access_logger.info(
                    '%s - "%s %s HTTP/%s" %d',
                    get_client_addr(self.scope),
                    self.scope["method"],
                    get_path_with_query_string(self.scope),
                    self.scope["http_version"],
                    status_code,
                )

            content = [STATUS_LINE[status_code]]
            has_connection_close = False
            for headers in (self.default_headers, message.get("headers", ())):
                for name, value in headers:
                    lowered = _VALID_NAMES.get(name)
                    if lowered is None:
                        if HEADER_RE.search(name):
                            raise RuntimeError("Invalid HTTP header name.")
                        lowered = name.lower()
                        if len(_VALID_NAMES) < _MAX_VALID_NAMES:
                            _VALID_NAMES[name] = lowered
                    if HEADER_VALUE_RE.search(value):
                        raise RuntimeError("Invalid HTTP header value.")
                    name = lowered
                    if name == b"content-length" and self.chunked_encoding is None:
                        self.expected_content_length = int(value.decode())
                        self.chunked_encoding = False
                    elif name == b"transfer-encoding" and value.lower() == b"chunked":
                        self.expected_content_length = 0
                        self.chunked_encoding = True
                    elif name == b"connection":
                        connection = [token.lower().strip() for token in value.split(b",")]
                        if b"close" in connection:
                            self.keep_alive = False
                            has_connection_close = True
                    content.extend((name, b": ", value, b"\r\n"))

            if not self.keep_alive and not has_connection_close:
                content.append(b"connection: close\r\n")

            head_request = self.scope["method"] == "HEAD"
            if self.chunked_encoding is None and not head_request and status_code not in (204, 304):
                # Neither content-length nor transfer-encoding specified
                self.chunked_encoding = True
                content.append(b"transfer-encoding: chunked\r\n")

            content.append(b"\r\n")
            if (
                self.chunked_encoding is False
                and self.expected_content_length > 0
                and not head_request
            ):
                self.held = b"".join(content)  # its body comes next
            else:
                self.transport.write(b"".join(content))

        elif not self.response_complete:
            if message["type"] != "http.response.body":
                raise RuntimeError(
                    f"Expected ASGI message 'http.response.body', but got '{message['type']}'."
                )
            body = message.get("body", b"")
            more_body = message.get("more_body", False)

            if self.scope["method"] == "HEAD":
                self.expected_content_length = 0
            elif self.chunked_encoding:
                if body:
                    content = [b"%x\r\n" % len(body), body, b"\r\n"]
                else:
                    content = []
                if not more_body:
                    content.append(b"0\r\n\r\n")
                self.transport.write(b"".join(content))
            else:
                num_bytes = len(body)
                if num_bytes > self.expected_content_length:
                    raise RuntimeError("Response content longer than Content-Length")
                self.expected_content_length -= num_bytes
                held = self.held
                if held is not None:
                    self.held = None
                    self.transport.write(held + body)
                else:
                    self.transport.write(body)

            if not more_body:
                if self.expected_content_length != 0:
                    raise RuntimeError("Response content shorter than Content-Length")
                self.response_complete = True
                self.message_event.set()
                if not self.keep_alive:
                    self.transport.close()
                self.on_response()

        else:
            raise RuntimeError(
                f"Unexpected ASGI message '{message['type']}' sent,"
                " after response already completed."
            )

    def close(self) -> None:
        """Close the connection, the held head (if any) written first."""
        held = self.held
        if held is not None:
            self.held = None
            self.transport.write(held)
        self.transport.close()

    async def run_asgi(self, app: Any) -> None:
        # uvicorn's, with `close` for its transport.close() (the held head goes out first).
        try:
            result = await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            self.logger.error("Exception in ASGI application\n", exc_info=exc)
            if not self.response_started:
                await self.send_500_response()
            else:
                self.close()
        else:
            if result is not None:
                self.logger.error("ASGI callable should return None, but returned '%s'.", result)
                self.close()
            elif not self.response_started and not self.disconnected:
                self.logger.error("ASGI callable returned without starting response.")
                await self.send_500_response()
            elif not self.response_complete and not self.disconnected:
                self.logger.error("ASGI callable returned without completing response.")
                self.close()
        finally:
            self.on_response = _nothing


class HttpProtocol(HttpToolsProtocol):
    _keep_alive_timer: asyncio.TimerHandle | None = None
    _idle_since: float | None = None  # loop time the last response completed; None: busy

    # -- one keep-alive timer per connection -------------------------------------------

    def _unset_keepalive_if_required(self) -> None:
        # Called by uvicorn when data arrives: the connection is busy again. The timer
        # stays armed; when it fires it finds the connection busy, or idle since later.
        self._idle_since = None

    def _keep_alive_expired(self) -> None:
        self._keep_alive_timer = None
        idle_since = self._idle_since
        if idle_since is None or self.transport.is_closing():
            return  # busy: armed again when its response completes
        due = idle_since + self.timeout_keep_alive
        if self.loop.time() >= due:
            self.timeout_keep_alive_handler()
        else:
            self._keep_alive_timer = self.loop.call_at(due, self._keep_alive_expired)

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._idle_since = None
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        now = self.loop.time()
        self._idle_since = now
        if self._keep_alive_timer is None:
            self._keep_alive_timer = self.loop.call_at(
                now + self.timeout_keep_alive, self._keep_alive_expired
            )

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._idle_since = None
        if self._keep_alive_timer is not None:
            self._keep_alive_timer.cancel()
            self._keep_alive_timer = None

    # -- uvicorn's, with `_Cycle` ------------------------------------------------------

    def on_headers_complete(self) -> None:
        http_version = self.parser.get_http_version()
        method = self.parser.get_method()
        self.scope["method"] = method.decode("ascii")
        if http_version != "1.1":
            self.scope["http_version"] = http_version
        if self.parser.should_upgrade() and self._should_upgrade():
            return
        parsed_url = httptools.parse_url(self.url)
        raw_path = parsed_url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        full_path = self.root_path + path
        full_raw_path = self.root_path.encode("ascii") + raw_path
        self.scope["path"] = full_path
        self.scope["raw_path"] = full_raw_path
        self.scope["query_string"] = parsed_url.query or b""

        if self.limit_concurrency is not None and (
            len(self.connections) >= self.limit_concurrency
            or len(self.tasks) >= self.limit_concurrency
        ):
            app = service_unavailable
            self.logger.warning("Exceeded concurrency limit.")
        else:
            app = self.app

        existing_cycle = self.cycle
        self.cycle = _Cycle(
            scope=self.scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=self.expect_100_continue,
            keep_alive=http_version != "1.0" and self.parser.should_keep_alive(),
            on_response=self.on_response_complete,
        )
        if existing_cycle is None or existing_cycle.response_complete:
            self._start_asgi_task(self.cycle, app)
        else:
            # Pipelined HTTP requests need to be queued up.
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, app))
