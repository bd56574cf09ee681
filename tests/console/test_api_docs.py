"""`/docs` and `/redoc` work offline: every asset they reference is same-origin, served
by the gateway, and is the vendored copy whose checksum VENDOR.md records."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from gateway.openapi import STATIC_DIR
from services.kit.testing.plugin import asgi_client

VENDOR = STATIC_DIR / "vendor"


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append(value)


def referenced(html: str) -> list[str]:
    parser = _Assets()
    parser.feed(html)
    # Scripts may also name URLs in their text (Swagger UI's `url: '/openapi.json'`).
    inline = re.findall(r"""(?:url|spec-url)\s*[:=]\s*['"]([^'"]+)['"]""", html)
    return parser.urls + inline


@pytest.fixture
async def gateway_client(ku_database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    from gateway.app import create_app
    from gateway.config import GatewaySettings

    # The services are not needed to serve the docs pages and their assets.
    dead = "http://127.0.0.1:9"
    settings = GatewaySettings(auth_url=dead, ledger_url=dead, workspace_url=dead)
    async with asgi_client(create_app(settings)) as client:
        yield client


class TestOfflineDocs:
    @pytest.mark.parametrize("page", ["/docs", "/redoc"])
    async def test_every_asset_is_same_origin_and_served(
        self, gateway_client: httpx.AsyncClient, page: str
    ):
        r = await gateway_client.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        urls = referenced(r.text)
        assert any(u.endswith(".js") for u in urls), urls
        assert "/openapi.json" in urls
        for url in urls:
            parts = urlsplit(url)
            assert not parts.scheme and not parts.netloc, f"{page} loads {url} from elsewhere"
            if url == "/openapi.json":
                continue
            asset = await gateway_client.get(url)
            assert asset.status_code == 200, url
            local = STATIC_DIR / parts.path.removeprefix("/static/")
            assert asset.content == local.read_bytes()
        assert "fonts.googleapis" not in r.text and "cdn." not in r.text

    async def test_unknown_asset_is_404(self, gateway_client: httpx.AsyncClient):
        assert (await gateway_client.get("/static/vendor/nope.js")).status_code == 404


class TestVendoredAssets:
    def test_checksums_and_licences(self):
        """VENDOR.md pins each file to its npm release; each package ships its licence."""
        manifest = (VENDOR / "VENDOR.md").read_text()
        rows = re.findall(r"^\| `([^`]+)` \| `([0-9a-f]{64})` \|", manifest, re.M)
        files = {p.relative_to(VENDOR).as_posix() for p in VENDOR.rglob("*") if p.is_file()}
        assert {name for name, _ in rows} == files - {"VENDOR.md"}
        for name, digest in rows:
            assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, name
        for package in ("swagger-ui", "redoc"):
            assert (VENDOR / package / "LICENSE").stat().st_size > 500
            assert Path(VENDOR / package).is_dir()
