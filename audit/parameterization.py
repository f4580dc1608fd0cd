"""How a grown image is parameterised: pixels, or a Fourier basis with decorrelated colour.

Gradient ascent in pixel space favours high frequencies (the gradient of a conv net is mostly
high-frequency), so pixel galleries look like coloured noise unless blurred. Olah et al., "Feature
Visualization" (Distill 2017), optimise instead the image's 2-D Fourier coefficients scaled by 1/frequency
(every frequency gets the same energy: a whitened, decorrelated space) and the colours in a decorrelated
basis, squashed to [0, 1] by a sigmoid. This is Lucid's `param.image(w, fft=True, decorrelate=True)`
(lucid/optvis/param/spatial.py `fft_image`, color.py `to_valid_rgb`), written for a batch in TensorFlow.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

PARAMETERIZATIONS = ("pixel", "fourier")

COLOR_CORRELATION_SVD_SQRT = np.array([[0.26, 0.09, 0.02],
                                       [0.27, 0.00, -0.05],
                                       [0.27, -0.09, 0.03]], np.float32)
"""Lucid's square root of ImageNet's colour correlation (its SVD); colour channels are drawn through it."""

_COLOR = COLOR_CORRELATION_SVD_SQRT / np.max(np.linalg.norm(COLOR_CORRELATION_SVD_SQRT, axis=0))

START_SD = 0.01
"""Lucid's standard deviation of the starting spectrum: a nearly grey image, as the pixel start is."""


def frequencies(height: int, width: int) -> np.ndarray:
    """|f| of each coefficient of a real 2-D FFT of a (height, width) image, in cycles per pixel."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    return np.sqrt(fx * fx + fy * fy)


def spectrum_scale(height: int, width: int, decay_power: float = 1.0) -> np.ndarray:
    """1 / |f| (floored at one cycle per image) times sqrt(pixels): Lucid's scale, which makes the basis
    about unitary so the pixel learning rates carry over."""
    floor = 1.0 / max(height, width)
    return (1.0 / np.maximum(frequencies(height, width), floor) ** decay_power * np.sqrt(height * width)).astype(
        np.float32)


def start_spectra(seeds: list[tuple[int, ...]], size: int, channels: int) -> np.ndarray:
    """Starting coefficients (N, 2, channels, size, size // 2 + 1): real and imaginary parts, each image from
    its own seed (so batching cannot change an image)."""
    shape = (2, channels, size, size // 2 + 1)
    return np.stack([START_SD * np.random.default_rng(np.random.SeedSequence(list(seed))).standard_normal(shape)
                     for seed in seeds]).astype(np.float32)


def to_pixels(spectra: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
    """The images in [0, 1], (N, size, size, channels), of coefficients (N, 2, channels, size, size // 2 + 1).

    Lucid's order: inverse FFT of the scaled spectrum, divided by 4, colours through the decorrelating
    basis (three channels), then a sigmoid.
    """
    size = tf.shape(spectra)[3]
    complex_spectrum = tf.complex(spectra[:, 0], spectra[:, 1]) * tf.cast(scale, tf.complex64)
    images = tf.signal.irfft2d(complex_spectrum, fft_length=tf.stack([size, size]))  # (N, channels, h, w)
    images = tf.transpose(images, [0, 2, 3, 1]) / 4.0
    if spectra.shape[2] == 3:  # read from the coefficients: a traced irfft2d may lose its static channel count
        images = tf.einsum("nhwc,dc->nhwd", images, tf.constant(_COLOR))
    return tf.sigmoid(images)


def high_frequency_share(images: np.ndarray, cutoff: float = 0.125) -> np.ndarray:
    """Per image, the share of its spectral energy (mean removed, channels summed) above `cutoff` cycles per
    pixel; 0.125 is a quarter of the Nyquist frequency (0.5), where the noise of pixel galleries lives."""
    x = np.asarray(images, np.float64)
    x = x - x.mean(axis=(1, 2), keepdims=True)
    energy = np.abs(np.fft.rfft2(x, axes=(1, 2))) ** 2  # (N, h, w // 2 + 1, channels)
    energy[:, :, 1:(x.shape[2] + 1) // 2] *= 2  # the half-spectrum's columns stand for their mirror images too
    above = frequencies(x.shape[1], x.shape[2]) > cutoff
    total = energy.sum(axis=(1, 2, 3))
    return energy[:, above].sum(axis=(1, 2)) / np.where(total > 0, total, 1.0)
