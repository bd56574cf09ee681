"""Audit: a submit refused after its input was stored (402: the price cannot be held)
leaves no input behind. The input is stored before the hold; retention deletes only
the inputs of recorded tasks, so an input of a refused submit was never deleted: a
user with no credit could fill the storage with 10 MB uploads, each one a 402."""

from __future__ import annotations

import os

import pytest

from services.enhancement.service import Submission
from services.kit.errors import PaymentRequired
from services.kit.principal import outgoing_header
from tests.enhancement.conftest import Enh
from tests.enhancement.test_audit_settlement import APP

pytestmark = pytest.mark.e2e


def stored_inputs(enh: Enh) -> set[str]:
    root = os.path.join(enh.suite.env["KU_ENHANCEMENT_STORAGE_DIR"], "inputs")
    return set(os.listdir(root)) if os.path.isdir(root) else set()


async def test_a_402_leaves_no_input_in_storage(enh: Enh) -> None:
    user = await enh.new_user()
    before = stored_inputs(enh)
    # A price far above any balance: the hold is refused.
    async with enh.own_enhancer(enhancement_prices={"custom": 10**9, "lighting": 10**9}) as e:
        for _ in range(3):
            with pytest.raises(PaymentRequired):
                await e.submit(
                    APP,
                    Submission(
                        "lighting", "", 0.5, None, user, None, False, upload=enh.images.image
                    ),
                    origin=outgoing_header(APP, audience="enhancement"),
                    idempotency_key=None,
                )
    assert stored_inputs(enh) - before == set()
