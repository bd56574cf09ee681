"""`ku up` and `Suite`: real processes against this run's test database and Redis prefix."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO

import asyncpg
import httpx
import pytest

from services.kit.principal import parse_keys
from services.kit.runner import Suite, SuiteError, available_processes, free_port
from services.kit.testing.plugin import principal_headers

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def admin() -> dict[str, str]:
    """Penora's first-party key with every ledger scope (enough to set a user up)."""
    scopes = ("users:any", "users:write", "ledger:read", "ledger:write", "ledger:grant")
    return {
        **principal_headers("app", audience="ledger", app="penora", scopes=scopes),
        "Idempotency-Key": uuid.uuid4().hex,
    }


@pytest.fixture(scope="module")
def suite(ku_database_url: str) -> Iterator[Suite]:
    env = {**os.environ, "KU_WORKER_SWEEP_SECONDS": "2"}
    with Suite(env, only=["ledger", "worker"], free_ports=True, quiet=True) as running:
        yield running


class TestSuite:
    def test_processes_answer_ready_and_health(self, suite: Suite) -> None:
        assert set(suite.urls) == {"ledger", "worker"}
        for name, url in suite.urls.items():
            ready = httpx.get(url + "/ready", timeout=5)
            assert ready.status_code == 200, (name, ready.text)
            assert ready.json()["status"] == "ok"
            health = httpx.get(url + "/health", timeout=5)
            assert health.status_code == 200, (name, health.text)
            assert health.json()["service"] == name

    def test_children_share_the_suite_environment(self, suite: Suite) -> None:
        assert suite.env["KU_DATABASE_URL"] == os.environ["KU_DATABASE_URL"]
        assert suite.env["KU_PRINCIPAL_KEYS"] == os.environ["KU_PRINCIPAL_KEYS"]
        assert suite.env["KU_LEDGER_URL"] == suite.urls["ledger"]
        # Services outside the suite point nowhere, never at the default ports.
        assert suite.env["KU_AUTH_URL"] != "http://127.0.0.1:8001"
        with pytest.raises(httpx.ConnectError):
            httpx.get(suite.env["KU_AUTH_URL"] + "/health", timeout=2)
        assert not suite.generated_secret
        # A signed principal from this process is accepted by the child: same secret.
        r = httpx.get(
            suite.urls["ledger"] + "/v1/ledger/balance",
            params={"user_id": "100000000000000000001"},
            headers=admin(),
            timeout=5,
        )
        assert r.status_code in (200, 404), r.text

    async def test_worker_cron_expires_a_hold(self, suite: Suite, new_user_id) -> None:
        user_id = new_user_id()
        async with httpx.AsyncClient(base_url=suite.urls["ledger"], timeout=10) as ledger:
            r = await ledger.post(
                "/v1/ledger/accounts", json={"user_id": user_id, "welcome": False},
                headers=admin(),
            )  # fmt: skip
            assert r.status_code in (200, 201), r.text
            r = await ledger.post(
                "/v1/ledger/grants",
                json={"user_id": user_id, "amount": 5, "source": "promo"},
                headers=admin(),
            )
            assert r.status_code == 201, r.text
            r = await ledger.post(
                "/v1/ledger/holds",
                json={"user_id": user_id, "amount": 2, "ttl_seconds": 1},
                headers=admin(),
            )
            assert r.status_code == 201, r.text
            hold_id = r.json()["hold"]["id"]

        # Only the job (or a later operation on this user, which we never make) moves
        # the row: GET would report an expired-by-TTL hold as expired without it.
        conn = await asyncpg.connect(suite.env["KU_DATABASE_URL"])
        try:
            status = None
            deadline = time.monotonic() + 20  # the sweep runs every 2 s here
            while time.monotonic() < deadline:
                status = await conn.fetchval(
                    "SELECT status FROM ledger.holds WHERE id = $1", uuid.UUID(hold_id)
                )
                if status == "expired":
                    break
                await asyncio.sleep(0.5)
        finally:
            await conn.close()
        assert status == "expired", suite.logs("worker")
        async with httpx.AsyncClient(timeout=5) as client:
            stats = (await client.get(suite.urls["worker"] + "/health")).json()["jobs"]
        assert stats["ledger.expire_holds"]["runs"] >= 1
        assert stats["ledger.expire_holds"]["failures"] == 0


class TestFreePort:
    def test_never_hands_out_a_port_twice(self) -> None:
        # The kernel gives a just-released port to a later bind(0) often enough that
        # 2,000 draws from its ~28,000 ephemeral ports repeat dozens of times; two
        # services of one suite on one port lose one of them at bind.
        ports = [free_port() for _ in range(2000)]
        assert len(set(ports)) == len(ports)


