"""A Hypothesis state machine drives random grants, debits, holds, captures,
releases, refunds and expiries through the ledger's API, mirrors them in a small
in-memory model, and checks after every step that balances agree and, after every
run, that `verify` finds every invariant intact.

Time is not waited for: an "expiry" moves a grant's or hold's `expires_at` into
the past, which is exactly what the passing of time does to it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from services.kit.db import plain_url
from services.kit.testing.plugin import running
from services.ledger.verify import verify
from tests.ledger.helpers import operator, penora

NEVER = datetime.max.replace(tzinfo=UTC)


@dataclass
class MGrant:
    seq: int
    remaining: int
    expires_at: datetime | None
    expired: bool = False

    def order(self) -> tuple:
        return (self.expires_at or NEVER, self.seq)


@dataclass
class MHold:
    id: str
    amount: int
    allocations: list[tuple[MGrant, int]] = field(default_factory=list)
    status: str = "active"


@dataclass
class MCharge:
    tx_id: int
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

    def close(self) -> None:
        self.run(self.db.close())
        self.run(self.client.aclose())
        self.run(self._ctx.__aexit__(None, None, None))
        self.loop.close()


amounts = st.integers(min_value=1, max_value=20_000)


def ku(milli: int) -> float | int:
    return milli // 1000 if milli % 1000 == 0 else milli / 1000


class LedgerMachine(RuleBasedStateMachine):
    harness: Harness

    def __init__(self) -> None:
        super().__init__()
        self.seq = itertools.count()
        self.grants: list[MGrant] = []
        self.holds: list[MHold] = []
        self.charges: list[MCharge] = []
        self.user = f"model-{uuid.uuid4().hex[:12]}"

    @initialize()
    def open_account(self) -> None:
        r = self.harness.post(
            "/v1/ledger/accounts", {"user_id": self.user, "welcome": False}, headers=operator()
        )
        assert r.status_code == 201

    # --- the model's rules -------------------------------------------------

    def spendable(self) -> list[MGrant]:
        return sorted(
            (g for g in self.grants if not g.expired and g.remaining > 0), key=MGrant.order
        )

    def available(self) -> int:
        return sum(g.remaining for g in self.grants if not g.expired)

    def held(self) -> int:
        return sum(h.amount for h in self.holds if h.status == "active")

    def draw(self, amount: int) -> list[tuple[MGrant, int]]:
        taken = []
        for g in self.spendable():
            take = min(g.remaining, amount)
            g.remaining -= take
            taken.append((g, take))
            amount -= take
            if amount == 0:
                break
        assert amount == 0
        return taken

    def give_back(self, hold: MHold, amount: int) -> None:
        for g, allocated in sorted(hold.allocations, key=lambda a: a[0].order(), reverse=True):
            give = min(allocated, amount)
            g.remaining += give
            amount -= give
            if amount == 0:
                break

    # --- rules ---------------------------------------------------------------

    @rule(amount=amounts, days=st.one_of(st.none(), st.integers(1, 60)))
    def grant(self, amount: int, days: int | None) -> None:
        expires = datetime.now(UTC) + timedelta(days=days) if days else None
        r = self.harness.post(
            "/v1/ledger/grants",
            {
                "user_id": self.user,
                "amount": ku(amount),
                "source": "promo",
                "expires_at": expires.isoformat() if expires else None,
            },
            headers={**operator(), "Idempotency-Key": uuid.uuid4().hex},
        )
        assert r.status_code == 201, r.text
        self.grants.append(MGrant(next(self.seq), amount, expires))

    @rule(amount=amounts)
    def debit(self, amount: int) -> None:
        r = self.harness.post("/v1/ledger/debits", {"user_id": self.user, "amount": ku(amount)})
        if amount <= self.available():
            assert r.status_code == 201, r.text
            self.draw(amount)
            self.charges.append(MCharge(r.json()["transaction_id"], amount))
        else:
            assert r.status_code == 402, r.text
            assert r.json()["error"]["detail"]["available"] == ku(self.available())

    @rule(amount=amounts)
    def reserve(self, amount: int) -> None:
        r = self.harness.post("/v1/ledger/holds", {"user_id": self.user, "amount": ku(amount)})
        if amount <= self.available():
            assert r.status_code == 201, r.text
            self.holds.append(MHold(r.json()["hold"]["id"], amount, self.draw(amount)))
        else:
            assert r.status_code == 402, r.text

    @precondition(lambda self: self.holds)
    @rule(data=st.data())
    def capture(self, data) -> None:
        hold = data.draw(st.sampled_from(self.holds))
        amount = data.draw(st.integers(1, hold.amount + 500))
        r = self.harness.post(f"/v1/ledger/holds/{hold.id}/capture", {"amount": ku(amount)})
        if hold.status == "expired":
            assert r.status_code == 409 and r.json()["error"]["code"] == "hold_expired"
        elif hold.status != "active":
            assert r.status_code in (200, 409), r.text
        elif amount > hold.amount:
            assert r.status_code == 422, r.text
        else:
            assert r.status_code == 200, r.text
            hold.status = "captured"
            self.give_back(hold, hold.amount - amount)
            self.charges.append(MCharge(r.json()["transaction_id"], amount))

    @precondition(lambda self: self.holds)
    @rule(data=st.data())
    def release(self, data) -> None:
        hold = data.draw(st.sampled_from(self.holds))
        r = self.harness.post(f"/v1/ledger/holds/{hold.id}/release")
        if hold.status == "active":
            assert r.status_code == 200, r.text
            hold.status = "released"
            self.give_back(hold, hold.amount)
        elif hold.status == "captured":
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
            self.grants.append(MGrant(next(self.seq), amount, None))

    @precondition(lambda self: any(g.expires_at and not g.expired for g in self.grants))
    @rule(data=st.data())
    def expire_grant(self, data) -> None:
        grant = data.draw(
            st.sampled_from([g for g in self.grants if g.expires_at and not g.expired])
        )
        # The grant's expiry instant passes: everything with that instant expires.
        past = datetime.now(UTC) - timedelta(seconds=1)
        self.harness.run(
            self.harness.db.execute(
                "UPDATE ledger.grants SET expires_at = $3 WHERE user_id = $1 AND expires_at = $2",
                self.user,
                grant.expires_at,
                past,
            )
        )
        for g in self.grants:
            if g.expires_at == grant.expires_at:
                g.expired = True
                g.expires_at = past

    @precondition(lambda self: any(h.status == "active" for h in self.holds))
    @rule(data=st.data())
    def expire_hold(self, data) -> None:
        hold = data.draw(st.sampled_from([h for h in self.holds if h.status == "active"]))
        self.harness.run(
            self.harness.db.execute(
                "UPDATE ledger.holds SET expires_at = now() - interval '1 second'"
                " WHERE id = $1::uuid",
                hold.id,
            )
        )
        hold.status = "expired"
        self.give_back(hold, hold.amount)

    @rule()
    def run_expiry_jobs(self) -> None:
        self.harness.run(self.harness.db.execute("SELECT ledger.expire_holds(100)"))
        self.harness.run(self.harness.db.execute("SELECT ledger.expire_grants(100)"))

    @invariant()
    def balance_matches_model(self) -> None:
        r = self.harness.run(
            self.harness.client.get(
                "/v1/ledger/balance", params={"user_id": self.user}, headers=operator()
            )
        )
        if r.status_code == 404:  # before initialize
            return
        body = r.json()
        assert body["available"] == ku(self.available()), (body, self.available())
        assert body["held"] == ku(self.held()), (body, self.held())

    def teardown(self) -> None:
        assert self.harness.run(verify(self.harness.dsn)) == []


@pytest.fixture(scope="module")
def harness(ku_database_url):
    h = Harness(ku_database_url)
    yield h
    h.close()


def test_ledger_matches_model(harness):
    LedgerMachine.harness = harness
    run = LedgerMachine.TestCase
    run.settings = settings(
        max_examples=int(os.environ.get("KU_MODEL_EXAMPLES", "30")),
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    run().runTest()
