"""Render a project as a real TXT, PDF (ReportLab) or DOCX (python-docx) file, with
its title, timestamps and content; images are embedded. CPU-bound and pure: the
endpoint runs `render()` in a worker thread."""

from __future__ import annotations

import io
import math
import re
import threading
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from xml.sax.saxutils import escape

from PIL import Image

FORMATS = {
    "txt": "text/plain; charset=utf-8",
    "pdf": "application/pdf",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
}

# The most pixels an export embeds: an A4 page at 300 dpi, (short side, long side), in
# the image's own orientation. More than the page can show costs the service memory
# and CPU for nothing: the upload limit (25 MP) lets ~84 KB of PNG decode to ~95 MiB
# (Pillow keeps RGB in 4 bytes a pixel), which ReportLab then copied twice more. A
# larger image is shrunk (aspect kept) as it is decoded; a smaller one is embedded
# exactly as before.
PAGE_PIXELS = (2480, 3508)
# Images decoded at once by this process's exports, the others wait their turn: one can
# cost ~130 MiB while it is shrunk, and a 25 MP WEBP ~390 MiB (Pillow has no smaller
# decode for it), so concurrent exports must not add up without bound.
IMAGE_DECODES = 2
_DECODING = threading.BoundedSemaphore(IMAGE_DECODES)
# Quality of a shrunk JPEG, which stays a JPEG.
_JPEG_QUALITY = 90
# Source pixels converted and resized at a time when shrinking (a few MB per band).
_BAND_PIXELS = 500_000

# A Unicode TrueType font when the system has one (Helvetica covers Latin-1 only).
_FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
)


@dataclass(frozen=True)
class ExportSource:
    code: str
    title: str
    app_source: str
    project_type: str
    content_type: str
    created_at: datetime
    updated_at: datetime
    text: str | None
    data: bytes | None


def filename(source: ExportSource, fmt: str) -> str:
    ascii_title = (
        unicodedata.normalize("NFKD", source.title).encode("ascii", "ignore").decode("ascii")
    )
    slug = re.sub(r"[^A-Za-z0-9]+", "-", ascii_title).strip("-").lower()[:60]
    return f"{slug + '-' if slug else ''}{source.code}.{fmt}"


def render(source: ExportSource, fmt: str) -> bytes:
    return {"txt": _txt, "pdf": _pdf, "docx": _docx}[fmt](source)


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _clean(text: str) -> str:
    """Drop control characters XML (DOCX) and ReportLab's markup cannot carry."""
    return _CONTROL.sub("", text)


# At most this many characters per PDF paragraph: a few dozen lines, so one rarely
# spills over a page. ReportLab lays a paragraph out again for every page it continues
# on, so a paragraph of the whole text made the export quadratic in its size.
_PDF_PIECE = 2_000


def _pieces(block: str) -> list[str]:
    """A block's lines, each cut at whitespace (or anywhere, if it has none) into
    pieces of at most _PDF_PIECE characters."""
    out: list[str] = []
    for line in block.split("\n"):
        while len(line) > _PDF_PIECE:
            cut = line.rfind(" ", 0, _PDF_PIECE) + 1 or _PDF_PIECE
            out.append(line[:cut])
            line = line[cut:]
        out.append(line)
    return out


