"""The gateway's access policy, in one place: authenticate, rate-limit, authorize.

Used by the proxy (pure ASGI) and by the gateway's own routes (compat API, SSE),
so every door applies the same rules.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, MutableMapping, Sequence
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any
from urllib.parse import parse_qsl

import orjson
from fastapi import Request, Response

from gateway.auth import Authenticator
from gateway.config import GatewaySettings
from gateway.ratelimit import Decision, Limit, RateLimiter, rate_headers
from services.kit.errors import Forbidden
from services.kit.principal import Principal, SignedPrincipal

# A principal needs one of these (or admin) to reach a route family at all; the
# services check the exact scope of each operation.
ROUTE_SCOPES: dict[str, frozenset[str]] = {
    "ledger": frozenset({"ledger:read", "ledger:write", "ledger:grant", "users:write"}),
    "billing": frozenset({"ledger:read", "ledger:write", "ledger:grant"}),
    "workspace": frozenset({"workspace:read", "workspace:write"}),
    "generation": frozenset({"generate"}),
    "enhancement": frozenset({"enhance"}),
    "events": frozenset({"ledger:read", "ledger:write"}),
}
# Reachable without credentials: the caller proves itself to the service
# (Razorpay's signature, the SSO token, a refresh token, public keys).
PUBLIC_PATHS = frozenset(
    {
        "/v1/billing/webhooks/razorpay",
        "/v1/auth/sso",
        "/v1/auth/refresh",
        "/v1/auth/logout",
        "/.well-known/jwks.json",
    }
)
# A result image by its signed link (`?expires=&sig=`, the enhancement service's
# `result_url`): the link is the credential, checked by the service (HMAC, expiry), so it
# works in an <img src>. Without both parameters the path needs credentials as usual.
SIGNED_RESULT = re.compile(r"/v1/enhancement/tasks/[0-9A-Fa-f-]{1,64}/result")
SIGNED_PREFIX = "/v1/enhancement/tasks/"
MONEY_ROUTES = frozenset({"ledger", "billing"})
# Where an API key may come as `?api_key=` (the old clients' routes, seed 001): a key in
# a URL ends up in logs and browser history, so the native API takes headers only.
QUERY_KEY_PREFIXES = ("/api/unified/", "/api/user-projects", "/api/project/", "/api/enhance-image")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LIMITS_CACHED = 10_000


def is_signed_link(method: str, path: str, query: str) -> bool:
    if method != "GET" or not path.startswith(SIGNED_PREFIX) or not SIGNED_RESULT.fullmatch(path):
        return False
    names = {k for k, _ in parse_qsl(query, keep_blank_values=True)}
    return "expires" in names and "sig" in names


def is_money(method: str, route: str) -> bool:
    return method not in SAFE_METHODS and route in MONEY_ROUTES


def check_scope(principal: Principal, route: str) -> None:
    needed = ROUTE_SCOPES.get(route)
    if needed is None or principal.is_admin or principal.scopes & needed:
        return
    raise Forbidden(f"Missing scope: one of {', '.join(sorted(needed))}", code="missing_scope")


def user_ids_in_path(path: str) -> Iterable[str]:
    """`.../users/<id>/...`: the segment after each `users`."""
    parts = path.split("/")
    for i, part in enumerate(parts[:-1]):
        if part == "users" and parts[i + 1]:
            yield parts[i + 1]


def json_body(body: bytes) -> Any:
    """`body` as the services read a JSON body, whatever its content type says (FastAPI
    parses a body sent with none as JSON): `\\u` escapes decoded, a BOM, UTF-16 or
    UTF-32 accepted (`json.loads`, what Starlette's `request.json()` calls). None when it
    is no JSON. Parsed only when it could name a `user_id`: spelled out, escaped, or in
    another encoding than ASCII."""
    if not (b"user_id" in body or b"\\" in body or b"\0" in body or not body.isascii()):
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:  # what orjson refuses and Python's json reads: NaN, a BOM, UTF-16/32
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def check_user(principal: Principal, path: str, query: str, body: Any = None) -> None:
    """A user token acts only for its own user id, wherever the request names another
    (a query's names are read percent-decoded, as the services read them)."""
    if principal.kind != "user":
        return
    named: list[str] = list(user_ids_in_path(path))
    if "user_id" in query or "%" in query:
        named += [v for k, v in parse_qsl(query, keep_blank_values=True) if k == "user_id"]
    if isinstance(body, dict) and "user_id" in body:
        named.append(str(body["user_id"]))
    for user_id in named:
        principal.acts_for(user_id)


class Access:
    def __init__(
        self, settings: GatewaySettings, authenticator: Authenticator, limiter: RateLimiter
    ) -> None:
        self.settings = settings
        self.authenticator = authenticator
        self.limiter = limiter
        # The `Limit`s by caller and by address, built once (bounded: cleared when full).
        self._own: dict[tuple[str, str | None, str | None, str | None], Limit] = {}
        self._ip: dict[str, Limit] = {}

    def admit_now(
        self,
        *,
        api_key: str | None,
        authorization: str | None,
        client_ip: str,
        money: bool,
    ) -> tuple[SignedPrincipal, Decision] | None:
        """`admit`'s answer when it needs no I/O and refuses nothing: a cached identity
        (`Authenticator.cached`) and a token at hand in every limit
        (`RateLimiter.check_now`). None: nothing was spent; await `admit`."""
        identity = self.authenticator.cached(api_key, authorization)
        if identity is None:
            return None
        decision = self.limiter.check_now(self.limits(identity.principal, client_ip), money=money)
        return None if decision is None else (identity, decision)

    async def admit(
        self,
        *,
        api_key: str | None,
        authorization: str | None,
        client_ip: str,
        money: bool,
    ) -> tuple[SignedPrincipal, Decision]:
        """Authenticate, then spend one request from each applicable limit."""
        try:
            identity = await self.authenticator.authenticate(api_key, authorization)
        except Exception:
            # Failed attempts count against the address, so guessing keys is throttled too.
            await self.limiter.check(self.ip_limits(client_ip), money=False)
            raise
        return identity, await self.limiter.check(
            self.limits(identity.principal, client_ip), money=money
        )

    async def admit_anonymous(self, client_ip: str) -> Decision:
        return await self.limiter.check(self.ip_limits(client_ip), money=False)

    def ip_limits(self, client_ip: str) -> list[Limit]:
        return [self._ip_limit(client_ip)]

    def _ip_limit(self, client_ip: str) -> Limit:
        limit = self._ip.get(client_ip)
        if limit is None:
            if len(self._ip) >= LIMITS_CACHED:
                self._ip.clear()
            limit = self._ip[client_ip] = Limit("ip", client_ip, self.settings.gateway_rate_per_ip)
        return limit

    def limits(self, principal: Principal, client_ip: str) -> list[Limit]:
        caller = (principal.kind, principal.user_id, principal.key_prefix, principal.app)
        own = self._own.get(caller)
        if own is None:
            s = self.settings
            if principal.kind == "user":
                own = Limit("user", principal.user_id or "", s.gateway_rate_per_user)
            else:
                per_key = s.gateway_rate_apps.get(principal.app or "", s.gateway_rate_per_key)
                own = Limit("key", principal.key_prefix or principal.app or "", per_key)
            if len(self._own) >= LIMITS_CACHED:
                self._own.clear()
            self._own[caller] = own
        return [own, self._ip_limit(client_ip)]


def client_ip(
    scope: MutableMapping[str, Any], headers: dict[bytes, bytes], settings: GatewaySettings
) -> str:
    """The caller's address. Behind trusted proxies (KU_GATEWAY_TRUST_FORWARDED and the
    peer in KU_GATEWAY_TRUSTED_PROXIES), the right-most X-Forwarded-For hop that is not
    one of our proxies: hops to its left were written by the client and prove nothing."""
    client = scope.get("client")
    peer = client[0] if client else "unknown"
    if not settings.gateway_trust_forwarded:
        return peer
    trusted = settings.trusted_proxy_networks
    if not _in(peer, trusted):
        return peer
    forwarded = headers.get(b"x-forwarded-for")
    if not forwarded:
        return peer
    hops = [h.strip() for h in forwarded.decode("latin-1").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _in(hop, trusted):
            return hop
    return hops[0] if hops else peer


def _in(address: str, networks: Sequence[IPv4Network | IPv6Network]) -> bool:
    try:
        ip = ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def authenticated(money: bool = False) -> Any:
    """FastAPI dependency for the gateway's own routes: the same admission as the proxy."""

    async def dependency(request: Request, response: Response) -> SignedPrincipal:
        gateway = request.app.state.gateway
        headers = request.headers
        api_key = headers.get("x-api-key")
        if api_key is None and request.url.path.startswith(QUERY_KEY_PREFIXES):
            # The seeds' old clients send `?api_key=` (seed 001); nothing else may.
            api_key = request.query_params.get("api_key")
        raw = {k: v for k, v in request.scope["headers"] if k == b"x-forwarded-for"}
        identity, decision = await gateway.access.admit(
            api_key=api_key,
            authorization=headers.get("authorization"),
            client_ip=client_ip(request.scope, raw, gateway.settings),
            money=money,
        )
        for name, value in rate_headers(decision):
            response.headers[name.decode()] = value.decode()
        return identity

    return dependency
