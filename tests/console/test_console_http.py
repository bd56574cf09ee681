"""The console over plain HTTP against a real suite: who may sign in, the session
cookie's attributes, CSRF and cross-site posts refused, a revoked key ending its
session, and a grant that needs a reason. (The browser flows are in test_browser.py.)"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from typing import Any

import httpx
import pytest

from tests.console.conftest import sso_token
from tests.ku_suite import Ku
from tests.ledger.billing.fake_razorpay import FakeRazorpay

pytestmark = pytest.mark.e2e


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, html[:500]
    return match.group(1)


class Browser:
    """httpx with the cookie handling a browser has on http://127.0.0.1 (Chromium treats
    loopback as a secure context, so it keeps and sends Secure cookies there)."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=15, follow_redirects=False)
        self.cookies: dict[str, str] = {}

    def _remember(self, response: httpx.Response) -> None:
        for header in response.headers.get_list("set-cookie"):
            name, _, rest = header.partition("=")
            value = rest.split(";", 1)[0]
            if value and "max-age=0" not in header.lower():
                self.cookies[name] = value
            else:
                self.cookies.pop(name, None)

    def get(self, path: str, **kw: object) -> httpx.Response:
        r = self.http.get(path, headers={"cookie": self._cookie()}, **kw)  # type: ignore[arg-type]
        self._remember(r)
        return r

    def post(
        self, path: str, data: Mapping[str, object], origin: str | None = None
    ) -> httpx.Response:
        headers = {"cookie": self._cookie()}
        if origin is not None:
            headers["origin"] = origin
        r = self.http.post(path, data=data, headers=headers)
        self._remember(r)
        return r

    def _cookie(self) -> str:
        return "; ".join(f"{k}={v}" for k, v in self.cookies.items())

    def sign_in(self, key: str) -> httpx.Response:
        page = self.get("/console/sign-in")
        return self.post("/console/sign-in", {"api_key": key, "csrf": csrf_of(page.text)})

    def sign_in_sso(self, token: str) -> httpx.Response:
        page = self.get("/console/sign-in")
        return self.post("/console/sign-in/sso", {"sso_token": token, "csrf": csrf_of(page.text)})


def flashes(html: str) -> list[str]:
    return re.findall(r'<p class="flash \w+" role="status">([^<]*)</p>', html)


def signed_in(ku: Ku, key: str) -> Browser:
    b = Browser(ku.url)
    r = b.sign_in(key)
    assert r.status_code == 303 and r.headers["location"] == "/console/overview", r.text
    return b


class TestSignIn:
    def test_admin_key_signs_in_with_a_strict_cookie(self, ku: Ku, admin_key: str):
        b = Browser(ku.url)
        r = b.sign_in(admin_key)
        assert r.status_code == 303
        [cookie] = [c for c in r.headers.get_list("set-cookie") if c.startswith("ku_console=")]
        attributes = {a.strip().lower() for a in cookie.split(";")[1:]}
        assert {"secure", "httponly", "samesite=strict", "path=/console"} <= attributes
        assert admin_key not in cookie  # the browser holds only a random session id
        page = b.get("/console/overview")
        assert page.status_code == 200 and "Users with an account" in page.text
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "form-action 'self'" in csp
        assert not re.search(r'(src|href)="(https?:)?//', page.text)

    @pytest.mark.parametrize("scopes", ["ledger:read,ledger:write", "ledger:grant,users:write"])
    def test_other_keys_are_refused(self, ku: Ku, scopes: str):
        b = Browser(ku.url)
        r = b.sign_in(ku.key("partner", scopes))
        assert r.status_code == 403 and "admin scope" in r.text
        assert "ku_console" not in b.cookies
        assert b.get("/console/overview").headers["location"] == "/console/sign-in"

    def test_wrong_key_and_missing_csrf(self, ku: Ku, admin_key: str):
        b = Browser(ku.url)
        assert b.sign_in("ku_abcd1234_" + "x" * 43).status_code == 401
        b.get("/console/sign-in")
        r = b.post("/console/sign-in", {"api_key": admin_key, "csrf": "forged"})
        assert r.status_code == 403 and "ku_console" not in b.cookies

    def test_revoked_key_ends_the_session(self, ku: Ku):
        key = ku.key("ops-temp", "admin")
        b = signed_in(ku, key)
        assert b.get("/console/keys").status_code == 200
        ku.cli("keys", "revoke", key.split("_")[1])
        # Gateways drop a revoked key within 5 s, at once when `key.revoked` arrives.
        for _ in range(60):
            page = b.get("/console/keys")
            if page.status_code == 303:
                break
            time.sleep(0.2)
        assert page.headers["location"] == "/console/sign-in"


