"""Who may submit an enhancement on whose credit: `POST /v1/enhancement/tasks` through
the real gateway × every kind of caller. A refused submit is the status the authority
model gives, holds nothing and enqueues nothing; an allowed one holds the price.
(Reading tasks and results across users and apps: tests/enhancement/test_flow.py.)
"""

from __future__ import annotations

import asyncio

import pytest

from tests.enhancement.conftest import Enh

pytestmark = pytest.mark.e2e

# kind -> the status it gets (None: allowed)
KINDS: dict[str, int | None] = {
    "user": None,
    "user_other": 403,  # a user token acts only on its own user
    "first_party": None,  # ImageGene: any user
    "partner_linked": None,
    "partner_unlinked": 403,  # the ledger refuses the hold: not its user
    "admin": 403,  # operators move money in the ledger, with a reason
    "no_scope": 403,
    "none": 401,
}


@pytest.fixture(scope="module")
def partner(enh: Enh) -> str:
    return enh.ku("keys", "create", "--app", "partnerx", "--scopes", "enhance,ledger:read")


@pytest.fixture(scope="module")
def no_scope(enh: Enh) -> str:
    return enh.ku("keys", "create", "--app", "imagegene", "--scopes", "ledger:read,users:any")


async def link(enh: Enh, user: str, partner: str) -> None:
    """Link the user to partnerx as an admin would; wait until the ledger knows."""
    async with enh.client(enh.keys["admin"]) as gw:
        r = await gw.post(f"/v1/users/{user}/apps", json={"app": "partnerx"})
        assert r.status_code == 200, r.text
    async with enh.client(partner) as gw:
        # Up to 90 s: see tests/generation/conftest.py `Env.link`.
        for _ in range(900):
            r = await gw.get("/v1/ledger/balance", params={"user_id": user})
            if r.status_code == 200:
                return
            await asyncio.sleep(0.1)
    raise AssertionError(f"{user} never linked: {r.text}")


@pytest.mark.parametrize("kind", list(KINDS))
async def test_who_may_enhance_on_whose_credit(
    enh: Enh, partner: str, no_scope: str, kind: str
) -> None:
    enh.reset_providers()
    user, other = await enh.new_user(), await enh.new_user()
    if kind == "partner_linked":
        await link(enh, user, partner)
    key = token = None
    if kind == "user":
        token = enh.signing.token(user, scope="enhance", app="imagegene")
    elif kind == "user_other":
        token = enh.signing.token(other, scope="enhance", app="imagegene")
    elif kind == "first_party":
        key = enh.keys["imagegene"]
    elif kind in ("partner_linked", "partner_unlinked"):
        key = partner
    elif kind == "admin":
        key = enh.keys["admin"]
    elif kind == "no_scope":
        key = no_scope
    before = await enh.balance(user)
    body = {
        "image_url": f"{enh.images.url}/image.png",
        "enhancement_type": "mood",
        "strength": 0.5,
        "user_id": user,
    }
    async with enh.client(key=key, token=token) as gw:
        r = await gw.post("/v1/enhancement/tasks", json=body)
    want = KINDS[kind]
    journal = await enh.journal(user)
    if want is not None:
        assert r.status_code == want, r.text
        assert r.json()["error"]["code"]
        assert [t for t in journal if t["kind"] == "reserve"] == []
        assert (await enh.balance(user))["available"] == before["available"]
        return
    assert r.status_code == 202, r.text
    assert r.json()["user_id"] == user
    task = await enh.wait(r.json()["id"], key=enh.keys["admin"])
    assert task["status"] == "completed" and task["charged"] == task["price"]
    # Booked in the lane of the app the caller came through.
    [capture] = [t for t in await enh.journal(user) if t["kind"] == "capture"]
    assert capture["app"] == ("partnerx" if kind == "partner_linked" else "imagegene")
