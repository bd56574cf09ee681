"""Platform credit pools and alerts, in-process against the real database and Redis."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from services.enhancement.providers import Provider
from services.enhancement.repository import Repository
from services.enhancement.service import ALERT_TOPIC, Enhancer, next_period_start, period_of
from services.kit.breaker import CircuitBreaker
from services.kit.errors import Conflict
from services.kit.outbox import decode_event, stream_name
from tests.enhancement.helpers import insert_task


async def allowance_rows(e: Enhancer, *users: str) -> dict[tuple[str, str], tuple[int, int, Any]]:
    """The ledger's allowances of these users: (user, period) -> (granted, used, end)."""
    async with e.uow() as session:
        rows = await session.execute(
            text(
                "SELECT user_id, period, granted, used, expires_at FROM ledger.allowances"
                " WHERE user_id = ANY(:u) AND kind = 'enhancement'"
            ),
            {"u": list(users)},
        )
        return {(r.user_id, r.period): (r.granted, r.used, r.expires_at) for r in rows}


async def grant_entries(e: Enhancer, user: str) -> list[tuple[str, int]]:
    async with e.uow() as session:
        rows = await session.execute(
            text(
                "SELECT period, granted_delta FROM ledger.allowance_entries"
                " WHERE user_id = :u AND entry = 'grant' ORDER BY id"
            ),
            {"u": user},
        )
        return [(r.period, r.granted_delta) for r in rows]


def add_provider(e: Enhancer, cost_milli: int) -> str:
    """A provider of this test only (pools are keyed by provider name)."""
    name = f"p{uuid.uuid4().hex[:10]}"
    e.providers[name] = Provider(e.http, "http://127.0.0.1:9", "k", cost_milli)
    e.providers[name].name = name
    e.breakers[name] = CircuitBreaker(e.redis, name, prefix=e.settings.bus_prefix)
    return name


async def consume(e: Enhancer, provider: str, task_id: uuid.UUID, call: str = "c1") -> None:
    async with e.uow() as session:
        await e.consume_pool(
            Repository(session), provider, e.providers[provider].cost_milli, task_id, call
        )


async def alerts(e: Enhancer, provider: str) -> list[dict]:
    async with e.uow() as session:
        rows = await Repository(session).alerts(500, "pool_low")
    return [a for a in rows if a["subject"] == provider]


async def emitted(e: Enhancer, subject: str, kind: str = "pool_low") -> list[dict]:
    """The `enhancement.alert` events about `subject`, wherever they are now: still in the
    outbox, or already relayed to the service's stream (a running suite's relay)."""
    async with e.uow() as session:
        rows = await session.execute(
            text("SELECT payload FROM enhancement.outbox WHERE topic = :t"), {"t": ALERT_TOPIC}
        )
        payloads = list(rows.scalars())
    for _, fields in await e.redis.xrange(stream_name(e.settings.bus_prefix, "enhancement")):
        event = decode_event(fields)
        if event["topic"] == ALERT_TOPIC:
            payloads.append(event["payload"])
    unique = {p["alert_id"]: p for p in payloads if (p["subject"], p["kind"]) == (subject, kind)}
    return [unique[k] for k in sorted(unique)]


async def unhealthy(e: Enhancer, provider: str) -> list[dict]:
    async with e.uow() as session:
        rows = await Repository(session).alerts(500, "provider_unhealthy")
    return [a for a in rows if a["subject"] == provider]


async def pool(e: Enhancer, provider: str) -> dict:
    async with e.uow() as session:
        row = await Repository(session).pool(provider)
    assert row is not None
    return row


class TestPools:
    async def test_consumption_is_exact_and_idempotent(self, enhancer: Enhancer):
        name = add_provider(enhancer, 20_000)
        await enhancer.refill(name, 1_000_000, "r1")
        task = uuid.uuid4()
        await consume(enhancer, name, task, "provider-task-1")
        await consume(enhancer, name, task, "provider-task-1")  # the same call: no second charge
        row = await pool(enhancer, name)
        assert row["balance_milli"] == 980_000 and row["consumed_milli"] == 20_000
        await consume(enhancer, name, task, "provider-task-2")  # a second call of the task
        row = await pool(enhancer, name)
        assert row["balance_milli"] == 960_000 and row["consumed_milli"] == 40_000

    async def test_refill_is_idempotent_by_reference(self, enhancer: Enhancer):
        name = add_provider(enhancer, 20_000)
        await enhancer.refill(name, 500_000, "same")
        await enhancer.refill(name, 500_000, "same")
        assert (await pool(enhancer, name))["balance_milli"] == 500_000
        with pytest.raises(Conflict):
            await enhancer.refill(name, 700_000, "same")

    async def test_one_alert_per_crossing(self, enhancer: Enhancer):
        name = add_provider(enhancer, 100_000)
        await enhancer.refill(name, 1_000_000, "a")  # level 1000 credits; 20 % = 200
        for _ in range(7):  # 1000 -> 300: above both thresholds
            await consume(enhancer, name, uuid.uuid4())
        assert await alerts(enhancer, name) == []
        await consume(enhancer, name, uuid.uuid4())  # 200: not below 20 % yet
        assert await alerts(enhancer, name) == []
        await consume(enhancer, name, uuid.uuid4())  # 100: crossed
        await consume(enhancer, name, uuid.uuid4())  # 0: still the same crossing
        assert await enhancer.check_thresholds() >= 0  # the 15-minute job adds nothing
        [alert] = await alerts(enhancer, name)
        assert alert["detail"]["auto_refill_requested"] is True
        [event] = await emitted(enhancer, name)  # stored and emitted, once
        assert (event["alert_id"], event["kind"]) == (alert["id"], "pool_low")
        await enhancer.refill(name, 1_000_000, "b")  # back above: the next crossing alerts
        assert len(await alerts(enhancer, name)) == 1
        for _ in range(10):
            await consume(enhancer, name, uuid.uuid4())
        assert len(await alerts(enhancer, name)) == 2
        assert len(await emitted(enhancer, name)) == 2


