"""Hostile server: the attacks of issue #39 replayed on a live server, each with what it cost the server.

Starts `streamlit run dashboard.py` on a fresh data folder holding hostile uploads (stored the way the
uploader stores them, by a child process), with a server budget of `--budget-gb`, and drives it in Chromium:

1. a 26 KB model (1024 x 1024 input, one 1x1 conv of 64 channels: 256 MB of activations per image) on its
   Model page with the 12 sample photos, then with 60 demo shapes: the server's peak memory over its start;
2. six heavy links opened at once (that model, ConvNeXtTiny and MobileNetV2 over 2,048 images, the Filters
   page's top-N) and, 10 s later, a 7th user opening demo:shapes: the 7th user's time to the layer table;
3. a 6 KB zip holding a progressive JPEG of 20,000 scans (a 7000 x 7000 image): time to the refusal and the
   CPU seconds the server spent;
4. 7 links to a model of 200 grouped convolutions, each with another batch size: memory after each;
5. a model of `--layers` tiny layers on the Attribution page: the estimate shown against the time taken;
6. links over 2,048 images (Model accuracy, Pruning scores, Filters top-N): buttons shown, and the CPU the
   server spent in the 10 s after the page settled (nothing should run without a click).

Printed, never asserted.

    python -m bench.hostile_server [--budget-gb 3] [--layers 2883] [--only 1 3 ...] [--link-seconds 0]

Probe 5 reads the estimate from the button a job waits on: run it with `--only 5 --link-seconds 0` to see it
for work a link would start by itself.
"""

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.load import Memory, errors_on, settled
from bench.server import ROOT, rss_mb, serve

TIMEOUT = 600_000  # ms
BUILD = """
import io, sys, tempfile, zipfile, pathlib
import keras, numpy as np
from PIL import Image
from audit import storage
layers = keras.layers

def upload(model, name):
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / (name + ".keras")
        model.save(path)
        data = path.read_bytes()
    print(name, storage.save_upload(data, "models", name + ".keras"), len(data))

keras.utils.set_random_seed(0)
inputs = keras.Input((1024, 1024, 3))
x = layers.GlobalAveragePooling2D()(layers.Conv2D(64, 1, activation="relu")(inputs))
upload(keras.Model(inputs, layers.Dense(10, activation="softmax")(x), name="wide"), "wide")

inputs = keras.Input((64, 64, 3))
x = layers.Conv2D(64, 1)(inputs)
for k in range(200):  # depthwise (one group per channel) and 8 groups of 8, alternately
    x = layers.Conv2D(64, 3, padding="same", groups=64 if k % 2 else 8, activation="relu")(x)
x = layers.GlobalAveragePooling2D()(x)
upload(keras.Model(inputs, layers.Dense(10, activation="softmax")(x), name="grouped"), "grouped")

inputs = keras.Input((32, 32, 3))
stem = layers.Conv2D(4, 1)(inputs)
branches = []  # parallel branches of 5 (conv, ReLU) pairs: a chain of 2,883 layers is past Keras's recursion limit
for k in range((int(sys.argv[1]) - 5) // 10):
    x = stem
    for _ in range(5):
        x = layers.ReLU()(layers.Conv2D(2, 1)(x))
    branches.append(x)
x = layers.GlobalAveragePooling2D()(layers.Concatenate()(branches))
model = keras.Model(inputs, layers.Dense(10, activation="softmax")(x), name="deep")
upload(model, "deep")
print("deep_layers", len(model.layers), 0)

buffer = io.BytesIO()
Image.new("RGB", (7000, 7000), (90, 120, 30)).save(buffer, "JPEG", progressive=True, quality=10)
jpeg = buffer.getvalue()
last_scan = jpeg.rindex(b"\\xff\\xda")
bomb = jpeg[:last_scan] + jpeg[last_scan:-2] * 20_000 + b"\\xff\\xd9"
archive = io.BytesIO()
with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zipped:
    zipped.writestr("cats/bomb.jpg", bomb)
print("bomb", storage.save_upload(archive.getvalue(), "images", "bomb.zip"), len(archive.getvalue()))
"""


def stored(folder: Path, layers: int) -> dict[str, tuple[str, int]]:
    """The hostile uploads, stored in `folder` as the uploader would: name -> (digest, bytes)."""
    done = subprocess.run([sys.executable, "-c", BUILD, str(layers)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "CNN_AUDIT_DATA": str(folder), "PYTHONPATH": str(ROOT),
                                           "TF_CPP_MIN_LOG_LEVEL": "3"})
    if done.returncode:
        sys.exit(f"building the hostile uploads failed:\n{done.stderr[-3000:]}")
    return {name: (digest, int(size)) for name, digest, size in (line.split() for line in done.stdout.splitlines())}


