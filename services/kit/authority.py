"""Who may move or read whose money and data: one table, read by one function.

The table below is the code form of the authority table in docs/ledger.md (a test
compares them). Every route of the ledger, the workspace and billing calls
`authorize()` with its operation; what depends on the data (is this my hold? is this
user linked to my app?) comes back as a `Permit` that the owner of the data enforces
in the same transaction (the ledger's SQL, the workspace's queries). Deny by default:
an operation missing from the table, or a principal kind missing from its row, is 403.

Principal kinds (`kind_of`):
    user         a user's access token (SSO): their own data, reads only for money
    first_party  an app key with `users:any` (Penora, ImageGene): any user, its own lane
    partner      any other app key: only users linked to that app, its own lane
    service      generation, enhancement, billing: their own lane (see SERVICE_LANES)
    admin        an app key or account with `admin`: everything, with a required reason

"Lane": the app a charge is booked to (`spend:<app>`). An app key's lane is its own
app; a different `app` in a request body is 403. A service acting for a caller books
in the lane of the app the caller came through (its origin principal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from services.kit.errors import Forbidden, Unprocessable
from services.kit.principal import Principal

PrincipalKind = Literal["user", "first_party", "partner", "service", "admin"]
# Whose data: the caller's own user; any user; users linked to the caller's app; the
# user of the origin principal a service forwarded (with that origin's own limits).
Users = Literal["self", "any", "linked", "origin"]


@dataclass(frozen=True)
class Rule:
    users: Users
    # An app key must also hold one of these scopes (users and services: not asked).
    scopes: tuple[str, ...] = ()
    # Holds/charges the caller may resolve or refund: its own, or any.
    own_only: bool = True
    # The request may name another app's lane (admin only).
    any_lane: bool = False
    # Only these services have this lane (service rows only).
    services: frozenset[str] = frozenset()


R = "ledger:read"
W = "ledger:write"
G = "ledger:grant"
WR = "workspace:read"
WW = "workspace:write"

_ANY = Rule("any", own_only=False, any_lane=True)  # admin: everything
_SPENDERS = frozenset({"generation", "enhancement"})
_ALLOWANCE_SERVICES = frozenset({"enhancement"})


def _row(**kinds: Rule) -> dict[str, Rule]:
    return {"admin": _ANY, **kinds}


# operation -> principal kind -> rule. A kind that is absent is denied.
TABLE: dict[str, dict[str, Rule]] = {
    # --- ledger reads (balance, transactions, usage) ---
    "ledger.read": _row(
        user=Rule("self"),
        first_party=Rule("any", (R, W)),
        partner=Rule("linked", (R, W)),
        service=Rule("origin", services=_SPENDERS),
    ),
    # a hold by id: users see their own user's holds; apps and services only their own
    "ledger.hold.read": _row(
        user=Rule("self", own_only=False),
        first_party=Rule("any", (R, W)),
        partner=Rule("linked", (R, W)),
        service=Rule("any", services=_SPENDERS),
    ),
    # --- money out ---
    "ledger.debit": _row(first_party=Rule("any", (W,)), partner=Rule("linked", (W,))),
    "ledger.reserve": _row(
        first_party=Rule("any", (W,)),
        partner=Rule("linked", (W,)),
        service=Rule("origin", services=_SPENDERS),
    ),
    "ledger.capture": _row(
        first_party=Rule("any", (W,)),
        partner=Rule("linked", (W,)),
        service=Rule("any", services=_SPENDERS),
    ),
    # --- money back ---
    "ledger.release": _row(
        first_party=Rule("any", (W,)),
        partner=Rule("linked", (W,)),
        service=Rule("any", services=_SPENDERS),
    ),
    "ledger.refund": _row(first_party=Rule("any", (W,)), partner=Rule("linked", (W,))),
    # --- money in ---
    # an operator takes credit back (billing's clawbacks of refunded payments run in-process)
    "ledger.clawback": _row(),
    # No service grants Ku: monthly allowances are units, not Ku grants
    # (`ledger.allowance.*` below); billing grants in-process.
    "ledger.grant": _row(first_party=Rule("any", (G,)), partner=Rule("linked", (G,))),
    # Opening a wallet with the one welcome grant is harmless for any user (the grant
    # happens once per user whoever asks); initial credits instead are admin-only.
    "ledger.account.open": _row(
        first_party=Rule("any", ("users:write", G)), partner=Rule("any", ("users:write", G))
    ),
    # --- allowances: units (e.g. included enhancements), not Ku ---
    # Only the service whose product they are moves them; a draw is resolved by its
    # drawer (own_only). Reads, as the user's other ledger data; the service reads any
    # user's (its monthly job and its `GET /allowance` for admins have no origin).
    "ledger.allowance.read": {
        "admin": _ANY,
        "user": Rule("self"),
        "first_party": Rule("any", (R, W)),
        "partner": Rule("linked", (R, W)),
        "service": Rule("any", services=_ALLOWANCE_SERVICES),
    },
    "ledger.allowance.grant": {"service": Rule("any", services=_ALLOWANCE_SERVICES)},
    "ledger.allowance.draw": {"service": Rule("any", services=_ALLOWANCE_SERVICES)},
    "ledger.allowance.confirm": {"service": Rule("any", services=_ALLOWANCE_SERVICES)},
    "ledger.allowance.return": {"service": Rule("any", services=_ALLOWANCE_SERVICES)},
    # --- workspace ---
    # Services read a task's input and save its result on the worker, after the request
    # that started it (and its origin) is gone; the money was authorized at submit.
    "workspace.read": _row(
        user=Rule("self"),
        first_party=Rule("any", (WR, WW)),
        partner=Rule("linked", (WR, WW)),
        service=Rule("any", services=_SPENDERS),
    ),
    "workspace.write": _row(
        user=Rule("self"),
        first_party=Rule("any", (WW,)),
        partner=Rule("linked", (WW,)),
        service=Rule("any", services=_SPENDERS),
    ),
    "workspace.quota": _row(),
    # --- billing ---
    "billing.buy": _row(
        user=Rule("self"), first_party=Rule("any", (W,)), partner=Rule("linked", (W,))
    ),
    "billing.read": _row(
        user=Rule("self"), first_party=Rule("any", (R, W)), partner=Rule("linked", (R, W))
    ),
    "billing.admin": _row(),
    # the month's revenue, in aggregate: enhancement funds its provider pools from it
    "billing.revenue": _row(service=Rule("any", services=frozenset({"enhancement"}))),
}

# Operations that move money: an admin must say why (`reason`), and it is audited.
MONEY = frozenset(
    {
        "ledger.debit",
        "ledger.reserve",
        "ledger.capture",
        "ledger.release",
        "ledger.refund",
        "ledger.grant",
        "ledger.clawback",
    }
)

# The app a service books in when its origin came through no app (a user token
# without an `app` claim): generation is Penora's engine, enhancement ImageGene's.
SERVICE_LANES = {"generation": "penora", "enhancement": "imagegene"}


def kind_of(principal: Principal) -> PrincipalKind:
    if principal.is_admin:
        return "admin"
    if principal.kind == "user":
        return "user"
    if principal.kind == "service":
        return "service"
    return "first_party" if "users:any" in principal.scopes else "partner"


@dataclass(frozen=True)
class Permit:
    """What the caller may do, for the data owner to enforce.

    users:   "any" | "self:<user_id>" | "linked:<app>" — whose money or data
    lane:    the app to book a charge in (None for reads)
    owner:   the actor recorded on holds this call creates
    holds:   "*" or the actor whose holds may be resolved
    charges: "*" or the app whose charges may be refunded
    audit:   {"actor", "reason"} for admin money operations
    """

    operation: str
    kind: PrincipalKind
    actor: str
    users: str
    lane: str | None
    owner: str
    holds: str
    charges: str
    audit: dict[str, str] | None

    def as_sql(self) -> dict[str, Any]:
        """The `auth` object the ledger's SQL enforces (see sql/ and docs/ledger.md)."""
        out: dict[str, Any] = {
            "user": self.users,
            "owner": self.owner,
            "holds": self.holds,
            "charges": self.charges,
        }
        if self.audit:
            out["audit"] = self.audit
        return out

    def allows_user(self, user_id: str, linked: bool | None = None) -> bool:
        """For owners that check in Python: may this permit touch `user_id`'s data?
        `linked`: whether `user_id` is linked to the permit's app (needed for partners)."""
        if self.users == "any":
            return True
        if self.users.startswith("self:"):
            return self.users[5:] == user_id
        return bool(linked)

    def check_user(self, user_id: str, linked: bool | None = None) -> None:
        if not self.allows_user(user_id, linked):
            raise denied_user(self.users)