class TestAlerts:
    async def test_an_alert_is_emitted_and_logged(self, enhancer: Enhancer, caplog):
        name = add_provider(enhancer, 10_000)
        await enhancer.refill(name, 105_000, "a")
        with caplog.at_level(logging.WARNING, logger="ku.enhancement"):
            await consume(enhancer, name, uuid.uuid4())  # 95 credits: below 100
        [alert] = await alerts(enhancer, name)
        [event] = await emitted(enhancer, name)
        assert event == {
            "alert_id": alert["id"],
            "kind": "pool_low",
            "subject": name,
            "message": alert["message"],
            "detail": alert["detail"],
            "created_at": alert["created_at"].isoformat(),
        }
        [record] = [r for r in caplog.records if getattr(r, "ctx", {}).get("alert") == event]
        assert record.levelno == logging.WARNING

    async def test_provider_unhealthy_once_per_breaker_opening(self, enhancer: Enhancer):
        name = add_provider(enhancer, 10_000)
        breaker = enhancer.breakers[name]
        for _ in range(breaker.failure_threshold):
            await breaker.record_failure()
        assert (await breaker.state()).state == "open"
        assert await enhancer.check_thresholds() >= 1
        await enhancer.check_thresholds()  # still open: the same crossing
        await enhancer._provider_failed(name)  # fails again while open: the same crossing
        [first] = await unhealthy(enhancer, name)
        events = await emitted(enhancer, name, "provider_unhealthy")
        assert [e["alert_id"] for e in events] == [first["id"]]

        await breaker.record_success()  # closed again
        await enhancer.check_thresholds()
        assert len(await unhealthy(enhancer, name)) == 1
        for _ in range(breaker.failure_threshold - 1):
            await enhancer._provider_failed(name)
        assert len(await unhealthy(enhancer, name)) == 1  # not open yet
        await enhancer._provider_failed(name)  # opens: a new crossing, alerted at once
        await enhancer.check_thresholds()
        assert len(await unhealthy(enhancer, name)) == 2
        assert len(await emitted(enhancer, name, "provider_unhealthy")) == 2

    async def test_absolute_threshold_of_100_credits(self, enhancer: Enhancer):
        name = add_provider(enhancer, 10_000)
        await enhancer.refill(name, 105_000, "a")
        await consume(enhancer, name, uuid.uuid4())  # 95 credits left: below 100
        assert len(await alerts(enhancer, name)) == 1

    async def test_empty_pool_leaves_the_chain(self, enhancer: Enhancer):
        rich, poor = add_provider(enhancer, 20_000), add_provider(enhancer, 10_000)
        await enhancer.refill(rich, 1_000_000, "a")
        await enhancer.refill(poor, 10_000, "a")
        mine = {rich, poor}
        chain = [p.name for p in await enhancer.chain() if p.name in mine]
        assert chain == [poor, rich]  # cheapest first
        await consume(enhancer, poor, uuid.uuid4())  # now at zero
        chain = [p.name for p in await enhancer.chain() if p.name in mine]
        assert chain == [rich]

    async def test_open_breaker_sorts_last_or_out(self, enhancer: Enhancer):
        cheap, dear = add_provider(enhancer, 10_000), add_provider(enhancer, 30_000)
        for name in (cheap, dear):
            await enhancer.refill(name, 1_000_000, "a")
        for _ in range(enhancer.breakers[cheap].failure_threshold):
            await enhancer.breakers[cheap].record_failure()
        chain = [p.name for p in await enhancer.chain() if p.name in {cheap, dear}]
        assert chain == [dear, cheap]  # health before cost; the open one is refused later
        assert not await enhancer.breakers[cheap].allow()


class TestPricing:
    def test_price_by_type_and_size(self, enhancer: Enhancer):
        # Defaults: background 3000 milli-Ku, x 150 % above 4,000,000 pixels.
        assert enhancer.price_milli("background", 2000, 2000) == 3000  # at the limit
        assert enhancer.price_milli("background", 2001, 2000) == 4500  # above it
        assert enhancer.price_milli("lighting", 4001, 1000) == 3000


