"""Gradient methods: vanilla saliency (Simonyan et al. 2014), SmoothGrad (Smilkov et al. 2017), Integrated
Gradients (Sundararajan et al. 2017) and Guided Backpropagation (Springenberg et al. 2015)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from audit import cost, graph, models
from audit.attribution.targets import Progress, Scorer, Target, normalise, report_progress, resolve_target
from audit.errors import AuditError

def saliency(model: keras.Model, image: np.ndarray, target: Target = None, output: int | None = None) -> np.ndarray:
    """Vanilla gradient: max over channels of |d score / d pixel|."""
    image = np.asarray(image, np.float32)
    scorer = Scorer(model, resolve_target(model, image, target, output), output)
    gradient, _ = scorer.gradients(image[None])
    return normalise(np.abs(gradient[0]).max(axis=-1))


def smoothgrad(model: keras.Model, image: np.ndarray, target: Target = None, samples: int = 25,
               noise: float = 0.15, seed: int = 0, batch_size: int = 25, output: int | None = None,
               progress: Progress | None = None) -> np.ndarray:
    """Mean |gradient| over noisy copies (noise std as a share of the input's range), batched."""
    image = np.asarray(image, np.float32)
    scorer = Scorer(model, resolve_target(model, image, target, output), output)
    sigma = noise * float(image.max() - image.min() or 1.0)
    rng = np.random.default_rng(seed)
    total = np.zeros(image.shape, np.float64)
    batch_size = cost.batch_within(model, batch_size, passes=3)  # within the server's activation budget
    for start in range(0, samples, batch_size):
        count = min(batch_size, samples - start)
        noisy = image[None] + rng.normal(0, sigma, (count, *image.shape)).astype(np.float32)
        gradient, _ = scorer.gradients(noisy)
        total += np.abs(gradient).sum(axis=0)
        report_progress(progress, start + count, samples)
    return normalise((total / samples).max(axis=-1))


def blurred(image: np.ndarray, sigma: float = 10.0) -> np.ndarray:
    """A heavily blurred copy of the image: Integrated Gradients' baseline that keeps its colours."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(np.asarray(image, np.float32), sigma=(sigma, sigma, 0))


def integrated_gradients(model: keras.Model, image: np.ndarray, target: Target = None,
                         baseline: np.ndarray | str = "black", steps: int = 32, batch_size: int = 32,
                         signed: bool = False, black: np.ndarray | None = None, output: int | None = None,
                         progress: Progress | None = None) -> np.ndarray:
    """(x - x') times the mean gradient along the straight path from the baseline x' (trapezoid rule).

    `baseline` is an array, "black" (`black`: the preprocessed black image; zeros when not given) or
    "blurred". With `signed`, the raw (H, W, C) attributions, which sum to score(x) - score(x').
    """
    image = np.asarray(image, np.float32)
    if isinstance(baseline, str):
        if baseline == "black":
            baseline = np.zeros_like(image) if black is None else np.broadcast_to(black, image.shape)
        elif baseline == "blurred":
            baseline = blurred(image)
        else:
            raise AuditError(f"Unknown baseline {baseline!r}: use 'black', 'blurred' or an array.")
    baseline = np.asarray(baseline, np.float32)
    scorer = Scorer(model, resolve_target(model, image, target, output), output)
    alphas = np.linspace(0.0, 1.0, steps + 1, dtype=np.float32)
    gradients = []
    batch_size = cost.batch_within(model, batch_size, passes=3)
    for start in range(0, len(alphas), batch_size):
        chunk = alphas[start:start + batch_size, None, None, None]
        gradient, _ = scorer.gradients(baseline[None] + chunk * (image - baseline)[None])
        gradients.append(gradient)
        report_progress(progress, min(start + batch_size, len(alphas)), len(alphas))
    gradients = np.concatenate(gradients)
    average = (gradients[:-1] + gradients[1:]).mean(axis=0) / 2.0
    attributions = (image - baseline) * average
    return attributions if signed else normalise(np.abs(attributions).sum(axis=-1))


def _guided_relu(negative_slope: float = 0.0, max_value: float | None = None, threshold: float = 0.0):
    """The ReLU as it is on the way forward; backward, only positive gradients, and only where the ReLU
    itself lets gradients through (above the threshold, below a cap such as ReLU6's)."""

    @tf.custom_gradient
    def relu(x):
        def backward(dy):
            local = tf.where(x > threshold, 1.0, negative_slope)
            if max_value is not None:
                local = tf.where(x < max_value, local, 0.0)
            return tf.nn.relu(dy) * tf.cast(local, dy.dtype)

        return keras.activations.relu(x, negative_slope=negative_slope, max_value=max_value,
                                      threshold=threshold), backward

    return relu


class GuidedReLU(keras.layers.Layer):
    """Guided backpropagation's ReLU (Springenberg et al. 2015) with the forward pass of the original."""

    def __init__(self, negative_slope=0.0, max_value=None, threshold=0.0, **kwargs):
        super().__init__(**kwargs)
        self.relu = _guided_relu(float(negative_slope), None if max_value is None else float(max_value),
                                 float(threshold))

    def call(self, x):
        return self.relu(x)


def guided_replacement(layer):
    """A guided stand-in for a ReLU-family layer (ReLU, ReLU6, fused relu), else None (kept as is)."""
    kind, activation = type(layer).__name__, graph.activation_name(layer)
    if kind == "ReLU":
        config = layer.get_config()
        return GuidedReLU(config.get("negative_slope", 0.0), config.get("max_value"), config.get("threshold", 0.0))
    caps = {"relu": None, "relu6": 6.0}
    if activation not in caps:
        return None
    if kind == "Activation":
        return GuidedReLU(max_value=caps[activation])
    if models.has_fused_activation(layer):
        guided_relu = GuidedReLU(max_value=caps[activation])

        def call(*args, **kwargs):
            return guided_relu(graph.linear_twin(layer, args[0].shape)(*args, **kwargs))

        return call
    return None


def guided_gradient(model: keras.Model, image: np.ndarray, target: Target = None, output: int | None = None
                    ) -> np.ndarray:
    """The raw guided-backpropagation gradient (H, W, C) of the target's score."""
    image = np.asarray(image, np.float32)
    scorer = Scorer(model, resolve_target(model, image, target, output), output, replace=guided_replacement)
    gradient, _ = scorer.gradients(image[None])
    return gradient[0]


def guided_backprop(model: keras.Model, image: np.ndarray, target: Target = None, output: int | None = None
                    ) -> np.ndarray:
    """Guided Backpropagation: max over channels of the positive guided gradient."""
    return normalise(np.maximum(guided_gradient(model, image, target, output), 0).max(axis=-1))
