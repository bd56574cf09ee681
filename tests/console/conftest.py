"""A real suite for the console (auth, ledger, workspace and the gateway as processes),
a headless Chromium (Debian's `chromium` + `chromium-driver`, installed here when
missing) driven by selenium for the browser tests, and a frontend on another origin
(tests/console/frontend/, served from its own loopback port, the one origin the
gateway's CORS allows)."""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from jose import jwt

from services.kit.runner import Suite
from services.kit.runner import free_port as _free_port
from tests.gateway.helpers import make_signing_key
from tests.ku_suite import Ku
from tests.ledger.billing.fake_razorpay import FakeRazorpay

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / ".artifacts" / "console"
FRONTEND = Path(__file__).resolve().parent / "frontend"
# The main site's HS256 SSO secret, as this suite's auth is configured.
SSO_SECRET = "console-sso-shared-secret-0123456789abcdef"


def sso_token(user_id: str) -> str:
    """What the main site's sign-in hands a frontend: its own JWT for the user."""
    now = int(time.time())
    claims = {"sub": user_id, "email": f"{user_id}@example.com", "iat": now, "exp": now + 600}
    return str(jwt.encode(claims, SSO_SECRET, algorithm="HS256"))


@pytest.fixture(scope="package")
def frontend_origin() -> str:
    return f"http://127.0.0.1:{_free_port()}"


@contextmanager
def serve_frontend(port: int = 0) -> Iterator[str]:
    """tests/console/frontend/ served on its own loopback origin (a plain static server)."""
    with serve_directory(FRONTEND, port) as origin:
        yield origin


@contextmanager
def serve_directory(directory: Path, port: int = 0) -> Iterator[str]:
    """A directory's files over HTTP on a loopback port: a plain static server."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="package")
def frontend(frontend_origin: str) -> Iterator[str]:
    """The frontend on the one origin the gateway's CORS allows."""
    with serve_frontend(int(frontend_origin.rsplit(":", 1)[1])) as origin:
        yield origin


@contextmanager
def razorpay_in_a_thread() -> Iterator[FakeRazorpay]:
    """The fake Razorpay (tests/ledger/billing), on its own event loop in a thread: a
    suite's ledger talks to it over HTTP, the tests pay orders there."""
    fake = FakeRazorpay(
        key_id="rzp_test_" + secrets.token_hex(6),
        key_secret=secrets.token_urlsafe(18),
        webhook_secret=secrets.token_urlsafe(18),
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(fake.start(), loop).result(timeout=10)
    try:
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()


def razorpay_env(fake: FakeRazorpay) -> dict[str, str]:
    """A suite's settings for the fake Razorpay."""
    return {
        "KU_RAZORPAY_KEY_ID": fake.key_id,
        "KU_RAZORPAY_KEY_SECRET": fake.key_secret,
        "KU_RAZORPAY_WEBHOOK_SECRET": fake.webhook_secret,
        "KU_RAZORPAY_BASE_URL": fake.url,
    }


@pytest.fixture(scope="package")
def razorpay() -> Iterator[FakeRazorpay]:
    with razorpay_in_a_thread() as fake:
        yield fake


@pytest.fixture(scope="package")
def ku(ku_database_url: str, frontend_origin: str, razorpay: FakeRazorpay) -> Iterator[Ku]:
    signing = make_signing_key()
    env = {
        **os.environ,
        "KU_DATABASE_URL": ku_database_url,
        "KU_AUTH_PRIVATE_KEY": signing.private_pem,
        "KU_AUTH_KEY_ID": signing.kid,
        "KU_SSO_HS256_SECRET": SSO_SECRET,
        # The frontend's origin, and only it, may call the gateway from a browser.
        "KU_CORS_ORIGINS": frontend_origin,
        **razorpay_env(razorpay),
        # One enhancement provider, so it has a pool (never called: no task runs here).
        "KU_ENHANCEMENT_FAL_URL": "http://127.0.0.1:9/fal",
        "KU_LOG_LEVEL": "WARNING",
        # Small pools: the test server's connections are shared with every other run.
        "KU_DB_POOL_SIZE": "2",
        "KU_DB_MAX_OVERFLOW": "2",
        "KU_WRITE_POOL_SIZE": "2",
        "KU_GENERATION_RECORDS_POOL_SIZE": "2",
    }
    with Suite(
        env,
        only=["auth", "ledger", "workspace", "generation", "enhancement", "gateway"],
        free_ports=True,
        migrate=False,
        quiet=True,
        ready_timeout=45,
    ) as suite:
        yield Ku(suite)


@pytest.fixture(scope="package")
def admin_key(ku: Ku) -> str:
    return ku.key("ops", "admin")


def _install_chromium() -> str | None:
    """Paths are found, or installed from Debian; the reason when neither is possible."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return None
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return "chromium/chromium-driver missing and apt-get (as root) is not available"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            return f"`{' '.join(command)}` failed: {done.stderr[-500:]}"
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return None
    return "chromium installed but not on PATH"


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    reason = _install_chromium()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-sync",
    ):
        options.add_argument(flag)
    # The DevTools network log: what the browser really fetched (test_browser.py).
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()
