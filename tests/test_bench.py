"""What the README says of the benches' set-up (they run outside the suite: too slow,
and their figures belong to a quiet machine)."""

from __future__ import annotations

import importlib
import subprocess
from typing import Any

import pytest

from services.kit.runner import HTTP_PROTOCOL


def test_bench_ledger_runs_one_ledger_process_unless_set(monkeypatch) -> None:
    import bench.ledger

    monkeypatch.delenv("KU_LEDGER_PROCESSES", raising=False)
    assert importlib.reload(bench.ledger).PROCESSES == 1
    monkeypatch.setenv("KU_LEDGER_PROCESSES", "2")
    assert importlib.reload(bench.ledger).PROCESSES == 2


@pytest.mark.parametrize("processes", [1, 2])
def test_services_start_as_ku_up_starts_them(monkeypatch, processes: int) -> None:
    from bench import _common

    started: list[list[str]] = []

    def popen(argv: list[str], **_: Any) -> Any:
        started.append(argv)
        return None

    monkeypatch.setattr(subprocess, "Popen", popen)
    _common.start_service("services.ledger.app", 9, {}, processes=processes)
    (argv,) = started
    assert argv[argv.index("--http") + 1] == HTTP_PROTOCOL
    assert argv[argv.index("--workers") + 1] == str(processes)


async def test_the_floor_app_answers_like_a_debit_and_ready() -> None:
    """bench/ledger.py's floor case counts 201s from bench/_floor.py, served as the ledger
    is; wait_ready needs its 200 at /ready."""
    import json

    import httpx

    from bench._floor import create_app

    transport = httpx.ASGITransport(app=create_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://floor") as client:
        assert (await client.get("/ready")).status_code == 200
        r = await client.post("/v1/ledger/debits", json={"user_id": "u", "amount": 1})
        assert r.status_code == 201
        assert json.loads(r.content)["amount"] == "1.000"


def test_machine_busy_is_a_share_of_the_cores() -> None:
    import time

    from bench._common import MachineBusy

    with MachineBusy() as busy:
        end = time.perf_counter() + 0.2
        while time.perf_counter() < end:  # one core busy for 20 ticks: the share is above 0
            pass
    assert 0 < busy.busy <= 1
    assert busy.line().startswith("; machine ")
