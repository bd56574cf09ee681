"""ku_client against a real suite, through the gateway: every operation it wraps, its
typed errors, idempotent retries after a lost answer, and 429 with Retry-After."""

from __future__ import annotations

import asyncio
import base64
import io
import time

import httpx
import pytest
from ku_client import (
    AsyncKuClient,
    BatchItem,
    Charge,
    Conflict,
    ConnectionFailed,
    EnhancementTask,
    Estimate,
    Generation,
    HoldResult,
    InsufficientCredits,
    KuClient,
    Model,
    NotFound,
    PermissionDenied,
    RateLimited,
    RetryPolicy,
    StorageFull,
    ValidationFailed,
)
from PIL import Image

from tests.client.conftest import BURST_LIMIT
from tests.client.proxy import DroppingProxy, in_a_thread
from tests.ku_suite import Ku

pytestmark = pytest.mark.e2e

WELCOME = 50_000  # milli-Ku


class TestLedger:
    def test_balance_hold_capture_release_debit_refund(self, ku: Ku, app_key: str):
        user = ku.user()
        with KuClient(ku.url, api_key=app_key) as client:
            assert client.balance(user).available_milli == WELCOME

            held = client.reserve(user, 12_500, reference="job-1", ttl_seconds=60)
            assert held.hold.status == "active" and held.hold.amount_milli == 12_500
            assert held.available_milli == WELCOME - 12_500 and held.held_milli == 12_500
            done = client.capture(held.hold.id, 9_250)
            assert done.hold.status == "captured" and done.hold.captured_milli == 9_250
            assert done.available_milli == WELCOME - 9_250 and done.held_milli == 0
            assert client.hold(held.hold.id).status == "captured"

            other = client.reserve(user, 1_000)
            assert client.release(other.hold.id).available_milli == WELCOME - 9_250

            charge = client.debit(user, 750, reference="img-1", description="one image")
            assert charge.available_milli == WELCOME - 10_000 and not charge.replayed
            back = client.refund(charge.transaction_id, 250)
            assert back.available_milli == WELCOME - 9_750

            page = client.transactions(user, limit=3)
            assert len(page.items) == 3 and page.next_cursor is not None
            assert page.items[0].kind == "refund" and page.items[0].delta_milli == 250
            rest = client.transactions(user, cursor=page.next_cursor)
            kinds = [t.kind for t in page.items + rest.items]
            assert kinds.count("grant") == 1 and "capture" in kinds

    def test_typed_errors(self, ku: Ku, app_key: str):
        user = ku.user()
        with KuClient(ku.url, api_key=app_key) as client:
            with pytest.raises(InsufficientCredits) as no_money:
                client.debit(user, WELCOME + 1)
            assert no_money.value.status == 402 and no_money.value.request_id
            client.debit(user, 1_000, idempotency_key="same-key")
            with pytest.raises(Conflict):
                client.debit(user, 2_000, idempotency_key="same-key")
            held = client.reserve(user, 1_000)
            client.release(held.hold.id)
            with pytest.raises(Conflict):
                client.capture(held.hold.id)
            with pytest.raises(NotFound):
                client.balance("100000000000000000001")
            with pytest.raises(ValidationFailed):
                client.debit(user, 0)
            with pytest.raises(PermissionDenied):  # an app key cannot grant
                client.grant(user, 5_000, "promo", description="x")
            assert client.balance(user).available_milli == WELCOME - 1_000

    def test_admin_grant(self, ku: Ku, admin_key: str):
        user = ku.user()
        with KuClient(ku.url, api_key=admin_key) as admin:
            granted = admin.grant(
                user, 2_500, "promo", description="launch week", reason="launch promo"
            )
            assert granted.available_milli == WELCOME + 2_500
            assert admin.balance(user).by_source["promo"] == 2_500


