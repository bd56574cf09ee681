"""Prometheus metrics shared by every service, and the `/metrics` route."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

REQUESTS = Counter(
    "ku_http_requests_total", "HTTP requests handled", ["service", "method", "route", "status"]
)
LATENCY = Histogram(
    "ku_http_request_seconds",
    "HTTP request latency",
    ["service", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
EVENTS_PUBLISHED = Counter("ku_events_published_total", "Outbox events relayed", ["stream"])
EVENTS_HANDLED = Counter(
    "ku_events_handled_total", "Bus events handled", ["consumer", "topic", "outcome"]
)

router = APIRouter(include_in_schema=False)


@router.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
