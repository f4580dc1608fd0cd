"""Which map the head reads, on the heads Keras users have today, each loaded back from a .keras file.

ConvNeXt's blocks end in a keras.ops sum (`inputs + layer_scale(x)`), not a layer; its head reads the last
one through LayerNormalization and pointwise Dense layers. An all-convolutional head (mini-Xception,
SqueezeNet) ends in a conv with one channel per class, then pooling and a softmax: the map is the one
before it. Grad-CAM on a keras.ops node is checked against Keras's own graph (a model cut at the node's
tensor) and a tape, not audit's graph machinery.
"""

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from audit import attribution, models

layers = keras.layers


def _from_file(model: keras.Model, tmp_path, name="model") -> models.LoadedModel:
    path = tmp_path / f"{name}.keras"
    model.save(path)
    return models.load(f"file:{path}")


def _convnext_like(seed=0, channels=8) -> keras.Model:
    """Two ConvNeXt blocks (depthwise 7x7, LayerNorm over channels, Dense 4C, GELU, Dense C, residual sum by
    keras.ops) and ConvNeXt's head (global pooling, LayerNorm, Dense)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(channels, 4, strides=4, name="stem")(inputs)
    for block in range(2):
        y = layers.Conv2D(channels, 7, padding="same", groups=channels, name=f"block{block}_depthwise_conv")(x)
        y = layers.LayerNormalization(epsilon=1e-6, name=f"block{block}_layernorm")(y)
        y = layers.Dense(4 * channels, name=f"block{block}_pointwise_conv_1")(y)
        y = layers.Activation("gelu", name=f"block{block}_gelu")(y)
        y = layers.Dense(channels, name=f"block{block}_pointwise_conv_2")(y)
        x = x + y  # a keras.ops node, as in keras.applications.ConvNeXt
    x = layers.LayerNormalization(epsilon=1e-6, name="head_layernorm")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, layers.Dense(3, activation="softmax", name="predictions")(x), name="convnext_like")


def _hand_grad_cam(model: keras.Model, tensor, image: np.ndarray, target: int) -> np.ndarray:
    """Grad-CAM by the paper on Keras's own graph: the maps A from a model cut at the tensor, the class score
    (before the softmax) from A by hand through the head (global pooling, LayerNorm, Dense), weights = the mean
    over positions of d score / d A."""
    maps = tf.constant(keras.Model(model.inputs[0], tensor)(image[None]))
    norm, dense = model.get_layer("head_layernorm"), model.get_layer("predictions")
    with tf.GradientTape() as tape:
        tape.watch(maps)
        score = (tf.matmul(norm(tf.reduce_mean(maps, axis=(1, 2))), dense.kernel) + dense.bias)[:, target]
    weights = tape.gradient(score, maps)[0].numpy().mean(axis=(0, 1))
    return np.maximum((maps[0].numpy() * weights).sum(-1), 0)


def test_keras_ops_nodes_are_layers_of_the_table_and_addressable(tmp_path):
    loaded = _from_file(_convnext_like(), tmp_path)
    table = models.layer_table(loaded.model)
    ops = table[table.is_operation]
    assert list(ops.type) == ["Add", "Add"] and (ops.params == 0).all()
    assert ops.output_shape.tolist() == [(None, 4, 4, 8)] * 2
    assert table[~table.is_operation].params.sum() == loaded.model.count_params()
    last = ops.path.iloc[-1]
    assert models.resolve_layer(loaded.model, last) == last
    maps = models.submodel(loaded.model, last)(np.zeros((1, 16, 16, 3), np.float32))
    assert maps.shape == (1, 4, 4, 8)


def test_convnext_cam_layer_is_the_last_residual_sum_through_layernorm_and_pointwise_dense(tmp_path):
    loaded = _from_file(_convnext_like(), tmp_path)
    model = loaded.model
    layer, why = models.cam_layer_and_reason(model)
    ops = [op for op in model.operations if not isinstance(op, layers.Layer)]
    assert layer == ops[-1].name  # the second block's `x + y`, which the head pools
    assert "LayerNormalization" in why and "Dense" in why
    image = np.random.default_rng(0).uniform(0, 1, (16, 16, 3)).astype(np.float32)
    for target in range(3):
        got = attribution.grad_cam(model, image, target, layer=layer, upsample=False)
        np.testing.assert_allclose(got, _hand_grad_cam(model, ops[-1].output, image, target), rtol=1e-4, atol=1e-6)


def _mini_xception(classes=7, softmax=True) -> keras.Model:
    """The head of the mini-Xception (Arriaga et al. 2017): a residual block, a 3x3 conv with one channel per
    class, global average pooling and a softmax; no Dense layer."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((24, 24, 1))
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    residual = layers.BatchNormalization(name="residual_bn")(layers.Conv2D(16, 1, strides=2, name="residual")(x))
    y = layers.SeparableConv2D(16, 3, padding="same", name="sep")(x)
    y = layers.MaxPooling2D(3, strides=2, padding="same")(layers.BatchNormalization(name="sep_bn")(y))
    x = layers.Add(name="add_4")([y, residual])
    x = layers.Conv2D(classes, 3, padding="same", name="class_conv")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Activation("softmax" if softmax else "linear", name="predictions")(x))


