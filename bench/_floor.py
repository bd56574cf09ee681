"""The floor of a Python HTTP answer on this machine: a bare ASGI app (no framework, no
work) served exactly as the ledger is (uvicorn, the kit's protocol, the same workers),
answering a debit-sized POST with a debit-sized JSON body. bench/ledger.py loads it with
the same client as its HTTP cases, so a run shows how close any Python service on this
machine could come to the raw Postgres rates it is measured against."""

from __future__ import annotations

from typing import Any

BODY = (
    b'{"transaction_id":123456,"user_id":"bench-hot","amount":"1.000","balance":"999.000",'
    b'"held":"0.000","debt":"0.000","app":"bench","replayed":false}'
)
HEAD = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


def create_app() -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        status = 200 if scope["path"] == "/ready" else 201
        await send({"type": "http.response.start", "status": status, "headers": HEAD})
        await send({"type": "http.response.body", "body": BODY})

    return app
