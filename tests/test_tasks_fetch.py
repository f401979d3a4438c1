"""The fetcher against a local Hub-like HTTP server on 127.0.0.1 (never the real host)."""
from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tasks import Category, Task
from tasks.fetch import ChecksumError, FetchError, fetch_task, unpack_zip
from tasks.task import roboflow_splits

REPO = "GLIPModel/GLIP"
FILE = "odinw_35/Tiny.zip"


def make_zip(top: str = "Tiny") -> bytes:
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]}],
            "categories": [{"id": 1, "name": "thing"}]}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for split in ("train", "valid", "test"):
            zf.writestr(f"{top}/{split}/_annotations.coco.json", json.dumps(coco))
            zf.writestr(f"{top}/{split}/a.png", _png())
        zf.writestr(f"{top}/README.txt", "x" * 50_000)  # big enough that a cut transfer is a real partial file
    return buf.getvalue()


def _png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(out, format="PNG")
    return out.getvalue()


class HubServer:
    """Serves one file the way the Hub does (HEAD metadata headers, GET with Range support)."""

    def __init__(self, payload: bytes, *, etag: str | None = None, cut_first_get: bool = False,
                 fail_first_get: bool = False):
        self.payload = payload
        self.etag = etag or hashlib.sha256(payload).hexdigest()
        self.cut_first_get = cut_first_get
        self.fail_first_get = fail_first_get
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                server.requests.append((self.command, self.headers.get("Range")))
                if self.path != f"/{REPO}/resolve/main/{FILE}":
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.end_headers()
                    return
                if body and server.fail_first_get:
                    server.fail_first_get = False
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data, start = server.payload, 0
                rng = self.headers.get("Range")
                if rng and body:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("ETag", f'"{server.etag}"')
                self.send_header("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567")
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if not body:
                    return
                if server.cut_first_get:
                    server.cut_first_get = False
                    self.wfile.write(data[start:len(data) // 2])  # then drop the connection mid-body
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def tiny_task() -> Task:
    return Task(name="tiny", categories=(Category("thing"),), splits=roboflow_splits(), subdir="odinw/Tiny",
                fetch_file=FILE)


def test_fetch_downloads_checks_and_unpacks(tmp_path):
    payload = make_zip()
    with HubServer(payload) as hub:
        result = fetch_task(tiny_task(), tmp_path, endpoint=hub.url, progress=False)
        assert result.downloaded and result.archive_sha256 == hashlib.sha256(payload).hexdigest()
        assert result.path == tmp_path / "odinw" / "Tiny"
        task = tiny_task().bind(tmp_path)
        assert task.is_available() and len(task.split("train")) == 1
        leftovers = [p.name for p in (tmp_path / "odinw").iterdir()]
        assert leftovers == ["Tiny"]  # the unpack went through a temporary folder, now renamed away
        assert not list((tmp_path / ".downloads").rglob("*.zip"))  # archive removed after unpacking
        n = len(hub.requests)
        again = fetch_task(tiny_task(), tmp_path, endpoint=hub.url, progress=False)
        assert not again.downloaded and len(hub.requests) == n  # present: nothing downloaded


def test_interrupted_transfer_resumes_with_range(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)  # so the cut arrives after whole chunks
    payload = make_zip()
    with HubServer(payload, cut_first_get=True) as hub:
        result = fetch_task(tiny_task(), tmp_path, endpoint=hub.url, progress=False, keep_archive=True)
    assert result.archive_sha256 == hashlib.sha256(payload).hexdigest()
    gets = [rng for method, rng in hub.requests if method == "GET"]
    assert len(gets) == 2 and gets[0] is None
    resumed_at = int(gets[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= len(payload) // 2  # the second request continued the partial file
    archives = list((tmp_path / ".downloads").rglob("Tiny.zip"))
    assert len(archives) == 1 and archives[0].read_bytes() == payload
    assert (tmp_path / "odinw" / "Tiny" / "valid" / "a.png").is_file()


def test_failed_attempt_is_retried_cleanly(tmp_path):
    payload = make_zip()
    with HubServer(payload, fail_first_get=True) as hub:
        result = fetch_task(tiny_task(), tmp_path, endpoint=hub.url, progress=False)
    assert result.archive_sha256 == hashlib.sha256(payload).hexdigest()
    assert [m for m, _ in hub.requests].count("GET") == 2 and all(r is None for _, r in hub.requests)
    assert (tmp_path / "odinw" / "Tiny" / "test" / "_annotations.coco.json").is_file()


def test_checksum_mismatch_removes_download_and_unpacks_nothing(tmp_path):
    with HubServer(make_zip(), etag="0" * 64) as hub:
        with pytest.raises(ChecksumError, match="SHA-256 .* but the server's ETag says 0000"):
            fetch_task(tiny_task(), tmp_path, endpoint=hub.url, progress=False)
    assert not (tmp_path / "odinw").exists()
    downloads = tmp_path / ".downloads"
    assert not [p for p in downloads.rglob("blobs/*") if not p.name.endswith(".lock")]
    assert not list(downloads.rglob("Tiny.zip"))


def test_expected_sha256_is_enforced(tmp_path):
    with HubServer(make_zip()) as hub:
        with pytest.raises(ChecksumError, match="but expected " + "a" * 64):
            fetch_task(tiny_task(), tmp_path, endpoint=hub.url, progress=False, expected_sha256="a" * 64)


def test_unreachable_file_fails_after_clean_retries(tmp_path):
    task = Task(name="nope", categories=(Category("x"),), splits={}, subdir="odinw/Nope",
                fetch_file="odinw_35/Nope.zip")
    with HubServer(make_zip()) as hub:
        with pytest.raises(FetchError, match="could not download .*odinw_35/Nope.zip after 2 attempts"):
            fetch_task(task, tmp_path, endpoint=hub.url, progress=False, attempts=2)
        assert sum(1 for m, _ in hub.requests if m == "HEAD") == 2


def test_unpack_is_safe_and_atomic(tmp_path):
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr("../escape.txt", "bad")
    (tmp_path / "evil.zip").write_bytes(evil.getvalue())
    with pytest.raises(FetchError, match="unsafe member path '../escape.txt'"):
        unpack_zip(tmp_path / "evil.zip", tmp_path / "out" / "Evil", progress=False)
    assert not (tmp_path / "escape.txt").exists() and list((tmp_path / "out").iterdir()) == []
    flat = io.BytesIO()
    with zipfile.ZipFile(flat, "w") as zf:  # no top-level folder: the content becomes the target
        zf.writestr("train/x.txt", "1")
    (tmp_path / "flat.zip").write_bytes(flat.getvalue())
    target = unpack_zip(tmp_path / "flat.zip", tmp_path / "out" / "Flat", progress=False)
    assert (target / "train" / "x.txt").read_text() == "1"
    with pytest.raises(FileExistsError):
        unpack_zip(tmp_path / "flat.zip", target, progress=False)
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(FetchError, match="not a valid zip"):
        unpack_zip(tmp_path / "bad.zip", tmp_path / "out" / "Bad", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Flat"]


def test_generated_tasks_are_not_fetched(tmp_path):
    import tasks

    with pytest.raises(ValueError, match="not downloadable. Generate it with `adapt tasks generate icons-thermal`"):
        fetch_task(tasks.get_task("icons-thermal", data_root=tmp_path), tmp_path)
