"""BatchNorm and pruning: the scale factors that rank a BN network's channels, and the statistics a cut shifts.

- `bn_scales`: |gamma| of the BatchNormalization that normalises each filter's channel, the criterion of
  Network Slimming (Liu et al. 2017; Torch-Pruning's BNScaleImportance). After a BatchNorm every filter's
  activation statistics look alike (APoZ near 0.5), but gamma still says how much of the channel goes on.
- `recalibrate_bn`: the moving means and variances re-estimated on images after a cut (the adaptive
  BatchNorm of EagleEye, Li et al. 2020). Removing channels changes what every later BatchNorm sees, so the
  statistics it learnt no longer normalise; re-estimating them is cheap and recovers much of the loss.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from audit import cost, graph, groups
from audit.graph import as_list

NORMALISATION = "BatchNormalization"
THROUGH = groups.PASS - {NORMALISATION} - {"MaxPooling1D", "MaxPooling2D", "AveragePooling1D", "AveragePooling2D",
                                           "GlobalAveragePooling1D", "GlobalAveragePooling2D",
                                           "GlobalMaxPooling1D", "GlobalMaxPooling2D"}
"""Layers between a filter and its BatchNorm that keep the channel as it is (activations, dropout, padding)."""


def batch_norms(model: keras.Model) -> list:
    """Every BatchNormalization layer of the model (nested models entered) that normalises its last axis."""
    return [layer for _, layer, _ in graph.iter_layers(model)
            if type(layer).__name__ == NORMALISATION and _channels_last(layer)]


def _channels_last(layer) -> bool:
    spec = getattr(layer, "input_spec", None)
    return layer.axis == -1 or (spec is not None and spec.ndim is not None and layer.axis == spec.ndim - 1)


def bn_scales(model: keras.Model, layers: list[str]) -> dict[str, np.ndarray]:
    """Per layer path, |gamma| per output channel of the BatchNormalization that first normalises the channel on
    its way forward: right after the layer (through activations, dropout, padding), or after a residual add or a
    concatenation it feeds (a pre-activation block, a DenseNet: the channel's place in the concatenation read).
    NaN for a layer whose channels meet no BatchNorm with a scale."""
    flow = graph.flow_of(model)
    found = {}
    for layer in layers:
        path = graph.resolve_layer(model, layer)
        output = as_list(flow.call(path).output)[0]
        channels = int(output.shape[-1])
        norm, offset = _next_norm(flow, output)
        found[path] = (np.full(channels, np.nan) if norm is None
                       else np.abs(np.asarray(norm.gamma, np.float64))[offset:offset + channels])
    return found


def _next_norm(flow: graph.Flow, tensor, most: int = 64):
    """The nearest BatchNormalization (with a scale, on the channel axis) that reads `tensor`'s channels, going
    forward through per-channel layers, element-wise merges and concatenations; and the offset of the tensor's
    first channel in what it normalises. (None, 0) when there is none within `most` tensors."""
    queue, seen = [(tensor, 0)], set()
    while queue and len(seen) < most:
        tensor, offset = queue.pop(0)
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        readers = flow.readers(tensor)
        for reader in readers:
            if reader.kind == NORMALISATION and reader.layer.scale and _channels_last(reader.layer):
                return reader.layer, offset
        for reader in readers:
            outputs = as_list(reader.output)
            if len(outputs) != 1:
                continue
            if reader.kind in THROUGH or (reader.kind in groups.MERGE and outputs[0].shape[-1] == tensor.shape[-1]):
                queue.append((outputs[0], offset))
            elif reader.kind == "Concatenate" and reader.layer.axis in (-1, len(outputs[0].shape) - 1):
                before = 0
                for part in reader.inputs:
                    if part is tensor:
                        queue.append((outputs[0], offset + before))
                        break
                    before += int(part.shape[-1])
    return None, 0


def recalibrate_bn(model: keras.Model, images: np.ndarray, batch_size: int | None = None) -> int:
    """Re-estimate every BatchNorm's moving mean and variance on `images` (the model's input), in place;
    returns how many BatchNorms were re-estimated.

    One pass in which each BatchNorm normalises by its batch's own moments (the training-mode forward of
    EagleEye) while their sums over all batches are kept, then, when the images took more than one batch, a
    pass in inference mode with those statistics to re-measure every input. With the images in one batch
    (the default, within the server's activation budget) each moving mean and variance is then exactly the
    mean and the (population) variance of its input over the images, as the recalibrated model computes it.
    Dropout and other training-only layers stay in inference mode; the weights are not touched.
    """
    norms = batch_norms(model)
    if not norms or len(images) == 0:
        return 0
    x = np.asarray(images, np.float32)
    batch = cost.batch_within(model, len(x) if batch_size is None else int(batch_size))
    for from_batches in ([True, False] if batch < len(x) else [True]):
        moments = _input_moments(model, norms, x, batch, from_batches)
        for layer in norms:
            if layer.name in moments:
                mean, variance = moments[layer.name]
                layer.moving_mean.assign(mean.astype(np.float32))
                layer.moving_variance.assign(variance.astype(np.float32))
    return len(norms)


def _input_moments(model: keras.Model, norms: list, x: np.ndarray, batch: int, from_batches: bool) -> dict:
    """Per BatchNorm (by layer name), the mean and population variance of its input over all of `x`: batch
    moments merged as Chan et al.'s parallel variance, in float64."""
    records: list = []
    originals = {}
    for layer in norms:
        originals[id(layer)] = layer
        layer.call = _measuring_call(layer, records, from_batches)
    try:
        @tf.function(reduce_retracing=True)
        def step(batch_x):
            records.clear()
            model(batch_x, training=False)
            return [(mean, variance, count) for _, mean, variance, count in records]

        merged: dict[str, tuple[float, np.ndarray, np.ndarray]] = {}
        for start in range(0, len(x), batch):
            results = step(tf.constant(x[start:start + batch]))
            for (layer, *_), (mean, variance, count) in zip(records, results):
                mean, variance, count = (np.asarray(mean, np.float64), np.asarray(variance, np.float64),
                                         float(count))
                merged[layer.name] = _chan(merged.get(layer.name), (count, mean, variance * count))
    finally:
        for layer in norms:
            del layer.call  # the class's own call again
    return {name: (mean, squares / count) for name, (count, mean, squares) in merged.items()}


def _chan(first, second):
    """(count, mean, sum of squared deviations) of two disjoint parts as one (Chan, Golub and LeVeque 1979)."""
    if first is None:
        return second
    (n_a, mean_a, m2_a), (n_b, mean_b, m2_b) = first, second
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * n_b / n, m2_a + m2_b + delta ** 2 * n_a * n_b / n


def _measuring_call(layer, records: list, from_batches: bool):
    """A BatchNorm call that records its input's batch moments and normalises by them (`from_batches`) or by
    its moving statistics."""

    def call(inputs, training=None, mask=None):
        x = tf.cast(inputs, tf.float32)
        axes = list(range(len(x.shape) - 1))
        mean, variance = tf.nn.moments(x, axes)
        count = tf.cast(tf.size(x), tf.float32) / tf.cast(tf.shape(x)[-1], tf.float32)
        records.append((layer, mean, variance, count))
        if not from_batches:
            mean, variance = tf.cast(layer.moving_mean, tf.float32), tf.cast(layer.moving_variance, tf.float32)
        gamma = tf.cast(layer.gamma, tf.float32) if layer.scale else None
        beta = tf.cast(layer.beta, tf.float32) if layer.center else None
        outputs = tf.nn.batch_normalization(x, mean, variance, beta, gamma, layer.epsilon)
        return tf.cast(outputs, layer.compute_dtype)

    return call
