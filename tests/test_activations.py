import keras
import numpy as np
import pytest

from audit import activations, models
from audit.errors import UnknownLayerError
from tests.fixtures import nested_cnn, random_images, tiny_cnn


def _numpy_stats(a: np.ndarray, threshold=0.0):
    """The reference: statistics straight from the full activation tensor (N, H, W, C)."""
    flat = a.reshape(-1, a.shape[-1]).astype(np.float64)
    per_image_max = a.reshape(a.shape[0], -1, a.shape[-1]).max(axis=1)
    return {
        "mean": flat.mean(0), "std": flat.std(0), "max": flat.max(0), "apoz": (flat <= threshold).mean(0),
        "fires": (per_image_max > threshold).mean(0), "dead": flat.max(0) <= threshold,
    }


def test_every_statistic_equals_a_numpy_computation_on_the_full_tensor():
    model = tiny_cnn()
    x = random_images(10, seed=3)
    stats = activations.filter_stats(model, ["conv1", "conv2", "flatten"], x, batch_size=3)
    assert list(stats.columns[:8]) == ["layer", "filter", "mean", "std", "max", "apoz", "fires", "dead"]
    for layer in ("conv1", "conv2", "flatten"):
        full = np.asarray(keras.Model(model.inputs[0], model.get_layer(layer).output)(x))
        expected = _numpy_stats(full)
        got = stats[stats.layer == layer]
        assert list(got["filter"]) == list(range(full.shape[-1]))
        for column in ("mean", "std", "max", "apoz", "fires"):
            np.testing.assert_allclose(got[column], expected[column], rtol=1e-5, atol=1e-6, err_msg=column)
        np.testing.assert_array_equal(got["dead"], expected["dead"])
        # the standard errors over the images: each image's share of zeros and its mean are one draw each
        per_image = full.reshape(len(x), -1, full.shape[-1])
        for column, values in (("apoz_se", (per_image <= 0).mean(axis=1)), ("mean_se", per_image.mean(axis=1))):
            np.testing.assert_allclose(got[column], values.std(axis=0) / np.sqrt(len(x)), rtol=1e-4, atol=1e-6,
                                       err_msg=column)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_dead_and_apoz_follow_the_users_threshold(threshold):
    """APoZ counts values at or below the threshold, so dead (never above it) is exactly APoZ = 1, at any
    threshold; near-dead is APoZ above the bound among the others."""
    model = tiny_cnn()
    x = random_images(10, seed=3) * 3
    stats = activations.filter_stats(model, ["conv1", "conv2"], x, threshold=threshold)
    for layer in ("conv1", "conv2"):
        full = np.asarray(keras.Model(model.inputs[0], model.get_layer(layer).output)(x))
        expected = _numpy_stats(full, threshold)
        got = stats[stats.layer == layer]
        np.testing.assert_allclose(got["apoz"], expected["apoz"], rtol=1e-6)
        np.testing.assert_array_equal(got["dead"], expected["dead"])
    assert (stats.dead == (stats.apoz == 1.0)).all()
    counts = activations.dead_counts(stats, near_dead_apoz=0.9)
    assert counts.dead.sum() == (stats.apoz == 1.0).sum()
    assert counts.near_dead.sum() == ((stats.apoz > 0.9) & (stats.apoz < 1.0)).sum()
    if threshold == 1.0:
        assert stats.dead.sum() > (stats["max"] <= 0).sum()  # the threshold really moved the line


def test_filters_forced_dead_by_a_large_negative_bias_are_exactly_the_dead_ones():
    inputs = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")
    model = keras.Model(inputs, conv(inputs))
    kernel, bias = conv.get_weights()
    rng = np.random.default_rng(0)
    kernel = rng.normal(0, 0.1, kernel.shape).astype(np.float32)
    bias[:] = 0.0
    bias[[1, 4]] = -1000.0  # inputs are in [-1, 1]: these two can never fire
    conv.set_weights([kernel, bias])
    stats = activations.filter_stats(model, ["conv"], random_images(20, (8, 8, 3), seed=1))
    assert list(stats.loc[stats.dead, "filter"]) == [1, 4]
    assert (stats.loc[stats.dead, "apoz"] == 1.0).all() and (stats.loc[stats.dead, "max"] == 0.0).all()
    counts = activations.dead_counts(stats)
    assert counts.to_dict("records") == [{"layer": "conv", "dead": 2, "near_dead": 0, "no_zero_floor": 0, "total": 6,
                                          "alive": 4}]


