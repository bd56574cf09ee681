"""The gateway's HTTP clients to the services.

The proxy's requests go through `services.kit.pool` (one keep-alive pool per service, a
lean HTTP/1.1 client: the per-request cost of a general client was most of the
gateway's added latency). `call()` is for the gateway's own JSON calls (auth verify,
compat, OpenAPI), through one pooled aiohttp session. Service errors come back as kit
errors (`error_from_upstream`), so every caller renders them one way.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from gateway.config import GatewaySettings
from services.kit.errors import (
    KuError,
    UpstreamError,
    UpstreamTimeout,
)
from services.kit.logs import request_id_var
from services.kit.pool import Pool
from services.kit.principal import (
    PRINCIPAL_HEADER,
    Principal,
    SignedPrincipal,
    outgoing_header,
)
from services.kit.service_client import error_from_response

SERVICES = ("auth", "ledger", "workspace", "generation", "enhancement")


def error_from_upstream(status: int, body: Any) -> KuError:
    """A service's `{"error": {code, message, detail}}` as the kit error it was raised as."""
    return error_from_response(status, body)


class Upstreams:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.urls = {name: settings.service_url(name) for name in SERVICES}
        # The proxy's read timeout per service: generation's non-streamed answers may
        # take minutes; everything else gets the general one.
        self._read_timeouts = {"generation": settings.gateway_generation_timeout_seconds}
        self.pools: dict[str, Pool] = {}
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("gateway upstreams not started")
        return self._session

    def read_timeout_for(self, service: str) -> float:
        """The proxy's read timeout for `service`: its own if it has one."""
        return self._read_timeouts.get(service, self.settings.gateway_upstream_timeout_seconds)

    async def start(self) -> None:
        # Idle connections are dropped after 4 s, before uvicorn's own 5 s keep-alive
        # closes them (services.kit.pool).
        self.pools = {
            name: Pool(
                url,
                connect_timeout=self.settings.gateway_connect_timeout_seconds,
                idle_seconds=4,
            )
            for name, url in self.urls.items()
        }
        # Idle upstream connections close before uvicorn's own 5 s keep-alive does: a
        # request sent on a connection the server is closing would come back as a 502.
        connector = aiohttp.TCPConnector(
            limit=0, keepalive_timeout=4, ttl_dns_cache=300, use_dns_cache=True
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.settings.gateway_connect_timeout_seconds,
                sock_read=self.settings.gateway_upstream_timeout_seconds,
            ),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        )

    async def stop(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools = {}
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, service: str, path: str) -> str:
        return self.urls[service] + path

    async def call(
        self,
        service: str,
        method: str,
        path: str,
        *,
        principal: Principal | SignedPrincipal | None,
        json: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout_seconds: float | None = None,
    ) -> tuple[int, Any]:
        """One JSON call to a service; connection failures become 502, timeouts 504."""
        out = dict(headers or {})
        if isinstance(principal, SignedPrincipal):
            out[PRINCIPAL_HEADER] = principal.header_for(service)
        elif principal is not None:
            out[PRINCIPAL_HEADER] = outgoing_header(principal, audience=service)
        request_id = request_id_var.get()
        if request_id:
            out["x-request-id"] = request_id
        data = None
        if json is not None:
            data = orjson.dumps(json)
            out["content-type"] = "application/json"
        kwargs: dict[str, Any] = {}
        if timeout_seconds is not None:
            kwargs["timeout"] = aiohttp.ClientTimeout(total=timeout_seconds)
        try:
            async with self.session.request(
                method, self.url(service, path), params=params, data=data, headers=out, **kwargs
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except TimeoutError:
            raise UpstreamTimeout(f"The {service} service timed out", service=service) from None
        except aiohttp.ClientError:
            raise UpstreamError(f"The {service} service is unreachable", service=service) from None
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        return status, body

    async def json(self, service: str, method: str, path: str, **kwargs: Any) -> Any:
        """`call()`, raising the service's error for any status >= 400."""
        status, body = await self.call(service, method, path, **kwargs)
        if status >= 400:
            raise error_from_upstream(status, body)
        return body
