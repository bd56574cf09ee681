"""An export never embeds more pixels than an A4 page shows at 300 dpi. A 25-megapixel
PNG of one colour is ~84 KB (far inside the 1 MB quota), yet its PDF export decoded it
at full size three times over (Pillow, then ReportLab's RGB copy for the data and for
its digest): ~238 MiB of extra memory and ~1.4 s of CPU per request, which any user could
request repeatedly and concurrently. Images beyond the bound are now shrunk (aspect
kept) before anything else copies them; smaller ones are embedded exactly as before."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import cast

import pytest
from PIL import Image
from pypdf import PdfReader
from pypdf.generic import DictionaryObject

from services.workspace.exports import PAGE_PIXELS
from tests.workspace.helpers import admin, b64, png, saved

ROOT = Path(__file__).resolve().parents[2]
SHORT, LONG = PAGE_PIXELS
MB = 1024 * 1024


def jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 80, 40)).save(out, format="JPEG")
    return out.getvalue()


async def _stored(workspace, user_id: str, data: bytes) -> tuple[str, bytes]:
    """Save `data` as an image project; its code and the bytes Postgres gives back."""
    body = await saved(
        workspace,
        user_id,
        app_source="imagegene",
        project_type="ai_artwork",
        title="Big Picture",
        content=b64(data),
    )
    r = await workspace.get(f"/v1/workspace/projects/{body['code']}/content", headers=admin())
    assert r.status_code == 200, r.text
    assert r.content == data
    return body["code"], r.content


async def _export(workspace, code: str, fmt: str) -> bytes:
    r = await workspace.get(
        f"/v1/workspace/projects/{code}/export", params={"format": fmt}, headers=admin()
    )
    assert r.status_code == 200, r.text
    return r.content


def _pdf_images(pdf: bytes) -> list[tuple[int, int, object]]:
    """(width, height, filter) of each image XObject, read from the PDF's dictionaries."""
    page = PdfReader(io.BytesIO(pdf)).pages[0]
    resources = cast(DictionaryObject, page["/Resources"].get_object())
    xobjects = cast(DictionaryObject, resources["/XObject"].get_object())
    found = []
    for ref in xobjects.values():
        obj = ref.get_object()
        if obj["/Subtype"] == "/Image":
            found.append((int(obj["/Width"]), int(obj["/Height"]), obj.get("/Filter")))
    return found


def _docx_image(docx: bytes) -> bytes:
    archive = zipfile.ZipFile(io.BytesIO(docx))
    media = [n for n in archive.namelist() if "media/" in n]
    assert len(media) == 1
    return archive.read(media[0])


def _within_page(width: int, height: int) -> bool:
    return max(width, height) <= LONG and min(width, height) <= SHORT


