"""Bus events the gateway reacts to, and `GET /v1/events` (Server-Sent Events).

One reader per gateway process (plain XREAD, no consumer group: every
instance must see every event) follows `<prefix>.events.ledger`,
`<prefix>.events.auth`, `<prefix>.events.generation` and `<prefix>.events.enhancement`:

- `key.revoked` drops the key from the local cache at once;
- `credits.changed`, the generation service's `story.*` events (a story's progress
  per chapter) and the enhancement service's `enhancement.task.updated` (a task's
  progress) fan out to the connected streams of that user.

While no stream is connected to this gateway, only the auth stream is read: the
others' entries (one per ledger batch) would be skipped anyway, and each wake-up of the
reader cost ~0.3 ms of CPU, about one per debit at a low rate. The first `/v1/events`
client starts them from their newest entry (`EventHub.activate`).

Stream entry ids are the SSE event ids, so `Last-Event-ID` resumes by reading
the stream from there (XRANGE) before joining the live feed. An entry holding a batch
(the ledger's one outbox row per batch: services/kit/outbox.py) gives its i-th event
the id `<entry id>.<i>`; a resume from such an id reads that entry again and skips its
events up to i. An entry is checked for its service's signature before any of its
events reaches a user's stream (once per entry, so once per batch).

Browsers: `EventSource` cannot send an `Authorization` header, so a page first trades
the user's access token for a ticket (`POST /v1/events/tickets`) and opens
`/v1/events?ticket=...`. A ticket is a random value kept in Redis under its hash for
KU_GATEWAY_EVENTS_TICKET_SECONDS, bound to that user, taken with GETDEL (single use,
across every gateway instance), and read only by this route: it is no access token
and no API key, and no other route looks at `?ticket=`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from pydantic import BaseModel, Field
from redis.asyncio import Redis
from starlette.responses import StreamingResponse

from gateway.access import client_ip
from gateway.auth import INVALID_KEY
from gateway.upstream import Upstreams, error_from_upstream
from services.kit.background import BackgroundLoop
from services.kit.errors import BadRequest, Forbidden, Unauthorized
from services.kit.money import milli_to_ku
from services.kit.openapi import error_responses
from services.kit.outbox import entry_payloads, event_issuer, stream_name
from services.kit.principal import Principal, SignedPrincipal
from services.kit.schemas import Text, UserId

log = logging.getLogger("ku.gateway.events")

QUEUE_MAX = 1000
ENHANCEMENT_TOPIC = "enhancement.task.updated"
# (SSE event id, topic, payload)
UserEvent = tuple[str, str, dict[str, Any]]
# The position `_id_tuple` gives an id without one (a single-event entry, or a client's
# Last-Event-ID from before batching): after every event of its entry.
WHOLE_ENTRY = 1 << 62
# How long the hub waits on the auth stream while nobody subscribes: a first subscriber's
# streams start at once (`EventHub.activate`), their entries are read within this.
IDLE_BLOCK_MS = 200


def _id(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _id_tuple(event_id: str) -> tuple[int, int, int]:
    """An SSE id's order: `<ms>-<seq>` (a single-event entry) or `<ms>-<seq>.<i>` (the
    i-th event of a batch entry). ValueError when it is neither."""
    entry_id, dot, position = event_id.partition(".")
    ms, _, seq = entry_id.partition("-")
    index = int(position) if dot else WHOLE_ENTRY
    if index < 0 or index > WHOLE_ENTRY:
        raise ValueError(event_id)
    return int(ms), int(seq or 0), index


def _event_ids(entry_id: str, fields: dict[Any, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(SSE id, payload) for each event of an entry, in order. Raises KeyError or
    ValueError for an entry that holds no events."""
    payloads, batch = entry_payloads(fields)
    if not all(isinstance(p, dict) for p in payloads):
        raise ValueError("an event payload is not an object")
    if not batch:
        return [(entry_id, payloads[0])]
    return [(f"{entry_id}.{i}", payload) for i, payload in enumerate(payloads)]


def _topic(fields: dict[Any, Any]) -> str:
    topic = fields.get(b"topic", fields.get("topic", b""))
    return topic.decode(errors="replace") if isinstance(topic, bytes) else str(topic)


