"""The search page in a real headless Chromium: type a query, see thumbnails, open one, search for more like it.

Needs Debian's chromium at /usr/bin/chromium and the playwright package (its Python API only: it drives the
system browser, nothing is downloaded). ``scripts/test.sh`` installs both. With CLIPSEARCH_SCREENSHOT_DIR set, the
screenshots are copied there too (``docs/screenshots`` in the repository).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from indexer.pipeline import IndexSettings, index_paths
from retrieval.search.server import ServerSettings, create_app
from retrieval.testing import running_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PAGE_SIZE = 12
TOKEN = "browser-test-token"

pytestmark = pytest.mark.slow

if not CHROMIUM.is_file():
    pytest.skip(
        "no /usr/bin/chromium: install Debian's chromium package (scripts/test.sh does)", allow_module_level=True
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")


def draw_shapes(folder: Path, count: int, seed: int, suffix: str) -> None:
    """Flat coloured shapes on plain backgrounds: distinct pictures that make a readable screenshot."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        background = tuple(int(v) for v in rng.integers(0, 256, 3))
        image = Image.new("RGB", (160, 120), background)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 4))):
            x, y, r = int(rng.integers(20, 140)), int(rng.integers(20, 100)), int(rng.integers(12, 40))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((x - r, y - r, x + r, y + r), fill=colour)
        image.save(folder / f"shapes_{seed}_{i:03d}{suffix}")


@pytest.fixture(scope="module")
def server_url(tmp_path_factory, tiny_spec):
    root = tmp_path_factory.mktemp("browser")
    photos = root / "photos"
    draw_shapes(photos, 22, seed=11, suffix=".jpg")
    draw_shapes(photos / "more", 18, seed=12, suffix=".png")
    for i, png in enumerate(sorted((photos / "more").iterdir())):  # dated 2015 (no EXIF: the mtime is the date)
        stamp = (1_420_113_600 + i * 86_400) * 10**9
        os.utime(png, ns=(stamp, stamp))
    settings = IndexSettings(model=tiny_spec, batch_size=16, workers=0, chunk_size=64, device="cpu")
    index_paths(root / "index", [photos], settings, progress=False)
    with running_server(create_app(root / "index", ServerSettings(device="cpu", token=TOKEN))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server_url):
    """A fresh browser tab that opened the URL `serve` prints (the token, traded for a cookie), as a user does."""
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    page = context.new_page()
    page.goto(f"{server_url}/?token={TOKEN}")
    assert "token" not in page.url  # the page kept the cookie and dropped the token from the address bar
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.on("console", lambda message: message.type == "error" and page.errors.append(message.text))
    yield page
    context.close()


