"""Every read query of the ledger. Writes go through `ledger.apply()` (sql/)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from services.kit.authority import Permit

# Everything the balance endpoint shows, and whether the user is linked to app $2, in one
# statement. Holds whose TTL passed count as released even before a job or an operation
# sweeps them; expired grants never count; nothing is spendable beside a debt.
_BALANCE = """
WITH wallet AS (
  SELECT user_id, debt_milli FROM ledger.wallets WHERE user_id = $1
), spendable AS (
  SELECT g.source, g.remaining_milli AS amount
    FROM ledger.grants g
   WHERE g.user_id = $1 AND g.spendable
     AND (g.expires_at IS NULL OR g.expires_at > now())
  UNION ALL
  SELECT g.source, ha.amount_milli
    FROM ledger.holds h
    JOIN ledger.hold_allocations ha ON ha.hold_id = h.id
    JOIN ledger.grants g ON g.id = ha.grant_id
   WHERE h.user_id = $1 AND h.status = 'active' AND h.expires_at <= now()
     AND (g.expires_at IS NULL OR g.expires_at > now())
), by_source AS (
  SELECT source, SUM(amount)::bigint AS amount_milli
    FROM spendable WHERE (SELECT debt_milli FROM wallet) = 0
   GROUP BY source ORDER BY source
), next_expiry AS (
  SELECT expires_at AS at, SUM(remaining_milli)::bigint AS amount_milli
    FROM ledger.grants
   WHERE user_id = $1 AND spendable AND expires_at > now()
   GROUP BY expires_at ORDER BY expires_at LIMIT 1
)
SELECT
  EXISTS (SELECT 1 FROM wallet) AS found,
  ($2::text IS NOT NULL
   AND EXISTS (SELECT 1 FROM ledger.app_links WHERE user_id = $1 AND app = $2)) AS linked,
  (SELECT COALESCE(json_agg(by_source), '[]'::json) FROM by_source)::text AS sources,
  (SELECT row_to_json(next_expiry) FROM next_expiry)::text AS next_expiry,
  (SELECT COALESCE(SUM(amount_milli - clawed_milli), 0)::bigint
     FROM ledger.holds WHERE user_id = $1 AND status = 'active'
      AND expires_at > now()) AS held_milli,
  (SELECT debt_milli FROM wallet) AS debt_milli
"""


# The same statement for many reads at once: one row per (user, app) pair, in order.
# Each read's CTEs refer to its own row (a correlated LATERAL subquery: every index
# probe is the single statement's), and the whole statement is one snapshot taken
# after every read in it was asked for.
_BALANCES = (
    "SELECT b.* FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS r(user_id, app, i)"
    " CROSS JOIN LATERAL ("
    + _BALANCE.replace("$1", "r.user_id").replace("$2::text", "r.app").replace("$2", "r.app")
    + ") b ORDER BY r.i"
)


def _balance(row: asyncpg.Record) -> dict[str, Any]:
    out = dict(row)
    out["sources"] = orjson.loads(out["sources"])
    out["next_expiry"] = orjson.loads(out["next_expiry"]) if out["next_expiry"] else None
    return out


async def read_balances(
    pool: asyncpg.Pool, reads: Sequence[tuple[str, str | None]]
) -> list[dict[str, Any]]:
    """Each (user_id, app) of `reads`: the user's balance, with `found` (has a wallet)
    and `linked` (is linked to partner `app`, when given); one asyncpg statement (no ORM
    session, no BEGIN/COMMIT), answers in order."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(_BALANCES, [u for u, _ in reads], [a for _, a in reads])
    return [_balance(row) for row in rows]


class BalanceReader:
    """Concurrent balance reads share one statement, as debits share the group
    committer's (docs/ledger.md "Stop 12"). A read is one asyncpg round trip of its own
    otherwise: a socket write to Postgres, a wake-up for its answer, a pool checkout and
    its return, per read; shared, they are paid once per statement.

    No read waits for company: `read` starts a statement at once while fewer than
    `max_inflight` are running; reads asked for while they run go together into the
    next one (at most `max_reads` each). A read is never answered from a statement that
    began before it was asked for, so a client that saw its debit answered reads it."""

    MAX_INFLIGHT = 2

    def __init__(
        self, pool: asyncpg.Pool, *, max_reads: int = 64, max_inflight: int = MAX_INFLIGHT
    ) -> None:
        self.pool = pool
        self.max_reads = max_reads
        self.max_inflight = max_inflight
        self._queue: deque[tuple[str, str | None, asyncio.Future[dict[str, Any]]]] = deque()
        self._inflight = 0
        self.statements = 0  # statements run (tests: reads in flight share one)

    async def read(self, user_id: str, app: str | None) -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((user_id, app, future))
        if self._inflight < self.max_inflight:
            self._inflight += 1
            asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        queue = self._queue
        try:
            while queue:
                batch = [queue.popleft() for _ in range(min(self.max_reads, len(queue)))]
                self.statements += 1
                try:
                    rows = await read_balances(self.pool, [(u, a) for u, a, _ in batch])
                except BaseException as exc:
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                for (_, _, future), row in zip(batch, rows, strict=True):
                    if not future.done():
                        future.set_result(row)
        finally:
            self._inflight -= 1


class LedgerRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def is_linked(self, user_id: str, app: str) -> bool:
        """Is `user_id` linked to partner `app` (signed in through it, or an admin linked them)?"""
        row = await self.session.execute(
            text("SELECT 1 FROM ledger.app_links WHERE user_id = :u AND app = :a"),
            {"u": user_id, "a": app},
        )
        return row.first() is not None

    async def check_user(self, permit: Permit, user_id: str) -> None:
        """The permit's check of `user_id` (services/kit/authority.py), a partner's link
        looked up in this session: Forbidden when the caller may not touch that user."""
        linked = None
        if permit.users.startswith("linked:"):
            linked = await self.is_linked(user_id, permit.users[7:])
        permit.check_user(user_id, linked)

    async def link(self, user_id: str, app: str) -> None:
        await self.session.execute(
            text(
                "INSERT INTO ledger.app_links (user_id, app) VALUES (:u, :a) ON CONFLICT DO NOTHING"
            ),
            {"u": user_id, "a": app},
        )

    async def hold(self, hold_id: str) -> dict[str, Any] | None:
        row = await self.session.execute(
            text(
                "SELECT id::text, user_id, app, owner, amount_milli, captured_milli, clawed_milli,"
                " CASE WHEN status = 'active' AND expires_at <= now() THEN 'expired'"
                " ELSE status END AS status, reference, description, expires_at, created_at,"
                " resolved_at FROM ledger.holds WHERE id = CAST(:h AS uuid)"
            ),
            {"h": hold_id},
        )
        found = row.first()
        return dict(found._mapping) if found else None

    async def transactions(
        self,
        user_id: str,
        *,
        app: str | None,
        kind: str | None,
        since: datetime | None,
        until: datetime | None,
        before_id: int | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        clauses = ["user_id = :u"]
        params: dict[str, Any] = {"u": user_id, "limit": limit}
        for name, value, clause in (
            ("app", app, "app = :app"),
            ("kind", kind, "kind = :kind"),
            ("since", since, "created_at >= :since"),
            ("until", until, "created_at < :until"),
            ("before", before_id, "id < :before"),
        ):
            if value is not None:
                clauses.append(clause)
                params[name] = value
        rows = await self.session.execute(
            text(
                "SELECT id, kind, user_id, app, source, amount_milli, delta_milli, description,"
                " reference, hold_id::text AS hold_id, refund_of, created_at"
                f" FROM ledger.transactions WHERE {' AND '.join(clauses)}"
                " ORDER BY id DESC LIMIT :limit"
            ),
            params,
        )
        return [dict(r._mapping) for r in rows]

    async def usage(
        self,
        user_id: str,
        group_by: list[str],
        since: datetime | None,
        until: datetime | None,
    ) -> list[dict[str, Any]]:
        """Net spend (charges minus refunds) from the `spend` postings."""
        columns = {"app": "p.owner AS app", "day": "to_char(t.created_at, 'YYYY-MM-DD') AS day"}
        keys = {"app": "p.owner", "day": "to_char(t.created_at, 'YYYY-MM-DD')"}
        selected = [columns[g] for g in group_by]
        grouped = [keys[g] for g in group_by]
        params: dict[str, Any] = {"u": user_id}
        where = ["t.user_id = :u"]
        if since is not None:
            where.append("t.created_at >= :since")
            params["since"] = since
        if until is not None:
            where.append("t.created_at < :until")
            params["until"] = until
        sql = (
            f"SELECT {', '.join([*selected, ''])}"
            # Without a group (`group_by=`) the one row totals nothing when there is no spend.
            " COALESCE(SUM(p.amount_milli), 0)::bigint AS spent_milli,"
            " COUNT(*) FILTER (WHERE p.amount_milli > 0) AS charges"
            " FROM ledger.transactions t"
            " JOIN ledger.postings p ON p.tx_id = t.id AND p.account = 'spend'"
            f" WHERE {' AND '.join(where)}"
            + (f" GROUP BY {', '.join(grouped)} ORDER BY {', '.join(grouped)}" if grouped else "")
        )
        rows = await self.session.execute(text(sql), params)
        return [dict(r._mapping) for r in rows]
