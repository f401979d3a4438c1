"""The web page at `/`, in a real headless Chromium (Debian's `chromium`, driven by Playwright's Python API).

A tenant pastes a key, picks a task, drops an image and sees boxes drawn; an admin sees the adapter list
with versions and uploads one. The server is the real app under uvicorn on 127.0.0.1 (the docs'
screenshot is made the same way on glip-nano by benchmarks/serve_screenshot.py).
"""
import re

import pytest

pytest.importorskip("fastapi")
playwright_sync = pytest.importorskip("playwright.sync_api")
# Locator assertions, not wait_for_function: the page's CSP forbids eval, which string predicates need.
expect = playwright_sync.expect

from adapt.adapter import save_adapter  # noqa: E402
from adapt.serve.app import HTTPLimits, serve_engine  # noqa: E402
from adapt.serve.testing import (chromium_path, drop_image, image_bytes, random_adapter, serve_in_thread,  # noqa: E402
                                 tiny_base)
from tests._serve_helpers import KEYS, make_engine, tenancy  # noqa: E402

CHROMIUM = chromium_path()
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary found (apt-get install -y chromium; "
                                                          ".ci/run installs it)"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture()
def server(adapters_dir):
    engine = make_engine(adapters_dir, batch_window_ms=2.0, max_upload_bytes=1_000_000)
    app = serve_engine(engine, tenancy(), HTTPLimits(max_body_bytes=2_000_000))
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture()
def page():
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.set_default_timeout(30_000)
        yield page
        browser.close()


def connect(page, url, key):
    page.goto(url + "/")
    page.fill("#key", key)
    page.click("#connect")
    expect(page.locator("#task option")).not_to_have_count(0)
    expect(page.locator("#task")).to_be_enabled()


def test_tenant_drops_an_image_and_sees_boxes(server, page, tmp_path):
    connect(page, server, KEYS["team-a"])
    tasks = page.eval_on_selector_all("#task option", "options => options.map(o => o.value)")
    assert tasks == ["alpha", "full", "gamma"]  # only this tenant's tasks
    assert page.is_hidden("#admin")  # a tenant key sees no admin section
    page.select_option("#task", "alpha")
    page.fill("#threshold", "0")
    drop_image(page, image_bytes(320, 200, seed=3))
    expect(page.locator("#canvas")).to_have_attribute("data-boxes", re.compile(r"^[1-9][0-9]*$"))
    result = page.evaluate("JSON.parse(document.querySelector('#json').textContent)")
    boxes = int(page.get_attribute("#canvas", "data-boxes"))
    assert result["task"] == "alpha" and boxes == len(result["detections"]) > 0
    assert page.eval_on_selector_all("#detections li", "items => items.length") == boxes
    assert {d["category"] for d in result["detections"]} <= {"cat", "dog"}
    # Boxes are drawn: the canvas shows the image plus coloured strokes (pixels of the palette's first colours).
    painted = page.evaluate("""() => {
        const c = document.querySelector('#canvas'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) {
            if ((d[i] === 230 && d[i + 1] === 25 && d[i + 2] === 75) || (d[i] === 60 && d[i + 1] === 180 && d[i + 2] === 75)) n++;
        }
        return {width: c.width, height: c.height, boxPixels: n};
    }""")
    assert painted["width"] == 640 and painted["boxPixels"] > 50, painted  # 320 px drawn at 2x
    assert len(page.screenshot(full_page=True)) > 10_000


def test_admin_sees_versions_and_uploads(server, page, processor, tmp_path):
    connect(page, server, KEYS["ops"])
    page.wait_for_selector("#admin:not([hidden])")
    rows = page.eval_on_selector_all("#adapters tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))")
    by_name = {row[0]: row for row in rows}
    assert by_name["alpha"][1] != "-" and len(by_name["alpha"][1]) == 16 and by_name["alpha"][3] == "ok"
    assert by_name["full"][3] == "refused"  # a full fine-tune cannot be served
    path = save_adapter(random_adapter(tiny_base(), processor, "new-kite", ["kite"], seed=8),
                        tmp_path / "kite.safetensors")
    page.fill("#upload-name", "new-kite")
    page.set_input_files("#upload-file", str(path))
    page.click("#upload")
    expect(page.locator("#upload-status")).to_have_text(re.compile(r"^Added new-kite"))
    expect(page.locator("#adapters tbody tr td:first-child", has_text=re.compile(r"^new-kite$"))).to_have_count(1)
    page.fill("#upload-name", "new-bad")
    (tmp_path / "bad.safetensors").write_bytes(b"not an adapter")
    page.set_input_files("#upload-file", str(tmp_path / "bad.safetensors"))
    page.click("#upload")
    page.wait_for_selector("#upload-status.error")
    assert "not a safetensors file" in page.text_content("#upload-status")
