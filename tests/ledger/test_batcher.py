"""The group committer: one bad operation never fails its neighbours, and a batch
survives its connections being terminated."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from services.kit.db import plain_url
from services.kit.testing.plugin import asgi_client
from services.ledger import batcher
from services.ledger.batcher import GroupCommitter
from tests.ledger.helpers import penora

AUTH = {"user": "any", "owner": "app:penora", "holds": "*", "charges": "*"}


@pytest.fixture
async def pool(ku_database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(plain_url(ku_database_url), min_size=1, max_size=4)
    yield p
    await p.close()


async def open_users(pool: asyncpg.Pool, n: int, milli: int) -> list[str]:
    users = [f"batch-{uuid.uuid4().hex[:10]}" for _ in range(n)]
    committer = GroupCommitter(pool)
    for user in users:
        await committer.submit({"op": "open", "user_id": user, "amount": 0, "auth": AUTH})
        r = await committer.submit(
            {"op": "grant", "user_id": user, "amount": milli, "source": "promo", "auth": AUTH}
        )
        assert r["status"] == 201, r
    return users


def debit(user: str, milli: int, **extra: Any) -> dict[str, Any]:
    return {
        "op": "debit",
        "user_id": user,
        "amount": milli,
        "app": "penora",
        "auth": AUTH,
        "key": uuid.uuid4().hex,
        "scope": "test",
        "hash": "h",
        **extra,
    }


async def available(pool: asyncpg.Pool, user: str) -> int:
    return await pool.fetchval("SELECT ledger._available($1)", user)


class RecordingCommitter(GroupCommitter):
    """Records each `apply_batch` statement's users, and which ran at the same time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.running: list[set[str]] = []
        self.overlaps: list[set[str]] = []
        self.batches: list[list[str]] = []
        self.most_at_once = 0  # statements in flight at the same time, at most

    async def _execute(self, ops: list[bytes]) -> list[dict[str, Any]]:
        decoded = [orjson.loads(op) for op in ops]
        users = {op["user_id"] for op in decoded}
        for other in self.running:
            if users & other:
                self.overlaps.append(users & other)
        self.running.append(users)
        self.most_at_once = max(self.most_at_once, len(self.running))
        self.batches.append([op["key"] for op in decoded])
        try:
            return await super()._execute(ops)
        finally:
            self.running.remove(users)


class TestOneBatchPerUser:
    async def test_a_busy_user_waits_for_the_next_batch_in_order(self, pool):
        (hot,) = await open_users(pool, 1, 1_000_000)
        others = await open_users(pool, 8, 1_000_000)
        committer = RecordingCommitter(pool, max_ops=64, max_inflight=3)
        hot_ops = [debit(hot, 1) for _ in range(60)]
        other_ops = [debit(others[i % 8], 1) for i in range(40)]

        async def submit_later(op: dict[str, Any], delay: float) -> dict[str, Any]:
            await asyncio.sleep(delay)
            return await committer.submit(op)

        # Arriving over ~30 ms, as requests do: several batches are in flight at once.
        results = await asyncio.gather(
            *(submit_later(op, i * 0.0005) for i, op in enumerate(hot_ops)),
            *(submit_later(op, i * 0.0007) for i, op in enumerate(other_ops)),
        )
        assert [r["status"] for r in results] == [201] * 100, results
        assert committer.overlaps == []  # the hot user was never in two batches at once
        assert len(committer.batches) < 60  # ... so its debits shared statements
        hot_keys = [op["key"] for op in hot_ops]
        applied = [key for batch in committer.batches for key in batch if key in set(hot_keys)]
        assert applied == hot_keys  # in the order they came
        assert await available(pool, hot) == 1_000_000 - 60
        for user in others:
            assert await available(pool, user) == 1_000_000 - 5


