"""Result storage: the local directory and an S3-compatible bucket behave the same (keys,
missing keys, retention), and signed expiring result links work with either.

The bucket is moto's S3 server (`ThreadedMotoServer`) on 127.0.0.1: the real S3 wire
protocol (SigV4-signed REST and XML), reached over HTTP by aiobotocore like any S3.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from moto.server import ThreadedMotoServer
from sqlalchemy import text

from services.enhancement.config import EnhancementSettings, get_settings
from services.enhancement.repository import Repository
from services.enhancement.service import Enhancer, Submission
from services.enhancement.storage import (
    LocalStorage,
    S3Storage,
    Storage,
    build_storage,
    sign_link,
)
from services.kit.errors import ServiceUnavailable
from services.kit.principal import Principal, derived_secret
from services.kit.runner import free_port
from services.kit.service_client import ServiceClient
from services.kit.testing.plugin import asgi_client, principal_headers
from tests.enhancement.fakes import png
from tests.enhancement.helpers import insert_task

S3_KEYS: dict[str, Any] = {"access_key_id": "ku-test", "secret_access_key": "ku-test-secret"}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_client(endpoint: str) -> Any:
    """A plain aiobotocore client of the test's own (not the code under test)."""
    from aiobotocore.session import get_session

    return get_session().create_client(
        "s3",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id=S3_KEYS["access_key_id"],
        aws_secret_access_key=S3_KEYS["secret_access_key"],
    )


async def new_bucket(endpoint: str) -> str:
    """A fresh bucket (ops create it; Ku only reads and writes objects)."""
    bucket = f"ku-results-{secrets.token_hex(4)}"
    async with s3_client(endpoint) as s3:
        await s3.create_bucket(Bucket=bucket)
    return bucket


def s3_settings(endpoint: str, bucket: str, **extra: str) -> dict[str, str]:
    return {
        "KU_ENHANCEMENT_STORAGE": "s3",
        "KU_ENHANCEMENT_S3_BUCKET": bucket,
        "KU_ENHANCEMENT_S3_PREFIX": "ku/",
        "KU_ENHANCEMENT_S3_ENDPOINT_URL": endpoint,
        "KU_ENHANCEMENT_S3_ACCESS_KEY_ID": S3_KEYS["access_key_id"],
        "KU_ENHANCEMENT_S3_SECRET_ACCESS_KEY": S3_KEYS["secret_access_key"],
        "KU_ENHANCEMENT_S3_ADDRESSING_STYLE": "path",
        **extra,
    }


