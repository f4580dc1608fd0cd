"""Pruning: scores against numpy, surgery equal to masking, exact parameter counts, refusals."""

import keras
import numpy as np
import pandas as pd
import pytest

from audit import pruning
from audit.pruning import PruningError
from tests.fixtures import random_images


def _sequential_bn(seed=0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((12, 12, 3)),
        keras.layers.Conv2D(6, 3, padding="same", name="conv1"),
        keras.layers.BatchNormalization(name="bn1"),
        keras.layers.ReLU(name="relu1"),
        keras.layers.MaxPooling2D(name="pool1"),
        keras.layers.Conv2D(5, 3, padding="same", activation="relu", name="conv2"),
        keras.layers.MaxPooling2D(name="pool2"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(4, activation="softmax", name="dense"),
    ])
    bn = model.get_layer("bn1")  # non-trivial statistics, so slicing them matters
    rng = np.random.default_rng(seed)
    bn.set_weights([rng.uniform(0.5, 1.5, 6), rng.normal(0, 0.1, 6), rng.normal(0, 0.1, 6), rng.uniform(0.5, 1.5, 6)])
    return model


def _functional_chain(seed=1) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((10, 10, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="c1")(inputs)
    x = keras.layers.Conv2D(7, 3, activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(x))


@pytest.mark.parametrize("build, selection", [
    (_sequential_bn, {"conv1": [0, 4], "conv2": [1, 2, 3]}),
    (_functional_chain, {"c1": [2, 5, 7], "c2": [0]}),
])
def test_the_smaller_model_equals_the_masked_one_and_loses_exactly_those_parameters(build, selection):
    model = build()
    before = [w.copy() for w in model.get_weights()]
    smaller = pruning.prune(model, selection)
    masked = pruning.masked(model, selection)
    x = random_images(4, model.inputs[0].shape[1:], seed=7)
    np.testing.assert_allclose(smaller(x), masked(x), atol=1e-5)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)  # the input model is untouched
    expected = model.count_params()
    for name, dropped in selection.items():
        layer = model.get_layer(name)
        kh, kw, cin, _ = layer.get_weights()[0].shape
        expected -= len(dropped) * (kh * kw * cin + 1)  # the filters themselves
    # what reads them: recount by hand per model
    if build is _sequential_bn:
        expected -= 2 * 4  # bn1: gamma, beta, mean, variance of 2 channels
        expected -= 2 * 3 * 3 * (5 - 0)  # conv2 input rows of the 2 removed channels (5 filters before)
        expected += 2 * 3 * 3 * 3  # ...but conv2's 3 removed filters were counted with 6 inputs, not 4
        expected -= 3 * 9 * 4  # dense reads 3x3 positions x 3 removed channels x 4 units
    else:
        expected -= 3 * 3 * 3 * (7 - 1)  # c2's input rows of the 3 removed c1 channels, for the 6 kept filters
        expected -= 1 * 3  # the dense row of c2's removed channel
    assert smaller.count_params() == expected


def test_removing_filters_that_are_dead_on_a_set_changes_nothing_on_it():
    model = _functional_chain()
    c1 = model.get_layer("c1")
    kernel, bias = c1.get_weights()
    bias[[1, 3]] = -100.0  # never fire on inputs in [-1, 1]
    c1.set_weights([kernel, bias])
    x = random_images(6, (10, 10, 3), seed=3)
    from audit import activations

    stats = activations.filter_stats(model, ["c1"], x)
    dead = list(stats.loc[stats.dead, "filter"])
    assert dead == [1, 3]
    smaller = pruning.prune(model, {"c1": dead})
    np.testing.assert_allclose(smaller(x), model(x), atol=1e-5)


def test_a_residual_group_goes_from_both_sides_of_the_add():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 4))
    a = keras.layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = keras.layers.Conv2D(4, 3, padding="same", name="b")(a)
    out = keras.layers.Add(name="add")([a, b])
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling2D()(out)))
    smaller = pruning.prune(model, {"a": [0]})
    # by hand: a loses filter 0 (3*3*4 + 1); b loses filter 0 (its channel is added to a's) and, in its 3
    # other filters, the input rows of a's channel 0 (3*3*1*3); the head loses the row of channel 0 (3)
    assert model.count_params() - smaller.count_params() == 37 + 37 + 27 + 3
    x = random_images(3, (8, 8, 4), seed=2)
    np.testing.assert_allclose(smaller(x), pruning.masked(model, {"b": [0]})(x), rtol=1e-4, atol=1e-6)
    assert list(pruning.plan(model, {"a": [0]})["removed"]) == [1, 1]  # a and b, one channel each


