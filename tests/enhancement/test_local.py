"""The local Pillow enhancer really changes the image, more with more strength."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageStat

from services.enhancement.local import difference, enhance
from tests.enhancement.fakes import png

SOURCE = png(96, 72)


def mean(data: bytes) -> list[float]:
    with Image.open(io.BytesIO(data)) as image:
        return list(ImageStat.Stat(image.convert("RGB")).mean)


class TestLocalEnhancer:
    @pytest.mark.parametrize("kind", ["lighting", "style", "mood", "background", "custom"])
    def test_changes_the_image_by_strength(self, kind):
        weak = enhance(SOURCE, kind, 0.2, "")
        strong = enhance(SOURCE, kind, 1.0, "")
        assert Image.open(io.BytesIO(strong)).size == (96, 72)
        assert 0 < difference(SOURCE, weak) < difference(SOURCE, strong)

    def test_zero_strength_keeps_the_image(self):
        assert difference(SOURCE, enhance(SOURCE, "lighting", 0.0)) < 1.0

    def test_lighting_brightens_and_warms(self):
        before, after = mean(SOURCE), mean(enhance(SOURCE, "lighting", 1.0))
        assert sum(after) > sum(before)
        assert after[0] / after[2] > before[0] / before[2]  # more red per blue: warmer

    def test_mood_follows_the_prompt(self):
        cool = mean(enhance(SOURCE, "mood", 1.0, "calm night"))
        warm = mean(enhance(SOURCE, "mood", 1.0, "cheerful"))
        assert cool[2] - cool[0] > warm[2] - warm[0]

    def test_background_keeps_the_centre(self):
        out = enhance(SOURCE, "background", 1.0)
        with Image.open(io.BytesIO(SOURCE)) as a, Image.open(io.BytesIO(out)) as b:
            a, b = a.convert("RGB"), b.convert("RGB")
            centre = (48, 36)
            corner = (1, 1)
            kept = zip(a.getpixel(centre), b.getpixel(centre), strict=True)
            assert sum(abs(x - y) for x, y in kept) < 30
            assert a.getpixel(corner) != b.getpixel(corner)
