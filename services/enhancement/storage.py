"""Where inputs and results live: a small interface, a local directory by default, an
S3-compatible bucket (AWS S3, MinIO, R2, ...) by configuration (`KU_ENHANCEMENT_STORAGE`).

`Storage.put/get/delete` by key (`inputs/<task>`, `results/<task>`); `get` of a missing
key is None and `delete` of one is a no-op, on both backends. Result links are Ku's own,
whatever the backend: `/v1/enhancement/tasks/<id>/result?expires=&sig=`, signed (HMAC of
task id and expiry with a secret derived from the service's signing key) and expiring;
`verify_link` checks them and the service streams the bytes from storage. A valid link
is a credential by itself (no key or token needed, e.g. in an <img src>); without one,
only the owner may download. So the bucket stays private (no public or presigned URL
ever leaves Ku), and a result deleted by retention is gone at once, not when a presigned
URL runs out."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from services.enhancement.config import EnhancementSettings
from services.kit.errors import Forbidden, ServiceUnavailable

log = logging.getLogger("ku.enhancement.storage")


class Storage(Protocol):
    async def put(self, key: str, data: bytes) -> None: ...
    async def get(self, key: str) -> bytes | None: ...
    async def delete(self, key: str) -> None: ...
    async def aclose(self) -> None: ...


class LocalStorage:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"storage key escapes the root: {key!r}")
        return path

    async def put(self, key: str, data: bytes) -> None:
        path = self._path(key)

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # atomic: a reader never sees half a file

        await asyncio.to_thread(write)

    async def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._path(key).unlink, True)

    async def aclose(self) -> None:
        pass


class S3Storage:
    """An S3-compatible bucket through aiobotocore (botocore's own SigV4, retries and
    error model, on aiohttp). One client per process, opened on first use; imported
    only when configured (botocore is heavy to load)."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        addressing_style: str = "auto",
        timeout_seconds: float = 30.0,
        max_attempts: int = 3,
    ) -> None:
        from aiobotocore.config import AioConfig

        if not bucket:
            raise RuntimeError("KU_ENHANCEMENT_STORAGE=s3 needs KU_ENHANCEMENT_S3_BUCKET")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._options: dict[str, Any] = {
            "region_name": region,
            "endpoint_url": endpoint_url or None,
            # Empty: botocore's credential chain (environment, profile, instance role).
            "aws_access_key_id": access_key_id or None,
            "aws_secret_access_key": secret_access_key or None,
            "config": AioConfig(
                s3={"addressing_style": addressing_style},
                connect_timeout=min(10.0, timeout_seconds),
                read_timeout=timeout_seconds,
                retries={"max_attempts": max_attempts, "mode": "standard"},
            ),
        }
        self._stack = AsyncExitStack()
        self._client: Any = None
        self._lock = asyncio.Lock()

    async def _s3(self) -> Any:
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    self._client = await self._stack.enter_async_context(
                        _botocore_session().create_client("s3", **self._options)
                    )
        return self._client

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad storage key: {key!r}")
        return self.prefix + key

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """botocore's errors (S3 refused, unreachable, timed out) as the kit's 503."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            log.warning("S3 bucket %s: %s", self.bucket, exc)
            raise ServiceUnavailable(
                "Result storage is unavailable", code="storage_unavailable"
            ) from None

    async def put(self, key: str, data: bytes) -> None:
        with self._errors():
            s3 = await self._s3()
            await s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    async def get(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        with self._errors():
            s3 = await self._s3()
            try:
                response = await s3.get_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            async with response["Body"] as body:
                return bytes(await body.read())

    async def delete(self, key: str) -> None:
        with self._errors():
            s3 = await self._s3()
            await s3.delete_object(Bucket=self.bucket, Key=self._key(key))

    async def aclose(self) -> None:
        await self._stack.aclose()
        self._client = None


@lru_cache(maxsize=1)
def _botocore_session() -> Any:
    """One botocore session per process: it loads and caches S3's service model (about a
    second of CPU), which every client made from it then shares."""
    from aiobotocore.session import get_session

    return get_session()


def build_storage(settings: EnhancementSettings) -> Storage:
    s = settings
    if s.enhancement_storage == "local":
        return LocalStorage(s.enhancement_storage_dir)
    if s.enhancement_storage == "s3":
        return S3Storage(
            s.enhancement_s3_bucket,
            prefix=s.enhancement_s3_prefix,
            endpoint_url=s.enhancement_s3_endpoint_url,
            region=s.enhancement_s3_region,
            access_key_id=s.enhancement_s3_access_key_id,
            secret_access_key=s.enhancement_s3_secret_access_key,
            addressing_style=s.enhancement_s3_addressing_style,
        )
    raise RuntimeError(
        f"KU_ENHANCEMENT_STORAGE={s.enhancement_storage!r} is not supported (local or s3)"
    )


def _signature(secret: str, task_id: str, expires: int) -> str:
    message = f"result:{task_id}:{expires}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()[:32]


def sign_link(secret: str, task_id: str, ttl_seconds: int, *, now: float | None = None) -> str:
    expires = int((now or time.time()) + ttl_seconds)
    sig = _signature(secret, task_id, expires)
    return f"/v1/enhancement/tasks/{task_id}/result?expires={expires}&sig={sig}"


def verify_link(secret: str, task_id: str, expires: int, sig: str) -> None:
    if expires < time.time():
        raise Forbidden("The result link has expired", code="link_expired")
    if not hmac.compare_digest(_signature(secret, task_id, expires), sig):
        raise Forbidden("The result link is not valid", code="bad_signature")
