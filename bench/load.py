"""Load: a server shared by a team, driven by Chromium sessions while one user runs a long job.

Starts `streamlit run dashboard.py` on a fresh data folder and opens the three demo models once. Then
`--sessions` Playwright contexts (one Chromium) cycle through cheap views (the Model page, a layer's
maps, a saliency map) of the three models, first on an idle server, then while two users press the
same statistics over `--images` demo images of VGG16 within a fraction of a second. Prints p50 / p95
seconds to each cheap view idle and during the job, the job's time for both users and its estimate,
duplicate computations (results computed more than once, from the server log), the server's peak and
final resident memory, and errors (exception boxes, bug messages, timeouts). Printed, never asserted.

    python -m bench.load [--sessions 6] [--rounds 3] [--images 600]
"""

import argparse
import asyncio
import collections
import re
import shutil
import threading
import time

import numpy as np

from bench.server import SCRIPT_DONE, rss_mb, serve

MODELS = ("demo:shapes", "demo:shapes-gap", "demo:vgg16")
VIEWS = {  # a cheap view: its path and what shows when it is ready
    "model page": ("/?model={model}&image=chelsea", "text=\"Layers\""),
    "layer maps": ("/activations?model={model}&image=coffee", "[data-testid=stImage]"),
    "saliency": ("/attribution?model={model}&image=astronaut&methods=Saliency", "[data-testid=stImage]"),
}
STATS_DONE = 'text="Dead filters per layer"'
TIMEOUT = 240_000  # ms


class Memory(threading.Thread):
    """The server's resident memory, sampled every half second."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.samples, self.running = pid, [], True

    def run(self):
        while self.running:
            self.samples.append(rss_mb(self.pid))
            time.sleep(0.5)


async def settled(page) -> None:
    """Wait until the script run is over: the app root not running twice in a row, 250 ms apart."""
    quiet = 0
    while quiet < 2:
        quiet = quiet + 1 if await page.locator(SCRIPT_DONE).count() else 0
        await page.wait_for_timeout(250)


async def errors_on(page) -> int | str:
    """0, or the first error's text: an exception box or the app's bug message."""
    for selector in ("[data-testid=stException]", "[data-testid=stAlertContentError]"):
        boxes = page.locator(selector)
        if await boxes.count():
            return (await boxes.first.inner_text())[:300]
    return 0


async def view(page, url: str, ready: str) -> tuple[float, int]:
    start = time.perf_counter()
    await page.goto(url)
    await page.locator(ready).first.wait_for(timeout=TIMEOUT)
    await settled(page)
    return time.perf_counter() - start, await errors_on(page)


async def cheap_views(context, base: str, model: str, rounds: int, times: dict, errors: list) -> None:
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT)
    for _ in range(rounds):
        for name, (path, ready) in VIEWS.items():
            try:
                seconds, found = await view(page, base + path.format(model=model), ready)
                times[name].append(seconds)
                errors.append(found)
            except Exception as exc:  # noqa: BLE001 (a timeout is a result here)
                errors.append(f"{name} on {model}: {type(exc).__name__}")
    await page.close()


async def statistics(context, base: str, images: int, delay: float) -> tuple[float, str]:
    """One user opening the statistics of VGG16 over the demo images and pressing Compute; seconds to the
    table, and the estimate the page showed before the press."""
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT)
    await page.goto(f"{base}/activations?model=demo:vgg16&images=shapes&count={images}&stats=1")
    button = page.get_by_role("button", name="Compute statistics")
    await button.wait_for()
    await settled(page)
    estimate = await page.get_by_text("Estimated cost here").first.text_content()
    await asyncio.sleep(delay)
    start = time.perf_counter()
    await button.click()
    await page.locator(STATS_DONE).first.wait_for(timeout=TIMEOUT)
    seconds = time.perf_counter() - start
    await page.close()
    return seconds, estimate.strip()


def percentiles(values) -> str:
    if not values:
        return "-"
    return f"p50 {np.percentile(values, 50):5.1f} s  p95 {np.percentile(values, 95):5.1f} s  (n={len(values)})"


async def drive(base: str, args, memory: Memory) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=shutil.which("chromium"),
                                                   args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        contexts = [await browser.new_context(viewport={"width": 1400, "height": 1000}) for _ in range(args.sessions)]
        opened = await contexts[0].new_page()
        opened.set_default_timeout(TIMEOUT)
        for model in MODELS:
            seconds, _ = await view(opened, f"{base}/?model={model}&image=chelsea", VIEWS["model page"][1])
            print(f"first open of {model}: {seconds:.1f} s (loads it for the server)")
        await opened.close()
        print(f"server after loading the models: {rss_mb(memory.pid):.0f} MB")

        for phase in ("idle", "during the job"):
            times, errors = collections.defaultdict(list), []
            sessions = [cheap_views(context, base, MODELS[i % len(MODELS)], args.rounds, times, errors)
                        for i, context in enumerate(contexts)]
            jobs = []
            if phase != "idle":
                jobs = [asyncio.ensure_future(statistics(contexts[0], base, args.images, 0.0)),
                        asyncio.ensure_future(statistics(contexts[1], base, args.images, 0.15))]
                await asyncio.sleep(20)  # the job is under way before the cheap views start
            start = time.perf_counter()
            await asyncio.gather(*sessions)
            took = time.perf_counter() - start
            print(f"\n{phase}: {args.sessions} sessions x {args.rounds} rounds of {len(VIEWS)} views in {took:.0f} s")
            for name in VIEWS:
                print(f"  {name:<11} {percentiles(times[name])}")
            print(f"  all views   {percentiles([t for values in times.values() for t in values])}")
            failures = [error for error in errors if error]
            print(f"  errors: {len(failures)} {failures[:5] if failures else ''}")
            for user, job in enumerate(jobs, start=1):
                seconds, estimate = await job
                print(f"  statistics of {args.images} images on VGG16, user {user}: {seconds:.1f} s; the page said: "
                      f"{estimate}")
        await browser.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server's environment")
    args = parser.parse_args()
    with serve(dict(setting.split("=", 1) for setting in args.env)) as (base, server, log_path):
        memory = Memory(server.pid)
        memory.start()
        asyncio.run(drive(base, args, memory))
        time.sleep(5)
        memory.running = False
        text = log_path.read_text()
        computed = collections.Counter(re.findall(r"result (\w+): computed in", text))
        started = collections.Counter(re.findall(r"result (\w+): computing", text))
        waited = len(re.findall(r"result \w+: waiting", text))
        print(f"\nresults computed: {len(computed)}; computed to the end more than once: "
              f"{sum(count - 1 for count in computed.values())}; started again after a cancelled or abandoned pass: "
              f"{sum(started.values()) - sum(computed.values())}; requests that waited for another session: {waited}")
        print(f"server memory: peak {max(memory.samples):.0f} MB, final {rss_mb(server.pid):.0f} MB")


if __name__ == "__main__":
    main()
