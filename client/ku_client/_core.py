"""What the sync and async clients share: how a call is built, when it is retried,
how long to wait, and how a response becomes a value or a typed error.

Retry rule: a call is retried only when repeating it cannot do the work twice. Reads
are; every money-moving or saving POST carries an `Idempotency-Key` generated once per
call and sent unchanged on each retry, so the server replays the first result; a hold's
capture or release resolves once by its id. Retried: transport failures (the request
may or may not have arrived), 429, 502, 503 and 504, waiting `Retry-After` when the
server says, else exponential backoff with full jitter.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from ku_client._exceptions import error_for

RETRY_STATUSES = frozenset({429, 502, 503, 504})
USER_AGENT = "ku-client/0.1"


def new_idempotency_key() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 4
    backoff_seconds: float = 0.2
    max_backoff_seconds: float = 10.0
    # A server asking for longer than this is not waited for: the error is raised.
    max_retry_after_seconds: float = 60.0

    def delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds to wait before retry number `attempt` (1-based), or None to give up."""
        if attempt > self.max_retries:
            return None
        if retry_after is not None:
            return retry_after if retry_after <= self.max_retry_after_seconds else None
        ceiling = min(self.max_backoff_seconds, self.backoff_seconds * 2 ** (attempt - 1))
        return random.uniform(0, ceiling)


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


@dataclass
class Call:
    method: str
    path: str
    params: dict[str, Any] | None = None
    body: Any = None
    # Safe to send again: a read, or a write the server de-duplicates.
    retryable: bool = True
    headers: dict[str, str] = field(default_factory=dict)

    def request(self, client: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        content = None
        headers = dict(self.headers)
        if self.body is not None:
            content = json.dumps(self.body, separators=(",", ":")).encode()
            headers["content-type"] = "application/json"
        params = {k: v for k, v in (self.params or {}).items() if v is not None}
        return client.build_request(
            self.method, self.path, params=params, content=content, headers=headers
        )


def idempotent_post(path: str, body: dict[str, Any], key: str | None) -> Call:
    """A POST that moves money or saves data, with its key fixed before the first try."""
    return Call(
        "POST",
        path,
        body={k: v for k, v in body.items() if v is not None},
        headers={"Idempotency-Key": key or new_idempotency_key()},
    )


def decode(response: httpx.Response) -> Any:
    """The JSON body with numbers kept exact (Decimal), or None."""
    if not response.content:
        return None
    try:
        return json.loads(response.content, parse_float=Decimal)
    except ValueError:
        return None


def should_retry(call: Call, status: int | None) -> bool:
    if not call.retryable:
        return False
    return status is None or status in RETRY_STATUSES


def raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    raise error_for(
        response.status_code,
        decode(response),
        response.headers.get("x-request-id"),
        parse_retry_after(response.headers.get("retry-after")),
    )


def replayed(response: httpx.Response) -> bool:
    return response.headers.get("idempotent-replayed") == "true"
