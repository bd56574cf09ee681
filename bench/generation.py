"""Generation overhead: streamed chat completions through the gateway and the generation
service vs. the same fake provider called directly.

Self-contained: a scratch database on KU_DATABASE_URL's server (or the embedded one),
the fake OpenAI-compatible provider (`tests/generation/fake_provider.py`) as its own
process, auth + ledger + generation + gateway started as real processes by `ku up`'s
Suite, an app key from `ku keys create`, funded users. Then:

- time to first token (p50, p99) at 1 client, direct vs. through Ku; through Ku each
  request also holds credit on the ledger first and settles after;
- streamed-token throughput at 64 concurrent streams, direct vs. through Ku.

The client is raw asyncio (one HTTP/1.1 request per connection, read to EOF), counting
`"content":"…"` deltas as they arrive, so it is not the bottleneck. The provider paces
its tokens (KU_BENCH_TOKEN_DELAY, default 2 ms); every stream is KU_BENCH_WORDS words
(default 200: the issue's case; a longer answer spreads each generation's fixed cost,
hold, capture and records, over more tokens). Each throughput phase also prints the CPU
every process spent per token delivered, which is where to look first. Last line:
ratio=<through Ku/direct> of the throughput at 64 streams.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson  # noqa: E402

from bench._common import (  # noqa: E402
    CpuMeter,
    RawHTTPConnection,
    ScratchDatabase,
    stop,
    use_principal_keys,
)
from services.kit.principal import Principal, SignedPrincipal, outgoing_header  # noqa: E402
from services.kit.runner import Suite, free_port  # noqa: E402

SECONDS = float(os.environ.get("KU_BENCH_SECONDS", "4"))
TOKEN_DELAY = float(os.environ.get("KU_BENCH_TOKEN_DELAY", "0.002"))
STREAMS = 64
WORDS = int(os.environ.get("KU_BENCH_WORDS", "200"))
TTFT_SAMPLES = 40
TOKEN = b'"content":"'
EMPTY = b'"content":""'


def request(url: str, path: str, body: dict[str, object], headers: dict[str, str]) -> bytes:
    payload = orjson.dumps(body)
    host = url.split("://", 1)[1]
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\nconnection: close\r\n{head}\r\n"
    ).encode() + payload


READS = [0]  # receives by the client, all streams: tokens per read = how coalesced


async def stream_once(url: str, raw: bytes) -> tuple[float, int, float]:
    """(seconds to the first token, words, seconds in all) of one streamed request: the
    fake always writes WORDS words, so a stream that reached `[DONE]` delivered WORDS
    (Ku may coalesce several words in one chunk: chunks are not words)."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(raw)
    first = 0.0
    last = b""
    head_done = False
    reads = 0
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            reads += 1
            if not head_done:
                if data[9:12] != b"200":
                    raise RuntimeError(data[:300].decode(errors="replace"))
                head_done = True
            if not first and data.count(TOKEN) > data.count(EMPTY):
                first = time.perf_counter() - started
            last = (last + data)[-64:]
    finally:
        writer.close()
        READS[0] += reads
    words = WORDS if b"[DONE]" in last else 0
    if not words:
        print("incomplete stream, ending:", last, flush=True)
    return first, words, time.perf_counter() - started


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def ttft(url: str, build: object) -> list[float]:
    out = []
    for i in range(TTFT_SAMPLES + 5):
        first, tokens, _ = await stream_once(url, build(i))  # type: ignore[operator]
        assert tokens > 0
        if i >= 5:  # warm-up
            out.append(first)
    return out


