"""Gateway overhead: the same ledger calls made directly and through the gateway.

Self-contained: a scratch database on KU_DATABASE_URL's server (or the embedded
one), auth + ledger + gateway started as real processes by `ku up`'s Suite, an
app key from `ku keys create`, then:

- added latency (p50/p99) at 1 client, for a balance read and a 1 Ku debit;
- throughput at 32 clients, directly and through the gateway; ratio = gateway/direct;
- reads paced like debits at 1 client (the pause a debit's commit leaves between calls):
  the gateway's cost per call grows with the idle time between calls, whatever the route.

Both sides act as ImageGene, a first-party app (scope `users:any`, any user under
the authority model). Direct calls carry a pre-signed principal header (what the
gateway would forward); gateway calls carry the app key, so they pay for authentication,
rate limiting, signing and the extra hop. The load generator is raw asyncio over
keep-alive connections (prebuilt requests), so the client is not the bottleneck.
Bars (issue 13): throughput ratio >= 0.85 and added p50 <= 0.3 ms at 1 client, for
reads and debits. Last line: ratio=<gateway/direct>, the lower of read and debit.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (  # noqa: E402
    CpuMeter,
    Result,
    ScratchDatabase,
    load,
    use_principal_keys,
)
from services.kit.principal import Principal, outgoing_header  # noqa: E402
from services.kit.runner import Suite  # noqa: E402

SECONDS = float(os.environ.get("KU_BENCH_SECONDS", "5"))
CLIENTS = 32
USERS = 200


class Connection:
    """One keep-alive HTTP/1.1 connection; just enough parsing for these responses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Connection:
        host, port = url.split("://", 1)[1].rsplit(":", 1)
        return cls(*await asyncio.open_connection(host, int(port)))

    async def send(self, request: bytes) -> int:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        at = lower.find(b"content-length:")
        if at < 0:
            raise RuntimeError(f"no content-length in {head!r}")
        length = int(lower[at + 15 : lower.find(b"\r\n", at)])
        await self.reader.readexactly(length)
        return status