class TestBatch:
    def test_per_item_results_and_a_retried_batch(self, ku: Ku, app_key: str):
        user = ku.user()
        with KuClient(ku.url, api_key=app_key) as client:
            items = [
                BatchItem.debit(user, 1_500, description="1,500 tokens"),
                BatchItem.hold(user, 2_000, ttl_seconds=60),
                BatchItem.debit(user, WELCOME * 2),  # more than there is: this item alone
                BatchItem.capture("00000000-0000-0000-0000-000000000000"),
            ]
            result = client.batch(items, idempotency_key="batch-1")
            assert not result.replayed and (result.succeeded, result.failed) == (2, 2)
            debit, hold, broke, unknown = result.items
            assert [i.index for i in result.items] == [0, 1, 2, 3]
            assert isinstance(debit.value, Charge) and debit.value.amount_milli == 1_500
            assert isinstance(hold.value, HoldResult) and hold.value.hold.amount_milli == 2_000
            assert isinstance(broke.error, InsufficientCredits) and broke.value is None
            assert broke.status == 402 and not broke.ok
            assert isinstance(unknown.error, NotFound) and unknown.error.code == "hold_not_found"

            again = client.batch(items, idempotency_key="batch-1")  # the same batch, retried
            assert again.replayed and (again.succeeded, again.failed) == (2, 2)
            assert client.balance(user).available_milli == WELCOME - 3_500

            # The debit's key with another amount: 409 for that item, not the batch.
            reused = BatchItem.debit(user, 9, idempotency_key=items[0].idempotency_key)
            later = client.batch([reused, BatchItem.release(hold.value.hold.id)])
            conflict, released = later.items
            assert isinstance(conflict.error, Conflict)
            assert conflict.error.code == "idempotency_key_reused"
            assert isinstance(released.value, HoldResult)
            assert released.value.hold.status == "released"
            assert client.balance(user).available_milli == WELCOME - 1_500
            with pytest.raises(Conflict):  # the batch's own key with other operations
                client.batch([BatchItem.debit(user, 1)], idempotency_key="batch-1")
            with pytest.raises(ValueError):
                client.batch([])

    async def test_async_batch_across_users(self, ku: Ku, app_key: str):
        users = [ku.user(), ku.user()]
        async with AsyncKuClient(ku.url, api_key=app_key) as client:
            result = await client.batch(
                [BatchItem.debit(u, 250 * (n + 1)) for n, u in enumerate(users)]
            )
            assert result.succeeded == 2 and all(i.ok for i in result.items)
            for n, user in enumerate(users):
                assert (await client.balance(user)).available_milli == WELCOME - 250 * (n + 1)


class TestWorkspace:
    def test_save_list_get_and_storage_full(self, ku: Ku, app_key: str):
        user = ku.user()
        with KuClient(ku.url, api_key=app_key) as client:
            saved = client.save_project("Chapter one", "It was a dark night.", user_id=user)
            assert saved.user_id == user and saved.size_bytes >= len("It was a dark night.")
            again = client.project(saved.code, user_id=user)
            assert again.content == "It was a dark night." and again.title == "Chapter one"
            listed = client.projects(user_id=user)
            assert [p.code for p in listed.items] == [saved.code]
            with pytest.raises(StorageFull) as full:  # the default quota is 1 MB
                client.save_project("Too big", "x" * 1_100_000, user_id=user)
            assert full.value.status == 413 and full.value.detail
            assert len(client.projects(user_id=user).items) == 1


class TestRetries:
    async def test_lost_answer_to_a_debit_charges_once(self, ku: Ku, app_key: str):
        """The first answer never reaches the client; its retry carries the same key."""
        user = ku.user()
        async with DroppingProxy(ku.url) as proxy:
            async with AsyncKuClient(proxy.url, api_key=app_key) as client:
                charge = await client.debit(user, 4_000, description="lost answer")
                assert proxy.dropped == 1 and proxy.connections == 2
                assert charge.replayed  # the server had done it; the retry replayed it
                assert charge.available_milli == WELCOME - 4_000
        with KuClient(ku.url, api_key=app_key) as direct:
            assert direct.balance(user).available_milli == WELCOME - 4_000
            debits = [t for t in direct.transactions(user).items if t.kind == "debit"]
            assert len(debits) == 1 and debits[0].amount_milli == 4_000

    def test_lost_answer_to_a_blocking_debit_charges_once(self, ku: Ku, app_key: str):
        """The same with `KuClient` (the proxy on its own loop in a thread)."""
        user = ku.user()
        with in_a_thread(DroppingProxy(ku.url)) as proxy:
            with KuClient(proxy.url, api_key=app_key) as client:
                charge = client.debit(user, 2_500, description="lost answer, blocking")
                assert proxy.dropped == 1 and proxy.connections == 2
                assert charge.replayed and charge.available_milli == WELCOME - 2_500
        with KuClient(ku.url, api_key=app_key) as direct:
            assert direct.balance(user).available_milli == WELCOME - 2_500
            debits = [t for t in direct.transactions(user).items if t.kind == "debit"]
            assert len(debits) == 1 and debits[0].amount_milli == 2_500

    async def test_without_retries_the_lost_answer_is_an_error(self, ku: Ku, app_key: str):
        user = ku.user()
        async with DroppingProxy(ku.url) as proxy:
            no_retry = RetryPolicy(max_retries=0)
            async with AsyncKuClient(proxy.url, api_key=app_key, retry=no_retry) as client:
                with pytest.raises(ConnectionFailed):
                    await client.debit(user, 1_000)
                # The work was done: a second call with a new key charges again, which is
                # exactly what reusing the key prevents.
        with KuClient(ku.url, api_key=app_key) as direct:
            assert direct.balance(user).available_milli == WELCOME - 1_000

    def test_429_waits_for_retry_after(self, ku: Ku):
        burst_key = ku.key("burst", "ledger:read,users:any")
        user = ku.user()
        statuses: list[int] = []

        def record(response: httpx.Response) -> None:
            statuses.append(response.status_code)

        transport = httpx.HTTPTransport()
        with KuClient(ku.url, api_key=burst_key, transport=transport) as client:
            client._http.event_hooks["response"].append(record)
            for _ in range(BURST_LIMIT + 2):
                assert client.balance(user).available_milli == WELCOME
        assert 429 in statuses and statuses.count(200) == BURST_LIMIT + 2
        with KuClient(ku.url, api_key=burst_key, retry=RetryPolicy(max_retries=0)) as impatient:
            with pytest.raises(RateLimited) as limited:
                for _ in range(BURST_LIMIT + 1):
                    impatient.balance(user)
            assert limited.value.retry_after is not None and limited.value.retry_after > 0


