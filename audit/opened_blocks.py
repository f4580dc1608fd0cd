"""Library blocks opened into nested models, so every view reaches the convolutions inside them.

KerasHub's MobileNet builds its backbone from Layer subclasses (InvertedResidualBlock, SqueezeAndExcite2D, ...)
whose convolutions are sublayers called in `call`: in the model's graph each block is one node, so the layer
table, the statistics, the pruning groups and the int8 ranges would stop at it. A block's own `call` run on a
symbolic input records its sublayers' calls as a graph: the block becomes a nested Functional model of the same
layers (the same weights). The opened model is used only where it gives the model's outputs on a random image.
"""

from __future__ import annotations

import keras
import numpy as np

from audit.graph import iter_layers

AGREEMENT = dict(rtol=1e-4, atol=1e-5)
"""How closely the opened model must give the original's outputs (float32: the same weights, the same ops)."""


def is_block(layer) -> bool:
    """A layer (not a model) whose weights all belong to the sublayers it calls: a container of a library's
    building block, not a layer with its own kernel."""
    if isinstance(layer, keras.Model) or not isinstance(layer, keras.layers.Layer):
        return False
    sublayers = layer._flatten_layers(include_self=False, recursive=True)
    held = {id(weight) for sublayer in sublayers for weight in sublayer.weights}
    return bool(held) and all(id(weight) in held for weight in layer.weights) \
        and all(_config_readable(sublayer) for sublayer in sublayers)


def _config_readable(layer) -> bool:
    """Whether the layer's config can be written (copies are built and saved from it). An Identity is stateless:
    the opened model holds a fresh one (KerasHub's HGNetV2 builds its own with a dtype policy object, which
    Keras's automatic config cannot write)."""
    if isinstance(layer, keras.layers.Identity):
        return True
    try:
        layer.get_config()
    except NotImplementedError:
        return False
    return True


def has_blocks(model: keras.Model) -> bool:
    return any(is_block(layer) for _, layer, _ in iter_layers(model))


def open_blocks(model: keras.Model, size: tuple[int, int]) -> keras.Model:
    """`model` with every block a nested model of its own layers, when that gives `model`'s outputs on a seeded
    random image of `size`; `model` itself otherwise (no blocks, or a block whose call cannot run on a
    symbolic input)."""
    if not has_blocks(model) or len(model.inputs) != 1:
        return model
    try:
        opened = _opened(model, {})
    except Exception:  # noqa: BLE001 (a block's code that needs a real tensor: the model stays as it is)
        return model
    # one image: this runs before the cost check (audit.models.check_cost), bounded by the trial's caps (audit.trial)
    sample = np.random.default_rng(0).uniform(-1, 1, (1, *size, model.inputs[0].shape[-1])).astype(np.float32)
    expected = keras.tree.flatten(model(sample, training=False))
    got = keras.tree.flatten(opened(sample, training=False))
    same = len(expected) == len(got) and all(
        np.allclose(np.asarray(a), np.asarray(b), **AGREEMENT) for a, b in zip(expected, got))
    return opened if same else model


def _opened(model: keras.Model, made: dict) -> keras.Model:
    """A Functional model of `model`'s graph on the same layers, each block and each nested model holding one
    replaced by its opened model (`made`: one per layer object, so a layer called twice stays one)."""
    named = next((op.name for op in getattr(model, "operations", ()) if isinstance(op, keras.layers.InputLayer)),
                 None)
    image = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype, name=named)

    def swap(layer):
        def call(*args, **kwargs):
            if id(layer) not in made:
                opens = is_block(layer) or (isinstance(layer, keras.Model) and has_blocks(layer))
                made[id(layer)] = _block_model(layer, args[0], made) if opens else \
                    keras.layers.Identity(name=layer.name) if isinstance(layer, keras.layers.Identity) else layer
            return made[id(layer)](*args, **kwargs)

        return call

    if isinstance(model, keras.Sequential):
        x = image
        for layer in model.layers:
            x = swap(layer)(x)
        outputs = x
    else:
        outputs = model._run_through_graph(image, operation_fn=swap)  # Keras 3's own graph walk
    return keras.Model(image, outputs, name=model.name)


def _block_model(layer, example, made: dict) -> keras.Model:
    """The block (or nested model) as a Functional model of its own layers, its inner blocks opened too."""
    if isinstance(layer, keras.Model):
        return _opened(layer, made)
    x = keras.Input(batch_shape=example.shape, dtype=example.dtype, name=f"{layer.name}_input")
    inner = keras.Model(x, layer.call(x), name=layer.name)  # its own code, on a symbolic input
    return _opened(inner, made)  # its blocks opened, its Identity layers fresh
