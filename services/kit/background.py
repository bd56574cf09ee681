"""A loop that runs beside a service (outbox relay, event consumers) and stops promptly.

`stop()` sets a flag the loop checks, cancels the task, and waits a bounded time:
a client library that swallows the cancellation inside a blocking read (redis-py's
XREADGROUP BLOCK can) must not hang a shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger("ku.background")


class BackgroundLoop:
    task_name = "background"
    stop_timeout = 3.0

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None
        self.stopping = False

    async def run(self) -> None:  # pragma: no cover - subclasses implement it
        raise NotImplementedError

    def start(self) -> None:
        self.stopping = False
        self._task = asyncio.create_task(self.run(), name=self.task_name)

    async def stop(self) -> None:
        self.stopping = True
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=self.stop_timeout)
        if not done:
            log.warning(
                "%s did not stop within %.0fs; abandoning it", self.task_name, self.stop_timeout
            )
            return
        with contextlib.suppress(asyncio.CancelledError, Exception):
            task.result()