class TestLargeImageIsBounded:
    def test_bound_is_a4_at_300_dpi(self):
        assert PAGE_PIXELS == (2480, 3508)
        assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's bomb guard stays on

    @pytest.mark.parametrize(
        ("size", "expected"),
        [((5000, 5000), (2480, 2480)), ((10000, 2500), (3508, 877)), ((2500, 10000), (877, 3508))],
    )
    async def test_25_megapixel_png_pdf_and_docx(self, workspace, new_user_id, size, expected):
        data = png(*size)
        assert len(data) < 200_000  # ~84 KB: well inside the quota
        code, _ = await _stored(workspace, new_user_id(), data)
        [(width, height, _)] = _pdf_images(await _export(workspace, code, "pdf"))
        assert (width, height) == expected
        with Image.open(io.BytesIO(_docx_image(await _export(workspace, code, "docx")))) as im:
            assert im.size == expected and im.format == "PNG"
            assert im.getpixel((im.width // 2, im.height // 2)) == (200, 80, 40)

    async def test_25_megapixel_jpeg_stays_jpeg_within_bound(self, workspace, new_user_id):
        code, _ = await _stored(workspace, new_user_id(), jpeg(5000, 5000))
        [(width, height, filters)] = _pdf_images(await _export(workspace, code, "pdf"))
        assert (width, height) == (2480, 2480)
        assert "/DCTDecode" in filters
        with Image.open(io.BytesIO(_docx_image(await _export(workspace, code, "docx")))) as im:
            assert im.size == (2480, 2480) and im.format == "JPEG"

    async def test_transparent_palette_image_keeps_alpha(self, workspace, new_user_id):
        image = Image.new("P", (6000, 4000), 1)
        image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
        out = io.BytesIO()
        image.save(out, format="PNG", transparency=0)
        code, _ = await _stored(workspace, new_user_id(), out.getvalue())
        blob = _docx_image(await _export(workspace, code, "docx"))
        with Image.open(io.BytesIO(blob)) as im:
            assert im.size == (3508, 2339) and im.mode == "RGBA"
            assert im.getpixel((10, 10)) == (10, 200, 30, 255)
        [(width, height, _)] = _pdf_images(await _export(workspace, code, "pdf"))
        assert (width, height) == (3508, 2339)


class TestSmallImageIsUntouched:
    async def test_image_at_the_bound_keeps_its_size(self, workspace, new_user_id):
        code, _ = await _stored(workspace, new_user_id(), png(SHORT, LONG))
        [(width, height, _)] = _pdf_images(await _export(workspace, code, "pdf"))
        assert (width, height) == (SHORT, LONG)
        with Image.open(io.BytesIO(_docx_image(await _export(workspace, code, "docx")))) as im:
            assert im.size == (SHORT, LONG)

    async def test_small_png_keeps_its_size(self, workspace, new_user_id):
        code, _ = await _stored(workspace, new_user_id(), png(64, 48, noise=True, seed=3))
        [(width, height, _)] = _pdf_images(await _export(workspace, code, "pdf"))
        assert (width, height) == (64, 48)
        with Image.open(io.BytesIO(_docx_image(await _export(workspace, code, "docx")))) as im:
            assert im.size == (64, 48)

    async def test_small_jpeg_is_embedded_byte_for_byte(self, workspace, new_user_id):
        code, data = await _stored(workspace, new_user_id(), jpeg(640, 480))
        assert _docx_image(await _export(workspace, code, "docx")) == data
        page = PdfReader(io.BytesIO(await _export(workspace, code, "pdf"))).pages[0]
        [image] = page.images
        assert image.data == data


# Renders one export in a fresh interpreter and prints the growth of its peak resident
# memory (KB, the kernel's VmHWM) and the CPU seconds it took. tracemalloc cannot be
# used: Pillow's pixel buffers are allocated outside Python's allocator (it saw 2 MB for
# a DOCX export that grew the process by ~200 MB). Nor can ru_maxrss: a child started
# from this (large) test process inherits its high-water mark across exec.
_CHILD = """
import io, resource, sys
from datetime import datetime, timezone
from PIL import Image
from services.workspace import exports

def peak_kb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

data, fmt = open(sys.argv[1], "rb").read(), sys.argv[2]
now = datetime.now(timezone.utc)

def source(content):
    return exports.ExportSource(
        "c0de", "Big", "imagegene", "ai_artwork", "image/png", now, now, None, content
    )

small = io.BytesIO()
Image.new("RGB", (8, 8)).save(small, format="PNG")
exports.render(source(small.getvalue()), fmt)  # imports, font, Pillow plugins
before, cpu_before = peak_kb(), resource.getrusage(resource.RUSAGE_SELF)
exports.render(source(data), fmt)
after, cpu_after = peak_kb(), resource.getrusage(resource.RUSAGE_SELF)
cpu = sum(getattr(cpu_after, f) - getattr(cpu_before, f) for f in ("ru_utime", "ru_stime"))
print(after - before, round(cpu, 2))
"""


def _peak_growth(tmp_path: Path, data: bytes, fmt: str) -> int:
    """Bytes by which rendering `data` as `fmt` raised a fresh process's peak RSS."""
    path = tmp_path / "image.bin"
    path.write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), fmt],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    grown_kb, _cpu = done.stdout.split()
    return int(grown_kb) * 1024


class TestPeakMemory:
    """The decoded 25 MP image itself (~95 MiB: Pillow keeps RGB in 4 bytes a pixel)
    is the floor, PNG has no reduced-size decoding; after the fix ~130 MiB. Before it,
    the PDF export added ~238 MiB, the DOCX one ~195 MiB, a JPEG's PDF ~238 MiB."""

    @pytest.mark.parametrize("fmt", ["pdf", "docx"])
    async def test_25_megapixel_png(self, workspace, new_user_id, tmp_path, fmt):
        _, data = await _stored(workspace, new_user_id(), png(5000, 5000))
        grown = _peak_growth(tmp_path, data, fmt)
        assert grown < 150 * MB, f"{fmt}: peak memory grew by {grown // MB} MB"

    async def test_25_megapixel_jpeg_pdf(self, workspace, new_user_id, tmp_path):
        _, data = await _stored(workspace, new_user_id(), jpeg(5000, 5000))
        grown = _peak_growth(tmp_path, data, "pdf")
        assert grown < 150 * MB, f"pdf: peak memory grew by {grown // MB} MB"


def test_image_decodes_wait_their_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Six exports decoding images at once: never more than IMAGE_DECODES decode together
    (a 25 MP WEBP costs ~390 MiB while decoded, whatever the bound on its output)."""
    import threading
    import time

    from services.workspace import exports

    running = most = 0
    lock = threading.Lock()

    def slow(data: bytes) -> tuple[bytes, int, int]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return data, 1, 1

    monkeypatch.setattr(exports, "_decoded", slow)
    threads = [threading.Thread(target=exports._embeddable, args=(b"x",)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 1 <= most <= exports.IMAGE_DECODES  # without the gate: all six at once
