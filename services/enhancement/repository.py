"""Every SQL statement of the enhancement service."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

TASK_COLUMNS = "*"


def _row(result: Any) -> dict[str, Any] | None:
    row = result.mappings().first()
    return dict(row) if row is not None else None


class Repository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def _one(self, sql: str, **params: Any) -> dict[str, Any] | None:
        return _row(await self.session.execute(text(sql), params))

    async def _all(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        result = await self.session.execute(text(sql), params)
        return [dict(r) for r in result.mappings().all()]

    # -- tasks ------------------------------------------------------------------------

    async def insert_task(self, values: dict[str, Any]) -> dict[str, Any] | None:
        """The new task, or None when a task with this id exists (an idempotent replay)."""
        columns = ", ".join(values)
        params = ", ".join(f":{k}" for k in values)
        return await self._one(
            f"INSERT INTO enhancement.tasks ({columns}) VALUES ({params})"
            " ON CONFLICT (id) DO NOTHING RETURNING *",
            **values,
        )

    async def task(self, task_id: uuid.UUID, *, lock: bool = False) -> dict[str, Any] | None:
        suffix = " FOR UPDATE" if lock else ""
        return await self._one(
            "SELECT * FROM enhancement.tasks WHERE id = :id" + suffix, id=task_id
        )

    async def tasks_of(self, user_id: str, app: str | None, limit: int) -> list[dict[str, Any]]:
        """A user's newest tasks; `app` narrows them to one app's (an app key sees its own)."""
        return await self._all(
            "SELECT * FROM enhancement.tasks WHERE user_id = :user_id"
            " AND (CAST(:app AS text) IS NULL OR app = :app)"
            " ORDER BY created_at DESC, id DESC LIMIT :limit",
            user_id=user_id,
            app=app,
            limit=limit,
        )

    async def claim(self, task_id: uuid.UUID, lease_seconds: int) -> dict[str, Any] | None:
        """Take an open task whose lease is free; the new attempt number fences older workers."""
        return await self._one(
            "UPDATE enhancement.tasks SET status = 'processing', attempt = attempt + 1,"
            " lease_until = now() + make_interval(secs => :lease), updated_at = now(),"
            " progress = GREATEST(progress, 10)"
            " WHERE id = :id AND status IN ('pending', 'processing')"
            " AND (lease_until IS NULL OR lease_until < now()) RETURNING *",
            id=task_id,
            lease=lease_seconds,
        )

    async def update_fenced(
        self, task_id: uuid.UUID, attempt: int, lease_seconds: int, **values: Any
    ) -> bool:
        """Write as the worker holding `attempt`, renewing its lease; False if it lost it."""
        sets = "".join(f", {k} = :{k}" for k in values)
        row = await self._one(
            "UPDATE enhancement.tasks SET updated_at = now(),"
            " lease_until = now() + make_interval(secs => :lease)" + sets + " WHERE id = :id"
            " AND attempt = :attempt AND status = 'processing' RETURNING id",
            id=task_id,
            attempt=attempt,
            lease=lease_seconds,
            **values,
        )
        return row is not None

    async def finish(
        self, task_id: uuid.UUID, attempt: int | None, status: str, **values: Any
    ) -> dict[str, Any] | None:
        """Move an open task to completed/failed (fenced by `attempt` unless None)."""
        sets = "".join(f", {k} = :{k}" for k in values)
        fence = " AND attempt = :attempt" if attempt is not None else ""
        params: dict[str, Any] = {"id": task_id, "status": status, **values}
        if attempt is not None:
            params["attempt"] = attempt
        return await self._one(
            "UPDATE enhancement.tasks SET status = :status, updated_at = now(),"
            " completed_at = now(), lease_until = NULL,"
            " attempt = attempt + 1, progress = CASE WHEN :status = 'completed' THEN 100"
            " ELSE progress END"
            + sets
            + " WHERE id = :id AND status IN ('pending', 'processing')"
            + fence
            + " RETURNING *",
            **params,
        )

    async def add_provider_cost(self, task_id: uuid.UUID, cost_milli: int) -> None:
        await self.session.execute(
            text(
                "UPDATE enhancement.tasks SET provider_cost_milli = provider_cost_milli + :c"
                " WHERE id = :id"
            ),
            {"id": task_id, "c": cost_milli},
        )

    async def mark_settled(self, task_id: uuid.UUID, charged_milli: int) -> dict[str, Any] | None:
        return await self._one(
            "UPDATE enhancement.tasks SET settled_at = now(), charged_milli = :charged"
            " WHERE id = :id AND settled_at IS NULL RETURNING *",
            id=task_id,
            charged=charged_milli,
        )

    async def overdue(self, limit: int) -> list[uuid.UUID]:
        rows = await self._all(
            "SELECT id FROM enhancement.tasks WHERE status IN ('pending', 'processing')"
            " AND deadline_at < now() ORDER BY deadline_at LIMIT :limit",
            limit=limit,
        )
        return [r["id"] for r in rows]

    async def unsettled(self, limit: int) -> list[uuid.UUID]:
        rows = await self._all(
            "SELECT id FROM enhancement.tasks WHERE status IN ('completed', 'failed')"
            " AND settled_at IS NULL ORDER BY completed_at LIMIT :limit",
            limit=limit,
        )
        return [r["id"] for r in rows]

    async def runnable(self, limit: int, min_age_seconds: float) -> list[dict[str, Any]]:
        """Open tasks nobody holds a lease on (never started, or their worker died)."""
        return await self._all(
            "SELECT id, attempt FROM enhancement.tasks WHERE status IN ('pending', 'processing')"
            " AND (lease_until IS NULL OR lease_until < now())"
            " AND created_at < now() - make_interval(secs => :age)"
            " ORDER BY created_at LIMIT :limit",
            limit=limit,
            age=min_age_seconds,
        )

    async def expired_results(self, before: datetime, limit: int) -> list[dict[str, Any]]:
        return await self._all(
            "SELECT id, input_key, result_key FROM enhancement.tasks"
            " WHERE completed_at < :before AND result_deleted_at IS NULL"
            " AND status IN ('completed', 'failed') LIMIT :limit",
            before=before,
            limit=limit,
        )

    async def mark_results_deleted(self, ids: Sequence[uuid.UUID]) -> None:
        await self.session.execute(
            text(
                "UPDATE enhancement.tasks SET result_deleted_at = now()"
                " WHERE id = ANY(CAST(:ids AS uuid[]))"
            ),
            {"ids": [str(i) for i in ids]},
        )

    # -- allowances -------------------------------------------------------------------

    async def tier(self, user_id: str) -> str | None:
        row = await self._one("SELECT tier FROM enhancement.tiers WHERE user_id = :u", u=user_id)
        return row["tier"] if row else None

    async def set_tier(self, user_id: str, tier: str) -> None:
        await self.session.execute(
            text(
                "INSERT INTO enhancement.tiers (user_id, tier) VALUES (:u, :t)"
                " ON CONFLICT (user_id) DO UPDATE SET tier = :t, updated_at = now()"
            ),
            {"u": user_id, "t": tier},
        )

    async def record_subscription(
        self,
        subscription_id: str,
        user_id: str,
        item: str,
        status: str,
        expires_at: datetime | None,
    ) -> None:
        """Billing's news of a plan, in any order and any number of times: cancelled stays
        cancelled, and the paid period only ever extends."""
        await self.session.execute(
            text(
                """
                INSERT INTO enhancement.subscriptions
                       (subscription_id, user_id, item, status, expires_at)
                VALUES (:s, :u, :i, :st, :e)
                ON CONFLICT (subscription_id) DO UPDATE SET
                    status = CASE WHEN enhancement.subscriptions.status = 'cancelled'
                                  THEN 'cancelled' ELSE EXCLUDED.status END,
                    expires_at = GREATEST(enhancement.subscriptions.expires_at,
                                          EXCLUDED.expires_at),
                    updated_at = now()
                """
            ),
            {"s": subscription_id, "u": user_id, "i": item, "st": status, "e": expires_at},
        )

    async def paid_plans(self, user_id: str, now: datetime) -> list[str]:
        """The items of the user's plans that are active and paid at `now`."""
        rows = await self.session.execute(
            text(
                "SELECT item FROM enhancement.subscriptions WHERE user_id = :u"
                " AND status = 'active' AND expires_at > :now ORDER BY item"
            ),
            {"u": user_id, "now": now},
        )
        return [r.item for r in rows]

    async def tier_candidates(self, now: datetime) -> list[str]:
        """Users who may have a tier including enhancements at `now`: an admin's tier
        above free, or a plan active and paid (the monthly grant decides per user)."""
        rows = await self.session.execute(
            text(
                "SELECT user_id FROM enhancement.tiers WHERE tier <> 'free'"
                " UNION SELECT user_id FROM enhancement.subscriptions"
                " WHERE status = 'active' AND expires_at > :now ORDER BY 1"
            ),
            {"now": now},
        )
        return [r.user_id for r in rows]

    # -- pools ------------------------------------------------------------------------

    async def pools(self) -> list[dict[str, Any]]:
        return await self._all("SELECT * FROM enhancement.pools ORDER BY provider")

    async def pool(self, provider: str, *, lock: bool = False) -> dict[str, Any] | None:
        return await self._one(
            "SELECT * FROM enhancement.pools WHERE provider = :p" + (" FOR UPDATE" if lock else ""),
            p=provider,
        )

    async def ensure_pool(self, provider: str) -> None:
        await self.session.execute(
            text("INSERT INTO enhancement.pools (provider) VALUES (:p) ON CONFLICT DO NOTHING"),
            {"p": provider},
        )

    async def add_pool_entry(
        self, provider: str, reference: str, kind: str, amount_milli: int, task_id: Any = None
    ) -> bool:
        """Record a movement once; False when this (provider, reference) already moved it."""
        row = await self._one(
            "INSERT INTO enhancement.pool_entries"
            " (provider, reference, kind, amount_milli, task_id)"
            " VALUES (:p, :r, :k, :a, :t)"
            " ON CONFLICT DO NOTHING RETURNING provider",
            p=provider,
            r=reference,
            k=kind,
            a=amount_milli,
            t=task_id,
        )
        return row is not None

    async def pool_entry(self, provider: str, reference: str) -> dict[str, Any] | None:
        return await self._one(
            "SELECT * FROM enhancement.pool_entries WHERE provider = :p AND reference = :r",
            p=provider,
            r=reference,
        )

    async def consume_pool(self, provider: str, amount_milli: int) -> dict[str, Any] | None:
        """Take from a pool (never below zero: it stops at zero and the provider drops out)."""
        return await self._one(
            "UPDATE enhancement.pools SET balance_milli = GREATEST(balance_milli - :a, 0),"
            " consumed_milli = consumed_milli + :a, updated_at = now()"
            " WHERE provider = :p RETURNING *",
            p=provider,
            a=amount_milli,
        )

    async def refill_pool(self, provider: str, amount_milli: int) -> dict[str, Any] | None:
        return await self._one(
            "UPDATE enhancement.pools SET balance_milli = balance_milli + :a,"
            " level_milli = balance_milli + :a, updated_at = now()"
            " WHERE provider = :p RETURNING *",
            p=provider,
            a=amount_milli,
        )

    async def set_pool_flag(
        self, provider: str, flag: Literal["low_alerted", "unhealthy_alerted"], value: bool
    ) -> bool:
        """Set a pool's alert flag; True only for the caller that changed it (row lock)."""
        assert flag in ("low_alerted", "unhealthy_alerted")
        row = await self._one(
            f"UPDATE enhancement.pools SET {flag} = :v WHERE provider = :p"
            f" AND {flag} <> :v RETURNING provider",
            p=provider,
            v=value,
        )
        return row is not None

    # -- alerts -----------------------------------------------------------------------

    async def add_alert(
        self, kind: str, subject: str, message: str, detail: dict[str, Any], dedupe_key: str
    ) -> dict[str, Any] | None:
        """The new alert (id, created_at), or None when its dedupe key was recorded before."""
        return await self._one(
            "INSERT INTO enhancement.alerts (kind, subject, message, detail, dedupe_key)"
            " VALUES (:k, :s, :m, CAST(:d AS jsonb), :key) ON CONFLICT (dedupe_key) DO NOTHING"
            " RETURNING id, created_at",
            k=kind,
            s=subject,
            m=message,
            d=_json(detail),
            key=dedupe_key,
        )

    async def alerts(self, limit: int, kind: str | None = None) -> list[dict[str, Any]]:
        return await self._all(
            "SELECT * FROM enhancement.alerts WHERE CAST(:k AS text) IS NULL OR kind = :k"
            " ORDER BY id DESC LIMIT :limit",
            k=kind,
            limit=limit,
        )

    async def count_alerts(self, kind: str, subject: str) -> int:
        row = await self._one(
            "SELECT count(*) AS n FROM enhancement.alerts WHERE kind = :k AND subject = :s",
            k=kind,
            s=subject,
        )
        return int(row["n"]) if row else 0

    # -- stats ------------------------------------------------------------------------

    async def usage_between(self, start: datetime, end: datetime) -> dict[str, Any]:
        row = await self._one(
            "SELECT count(*) FILTER (WHERE status = 'completed') AS completed,"
            " count(*) FILTER (WHERE status = 'failed') AS failed,"
            " count(*) FILTER (WHERE degraded) AS degraded,"
            " count(*) AS submitted,"
            " COALESCE(sum(charged_milli), 0) AS charged_milli,"
            " COALESCE(sum(provider_cost_milli), 0) AS provider_cost_milli"
            " FROM enhancement.tasks WHERE created_at >= :a AND created_at < :b",
            a=start,
            b=end,
        )
        return {k: int(v) for k, v in (row or {}).items()}

    async def save_summary(self, day: str, summary: dict[str, Any]) -> bool:
        row = await self._one(
            "INSERT INTO enhancement.daily_summaries (day, summary) VALUES (:d, CAST(:s AS jsonb))"
            " ON CONFLICT (day) DO NOTHING RETURNING day",
            d=day,
            s=_json(summary),
        )
        return row is not None


def _json(value: Any) -> str:
    import orjson

    return orjson.dumps(value).decode()