class TestHowManyFlushers:
    async def test_what_arrives_during_a_batch_waits_for_the_next_one(self, pool, monkeypatch):
        # No stall in this test, however slow the machine: only the queue's length
        # could start a second flusher, and 40 debits never fill a batch of 64.
        monkeypatch.setattr(batcher, "STALL_SECONDS", 60.0)
        users = await open_users(pool, 40, 1_000_000)
        committer = RecordingCommitter(pool, max_ops=64, max_inflight=3)

        async def submit_later(user: str, delay: float) -> dict[str, Any]:
            await asyncio.sleep(delay)
            return await committer.submit(debit(user, 1))

        results = await asyncio.gather(
            *(submit_later(user, i * 0.0005) for i, user in enumerate(users))
        )
        assert [r["status"] for r in results] == [201] * 40, results
        assert committer.most_at_once == 1  # one statement at a time ...
        assert len(committer.batches) < 40  # ... each taking what queued meanwhile
        for user in users:
            assert await available(pool, user) == 1_000_000 - 1

    async def test_a_queue_longer_than_a_batch_runs_several(self, pool, monkeypatch):
        monkeypatch.setattr(batcher, "STALL_SECONDS", 60.0)
        users = await open_users(pool, 40, 1_000_000)
        committer = RecordingCommitter(pool, max_ops=8, max_inflight=3)
        results = await committer.submit_many([debit(user, 1) for user in users])
        assert [r["status"] for r in results] == [201] * 40, results
        assert committer.most_at_once > 1

    async def test_a_batch_stuck_on_a_lock_does_not_hold_up_other_users(self, pool):
        stuck, other = await open_users(pool, 2, 1_000_000)
        committer = GroupCommitter(pool, max_ops=64, max_inflight=3)
        async with pool.acquire() as holder:
            transaction = holder.transaction()
            await transaction.start()
            await holder.execute(
                "SELECT 1 FROM ledger.wallets WHERE user_id = $1 FOR UPDATE", stuck
            )
            waiting = asyncio.create_task(committer.submit(debit(stuck, 1)))
            await asyncio.sleep(batcher.STALL_SECONDS * 3)
            assert not waiting.done()  # its batch waits on the row lock
            result = await asyncio.wait_for(committer.submit(debit(other, 1)), 10)
            assert result["status"] == 201, result
            assert not waiting.done()
            await transaction.rollback()
        assert (await asyncio.wait_for(waiting, 10))["status"] == 201
        assert await available(pool, stuck) == 1_000_000 - 1
        assert await available(pool, other) == 1_000_000 - 1


class TestIsolation:
    async def test_a_poisoned_op_fails_alone_in_its_batch(self, pool):
        users = await open_users(pool, 6, 10_000)
        committer = GroupCommitter(pool, max_ops=64, max_inflight=1)
        ops = [debit(u, 1_000) for u in users[:4]]
        ops.insert(1, debit(users[4], 1_000, description="bad\u0000byte"))
        ops.insert(3, debit(users[5], 1_000, reference="lone \ud800 surrogate"))
        results = await asyncio.gather(*(committer.submit(op) for op in ops))
        statuses = [r["status"] for r in results]
        assert statuses == [201, 422, 201, 422, 201, 201], results
        assert {results[1]["error"]["code"], results[3]["error"]["code"]} == {"invalid_input"}
        for user in users[:4]:
            assert await available(pool, user) == 9_000
        for user in users[4:]:
            assert await available(pool, user) == 10_000

    async def test_500_debits_1_in_10_poisoned(self, ledger: httpx.AsyncClient, funded_user):
        users = [await funded_user(20) for _ in range(50)]

        async def send(i: int) -> httpx.Response:
            poisoned = i % 10 == 0
            return await ledger.post(
                "/v1/ledger/debits",
                json={
                    "user_id": users[i % 50],
                    "amount": 0.1,
                    "description": "x\u0000y" if poisoned else "clean",
                },
                headers={**penora(), "Idempotency-Key": uuid.uuid4().hex},
            )

        responses = await asyncio.gather(*(send(i) for i in range(500)))
        clean = [r for i, r in enumerate(responses) if i % 10]
        poisoned = [r for i, r in enumerate(responses) if not i % 10]
        assert {r.status_code for r in clean} == {201}
        assert {r.status_code for r in poisoned} == {422}
        assert all(r.json()["error"]["code"] for r in poisoned)

    async def test_a_lone_surrogate_over_http_is_a_json_422(self, ledger, funded_user):
        user = await funded_user(5)
        # Escaped in the JSON text: valid JSON, decoded to a str UTF-8 cannot encode.
        body = '{"user_id": "' + user + '", "amount": 1, "reference": "bad \\ud800"}'
        r = await ledger.post(
            "/v1/ledger/debits",
            content=body.encode(),
            headers={
                **penora(),
                "Idempotency-Key": uuid.uuid4().hex,
                "Content-Type": "application/json",
            },
        )
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"]


async def _backends(conn: asyncpg.Connection) -> set[int]:
    rows = await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid()"
    )
    return {r["pid"] for r in rows}


