"""A compute copy of a model in bfloat16: the same graph and weights, its layers computing in bfloat16.

Keras's `mixed_bfloat16` policy keeps each variable in float32 and casts it to bfloat16 for the computation, the
standard way to train and run on bfloat16 hardware (GPUs of compute capability 8.0 and up, CPUs with AMX or
AVX-512 BF16, through oneDNN). The copy is built once per model and dropped with it (a weak cache); the loaded
model itself is never changed. Whatever reads the copy's outputs gets float32 (graph.graph_model casts), so
sums, means, maxima and softmax stay float32. Surgery, exports and fine-tuning keep using the float32 model.
"""

from __future__ import annotations

import time
import weakref

import keras
import numpy as np

from audit import copies, device, graph

_COPIES: "weakref.WeakKeyDictionary[keras.Model, keras.Model]" = weakref.WeakKeyDictionary()
POLICY = "mixed_bfloat16"


def bfloat16_copy(model: keras.Model) -> keras.Model:
    """The model with every layer under the mixed_bfloat16 policy (the input stays float32), same weights."""
    if model not in _COPIES:
        def clone(layer):
            # keras.ops arithmetic in a graph (MobileNetV3's hard sigmoid) is an Operation without a dtype policy:
            # it computes in whatever its inputs are
            if not isinstance(layer, keras.layers.Layer) or type(layer).__name__ == "InputLayer":
                return copies.fresh_layer(layer)
            return copies.fresh_layer(layer, {"dtype": keras.DTypePolicy(POLICY)})

        _COPIES[model] = copies.with_weights(model, clone)[0]
    return _COPIES[model]


def for_compute(model: keras.Model, precision: str | None = None) -> keras.Model:
    """The model heavy passes run on: its bfloat16 copy when the precision is bfloat16 (None: `decide`'s choice
    at the model's input size, 224 where it has none), else the model."""
    if precision is None:
        size = tuple(s or 224 for s in model.inputs[0].shape[1:3])
        precision = decide(model, size)[0]
    return bfloat16_copy(model) if precision == "bfloat16" else model


MIN_SPEEDUP = 1.2
"""bfloat16 is chosen for a model only where it measures at least this much faster than float32 here: AVX-512
BF16 CPUs speed VGG16 up 1.6-2x but run MobileNetV2's depthwise layers slower (bench/precision.py)."""
_SPEEDUPS: "weakref.WeakKeyDictionary[keras.Model, float]" = weakref.WeakKeyDictionary()


def measured_speedup(model: keras.Model, size: tuple[int, int]) -> float:
    """float32 time over bfloat16 time of one forward pass of 4 images (each warmed, the best of 3), measured
    once per model while it lives."""
    if model not in _SPEEDUPS:
        x = np.random.default_rng(0).uniform(-1, 1, (4, *size, model.inputs[0].shape[-1])).astype(np.float32)
        times = []
        for candidate in (model, bfloat16_copy(model)):
            if graph.has_grouped_convs(candidate):  # as the jobs run it: Keras compiles grouped convs with XLA
                candidate = graph.graph_model(candidate, [graph.Point(candidate.layers[-1].name)])
            candidate(x, training=False)  # traced and warm
            best = np.inf
            for _ in range(3):
                start = time.perf_counter()
                candidate(x, training=False)
                best = min(best, time.perf_counter() - start)
            times.append(best)
        _SPEEDUPS[model] = times[0] / max(times[1], 1e-9)
    return _SPEEDUPS[model]


def decide(model: keras.Model, size: tuple[int, int], asked: str | None = None) -> tuple[str, str]:
    """The precision heavy passes of this model run in, and why: what was asked ("float32", "bfloat16"), or for
    "auto" (the default, device.precision's setting) bfloat16 where the hardware computes it natively and this
    model measures at least MIN_SPEEDUP faster in it."""
    asked = asked or device.chosen_precision()
    if asked in ("float32", "bfloat16"):
        return asked, "as asked"
    native = device.native_bfloat16()
    if not native:
        return "float32", "no native bfloat16 here"
    try:
        speedup = measured_speedup(model, size)
    except Exception as exc:  # noqa: BLE001 (float32 is always right: a model the copy cannot take stays exact)
        return "float32", f"no bfloat16 copy of this model ({type(exc).__name__}: {str(exc)[:120]})"
    if speedup < MIN_SPEEDUP:
        return "float32", f"bfloat16 measured {speedup:.2f}x float32's speed for this model here"
    return "bfloat16", f"{native}, {speedup:.1f}x faster for this model here"
