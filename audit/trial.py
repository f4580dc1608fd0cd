"""A new model file's first load and first pass, in a child process the kernel may stop.

The screens of audit.model_files and audit.model_kinds read what a file declares, and audit.cost
bounds what its graph says one image costs; both must foresee the trick. This second line does not: the
file is loaded and run on one image in a child process whose address space (what it already uses, plus
three times the file's size, plus limits.TRIAL_BYTES) and CPU time (limits.TRIAL_CPU_SECONDS) are capped
by `setrlimit`. If the child raises, dies, is killed or runs over, the file is refused with what it
needed, and the server process never ran it. Verdicts are kept by the file's SHA-256 under the data
folder, so each file is tried once per server (and once for the command line, which shares the folder).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from audit import limits, storage
from audit.errors import ModelFileError, UnsafeModelError

IN_TRIAL = "CNN_AUDIT_IN_TRIAL"
"""Set in the child: its own load does not start another trial."""
_VERDICTS = "verdicts"


def in_trial() -> bool:
    return os.environ.get(IN_TRIAL) == "1"


def vet(path: Path, digest: str, shown: str) -> None:
    """Raise ModelFileError (or UnsafeModelError) unless the file loaded and ran one image in a capped child
    process; the verdict is remembered by content hash."""
    verdict = _remembered(digest)
    if verdict is None:
        verdict = _try(path, shown)
        _remember(digest, verdict)
    if not verdict["ok"]:
        error = UnsafeModelError if verdict.get("unsafe") else ModelFileError
        raise error(verdict["message"])


def _verdict_path(digest: str) -> Path:
    return storage.data_dir() / _VERDICTS / f"{digest}.json"


def _remembered(digest: str) -> dict | None:
    try:
        return json.loads(_verdict_path(digest).read_text())
    except (OSError, ValueError):
        return None


def _remember(digest: str, verdict: dict) -> None:
    path = _verdict_path(digest)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(verdict))
        os.replace(partial, path)
    except OSError:  # a full or read-only data folder: the verdict is found again next time
        pass


def _try(path: Path, shown: str) -> dict:
    """Run the child on the file and read its verdict (a JSON line on stdout), or say how it died."""
    budget = limits.TRIAL_BYTES.value + 3 * path.stat().st_size
    cpu = limits.TRIAL_CPU_SECONDS.value
    package_parent = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, IN_TRIAL: "1", "MALLOC_ARENA_MAX": "2", "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    try:
        child = subprocess.run([sys.executable, "-m", "audit.trial_child", str(path), shown, str(budget), str(cpu)],
                               capture_output=True, text=True, env=env, timeout=4 * cpu + 60)
    except subprocess.TimeoutExpired:
        return {"ok": False, "message": f"{shown}: its first load and pass took longer than {4 * cpu + 60} s; refused "
                                        f"({limits.TRIAL_CPU_SECONDS.variable} bounds it)."}
    seconds = time.perf_counter() - start
    lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
    if lines:
        verdict = json.loads(lines[-1])
        verdict["seconds"] = round(seconds, 2)
        return verdict
    if child.returncode in (-signal.SIGXCPU, -signal.SIGKILL) or "CPU time" in child.stderr:
        what = f"more than {cpu} s of CPU ({limits.TRIAL_CPU_SECONDS.variable})"
    elif child.returncode in (-signal.SIGSEGV, -signal.SIGABRT) or "bad_alloc" in child.stderr:
        what = (f"more than {gib(budget)} of memory beyond what a loaded model starts from "
                f"({limits.TRIAL_BYTES.variable})")
    else:
        what = f"a process that ended with code {child.returncode}"
    return {"ok": False, "message": f"{shown}: its first load and pass needed {what}; refused, and this server "
                                    "never ran it."}


def gib(amount: int) -> str:
    return f"{amount / 2**30:.1f} GB"
