"""The worker's job registry and its namespacing (the running worker is in test_runner)."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
from arq import cron

from services import worker
from services.worker import WorkerConfig, build_settings, collect, queue_name


async def noop(ctx: dict) -> int:
    return 1


async def enqueued(ctx: dict, x: int) -> int:
    return x


async def startup(ctx: dict) -> None:
    ctx["started"] = True


@pytest.fixture
def fake_service(monkeypatch: pytest.MonkeyPatch) -> str:
    """A service `zzfake` whose tasks module registers jobs the documented way."""
    tasks = types.ModuleType("services.zzfake.tasks")
    tasks.CRON_JOBS = [cron(noop, name="zzfake.noop", minute=0, second=0)]  # type: ignore[attr-defined]
    tasks.JOB_FUNCTIONS = [enqueued]  # type: ignore[attr-defined]
    tasks.worker_startup = startup  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "services.zzfake", types.ModuleType("x"))
    monkeypatch.setitem(sys.modules, "services.zzfake.tasks", tasks)
    return "zzfake"


def config(**values: Any) -> WorkerConfig:
    return WorkerConfig(
        database_url="postgresql://u@127.0.0.1/db", redis_url="redis://127.0.0.1:6379/0",
        bus_prefix="kuunit", **values,
    )  # fmt: skip


class TestRegistry:
    def test_the_ledger_sweeps_run_every_10_seconds_by_default(self) -> None:
        jobs = collect(config(), ["ledger"]).cron_jobs
        assert sorted(j.name for j in jobs) == ["ledger.expire_grants", "ledger.expire_holds"]
        assert all(j.second == {0, 10, 20, 30, 40, 50} and j.run_at_startup for j in jobs)

    def test_sweep_interval_is_configurable(self) -> None:
        jobs = collect(config(worker_sweep_seconds=2), ["ledger"]).cron_jobs
        assert all(j.second == set(range(0, 60, 2)) for j in jobs)

    def test_a_service_registers_through_its_tasks_module(self, fake_service: str) -> None:
        registry = collect(config(), [fake_service])
        assert [j.name for j in registry.cron_jobs] == ["zzfake.noop"]
        assert [f.name for f in registry.functions] == ["enqueued"]
        assert registry.startup == [startup]

    def test_services_without_tasks_are_skipped(self) -> None:
        registry = collect(config(), ["nosuchservice"])
        assert registry.cron_jobs == [] and registry.functions == []


class TestSettings:
    def test_names_are_namespaced_by_the_bus_prefix(self, fake_service: str) -> None:
        settings = build_settings(config(worker_services=f"ledger,{fake_service}"))
        assert settings["queue_name"] == queue_name("kuunit") == "kuunit:arq:queue"
        names = sorted(j.name for j in settings["cron_jobs"])
        assert names == [
            "cron:kuunit:ledger.expire_grants",
            "cron:kuunit:ledger.expire_holds",
            "cron:kuunit:zzfake.noop",
        ]
        assert settings["redis_settings"].port == 6379

    async def test_job_runs_are_counted(self, fake_service: str) -> None:
        settings = build_settings(config(worker_services=fake_service))
        (job,) = settings["cron_jobs"]
        (function,) = settings["functions"]
        assert await job.coroutine({}) == 1
        assert await function.coroutine({}, 7) == 7
        assert worker.STATS["zzfake.noop"].last_ok is True
        assert worker.STATS["enqueued"].last_result == 7

    def test_refuses_to_start_without_stores(self) -> None:
        with pytest.raises(RuntimeError, match="KU_DATABASE_URL"):
            build_settings(WorkerConfig(database_url="", redis_url=""))
