"""A run report opened in headless Chromium (Playwright): what a person would see, and anything the page tried to
fetch. Shared by the fast tests (a tiny run) and the slow one (hymenoptera)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SECTIONS = ["The run", "The data", "Learning curves", "Confusion matrix", "Per-class precision, recall and F1",
            "Most-confused pairs", "Top losses", "Calibration"]


def open_report(report: Path, shot: Path) -> dict:
    """Open ``report`` (a file:// URL) with JavaScript on, then off. Every request that is not the file itself or a
    ``data:`` URI is refused and recorded. Returns what each page showed."""
    from playwright.sync_api import sync_playwright

    url = Path(report).resolve().as_uri()
    out = {"requests": [], "errors": []}

    def route(r):
        if r.request.url.startswith(("file://", "data:")):
            r.continue_()
        else:
            out["requests"].append(r.request.url)
            r.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            for js in (True, False):
                context = browser.new_context(java_script_enabled=js, viewport={"width": 1100, "height": 900})
                context.route("**/*", route)
                page = context.new_page()
                page.on("console", lambda m: out["errors"].append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: out["errors"].append(str(e)))
                page.on("requestfailed", lambda r: out["errors"].append(f"failed: {r.url}"))
                page.goto(url, wait_until="load")
                key = "js" if js else "no_js"
                out[key] = {
                    "headings": [h.inner_text() for h in page.locator("h2").all() if h.is_visible()],
                    "text": page.locator("body").inner_text(),
                    "visible_sections": [s.get_attribute("id") for s in page.locator("section").all()
                                         if s.is_visible() and s.bounding_box()["height"] > 20],
                }
                if js:  # naturalWidth needs script; the pictures are the same either way
                    out["images"] = page.evaluate(
                        "() => [...document.images].map(i => ({alt: i.alt, complete: i.complete, "
                        "width: i.naturalWidth, src: i.src.slice(0, 30)}))")
                    page.screenshot(path=str(shot), full_page=True)
                context.close()
        finally:
            browser.close()
    grey = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    out["screenshot_std"] = float(grey.std())
    out["screenshot_size"] = grey.shape
    if os.environ.get("HEADSTART_SCREENSHOTS"):  # kept where a person can look at it
        Path(os.environ["HEADSTART_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["HEADSTART_SCREENSHOTS"]) / shot.name)
    return out


def assert_readable(seen: dict) -> None:
    """What every report must pass in the browser."""
    assert seen["requests"] == [], seen["requests"]
    assert seen["errors"] == [], seen["errors"]
    assert seen["images"], "the report shows no picture"
    broken = [i for i in seen["images"] if not (i["complete"] and i["width"] > 0)]
    assert broken == [], broken
    assert all(i["src"].startswith("data:image/") for i in seen["images"])
    for key in ("js", "no_js"):
        assert seen[key]["headings"][:len(SECTIONS)] == SECTIONS, (key, seen[key]["headings"])
        assert len(seen[key]["visible_sections"]) == len(SECTIONS), seen[key]["visible_sections"]
    assert seen["js"]["text"] == seen["no_js"]["text"]  # nothing on the page depends on script
    assert seen["screenshot_std"] > 20, seen["screenshot_std"]  # not a blank (or one-colour) page
