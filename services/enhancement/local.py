"""The last resort: a local Pillow enhancer (seed 004's "graceful degradation").

It really changes the image, scaled by `strength` (0..1):
- lighting: lifts exposure and contrast, warms the highlights;
- style: stronger colour and detail, a light posterized "look";
- mood: shifts the colour temperature (cool for calm/night/sad prompts, warm otherwise)
  and softens contrast;
- background: keeps the centre sharp and blurs and dims the surroundings;
- custom: a balanced auto-contrast, colour and sharpness boost.
"""

from __future__ import annotations

import io

from PIL import Image, ImageChops, ImageDraw, ImageEnhance, ImageFilter, ImageOps

COOL_WORDS = ("cool", "cold", "calm", "night", "blue", "sad", "moody", "winter")


def _tint(image: Image.Image, rgb: tuple[int, int, int], amount: float) -> Image.Image:
    overlay = Image.new("RGB", image.size, rgb)
    return Image.blend(image, overlay, max(0.0, min(1.0, amount)))


def _lighting(image: Image.Image, s: float) -> Image.Image:
    image = ImageEnhance.Brightness(image).enhance(1 + 0.35 * s)
    image = ImageEnhance.Contrast(image).enhance(1 + 0.25 * s)
    return _tint(image, (255, 190, 110), 0.12 * s)


def _style(image: Image.Image, s: float) -> Image.Image:
    image = ImageEnhance.Color(image).enhance(1 + 0.8 * s)
    image = ImageEnhance.Sharpness(image).enhance(1 + 1.5 * s)
    bits = max(3, 8 - round(4 * s))
    return Image.blend(image, ImageOps.posterize(image, bits), 0.5 * s)


def _mood(image: Image.Image, s: float, prompt: str) -> Image.Image:
    cool = any(word in prompt.lower() for word in COOL_WORDS)
    image = ImageEnhance.Contrast(image).enhance(1 - 0.2 * s)
    image = ImageEnhance.Color(image).enhance(1 - 0.3 * s if cool else 1 + 0.2 * s)
    return _tint(image, (70, 110, 200) if cool else (230, 150, 80), 0.2 * s)


def _background(image: Image.Image, s: float) -> Image.Image:
    width, height = image.size
    blurred = image.filter(ImageFilter.GaussianBlur(radius=max(1.0, 12 * s)))
    blurred = ImageEnhance.Brightness(blurred).enhance(1 - 0.3 * s)
    mask = Image.new("L", image.size, 0)
    inset_x, inset_y = int(width * 0.18), int(height * 0.12)
    ImageDraw.Draw(mask).ellipse((inset_x, inset_y, width - inset_x, height - inset_y), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(radius=max(2, min(width, height) // 12)))
    return Image.composite(image, blurred, mask)


def _custom(image: Image.Image, s: float) -> Image.Image:
    auto = ImageOps.autocontrast(image, cutoff=1)
    image = Image.blend(image, auto, s)
    image = ImageEnhance.Color(image).enhance(1 + 0.3 * s)
    return ImageEnhance.Sharpness(image).enhance(1 + s)


def enhance(data: bytes, enhancement_type: str, strength: float, prompt: str = "") -> bytes:
    """The enhanced image as PNG bytes."""
    s = max(0.0, min(1.0, strength))
    with Image.open(io.BytesIO(data)) as source:
        image = ImageOps.exif_transpose(source).convert("RGB")
    if enhancement_type == "lighting":
        out = _lighting(image, s)
    elif enhancement_type == "style":
        out = _style(image, s)
    elif enhancement_type == "mood":
        out = _mood(image, s, prompt)
    elif enhancement_type == "background":
        out = _background(image, s)
    else:
        out = _custom(image, s)
    buffer = io.BytesIO()
    out.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def difference(a: bytes, b: bytes) -> float:
    """Mean absolute per-channel difference of two images (0..255): tests use it."""
    with Image.open(io.BytesIO(a)) as x, Image.open(io.BytesIO(b)) as y:
        diff = ImageChops.difference(x.convert("RGB"), y.convert("RGB").resize(x.size))
        histogram = diff.histogram()
    total = sum(i % 256 * n for i, n in enumerate(histogram))
    return total / (x.size[0] * x.size[1] * 3)