def test_channels_that_are_the_models_output_are_kept_with_the_reason():
    inputs = keras.Input((8, 8, 4))
    a = keras.layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = keras.layers.Conv2D(4, 3, padding="same", name="b")(a)
    model = keras.Model(inputs, keras.layers.Flatten()(keras.layers.Add(name="add")([a, b])))
    with pytest.raises(PruningError, match="model's output"):
        pruning.prune(model, {"a": [0]})
    assert "model's output" in pruning.plan(model, {"b": [1]})["kept because"].item()


def test_scores_equal_numpy_recomputations():
    model = _functional_chain()
    kernel = model.get_layer("c2").get_weights()[0]
    flat = kernel.reshape(-1, 7).T
    np.testing.assert_allclose(pruning.l1_norms(model, "c2"), np.abs(flat).sum(axis=1), rtol=1e-6)
    similarity, nearest, fpgm = pruning.redundancy(model, "c2")
    cosine = (flat @ flat.T) / np.outer(np.linalg.norm(flat, axis=1), np.linalg.norm(flat, axis=1))
    np.fill_diagonal(cosine, -2)
    np.testing.assert_allclose(similarity, cosine.max(axis=1), rtol=1e-5)
    np.testing.assert_array_equal(nearest, cosine.argmax(axis=1))
    distances = np.linalg.norm(flat[:, None] - flat[None], axis=-1)  # FPGM: summed distance to the others
    np.testing.assert_allclose(fpgm, distances.sum(axis=1), rtol=1e-5)

    x = random_images(5, (10, 10, 3), seed=2)
    labels = np.array([0, 1, 2, 0, 1])
    scores = pruning.filter_scores(model, x, labels)
    assert list(scores.columns[:4]) == ["layer", "filter", "l1", "apoz"]
    assert len(scores) == 8 + 7
    assert scores.loc[scores.layer == "c2", "l1"].tolist() == pytest.approx(np.abs(flat).sum(axis=1).tolist(), rel=1e-6)


def test_taylor_scores_match_a_tape_on_a_softmax_model():
    import tensorflow as tf

    model = _sequential_bn()
    x = random_images(6, (12, 12, 3), seed=4)
    labels = np.array([0, 1, 2, 3, 0, 1])
    got = pruning.taylor_scores(model, "conv2", x, labels, batch_size=4)
    cut = keras.Model(model.inputs[0], [model.get_layer("conv2").output, model.outputs[0]])
    with tf.GradientTape() as tape:
        maps, probabilities = cut(x)
        tape.watch(maps)
        log_p = tf.reduce_sum(tf.math.log(tf.gather(probabilities, labels, axis=1, batch_dims=1) + 1e-12))
    products = (maps * tape.gradient(log_p, maps)).numpy()
    expected = np.abs(products.mean(axis=(0, 1, 2)))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    # its sampling noise: the standard error over the images of each image's mean a * g
    scores = pruning.filter_scores(model, x, labels)
    per_image = products.mean(axis=(1, 2))
    np.testing.assert_allclose(scores.loc[scores.layer == "conv2", "taylor_se"],
                               per_image.std(axis=0) / np.sqrt(len(x)), rtol=1e-3, atol=1e-8)


def test_flops_fall_when_filters_go():
    model = _sequential_bn()
    # conv1 3*3*3*6*144 + conv2 3*3*6*5*36 + dense 45*4
    assert pruning.flops(model) == 3 * 3 * 3 * 6 * 144 + 3 * 3 * 6 * 5 * 36 + 45 * 4
    smaller = pruning.prune(model, {"conv1": [0, 1, 2]})
    assert pruning.flops(smaller) == 3 * 3 * 3 * 3 * 144 + 3 * 3 * 3 * 5 * 36 + 45 * 4


def test_surgery_ignores_calls_made_on_the_layers_by_other_graphs():
    # the dashboard builds sub-models on the loaded model's layers; their nodes must not look like branches
    from audit import models

    model = _sequential_bn()
    models.submodel(model, "conv2", any_size=True)  # re-calls conv1..conv2 on a new input
    models.submodel(model, "conv1", pre_activation=True)
    x = random_images(2, (12, 12, 3), seed=1)
    smaller = pruning.prune(model, {"conv1": [1]})
    np.testing.assert_allclose(smaller(x), pruning.masked(model, {"conv1": [1]})(x), atol=1e-5)


