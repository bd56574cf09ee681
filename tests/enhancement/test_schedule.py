"""Seed 004's schedule, read back from the worker's registry (`services.worker.collect`):
the fields of each registered cron job, and the runs arq computes from them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from arq.cron import CronJob

from services.enhancement import tasks
from services.enhancement.config import EnhancementSettings
from services.worker import WorkerConfig, collect

NOW = datetime(2026, 11, 26, 12, 1, 30, tzinfo=UTC)


def registered() -> dict[str, CronJob]:
    config = WorkerConfig(
        database_url="postgresql://u@127.0.0.1/db", redis_url="redis://127.0.0.1:6379/0"
    )
    return {job.name: job for job in collect(config, ["enhancement"]).cron_jobs}


def fields(job: CronJob) -> dict[str, Any]:
    return {f: getattr(job, f) for f in ("month", "day", "weekday", "hour", "minute", "second")}


def next_runs(job: CronJob, after: datetime, count: int) -> list[datetime]:
    runs = []
    for _ in range(count):
        job.calculate_next(after)
        assert job.next_run is not None
        after = job.next_run
        runs.append(after.replace(microsecond=0))
    return runs


def at(year: int, month: int, day: int, hour: int, minute: int) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


class TestSeedSchedule:
    def test_the_worker_registers_exactly_these_jobs(self):
        assert sorted(registered()) == [
            "enhancement.daily_summary",
            "enhancement.monthly_reset",
            "enhancement.pending",
            "enhancement.retention",
            "enhancement.thresholds",
        ]
        assert EnhancementSettings().enhancement_pending_every_seconds == 120  # the seed's

    def test_pending_tasks_every_2_minutes_and_at_startup(self):
        job = registered()["enhancement.pending"]
        assert fields(job) == {
            "month": None,
            "day": None,
            "weekday": None,
            "hour": None,
            "minute": set(range(0, 60, 2)),
            "second": 0,
        }
        assert job.run_at_startup and job.coroutine is tasks.enhancement_pending
        assert next_runs(job, NOW, 3) == [at(2026, 11, 26, 12, m) for m in (2, 4, 6)]

    def test_pool_thresholds_every_15_minutes(self):
        job = registered()["enhancement.thresholds"]
        assert fields(job) == {
            "month": None,
            "day": None,
            "weekday": None,
            "hour": None,
            "minute": {0, 15, 30, 45},
            "second": 0,
        }
        assert job.coroutine is tasks.enhancement_thresholds
        assert next_runs(job, NOW, 4) == [
            at(2026, 11, 26, 12, 15),
            at(2026, 11, 26, 12, 30),
            at(2026, 11, 26, 12, 45),
            at(2026, 11, 26, 13, 0),
        ]

    def test_daily_usage_summary_at_01_00(self):
        job = registered()["enhancement.daily_summary"]
        assert fields(job) == {
            "month": None,
            "day": None,
            "weekday": None,
            "hour": 1,
            "minute": 0,
            "second": 0,
        }
        assert job.coroutine is tasks.enhancement_daily_summary
        assert next_runs(job, NOW, 2) == [at(2026, 11, 27, 1, 0), at(2026, 11, 28, 1, 0)]

    def test_monthly_allowance_reset_on_the_1st(self):
        job = registered()["enhancement.monthly_reset"]
        assert fields(job) == {
            "month": None,
            "day": 1,
            "weekday": None,
            "hour": 0,
            "minute": 0,
            "second": 0,
        }
        assert job.coroutine is tasks.enhancement_monthly_reset and not job.run_at_startup
        assert next_runs(job, NOW, 3) == [
            at(2026, 12, 1, 0, 0),
            at(2027, 1, 1, 0, 0),
            at(2027, 2, 1, 0, 0),
        ]

    def test_retention_daily_at_03_30(self):
        job = registered()["enhancement.retention"]
        assert (job.hour, job.minute, job.second, job.day) == (3, 30, 0, None)
        assert next_runs(job, NOW, 1) == [at(2026, 11, 27, 3, 30)]

    @pytest.mark.parametrize(
        ("seconds", "expected"),
        [(2, {"second": set(range(0, 60, 2))}), (300, {"minute": set(range(0, 60, 5))})],
    )
    def test_the_pending_interval_is_configurable(self, seconds: int, expected: dict[str, Any]):
        settings = EnhancementSettings(enhancement_pending_every_seconds=seconds)
        (job,) = [j for j in tasks.cron_jobs(settings) if j.name == "enhancement.pending"]
        assert {k: getattr(job, k) for k in expected} == expected

    def test_an_interval_the_clock_cannot_keep_is_refused(self):
        with pytest.raises(ValueError):
            tasks.cron_jobs(EnhancementSettings(enhancement_pending_every_seconds=90))
