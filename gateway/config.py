"""Gateway settings (env prefix KU_, like every Ku process)."""

from __future__ import annotations

from functools import lru_cache
from ipaddress import IPv4Network, IPv6Network, ip_network

from pydantic import Field

from services.kit.config import KuSettings

# Services the gateway routes to, by the first path segment after /v1/.
# Billing lives inside the ledger service; auth serves users, apps, keys and tokens.
DEFAULT_ROUTES = {
    "auth": "auth",
    "users": "auth",
    "apps": "auth",
    "keys": "auth",
    "ledger": "ledger",
    "billing": "ledger",
    "workspace": "workspace",
    "generation": "generation",
    "enhancement": "enhancement",
}


class GatewaySettings(KuSettings):
    # KU_CORS_ORIGINS: comma-separated origins of the frontends allowed to call the API.
    cors_origins: str = ""

    # KU_GATEWAY_MAX_BODY_BYTES: request bodies above this get 413 (gateway.limits).
    gateway_max_body_bytes: int = 10 * 1024 * 1024
    # KU_GATEWAY_COMPAT_MAX_BODY_BYTES: the same for the old clients' /api/... routes.
    gateway_compat_max_body_bytes: int = 900_000
    # KU_GATEWAY_METRICS_PORT: Prometheus metrics on KU_GATEWAY_METRICS_HOST:this port,
    # never on the public port (0: off).
    gateway_metrics_port: int = 9108
    gateway_metrics_host: str = "127.0.0.1"
    # Seconds to wait for an upstream's connection / for each read of its response.
    gateway_connect_timeout_seconds: float = 2.0
    gateway_upstream_timeout_seconds: float = 30.0
    # The generation service's reads: a non-streamed generation answers only when its
    # last word is written (each provider read is bounded by KU_GENERATION_TIMEOUT_SECONDS).
    gateway_generation_timeout_seconds: float = 600.0
    # Requests carrying a body of at most this many bytes are forwarded in one piece;
    # larger (or unsized) bodies are streamed.
    gateway_buffer_body_bytes: int = 64 * 1024

    # KU_GATEWAY_KEY_CACHE_SECONDS: how long a verified API key is trusted before auth is
    # asked again. Capped at 5 s: a revoked key stops working within that, even if the
    # revocation event is lost.
    gateway_key_cache_seconds: float = 5.0
    gateway_jwks_cache_seconds: float = 300.0
    # Shared with the auth service (KU_AUTH_TOKEN_ISSUER / KU_AUTH_TOKEN_AUDIENCE).
    auth_token_issuer: str = "ku-auth"
    auth_token_audience: str = "ku"
    auth_token_leeway_seconds: int = 30

    # Rate limits: requests per window, counted in Redis across every gateway instance.
    gateway_rate_window_seconds: int = 60
    gateway_rate_per_key: int = 6000
    gateway_rate_per_user: int = 1200
    gateway_rate_per_ip: int = 12000
    # KU_GATEWAY_RATE_APPS='{"penora": 20000}': per-key limit for an app's keys.
    gateway_rate_apps: dict[str, int] = Field(default_factory=dict)
    # Trust X-Forwarded-For for the client address, only from these proxies (CIDRs): the
    # client is the right-most hop that is not one of them.
    gateway_trust_forwarded: bool = False
    gateway_trusted_proxies: str = "127.0.0.1/32,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16"

    # Server-sent events: keep-alive comment interval; entries replayed on resume.
    gateway_sse_keepalive_seconds: float = 15.0
    gateway_sse_replay_max: int = 10_000
    # KU_GATEWAY_EVENTS_TICKET_SECONDS: how long a browser's single-use ticket for
    # `/v1/events` (POST /v1/events/tickets) stays valid if unused.
    gateway_events_ticket_seconds: int = 60

    # Shared with the generation service (KU_GENERATION_BREAKER_OPEN_SECONDS): how long
    # its providers' breakers stay open, for the console's providers page.
    generation_breaker_open_seconds: float = 30.0

    # Extra routes: KU_GATEWAY_ROUTES='{"generate": "generation"}'.
    gateway_routes: dict[str, str] = Field(default_factory=dict)

    @property
    def trusted_proxy_networks(self) -> tuple[IPv4Network | IPv6Network, ...]:
        return _networks(self.gateway_trusted_proxies)

    @property
    def key_cache_seconds(self) -> float:
        return min(self.gateway_key_cache_seconds, 5.0)

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip() and o.strip() != "*"]

    @property
    def routes(self) -> dict[str, str]:
        return {**DEFAULT_ROUTES, **self.gateway_routes}


@lru_cache
def get_settings() -> GatewaySettings:
    return GatewaySettings()


@lru_cache(maxsize=8)
def _networks(cidrs: str) -> tuple[IPv4Network | IPv6Network, ...]:
    return tuple(ip_network(c.strip(), strict=False) for c in cidrs.split(",") if c.strip())
