"""The client's retry rules on their own: Retry-After parsing, backoff bounds, and the
same Idempotency-Key on every attempt of one call (a fresh one for the next call)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
from ku_client import KuClient, RetryPolicy, ServiceUnavailable, to_ku, to_milli
from ku_client._core import parse_retry_after


class TestRetryAfter:
    def test_seconds_and_http_date(self):
        assert parse_retry_after("3") == 3.0
        later = datetime.now(UTC) + timedelta(seconds=30)
        assert 25 < (parse_retry_after(format_datetime(later, usegmt=True)) or 0) <= 30
        assert parse_retry_after("soon") is None and parse_retry_after(None) is None

    def test_policy_honours_the_server_and_gives_up(self):
        policy = RetryPolicy(max_retries=2, backoff_seconds=0.1, max_retry_after_seconds=5)
        assert policy.delay(1, 4.0) == 4.0
        assert policy.delay(1, 6.0) is None  # longer than we are willing to wait
        assert 0 <= (policy.delay(2, None) or 0) <= 0.2
        assert policy.delay(3, None) is None


class TestAmounts:
    @pytest.mark.parametrize("milli", [1, 999, 1000, 12_500, 123_456_789])
    def test_round_trip_is_exact(self, milli: int):
        assert to_milli(repr(to_ku(milli))) == milli

    def test_floats_are_refused(self):
        with pytest.raises(TypeError):
            to_ku(1.5)


class TestKeysAcrossRetries:
    def test_one_key_per_call_reused_on_retry(self):
        seen: list[str] = []

        def server(request: httpx.Request) -> httpx.Response:
            seen.append(request.headers["idempotency-key"])
            if len(seen) in (1, 2):
                return httpx.Response(503, headers={"Retry-After": "0"}, json={})
            return httpx.Response(
                201,
                json={
                    "transaction_id": 1,
                    "user_id": "u",
                    "amount": 1.5,
                    "available": 48.5,
                    "held": 0,
                },
            )

        with KuClient("http://ku.test", transport=httpx.MockTransport(server)) as client:
            charge = client.debit("u", 1_500)
            assert charge.amount_milli == 1_500 and charge.available_milli == 48_500
            assert len(seen) == 3 and len(set(seen)) == 1
            client.debit("u", 1_500)
            assert len(set(seen)) == 2

    def test_gives_up_with_a_typed_error(self):
        def server(request: httpx.Request) -> httpx.Response:
            body = {"error": {"code": "upstream_down", "message": "Down", "detail": {}}}
            return httpx.Response(503, headers={"Retry-After": "0"}, json=body)

        policy = RetryPolicy(max_retries=1)
        with KuClient("http://ku.test", transport=httpx.MockTransport(server), retry=policy) as c:
            with pytest.raises(ServiceUnavailable) as failed:
                c.balance("u")
        assert failed.value.code == "upstream_down"
