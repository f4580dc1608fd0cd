"""Where the models run and in what precision: the CPU or a GPU (memory growth on), float32 or bfloat16.

TensorFlow grabs all GPU memory on first use unless memory growth is set before the GPU is
initialised, which would leave nothing for a second model or a second process; so `configure()`
runs when this module is imported (every module that runs a model imports it, before any operation).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import tensorflow as tf


def configure() -> None:
    """Turn on memory growth for every GPU (a no-op once TensorFlow has initialised them)."""
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised: the setting can no longer change
            pass


configure()


def available() -> list[str]:
    """Logical device names to offer, the default (a GPU when there is one) first."""
    gpus = [f"/GPU:{i}" for i, _ in enumerate(tf.config.list_logical_devices("GPU"))]
    return gpus + ["/CPU:0"]


def describe(name: str) -> str:
    """A label for a device name, e.g. 'GPU 0 (NVIDIA H100 80GB HBM3)'."""
    kind, index = name.strip("/").split(":")
    if kind == "GPU":
        physical = tf.config.list_physical_devices("GPU")
        details = tf.config.experimental.get_device_details(physical[int(index)]) if physical else {}
        return f"GPU {index} ({details.get('device_name', 'unknown')})"
    return "CPU"


def scope(name: str | None):
    """A context that places new computations on the named device (None: TensorFlow's choice)."""
    return tf.device(name) if name else contextlib.nullcontext()


# --- precision: bfloat16 where the hardware computes it natively ---------------------------------------

PRECISIONS = ("auto", "float32", "bfloat16")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""CPU flags of native bfloat16 matrix units (Intel AMX, AVX-512 BF16 on Intel and AMD Zen 4): oneDNN's kernels
use them for bfloat16 convolutions and matrix products."""
_CHOSEN = {"precision": os.environ.get("CNN_AUDIT_PRECISION", "auto")}


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags, from /proc/cpuinfo (or the given text)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bfloat16(cpuinfo: str | None = None) -> str:
    """Why this machine computes bfloat16 natively ("" when it does not): a GPU of compute capability 8.0 or
    more, or a CPU with bfloat16 matrix units."""
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0)
        if tuple(capability) >= (8, 0):
            return f"the GPU's bfloat16 tensor cores (compute capability {capability[0]}.{capability[1]})"
    found = [flag for flag in BF16_CPU_FLAGS if flag in cpu_flags(cpuinfo)]
    return f"this CPU's bfloat16 matrix units ({', '.join(found)})" if found else ""


def precision(cpuinfo: str | None = None) -> str:
    """The precision heavy passes run in: what `use_precision` (or CNN_AUDIT_PRECISION) set, and for "auto"
    bfloat16 where the hardware computes it natively, float32 elsewhere."""
    chosen = _CHOSEN["precision"]
    if chosen in ("float32", "bfloat16"):
        return chosen
    return "bfloat16" if native_bfloat16(cpuinfo) else "float32"


def chosen_precision() -> str:
    """What the process was told: "auto" (the default), "float32" or "bfloat16"."""
    return _CHOSEN["precision"]


def use_precision(choice: str) -> None:
    """Set the process's precision: "auto", "float32" or "bfloat16"."""
    from audit.errors import AuditError

    if choice not in PRECISIONS:
        raise AuditError(f"Precision {choice!r}: choose one of {', '.join(PRECISIONS)}.")
    _CHOSEN["precision"] = choice