class TestForms:
    def test_grant_needs_csrf_same_origin_and_a_reason(self, ku: Ku, admin_key: str):
        user = ku.user()
        b = signed_in(ku, admin_key)
        page = b.get(f"/console/users/{user}")
        assert page.status_code == 200 and 'id="available">50 Ku<' in page.text
        token = csrf_of(page.text)
        form = {"amount": "2.5", "source": "admin", "reason": "support ticket 17"}
        assert b.post(f"/console/users/{user}/grant", {**form, "csrf": "nope"}).status_code == 403
        cross = b.post(
            f"/console/users/{user}/grant", {**form, "csrf": token}, "https://evil.example"
        )
        assert cross.status_code == 403
        no_reason = b.post(f"/console/users/{user}/grant", {**form, "reason": "", "csrf": token})
        assert no_reason.status_code == 303
        assert "A reason is required" in b.get(f"/console/users/{user}").text
        assert 'id="available">50 Ku<' in b.get(f"/console/users/{user}").text

        ok = b.post(
            f"/console/users/{user}/grant",
            {**form, "csrf": token, "idempotency_key": "grant-once"},
            origin=ku.url,
        )
        assert ok.status_code == 303
        # The same form submitted twice grants once.
        b.post(
            f"/console/users/{user}/grant", {**form, "csrf": token, "idempotency_key": "grant-once"}
        )
        after = b.get(f"/console/users/{user}").text
        assert 'id="available">52.5 Ku<' in after
        assert "support ticket 17" in after  # the reason, on the journal and the page

    def test_clawback_of_what_is_left_shows_no_debt(self, ku: Ku, admin_key: str):
        user = ku.user()
        b = signed_in(ku, admin_key)
        token = csrf_of(b.get(f"/console/users/{user}").text)
        # A claw-back names its lot, and takes at most what that lot granted.
        form = {
            "amount": "60",
            "source": "welcome",
            "grant_reference": "welcome",
            "reason": "duplicate account",
            "csrf": token,
        }
        assert b.post(f"/console/users/{user}/clawback", form).status_code == 303
        page = b.get(f"/console/users/{user}").text
        assert 'id="available">0 Ku<' in page and 'id="debt">0 Ku<' in page
        assert "duplicate account" in page

    def test_clawback_of_more_than_is_left_shows_the_debt(self, ku: Ku, admin_key: str):
        user = ku.user()
        app_key = ku.key("imagegene", "ledger:read,ledger:write")
        with httpx.Client(base_url=ku.url, headers={"x-api-key": app_key}, timeout=15) as api:
            r = api.post(
                "/v1/ledger/debits",
                json={"user_id": user, "amount": 30, "description": "three images"},
                headers={"idempotency-key": f"spent-{user}"},
            )
            assert r.status_code == 201, r.text
        b = signed_in(ku, admin_key)
        form = {
            "amount": "50",
            "source": "welcome",
            "grant_reference": "welcome",
            "reason": "fraudulent sign-up",
            "csrf": csrf_of(b.get(f"/console/users/{user}").text),
        }
        assert b.post(f"/console/users/{user}/clawback", form).status_code == 303
        page = b.get(f"/console/users/{user}").text
        # 20 Ku were left to take back; the 30 Ku already spent are owed.
        assert flashes(page) == [
            "Clawed back 50 Ku: fraudulent sign-up (30 Ku already spent, now debt)"
        ]
        assert 'id="available">0 Ku<' in page and 'id="debt">30 Ku<' in page

    def test_keys_create_shown_once_then_revoke(self, ku: Ku, admin_key: str):
        b = signed_in(ku, admin_key)
        token = csrf_of(b.get("/console/keys").text)
        r = b.post(
            "/console/keys",
            {
                "app": "consoleapp",
                "scopes": ["ledger:read", "users:any"],
                "name": "from the console",
                "csrf": token,
            },
        )
        assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
        key = re.search(r'id="new-key" class="secret">([^<]+)<', r.text)
        assert key
        prefix = key.group(1).split("_")[1]
        listing = b.get("/console/keys").text
        assert prefix in listing and key.group(1) not in listing  # never shown again
        with httpx.Client(base_url=ku.url) as api:
            user = ku.user()
            ok = api.get(
                "/v1/ledger/balance", params={"user_id": user}, headers={"x-api-key": key.group(1)}
            )
            assert ok.status_code == 200
            assert b.post(f"/console/keys/{prefix}/revoke", {"csrf": token}).status_code == 303
            assert f"Key {prefix} revoked." in b.get("/console/keys").text
            for _ in range(60):  # gateways drop a revoked key within 5 s
                if (
                    api.get(
                        "/v1/ledger/balance",
                        params={"user_id": user},
                        headers={"x-api-key": key.group(1)},
                    ).status_code
                    == 401
                ):
                    break
                time.sleep(0.2)
            else:
                raise AssertionError("the revoked key still works")