class TestIncludedEnhancements:
    async def test_a_failed_recording_returns_the_draw(
        self, ledger_enhancer: Enhancer, monkeypatch: pytest.MonkeyPatch
    ):
        """As `_record_paid` releases its hold: the unit drawn for a task that could not
        be recorded comes back at once (the draw's TTL is only the last line)."""
        e = ledger_enhancer
        user = f"u{uuid.uuid4().hex[:12]}"
        async with e.uow() as session:
            await Repository(session).set_tier(user, "plus")

        async def refused(self: Repository, values: dict[str, Any]) -> None:
            raise RuntimeError("the task's row could not be written")

        monkeypatch.setattr(Repository, "insert_task", refused)
        task_id = uuid.uuid4()
        now = datetime.now(UTC)
        with pytest.raises(RuntimeError):
            await e._record_included({"id": task_id}, user, now)
        async with e.uow() as session:
            status = (
                await session.execute(
                    text("SELECT status FROM ledger.allowance_draws WHERE reference = :r"),
                    {"r": f"enhancement:{task_id}"},
                )
            ).scalar_one()
        assert status == "returned"
        assert await allowance_rows(e, user) == {
            (user, period_of(now)): (10, 0, next_period_start(now))
        }

    async def test_the_90_percent_alert_once_per_user_and_month(self, enhancer: Enhancer):
        user = f"u{uuid.uuid4().hex[:12]}"
        async with enhancer.uow() as session:
            repo = Repository(session)
            # 9 of 10 is 90 %: not over it; 10 of 10 is, once per month however often.
            for period, used in (("2000-01", 9), ("2000-01", 10), ("2000-01", 10), ("2000-02", 10)):
                await enhancer._allowance_alert(repo, user, period, {"used": used}, 10)
            rows = await repo.alerts(500, "allowance_high")
        assert sorted(a["detail"]["period"] for a in rows if a["subject"] == user) == [
            "2000-01",
            "2000-02",
        ]


class TestScheduledJobs:
    async def test_the_1st_grants_the_new_month_in_the_ledger(self, ledger_enhancer: Enhancer):
        """The monthly job, "on the 1st of next month": a grant in the ledger for each user
        whose tier includes enhancements; this month's grant, with its unused units,
        expires there at the month's end and nothing of it carries over."""
        e = ledger_enhancer
        plus, free, pro = (f"u{uuid.uuid4().hex[:12]}" for _ in range(3))
        now = datetime.now(UTC)
        this, first = period_of(now), next_period_start(now)
        after = period_of(first)
        async with e.uow() as session:
            repo = Repository(session)
            await repo.set_tier(plus, "plus")
            await repo.set_tier(free, "free")
            await repo.record_subscription(
                f"sub_{uuid.uuid4().hex[:10]}",
                pro,
                "pro_monthly",
                "active",
                first + timedelta(days=30),
            )
        for _ in range(3):  # this month: 3 of Plus's 10 (the first draw granted them)
            assert await e._draw(plus, this, uuid.uuid4(), 10) is not None

        assert await e.monthly_reset(now=first) >= 2
        assert await allowance_rows(e, plus, free, pro) == {
            (plus, this): (10, 3, first),
            (plus, after): (10, 0, next_period_start(first)),
            (pro, after): (25, 0, next_period_start(first)),
        }
        await e.monthly_reset(now=first)  # again: the grant is "at least 10", once
        assert await grant_entries(e, plus) == [(this, 10), (after, 10)]

        # The 1st comes: this month's grant expires (its end moved into the past, as time
        # passing would); its 7 unused units are gone, not added to next month's 10.
        async with e.uow() as session:
            await session.execute(
                text(
                    "UPDATE ledger.allowances SET expires_at = clock_timestamp()"
                    " - interval '1 second' WHERE user_id = :u AND period = :p"
                ),
                {"u": plus, "p": this},
            )
        assert await e._draw(plus, this, uuid.uuid4(), 10) is None  # nothing left of it
        nxt = await e.allowance(plus, now=first)
        assert (nxt["included"], nxt["granted"], nxt["used"], nxt["remaining"]) == (10, 10, 0, 10)

    async def test_daily_summary_counts_the_day_once(self, enhancer: Enhancer):
        from datetime import UTC, datetime

        day = datetime(2001, 3, 4, 12, tzinfo=UTC)
        await insert_task(enhancer, status="completed", charged_milli=2000, created_at=day)
        await insert_task(enhancer, status="failed", created_at=day)
        summary = await enhancer.daily_summary(datetime(2001, 3, 5, 1, tzinfo=UTC))
        assert summary["day"] == "2001-03-04"
        assert (summary["completed"], summary["failed"], summary["charged_milli"]) == (1, 1, 2000)
        async with enhancer.uow() as session:
            assert not await Repository(session).save_summary("2001-03-04", {})  # kept once
