"""Pruning to a target: whole groups ranked by importance, the share asked is the share cut, parameter and MAC
targets reached, and every architecture's groups (residual, depthwise, squeeze-excite) cut equal to masking."""

import io
import zipfile

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from audit import cost, groups, models, pruning
from audit.errors import AuditError
from audit.graph import as_list
from tests.fixtures import random_images


def _residual_on_paper() -> keras.Model:
    """a (4 filters) and b (4) added: channel i of a and of b go together. c (6) reads the sum."""
    inputs = keras.Input((6, 6, 2))
    a = keras.layers.Conv2D(4, 1, name="a")(inputs)
    b = keras.layers.Conv2D(4, 1, name="b")(a)
    added = keras.layers.Add(name="add")([a, b])
    c = keras.layers.Conv2D(6, 1, activation="relu", name="c")(added)
    outputs = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling2D()(c))
    return keras.Model(inputs, outputs)


def _l1_scores(model: keras.Model) -> pd.DataFrame:
    rows = [{"layer": layer, "filter": index, "l1": value}
            for layer in models.conv_layers(model) for index, value in enumerate(pruning.l1_norms(model, layer))]
    return pd.DataFrame(rows)


def test_group_importance_is_each_layers_normalised_scores_averaged_over_the_group():
    model = _residual_on_paper()
    scores = pd.DataFrame({"layer": ["a"] * 4 + ["b"] * 4 + ["c"] * 6, "filter": [*range(4), *range(4), *range(6)],
                           "l1": [1, 2, 3, 6, 8, 1, 2, 1, 1, 1, 1, 1, 1, 3]})
    ranked = pruning.group_importance(groups.DependencyGraph(model), scores, "l1")
    by_group = {tuple(sorted((layer, tuple(ch)) for layer, ch in group.filters.items())): round(value, 6)
                for value, group in ranked}
    # a's mean is 3, b's 3, c's 8/6: channel i of the add is (a_i / 3 + b_i / 3) / 2
    assert by_group[(("a", (0,)), ("b", (0,)))] == round((1 / 3 + 8 / 3) / 2, 6)
    assert by_group[(("a", (1,)), ("b", (1,)))] == round((2 / 3 + 1 / 3) / 2, 6)
    assert by_group[(("c", (5,)),)] == round(3 / (8 / 6), 6)
    assert [value for value, _ in ranked] == sorted(value for value, _ in ranked)
    assert len(ranked) == 4 + 6  # the head's units are the output: locked, not ranked
    # a 50% share: a and b lose the two least important pairs (1: 0.5 and 2: 0.83), c its three lowest
    assert pruning.select(model, scores, "l1", 0.5) == {"a": [1, 2], "b": [1, 2], "c": [0, 1, 2]}
    # globally, 7 of the 14 scored channels: the ranking takes pair 1 (2 channels), then c's five 0.75s
    assert pruning.select(model, scores, "l1", 0.5, scope="global") == {"a": [1], "b": [1], "c": [0, 1, 2, 3, 4]}
    # never more than max_per_layer of a layer (c may lose 3 of 6 at 0.5)
    assert pruning.select(model, scores, "l1", 0.9, scope="global", max_per_layer=0.5)["c"] == [0, 1, 2]
    with pytest.raises(AuditError, match="per layer or globally"):
        pruning.select(model, scores, "l1", 0.5, scope="model")
    with pytest.raises(AuditError, match="ranked by one of"):
        pruning.select(model, scores, "dead", 0.5)


@pytest.fixture(scope="module")
def users_models():
    keras.utils.set_random_seed(0)
    return {"MobileNetV2": keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3), classes=5),
            "ResNet50": keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=5)}


@pytest.mark.parametrize("name", ["MobileNetV2", "ResNet50"])
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("share", [0.3, 0.5])
def test_the_share_asked_is_the_share_cut(users_models, name, scope, share):
    model = users_models[name]
    graph = groups.DependencyGraph(model)
    scores = _l1_scores(model)
    selection = pruning.select(model, scores, "l1", share, scope=scope, graph=graph)
    plan = pruning.plan(model, selection, graph, share=share).set_index("layer")
    assert (plan["removed"] == plan["selected"]).all()  # whole groups were selected: nothing grows
    biggest = max(len(channels) for group in graph.groups() for channels in group.filters.values())
    biggest_group = max(group.size for group in graph.groups())
    assert (plan["removed"] <= (0.9 * plan["channels"]).astype(int)).all()
    scored = [layer for layer in models.conv_layers(model) if layer in graph.producers()]
    channels = {layer: as_list(graph.producers()[layer].output)[0].shape[-1] for layer in scored}
    removed = {layer: int(plan["removed"].get(layer, 0)) for layer in scored}
    if scope == "layer":
        for layer in scored:
            asked = round(share * channels[layer])
            if layer in plan.index and plan.loc[layer, "kept because"]:
                continue  # a locked group (the stem of a residual chain's input): said in the plan
            assert asked - biggest < removed[layer] <= asked, (layer, asked, removed[layer])
    else:
        asked = share * sum(channels.values())
        assert asked <= sum(removed.values()) < asked + biggest_group


