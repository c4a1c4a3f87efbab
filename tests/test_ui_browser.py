"""The app in a real browser: Debian's chromium driven by playwright (`playwright install` cannot download here).

Loads the page, picks an adapter (its trigger word fills the prompt), clicks Generate, waits for the base and
the adapted image, and saves a screenshot to the test's folder (printed; kept by pytest under its basetemp).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                       "(apt-get install chromium, or `make browser-deps`)"),
]
playwright_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package (test extras)")
pytest.importorskip("gradio")

from test_ui import STEPS, edit_meta, launch_app, train_tiny_lora  # noqa: E402


@pytest.fixture(scope="module")
def page_url(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ui_browser")
    good = train_tiny_lora(tiny_base_dir, root)
    runs = good.parent
    shutil.copytree(good, runs / "my-subject", ignore=shutil.ignore_patterns("checkpoints"))
    edit_meta(runs / "my-subject", trigger="zqx")
    shutil.copytree(good, runs / "for-sd2", ignore=shutil.ignore_patterns("checkpoints"))
    edit_meta(runs / "for-sd2", family="sd2")
    app, url = launch_app(tiny_base_dir, runs)
    yield url
    app.close()


@pytest.fixture
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def test_pick_adapter_generate_and_screenshot(page_url, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(page_url)
    page.wait_for_selector("#generate")

    page.click("#adapter input")
    page.get_by_role("option", name=re.compile("my-subject")).click()
    prompt = page.locator("#prompt textarea")
    playwright_api.expect(prompt).to_have_value(re.compile("^zqx"), timeout=30_000)  # trigger pre-filled
    prompt.fill("zqx a red square")
    steps = page.locator("#steps input[type=number]")
    steps.fill(str(STEPS))
    steps.press("Tab")
    page.locator("#seed input").fill("7")
    page.locator("#seed input").press("Tab")

    page.click("#generate")
    for elem in ("#base-image img", "#adapted-image img"):
        page.wait_for_selector(elem, state="visible", timeout=180_000)
    playwright_api.expect(page.locator("#status")).to_contain_text("seed 7", timeout=60_000)
    playwright_api.expect(page.locator("#reproduce")).to_contain_text("adapt sample", timeout=10_000)
    assert "Traceback" not in page.content()

    shot = tmp_path / "ui.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    sizes = [page.locator(f"{e} img").evaluate("i => [i.naturalWidth, i.complete]") for e in ("#base-image", "#adapted-image")]
    assert all(w == 32 and done for w, done in sizes)


def test_unavailable_adapter_is_listed_with_its_reason(page_url, browser):
    page = browser.new_page()
    page.goto(page_url)
    page.wait_for_selector("#generate")
    page.click("#adapter input")
    option = page.get_by_role("option", name=re.compile("for-sd2"))
    playwright_api.expect(option).to_contain_text("unavailable: built for a sd2 base")
    option.click()
    playwright_api.expect(page.locator("#adapter-info")).to_contain_text("unavailable", timeout=30_000)
    playwright_api.expect(page.locator("#generate")).to_be_disabled(timeout=10_000)
