"""The ops console at `/console`: server-rendered pages for operators (admins only).

    session.py    sign-in with an admin API key or an SSO account holding the admin role;
                  the session lives in Redis, the browser holds only a random id (Secure,
                  HttpOnly, SameSite=Strict cookie)
    views.py      the pages and their forms (every POST carries the session's CSRF token):
                  overview, users, payments (reconcile), providers (breakers, pools,
                  refill), API keys
    charts.py     the 30-day chart, drawn as SVG on the server
    templates/    Jinja2 templates (autoescaped); CSS in gateway/static/console/

No JavaScript, nothing from another origin (the pages send a strict
Content-Security-Policy). Every number comes from the services' admin APIs, called
through the gateway's upstream client with the signed-in key's own principal, so the
services decide what an admin may do, exactly as for an API call.
"""

from gateway.console.views import build_router

__all__ = ["build_router"]
