"""Compiled work kept per model: traced graphs built once and reused across images, classes and sessions.

Tracing a Keras graph into a `tf.function` costs seconds on a deep network, far more than one pass, so a new
image, class or filter must not pay it again. Each model keeps its last `LIMIT` compiled pieces (least
recently used first out), weakly keyed: a model dropped from the registry takes its graphs with it. A built
piece must not hold the model object itself (only its layers or a graph built from them), or the weak key
would never die.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from typing import Callable, TypeVar

import keras

LIMIT = 16
"""Compiled pieces kept per model: a page's methods, layers and targets fit; a long session does not grow."""

Built = TypeVar("Built")

_KEPT: "weakref.WeakKeyDictionary[keras.Model, OrderedDict]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


class OneTracePerModel(logging.Filter):
    """Drops TensorFlow's "N out of the last N calls to <function ...> triggered tf.function retracing": its
    detector counts traces per place in the code, not per function object, so one traced function per model (this
    module's design: each model's pass traced once) reads to it as a function re-created in a loop once a server
    has seen five models. A real retrace per call (a changing shape) would show in the benches' timings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


def quiet_retracing_notice() -> None:
    """Install OneTracePerModel on TensorFlow's logger, once."""
    logger = logging.getLogger("tensorflow")
    if not any(isinstance(found, OneTracePerModel) for found in logger.filters):
        logger.addFilter(OneTracePerModel())


quiet_retracing_notice()


def kept(model: keras.Model, key: tuple, build: Callable[[], Built]) -> Built:
    """The piece built for (`model`, `key`), built now (once, under a lock) if it is not kept."""
    with _LOCK:
        per_model = _KEPT.setdefault(model, OrderedDict())
        if key in per_model:
            per_model.move_to_end(key)
            return per_model[key]
        piece = per_model[key] = build()
        while len(per_model) > LIMIT:
            per_model.popitem(last=False)
        return piece


def keys(model: keras.Model) -> list[tuple]:
    """The keys kept for a model, oldest first (what tests and the memory view read)."""
    with _LOCK:
        return list(_KEPT.get(model, ()))


def models_kept() -> int:
    """How many models have compiled pieces kept: zero once every model is dropped."""
    with _LOCK:
        return len(_KEPT)
