"""Fake quantisation: the float model with int8 rounding put where the integer model rounds, and per-layer
sensitivity (one layer quantised at a time, or all but one) measured against float on held-out images.

The simulated model is the model's own graph re-run (audit.graph) with each quantised layer replaced by a
copy whose kernel went through quantise-dequantise (per output channel, symmetric), and each quantised
layer's activation point (its fused conv-BN-activation output) followed by a per-tensor asymmetric
quantise-dequantise over its calibrated range (a softmax, sigmoid or tanh over the fixed range TensorFlow Lite's
kernels use). The loaded model is never changed (it is shared by every session). Sensitivity runs the same
rounding in one traced graph with a switch per layer (`switched`) instead of a copy per layer.
"""

from __future__ import annotations

from typing import Callable

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from audit import batches, graph, heads, intervals, models
from audit.pruning.quality import QualitySums
from audit.quantization import switched
from audit.quantization.arithmetic import parameters
from audit.quantization.ranges import activation_points, activation_ranges, quantized_layers


FIXED_OUTPUT_RANGES = {"softmax": (0.0, 255 / 256), "sigmoid": (0.0, 255 / 256), "tanh": (-1.0, 127 / 128)}
"""TensorFlow Lite's int8 kernels give these activations fixed output scales (1/256, 1/256 and 1/128, zero
points -128, -128 and 0), whatever the calibration saw."""


def fixed_range(model: keras.Model, point: str) -> tuple[float, float] | None:
    return FIXED_OUTPUT_RANGES.get(graph.activation_name(graph.get_layer(model, point)))


def rounding_range(model: keras.Model, point: str, activation_range: dict[str, tuple[float, float]]):
    """The range an activation point is rounded over: fixed for a softmax, sigmoid or tanh, else calibrated."""
    return fixed_range(model, point) or activation_range[point]


class FakeQuantize(keras.layers.Layer):
    """Per-tensor asymmetric int8 quantise-dequantise with a fixed (calibrated) range."""

    def __init__(self, low: float, high: float, **kwargs):
        super().__init__(**kwargs)
        scale, zero_point, _, _ = parameters(np.zeros(1), 8, None, False, (low, high))
        self.scale, self.zero_point = float(scale), float(zero_point)

    def call(self, x):
        return switched.fake_quantize(x, tf.constant(self.scale, x.dtype), tf.constant(self.zero_point, x.dtype))


def fake_quantized(model: keras.Model, activation_range: dict[str, tuple[float, float]],
                   layers: list[str]) -> keras.Model:
    """The model with `layers` quantised: their kernels rounded, their activation points (keys of
    `activation_range`, whose ranges are per tensor) rounded after. Other layers stay float."""
    chosen = {models.resolve_layer(model, name) for name in layers}
    points = activation_points(model, sorted(chosen))
    rounding = {point: rounding_range(model, point, activation_range) for point in points.values()}
    by_layer = {id(graph.get_layer(model, path)): path for path in chosen | set(rounding)}

    def replace(layer):
        path = by_layer.get(id(layer))
        if path is None:  # a grouped conv is computed without XLA (audit.graph), as the other passes do
            return graph.grouped_conv_without_xla(layer)
        computed = switched.int8_twin(layer) if path in chosen else graph.grouped_conv_without_xla(layer) or layer
        if path not in rounding:
            return computed
        rounded = FakeQuantize(*rounding[path])
        return lambda *args, **kwargs: rounded(computed(*args, **kwargs))

    new_input = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)
    output = graph.trace(model, new_input, {}, "", {}, replace)
    return keras.Model(new_input, output, name=graph.scope_name(f"{model.name}_int8_simulated"))


