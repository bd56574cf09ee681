"""A whole suite as the client's and the console's tests drive it: keys and users made
with the `ku` CLI, as an operator would, through the suite's gateway."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

from services.kit.runner import Suite
from services.kit.testing.plugin import ku_cli
from tests.gateway.helpers import new_user_id


def wait_for_account(gateway: str, key: str, user_id: str) -> None:
    """The ledger opens the account from the `user.created` event: wait until it has."""
    with httpx.Client(base_url=gateway, headers={"x-api-key": key}, timeout=10) as http:
        for _ in range(150):
            r = http.get("/v1/ledger/balance", params={"user_id": user_id})
            if r.status_code == 200:
                return
            time.sleep(0.1)
    raise AssertionError(f"no ledger account for {user_id} after 15 s")


@dataclass
class Ku:
    suite: Suite
    _reader: str | None = None

    @property
    def url(self) -> str:
        return self.suite.urls["gateway"]

    def cli(self, *args: str) -> str:
        return ku_cli(self.suite.env, *args)

    def key(self, app: str, scopes: str) -> str:
        """A key from `ku keys create`; Penora's and ImageGene's (and this suite's own
        reader) are first-party (`users:any`), as they are issued in production."""
        if app in ("penora", "imagegene", "test-reader") and "users:any" not in scopes:
            scopes += ",users:any"
        return self.cli("keys", "create", "--app", app, "--scopes", scopes)

    def user(self) -> str:
        """A new user with the welcome credits (50 Ku), once the ledger has opened it."""
        user_id = new_user_id()
        self.cli("users", "create", "--id", user_id, "--email", f"{user_id}@example.com")
        wait_for_account(self.url, self.reader(), user_id)
        return user_id

    def reader(self) -> str:
        if self._reader is None:
            self._reader = self.key("test-reader", "ledger:read")
        return self._reader
