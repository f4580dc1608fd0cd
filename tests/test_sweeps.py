"""Sweeps from checkpoints with masks as inputs (audit.pruning.sweeps) against the old path: one clone whose
silenced weights are written per cut, the whole network run per cut."""

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from audit import groups, heads, models, pruning
from audit.pruning import sweeps
from tests.fixtures import random_images


class _OldPath:
    """The path the sweeps replaced: zeroed weights in one clone, restored after each cut."""

    def __init__(self, model, graph):
        self.model, self.graph = model, graph
        self.clone = pruning.masked(model, {}, graph)
        self.outputs = heads.Outputs(self.clone, head=heads.find_head(model))

    def __call__(self, cut, x):
        touched = pruning.silenced_weights(self.model, self.graph, cut)
        for path, weights in touched.items():
            models.get_layer(self.clone, path).set_weights(weights)
        try:
            return self.outputs(x)
        finally:
            for path in touched:
                models.get_layer(self.clone, path).set_weights(
                    models.get_layer(self.model, path).get_weights())


def _with_batchnorm_statistics(model, seed):
    """Moving statistics that are not the identity, so a cut that missed a BatchNorm would show."""
    rng = np.random.default_rng(seed)
    for _, layer, _ in models.iter_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.3, beta.shape),
                               rng.normal(0, 0.3, mean.shape), rng.uniform(0.5, 1.5, variance.shape)])
    return model


def _mobilenet():
    keras.utils.set_random_seed(1)
    return _with_batchnorm_statistics(keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), classes=5, alpha=0.35), 1)


def _resnet():
    keras.utils.set_random_seed(2)
    return _with_batchnorm_statistics(keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=4), 2)


def _nested():
    keras.utils.set_random_seed(3)
    base = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), include_top=False, alpha=0.35)
    _with_batchnorm_statistics(base, 3)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(base(inputs))
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(x))


def _sampled_layers(graph, count=4):
    layers = graph.removable_layers()
    return [layers[i] for i in np.unique(np.linspace(0, len(layers) - 1, count).round().astype(int))]


@pytest.mark.parametrize("build", [_mobilenet, _resnet, _nested], ids=["MobileNetV2", "ResNet50", "nested"])
def test_sensitivity_chance_runs_and_leave_one_out_equal_the_old_path(build):
    model = build()
    graph = groups.DependencyGraph(model)
    x = random_images(6, (32, 32, 3), seed=4)
    labels = np.arange(6) % 3
    old = _OldPath(model, graph)
    reference = heads.Outputs(model)(x)
    layers = _sampled_layers(graph)
    kernels = {layer: np.abs(pruning.filter_kernels(model, layer)).sum(0) for layer in layers}
    scores = pd.DataFrame([{"layer": layer, "filter": i, "l1": float(v)} for layer in layers
                           for i, v in enumerate(kernels[layer])])
    fractions = [0.25, 0.75]

    table = pruning.sensitivity(model, scores, "l1", x, labels, fractions=fractions)
    for row in table.itertuples():
        order = list(np.argsort(kernels[row.layer], kind="stable"))
        cut = {row.layer: order[:int(round(row.fraction * len(order)))]}
        expected = pruning.quality(reference, old(cut, x), labels, classes=True)
        assert row.kl == pytest.approx(expected["kl"], abs=1e-5)
        assert row.agreement == expected["agreement"] and row.accuracy == expected["accuracy"]
    assert table.kl.max() > 1e-3  # the cuts change the outputs: equality is not two unchanged models

    deepest = layers[-1]
    runs = pruning.ranking_against_chance(model, scores, deepest, "l1", x, labels, random_rankings=2,
                                          fractions=fractions)
    rng = np.random.default_rng(0)
    order = list(np.argsort(kernels[deepest], kind="stable"))
    orders = [order, order[::-1], *[list(rng.permutation(order)) for _ in range(2)]]
    expected = [pruning.quality(reference, old({deepest: sequence[:int(round(f * len(sequence)))]}, x), labels,
                                classes=True)["kl"]
                for sequence in orders for f in fractions]
    np.testing.assert_allclose(runs.kl, expected, atol=1e-5)

    filters = len(kernels[deepest])
    costs = pruning.leave_one_out(model, deepest, x, labels)
    base = -np.mean(np.log(reference[np.arange(6), labels] + 1e-12))
    for index in np.linspace(0, filters - 1, 5).round().astype(int):
        outputs = old({deepest: [int(index)]}, x)
        assert costs[index] == pytest.approx(-np.mean(np.log(outputs[np.arange(6), labels] + 1e-12)) - base, abs=1e-5)


