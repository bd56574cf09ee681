"""The network guard of the enhancement tests, for this process and for the children.

`guarded(record)` wraps `socket.socket.connect`/`connect_ex` and `socket.getaddrinfo`:
a connection to any address outside 127.0.0.0/8 is recorded and refused (before the
real connect is ever called), and the test hostnames of `STUB_DNS` resolve through
the stub, never through real DNS (other `.test`, `.example`, `.invalid` names do not
resolve at all).

This process installs it with pytest's monkeypatch (`conftest.loopback_only`). The
processes the tests start (services, worker, `ku` CLI) load it from
`childguard/sitecustomize.py`, put first on their PYTHONPATH by `child_env`: Python
imports `sitecustomize` at startup, before any code under test. A child records each
refused address as a JSON line in the file named by `KU_TEST_NET_GUARD_LOG`, which the
fixtures read at teardown. A child also runs on asyncio's own event loop, not uvloop:
uvloop connects in C, where no Python-level guard can see the connection.

Standard library only (a child loads it by path, before its sys.path is complete).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
# Test hostnames and what they "resolve" to.
STUB_DNS = {
    "private.test": "10.1.2.3",
    "metadata.test": "169.254.169.254",
    "public.test": "93.184.215.14",  # public: the guard must stop any attempt to reach it
    "loopback.test": "127.0.0.1",
}
LOG_ENV = "KU_TEST_NET_GUARD_LOG"
CHILD_DIR = Path(__file__).with_name("childguard")
MARK = "__ku_net_guard__"


class GuardViolation(ConnectionRefusedError):
    """Refuses the connection like a closed port would; the recorded violation then
    fails the test at teardown, whatever the code under test did with the error."""


def guarded(
    record: Callable[[Any], None],
    connect: Callable[..., Any] | None = None,
    connect_ex: Callable[..., Any] | None = None,
    getaddrinfo: Callable[..., Any] | None = None,
) -> dict[str, Callable[..., Any]]:
    """Guarded versions of the three functions (the current ones by default)."""
    real_connect = connect or socket.socket.connect
    real_connect_ex = connect_ex or socket.socket.connect_ex
    real_getaddrinfo = getaddrinfo or socket.getaddrinfo

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])
            if ip.version != 4 or ip not in LOOPBACK:
                record(address)
                raise GuardViolation(f"test guard: connection to {address} refused")

    def guarded_connect(self: socket.socket, address: Any) -> None:
        check(self, address)
        real_connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: Any) -> Any:
        check(self, address)
        return real_connect_ex(self, address)

    def guarded_getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name in STUB_DNS:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (STUB_DNS[name], port or 0))]
        if isinstance(name, str) and name.endswith((".test", ".example", ".invalid")):
            raise socket.gaierror(socket.EAI_NONAME, "stub DNS: unknown test host")
        return real_getaddrinfo(host, port, *args, **kwargs)

    for f in (guarded_connect, guarded_connect_ex, guarded_getaddrinfo):
        setattr(f, MARK, True)
    return {"connect": guarded_connect, "connect_ex": guarded_connect_ex,
            "getaddrinfo": guarded_getaddrinfo}  # fmt: skip


def install_in_child() -> None:
    """What a child's `sitecustomize` runs: the guard, recording to KU_TEST_NET_GUARD_LOG."""
    import sys

    log_path = os.environ.get(LOG_ENV, "")

    def record(address: Any) -> None:
        line = json.dumps({"pid": os.getpid(), "address": [str(a) for a in address]})
        # O_APPEND: lines of concurrent processes do not interleave.
        fd = os.open(log_path or os.devnull, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode() + b"\n")
        finally:
            os.close(fd)

    functions = guarded(record)
    socket.socket.connect = functions["connect"]  # type: ignore[method-assign]
    socket.socket.connect_ex = functions["connect_ex"]  # type: ignore[method-assign]
    socket.getaddrinfo = functions["getaddrinfo"]
    # uvicorn's `--loop auto` then takes asyncio's loop, whose sockets connect in Python.
    sys.modules["uvloop"] = None  # type: ignore[assignment]


def child_env(env: dict[str, str], log_path: str) -> dict[str, str]:
    """`env` for a guarded child: childguard first on PYTHONPATH, violations to log_path."""
    path = env.get("PYTHONPATH", "")
    return {
        **env,
        "PYTHONPATH": os.pathsep.join(p for p in (str(CHILD_DIR), path) if p),
        LOG_ENV: log_path,
    }


def violations(log_path: str, offset: int = 0) -> list[dict[str, Any]]:
    """The violations children recorded in log_path (after byte `offset`)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def log_size(log_path: str) -> int:
    try:
        return os.path.getsize(log_path)
    except FileNotFoundError:
        return 0