def row_of(html: str, table: str, contains: str) -> str:
    """The one row of table #`table` whose text has `contains`."""
    body = re.search(rf'<table id="{table}">(.*?)</table>', html, re.S)
    assert body, f"no table #{table}"
    rows = [r for r in re.findall(r"<tr\b.*?</tr>", body.group(1), re.S) if contains in r]
    assert len(rows) == 1, (table, contains, rows)
    return rows[0]


class TestUserPage:
    def test_payments_lots_with_expiry_holds_projects_and_storage(
        self, ku: Ku, admin_key: str, razorpay: FakeRazorpay
    ):
        user = ku.user()
        penora = ku.key("penora", "ledger:read,ledger:write,workspace:read,workspace:write")
        with httpx.Client(base_url=ku.url, headers={"x-api-key": penora}, timeout=15) as api:
            order = api.post("/v1/billing/orders", json={"user_id": user, "item": "topup_10"})
            assert order.status_code == 201, order.text
            order_id = order.json()["razorpay_order_id"]
            payment = razorpay.pay(order_id)
            verified = api.post(  # what checkout reports back
                "/v1/billing/verify",
                json={
                    "razorpay_order_id": order_id,
                    "razorpay_payment_id": payment["id"],
                    "razorpay_signature": razorpay.checkout_signature(order_id, payment["id"]),
                },
            )
            assert verified.status_code == 200, verified.text
            hold = api.post(
                "/v1/ledger/holds",
                json={"user_id": user, "amount": 2.5, "ttl_seconds": 600},
                headers={"idempotency-key": f"hold-{user}"},
            )
            assert hold.status_code == 201, hold.text
            saved = api.post(
                "/v1/workspace/projects",
                json={
                    "user_id": user,
                    "app_source": "penora",
                    "project_type": "story",
                    "title": "The Lighthouse Keeper",
                    "content": "The lamp had not gone out in forty years.",
                },
            )
            assert saved.status_code == 201, saved.text
        with httpx.Client(base_url=ku.url, headers={"x-api-key": admin_key}, timeout=15) as api:
            granted = api.post(
                "/v1/ledger/grants",
                json={
                    "user_id": user,
                    "amount": 5,
                    "source": "promo",
                    "description": "spring promo",
                    "reason": "spring promo",
                    "reference": f"spring-{user}",
                    "expires_at": "2031-03-04T05:06:00Z",
                },
                headers={"idempotency-key": f"spring-{user}"},
            )
            assert granted.status_code == 201, granted.text

        b = signed_in(ku, admin_key)
        page = b.get(f"/console/users/{user}")
        assert page.status_code == 200
        html = page.text
        paid = row_of(html, "payments", payment["id"])
        assert ">captured<" in paid and "10 Ku" in paid and "topup_10" in paid
        promo = row_of(html, "lots", f"spring-{user}")
        assert "2031-03-04 05:06 UTC" in promo and ">5<" in promo
        assert "welcome" in row_of(html, "lots", ">welcome<")
        held = row_of(html, "holds", hold.json()["hold"]["id"][:8])
        assert ">2.5<" in held and ">active<" in held
        project = row_of(html, "projects", saved.json()["code"])
        assert "The Lighthouse Keeper" in project and ">penora<" in project
        storage = re.search(r'<p id="storage">([^<]*)</p>', html)
        assert storage and "1 projects" in storage.group(1), storage
        # 50 welcome + 10 bought + 5 promo - 2.5 held.
        assert 'id="available">62.5 Ku<' in html and 'id="held">2.5 Ku<' in html

    def test_a_user_who_never_paid_has_no_payments(self, ku: Ku, admin_key: str):
        user = ku.user()
        html = signed_in(ku, admin_key).get(f"/console/users/{user}").text
        assert re.search(r'<table id="payments">.*No payments\.', html, re.S)