@pytest.fixture(params=["local", "s3"])
async def storage(
    request: pytest.FixtureRequest, s3_endpoint: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Storage]:
    """Each backend as configuration builds it."""
    if request.param == "s3":
        env = s3_settings(s3_endpoint, await new_bucket(s3_endpoint))
    else:
        env = {"KU_ENHANCEMENT_STORAGE": "local", "KU_ENHANCEMENT_STORAGE_DIR": str(tmp_path)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    built = build_storage(EnhancementSettings())
    assert type(built) is {"local": LocalStorage, "s3": S3Storage}[request.param]
    yield built
    await built.aclose()


class TestBackends:
    async def test_put_get_delete(self, storage: Storage):
        key = f"results/{uuid.uuid4()}"
        assert await storage.get(key) is None
        await storage.put(key, b"\x89PNG one")
        await storage.put(key, b"\x89PNG two")  # a retried job overwrites, never appends
        assert await storage.get(key) == b"\x89PNG two"
        await storage.delete(key)
        await storage.delete(key)  # deleting what is gone is a no-op
        assert await storage.get(key) is None

    async def test_keys_cannot_escape(self, storage: Storage):
        with pytest.raises(ValueError):
            await storage.put("../outside", b"x")

    async def test_retention_deletes_old_results_only(self, enhancer: Enhancer, storage: Storage):
        enhancer.storage = storage
        old_at = datetime.now(UTC) - timedelta(
            days=enhancer.settings.enhancement_retention_days + 1
        )
        old = await insert_task(enhancer, status="completed", completed_at=old_at)
        new = await insert_task(enhancer, status="completed", completed_at=datetime.now(UTC))
        for task_id in (old, new):
            await storage.put(f"inputs/{task_id}", b"in")
            await storage.put(f"results/{task_id}", b"out")
            async with enhancer.uow() as session:
                await session.execute(
                    text("UPDATE enhancement.tasks SET result_key = :k WHERE id = :id"),
                    {"k": f"results/{task_id}", "id": task_id},
                )
        assert await enhancer.purge_results() >= 1
        assert await storage.get(f"results/{old}") is None
        assert await storage.get(f"inputs/{old}") is None
        assert await storage.get(f"results/{new}") == b"out"
        assert await storage.get(f"inputs/{new}") == b"in"
        async with enhancer.uow() as session:
            row = await Repository(session).task(old)
        assert row is not None and row["result_deleted_at"] is not None


class TestS3Wire:
    async def test_objects_are_in_the_bucket_under_the_prefix(self, s3_endpoint: str):
        bucket = await new_bucket(s3_endpoint)
        storage = S3Storage(
            bucket, prefix="/ku/", endpoint_url=s3_endpoint, addressing_style="path", **S3_KEYS
        )
        try:
            await storage.put("results/abc", b"image bytes")
            # Listed by another client: the object really is in the bucket, under the prefix.
            async with s3_client(s3_endpoint) as s3:
                listed = await s3.list_objects_v2(Bucket=bucket)
                assert [o["Key"] for o in listed["Contents"]] == ["ku/results/abc"]
            # The bucket stays private: without Ku's credentials nothing is readable.
            async with httpx.AsyncClient() as http:
                r = await http.get(f"{s3_endpoint}/{bucket}/ku/results/abc")
                assert r.status_code == 403
        finally:
            await storage.aclose()

    async def test_a_missing_bucket_or_server_is_a_503_not_a_missing_object(self, s3_endpoint: str):
        missing_bucket = S3Storage("no-such-bucket", endpoint_url=s3_endpoint, **S3_KEYS)
        no_server = S3Storage(  # one attempt: botocore's retries back off for seconds
            "ku-results", endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1, **S3_KEYS
        )
        for storage in (missing_bucket, no_server):
            try:
                for call in (storage.get("results/a"), storage.put("results/a", b"x")):
                    with pytest.raises(ServiceUnavailable) as caught:
                        await call
                    assert caught.value.code == "storage_unavailable"
            finally:
                await storage.aclose()

    async def test_an_unreachable_bucket_fails_a_submit_before_anything_is_held(
        self, enhancer: Enhancer, ku_database_url: str
    ):
        nowhere = f"http://127.0.0.1:{free_port()}"
        enhancer.storage = S3Storage("ku-results", endpoint_url=nowhere, max_attempts=1, **S3_KEYS)
        # A ledger that is not there either: a hold attempted first would be a 502 instead.
        settings = EnhancementSettings(database_url=ku_database_url, ledger_url=nowhere)
        await enhancer.client.aclose()
        enhancer.client = ServiceClient(settings, me="enhancement", retries=0)
        user = str(10**20 + secrets.randbelow(10**20))
        submission = Submission(
            enhancement_type="lighting",
            prompt="",
            strength=0.5,
            moodboard_id=None,
            user_id=None,
            app=None,
            save_to_workspace=False,
            upload=png(),
        )
        me = Principal(kind="user", app="imagegene", user_id=user, scopes=frozenset({"enhance"}))
        with pytest.raises(ServiceUnavailable):
            await enhancer.submit(me, submission, origin=None, idempotency_key=None)
        async with enhancer.uow() as session:
            assert await Repository(session).tasks_of(user, None, 10) == []


class TestSignedLinksWithS3:
    async def test_the_result_link_streams_from_the_bucket_and_expires(
        self, s3_endpoint: str, ku_database_url: str, monkeypatch: pytest.MonkeyPatch
    ):
        from services.enhancement.app import create_app

        bucket = await new_bucket(s3_endpoint)
        for name, value in s3_settings(s3_endpoint, bucket).items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        try:
            app = create_app()
            async with asgi_client(app) as client:
                enhancer: Enhancer = app.state.enhancer
                assert isinstance(enhancer.storage, S3Storage)
                user, other = (str(10**20 + secrets.randbelow(10**20)) for _ in range(2))
                task_id = await insert_task(
                    enhancer, user_id=user, status="completed", completed_at=datetime.now(UTC)
                )
                await enhancer.storage.put(f"results/{task_id}", b"\x89PNG result")
                async with enhancer.uow() as session:
                    await session.execute(
                        text(
                            "UPDATE enhancement.tasks SET result_key = :k,"
                            " result_content_type = 'image/png' WHERE id = :id"
                        ),
                        {"k": f"results/{task_id}", "id": task_id},
                    )
                owner = principal_headers(
                    "user", app="imagegene", user_id=user, scopes=("enhance",)
                )
                task = (await client.get(f"/v1/enhancement/tasks/{task_id}", headers=owner)).json()
                link = task["result_url"]
                assert link.startswith(f"/v1/enhancement/tasks/{task_id}/result?expires=")
                r = await client.get(link, headers=owner)
                assert r.status_code == 200, r.text
                assert r.content == b"\x89PNG result" and r.headers["content-type"] == "image/png"

                query = parse_qs(urlsplit(link).query)
                forged = f"/v1/enhancement/tasks/{task_id}/result?expires={query['expires'][0]}"
                r = await client.get(forged + "&sig=" + "0" * 32, headers=owner)
                assert r.status_code == 403 and r.json()["error"]["code"] == "bad_signature"
                expired = sign_link(
                    derived_secret("enhancement", "result-links"),
                    str(task_id),
                    60,
                    now=time.time() - 120,
                )
                r = await client.get(expired, headers=owner)
                assert r.status_code == 403 and r.json()["error"]["code"] == "link_expired"
                stranger = principal_headers(
                    "user", app="imagegene", user_id=other, scopes=("enhance",)
                )
                # The link is a credential by itself; without it, only the owner.
                assert (await client.get(link, headers=stranger)).status_code == 200
                assert (await client.get(link)).status_code == 200  # no principal at all
                unsigned = link.split("?", 1)[0]
                assert (await client.get(unsigned, headers=owner)).status_code == 200
                assert (await client.get(unsigned, headers=stranger)).status_code == 404
                assert (await client.get(unsigned)).status_code == 401

                await enhancer.storage.delete(f"results/{task_id}")  # gone from the bucket
                r = await client.get(link, headers=owner)
                assert r.status_code == 404 and r.json()["error"]["code"] == "no_result"
        finally:
            get_settings.cache_clear()