class _Stranger(BaseHTTPRequestHandler):
    """Another process's server: ready, and naming itself auth."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = b'{"status": "ok", "service": "auth"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class TestSuiteErrors:
    def test_a_port_another_process_answers_is_refused(self) -> None:
        # The ledger's port is held by a stranger that answers GET /ready: the ledger
        # dies at bind, and without the identity check the suite would start "ready".
        port = free_port()
        stranger = ThreadingHTTPServer(("127.0.0.1", port), _Stranger)
        thread = threading.Thread(target=stranger.serve_forever, daemon=True)
        thread.start()
        try:
            env = {**os.environ, "KU_LEDGER_PORT": str(port)}
            suite = Suite(env=env, only=["ledger"], quiet=True, migrate=False)
            with pytest.raises(SuiteError, match="port .* is answered by auth"), suite:
                pass
            assert all(p.poll() is not None for p in suite.processes.values())
        finally:
            stranger.shutdown()
            stranger.server_close()

    def test_unknown_process_is_refused_before_anything_starts(self) -> None:
        suite = Suite(only=["ledger", "nope"], free_ports=True, quiet=True, migrate=False)
        with pytest.raises(SuiteError, match="nope"), suite:
            pass
        assert suite.processes == {}

    def test_production_requires_principal_keys(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KU_PRINCIPAL_")}
        env["KU_ENVIRONMENT"] = "production"
        suite = Suite(env=env, only=["worker"], free_ports=True, quiet=True, migrate=False)
        with pytest.raises(SuiteError, match="KU_PRINCIPAL_KEYS"), suite:
            pass
        assert suite.processes == {}

    def test_development_gets_a_key_pair_per_process(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KU_PRINCIPAL_")}
        env["KU_ENVIRONMENT"] = "development"
        env["KU_WORKER_SERVICES"] = "ledger"
        suite = Suite(env=env, only=["worker"], free_ports=True, quiet=True, migrate=False)
        suite.env = suite._prepare_env()
        public = parse_keys(suite.env["KU_PRINCIPAL_KEYS"])
        assert {"gateway", "ledger", "auth", "workspace"} <= set(public)
        assert suite.generated_secret
        # Each child holds only its own private key: a service cannot sign as the gateway.
        assert set(parse_keys(suite._child_env("ledger")["KU_PRINCIPAL_SIGNING_KEYS"])) == {
            "ledger"
        }
        assert set(parse_keys(suite._child_env("gateway")["KU_PRINCIPAL_SIGNING_KEYS"])) == {
            "gateway"
        }
        assert set(parse_keys(suite._child_env("worker")["KU_PRINCIPAL_SIGNING_KEYS"])) == {
            "ledger"
        }

    def test_every_existing_service_can_be_planned(self) -> None:
        names = available_processes()
        assert "ledger" in names and "worker" in names


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(p) for p in text)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (reaped by its parent later, or by init).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class _KuUp:
    """`ku up --only ledger worker` in a subprocess, its output collected by threads."""

    def __init__(self) -> None:
        self.ports = {"ledger": free_port(), "worker": free_port()}
        env = {**os.environ, "KU_LEDGER_PORT": str(self.ports["ledger"]),
               "KU_WORKER_PORT": str(self.ports["worker"])}  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up", "--only", "ledger", "worker"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: IO[str], into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def wait_up(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while "Ku is up:\n" not in self.out:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError("ku up did not come up:\n" + "".join(self.err[-30:]))
            time.sleep(0.1)

    def finish(self, timeout: float = 30) -> tuple[int, str, str]:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("ku up did not stop:\n" + "".join(self.err[-30:])) from None
        for reader in self._readers:
            reader.join(5)
        return code, "".join(self.out), "".join(self.err)


class TestKuUp:
    def test_a_dying_process_stops_the_suite_with_an_error(self, ku_database_url: str) -> None:
        up = _KuUp()
        up.wait_up()
        children = _children(up.proc.pid)
        worker = next(p for p in children if "services.worker" in _cmdline(p))
        others = [p for p in children if p != worker]
        assert others, children
        os.kill(worker, signal.SIGKILL)

        code, out, err = up.finish()
        assert code != 0
        assert "worker exited" in err
        assert not any(_alive(p) for p in others)

    def test_sigterm_stops_everything_cleanly(self, ku_database_url: str) -> None:
        up = _KuUp()
        up.wait_up()
        children = _children(up.proc.pid)
        assert len(children) == 2
        up.proc.send_signal(signal.SIGTERM)

        code, out, err = up.finish()
        assert code == 0, err[-2000:]
        assert "ledger | " in out  # prefixed child output (the worker logs at WARNING here)
        assert f"http://127.0.0.1:{up.ports['ledger']}" in out  # the printed URLs
        assert not any(_alive(p) for p in children)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{up.ports['ledger']}/health", timeout=1)


def client_echo_app() -> object:
    """A factory for uvicorn: answers with the client address uvicorn gave the app."""

    async def app(scope: dict, receive: object, send: object) -> None:
        if scope["type"] != "http":
            return
        body = str(scope["client"][0]).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": body})  # type: ignore[operator]

    return app


def test_processes_do_not_take_the_client_address_from_x_forwarded_for() -> None:
    """Every process runs uvicorn as `ku up` starts it; uvicorn's own proxy-header
    handling is off, so a loopback client cannot name the address the gateway's per-IP
    limits count against: only the gateway's rule (KU_GATEWAY_TRUST_FORWARDED) decides."""
    from services.kit.runner import _uvicorn

    port = free_port()
    argv = _uvicorn("tests.kit.test_runner:client_echo_app", "127.0.0.1", port)
    child = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            try:
                answer = httpx.get(
                    f"http://127.0.0.1:{port}/", headers={"X-Forwarded-For": "203.0.113.9"}
                )
                break
            except httpx.TransportError:
                time.sleep(0.05)
        else:
            raise AssertionError("uvicorn did not start")
        assert answer.text == "127.0.0.1"
    finally:
        child.terminate()
        child.wait(10)
