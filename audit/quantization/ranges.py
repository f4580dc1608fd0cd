"""Dynamic ranges: what each conv and dense layer's weights and activations span, and what breaks int8.

Weights are read per output channel. Activations are measured where TensorFlow Lite materialises them: a conv
followed by its BatchNorm and ReLU is one fused integer op whose output is the ReLU's, so a layer's activations
are taken where its filters are used (audit.usage.where_used), over a calibration set streamed in batches like
the statistics. Per channel the minimum and maximum; per tensor a strided sample of values, for the histograms
and the tail.

What breaks per-tensor int8 (one scale for a whole tensor): a channel whose range is many times its layer's
median (depthwise layers and layers before a residual add are known for them: the small channels are left a few
integer steps), and a long tail (the top 0.1% of values stretch the range that 255 steps must cover).
"""

from __future__ import annotations

from typing import Callable

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from audit import compiled, cost, datasets, graph, models, passes, usage

QUANTIZED_TYPES = graph.CONV_TYPES | {"Dense"}
SAMPLE_PER_BATCH = 4096
SAMPLE_KEPT = 65536
OUTLIER_RATIO = 10.0
"""A channel whose range is this many times its layer's median range: per-tensor int8 leaves that median
channel about 255 / 10 = 25 steps."""
TAIL_RATIO = 5.0
"""Activations whose maximum is this many times their 99.9th percentile: the last 0.1% of values take 4/5 of the
integer range."""


def quantized_layers(model: keras.Model) -> list[str]:
    """Paths of the layers whose weights int8 quantises (every conv and dense layer), in order."""
    return [path for path, layer, _ in graph.iter_layers(model) if type(layer).__name__ in QUANTIZED_TYPES]


def activation_points(model: keras.Model, layers: list[str]) -> dict[str, str]:
    """Where each layer's activations are quantised: the end of its fused conv-BN-activation chain."""
    return {layer: usage.where_used(model, layer) for layer in layers}


def weight_ranges(model: keras.Model, layers: list[str]) -> pd.DataFrame:
    """Per output channel, the kernel's min and max (a depthwise kernel's channel is its input channel times
    its multiplier, as the layer outputs them)."""
    rows = []
    for path in layers:
        kernel = kernel_by_output_channel(graph.get_layer(model, path))
        rows.append(pd.DataFrame({"layer": path, "kind": "weights", "channel": np.arange(kernel.shape[1]),
                                  "min": kernel.min(0), "max": kernel.max(0), "measured_at": path}))
    return pd.concat(rows, ignore_index=True) if rows else _empty()


def kernel_by_output_channel(layer) -> np.ndarray:
    """The kernel that makes the layer's output channels, as (values per channel, output channels): a
    separable conv's pointwise kernel, a transposed conv's kernel with its output axis last, a depthwise
    kernel's input channels times its multiplier (as the layer outputs them)."""
    return channels_last(layer, np.asarray(layer.get_weights()[1 if _separable(layer) else 0], np.float64))


def channels_last(layer, kernel: np.ndarray) -> np.ndarray:
    """`kernel` (the layer's output-making one) reshaped to (values per channel, output channels)."""
    kind = type(layer).__name__
    if kind.startswith("Depthwise"):
        return kernel.reshape(-1, kernel.shape[-2] * kernel.shape[-1])
    if kind.endswith("Transpose"):
        kernel = np.moveaxis(kernel, -2, -1)
    return kernel.reshape(-1, kernel.shape[-1])


def _separable(layer) -> bool:
    return type(layer).__name__.startswith("Separable")