class TestEvents:
    async def test_credits_changed_arrive_on_the_stream(self, ku: Ku, app_key: str):
        user = ku.user()
        async with AsyncKuClient(ku.url, api_key=app_key) as client:
            received: list[dict[str, object]] = []

            async def listen() -> None:
                # The welcome grant's event may come first (the worker relays it).
                async for event in client.events(user):
                    if event.event == "credits.changed" and event.data.get("app") == "imagegene":
                        received.append(event.data)
                        return

            listener = asyncio.create_task(listen())
            await asyncio.sleep(0.5)  # let the stream subscribe before the charge
            await client.debit(user, 3_000)
            await asyncio.wait_for(listener, timeout=15)
        [change] = received
        assert change["user_id"] == user and change["delta"] == -3
        assert change["available"] == 47


def image_data_url(size: int = 64) -> str:
    """A small PNG as a data: URL, the way ImageGene saves an image to the workspace."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (40, 90, 160)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def creative_key(ku: Ku) -> str:
    """What Penora holds: the ledger and workspace, generation and enhancement."""
    scopes = "ledger:read,ledger:write,workspace:read,workspace:write,generate,enhance"
    return ku.key("penora", scopes)


class TestGeneration:
    def test_models_estimate_and_text_charged_once(self, ku: Ku, creative_key: str):
        user = ku.user()
        with KuClient(ku.url, api_key=creative_key) as client:
            catalog = client.models()
            assert catalog and all(isinstance(m, Model) for m in catalog)
            first = catalog[0]
            assert first.offline and first.price_per_100_words_milli > 0  # the offline provider

            priced = client.estimate(200)
            assert isinstance(priced, Estimate) and priced.model == first.id
            assert priced.cost_milli == 2 * first.price_per_100_words_milli
            assert priced.max_cost_milli >= priced.cost_milli

            done = client.generate_text("Open a mystery set in Lisbon.", user_id=user, max_words=60)
            assert isinstance(done, Generation) and done.status == "completed"
            assert done.offline and 0 < done.words <= 60 and done.text
            assert 0 < done.cost_milli <= done.held_milli
            assert client.balance(user).available_milli == WELCOME - done.cost_milli
            with pytest.raises(ValidationFailed):
                client.estimate(0)

    async def test_async_estimate_names_the_model(self, ku: Ku, creative_key: str):
        async with AsyncKuClient(ku.url, api_key=creative_key) as client:
            catalog = await client.models()
            last = catalog[-1]
            priced = await client.estimate(100, model=last.id)
            assert priced.model == last.id
            assert priced.cost_milli == last.price_per_100_words_milli


class TestEnhancement:
    def test_submit_replay_and_follow_a_task_to_its_end(self, ku: Ku, creative_key: str):
        user = ku.user()
        with KuClient(ku.url, api_key=creative_key) as client:
            photo = client.save_project(
                "Harbour at dusk", image_data_url(), user_id=user, project_type="image"
            )
            task = client.enhance(
                "lighting", user_id=user, project_code=photo.code, idempotency_key=f"enh-{user}"
            )
            assert isinstance(task, EnhancementTask) and not task.replayed
            assert task.user_id == user and task.enhancement_type == "lighting"
            again = client.enhance(
                "lighting", user_id=user, project_code=photo.code, idempotency_key=f"enh-{user}"
            )
            assert again.replayed and again.id == task.id  # one task, held once

            for _ in range(240):  # the worker runs it (no provider here: the local enhancer)
                seen = client.enhancement_task(task.id)
                if seen.done and seen.settled:
                    break
                time.sleep(0.25)
            else:
                raise AssertionError(f"task still {seen.status} after 60 s")
            assert seen.status == "completed" and seen.degraded and seen.result_url
            balance = client.balance(user)
            assert balance.held_milli == 0
            assert balance.available_milli == WELCOME - seen.charged_milli
            with pytest.raises(NotFound):
                client.enhancement_task("00000000-0000-0000-0000-000000000000")