def render_credits(payload: dict[str, Any]) -> dict[str, Any]:
    """`credits.changed` as clients see it: Ku numbers, not milli-Ku."""
    out: dict[str, Any] = {}
    for key, value in payload.items():
        if key.endswith("_milli") and isinstance(value, int):
            out[key[:-6]] = milli_to_ku(value)
        else:
            out[key] = value
    return out


class EventHub(BackgroundLoop):
    """While nobody subscribes, the hub follows only the auth stream (revocations): the
    other streams' entries (one per ledger batch, each story chapter...) are not read at
    all, so they cost this process nothing. The first subscriber `activate()`s the
    others from their newest entry at that moment, so it misses nothing that follows;
    when the last one leaves, the hub goes back to the auth stream alone."""

    task_name = "gateway-events"

    def __init__(self, redis: Redis, prefix: str, on_key_revoked: Callable[[str], Any]) -> None:
        super().__init__()
        self.redis = redis
        self.ledger_stream = stream_name(prefix, "ledger")
        self.auth_stream = stream_name(prefix, "auth")
        self.generation_stream = stream_name(prefix, "generation")
        self.enhancement_stream = stream_name(prefix, "enhancement")
        self.user_streams = (self.ledger_stream, self.generation_stream, self.enhancement_stream)
        self.on_key_revoked = on_key_revoked
        self._subscribers: dict[str, set[asyncio.Queue[UserEvent]]] = {}
        self.ready = asyncio.Event()
        self._cursor: dict[str, str] = {}
        self._active = False  # following the user streams (someone subscribes)
        self._activation = asyncio.Lock()

    async def _last_ids(self, streams: tuple[str, ...]) -> dict[str, str]:
        ids = {}
        for stream in streams:
            last = await self.redis.xrevrange(stream, count=1)
            ids[stream] = _id(last[0][0]) if last else "0-0"
        return ids

    async def activate(self) -> None:
        """Follow the user streams from their newest entry now (a no-op while followed).
        A new subscriber awaits it after `subscribe`, so every event after that point
        reaches it (at most IDLE_BLOCK_MS late, the idle hub's wait on auth)."""
        async with self._activation:
            if self._active:
                return
            self._cursor.update(await self._last_ids(self.user_streams))
            self._active = True

    async def run(self) -> None:
        while not self.stopping:
            try:
                if not self.ready.is_set():
                    self._cursor[self.auth_stream] = (await self._last_ids((self.auth_stream,)))[
                        self.auth_stream
                    ]
                    self.ready.set()
                if self._active and not self._subscribers:
                    self._active = False  # nobody listens: the auth stream alone
                elif self._subscribers and not self._active:
                    await self.activate()  # a subscriber that did not activate
                if self._active:
                    streams, block = dict(self._cursor), 1000
                else:
                    streams = {self.auth_stream: self._cursor[self.auth_stream]}
                    block = IDLE_BLOCK_MS
                response = await self.redis.xread(streams, count=500, block=block)  # type: ignore[arg-type]
                for stream, entries in response or []:
                    name = _id(stream)
                    if not self._subscribers and name != self.auth_stream and entries:
                        # The last subscriber left during the read: skip these undecoded.
                        self._cursor[name] = _id(entries[-1][0])
                        continue
                    for entry_id, fields in entries:
                        self._cursor[name] = _id(entry_id)
                        self._dispatch(name, _id(entry_id), fields)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("event reader failed: %s", exc)
                await asyncio.sleep(1)

    def _signed(self, stream: str, fields: dict[Any, Any]) -> bool:
        """Signed by the service whose stream it is (else someone wrote to Redis)."""
        if event_issuer(fields) == stream.rpartition(".events.")[2]:
            return True
        log.warning("dropped an unsigned or forged entry on %s", stream)
        return False

    def _dispatch(self, stream: str, entry_id: str, fields: dict[Any, Any]) -> None:
        topic = _topic(fields)
        revoked = topic == "key.revoked" and stream == self.auth_stream
        if not revoked and not self._for_user(stream, topic):
            return  # read unparsed: not an event the hub acts on
        try:
            events = _event_ids(entry_id, fields)
        except (KeyError, ValueError):
            return
        if revoked:
            if self._signed(stream, fields):
                for _, payload in events:
                    prefix = payload.get("prefix")
                    if prefix:
                        self.on_key_revoked(str(prefix))
            return
        deliveries = []
        for event_id, payload in events:
            queues = self._subscribers.get(str(payload.get("user_id")))
            if queues:
                deliveries.append((queues, (event_id, topic, payload)))
        if not deliveries or not self._signed(stream, fields):
            return
        for queues, item in deliveries:
            for queue in list(queues):
                if queue.full():
                    continue  # a stalled client; it can resume with Last-Event-ID
                queue.put_nowait(item)

    def _for_user(self, stream: str, topic: str) -> bool:
        """Events a user's `/v1/events` stream carries."""
        if stream == self.ledger_stream:
            return topic == "credits.changed"
        if stream == self.enhancement_stream:
            return topic == ENHANCEMENT_TOPIC
        return stream == self.generation_stream and topic.startswith("story.")

    def subscribe(self, user_id: str) -> asyncio.Queue[UserEvent]:
        queue: asyncio.Queue[UserEvent] = asyncio.Queue(QUEUE_MAX)
        self._subscribers.setdefault(user_id, set()).add(queue)
        return queue

    def unsubscribe(self, user_id: str, queue: asyncio.Queue[Any]) -> None:
        queues = self._subscribers.get(user_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._subscribers[user_id]

    async def replay(self, user_id: str, after: str, limit: int) -> list[UserEvent]:
        """The user's events after `after` (from every stream it follows), oldest first."""
        out: list[UserEvent] = []
        position = _id_tuple(after)
        entry = after.partition(".")[0]
        for stream in (self.ledger_stream, self.generation_stream, self.enhancement_stream):
            # An id inside a batch entry: read that entry again for its later events.
            start = ("(" if position[2] == WHOLE_ENTRY else "") + entry
            scanned = 0
            while scanned < limit:
                entries = await self.redis.xrange(stream, min=start, count=500)
                if not entries:
                    break
                for raw_id, fields in entries:
                    scanned += 1
                    topic = _topic(fields)
                    if not self._for_user(stream, topic):
                        continue
                    try:
                        events = _event_ids(_id(raw_id), fields)
                    except (KeyError, ValueError):
                        continue
                    mine = [
                        (event_id, topic, payload)
                        for event_id, payload in events
                        if str(payload.get("user_id")) == user_id and _id_tuple(event_id) > position
                    ]
                    if mine and self._signed(stream, fields):
                        out.extend(mine)
                start = "(" + _id(entries[-1][0])
        out.sort(key=lambda e: _id_tuple(e[0]))
        return out

    def subscribers(self) -> int:
        return sum(len(q) for q in self._subscribers.values())


# A ticket names itself, so a log line or a support ticket shows what it is.
TICKET_PREFIX = "kuet_"


class Tickets:
    """Single-use, short-lived tickets that open one user's event stream."""

    def __init__(self, redis: Redis, prefix: str, ttl_seconds: int) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds

    def _key(self, ticket: str) -> str:
        digest = hashlib.sha256(ticket.encode()).hexdigest()
        return f"{self.prefix}.events.ticket:{digest}"

    async def issue(self, principal: Principal) -> str:
        ticket = TICKET_PREFIX + secrets.token_urlsafe(32)
        record = {"user_id": principal.user_id, "app": principal.app}
        await self.redis.set(self._key(ticket), orjson.dumps(record), ex=self.ttl_seconds)
        return ticket

    async def redeem(self, ticket: str) -> Principal:
        """The user the ticket was issued to; the ticket is gone after this call."""
        raw = None
        if ticket.startswith(TICKET_PREFIX) and len(ticket) < 100:
            raw = await self.redis.getdel(self._key(ticket))
        if raw is None:
            raise Unauthorized(
                "Invalid, expired or already used events ticket", code="invalid_ticket"
            )
        record = orjson.loads(raw)
        # No scopes: the principal exists only to open this user's stream.
        return Principal(kind="user", user_id=str(record["user_id"]), app=record.get("app"))


class EventTicket(BaseModel):
    ticket: str = Field(description="Opens `GET /v1/events?ticket=...` once")
    expires_in: int = Field(description="Seconds the ticket stays valid if unused")
    user_id: str = Field(description="The user whose stream the ticket opens")
    url: str = Field(description="The stream's path with the ticket, for `new EventSource()`")

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "ticket": "kuet_q3Jd0...Zx8",
                    "expires_in": 60,
                    "user_id": "100000000000000000042",
                    "url": "/v1/events?ticket=kuet_q3Jd0...Zx8",
                }
            ]
        }
    }


