"""SSRF-safe fetching and image checks, in-process, under the loopback-only guard."""

from __future__ import annotations

import pytest

from services.enhancement.images import FetchPolicy, SafeFetcher, inspect_image
from services.kit.errors import KuError, PayloadTooLarge, Unprocessable
from tests.enhancement.fakes import ImageHost, png, png_bomb


@pytest.fixture(scope="module")
def host():
    server = ImageHost()
    yield server
    server.stop()


def fetcher(allow: frozenset[str] = frozenset(), max_bytes: int = 1024 * 1024) -> SafeFetcher:
    return SafeFetcher(
        FetchPolicy(
            max_bytes=max_bytes,
            timeout_seconds=5,
            max_redirects=3,
            max_pixels=40_000_000,
            allow_origins=allow,
        )
    )


async def refused(url: str, f: SafeFetcher | None = None) -> KuError:
    f = f or fetcher()
    try:
        with pytest.raises(KuError) as caught:
            await f.fetch(url)
    finally:
        await f.aclose()
    return caught.value


class TestSSRF:
    @pytest.mark.parametrize(
        "url",
        [
            "http://127.0.0.1:6379/",
            "http://localhost:6379/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://10.0.0.1/x.png",
            "http://192.168.1.1/x.png",
            "http://100.64.0.1/x.png",
            "http://0.0.0.0/x.png",
            "http://private.test/x.png",
            "http://metadata.test/latest",
            "http://loopback.test:6379/",
        ],
    )
    async def test_private_addresses_refused_before_connecting(self, url, loopback_only):
        error = await refused(url)
        assert error.code == "unsafe_url", error
        assert loopback_only == []

    @pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://x/", "ftp://a/b.png"])
    async def test_other_schemes_refused(self, url):
        assert (await refused(url)).code == "unsafe_url"

    async def test_redirect_to_loopback_refused(self, host):
        # The image host itself is allowed (as fake providers are in tests); its redirect
        # target is not: each hop is checked on its own.
        allow = frozenset({host.url})
        hits = host.hits
        url = f"{host.url}/redirect?to=http://127.0.0.1:6379/"
        error = await refused(url, fetcher(allow))
        assert error.code == "unsafe_url"
        assert host.hits == hits + 1

    async def test_redirect_to_private_hostname_refused(self, host):
        url = f"{host.url}/redirect?to=http://private.test/a.png"
        assert (await refused(url, fetcher(frozenset({host.url})))).code == "unsafe_url"

    async def test_loopback_refused_without_the_allowance(self, host):
        # The same fake host, without the test-only allowance: refused like any loopback.
        assert (await refused(f"{host.url}/image.png")).code == "unsafe_url"

    async def test_public_address_goes_to_the_checked_ip(self, loopback_only):
        # public.test resolves (stub) to a public address: the fetcher connects to that
        # address, and the guard refuses the connection (the test never leaves the host).
        error = await refused("http://public.test/image.png")
        assert error.code == "input_unreachable"
        assert loopback_only and loopback_only[0][0] == "93.184.215.14"
        loopback_only.clear()

    async def test_unknown_host(self):
        assert (await refused("http://nowhere.invalid/a.png")).code == "input_unreachable"


class TestLimits:
    async def test_fetches_an_allowed_image(self, host):
        f = fetcher(frozenset({host.url}))
        try:
            image = await f.fetch(f"{host.url}/image.png")
        finally:
            await f.aclose()
        assert image.content_type == "image/png" and (image.width, image.height) == (64, 48)
        assert image.data == host.image

    async def test_size_cap(self, host):
        error = await refused(f"{host.url}/big", fetcher(frozenset({host.url}), max_bytes=1024))
        assert isinstance(error, PayloadTooLarge) and error.code == "input_too_large"

    async def test_content_type_mismatch_is_not_an_unreadable_image(self, host):
        allow = frozenset({host.url})
        # Served as text: refused from the headers, whatever the bytes are.
        for path in ("/text", "/png-as-text"):
            error = await refused(f"{host.url}{path}", fetcher(allow))
            assert error.code == "content_type_mismatch", (path, error)
            assert error.detail == {"content_type": "text/plain"}
        # Served as an image, but not one: unreadable.
        error = await refused(f"{host.url}/broken.png", fetcher(allow))
        assert error.code == "invalid_image"

    async def test_png_bomb_refused(self, host):
        error = await refused(
            f"{host.url}/bomb.png", fetcher(frozenset({host.url}), max_bytes=10 * 1024 * 1024)
        )
        assert error.code == "image_too_large"

    def test_bomb_refused_from_bytes(self):
        bomb = png_bomb()
        assert len(bomb) < 5 * 1024 * 1024  # small on the wire: 400 megapixels decoded
        with pytest.raises(Unprocessable) as caught:
            inspect_image(bomb, 40_000_000)
        assert caught.value.code == "image_too_large"

    def test_truncated_image(self):
        with pytest.raises(Unprocessable) as caught:
            inspect_image(png()[:60], 40_000_000)
        assert caught.value.code == "invalid_image"
