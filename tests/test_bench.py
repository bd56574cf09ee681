"""What the README says of the benches' set-up (they run outside the suite: too slow,
and their figures belong to a quiet machine)."""

from __future__ import annotations

import importlib
import subprocess
from typing import Any

import pytest

from services.kit.runner import HTTP_PROTOCOL


def test_bench_ledger_runs_two_ledger_processes_unless_set(monkeypatch) -> None:
    import bench.ledger

    monkeypatch.delenv("KU_LEDGER_PROCESSES", raising=False)
    assert importlib.reload(bench.ledger).PROCESSES == 2
    monkeypatch.setenv("KU_LEDGER_PROCESSES", "1")
    assert importlib.reload(bench.ledger).PROCESSES == 1


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
