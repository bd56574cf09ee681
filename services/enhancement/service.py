"""The enhancement engine, shared by the API and the worker.

Money, in order (`submit`): the input image is fetched and checked first (nothing
is charged for a bad or unsafe input); then either one included enhancement of
the month is drawn from the user's allowance in the ledger (units, not Ku; granted
there lazily at the month's first included enhancement and on the 1st), or the Ku
price is held in the ledger (on the caller's behalf: `origin`); the task is recorded
after either, and if recording fails the draw is returned or the hold released at
once (their TTLs are the last line).
Settlement (`settle`) runs once per task, after it finished: a completed task's
hold is captured (the degraded price, if the local enhancer did the work) and its
draw confirmed; a failed task's hold is released and its draw returned (a degraded
one's too). The ledger calls come first and are idempotent (by hold id, by the
draw's reference); `settled_at` is written after them, so a crash in between
repeats a harmless call.

Work (`process`): a worker claims a task with a lease and an attempt number (the
fence: every later write names the attempt). Providers are tried in order of
health (circuit breaker), then cost, skipping any whose pool cannot pay for a
call; an async provider's task id is stored before polling, so a restarted
worker resumes the same provider task. When every remote provider fails, the
local Pillow enhancer produces a `degraded` result.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.enhancement import local
from services.enhancement.config import EnhancementSettings
from services.enhancement.images import CheckedImage, FetchPolicy, SafeFetcher, inspect_image
from services.enhancement.models import outbox
from services.enhancement.providers import (
    Job,
    Outcome,
    Provider,
    ProviderError,
    configured,
    describe,
)
from services.enhancement.repository import Repository
from services.enhancement.storage import Storage, build_storage, sign_link
from services.kit.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from services.kit.db import unit_of_work
from services.kit.errors import (
    Conflict,
    Forbidden,
    KuError,
    NotFound,
    PayloadTooLarge,
    PaymentRequired,
    Unprocessable,
)
from services.kit.money import milli_to_ku
from services.kit.outbox import emit
from services.kit.principal import Principal, derived_secret
from services.kit.service_client import ServiceClient, capture_hold

log = logging.getLogger("ku.enhancement")

JOB_NAME = "enhancement_process_task"
ALLOWANCE_KIND = "enhancement"
ALERT_TOPIC = "enhancement.alert"
# The ledger's refusals of a capture on a hold that was resolved without us.
RESOLVED_HOLD = frozenset(
    {"hold_expired", "hold_already_released", "hold_already_clawed", "hold_already_expired"}
)
BATCH = 200


def period_of(now: datetime) -> str:
    return f"{now.year:04d}-{now.month:02d}"


def next_period_start(now: datetime) -> datetime:
    first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first + timedelta(days=32)).replace(day=1)


@dataclass
class Submission:
    enhancement_type: str
    prompt: str
    strength: float
    moodboard_id: str | None
    user_id: str | None
    app: str | None
    save_to_workspace: bool
    image_url: str | None = None
    project_code: str | None = None
    upload: bytes | None = None

    def fingerprint(self) -> str:
        data = {k: v for k, v in self.__dict__.items() if k != "upload"}
        data["upload"] = hashlib.sha256(self.upload).hexdigest() if self.upload else None
        return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


class LostLease(Exception):
    """Another worker took the task (this one was too slow or presumed dead)."""


class Enhancer:
    def __init__(
        self,
        settings: EnhancementSettings,
        sessionmaker: async_sessionmaker[AsyncSession],
        redis: Redis,
        *,
        client: ServiceClient | None = None,
        storage: Storage | None = None,
        fetcher: SafeFetcher | None = None,
        provider_http: httpx.AsyncClient | None = None,
        enqueue: Any = None,
    ) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.redis = redis
        self.client = client or ServiceClient(settings, me="enhancement")
        self.storage = storage or build_storage(settings)
        self.fetcher = fetcher or SafeFetcher(self.fetch_policy(settings.allowed_origins()))
        # Provider results come from the providers' own hosts: same rules as user input.
        self.result_fetcher = SafeFetcher(self.fetch_policy(settings.allowed_origins()))
        self.http = provider_http or httpx.AsyncClient(
            timeout=settings.enhancement_provider_timeout_seconds, trust_env=False
        )
        self.providers: dict[str, Provider] = configured(settings, self.http)
        self.breakers = {
            name: CircuitBreaker(
                redis,
                f"enhancement.{name}",
                prefix=settings.bus_prefix,
                failure_threshold=settings.enhancement_breaker_failures,
                open_seconds=settings.enhancement_breaker_open_seconds,
            )
            for name in self.providers
        }
        # `enqueue(task_id, attempt)` puts a processing job on the worker's queue.
        self.enqueue = enqueue

    def fetch_policy(self, allow: frozenset[str]) -> FetchPolicy:
        s = self.settings
        return FetchPolicy(
            max_bytes=s.enhancement_max_input_bytes,
            timeout_seconds=s.enhancement_fetch_timeout_seconds,
            max_redirects=s.enhancement_max_redirects,
            max_pixels=s.enhancement_max_pixels,
            allow_origins=allow,
        )

    async def aclose(self) -> None:
        await self.fetcher.aclose()
        await self.result_fetcher.aclose()
        await self.http.aclose()
        await self.client.aclose()
        await self.storage.aclose()

    def uow(self) -> Any:
        return unit_of_work(self.sessionmaker)

    # -- pricing ----------------------------------------------------------------------

    def price_milli(self, enhancement_type: str, width: int, height: int) -> int:
        s = self.settings
        base = int(s.enhancement_prices.get(enhancement_type, s.enhancement_prices["custom"]))
        if width * height > s.enhancement_large_pixels:
            return base * s.enhancement_large_percent // 100
        return base

    def included_for(self, tier: str | None) -> int:
        return int(self.settings.enhancement_tier_allowances.get(tier or "free", 0))

    # -- submit -----------------------------------------------------------------------

    async def _input(
        self, principal: Principal, origin: str | None, owner: str, sub: Submission
    ) -> tuple[str, CheckedImage]:
        sources = [x for x in (sub.image_url, sub.project_code, sub.upload) if x]
        if len(sources) != 1:
            raise Unprocessable(
                "Give exactly one input: image_url, an upload or project_code",
                code="one_input_required",
            )
        max_pixels = self.settings.enhancement_max_pixels
        if sub.upload is not None:
            if len(sub.upload) > self.settings.enhancement_max_input_bytes:
                raise PayloadTooLarge(
                    "The image is larger than allowed",
                    code="input_too_large",
                    max_bytes=self.settings.enhancement_max_input_bytes,
                )
            return "upload", inspect_image(sub.upload, max_pixels)
        if sub.project_code:
            project = await self.client.json(
                "workspace",
                "GET",
                f"/v1/workspace/projects/{sub.project_code}",
                params={"user_id": owner},
                origin=origin,
            )
            content = project.get("content") or ""
            if project.get("content_encoding") != "base64" and not str(
                project.get("content_type", "")
            ).startswith("image/"):
                raise Unprocessable("The project is not an image", code="project_not_image")
            if isinstance(content, str) and content.startswith("data:"):
                content = content.split(",", 1)[-1]
            try:
                data = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError):
                raise Unprocessable(
                    "The project is not an image", code="project_not_image"
                ) from None
            return "project", inspect_image(data, max_pixels)
        assert sub.image_url is not None
        return "url", await self.fetcher.fetch(sub.image_url)

    async def submit(
        self,
        principal: Principal,
        sub: Submission,
        *,
        origin: str | None,
        idempotency_key: str | None,
    ) -> tuple[dict[str, Any], bool]:
        """(task, created). A replayed Idempotency-Key returns the first task."""
        principal.require_scope("enhance")
        owner = sub.user_id or (principal.user_id if principal.kind == "user" else None)
        if not owner:
            raise Unprocessable("user_id is required for app keys", code="user_id_required")
        principal.acts_for(owner)
        # The lane is the app the caller came through (a user token's `app` claim), as the
        # ledger decides for a hold; an included task has no hold, so it is decided here
        # for both. Only admins name another app.
        lane = (principal.app or self.settings.enhancement_default_app).lower()
        app = (sub.app or lane).lower()
        if not principal.is_admin and app != lane:
            raise Forbidden("A caller charges only in its own app's name", code="wrong_app")
        # Before anything is fetched or drawn: the included path draws as this service
        # (`ledger.allowance.draw` is service-only), so the ledger never sees the caller.
        await self.check_spender(principal, owner, origin)
        fingerprint = sub.fingerprint()
        if idempotency_key:
            scope = f"{principal.idempotency_scope}:{owner}:{idempotency_key}"
            task_id = uuid.uuid5(uuid.NAMESPACE_URL, f"ku-enhancement:{scope}")
            async with self.uow() as session:
                existing = await Repository(session).task(task_id)
            if existing is not None:
                if existing["request_hash"] != fingerprint:
                    raise Conflict(
                        "Idempotency-Key reused with another request", code="idempotency_conflict"
                    )
                return existing, False
        else:
            task_id = uuid.uuid4()

        source, image = await self._input(principal, origin, owner, sub)
        price = self.price_milli(sub.enhancement_type, image.width, image.height)
        input_key = f"inputs/{task_id}"
        await self.storage.put(input_key, image.data)
        now = datetime.now(UTC)
        values: dict[str, Any] = {
            "id": task_id,
            "user_id": owner,
            "app": app,
            "enhancement_type": sub.enhancement_type,
            "prompt": sub.prompt,
            "strength": sub.strength,
            "moodboard_id": sub.moodboard_id,
            "input_source": source,
            "input_url": sub.image_url,
            "input_key": input_key,
            "input_content_type": image.content_type,
            "input_width": image.width,
            "input_height": image.height,
            "request_hash": fingerprint,
            "save_to_workspace": sub.save_to_workspace,
            "deadline_at": now + timedelta(seconds=self.settings.enhancement_task_deadline_seconds),
        }
        try:
            task = await self._record_included(values, owner, now)
            if task is None:
                task = await self._record_paid(values, owner, app, price, origin)
        except _Replayed:
            async with self.uow() as session:
                replayed = await Repository(session).task(task_id)
            assert replayed is not None
            return replayed, False
        except BaseException:
            # Refused (402) or failed: no task holds this input, and retention only
            # deletes the inputs of tasks; left here, it would stay forever.
            await self._drop_input(task_id, input_key)
            raise
        if task.get("_replayed"):
            task.pop("_replayed")
            return task, False
        await self._enqueue(task["id"], 0)
        return task, True

    async def check_spender(self, principal: Principal, owner: str, origin: str | None) -> None:
        """The caller may spend `owner`'s credit, as the ledger decides for a hold with
        the caller's principal forwarded (`ledger.read`, "the caller's user"): a partner
        only for users linked to it, an operator nobody's (403 `admin_origin`). A user
        token for itself is already decided (`acts_for`)."""
        if principal.kind == "user" and principal.user_id == owner and not principal.is_admin:
            return
        await self._ledger_acts_for(owner, origin)

    async def check_reader(self, principal: Principal, owner: str, origin: str | None) -> None:
        """The caller may read `owner`'s allowance (`ledger.allowance.read`: a user its own,
        a partner its linked users, first-party apps and admins anyone)."""
        principal.acts_for(owner)
        if principal.is_admin or principal.kind == "user":
            return
        await self._ledger_acts_for(owner, origin)

    async def _ledger_acts_for(self, owner: str, origin: str | None) -> None:
        try:
            await self.client.json(
                "ledger",
                "GET",
                "/v1/ledger/balance",
                params={"user_id": owner},
                origin=origin,
            )
        except NotFound:
            # The ledger checks links before it looks for the account: allowed, no account
            # (the hold or the draw answers for that).
            pass

    async def _drop_input(self, task_id: uuid.UUID, input_key: str) -> None:
        try:
            async with self.uow() as session:
                if await Repository(session).task(task_id) is not None:
                    return  # a concurrent replay recorded the task: the input is its
            await self.storage.delete(input_key)
        except Exception as exc:  # best effort: the refusal is what the caller must see
            log.warning("task %s: input not deleted after a refused submit: %s", task_id, exc)

    async def _record_included(
        self, values: dict[str, Any], owner: str, now: datetime
    ) -> dict[str, Any] | None:
        """Record the task paid by an included enhancement, if the user has one left: one
        unit drawn from the month's allowance in the ledger (granted there at the month's
        first included enhancement), then the task. As a Ku hold, the draw is provisional:
        it is confirmed or returned at settlement, returned at once if recording fails,
        and expires back to the user past its TTL (a crash in between loses nothing)."""
        async with self.uow() as session:
            included = self.included_for(await self.tier_of(Repository(session), owner, now))
        if included <= 0:
            return None
        period = period_of(now)
        drawn = await self._draw(owner, period, values["id"], included)
        if drawn is None:
            return None
        try:
            async with self.uow() as session:
                repo = Repository(session)
                task = await repo.insert_task(
                    {**values, "price_milli": 0, "allowance_period": period}
                )
                if task is None:
                    # A concurrent replay recorded it first: the same task, the same
                    # reference, so the same draw (the recorded task settles it).
                    raise _Replayed(values["id"])
                await self._allowance_alert(repo, owner, period, drawn["allowance"], included)
                await self._event(session, task)
                return task
        except _Replayed:
            raise
        except BaseException:
            await self._allowance_settle(values["id"], "return")
            raise

    async def _draw(
        self, owner: str, period: str, task_id: uuid.UUID, included: int
    ) -> dict[str, Any] | None:
        """One unit of the month's allowance for this task, or None (pay in Ku). The
        month's grant is made lazily: a draw refused because less than the tier's count
        was granted (the month's first, or an upgrade since) grants it and draws again.
        `cap` is the tier's count now: after a downgrade nothing more is included."""
        body = {
            "user_id": owner,
            "kind": ALLOWANCE_KIND,
            "period": period,
            "reference": f"enhancement:{task_id}",
            "ttl_seconds": self.settings.enhancement_hold_ttl_seconds,
            "cap": included,
        }
        for attempt in range(2):
            try:
                drawn: dict[str, Any] = await self.client.json(
                    "ledger",
                    "POST",
                    "/v1/ledger/allowances/draws",
                    json=body,
                    idempotency_key=f"enhancement:{task_id}:draw",
                )
            except PaymentRequired as exc:
                granted = int(exc.detail.get("granted", 0))
                if exc.code == "allowance_exhausted" and attempt == 0 and granted < included:
                    await self.grant_allowance(owner, period, included)
                    continue
                return None  # none left, or the month ended meanwhile: Ku
            if drawn["draw"]["status"] not in ("active", "confirmed"):
                # This task's draw was given back by an earlier attempt (its recording
                # failed): a reference draws once, so this attempt pays in Ku.
                return None
            return drawn
        return None

    async def grant_allowance(self, user_id: str, period: str, units: int) -> dict[str, Any]:
        """The user's allowance for `period` is at least `units` (the ledger: once)."""
        out: dict[str, Any] = await self.client.json(
            "ledger",
            "POST",
            "/v1/ledger/allowances/grants",
            json={
                "user_id": user_id,
                "kind": ALLOWANCE_KIND,
                "period": period,
                "units": units,
                "reference": f"tier:{units}",
            },
            idempotency_key=f"enhancement:allowance:{user_id}:{period}:{units}",
        )
        return out

    async def _allowance_settle(self, task_id: uuid.UUID, how: str) -> None:
        """Confirm or return a task's draw (each at most once in the ledger)."""
        try:
            await self.client.json(
                "ledger",
                "POST",
                f"/v1/ledger/allowances/draws/enhancement:{task_id}/{how}",
                idempotency_key=f"enhancement:{task_id}:allowance:{how}",
            )
        except NotFound:
            # Recorded before allowances moved to the ledger: no draw to settle there.
            log.warning("task %s: no allowance draw in the ledger to %s", task_id, how)
        except Conflict as exc:
            # `draw_expired`: the draw's TTL passed before settlement and its unit came
            # back to the user; the work is done and stays the user's (as a Ku hold that
            # expired before its capture charges nothing).
            log.warning("task %s: allowance draw not %sed: %s", task_id, how, exc.code)

    async def _record_paid(
        self, values: dict[str, Any], owner: str, app: str, price: int, origin: str | None
    ) -> dict[str, Any]:
        task_id = values["id"]
        hold = await self.client.json(
            "ledger",
            "POST",
            "/v1/ledger/holds",
            json={
                "user_id": owner,
                "amount": milli_to_ku(price),
                "app": app,
                "ttl_seconds": self.settings.enhancement_hold_ttl_seconds,
                "reference": f"enhancement:{task_id}",
                "description": f"Image enhancement ({values['enhancement_type']})",
            },
            idempotency_key=f"enhancement:{task_id}:hold",
            origin=origin,
        )
        hold_id = str(hold["hold"]["id"])
        try:
            async with self.uow() as session:
                repo = Repository(session)
                task = await repo.insert_task({**values, "price_milli": price, "hold_id": hold_id})
                if task is None:
                    existing = await repo.task(task_id)
                    assert existing is not None
                    return {**existing, "_replayed": True}
                await self._event(session, task)
                return task
        except BaseException:
            await self._release(hold_id)
            raise

    async def _enqueue(self, task_id: uuid.UUID, attempt: int) -> bool:
        if self.enqueue is None:
            return False
        try:
            await self.enqueue(str(task_id), attempt)
            return True
        except Exception as exc:  # Redis down: the pending-tasks job enqueues it later
            log.warning("could not enqueue task %s: %s", task_id, exc)
            return False

    # -- reading ----------------------------------------------------------------------

    async def visible(self, principal: Principal, task_id: str) -> dict[str, Any]:
        """A task the caller may see; anyone else's is 404 (no existence leak)."""
        principal.require_scope("enhance")
        task = await self.by_id(task_id)
        if not self.may_read(principal, task):
            raise NotFound("No such task", code="task_not_found")
        return task

    async def by_id(self, task_id: str) -> dict[str, Any]:
        """A task, whoever asks: only for callers already entitled to it (a signed link)."""
        try:
            tid = uuid.UUID(task_id)
        except ValueError:
            raise NotFound("No such task", code="task_not_found") from None
        async with self.uow() as session:
            task = await Repository(session).task(tid)
        if task is None:
            raise NotFound("No such task", code="task_not_found")
        return task

    @staticmethod
    def may_read(principal: Principal, task: dict[str, Any]) -> bool:
        if principal.is_admin:
            return True
        if principal.kind == "user":
            return bool(task["user_id"] == principal.user_id)
        return bool(task["app"] == principal.app)

    async def recent(
        self, principal: Principal, user_id: str | None, limit: int
    ) -> list[dict[str, Any]]:
        principal.require_scope("enhance")
        owner = user_id or (principal.user_id if principal.kind == "user" else None)
        if not owner:
            raise Unprocessable("user_id is required for app keys", code="user_id_required")
        principal.acts_for(owner)
        app = None if principal.is_admin or principal.kind == "user" else principal.app
        async with self.uow() as session:
            return await Repository(session).tasks_of(owner, app, limit)

    def render(self, task: dict[str, Any]) -> dict[str, Any]:
        result_url = None
        if task["status"] == "completed" and task["result_key"] and not task["result_deleted_at"]:
            result_url = sign_link(
                derived_secret("enhancement", "result-links"),
                str(task["id"]),
                self.settings.enhancement_result_url_seconds,
            )
        error = None
        if task["error_code"]:
            error = {"code": task["error_code"], "message": task["error_message"]}
        return {
            "id": str(task["id"]),
            "user_id": task["user_id"],
            "app": task["app"],
            "status": task["status"],
            "progress": task["progress"],
            "enhancement_type": task["enhancement_type"],
            "prompt": task["prompt"],
            "strength": task["strength"],
            "moodboard_id": task["moodboard_id"],
            "input_source": task["input_source"],
            "width": task["input_width"],
            "height": task["input_height"],
            "price": task["price_milli"],
            "included": task["allowance_period"] is not None,
            "charged": task["charged_milli"],
            "settled": task["settled_at"] is not None,
            "provider": task["provider"],
            "degraded": task["degraded"],
            "result_url": result_url,
            "project_code": task["project_code"],
            "error": error,
            "created_at": task["created_at"],
            "updated_at": task["updated_at"],
            "completed_at": task["completed_at"],
        }

    async def _event(self, session: AsyncSession, task: dict[str, Any]) -> None:
        await emit(
            session,
            outbox,
            "enhancement.task.updated",
            {
                "task_id": str(task["id"]),
                "user_id": task["user_id"],
                "app": task["app"],
                "status": task["status"],
                "progress": task["progress"],
                "provider": task["provider"],
                "degraded": task["degraded"],
            },
        )

    # -- processing (worker) -----------------------------------------------------------

    async def process(self, task_id: str) -> str:
        """Run one task to the end; safe to call any number of times, concurrently."""
        tid = uuid.UUID(task_id)
        lease = self.settings.enhancement_lease_seconds
        async with self.uow() as session:
            repo = Repository(session)
            task = await repo.claim(tid, lease)
            if task is None:
                current = await repo.task(tid)
                if current is not None and current["status"] in ("completed", "failed"):
                    needs_settle = current["settled_at"] is None
                else:
                    needs_settle = False
            else:
                await self._event(session, task)
        if task is None:
            if needs_settle:
                await self.settle(tid)
            return "skipped"
        if task["deadline_at"] < datetime.now(UTC):
            await self.fail(tid, "deadline_exceeded", "The task ran past its deadline")
            return "failed"
        try:
            return await self._run(task)
        except LostLease:
            return "lost_lease"
        except KuError as exc:
            await self.fail(tid, exc.code, exc.message, attempt=task["attempt"])
            return "failed"
        except Exception as exc:
            log.exception("task %s failed", task_id)
            await self.fail(tid, "internal_error", type(exc).__name__, attempt=task["attempt"])
            return "failed"

    async def _write(
        self, task: dict[str, Any], *, call: tuple[Provider, str] | None = None, **values: Any
    ) -> None:
        """A fenced write; `call` (provider, call id): a call that provider accepted, paid
        from its pool in the same transaction (even if this worker lost the lease: the
        provider took the call either way)."""
        async with self.uow() as session:
            repo = Repository(session)
            ok = await repo.update_fenced(
                task["id"], task["attempt"], self.settings.enhancement_lease_seconds, **values
            )
            if call is not None:
                provider, call_id = call
                await self.consume_pool(
                    repo, provider.name, provider.cost_milli, task["id"], call_id
                )
        if not ok:
            raise LostLease()
        task.update(values)

    async def _run(self, task: dict[str, Any]) -> str:
        data = await self.storage.get(task["input_key"])
        if data is None:
            raise Unprocessable("The input image is gone", code="input_missing")
        job = Job(
            prompt=describe(task["enhancement_type"], task["prompt"], task["strength"]),
            image_url=task["input_url"]
            or f"data:{task['input_content_type']};base64,{base64.b64encode(data).decode()}",
            image=data,
            content_type=task["input_content_type"],
        )
        tried: list[str] = list(task["tried"] or [])
        # Resume: a provider task started by an earlier attempt is polled, never resubmitted.
        if task["provider"] and task["provider_task_id"] and task["provider"] in self.providers:
            provider = self.providers[task["provider"]]
            outcome = await self._wait(task, provider, task["provider_task_id"])
            if await self._accept(task, provider, outcome):
                return "completed"
            tried.append(provider.name)
            await self._write(task, tried=_jsonb(tried), provider=None, provider_task_id=None)
        for provider in await self.chain(exclude=set(tried)):
            breaker = self.breakers[provider.name]
            if not await breaker.allow():
                continue
            tried.append(provider.name)
            await self._write(task, tried=_jsonb(tried), provider=provider.name, progress=20)
            try:
                submitted = await provider.submit(job)
            except ProviderError as exc:
                log.warning("task %s: %s", task["id"], exc)
                await self._provider_failed(provider.name)
                continue
            # The provider accepted the call: its pool pays for it now, once per call,
            # whatever comes of it (a result, a failure, a stall).
            if submitted.task_id is not None:
                # Stored before polling: a restarted worker polls this task, never pays twice.
                await self._write(
                    task,
                    call=(provider, submitted.task_id),
                    provider_task_id=submitted.task_id,
                    progress=40,
                )
                outcome = await self._wait(task, provider, submitted.task_id)
            else:
                await self._write(task, call=(provider, f"attempt-{task['attempt']}"))
                outcome = submitted.outcome or Outcome("failed", error="no result")
            if await self._accept(task, provider, outcome):
                return "completed"
        # Every remote provider failed, is open or is out of credit: degrade, do not fail.
        result = await asyncio.to_thread(
            local.enhance, data, task["enhancement_type"], task["strength"], task["prompt"]
        )
        await self._complete(task, None, result, "image/png", degraded=True)
        return "completed"

    async def _wait(
        self, task: dict[str, Any], provider: Provider, provider_task_id: str
    ) -> Outcome:
        """Poll until the provider finishes, fails or stalls past its timeout."""
        deadline = time.monotonic() + self.settings.enhancement_provider_timeout_seconds
        errors = 0
        while True:
            try:
                outcome = await provider.poll(provider_task_id)
                errors = 0
            except ProviderError as exc:
                errors += 1
                if errors >= 3:
                    return Outcome("failed", error=str(exc))
                outcome = Outcome("running")
            if outcome.state != "running":
                return outcome
            if time.monotonic() > deadline or datetime.now(UTC) > task["deadline_at"]:
                return Outcome("failed", error=f"{provider.name} stalled")
            await self._write(task, progress=min(90, task["progress"] + 5))
            await asyncio.sleep(self.settings.enhancement_poll_interval_seconds)

    async def _accept(self, task: dict[str, Any], provider: Provider, outcome: Outcome) -> bool:
        """Store a provider's result and complete the task; False if it failed."""
        if outcome.state == "done":
            try:
                if outcome.result_bytes is not None:
                    image = inspect_image(
                        outcome.result_bytes, self.settings.enhancement_max_pixels
                    )
                else:
                    assert outcome.result_url is not None
                    image = await self.result_fetcher.fetch(outcome.result_url)
            except KuError as exc:
                outcome = Outcome("failed", error=f"result unusable: {exc.code}")
            else:
                await self.breakers[provider.name].record_success()
                await self._complete(task, provider, image.data, image.content_type, degraded=False)
                return True
        log.warning("task %s: %s failed: %s", task["id"], provider.name, outcome.error)
        await self._provider_failed(provider.name)
        return False

    async def _provider_failed(self, name: str) -> None:
        if await self.breakers[name].record_failure():
            async with self.uow() as session:
                await self._unhealthy_alert(Repository(session), name)

    async def _complete(
        self,
        task: dict[str, Any],
        provider: Provider | None,
        result: bytes,
        content_type: str,
        *,
        degraded: bool,
    ) -> None:
        result_key = f"results/{task['id']}"
        await self.storage.put(result_key, result)
        async with self.uow() as session:
            repo = Repository(session)
            done = await repo.finish(
                task["id"],
                task["attempt"],
                "completed",
                result_key=result_key,
                result_content_type=content_type,
                provider=provider.name if provider else "local",
                degraded=degraded,
            )
            if done is None:
                raise LostLease()
            if provider is not None:
                # A success closed its breaker: its next opening is a new crossing.
                await repo.set_pool_flag(provider.name, "unhealthy_alerted", False)
            await self._event(session, done)
        await self.settle(task["id"])
        if task["save_to_workspace"]:
            await self._save_to_workspace(done, result, content_type)

    async def fail(
        self, task_id: uuid.UUID, code: str, message: str, *, attempt: int | None = None
    ) -> bool:
        async with self.uow() as session:
            done = await Repository(session).finish(
                task_id, attempt, "failed", error_code=code, error_message=message[:500]
            )
            if done is not None:
                await self._event(session, done)
        await self.settle(task_id)
        return done is not None

    # -- money ------------------------------------------------------------------------

    async def settle(self, task_id: uuid.UUID) -> None:
        """Capture or release once the task finished (idempotent)."""
        async with self.uow() as session:
            task = await Repository(session).task(task_id)
        if task is None or task["settled_at"] is not None:
            return
        if task["status"] not in ("completed", "failed"):
            return
        charge = 0
        if task["status"] == "completed":
            charge = (
                min(self.settings.enhancement_degraded_price_milli, task["price_milli"])
                if task["degraded"]
                else task["price_milli"]
            )
        if task["hold_id"]:
            if charge > 0:
                charge = await self._capture(task_id, task["hold_id"], charge)
            else:
                await self._release(task["hold_id"])
        if task["allowance_period"]:
            # An included enhancement that failed or only got the local fallback is given
            # back; one that completed on a provider is spent.
            kept = task["status"] == "completed" and not task["degraded"]
            await self._allowance_settle(task_id, "confirm" if kept else "return")
        async with self.uow() as session:
            await Repository(session).mark_settled(task_id, charge)

    async def _capture(self, task_id: uuid.UUID, hold_id: str, charge: int) -> int:
        """Capture `charge` of the task's hold; what was captured. A hold resolved
        without us (its TTL passed and the ledger's sweep gave it back, or a refund's
        clawback took all of it) refuses every capture for good (409): the user got the
        credit back, so the task is charged what the hold says was captured (0), never
        later, and the task settles instead of failing every pending-tasks run.

        A clawback that took part of the hold leaves less held than `charge`: what it
        still holds is captured instead (`services.kit.service_client.capture_hold`)."""

        async def capture(amount: int, key: str) -> None:
            await self.client.json(
                "ledger",
                "POST",
                f"/v1/ledger/holds/{hold_id}/capture",
                json={"amount": milli_to_ku(amount)},
                idempotency_key=key,
            )

        try:
            return await capture_hold(
                capture, lambda: self._release(hold_id), charge, f"enhancement:{task_id}:capture"
            )
        except Conflict as exc:
            hold = exc.detail.get("hold")
            if not isinstance(hold, dict) or exc.code not in RESOLVED_HOLD:
                raise
            captured = int(hold.get("captured_milli") or 0)
            log.error(
                "task %s: hold %s was %s before its capture of %s milli-Ku; charged %s",
                task_id,
                hold_id,
                hold.get("status"),
                charge,
                captured,
            )
            return captured

    async def _release(self, hold_id: str) -> None:
        try:
            await self.client.json(
                "ledger",
                "POST",
                f"/v1/ledger/holds/{hold_id}/release",
                idempotency_key=f"enhancement:release:{hold_id}",
            )
        except Conflict:
            pass  # already resolved (captured or expired): nothing left to give back

    async def _save_to_workspace(
        self, task: dict[str, Any], result: bytes, content_type: str
    ) -> None:
        try:
            project = await self.client.json(
                "workspace",
                "POST",
                "/v1/workspace/projects",
                json={
                    "user_id": task["user_id"],
                    "app_source": task["app"],
                    "project_type": "enhanced_image",
                    "title": f"Enhanced image ({task['enhancement_type']})",
                    "content": f"data:{content_type};base64,{base64.b64encode(result).decode()}",
                    "metadata": {"task_id": str(task["id"]), "degraded": task["degraded"]},
                },
                idempotency_key=f"enhancement:{task['id']}:save",
            )
        except KuError as exc:  # e.g. storage full: the result stays available here
            log.warning("task %s: not saved to the workspace: %s", task["id"], exc.code)
            return
        async with self.uow() as session:
            from sqlalchemy import text

            await session.execute(
                text("UPDATE enhancement.tasks SET project_code = :c WHERE id = :id"),
                {"c": project.get("code"), "id": task["id"]},
            )

    # -- providers and pools ----------------------------------------------------------

    async def chain(self, exclude: frozenset[str] | set[str] = frozenset()) -> list[Provider]:
        """Usable providers: closed breakers first, then half-open; cheapest first; pools
        that cannot pay for one call are left out."""
        async with self.uow() as session:
            pools = {p["provider"]: p for p in await Repository(session).pools()}
        ranked: list[tuple[int, int, int, str]] = []
        for order, (name, provider) in enumerate(self.providers.items()):
            if name in exclude:
                continue
            pool = pools.get(name)
            if pool is None or pool["balance_milli"] < provider.cost_milli:
                continue
            state = (await self.breakers[name].state()).state
            health = 0 if state == CLOSED else 1 if state == HALF_OPEN else 2
            ranked.append((health, provider.cost_milli, order, name))
        return [self.providers[name] for *_, name in sorted(ranked)]

    async def consume_pool(
        self, repo: Repository, provider: str, cost: int, task_id: uuid.UUID, call_id: str
    ) -> None:
        """One accepted call's cost out of the provider's pool, once per (task, call): the
        call id is the provider's task id, or the attempt for a provider that answers at
        once. The task's `provider_cost_milli` adds up its calls."""
        await repo.ensure_pool(provider)
        await repo.pool(provider, lock=True)
        reference = f"call:{task_id}:{call_id}"
        if not await repo.add_pool_entry(provider, reference, "consume", cost, task_id):
            return
        await repo.add_provider_cost(task_id, cost)
        pool = await repo.consume_pool(provider, cost)
        assert pool is not None
        await self._pool_alert(repo, pool)

    def pool_is_low(self, pool: dict[str, Any]) -> bool:
        s = self.settings
        balance, level = pool["balance_milli"], pool["level_milli"]
        return balance < s.enhancement_pool_low_milli or (
            level > 0 and balance * 100 < level * s.enhancement_pool_low_percent
        )

    async def _pool_alert(self, repo: Repository, pool: dict[str, Any]) -> None:
        """One alert (and one auto-refill request) per crossing below the threshold."""
        low = self.pool_is_low(pool)
        if low and await repo.set_pool_flag(pool["provider"], "low_alerted", True):
            crossing = await repo.count_alerts("pool_low", pool["provider"])
            await self._alert(
                repo,
                "pool_low",
                pool["provider"],
                f"Credit pool {pool['provider']} is low: auto-refill requested",
                {
                    "balance": milli_to_ku(pool["balance_milli"]),
                    "level": milli_to_ku(pool["level_milli"]),
                    "auto_refill_requested": True,
                },
                f"pool_low:{pool['provider']}:{crossing + 1}",
            )
        elif not low:
            await repo.set_pool_flag(pool["provider"], "low_alerted", False)

    async def _unhealthy_alert(self, repo: Repository, name: str) -> bool:
        """One alert per opening of a provider's breaker: the pool's `unhealthy_alerted`
        flag is set with it and cleared only when the breaker is seen closed again."""
        await repo.ensure_pool(name)
        if not await repo.set_pool_flag(name, "unhealthy_alerted", True):
            return False
        crossing = await repo.count_alerts("provider_unhealthy", name)
        return await self._alert(
            repo,
            "provider_unhealthy",
            name,
            f"Provider {name} is unhealthy: its circuit breaker opened",
            {"provider": name},
            f"provider_unhealthy:{name}:{crossing + 1}",
        )

    async def _alert(
        self,
        repo: Repository,
        kind: str,
        subject: str,
        message: str,
        detail: dict[str, Any],
        dedupe_key: str,
    ) -> bool:
        """Store an alert (once per dedupe key) and emit it: an `enhancement.alert` event
        through the outbox, in the same transaction, and a WARNING log line."""
        row = await repo.add_alert(kind, subject, message, detail, dedupe_key)
        if row is None:
            return False
        payload = {
            "alert_id": row["id"],
            "kind": kind,
            "subject": subject,
            "message": message,
            "detail": detail,
            "created_at": row["created_at"].isoformat(),
        }
        await emit(repo.session, outbox, ALERT_TOPIC, payload)
        log.warning("alert %s: %s", kind, message, extra={"ctx": {"alert": payload}})
        return True

    async def refill(
        self, provider: str, amount_milli: int, reference: str | None
    ) -> dict[str, Any]:
        if provider not in self.providers and provider not in self.settings_providers():
            raise NotFound("No such provider", code="unknown_provider", provider=provider)
        reference = reference or f"refill:{uuid.uuid4()}"
        async with self.uow() as session:
            repo = Repository(session)
            await repo.ensure_pool(provider)
            await repo.pool(provider, lock=True)
            if await repo.add_pool_entry(provider, reference, "refill", amount_milli):
                pool = await repo.refill_pool(provider, amount_milli)
                assert pool is not None
                await self._pool_alert(repo, pool)
            else:
                entry = await repo.pool_entry(provider, reference)
                if (
                    entry is None
                    or entry["amount_milli"] != amount_milli
                    or entry["kind"] != "refill"
                ):
                    raise Conflict(
                        "This reference refilled another amount", code="reference_reused"
                    )
            pool = await repo.pool(provider)
            assert pool is not None
            return pool

    def settings_providers(self) -> tuple[str, ...]:
        from services.enhancement.config import REMOTE_PROVIDERS

        return REMOTE_PROVIDERS

    async def pool_view(self) -> list[dict[str, Any]]:
        async with self.uow() as session:
            repo = Repository(session)
            for name in self.providers:
                await repo.ensure_pool(name)
            pools = await repo.pools()
        out = []
        for pool in pools:
            name = pool["provider"]
            provider = self.providers.get(name)
            breaker = self.breakers.get(name)
            state = (await breaker.state()).state if breaker else "off"
            cost = provider.cost_milli if provider else self.settings.provider_cost(name)
            level = pool["level_milli"]
            out.append(
                {
                    "provider": name,
                    "balance": pool["balance_milli"],
                    "level": level,
                    "consumed": pool["consumed_milli"],
                    "cost_per_call": cost,
                    "percent_left": round(pool["balance_milli"] * 100 / level, 1) if level else 0.0,
                    "low": self.pool_is_low(pool),
                    "breaker": state,
                    "active": provider is not None
                    and pool["balance_milli"] >= cost
                    and state != "open",
                }
            )
        return out

    async def check_thresholds(self) -> int:
        """The 15-minute job: pool alerts (once per crossing) and provider health."""
        raised = 0
        async with self.uow() as session:
            repo = Repository(session)
            for name in self.providers:
                await repo.ensure_pool(name)
            for pool in await repo.pools():
                before = pool["low_alerted"]
                await self._pool_alert(repo, pool)
                raised += int(not before and self.pool_is_low(pool))
            for name, breaker in self.breakers.items():
                state = (await breaker.state()).state
                if state == OPEN:
                    raised += int(await self._unhealthy_alert(repo, name))
                elif state == CLOSED:
                    await repo.set_pool_flag(name, "unhealthy_alerted", False)
        return raised

    # -- allowances -------------------------------------------------------------------

    async def _allowance_alert(
        self,
        repo: Repository,
        user_id: str,
        period: str,
        state: dict[str, Any],
        included: int,
    ) -> None:
        """Past the alert percentage of the tier's count: one alert per user and month
        (the alert's dedupe key)."""
        percent = self.settings.enhancement_allowance_alert_percent
        used = int(state["used"])
        if included and used * 100 > included * percent:
            await self._alert(
                repo,
                "allowance_high",
                user_id,
                f"User {user_id} used over {percent}% of the month's enhancements",
                {"used": used, "included": included, "period": period},
                f"allowance_high:{user_id}:{period}",
            )

    async def set_tier(self, user_id: str, tier: str) -> None:
        if tier not in self.settings.enhancement_tier_allowances:
            raise Unprocessable(
                "Unknown tier",
                code="unknown_tier",
                tiers=sorted(self.settings.enhancement_tier_allowances),
            )
        async with self.uow() as session:
            await Repository(session).set_tier(user_id, tier)

    async def tier_of(self, repo: Repository, user_id: str, now: datetime) -> str:
        """The best of the admin's tier (a floor, free unless set) and the tiers of the
        user's plans that are active and paid at `now` (fed by billing's events)."""
        plan_tiers = self.settings.enhancement_plan_tiers
        tiers = [await repo.tier(user_id) or "free"]
        tiers += [plan_tiers[i] for i in await repo.paid_plans(user_id, now) if i in plan_tiers]
        return max(tiers, key=self.included_for)

    async def subscription_changed(self, payload: dict[str, Any]) -> None:
        """Billing's `billing.subscription.changed`: a plan paid until `expires_at`, or
        cancelled (the tier is gone at once). Plans with no tier are recorded anyway."""
        expires_at = payload.get("expires_at")
        async with self.uow() as session:
            await Repository(session).record_subscription(
                str(payload["subscription_id"]),
                str(payload["user_id"]),
                str(payload["item"]),
                str(payload["status"]),
                datetime.fromisoformat(expires_at) if expires_at else None,
            )

    async def allowance(self, user_id: str, now: datetime | None = None) -> dict[str, Any]:
        """The month's included enhancements: the tier's count, and what the ledger
        recorded of the month's allowance (granted, used)."""
        now = now or datetime.now(UTC)
        period = period_of(now)
        async with self.uow() as session:
            tier = await self.tier_of(Repository(session), user_id, now)
        found = await self.client.json(
            "ledger",
            "GET",
            "/v1/ledger/allowances",
            params={"user_id": user_id, "period": period, "kind": ALLOWANCE_KIND},
        )
        items = found["items"]
        included = self.included_for(tier)
        used = int(items[0]["used"]) if items else 0
        return {
            "user_id": user_id,
            "tier": tier,
            "period": period,
            "included": included,
            "granted": int(items[0]["granted"]) if items else 0,
            "used": used,
            "remaining": max(0, included - used),
        }

    async def monthly_reset(self, now: datetime | None = None) -> int:
        """On the 1st: the new month's allowance is granted in the ledger to every user
        whose tier includes enhancements (a user missed here is granted at their first
        included enhancement). Last month's grant simply expires there: unused
        allowance never carries over. Returns the number of users granted."""
        now = now or datetime.now(UTC)
        period = period_of(now)
        async with self.uow() as session:
            repo = Repository(session)
            entitled = [
                (user_id, self.included_for(await self.tier_of(repo, user_id, now)))
                for user_id in await repo.tier_candidates(now)
            ]
        granted = 0
        for user_id, units in entitled:
            if units <= 0:
                continue
            try:
                await self.grant_allowance(user_id, period, units)
                granted += 1
            except KuError as exc:  # the lazy grant at the first use covers it
                log.warning("no allowance granted to %s for %s: %s", user_id, period, exc.code)
        return granted

    # -- scheduled work ---------------------------------------------------------------

    async def run_pending(self, min_age_seconds: float = 2.0) -> dict[str, int]:
        """The 2-minute job: fail overdue tasks, settle finished ones, re-enqueue the rest."""
        failed = settled = enqueued = 0
        async with self.uow() as session:
            overdue = await Repository(session).overdue(BATCH)
        # One task whose ledger call fails (the ledger down, a hold it refuses) is logged
        # and left for the next run: it must not stop the others behind it.
        for task_id in overdue:
            try:
                failed += int(await self.fail(task_id, "deadline_exceeded", "The task timed out"))
            except KuError as exc:
                log.error("task %s: not failed and settled: %s", task_id, exc.code)
        async with self.uow() as session:
            unsettled = await Repository(session).unsettled(BATCH)
        for task_id in unsettled:
            try:
                await self.settle(task_id)
            except KuError as exc:
                log.error("task %s: not settled: %s", task_id, exc.code)
                continue
            settled += 1
        async with self.uow() as session:
            runnable = await Repository(session).runnable(BATCH, min_age_seconds)
        for row in runnable:
            enqueued += int(await self._enqueue(row["id"], row["attempt"]))
        return {"failed_overdue": failed, "settled": settled, "enqueued": enqueued}

    async def daily_summary(self, day: datetime | None = None) -> dict[str, Any]:
        """01:00: yesterday's usage, stored once per day."""
        end = (day or datetime.now(UTC)).replace(hour=0, minute=0, second=0, microsecond=0)
        start = end - timedelta(days=1)
        async with self.uow() as session:
            repo = Repository(session)
            usage = await repo.usage_between(start, end)
            summary = {"day": start.date().isoformat(), **usage}
            await repo.save_summary(summary["day"], summary)
        return summary

    async def purge_results(self) -> int:
        """Retention: results and inputs older than the retention period are deleted."""
        before = datetime.now(UTC) - timedelta(days=self.settings.enhancement_retention_days)
        async with self.uow() as session:
            rows = await Repository(session).expired_results(before, BATCH)
        for row in rows:
            await self.storage.delete(row["input_key"])
            if row["result_key"]:
                await self.storage.delete(row["result_key"])
        if rows:
            async with self.uow() as session:
                await Repository(session).mark_results_deleted([r["id"] for r in rows])
        return len(rows)

    async def credit_stats(self, now: datetime | None = None) -> dict[str, Any]:
        now = now or datetime.now(UTC)
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        async with self.uow() as session:
            repo = Repository(session)
            month = await repo.usage_between(start, next_period_start(now))
            today = await repo.usage_between(
                now.replace(hour=0, minute=0, second=0, microsecond=0), now + timedelta(seconds=1)
            )
            alerts = await repo.alerts(20)
        return {
            "pools": await self.pool_view(),
            "month": month,
            "today": today,
            "budget": await self.pool_budget(now),
            "alerts": alerts,
        }

    async def pool_budget(self, now: datetime) -> dict[str, Any]:
        """Seed 004's rule: the pools are funded from a share (80 %) of the month's revenue,
        which billing knows from its payments (per currency, net of refunds)."""
        percent = self.settings.enhancement_pool_budget_percent
        month = period_of(now)
        budget: dict[str, Any] = {
            "month": month,
            "pool_budget_percent": percent,
            "source": "billing",
        }
        try:
            revenue = await self.client.json(
                "ledger", "GET", "/v1/billing/revenue", params={"month": month}
            )
        except KuError as exc:  # billing unreachable: the rest of the stats still answer
            log.warning("no revenue from billing: %s", exc.code)
            error = {"code": exc.code, "message": exc.message}
            return {**budget, "available": False, "revenue": [], "error": error}
        return {
            **budget,
            "available": True,
            "revenue": [
                {
                    "currency": item["currency"],
                    "payments": item["payments"],
                    "revenue_minor": item["net"],
                    "pool_budget_minor": item["net"] * percent // 100,
                }
                for item in revenue["items"]
            ],
        }


class _Replayed(Exception):
    def __init__(self, task_id: uuid.UUID) -> None:
        self.task_id = task_id


def _jsonb(value: Any) -> str:
    return orjson.dumps(value).decode()
