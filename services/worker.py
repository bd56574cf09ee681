"""The background worker: arq over Redis, running every service's jobs.

    python -m services.worker

Registry. For each service in SERVICE_ORDER the worker imports `services/<name>/tasks.py`
(if it exists) and takes from it:

    CRON_JOBS       list of `arq.cron(...)` jobs, e.g.
                    `cron(expire_things, name="workspace.expire_things", minute=0, second=0)`
    JOB_FUNCTIONS   list of coroutines (or `arq.func(...)`) that services enqueue
    worker_startup(ctx) / worker_shutdown(ctx)   optional async hooks for their own resources

A service whose tasks module has no `CRON_JOBS` gets the jobs listed for it in
`BUILTIN_CRON_JOBS` below (the ledger's, billing's reconcile included, live here so
its package stays free of arq).

Every job gets `ctx` with `settings` (KuSettings), `pool` (asyncpg), `sessionmaker`
(SQLAlchemy, use with `services.kit.db.unit_of_work`) and `redis` (arq's). Jobs must be
safe to run twice: arq delivers at least once, and a cron may run on two workers.

Names are namespaced by KU_BUS_PREFIX (queue and cron job ids), so suites sharing one
Redis never take or dedupe each other's jobs. `KU_WORKER_SERVICES=ledger,workspace`
limits a worker to some services' jobs (dedicated workers, partial suites).

Health: GET /health (the schedule: every cron job and when it runs, every function;
and each job's run stats) and GET /ready (database and Redis) on
KU_WORKER_HOST:KU_WORKER_PORT (127.0.0.1:8009); one log line per job run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import asyncpg
import orjson
from arq import cron
from arq.connections import RedisSettings
from arq.cron import CronJob
from arq.worker import Function, Worker, func
from pydantic import Field, field_validator
from redis.exceptions import RedisError

from services.kit.config import KuSettings
from services.kit.db import create_engine, plain_url, sessionmaker_for
from services.kit.logs import configure_logging
from services.kit.migrations import SERVICE_ORDER

log = logging.getLogger("ku.worker")

Ctx = dict[str, Any]
Hook = Callable[[Ctx], Awaitable[None]]


class WorkerConfig(KuSettings):
    worker_host: str = "127.0.0.1"
    worker_port: int = 8009
    # Comma-separated service names whose jobs this worker runs; empty means all.
    worker_services: str = ""
    worker_max_jobs: int = 10
    # How long the worker waits between two looks at the queue when it found nothing
    # (arq's default is 0.5 s: a task enqueued just after a look waits that long). A look
    # is one ZRANGEBYSCORE, so 20 a second per worker costs Redis next to nothing.
    worker_poll_delay_seconds: Annotated[float, Field(gt=0, le=5)] = 0.05
    worker_db_pool_size: int = 4
    # How often the expiry sweeps run (a divisor of 60).
    worker_sweep_seconds: Annotated[int, Field(ge=1, le=60)] = 10
    # How often billing reconciles with Razorpay (grants payments no webhook reported,
    # applies refunds, retries refund events that arrived before their payment).
    # A divisor of 60, or of 3600 in whole minutes, or of a day in whole hours.
    billing_reconcile_seconds: Annotated[int, Field(ge=1, le=86_400)] = 600

    @field_validator("billing_reconcile_seconds")
    @classmethod
    def _fits_a_clock(cls, value: int) -> int:
        every(value)
        return value


def queue_name(bus_prefix: str) -> str:
    """The arq queue of a suite; services enqueue with `_queue_name=queue_name(prefix)`."""
    return f"{bus_prefix}:arq:queue"


# -- the ledger's jobs --------------------------------------------------------------------


async def ledger_expire_holds(ctx: Ctx) -> int:
    from services.ledger.tasks import expire_holds

    return await expire_holds(ctx["pool"])


async def ledger_expire_grants(ctx: Ctx) -> int:
    from services.ledger.tasks import expire_grants

    return await expire_grants(ctx["pool"])


async def billing_reconcile(ctx: Ctx) -> dict[str, Any]:
    from services.ledger.billing.tasks import reconcile
    from services.ledger.config import get_settings

    settings = get_settings()
    if not settings.razorpay_key_id or not settings.razorpay_key_secret:
        return {"skipped": "Razorpay is not configured (KU_RAZORPAY_KEY_ID / _SECRET)"}
    return await reconcile(settings=settings)


def every(seconds: int) -> dict[str, Any]:
    """arq `cron()` fields for "every `seconds`" on the wall clock (arq has no intervals).
    `seconds` must divide a minute, an hour (in whole minutes) or a day (in whole hours)."""
    if 60 % seconds == 0:
        return {"second": set(range(0, 60, seconds))}
    if seconds % 60 == 0 and 3600 % seconds == 0:
        return {"minute": set(range(0, 60, seconds // 60)), "second": 0}
    if seconds % 3600 == 0 and 86_400 % seconds == 0:
        return {"hour": set(range(0, 24, seconds // 3600)), "minute": 0, "second": 0}
    raise ValueError(
        f"{seconds} s is not a divisor of a minute, an hour (whole minutes) or a day (whole hours)"
    )


def ledger_cron_jobs(every_seconds: int = 10, reconcile_seconds: int = 600) -> list[CronJob]:
    sweep: dict[str, Any] = {"second": set(range(0, 60, every_seconds))}
    return [
        cron(ledger_expire_holds, name="ledger.expire_holds", **sweep,
             run_at_startup=True, timeout=60),
        cron(ledger_expire_grants, name="ledger.expire_grants", **sweep,
             run_at_startup=True, timeout=60),
        # Not at startup: a restarting fleet would all call Razorpay at once.
        cron(billing_reconcile, name="billing.reconcile", **every(reconcile_seconds),
             timeout=max(60, min(reconcile_seconds, 900))),
    ]  # fmt: skip


# Jobs of services whose tasks module defines no CRON_JOBS: name -> (config -> jobs).
BUILTIN_CRON_JOBS: dict[str, Callable[[WorkerConfig], list[CronJob]]] = {
    "ledger": lambda config: ledger_cron_jobs(
        config.worker_sweep_seconds, config.billing_reconcile_seconds
    ),
}


# -- the registry -------------------------------------------------------------------------


@dataclasses.dataclass
class Registry:
    cron_jobs: list[CronJob] = dataclasses.field(default_factory=list)
    functions: list[Function] = dataclasses.field(default_factory=list)
    startup: list[Hook] = dataclasses.field(default_factory=list)
    shutdown: list[Hook] = dataclasses.field(default_factory=list)


def _tasks_module(service: str) -> Any | None:
    name = f"services.{service}.tasks"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name in (name, f"services.{service}"):
            return None
        raise


def collect(config: WorkerConfig, services: list[str] | None = None) -> Registry:
    """Every job of `services` (default: all in SERVICE_ORDER)."""
    registry = Registry()
    for service in services or SERVICE_ORDER:
        module = _tasks_module(service)
        if module is None:
            continue
        cron_jobs = getattr(module, "CRON_JOBS", None)
        if cron_jobs is None:
            builtin = BUILTIN_CRON_JOBS.get(service)
            cron_jobs = builtin(config) if builtin else []
        registry.cron_jobs.extend(cron_jobs)
        registry.functions.extend(func(f) for f in getattr(module, "JOB_FUNCTIONS", []))
        if hasattr(module, "worker_startup"):
            registry.startup.append(module.worker_startup)
        if hasattr(module, "worker_shutdown"):
            registry.shutdown.append(module.worker_shutdown)
    return registry


# -- job stats and logging ----------------------------------------------------------------


@dataclasses.dataclass
class JobStats:
    runs: int = 0
    failures: int = 0
    last_started_at: float | None = None
    last_finished_at: float | None = None
    last_ok: bool | None = None
    last_result: Any = None
    last_error: str | None = None


STATS: dict[str, JobStats] = {}


def _logged(name: str, coroutine: Callable[..., Awaitable[Any]]) -> Any:
    @functools.wraps(coroutine)
    async def run(ctx: Ctx, *args: Any, **kwargs: Any) -> Any:
        stats = STATS.setdefault(name, JobStats())
        stats.runs += 1
        stats.last_started_at = time.time()
        started = time.perf_counter()
        try:
            result = await coroutine(ctx, *args, **kwargs)
        except Exception as exc:
            stats.failures += 1
            stats.last_ok = False
            stats.last_error = f"{type(exc).__name__}: {exc}"
            log.exception(
                "job %s failed", name,
                extra={"ctx": {"job": name, "ms": round((time.perf_counter() - started) * 1000)}},
            )  # fmt: skip
            raise
        finally:
            stats.last_finished_at = time.time()
        stats.last_ok = True
        stats.last_result = result if isinstance(result, int | float | str | dict | None) else None
        stats.last_error = None
        log.info(
            "job %s done: %s", name, result,
            extra={"ctx": {"job": name, "ms": round((time.perf_counter() - started) * 1000)}},
        )  # fmt: skip
        return result

    return run


def _namespaced(job: CronJob, prefix: str) -> CronJob:
    # arq keys cron job ids (`arq:job:<name>:<ts>`) globally, outside the queue: without
    # the prefix, two suites on one Redis would dedupe each other's runs.
    short = job.name.removeprefix("cron:")
    return dataclasses.replace(
        job, name=f"cron:{prefix}:{short}", coroutine=_logged(short, job.coroutine)
    )


def _when(job: CronJob) -> dict[str, Any]:
    """A cron job as /health lists it: its name and the clock fields it runs at."""
    out: dict[str, Any] = {"name": job.name.removeprefix("cron:")}
    for field in ("month", "day", "weekday", "hour", "minute", "second"):
        value = getattr(job, field)
        if value is not None:
            out[field] = sorted(value) if isinstance(value, set) else value
    out["run_at_startup"] = job.run_at_startup
    return out


# -- health endpoint ----------------------------------------------------------------------


async def _health_response(ctx: Ctx, path: str) -> tuple[int, dict[str, Any]]:
    if path == "/health":
        return 200, {
            "status": "ok",
            "service": "worker",
            "queue": ctx["queue_name"],
            "schedule": ctx["schedule"],
            "jobs": {name: dataclasses.asdict(s) for name, s in sorted(STATS.items())},
        }
    if path == "/ready":
        checks: dict[str, str] = {}
        try:
            async with asyncio.timeout(2):
                await ctx["pool"].fetchval("SELECT 1")
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"error: {type(exc).__name__}"
        try:
            async with asyncio.timeout(2):
                await ctx["redis"].ping()
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"error: {type(exc).__name__}"
        ok = all(v == "ok" for v in checks.values())
        return (200 if ok else 503), {"status": "ok" if ok else "unavailable", "checks": checks}
    return 404, {"error": {"code": "not_found", "message": "GET /health or /ready"}}


async def _serve_health(ctx: Ctx, host: str, port: int) -> asyncio.Server:
    """A minimal HTTP/1.0 responder: the worker has no web framework to lean on."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request_line = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            parts = request_line.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) > 1 else "/"
            if parts and parts[0] != "GET":
                status, body = 405, {"error": {"code": "method_not_allowed", "message": "GET"}}
            else:
                status, body = await _health_response(ctx, path)
            payload = orjson.dumps(body, default=str)
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}.get(
                status, "Service Unavailable"
            )
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)