async def throughput(url: str, build: object, pids: dict[str, int]) -> float:
    """Tokens per second over SECONDS with STREAMS streams always open; prints the CPU
    each process spent per token."""
    counted = streams = 0
    durations: list[float] = []
    stop_at = time.perf_counter() + SECONDS

    async def worker(i: int) -> None:
        nonlocal counted, streams
        n = 0
        while time.perf_counter() < stop_at:
            _, words, took = await stream_once(url, build(i * 1000 + n))  # type: ignore[operator]
            counted += words
            streams += 1
            durations.append(took)
            n += 1

    started = time.perf_counter()
    READS[0] = 0
    with CpuMeter(pids) as cpu:
        await asyncio.gather(*(worker(i) for i in range(STREAMS)))
    elapsed = time.perf_counter() - started
    print(
        f"  {streams} streams ({counted // WORDS} complete) in {elapsed:.1f} s, "
        f"p50 {pct(durations, 0.5):.0f} ms per stream, "
        f"{counted / max(READS[0], 1):.1f} tokens per client read",
        flush=True,
    )
    print(cpu.report(max(counted, 1), "token"), flush=True)
    return counted / elapsed


async def fund(ledger: str, secret: str, users: list[str]) -> None:
    import httpx

    admin = Principal(
        kind="app",
        app="bench",
        scopes=frozenset({"users:any", "users:write", "ledger:grant", "ledger:write"}),
    )
    async with httpx.AsyncClient(base_url=ledger, timeout=30) as c:
        for user in users:
            headers = {"x-ku-principal": outgoing_header(admin, audience="ledger")}
            r = await c.post(
                "/v1/ledger/accounts", json={"user_id": user, "welcome": False}, headers=headers
            )
            assert r.status_code in (200, 201), r.text
            r = await c.post(
                "/v1/ledger/grants",
                json={
                    "user_id": user,
                    "amount": 1_000_000,
                    "source": "promo",
                    "reference": f"bench{user}",
                },
                headers=headers,
            )
            assert r.status_code == 201, r.text


ROOT = Path(__file__).resolve().parents[1]


async def hold_latency(ledger: str, secret: str, user: str) -> list[float]:
    """Hold then release on the ledger directly: the floor of Ku's added TTFT. Sent with
    the minimal client (bench._common): httpx added ~3.5 ms a request on this machine,
    more than the hold itself, which the generation service sends on the kit's pool."""
    # What the generation service's hold costs, as a first-party app's hold (the same
    # route and SQL; a service's hold also carries its caller's origin).
    service = Principal(kind="app", app="bench", scopes=frozenset({"users:any", "ledger:write"}))
    host, port = ledger.split("://", 1)[1].rsplit(":", 1)
    conn = RawHTTPConnection(host, int(port))
    out = []
    try:
        for i in range(TTFT_SAMPLES):
            headers = {
                "x-ku-principal": outgoing_header(service, audience="ledger"),
                "idempotency-key": secrets.token_hex(8),
            }
            body = {"user_id": user, "amount": 2, "app": "bench", "reference": f"h{i}"}
            started = time.perf_counter()
            status, answer = await conn.request(
                "POST", "/v1/ledger/holds", orjson.dumps(body), headers
            )
            out.append(time.perf_counter() - started)
            assert status == 201, answer
            hold = orjson.loads(answer)["hold"]["id"]
            await conn.request("POST", f"/v1/ledger/holds/{hold}/release", b"", headers)
    finally:
        await conn.close()
    return out


def start_fake(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.generation.fake_provider", str(port), str(TOKEN_DELAY)],
        cwd=ROOT,
    )


