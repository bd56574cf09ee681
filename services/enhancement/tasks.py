"""Enhancement jobs on the worker (arq), and the service's event consumer. Each job is
safe to run twice, or concurrently: a task is claimed with a lease and fenced by its
attempt number (see service.py).

Tiers follow billing: `consume_subscriptions` (a lifespan hook of the service) reads
`billing.subscription.changed` from the ledger's stream (consumer group `enhancement`)
into `enhancement.subscriptions`; the handler is an idempotent upsert.

Seed 004's schedule (tests/enhancement/test_schedule.py reads it back from the worker's
registry): pending tasks every 2 minutes (`KU_ENHANCEMENT_PENDING_EVERY_SECONDS`, a
divisor of a minute or of an hour in whole minutes), pool thresholds every 15 minutes,
the daily usage summary at 01:00, the new month's allowance grants in the ledger on
the 1st at 00:00 (UTC), and result retention daily at 03:30.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from arq import cron
from arq.cron import CronJob
from arq.worker import func
from fastapi import FastAPI

from services.enhancement.config import EnhancementSettings, get_settings
from services.enhancement.service import JOB_NAME, Enhancer
from services.kit.bus import Consumer
from services.kit.outbox import stream_name
from services.worker import every, queue_name

SUBSCRIPTION_CHANGED = "billing.subscription.changed"

Ctx = dict[str, Any]


def queue_job_id(prefix: str, task_id: str, attempt: int) -> str:
    return f"{prefix}:enhancement:{task_id}:{attempt}"


def arq_enqueuer(arq_redis: Any, settings: EnhancementSettings) -> Any:
    """`enqueue(task_id, attempt)` on the suite's queue; one job id per attempt, so a
    duplicate enqueue of the same attempt is a no-op and a retry gets a fresh job."""
    queue = queue_name(settings.bus_prefix)

    async def enqueue(task_id: str, attempt: int) -> None:
        await arq_redis.enqueue_job(
            JOB_NAME,
            task_id,
            _job_id=queue_job_id(settings.bus_prefix, task_id, attempt),
            _queue_name=queue,
        )

    return enqueue


@asynccontextmanager
async def consume_subscriptions(app: FastAPI) -> AsyncIterator[None]:
    """Lifespan hook (after the enhancer's): tiers from billing's subscription events."""
    settings = get_settings()
    enhancer: Enhancer = app.state.enhancer

    async def handle(event: dict[str, Any]) -> None:
        await enhancer.subscription_changed(event["payload"])

    consumer = Consumer(
        app.state.redis,
        [stream_name(settings.bus_prefix, "ledger")],
        group="enhancement",
        handler=handle,
        topics={SUBSCRIPTION_CHANGED},
    )
    consumer.start()
    app.state.subscription_consumer = consumer
    try:
        yield
    finally:
        await consumer.stop()


async def worker_startup(ctx: Ctx) -> None:
    settings = get_settings()
    ctx["enhancer"] = Enhancer(
        settings,
        ctx["sessionmaker"],
        ctx["redis"],
        enqueue=arq_enqueuer(ctx["redis"], settings),
    )


async def worker_shutdown(ctx: Ctx) -> None:
    enhancer = ctx.pop("enhancer", None)
    if enhancer is not None:
        await enhancer.aclose()


async def enhancement_process_task(ctx: Ctx, task_id: str) -> str:
    return await ctx["enhancer"].process(task_id)


async def enhancement_pending(ctx: Ctx) -> str:
    result = await ctx["enhancer"].run_pending()
    return " ".join(f"{k}={v}" for k, v in result.items())


async def enhancement_thresholds(ctx: Ctx) -> int:
    return await ctx["enhancer"].check_thresholds()


async def enhancement_daily_summary(ctx: Ctx) -> str:
    summary = await ctx["enhancer"].daily_summary()
    return f"{summary['day']}: {summary.get('completed', 0)} completed"


async def enhancement_monthly_reset(ctx: Ctx) -> int:
    return await ctx["enhancer"].monthly_reset()


async def enhancement_retention(ctx: Ctx) -> int:
    return await ctx["enhancer"].purge_results()


def cron_jobs(settings: EnhancementSettings) -> list[CronJob]:
    timeout = settings.enhancement_task_deadline_seconds
    return [
        cron(enhancement_pending, name="enhancement.pending", run_at_startup=True,
             timeout=timeout, **every(settings.enhancement_pending_every_seconds)),
        cron(enhancement_thresholds, name="enhancement.thresholds",
             minute={0, 15, 30, 45}, second=0, timeout=120),
        cron(enhancement_daily_summary, name="enhancement.daily_summary",
             hour=1, minute=0, second=0, timeout=300),
        cron(enhancement_monthly_reset, name="enhancement.monthly_reset",
             day=1, hour=0, minute=0, second=0, timeout=300),
        cron(enhancement_retention, name="enhancement.retention",
             hour=3, minute=30, second=0, timeout=600),
    ]  # fmt: skip


CRON_JOBS = cron_jobs(get_settings())
JOB_FUNCTIONS = [
    func(
        enhancement_process_task,
        name=JOB_NAME,
        timeout=get_settings().enhancement_task_deadline_seconds + 60,
        max_tries=1000,  # retries are ours (lease + pending job); never let arq give up
    )
]