def test_merging_the_sums_of_two_halves_equals_one_pass():
    model = tiny_cnn()
    x = random_images(12, seed=5)
    # batches of 7 split where the halves do, so the float32 sums per batch are the same ones
    whole = activations.filter_sums(model, ["conv1", "conv2"], x, batch_size=7)
    first = activations.filter_sums(model, ["conv1", "conv2"], x[:7])
    second = activations.filter_sums(model, ["conv1", "conv2"], x[7:])
    merged = {layer: first[layer].merge(second[layer]) for layer in first}
    one = activations.stats_frame(whole)
    two = activations.stats_frame(merged)
    for column in ("mean", "std", "max", "apoz", "fires"):
        np.testing.assert_allclose(two[column], one[column], rtol=1e-9, atol=1e-12)


def test_near_dead_counts_use_the_apoz_bound():
    import pandas as pd

    stats = pd.DataFrame({"layer": ["a"] * 4, "filter": range(4), "apoz": [1.0, 0.995, 0.5, 0.999],
                          "dead": [True, False, False, False]})
    counts = activations.dead_counts(stats, near_dead_apoz=0.99).iloc[0]
    assert (counts.dead, counts.near_dead, counts.alive, counts.total) == (1, 2, 1, 4)


def test_layer_maps_inside_nested_models_and_before_the_activation():
    model = nested_cnn()
    x = random_images(1, seed=2)
    maps = activations.layer_maps(model, "conv1", x[0])
    base = model.get_layer("base")
    reference = np.asarray(keras.Model(base.inputs[0], base.get_layer("conv1").output)(x))[0]
    np.testing.assert_allclose(maps, reference, rtol=1e-6)
    before = activations.layer_maps(model, "conv1", x, pre_activation=True)
    np.testing.assert_allclose(np.maximum(before, 0), maps, rtol=1e-5, atol=1e-6)
    assert before.min() < 0  # the ReLU really was removed
    with pytest.raises(UnknownLayerError):
        activations.layer_maps(model, "conv9", x)


def test_montage_grid_normalisation_and_strongest_channel():
    assert activations.grid_shape(96) == (8, 12)
    assert activations.grid_shape(64) == (8, 8)
    assert activations.grid_shape(512) == (16, 32)
    assert activations.grid_shape(7) == (2, 4)  # a prime: square-ish with a blank
    maps = np.zeros((2, 3, 4), np.float32)
    maps[..., 1] = np.arange(6).reshape(2, 3)  # 0..5
    maps[0, 0, 3] = 9.0
    tiled = activations.montage(maps, gap=1)
    assert tiled.shape == (2 * 2 + 1, 2 * 3 + 1)
    np.testing.assert_allclose(tiled[0:2, 4:7], np.arange(6).reshape(2, 3) / 5)  # channel 1, top right
    assert tiled[0:2, 0:3].max() == 0  # a flat channel shows as 0
    assert activations.strongest_channel(maps) == 3
    up = activations.upsample(np.array([[0.0, 1.0]], np.float32), (2, 4))
    assert up.shape == (2, 4) and up[0, 0] == 0.0 and up[0, -1] == 1.0


def test_statistics_on_the_demo_vgg16_conv_layers_on_a_photo():
    from audit import images

    loaded = models.load("demo:vgg16")
    x = loaded.preprocess(images.sample("chelsea"))
    layers = models.conv_layers(loaded.model)[:2]
    stats = activations.filter_stats(loaded.model, layers, x)
    assert len(stats) == 128 and set(stats.layer) == set(layers)
    assert (stats["std"] >= 0).all() and ((stats.apoz >= 0) & (stats.apoz <= 1)).all()


def test_png_and_tiles_keep_every_pixel():
    import io

    from PIL import Image

    from audit import render

    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (4, 5, 3), dtype=np.uint8) for _ in range(3)]
    grid = render.tiles(pictures, columns=2, gap=1)
    assert grid.shape == (9, 11, 3)
    np.testing.assert_array_equal(grid[5:9, 0:5], pictures[2])
    assert (grid[4] == 255).all() and (grid[5:, 6:] == 255).all()  # gaps and the empty cell are white
    decoded = np.asarray(Image.open(io.BytesIO(render.png(grid))))
    np.testing.assert_array_equal(decoded, grid)
    half = np.asarray(Image.open(io.BytesIO(render.png(np.full((2, 2), 0.5)))))
    assert (half == 128).all()


