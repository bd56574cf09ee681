"""The embedded default: no KU_DATABASE_URL / KU_REDIS_URL, private servers under `.ku/`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import asyncio, os, sys
    from pathlib import Path

    import asyncpg
    from redis import Redis

    from services.kit.embedded import ensure_urls

    servers = ensure_urls(Path(".ku"))
    try:
        database_url, redis_url = os.environ["KU_DATABASE_URL"], os.environ["KU_REDIS_URL"]
        print("DATABASE", database_url, flush=True)
        print("REDIS", redis_url, flush=True)

        async def select_one():
            conn = await asyncpg.connect(database_url)
            try:
                return await conn.fetchval("SELECT 1")
            finally:
                await conn.close()

        print("SELECT", asyncio.run(select_one()), flush=True)
        print("PING", Redis.from_url(redis_url, socket_timeout=5).ping(), flush=True)
        print("PGPID", servers._pg.get_pid() if servers._pg else None, flush=True)
        print("REDISPID", servers._redis.pid, flush=True)
    finally:
        servers.stop()
    """
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_embedded_servers_start_answer_and_stop(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("KU_DATABASE_URL", "KU_REDIS_URL")}
    env["PYTHONPATH"] = str(ROOT)
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)

    # PostgreSQL on a unix socket inside .ku/, Redis on loopback.
    assert f"host={tmp_path.resolve() / '.ku'}" in lines["DATABASE"]
    assert lines["REDIS"].startswith("redis://127.0.0.1:")
    assert lines["SELECT"] == "1"
    assert lines["PING"] == "True"
    assert (tmp_path / ".ku" / "pgdata").is_dir()
    assert elapsed < 20, f"embedded servers took {elapsed:.1f} s"

    # Both are gone afterwards.
    deadline = time.monotonic() + 5
    pids = [int(lines[k]) for k in ("PGPID", "REDISPID") if lines.get(k, "None") != "None"]
    assert pids
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)
