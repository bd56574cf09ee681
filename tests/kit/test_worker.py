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


def by_name(jobs: list[Any]) -> dict[str, Any]:
    return {j.name: j for j in jobs}


class TestRegistry:
    def test_the_ledger_sweeps_run_every_10_seconds_by_default(self) -> None:
        jobs = by_name(collect(config(), ["ledger"]).cron_jobs)
        assert sorted(jobs) == ["billing.reconcile", "ledger.expire_grants", "ledger.expire_holds"]
        sweeps = [jobs["ledger.expire_grants"], jobs["ledger.expire_holds"]]
        assert all(j.second == {0, 10, 20, 30, 40, 50} and j.run_at_startup for j in sweeps)

    def test_sweep_interval_is_configurable(self) -> None:
        jobs = by_name(collect(config(worker_sweep_seconds=2), ["ledger"]).cron_jobs)
        for name in ("ledger.expire_grants", "ledger.expire_holds"):
            assert jobs[name].second == set(range(0, 60, 2))

    def test_billing_reconciles_every_10_minutes_by_default(self) -> None:
        job = by_name(collect(config(), ["ledger"]).cron_jobs)["billing.reconcile"]
        assert job.minute == {0, 10, 20, 30, 40, 50} and job.second == 0
        assert job.coroutine is worker.billing_reconcile and not job.run_at_startup

    @pytest.mark.parametrize(
        ("seconds", "fields"),
        [
            (2, {"second": set(range(0, 60, 2))}),
            (60, {"second": {0}}),
            (900, {"minute": {0, 15, 30, 45}, "second": 0}),
            (7200, {"hour": set(range(0, 24, 2)), "minute": 0, "second": 0}),
        ],
    )
    def test_reconcile_interval_is_configurable(self, seconds: int, fields: dict) -> None:
        assert worker.every(seconds) == fields
        job = by_name(collect(config(billing_reconcile_seconds=seconds), ["ledger"]).cron_jobs)[
            "billing.reconcile"
        ]
        for name, value in fields.items():
            assert getattr(job, name) == value

    @pytest.mark.parametrize("seconds", [7, 45, 90, 5000, 0])
    def test_an_interval_the_clock_cannot_keep_is_refused(self, seconds: int) -> None:
        with pytest.raises(ValueError):
            config(billing_reconcile_seconds=seconds)

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
            "cron:kuunit:billing.reconcile",
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

    def test_the_queue_is_looked_at_every_50_ms_when_idle(self, fake_service: str) -> None:
        assert build_settings(config(worker_services=fake_service))["poll_delay"] == 0.05
        slower = config(worker_services=fake_service, worker_poll_delay_seconds=0.5)
        assert build_settings(slower)["poll_delay"] == 0.5
        with pytest.raises(ValueError):
            config(worker_poll_delay_seconds=0)

    def test_refuses_to_start_without_stores(self) -> None:
        with pytest.raises(RuntimeError, match="KU_DATABASE_URL"):
            build_settings(WorkerConfig(database_url="", redis_url=""))
