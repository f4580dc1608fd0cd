"""Fourier images with decorrelated colour (Olah et al. 2017, Lucid), diversity and negative images: checked
against numpy re-computations and hand-weighted filters whose best and worst inputs are known on paper."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from audit import ascent, filters, parameterization
from audit.errors import AuditError


def test_to_pixels_equals_lucids_recipe_recomputed_in_numpy():
    rng = np.random.default_rng(0)
    size = 6
    spectra = rng.standard_normal((2, 2, 3, size, size // 2 + 1)).astype(np.float32)
    scale = parameterization.spectrum_scale(size, size)
    measured = parameterization.to_pixels(tf.constant(spectra), tf.constant(scale)).numpy()
    # Lucid, param/spatial.py fft_image and color.py to_valid_rgb(decorrelate=True, sigmoid=True)
    freqs = np.sqrt(np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[: size // 2 + 1] ** 2)
    lucid_scale = 1.0 / np.maximum(freqs, 1.0 / size) * np.sqrt(size * size)
    svd_sqrt = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
    normalised = svd_sqrt / np.max(np.linalg.norm(svd_sqrt, axis=0))
    traced = tf.function(parameterization.to_pixels, input_signature=[  # as the compiled step calls it
        tf.TensorSpec([None, 2, 3, None, None], tf.float32), tf.TensorSpec([None, None], tf.float32)])
    np.testing.assert_allclose(traced(tf.constant(spectra), tf.constant(scale)).numpy(), measured, atol=1e-6)
    for n in range(2):
        image = np.fft.irfft2((spectra[n, 0] + 1j * spectra[n, 1]) * lucid_scale, s=(size, size)) / 4.0
        rgb = np.transpose(image, (1, 2, 0)).reshape(-1, 3) @ normalised.T
        np.testing.assert_allclose(measured[n], 1 / (1 + np.exp(-rgb.reshape(size, size, 3))), atol=1e-5)


def test_high_frequency_share_of_pure_waves():
    y, x = np.mgrid[0:32, 0:32]
    slow = np.cos(2 * np.pi * x / 16.0)[None, :, :, None]  # 1/16 cycle per pixel: below a quarter of Nyquist
    fast = np.cos(2 * np.pi * (x + y) / 4.0)[None, :, :, None]  # |f| = sqrt(2)/4 = 0.35: above
    mixed = slow + fast  # equal energy in each
    shares = parameterization.high_frequency_share(np.concatenate([slow, fast, mixed]))
    np.testing.assert_allclose(shares, [0.0, 1.0, 0.5], atol=1e-9)


def _red_detector() -> keras.Model:
    """One 1x1 filter reading the red channel, less 0.3, then a ReLU: its best input is pure red (activation
    0.7), its worst has no red (pre-activation -0.3); from the grey start (0.5 +- 0.1) its ReLU is open."""
    inputs = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(1, 1, activation="relu", name="red")
    outputs = conv(inputs)
    model = keras.Model(inputs, outputs)
    conv.set_weights([np.array([1.0, 0.0, 0.0], np.float32).reshape(1, 1, 3, 1), np.array([-0.3], np.float32)])
    return model


@pytest.mark.parametrize("parameterization", ["pixel", "fourier"])
def test_positive_and_negative_images_of_a_red_detector(parameterization):
    model = _red_detector()
    options = filters.Options(size=24, steps=60, learning_rate=0.1, jitter=1, scale=0.0,
                              parameterization=parameterization)
    best = filters.render(model, "red", [0], options, seed=0)
    worst = filters.render(model, "red", [0], dataclasses.replace(options, negative=True), seed=0)
    inside = slice(3, -3)  # the objective leaves out a 10% border (and the jitter reaches 1 pixel further)
    red_best = best.images[0, inside, inside, 0].mean() / 255
    red_worst = worst.images[0, inside, inside, 0].mean() / 255
    # the sigmoid of the Fourier image nears 0 and 1 only slowly: 0.86 after 60 steps (pixels: 1.0)
    assert red_best > 0.85 and best.activations[0] > 0.5 and best.responded[0], (red_best, best.activations)
    assert red_worst < 0.15 and worst.activations[0] < -0.1 and worst.responded[0], (red_worst, worst.activations)


def test_a_fourier_gallery_is_independent_of_its_batch_and_smoother_than_pixels():
    model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(None, None, 3))
    keras.utils.set_random_seed(0)
    options = filters.Options(size=48, steps=10, parameterization="fourier", jitter=2)
    batch = filters.render(model, "block2_conv1", [3, 9], options, seed=1)
    alone = filters.render(model, "block2_conv1", [9], options, seed=1)
    np.testing.assert_allclose(batch.activations[1], alone.activations[0], rtol=0.02)
    assert np.corrcoef(batch.images[1].ravel().astype(float), alone.images[0].ravel().astype(float))[0, 1] > 0.99
    pixels = filters.render(model, "block2_conv1", [3, 9], filters.Options(size=48, steps=10, jitter=2), seed=1)
    assert (parameterization.high_frequency_share(batch.images).max()
            < parameterization.high_frequency_share(pixels.images).min())


def test_diversity_pushes_the_copies_of_a_filter_apart():
    from audit import models

    loaded = models.load("demo:shapes")
    cut = models.submodel(loaded.model, "block3_conv1", any_size=True)

    def similarity(result):
        maps = cut(filters.tf_preprocess(tf.constant(result.images / 255.0, tf.float32), loaded.preprocessing))
        return ascent.gram_similarity(maps, 3).numpy()  # 2 when the three copies' Gram matrices are alike

    base = dict(size=48, steps=20, copies=3, preprocessing=loaded.preprocessing)
    plain = filters.render(loaded.model, "block3_conv1", [4, 6], filters.Options(**base), seed=2)
    diverse = filters.render(loaded.model, "block3_conv1", [4, 6], filters.Options(**base, diversity=1.0), seed=2)
    assert plain.images.shape == diverse.images.shape == (6, 48, 48, 3)
    assert (similarity(plain) > 1.9).all() and (similarity(diverse) < 1.0).all()  # measured: 1.94-1.96, 0.71-0.78
    # the copies stay images of their filter: at least half the activation of the plain copies (measured 0.6-1.0)
    assert (diverse.activations >= 0.5 * plain.activations).all()
    np.testing.assert_array_equal(plain.images[[0, 3]], filters.render(  # a filter's first copy is its one image
        loaded.model, "block3_conv1", [4, 6], filters.Options(**{**base, "copies": 1}), seed=2).images)
    with pytest.raises(AuditError, match="Copies per filter"):
        filters.Options(copies=0)
    with pytest.raises(AuditError, match="Unknown parameterization"):
        filters.Options(parameterization="wavelet")


def test_gram_similarity_by_hand():
    a = np.zeros((1, 1, 2, 2), np.float32)
    a[0, 0, 0] = [1, 0]
    a[0, 0, 1] = [1, 0]  # gram [[2, 0], [0, 0]] -> normalised e00
    b = np.zeros_like(a)
    b[0, 0, 0] = [0, 1]  # gram e11: orthogonal to a's
    c = a.copy()  # identical to a
    maps = tf.constant(np.concatenate([a, b, a, c]))
    # pairs: (a, b) similarity 0 -> 0 per group; (a, c) similarity 1 counted twice / 2 copies -> 1
    np.testing.assert_allclose(ascent.gram_similarity(maps, 2).numpy(), [0.0, 1.0], atol=1e-6)


def test_fourier_is_the_default_only_where_it_measured_better():
    from audit import models

    vgg = keras.applications.VGG16(weights=None, include_top=False, input_shape=(224, 224, 3))
    assert filters.default_parameterization(vgg, "block5_conv3") == "fourier"  # 1.7x the activation
    assert filters.default_parameterization(vgg, "block4_conv1") == "pixel"  # 0.81x: pixels stay
    assert filters.default_parameterization(vgg, "block5_pool") == "pixel"  # no conv: not measured
    assert filters.default_parameterization(models.load("demo:shapes").model, "block3_conv2") == "pixel"  # 64 px
    grey = keras.Sequential([keras.Input((128, 128, 1)), keras.layers.Conv2D(2, 3, name="c")])
    assert filters.default_parameterization(grey, "c") == "pixel"
    fourier = filters.default_options(vgg, "block5_conv3", "caffe", "fourier")
    assert (fourier.parameterization, fourier.octaves, fourier.blur_every, fourier.l2_decay) == ("fourier", 1, 0, 0.0)
    assert fourier.learning_rate == 0.2  # the deepest third: 0.3 brings more high frequencies than pixels
    assert filters.default_options(vgg, "block4_conv1", "caffe", "fourier").learning_rate == 0.3  # 0.81x, not 0.71x

