"""Gradient ascent: the objective rises, batching changes nothing, the result beats real inputs."""

import keras
import numpy as np
import pytest

from audit import compiled, filters, images, models
from audit.errors import AuditError


@pytest.fixture(scope="module")
def shapes():
    return models.load("demo:shapes")


def _options(**extra):
    return filters.Options(size=48, steps=12, preprocessing="tf", **extra)


def _mean_activation(model, layer, x, index):
    maps = np.asarray(models.submodel(model, layer)(x))
    h, w = maps.shape[1:3]
    b = int(h * 0.1)
    return maps[:, b:h - b or None, b:w - b or None, index].mean(axis=(1, 2))


def test_a_gallery_over_the_batch_budget_grows_in_chunks_with_the_one_batchs_images(shapes, monkeypatch):
    """With a batch budget of about two filters' forward and backward passes, 5 filters grow in 3 chunks (the
    progress counts every step of each) and give the one batch's gallery."""
    from audit import cost

    whole = filters.render(shapes.model, "block2_conv2", [1, 2, 3, 4, 5], _options(), seed=3)
    per_filter = 3 * cost.cost(models.submodel(shapes.model, "block2_conv2", any_size=True), (48, 48)).peak_bytes
    monkeypatch.setenv("CNN_AUDIT_MAX_BATCH_BYTES", str(2 * per_filter + 1))
    seen = []
    chunked = filters.render(shapes.model, "block2_conv2", [1, 2, 3, 4, 5], _options(), seed=3,
                             progress=lambda done, total: seen.append((done, total)))
    steps = _options().steps
    assert seen[-1] == (3 * steps, 3 * steps) and len(seen) == 3 * steps
    np.testing.assert_allclose(chunked.activations, whole.activations, rtol=1e-4)
    assert np.abs(chunked.images.astype(int) - whole.images.astype(int)).max() <= 1
    assert chunked.started.tolist() == whole.started.tolist() and chunked.curves.shape == whole.curves.shape


def test_objective_rises_for_every_filter_that_responds(shapes):
    result = filters.render(shapes.model, "block2_conv1", [0, 5, 9, 17], _options(), seed=3)
    responding = result.responded
    assert responding.sum() >= 3
    rose = result.curves[:, -1] > result.curves[:, 0]
    assert rose[responding].all(), result.curves[:, [0, -1]]
    assert result.images.dtype == np.uint8 and result.images.shape == (4, 48, 48, 3)


def test_a_batched_gallery_equals_each_filter_optimised_alone(shapes):
    batch = filters.render(shapes.model, "block2_conv2", [2, 7, 11], _options(), seed=5)
    for row, index in enumerate([2, 7, 11]):
        alone = filters.render(shapes.model, "block2_conv2", [index], _options(), seed=5)
        a = batch.images[row].astype(float).ravel()
        b = alone.images[0].astype(float).ravel()
        assert np.corrcoef(a, b)[0, 1] >= 0.99
        np.testing.assert_allclose(batch.activations[row], alone.activations[0], rtol=0.02)


def test_the_result_activates_its_filter_far_more_than_noise_and_real_images(shapes):
    layer, chosen = "block3_conv1", [1, 4, 8, 30]
    result = filters.render(shapes.model, layer, chosen, filters.Options(size=64, steps=30, preprocessing="tf"), seed=0)
    rng = np.random.default_rng(0)
    noise = shapes.preprocess(rng.integers(0, 256, (16, 64, 64, 3), dtype=np.uint8))
    from audit.zoo import shapes as generator

    demo = shapes.preprocess(generator.generate(24, seed=99).images)
    photos = shapes.preprocess([images.sample(n) for n in ("chelsea", "astronaut", "coffee", "rocket")])
    own = np.diag(_mean_activation(shapes.model, layer, shapes.preprocess(result.images), chosen))
    np.testing.assert_allclose(own, result.activations, rtol=2e-3, atol=1e-3)  # up to uint8 rounding
    for reference in (noise, demo, photos):
        baseline = _mean_activation(shapes.model, layer, reference, chosen).mean(axis=0)
        for k, index in enumerate(chosen):
            if result.responded[k]:
                assert own[k] >= 10 * max(baseline[k], 1e-3), (index, own[k], baseline[k])


def test_deterministic_by_seed(shapes):
    a = filters.render(shapes.model, "block1_conv2", [0, 1], _options(blur_every=3, l2_decay=0.01), seed=11)
    b = filters.render(shapes.model, "block1_conv2", [0, 1], _options(blur_every=3, l2_decay=0.01), seed=11)
    c = filters.render(shapes.model, "block1_conv2", [0, 1], _options(blur_every=3, l2_decay=0.01), seed=12)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)


def test_the_response_flag_follows_the_final_image_and_started_follows_the_ascent():
    curves = np.array([[0.0, 0.5, 0.2, 0.0],  # opened on the way, back to 0 at the end
                       [0.0, 0.0, 0.0, 0.0],  # never opened
                       [-1.0, 0.1, 0.3, 0.4],  # opened and stayed
                       [0.7, 0.0, 0.0, 0.0]])  # above 0 only during a one-step warm-up
    final = np.array([0.0, 1.1e-36, 0.4, 2e-6])  # round-off at a ReLU's edge is no response
    started, responded = filters.response_flags(curves, final)
    assert started.tolist() == [True, False, True, True] and responded.tolist() == [False, False, True, True]
    started, _ = filters.response_flags(curves, final, warmup=1)
    assert started.tolist() == [True, False, True, False]