class TestRotate:
    def test_rotate_shows_the_new_key_once_and_the_old_overlaps(self, ku: Ku, admin_key: str):
        old = ku.key("rotating", "ledger:read,users:any")
        old_prefix = old.split("_")[1]
        b = signed_in(ku, admin_key)
        token = csrf_of(b.get("/console/keys").text)
        r = b.post(f"/console/keys/{old_prefix}/rotate", {"csrf": token, "overlap_seconds": "600"})
        assert r.status_code == 200 and f"Key {old_prefix} rotated" in r.text
        new = re.search(r'id="new-key" class="secret">([^<]+)<', r.text)
        assert new and new.group(1) != old
        listing = b.get("/console/keys").text
        assert f"rotated to {new.group(1).split('_')[1]}" in listing
        user = ku.user()
        with httpx.Client(base_url=ku.url) as api:
            for key in (old, new.group(1)):  # both work during the overlap
                r = api.get(
                    "/v1/ledger/balance", params={"user_id": user}, headers={"x-api-key": key}
                )
                assert r.status_code == 200, r.text


class TestPayments:
    def test_reconcile_grants_a_missed_payment_once(
        self, ku: Ku, admin_key: str, razorpay: FakeRazorpay
    ):
        user = ku.user()
        penora = ku.key("penora", "ledger:read,ledger:write")
        with httpx.Client(base_url=ku.url, headers={"x-api-key": penora}, timeout=15) as api:
            r = api.post("/v1/billing/orders", json={"user_id": user, "item": "topup_25"})
            assert r.status_code == 201, r.text
            # Paid at Razorpay; neither checkout nor a webhook ever told Ku.
            payment = razorpay.pay(r.json()["razorpay_order_id"])
            # Only admins see everyone's payments or reconcile.
            assert api.get("/v1/billing/admin/payments").status_code == 403
            assert api.post("/v1/billing/admin/reconcile", json={}).status_code == 403

        b = signed_in(ku, admin_key)
        page = b.get("/console/payments")
        assert page.status_code == 200 and f'id="payment-{payment["id"]}"' not in page.text
        assert 'id="payment-alerts"' in page.text
        token = csrf_of(page.text)
        assert b.post("/console/payments/reconcile", {"hours": "1"}).status_code == 403
        cross = b.post(
            "/console/payments/reconcile", {"hours": "1", "csrf": token}, "https://evil.example"
        )
        assert cross.status_code == 403

        done = b.post("/console/payments/reconcile", {"hours": "1", "csrf": token}, ku.url)
        assert done.status_code == 303 and done.headers["location"] == "/console/payments"
        html = b.get("/console/payments").text
        [message] = flashes(html)
        assert message.startswith("Reconciled the last 1 h:") and re.search(
            r"\bgranted 1\b", message
        )
        row = re.search(rf'<tr id="payment-{payment["id"]}">(.*?)</tr>', html, re.S)
        assert row and user in row.group(1) and ">captured<" in row.group(1)
        assert "25 Ku" in row.group(1) and "3.00 " in row.group(1)

        # Again: nothing is granted twice.
        b.post("/console/payments/reconcile", {"hours": "1", "csrf": token})
        [message] = flashes(b.get("/console/payments").text)
        assert not re.search(r"\bgranted\b", message), message
        user_page = b.get(f"/console/users/{user}").text
        assert 'id="available">75 Ku<' in user_page

    def test_bad_look_back_is_a_message(self, ku: Ku, admin_key: str):
        b = signed_in(ku, admin_key)
        token = csrf_of(b.get("/console/payments").text)
        b.post("/console/payments/reconcile", {"hours": "soon", "csrf": token})
        assert flashes(b.get("/console/payments").text) == ["Look back: a number of hours."]
        b.post("/console/payments/reconcile", {"hours": "0", "csrf": token})
        [message] = flashes(b.get("/console/payments").text)
        assert message.startswith("Not reconciled:"), message


