"""A dashboard server for the benchmarks that drive it in Chromium: started on a fresh data folder and a free
port, waited for, stopped and cleaned up; and its resident memory."""

import contextlib
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
# Streamlit marks its app root with the script's run state at once (its running indicator shows only after 500 ms).
SCRIPT_DONE = "[data-testid=stApp][data-test-script-state=notRunning]"


def rss_mb(pid: int) -> float:
    """Resident memory of a process (streamlit serves every session from one)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def serve(env: dict[str, str] | None = None, data: Path | None = None, root: Path = ROOT):
    """`streamlit run dashboard.py` of the checkout at `root` (this one by default) with `env` added to this
    environment, its data in `data` (a fresh folder by default, removed after); yields (base URL, the server
    process, its log file) once it answers."""
    folder = Path(tempfile.mkdtemp(prefix="cnn_audit_bench_"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = folder / "server.log"
    environment = {**os.environ, "CNN_AUDIT_DATA": str(data or folder / "data"), "PYTHONUNBUFFERED": "1",
                   **(env or {})}
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard.py", "--server.headless",
                                   "true", "--server.port", str(port), "--server.address", "127.0.0.1",
                                   "--browser.gatherUsageStats", "false"],
                                  cwd=root, env=environment, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{base}/_stcore/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield base, server, log_path
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(folder, ignore_errors=True)
