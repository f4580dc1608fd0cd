"""Int8 one layer at a time without rebuilding the model per layer: one traced graph with a switch per layer.

Every quantised layer gets an int8 twin (its kernel rounded per output channel, built once per model) and every
activation point a rounding; a run says which layers are int8 by a 0/1 vector, and `tf.cond` runs either the
layer or its twin, rounds a point or leaves it, so one trace serves all of a sensitivity's runs (a 500-layer
model was rebuilt and run eagerly 500 times before). The ranges are inputs too: a new calibration reuses it.

The same walk in float gives every layer's own rounding error at once: beside each quantised layer its twin
runs on the same float input, through the per-channel layers up to its activation point (BatchNorm, ReLU), is
rounded there and compared with the float tensor. That is what TensorFlow Lite's quantization debugger
measures per op (both versions fed the same input), for every layer in one pass instead of one per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from audit import compiled, graph, usage
from audit.quantization.arithmetic import parameters, quantized_weights
from audit.quantization.ranges import activation_points


def int8_twin(layer):
    """A copy of a conv or dense layer with its kernels quantise-dequantised per output channel."""
    twin = type(layer).from_config(layer.get_config())
    twin.build_from_config(layer.get_build_config())
    twin.set_weights(quantized_weights(layer))
    return graph.grouped_conv_without_xla(twin) or twin


def fake_quantize(x, scale, zero_point):
    """TFLite's asymmetric int8 rounding of `x` (scalar scale and zero point; a scale of 0 leaves `x`)."""
    safe = tf.where(scale > 0, scale, 1.0)
    rounded = (tf.clip_by_value(tf.round(x / safe) + zero_point, -128.0, 127.0) - zero_point) * safe
    return tf.where(scale > 0, rounded, x)


