"""What a console screenshot showed, kept inside the PNG as a text chunk: the browser test
stamps each screenshot with the page's navigation links and its forms' field names, read
from the live page; test_readme_screenshot.py compares the README's copy with the
templates, so a screenshot taken before the navigation or the forms changed is caught."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

KEY = "ku-console-page"


def stamp(path: Path, page: str, nav: list[list[str]], fields: list[str]) -> None:
    info = PngInfo()
    info.add_text(KEY, json.dumps({"page": page, "nav": nav, "fields": sorted(fields)}))
    with Image.open(path) as image:
        image.load()
        image.save(path, pnginfo=info)


def stamped(path: Path) -> dict[str, Any] | None:
    with Image.open(path) as image:
        text = getattr(image, "text", {}).get(KEY)
    return json.loads(text) if text else None


def template_nav(base_html: str) -> list[list[str]]:
    """The links of base.html's <nav>, as [href, text] in order."""
    nav = re.search(r"<nav>(.*?)</nav>", base_html, re.S)
    assert nav, "base.html has no <nav>"
    return [[h, t.strip()] for h, t in re.findall(r'<a href="([^"]+)">([^<]+)</a>', nav.group(1))]


def template_fields(page_html: str) -> list[str]:
    """The names of a page template's form fields (inputs, selects, text areas)."""
    return sorted(set(re.findall(r'<(?:input|select|textarea)\b[^>]*\bname="([^"]+)"', page_html)))
