"""Submit through the gateway, real processes, fake providers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import uuid

import httpx
import pytest
from PIL import Image

from services.enhancement.service import Submission
from services.enhancement.storage import sign_link
from services.kit.principal import Principal, derived_secret, outgoing_header
from tests.enhancement.conftest import PROVIDER_COSTS, Enh
from tests.enhancement.fakes import RESULT

pytestmark = pytest.mark.e2e


def holds_of(journal: list[dict], kind: str) -> list[dict]:
    return [t for t in journal if t["kind"] == kind]


class TestSubmit:
    async def test_native_submit_completes_and_charges_once(self, enh: Enh):
        enh.reset_providers()
        user = await enh.new_user()
        before = await enh.balance(user)
        pools_before = await enh.pools()
        async with enh.client(enh.keys["imagegene"]) as gw:
            r = await gw.post(
                "/v1/enhancement/tasks",
                json={
                    "image_url": f"{enh.images.url}/image.png",
                    "enhancement_type": "lighting",
                    "prompt": "warm golden hour lighting",
                    "strength": 0.8,
                    "user_id": user,
                },
            )
            assert r.status_code == 202, r.text
            task_id = r.json()["id"]
            assert r.json()["status"] == "pending" and r.json()["price"] == 2
        task = await enh.wait(task_id)
        assert task["status"] == "completed", task
        assert task["provider"] == "nanobanana" and task["degraded"] is False
        assert task["charged"] == 2
        assert enh.providers["nanobanana"].submits == 1
        # The provider's pool paid for the one call, exactly, once.
        assert await enh.pool_calls(task_id) == [("nanobanana", PROVIDER_COSTS["nanobanana"])]
        pools = await enh.pools()
        assert pools_before["nanobanana"]["balance"] - pools["nanobanana"]["balance"] == 10
        assert pools["nanobanana"]["consumed"] - pools_before["nanobanana"]["consumed"] == 10
        async with enh.client(enh.keys["imagegene"]) as gw:
            r = await gw.get(task["result_url"])
            assert r.status_code == 200
            assert r.content == RESULT
            Image.open(io.BytesIO(r.content)).verify()
        after = await enh.balance(user)
        assert before["available"] - after["available"] == 2 and after["held"] == 0
        journal = await enh.journal(user)
        assert len(holds_of(journal, "reserve")) == 1
        [capture] = holds_of(journal, "capture")
        assert capture["amount"] == 2
        assert holds_of(journal, "release") == []

    async def test_large_image_is_priced_by_size(self, enh: Enh):
        enh.reset_providers()
        user = await enh.new_user()
        before = await enh.balance(user)
        big = io.BytesIO()
        Image.new("RGB", (2001, 2000), (30, 60, 90)).save(big, format="PNG")
        async with enh.client(enh.keys["imagegene"]) as gw:
            r = await gw.post(
                "/v1/enhancement/tasks",
                data={"enhancement_type": "background", "user_id": user},
                files={"image": ("big.png", big.getvalue(), "image/png")},
            )
        assert r.status_code == 202, r.text
        # background is 3000 milli-Ku; 2001 x 2000 is above LARGE_PIXELS (4,000,000), so
        # x LARGE_PERCENT (150 %): 4500 milli-Ku.
        assert (r.json()["width"], r.json()["height"]) == (2001, 2000)
        assert r.json()["price"] == 4.5
        task = await enh.wait(r.json()["id"])
        assert task["status"] == "completed" and task["charged"] == 4.5, task
        journal = await enh.journal(user)
        assert [t["amount"] for t in holds_of(journal, "capture")] == [4.5]
        after = await enh.balance(user)
        assert before["available"] - after["available"] == 4.5 and after["held"] == 0


APP = Principal(kind="app", app="imagegene", scopes=frozenset({"enhance", "users:any"}))


async def post_task(enh: Enh, user: str, key: str | None = None, **extra) -> httpx.Response:
    """POST /v1/enhancement/tasks through the gateway (defaults: the test image, lighting)."""
    body = {
        "image_url": f"{enh.images.url}/image.png",
        "enhancement_type": "lighting",
        "prompt": "warm",
        "strength": 0.7,
        "user_id": user,
        **extra,
    }
    async with enh.client(key or enh.keys["imagegene"]) as gw:
        return await gw.post("/v1/enhancement/tasks", json=body)


async def submit(enh: Enh, user: str, key: str | None = None, **extra) -> dict:
    r = await post_task(enh, user, key, **extra)
    assert r.status_code == 202, r.text
    return dict(r.json())


def kinds(journal: list[dict]) -> list[str]:
    return sorted(t["kind"] for t in journal if t["kind"] in ("reserve", "capture", "release"))


class TestProviderChain:
    async def test_primary_down_next_used(self, enh: Enh):
        enh.reset_providers(nanobanana="down")
        user = await enh.new_user()
        task = await enh.wait((await submit(enh, user))["id"])
        assert task["status"] == "completed" and task["provider"] == "kie", task
        assert task["degraded"] is False and task["charged"] == 2
        assert enh.providers["kie"].submits == 1
        assert kinds(await enh.journal(user)) == ["capture", "reserve"]

    async def test_primary_fails_next_used(self, enh: Enh):
        enh.reset_providers(nanobanana="fail", kie="reject")
        user = await enh.new_user()
        task = await enh.wait((await submit(enh, user))["id"])
        assert task["provider"] == "fal" and task["degraded"] is False, task
        assert [enh.providers[n].submits for n in ("nanobanana", "kie", "fal")] == [1, 1, 1]
        # NanoBanana refused the call (500): not paid. Kie.ai accepted it, then failed the
        # task: paid. fal.ai did the work: paid.
        assert await enh.pool_calls(task["id"]) == [
            ("kie", PROVIDER_COSTS["kie"]),
            ("fal", PROVIDER_COSTS["fal"]),
        ]

    async def test_stalled_provider_is_left_for_the_next(self, enh: Enh):
        enh.reset_providers(nanobanana="stall")
        user = await enh.new_user()
        task = await enh.wait((await submit(enh, user))["id"])
        assert task["provider"] == "kie" and task["status"] == "completed", task
        assert enh.providers["nanobanana"].submits == 1
        # The stalled call was accepted: its pool paid for it too.
        assert await enh.pool_calls(task["id"]) == [
            ("nanobanana", PROVIDER_COSTS["nanobanana"]),
            ("kie", PROVIDER_COSTS["kie"]),
        ]

    async def test_drained_pool_takes_its_provider_out(self, enh: Enh):
        enh.reset_providers()
        cost = PROVIDER_COSTS["nanobanana"]
        # One call left in NanoBanana's pool.
        await enh.sql(
            "UPDATE enhancement.pools SET balance_milli = $1 WHERE provider = 'nanobanana'", cost
        )
        user = await enh.new_user()
        first = await enh.wait((await submit(enh, user))["id"])
        assert first["provider"] == "nanobanana", first
        pools = await enh.pools()
        assert pools["nanobanana"]["balance"] == 0 and pools["nanobanana"]["active"] is False
        second = await enh.wait((await submit(enh, user))["id"])
        assert second["provider"] == "kie" and second["degraded"] is False, second
        assert enh.providers["nanobanana"].submits == 1  # not even tried
        async with enh.client(enh.keys["admin"]) as gw:
            r = await gw.post(
                "/v1/enhancement/pools/nanobanana/refill",
                json={"amount": 100_000, "reference": f"after-drain-{user}"},
            )
            assert r.status_code == 200 and r.json()["active"] is True, r.text
        third = await enh.wait((await submit(enh, user))["id"])
        assert third["provider"] == "nanobanana", third

    async def test_google_inline_result(self, enh: Enh):
        enh.reset_providers(nanobanana="down", kie="down", fal="down")
        user = await enh.new_user()
        task = await enh.wait((await submit(enh, user))["id"])
        assert task["status"] == "completed" and task["provider"] == "google", task
        assert task["degraded"] is False and task["charged"] == 2
        google = enh.providers["google"]
        assert google.submits == 1 and google.auth[-1] == "key-google"
        async with enh.client(enh.keys["imagegene"]) as gw:
            r = await gw.get(task["result_url"])
        assert r.status_code == 200 and r.content == RESULT  # from the answer's inlineData
        assert await enh.pool_calls(task["id"]) == [("google", PROVIDER_COSTS["google"])]

    async def test_all_remote_down_degrades_and_releases(self, enh: Enh):
        enh.reset_providers(nanobanana="down", kie="down", fal="fail", google="fail")
        user = await enh.new_user()
        before = await enh.balance(user)
        task = await enh.wait((await submit(enh, user))["id"])
        assert task["status"] == "completed" and task["degraded"] is True, task
        assert task["provider"] == "local" and task["charged"] == 0
        async with enh.client(enh.keys["imagegene"]) as gw:
            r = await gw.get(task["result_url"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        from services.enhancement.local import difference

        assert difference(enh.images.image, r.content) > 1.0  # really changed
        assert (await enh.balance(user))["available"] == before["available"]
        assert kinds(await enh.journal(user)) == ["release", "reserve"]

    async def test_open_breaker_skips_provider(self, enh: Enh):
        enh.reset_providers(nanobanana="fail")
        user = await enh.new_user()
        for _ in range(3):  # KU_ENHANCEMENT_BREAKER_FAILURES (3) failures open it
            await enh.wait((await submit(enh, user))["id"])
        calls = enh.providers["nanobanana"].submits
        task = await enh.wait((await submit(enh, user))["id"])
        assert task["provider"] == "kie"
        assert enh.providers["nanobanana"].submits == calls  # not even tried
        async with enh.client(enh.keys["admin"]) as gw:
            pools = {p["provider"]: p for p in (await gw.get("/v1/enhancement/pools")).json()}
            alerts = (await gw.get("/v1/enhancement/alerts?kind=provider_unhealthy")).json()
        assert pools["nanobanana"]["breaker"] == "open" and not pools["nanobanana"]["active"]
        assert any(a["subject"] == "nanobanana" for a in alerts["items"])


class TestFailuresRelease:
    async def test_task_failing_in_the_worker_releases(self, enh: Enh):
        enh.reset_providers()
        user = await enh.new_user()
        enh.worker.stop()
        try:
            task = await submit(enh, user)
            import os

            os.remove(
                os.path.join(enh.suite.env["KU_ENHANCEMENT_STORAGE_DIR"], "inputs", task["id"])
            )
        finally:
            enh.worker.start()
        done = await enh.wait(task["id"])
        assert done["status"] == "failed" and done["error"]["code"] == "input_missing", done
        assert done["charged"] == 0
        assert kinds(await enh.journal(user)) == ["release", "reserve"]
        assert (await enh.balance(user))["held"] == 0

    async def test_stuck_task_is_failed_by_the_sweeper_and_released(self, enh: Enh):
        user = await enh.new_user()
        # An enhancer of our own with a 1 s deadline and no queue: the task gets stuck.
        async with enh.own_enhancer(enhancement_task_deadline_seconds=1) as e:
            task, created = await e.submit(
                APP,
                Submission("lighting", "", 0.5, None, user, None, False, upload=enh.images.image),
                # What the gateway forwarded for this caller (the ledger holds on its behalf).
                origin=outgoing_header(APP, audience="enhancement"),
                idempotency_key=None,
            )
            assert created and task["hold_id"]
            await asyncio.sleep(1.2)
            await e.run_pending()  # the worker's own run may get there first: same end
        done = await enh.wait(str(task["id"]))
        assert done["status"] == "failed" and done["error"]["code"] == "deadline_exceeded"
        assert kinds(await enh.journal(user)) == ["release", "reserve"]

    async def test_nonzero_degraded_price_is_charged(self, enh: Enh):
        user = await enh.new_user()
        before = await enh.balance(user)
        # Pillow fallback priced at 1.5 Ku (KU_ENHANCEMENT_DEGRADED_PRICE_MILLI=1500).
        async with enh.own_enhancer(enhancement_degraded_price_milli=1500) as e:
            assert e.providers == {}  # no remote provider: the local enhancer does the work
            task, _ = await e.submit(
                APP,
                Submission("lighting", "", 0.5, None, user, None, False, upload=enh.images.image),
                origin=outgoing_header(APP, audience="enhancement"),
                idempotency_key=None,
            )
            assert await e.process(str(task["id"])) == "completed"
        done = await enh.wait(str(task["id"]))
        assert done["degraded"] is True and done["provider"] == "local", done
        assert done["price"] == 2 and done["charged"] == 1.5
        journal = await enh.journal(user)
        [capture] = holds_of(journal, "capture")
        assert capture["amount"] == 1.5 and holds_of(journal, "release") == []
        after = await enh.balance(user)
        assert before["available"] - after["available"] == 1.5 and after["held"] == 0

    async def test_stalled_image_host_times_out_at_submit(self, enh: Enh):
        user = await enh.new_user()
        before = await enh.balance(user)
        enh.images.release.clear()
        try:
            r = await post_task(enh, user, image_url=f"{enh.images.url}/stall")
        finally:
            enh.images.release.set()
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "input_unreachable" and error["detail"] == {"timeout_seconds": 3}
        assert kinds(await enh.journal(user)) == []  # nothing held
        assert await enh.balance(user) == before

    async def test_insufficient_credits_402_leaves_nothing(self, enh: Enh):
        user = await enh.new_user()
        async with enh.client(enh.keys["imagegene"]) as gw:
            r = await gw.post("/api/unified/deduct-credits", json={"user_id": user, "amount": 49})
            assert r.status_code == 200, r.text
            r = await gw.post(
                "/v1/enhancement/tasks",
                json={"image_url": f"{enh.images.url}/image.png", "enhancement_type": "custom",
                      "user_id": user},
            )  # fmt: skip
            assert r.status_code == 402, r.text
            assert r.json()["error"]["code"] == "insufficient_credits"
            r = await gw.get("/v1/enhancement/tasks", params={"user_id": user})
            assert r.json()["items"] == []
        assert "reserve" not in kinds(await enh.journal(user))

    @pytest.mark.parametrize(
        "url",
        [
            "http://127.0.0.1:6379/",
            "http://169.254.169.254/latest/meta-data/",
            "file:///etc/passwd",
            "REDIRECT",
            # Resolved by the service's stub DNS (the children run under the test guard).
            "http://private.test/a.png",  # -> 10.1.2.3
            "http://metadata.test/latest/meta-data/",  # -> 169.254.169.254
        ],
    )
    async def test_ssrf_rejected_at_submit_without_charge(self, enh: Enh, url: str):
        if url == "REDIRECT":  # the allowed image host redirects to loopback
            url = f"{enh.images.url}/redirect?to=http://127.0.0.1:6379/"
        user = await enh.new_user()
        before = await enh.balance(user)
        async with enh.client(enh.keys["imagegene"]) as gw:
            r = await gw.post(
                "/v1/enhancement/tasks",
                json={"image_url": url, "enhancement_type": "lighting", "user_id": user},
            )
            assert r.status_code == 422, r.text
            assert r.json()["error"]["code"] == "unsafe_url"
            r = await gw.get("/v1/enhancement/tasks", params={"user_id": user})
            assert r.json()["items"] == []
        assert await enh.balance(user) == before
        assert kinds(await enh.journal(user)) == []

    async def test_bomb_rejected_at_submit(self, enh: Enh):
        user = await enh.new_user()
        r = await post_task(enh, user, image_url=f"{enh.images.url}/bomb.png")
        assert r.status_code == 422 and r.json()["error"]["code"] == "image_too_large", r.text
        assert kinds(await enh.journal(user)) == []


class TestInputsAndReplays:
    async def test_idempotent_submit(self, enh: Enh):
        enh.reset_providers()
        user = await enh.new_user()
        body = {"image_url": f"{enh.images.url}/image.png", "enhancement_type": "mood",
                "user_id": user}  # fmt: skip
        async with enh.client(enh.keys["imagegene"]) as gw:
            headers = {"Idempotency-Key": "enh-1"}
            first = await gw.post("/v1/enhancement/tasks", json=body, headers=headers)
            again = await gw.post("/v1/enhancement/tasks", json=body, headers=headers)
            other = await gw.post(
                "/v1/enhancement/tasks", json={**body, "prompt": "x"}, headers=headers
            )
        assert first.status_code == 202 and again.status_code == 200
        assert first.json()["id"] == again.json()["id"]
        assert other.status_code == 409
        await enh.wait(first.json()["id"])
        assert kinds(await enh.journal(user)) == ["capture", "reserve"]

    async def test_multipart_upload(self, enh: Enh):
        enh.reset_providers()
        user = await enh.new_user()
        async with enh.client(enh.keys["imagegene"]) as gw:
            r = await gw.post(
                "/v1/enhancement/tasks",
                data={"enhancement_type": "background", "strength": "0.5", "user_id": user},
                files={"image": ("in.png", enh.images.image, "image/png")},
            )
        assert r.status_code == 202, r.text
        assert r.json()["input_source"] == "upload"
        assert (await enh.wait(r.json()["id"]))["status"] == "completed"

    async def test_workspace_project_input_and_save(self, enh: Enh):
        import base64

        enh.reset_providers()
        user = await enh.new_user()
        data_url = "data:image/png;base64," + base64.b64encode(enh.images.image).decode()
        async with enh.client(enh.keys["imagegene"]) as gw:
            r = await gw.post(
                "/v1/workspace/projects",
                json={"user_id": user, "title": "Photo", "content": data_url},
            )
            assert r.status_code == 201, r.text
            code = r.json()["code"]
            r = await gw.post(
                "/v1/enhancement/tasks",
                json={"project_code": code, "enhancement_type": "style", "user_id": user,
                      "save_to_workspace": True},
            )  # fmt: skip
            assert r.status_code == 202, r.text
            task = await enh.wait(r.json()["id"])
            assert task["status"] == "completed"
            for _ in range(50):
                r = await gw.get(f"/v1/enhancement/tasks/{task['id']}")
                if r.json()["project_code"]:
                    break
                await asyncio.sleep(0.2)
            saved = r.json()["project_code"]
            assert saved and saved != code
            r = await gw.get(f"/v1/workspace/projects/{saved}", params={"user_id": user})
            assert r.status_code == 200 and r.json()["project_type"] == "enhanced_image"


class TestIsolation:
    async def test_users_cannot_read_each_other(self, enh: Enh):
        enh.reset_providers()
        alice, bob = await enh.new_user(), await enh.new_user()
        alice_token = enh.signing.token(alice, scope="enhance", app="imagegene")
        bob_token = enh.signing.token(bob, scope="enhance", app="imagegene")
        async with enh.client(token=alice_token) as gw:
            r = await gw.post(
                "/v1/enhancement/tasks",
                json={"image_url": f"{enh.images.url}/image.png", "enhancement_type": "mood"},
            )
            assert r.status_code == 202, r.text
        task = await enh.wait(r.json()["id"])
        assert task["user_id"] == alice
        unsigned = task["result_url"].split("?", 1)[0]
        async with enh.client(token=alice_token) as gw:
            assert (await gw.get(task["result_url"])).status_code == 200
            assert (await gw.get(unsigned)).status_code == 200  # the owner needs no link
            listed = (await gw.get("/v1/enhancement/tasks")).json()["items"]
            assert [t["id"] for t in listed] == [task["id"]]
        async with enh.client(token=bob_token) as gw:
            assert (await gw.get(f"/v1/enhancement/tasks/{task['id']}")).status_code == 404
            r = await gw.get(unsigned)  # without the link: only the owner
            assert r.status_code == 404 and r.json()["error"]["code"] == "task_not_found"
            assert (await gw.get("/v1/enhancement/tasks")).json()["items"] == []
            r = await gw.get("/v1/enhancement/tasks", params={"user_id": alice})
            assert r.status_code == 403
            r = await gw.post(
                "/v1/enhancement/tasks",
                json={"image_url": f"{enh.images.url}/image.png", "enhancement_type": "mood",
                      "user_id": alice},
            )  # fmt: skip
            assert r.status_code == 403
        # Another app's key does not see imagegene's tasks either.
        async with enh.client(enh.keys["penora"]) as gw:
            assert (await gw.get(f"/v1/enhancement/tasks/{task['id']}")).status_code == 404
            r = await gw.get("/v1/enhancement/tasks", params={"user_id": alice})
            assert r.json()["items"] == []


def link_parts(url: str) -> tuple[str, int, str]:
    path, query = url.split("?", 1)
    params = dict(p.split("=", 1) for p in query.split("&"))
    return path, int(params["expires"]), params["sig"]


class TestResultLinks:
    """A signed result link is a credential of its own, until it expires."""

    async def test_signed_link_needs_no_credentials(self, enh: Enh):
        enh.reset_providers()
        user = await enh.new_user()
        task = await enh.wait((await submit(enh, user))["id"])
        path, expires, sig = link_parts(task["result_url"])
        async with httpx.AsyncClient(base_url=enh.gateway, timeout=30) as anonymous:
            r = await anonymous.get(task["result_url"])  # e.g. an <img src>
            assert r.status_code == 200, r.text
            assert r.content == RESULT and r.headers["content-type"] == "image/png"
            # Without the whole link, the gateway wants credentials as before.
            for partial in (path, f"{path}?sig={sig}", f"{path}?expires={expires}"):
                r = await anonymous.get(partial)
                assert r.status_code == 401, (partial, r.text)
            # A link opens the result only, not the task or anything else.
            r = await anonymous.get(
                f"/v1/enhancement/tasks/{task['id']}?expires={expires}&sig={sig}"
            )
            assert r.status_code == 401
            r = await anonymous.get(f"/v1/enhancement/pools?expires={expires}&sig={sig}")
            assert r.status_code == 401

    async def test_expired_or_altered_links_are_403(self, enh: Enh):
        enh.reset_providers()
        user = await enh.new_user()
        task = await enh.wait((await submit(enh, user))["id"])
        path, expires, sig = link_parts(task["result_url"])
        secret = derived_secret("enhancement", "result-links")  # this run's, as the service's
        expired = sign_link(secret, task["id"], -60)  # genuinely signed, a minute ago
        flipped = sig[:-1] + ("0" if sig[-1] != "0" else "1")
        other = f"/v1/enhancement/tasks/{uuid.uuid4()}/result"
        cases = {
            expired: "link_expired",
            f"{path}?expires={expires}&sig={flipped}": "bad_signature",
            f"{path}?expires={expires + 3600}&sig={sig}": "bad_signature",  # extended
            f"{other}?expires={expires}&sig={sig}": "bad_signature",  # another task's path
        }
        for client in (
            httpx.AsyncClient(base_url=enh.gateway, timeout=30),
            enh.client(enh.keys["imagegene"]),  # the owner's app: a bad link is still bad
        ):
            async with client as gw:
                for url, code in cases.items():
                    r = await gw.get(url)
                    assert r.status_code == 403, (url, r.text)
                    assert r.json()["error"]["code"] == code, (url, r.text)
