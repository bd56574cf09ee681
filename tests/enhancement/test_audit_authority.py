"""Audit: the included-enhancement path decides authority like the paid path.

A user whose tier includes enhancements pays with a unit of the month's allowance,
drawn in the ledger by the enhancement service as itself (`ledger.allowance.draw` is
service-only). The paid path forwards the caller's principal with the hold and the
ledger refuses a partner acting for a user not linked to it, and an operator; the
included path must refuse them too, before anything is drawn. Reads of a user's
allowance follow `ledger.allowance.read` (partner: linked users only).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.enhancement.conftest import Enh
from tests.enhancement.test_authority import link

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def partner(enh: Enh) -> str:
    return enh.ku("keys", "create", "--app", "partnerx", "--scopes", "enhance,ledger:read")


async def plus_user(enh: Enh) -> str:
    user = await enh.new_user()
    async with enh.client(enh.keys["admin"]) as gw:
        r = await gw.put(f"/v1/enhancement/tiers/{user}", json={"tier": "plus"})
        assert r.status_code == 200, r.text
    return user


async def draws(enh: Enh, user: str) -> list[dict[str, Any]]:
    return await enh.sql(
        "SELECT reference, status FROM ledger.allowance_draws WHERE user_id = $1", user
    )


def body(enh: Enh, user: str) -> dict[str, Any]:
    return {
        "image_url": f"{enh.images.url}/image.png",
        "enhancement_type": "mood",
        "strength": 0.5,
        "user_id": user,
    }


async def test_unlinked_partner_cannot_spend_a_users_included_enhancements(
    enh: Enh, partner: str
) -> None:
    enh.reset_providers()
    victim = await plus_user(enh)
    async with enh.client(partner) as gw:
        r = await gw.post("/v1/enhancement/tasks", json=body(enh, victim))
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"]
    assert await draws(enh, victim) == []
    assert await enh.sql("SELECT id FROM enhancement.tasks WHERE user_id = $1", victim) == []


async def test_admin_key_cannot_spend_a_users_included_enhancements(enh: Enh) -> None:
    enh.reset_providers()
    victim = await plus_user(enh)
    async with enh.client(enh.keys["admin"]) as gw:
        r = await gw.post("/v1/enhancement/tasks", json=body(enh, victim))
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "admin_origin"
    assert await draws(enh, victim) == []


async def test_linked_partner_and_first_party_use_included_enhancements(
    enh: Enh, partner: str
) -> None:
    enh.reset_providers()
    user = await plus_user(enh)
    await link(enh, user, partner)
    for key in (partner, enh.keys["imagegene"]):
        async with enh.client(key) as gw:
            r = await gw.post("/v1/enhancement/tasks", json=body(enh, user))
        assert r.status_code == 202, r.text
        assert r.json()["included"] is True
        await enh.wait(r.json()["id"], key=enh.keys["admin"])
    assert sorted(d["status"] for d in await draws(enh, user)) == ["confirmed", "confirmed"]


async def test_unlinked_partner_cannot_read_a_users_allowance(enh: Enh, partner: str) -> None:
    user = await plus_user(enh)
    async with enh.client(partner) as gw:
        r = await gw.get("/v1/enhancement/allowance", params={"user_id": user})
    assert r.status_code == 403, r.text
    await link(enh, user, partner)
    async with enh.client(partner) as gw:
        r = await gw.get("/v1/enhancement/allowance", params={"user_id": user})
    assert r.status_code == 200, r.text
    assert r.json()["tier"] == "plus"


@pytest.mark.parametrize("tier", ["free", "plus"])
async def test_a_user_token_books_only_in_its_own_apps_lane(enh: Enh, tier: str) -> None:
    """The lane is the app the caller came through, whichever way the task is paid: the
    ledger refuses another lane for a hold; an included task (no hold) must too, or a
    user's task is booked in, and readable by, an app it never came through."""
    enh.reset_providers()
    user = await enh.new_user()
    if tier != "free":
        async with enh.client(enh.keys["admin"]) as gw:
            r = await gw.put(f"/v1/enhancement/tiers/{user}", json={"tier": tier})
            assert r.status_code == 200, r.text
    token = enh.signing.token(user, scope="enhance", app="imagegene")
    async with enh.client(token=token) as gw:
        r = await gw.post("/v1/enhancement/tasks", json={**body(enh, user), "app": "partnerx"})
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "wrong_app"
    assert await enh.sql("SELECT id FROM enhancement.tasks WHERE user_id = $1", user) == []
    assert await draws(enh, user) == []
