"""`KuClient` (blocking) and `AsyncKuClient`: the same operations (`_ops`), retried
by the same rule (`_core`), over one pooled httpx client each."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import httpx

from ku_client import _ops
from ku_client._batch import BatchItem, BatchResult
from ku_client._core import (
    USER_AGENT,
    Call,
    RetryPolicy,
    parse_retry_after,
    raise_for,
    should_retry,
)
from ku_client._exceptions import ConnectionFailed
from ku_client._models import (
    Balance,
    Charge,
    EnhancementTask,
    Estimate,
    Event,
    Generation,
    Hold,
    HoldResult,
    Model,
    Page,
    Project,
    Transaction,
)
from ku_client._sse import EventParser

R = TypeVar("R")


def _headers(api_key: str | None, token: str | None) -> dict[str, str]:
    headers = {"user-agent": USER_AGENT, "accept": "application/json"}
    if api_key:
        headers["x-api-key"] = api_key
    if token:
        headers["authorization"] = f"Bearer {token}"
    return headers


def _retry_after(response: httpx.Response) -> float | None:
    return parse_retry_after(response.headers.get("retry-after"))


class KuClient:
    """Ku's native API. Authenticate with an app's `api_key` or a user's access `token`.

    Amounts are integer milli-Ku (1 Ku = 1000). Money-moving calls send an
    `Idempotency-Key` (pass your own to de-duplicate across processes and restarts).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(
            base_url=base_url,
            headers=_headers(api_key, token),
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KuClient:
        return self

    def __exit__(self, *exc: tuple[type[BaseException], BaseException, TracebackType]) -> None:
        self.close()

    def _send(self, call: Call) -> httpx.Response:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._http.send(call.request(self._http))
            except httpx.TransportError as exc:
                delay = self.retry.delay(attempt, None) if should_retry(call, None) else None
                if delay is None:
                    raise ConnectionFailed(f"{call.method} {call.path}: {exc!r}") from exc
            else:
                if not should_retry(call, response.status_code):
                    return response
                delay = self.retry.delay(attempt, _retry_after(response))
                if delay is None:
                    return response
            time.sleep(delay)

    def _run(self, op: _ops.Op[R]) -> R:
        response = self._send(op.call)
        raise_for(response)
        return op.parse(response)

    # ledger
    def balance(self, user_id: str) -> Balance:
        return self._run(_ops.balance(user_id))

    def transactions(self, user_id: str, **filters: Any) -> Page[Transaction]:
        return self._run(_ops.transactions(user_id, **filters))

    def reserve(self, user_id: str, amount_milli: int, **options: Any) -> HoldResult:
        return self._run(_ops.reserve(user_id, amount_milli, **options))

    def capture(self, hold_id: str, amount_milli: int | None = None) -> HoldResult:
        return self._run(_ops.capture(hold_id, amount_milli))

    def release(self, hold_id: str) -> HoldResult:
        return self._run(_ops.release(hold_id))

    def hold(self, hold_id: str) -> Hold:
        return self._run(_ops.hold(hold_id))

    def debit(self, user_id: str, amount_milli: int, **options: Any) -> Charge:
        return self._run(_ops.debit(user_id, amount_milli, **options))

    def refund(self, transaction_id: int, amount_milli: int | None = None, **kw: Any) -> Charge:
        return self._run(_ops.refund(transaction_id, amount_milli, **kw))

    def batch(self, items: list[BatchItem], *, idempotency_key: str | None = None) -> BatchResult:
        """Up to 1,000 ledger operations in one request, each answered on its own (see
        `BatchItem`); raises only for the request as a whole (401, 422, ...)."""
        return self._run(_ops.batch(items, idempotency_key=idempotency_key))

    def grant(
        self,
        user_id: str,
        amount_milli: int,
        source: str = "admin",
        *,
        expires_at: datetime | None = None,
        **options: Any,
    ) -> Charge:
        return self._run(
            _ops.grant(user_id, amount_milli, source, expires_at=expires_at, **options)
        )

    # workspace
    def save_project(self, title: str, content: str, **options: Any) -> Project:
        return self._run(_ops.save_project(title, content, **options))

    def projects(self, **filters: Any) -> Page[Project]:
        return self._run(_ops.projects(**filters))

    def project(self, code: str, *, user_id: str | None = None) -> Project:
        return self._run(_ops.project(code, user_id=user_id))

    # generation
    def models(self) -> list[Model]:
        return self._run(_ops.models())

    def estimate(self, max_words: int | None = None, **options: Any) -> Estimate:
        return self._run(_ops.estimate(max_words, **options))

    def generate_text(self, prompt: str, **options: Any) -> Generation:
        """Generate from one prompt (not streamed). Never retried: see `_ops`."""
        return self._run(_ops.generate_text(prompt, **options))

    # enhancement
    def enhance(self, enhancement_type: str, **options: Any) -> EnhancementTask:
        """Submit an image (`image_url` or a workspace `project_code`); its price is held
        now. Poll `enhancement_task` until `.done`."""
        return self._run(_ops.enhance(enhancement_type, **options))

    def enhancement_task(self, task_id: str) -> EnhancementTask:
        return self._run(_ops.enhancement_task(task_id))

    # events
    def events(
        self, user_id: str | None = None, *, last_event_id: str | None = None
    ) -> Iterator[Event]:
        """`credits.changed` events as they happen; reconnects from the last id it saw."""
        parser = EventParser()
        attempt = 0
        while True:
            headers = {"accept": "text/event-stream"}
            if parser.last_id or last_event_id:
                headers["last-event-id"] = parser.last_id or last_event_id or ""
            params = {"user_id": user_id} if user_id else None
            try:
                with self._http.stream(
                    "GET", "/v1/events", params=params, headers=headers, timeout=None
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise_for(response)
                    attempt = 0
                    for line in response.iter_lines():
                        event = parser.feed(line)
                        if event is not None:
                            yield event
            except httpx.TransportError as exc:
                attempt += 1
                delay = self.retry.delay(attempt, None)
                if delay is None:
                    raise ConnectionFailed(f"GET /v1/events: {exc!r}") from exc
                time.sleep(delay)


class AsyncKuClient:
    """`KuClient` for asyncio: the same methods, awaited."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers=_headers(api_key, token),
            timeout=timeout,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncKuClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _send(self, call: Call) -> httpx.Response:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._http.send(call.request(self._http))
            except httpx.TransportError as exc:
                delay = self.retry.delay(attempt, None) if should_retry(call, None) else None
                if delay is None:
                    raise ConnectionFailed(f"{call.method} {call.path}: {exc!r}") from exc
            else:
                if not should_retry(call, response.status_code):
                    return response
                delay = self.retry.delay(attempt, _retry_after(response))
                if delay is None:
                    return response
            await asyncio.sleep(delay)

    async def _run(self, op: _ops.Op[R]) -> R:
        response = await self._send(op.call)
        raise_for(response)
        return op.parse(response)

    async def balance(self, user_id: str) -> Balance:
        return await self._run(_ops.balance(user_id))

    async def transactions(self, user_id: str, **filters: Any) -> Page[Transaction]:
        return await self._run(_ops.transactions(user_id, **filters))

    async def reserve(self, user_id: str, amount_milli: int, **options: Any) -> HoldResult:
        return await self._run(_ops.reserve(user_id, amount_milli, **options))

    async def capture(self, hold_id: str, amount_milli: int | None = None) -> HoldResult:
        return await self._run(_ops.capture(hold_id, amount_milli))

    async def release(self, hold_id: str) -> HoldResult:
        return await self._run(_ops.release(hold_id))

    async def hold(self, hold_id: str) -> Hold:
        return await self._run(_ops.hold(hold_id))

    async def debit(self, user_id: str, amount_milli: int, **options: Any) -> Charge:
        return await self._run(_ops.debit(user_id, amount_milli, **options))

    async def refund(
        self, transaction_id: int, amount_milli: int | None = None, **kw: Any
    ) -> Charge:
        return await self._run(_ops.refund(transaction_id, amount_milli, **kw))

    async def batch(
        self, items: list[BatchItem], *, idempotency_key: str | None = None
    ) -> BatchResult:
        """Up to 1,000 ledger operations in one request, each answered on its own (see
        `BatchItem`); raises only for the request as a whole (401, 422, ...)."""
        return await self._run(_ops.batch(items, idempotency_key=idempotency_key))

    async def grant(
        self,
        user_id: str,
        amount_milli: int,
        source: str = "admin",
        *,
        expires_at: datetime | None = None,
        **options: Any,
    ) -> Charge:
        op = _ops.grant(user_id, amount_milli, source, expires_at=expires_at, **options)
        return await self._run(op)

    async def save_project(self, title: str, content: str, **options: Any) -> Project:
        return await self._run(_ops.save_project(title, content, **options))

    async def projects(self, **filters: Any) -> Page[Project]:
        return await self._run(_ops.projects(**filters))

    async def project(self, code: str, *, user_id: str | None = None) -> Project:
        return await self._run(_ops.project(code, user_id=user_id))

    async def models(self) -> list[Model]:
        return await self._run(_ops.models())

    async def estimate(self, max_words: int | None = None, **options: Any) -> Estimate:
        return await self._run(_ops.estimate(max_words, **options))

    async def generate_text(self, prompt: str, **options: Any) -> Generation:
        """Generate from one prompt (not streamed). Never retried: see `_ops`."""
        return await self._run(_ops.generate_text(prompt, **options))

    async def enhance(self, enhancement_type: str, **options: Any) -> EnhancementTask:
        """Submit an image (`image_url` or a workspace `project_code`); its price is held
        now. Poll `enhancement_task` until `.done`."""
        return await self._run(_ops.enhance(enhancement_type, **options))

    async def enhancement_task(self, task_id: str) -> EnhancementTask:
        return await self._run(_ops.enhancement_task(task_id))

    async def events(
        self, user_id: str | None = None, *, last_event_id: str | None = None
    ) -> AsyncIterator[Event]:
        """`credits.changed` events as they happen; reconnects from the last id it saw."""
        parser = EventParser()
        attempt = 0
        while True:
            headers = {"accept": "text/event-stream"}
            if parser.last_id or last_event_id:
                headers["last-event-id"] = parser.last_id or last_event_id or ""
            params = {"user_id": user_id} if user_id else None
            try:
                async with self._http.stream(
                    "GET", "/v1/events", params=params, headers=headers, timeout=None
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise_for(response)
                    attempt = 0
                    async for line in response.aiter_lines():
                        event = parser.feed(line)
                        if event is not None:
                            yield event
            except httpx.TransportError as exc:
                attempt += 1
                delay = self.retry.delay(attempt, None)
                if delay is None:
                    raise ConnectionFailed(f"GET /v1/events: {exc!r}") from exc
                await asyncio.sleep(delay)
