"""uvicorn's httptools protocol, writing a response's head and body in one send.

uvicorn writes the status line and headers when the app sends `http.response.start`
and the body on `http.response.body`: two writes, so two TCP segments and two
syscalls for every small JSON answer (on loopback the kernel also does the receiving
side's work in the sender's syscall). Here the head of a response with a
Content-Length body waits for the body and both go in one write: about a tenth of the
ledger's CPU per single debit (docs/ledger.md "The hot path").

Streamed responses (chunked: SSE, proxied streams), HEAD, and bodiless responses are
written as before, head first: a client waiting for a stream's headers is never held
back. Every process `ku up` starts (`runner.HTTP_PROTOCOL`), compose's and the
image's use it: `--http services.kit.http:HttpProtocol`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle


class _HeadWithBody:
    """A cycle's transport that holds back the head of a Content-Length response until
    its body's first write (or the transport's close), then writes them together."""

    __slots__ = ("_transport", "_cycle", "_head")

    def __init__(self, transport: asyncio.Transport, cycle: RequestResponseCycle) -> None:
        self._transport = transport
        self._cycle = cycle
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head + data)
            return
        cycle = self._cycle
        if (
            not cycle.response_complete
            and cycle.chunked_encoding is False
            and cycle.expected_content_length > 0
            and cycle.scope["method"] != "HEAD"
            and data.endswith(b"\r\n\r\n")
        ):
            self._head = data  # the head: its body comes next
            return
        self._transport.write(data)

    def close(self) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head)
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        cycle.transport = _HeadWithBody(cycle.transport, cycle)  # type: ignore[assignment]
        super()._start_asgi_task(cycle, app)
