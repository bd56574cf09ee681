"""Where inputs and results live: a small interface, a local directory by default.

`Storage.put/get/delete` by key (`inputs/<task>`, `results/<task>`). Result links
are signed (HMAC of task id and expiry with the internal secret) and expire;
`verify_link` checks them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import time
from pathlib import Path
from typing import Protocol

from services.kit.errors import Forbidden


class Storage(Protocol):
    async def put(self, key: str, data: bytes) -> None: ...
    async def get(self, key: str) -> bytes | None: ...
    async def delete(self, key: str) -> None: ...


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


def build_storage(kind: str, directory: str) -> Storage:
    if kind == "local":
        return LocalStorage(directory)
    raise RuntimeError(f"KU_ENHANCEMENT_STORAGE={kind!r} is not supported (use 'local')")


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
