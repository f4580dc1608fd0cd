"""Soak: 20 different uploaded models opened in turn on a live server; the server's memory after each.

Starts `streamlit run dashboard.py` on a fresh data folder holding 20 uploads (different weights, 39 MB
of weights each), opens each one's Model page in Chromium (as a link, `?model=upload:<sha256>`), waits
for the page to finish and prints the server's resident memory. With the default bound
(CNN_AUDIT_MAX_LOADED_MODELS=4) memory should stop growing after the fourth model; printed, never
asserted. Needs Debian's chromium and playwright (as the browser tests).

    python -m bench.soak_models [--models 20] [--bound 4]
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb(pid: int) -> float:
    """Resident memory of the server and its children (streamlit runs in one process)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _uploads(folder: Path, count: int) -> list[str]:
    """Store `count` different models as uploads (in a child process: this one stays small)."""
    script = f"""
import keras
from audit import storage
import io, tempfile, pathlib
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
                          env={**os.environ, "CNN_AUDIT_DATA": str(folder)})
    return done.stdout.split()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--bound", type=int, default=4, help="CNN_AUDIT_MAX_LOADED_MODELS for the server")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    folder = Path(tempfile.mkdtemp(prefix="cnn_audit_soak_"))
    digests = _uploads(folder, args.models)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "CNN_AUDIT_DATA": str(folder), "CNN_AUDIT_MAX_LOADED_MODELS": str(args.bound)}
    log = open(folder / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard.py", "--server.headless", "true",
                               "--server.port", str(port), "--server.address", "127.0.0.1"],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"),
                                                 args=["--no-sandbox", "--disable-gpu"])
            print(f"{'model':>5} {'server MB':>10} {'change':>8}  (bound: {args.bound} models)")
            before = _rss_mb(server.pid)
            print(f"{'start':>5} {before:10.0f}")
            for number, digest in enumerate(digests, start=1):
                page = browser.new_page()
                page.set_default_timeout(180_000)
                page.goto(f"{url}/?model=upload:{digest}&image=chelsea")
                page.get_by_text("Layers", exact=True).first.wait_for()
                page.wait_for_timeout(500)
                page.wait_for_function("!document.querySelector('[data-testid=stStatusWidget]')")
                page.close()
                time.sleep(1.0)
                now = _rss_mb(server.pid)
                print(f"{number:5d} {now:10.0f} {now - before:+8.0f}")
                before = now
            browser.close()
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
