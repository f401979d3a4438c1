"""The web page's screenshot in docs/images/serve_page.png: glip-nano serving an icons-aquarium prompt adapter.

The adapter is the zero-shot one (the base's own P0 of the task's prompt, no offset), the image the first
test image of icons-aquarium; the page is driven in headless Chromium exactly as tests/test_serve_browser.py
does (key pasted, task picked, image dropped), with an admin key so that the adapter list shows too.
    python benchmarks/serve_screenshot.py --out docs/images/serve_page.png
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="glip-nano")
    parser.add_argument("--task", default="icons-aquarium")
    parser.add_argument("--threshold", default="0.4")
    parser.add_argument("--out", default="docs/images/serve_page.png")
    args = parser.parse_args()

    from playwright.sync_api import expect, sync_playwright

    from adapt.adapter import save_adapter
    from adapt.serve.app import serve_engine
    from adapt.serve.engine import EngineConfig, MultiTenantEngine
    from adapt.serve.tenancy import Tenancy, hash_key
    from adapt.serve.testing import chromium_path, drop_image, random_adapter, serve_in_thread
    from backbone.model import GLIP
    from backbone.processor import GLIPProcessor
    from tasks import get_task

    task = get_task(args.task)
    image = sorted(Path(task.split(task.eval_split).img_dir).glob("*.png"))[0].read_bytes()
    folder = Path(tempfile.mkdtemp(prefix="serve-shot-"))
    base = GLIP.from_pretrained(args.base).eval()
    processor = GLIPProcessor.from_config(base.config)
    save_adapter(random_adapter(base, processor, task.name, task.category_names, offset=0.0),
                 folder / f"{task.name}.safetensors")
    engine = MultiTenantEngine(GLIP.from_pretrained(args.base), folder, EngineConfig())
    tenancy = Tenancy.from_dict({"tenants": [], "admins": [{"name": "ops", "key_sha256": hash_key("admin-key")}]})
    with serve_in_thread(serve_engine(engine, tenancy)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(url + "/")
        page.fill("#key", "admin-key")
        page.click("#connect")
        page.wait_for_selector("#admin:not([hidden])")
        page.fill("#threshold", args.threshold)
        drop_image(page, image, "aquarium.png")
        # A locator assertion, not wait_for_function: the page's CSP forbids the eval a string predicate needs.
        expect(page.locator("#status")).to_contain_text("detection(s)", timeout=60_000)
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