def _stamp(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def _header_lines(source: ExportSource) -> list[str]:
    return [
        f"Project {source.code} · {source.app_source} · {source.project_type}",
        f"Created: {_stamp(source.created_at)}",
        f"Updated: {_stamp(source.updated_at)}",
    ]


def _image_note(source: ExportSource) -> str:
    return f"[{source.content_type} image, {len(source.data or b'')} bytes]"


def _txt(source: ExportSource) -> bytes:
    lines = [source.title, "=" * max(len(source.title), 3), *_header_lines(source), ""]
    lines.append(source.text if source.text is not None else _image_note(source))
    return ("\n".join(lines).rstrip("\n") + "\n").encode("utf-8")


def _page_box(width: int, height: int) -> tuple[int, int]:
    short, long = PAGE_PIXELS
    return (long, short) if width >= height else (short, long)


def _fitted(width: int, height: int) -> tuple[int, int]:
    """The largest size with `width`:`height`'s aspect inside the page box."""
    box = _page_box(width, height)
    ratio = max(width / box[0], height / box[1], 1.0)
    return (
        min(box[0], max(1, round(width / ratio))),
        min(box[1], max(1, round(height / ratio))),
    )


def _shrunk(image: Image.Image, mode: str, size: tuple[int, int]) -> Image.Image:
    """`image` in `mode`, resized (Lanczos) to `size`, a band of rows at a time: the
    decoded image is the only full-size buffer (a whole-image convert or resize copies
    it, and Pillow resizes RGBA through a premultiplied copy). Each band carries the
    rows the filter reaches beyond it: no seams, and the result is a whole-image
    horizontal-then-vertical Lanczos resize's, to within rounding."""
    width, height = image.size
    out = Image.new(mode, size)
    scale = height / size[1]
    margin = math.ceil(3 * scale) + 1  # Lanczos: 3 output pixels each way
    rows = max(1, int(_BAND_PIXELS / (width * scale)))
    for first in range(0, size[1], rows):
        last = min(first + rows, size[1])
        top = max(0, math.floor(first * scale) - margin)
        bottom = min(height, math.ceil(last * scale) + margin)
        band = image.crop((0, top, width, bottom))
        if band.mode != mode:
            band = band.convert(mode)
        piece = band.resize(
            (size[0], last - first),
            Image.Resampling.LANCZOS,
            box=(0, first * scale - top, width, last * scale - top),
        )
        out.paste(piece, (0, first))
    return out


def _embeddable(data: bytes) -> tuple[bytes, int, int]:
    """`_decoded`, at most IMAGE_DECODES at once in this process."""
    with _DECODING:
        return _decoded(data)


def _decoded(data: bytes) -> tuple[bytes, int, int]:
    """PNG or JPEG bytes both ReportLab and python-docx accept, with pixel size: at
    most PAGE_PIXELS, aspect kept (a JPEG within it is passed through untouched).
    Pillow's decompression-bomb limit applies as to any open."""
    with Image.open(io.BytesIO(data)) as image:
        size = _fitted(image.width, image.height)
        fits = size == image.size
        if image.format == "JPEG" and fits:
            return data, image.width, image.height
        image.seek(0)
        if image.format == "JPEG":
            mode, fmt = ("L" if image.mode == "L" else "RGB"), "JPEG"
        else:
            mode = "RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB"
            fmt = "PNG"
        if fits:
            converted = image.convert(mode)
        else:
            # A JPEG is decoded at 1/2, 1/4 or 1/8 scale when that still covers `size`
            # (libjpeg's DCT scaling); a no-op for the other formats.
            image.draft(mode, size)
            converted = _shrunk(image, mode, size)
        out = io.BytesIO()
        if fmt == "JPEG":
            converted.save(out, format="JPEG", quality=_JPEG_QUALITY)
        else:
            converted.save(out, format="PNG")
        return out.getvalue(), converted.width, converted.height


def _font() -> str:
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont

    if "KuSans" in pdfmetrics.getRegisteredFontNames():
        return "KuSans"
    for candidate in _FONT_CANDIDATES:
        if Path(candidate).exists():
            pdfmetrics.registerFont(TTFont("KuSans", candidate))
            return "KuSans"
    return "Helvetica"


def _pdf(source: ExportSource) -> bytes:
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
    from reportlab.lib.units import cm
    from reportlab.platypus import Image as PdfImage
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer

    font = _font()
    styles = getSampleStyleSheet()
    title_style = ParagraphStyle("KuTitle", parent=styles["Title"], fontName=font)
    meta_style = ParagraphStyle(
        "KuMeta", parent=styles["Normal"], fontName=font, fontSize=9, textColor="#555555"
    )
    body_style = ParagraphStyle("KuBody", parent=styles["Normal"], fontName=font, leading=14)

    out = io.BytesIO()
    doc = SimpleDocTemplate(
        out,
        pagesize=A4,
        title=source.title,
        author="Ku workspace",
        leftMargin=2 * cm,
        rightMargin=2 * cm,
        topMargin=2 * cm,
        bottomMargin=2 * cm,
    )
    story: list[object] = [Paragraph(escape(_clean(source.title)), title_style)]
    story += [Paragraph(escape(_clean(line)), meta_style) for line in _header_lines(source)]
    story.append(Spacer(1, 0.6 * cm))
    if source.data is not None:
        data, width, height = _embeddable(source.data)
        scale = min(doc.width / width, (doc.height * 0.8) / height, 1.0)
        story.append(PdfImage(io.BytesIO(data), width=width * scale, height=height * scale))
    else:
        for block in re.split(r"\n\s*\n", _clean(source.text or "")):
            if block.strip():
                # One paragraph per line (or piece of a long line), set as the block's
                # lines were: same style, no space between them.
                story += [Paragraph(escape(p) or "&nbsp;", body_style) for p in _pieces(block)]
                story.append(Spacer(1, 0.25 * cm))
    doc.build(story)
    return out.getvalue()


def _docx(source: ExportSource) -> bytes:
    from docx import Document
    from docx.shared import Cm

    document = Document()
    document.core_properties.title = _clean(source.title)[:255]
    document.core_properties.author = "Ku workspace"
    document.add_heading(_clean(source.title), level=1)
    for line in _header_lines(source):
        document.add_paragraph(_clean(line))
    if source.data is not None:
        data, width, _ = _embeddable(source.data)
        section = document.sections[0]
        usable = (
            (section.page_width or 0) - (section.left_margin or 0) - (section.right_margin or 0)
        )
        # 96 dpi: a small image keeps its size, a large one fits the page width.
        document.add_picture(io.BytesIO(data), width=min(usable, Cm(width * 2.54 / 96)))
    else:
        for block in re.split(r"\n\s*\n", _clean(source.text or "")):
            if block.strip():
                document.add_paragraph(block)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()
