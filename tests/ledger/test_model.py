"""A Hypothesis state machine drives random grants (with and without expiry, promo
and purchase lots), debits, holds, captures, releases, refunds, billing clawbacks and
the passage of time through the ledger, for several users; mirrors them in a small
in-memory model of lots, holds, charges and debt; and checks after every step that
every lot's remaining and expired credit, every hold's state and every user's
available, held and debt agree, and after every run that verify's checks find every
invariant intact.

Time: the clock is not waited for. "Time passes for a lot" moves that lot's
`expires_at` into the past (a distinct instant per lot, so orderings by expiry stay
well defined), which is exactly what time does to it; the SQL decides expiry with
clock_timestamp() against it. A hold's TTL passing moves its `expires_at` and runs
the expiry job at once.

Profiles: CI runs KU_MODEL_EXAMPLES=20 examples of up to KU_MODEL_STEPS=30 steps
(the defaults). For a longer local run:
    KU_MODEL_EXAMPLES=500 KU_MODEL_STEPS=60 .venv/bin/pytest --timeout 0 \
        tests/ledger/test_model.py
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from services.kit.db import plain_url
from services.kit.testing.plugin import running
from services.ledger.verify import run_checks
from tests.ledger.helpers import operator, penora

NEVER = datetime.max.replace(tzinfo=UTC)
BILLING_AUTH = {"user": "any", "owner": "service:billing", "holds": "*", "charges": "*"}
USERS = 3


@dataclass
class MLot:
    id: int
    user: int
    amount: int
    remaining: int
    expires_at: datetime | None
    source: str
    reference: str | None = None
    lapsed: bool = False
    expired: int = 0
    clawed_total: int = 0  # clawbacks of this payment, all parts

    def order(self) -> tuple:
        return (self.expires_at or NEVER, self.id)


@dataclass
class MHold:
    id: str
    seq: int
    user: int
    amount: int
    allocations: dict[int, int]  # lot id -> amount
    status: str = "active"
    clawed: int = 0
    captured: int = 0


@dataclass
class MCharge:
    tx_id: int
    user: int
    draws: list[list[int]]  # [lot id, amount, returned]
    refundable: int


class Harness:
    """The ledger app on a private event loop, so sync Hypothesis rules can call it."""

    def __init__(self, dsn: str) -> None:
        import httpx

        from services.ledger.app import create_app

        self.dsn = dsn
        self.loop = asyncio.new_event_loop()
        self.app = create_app()
        self._ctx = running(self.app)
        self.run(self._ctx.__aenter__())
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://ledger"
        )
        self.db = self.run(asyncpg.connect(plain_url(dsn)))

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def post(self, path: str, payload: dict | None = None, *, headers=None):
        headers = headers or {**penora(), "Idempotency-Key": uuid.uuid4().hex}
        return self.run(self.client.post(path, json=payload, headers=headers))

    def apply(self, op: dict[str, Any]) -> dict[str, Any]:
        raw = self.run(
            self.db.fetchval("SELECT ledger.apply($1::jsonb)::text", orjson.dumps(op).decode())
        )
        return orjson.loads(raw)

    async def verify(self) -> list[str]:
        async with self.db.transaction(isolation="repeatable_read", readonly=True):
            return await run_checks(self.db)

    def close(self) -> None:
        self.run(self.db.close())
        self.run(self.client.aclose())
        self.run(self._ctx.__aexit__(None, None, None))
        self.loop.close()


amounts = st.integers(min_value=1, max_value=20_000)
users = st.integers(min_value=0, max_value=USERS - 1)


def ku(milli: int) -> float | int:
    return milli // 1000 if milli % 1000 == 0 else milli / 1000


class LedgerMachine(RuleBasedStateMachine):
    harness: Harness

    def __init__(self) -> None:
        super().__init__()
        self.seq = itertools.count(1)
        self.lots: dict[int, MLot] = {}
        self.holds: list[MHold] = []
        self.charges: list[MCharge] = []
        self.debt = [0] * USERS
        self.users = [f"model-{uuid.uuid4().hex[:12]}" for _ in range(USERS)]

    @initialize()
    def open_accounts(self) -> None:
        for user in self.users:
            r = self.harness.post(
                "/v1/ledger/accounts", {"user_id": user, "welcome": False}, headers=operator()
            )
            assert r.status_code == 201

    # --- the model's rules (mirroring sql/0004_money_rules.sql) ---------------

    def user_lots(self, u: int) -> list[MLot]:
        return [g for g in self.lots.values() if g.user == u]

    def spendable(self, u: int, but: int | None = None) -> list[MLot]:
        return sorted(
            (g for g in self.user_lots(u) if not g.lapsed and g.remaining > 0 and g.id != but),
            key=MLot.order,
        )

    def available(self, u: int) -> int:
        if self.debt[u] > 0:
            return 0
        return sum(g.remaining for g in self.user_lots(u) if not g.lapsed)

    def held(self, u: int) -> int:
        return sum(h.amount - h.clawed for h in self.holds if h.user == u and h.status == "active")

    def draw(self, u: int, amount: int) -> list[tuple[int, int]]:
        taken = []
        for g in self.spendable(u):
            take = min(g.remaining, amount)
            g.remaining -= take
            taken.append((g.id, take))
            amount -= take
            if amount == 0:
                break
        assert amount == 0
        return taken

    def give_back(self, u: int, lot: MLot, amount: int) -> None:
        if lot.lapsed:
            lot.expired += amount
            return
        settle = min(amount, self.debt[u])
        self.debt[u] -= settle
        lot.remaining += amount - settle

    def resolve(self, hold: MHold, capture: int) -> list[list[int]]:
        """Spend `capture` from valid allocations, give the rest back; the draws."""
        order = sorted(
            hold.allocations.items(),
            key=lambda a: (self.lots[a[0]].lapsed, *self.lots[a[0]].order()),
        )
        left, spent = capture, []
        for lot_id, allocated in order:
            if allocated == 0:
                continue
            lot = self.lots[lot_id]
            spend = 0 if lot.lapsed else min(allocated, left)
            if spend:
                spent.append([lot_id, spend, 0])
                left -= spend
            self.give_back(hold.user, lot, allocated - spend)
        assert left == 0
        return spent

    def valid_in(self, hold: MHold) -> int:
        return sum(a for lot_id, a in hold.allocations.items() if not self.lots[lot_id].lapsed)

    def sweep_lot(self, lot: MLot) -> None:
        lot.expired += lot.remaining
        lot.remaining = 0

    # --- rules ---------------------------------------------------------------

    @rule(
        u=users,
        amount=amounts,
        days=st.one_of(st.none(), st.integers(1, 60)),
        purchase=st.booleans(),
    )
    def grant(self, u: int, amount: int, days: int | None, purchase: bool) -> None:
        expires = datetime.now(UTC) + timedelta(days=days) if days else None
        reference = f"pay_{uuid.uuid4().hex[:10]}" if purchase else None
        r = self.harness.post(
            "/v1/ledger/grants",
            {
                "user_id": self.users[u],
                "amount": ku(amount),
                "source": "purchase" if purchase else "promo",
                "reference": reference,
                "expires_at": expires.isoformat() if expires else None,
            },
            headers={**operator(), "Idempotency-Key": uuid.uuid4().hex},
        )
        assert r.status_code == 201, r.text
        settle = min(amount, self.debt[u])
        self.debt[u] -= settle
        lot = MLot(r.json()["grant_id"], u, amount, amount - settle, expires, "promo", reference)
        lot.source = "purchase" if purchase else "promo"
        self.lots[lot.id] = lot

    @rule(u=users, amount=amounts)
    def debit(self, u: int, amount: int) -> None:
        r = self.harness.post("/v1/ledger/debits", {"user_id": self.users[u], "amount": ku(amount)})
        if amount <= self.available(u):
            assert r.status_code == 201, r.text
            draws = [[lot, take, 0] for lot, take in self.draw(u, amount)]
            self.charges.append(MCharge(r.json()["transaction_id"], u, draws, amount))
        else:
            assert r.status_code == 402, r.text
            assert r.json()["error"]["detail"]["available"] == ku(self.available(u))

    @rule(u=users, amount=amounts)
    def reserve(self, u: int, amount: int) -> None:
        r = self.harness.post("/v1/ledger/holds", {"user_id": self.users[u], "amount": ku(amount)})
        if amount <= self.available(u):
            assert r.status_code == 201, r.text
            allocations = dict(self.draw(u, amount))
            self.holds.append(MHold(r.json()["hold"]["id"], next(self.seq), u, amount, allocations))
        else:
            assert r.status_code == 402, r.text

    @precondition(lambda self: self.holds)
    @rule(data=st.data())
    def capture(self, data) -> None:
        hold = data.draw(st.sampled_from(self.holds))
        active = hold.amount - hold.clawed
        amount = data.draw(st.integers(1, active + 500))
        r = self.harness.post(f"/v1/ledger/holds/{hold.id}/capture", {"amount": ku(amount)})
        if hold.status == "expired":
            assert r.status_code == 409 and r.json()["error"]["code"] == "hold_expired"
        elif hold.status == "captured" and amount == hold.captured:
            assert r.status_code == 200, r.text
        elif hold.status != "active":
            assert r.status_code == 409, r.text
        elif amount > active:
            assert r.status_code == 422, r.text
        elif amount > self.valid_in(hold):
            assert r.status_code == 409, r.text
            assert r.json()["error"]["code"] == "hold_partly_expired"
        else:
            assert r.status_code == 200, r.text
            hold.status, hold.captured = "captured", amount
            draws = self.resolve(hold, amount)
            self.charges.append(MCharge(r.json()["transaction_id"], hold.user, draws, amount))

    @precondition(lambda self: self.holds)
    @rule(data=st.data())
    def release(self, data) -> None:
        hold = data.draw(st.sampled_from(self.holds))
        r = self.harness.post(f"/v1/ledger/holds/{hold.id}/release")
        if hold.status == "active":
            assert r.status_code == 200, r.text
            hold.status = "released"
            self.resolve(hold, 0)
        elif hold.status in ("captured", "clawed"):
            assert r.status_code == 409
        else:
            assert r.status_code == 200  # releasing again replays the first outcome

    @precondition(lambda self: self.charges)
    @rule(data=st.data())
    def refund(self, data) -> None:
        charge = data.draw(st.sampled_from(self.charges))
        amount = data.draw(st.integers(1, charge.refundable + 500))
        r = self.harness.post(
            "/v1/ledger/refunds", {"transaction_id": charge.tx_id, "amount": ku(amount)}
        )
        if charge.refundable == 0:
            assert r.status_code == 409, r.text
        elif amount > charge.refundable:
            assert r.status_code == 422, r.text
        else:
            assert r.status_code == 201, r.text
            charge.refundable -= amount
            # Back to the lots it drew from, longest-lived first.
            left = amount
            for d in sorted(charge.draws, key=lambda d: self.lots[d[0]].order(), reverse=True):
                give = min(d[1] - d[2], left)
                if give <= 0:
                    continue
                d[2] += give
                self.give_back(charge.user, self.lots[d[0]], give)
                left -= give
                if left == 0:
                    break
            assert left == 0

    @precondition(lambda self: any(g.reference for g in self.lots.values()))
    @rule(data=st.data())
    def clawback(self, data) -> None:
        lot = data.draw(st.sampled_from([g for g in self.lots.values() if g.reference]))
        requested = data.draw(st.integers(1, lot.amount + 2_000))
        u = lot.user
        r = self.harness.apply(
            {
                "op": "clawback",
                "user_id": self.users[u],
                "amount": requested,
                "source": "purchase",
                "grant_reference": lot.reference,
                "reference": f"rfnd_{uuid.uuid4().hex[:8]}",
                "app": "billing",
                "auth": BILLING_AUTH,
            }
        )
        assert r["status"] == 201, r
        if lot.lapsed and lot.remaining:
            self.sweep_lot(lot)
        active = [h for h in self.holds if h.status == "active" and h.allocations.get(lot.id)]
        held_lot = sum(h.allocations[lot.id] for h in active)
        total = lot.amount - lot.expired - lot.clawed_total - (held_lot if lot.lapsed else 0)
        total = max(0, min(requested, total))
        lot.clawed_total += total
        from_lot = min(total, lot.remaining)
        lot.remaining -= from_lot
        left = total - from_lot
        if not lot.lapsed:
            for h in sorted(active, key=lambda h: h.seq, reverse=True):
                take = min(h.allocations[lot.id], left)
                h.allocations[lot.id] -= take
                h.clawed += take
                if h.clawed == h.amount:
                    h.status = "clawed"
                left -= take
        for other in self.spendable(u, but=lot.id):
            take = min(other.remaining, left)
            other.remaining -= take
            left -= take
        self.debt[u] += left
        assert r["body"]["amount_milli"] == total
        assert r["body"]["debt_added_milli"] == left

    @precondition(lambda self: any(g.expires_at and not g.lapsed for g in self.lots.values()))
    @rule(data=st.data())
    def time_passes_for_a_lot(self, data) -> None:
        lot = data.draw(
            st.sampled_from([g for g in self.lots.values() if g.expires_at and not g.lapsed])
        )
        past = datetime.now(UTC) - timedelta(days=1, microseconds=lot.id)
        self.harness.run(
            self.harness.db.execute(
                "UPDATE ledger.grants SET expires_at = $2 WHERE id = $1", lot.id, past
            )
        )
        lot.lapsed, lot.expires_at = True, past

    @precondition(lambda self: any(h.status == "active" for h in self.holds))
    @rule(data=st.data())
    def ttl_passes_for_a_hold(self, data) -> None:
        hold = data.draw(st.sampled_from([h for h in self.holds if h.status == "active"]))
        self.harness.run(
            self.harness.db.execute(
                "UPDATE ledger.holds SET expires_at = clock_timestamp() - interval '1 second'"
                " WHERE id = $1::uuid",
                hold.id,
            )
        )
        self.harness.run(self.harness.db.execute("SELECT ledger.expire_holds(100)"))
        hold.status = "expired"
        self.resolve(hold, 0)

    @rule()
    def run_expiry_jobs(self) -> None:
        self.harness.run(self.harness.db.execute("SELECT ledger.expire_holds(100)"))
        self.harness.run(self.harness.db.execute("SELECT ledger.expire_grants(100)"))
        for lot in self.lots.values():
            if lot.lapsed and lot.remaining:
                self.sweep_lot(lot)

    # --- checks --------------------------------------------------------------

    @invariant()
    def ledger_matches_model(self) -> None:
        rows = self.harness.run(
            self.harness.db.fetch(
                "SELECT id, remaining_milli, expired_milli FROM ledger.grants"
                " WHERE user_id = ANY($1::text[])",
                self.users,
            )
        )
        lots = {r["id"]: (r["remaining_milli"], r["expired_milli"]) for r in rows}
        assert lots == {g.id: (g.remaining, g.expired) for g in self.lots.values()}
        rows = self.harness.run(
            self.harness.db.fetch(
                "SELECT id::text, status, clawed_milli FROM ledger.holds"
                " WHERE id = ANY($1::uuid[])",
                [h.id for h in self.holds],
            )
        )
        holds = {r["id"]: (r["status"], r["clawed_milli"]) for r in rows}
        assert holds == {h.id: (h.status, h.clawed) for h in self.holds}
        for u, user in enumerate(self.users):
            r = self.harness.run(
                self.harness.client.get(
                    "/v1/ledger/balance", params={"user_id": user}, headers=operator()
                )
            )
            if r.status_code == 404:  # before initialize
                return
            body = r.json()
            assert body["available"] == ku(self.available(u)), (u, body)
            assert body["held"] == ku(self.held(u)), (u, body)
            assert body["debt"] == ku(self.debt[u]), (u, body)

    def teardown(self) -> None:
        # verify's checks, on the harness's own connection (no new connection per run).
        assert self.harness.run(self.harness.verify()) == []


@pytest.fixture(scope="module")
def harness(ku_database_url):
    h = Harness(ku_database_url)
    yield h
    h.close()


def test_ledger_matches_model(harness):
    LedgerMachine.harness = harness
    run = LedgerMachine.TestCase
    run.settings = settings(
        max_examples=int(os.environ.get("KU_MODEL_EXAMPLES", "20")),
        stateful_step_count=int(os.environ.get("KU_MODEL_STEPS", "30")),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    run().runTest()