def _conv_bn_relu() -> keras.Model:
    """Conv (1x1, 2 filters) -> BatchNormalization -> ReLU, weights set by hand so the answer is on paper.

    Filter 0 copies the pixel (raw output mostly positive); its BN subtracts 10 (beta = -10), so after the
    ReLU it is 0 everywhere: dead. Filter 1 negates the pixel (raw output mostly negative); its BN's
    gamma = -1 flips it back, so after the ReLU it is the pixel itself wherever that is positive.
    """
    inputs = keras.Input((4, 4, 1))
    x = keras.layers.Conv2D(2, 1, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.Conv2D(3, 3, name="next")(x)
    model = keras.Model(inputs, keras.layers.Flatten()(x))
    model.get_layer("conv").set_weights([np.array([[[[1.0, -1.0]]]], np.float32), np.zeros(2, np.float32)])
    epsilon = model.get_layer("bn").epsilon
    model.get_layer("bn").set_weights([np.array([1.0, -1.0]), np.array([-10.0, 0.0]), np.zeros(2),
                                       np.full(2, 1.0 - epsilon)])  # variance + epsilon = 1: BN is gamma * x + beta
    return model


def _pixels() -> np.ndarray:
    """Two 4x4 grey images of values 1..5, each with one pixel at -1."""
    x = np.random.default_rng(0).integers(1, 6, (2, 4, 4, 1)).astype(np.float32)
    x[0, 0, 0, 0] = x[1, 3, 2, 0] = -1.0
    return x


def test_a_filter_is_measured_after_its_batchnorm_and_relu_with_the_numbers_on_paper():
    model, x = _conv_bn_relu(), _pixels()
    stats = activations.filter_stats(model, ["conv"], x).set_index("filter")
    assert list(stats.measured_at) == ["relu", "relu"]
    # filter 0: relu(x - 10) = 0 everywhere although its raw output x is positive at 31 of 32 positions
    assert stats.loc[0, "dead"] and stats.loc[0, "apoz"] == 1.0 and stats.loc[0, "max"] == 0.0
    # filter 1: relu(-(-x)) = relu(x): zero only at the two -1 pixels though its raw output -x is mostly negative
    assert not stats.loc[1, "dead"]
    assert stats.loc[1, "apoz"] == pytest.approx(2 / 32)
    assert stats.loc[1, "mean"] == pytest.approx(np.maximum(x, 0).mean(), rel=1e-6)
    assert stats.loc[1, "max"] == x.max() and stats.loc[1, "fires"] == 1.0
    # the raw conv output, named as such, has no zero floor: no APoZ, nothing dead
    raw = activations.filter_stats(model, ["conv"], x, at="output").set_index("filter")
    assert list(raw.measured_at) == ["conv", "conv"] and raw.apoz.isna().all() and not raw.dead.any()
    assert raw.loc[1, "mean"] == pytest.approx(-x.mean(), rel=1e-6)
    counts = activations.dead_counts(activations.filter_stats(model, ["conv", "bn"], x))
    assert counts.to_dict("records") == [
        {"layer": "conv", "dead": 1, "near_dead": 0, "no_zero_floor": 0, "total": 2, "alive": 1},
        {"layer": "bn", "dead": 0, "near_dead": 0, "no_zero_floor": 2, "total": 2, "alive": 0}]


@pytest.mark.parametrize("after", ["elu", "linear", "swish"])
def test_apoz_and_dead_are_not_given_where_the_output_has_no_zero_floor(after):
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, activation="swish" if after == "swish" else None, name="conv")(inputs)
    if after == "elu":
        x = keras.layers.ELU(name="elu")(x)
    x = keras.layers.Conv2D(2, 1, name="next")(x)
    model = keras.Model(inputs, x)
    stats = activations.filter_stats(model, ["conv"], random_images(3, (6, 6, 3), seed=4))
    assert set(stats.measured_at) == {"elu" if after == "elu" else "conv"}
    assert stats.apoz.isna().all() and stats.fires.isna().all() and not stats.dead.any()
    assert stats["mean"].notna().all()
    assert list(activations.unfloored_layers(stats).itertuples(index=False)) == [("conv", stats.measured_at[0])]