def activation_ranges(model: keras.Model, layers: list[str], images, batch_size: int = 32,
                      progress: Callable[[int, int], None] | None = None,
                      total: int | None = None) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Per channel min and max of each layer's activations over `images` (preprocessed (N, H, W, C), or a
    streamed set's (x, labels) batches with `total`), and a strided sample of each point's values."""
    points = activation_points(model, layers)
    unique = tuple(dict.fromkeys(points.values()))
    if not unique:
        return _empty(), {}
    cut, reduce = _reducer(model, unique)
    if isinstance(images, np.ndarray):
        kept = sum(4 * int(np.prod(out.shape[1:])) for out in cut.outputs)
        batch_size = cost.batch_within(model, batch_size, kept_per_image=kept)
        images, total = datasets.in_memory(images, None, batch_size), len(images)
    low, high, samples = {}, {}, {point: [] for point in unique}
    for (parts,) in passes.run(reduce, images, None, progress, total):
        for point, (minimum, maximum, sample) in zip(unique, parts):
            low[point] = minimum if point not in low else np.minimum(low[point], minimum)
            high[point] = maximum if point not in high else np.maximum(high[point], maximum)
            samples[point].append(sample)
    kept_samples = {point: _thinned(np.concatenate(parts)) for point, parts in samples.items()}
    tails = {point: float(np.percentile(np.abs(sample), 99.9)) if sample.size else 0.0
             for point, sample in kept_samples.items()}
    rows = [pd.DataFrame({"layer": layer, "kind": "activations", "channel": np.arange(len(low[point])),
                          "min": low[point].astype(np.float64), "max": high[point].astype(np.float64),
                          "measured_at": point, "tensor_p999": tails[point]})
            for layer, point in points.items()]
    return pd.concat(rows, ignore_index=True), kept_samples


def ranges(model: keras.Model, images, layers: list[str] | None = None, batch_size: int = 32,
           progress: Callable[[int, int], None] | None = None, total: int | None = None) -> pd.DataFrame:
    """Weights and activations of every conv and dense layer (or `layers`): one row per layer, kind (weights or
    activations) and channel, with min and max; activation rows also carry their tensor's 99.9th percentile of
    |value| (`tensor_p999`, from the sample). The samples themselves: `activation_ranges`."""
    layers = quantized_layers(model) if layers is None else [models.resolve_layer(model, name) for name in layers]
    activations, _ = activation_ranges(model, layers, images, batch_size, progress, total)
    return pd.concat([weight_ranges(model, layers), activations], ignore_index=True)


def problems(frame: pd.DataFrame) -> pd.DataFrame:
    """Per layer, what breaks per-tensor int8: the widest channel over the median one (weights and activations)
    and the activations' tail (their maximum over their 99.9th percentile), with a sentence for the flagged."""
    rows = []
    for layer, part in frame.groupby("layer", sort=False):
        row = {"layer": layer}
        for kind, values in part.groupby("kind"):
            span = np.maximum(np.abs(values["min"].to_numpy()), np.abs(values["max"].to_numpy()))
            median = float(np.median(span))
            row[f"{kind}_outlier_ratio"] = float(span.max() / median) if median > 0 else np.nan
            if kind == "activations":
                high = float(values["tensor_p999"].iloc[0])
                row["activations_tail"] = float(span.max() / high) if high > 0 else np.nan
                row["activations_measured_at"] = values["measured_at"].iloc[0]
        rows.append(row)
    table = pd.DataFrame(rows)
    for column in ("weights_outlier_ratio", "activations_outlier_ratio", "activations_tail"):
        if column not in table:
            table[column] = np.nan
    table["flag"] = [_flag(row) for row in table.itertuples()]
    return table


def _flag(row) -> str:
    said = []
    if row.weights_outlier_ratio > OUTLIER_RATIO:
        said.append(f"a weight channel {row.weights_outlier_ratio:.0f}x the median one (per-tensor int8 would "
                    "crush the others; per-channel keeps them)")
    if row.activations_outlier_ratio > OUTLIER_RATIO:
        said.append(f"an activation channel {row.activations_outlier_ratio:.0f}x the median one")
    if row.activations_tail > TAIL_RATIO:
        said.append(f"a long activation tail (max {row.activations_tail:.1f}x the 99.9th percentile)")
    return "; ".join(said)


def _reducer(model: keras.Model, points: tuple[str, ...]):
    """One traced function kept with the model: a batch in, per point the per-channel min and max and a strided
    sample of its values out."""

    def build():
        cut = models.submodel(model, list(points))
        signature = [tf.TensorSpec([None, *cut.inputs[0].shape[1:]], tf.float32), tf.TensorSpec([None], tf.int32)]

        @tf.function(input_signature=signature)
        def reduce(x, labels):
            outputs = cut(x, training=False)
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            found = []
            for values in outputs:
                axes = list(range(len(values.shape) - 1))
                flat = tf.reshape(values, [-1])
                stride = tf.maximum(tf.size(flat) // SAMPLE_PER_BATCH, 1)
                found.append((tf.reduce_min(values, axes), tf.reduce_max(values, axes), flat[::stride]))
            return found

        return cut, reduce

    return compiled.kept(model, ("quantization ranges", points), build)


def _thinned(values: np.ndarray) -> np.ndarray:
    return values[:: max(len(values) // SAMPLE_KEPT, 1)].astype(np.float32)


def _empty() -> pd.DataFrame:
    return pd.DataFrame(columns=["layer", "kind", "channel", "min", "max", "measured_at", "tensor_p999"])
