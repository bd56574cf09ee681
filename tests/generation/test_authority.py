"""Who may generate on whose credit, and read whose generations: every generation route
through the real gateway × every kind of caller, the narrowest that should pass and
each that should not. A refused generation never reaches the provider and leaves no
hold; a reader sees only what it may.

Callers: the user's own token; a user token naming another user; Penora's first-party
key (`users:any`); a partner key for a user linked to it; a partner key for a user who
is not; an admin key (operators move money in the ledger with a reason; they do not write
stories on users' credit, but they may read a user's generations); an app key without
`generate`; no credentials.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from tests.generation.conftest import Env

pytestmark = pytest.mark.e2e

KINDS = (
    "user",
    "user_other",
    "first_party",
    "partner_linked",
    "partner_unlinked",
    "admin",
    "no_scope",
    "none",
)
ROUTES = ("text", "tools/complete", "story", "chat/completions")


def milli(ku: float | int) -> int:
    return round(ku * 1000)


@pytest.fixture(scope="module")
def keys(gen: Env) -> dict[str, str]:
    return {
        "first_party": gen.new_key("penora", "generate"),
        "partner": gen.new_key("partnerx", "generate"),
        "admin": gen.ku("keys", "create", "--app", "ops", "--scopes", "admin"),
        "no_scope": gen.new_key("penora", "ledger:read"),
    }


def headers(gen: Env, keys: dict[str, str], kind: str, user: str, other: str) -> dict[str, str]:
    if kind == "user":
        return {"Authorization": f"Bearer {gen.user_token(user)}"}
    if kind == "user_other":
        return {"Authorization": f"Bearer {gen.user_token(other)}"}
    if kind == "none":
        return {}
    key = {"partner_linked": "partner", "partner_unlinked": "partner"}.get(kind, kind)
    return {"X-API-Key": keys[key]}


def body(route: str, user: str, marker: str) -> dict[str, Any]:
    prompt = f"{marker} #words=3"
    if route == "text":
        return {"user_id": user, "prompt": prompt, "model": "fake-small", "max_words": 10}
    if route == "tools/complete":
        return {"user_id": user, "text": prompt, "model": "fake-small", "max_words": 10}
    if route == "story":
        return {
            "user_id": user,
            "premise": prompt,
            "chapters": 1,
            "words_per_chapter": 20,
            "model": "fake-small",
        }
    return {
        "model": "fake-small",
        "user": user,
        "max_tokens": 10,
        "messages": [{"role": "user", "content": prompt}],
    }


def expected(kind: str) -> int | None:
    """The status a caller gets (None: allowed)."""
    return {
        "user_other": 403,  # a user token acts only on its own user
        "partner_unlinked": 403,  # the ledger refuses the hold: the user is not theirs
        "admin": 403,  # the ledger refuses a hold for an admin origin: no reason, no audit
        "no_scope": 403,
        "none": 401,
    }.get(kind)


CASES = [(route, kind) for route in ROUTES for kind in KINDS]


@pytest.mark.parametrize(("route", "kind"), CASES, ids=[f"{r} as {k}" for r, k in CASES])
async def test_who_may_generate_on_whose_credit(
    gen: Env, keys: dict[str, str], route: str, kind: str
) -> None:
    user, other = gen.funded_user(10), gen.funded_user(10)
    if kind == "partner_linked":
        gen.link(user, "partnerx")
    marker = uuid.uuid4().hex
    payload = body(route, user, marker)
    if route == "chat/completions" and kind == "user_other":
        # OpenAI's `user` is not whom a user token pays for: it pays for itself. Naming
        # another user there is not a way into their credit.
        async with httpx.AsyncClient(base_url=gen.gateway, timeout=30) as c:
            r = await c.post(
                f"/v1/generation/{route}",
                json=payload,
                headers=headers(gen, keys, kind, user, other),
            )
        assert r.status_code == 200, r.text
        assert [t["kind"] for t in gen.journal(user)] == ["grant"]
        assert milli(gen.balance(other)["available"]) == 10_000 - 30
        return
    async with httpx.AsyncClient(base_url=gen.gateway, timeout=30) as c:
        r = await c.post(
            f"/v1/generation/{route}", json=payload, headers=headers(gen, keys, kind, user, other)
        )
    want = expected(kind)
    if want is not None:
        assert r.status_code == want, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert gen.fake.seen(marker) == []  # never reached the provider
        assert [t["kind"] for t in gen.journal(user)] == ["grant"]  # no hold, no charge
        assert milli(gen.balance(user)["available"]) == 10_000
        return
    assert r.status_code in (200, 202), r.text
    assert "reserve" in [t["kind"] for t in gen.journal(user)]
    if route != "story":  # a story holds at submit and writes in the background
        assert len(gen.fake.seen(marker)) == 1


class TestReaders:
    async def test_each_caller_reads_only_what_it_may(self, gen: Env, keys: dict[str, str]) -> None:
        user, other = gen.funded_user(10), gen.funded_user(10)
        gen.link(user, "partnerx")
        made: dict[str, str] = {}
        for who, h in (
            ("user", {"Authorization": f"Bearer {gen.user_token(user)}"}),
            ("penora", {"X-API-Key": keys["first_party"]}),
            ("partnerx", {"X-API-Key": keys["partner"]}),
        ):
            r = gen.call(
                "POST",
                f"{gen.gateway}/v1/generation/text",
                json={"user_id": user, "prompt": "#words=2", "model": "fake-small"},
                headers=h,
            )
            assert r.status_code == 200, r.text
            made[who] = r.json()["id"]

        def history(h: dict[str, str], **params: str) -> httpx.Response:
            return gen.call("GET", f"{gen.gateway}/v1/generation/history", params=params, headers=h)

        def one(gid: str, h: dict[str, str], **params: str) -> int:
            url = f"{gen.gateway}/v1/generation/generations/{gid}"
            return gen.call("GET", url, params=params, headers=h).status_code

        own = {"Authorization": f"Bearer {gen.user_token(user)}"}
        ids = {g["id"] for g in history(own).json()["items"]}
        assert ids == set(made.values())  # the user sees everything made for them
        # An app sees what was made through it, for the user it names, and nothing else.
        # (A user token that names no app comes through Penora: Penora sees those too.)
        visible = {"penora": {made["penora"], made["user"]}, "partnerx": {made["partnerx"]}}
        for app, key in (("penora", keys["first_party"]), ("partnerx", keys["partner"])):
            h = {"X-API-Key": key}
            seen = {g["id"] for g in history(h, user_id=user).json()["items"]}
            assert seen == visible[app], app
            for gid in made.values():
                assert one(gid, h, user_id=user) == (200 if gid in visible[app] else 404), app
        # An operator reads all of the user it names (support), as it reads their ledger.
        admin = {"X-API-Key": keys["admin"]}
        assert {g["id"] for g in history(admin, user_id=user).json()["items"]} == ids
        # Another user, a key without `generate`, nobody: nothing.
        stranger = {"Authorization": f"Bearer {gen.user_token(other)}"}
        assert history(stranger, user_id=user).status_code == 403
        assert one(made["user"], stranger) == 404
        assert history({"X-API-Key": keys["no_scope"]}, user_id=user).status_code == 403
        assert history({}, user_id=user).status_code == 401