async def main() -> None:
    fake_port = free_port()
    fake = start_fake(fake_port)
    fake_url = f"http://127.0.0.1:{fake_port}"
    try:
        async with ScratchDatabase() as db:
            env = {
                **os.environ,
                **use_principal_keys(),
                "KU_DATABASE_URL": db.url,
                "KU_BUS_PREFIX": db.bus_prefix,
                "KU_LOG_LEVEL": "WARNING",
                "KU_GATEWAY_RATE_PER_KEY": "1000000000",
                "KU_GATEWAY_RATE_PER_IP": "1000000000",
                "KU_GENERATION_PROVIDERS": orjson.dumps(
                    {"fake": {"base_url": f"{fake_url}/v1", "api_key": "bench"}}
                ).decode(),
                "KU_GENERATION_MODELS": orjson.dumps(
                    [
                        {
                            "id": "bench",
                            "upstream": "answer",
                            "provider": "fake",
                            "multiplier_milli": 1000,
                        }
                    ]
                ).decode(),
            }
            suite = Suite(
                env,
                only=["auth", "ledger", "generation", "gateway"],
                free_ports=True,
                migrate=False,
                quiet=True,
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
                            "bench",
                            "--scopes",
                            "generate,users:any",
                        ],
                        env=suite.env,
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                ).stdout.strip()
                users = [str(10**20 + secrets.randbelow(9 * 10**20)) for _ in range(STREAMS)]
                await fund(suite.urls["ledger"], "", users)
                gateway = suite.urls["gateway"]

                def direct(i: int) -> bytes:
                    body = {
                        "model": "answer",
                        "stream": True,
                        "max_tokens": WORDS * 2,
                        "messages": [{"role": "user", "content": f"#words={WORDS} {i}"}],
                    }
                    return request(fake_url, "/v1/chat/completions", body, {})

                def through(i: int) -> bytes:
                    body = {
                        "model": "bench",
                        "stream": True,
                        "max_tokens": WORDS,
                        "user": users[i % len(users)],
                        "messages": [{"role": "user", "content": f"#words={WORDS} {i}"}],
                    }
                    return request(
                        gateway, "/v1/generation/chat/completions", body, {"x-api-key": key}
                    )

                secret = ""
                generation = suite.urls["generation"]

                principal = Principal(
                    kind="app", app="bench", scopes=frozenset({"generate", "users:any"})
                )
                # Re-signed every 20 s, as the gateway does (a header seen before skips
                # the service's signature check).
                signed = SignedPrincipal(principal)

                def header() -> str:
                    return signed.header_for("generation")

                def service(i: int) -> bytes:
                    # The generation service without the gateway: where the time goes.
                    body = {
                        "model": "bench",
                        "stream": True,
                        "max_tokens": WORDS,
                        "user": users[i % len(users)],
                        "messages": [{"role": "user", "content": f"#words={WORDS} {i}"}],
                    }
                    return request(
                        generation,
                        "/v1/generation/chat/completions",
                        body,
                        {"x-ku-principal": header()},
                    )

                d1 = await ttft(fake_url, direct)
                s1 = await ttft(generation, service)
                g1 = await ttft(gateway, through)
                holds = await hold_latency(suite.urls["ledger"], secret, users[0])
                print(f"ttft direct   p50 {pct(d1, 0.5):7.2f} ms  p99 {pct(d1, 0.99):7.2f} ms")
                print(f"ttft service  p50 {pct(s1, 0.5):7.2f} ms  p99 {pct(s1, 0.99):7.2f} ms")
                print(f"ttft via Ku   p50 {pct(g1, 0.5):7.2f} ms  p99 {pct(g1, 0.99):7.2f} ms")
                print(f"ledger hold   p50 {pct(holds, 0.5):7.2f} ms (part of every generation)")
                print(
                    f"added ttft at 1 client: p50 {pct(g1, 0.5) - pct(d1, 0.5):+.2f} ms", flush=True
                )
                procs = {name: p.pid for name, p in suite.processes.items()}
                pids = {"fake": fake.pid}
                dn = await throughput(fake_url, direct, pids)
                print(f"tokens/s direct x{STREAMS}: {dn:9.0f}", flush=True)
                sn = await throughput(generation, service, {**pids, **procs})
                print(f"tokens/s service x{STREAMS}: {sn:9.0f} (no gateway)", flush=True)
                gn = await throughput(gateway, through, {**pids, **procs})
                print(f"tokens/s via Ku x{STREAMS}: {gn:9.0f}", flush=True)
    finally:
        stop(fake)
    print(f"ratio={gn / dn:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
