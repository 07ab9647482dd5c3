"""The playground page at / of the HTTP port, driven in headless Chromium (Debian's package,
through Playwright): a real MNIST test digit and a drawn stroke classified at several
tolerances, a CNF sampled over its density, nothing fetched from another host, a screenshot."""

from __future__ import annotations

import os
import shutil

import pytest
from live_server import DENSITIES
from test_rest import request

TOLERANCES = "1e-1, 1e-2, 1e-3, 1e-4"


def chromium() -> str:
    """Debian's Chromium; CI installs it and sets ODESERVE_REQUIRE_BROWSER, which turns its
    absence into a failure instead of a skip."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("ODESERVE_REQUIRE_BROWSER"):
        pytest.fail("no Chromium (apt-get install chromium)")
    pytest.skip("no Chromium here (apt-get install chromium)")


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    executable = chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 1300})
        page.requested = []  # type: ignore[attr-defined]
        page.errors = []  # type: ignore[attr-defined]
        page.on("request", lambda r: page.requested.append(r.url))  # type: ignore[attr-defined]
        page.on("pageerror", lambda e: page.errors.append(str(e)))  # type: ignore[attr-defined]
        page.goto(server.http_url + "/")
        page.evaluate("playground.ready")
        yield page
        browser.close()


def _rows(page) -> list[dict[str, str]]:
    page.wait_for_function(
        "n => document.querySelectorAll('#classify-results tbody tr').length === n", arg=len(TOLERANCES.split(","))
    )
    return page.eval_on_selector_all("#classify-results tbody tr", "rows => rows.map(r => ({...r.dataset}))")


def test_the_page_is_served_from_the_package_and_loads_nothing_from_elsewhere(server):
    status, headers, body = request(server.http_url, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert headers["Content-Security-Policy"] == "default-src 'self'" and b"playground.js" in body
    assert request(server.http_url, "GET", "/playground/playground.js")[0] == 200
    assert request(server.http_url, "GET", "/playground/../rest.py")[0] == 404


def test_a_real_test_digit_is_classified_at_every_tolerance_and_looser_costs_less(page, server, mnist_test_digits):
    images, labels = mnist_test_digits
    assert page.eval_on_selector("#classifier", "s => s.value") == "odenet-mnist"
    page.fill("#tolerances", TOLERANCES)
    page.evaluate("pixels => playground.drawDigit(pixels)", images[0].ravel().tolist())
    page.click("#run-classify")
    rows = {float(row["tol"]): row for row in _rows(page)}
    assert {int(row["label"]) for row in rows.values()} == {int(labels[0])}
    assert int(rows[1e-1]["nfe"]) < int(rows[1e-4]["nfe"])
    assert page.text_content("#status") == "classified with odenet-mnist"


def test_a_stroke_drawn_with_the_mouse_is_a_one(page, tmp_path):
    page.click("#clear")
    box = page.locator("#pad").bounding_box()
    x = box["x"] + box["width"] / 2
    page.mouse.move(x, box["y"] + 40)
    page.mouse.down()
    for step in range(1, 21):
        page.mouse.move(x + step * 0.5, box["y"] + 40 + step * 10)
    page.mouse.up()
    page.click("#run-classify")
    assert {row["label"] for row in _rows(page)} == {"1"}
    page.screenshot(path=tmp_path / "playground-classify.png", full_page=True)
    assert (tmp_path / "playground-classify.png").stat().st_size > 10_000


def test_a_density_is_sampled_over_its_heat_map(page, server, tmp_path):
    page.select_option("#density-model", DENSITIES[0])
    page.fill("#density-tol", "1e-2")
    page.fill("#density-n", "200")
    page.click("#run-density")
    page.wait_for_selector("#plane[data-samples='200']")
    assert page.text_content("#density-summary").startswith("200 samples at tol 0.01: mean NFE")
    brightest = page.evaluate(
        "() => { const c = document.getElementById('plane'); "
        "return Math.max(...c.getContext('2d').getImageData(0, 0, c.width, c.height).data.filter((_, i) => i % 4 === 2)); }"
    )
    assert brightest > 200  # the density's peak, drawn
    page.screenshot(path=tmp_path / "playground.png", full_page=True)
    assert not page.errors, page.errors
    assert page.requested and all(url.startswith(server.http_url) for url in page.requested), page.requested
