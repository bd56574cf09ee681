"""Real processes (auth, ledger, workspace, generation, gateway) on free ports, against
this run's database and Redis prefix, with the generation service pointed at a fake
OpenAI-compatible provider on 127.0.0.1. Users, keys and credit are made the way
operators and apps make them: the `ku` CLI, the ledger's API with an admin principal."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest

from services.kit.runner import Suite
from services.kit.testing.plugin import ku_cli, principal_headers
from tests.gateway.helpers import SigningKey, make_signing_key, new_user_id
from tests.generation.fake_provider import FakeProvider

# Small timeouts so a stall is seen in seconds, not the production 60 s.
PROVIDER_TIMEOUT = 2.0
STORY_LEASE = 2.0

MODELS = [
    # provider "fake": /v1 on the fake server; "fake-b": /b/v1 (another provider).
    {"id": "fake-small", "upstream": "answer", "provider": "fake", "multiplier_milli": 1000},
    {"id": "fake-pricey", "upstream": "answer", "provider": "fake-b", "multiplier_milli": 1500},
    {
        "id": "fake-broken",
        "upstream": "always-500",
        "provider": "fake",
        "multiplier_milli": 1000,
        "fallback": ["fake-pricey"],
    },
    {"id": "fake-500", "upstream": "always-500", "provider": "fake", "multiplier_milli": 1000},
    {"id": "fake-stall", "upstream": "always-stall", "provider": "fake", "multiplier_milli": 1000},
    {
        "id": "fake-short",
        "upstream": "answer",
        "provider": "fake",
        "multiplier_milli": 1000,
        "max_words": 100,
    },
]


def generation_env(fake: FakeProvider) -> dict[str, str]:
    return {
        "KU_GENERATION_PROVIDERS": orjson.dumps(
            {
                "fake": {"base_url": f"{fake.url}/v1", "api_key": "fake-key"},
                "fake-b": {"base_url": f"{fake.url}/b/v1", "api_key": "fake-key-b"},
            }
        ).decode(),
        "KU_GENERATION_MODELS": orjson.dumps(MODELS).decode(),
        "KU_GENERATION_TIMEOUT_SECONDS": str(PROVIDER_TIMEOUT),
        "KU_GENERATION_RETRIES": "1",
        "KU_GENERATION_BACKOFF_SECONDS": "0.05",
        # The breaker has its own tests; here every request must reach the fake.
        "KU_GENERATION_BREAKER_FAILURES": "100000",
        "KU_GENERATION_STORY_LEASE_SECONDS": str(STORY_LEASE),
    }


@dataclass
class Env:
    suite: Suite
    signing: SigningKey
    fake: FakeProvider
    # A generation process started in place of a killed one (stopped with the session).
    replacements: list[Suite] = field(default_factory=list)

    def restart_generation(self) -> None:
        """SIGKILL the generation process (as a crash would), start a new one on its port."""
        current = (self.replacements[-1] if self.replacements else self.suite).processes
        proc = current["generation"]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        replacement = Suite(
            self.suite.env, only=["generation"], migrate=False, quiet=True, ready_timeout=60
        )
        replacement.start()
        self.replacements.append(replacement)

    @property
    def gateway(self) -> str:
        return self.suite.urls["gateway"]

    @property
    def ledger(self) -> str:
        return self.suite.urls["ledger"]

    def ku(self, *args: str) -> str:
        return ku_cli(self.suite.env, *args)

    def new_key(self, app: str, scopes: str) -> str:
        """A key from `ku keys create`; Penora's and ImageGene's are first-party."""
        if app in ("penora", "imagegene") and "users:any" not in scopes:
            scopes += ",users:any"
        return self.ku("keys", "create", "--app", app, "--scopes", scopes)

    def link(self, user_id: str, app: str) -> None:
        """Link a user to a partner app as an admin would (auth emits `user.linked`), and
        wait until the ledger knows it."""
        admin = principal_headers("app", audience="auth", app="ops", scopes=("admin",))
        auth = self.suite.urls["auth"]
        r = httpx.post(
            f"{auth}/v1/users",
            json={"user_id": user_id, "email": f"{user_id}@example.com"},
            headers=admin,
        )
        assert r.status_code in (200, 201), r.text
        r = httpx.post(f"{auth}/v1/users/{user_id}/apps", json={"app": app}, headers=admin)
        assert r.status_code == 200, r.text
        partner = principal_headers("app", audience="ledger", app=app, scopes=("ledger:read",))
        # Normally well under a second. The bound covers an entry delivered to another
        # suite's ledger in the same consumer group that does not handle it: the group's
        # reclaim takes it back after 30 s idle, looking every ~30 s (services/kit/bus.py).
        for _ in range(900):
            r = httpx.get(
                f"{self.ledger}/v1/ledger/balance", params={"user_id": user_id}, headers=partner
            )
            if r.status_code == 200:
                return
            time.sleep(0.1)
        raise AssertionError(f"{user_id} never linked to {app}: {r.text}")

    def user_token(self, user_id: str, scope: str = "generate ledger:read", **claims: Any) -> str:
        return self.signing.token(user_id, scope=scope, **claims)

    def funded_user(self, amount: int | float = 10) -> str:
        """A new user with an account and `amount` Ku of credit (no welcome grant)."""
        user_id = new_user_id()
        admin = operator()
        with httpx.Client(base_url=self.ledger, timeout=10) as ledger:
            r = ledger.post(
                "/v1/ledger/accounts", json={"user_id": user_id, "welcome": False}, headers=admin
            )
            assert r.status_code == 201, r.text
            if amount:
                r = ledger.post(
                    "/v1/ledger/grants",
                    json={"user_id": user_id, "amount": amount, "source": "promo"},
                    headers={**admin, "Idempotency-Key": uuid.uuid4().hex},
                )
                assert r.status_code == 201, r.text
        return user_id

    def call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """A plain blocking request (setup and checks around the async calls under test)."""
        return httpx.request(method, url, timeout=30, **kwargs)

    def balance(self, user_id: str) -> dict[str, Any]:
        admin = operator()
        r = httpx.get(
            f"{self.ledger}/v1/ledger/balance", params={"user_id": user_id}, headers=admin
        )
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def journal(self, user_id: str) -> list[dict[str, Any]]:
        """The user's ledger transactions, oldest first."""
        admin = operator()
        r = httpx.get(
            f"{self.ledger}/v1/ledger/transactions",
            params={"user_id": user_id, "limit": 200},
            headers=admin,
        )
        assert r.status_code == 200, r.text
        return list(reversed(r.json()["items"]))


