"""What a project's content really is: text, or image bytes from base64 or a `data:`
URL. The type is detected from the bytes (Pillow), never taken from the client,
and checked against the allow-list. Pure functions, no I/O."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote_to_bytes

from PIL import Image, UnidentifiedImageError

from services.kit.errors import KuError, Unprocessable

IMAGE_TYPES = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "GIF": "image/gif",
    "WEBP": "image/webp",
}
TEXT_TYPES = ("text/plain", "text/markdown")
ALLOWED_CONTENT_TYPES = (*TEXT_TYPES, *IMAGE_TYPES.values())

Encoding = Literal["auto", "text", "base64"]

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*),", re.I)
_BASE64_CHARS = re.compile(r"^[A-Za-z0-9+/_-]+={0,2}$")
_BASE64_STRICT = re.compile(r"[A-Za-z0-9+/]*={0,2}|[A-Za-z0-9_-]*={0,2}")
_URLSAFE = str.maketrans("-_", "+/")
# Below this, an "auto" string is text even if it happens to be valid base64 ("Test").
_MIN_AUTO_BASE64 = 64
# A few KB of PNG can declare a gigapixel canvas; exports decode it, so cap it here.
MAX_IMAGE_PIXELS = 25_000_000
_MARKDOWN = re.compile(
    r"(^|\n)(#{1,6} \S|```|> \S|[-*+] \S.*\n[-*+] \S|\d+\. \S.*\n\d+\. \S)"
    r"|\*\*[^*\n]+\*\*|\[[^\]\n]+\]\([^)\s]+\)"
)


class UnsupportedContentType(KuError):
    status_code = 415
    code = "content_type_not_allowed"
    message = "Content type not allowed"


@dataclass(frozen=True)
class Content:
    content_type: str
    text: str | None = None
    data: bytes | None = None

    @property
    def size_bytes(self) -> int:
        if self.data is not None:
            return len(self.data)
        return len((self.text or "").encode("utf-8"))

    @property
    def is_image(self) -> bool:
        return self.data is not None


def parse_content(
    raw: str, *, encoding: Encoding = "auto", declared_type: str | None = None
) -> Content:
    """Decode and classify `raw`. `encoding="auto"` (the old clients' behaviour):
    a `data:` URL or a long base64 string of a known image is an image, anything
    else is text."""
    if declared_type is not None and declared_type not in ALLOWED_CONTENT_TYPES:
        raise UnsupportedContentType(
            f"Content type {declared_type!r} is not allowed",
            content_type=declared_type,
            allowed=list(ALLOWED_CONTENT_TYPES),
        )
    if encoding != "text":
        match = _DATA_URL.match(raw[:300])
        if match:
            return _from_data_url(raw, match, declared_type)
    if encoding == "base64":
        return _classify_bytes(_b64decode(raw), declared_type)
    if encoding == "auto" and _looks_like_base64(raw):
        try:
            data = _b64decode(raw)
        except Unprocessable:
            data = b""
        image = _image_type(data)
        if image:
            return _checked_image(data, image, declared_type)
    return _text(raw, declared_type)


def _from_data_url(raw: str, match: re.Match[str], declared_type: str | None) -> Content:
    mime = (match.group("mime") or "text/plain").lower()
    params = [p.strip().lower() for p in (match.group("params") or "").split(";") if p.strip()]
    payload = raw[match.end() :]
    if "base64" in params:
        data = _b64decode(payload)
    else:
        data = unquote_to_bytes(payload)
    if mime.startswith("text/"):
        if mime not in TEXT_TYPES:
            raise UnsupportedContentType(
                f"Content type {mime!r} is not allowed",
                content_type=mime,
                allowed=list(ALLOWED_CONTENT_TYPES),
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise Unprocessable("Text content is not valid UTF-8", code="invalid_text") from None
        return _text(text, declared_type or mime)
    image = _image_type(data)
    if image is None:
        raise UnsupportedContentType(
            f"Content type {mime!r} is not allowed (or the data is not that image)",
            content_type=mime,
            allowed=list(ALLOWED_CONTENT_TYPES),
        )
    return _checked_image(data, image, declared_type)


def _classify_bytes(data: bytes, declared_type: str | None) -> Content:
    image = _image_type(data)
    if image:
        return _checked_image(data, image, declared_type)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsupportedContentType(
            "Content is not an allowed image (PNG, JPEG, GIF, WebP) or UTF-8 text",
            allowed=list(ALLOWED_CONTENT_TYPES),
        ) from None
    return _text(text, declared_type)


def _checked_image(data: bytes, content_type: str, declared_type: str | None) -> Content:
    if declared_type is not None and declared_type != content_type:
        raise Unprocessable(
            f"Content is {content_type}, not {declared_type}",
            code="content_type_mismatch",
            detected=content_type,
            declared=declared_type,
        )
    return Content(content_type=content_type, data=data)


def _text(text: str, declared_type: str | None) -> Content:
    if "\x00" in text:
        raise Unprocessable("Text content may not contain NUL characters", code="invalid_text")
    if declared_type is not None and declared_type not in TEXT_TYPES:
        raise Unprocessable(
            f"Content is text, not {declared_type}",
            code="content_type_mismatch",
            detected="text/plain",
            declared=declared_type,
        )
    content_type = declared_type or ("text/markdown" if _MARKDOWN.search(text) else "text/plain")
    return Content(content_type=content_type, text=text)


def _looks_like_base64(raw: str) -> bool:
    compact = raw.strip()
    return (
        len(compact) >= _MIN_AUTO_BASE64
        and _BASE64_CHARS.match(compact.replace("\n", "").replace("\r", "")) is not None
    )


def _b64decode(raw: str) -> bytes:
    """Strict base64 (standard or URL-safe alphabet, padding optional but not wrong):
    a stray character is an error, never silently dropped."""
    compact = "".join(raw.split())
    body = compact.rstrip("=")
    if (
        not _BASE64_STRICT.fullmatch(compact)
        or len(body) % 4 == 1
        or (body != compact and len(compact) % 4)
    ):
        raise Unprocessable("Content is not valid base64", code="invalid_base64")
    body = body.translate(_URLSAFE)
    try:
        return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise Unprocessable("Content is not valid base64", code="invalid_base64") from None


def _image_type(data: bytes) -> str | None:
    """The allowed MIME type of `data` if Pillow recognises it as one, else None."""
    if len(data) < 8:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                fmt = image.format
                pixels = image.width * image.height
                image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    if pixels > MAX_IMAGE_PIXELS:
        raise Unprocessable(
            f"Image has {pixels} pixels; at most {MAX_IMAGE_PIXELS}",
            code="image_too_large",
            pixels=pixels,
            max_pixels=MAX_IMAGE_PIXELS,
        )
    if fmt not in IMAGE_TYPES:
        raise UnsupportedContentType(
            f"Image format {fmt} is not allowed",
            content_type=f"image/{(fmt or 'unknown').lower()}",
            allowed=list(ALLOWED_CONTENT_TYPES),
        )
    return IMAGE_TYPES[fmt]
