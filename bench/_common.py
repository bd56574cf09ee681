"""Shared pieces of the benches: a scratch database, a service process, a load loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from services.kit.db import plain_url
from services.kit.embedded import ensure_urls, with_database
from services.kit.migrations import upgrade_all
from services.kit.runner import HTTP_PROTOCOL, NO_PROXY_HEADERS


def use_principal_keys() -> dict[str, str]:
    """Principal keys for this bench run: the bench process holds every private key (it
    plays the gateway), and the returned env is what a service it starts needs."""
    from services.kit.config import get_settings
    from services.kit.migrations import SERVICE_ORDER
    from services.kit.principal import GATEWAY, format_keys, generate_keypair

    pairs = {name: generate_keypair() for name in (*SERVICE_ORDER, GATEWAY)}
    env = {
        "KU_PRINCIPAL_KEYS": format_keys({n: pub for n, (_, pub) in pairs.items()}),
        "KU_PRINCIPAL_SIGNING_KEYS": format_keys({n: priv for n, (priv, _) in pairs.items()}),
    }
    os.environ.update(env)
    get_settings.cache_clear()
    return env


class ScratchDatabase:
    """A fresh, migrated database on KU_DATABASE_URL's server (or the embedded one), and
    a bus prefix of its own (`bus_prefix`, for KU_BUS_PREFIX): both gone afterwards."""

    def __init__(self) -> None:
        self.embedded = ensure_urls()
        self.server = plain_url(os.environ["KU_DATABASE_URL"])
        self.name = f"ku_bench_{secrets.token_hex(4)}"
        self.bus_prefix = f"kubench{secrets.token_hex(4)}"
        self.url = with_database(os.environ["KU_DATABASE_URL"], self.name)
        self.dsn = plain_url(self.url)

    async def __aenter__(self) -> ScratchDatabase:
        conn = await asyncpg.connect(self.server)
        await conn.execute(f'CREATE DATABASE "{self.name}"')
        await conn.close()
        await asyncio.to_thread(upgrade_all, self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        conn = await asyncpg.connect(self.server)
        await conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        await conn.close()
        from redis.asyncio import Redis

        redis = Redis.from_url(os.environ["KU_REDIS_URL"])
        try:  # the run's event streams, arq queues and breaker states
            async for key in redis.scan_iter(match=f"{self.bus_prefix}*", count=500):
                await redis.delete(key)
        finally:
            await redis.aclose()
        if self.embedded is not None:
            self.embedded.stop()


def start_service(
    module: str, port: int, env: dict[str, str], processes: int = 1
) -> subprocess.Popen[bytes]:
    """`module` under uvicorn as `ku up` runs it (`processes` > 1: uvicorn's workers)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            f"{module}:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--loop",
            "uvloop",
            "--http",
            HTTP_PROTOCOL,
            NO_PROXY_HEADERS,
            "--log-level",
            "warning",
            "--workers",
            str(processes),
        ],
        env={**os.environ, **env},
    )


async def wait_ready(url: str, proc: subprocess.Popen[bytes], limit_seconds: float = 30) -> None:
    import aiohttp

    deadline = time.monotonic() + limit_seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{url} exited with {proc.returncode}")
            try:
                async with session.get(f"{url}/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {limit_seconds}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@dataclass
class Result:
    name: str
    count: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0

    def line(self) -> str:
        return (
            f"{self.name:<28} {self.rate:9.0f} /s   p50 {self.pct(0.5):6.2f} ms"
            f"   p99 {self.pct(0.99):6.2f} ms   (n={self.count})"
        )


async def load(
    name: str,
    workers: int,
    seconds: float,
    make_worker: Callable[[int], Awaitable[Callable[[], Awaitable[None]]]],
    warmup: float = 1.0,
) -> Result:
    """Run `workers` loops of the call each `make_worker(i)` returns; count after warm-up."""
    calls = [await make_worker(i) for i in range(workers)]
    latencies: list[float] = []
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + seconds

    async def loop(call: Callable[[], Awaitable[None]]) -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            await call()
            t1 = time.perf_counter()
            if t0 >= measure_from:
                latencies.append(t1 - t0)

    await asyncio.gather(*(loop(c) for c in calls))
    return Result(name, len(latencies), seconds, latencies)


class RawHTTPConnection:
    """A minimal keep-alive HTTP/1.1 client for load generation: one request at a time
    per connection, Content-Length bodies only. It costs a fraction of a general client's
    CPU, so on a 2-core machine the load generator does not starve the server it measures."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        if self.writer is None:
            await self.connect()
        assert self.reader is not None and self.writer is not None
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if body:
            lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length) if length else b""

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process, its reaped children and its live ones
    (uvicorn's workers) used so far (Linux /proc): unlike wall time, it does not grow
    while a process waits for a core others hold. 0 for a process that is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0
    ticks = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK") + sum(cpu_seconds(int(c)) for c in children)


class MachineBusy:
    """How busy the machine's cores were over a phase (/proc/stat): a case that leaves
    them idle waits on something (a lock, a round trip), it is not short of CPU."""

    @staticmethod
    def _ticks() -> tuple[int, int]:
        fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle, iowait
        return sum(fields) - idle, sum(fields)

    def __enter__(self) -> MachineBusy:
        self._start = self._ticks()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, total = self._ticks()
        self.busy = (busy - self._start[0]) / max(total - self._start[1], 1)

    def line(self) -> str:
        return f"; machine {self.busy * 100:.0f} % busy ({os.cpu_count()} cores)"


class CpuMeter:
    """CPU seconds per named process over a phase: where a bench's time goes.

    with CpuMeter({"generation": pid, ...}) as cpu: ...; print(cpu.report(per=tokens))
    """

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = {**pids, "bench": os.getpid()}
        self.used: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        self.used = {n: cpu_seconds(p) - self._start[n] for n, p in self.pids.items()}

    def report(self, per: float, unit: str) -> str:
        parts = [f"{name} {used / per * 1e6:.0f}" for name, used in self.used.items() if used]
        return f"    cpu µs per {unit}: " + ", ".join(parts)