def test_warmup_opens_a_filter_whose_relu_never_opens_from_noise():
    inputs = keras.Input((16, 16, 3))
    conv = keras.layers.Conv2D(2, 3, padding="same", activation="relu", name="conv")
    model = keras.Model(inputs, conv(inputs))
    kernel = np.zeros((3, 3, 3, 2), np.float32)
    kernel[1, 1, 0, :] = 1.0  # both filters read the red channel
    conv.set_weights([kernel, np.array([-0.9, -0.2], np.float32)])  # filter 0 is closed on grey (0.5)
    cold = filters.render(model, "conv", [0, 1], filters.Options(size=16, steps=10, jitter=0, scale=0), seed=0)
    warm = filters.render(model, "conv", [0, 1], filters.Options(size=16, steps=10, jitter=0, scale=0, warmup=5),
                          seed=0)
    assert cold.responded.tolist() == [False, True]  # no gradient through a closed ReLU
    assert cold.started.tolist() == [False, True]
    assert warm.responded.tolist() == [True, True]  # the pre-activation pushed red up until it opened
    assert warm.started.tolist() == [True, True]
    assert warm.activations[0] > 0


def test_class_images_use_the_score_before_the_softmax_and_leave_the_model_alone(shapes):
    before = [w.copy() for w in shapes.model.get_weights()]
    from audit import heads

    logits = heads.scores_model(shapes.model, heads.find_head(shapes.model))
    assert shapes.model.layers[-1].activation.__name__ == "softmax"
    x = shapes.preprocess(np.zeros((1, 64, 64, 3), np.uint8) + 128)
    probabilities = np.asarray(shapes.model(x))[0]
    scores = np.asarray(logits(x))[0]
    np.testing.assert_allclose(np.exp(scores) / np.exp(scores).sum(), probabilities, rtol=1e-4)
    result = filters.class_images(shapes.model, [0, 3], filters.Options(steps=15, preprocessing="tf"), seed=0)
    assert result.images.shape == (2, 64, 64, 3)  # a dense head fixes the size to the model's input
    assert (result.curves[:, -1] > result.curves[:, 0]).all()
    for a, b in zip(before, shapes.model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_first_layer_weights_and_bad_filter_indices(shapes):
    name, tiles = filters.first_layer_weights(shapes.model)
    assert name == "block1_conv1" and tiles.shape == (32, 3, 3, 3)
    assert tiles.min() == 0.0 and tiles.max() == 1.0
    with pytest.raises(AuditError, match="between 0 and 31"):
        filters.render(shapes.model, "block1_conv1", [32], _options())


def test_a_second_gallery_reuses_the_traced_step_and_a_dropped_model_takes_it_along():
    """Traced once per (model, layer, graph constants): the same images as a fresh trace, other constants
    traced apart, nothing kept alive once the model is gone."""
    import gc
    import weakref

    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((24, 24, 3)), keras.layers.Conv2D(4, 3, activation="relu", name="c1"),
                              keras.layers.Conv2D(4, 3, activation="relu", name="c2")])
    options = filters.Options(size=24, steps=4, jitter=1, preprocessing="unit")
    first = filters.render(model, "c2", [0, 1, 2], options, seed=5)
    traced = compiled.keys(model)
    second = filters.render(model, "c2", [0, 1, 2], options, seed=5)
    assert compiled.keys(model) == traced and len(traced) == 1
    np.testing.assert_array_equal(first.images, second.images)
    faster = filters.render(model, "c2", [0, 1, 2], filters.Options(**{**options.__dict__, "learning_rate": 0.5}),
                            seed=5)
    assert len(compiled.keys(model)) == 2 and not np.array_equal(faster.images, first.images)
    filters.render(model, "c2", [3], options, seed=5)  # other filters, same trace
    assert len(compiled.keys(model)) == 2
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_a_gallery_of_a_layer_after_a_fixed_size_nested_base_grows_at_its_own_size():
    """KerasHub's MobileNetV3 classifier: a conv after a nested backbone whose Input holds 64 px. The gallery's
    any-size cut called the backbone as one layer, which refused a 128 px image (the report's default late
    layer failed); every nested model is entered now."""
    import keras

    from audit import filters

    keras.utils.set_random_seed(0)
    base_in = keras.Input((32, 32, 3))
    base = keras.Model(base_in, keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="inner")(base_in),
                       name="base")
    inputs = keras.Input((32, 32, 3))
    top = keras.layers.Conv2D(3, 1, activation="relu", name="top")(base(inputs))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(top))
    gallery = filters.render(model, "top", [0, 1], filters.Options(steps=3, size=48))
    assert gallery.images.shape == (2, 48, 48, 3)
    assert np.all(np.isfinite(gallery.activations))
