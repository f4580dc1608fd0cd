"""Compiled work kept per model (audit.compiled): traced once, reused for another image, class or filter,
bounded, and released with the model."""

import gc
import weakref

import keras
import numpy as np
import tensorflow as tf

from audit import attribution, compiled


def _model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((12, 12, 3)), keras.layers.Conv2D(4, 3, activation="relu", name="c1"),
                             keras.layers.Conv2D(5, 3, activation="relu", name="c2"),
                             keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, name="logits")])


def _images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, 12, 12, 3)).astype(np.float32)


def test_another_image_and_class_reuse_the_traced_gradient_and_match_an_eager_tape():
    model = _model()
    x = _images(2, 1)
    first = attribution.Scorer(model, 0)
    gradient, _ = first.gradients(x[:1])
    second = attribution.Scorer(model, 2)
    other, scores = second.gradients(x[1:])
    assert first._pass is second._pass
    assert second._pass.backward.experimental_get_tracing_count() == 1
    # the reference: an eager tape on the model's logits (a linear head: the scores are the logits)
    for image, index, got in ((x[:1], 0, gradient), (x[1:], 2, other)):
        tensor = tf.constant(image)
        with tf.GradientTape() as tape:
            tape.watch(tensor)
            logit = model(tensor)[:, index]
        np.testing.assert_allclose(got, tape.gradient(logit, tensor).numpy(), atol=1e-5)
    np.testing.assert_allclose(scores, model(x[1:]).numpy()[:, 2], atol=1e-5)


def test_a_filter_target_is_its_mean_activation_and_other_filters_share_the_trace():
    model = _model()
    x = _images(3, 2)
    maps = keras.Model(model.inputs, model.get_layer("c2").output)(x).numpy()
    for index in (0, 4):
        scorer = attribution.Scorer(model, attribution.FilterTarget("c2", index))
        np.testing.assert_allclose(scorer(x), maps[..., index].mean(axis=(1, 2)), atol=1e-6)
    assert len([key for key in compiled.keys(model) if key[1] == "c2"]) == 1


def test_a_cam_pass_stops_at_its_layer_and_names_a_layer_the_score_does_not_read():
    model = _model()
    x = _images(1, 3)
    (maps,), (gradients,), _ = attribution.Scorer(model, 1, points=("c2",)).point_gradients(x)
    assert maps.shape == gradients.shape == (1, 8, 8, 5)
    # d logit_1 / d c2 = w[:, 1] / 64 at every position (global average pooling, then Dense)
    weights = model.get_layer("logits").get_weights()[0][:, 1]
    np.testing.assert_allclose(gradients[0], np.broadcast_to(weights / 64, (8, 8, 5)), atol=1e-6)
    (_,), (unread,), _ = attribution.Scorer(model, attribution.FilterTarget("c1", 0), points=("c2",)).point_gradients(x)
    assert np.isnan(unread).all()


def test_the_kept_pieces_are_bounded_and_go_with_the_model():
    model = _model()
    for number in range(compiled.LIMIT + 3):
        compiled.kept(model, ("test", number), lambda: object())
    kept = compiled.keys(model)
    assert len(kept) == compiled.LIMIT and kept[0] == ("test", 3)  # the oldest three went first
    compiled.kept(model, ("test", 3), lambda: object())  # used again: now the newest
    assert compiled.keys(model)[-1] == ("test", 3)
    attribution.saliency(model, _images(1, 4)[0], 1)
    gc.collect()  # the models of earlier tests go first
    before = compiled.models_kept()
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None and compiled.models_kept() == before - 1


def test_one_trace_per_model_raises_no_retracing_notice_in_the_server_log():
    """TensorFlow counts traces per place in the code: the sixth model's pass read to it as a function made in a
    loop, and its notice filled the server log. A handler on its logger sees no such record now."""
    import logging

    import numpy as np
    import tensorflow as tf

    from audit import compiled

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("tensorflow")
    logger.addHandler(handler)
    try:
        compiled.quiet_retracing_notice()
        for size in range(1, 13):  # twelve models' passes, each traced once, from one place in the code
            tf.function(lambda x: x + 1)(tf.constant(np.ones(size)))
    finally:
        logger.removeHandler(handler)
    assert not [message for message in seen if "retracing" in message]
    assert any(isinstance(found, compiled.OneTracePerModel) for found in logger.filters)
