"""The dashboard in a real browser: `cifake dashboard` on 127.0.0.1, driven by headless Chromium through Playwright.

Debian's `chromium` (/usr/bin/chromium) is driven by the `playwright` package; Playwright's own browser download
is never used. The test opens each page, uploads an image on Classify, waits for its label and saves a
screenshot of each page to CIFAKE_SCREENSHOT_DIR (docs/screenshots/ regenerates the README's), else to a
temporary folder. Without Chromium it skips on a developer machine and fails in CI (CI=true).
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from servers import cifake_server, using_store

from cifake_core import pipeline
from cifake_core.config import load_config

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
# The closed network refuses Chromium's background connections; without these flags it stalls retrying them.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 1000}
MAX_SCREENSHOT_HEIGHT = 3000
PAGE_TIMEOUT_MS = 120_000


def _chromium_or_skip() -> Path:
    missing = None if CHROMIUM.is_file() else f"{CHROMIUM} is missing: install it with `apt-get install -y chromium`"
    if importlib.util.find_spec("playwright") is None:
        missing = "the playwright package is missing: install the dev extra, `pip install -e '.[dev]'`"
    if missing and os.environ.get("CI") == "true":
        pytest.fail(f"{missing} (CI must run the browser test)")
    if missing:
        pytest.skip(missing)
    return CHROMIUM


@pytest.fixture(scope="module")
def dashboard_url(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`cifake dashboard` on a free port over a store with two trained versions, v1 production."""
    _chromium_or_skip()
    base = {"data_dir": str(tiny_demo), "epochs": "3", "batch_size": "16", "num_workers": "0"}
    with using_store(f"sqlite:///{tmp_path_factory.mktemp('browser') / 'mlflow.db'}") as uri:
        pipeline.train(load_config(None, base))
        pipeline.train(load_config(None, {**base, "lr": "0.001", "promote": "never"}))
    env = {"MLFLOW_TRACKING_URI": uri, "STREAMLIT_SERVER_HEADLESS": "true"}
    with cifake_server(["dashboard"], env, "/_stcore/health") as base_url:
        yield base_url


def _screenshot(page, folder: Path, name: str) -> Path:
    """The whole page as a palette PNG, a few hundred KB at most: small enough to commit."""
    # Streamlit scrolls inside its main block, not the document, so a full-page shot would stop at the window:
    # the window is sized to the content instead.
    page.set_viewport_size(VIEWPORT)
    bottom = page.evaluate(
        "Math.max(...[...document.querySelectorAll('[data-testid=\"stElementContainer\"]')]"
        ".map(element => element.getBoundingClientRect().bottom))"
    )
    height = min(max(int(bottom) + 60, 600), MAX_SCREENSHOT_HEIGHT)
    page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
    _settled(page)
    path = folder / f"{name}.png"
    image = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def _settled(page) -> None:
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=PAGE_TIMEOUT_MS)


def test_every_page_in_chromium_and_an_upload_is_labelled(dashboard_url: str, tmp_path: Path):
    from playwright.sync_api import expect, sync_playwright

    folder = Path(os.environ.get("CIFAKE_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    good, broken = tmp_path / "red square.png", tmp_path / "broken.jpg"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(good)
    broken.write_bytes(good.read_bytes()[:60])
    with sync_playwright() as driver:
        browser = driver.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # fresh every run
            executable_path=str(_chromium_or_skip()),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport=VIEWPORT,
        )
        try:
            page = browser.pages[0] if browser.pages else browser.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            expect.set_options(timeout=PAGE_TIMEOUT_MS)
            page.goto(dashboard_url)
            expect(page.get_by_role("heading", name="Runs")).to_be_visible()
            expect(page.locator(".js-plotly-plot")).to_have_count(3)  # curves, ROC and test metrics of v1 and v2
            _settled(page)
            shots = [_screenshot(page, folder, "runs")]

            page.locator('[data-testid="stSidebarNavLink"]', has_text="Models").click()
            expect(page.get_by_role("heading", name="Models")).to_be_visible()
            expect(page.get_by_text("Production:")).to_be_visible()
            _settled(page)
            shots.append(_screenshot(page, folder, "models"))

            page.locator('[data-testid="stSidebarNavLink"]', has_text="Classify").click()
            expect(page.get_by_text(re.compile(r"Answering: cifake-detector v1"))).to_be_visible()
            page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files([good, broken])
            expect(page.get_by_text(re.compile(r"red square\.png: (ai|real), prob_ai 0\.\d{4}"))).to_be_visible()
            expect(page.get_by_text(re.compile(r"broken\.jpg: (not an image|corrupt or truncated)"))).to_be_visible()
            _settled(page)
            shots.append(_screenshot(page, folder, "classify"))
        finally:
            browser.close()
    for shot in shots:
        assert 10_000 < shot.stat().st_size < 400_000, shot