def sse(entry_id: str, topic: str, data: dict[str, Any]) -> bytes:
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (
        entry_id.encode(),
        topic.encode(),
        orjson.dumps(data),
    )


async def stream_user(
    hub: EventHub, user_id: str, last_event_id: str | None, keepalive: float, replay_max: int
) -> AsyncIterator[bytes]:
    queue = hub.subscribe(user_id)  # before the replay, so nothing falls in between
    try:
        await hub.activate()  # the hub follows the user streams from here on, if it did not
        yield b"retry: 2000\n\n"
        seen = (0, 0, 0)
        if last_event_id:
            for entry_id, topic, payload in await hub.replay(user_id, last_event_id, replay_max):
                seen = _id_tuple(entry_id)
                yield sse(entry_id, topic, render_credits(payload))
        while True:
            try:
                entry_id, topic, payload = await asyncio.wait_for(queue.get(), timeout=keepalive)
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            if _id_tuple(entry_id) <= seen:
                continue
            yield sse(entry_id, topic, render_credits(payload))
    finally:
        hub.unsubscribe(user_id, queue)


EVENT_EXAMPLE = (
    "id: 1764120000000-0\nevent: credits.changed\n"
    'data: {"user_id": "100000000000000000042", "available": 45.75, "delta": -4.25, '
    '"app": "imagegene", "reason": "debit"}\n\n'
)
EVENT_ERRORS = error_responses(
    {
        400: (
            "An app key without `user_id`, a malformed Last-Event-ID, or a ticket sent "
            "with credentials",
            [
                BadRequest("user_id is required for app keys", code="user_id_required"),
                BadRequest("Invalid Last-Event-ID", code="invalid_last_event_id"),
                BadRequest("Send a ticket or credentials, not both", code="ambiguous_credentials"),
            ],
        ),
        401: (
            "No credentials, or an invalid, expired or used ticket",
            [
                Unauthorized(INVALID_KEY, code="invalid_api_key"),
                Unauthorized(
                    "Invalid, expired or already used events ticket", code="invalid_ticket"
                ),
            ],
        ),
        403: (
            "Another user's stream, a partner's key for a user not linked to its app, or a "
            "key without ledger scopes",
            [
                Forbidden("A user token may act only on its own user", code="wrong_user"),
                Forbidden("This app may act only for users linked to it", code="user_not_linked"),
            ],
        ),
        422: "Invalid `user_id`",
        429: "Rate limited: retry after `Retry-After` seconds",
    }
)
TICKET_ERRORS = error_responses(
    {
        401: (
            "No or an invalid access token",
            Unauthorized("Invalid access token", code="invalid_token"),
        ),
        403: (
            "Not a user's access token (API keys never go to browsers)",
            Forbidden("Tickets are issued for a user's access token", code="user_token_required"),
        ),
        429: "Rate limited: retry after `Retry-After` seconds",
    }
)