def breaker(ku: Ku, name: str) -> Any:
    from redis.asyncio import Redis

    from services.kit.breaker import CircuitBreaker

    redis = Redis.from_url(ku.suite.env["KU_REDIS_URL"])
    return CircuitBreaker(redis, f"generation:{name}", prefix=ku.suite.env["KU_BUS_PREFIX"])


async def trip(ku: Ku, name: str, failures: int) -> None:
    b = breaker(ku, name)
    for _ in range(failures):
        await b.record_failure()
    await b.redis.aclose()


async def reset(ku: Ku, name: str) -> None:
    b = breaker(ku, name)
    await b.reset()
    await b.redis.aclose()


class TestProviders:
    def test_breakers_pools_and_refill(self, ku: Ku, admin_key: str):
        b = signed_in(ku, admin_key)
        page = b.get("/console/providers")
        assert page.status_code == 200
        row = re.search(r'<tr id="generation-deepinfra">(.*?)</tr>', page.text, re.S)
        assert row and 'class="breaker closed">closed<' in row.group(1)
        assert re.search(r'<tr id="pool-fal">', page.text)
        assert 'id="provider-alerts"' in page.text

        # What generation does when its provider keeps failing (the same Redis keys).
        asyncio.run(trip(ku, "deepinfra", 5))
        try:
            page = b.get("/console/providers")
            row = re.search(r'<tr id="generation-deepinfra">(.*?)</tr>', page.text, re.S)
            assert row and 'class="breaker open">open<' in row.group(1)
        finally:
            asyncio.run(reset(ku, "deepinfra"))

        token = csrf_of(page.text)
        form = {"amount": "150", "reference": "console-test-refill", "csrf": token}
        before = pool_balance(page.text, "fal")
        assert b.post("/console/providers/fal/refill", {**form, "csrf": "x"}).status_code == 403
        cross = b.post("/console/providers/fal/refill", form, "https://evil.example")
        assert cross.status_code == 403
        assert b.post("/console/providers/fal/refill", form, ku.url).status_code == 303
        page = b.get("/console/providers")
        [message] = flashes(page.text)
        assert message.startswith("Refilled fal with 150 Ku")
        assert pool_balance(page.text, "fal") == before + 150
        # The same form twice refills once.
        b.post("/console/providers/fal/refill", form)
        assert pool_balance(b.get("/console/providers").text, "fal") == before + 150

        b.post("/console/providers/fal/refill", {**form, "amount": "-3"})
        assert flashes(b.get("/console/providers").text) == ["Amount: must be greater than 0"]
        b.post("/console/providers/nosuch/refill", {**form, "reference": "other"})
        [message] = flashes(b.get("/console/providers").text)
        assert message.startswith("nosuch not refilled:"), message


