"""Exporting a project within the quota must cost time in proportion to its size.
ReportLab lays a paragraph out again for every page it spills onto, so one paragraph
of many lines (or one long line) made the PDF export quadratic: ~23 s of CPU for 200 KB
of short lines, ~10 minutes for a quota-sized 1 MB project, per request, in the
service's thread pool (a user could stall the workspace with a few exports)."""

from __future__ import annotations

import io
import time

from pypdf import PdfReader

from tests.workspace.helpers import admin, saved

LINE = "The lamp had not gone out in forty years, nor the keeper.\n"


async def _timed_pdf(workspace, code: str) -> tuple[float, bytes]:
    started = time.monotonic()
    r = await workspace.get(
        f"/v1/workspace/projects/{code}/export", params={"format": "pdf"}, headers=admin()
    )
    assert r.status_code == 200, r.text
    return time.monotonic() - started, r.content


class TestPdfExportIsLinear:
    async def test_many_short_lines_in_one_paragraph(self, workspace, new_user_id):
        text = LINE * (250_000 // len(LINE))
        body = await saved(workspace, new_user_id(), content=text, content_encoding="text")
        took, pdf = await _timed_pdf(workspace, body["code"])
        assert took < 10, f"{took:.1f} s for {len(text)} characters"
        pages = PdfReader(io.BytesIO(pdf)).pages
        assert len(pages) > 50
        assert "forty years" in pages[-1].extract_text()

    async def test_one_long_line(self, workspace, new_user_id):
        text = "word " * 50_000
        body = await saved(workspace, new_user_id(), content=text, content_encoding="text")
        took, pdf = await _timed_pdf(workspace, body["code"])
        assert took < 10, f"{took:.1f} s for {len(text)} characters"
        assert "word" in PdfReader(io.BytesIO(pdf)).pages[-1].extract_text()
