"""Copies of a model's graph from fresh copies of its layers: Keras's clone, nested models kept, or the graph copied
flat where Keras's clone will not do (it rebuilds a KerasHub backbone by code, under another name, and keeps a
nested model's input shape); with a function from a layer path of the model to its copy, and the same weights.
"""

from __future__ import annotations

import keras

from audit.errors import AuditError
from audit.graph import get_layer, iter_layers, trace, weighted_layers


def fresh_layer(layer, changes: dict | None = None):
    """A new layer of `layer`'s config with `changes`."""
    return type(layer).from_config({**layer.get_config(), **(changes or {})})


def copy_graph(model: keras.Model, clone_layer=None) -> tuple[keras.Model, object]:
    """A copy of the model's graph of `clone_layer` copies of its layers, with a function from a layer path of
    `model` to its copy: Keras's clone, nested models kept; or the graph copied flat (flat_copy), where Keras's
    clone rebuilds a KerasHub backbone by code under another name (VGG's `vgg_backbone_3`)."""
    clone_layer = clone_layer or fresh_layer
    clone = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    if set(weighted_layers(model)) - set(weighted_layers(clone)):
        return flat_copy(model, clone_layer)
    return clone, lambda path: get_layer(clone, path)


def flat_copy(model: keras.Model, clone_layer) -> tuple[keras.Model, object]:
    """The model's graph as one Functional model of `clone_layer` copies of its leaf layers, nested models entered
    (their calls inlined: the copy has no nested models), keras.ops calls kept as they are; with a function from a
    layer path of `model` to its copy. For models whose `clone_model` rebuilds layers by code (KerasHub)."""
    paths = {id(layer): path for path, layer, _ in iter_layers(model)}
    copies: dict[int, keras.layers.Layer] = {}
    by_path: dict[str, keras.layers.Layer] = {}

    def replace(layer):
        if not isinstance(layer, keras.layers.Layer):  # a keras.ops call: stateless
            return None
        if id(layer) not in copies:  # a layer called twice stays one layer
            copies[id(layer)] = by_path[paths[id(layer)]] = clone_layer(layer)
        return copies[id(layer)]

    image = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)
    outputs = trace(model, image, {}, "", {}, replace)
    names = [layer.name for layer in by_path.values()]
    if len(set(names)) < len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise AuditError(f"{model.name} rebuilds some of its layers by code when copied, and its nested models share "
                         f"the layer name {duplicate}, so it cannot be copied as one flat model here.")
    return keras.Model(image, outputs, name=model.name), by_path.__getitem__


def with_weights(model: keras.Model, clone_layer=None, weights: dict | None = None, flat: bool = False
                 ) -> tuple[keras.Model, object]:
    """`copy_graph` (or `flat_copy` when `flat`), each layer given `model`'s weights or, by path, `weights`' own,
    layer by layer (a flat copy's weights come in another order than the model's); with the path function."""
    weights = weights or {}
    copy, layer_of = flat_copy(model, clone_layer or fresh_layer) if flat else copy_graph(model, clone_layer)
    for path in weighted_layers(model):
        layer_of(path).set_weights(weights[path] if path in weights else get_layer(model, path).get_weights())
    return copy, layer_of