def get(path: str, headers: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: bench\r\n{headers}\r\n".encode()


def post(path: str, headers: str, body: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n{headers}\r\n{body}"
    ).encode()


class Caller:
    """Builds requests for one target: direct (principal header) or gateway (API key)."""

    def __init__(self, secret: str | None, key: str | None) -> None:
        self.secret, self.key = secret, key
        self._header, self._at = "", 0.0

    def auth(self) -> str:
        if self.key:
            return f"x-api-key: {self.key}\r\n"
        if time.monotonic() - self._at > 20:  # the signed header lives 60 s
            principal = Principal(
                kind="app",
                app="imagegene",
                scopes=frozenset({"ledger:read", "ledger:write", "users:any"}),
            )
            self._header = f"x-ku-principal: {outgoing_header(principal, audience='ledger')}\r\n"
            self._at = time.monotonic()
        return self._header

    def read(self, users: list[str]) -> bytes:
        user = users[secrets.randbelow(len(users))]
        return get(f"/v1/ledger/balance?user_id={user}", self.auth())

    def debit(self, users: list[str]) -> bytes:
        user = users[secrets.randbelow(len(users))]
        body = f'{{"user_id":"{user}","amount":1,"reference":"{uuid.uuid4().hex}"}}'
        return post("/v1/ledger/debits", self.auth(), body)


async def run_case(
    name: str,
    url: str,
    clients: int,
    build: Callable[[], bytes],
    expect: int,
    errors: list[str],
    pids: dict[str, int],
    pause: float = 0.0,
) -> Result:
    """`clients` loops of one call after another; with `pause`, each client waits that
    long before each call (not counted in its latency)."""
    calls = 0
    paused: list[float] = []  # the latencies of paced calls, without the pause

    async def make(_: int) -> Callable[[], Awaitable[None]]:
        conn = await Connection.open(url)

        async def call() -> None:
            nonlocal calls
            if pause:
                await asyncio.sleep(pause)
                started = time.perf_counter()
            status = await conn.send(build())
            if pause:
                paused.append(time.perf_counter() - started)
            calls += 1
            if status != expect:
                errors.append(f"{name}: {status}")

        return call

    # CPU per call (warm-up included in both counts): the figure a loaded machine
    # disturbs least, unlike the rates and latencies.
    with CpuMeter(pids) as cpu:
        result = await load(name, clients, SECONDS, make, warmup=1.0)
    if pause:  # the measured calls are the last ones (the warm-up's came first)
        result = Result(name, result.count, SECONDS, paused[-result.count :])
    print(result.line(), flush=True)
    print(cpu.report(per=max(calls, 1), unit="call"), flush=True)
    if "gateway" in name and cpu.used.get("bench"):
        # The load generator's code is the same in every run: its CPU per call is a
        # thermometer for the machine's contention, this ratio less load-dependent.
        print(f"    gateway cpu / client cpu: {cpu.used['gateway'] / cpu.used['bench']:.2f}")
    return result


async def setup(ledger: str, secret: str, users: list[str]) -> None:
    grant = Principal(kind="app", app="bench", scopes=frozenset({"admin"}))
    conn = await Connection.open(ledger)
    for user in users:
        header = f"x-ku-principal: {outgoing_header(grant, audience='ledger')}\r\n"
        body = f'{{"user_id":"{user}","welcome":false}}'
        assert await conn.send(post("/v1/ledger/accounts", header, body)) in (200, 201)
        body = (
            f'{{"user_id":"{user}","amount":1000000,"source":"promo","reference":"b{user}",'
            '"reason":"bench"}'
        )
        assert await conn.send(post("/v1/ledger/grants", header, body)) == 201


async def measure(suite: Suite, key: str) -> float:
    secret = ""  # this process signs with the suite's keys (suite.env, set in os.environ)
    ledger, gateway = suite.urls["ledger"], suite.urls["gateway"]
    pids = {name: suite.processes[name].pid for name in ("gateway", "ledger")}
    users = [str(10**20 + secrets.randbelow(9 * 10**20)) for _ in range(USERS)]
    await setup(ledger, secret, users)
    direct, through = Caller(secret, None), Caller(None, key)
    errors: list[str] = []
    rows: dict[str, Result] = {}
    for op, expect in (("read", 200), ("debit", 201)):
        for clients in (1, CLIENTS):
            for label, url, caller in (("direct", ledger, direct), ("gateway", gateway, through)):
                build = (
                    (lambda c=caller: c.read(users))
                    if op == "read"
                    else (lambda c=caller: c.debit(users))
                )
                name = f"{op} {label} x{clients}"
                rows[name] = await run_case(name, url, clients, build, expect, errors, pids)
    # Reads paced like debits: each call after the pause a debit's ledger work leaves
    # between two calls at 1 client. At 1 client the gateway's CPU per call, and so its
    # added latency, grows with the idle time between calls (each call finds the
    # process's caches cold), whatever the route: a paced read costs the gateway
    # about what a debit does (docs/ledger.md, "Stop 12").
    pause = max(0.0, (rows["debit direct x1"].pct(0.5) - rows["read direct x1"].pct(0.5)) / 1000)
    for label, url, caller in (("direct", ledger, direct), ("gateway", gateway, through)):
        name = f"read {label} x1 paced"

        def paced(c: Caller = caller) -> bytes:
            return c.read(users)

        rows[name] = await run_case(name, url, 1, paced, 200, errors, pids, pause=pause)
    if errors:
        print(f"errors: {len(errors)}, e.g. {errors[:3]}", flush=True)
    if errors:
        raise RuntimeError(f"{len(errors)} calls failed, e.g. {errors[:3]}")
    ratios = []
    for op in ("read", "debit"):
        d1, g1 = rows[f"{op} direct x1"], rows[f"{op} gateway x1"]
        dn, gn = rows[f"{op} direct x{CLIENTS}"], rows[f"{op} gateway x{CLIENTS}"]
        ratio = gn.rate / dn.rate
        ratios.append(ratio)
        added = g1.pct(0.5) - d1.pct(0.5)
        print(
            f"{op:<6} added latency at 1 client: p50 {added:+.2f} ms"
            f" ({'ok' if added <= 0.3 else 'ABOVE'} 0.3), "
            f"p99 {g1.pct(0.99) - d1.pct(0.99):+.2f} ms; "
            f"throughput x{CLIENTS}: {gn.rate:.0f}/{dn.rate:.0f} /s = {ratio:.2f}"
            f" ({'ok' if ratio >= 0.85 else 'BELOW'} 0.85)",
            flush=True,
        )
    d1, g1 = rows["read direct x1 paced"], rows["read gateway x1 paced"]
    print(
        f"read paced like a debit ({pause * 1000:.2f} ms between calls): added latency at"
        f" 1 client: p50 {g1.pct(0.5) - d1.pct(0.5):+.2f} ms",
        flush=True,
    )
    return min(ratios)


async def main() -> None:
    async with ScratchDatabase() as db:
        env = {
            **os.environ,
            **use_principal_keys(),
            "KU_DATABASE_URL": db.url,
            "KU_BUS_PREFIX": db.bus_prefix,
            "KU_LOG_LEVEL": "WARNING",
            # Rate limiting stays on (its cost is measured), with limits this load never hits.
            "KU_GATEWAY_RATE_PER_KEY": "1000000000",
            "KU_GATEWAY_RATE_PER_IP": "1000000000",
        }
        suite = Suite(
            env, only=["auth", "ledger", "gateway"], free_ports=True, migrate=False, quiet=True
        )
        async with suite:
            key = (
                await asyncio.to_thread(
                    subprocess.run,
                    [
                        sys.executable,
                        "-m",
                        "services.cli",
                        "keys",
                        "create",
                        "--app",
                        "imagegene",
                        "--scopes",
                        # ImageGene is first-party: any user (docs/ledger.md, authority).
                        "ledger:read,ledger:write,users:any",
                    ],
                    env=suite.env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
            ).stdout.strip()
            ratio = await measure(suite, key)
    print(f"ratio={ratio:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
