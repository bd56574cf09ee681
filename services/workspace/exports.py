"""Render a project as a real TXT, PDF (ReportLab) or DOCX (python-docx) file, with
its title, timestamps and content; images are embedded. CPU-bound and pure: the
endpoint runs `render()` in a worker thread."""

from __future__ import annotations

import io
import re
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


def _embeddable(data: bytes) -> tuple[bytes, int, int]:
    """PNG or JPEG bytes both ReportLab and python-docx accept, with pixel size."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG":
            return data, image.width, image.height
        image.seek(0)
        converted = image.convert(
            "RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB"
        )
        out = io.BytesIO()
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
