"""Benchmark: how long a user waits for VGG16's Attribution page, in Chromium, on a fresh server.

The model is opened first on the Model page (its load is timed apart). Then the Attribution page with its five
default methods on chelsea: seconds to the first map on screen and to the whole page; then the same page on
another image (coffee) and for another target, where the traced graphs are reused. Give `--root` an older
checkout (git worktree) to time it the same way before a change.

    python -m bench.first_open [--root /tmp/old] [--model demo:vgg16]
"""

import argparse
import time
from pathlib import Path

from bench.server import ROOT, SCRIPT_DONE, serve

TIMEOUT = 600_000  # ms


def timed_open(page, url: str) -> tuple[float, float]:
    """(seconds to the first map, seconds to the settled page): a map is the second image of the main area."""
    start = time.perf_counter()
    page.goto(url)
    page.wait_for_function("document.querySelectorAll('[data-testid=stMain] [data-testid=stImage]').length >= 2",
                           timeout=TIMEOUT)
    first = time.perf_counter() - start
    page.wait_for_selector(SCRIPT_DONE, state="attached", timeout=TIMEOUT)
    return first, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--model", default="demo:vgg16")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with serve(root=args.root) as (base, _, _), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        page.set_default_timeout(TIMEOUT)
        start = time.perf_counter()
        page.goto(f"{base}/?model={args.model}&image=chelsea")
        page.get_by_text("Parameters per layer").wait_for()
        print(f"{args.root.name}: model page (load) {time.perf_counter() - start:.1f} s")
        views = {"first open, chelsea": f"{base}/attribution?model={args.model}&image=chelsea",
                 "another image, coffee": f"{base}/attribution?model={args.model}&image=coffee",
                 "another target": f"{base}/attribution?model={args.model}&image=coffee&filter=7"}
        for name, url in views.items():
            first, whole = timed_open(page, url)
            print(f"  attribution, {name:24s} first map {first:6.1f} s, whole page {whole:6.1f} s")
        browser.close()


if __name__ == "__main__":
    main()