@pytest.mark.parametrize("name", ["MobileNetV2", "ResNet50"])
@pytest.mark.parametrize("target", [{"params": 0.6}, {"macs": 0.5}])
def test_a_parameter_or_mac_target_is_reached_and_the_smaller_model_equals_the_masked_one(users_models, name, target):
    model = users_models[name]
    graph = groups.DependencyGraph(model)
    selection = pruning.to_target(model, _l1_scores(model), "l1", graph=graph, **target)
    smaller = pruning.prune(model, selection, graph)
    chosen, _ = graph.expand(selection)
    params, macs = pruning.kept_cost(graph, chosen)
    assert params == smaller.count_params()  # counted without building, as built
    assert macs == pytest.approx(cost.cost(smaller).macs, rel=1e-6)
    kept = (smaller.count_params() / model.count_params() if "params" in target
            else cost.cost(smaller).macs / cost.cost(model).macs)
    assert abs(kept - next(iter(target.values()))) <= 0.02
    x = random_images(3, (64, 64, 3), seed=1)
    reference = pruning.masked(model, selection, graph)(x, training=False).numpy()
    np.testing.assert_allclose(smaller(x, training=False).numpy(), reference, rtol=1e-4, atol=1e-6)


def test_a_target_the_groups_cannot_reach_says_what_they_can():
    model = _residual_on_paper()
    with pytest.raises(AuditError, match=r"keeps \d+\.\d% of the parameters, more than the 5\.0% asked"):
        pruning.to_target(model, _l1_scores(model), "l1", params=0.05)


@pytest.mark.slow  # 15-25 s here: the default tier stays near 15 minutes
def test_iterative_pruning_reaches_half_the_parameters_in_three_steps_with_a_row_per_step():
    from audit.zoo import shapes

    loaded = models.load("demo:shapes")
    data = shapes.generate(240, 31)
    x = loaded.preprocess(list(data.images))
    tuned, table = pruning.iterative(loaded.model, x, data.labels, "l1", params=0.5, steps=3,
                                     tuning=pruning.Tuning(max_epochs=1, patience=1), seed=0)
    steps = table[table.step > 0]
    assert list(steps.step) == [1, 2, 3]
    assert abs(tuned.count_params() / loaded.model.count_params() - 0.5) <= 0.02
    assert steps["parameters kept"].iloc[-1] == tuned.count_params() / loaded.model.count_params()
    np.testing.assert_allclose(steps["parameters kept"], [5 / 6, 2 / 3, 1 / 2], atol=0.02)  # equal steps
    assert (np.diff(steps["MACs"]) < 0).all() and (steps["latency ms"] > 0).all()
    assert table.attrs["images_held_out"] == 60 and table.attrs["images_tuned"] == 180
    before = table[table.step == 0].iloc[0]
    assert before["accuracy fine-tuned"] == pruning.accuracy(loaded.model, x[pruning.split(data.labels)[1]],
                                                             data.labels[pruning.split(data.labels)[1]])["accuracy"]
    assert loaded.model.count_params() == before["parameters"]  # the loaded model is untouched


def test_latency_is_the_median_time_of_a_compiled_prediction_per_image():
    keras.utils.set_random_seed(0)
    small = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3), keras.layers.GlobalAveragePooling2D()])
    large = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(256, 3), keras.layers.Conv2D(256, 3),
                              keras.layers.GlobalAveragePooling2D()])
    assert 0 < pruning.latency(small) < pruning.latency(large)  # 1,500x the multiply-adds
    assert pruning.latency(large, batch_size=4, repeats=5) > 0