def test_the_verdict_counts_wins_not_ties_and_knows_which_way_is_better():
    import pandas as pd

    runs = pd.DataFrame({"ranking": ["chosen", "inverted", "random 0", "random 1", "random 2"] * 2,
                         "fraction": [0.5] * 5 + [0.9] * 5,
                         "accuracy": [1.0, 0.4, 1.0, 0.9, 0.8, 0.2, 0.1, 0.5, 0.5, 0.5],
                         "kl": [0.01, 0.4, 0.02, 0.3, 0.5, 3.0, 4.0, 1.0, 1.0, 1.0]})
    assert pruning.verdict_against_chance(runs, "accuracy", 0.5) == {"beaten": 2, "random": 3, "inverted_worst": True}
    assert pruning.verdict_against_chance(runs, "kl", 0.5) == {"beaten": 3, "random": 3, "inverted_worst": False}
    assert pruning.verdict_against_chance(runs, "accuracy", 0.9) == {"beaten": 0, "random": 3, "inverted_worst": True}


@pytest.mark.slow
def test_on_the_demo_model_the_l1_ranking_beats_chance_and_its_inverse_loses():
    from audit import models
    from audit.zoo import shapes as generator

    loaded = models.load("demo:shapes")
    data = generator.generate(300, seed=4242)
    x = loaded.preprocess(data.images)
    scores = pruning.filter_scores(loaded.model, x, data.labels)
    result = pruning.ranking_against_chance(loaded.model, scores, "block3_conv2", "l1", x, data.labels, fractions=[0.5])
    random = result.loc[result.ranking.str.startswith("random"), "accuracy"]
    assert len(random) == 20 and random.min() < 0.9  # a sensitive layer: measured 0.80 at worst
    verdict = pruning.verdict_against_chance(result, "accuracy")
    assert verdict["beaten"] >= 19 and verdict["inverted_worst"], verdict  # measured: 20 of 20; inverted 0.38
    sensitivity = pruning.sensitivity(loaded.model, scores, "l1", x[:60], data.labels[:60], fractions=[0.1, 0.9])
    assert set(sensitivity.layer) == set(models.conv_layers(loaded.model)) and len(sensitivity) == 12
    # cutting 90% hurts more than cutting 10%, in every layer
    pivot = sensitivity.pivot(index="layer", columns="fraction", values="accuracy")
    assert (pivot[0.9] <= pivot[0.1]).all()


def test_leave_one_out_equals_zeroing_each_filter_by_hand():
    from tests.fixtures import tiny_cnn

    model = tiny_cnn(seed=3)
    x = random_images(12, seed=5)
    labels = np.arange(12) % 3
    base = model.predict(x, verbose=0)

    def cross_entropy(outputs, target):
        return -np.mean(np.log(outputs[np.arange(len(target)), target] + 1e-12))

    for given in (labels, None):
        target = labels if given is not None else base.argmax(1)
        expected = []
        for index in range(4):
            copy = keras.models.clone_model(model)
            kernel, bias = [w.copy() for w in model.get_layer("conv1").get_weights()]
            kernel[..., index], bias[index] = 0, 0
            copy.set_weights(model.get_weights())
            copy.get_layer("conv1").set_weights([kernel, bias])
            expected.append(cross_entropy(copy.predict(x, verbose=0), target) - cross_entropy(base, target))
        np.testing.assert_allclose(pruning.leave_one_out(model, "conv1", x, given), expected, atol=1e-5)


def test_importance_correlation_is_spearmans_rho_with_apoz_flipped():
    import pandas as pd
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    cost = rng.random(10)
    scores = pd.DataFrame({"layer": "conv", "filter": np.arange(10)[::-1], "l1": rng.random(10),
                           "mean": np.zeros(10), "taylor": np.nan, "fpgm": rng.random(10), "apoz": np.zeros(10)})
    scores = scores.sort_values("filter", ascending=False)  # rows out of filter order on purpose
    in_order = scores.sort_values("filter")
    scores.loc[:, "apoz"] = 1 - cost[scores["filter"]]  # more zeros where removing costs less: a perfect signal
    result = pruning.importance_correlation(scores, {"conv": cost}).iloc[0]
    assert result["l1"] == pytest.approx(spearmanr(in_order["l1"], cost).statistic)
    assert result["fpgm"] == pytest.approx(spearmanr(in_order["fpgm"], cost).statistic)
    assert result["apoz"] == pytest.approx(1.0)
    assert "taylor" not in result  # no Taylor scores (no class output): no correlation claimed