def pool_balance(html: str, provider: str) -> float:
    row = re.search(rf'<tr id="pool-{provider}">.*?class="num balance">([\d,.]+) Ku<', html, re.S)
    assert row, html[:2000]
    return float(row.group(1).replace(",", ""))


class TestSsoSignIn:
    def test_admin_account_signs_in_until_the_role_is_taken(self, ku: Ku):
        operator, customer = ku.user(), ku.user()
        reason = "on-call operator, ticket OPS-112"
        assert ku.cli("users", "grant-admin", "--id", operator, "--reason", reason) == "admin"
        b = Browser(ku.url)
        r = b.sign_in_sso(sso_token(operator))
        assert r.status_code == 303 and r.headers["location"] == "/console/overview", r.text
        [cookie] = [c for c in r.headers.get_list("set-cookie") if c.startswith("ku_console=")]
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
        assert b.get("/console/overview").status_code == 200
        # An admin account acts on any user, as an admin key does; the journal names it.
        page = b.get(f"/console/users/{customer}")
        assert page.status_code == 200 and 'id="available">50 Ku<' in page.text
        form = {
            "amount": "3",
            "source": "admin",
            "reason": "sso admin grant",
            "csrf": csrf_of(page.text),
        }
        assert b.post(f"/console/users/{customer}/grant", form).status_code == 303
        assert 'id="available">53 Ku<' in b.get(f"/console/users/{customer}").text

        ku.cli("users", "revoke-admin", "--id", operator, "--reason", "left the rota")
        gone = b.get("/console/overview")
        assert gone.status_code == 303 and gone.headers["location"] == "/console/sign-in"
        again = b.sign_in_sso(sso_token(operator))
        assert again.status_code == 403 and "not_admin" in again.text

    def test_non_admin_account_and_bad_tokens_are_refused(self, ku: Ku):
        user = ku.user()
        b = Browser(ku.url)
        r = b.sign_in_sso(sso_token(user))
        assert r.status_code == 403 and "not_admin" in r.text
        assert "ku_console" not in b.cookies
        r = b.sign_in_sso("not-a-jwt")
        assert r.status_code in (401, 422) and "Sign-in failed" in r.text
        assert "ku_console" not in b.cookies
        page = b.get("/console/sign-in")
        no_csrf = b.post("/console/sign-in/sso", {"sso_token": sso_token(user)})
        assert no_csrf.status_code == 403 and page.status_code == 200

    def test_admin_token_acts_for_others_through_the_api(self, ku: Ku):
        operator, plain, customer = ku.user(), ku.user(), ku.user()
        ku.cli("users", "grant-admin", "--id", operator, "--reason", "api check")
        with httpx.Client(base_url=ku.url, timeout=15) as api:
            tokens = {}
            for who in (operator, plain):
                r = api.post("/v1/auth/sso", json={"token": sso_token(who)})
                assert r.status_code == 200, r.text
                tokens[who] = r.json()
            assert "admin" in tokens[operator]["scope"].split()
            assert "admin" not in tokens[plain]["scope"].split()
            for who, status in ((operator, 200), (plain, 403)):
                bearer = {"authorization": f"Bearer {tokens[who]['access_token']}"}
                r = api.get("/v1/ledger/balance", params={"user_id": customer}, headers=bearer)
                assert r.status_code == status, r.text