# -- riding out Redis outages --------------------------------------------------------------


class ResilientWorker(Worker):
    """arq's worker, except that a Redis outage does not end it.

    Stock arq lets a Redis error in its poll loop escape `main()`, so a one-second Redis
    restart stops the worker (and `ku up` with it). Here a failed poll iteration (reading
    the queue, heart beat, enqueuing a cron run) is logged and retried with exponential
    backoff, while jobs already running carry on (they work against Postgres). Whatever
    the queue held is gone if Redis comes back empty; jobs must therefore be recoverable
    from the database (e.g. the enhancement pending-tasks cron re-enqueues open tasks).
    """

    backoff_max_seconds = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.redis_failures = 0

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except (RedisError, OSError, TimeoutError) as exc:
            self.redis_failures += 1
            delay = min(self.backoff_max_seconds, 0.1 * 2**self.redis_failures)
            log.warning(
                "Redis unavailable (%s: %s); retrying in %.1f s",
                type(exc).__name__, exc, delay,
            )  # fmt: skip
            await asyncio.sleep(delay)
        else:
            if self.redis_failures:
                log.info("Redis is back after %d failed polls", self.redis_failures)
                self.redis_failures = 0


# -- arq settings -------------------------------------------------------------------------


def build_settings(config: WorkerConfig | None = None) -> dict[str, Any]:
    """Keyword arguments for `arq.Worker` (what a WorkerSettings class would hold)."""
    config = config or WorkerConfig()
    if not config.database_url or not config.redis_url:
        raise RuntimeError("KU_DATABASE_URL and KU_REDIS_URL must be set (`ku up` sets them)")
    services = [s.strip() for s in config.worker_services.split(",") if s.strip()] or None
    registry = collect(config, services)
    cron_jobs = [_namespaced(job, config.bus_prefix) for job in registry.cron_jobs]
    functions = [
        dataclasses.replace(f, coroutine=_logged(f.name, f.coroutine)) for f in registry.functions
    ]
    if not cron_jobs and not functions:
        raise RuntimeError(f"no jobs to run for services {services or list(SERVICE_ORDER)}")
    queue = queue_name(config.bus_prefix)
    schedule = {
        "cron": [_when(job) for job in registry.cron_jobs],
        "functions": sorted(f.name for f in registry.functions),
    }

    async def on_startup(ctx: Ctx) -> None:
        ctx["settings"] = config
        ctx["queue_name"] = queue
        ctx["schedule"] = schedule
        ctx["pool"] = await asyncpg.create_pool(
            plain_url(config.database_url), min_size=1, max_size=config.worker_db_pool_size
        )
        ctx["engine"] = create_engine(config, pool_size=config.worker_db_pool_size)
        ctx["sessionmaker"] = sessionmaker_for(ctx["engine"])
        for hook in registry.startup:
            await hook(ctx)
        ctx["health_server"] = await _serve_health(ctx, config.worker_host, config.worker_port)
        log.info(
            "worker ready: %d cron jobs, %d functions, queue %s, health on %s:%d",
            len(cron_jobs), len(functions), queue, config.worker_host, config.worker_port,
        )  # fmt: skip

    async def on_shutdown(ctx: Ctx) -> None:
        server = ctx.get("health_server")
        if server is not None:
            server.close()
        for hook in reversed(registry.shutdown):
            await hook(ctx)
        if "pool" in ctx:
            await ctx["pool"].close()
        if "engine" in ctx:
            await ctx["engine"].dispose()

    return {
        "functions": functions,
        "cron_jobs": cron_jobs,
        "redis_settings": RedisSettings.from_dsn(config.redis_url),
        "queue_name": queue,
        "on_startup": on_startup,
        "on_shutdown": on_shutdown,
        "max_jobs": config.worker_max_jobs,
        "poll_delay": config.worker_poll_delay_seconds,
        "health_check_interval": 30,
        # arq logs every result itself; ours is one structured line per run.
        "log_results": False,
    }


def __getattr__(name: str) -> Any:
    # `arq services.worker.WorkerSettings` works too. Built lazily: importing this module
    # (e.g. for `queue_name`) must not import every service's tasks.
    if name == "WorkerSettings":
        return type("WorkerSettings", (), build_settings())
    raise AttributeError(name)


def main() -> None:
    config = WorkerConfig()
    configure_logging("worker", config.log_level, config.log_json)
    logging.getLogger("arq").setLevel(max(logging.WARNING, logging.getLogger().level))
    # A new loop for arq (it takes the current one when built).
    asyncio.set_event_loop(asyncio.new_event_loop())
    ResilientWorker(**build_settings(config)).run()


if __name__ == "__main__":
    main()
