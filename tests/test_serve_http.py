"""HTTP hygiene of the server, each case fed as a client would and checked from the client's side: no redirect
built from the Host header, slow clients cut by the read deadlines (a real uvicorn on 127.0.0.1), /docs off
unless asked for, security headers everywhere, errors that quote the server's own limits, and /metrics
counting the status code that was actually sent."""
import socket
import time

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from adapt.serve.app import SECURITY_HEADERS, EngineBackend, HTTPLimits, create_app, serve_engine  # noqa: E402
from adapt.serve.engine import EngineConfig, MultiTenantEngine  # noqa: E402
from adapt.serve.tenancy import Tenancy, hash_key  # noqa: E402
from adapt.serve.testing import bomb_bytes, image_bytes, serve_in_thread, tiny_base, write_adapter  # noqa: E402
from backbone.processor import GLIPProcessor  # noqa: E402

KEYS = {"team-a": "key-a-0123456789", "ops": "key-admin-0123456789"}
pytestmark = pytest.mark.usefixtures("one_thread")
AUTH = {"Authorization": f"Bearer {KEYS['team-a']}"}
ADMIN = {"Authorization": f"Bearer {KEYS['ops']}"}




@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("adapters")
    base = tiny_base()
    write_adapter(base, GLIPProcessor.from_config(base.config), directory, "alpha", ["cat", "dog"])
    return directory


def tenancy() -> Tenancy:
    return Tenancy.from_dict({
        "tenants": [{"name": "team-a", "key_sha256": hash_key(KEYS["team-a"]), "tasks": ["alpha"]}],
        "admins": [{"name": "ops", "key_sha256": hash_key(KEYS["ops"])}]})


def engine_for(directory) -> MultiTenantEngine:
    return MultiTenantEngine(tiny_base(), directory, EngineConfig(max_pixels=4_000_000, batch_window_ms=1.0))


@pytest.fixture()
def client(adapters_dir):
    app = serve_engine(engine_for(adapters_dir), tenancy(), HTTPLimits(max_body_bytes=300_000))
    with TestClient(app, follow_redirects=False) as c:
        yield c


def detect(client, image: bytes, headers=AUTH):
    return client.post("/v1/tasks/alpha/detect", files={"image": ("x.png", image, "image/png")},
                       data={"threshold": "0.0"}, headers=headers)


def test_no_redirect_is_built_from_the_host_header(client):
    for method, path in [("PUT", "/v1/adapters/alpha/"), ("GET", "/v1/tasks/"), ("POST", "/v1/tasks/alpha/detect/")]:
        r = client.request(method, path, headers={**ADMIN, "Host": "evil.example"}, content=b"x")
        assert r.status_code == 404, (method, path, r.status_code)
        assert "location" not in r.headers and "evil.example" not in r.text
        assert r.json()["error"]["code"] == "not_found"


def test_docs_are_off_unless_asked_for(adapters_dir, client):
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert client.get(path).status_code == 404, path
    assert client.get("/openapi.json").status_code == 200  # the schema itself loads nothing
    with TestClient(serve_engine(engine_for(adapters_dir), tenancy(), docs=True)) as with_docs:
        page = with_docs.get("/docs")
        assert page.status_code == 200 and "swagger-ui" in page.text
        # its scripts come from the CDN, which its own policy (and only its) allows
        assert "https://cdn.jsdelivr.net" in page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert with_docs.get("/redoc").status_code == 404
        assert "cdn.jsdelivr.net" not in with_docs.get("/").headers["content-security-policy"]


def test_security_headers_on_the_page_the_api_and_errors(client):
    responses = {"page": client.get("/"), "script": client.get("/static/app.js"), "tasks": client.get("/v1/tasks",
                 headers=AUTH), "detect": detect(client, image_bytes()), "401": client.get("/v1/tasks"),
                 "404": client.get("/nowhere"), "metrics": client.get("/metrics", headers=ADMIN)}
    for name, r in responses.items():
        for header, value in SECURITY_HEADERS.items():
            assert r.headers.get(header) == value, (name, header)
    csp = responses["page"].headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert responses["page"].headers["x-frame-options"] == "DENY"
    assert responses["page"].headers["x-content-type-options"] == "nosniff"
    assert responses["detect"].status_code == 200