@dataclass
class Switched:
    """The traced graphs of one model and its quantised layers (kept per model by audit.compiled)."""

    model: keras.Model
    layers: list[str]
    points: list[str]  # the distinct activation points
    point_of: list[int]  # per layer, the index of its point
    chains: dict  # layer path -> the per-channel layers after it, up to its point (paths)
    twins: dict  # layer path -> its int8 twin

    def point_switches(self, on: np.ndarray) -> np.ndarray:
        """A point is rounded when any layer it belongs to is int8."""
        switches = np.zeros(len(self.points), np.float32)
        np.maximum.at(switches, self.point_of, on.astype(np.float32))
        return switches

    def rounding(self, ranges: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
        """Per point, the scale and zero point of its (low, high) range."""
        found = [parameters(np.zeros(1), 8, None, False, value_range)[:2] for value_range in ranges]
        return (np.array([float(s) for s, _ in found], np.float32), np.array([float(z) for _, z in found], np.float32))


def switched(model: keras.Model, layers: list[str]) -> Switched:
    """The switches, twins and chains for `layers` of `model`, built once per model and list of layers."""

    def build():
        points = activation_points(model, layers)
        distinct = list(dict.fromkeys(points.values()))
        chains = {}
        for layer in layers:
            chain = [call.path for call in usage.chain_after(model, layer)]
            chains[layer] = chain[1:chain.index(points[layer]) + 1] if points[layer] in chain else []
        twins = {layer: int8_twin(graph.get_layer(model, layer)) for layer in layers}
        return Switched(model, list(layers), distinct, [distinct.index(points[layer]) for layer in layers], chains,
                        twins)

    return compiled.kept(model, ("int8 switched", tuple(layers)), build)


def runner(net: Switched):
    """A traced function: (images, layer switches, point switches, scales, zero points) -> the model's outputs,
    each int8 layer's twin run in its place and each switched point rounded."""

    def build():
        index = {layer: i for i, layer in enumerate(net.layers)}
        point_index = {point: j for j, point in enumerate(net.points)}
        signature = [tf.TensorSpec([None, *net.model.inputs[0].shape[1:]], tf.float32),
                     *[tf.TensorSpec([n], tf.float32) for n in (len(net.layers), len(net.points), len(net.points),
                                                              len(net.points))]]

        @tf.function(input_signature=signature)
        def run(images, layer_on, point_on, scale, zero_point):
            def call(path, own, args, kwargs):
                if path in index:
                    twin = net.twins[path]
                    output = tf.cond(layer_on[index[path]] > 0, lambda: twin(*args, **kwargs),
                                     lambda: own(*args, **kwargs))
                else:
                    output = own(*args, **kwargs)
                if path in point_index:
                    j = point_index[path]
                    output = tf.cond(point_on[j] > 0, lambda: fake_quantize(output, scale[j], zero_point[j]),
                                     lambda: tf.identity(output))
                return output

            return _walk(net.model, images, call)

        return run

    return compiled.kept(net.model, ("int8 switched run", tuple(net.layers)), build)


def error_runner(net: Switched):
    """A traced function: (images, per-layer scale, zero point, low, high) -> per layer the sum of squared
    rounding errors at its point, the count of float values outside (low, high), and the values counted. The
    model runs in float; each layer's twin runs beside it on the same input, through its chain to its point."""

    def build():
        index = {layer: i for i, layer in enumerate(net.layers)}
        in_chain = {step: layer for layer, chain in net.chains.items() for step in chain}
        end = {layer: (chain[-1] if chain else layer) for layer, chain in net.chains.items()}
        count = len(net.layers)
        signature = [tf.TensorSpec([None, *net.model.inputs[0].shape[1:]], tf.float32),
                     *[tf.TensorSpec([count], tf.float32) for _ in range(4)]]

        @tf.function(input_signature=signature)
        def errors(images, scale, zero_point, low, high):
            twin_at, found = {}, {}

            def call(path, own, args, kwargs):
                output = own(*args, **kwargs)
                source = path if path in index else in_chain.get(path)
                if source is None or (path != source and source not in twin_at):
                    return output
                if path == source:
                    twin_at[source] = net.twins[path](*args, **kwargs)
                else:
                    twin_at[source] = own(twin_at[source], *args[1:], **kwargs)
                if path == end[source]:
                    i = index[source]
                    rounded = fake_quantize(twin_at.pop(source), scale[i], zero_point[i])
                    reference = tf.cast(output, tf.float32)
                    outside = tf.logical_or(reference < low[i], reference > high[i])
                    found[i] = (tf.reduce_sum(tf.square(tf.cast(rounded, tf.float32) - reference)),
                                tf.reduce_sum(tf.cast(outside, tf.float32)), tf.cast(tf.size(reference), tf.float32))
                return output

            _walk(net.model, images, call)
            zero = (tf.constant(0.0), tf.constant(0.0), tf.constant(0.0))
            return [tf.stack([found.get(i, zero)[part] for i in range(count)]) for part in range(3)]

        return errors

    return compiled.kept(net.model, ("int8 rounding errors", tuple(net.layers)), build)


def _walk(model: keras.Model, images, call) -> list:
    """The model's outputs on `images`, each layer's call made by `call(path, own, args, kwargs)`: `own` is the
    layer as every pass runs it (a grouped conv without XLA), `kwargs` say inference (each layer is called by
    itself, outside a model's call that would say training=False, and augmentation layers default to training)."""
    paths = {id(layer): path for path, layer, _ in graph.iter_layers(model)}
    grouped = graph.has_grouped_convs(model)

    def replace(layer):
        path = paths.get(id(layer), layer.name)
        own = (graph.grouped_conv_without_xla(layer) if grouped else None) or layer
        training = {"training": False} if isinstance(layer, keras.layers.Layer) else {}
        return lambda *args, **kwargs: call(path, own, args, {**kwargs, **training})

    return graph.as_list(graph.trace(model, images, {}, "", {}, replace))