@pytest.mark.parametrize("name", ["MobileNetV3Small", "MobileNetV3Large"])
def test_squeeze_excite_channels_of_mobilenet_v3_prune_equal_to_masking_and_reload(name, tmp_path):
    """Its hard sigmoid is keras.ops arithmetic (x + 3, * 1/6): weightless operations in the graph, which once
    broke the surgery. The SE block's squeeze channels and the expanded channels it gates both go."""
    import subprocess
    import sys

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(64, 64, 3), classes=5,
                                             include_preprocessing=False)
    names = {layer.name for layer in model.layers}
    squeeze = next(name for name in sorted(names) if name.endswith("squeeze_excite_conv")
                   and name.replace("squeeze_excite_conv", "expand") in names)
    gated = squeeze.replace("squeeze_excite_conv", "expand")  # its channels are what the SE block gates
    selection = {squeeze: [0, 1], gated: [0, 1]}
    graph = groups.DependencyGraph(model)
    smaller = pruning.prune(model, selection, graph)
    x = random_images(2, (64, 64, 3), seed=3)
    expected = pruning.masked(model, selection, graph)(x, training=False).numpy()
    np.testing.assert_allclose(smaller(x, training=False).numpy(), expected, rtol=1e-4, atol=1e-6)
    plan = pruning.plan(model, selection, graph).set_index("layer")
    assert plan.loc[squeeze, "removed"] == 2 and plan.loc[gated, "removed"] >= 2
    assert smaller.count_params() == pruning.kept_cost(graph, graph.expand(selection)[0])[0] < model.count_params()
    smaller.save(tmp_path / "smaller.keras")
    np.save(tmp_path / "x.npy", x)
    check = ("import keras, numpy as np; m = keras.models.load_model('smaller.keras'); "
             "print(float(np.abs(m(np.load('x.npy'), training=False).numpy() - np.load('expected.npy')).max()))")
    np.save(tmp_path / "expected.npy", expected)
    done = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) < 1e-4


def test_one_entry_point_chooses_for_every_target_and_the_exports_reload_to_the_masked_model(tmp_path):
    model = _residual_on_paper()
    keras.utils.set_random_seed(1)
    model.set_weights([np.random.default_rng(2).normal(size=w.shape).astype(np.float32) for w in model.get_weights()])
    scores = _l1_scores(model)
    graph = groups.DependencyGraph(model)
    assert pruning.selection_for(model, scores, "l1", pruning.Target("layer", 0.5), graph) == \
        pruning.select(model, scores, "l1", 0.5, graph=graph)
    assert pruning.selection_for(model, scores, "l1", pruning.Target("global", 0.5), graph) == \
        pruning.select(model, scores, "l1", 0.5, "global", graph=graph)
    chosen = pruning.selection_for(model, scores, "l1", pruning.Target("params", 0.7), graph)
    assert chosen == pruning.to_target(model, scores, "l1", params=0.7, graph=graph)
    with pytest.raises(AuditError, match="share of the parameters to keep is between 0 and 1"):
        pruning.Target("params", 0.0)
    with pytest.raises(AuditError, match="Unknown pruning target"):
        pruning.Target("latency", 0.5)
    smaller = pruning.prune(model, chosen, graph)
    x = random_images(3, (6, 6, 2), seed=4)
    expected = pruning.masked(model, chosen, graph)(x).numpy()
    (tmp_path / "pruned.keras").write_bytes(pruning.keras_bytes(smaller))
    np.testing.assert_allclose(keras.models.load_model(tmp_path / "pruned.keras")(x).numpy(), expected, rtol=1e-5,
                               atol=1e-6)
    zipfile.ZipFile(io.BytesIO(pruning.saved_model_zip(smaller))).extractall(tmp_path)
    reloaded = tf.saved_model.load(str(tmp_path / "saved_model"))  # held: its variables live with it
    served = reloaded.serve(tf.constant(x))
    np.testing.assert_allclose(np.asarray(served), expected, rtol=1e-5, atol=1e-6)


def test_the_saved_model_of_a_legacy_h5_model_serves_the_image_tensor(tmp_path):
    """A model saved as legacy .h5 keeps its inputs as a list: `model.export` served it as `serve([x])`, and the
    documented `serve(x)` raised."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((6, 6, 3))
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.Conv2D(3, 3)(inputs)))
    keras.Model([inputs], outputs).save(tmp_path / "legacy.h5")
    legacy = keras.models.load_model(tmp_path / "legacy.h5", compile=False)
    x = random_images(2, (6, 6, 3), seed=1)
    zipfile.ZipFile(io.BytesIO(pruning.saved_model_zip(legacy))).extractall(tmp_path)
    reloaded = tf.saved_model.load(str(tmp_path / "saved_model"))
    np.testing.assert_allclose(np.asarray(reloaded.serve(tf.constant(x))), np.asarray(legacy(x)), rtol=1e-5, atol=1e-6)
