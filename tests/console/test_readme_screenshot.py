"""The README's screenshot (docs/console.png) is one the browser test takes, of the
console as the templates render it now: the navigation links and the page's form
fields stamped into the PNG by tests/console/test_browser.py match the templates.
After changing either, run the browser test and copy .artifacts/console/user.png to
docs/console.png."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.console.screenshots import stamp, stamped, template_fields, template_nav

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "gateway" / "console" / "templates"
SCREENSHOT = ROOT / "docs" / "console.png"
PAGE = "user"  # the browser test's shot(browser, "user"): the user page after a grant


def readme_images() -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (ROOT / "README.md").read_text())


def problems(png: Path) -> list[str]:
    """Why `png` is not a current screenshot of the user page, one line each."""
    seen = stamped(png)
    if seen is None:
        return [f"{png.name} was not taken by tests/console/test_browser.py (no stamp)"]
    found = []
    if seen["page"] != PAGE:
        found.append(f"{png.name} shows the {seen['page']!r} page, not {PAGE!r}")
    nav = template_nav((TEMPLATES / "base.html").read_text())
    if seen["nav"] != nav:
        found.append(f"{png.name}'s navigation {seen['nav']} is not base.html's {nav}")
    fields = template_fields((TEMPLATES / f"{PAGE}.html").read_text())
    if seen["fields"] != fields:
        found.append(f"{png.name}'s form fields {seen['fields']} are not {PAGE}.html's {fields}")
    return found


class TestReadmeScreenshot:
    def test_the_readme_shows_docs_console_png(self):
        assert "docs/console.png" in readme_images()
        with Image.open(SCREENSHOT) as image:
            assert image.format == "PNG" and image.size[0] >= 1000

    def test_the_browser_test_takes_that_page(self):
        source = (ROOT / "tests" / "console" / "test_browser.py").read_text()
        assert f'shot(browser, "{PAGE}")' in source

    def test_it_matches_the_templates(self):
        assert problems(SCREENSHOT) == []


class TestTheCheckCanFail:
    def test_an_unstamped_screenshot(self, tmp_path: Path):
        png = tmp_path / "plain.png"
        Image.new("RGB", (1280, 800)).save(png)
        assert problems(png) == [
            "plain.png was not taken by tests/console/test_browser.py (no stamp)"
        ]

    @pytest.mark.parametrize("change", ["nav", "fields", "page"])
    def test_a_stale_screenshot(self, tmp_path: Path, change: str):
        png = tmp_path / "stale.png"
        shutil.copy(SCREENSHOT, png)
        seen = stamped(png)
        assert seen is not None
        if change == "nav":  # taken before a link was added
            seen["nav"] = seen["nav"][:-1]
        elif change == "fields":  # taken before the lot-reference field
            seen["fields"] = [f for f in seen["fields"] if f != "grant_reference"]
        else:
            seen["page"] = "keys"
        stamp(png, seen["page"], seen["nav"], seen["fields"])
        [found] = problems(png)
        assert found.startswith("stale.png")