async def _may_read(upstreams: Upstreams, principal: Principal, user_id: str) -> None:
    """An app key streams a user's balance only if the ledger would show it that balance
    (the authority table's `ledger.read`: a partner only its linked users). The ledger
    decides, on the caller's own principal; a user with no account yet (404) passed its
    check. Anything else, the ledger unreachable included, refuses the stream."""
    status, body = await upstreams.call(
        "ledger",
        "GET",
        "/v1/ledger/balance",
        principal=principal,
        params={"user_id": user_id},
        timeout_seconds=5,
    )
    if status != 200 and status != 404:
        raise error_from_upstream(status, body)


def build_router(authenticated: Callable[..., Any]) -> APIRouter:
    router = APIRouter(tags=["events"])
    authenticate = authenticated()

    async def caller(
        request: Request,
        response: Response,
        ticket: Text | None = Query(
            None, description="From `POST /v1/events/tickets` (browsers), instead of a header"
        ),
    ) -> Principal:
        """The stream's caller: a ticket, or the usual key or token (never both)."""
        if ticket is None:
            return (await authenticate(request, response)).principal
        headers = request.headers
        if headers.get("authorization") or headers.get("x-api-key"):
            raise BadRequest("Send a ticket or credentials, not both", code="ambiguous_credentials")
        gateway = request.app.state.gateway
        access = gateway.access
        raw = {k: v for k, v in request.scope["headers"] if k == b"x-forwarded-for"}
        ip = client_ip(request.scope, raw, gateway.settings)
        try:
            principal = await gateway.tickets.redeem(ticket)
        except Unauthorized:
            await access.admit_anonymous(ip)  # guessing tickets is throttled like keys
            raise
        await access.limiter.check(access.limits(principal, ip), money=False)
        return principal

    @router.post(
        "/v1/events/tickets",
        status_code=201,
        response_model=EventTicket,
        summary="Get a ticket to open the event stream from a browser",
        responses={
            201: {"description": "A single-use ticket for this user's stream"},
            **TICKET_ERRORS,
        },
    )
    async def ticket(
        request: Request, identity: SignedPrincipal = Depends(authenticate)
    ) -> EventTicket:
        """A browser's `EventSource` cannot send `Authorization`: trade the user's Ku
        access token for a ticket, then open `GET /v1/events?ticket=...`. The ticket is
        bound to this user, works once, expires after about a minute if unused, and is
        accepted by no other route (it is not a bearer token). Get a new one to
        reconnect, passing the last event id as `?last_event_id=`."""
        principal = identity.principal
        if principal.kind != "user" or not principal.user_id:
            raise Forbidden(
                "Tickets are issued for a user's access token", code="user_token_required"
            )
        tickets: Tickets = request.app.state.gateway.tickets
        value = await tickets.issue(principal)
        return EventTicket(
            ticket=value,
            expires_in=tickets.ttl_seconds,
            user_id=principal.user_id,
            url=f"/v1/events?ticket={value}",
        )

    @router.get(
        "/v1/events",
        response_class=StreamingResponse,
        summary="Stream a user's events (Server-Sent Events)",
        responses={
            200: {
                "content": {"text/event-stream": {"example": EVENT_EXAMPLE}},
                "description": "`credits.changed`, `story.*` and `enhancement.task.updated` "
                "events; ids resume the stream",
            },
            **EVENT_ERRORS,
        },
    )
    async def events(
        request: Request,
        principal: Principal = Depends(caller),
        user_id: UserId | None = Query(None, description="For app keys: whose events"),
        last_event_id: str | None = Header(None, alias="Last-Event-ID"),
        resume_after: Text | None = Query(
            None,
            alias="last_event_id",
            description="Like the Last-Event-ID header, for a new EventSource after a ticket",
        ),
    ) -> StreamingResponse:
        """Server-sent events for one user: `credits.changed` (new balance), `story.*`
        (a story's progress) and `enhancement.task.updated`. Authenticate with a user's
        token or an app key (with `user_id`), or, from a browser, with a ticket."""
        if principal.kind == "user":
            target = user_id or principal.user_id
            principal.acts_for(target or "")
        else:
            principal.require_scope("ledger:read", "ledger:write")
            if not user_id:
                raise BadRequest("user_id is required for app keys", code="user_id_required")
            target = user_id
        last_event_id = last_event_id or resume_after
        if last_event_id is not None:
            try:
                _id_tuple(last_event_id)
            except ValueError:
                raise BadRequest("Invalid Last-Event-ID", code="invalid_last_event_id") from None
        gateway = request.app.state.gateway
        if principal.kind != "user":
            await _may_read(gateway.upstreams, principal, str(target))
        settings = gateway.settings
        return StreamingResponse(
            stream_user(
                gateway.hub,
                str(target),
                last_event_id,
                settings.gateway_sse_keepalive_seconds,
                settings.gateway_sse_replay_max,
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return router
