"""Promises of README.md and docs/operations.md about the workspace process itself:
`/health`, `/ready` and Prometheus `/metrics` on its own port, without credentials
(docs/operations.md, "Health" and "Metrics"); the default quota is 1 MB (README,
docs/integration.md section 4)."""

from __future__ import annotations

from tests.workspace.helpers import saved, storage


async def test_health_ready_and_metrics(workspace, new_user_id):
    r = await workspace.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    r = await workspace.get("/ready")
    assert r.status_code == 200, r.text
    await saved(workspace, new_user_id())  # at least one request on a route
    r = await workspace.get("/metrics")
    assert r.status_code == 200, r.text
    for name in ("ku_http_requests_total", "ku_http_request_seconds"):
        assert name in r.text, name
    assert 'service="workspace"' in r.text


async def test_default_quota_is_one_mebibyte(workspace, new_user_id):
    uid = new_user_id()
    await saved(workspace, uid)
    assert (await storage(workspace, uid))["limit_bytes"] == 1_048_576
