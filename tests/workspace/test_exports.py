from __future__ import annotations

import io
import zipfile

import docx
import pytest
from pypdf import PdfReader

from tests.workspace.helpers import admin, b64, png, saved

TEXT = "The lamp had not gone out in forty years.\n\nThen, one night, it did."


@pytest.fixture
async def story(workspace, new_user_id):
    return await saved(workspace, new_user_id(), title="The Lighthouse Keeper", content=TEXT)


@pytest.fixture
async def artwork(workspace, new_user_id):
    return await saved(
        workspace,
        new_user_id(),
        app_source="imagegene",
        project_type="ai_artwork",
        title="Sunset Art",
        content=b64(png(64, 48, noise=True, seed=7)),
    )


async def export(workspace, code: str, fmt: str):
    return await workspace.get(
        f"/v1/workspace/projects/{code}/export", params={"format": fmt}, headers=admin()
    )


class TestText:
    async def test_txt_has_title_timestamps_and_content(self, workspace, story):
        r = await export(workspace, story["code"], "txt")
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/plain; charset=utf-8"
        assert "attachment" in r.headers["content-disposition"]
        assert f"the-lighthouse-keeper-{story['code']}.txt" in r.headers["content-disposition"]
        body = r.text
        assert body.startswith("The Lighthouse Keeper\n")
        assert "Created: " + story["created_at"][:10] in body
        assert "Updated: " in body and TEXT in body

    async def test_pdf_is_a_real_pdf_with_extractable_text(self, workspace, story):
        r = await export(workspace, story["code"], "pdf")
        assert r.status_code == 200 and r.headers["content-type"] == "application/pdf"
        assert r.content.startswith(b"%PDF-")
        reader = PdfReader(io.BytesIO(r.content))
        text = " ".join(page.extract_text() for page in reader.pages)
        assert "The Lighthouse Keeper" in text
        assert "forty years" in text and "one night, it did" in text
        assert "Created:" in text
        assert reader.metadata.title == "The Lighthouse Keeper"

    async def test_docx_opens_with_title_and_paragraphs(self, workspace, story):
        r = await export(workspace, story["code"], "docx")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/vnd.openxmlformats")
        document = docx.Document(io.BytesIO(r.content))
        paragraphs = [p.text for p in document.paragraphs]
        assert paragraphs[0] == "The Lighthouse Keeper"
        assert any(p.startswith("Created: ") for p in paragraphs)
        assert "The lamp had not gone out in forty years." in paragraphs
        assert "Then, one night, it did." in paragraphs

    async def test_unicode_and_markup_characters_survive(self, workspace, new_user_id):
        p = await saved(workspace, new_user_id(), title="Café <b>&", content="naïve & <i>x</i>")
        pdf = await export(workspace, p["code"], "pdf")
        text = PdfReader(io.BytesIO(pdf.content)).pages[0].extract_text()
        assert "Café <b>&" in text and "naïve & <i>x</i>" in text
        document = docx.Document(io.BytesIO((await export(workspace, p["code"], "docx")).content))
        assert "naïve & <i>x</i>" in [para.text for para in document.paragraphs]


class TestImage:
    async def test_pdf_embeds_the_image(self, workspace, artwork):
        r = await export(workspace, artwork["code"], "pdf")
        reader = PdfReader(io.BytesIO(r.content))
        assert "Sunset Art" in reader.pages[0].extract_text()
        images = reader.pages[0].images
        assert len(images) == 1
        assert images[0].image.size == (64, 48)

    async def test_docx_embeds_the_image(self, workspace, artwork):
        r = await export(workspace, artwork["code"], "docx")
        document = docx.Document(io.BytesIO(r.content))
        assert document.paragraphs[0].text == "Sunset Art"
        assert len(document.inline_shapes) == 1
        media = [n for n in zipfile.ZipFile(io.BytesIO(r.content)).namelist() if "media/" in n]
        assert len(media) == 1
        from PIL import Image

        blob = zipfile.ZipFile(io.BytesIO(r.content)).read(media[0])
        assert Image.open(io.BytesIO(blob)).size == (64, 48)

    async def test_txt_describes_the_image(self, workspace, artwork):
        r = await export(workspace, artwork["code"], "txt")
        assert "Sunset Art" in r.text and "[image/png image, " in r.text


class TestFormat:
    async def test_unknown_format_is_422_with_code(self, workspace, story):
        for fmt in ("exe", "", "PDFX"):
            r = await export(workspace, story["code"], fmt)
            assert r.status_code == 422, fmt
            assert r.json()["error"]["code"] == "unsupported_export_format"
            assert r.json()["error"]["detail"]["formats"] == ["txt", "pdf", "docx"]

    async def test_format_is_case_insensitive(self, workspace, story):
        r = await export(workspace, story["code"], "PDF")
        assert r.status_code == 200 and r.content.startswith(b"%PDF-")