@pytest.mark.slow
def test_on_the_demo_model_l1_and_fpgm_rank_filters_like_their_true_cost():
    """Measured on 120 images (rho per layer, L1 / FPGM): block1_conv1 .24/.16, block1_conv2 -.08/.07,
    block2_conv1 .00/.02, block2_conv2 .39/.42, block3_conv1 .05/.09, block3_conv2 .25/.25: weak but
    positive for the default criterion (L1) where pruning matters; checked on the two deepest layers."""
    from audit import models
    from audit.zoo import shapes as generator

    loaded = models.load("demo:shapes")
    data = generator.generate(300, seed=4242)
    x = loaded.preprocess(data.images)
    scores = pruning.filter_scores(loaded.model, x, data.labels)
    layers = ("block2_conv2", "block3_conv2")
    costs = {layer: pruning.leave_one_out(loaded.model, layer, x[:120], data.labels[:120]) for layer in layers}
    assert all(len(costs[layer]) == int(loaded.model.get_layer(layer).filters) for layer in layers)
    for layer in layers:  # a filter that never fires on these images costs nothing to remove
        dead = scores[(scores.layer == layer) & scores.dead]["filter"].to_numpy()
        np.testing.assert_allclose(costs[layer][dead], 0, atol=1e-6)
    correlation = pruning.importance_correlation(scores, costs).set_index("layer")
    assert (correlation["l1"] > 0.15).all(), correlation
    assert (correlation["fpgm"] > 0.15).all(), correlation


def test_lowest_share_takes_the_lowest_whole_number_of_each_layer():
    import pandas as pd

    scores = pd.DataFrame({"layer": ["a"] * 4 + ["b"] * 3, "filter": [0, 1, 2, 3, 0, 1, 2],
                           "l1": [4.0, 1.0, 3.0, 1.0, 9.0, 8.0, 7.0]})
    # a: 4 x 0.5 = 2 lowest (the tie at 1.0 both); b: 3 x 0.5 = 1.5 -> 1 lowest
    assert list(pruning.lowest_share(scores, "l1", 0.5)) == [False, True, False, True, False, False, True]
    assert not pruning.lowest_share(scores, "l1", 0.2).any()  # under one filter per layer: none


def test_fpgm_ranks_like_the_summed_distance_of_the_paper_on_the_demo_model():
    from scipy.stats import spearmanr

    from audit import models

    model = models.load("demo:shapes").model
    kernel = model.get_layer("block3_conv1").get_weights()[0]
    flat = kernel.reshape(-1, kernel.shape[-1]).T.astype(np.float64)
    summed = np.linalg.norm(flat[:, None] - flat[None], axis=-1).sum(axis=1)  # He et al. 2019, eq. 4
    _, _, fpgm = pruning.redundancy(model, "block3_conv1")
    assert spearmanr(fpgm, summed).statistic > 0.99
    np.testing.assert_allclose(fpgm, summed, rtol=1e-6)


