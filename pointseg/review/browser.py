"""Open a review page in headless Chromium: the system's browser, driven by playwright.

Chromium comes from the operating system (Debian: ``apt-get install -y
chromium``); playwright (the ``test`` extra) only drives it and never downloads
a browser. Used by the browser test and ``benchmarks/review_page.py``.
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from pathlib import Path

#: Flags for a quiet, sandbox-free (root in CI) headless Chromium that reaches no network on its own.
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync")
#: True once the first page of cards is in the DOM and every thumbnail inside the viewport is decoded
#: (lazy thumbnails below the fold are not loaded until scrolled to).
FIRST_SCREEN = ("document.body.dataset.ready === '1' && Array.from(document.querySelectorAll('.card img'))"
                ".filter(i => { const r = i.getBoundingClientRect(); return r.bottom > 0 && r.top < innerHeight; })"
                ".every(i => i.complete && i.naturalWidth > 0)")


def chromium_path() -> str:
    """The system Chromium; ``FileNotFoundError`` naming the install command when there is none."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise FileNotFoundError("Chromium not found on PATH: apt-get install -y chromium (Debian's package)")
    return path


@contextmanager
def chromium():
    """A launched headless Chromium (playwright ``Browser``), closed on exit."""
    from playwright.sync_api import sync_playwright  # the test extra: only the test and benchmarks need it

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=list(CHROMIUM_ARGS))
        try:
            yield browser
        finally:
            browser.close()


def open_review(browser, index_html: str | Path, width: int = 1200, height: int = 800):
    """A new page on ``index_html``, waited until its first screen is shown.

    Returns ``(page, seconds to the first screen, problems, urls)``: page
    errors and console errors, and every URL the page requested.
    """
    page = browser.new_page(viewport={"width": width, "height": height})
    problems: list[str] = []
    urls: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("request", lambda r: urls.append(r.url))
    t0 = time.perf_counter()
    page.goto(Path(index_html).resolve().as_uri())
    page.wait_for_function(FIRST_SCREEN)
    return page, time.perf_counter() - t0, problems, urls