def per_tensor_ranges(frame: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """Activation point to its (min, max) over all channels, from `ranges.activation_ranges`."""
    activations = frame[frame.kind == "activations"].groupby("measured_at")
    return {point: (float(part["min"].min()), float(part["max"].max())) for point, part in activations}


def sensitivity(model: keras.Model, images: np.ndarray, labels: np.ndarray | None = None,
                calibration: np.ndarray | None = None, layers: list[str] | None = None,
                all_but_one: bool = False, progress: Callable[[int, int], None] | None = None,
                output: int | None = None) -> pd.DataFrame:
    """Per layer: top-1 agreement with float, KL of the simulated from the float distribution, and accuracy
    (with labels), with Wilson intervals, when that layer alone is int8 (or, `all_but_one`, every layer but it;
    then the row `(all)` has every layer int8). Ranges are calibrated on `calibration` (else on `images`: then
    the figures are not held out, `.attrs["held_out"]` says so). The runs share one traced graph
    (`switched`).

    One layer at a time, a row also says how that layer's own rounding errs where the integer model rounds
    it, its input float on both sides (as TensorFlow Lite's quantization debugger feeds each op's float and
    int8 versions the same input): `rounding_steps`, the root mean square error in steps of that tensor's int8
    scale (rounding alone gives at most 1/sqrt(12) = 0.29; more is clipping or a coarse kernel), `rounding_rmse`
    in the tensor's own units, and `clipped`, the share of held-out values outside the calibrated range (NaN where
    the range is TFLite's fixed one: a softmax above 255/256 saturates whatever the calibration)."""
    layers = quantized_layers(model) if layers is None else [models.resolve_layer(model, name) for name in layers]
    held_out = calibration is not None
    calibrated, _ = activation_ranges(model, layers, calibration if held_out else images)
    limits = per_tensor_ranges(calibrated)
    net = switched.switched(model, layers)
    ranges = [rounding_range(model, point, limits) for point in net.points]
    scale, zero_point = net.rounding(ranges)
    head = heads.find_head(model, output)
    independent = head.distribution == "sigmoid" and not head.binary
    reference = outputs(model, images, head)
    runs = [(layer, [layer] if not all_but_one else [other for other in layers if other != layer])
            for layer in layers] + ([("(all)", layers)] if all_but_one else [])
    run, total = switched.runner(net), len(runs) + int(not all_but_one)
    rows = []
    for done, (name, quantized) in enumerate(runs):
        on = np.isin(net.layers, quantized).astype(np.float32)
        feeds = [tf.constant(on), tf.constant(net.point_switches(on)), tf.constant(scale), tf.constant(zero_point)]
        values = [batch[head.output] for batch in _batches(model, images, lambda x: run(x, *feeds))]
        sums = QualitySums.of(reference, comparable(np.concatenate(values), head), labels, independent,
                              classes=head.is_classifier)
        rows.append({"layer": name, **_with_intervals(sums)})
        if progress is not None:
            progress(done + 1, total)
    frame = pd.DataFrame(rows)
    if not all_but_one:
        frame = frame.assign(**_rounding_errors(net, images, ranges, scale, zero_point))
        if progress is not None:
            progress(total, total)
    frame.attrs.update(images=len(images), held_out=held_out, all_but_one=all_but_one,
                       calibration=len(calibration) if held_out else len(images))
    return frame


def outputs(net: keras.Model, images: np.ndarray, head: heads.Head) -> np.ndarray:
    """The head's output of `net` (the model or its simulation) in comparable form (see `comparable`)."""
    return comparable(raw_outputs(net, images, head), head)


def raw_outputs(net: keras.Model, images: np.ndarray, head: heads.Head) -> np.ndarray:
    """The head's output of `net` as the model gives it (what a converted model's interpreter gives too)."""
    values = [batch[head.output] for batch in _batches(net, images)]
    return np.concatenate(values) if values else np.zeros((0, 1), np.float64)


def _batches(model: keras.Model, images: np.ndarray, call: Callable | None = None):
    """Every output (a list) of `call` (a traced graph of the model's), else of the model itself called (a copy
    is run once: tracing it would cost more), per batch of `images`, each batch's activations reserved from the
    server's budget as the model's."""

    def outputs_of(batch):
        x = tf.constant(batch, tf.float32)
        return [np.asarray(part, np.float64) for part in graph.as_list(call(x) if call else model(x, training=False))]

    return batches.in_batches(model, images, outputs_of)


def _rounding_errors(net: switched.Switched, images: np.ndarray, ranges: list[tuple[float, float]],
                     point_scale: np.ndarray, point_zero: np.ndarray) -> dict[str, np.ndarray]:
    """Per layer, its own rounding error at its point against float (one float pass for every layer), from
    each point's rounding range and its scale and zero point."""
    scale, zero = point_scale[net.point_of], point_zero[net.point_of]
    fixed = np.array([fixed_range(net.model, point) is not None for point in net.points])[net.point_of]
    low, high = np.array(ranges, np.float32)[net.point_of].T
    errors = switched.error_runner(net)
    feeds = [tf.constant(values) for values in (scale, zero, low, high)]
    squared, outside, count = (np.sum(parts, axis=0) for parts in
                               zip(*_batches(net.model, images, lambda x: errors(x, *feeds))))
    rmse = np.sqrt(squared / np.maximum(count, 1))
    return {"rounding_steps": np.where(scale > 0, rmse / np.where(scale > 0, scale, 1), np.nan), "rounding_rmse": rmse,
            "clipped": np.where(fixed, np.nan, outside / np.maximum(count, 1))}


def comparable(values: np.ndarray, head: heads.Head) -> np.ndarray:
    """An output as class probabilities: a softmax output renormalised, a sigmoid one as it is (a single unit as
    [1 - p, p]), logits through heads.probabilities; features as they are. Both sides of a comparison are read
    the same way."""
    values = np.asarray(values, np.float64)
    if not head.is_classifier:
        return values
    if head.point.where == "output":  # the output is the scores themselves
        values = heads.probabilities(values, head)
    elif head.distribution == "softmax" and not head.binary:  # a rounded softmax sums to 1 only within its steps
        values = values / np.maximum(values.sum(axis=1, keepdims=True), 1e-12)
    return np.concatenate([1 - values, values], axis=1) if head.binary else values


def _with_intervals(sums: QualitySums) -> dict:
    result = sums.result()
    if "agreement" in result:
        result["agreement_low"], result["agreement_high"] = intervals.wilson_interval(sums.agree, sums.images)
    if sums.labelled:
        result["accuracy_low"], result["accuracy_high"] = intervals.wilson_interval(sums.correct, sums.labelled)
    return result
