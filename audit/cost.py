"""What one image costs a model, from its graph's symbolic shapes: activation bytes (all and at the peak),
multiply-adds and layers; and the batch that fits the server's activation budget.

Nothing is allocated or computed: Keras infers every output shape from the input's, so a file can be judged
before its first pass (audit.models.load refuses over the limits) and every job can cut its batch to fit.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import keras
import numpy as np

from audit import limits
from audit.graph import Call, as_list, flat_calls, is_depthwise


def _values(tensor) -> int:
    return int(np.prod([d or 1 for d in tensor.shape[1:]], dtype=np.int64))


def call_macs(call: Call, kept_in: float = 1.0, kept_out: float = 1.0) -> float:
    """Multiply-adds of one call for one image: convolutions and dense layers (the rest is element-wise).
    `kept_in` and `kept_out`: the shares of its input and output channels that stay (a pruned model's cost)."""
    layer, kind = call.layer, call.kind
    if not call.inputs or not hasattr(layer, "kernel_size") and kind != "Dense":
        return 0
    out, source = as_list(call.output)[0], call.inputs[0]
    channels_in, channels_out = int(source.shape[-1] or 1), int(out.shape[-1] or 1)
    positions_out = _values(out) // channels_out
    kernel = int(np.prod(getattr(layer, "kernel_size", (1,))))
    if kind == "Dense":
        return _values(source) * channels_out * kept_in * kept_out
    if is_depthwise(layer):
        return positions_out * channels_out * kernel * kept_out
    if kind.startswith("Separable"):
        middle = channels_in * int(getattr(layer, "depth_multiplier", 1))
        return (positions_out * middle * kernel * kept_in
                + positions_out * middle * channels_out * kept_in * kept_out)
    if kind.endswith("Transpose"):
        return (_values(source) // channels_in) * channels_in * kernel * channels_out * kept_in * kept_out
    return (positions_out * channels_out * kernel * channels_in // int(getattr(layer, "groups", 1) or 1)
            * kept_in * kept_out)


@dataclass(frozen=True)
class Cost:
    """What one image costs a model at one input size, read from the graph's symbolic shapes."""

    activation_bytes: int  # every layer's output, float32: what a pass that keeps all maps holds
    peak_bytes: int  # the most held at once when each output is freed after its last reader
    macs: int  # multiply-adds of the convolutions and dense layers
    layers: int  # leaf layer calls


_COSTS: "weakref.WeakKeyDictionary[keras.Model, dict]" = weakref.WeakKeyDictionary()


def cost(model: keras.Model, size: tuple[int, int] | None = None) -> Cost:
    """The cost of one image of `size` (height, width; the model's own input size when it has one), from the
    shapes Keras infers symbolically: nothing is allocated or computed, so a file can be judged before its
    first pass. Kept per model and size while the model lives."""
    known = _COSTS.setdefault(model, {})
    if size not in known:
        known[size] = _cost(model, size)
    return known[size]


def batch_within(model: keras.Model, batch_size: int, passes: int = 1, kept_per_image: int = 0) -> int:
    """The largest batch up to `batch_size` whose activations fit limits.BATCH_BYTES: one image's peak (times
    `passes`: 3 for a forward and a backward pass) plus what the job keeps per image (maps it returns)."""
    per_image = passes * cost(model).peak_bytes + int(kept_per_image)
    return int(max(1, min(batch_size, limits.BATCH_BYTES.value // max(per_image, 1))))


def batch_bytes(model: keras.Model, batch_size: int, passes: int = 1) -> int:
    """What a batch of `batch_size` images holds at its peak, its input included: the bytes it reserves from
    the server's budget (audit.admission)."""
    per_image = passes * cost(model).peak_bytes + input_bytes(model)
    return int(batch_size) * per_image


def job_bytes(model: keras.Model) -> int:
    """What a job on this model holds at most at once: its batches are cut to limits.BATCH_BYTES, and a job runs
    forward and backward passes (3) on batches of up to 64 images."""
    return int(min(limits.BATCH_BYTES.value, batch_bytes(model, 64, passes=3)))


def inputs_within(model: keras.Model, budget: int, most: int | None = None) -> int:
    """How many preprocessed images (float32, the model's input size) fit `budget` bytes: at least 1, at most
    `most`."""
    fitting = int(budget) // input_bytes(model)
    return max(1, fitting if most is None else min(most, fitting))


def input_bytes(model: keras.Model) -> int:
    """Bytes of one preprocessed image at the model's input size (float32)."""
    shape = model.inputs[0].shape
    return 4 * int(np.prod([d or 224 for d in shape[1:]], dtype=np.int64))


def _cost(model: keras.Model, size: tuple[int, int] | None) -> Cost:
    shape = tuple(model.inputs[0].shape)
    height = shape[1] or (size or (224, 224))[0]
    width = shape[2] or (size or (224, 224))[1]
    calls, _, outputs = flat_calls(model, (1, height, width, *shape[3:]))
    last_use: dict[int, int] = {}
    for index, call in enumerate(calls):
        for tensor in call.inputs:
            last_use[id(tensor)] = index
    for tensor in outputs:
        last_use[id(tensor)] = len(calls)
    freed = np.zeros(len(calls) + 2, np.int64)
    held = peak = total = 0
    for index, call in enumerate(calls):
        made = sum(4 * _values(tensor) for tensor in as_list(call.output))
        total += made
        held += made
        peak = max(peak, held)
        for tensor in as_list(call.output):
            freed[last_use.get(id(tensor), index) + 1] += 4 * _values(tensor)
        held -= freed[index + 1]
    return Cost(int(total), int(peak), int(sum(call_macs(call) for call in calls)), len(calls))