def test_an_all_convolutional_head_reads_the_map_before_its_class_conv(tmp_path):
    loaded = _from_file(_mini_xception(), tmp_path)
    layer, why = models.cam_layer_and_reason(loaded.model)
    assert layer == "add_4" and "class_conv" in why and "7" in why
    assert models.class_conv(loaded.model) == "class_conv"


def test_a_base_pooled_to_features_has_no_class_conv():
    """Without a softmax, a conv followed by pooling is a feature extractor's last layer, not a class head."""
    model = _mini_xception(softmax=False)
    assert models.class_conv(model) is None
    assert models.cam_layer(model) == "class_conv"
    pooled = keras.applications.MobileNetV2(include_top=False, pooling="avg", weights=None, input_shape=(64, 64, 3))
    assert models.class_conv(pooled) is None and models.cam_layer(pooled) == "out_relu"


def test_convnext_prunes_to_half_its_parameters_through_its_pointwise_dense_layers():
    """The pointwise Dense layers hold most of ConvNeXt's parameters: scored like 1x1 convs, the groups they make
    reach a parameter target, and the smaller model equals the masked one. (The residual stream's channels meet
    LayerNormalization, which the groups do not follow: locked, as in ConvNeXt.)"""
    model = _convnext_like(channels=16)
    assert models.filter_layers(model) == ["stem", "block0_depthwise_conv", "block0_pointwise_conv_1",
                                           "block0_pointwise_conv_2", "block1_depthwise_conv",
                                           "block1_pointwise_conv_1", "block1_pointwise_conv_2"]
    _half_by_l1_equals_masked(model, np.random.default_rng(1).uniform(0, 1, (3, 16, 16, 3)).astype(np.float32))


def _half_by_l1_equals_masked(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Prune to 50% of the parameters by L1 (within 0.02); the smaller model computes the masked one, returned."""
    from audit import groups, pruning

    graph = groups.DependencyGraph(model)
    scores = pd.DataFrame([{"layer": layer, "filter": index, "l1": value} for layer in models.filter_layers(model)
                           for index, value in enumerate(pruning.l1_norms(model, layer))])
    selection = pruning.to_target(model, scores, "l1", graph=graph, params=0.5)
    smaller = pruning.prune(model, selection, graph)
    assert abs(smaller.count_params() / model.count_params() - 0.5) <= 0.02
    masked = pruning.masked(model, selection, graph)(x).numpy()
    np.testing.assert_allclose(smaller(x).numpy(), masked, rtol=1e-4, atol=1e-6)
    return masked


def test_keras_applications_convnext_from_a_file_reads_its_last_sum_and_prunes_to_half(tmp_path):
    """keras.applications' own ConvNeXt builder (the code behind ConvNeXtTiny, at a small depth and width so the
    test stays fast), saved and loaded back: the CAM layer is the last residual sum, which the head pools, and
    the model prunes to half its parameters, equal to masked. Layer scale at 1 (its default 1e-6 hides any cut)."""
    from keras.src.applications.convnext import ConvNeXt

    keras.utils.set_random_seed(4)
    built = ConvNeXt(depths=[1, 1, 2, 1], projection_dims=[8, 16, 24, 32], layer_scale_init_value=1.0,
                     input_shape=(64, 64, 3), classes=5, name="convnext_small_test")
    model = _from_file(built, tmp_path).model
    last_sum = [op for op in model.operations if not isinstance(op, layers.Layer)][-1]
    assert last_sum.output is model.get_layer("convnext_small_test_head_gap").input  # what the head pools
    assert models.cam_layer(model) == last_sum.name
    x = np.random.default_rng(5).uniform(0, 255, (3, 64, 64, 3)).astype(np.float32)
    masked = _half_by_l1_equals_masked(model, x)
    assert np.abs(masked - model(x).numpy()).max() > 1e-2  # the cut is felt