def test_errors_quote_the_servers_own_limits(client):
    pillow = bomb_bytes(10_000)  # 100 Mpx: over Pillow's own 89 Mpx guard, which must not be what the client reads
    for image in (pillow, bomb_bytes(3000)):  # 9 Mpx: over the server's 4 Mpx only
        r = detect(client, image)
        assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"
        message = r.json()["error"]["message"]
        assert "4,000,000" in message and "--max-pixels" in message, message
        assert "89,478,485" not in message and "89478485" not in message and "178956970" not in message
    big = detect(client, b"\0" * 400_000)
    assert big.status_code == 413 and "300,000 bytes (--max-body-bytes)" in big.json()["error"]["message"]
    assert detect(client, image_bytes()).status_code == 200


class _UnrenderableResult(EngineBackend):
    """A backend whose answer cannot be encoded as UTF-8 JSON: the response fails after the route returned."""

    async def detect(self, task, image, params, timeout_s, tenant):
        result = await super().detect(task, image, params, timeout_s, tenant)
        result.detections = [{"bbox": [0.0, 0.0, 1.0, 1.0], "score": 0.9, "category_id": 1, "category": "\ud800fish"}]
        return result


def test_metrics_count_the_status_code_actually_sent(adapters_dir):
    app = create_app(_UnrenderableResult(engine_for(adapters_dir)), tenancy())
    with TestClient(app) as client:
        r = detect(client, image_bytes())
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal"
        assert client.get("/v1/tasks/alpha/detect", headers=AUTH).status_code == 405
        text = client.get("/metrics", headers=ADMIN).text
    assert 'adapt_requests_total{code="500",task="alpha"} 1.0' in text
    assert 'code="200",task="alpha"' not in text  # the route returned, but the client never got a 200
    assert 'adapt_http_responses_total{code="500",method="POST",route="/v1/tasks/{task}/detect"} 1.0' in text
    assert 'adapt_http_responses_total{code="405",method="GET",route="/v1/tasks/{task}/detect"} 1.0' in text


# ---------------------------------------------------------------------------------------- slow clients


@pytest.fixture(scope="module")
def slow_server(adapters_dir):
    limits = HTTPLimits(header_timeout_s=1.0, body_timeout_s=1.0)
    app = serve_engine(engine_for(adapters_dir), tenancy(), limits)
    with serve_in_thread(app, limits=limits) as url:
        yield int(url.rsplit(":", 1)[1])


def held_for(port: int, chunks: list[bytes], gap_s: float, give_up_s: float = 8.0) -> tuple[float, bytes]:
    """Send `chunks` `gap_s` apart on one connection (stopping when the server closes it); returns the seconds
    until the server closed the connection and everything it sent."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started, received = time.monotonic(), b""
        sock.settimeout(0.05)
        pending = list(chunks)
        while time.monotonic() - started < give_up_s:
            if pending:
                try:
                    sock.sendall(pending.pop(0))
                except OSError:
                    pending = []
            deadline = time.monotonic() + gap_s
            while time.monotonic() < deadline:
                try:
                    data = sock.recv(65536)
                except (socket.timeout, BlockingIOError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    return time.monotonic() - started, received
                received += data
        return time.monotonic() - started, received


def test_half_sent_headers_are_cut_at_the_header_timeout(slow_server):
    seconds, answer = held_for(slow_server, [b"POST /v1/tasks/alpha/detect HTTP/1.1\r\nHost: x\r\n",
                                             b"X-Slow: 1\r\n", b"X-Slow: 2\r\n"] + [b"X-More: y\r\n"] * 40, 0.3)
    assert 0.8 <= seconds < 3.0, seconds
    assert answer.startswith(b"HTTP/1.1 408") and b"(--header-timeout-s)" in answer


def test_a_trickled_body_is_cut_at_the_body_timeout(slow_server):
    head = (f"POST /v1/tasks/alpha/detect HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\n"
            "Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n").encode()
    seconds, answer = held_for(slow_server, [head] + [b"{"] + [b" "] * 100, 0.2)
    assert 0.8 <= seconds < 3.0, seconds
    assert answer.startswith(b"HTTP/1.1 408")


def test_a_prompt_client_is_not_cut(slow_server):
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", slow_server)) as sock:
        for _ in range(3):  # the same kept-alive connection, each request sent whole, 0.6 s apart
            sock.sendall(request)
            answer = b""
            while not answer.endswith(b'{"status":"ok"}'):
                chunk = sock.recv(65536)
                assert chunk, f"the server closed a prompt client's connection after {answer!r}"
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200")
            time.sleep(0.6)
