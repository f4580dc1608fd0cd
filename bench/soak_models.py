"""Soak: models opened in turn on a live server for a while; the server's resident memory after each load.

Starts `streamlit run dashboard.py` on a fresh data folder and, in Chromium, opens model after model
from a cycle of sources (the three demos and eight keras.applications architectures, untrained, by
default; `--uploads N` adds N different uploaded files), each by a link to its Model page and then its
saliency map, so loading, tracing and gradients all run. Past CNN_AUDIT_MAX_LOADED_MODELS (`--bound`)
the server drops the least recently used model; its memory should stop growing once the bound is
reached. Prints the memory after each load and, at the end, after the first load against after 30 and
after the last. `--env NAME=VALUE` passes settings to the server (for example MALLOC_ARENA_MAX=2, to see
the allocator's part). Printed, never asserted.

    python -m bench.soak_models [--minutes 30] [--bound 4] [--uploads 0] [--env NAME=VALUE ...]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.server import ROOT, SCRIPT_DONE, rss_mb, serve

SOURCES = ("demo:shapes", "demo:shapes-gap", "demo:vgg16") + tuple(
    f"keras:{name}:untrained" for name in ("MobileNetV2", "ResNet50", "EfficientNetB0", "DenseNet121",
                                           "MobileNetV3Small", "Xception", "InceptionV3", "ConvNeXtTiny"))


def uploads(folder: Path, count: int) -> list[str]:
    """Store `count` different model files as uploads (in a child process: this one stays small)."""
    script = f"""
import keras
from audit import storage
import tempfile, pathlib
for seed in range({count}):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((64, 64, 3)), keras.layers.Conv2D(16, 3, activation="relu", name="conv"),
                              keras.layers.Flatten(), keras.layers.Dense(160, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")], name=f"soak_{{seed}}")
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "model.keras"
        model.save(path)
        print(storage.save_upload(path.read_bytes(), "models", f"soak_{{seed}}.keras"))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={**os.environ, "CNN_AUDIT_DATA": str(folder), "PYTHONPATH": str(ROOT)})
    return [f"upload:{digest}" for digest in done.stdout.split()]


def settle(page) -> None:
    quiet = 0
    while quiet < 2:
        quiet = quiet + 1 if page.locator(SCRIPT_DONE).count() else 0
        page.wait_for_timeout(250)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--bound", type=int, default=4, help="CNN_AUDIT_MAX_LOADED_MODELS for the server")
    parser.add_argument("--uploads", type=int, default=0, help="different uploaded files added to the cycle")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server's environment")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    data = Path(tempfile.mkdtemp(prefix="cnn_audit_soak_"))
    sources = list(SOURCES) + uploads(data, args.uploads)
    env = {"CNN_AUDIT_MAX_LOADED_MODELS": str(args.bound), **dict(setting.split("=", 1) for setting in args.env)}
    after = {}
    with serve(env, data) as (url, server, _), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"),
                                             args=["--no-sandbox", "--disable-gpu"])
        print(f"bound: {args.bound} models; {len(sources)} sources in turn; {args.env or 'default allocator'}")
        print(f"{'load':>5} {'seconds':>8} {'server MB':>10} {'change':>8}  source")
        before = after[0] = rss_mb(server.pid)
        print(f"{'start':>5} {'':>8} {before:10.0f}")
        deadline, number = time.time() + 60 * args.minutes, 0
        while time.time() < deadline:
            source = sources[number % len(sources)]
            number += 1
            start = time.perf_counter()
            page = browser.new_page()
            page.set_default_timeout(600_000)
            page.goto(f"{url}/?model={source}&image=chelsea")
            page.get_by_text("Layers", exact=True).first.wait_for()
            settle(page)
            page.goto(f"{url}/attribution?model={source}&image=chelsea&methods=Saliency")
            page.locator("[data-testid=stImage]").first.wait_for()
            settle(page)
            errors = page.locator("[data-testid=stException]").count()
            page.close()
            time.sleep(1.0)
            now = after[number] = rss_mb(server.pid)
            print(f"{number:5d} {time.perf_counter() - start:8.1f} {now:10.0f} {now - before:+8.0f}  {source}"
                  + (f"  ({errors} exceptions)" if errors else ""), flush=True)
            before = now
        browser.close()
    shutil.rmtree(data, ignore_errors=True)
    last = max(after)
    print(f"\nafter the first load {after[1]:.0f} MB; after load 30 {after.get(30, float('nan')):.0f} MB; "
          f"after load {last} (the last) {after[last]:.0f} MB; highest {max(after.values()):.0f} MB")


if __name__ == "__main__":
    main()
