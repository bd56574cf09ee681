"""Remote enhancement providers, each an httpx adapter speaking its own wire format.

Every adapter answers the same two questions: `submit(job)` (start the work; an
async provider returns its task id, a synchronous one the result) and
`poll(task_id)` (running, done with a result, or failed). The worker stores the
provider's task id before it polls, so a restarted worker resumes polling the
same provider task instead of paying for a second one.

Errors: `ProviderError` for anything the provider did wrong (5xx, timeouts,
refusals, malformed answers); the chain counts it against the provider's
circuit breaker and moves on to the next provider.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from services.enhancement.config import REMOTE_PROVIDERS, EnhancementSettings


class ProviderError(Exception):
    pass


@dataclass(frozen=True)
class Job:
    prompt: str
    image_url: str
    image: bytes
    content_type: str


@dataclass(frozen=True)
class Outcome:
    state: Literal["running", "done", "failed"]
    result_url: str | None = None
    result_bytes: bytes | None = None
    result_content_type: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Submitted:
    task_id: str | None = None
    outcome: Outcome | None = None


class Provider:
    name = ""

    def __init__(self, http: httpx.AsyncClient, url: str, api_key: str, cost_milli: int):
        self.http = http
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.cost_milli = cost_milli

    async def submit(self, job: Job) -> Submitted:  # pragma: no cover - interface
        raise NotImplementedError

    async def poll(self, task_id: str) -> Outcome:  # pragma: no cover - interface
        raise NotImplementedError

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self.http.request(method, self.url + path, **kwargs)
        except httpx.HTTPError as exc:
            raise ProviderError(f"{self.name}: {type(exc).__name__}") from None
        if response.status_code >= 400:
            raise ProviderError(f"{self.name}: HTTP {response.status_code}")
        try:
            return response.json()
        except ValueError:
            raise ProviderError(f"{self.name}: answer is not JSON") from None


def _data(body: Any, name: str) -> dict[str, Any]:
    if not isinstance(body, dict) or body.get("code") not in (200, None):
        message = body.get("msg") if isinstance(body, dict) else None
        raise ProviderError(f"{name}: refused ({message or 'no data'})")
    data = body.get("data")
    if not isinstance(data, dict):
        raise ProviderError(f"{name}: answer has no data")
    return data


class NanoBanana(Provider):
    """nanobananaapi.ai: POST /api/v1/nanobanana/generate, GET .../record-info?taskId=."""

    name = "nanobanana"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    async def submit(self, job: Job) -> Submitted:
        body = await self._json(
            "POST",
            "/api/v1/nanobanana/generate",
            headers=self._headers(),
            json={
                "prompt": job.prompt,
                "type": "IMAGETOIAMGE",  # sic: the provider's spelling
                "imageUrls": [job.image_url],
                "numImages": 1,
            },
        )
        task_id = _data(body, self.name).get("taskId")
        if not task_id:
            raise ProviderError("nanobanana: no taskId")
        return Submitted(task_id=str(task_id))

    async def poll(self, task_id: str) -> Outcome:
        body = await self._json(
            "GET",
            "/api/v1/nanobanana/record-info",
            headers=self._headers(),
            params={"taskId": task_id},
        )
        data = _data(body, self.name)
        flag = data.get("successFlag")
        if flag == 0:
            return Outcome("running")
        if flag == 1:
            url = (data.get("response") or {}).get("resultImageUrl")
            if not url:
                raise ProviderError("nanobanana: success without an image")
            return Outcome("done", result_url=str(url))
        return Outcome("failed", error=str(data.get("errorMessage") or f"successFlag {flag}"))


class Fal(Provider):
    """fal.ai queue API: POST /fal-ai/nano-banana/edit, GET .../requests/{id}/status, result."""

    name = "fal"
    model = "/fal-ai/nano-banana"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Key {self.api_key}"}

    async def submit(self, job: Job) -> Submitted:
        body = await self._json(
            "POST",
            f"{self.model}/edit",
            headers=self._headers(),
            json={"prompt": job.prompt, "image_urls": [job.image_url], "num_images": 1},
        )
        request_id = body.get("request_id") if isinstance(body, dict) else None
        if not request_id:
            raise ProviderError("fal: no request_id")
        return Submitted(task_id=str(request_id))

    async def poll(self, task_id: str) -> Outcome:
        status = await self._json(
            "GET", f"{self.model}/requests/{task_id}/status", headers=self._headers()
        )
        state = status.get("status") if isinstance(status, dict) else None
        if state in ("IN_QUEUE", "IN_PROGRESS"):
            return Outcome("running")
        if state != "COMPLETED":
            return Outcome("failed", error=f"fal status {state}")
        result = await self._json(
            "GET", f"{self.model}/requests/{task_id}", headers=self._headers()
        )
        images = result.get("images") if isinstance(result, dict) else None
        if not images or not isinstance(images[0], dict) or not images[0].get("url"):
            return Outcome("failed", error=str((result or {}).get("detail") or "no image"))
        return Outcome("done", result_url=str(images[0]["url"]))


class Kie(Provider):
    """kie.ai jobs API: POST /api/v1/jobs/createTask, GET /api/v1/jobs/recordInfo?taskId=."""

    name = "kie"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    async def submit(self, job: Job) -> Submitted:
        body = await self._json(
            "POST",
            "/api/v1/jobs/createTask",
            headers=self._headers(),
            json={
                "model": "google/nano-banana-edit",
                "input": {"prompt": job.prompt, "image_urls": [job.image_url]},
            },
        )
        task_id = _data(body, self.name).get("taskId")
        if not task_id:
            raise ProviderError("kie: no taskId")
        return Submitted(task_id=str(task_id))

    async def poll(self, task_id: str) -> Outcome:
        body = await self._json(
            "GET", "/api/v1/jobs/recordInfo", headers=self._headers(), params={"taskId": task_id}
        )
        data = _data(body, self.name)
        state = data.get("state")
        if state in ("waiting", "queuing", "generating"):
            return Outcome("running")
        if state == "success":
            try:
                urls = json.loads(data.get("resultJson") or "{}").get("resultUrls") or []
            except ValueError:
                urls = []
            if not urls:
                raise ProviderError("kie: success without an image")
            return Outcome("done", result_url=str(urls[0]))
        return Outcome("failed", error=str(data.get("failMsg") or f"state {state}"))


class Google(Provider):
    """Gemini image model, synchronous: POST /v1beta/models/<model>:generateContent."""

    name = "google"
    model = "gemini-2.5-flash-image"

    async def submit(self, job: Job) -> Submitted:
        body = await self._json(
            "POST",
            f"/v1beta/models/{self.model}:generateContent",
            headers={"x-goog-api-key": self.api_key},
            json={
                "contents": [
                    {
                        "parts": [
                            {"text": job.prompt},
                            {
                                "inline_data": {
                                    "mime_type": job.content_type,
                                    "data": base64.b64encode(job.image).decode(),
                                }
                            },
                        ]
                    }
                ]
            },
        )
        try:
            for part in body["candidates"][0]["content"]["parts"]:
                inline = part.get("inlineData") or part.get("inline_data")
                if inline and inline.get("data"):
                    return Submitted(
                        outcome=Outcome(
                            "done",
                            result_bytes=base64.b64decode(inline["data"]),
                            result_content_type=inline.get("mimeType") or inline.get("mime_type"),
                        )
                    )
        except (KeyError, IndexError, TypeError, ValueError):
            pass
        raise ProviderError("google: no image in the answer")

    async def poll(self, task_id: str) -> Outcome:
        raise ProviderError("google is synchronous; there is nothing to poll")


ADAPTERS: dict[str, type[Provider]] = {
    "nanobanana": NanoBanana,
    "fal": Fal,
    "kie": Kie,
    "google": Google,
}


def configured(settings: EnhancementSettings, http: httpx.AsyncClient) -> dict[str, Provider]:
    """Every provider with a URL set, by name."""
    out: dict[str, Provider] = {}
    for name in REMOTE_PROVIDERS:
        url = getattr(settings, f"enhancement_{name}_url")
        if url:
            key = getattr(settings, f"enhancement_{name}_api_key")
            out[name] = ADAPTERS[name](http, url, key, settings.provider_cost(name))
    return out


def describe(enhancement_type: str, prompt: str, strength: float) -> str:
    """The instruction sent to a provider."""
    base = {
        "lighting": "Improve the lighting of this photo",
        "style": "Restyle this photo",
        "background": "Improve the background of this photo",
        "mood": "Change the mood of this photo",
        "custom": "Edit this photo",
    }[enhancement_type]
    detail = f": {prompt}" if prompt else ""
    return f"{base}{detail}. Strength {round(strength * 100)}%."
