"""Fake providers on 127.0.0.1 that speak NanoBanana's, fal.ai's, Kie.ai's and Google's
wire formats, so the real adapters run. Each fake is its own server (its own port):
`mode` makes it succeed, fail, stall or refuse; `stop()` takes it down.

Also `ImageHost`: serves test images, redirects, and a "bomb" PNG."""

from __future__ import annotations

import base64
import io
import itertools
import json
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image


def png(width: int = 64, height: int = 48, colour: tuple[int, int, int] = (90, 120, 160)) -> bytes:
    image = Image.new("RGB", (width, height), colour)
    for x in range(width):  # a gradient, so enhancements have something to change
        for y in range(0, height, 4):
            image.putpixel((x, y), ((x * 4) % 256, (y * 5) % 256, 128))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A real, valid 1-bit PNG of width x height (small on the wire, huge decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )


RESULT = png(32, 32, (250, 40, 40))


class _Server:
    def __init__(self) -> None:
        self.port = 0
        self._serve()

    def _serve(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def json(self, status: int, data: Any) -> None:
                self._send(status, json.dumps(data).encode(), "application/json")

            def do_GET(self) -> None:
                outer.handle(self, "GET")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.body = json.loads(self.rfile.read(length) or b"null")
                outer.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.stopped = False

    def stop(self) -> None:
        """Down: the port refuses connections until `start()`."""
        if not self.stopped:
            self.stopped = True
            self.server.shutdown()
            self.server.server_close()

    def start(self) -> None:
        if self.stopped:
            self._serve()  # same port

    def handle(self, h: Any, method: str) -> None:  # pragma: no cover - subclasses
        raise NotImplementedError


class FakeProvider(_Server):
    """mode: "ok" (done after `polls_needed` polls), "fail" (submit 500), "reject" (task
    fails at the provider), "stall" (never finishes)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.mode = "ok"
        self.polls_needed = 0
        self.submits = 0
        self.polls = 0
        self.tasks: dict[str, int] = {}
        self.auth: list[str] = []
        self._ids = itertools.count(1)
        self.lock = threading.Lock()
        super().__init__()

    def reset(self, mode: str = "ok", polls_needed: int = 0) -> None:
        with self.lock:
            self.mode = mode
            self.polls_needed = polls_needed
            self.submits = 0
            self.polls = 0

    def _submit(self, h: Any) -> str | None:
        with self.lock:
            self.submits += 1
            self.auth.append(h.headers.get("Authorization") or h.headers.get("x-goog-api-key"))
            if self.mode == "fail":
                h.json(500, {"error": "boom"})
                return None
            task_id = f"{self.kind}-{next(self._ids)}"
            self.tasks[task_id] = 0
            return task_id

    def _poll(self, task_id: str) -> str:
        """running | done | failed"""
        with self.lock:
            self.polls += 1
            if task_id not in self.tasks:
                return "failed"
            self.tasks[task_id] += 1
            if self.mode == "reject":
                return "failed"
            if self.mode == "stall":
                return "running"
            return "done" if self.tasks[task_id] > self.polls_needed else "running"

    def handle(self, h: Any, method: str) -> None:
        parts = urlsplit(h.path)
        path, query = parts.path, parse_qs(parts.query)
        if path.startswith("/results/"):
            h._send(200, RESULT, "image/png")
            return
        result_url = f"{self.url}/results/{self.kind}.png"
        if self.kind == "nanobanana":
            if method == "POST" and path == "/api/v1/nanobanana/generate":
                if (task_id := self._submit(h)) is not None:
                    h.json(200, {"code": 200, "msg": "success", "data": {"taskId": task_id}})
                return
            if path == "/api/v1/nanobanana/record-info":
                task_id = query.get("taskId", [""])[0]
                state = self._poll(task_id)
                flag = {"running": 0, "done": 1, "failed": 3}[state]
                data = {"taskId": task_id, "successFlag": flag}
                if state == "done":
                    data["response"] = {"resultImageUrl": result_url}
                if state == "failed":
                    data["errorMessage"] = "generation failed"
                h.json(200, {"code": 200, "msg": "success", "data": data})
                return
        if self.kind == "fal":
            base = "/fal-ai/nano-banana"
            if method == "POST" and path == f"{base}/edit":
                if (task_id := self._submit(h)) is not None:
                    h.json(200, {"request_id": task_id, "status_url": "", "response_url": ""})
                return
            if path.startswith(f"{base}/requests/"):
                rest = path[len(f"{base}/requests/") :]
                if rest.endswith("/status"):
                    state = self._poll(rest[: -len("/status")])
                    status = {"running": "IN_PROGRESS", "done": "COMPLETED", "failed": "FAILED"}
                    h.json(200, {"status": status[state]})
                else:
                    h.json(200, {"images": [{"url": result_url, "content_type": "image/png"}]})
                return
        if self.kind == "kie":
            if method == "POST" and path == "/api/v1/jobs/createTask":
                if (task_id := self._submit(h)) is not None:
                    h.json(200, {"code": 200, "msg": "success", "data": {"taskId": task_id}})
                return
            if path == "/api/v1/jobs/recordInfo":
                task_id = query.get("taskId", [""])[0]
                state = {"running": "generating", "done": "success", "failed": "fail"}[
                    self._poll(task_id)
                ]
                data = {"taskId": task_id, "state": state}
                if state == "success":
                    data["resultJson"] = json.dumps({"resultUrls": [result_url]})
                h.json(200, {"code": 200, "msg": "success", "data": data})
                return
        if self.kind == "google" and method == "POST" and path.endswith(":generateContent"):
            if self._submit(h) is not None:
                if self.mode != "ok":
                    h.json(503, {"error": {"message": "overloaded"}})
                    return
                part = {
                    "inlineData": {
                        "mimeType": "image/png",
                        "data": base64.b64encode(RESULT).decode(),
                    }
                }
                h.json(200, {"candidates": [{"content": {"parts": [part]}}]})
            return
        h.json(404, {"error": "not found"})


class ImageHost(_Server):
    """GET /image.png, /bomb.png, /text (not an image), /png-as-text (a PNG served as
    text/plain), /broken.png (image/png, not an image), /redirect?to=URL, /big (over the
    cap), /stall (answers only once `release` is set, or after a minute)."""

    def __init__(self) -> None:
        self.image = png()
        self.bomb: bytes | None = None
        self.hits = 0
        self.release = threading.Event()
        super().__init__()

    def stop(self) -> None:
        self.release.set()
        super().stop()

    def handle(self, h: Any, method: str) -> None:
        self.hits += 1
        parts = urlsplit(h.path)
        query = parse_qs(parts.query)
        if parts.path == "/image.png":
            h._send(200, self.image, "image/png")
        elif parts.path == "/bomb.png":
            if self.bomb is None:
                self.bomb = png_bomb()
            h._send(200, self.bomb, "image/png")
        elif parts.path == "/text":
            h._send(200, b"hello", "text/plain")
        elif parts.path == "/png-as-text":
            h._send(200, self.image, "text/plain")
        elif parts.path == "/broken.png":
            h._send(200, b"\x89PNG\r\n\x1a\n" + b"not really" * 10, "image/png")
        elif parts.path == "/stall":
            self.release.wait(60)
            h._send(200, self.image, "image/png")
        elif parts.path == "/redirect":
            h._send(302, b"", "text/plain", Location=query["to"][0])
        elif parts.path == "/big":
            h._send(200, b"\x89PNG" + b"\x00" * (2 * 1024 * 1024), "image/png")
        else:
            h.json(404, {"error": "not found"})
