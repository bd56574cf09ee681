"""The network guard holds in the processes the tests start, not only in this one.

Each child here runs with `netguard.child_env` (as the suite's processes do) and its own
log file. A child first checks that the guard is installed and exits otherwise, so even
a broken set-up never sends a packet off this host."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.enhancement import netguard
from tests.enhancement.conftest import CHILD_GUARD_LOG, Enh, take_child_violations
from tests.enhancement.test_flow import kinds, post_task

NOT_GUARDED = 3
PREAMBLE = f"""
import socket, sys
if not getattr(socket.socket.connect, {netguard.MARK!r}, False):
    sys.exit({NOT_GUARDED})
"""


def run_guarded(code: str, log: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PREAMBLE + textwrap.dedent(code)],
        env=netguard.child_env(dict(os.environ), str(log)),
        capture_output=True,
        text=True,
        timeout=60,
    )


def recorded(log: Path) -> list[list[str]]:
    return [v["address"] for v in netguard.violations(str(log))]


class TestGuardedChild:
    def test_plain_socket_to_a_private_address_is_refused_and_recorded(self, tmp_path: Path):
        log = tmp_path / "guard.log"
        done = run_guarded(
            """
            s = socket.socket()
            s.settimeout(2)
            try:
                s.connect(("10.255.255.1", 9))
            except ConnectionRefusedError as exc:
                print(type(exc).__name__)
            else:
                print("connected")
            """,
            log,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "GuardViolation"
        assert recorded(log) == [["10.255.255.1", "9"]]

    def test_connect_ex_and_ipv6_are_refused_too(self, tmp_path: Path):
        log = tmp_path / "guard.log"
        done = run_guarded(
            """
            for family, address in ((socket.AF_INET, ("10.255.255.1", 9)),
                                    (socket.AF_INET6, ("::1", 9))):
                s = socket.socket(family)
                try:
                    s.connect_ex(address)
                except ConnectionRefusedError:
                    print("refused")
            """,
            log,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["refused", "refused"]
        assert [a[0] for a in recorded(log)] == ["10.255.255.1", "::1"]

    def test_the_services_event_loop_and_http_client_are_guarded(self, tmp_path: Path):
        # What a service runs on: uvicorn's loop choice (asyncio's, uvloop is kept out)
        # and httpx, the enhancement service's client; plus the stub DNS.
        log = tmp_path / "guard.log"
        done = run_guarded(
            """
            import asyncio, httpx
            from uvicorn.loops.auto import auto_loop_factory
            try:
                import uvloop
                print("uvloop importable")
            except ImportError:
                pass
            print(socket.getaddrinfo("private.test", 80)[0][4][0])
            try:
                socket.getaddrinfo("nowhere.test", 80)
            except socket.gaierror:
                print("no such test host")

            async def main():
                async with httpx.AsyncClient(trust_env=False) as client:
                    try:
                        await client.get("http://10.255.255.1:9/", timeout=2)
                    except httpx.ConnectError:
                        print("httpx refused")
                try:
                    await asyncio.open_connection("public.test", 80)
                except ConnectionRefusedError:
                    print("asyncio refused")

            loop = auto_loop_factory()()
            print(type(loop).__module__)
            loop.run_until_complete(main())
            """,
            log,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split("\n")[:-1] == [
            "10.1.2.3",
            "no such test host",
            "asyncio.unix_events",
            "httpx refused",
            "asyncio refused",
        ]
        assert [a[0] for a in recorded(log)] == ["10.255.255.1", "93.184.215.14"]

    def test_the_enhancement_fetcher_in_a_child(self, tmp_path: Path):
        # The service's own fetcher, run in a guarded child: a host that resolves to a
        # public address passes the SSRF check, and the guard stops the connection.
        log = tmp_path / "guard.log"
        done = run_guarded(
            """
            import asyncio
            from services.enhancement.images import FetchPolicy, SafeFetcher
            from services.kit.errors import KuError

            async def main():
                f = SafeFetcher(FetchPolicy(1024, 5, 3, 1000))
                try:
                    await f.fetch("http://public.test/image.png")
                except KuError as exc:
                    print(exc.code)
                finally:
                    await f.aclose()

            asyncio.run(main())
            """,
            log,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "input_unreachable"
        assert recorded(log) == [["93.184.215.14", "80"]]

    def test_loopback_is_allowed(self, tmp_path: Path):
        log = tmp_path / "guard.log"
        done = run_guarded(
            """
            server = socket.socket()
            server.bind(("127.0.0.1", 0))
            server.listen()
            client = socket.create_connection(server.getsockname(), timeout=2)
            print("connected")
            """,
            log,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "connected"
        assert recorded(log) == []


@pytest.mark.e2e
class TestSuiteChildren:
    def test_every_suite_process_runs_guarded(self, enh: Enh):
        assert enh.worker.proc is not None
        pids = [p.pid for p in enh.suite.processes.values()] + [enh.worker.proc.pid]
        assert len(pids) == 6  # auth, ledger, workspace, enhancement, gateway; the worker
        for pid in pids:
            raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            env = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
            assert env[netguard.LOG_ENV] == CHILD_GUARD_LOG
            assert env["PYTHONPATH"].split(os.pathsep)[0] == str(netguard.CHILD_DIR)

    async def test_the_enhancement_service_is_stopped_by_the_guard(self, enh: Enh):
        # Through the gateway: public.test resolves (the child's stub DNS) to a public
        # address, which passes the SSRF rule; the guard in the service refuses the
        # connection and records it, with the service's pid.
        user = await enh.new_user()
        r = await post_task(enh, user, image_url="http://public.test/image.png")
        assert r.status_code == 422 and r.json()["error"]["code"] == "input_unreachable", r.text
        service = enh.suite.processes["enhancement"].pid
        assert take_child_violations() == [{"pid": service, "address": ["93.184.215.14", "80"]}]
        assert kinds(await enh.journal(user)) == []  # nothing held
