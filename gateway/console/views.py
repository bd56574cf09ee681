"""The console's pages. GETs render; POSTs check the CSRF token, call a service's admin
API with the signed-in key's principal, leave a message for the next page and redirect
(except where a new key must be shown once, which renders directly, uncached)."""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.datastructures import FormData
from starlette.responses import HTMLResponse, RedirectResponse, Response

from gateway.access import client_ip
from gateway.console.charts import daily_chart
from gateway.console.session import (
    COOKIE,
    PRE_COOKIE,
    SESSION_SECONDS,
    ConsoleSession,
    Credential,
    Sessions,
    check_csrf,
    check_origin,
    clear_cookie,
    set_cookie,
)
from services.kit.breaker import CircuitBreaker
from services.kit.errors import Forbidden, KuError, NotFound, Unauthorized
from services.kit.money import ku_to_milli, milli_to_ku
from services.kit.principal import GATEWAY, SCOPES, SignedPrincipal, derived_secret
from services.kit.schemas import Text

TEMPLATES = Path(__file__).resolve().parent / "templates"
SECURITY_HEADERS = {
    # Everything is same-origin; no script at all; forms post only here.
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: with no-referrer a browser posts `Origin: null`.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
GRANT_SOURCES = ("admin", "compensation", "promo")
CLAWBACK_SOURCES = ("admin", "compensation", "promo", "purchase", "subscription", "welcome")


def _ku(value: Any) -> str:
    """A Ku amount from an API (a JSON number) or int milli-Ku, as exact text."""
    milli = value if isinstance(value, int) and not isinstance(value, bool) else None
    if milli is None:
        milli = ku_to_milli(value if value is not None else 0)
    sign = "-" if milli < 0 else ""
    whole, frac = divmod(abs(milli), 1000)
    return f"{sign}{whole:,}" + (f".{frac:03d}".rstrip("0") if frac else "")


def _env() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["ku"] = lambda v: _ku(ku_to_milli(v) if v is not None else 0)
    env.filters["milli"] = _ku
    env.filters["minor"] = lambda v: f"{int(v or 0) // 100:,}.{int(v or 0) % 100:02d}"
    env.filters["when"] = lambda v: (str(v).replace("T", " ")[:16] + " UTC") if v else "never"
    return env


ENV = _env()


def render(name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    html = ENV.get_template(name).render(**context)
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers=SECURITY_HEADERS)


def session_secret() -> str:
    """The key console sessions are encrypted with: derived from the gateway's own
    principal signing key, which only the gateway holds (docs/kit.md, "Principals")."""
    return derived_secret(GATEWAY, "console-sessions")


class Console:
    """What every page needs: the gateway's parts, and the session behind the cookie."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.gateway = request.app.state.gateway
        settings = self.gateway.settings
        self.sessions = Sessions(self.gateway.redis, settings.bus_prefix, session_secret())

    def client_ip(self) -> str:
        headers = {k: v for k, v in self.request.scope["headers"] if k == b"x-forwarded-for"}
        return client_ip(self.request.scope, headers, self.gateway.settings)

    async def admit(self, credential: Credential) -> SignedPrincipal:
        """The credential as the API would see it (with the rate limits); admins only.
        An SSO session's expired access token is refreshed (the credential changes)."""
        if credential.api_key is not None:
            identity, _ = await self.gateway.access.admit(
                api_key=credential.api_key,
                authorization=None,
                client_ip=self.client_ip(),
                money=False,
            )
        else:
            identity = await self._sso_identity(credential)
        if "admin" not in identity.principal.scopes:
            raise Forbidden(
                "The console needs a key with the admin scope, or an account with the admin role",
                code="not_admin",
            )
        return identity

    async def _sso_identity(self, credential: Credential) -> SignedPrincipal:
        access = self.gateway.access
        try:
            identity, _ = await access.admit(
                api_key=None,
                authorization=f"Bearer {credential.access_token}",
                client_ip=self.client_ip(),
                money=False,
            )
        except Unauthorized:  # expired: refresh (auth reads the roles again)
            pair = await self.gateway.upstreams.json(
                "auth",
                "POST",
                "/v1/auth/refresh",
                principal=None,
                json={"refresh_token": credential.refresh_token},
            )
            credential.access_token = pair["access_token"]
            credential.refresh_token = pair["refresh_token"]
            identity, _ = await access.admit(
                api_key=None,
                authorization=f"Bearer {credential.access_token}",
                client_ip=self.client_ip(),
                money=False,
            )
        return identity

    async def sign_in_sso(self, sso_token: str) -> Credential:
        """Exchange the main site's SSO token at auth; the account must be an admin."""
        await self.gateway.access.admit_anonymous(self.client_ip())
        pair = await self.gateway.upstreams.json(
            "auth", "POST", "/v1/auth/sso", principal=None, json={"token": sso_token}
        )
        credential = Credential(
            access_token=pair["access_token"], refresh_token=pair["refresh_token"]
        )
        try:
            await self.admit(credential)
        except KuError:
            await self.sign_out_sso(credential)
            raise
        return credential

    async def sign_out_sso(self, credential: Credential) -> None:
        if credential.refresh_token:
            body = {"refresh_token": credential.refresh_token}
            try:
                await self.gateway.upstreams.call(
                    "auth", "POST", "/v1/auth/logout", principal=None, json=body
                )
            except KuError:
                pass  # the refresh token expires on its own

    async def signed_in(self) -> tuple[ConsoleSession, SignedPrincipal] | None:
        session = await self.sessions.load(self.request)
        if session is None:
            return None
        credential = session.credential
        before = credential.refresh_token
        try:
            identity = await self.admit(credential)
            if credential.api_key is None:
                # The role, checked live: taking it ends the session at once, not when
                # the access token expires.
                user_id = identity.principal.user_id
                roles = await self.call(identity, "auth", "GET", f"/v1/users/{user_id}/roles")
                if "admin" not in roles["roles"]:
                    raise Forbidden("The admin role was taken", code="not_admin")
        except (Unauthorized, Forbidden):  # revoked, expired or no longer admin
            await self.sessions.end(session)
            await self.sign_out_sso(credential)
            return None
        if credential.refresh_token != before:
            await self.sessions.save(session)
        return session, identity

    async def call(
        self, identity: SignedPrincipal, service: str, method: str, path: str, **kwargs: Any
    ) -> Any:
        return await self.gateway.upstreams.json(
            service, method, path, principal=identity, **kwargs
        )

    async def form(self, session: ConsoleSession | None, expected: str | None) -> FormData:
        check_origin(self.request)
        form = await self.request.form()
        check_csrf(expected if session is None else session.csrf, form.get("csrf"))
        return form

    async def flash(self, session: ConsoleSession, kind: str, text: str) -> None:
        session.flash.append((kind, text))
        await self.sessions.save(session)

    async def page(
        self, session: ConsoleSession, name: str, status_code: int = 200, **context: Any
    ) -> HTMLResponse:
        messages, session.flash = session.flash, []
        if messages:
            await self.sessions.save(session)
        return render(name, status_code, csrf=session.csrf, messages=messages, **context)


def _text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def _error_text(exc: KuError) -> str:
    return f"{exc.message} ({exc.code})" if exc.code else exc.message


def build_router() -> APIRouter:
    router = APIRouter(prefix="/console", include_in_schema=False)

    @router.get("")
    async def home(request: Request) -> Response:
        signed = await Console(request).signed_in()
        return redirect("/console/overview" if signed else "/console/sign-in")

    @router.get("/sign-in")
    async def sign_in_page(request: Request) -> Response:
        token = secrets.token_urlsafe(32)
        response = render("sign_in.html", csrf=token, messages=[], signed_in=False)
        set_cookie(response, PRE_COOKIE, token, max_age=1800)
        return response

    @router.post("/sign-in")
    async def sign_in(request: Request) -> Response:
        """With an admin API key."""
        console = Console(request)
        form = await console.form(None, request.cookies.get(PRE_COOKIE))
        credential = Credential(api_key=_text(form, "api_key"))
        try:
            await console.admit(credential)
        except KuError as exc:
            return _sign_in_failed(exc)
        return await _signed_in(console, credential)

    @router.post("/sign-in/sso")
    async def sign_in_sso(request: Request) -> Response:
        """With an SSO account that holds the admin role (the main site's SSO token)."""
        console = Console(request)
        form = await console.form(None, request.cookies.get(PRE_COOKIE))
        try:
            credential = await console.sign_in_sso(_text(form, "sso_token"))
        except KuError as exc:
            return _sign_in_failed(exc)
        return await _signed_in(console, credential)

    @router.post("/sign-out")
    async def sign_out(request: Request) -> Response:
        console = Console(request)
        session = await console.sessions.load(request)
        if session is not None:
            await console.form(session, None)
            await console.sessions.end(session)
            await console.sign_out_sso(session.credential)
        response = redirect("/console/sign-in")
        clear_cookie(response, COOKIE)
        return response

    @router.get("/overview")
    async def overview(request: Request) -> Response:
        console = Console(request)
        signed = await console.signed_in()
        if signed is None:
            return redirect("/console/sign-in")
        session, identity = signed
        data = await console.call(
            identity, "ledger", "GET", "/v1/ledger/admin/overview", params={"days": 30}
        )
        days = [
            {
                "day": d["day"],
                "issued_milli": ku_to_milli(d["issued"]),
                "spent_milli": ku_to_milli(d["spent"]),
            }
            for d in data["days"]
        ]
        names = sorted(
            {r["name"] for r in data["spent_today"] + data["held_now"]}
            | {r["name"] for r in data["issued_today"]}
        )
        table = {
            "issued": {r["name"]: r["amount"] for r in data["issued_today"]},
            "spent": {r["name"]: r["amount"] for r in data["spent_today"]},
            "held": {r["name"]: r["amount"] for r in data["held_now"]},
        }
        totals = {k: sum(ku_to_milli(v) for v in t.values()) for k, t in table.items()}
        return await console.page(
            session,
            "overview.html",
            data=data,
            names=names,
            table=table,
            totals=totals,
            chart=daily_chart(days),
        )

    @router.get("/users")
    async def find_user(request: Request, user_id: Text = "") -> Response:
        user_id = user_id.strip()
        if not user_id:
            return redirect("/console/overview")
        return redirect(f"/console/users/{user_id}")

    @router.get("/users/{user_id}")
    async def user_page(request: Request, user_id: Text) -> Response:
        console = Console(request)
        signed = await console.signed_in()
        if signed is None:
            return redirect("/console/sign-in")
        session, identity = signed
        try:
            ledger = await console.call(
                identity, "ledger", "GET", f"/v1/ledger/admin/users/{user_id}"
            )
        except KuError as exc:
            if exc.status_code not in (404, 422):
                raise
            return await console.page(
                session,
                "user_missing.html",
                status_code=404,
                user_id=user_id,
                error=_error_text(exc),
            )
        balance = await console.call(
            identity, "ledger", "GET", "/v1/ledger/balance", params={"user_id": user_id}
        )
        transactions = await console.call(
            identity,
            "ledger",
            "GET",
            "/v1/ledger/transactions",
            params={"user_id": user_id, "limit": 25},
        )
        profile = await _optional(console, identity, "auth", f"/v1/users/{user_id}")
        projects = await _optional(
            console,
            identity,
            "workspace",
            "/v1/workspace/projects",
            {"user_id": user_id, "limit": 25},
        )
        storage = await _optional(
            console, identity, "workspace", "/v1/workspace/storage", {"user_id": user_id}
        )
        # This user's own payments (billing's per-user list; an admin may read any user's).
        payments = await _optional(
            console, identity, "ledger", "/v1/billing/payments", {"user_id": user_id, "limit": 25}
        )
        return await console.page(
            session,
            "user.html",
            user_id=user_id,
            profile=profile,
            ledger=ledger,
            balance=balance,
            transactions=transactions["items"],
            projects=projects["items"] if projects else None,
            storage=storage,
            payments=payments["items"] if payments else None,
            grant_sources=GRANT_SOURCES,
            clawback_sources=CLAWBACK_SOURCES,
            idempotency_key=uuid.uuid4().hex,
        )

    @router.post("/users/{user_id}/grant")
    async def grant(request: Request, user_id: Text) -> Response:
        return await _move(request, user_id, "grant")

    @router.post("/users/{user_id}/clawback")
    async def clawback(request: Request, user_id: Text) -> Response:
        return await _move(request, user_id, "clawback")

    @router.get("/keys")
    async def keys_page(request: Request) -> Response:
        console = Console(request)
        signed = await console.signed_in()
        if signed is None:
            return redirect("/console/sign-in")
        session, identity = signed
        keys = await console.call(identity, "auth", "GET", "/v1/keys")
        keys.sort(key=lambda k: k["created_at"], reverse=True)
        apps = await console.call(identity, "auth", "GET", "/v1/apps")
        return await console.page(
            session, "keys.html", keys=keys, apps=apps, scopes=SCOPES, own=identity.principal
        )

    @router.post("/keys")
    async def create_key(request: Request) -> Response:
        console = Console(request)
        signed = await console.signed_in()
        if signed is None:
            return redirect("/console/sign-in")
        session, identity = signed
        form = await console.form(session, None)
        body: dict[str, Any] = {
            "app": _text(form, "app"),
            "scopes": [s for s in form.getlist("scopes") if isinstance(s, str)],
        }
        if _text(form, "name"):
            body["name"] = _text(form, "name")
        try:
            try:
                created = await console.call(identity, "auth", "POST", "/v1/keys", json=body)
            except NotFound:  # a new app: register it first, as `ku keys create` does
                app = {"name": body["app"]}
                await console.call(identity, "auth", "POST", "/v1/apps", json=app)
                created = await console.call(identity, "auth", "POST", "/v1/keys", json=body)
        except KuError as exc:
            await console.flash(session, "error", "Key not created: " + _error_text(exc))
            return redirect("/console/keys")
        return await console.page(session, "key_created.html", created=created, rotated=None)

    @router.post("/keys/{prefix}/revoke")
    async def revoke_key(request: Request, prefix: Text) -> Response:
        console = Console(request)
        signed = await console.signed_in()
        if signed is None:
            return redirect("/console/sign-in")
        session, identity = signed
        await console.form(session, None)
        try:
            await console.call(identity, "auth", "POST", f"/v1/keys/{prefix}/revoke")
            await console.flash(session, "ok", f"Key {prefix} revoked.")
        except KuError as exc:
            await console.flash(session, "error", f"Key {prefix} not revoked: {_error_text(exc)}")
        return redirect("/console/keys")

    @router.post("/keys/{prefix}/rotate")
    async def rotate_key(request: Request, prefix: Text) -> Response:
        console = Console(request)
        signed = await console.signed_in()
        if signed is None:
            return redirect("/console/sign-in")
        session, identity = signed
        form = await console.form(session, None)
        try:
            overlap = int(_text(form, "overlap_seconds") or "86400")
            rotated = await console.call(
                identity,
                "auth",
                "POST",
                f"/v1/keys/{prefix}/rotate",
                json={"overlap_seconds": overlap},
            )
        except ValueError:
            await console.flash(session, "error", "The overlap is a number of seconds.")
            return redirect("/console/keys")
        except KuError as exc:
            await console.flash(session, "error", f"Key {prefix} not rotated: {_error_text(exc)}")
            return redirect("/console/keys")
        return await console.page(session, "key_created.html", created=rotated, rotated=prefix)

    @router.get("/payments")
    async def payments_page(request: Request) -> Response:
        console = Console(request)
        signed = await console.signed_in()
        if signed is None:
            return redirect("/console/sign-in")
        session, identity = signed
        payments = await console.call(
            identity, "ledger", "GET", "/v1/billing/admin/payments", params={"limit": 50}
        )
        alerts = await _optional(console, identity, "ledger", "/v1/billing/alerts", {"limit": 50})
        return await console.page(
            session,
            "payments.html",
            payments=payments["items"],
            alerts=alerts["items"] if alerts else None,
        )

    @router.post("/payments/reconcile")
    async def reconcile(request: Request) -> Response:
        console = Console(request)
        signed = await console.signed_in()
        if signed is None:
            return redirect("/console/sign-in")
        session, identity = signed
        form = await console.form(session, None)
        try:
            hours = int(_text(form, "hours") or "72")
        except ValueError:
            await console.flash(session, "error", "Look back: a number of hours.")
            return redirect("/console/payments")
        try:
            done = await console.call(
                identity, "ledger", "POST", "/v1/billing/admin/reconcile", json={"hours": hours}
            )
        except KuError as exc:
            await console.flash(session, "error", f"Not reconciled: {_error_text(exc)}")
            return redirect("/console/payments")
        counts = done["counts"]
        summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing to do"
        kind = "error" if counts.get("errors") else "ok"
        await console.flash(session, kind, f"Reconciled the last {hours} h: {summary}.")
        return redirect("/console/payments")

    @router.get("/providers")
    async def providers_page(request: Request) -> Response:
        console = Console(request)
        signed = await console.signed_in()
        if signed is None:
            return redirect("/console/sign-in")
        session, identity = signed
        pools = await _optional(console, identity, "enhancement", "/v1/enhancement/pools")
        alerts = await _optional(
            console, identity, "enhancement", "/v1/enhancement/alerts", {"limit": 50}
        )
        return await console.page(
            session,
            "providers.html",
            generation=await _generation_breakers(console, identity),
            breaker_open_seconds=console.gateway.settings.generation_breaker_open_seconds,
            pools=pools,
            alerts=alerts["items"] if alerts else None,
            reference=uuid.uuid4().hex,
        )

    @router.post("/providers/{provider}/refill")
    async def refill(request: Request, provider: Text) -> Response:
        console = Console(request)
        signed = await console.signed_in()
        if signed is None:
            return redirect("/console/sign-in")
        session, identity = signed
        form = await console.form(session, None)
        try:
            milli = ku_to_milli(_text(form, "amount"))
        except ValueError as exc:
            await console.flash(session, "error", f"Amount: {exc}")
            return redirect("/console/providers")
        if milli <= 0:
            await console.flash(session, "error", "Amount: must be greater than 0")
            return redirect("/console/providers")
        # The form's own reference: submitting the same form twice refills once.
        body = {
            "amount": milli_to_ku(milli),
            "reference": f"console:{_text(form, 'reference') or uuid.uuid4().hex}",
        }
        try:
            pool = await console.call(
                identity,
                "enhancement",
                "POST",
                f"/v1/enhancement/pools/{provider}/refill",
                json=body,
            )
        except KuError as exc:
            await console.flash(session, "error", f"{provider} not refilled: {_error_text(exc)}")
            return redirect("/console/providers")
        balance = _ku(ku_to_milli(pool["balance"]))
        await console.flash(
            session, "ok", f"Refilled {provider} with {_ku(milli)} Ku; balance {balance} Ku."
        )
        return redirect("/console/providers")

    return router


def _sign_in_failed(exc: KuError) -> Response:
    token = secrets.token_urlsafe(32)
    response = render(
        "sign_in.html",
        status_code=exc.status_code if exc.status_code in (401, 403, 429) else 400,
        csrf=token,
        messages=[("error", "Sign-in failed: " + _error_text(exc))],
        signed_in=False,
    )
    set_cookie(response, PRE_COOKIE, token, max_age=1800)
    return response


async def _signed_in(console: Console, credential: Credential) -> Response:
    session = await console.sessions.create(credential)
    done = redirect("/console/overview")
    set_cookie(done, COOKIE, session.sid, max_age=SESSION_SECONDS)
    clear_cookie(done, PRE_COOKIE)
    return done


async def _optional(
    console: Console,
    identity: SignedPrincipal,
    service: str,
    path: str,
    params: dict[str, Any] | None = None,
) -> Any:
    """A panel from another service: shown empty, not fatal, when that service fails."""
    try:
        return await console.call(identity, service, "GET", path, params=params)
    except KuError:
        return None


async def _generation_breakers(
    console: Console, identity: SignedPrincipal
) -> list[dict[str, Any]] | None:
    """Generation's providers (from its model catalog) with their circuit breakers, read
    from Redis where every generation process keeps them (services/kit/breaker.py)."""
    catalog = await _optional(console, identity, "generation", "/v1/generation/models")
    if catalog is None:
        return None
    models: dict[str, list[str]] = {}
    for model in catalog["data"]:
        models.setdefault(model["owned_by"], []).append(model["id"])
    settings = console.gateway.settings
    out = []
    for name in sorted(models):
        breaker = CircuitBreaker(
            console.gateway.redis,
            f"generation:{name}",
            prefix=settings.bus_prefix,
            open_seconds=settings.generation_breaker_open_seconds,
        )
        state = await breaker.state()
        out.append(
            {
                "name": name,
                "models": models[name],
                "state": state.state,
                "failures": state.failures,
                "opened_at": (
                    datetime.fromtimestamp(state.opened_at, UTC).isoformat()
                    if state.opened_at
                    else None
                ),
            }
        )
    return out


async def _move(request: Request, user_id: str, kind: str) -> Response:
    """Grant or claw back credit: a reason is required and kept on the journal."""
    console = Console(request)
    signed = await console.signed_in()
    if signed is None:
        return redirect("/console/sign-in")
    session, identity = signed
    form = await console.form(session, None)
    back = f"/console/users/{user_id}"
    reason = _text(form, "reason")
    source = _text(form, "source")
    try:
        milli = ku_to_milli(_text(form, "amount"))
    except ValueError as exc:
        await console.flash(session, "error", f"Amount: {exc}")
        return redirect(back)
    if milli <= 0:
        await console.flash(session, "error", "Amount: must be greater than 0")
        return redirect(back)
    if len(reason) < 3:
        await console.flash(session, "error", "A reason is required (at least 3 characters).")
        return redirect(back)
    # The form's own key: submitting the same form twice moves the credit once.
    headers = {"idempotency-key": f"console:{_text(form, 'idempotency_key') or uuid.uuid4().hex}"}
    amount = milli_to_ku(milli)
    try:
        if kind == "grant":
            body = {
                "user_id": user_id,
                "amount": amount,
                "source": source if source in GRANT_SOURCES else "admin",
                "description": reason,
                "reason": reason,
                # A lot with a reference can be named by a later claw-back.
                "reference": headers["idempotency-key"],
            }
            await console.call(
                identity, "ledger", "POST", "/v1/ledger/grants", json=body, headers=headers
            )
            text = f"Granted {_ku(milli)} Ku: {reason}"
        else:
            body = {
                "user_id": user_id,
                "amount": amount,
                "source": source or "admin",
                "grant_reference": _text(form, "grant_reference"),
                "reason": reason,
            }
            done = await console.call(
                identity, "ledger", "POST", "/v1/ledger/admin/clawbacks", json=body, headers=headers
            )
            debt = ku_to_milli(done["debt_added"])
            text = f"Clawed back {_ku(milli)} Ku: {reason}" + (
                f" ({_ku(debt)} Ku already spent, now debt)" if debt else ""
            )
    except KuError as exc:
        await console.flash(session, "error", f"Not done: {_error_text(exc)}")
        return redirect(back)
    await console.flash(session, "ok", text)
    return redirect(back)
