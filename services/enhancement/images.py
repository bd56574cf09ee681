"""Input images, fetched and checked before anything is charged.

`SafeFetcher.fetch(url)` is the only way a user-supplied URL is read. Per hop:
the scheme must be http(s); the host is resolved here and every address it
resolves to must be public (no loopback, private, link-local, CGNAT, multicast,
reserved or cloud-metadata address, IPv4-mapped forms included); the connection
then goes to the address we checked (the hostname travels only as Host and SNI),
so a DNS answer that changes between check and use cannot redirect us inward.
Redirects are followed by hand, each hop checked the same way. The content type must
be an image's (`content_type_mismatch` otherwise, before the body is read); the body
is read with a size cap and a total timeout, and Pillow must parse it
(`invalid_image`; `unsupported_image` for another format) within the pixel limit (a
decompression bomb is refused from its header, before any pixel is decoded).

`allow_origins` exempts exact origins from the address rule; it exists for
development and tests (fake providers on 127.0.0.1) and is empty in production.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import socket
import warnings
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx
from PIL import Image

from services.kit.errors import PayloadTooLarge, Unprocessable

IMAGE_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
ALLOWED_CONTENT_TYPES = frozenset(IMAGE_TYPES.values()) | {"image/jpg"}
# Cloud metadata endpoints that are not in a private range everywhere.
METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    content_type: str
    width: int
    height: int


def unsafe(message: str, **detail: object) -> Unprocessable:
    return Unprocessable(message, code="unsafe_url", **detail)


def inspect_image(data: bytes, max_pixels: int) -> CheckedImage:
    """Parse the header, refuse bombs and unknown formats, then verify the whole file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                fmt = image.format or ""
                if width * height > max_pixels:
                    raise Unprocessable(
                        "The image has too many pixels",
                        code="image_too_large",
                        width=width,
                        height=height,
                        max_pixels=max_pixels,
                    )
                if fmt not in IMAGE_TYPES:
                    raise Unprocessable(
                        "Only PNG, JPEG, WebP and GIF images are accepted",
                        code="unsupported_image",
                    )
                image.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Unprocessable("The image has too many pixels", code="image_too_large") from None
    except Unprocessable:
        raise
    except Exception:
        raise Unprocessable("The input is not a readable image", code="invalid_image") from None
    return CheckedImage(data, IMAGE_TYPES[fmt], width, height)


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour
        if mapped is not None:
            return is_public(mapped)
    if address in METADATA_ADDRESSES:
        return False
    return address.is_global and not address.is_multicast and not address.is_reserved


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int
    timeout_seconds: float
    max_redirects: int
    max_pixels: int
    allow_origins: frozenset[str] = frozenset()


def _origin(scheme: str, host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"


class SafeFetcher:
    def __init__(self, policy: FetchPolicy, transport: httpx.AsyncBaseTransport | None = None):
        self.policy = policy
        # trust_env=False: no proxy from the environment may carry our requests elsewhere.
        self._http = httpx.AsyncClient(follow_redirects=False, trust_env=False, transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _addresses(self, host: str, port: int) -> list[str]:
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM),
                self.policy.timeout_seconds,
            )
        except (OSError, TimeoutError):
            raise Unprocessable(
                "The image host does not resolve", code="input_unreachable", host=host
            ) from None
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    async def _target(self, url: str) -> tuple[str, dict[str, str], dict[str, str]]:
        """The URL to connect to (host replaced by a checked address), Host header, extensions."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise unsafe("Only http and https URLs are accepted", scheme=scheme)
        host = (parts.hostname or "").rstrip(".").lower()
        if not host:
            raise unsafe("The URL has no host")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise unsafe("The URL has an invalid port") from None
        addresses = await self._addresses(host, port)
        allowed = _origin(scheme, host, port) in self.policy.allow_origins
        if not allowed:
            for a in addresses:
                if not is_public(ipaddress.ip_address(a.split("%", 1)[0])):
                    raise unsafe("The URL points to a private or reserved address", host=host)
        if not addresses:
            raise Unprocessable("The image host does not resolve", code="input_unreachable")
        address = addresses[0]
        netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        target = urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
        default = (scheme == "http" and port == 80) or (scheme == "https" and port == 443)
        headers = {"Host": host if default else f"{host}:{port}"}
        extensions = {"sni_hostname": host} if scheme == "https" else {}
        return target, headers, extensions

    async def fetch(self, url: str) -> CheckedImage:
        try:
            async with asyncio.timeout(self.policy.timeout_seconds):
                data = await self._fetch(url)
        except TimeoutError:
            raise Unprocessable(
                "Fetching the image timed out",
                code="input_unreachable",
                timeout_seconds=self.policy.timeout_seconds,
            ) from None
        return inspect_image(data, self.policy.max_pixels)

    async def _fetch(self, url: str) -> bytes:
        for _ in range(self.policy.max_redirects + 1):
            target, headers, extensions = await self._target(url)
            try:
                async with self._http.stream(
                    "GET", target, headers=headers, extensions=extensions
                ) as response:
                    if response.status_code in (301, 302, 303, 307, 308):
                        location = response.headers.get("location")
                        if not location:
                            break
                        url = urljoin(url, location)
                        continue
                    if response.status_code != 200:
                        raise Unprocessable(
                            "The image URL did not answer 200",
                            code="input_unreachable",
                            status=response.status_code,
                        )
                    content_type = (
                        response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
                    )
                    # Refused from the headers, before the body is read: a server that says
                    # it is not sending an image is not read (not the same as an image that
                    # does not parse, `invalid_image`).
                    if content_type not in ALLOWED_CONTENT_TYPES:
                        raise Unprocessable(
                            "The URL did not serve an image content type",
                            code="content_type_mismatch",
                            content_type=content_type,
                        )
                    declared = response.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > self.policy.max_bytes:
                        raise self._too_large()
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > self.policy.max_bytes:
                            raise self._too_large()
                        chunks.append(chunk)
                    return b"".join(chunks)
            except httpx.HTTPError:
                raise Unprocessable(
                    "The image URL could not be read", code="input_unreachable"
                ) from None
        raise unsafe("Too many redirects", max_redirects=self.policy.max_redirects)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            "The image is larger than allowed",
            code="input_too_large",
            max_bytes=self.policy.max_bytes,
        )
