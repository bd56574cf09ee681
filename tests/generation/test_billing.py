"""The generation service's ledger calls (`billing.LedgerCalls`, over the kit's pool)
against a scripted HTTP server on loopback: the ServiceClient's rules (signed principal,
origin, idempotency key, retries of connection errors and 502/503/504 with the same key,
the ledger's errors as kit errors), on kept-alive connections."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
import pytest

from services.generation.billing import Billing, LedgerCalls
from services.kit.config import KuSettings
from services.kit.errors import Conflict, PaymentRequired, UpstreamError
from services.kit.principal import ORIGIN_HEADER, PRINCIPAL_HEADER
from services.kit.service_client import ServiceClient


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Ledger:
    """Answers each request with the next scripted (status, body); drops the connection
    without an answer for a `None` entry."""

    script: list[tuple[int, object] | None]
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, target, _ = lines[0].split(" ")
                headers = dict(
                    (k.lower(), v) for k, v in (line.split(": ", 1) for line in lines[1:] if line)
                )
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.seen.append(Seen(method, target, headers, body))
                step = self.script.pop(0)
                if step is None:
                    writer.close()
                    return
                status, answer = step
                payload = orjson.dumps(answer)
                writer.write(
                    b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (status, len(payload), payload)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return


@pytest.fixture
async def served() -> AsyncIterator[tuple[Ledger, LedgerCalls]]:
    ledger = Ledger(script=[])
    server = await asyncio.start_server(ledger.handle, "127.0.0.1", 0)
    ledger.port = server.sockets[0].getsockname()[1]
    client = ServiceClient(
        KuSettings(ledger_url=f"http://127.0.0.1:{ledger.port}"), me="generation", retries=2
    )
    calls = LedgerCalls(client, timeout_seconds=2)
    try:
        yield ledger, calls
    finally:
        await calls.aclose()
        await client.aclose()
        server.close()
        await server.wait_closed()


HOLD = {"hold": {"id": "4f9c2b1e-8d3a-4c6e-9f1b-2a7d5e8c0b34"}}


class TestLedgerCalls:
    async def test_a_hold_is_signed_keyed_and_kept_alive(self, served) -> None:
        ledger, calls = served
        ledger.script = [(201, HOLD), (201, HOLD), (200, {"ok": True})]
        billing = Billing(calls.client, hold_ttl_seconds=60)
        billing.ledger = calls
        hold = await billing.hold(
            user_id="u1",
            app="penora",
            amount_milli=1500,
            reference="gen:1",
            description="d",
            origin="origin-header",
        )
        assert hold == HOLD["hold"]["id"]
        again = await billing.hold(
            user_id="u1",
            app="penora",
            amount_milli=1500,
            reference="gen:1",
            description="d",
            origin=None,
        )
        assert again == hold
        await billing.settle(hold, 0)
        first, second, release = ledger.seen
        assert (first.method, first.target) == ("POST", "/v1/ledger/holds")
        assert orjson.loads(first.body)["amount"] == 1.5
        assert first.headers["content-type"] == "application/json"
        assert first.headers["idempotency-key"] == "gen:1:hold"
        assert first.headers[PRINCIPAL_HEADER.lower()]
        assert first.headers[ORIGIN_HEADER.lower()] == "origin-header"
        assert ORIGIN_HEADER.lower() not in second.headers
        assert release.target == f"/v1/ledger/holds/{hold}/release"
        assert release.body == b"" and "content-type" not in release.headers
        assert release.headers["idempotency-key"] == f"release:{hold}"
        assert ledger.connections == 1  # one kept-alive connection for the three calls

    async def test_503_and_a_dropped_connection_are_retried_with_the_same_key(self, served) -> None:
        ledger, calls = served
        ledger.script = [(503, {}), None, (201, HOLD)]
        answer = await calls.post("/v1/ledger/holds", {"a": 1}, idempotency_key="k1")
        assert answer == HOLD
        assert [s.headers["idempotency-key"] for s in ledger.seen] == ["k1", "k1", "k1"]
        assert [s.body for s in ledger.seen] == [b'{"a":1}'] * 3

    async def test_the_ledgers_errors_come_back_as_kit_errors_unretried(self, served) -> None:
        ledger, calls = served
        ledger.script = [
            (402, {"error": {"code": "insufficient_credits", "message": "No", "detail": {}}}),
            (409, {"error": {"code": "idempotency_conflict", "message": "No", "detail": {}}}),
        ]
        with pytest.raises(PaymentRequired) as paid:
            await calls.post("/v1/ledger/holds", {}, idempotency_key="k2")
        assert paid.value.code == "insufficient_credits"
        with pytest.raises(Conflict):
            await calls.post("/v1/ledger/holds", {}, idempotency_key="k3")
        assert len(ledger.seen) == 2

    async def test_retries_run_out_on_a_ledger_that_keeps_failing(self, served) -> None:
        ledger, calls = served
        ledger.script = [(502, {}), (502, {}), (502, {})]
        with pytest.raises(UpstreamError):
            await calls.post("/v1/ledger/holds", {}, idempotency_key="k4")
        assert len(ledger.seen) == 3  # retries=2: three attempts

    async def test_an_unreachable_ledger_is_an_upstream_error(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # bound, never listening: refused
            client = ServiceClient(
                KuSettings(ledger_url=f"http://127.0.0.1:{port}"), me="generation", retries=1
            )
            calls = LedgerCalls(client, timeout_seconds=1)
            with pytest.raises(UpstreamError) as failed:
                await calls.post("/v1/ledger/holds", {}, idempotency_key="k5")
            assert failed.value.detail.get("service") == "ledger"
            await calls.aclose()
            await client.aclose()
