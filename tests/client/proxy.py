"""A tiny TCP proxy on 127.0.0.1 that loses the answer to the first request: it forwards
the request, waits until the server has answered (so the work is done), then closes the
client's connection without passing the answer on. Later connections pass through."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit


class DroppingProxy:
    def __init__(self, upstream_url: str, drop_first: int = 1) -> None:
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.to_drop = drop_first
        self.dropped = 0
        self.connections = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def __aenter__(self) -> DroppingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        drop = self.dropped < self.to_drop
        try:
            if drop:
                self.dropped += 1
                await self._drop_answer(reader, writer, up_reader, up_writer)
            else:
                await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                with contextlib.suppress(Exception):
                    w.close()

    async def _drop_answer(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        forward = asyncio.create_task(self._pipe(reader, up_writer))
        answer = await up_reader.read(65536)  # the server has answered: the work is done
        assert answer.startswith(b"HTTP/1.1 "), answer[:50]
        forward.cancel()
        writer.transport.abort()  # a reset, as when a connection dies mid-way

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.close()


@contextlib.contextmanager
def in_a_thread(proxy: DroppingProxy) -> Iterator[DroppingProxy]:
    """The proxy on its own event loop in a thread, for a blocking client."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(proxy.__aenter__(), loop).result(timeout=10)
        try:
            yield proxy
        finally:
            asyncio.run_coroutine_threadsafe(proxy.__aexit__(), loop).result(timeout=10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()
