"""Where the models run: the CPU or a GPU, with GPU memory growth on.

TensorFlow grabs all GPU memory on first use unless memory growth is set before the GPU is
initialised, which would leave nothing for a second model or a second process; so `configure()`
runs when the package is imported.
"""

from __future__ import annotations

import contextlib

import tensorflow as tf


def configure() -> None:
    """Turn on memory growth for every GPU (a no-op once TensorFlow has initialised them)."""
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised: the setting can no longer change
            pass


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