def cpu_seconds(pid: int) -> float:
    """CPU seconds of the server and its finished children (the trial loads run in a child)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class Probe:
    def __init__(self, base: str, server, memory: Memory, browser):
        self.base, self.server, self.memory, self.browser = base, server, memory, browser

    async def page(self):
        context = await self.browser.new_context(viewport={"width": 1400, "height": 1000})
        page = await context.new_page()
        page.set_default_timeout(TIMEOUT)
        return page

    async def open(self, path: str, ready: str = 'text="Layers"', page=None) -> tuple[float, object, object]:
        """Seconds until `ready` shows and the run is over, the first error on the page, and the page."""
        page = page or await self.page()
        start = time.perf_counter()
        await page.goto(self.base + path)
        await page.locator(ready).first.wait_for()
        await settled(page)
        return time.perf_counter() - start, await errors_on(page), page

    def peak_since(self, sample: int) -> float:
        return max(self.memory.samples[sample:] or [rss_mb(self.server.pid)])


async def wide_model(probe: Probe, uploads, start_mb: float) -> None:
    model = f"upload:{uploads['wide'][0]}"
    print(f"\n1. the {uploads['wide'][1] / 1024:.0f} KB model of a 1024 x 1024 input (256 MB of activations per image)")
    for images in ("image=chelsea", "images=shapes&count=60"):
        sample = len(probe.memory.samples)
        seconds, error, page = await probe.open(f"/?model={model}&{images}")
        print(f"   Model page, {images}: {seconds:.0f} s, peak {probe.peak_since(sample):.0f} MB "
              f"({probe.peak_since(sample) - start_mb:+.0f} over the server's start), errors: {error}")
        await page.context.close()


HEAVY = ("/?model={wide}&images=shapes&count=60", "/?model=keras:ConvNeXtTiny:untrained&images=shapes&count=2048",
         "/pruning?model=keras:MobileNetV2:untrained&images=shapes&count=2048",
         "/filters?model=keras:MobileNetV2:untrained&images=shapes&count=2048&pick=top",
         "/activations?model={wide}&image=coffee", "/attribution?model={wide}&image=astronaut&methods=Saliency")


async def six_and_a_seventh(probe: Probe, uploads) -> None:
    print("\n2. six heavy links at once, a 7th user 10 s later")
    sample = len(probe.memory.samples)
    wide = f"upload:{uploads['wide'][0]}"
    heavy = [asyncio.ensure_future(probe.open(path.format(wide=wide), ready="[data-testid=stSidebar]"))
             for path in HEAVY]
    await asyncio.sleep(10)
    seconds, error, page = await probe.open("/?model=demo:shapes&image=chelsea")
    print(f"   the 7th user's Model page of demo:shapes: {seconds:.1f} s, errors: {error}")
    for path, done in zip(HEAVY, await asyncio.gather(*heavy, return_exceptions=True)):
        if isinstance(done, Exception):
            print(f"   {path[:60]:<60} {type(done).__name__}")
            continue
        seconds, error, heavy_page = done
        print(f"   {path.format(wide='upload:wide')[:70]:<70} {seconds:5.0f} s, errors: {str(error)[:100]}")
        await heavy_page.context.close()
    await page.context.close()
    print(f"   peak {probe.peak_since(sample):.0f} MB")


async def scan_bomb(probe: Probe, uploads) -> None:
    digest, size = uploads["bomb"]
    print(f"\n3. a {size / 1024:.1f} KB zip of one progressive JPEG of 20,000 scans")
    cpu = cpu_seconds(probe.server.pid)
    seconds, error, page = await probe.open(f"/?images=upload&uploads={digest}",
                                            ready="[data-testid=stAlertContentError]")
    message = await page.locator("[data-testid=stAlertContentError]").first.inner_text()
    print(f"   refused in {seconds:.1f} s, {cpu_seconds(probe.server.pid) - cpu:.1f} s of server CPU: {message[:160]}")
    await page.context.close()


async def grouped(probe: Probe, uploads) -> None:
    model = f"upload:{uploads['grouped'][0]}"
    print("\n4. 7 links to 200 grouped convolutions, each another batch size")
    for count in range(1, 8):
        seconds, error, page = await probe.open(f"/?model={model}&images=shapes&count={count * 3}")
        await page.context.close()
        print(f"   count={count * 3:<3} {seconds:5.1f} s, server {rss_mb(probe.server.pid):.0f} MB, errors: {error}")


async def deep(probe: Probe, uploads) -> None:
    model = f"upload:{uploads['deep'][0]}"
    print(f"\n5. {uploads['deep_layers'][0]} tiny layers on the Attribution page")
    seconds, error, page = await probe.open(f"/?model={model}&image=chelsea")
    print(f"   Model page (first load, trial included): {seconds:.0f} s, errors: {error}")
    start = time.perf_counter()
    await page.goto(f"{probe.base}/attribution?model={model}&image=chelsea&methods=Saliency")
    await page.locator("[data-testid=stSidebar]").first.wait_for()
    await settled(page)
    button = page.get_by_role("button", name=re.compile(r"Compute Saliency"))
    if await button.count():
        said = (await button.first.inner_text()).replace("play_arrow", "").strip()
        start = time.perf_counter()
        await button.first.click()
    else:
        said = "nothing: within the link budget, it ran from the link"
    await page.locator("[data-testid=stMain] [data-testid=stImage]").nth(1).wait_for()
    await settled(page)
    print(f"   the page said: {said}; the map took {time.perf_counter() - start:.0f} s "
          f"{'after the press' if 'Compute' in said else 'from opening the page'}; errors: {await errors_on(page)}")
    await page.context.close()


QUIET = ("/?model=keras:ConvNeXtTiny:untrained&images=shapes&count=2040",  # not the counts probe 2 computed
         "/pruning?model=keras:MobileNetV2:untrained&images=shapes&count=2040",
         "/filters?model=keras:MobileNetV2:untrained&images=shapes&count=2040&pick=top")


async def quiet_links(probe: Probe, uploads) -> None:
    print("\n6. links over 2,040 images: buttons, not work")
    for path in QUIET:
        seconds, error, page = await probe.open(path, ready="[data-testid=stMain] h1")  # the model is loaded
        await page.wait_for_timeout(3000)
        await settled(page)
        seconds += 3
        buttons = await page.get_by_role("button", name=re.compile(r"here\)")).all_inner_texts()
        cpu = cpu_seconds(probe.server.pid)
        await asyncio.sleep(10)
        spent = cpu_seconds(probe.server.pid) - cpu
        buttons = [button.replace("play_arrow", "").strip() for button in buttons]
        print(f"   {path[:75]:<75} settled in {seconds:.0f} s; buttons: {buttons or 'none'}; then {spent:.1f} s of "
              f"CPU in 10 s; errors: {error}")
        await page.context.close()


PROBES = {1: wide_model, 2: six_and_a_seventh, 3: scan_bomb, 4: grouped, 5: deep, 6: quiet_links}


async def drive(base: str, server, uploads, only) -> None:
    from playwright.async_api import async_playwright

    memory = Memory(server.pid)
    memory.start()
    start_mb = rss_mb(server.pid)
    print(f"server at start: {start_mb:.0f} MB")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=shutil.which("chromium"),
                                                   args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        probe = Probe(base, server, memory, browser)
        for number, run in PROBES.items():
            if not only or number in only:
                await (run(probe, uploads, start_mb) if number == 1 else run(probe, uploads))
        await browser.close()
    memory.running = False
    print(f"\nserver peak {max(memory.samples):.0f} MB, at the end {rss_mb(server.pid):.0f} MB")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget-gb", type=float, default=3.0, help="CNN_AUDIT_MAX_SERVER_BYTES, in GiB")
    parser.add_argument("--layers", type=int, default=2883, help="layers of the deep model")
    parser.add_argument("--only", type=int, nargs="*", help="run only these probes (1-6)")
    parser.add_argument("--link-seconds", type=float, help="CNN_AUDIT_LINK_JOB_SECONDS for the server (0: every "
                                                           "job waits for its button and shows its estimate)")
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="cnn_audit_hostile_"))
    start = time.perf_counter()
    uploads = stored(data, args.layers)
    print(f"hostile uploads stored in {time.perf_counter() - start:.0f} s: "
          + ", ".join(f"{name} {size / 1024:.0f} KB" for name, (_, size) in uploads.items() if name != "deep_layers"))
    env = {"CNN_AUDIT_MAX_SERVER_BYTES": str(int(args.budget_gb * 2**30))}
    if args.link_seconds is not None:
        env["CNN_AUDIT_LINK_JOB_SECONDS"] = str(args.link_seconds)
    print(f"server budget: {args.budget_gb} GiB of activations")
    try:
        with serve(env, data) as (base, server, _):
            asyncio.run(drive(base, server, uploads, args.only))
    finally:
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
