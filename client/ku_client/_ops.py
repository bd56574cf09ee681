"""Each operation of the native API once: its call and how its answer is read.
`KuClient` and `AsyncKuClient` run the same operations, one blocking, one async."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

import httpx

from ku_client._batch import BATCH_MAX_ITEMS, BatchItem, BatchResult
from ku_client._core import Call, decode, idempotent_post, replayed
from ku_client._models import (
    Balance,
    Charge,
    EnhancementTask,
    Estimate,
    Generation,
    Hold,
    HoldResult,
    Model,
    Page,
    Project,
    Transaction,
    to_ku,
)

R = TypeVar("R")


@dataclass(frozen=True)
class Op(Generic[R]):
    call: Call
    parse: Callable[[httpx.Response], R]


def _page(item: Callable[[dict[str, Any]], Any]) -> Callable[[httpx.Response], Any]:
    def parse(response: httpx.Response) -> Any:
        body = decode(response)
        return Page(items=[item(i) for i in body["items"]], next_cursor=body.get("next_cursor"))

    return parse


def _charge(response: httpx.Response) -> Charge:
    return Charge.parse(decode(response), replayed(response))


def _hold_result(response: httpx.Response) -> HoldResult:
    return HoldResult.parse(decode(response), replayed(response))


def balance(user_id: str) -> Op[Balance]:
    call = Call("GET", "/v1/ledger/balance", params={"user_id": user_id})
    return Op(call, lambda r: Balance.parse(decode(r)))


def transactions(
    user_id: str,
    *,
    app: str | None = None,
    kind: str | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> Op[Page[Transaction]]:
    params = {"user_id": user_id, "app": app, "kind": kind, "cursor": cursor, "limit": limit}
    return Op(Call("GET", "/v1/ledger/transactions", params=params), _page(Transaction.parse))


def reserve(
    user_id: str,
    amount_milli: int,
    *,
    app: str | None = None,
    ttl_seconds: int | None = None,
    reference: str | None = None,
    description: str | None = None,
    idempotency_key: str | None = None,
) -> Op[HoldResult]:
    body = {
        "user_id": user_id,
        "amount": to_ku(amount_milli),
        "app": app,
        "ttl_seconds": ttl_seconds,
        "reference": reference,
        "description": description,
    }
    return Op(idempotent_post("/v1/ledger/holds", body, idempotency_key), _hold_result)


def capture(hold_id: str, amount_milli: int | None = None) -> Op[HoldResult]:
    # A hold resolves once: its id makes a retried capture replay, no key needed.
    body = {"amount": to_ku(amount_milli)} if amount_milli is not None else None
    return Op(Call("POST", f"/v1/ledger/holds/{hold_id}/capture", body=body), _hold_result)


def release(hold_id: str) -> Op[HoldResult]:
    return Op(Call("POST", f"/v1/ledger/holds/{hold_id}/release"), _hold_result)


def hold(hold_id: str) -> Op[Hold]:
    return Op(Call("GET", f"/v1/ledger/holds/{hold_id}"), lambda r: Hold.parse(decode(r)))


def debit(
    user_id: str,
    amount_milli: int,
    *,
    app: str | None = None,
    description: str | None = None,
    reference: str | None = None,
    idempotency_key: str | None = None,
) -> Op[Charge]:
    body = {
        "user_id": user_id,
        "amount": to_ku(amount_milli),
        "app": app,
        "description": description,
        "reference": reference,
    }
    return Op(idempotent_post("/v1/ledger/debits", body, idempotency_key), _charge)


def refund(
    transaction_id: int,
    amount_milli: int | None = None,
    *,
    reference: str | None = None,
    description: str | None = None,
    idempotency_key: str | None = None,
) -> Op[Charge]:
    body = {
        "transaction_id": transaction_id,
        "amount": to_ku(amount_milli) if amount_milli is not None else None,
        "reference": reference,
        "description": description,
    }
    return Op(idempotent_post("/v1/ledger/refunds", body, idempotency_key), _charge)


def grant(
    user_id: str,
    amount_milli: int,
    source: str,
    *,
    expires_at: datetime | None = None,
    priority: int | None = None,
    reference: str | None = None,
    description: str | None = None,
    reason: str | None = None,
    idempotency_key: str | None = None,
) -> Op[Charge]:
    body = {
        "user_id": user_id,
        "amount": to_ku(amount_milli),
        "source": source,
        "expires_at": expires_at.isoformat() if expires_at else None,
        "priority": priority,
        "reference": reference,
        "description": description,
        "reason": reason,  # required from admins (audited)
    }
    return Op(idempotent_post("/v1/ledger/grants", body, idempotency_key), _charge)


def batch(items: list[BatchItem], *, idempotency_key: str | None = None) -> Op[BatchResult]:
    if not 1 <= len(items) <= BATCH_MAX_ITEMS:
        raise ValueError(f"a batch holds 1 to {BATCH_MAX_ITEMS} items, not {len(items)}")
    call = idempotent_post(
        "/v1/ledger/batch", {"operations": [i.wire() for i in items]}, idempotency_key
    )
    return Op(
        call,
        lambda r: BatchResult.parse(decode(r), replayed(r), r.headers.get("x-request-id")),
    )


def save_project(
    title: str,
    content: str,
    *,
    user_id: str | None = None,
    project_type: str | None = None,
    content_type: str | None = None,
    content_encoding: str | None = None,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> Op[Project]:
    body = {
        "title": title,
        "content": content,
        "user_id": user_id,
        "project_type": project_type,
        "content_type": content_type,
        "content_encoding": content_encoding,
        "metadata": metadata,
    }
    call = idempotent_post("/v1/workspace/projects", body, idempotency_key)
    return Op(call, lambda r: Project.parse(decode(r)))


def projects(
    *,
    user_id: str | None = None,
    app: str | None = None,
    project_type: str | None = None,
    title_contains: str | None = None,
    cursor: str | None = None,
    limit: int | None = None,
) -> Op[Page[Project]]:
    params = {
        "user_id": user_id,
        "app": app,
        "type": project_type,
        "q": title_contains,
        "cursor": cursor,
        "limit": limit,
    }
    return Op(Call("GET", "/v1/workspace/projects", params=params), _page(Project.parse))


def project(code: str, *, user_id: str | None = None) -> Op[Project]:
    call = Call("GET", f"/v1/workspace/projects/{code}", params={"user_id": user_id})
    return Op(call, lambda r: Project.parse(decode(r)))


# generation


def models() -> Op[list[Model]]:
    call = Call("GET", "/v1/generation/models")
    return Op(call, lambda r: [Model.parse(m) for m in decode(r)["data"]])


def estimate(
    max_words: int | None = None, *, model: str | None = None, chapters: int | None = None
) -> Op[Estimate]:
    # Prices a generation; nothing is held or run, so it is safe to repeat.
    body = {"model": model, "max_words": max_words, "chapters": chapters}
    call = Call(
        "POST", "/v1/generation/estimate", body={k: v for k, v in body.items() if v is not None}
    )
    return Op(call, lambda r: Estimate.parse(decode(r)))


def generate_text(
    prompt: str,
    *,
    user_id: str | None = None,
    model: str | None = None,
    system: str | None = None,
    max_words: int | None = None,
    temperature: float | None = None,
    save: bool | None = None,
    title: str | None = None,
) -> Op[Generation]:
    body = {
        "prompt": prompt,
        "user_id": user_id,
        "model": model,
        "system": system,
        "max_words": max_words,
        "temperature": temperature,
        "save": save,
        "title": title,
    }
    # Never retried: the service does not de-duplicate a generation, so a repeat after a
    # lost answer would run (and charge) it again.
    call = Call(
        "POST",
        "/v1/generation/text",
        body={k: v for k, v in body.items() if v is not None},
        retryable=False,
    )
    return Op(call, lambda r: Generation.parse(decode(r)))


# enhancement


def enhance(
    enhancement_type: str,
    *,
    user_id: str | None = None,
    image_url: str | None = None,
    project_code: str | None = None,
    prompt: str | None = None,
    strength: float | None = None,
    save_to_workspace: bool | None = None,
    idempotency_key: str | None = None,
) -> Op[EnhancementTask]:
    body = {
        "enhancement_type": enhancement_type,
        "user_id": user_id,
        "image_url": image_url,
        "project_code": project_code,
        "prompt": prompt,
        "strength": strength,
        "save_to_workspace": save_to_workspace,
    }
    call = idempotent_post("/v1/enhancement/tasks", body, idempotency_key)
    return Op(call, lambda r: EnhancementTask.parse(decode(r), replayed(r)))


def enhancement_task(task_id: str) -> Op[EnhancementTask]:
    call = Call("GET", f"/v1/enhancement/tasks/{task_id}")
    return Op(call, lambda r: EnhancementTask.parse(decode(r)))
