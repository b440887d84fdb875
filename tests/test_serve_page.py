"""The page at `/` of `headstart serve`, in headless Chromium: add images from the keyboard, see each one's
label and bars, with no console error and no request leaving the server."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import HYMENOPTERA, make_image, needs_shared
from serve_process import Server, tiny_run

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Chromium at /usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
WAIT = 90_000  # ms; bounds for a shared, busy machine, not expectations of speed


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tiny_run(tmp_path_factory.mktemp("page")), tmp_path_factory.mktemp("page-server"))
    yield s
    assert s.stop() == 0, s.stderr()


def _use_page(server, images: list[Path], shot: Path) -> list[dict]:
    """Open the page, add ``images`` through the keyboard-reachable picker, and return each result card's text,
    with the console errors and the requests the page made."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 900})
            page.set_default_timeout(WAIT)
            errors, requests = [], []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            # listening before the page loads turns on the chooser's interception up front; enabling it only
            # around the key press races with Chromium opening its own (invisible, headless) dialog
            chosen = []
            page.on("filechooser", lambda c: (chosen.append(c), c.set_files([str(i) for i in images])))
            page.goto(server.url + "/")
            expect(page.locator("#model-info")).to_contain_text("validation accuracy", timeout=WAIT)
            for _ in range(10):  # the picker is reachable from the keyboard
                page.keyboard.press("Tab")
                if page.evaluate("document.activeElement.id") == "choose":
                    break
            assert page.evaluate("document.activeElement.id") == "choose"
            page.keyboard.press("Enter")
            expect(page.locator("#results .card")).not_to_have_count(0, timeout=WAIT)
            assert chosen, "Enter on the picker opened no file chooser"
            cards = page.locator("#results .card")
            expect(cards).to_have_count(len(images), timeout=WAIT)
            for i in range(len(images)):
                expect(cards.nth(i).locator(".time")).to_contain_text("ms", timeout=WAIT)
            page.screenshot(path=str(shot), full_page=True)
            out = []
            for i in range(len(images)):
                card = cards.nth(i)
                out.append({"name": card.locator(".name").inner_text(), "label": card.locator(".label").inner_text(),
                            "bars": card.locator(".bar").all_inner_texts(),
                            "widths": [b.evaluate("e => e.getBoundingClientRect().width")
                                       for b in card.locator(".bar .fill").all()],
                            "error": card.locator(".error").inner_text()})
            return out, errors, requests
        finally:
            browser.close()


def _keep(shot: Path) -> None:
    """Keep the screenshot where a person can look at it (HEADSTART_SCREENSHOTS), beside the test's own copy."""
    if os.environ.get("HEADSTART_SCREENSHOTS"):
        Path(os.environ["HEADSTART_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["HEADSTART_SCREENSHOTS"]) / shot.name)


def test_the_page_classifies_images_added_from_the_keyboard(server, tmp_path):
    images = [make_image(tmp_path / "sky.jpg", (40, 60, 200), size=(320, 240), seed=1),
              make_image(tmp_path / "brick.png", (200, 50, 40), size=(120, 90), seed=2)]
    (tmp_path / "notes.png").write_bytes(b"not an image at all")
    cards, errors, requests = _use_page(server, images + [tmp_path / "notes.png"], tmp_path / "page.png")
    _keep(tmp_path / "page.png")
    by_name = {c["name"]: c for c in cards}
    assert by_name["sky.jpg"]["label"].startswith("blue (") and by_name["brick.png"]["label"].startswith("red (")
    for name in ("sky.jpg", "brick.png"):
        assert len(by_name[name]["bars"]) == 3 and by_name[name]["widths"][0] > by_name[name]["widths"][-1] >= 0
        assert by_name[name]["bars"][0].split()[0] == by_name[name]["label"].split()[0]
    bad = by_name["notes.png"]
    assert bad["label"] == "not classified" and "not a readable image" in bad["error"] and not bad["bars"]
    # the page's own console: the 422 for the bad file is the only error, and it is the browser's network line
    assert [e for e in errors if "422" not in e] == []
    assert requests and all(u.startswith(server.url + "/") or u.startswith(("blob:", "data:")) for u in requests)


@pytest.mark.slow
@needs_shared(HYMENOPTERA)
def test_the_page_classifies_a_real_photo(server, tmp_path):
    photo = sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[0]
    (card,), errors, requests = _use_page(server, [photo], tmp_path / "photo.png")
    _keep(tmp_path / "photo.png")
    assert card["name"] == photo.name and card["label"].split()[0] in {"blue", "red", "green"} and not card["error"]
    assert len(card["bars"]) == 3 and card["widths"][0] > 0
    assert errors == []
    assert all(u.startswith(server.url + "/") or u.startswith(("blob:", "data:")) for u in requests)
