"""The console and the API docs in headless Chromium (selenium + Debian's chromium):
sign in, find a user, grant credit with a reason and see the balance change, revoke a
key, and see /docs and /redoc render the operations; and a frontend on another origin
that signs in with an SSO token and shows the live balance from /v1/events (through a
ticket). Screenshots go to .artifacts/console/ (the README's docs/console.png is one of
them)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from tests.console.conftest import ARTIFACTS, serve_frontend, sso_token
from tests.console.screenshots import stamp
from tests.ku_suite import Ku
from tests.ledger.billing.fake_razorpay import FakeRazorpay

pytestmark = pytest.mark.e2e


def wait_for(driver: Any, css: str, timeout: float = 20) -> Any:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout).until(
            ec.presence_of_element_located((By.CSS_SELECTOR, css))
        )
    except Exception:
        (ARTIFACTS / "failed-page.html").write_text(driver.page_source)
        shot(driver, "failed")
        raise AssertionError(f"{css} not found on {driver.current_url}") from None


def wait_text(driver: Any, css: str, text: str, timeout: float = 20) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, timeout).until(
            ec.text_to_be_present_in_element((By.CSS_SELECTOR, css), text)
        )
    except Exception:
        (ARTIFACTS / "failed-page.html").write_text(driver.page_source)
        shot(driver, "failed")
        raise AssertionError(f"{text!r} not in {css} on {driver.current_url}") from None


def off_site_requests(driver: Any, origin: str) -> list[str]:
    """Requests to another origin the browser really sent since the last call (DevTools'
    network log, which the browser fixture turns on): one the page's Content-Security-
    Policy blocked never leaves the browser and is not counted."""
    import json

    sent: dict[str, str] = {}
    blocked = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message["method"] == "Network.requestWillBeSent":
            sent[params["requestId"]] = params["request"]["url"]
        elif message["method"] == "Network.loadingFailed" and params.get("blockedReason"):
            blocked.add(params["requestId"])
    return [
        url
        for rid, url in sent.items()
        if rid not in blocked and not url.startswith((origin, f"blob:{origin}", "data:"))
    ]


def shot(driver: Any, name: str) -> None:
    """The whole page, not just the window (resized to the document's height first), with
    what the page showed kept in the PNG (tests/console/screenshots.py): the README's copy
    can then be checked against the templates without a browser."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(max(int(height), 800), 4000))
    path = ARTIFACTS / f"{name}.png"
    assert driver.save_screenshot(str(path))
    driver.set_window_size(1280, 1000)
    seen = driver.execute_script(
        "return {"
        "nav: [...document.querySelectorAll('header nav a')]"
        ".map(a => [a.getAttribute('href'), a.textContent.trim()]),"
        "fields: [...new Set([...document.querySelectorAll('main form [name]')]"
        ".map(e => e.getAttribute('name')))].sort()}"
    )
    stamp(path, name, seen["nav"], seen["fields"])


class TestConsoleInChromium:
    def test_sign_in_find_user_grant_and_revoke(
        self, ku: Ku, admin_key: str, browser: Any, razorpay: FakeRazorpay
    ):
        from selenium.webdriver.common.by import By

        user = ku.user()
        victim = ku.key("retiring", "ledger:read,users:any")
        victim_prefix = victim.split("_")[1]
        with httpx.Client(base_url=ku.url) as api:  # some activity for the overview
            app_key = ku.key("imagegene", "ledger:read,ledger:write")
            r = api.post(
                "/v1/ledger/debits",
                json={"user_id": user, "amount": 4.25, "description": "one image"},
                headers={"x-api-key": app_key, "idempotency-key": "browser-debit"},
            )
            assert r.status_code == 201, r.text

        browser.get(ku.url + "/console")
        wait_for(browser, "input[name=api_key]").send_keys(admin_key)
        browser.find_element(By.CSS_SELECTOR, "form[action='/console/sign-in'] button").click()
        wait_for(browser, "#accounts")
        assert browser.current_url.endswith("/console/overview")
        assert int(browser.find_element(By.ID, "accounts").text) >= 1
        # At least this run's 4.25 Ku (other tests in the run share the database).
        assert browser.find_element(By.ID, "spent-today").text not in ("", "0 Ku")
        assert browser.find_elements(By.CSS_SELECTOR, "svg.chart rect.spent")
        shot(browser, "overview")

        finder = browser.find_element(By.CSS_SELECTOR, "form.find input[name=user_id]")
        finder.send_keys(user)
        browser.find_element(By.CSS_SELECTOR, "form.find button").click()
        wait_for(browser, "#user-id")
        assert browser.find_element(By.ID, "user-id").text == user
        assert browser.find_element(By.ID, "available").text == "45.75 Ku"

        form = browser.find_element(By.ID, "grant-form")
        form.find_element(By.NAME, "amount").send_keys("7.5")
        form.find_element(By.NAME, "reason").send_keys("goodwill after the outage")
        form.find_element(By.CSS_SELECTOR, "button").click()
        wait_text(browser, "#available", "53.25 Ku")
        flash = browser.find_element(By.CSS_SELECTOR, ".flash.ok").text
        assert "Granted 7.5 Ku" in flash and "goodwill after the outage" in flash
        journal = browser.find_element(By.ID, "transactions").text
        assert "goodwill after the outage" in journal
        shot(browser, "user-granted")

        browser.find_element(By.LINK_TEXT, "API keys").click()
        row = wait_for(browser, f"#key-{victim_prefix}")
        row.find_element(By.CSS_SELECTOR, "button.danger").click()
        wait_text(browser, f"#key-{victim_prefix} .state", "revoked")
        assert (
            f"Key {victim_prefix} revoked." in browser.find_element(By.CSS_SELECTOR, ".flash").text
        )
        shot(browser, "keys")

        with httpx.Client(base_url=ku.url, timeout=15) as api:  # paid, never reported
            penora = ku.key("penora", "ledger:read,ledger:write")
            r = api.post(
                "/v1/billing/orders",
                json={"user_id": user, "item": "topup_10"},
                headers={"x-api-key": penora},
            )
            assert r.status_code == 201, r.text
            payment = razorpay.pay(r.json()["razorpay_order_id"])
        browser.find_element(By.LINK_TEXT, "Payments").click()
        wait_for(browser, "#payments")
        browser.find_element(By.CSS_SELECTOR, "#reconcile-form button").click()
        wait_for(browser, f"#payment-{payment['id']}")
        assert "granted 1" in browser.find_element(By.CSS_SELECTOR, ".flash.ok").text
        assert (
            browser.find_element(By.CSS_SELECTOR, f"#payment-{payment['id']} .granted").text
            == "10 Ku"
        )
        shot(browser, "payments")
        browser.find_element(By.LINK_TEXT, "Providers").click()
        wait_for(browser, "#pools")
        assert browser.find_element(By.CSS_SELECTOR, "#generation-deepinfra .breaker").text
        assert browser.find_elements(By.CSS_SELECTOR, "#pool-fal form.refill")
        shot(browser, "providers")

        # The user's page again: the payment, its 10 Ku in the balance (the README's image).
        browser.find_element(By.CSS_SELECTOR, "form.find input[name=user_id]").send_keys(user)
        browser.find_element(By.CSS_SELECTOR, "form.find button").click()
        wait_for(browser, f"#payment-{payment['id']}")
        assert browser.find_element(By.ID, "available").text == "63.25 Ku"
        assert "goodwill after the outage" in browser.find_element(By.ID, "transactions").text
        shot(browser, "user")

        # No cookie is readable by scripts, and nothing came from another origin.
        assert browser.execute_script("return document.cookie") == ""
        entries = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        assert all(e.startswith(ku.url) for e in entries), entries

    def test_docs_render_the_operations_offline(self, ku: Ku, browser: Any):
        from selenium.webdriver.common.by import By

        expected = {"/v1/ledger/balance", "/v1/ledger/holds", "/v1/workspace/projects"}
        paths: set[str] = set()
        # The gateway merges each service's document; one that was slow to answer is
        # fetched again after 2 s, so a page loaded before that may lack its operations.
        for _ in range(10):
            browser.get(ku.url + "/docs")
            wait_for(browser, ".opblock", timeout=40)
            paths = {
                e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
            }
            if expected <= paths:
                break
            time.sleep(2.5)
        assert expected <= paths, sorted(paths)
        shot(browser, "docs")
        resources = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        assert resources and all(r.startswith(ku.url) for r in resources), resources

        off_site_requests(browser, ku.url)
        browser.get(ku.url + "/redoc")
        wait_text(browser, "body", "/v1/ledger/balance", timeout=40)
        shot(browser, "redoc")
        resources = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        assert f"{ku.url}/static/vendor/redoc/redoc.standalone.js" in resources, resources
        # ReDoc's sidebar asks cdn.redoc.ly for a logo: the page's CSP blocks it, so it
        # is in the resource list (as a failed fetch) but never sent.
        assert off_site_requests(browser, ku.url) == []


def live_balance_url(origin: str, ku: Ku, user: str) -> str:
    query = urlencode({"api": ku.url, "sso": sso_token(user)})
    return f"{origin}/live-balance.html?{query}"


@pytest.fixture
def stranger_origin() -> Iterator[str]:
    """The same page from an origin the gateway's CORS does not allow."""
    with serve_frontend() as origin:
        yield origin


class TestLiveBalanceFromAnotherOrigin:
    def test_page_signs_in_opens_the_stream_and_sees_a_charge(
        self, ku: Ku, frontend: str, browser: Any
    ):
        from selenium.webdriver.common.by import By

        user = ku.user()
        ku.key("penora", "ledger:read")  # the app the page signs in through is registered
        app_key = ku.key("imagegene", "ledger:read,ledger:write")
        browser.get(live_balance_url(frontend, ku, user))
        wait_text(browser, "#state", "open", timeout=30)
        assert browser.find_element(By.ID, "user").text == user
        assert browser.find_element(By.ID, "balance").text == "50"

        with httpx.Client(base_url=ku.url, timeout=15) as api:  # the app charges the user
            r = api.post(
                "/v1/ledger/debits",
                json={"user_id": user, "amount": 4.25, "description": "one image"},
                headers={"x-api-key": app_key, "idempotency-key": f"live-{user}"},
            )
            assert r.status_code == 201, r.text
        wait_text(browser, "#balance", "45.75")
        assert "credits.changed -4.25 (imagegene)" in browser.find_element(By.ID, "log").text
        shot(browser, "live-balance")
        # Really another origin: the page came from the frontend, its calls went to Ku.
        assert not frontend.startswith(ku.url) and browser.current_url.startswith(frontend)
        calls = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        assert ku.url + "/v1/events/tickets" in calls, calls
        stream = browser.execute_script("return window.streamUrl")
        assert stream.startswith(ku.url + "/v1/events?ticket=kuet_"), stream

    def test_an_origin_cors_does_not_allow_cannot_read_anything(
        self, ku: Ku, stranger_origin: str, browser: Any
    ):
        from selenium.webdriver.common.by import By

        user = ku.user()
        browser.get(live_balance_url(stranger_origin, ku, user))
        wait_text(browser, "#state", "failed", timeout=30)
        assert browser.find_element(By.ID, "balance").text == "…"