@pytest.mark.slow  # 15-25 s here: the default tier stays near 15 minutes
def test_fine_tuning_recovers_what_pruning_half_of_two_layers_lost_on_the_demo_model():
    from audit import models
    from audit.zoo import shapes

    loaded = models.load("demo:shapes")
    data = shapes.generate(480, 777)
    x = loaded.preprocess(list(data.images))
    scores = pruning.filter_scores(loaded.model, x[:120], data.labels[:120])
    selection = {layer: sorted(scores[scores.layer == layer].nsmallest(len(scores[scores.layer == layer]) // 2, "l1")
                               ["filter"].astype(int)) for layer in ("block2_conv2", "block3_conv2")}
    found = pruning.recovery(loaded.model, selection, x, data.labels, pruning.Tuning(max_epochs=2, patience=1), seed=0)
    row = found.table.set_index("model")
    assert row.loc["before pruning", "accuracy"] >= 0.99
    assert "chosen ranking, BN recalibrated" not in row.index  # the demo has no BatchNorm
    # the L1 cut loses nothing on this robust model (100% stays 100%): nothing for fine-tuning to win back
    # there (the epochs are chosen on held-out loss, and the weights before fine-tuning count); the random cut of
    # the same size loses and recovers
    held_out = 120
    assert row.loc["chosen ranking, fine-tuned", "accuracy"] >= row.loc["chosen ranking, cut", "accuracy"] - 2 / held_out
    assert row.loc["chosen ranking, fine-tuned", "cross-entropy"] < row.loc["random ranking, same size, cut", "cross-entropy"]
    assert row.loc["random ranking, same size, fine-tuned", "accuracy"] > row.loc["random ranking, same size, cut", "accuracy"]
    assert row.loc["chosen ranking, cut", "accuracy"] > row.loc["random ranking, same size, cut", "accuracy"]
    chosen = row.loc["chosen ranking, cut", "parameters"]
    assert abs(row.loc["random ranking, same size, cut", "parameters"] / chosen - 1) <= 0.01
    assert found.models[found.best()].count_params() == chosen < loaded.model.count_params()


def test_weight_scores_kept_per_model_follow_a_change_of_the_weights():
    model = _functional_chain()
    first = pruning.redundancy(model, "c2")[2].copy()
    layer = model.get_layer("c2")
    kernel, bias = layer.get_weights()
    kernel[..., 0] *= 3.0
    layer.set_weights([kernel, bias])
    flat = kernel.reshape(-1, 7).T.astype(np.float64)
    summed = np.linalg.norm(flat[:, None] - flat[None], axis=-1).sum(axis=1)
    np.testing.assert_allclose(pruning.redundancy(model, "c2")[2], summed, rtol=1e-5)
    assert not np.allclose(first, summed)


def test_a_pooled_feature_vector_is_measured_as_features_not_as_classes():
    """A base pooled to a feature vector has the shape of class scores (images, values): the what-if and the
    sensitivity measure the features' relative error, not a KL of values that are no probabilities."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="c")(inputs)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    x = np.random.default_rng(0).random((4, 16, 16, 3)).astype(np.float32)
    before = model.predict(x, verbose=0)
    after = before.copy()
    after[:, [0, 1]] = 0  # silencing two of the conv's filters zeroes their pooled features
    expected = np.linalg.norm(after - before) / np.linalg.norm(before)
    assert pruning.what_if(model, {"c": [0, 1]}, x) == {"feature_error": pytest.approx(expected, rel=1e-5)}
    scores = pd.DataFrame({"layer": "c", "filter": range(8), "l1": range(8)})
    table = pruning.sensitivity(model, scores, "l1", x, fractions=[0.25])
    assert list(table.columns) == ["layer", "fraction", "feature_error"]
    assert table.feature_error[0] == pytest.approx(expected, rel=1e-5)  # the two lowest-L1 filters: 0 and 1


def test_quality_measures_equal_the_formulas_by_hand():
    before = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    after = np.array([[0.5, 0.4, 0.1], [0.6, 0.3, 0.1]])
    measured = pruning.quality(before, after, labels=np.array([0, 0]), classes=True)
    # KL row 1: 0.7 ln(0.7/0.5) + 0.2 ln(0.2/0.4) = 0.096901; row 2: 0.1 ln(0.1/0.6) + 0.8 ln(0.8/0.3) = 0.605487
    assert measured["agreement"] == 0.5 and measured["accuracy"] == 1.0
    np.testing.assert_allclose(measured["kl"], (0.096901 + 0.605487) / 2, atol=1e-6)
    # several sigmoid classes: the mean over classes of each one's Bernoulli KL
    independent = pruning.quality(np.array([[0.9, 0.5]]), np.array([[0.6, 0.5]]), independent=True, classes=True)
    bernoulli = 0.9 * np.log(0.9 / 0.6) + 0.1 * np.log(0.1 / 0.4)  # = 0.226294; the 0.5 class adds 0
    np.testing.assert_allclose(independent["kl"], bernoulli / 2, rtol=1e-9)
    features = pruning.quality(np.array([[3.0, 4.0]]).T, np.array([[3.0, 0.0]]).T, classes=False)
    assert features == {"feature_error": 0.8}  # ||(0, -4)|| / ||(3, 4)||
    # summed batch by batch from an empty start (a streamed set): one pass's figures, of either kind
    rows = [pruning.QualitySums.of(before[i:i + 1], after[i:i + 1], np.array([0]), classes=True) for i in range(2)]
    assert pruning.QualitySums().merge(rows[0]).merge(rows[1]).result() == pytest.approx(measured)
    parts = [pruning.QualitySums.of(np.array([[3.0]]), np.array([[3.0]]), classes=False),
             pruning.QualitySums.of(np.array([[4.0]]), np.array([[0.0]]), classes=False)]
    assert pruning.QualitySums().merge(parts[0]).merge(parts[1]).result() == {"feature_error": 0.8}
