"""Crash recovery: a worker SIGKILLed mid-task."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.enhancement.conftest import PROVIDER_COSTS, Enh
from tests.enhancement.test_flow import kinds, submit

pytestmark = pytest.mark.e2e


class TestWorkerKilled:
    async def test_sigkill_mid_task_finishes_once(self, enh: Enh):
        enh.reset_providers()
        nano = enh.providers["nanobanana"]
        nano.polls_needed = 8
        user = await enh.new_user()
        pools_before = await enh.pools()
        task = await submit(enh, user)
        deadline = time.monotonic() + 30
        while not (nano.submits == 1 and nano.polls >= 1):
            assert time.monotonic() < deadline, "the worker never reached the provider"
            await asyncio.sleep(0.05)
        enh.worker.kill()  # mid-poll: the provider task exists, nothing is settled
        polls_at_kill = nano.polls
        enh.worker.start()
        done = await enh.wait(task["id"])
        assert done["status"] == "completed" and done["provider"] == "nanobanana", done
        assert nano.submits == 1  # resumed polling the same provider task
        assert nano.polls > polls_at_kill
        assert done["charged"] == 2
        # One provider call, paid from its pool once.
        assert await enh.pool_calls(task["id"]) == [("nanobanana", PROVIDER_COSTS["nanobanana"])]
        pools = await enh.pools()
        assert pools_before["nanobanana"]["balance"] - pools["nanobanana"]["balance"] == 10
        assert kinds(await enh.journal(user)) == ["capture", "reserve"]