def keep_screenshot(page, tmp_path: Path, name: str) -> Path:
    """Write to pytest's tmp dir; copy to $CLIPSEARCH_SCREENSHOT_DIR when set."""
    shot = tmp_path / name
    page.screenshot(path=str(shot))
    if os.environ.get("CLIPSEARCH_SCREENSHOT_DIR"):
        folder = Path(os.environ["CLIPSEARCH_SCREENSHOT_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, folder / name)
    print(f"screenshot: {shot}")
    return shot


def wait_until(page, expression: str, arg=None, timeout_s: float = 20.0) -> None:
    """Poll ``expression`` (a JS expression, or a function given ``arg``) until it is truthy. Playwright's
    wait_for_function evaluates its predicate with eval(), which the page's Content-Security-Policy forbids."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression, arg):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {expression}")
        time.sleep(0.05)


def tile_ids(page) -> list[int]:
    return [int(i) for i in page.eval_on_selector_all(".tile", "tiles => tiles.map(t => t.dataset.imageId)")]


def wait_for_thumbnails(page, count: int) -> None:
    """The first ``count`` tiles show a decoded image (not a broken icon)."""
    wait_until(
        page,
        "n => { const imgs = [...document.querySelectorAll('.tile img')].slice(0, n);"
        " return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0); }",
        arg=count,
    )


def test_type_a_query_see_thumbnails_open_one_and_get_more_like_it(page, server_url, tmp_path):
    page.goto(f"{server_url}/?k={PAGE_SIZE}")
    page.wait_for_selector("#status:has-text('40 images indexed')")
    assert not page.is_visible("#query-image") and not page.is_visible("#drop-overlay")
    page.fill("#q", "a sunset over the sea")
    page.press("#q", "Enter")
    wait_until(page, f"document.querySelectorAll('.tile').length >= {PAGE_SIZE}")
    wait_for_thumbnails(page, 8)
    assert "q=a+sunset+over+the+sea" in page.url
    scores = [float(s) for s in page.eval_on_selector_all(".tile .score", "els => els.map(e => e.textContent)")]
    assert scores == sorted(scores, reverse=True)
    assert page.inner_text(".tile >> nth=0 >> .label .name").endswith((".jpg", ".png"))  # tiles: name and date
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", page.inner_text(".tile >> nth=0 >> .label .date"))
    assert not page.is_visible("#query-image") and not page.is_visible("#drop-overlay")
    first_results = tile_ids(page)
    keep_screenshot(page, tmp_path, "search.png")

    page.mouse.wheel(0, 5000)  # scrolling down loads the next pages
    wait_until(page, f"document.querySelectorAll('.tile').length > {PAGE_SIZE}")
    assert tile_ids(page)[:PAGE_SIZE] == first_results[:PAGE_SIZE]
    page.evaluate("window.scrollTo(0, 0)")

    page.click(".tile >> nth=0")
    viewer = page.locator("#viewer")
    viewer.wait_for(state="visible")
    wait_until(
        page, "() => { const i = document.getElementById('viewer-img'); return i.complete && i.naturalWidth > 0; }"
    )
    assert page.inner_text("#viewer-path").endswith((".jpg", ".png"))
    shown, natural = page.evaluate(
        "() => { const i = document.getElementById('viewer-img'); return [i.clientWidth, i.naturalWidth]; }"
    )
    assert natural == 160 and shown <= 2 * natural  # a 160-pixel photo is not blown up to the window's width
    keep_screenshot(page, tmp_path, "viewer.png")

    page.click("#viewer-similar")
    page.wait_for_url(f"**/?like={first_results[0]}*")
    wait_until(page, f"document.querySelectorAll('.tile').length >= {PAGE_SIZE}")
    wait_for_thumbnails(page, 8)
    similar = tile_ids(page)
    assert first_results[0] not in similar and similar != first_results
    assert page.is_visible("#query-image")

    page.reload()  # the query lives in the URL
    wait_until(page, f"document.querySelectorAll('.tile').length >= {PAGE_SIZE}")
    assert tile_ids(page)[:PAGE_SIZE] == similar[:PAGE_SIZE]
    page.go_back()
    wait_until(page, "new URLSearchParams(location.search).get('q') === 'a sunset over the sea'")
    wait_until(page, f"document.querySelectorAll('.tile').length >= {PAGE_SIZE}")
    assert tile_ids(page)[:PAGE_SIZE] == first_results[:PAGE_SIZE]
    assert page.input_value("#q") == "a sunset over the sea"
    assert page.errors == []


@pytest.mark.parametrize("gesture", ["drop", "paste"])
def test_dropping_or_pasting_an_image_searches_by_it(page, server_url, gesture):
    page.goto(server_url)
    page.wait_for_selector("#status:has-text('images indexed')")
    page.evaluate(
        """async (gesture) => {
            const blob = await (await fetch('/api/images/5/file')).blob();
            const data = new DataTransfer();
            data.items.add(new File([blob], 'dropped.jpg', {type: blob.type}));
            const event = gesture === 'drop'
                ? new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true})
                : new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true});
            document.body.dispatchEvent(event);
        }""",
        gesture,
    )
    wait_until(page, "document.querySelectorAll('.tile').length > 0")
    assert tile_ids(page)[0] == 5  # the indexed copy of the dropped photo comes first
    assert float(page.inner_text(".tile >> nth=0 >> .score")) > 0.99
    assert page.is_visible("#query-image") and page.errors == []


def test_the_search_box_keeps_its_width_on_a_phone(browser, server_url, tmp_path):
    """At 390 px the search box was squeezed to ~50 px by the buttons beside it."""
    context = browser.new_context(viewport={"width": 390, "height": 844})
    phone = context.new_page()
    try:
        phone.goto(f"{server_url}/?token={TOKEN}&q=circle")
        box = phone.locator("input[type=search]").bounding_box()
        assert box["width"] >= 300, box
        assert phone.get_attribute("#f-min-score", "placeholder") == "none"  # not a value that looks set
        keep_screenshot(phone, tmp_path, "phone.png")
    finally:
        context.close()


def test_an_error_from_the_api_is_shown_not_swallowed(page, server_url):
    page.goto(f"{server_url}/?like=99999")
    page.wait_for_selector("#status.error")
    assert "no indexed image" in page.inner_text("#status")


def test_the_rerank_toggle_asks_the_server_and_lives_in_the_url(page, server_url):
    """This index's model has no re-ranker beside it: the toggle's request reaches the server and its one-line
    refusal is shown (the re-ranked answer itself: tests/test_itm.py)."""
    page.goto(f"{server_url}/?q=a+red+circle")
    wait_until(page, "!state.loading && document.querySelectorAll('.tile').length > 0")
    page.check("#f-rerank")
    page.wait_for_selector("#status.error")
    assert "re-rank" in page.inner_text("#status").lower()
    assert "rerank=1" in page.evaluate("location.search")


def wait_for_results(page, url_part: str) -> None:
    """The URL says ``url_part`` and the search it started has answered with tiles."""
    wait_until(page, f"decodeURIComponent(location.search.replace(/\\+/g, ' ')).includes({url_part!r})")
    wait_until(page, "!state.loading && document.querySelectorAll('.tile').length > 0")


def test_a_chip_and_a_date_filter_change_the_results_and_live_in_the_url(page, server_url, tmp_path):
    page.goto(f"{server_url}/?k={PAGE_SIZE}")
    page.wait_for_selector("#status:has-text('40 images indexed')")
    assert page.is_visible("#filters") and page.is_visible("#chip-text")
    page.fill("#q", "a red circle")
    page.press("#q", "Enter")
    wait_for_results(page, "q=a red circle")
    plain = tile_ids(page)

    page.fill("#chip-text", "a blue square")
    page.click("#chip-add")
    wait_for_results(page, "add=a blue square")
    assert page.inner_text(".chip.positive .chip-label") == "a blue square"
    added = tile_ids(page)
    assert added != plain

    page.click(".chip .chip-sign")  # the chip turns negative
    wait_for_results(page, "sub=a blue square")
    assert page.is_visible(".chip.negative") and tile_ids(page) not in (plain, added)

    page.fill("#f-before", "2015-12-31")
    wait_for_results(page, "before=2015-12-31")
    page.mouse.wheel(0, 5000)  # every page of results, not just the first
    page.wait_for_selector("#end", state="visible")
    dates = page.eval_on_selector_all(".tile", "tiles => tiles.map(t => t.dataset.takenAt)")
    titles = page.eval_on_selector_all(".tile", "tiles => tiles.map(t => t.title)")
    assert len(dates) == 18 and all(d.startswith("2015-01") for d in dates)
    assert all(t.endswith(".png") for t in titles)
    keep_screenshot(page, tmp_path, "chips-and-filters.png")

    page.select_option("#f-sort", "date")
    wait_for_results(page, "sort=date")
    dates = page.eval_on_selector_all(".tile", "tiles => tiles.map(t => t.dataset.takenAt)")
    assert dates == sorted(dates, reverse=True)

    page.reload()  # chips and filters come back from the URL
    wait_until(page, "!state.loading && document.querySelectorAll('.tile').length > 0")
    assert page.is_visible(".chip.negative") and page.input_value("#f-before") == "2015-12-31"
    assert page.input_value("#f-sort") == "date"
    assert page.errors == []
