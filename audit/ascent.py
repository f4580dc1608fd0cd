"""The compiled gradient-ascent steps of a gallery, one per image parameterisation.

Both steps warp the batch by a random shift and zoom (differentiable, so the gradient flows back through
it: Lucid's transformation robustness), read the objective, and move every image of the batch at once.
The pixel step takes an L2-normalised gradient step (the Keras blog's recipe) with optional decay, blur
and total variation; the Fourier step moves the image's scaled spectrum with Adam, as Lucid does
(audit.parameterization). A diversity term (Lucid's `objectives.diversity`) pushes the copies of one
filter apart; a negative image descends instead of ascending.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

from audit import parameterization

ADAM = (0.9, 0.999, 1e-8)
"""Adam's beta1, beta2 and epsilon (Kingma and Ba 2015), Lucid's optimiser for the Fourier image."""


def projective(table_step: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """Batch of (8,) projective transforms: zoom about the centre, then shift."""
    dx, dy, zoom = table_step[:, 0], table_step[:, 1], 1.0 + table_step[:, 2]
    centre = (tf.cast(size, tf.float32) - 1.0) / 2.0
    a = 1.0 / zoom
    zeros = tf.zeros_like(a)
    return tf.stack([a, zeros, centre - a * centre - dx, zeros, a, centre - a * centre - dy, zeros, zeros], axis=1)


def warp(pixels: tf.Tensor, transform: tf.Tensor) -> tf.Tensor:
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=pixels, transforms=projective(transform, tf.shape(pixels)[1]), output_shape=tf.shape(pixels)[1:3],
        fill_value=0.5, interpolation="BILINEAR", fill_mode="REFLECT")


def blur(images: tf.Tensor, sigma: float) -> tf.Tensor:
    radius = max(1, int(round(2 * sigma)))
    offsets = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = np.outer(kernel, kernel) / np.outer(kernel, kernel).sum()
    depthwise = tf.constant(np.tile(kernel[:, :, None, None], (1, 1, images.shape[-1], 1)), tf.float32)
    return tf.nn.depthwise_conv2d(images, depthwise, [1, 1, 1, 1], "SAME")


def gram_similarity(maps: tf.Tensor, copies: int) -> tf.Tensor:
    """Per group of `copies` consecutive images: the summed cosine similarity of each image's Gram matrix
    (channels x channels, over positions) with the other copies', divided by `copies` (Lucid's diversity)."""
    count, channels = tf.shape(maps)[0], tf.shape(maps)[-1]
    flat = tf.reshape(maps, [count, -1, channels])
    grams = tf.math.l2_normalize(tf.reshape(tf.matmul(flat, flat, transpose_a=True), [count, -1]), axis=1,
                                 epsilon=1e-10)
    grouped = tf.reshape(grams, [-1, copies, channels * channels])
    similarity = tf.matmul(grouped, grouped, transpose_b=True)  # (groups, copies, copies)
    return (tf.reduce_sum(similarity, axis=[1, 2]) - tf.linalg.trace(similarity)) / copies


def objective_loss(values: tf.Tensor, maps: tf.Tensor, negative: bool, copies: int, weight: float) -> tf.Tensor:
    """What a step ascends: the filters' activations (or their negatives), less the copies' similarity scaled
    by `weight` times the group's mean |activation| (so the weight means the same on any model)."""
    loss = tf.reduce_sum(-values if negative else values)
    if copies > 1 and weight:
        scale = tf.stop_gradient(tf.reduce_mean(tf.reshape(tf.abs(values), [-1, copies]), axis=1))
        loss -= weight * tf.reduce_sum(scale * gram_similarity(maps, copies))
    return loss


def pixel_step(objective: Callable, options, pixels_spec: tf.TensorSpec, pre: bool):
    """One compiled pixel-space step: (pixels, filters, transform, blur_now) -> (pixels, values)."""

    def step(pixels, filters, transform, blur_now):
        with tf.GradientTape() as tape:
            tape.watch(pixels)
            warped = warp(pixels, transform)
            values, maps = objective(warped, filters, pre)
            loss = objective_loss(values, maps, options.negative, options.copies, options.diversity)
            if options.total_variation:
                area = tf.cast(tf.shape(pixels)[1] * tf.shape(pixels)[2], tf.float32)
                loss -= options.total_variation * tf.reduce_sum(tf.image.total_variation(warped)) / area
        gradient = tape.gradient(loss, pixels)
        norm = tf.sqrt(tf.reduce_mean(tf.square(gradient), axis=[1, 2, 3], keepdims=True)) + 1e-8
        pixels = pixels + options.learning_rate * gradient / norm
        if options.l2_decay:
            pixels = 0.5 + (pixels - 0.5) * (1.0 - options.l2_decay)
        pixels = tf.cond(blur_now, lambda: blur(pixels, options.blur_sigma), lambda: pixels)
        return tf.clip_by_value(pixels, 0.0, 1.0), values

    signature = [pixels_spec, tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, 3], tf.float32),
                 tf.TensorSpec([], tf.bool)]
    return tf.function(step, input_signature=signature)


def fourier_step(objective: Callable, options, channels: int, pre: bool):
    """One compiled Fourier-space step with Adam: (spectra, m, v, t, scale, filters, transform) ->
    (spectra, m, v, t, values). The scale (parameterization.spectrum_scale) is an input: one trace serves
    every image size."""
    beta1, beta2, epsilon = ADAM

    def step(spectra, m, v, t, scale, filters, transform):
        with tf.GradientTape() as tape:
            tape.watch(spectra)
            warped = warp(parameterization.to_pixels(spectra, scale), transform)
            values, maps = objective(warped, filters, pre)
            loss = objective_loss(values, maps, options.negative, options.copies, options.diversity)
        gradient = tape.gradient(loss, spectra)
        t = t + 1.0
        m = beta1 * m + (1.0 - beta1) * gradient
        v = beta2 * v + (1.0 - beta2) * tf.square(gradient)
        update = (m / (1.0 - beta1 ** t)) / (tf.sqrt(v / (1.0 - beta2 ** t)) + epsilon)
        return spectra + options.learning_rate * update, m, v, t, values

    spectra = tf.TensorSpec([None, 2, channels, None, None], tf.float32)
    signature = [spectra, spectra, spectra, tf.TensorSpec([], tf.float32), tf.TensorSpec([None, None], tf.float32),
                 tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, 3], tf.float32)]
    return tf.function(step, input_signature=signature)