class TestTerminatedConnections:
    async def test_terminated_backends_mid_load_charge_once(self, ku_database_url, funded_user):
        from services.ledger.app import create_app

        users = [await funded_user(100) for _ in range(10)]
        admin_conn = await asyncpg.connect(plain_url(ku_database_url))
        before = await _backends(admin_conn)
        keys = [uuid.uuid4().hex for _ in range(300)]
        async with asgi_client(create_app()) as client:

            async def send(i: int) -> httpx.Response:
                return await client.post(
                    "/v1/ledger/debits",
                    json={"user_id": users[i % 10], "amount": 1},
                    headers={**penora(), "Idempotency-Key": keys[i]},
                )

            warm = await asyncio.gather(*(send(i) for i in range(20)))
            assert {r.status_code for r in warm} == {201}
            ours = await _backends(admin_conn) - before
            assert ours  # this app's own connections

            async def terminate() -> int:
                killed = 0
                await asyncio.sleep(0.05)
                for _ in range(3):
                    for pid in await _backends(admin_conn) - before:
                        killed += await admin_conn.fetchval("SELECT pg_terminate_backend($1)", pid)
                    await asyncio.sleep(0.05)
                return killed

            load, killed = await asyncio.gather(
                asyncio.gather(*(send(i) for i in range(20, 300))), terminate()
            )
            responses = [*warm, *load]
            assert killed > 0  # the load did meet terminated connections
            assert all(r.headers["content-type"].startswith("application/json") for r in responses)
            retryable = [i for i, r in enumerate(responses) if r.status_code >= 500]
            assert all(
                responses[i].json()["error"]["code"] == "ledger_unavailable" for i in retryable
            )
            assert {r.status_code for r in responses} <= {201, 503}
            # A retry with the same key settles every request, once.
            again = await asyncio.gather(*(send(i) for i in range(300)))
            assert {r.status_code for r in again} == {201}
            for i in range(300):
                if responses[i].status_code == 201:
                    assert (
                        again[i].json()["transaction_id"] == responses[i].json()["transaction_id"]
                    )
        for user in users:
            charged = await admin_conn.fetchval(
                "SELECT COUNT(*) FROM ledger.transactions WHERE user_id = $1 AND kind = 'debit'",
                user,
            )
            assert charged == 30
            assert await admin_conn.fetchval("SELECT ledger._available($1)", user) == 70_000
        await admin_conn.close()


class TestLockOrder:
    # The operation on user B that leads the batch, as credit goes out and comes back:
    # (its status, B's credit after it).
    KINDS = {"capture": (200, 9_500), "release": (200, 10_000), "refund": (201, 10_000)}

    @pytest.mark.parametrize("kind", list(KINDS))
    async def test_a_batch_locks_every_wallet_it_names_before_applying(self, pool, kind):
        """A batch takes its users' wallet locks first, in user order (migration 0007),
        whatever order its operations come in: here an operation on user B's hold or
        charge (keyed by the hold or the transaction, not by B) comes before a debit of
        user A, and B's wallet is held by someone else. The batch must already hold A's
        wallet while it waits for B's; batches taking their locks as their operations
        come could otherwise deadlock (a second lost to it)."""
        a, b = sorted(await open_users(pool, 2, 10_000))
        committer = GroupCommitter(pool)
        keys = {"auth": AUTH, "key": uuid.uuid4().hex, "scope": "test", "hash": "h"}
        if kind == "refund":
            charged = await committer.submit(debit(b, 1_000))
            assert charged["status"] == 201, charged
            tx = charged["body"]["transaction_id"]
            lead = {"op": "refund", "transaction_id": tx, "amount": 1_000, **keys}
        else:
            held = await committer.submit(
                {"op": "reserve", "user_id": b, "amount": 1_000, "app": "penora",
                 "ttl_seconds": 60, **keys, "key": uuid.uuid4().hex}
            )  # fmt: skip
            assert held["status"] == 201, held
            lead = {"op": kind, "hold_id": held["body"]["hold"]["id"], **keys}
            if kind == "capture":
                lead["amount"] = 500
        batch = orjson.dumps([lead, debit(a, 1_000)]).decode()
        async with pool.acquire() as blocker, pool.acquire() as batcher, pool.acquire() as probe:
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute("SELECT 1 FROM ledger.wallets WHERE user_id = $1 FOR UPDATE", b)
            applying = asyncio.create_task(
                batcher.fetchval("SELECT ledger.apply_batch($1::json)::text", batch)
            )
            pid = batcher.get_server_pid()
            for _ in range(200):  # until the batch waits for B's wallet
                waiting = await probe.fetchval(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
                )
                if waiting:
                    break
                await asyncio.sleep(0.01)
            assert waiting
            async with probe.transaction():
                with pytest.raises(asyncpg.LockNotAvailableError):
                    await probe.execute(
                        "SELECT 1 FROM ledger.wallets WHERE user_id = $1 FOR UPDATE NOWAIT", a
                    )
            await tx.rollback()
            results = orjson.loads(await applying)
        status, left = self.KINDS[kind]
        assert [r["status"] for r in results] == [status, 201], results
        assert await available(pool, a) == 9_000
        assert await available(pool, b) == left