class _Counting(keras.layers.Layer):
    """Passes its input on and counts the images it sees, in the traced graph too."""

    def build(self, shape):
        self.seen = self.add_weight(shape=(), initializer="zeros", trainable=False, dtype="float32")

    def call(self, x):
        self.seen.assign_add(tf.cast(tf.shape(x)[0], "float32"))
        return x


def test_a_deep_cut_runs_only_the_layers_after_it():
    keras.utils.set_random_seed(5)
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = _Counting(name="early")(x)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv3")(x)
    x = _Counting(name="late")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="out")(x))
    x = random_images(5, (12, 12, 3), seed=6)
    sweep = pruning.Sweep(model)
    cuts = [{"conv3": [0]}, {"conv3": [1, 2]}, {"conv3": [3, 4, 5]}, {"conv2": [0]}]
    early, late = model.get_layer("early").seen, model.get_layer("late").seen
    before_early, before_late = float(early.numpy()), float(late.numpy())
    found = sweep.outputs(cuts, x)
    # what lies before conv2 (the earliest cut) runs once for the batch: 5 images, not 4 x 5 rows
    assert float(early.numpy()) - before_early == 5
    assert float(late.numpy()) - before_late == 4 * 5  # after every cut: once per cut
    old = _OldPath(model, groups.DependencyGraph(model))
    for cut, outputs in zip(cuts, found):
        np.testing.assert_allclose(outputs, old(cut, x), atol=1e-6)


def test_the_estimate_counts_each_cut_from_its_checkpoint():
    model = _resnet()
    sweep = pruning.Sweep(model)
    layers = sweep.graph.removable_layers()
    estimate = sweep.estimate()
    after = estimate.work_after
    assert after[0] == pytest.approx(1.0) and after[-1] == 0 and np.all(np.diff(after) <= 0)
    deep, shallow = [{layers[-1]: [0]}], [{layers[0]: [0]}]
    assert sweep.passes(deep * 3, 8) < 0.5 * sweep.passes(shallow * 3, 8)
    start = estimate.starts[layers[-1]]
    assert sweep.passes(deep * 3, 8) == pytest.approx(8 * (1 - after[start] + 3 * after[start]))
    stem = estimate.starts[layers[0]]
    assert after[stem] > 0.99  # the stem's conv: every cut is about a whole pass
    assert sweep.passes(shallow * 3, 8) == pytest.approx(8 * (1 - after[stem] + 3 * after[stem]))
    assert estimate.traces(["conv1_conv"] * 9 + [layers[-1]]) == 1.0 and estimate.traces([]) == 0
    # the checkpoints are bounded: more starts than CHECKPOINTS fall back to the one before them
    assert sweeps.spread_checkpoints(list(range(100)), 10)[0] == 0 and len(sweeps.spread_checkpoints(list(range(100)), 10)) == 10
    assert sweeps.checkpoint_of(57, [0, 20, 50, 80]) == 50


def test_a_model_with_keras_ops_nodes_built_in_one_thread_sweeps_in_another():
    """Keras counts automatic names per thread: a squeeze-excite written `x * gate` (its node "multiply") in a
    model loaded by one session's thread, swept in another's, as the dashboard does. The masked graph's own steps
    take names of their own, and a cut gives what the silenced weights give."""
    import threading

    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
        gate = keras.layers.Conv2D(4, 1, activation="sigmoid", name="gate")(keras.ops.mean(x, axis=(1, 2), keepdims=True))
        x = keras.layers.GlobalAveragePooling2D()(x * gate)
        return keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="classes")(x))

    made, swept = [], []
    first = threading.Thread(target=lambda: made.append(build()))
    first.start(), first.join()
    model = made[0]
    assert "multiply" in [op.name for op in model.operations]
    x = random_images(2, (8, 8, 3))
    second = threading.Thread(target=lambda: swept.append(sweeps.Sweep(model).outputs([{"conv": [1]}], x)[0]))
    second.start(), second.join()
    expected = heads.Outputs(pruning.masked(model, {"conv": [1]}), head=heads.find_head(model))(x)
    np.testing.assert_allclose(swept[0], expected, rtol=1e-5, atol=1e-7)
