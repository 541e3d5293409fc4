"""The review page of a real run, opened in headless Chromium (Debian's package; never skipped).

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``; ``make test`` installs it when absent)
and the ``playwright`` package from the ``test`` extra, which drives that
browser and downloads none. Without them the test fails.
"""

from __future__ import annotations

import json

import pytest

from pointseg.review.browser import chromium, open_review
from pointseg.review.table import worst_first

PAGE_SIZE = 4


@pytest.fixture(scope="module")
def browser():
    try:
        with chromium() as b:
            yield b
    except (ImportError, FileNotFoundError) as exc:  # never a skip: the page must be tested in a browser
        pytest.fail(f"no headless browser: {exc} (pip install -e '.[test]'; apt-get install -y chromium)")


@pytest.fixture(scope="module")
def run(review_run):
    return review_run[0]


def card_ids(page) -> list[int]:
    return [int(v) for v in page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.id)")]


def test_review_page_in_chromium(browser, run, tmp_path, request):
    report = json.loads((run / "report.json").read_text())
    expected = [r["image_id"] for r in report["per_image"]]
    page, seconds, problems, urls = open_review(browser, run / "review" / "index.html")
    request.node.user_properties.append(("first_screen_seconds", round(seconds, 3)))
    print(f"\nreview page, {len(expected)} images: first screen in {seconds:.2f} s")

    # every image of the run, one page of cards at a time
    assert page.evaluate("REVIEW.rows.length") == len(expected) == 10
    assert page.inner_text("#count") == "10"
    assert len(card_ids(page)) == PAGE_SIZE

    # worst-first order across the pages equals report.json's, itself sorted by its values
    seen = card_ids(page)
    while page.is_enabled("#next"):
        page.click("#next")
        seen += card_ids(page)
    assert seen == expected
    assert report["per_image"] == worst_first(report["per_image"], "pq")
    page.click("#prev")

    # filters: failed images, with their reason; one class
    page.select_option("#err", "failed")
    failed = [r for r in report["per_image"] if r["error"]]
    assert card_ids(page) == [r["image_id"] for r in failed]
    assert "decode" in page.inner_text(f".card[data-id='{failed[0]['image_id']}']") or \
        "decode" in page.inner_text(f".card[data-id='{failed[1]['image_id']}']")
    page.select_option("#err", "")
    cls = report["per_image"][0]["categories"] or report["per_image"][2]["categories"]
    page.select_option("#cls", str(cls[0]))
    want = [r["image_id"] for r in report["per_image"] if cls[0] in r["categories"]]
    assert page.inner_text("#shown").startswith(f"{len(want)} of 10")
    page.select_option("#cls", "")
    page.select_option("#sort", "image_id")
    assert card_ids(page) == sorted(expected)[:PAGE_SIZE]
    page.select_option("#sort", "pq")
    page.screenshot(path=str(tmp_path / "list.png"))

    # detail view of the worst labelled image: four panels, clicks and suggested clicks
    worst = next(r for r in report["per_image"] if not r["error"])
    page.click(f".card[data-id='{worst['image_id']}']")
    page.wait_for_selector(f"body[data-detail='{worst['image_id']}']")
    page.wait_for_function("Array.from(document.querySelectorAll('.panel img')).every(i => i.complete)")
    panels = page.eval_on_selector_all(
        ".panel", "ps => ps.map(p => [p.dataset.panel, p.offsetWidth > 0, p.querySelector('img').naturalWidth])")
    assert [p[0] for p in panels] == ["image", "label", "uncertainty", "gt"]
    assert all(visible and width == 48 for _, visible, width in panels), panels
    points = json.loads((run / "points.jsonl").read_text().splitlines()[worst["image_id"]])["points"]
    suggestions = [json.loads(line) for line in (run / "suggestions.jsonl").read_text().splitlines()]
    n_sugg = len(next(s["points"] for s in suggestions if s["image_id"] == worst["image_id"]))
    assert page.eval_on_selector_all(".marks circle", "cs => cs.length") == len(points) + n_sugg
    assert "Suggested next clicks" in page.inner_text("#dinfo")
    page.screenshot(path=str(tmp_path / "detail.png"), full_page=True)

    # a failed image's detail says why
    page.evaluate(f"location.hash = '#image={failed[0]['image_id']}'")
    page.wait_for_selector(f"body[data-detail='{failed[0]['image_id']}']")
    assert failed[0]["error"][:20] in page.inner_text("#dinfo")
    page.keyboard.press("Escape")
    page.wait_for_selector("body:not([data-detail])")
    assert page.is_visible("#grid")

    assert (tmp_path / "list.png").stat().st_size > 10_000 and (tmp_path / "detail.png").stat().st_size > 10_000
    assert not problems, problems
    assert urls and all(u.startswith("file://") for u in urls), [u for u in urls if not u.startswith("file://")]
    page.close()
