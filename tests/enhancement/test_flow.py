"""Submit through the gateway, real processes, fake providers on 127.0.0.1."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.enhancement.conftest import Enh
from tests.enhancement.fakes import RESULT

pytestmark = pytest.mark.e2e


def holds_of(journal: list[dict], kind: str) -> list[dict]:
    return [t for t in journal if t["kind"] == kind]


class TestSubmit:
    async def test_native_submit_completes_and_charges_once(self, enh: Enh):
        enh.reset_providers()
        user = await enh.new_user()
        before = await enh.balance(user)
        async with enh.client(enh.keys["imagegene"]) as gw:
            r = await gw.post(
                "/v1/enhancement/tasks",
                json={
                    "image_url": f"{enh.images.url}/image.png",
                    "enhancement_type": "lighting",
                    "prompt": "warm golden hour lighting",
                    "strength": 0.8,
                    "user_id": user,
                },
            )
            assert r.status_code == 202, r.text
            task_id = r.json()["id"]
            assert r.json()["status"] == "pending" and r.json()["price"] == 2
        task = await enh.wait(task_id)
        assert task["status"] == "completed", task
        assert task["provider"] == "nanobanana" and task["degraded"] is False
        assert task["charged"] == 2
        assert enh.providers["nanobanana"].submits == 1
        async with enh.client(enh.keys["imagegene"]) as gw:
            r = await gw.get(task["result_url"])
            assert r.status_code == 200
            assert r.content == RESULT
            Image.open(io.BytesIO(r.content)).verify()
        after = await enh.balance(user)
        assert before["available"] - after["available"] == 2 and after["held"] == 0
        journal = await enh.journal(user)
        assert len(holds_of(journal, "reserve")) == 1
        [capture] = holds_of(journal, "capture")
        assert capture["amount"] == 2
        assert holds_of(journal, "release") == []
