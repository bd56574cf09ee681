"""The provider's stream reader (`OpenAICompatible` on the kit's keep-alive client):
against the loopback fake provider (answers, 429/500, keep-alive) and against raw
servers on 127.0.0.1 that write the HTTP/1.1 bytes themselves, so the chunked
encoding and the SSE events can be cut anywhere across reads, stalled, or broken."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import orjson
import pytest

from services.generation.providers import OpenAICompatible, ProviderError
from tests.generation.fake_provider import FakeProvider

Script = Sequence[bytes | float]  # bytes to write, or seconds to wait; then the end


def event(text: str | None = None, finish: str | None = None) -> bytes:
    delta = {} if text is None else {"content": text}
    chunk = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def chunked(body: bytes, sizes: Sequence[int] = ()) -> bytes:
    """`body` in HTTP/1.1 chunked encoding, cut into chunks of `sizes` (the rest in one)."""
    out, at = b"", 0
    for size in (*sizes, len(body)):
        piece = body[at : at + size]
        if piece:
            out += b"%x\r\n%b\r\n" % (len(piece), piece)
        at += len(piece)
    return out + b"0\r\n\r\n"


HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
WORDS = ["Once", " upon", " a", " time", " there", " was", " a", " lighthouse."]
ANSWER = b"".join(event(w) for w in WORDS) + event(finish="stop") + b"data: [DONE]\n\n"


@asynccontextmanager
async def raw_server(script: Callable[[int], Script]) -> AsyncIterator[str]:
    """A server on 127.0.0.1 that answers its n-th request (0, 1, ...) by writing
    `script(n)`: byte strings as they are, each float a pause between writes; then it
    closes the connection."""
    served = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        n, served = served, served + 1
        try:
            for step in script(n):
                if isinstance(step, float):
                    await asyncio.sleep(step)
                else:
                    writer.write(step)
                    await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.close()


async def read(provider: OpenAICompatible, prompt: str = "hi") -> list[str]:
    return [
        piece
        async for piece in provider.stream(
            "answer", [{"role": "user", "content": prompt}], max_tokens=100, temperature=0.5
        )
    ]


def provider(url: str, *, timeout: float = 5.0, pace: float = 0.0) -> OpenAICompatible:
    return OpenAICompatible("raw", url, "key", timeout_seconds=timeout, pace_seconds=pace)


class TestAgainstTheFakeProvider:
    async def test_an_answer_streams_and_the_connection_is_kept(self, fake: FakeProvider) -> None:
        p = OpenAICompatible(
            "fake", f"{fake.url}/v1", "fake-key", timeout_seconds=5, pace_seconds=0.01
        )
        marker = uuid.uuid4().hex
        for _ in range(3):
            pieces = await read(p, f"{marker} #words=30 #delay_ms=1")
            assert "".join(pieces).split() == [f"w{i}" for i in range(30)]
        seen = fake.seen(marker)
        assert [r["authorization"] for r in seen] == ["Bearer fake-key"] * 3
        assert seen[0]["stream"] is True and seen[0]["max_tokens"] == 100
        # Each stream read to its end, so the next one reused the connection.
        assert len({r["port"] for r in seen}) == 1
        await p.aclose()

    async def test_an_idle_connection_is_kept_for_idle_seconds(self, fake: FakeProvider) -> None:
        marker = uuid.uuid4().hex
        for tag, idle in (("kept", 30.0), ("dropped", 0.05)):
            p = OpenAICompatible(
                "fake", f"{fake.url}/v1", "k", timeout_seconds=5, idle_seconds=idle
            )
            for _ in range(2):
                assert "".join(await read(p, f"{marker}-{tag} #words=3")).split() == [
                    "w0",
                    "w1",
                    "w2",
                ]
                await asyncio.sleep(0.3)
            await p.aclose()
        assert len({r["port"] for r in fake.seen(f"{marker}-kept")}) == 1
        assert len({r["port"] for r in fake.seen(f"{marker}-dropped")}) == 2

    @pytest.mark.parametrize(("status", "retryable"), [(429, True), (500, True), (400, False)])
    async def test_an_error_status_is_a_provider_error(
        self, fake: FakeProvider, status: int, retryable: bool
    ) -> None:
        p = OpenAICompatible("fake", f"{fake.url}/v1", "fake-key", timeout_seconds=5)
        marker = uuid.uuid4().hex
        fake.fail_next(status)
        with pytest.raises(ProviderError) as raised:
            await read(p, marker)
        assert raised.value.retryable is retryable and not raised.value.timeout
        assert str(status) in str(raised.value)
        # The error's body was read: the next request goes on the same connection.
        assert "".join(await read(p, f"{marker} #words=3")).split() == ["w0", "w1", "w2"]
        assert len({r["port"] for r in fake.seen(marker)}) == 1
        await p.aclose()

    async def test_a_cut_stream_after_text_is_retryable(self, fake: FakeProvider) -> None:
        p = OpenAICompatible("fake", f"{fake.url}/v1", "fake-key", timeout_seconds=5)
        got: list[str] = []
        with pytest.raises(ProviderError) as raised:
            async for piece in p.stream(
                "answer",
                [{"role": "user", "content": "#words=20 #cut_after=6"}],
                max_tokens=100,
                temperature=0.5,
            ):
                got.append(piece)
        assert "".join(got).split() == [f"w{i}" for i in range(6)]
        assert raised.value.retryable and not raised.value.timeout
        await p.aclose()

    async def test_a_stall_is_a_timeout(self, fake: FakeProvider) -> None:
        p = OpenAICompatible("fake", f"{fake.url}/v1", "fake-key", timeout_seconds=0.3)
        with pytest.raises(ProviderError) as raised:
            await read(p, "#words=5 #stall_after=2")
        assert raised.value.timeout and not raised.value.retryable
        fake.release()
        await p.aclose()
        fake.reset()

    async def test_an_unreachable_provider_is_retryable(self) -> None:
        async with raw_server(lambda n: ()) as url:
            pass  # closed: nothing listens on its port now
        with pytest.raises(ProviderError) as raised:
            await read(provider(url))
        assert raised.value.retryable and "unreachable" in str(raised.value)


class TestRawBytes:
    @pytest.mark.parametrize("size", [1, 2, 3, 7, 19, 64, 10_000])
    async def test_chunks_and_events_cut_anywhere_across_reads(self, size: int) -> None:
        # The chunked framing cut into chunks of `size` bytes (events split across
        # chunks), and the bytes on the wire written in pieces of 5 with pauses, so
        # chunk-size lines, CRLFs and events are split across receives.
        wire = HEAD + chunked(ANSWER, [size] * (len(ANSWER) // size + 1))
        steps: list[bytes | float] = []
        for at in range(0, len(wire), 5):
            steps += [wire[at : at + 5], 0.0005]
        async with raw_server(lambda n: steps) as url:
            pieces = await read(provider(url, pace=0.002))
        assert "".join(pieces) == "".join(WORDS)

    async def test_a_connection_the_server_closed_while_idle_is_not_reused(self) -> None:
        # The server closes each connection after its answer, without saying so in the
        # head (as a server's keep-alive timeout does later): the provider's long idle
        # time must not make the next request go out on the closed connection.
        async with raw_server(lambda n: [HEAD + chunked(ANSWER)]) as url:
            p = provider(url)
            assert p.idle_seconds == 50
            for _ in range(3):
                assert "".join(await read(p)) == "".join(WORDS)
                await asyncio.sleep(0.05)
            await p.aclose()

    async def test_crlf_line_ends_and_pieces_joined_per_read(self) -> None:
        body = ANSWER.replace(b"\n", b"\r\n")
        async with raw_server(lambda n: [HEAD + chunked(body, [40, 40, 40])]) as url:
            pieces = await read(provider(url))
        # Everything came in one write: one piece of text, not one per event.
        assert pieces == ["".join(WORDS)]

    async def test_a_connection_cut_inside_a_chunk_is_retryable(self) -> None:
        wire = HEAD + chunked(ANSWER, [30] * 20)
        async with raw_server(lambda n: [wire[: len(wire) // 2]]) as url:
            got: list[str] = []
            with pytest.raises(ProviderError) as raised:
                async for piece in provider(url).stream(
                    "answer", [{"role": "user", "content": "x"}], max_tokens=9, temperature=0
                ):
                    got.append(piece)
        assert got and "".join(WORDS).startswith("".join(got))
        assert raised.value.retryable and not raised.value.timeout

    async def test_an_answer_that_ends_without_finishing_is_cut(self) -> None:
        # A well-formed body that stops before any finish_reason or [DONE].
        async with raw_server(lambda n: [HEAD + chunked(event("half") + event(" an"))]) as url:
            with pytest.raises(ProviderError, match="cut the stream") as raised:
                await read(provider(url))
        assert raised.value.retryable

    async def test_a_body_that_ends_when_the_server_closes(self) -> None:
        # HTTP/1.0 style: no length, no chunks, the close is the end (no [DONE] either).
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
        body = b"".join(event(w) for w in WORDS) + event(finish="stop").rstrip(b"\n")
        async with raw_server(lambda n: [head, body[:50], 0.01, body[50:]]) as url:
            assert "".join(await read(provider(url))) == "".join(WORDS)
        # Closed after two events, before any finish: a cut stream.
        two = event(WORDS[0]) + event(WORDS[1])
        async with raw_server(lambda n: [head, two]) as url:
            with pytest.raises(ProviderError, match="cut the stream"):
                await read(provider(url))

    async def test_a_last_event_without_its_blank_line_still_counts(self) -> None:
        body = event("all") + event(" of it", finish="stop").rstrip(b"\n")
        async with raw_server(lambda n: [HEAD + chunked(body)]) as url:
            assert "".join(await read(provider(url))) == "all of it"

    async def test_a_stall_between_chunks_is_a_timeout(self) -> None:
        async with raw_server(
            lambda n: [HEAD + b"%x\r\n%b\r\n" % (20, event("w0")[:20]), 5.0]
        ) as url:
            with pytest.raises(ProviderError) as raised:
                await read(provider(url, timeout=0.3))
        assert raised.value.timeout and not raised.value.retryable

    async def test_a_stall_before_the_head_is_a_timeout(self) -> None:
        async with raw_server(lambda n: [5.0]) as url:
            with pytest.raises(ProviderError) as raised:
                await read(provider(url, timeout=0.3))
        assert raised.value.timeout

    async def test_a_paced_read_leaves_the_socket_unread_for_the_interval(self) -> None:
        # The provider writes the first words, then the rest 10 ms later: with a pace of
        # 0.3 s the rest is read no sooner than 0.3 s after the first words came.
        rest = b"".join(event(w) for w in WORDS[1:]) + event(finish="stop")
        steps: list[bytes | float] = [
            HEAD + chunked(event(WORDS[0]))[:-5],  # without the final 0-size chunk
            0.01,
            chunked(rest + b"data: [DONE]\n\n"),
        ]
        loop = asyncio.get_running_loop()
        seen: list[tuple[float, str]] = []
        async with raw_server(lambda n: steps) as url:
            async for piece in provider(url, pace=0.3).stream(
                "answer", [{"role": "user", "content": "x"}], max_tokens=9, temperature=0
            ):
                seen.append((loop.time(), piece))
        assert [piece for _, piece in seen] == [WORDS[0], "".join(WORDS[1:])]
        assert seen[1][0] - seen[0][0] >= 0.3 - 0.005
