"""Loaded models kept for a whole server, bounded by count and by bytes of weights.

A shared server keeps each model once for every session (Streamlit's `st.cache_resource` holds this
registry), but uploads come and go: past the bounds the least recently used model is dropped, and
dropping it gives its memory back. Everything built from a model lives on its `LoadedModel` (heads,
dependency graph) or in weak maps keyed by the model (compiled passes), so once the registry lets go
nothing else holds it; a garbage collection then frees the Keras layers and traced TensorFlow
functions (they form reference cycles), and `malloc_trim` returns the freed heap to the system, which
glibc would otherwise keep. `keras.backend.clear_session()` is not called: it resets the Keras state
of every thread, including jobs running on the other models.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
import time
from collections import OrderedDict
from typing import Callable

import numpy as np

from audit import limits, models

log = logging.getLogger("cnn_audit")


def weight_bytes(model) -> int:
    """Bytes of a model's weights, from their shapes and dtypes (nothing is copied)."""
    return sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in model.weights)


class ModelCache:
    """Models by source string, loaded once; the least recently used go first past either bound.

    The newest model always stays, even alone over the byte bound (a file over the weight limit is
    refused when it loads). Two sessions asking for the same model at once load it once.
    """

    def __init__(self, max_models: int | None = None, max_bytes: int | None = None,
                 load: Callable[[str], models.LoadedModel] = models.load):
        self.max_models = limits.LOADED_MODELS.value if max_models is None else max_models
        self.max_bytes = limits.LOADED_MODEL_BYTES.value if max_bytes is None else max_bytes
        self._load = load
        self._models: OrderedDict[str, tuple[models.LoadedModel, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def __contains__(self, source: str) -> bool:
        with self._lock:
            return source in self._models

    def sources(self) -> list[str]:
        """Loaded sources, the least recently used first."""
        with self._lock:
            return list(self._models)

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._models.values())

    def get(self, source: str, on_load: Callable[[models.LoadedModel, float], None] | None = None
            ) -> models.LoadedModel:
        """The loaded model for `source`, loading it on first use (`on_load(model, seconds)` is told)."""
        with self._lock:
            if source in self._models:
                self._models.move_to_end(source)
                return self._models[source][0]
            loading = self._loading.setdefault(source, threading.Lock())
        with loading:  # one load per source; other sources load meanwhile
            with self._lock:
                if source in self._models:
                    self._models.move_to_end(source)
                    return self._models[source][0]
            start = time.perf_counter()
            try:
                loaded = self._load(source)
            finally:
                with self._lock:
                    self._loading.pop(source, None)
            if on_load is not None:
                on_load(loaded, time.perf_counter() - start)
            with self._lock:
                self._models[source] = (loaded, weight_bytes(loaded.model))
                dropped = self._over_bounds()
        if dropped:
            del dropped  # `loaded` is the newest and stays; the dropped ones have no other holder now
            release_memory()
        return loaded

    def _over_bounds(self) -> list[models.LoadedModel]:
        dropped = []
        while len(self._models) > 1 and (len(self._models) > self.max_models or
                                         sum(size for _, size in self._models.values()) > self.max_bytes):
            source, (loaded, size) = self._models.popitem(last=False)
            log.info("dropped model %s (%.0f MB of weights) to stay within the bounds", source, size / 2**20)
            dropped.append(loaded)
        return dropped


def release_memory() -> None:
    """Free what dropped models leave behind: collect their reference cycles, hand the heap back."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Hand the freed heap back to the system (glibc keeps it per thread arena otherwise: after a job of
    several GB the server stayed at its peak). A few milliseconds; a no-op elsewhere than glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl): the allocator decides
        pass