def denied_user(users: str) -> Forbidden:
    if users.startswith("linked:"):
        return Forbidden("This app may act only for users linked to it", code="user_not_linked")
    return Forbidden("A user token may act only on its own user", code="wrong_user")


def authorize(
    principal: Principal,
    operation: str,
    *,
    origin: Principal | None = None,
    app: str | None = None,
    reason: str | None = None,
) -> Permit:
    """The table's answer for `principal` doing `operation`, or Forbidden.

    origin: the caller a service acts for (`services.kit.principal.origin_principal`).
    app: the lane a request body names, if any (must be the caller's own, except admin).
    reason: why (required from admins for money operations).
    """
    row = TABLE.get(operation)
    if row is None:
        raise Forbidden("Operation not allowed", code="forbidden", operation=operation)
    kind = kind_of(principal)
    rule = row.get(kind)
    if rule is None:
        raise Forbidden(
            f"A {kind.replace('_', '-')} principal may not do this",
            code="forbidden",
            operation=operation,
        )
    if kind in ("first_party", "partner") and rule.scopes:
        principal.require_scope(*rule.scopes)
    if kind == "service" and principal.app not in rule.services:
        raise Forbidden(
            f"The {principal.app} service may not do this", code="forbidden", operation=operation
        )

    audit = None
    if kind == "admin" and operation in MONEY:
        if not reason or not reason.strip():
            raise Unprocessable("An admin money operation needs a reason", code="reason_required")
        audit = {"actor": principal.who, "reason": reason.strip()}

    users, lane = _users_and_lane(principal, kind, rule, origin, operation)
    if app is not None and lane is not None and app != lane:
        if not rule.any_lane:
            raise Forbidden(
                "An app acts only in its own name",
                code="wrong_app",
                app=app,
                allowed=lane,
            )
        lane = app
    if kind == "admin" and app is not None:
        lane = app
    actor = principal.actor
    own = "*" if not rule.own_only else actor
    charges = "*" if not rule.own_only else (principal.app or "")
    return Permit(
        operation=operation,
        kind=kind,
        actor=actor,
        users=users,
        lane=lane,
        owner=actor,
        holds=own,
        charges=charges,
        audit=audit,
    )


def _users_and_lane(
    principal: Principal,
    kind: PrincipalKind,
    rule: Rule,
    origin: Principal | None,
    operation: str,
) -> tuple[str, str | None]:
    if rule.users == "origin":
        if origin is None:
            raise Forbidden(
                "A service acts for a caller: forward its principal (X-Ku-Origin)",
                code="origin_required",
            )
        origin_kind = kind_of(origin)
        if origin_kind == "admin":
            # Operators move money in the ledger, with a reason on the journal; a
            # service spending a user's credit for an operator would do it without one.
            raise Forbidden(
                "An operator does not spend a user's credit through a service",
                code="admin_origin",
            )
        if origin_kind == "user":
            users = f"self:{origin.user_id}"
        elif origin_kind == "first_party":
            users = "any"
        else:
            users = f"linked:{origin.app}"
        lane = origin.app or SERVICE_LANES.get(str(principal.app))
        return users, lane
    if rule.users == "self":
        return f"self:{principal.user_id}", principal.app
    if rule.users == "linked":
        return f"linked:{principal.app}", principal.app
    # "any": admins and first-party apps book in their own name by default; a service
    # resolving its own holds has no lane of its own to check.
    if kind == "service":
        return "any", None
    return "any", principal.app