def operator() -> dict[str, str]:
    """Penora's first-party key with every ledger scope, at the ledger: what setting a
    user up and reading their journal need (not an admin: admins must give reasons)."""
    scopes = ("users:any", "users:write", "ledger:read", "ledger:write", "ledger:grant")
    return principal_headers("app", audience="ledger", app="penora", scopes=scopes)


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeProvider]:
    with FakeProvider() as server:
        yield server


@pytest.fixture(scope="session")
def gen(ku_database_url: str, fake: FakeProvider) -> Iterator[Env]:
    signing = make_signing_key()
    env = {
        **os.environ,
        "KU_DATABASE_URL": ku_database_url,
        "KU_AUTH_PRIVATE_KEY": signing.private_pem,
        "KU_AUTH_KEY_ID": signing.kid,
        "KU_LOG_LEVEL": "WARNING",
        **generation_env(fake),
    }
    with Suite(
        env,
        only=["auth", "ledger", "workspace", "generation", "gateway"],
        free_ports=True,
        migrate=False,
        quiet=True,
        ready_timeout=60,
    ) as suite:
        running = Env(suite, signing, fake)
        try:
            yield running
        finally:
            for replacement in running.replacements:
                replacement.stop()


@pytest.fixture(autouse=True)
def _fresh_fake(fake: FakeProvider) -> None:
    fake.reset()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On a failure, show what the generation service (and the ledger and auth, whose
    events and holds it depends on) logged: their errors say why."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    env = item.funcargs.get("gen") if hasattr(item, "funcargs") else None
    if report.failed and isinstance(env, Env):
        suite = env.replacements[-1] if env.replacements else env.suite
        report.sections.append(("generation log", "\n".join(suite.logs("generation")[-60:])))
        for name in ("ledger", "auth"):
            report.sections.append((f"{name} log", "\n".join(env.suite.logs(name)[-30:])))
