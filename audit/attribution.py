"""Attribution: which pixels made the model say what it said.

Vanilla gradients (Simonyan et al. 2014), SmoothGrad (Smilkov et al. 2017), Integrated Gradients
(Sundararajan et al. 2017), Grad-CAM (Selvaraju et al. 2017), Grad-CAM++ (Chattopadhay et al.
2018), Layer-CAM (Jiang et al. 2021), Score-CAM (Wang et al. 2020, with Faster Score-CAM's channel
cap), Guided Backpropagation (Springenberg et al. 2015) and Guided Grad-CAM, and occlusion (Zeiler &
Fergus 2014).

Gradients are taken on the class score before the softmax (a rebuilt linear head; the loaded model
is never changed), or on the mean activation of one filter, which is also the target for models
without a class output. Every public method takes one preprocessed image (H, W, C) and returns a
float map (H, W) in [0, 1]; the maths of the CAMs lives in small functions over arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from audit import models
from audit.errors import AuditError


@dataclass(frozen=True)
class FilterTarget:
    """The mean activation of one filter of a layer: "which pixels make filter 42 fire"."""

    layer: str
    index: int


Target = int | FilterTarget | None


# --- targets and scores ----------------------------------------------------------------------

def has_class_output(model: keras.Model) -> bool:
    return len(model.outputs[0].shape) == 2 and model.outputs[0].shape[-1] > 1


def last_conv_layer(model: keras.Model) -> str:
    """The last convolutional layer, also inside nested models (the Grad-CAM default)."""
    convs = models.conv_layers(model)
    if not convs:
        raise AuditError("The model has no convolutional layer to take a class activation map from.")
    return convs[-1]


def resolve_target(model: keras.Model, image: np.ndarray, target: Target) -> int | FilterTarget:
    """None means the top-1 class, or for models without a class output, the strongest last-conv filter."""
    if target is not None:
        if isinstance(target, FilterTarget):
            return FilterTarget(models.resolve_layer(model, target.layer), int(target.index))
        if not has_class_output(model):
            raise AuditError("The model has no class output: choose a filter of a layer as the target.")
        classes = model.outputs[0].shape[-1]
        if not 0 <= int(target) < classes:
            raise AuditError(f"Class {target} is out of range: the model has classes 0 to {classes - 1}.")
        return int(target)
    if has_class_output(model):
        return int(np.argmax(np.asarray(model(image[None], training=False))[0]))
    layer = last_conv_layer(model)
    maps = np.asarray(models.submodel(model, layer)(image[None], training=False))[0]
    return FilterTarget(layer, int(np.argmax(maps.mean(axis=(0, 1)))))


def _logits(model: keras.Model) -> keras.Model:
    from audit.filters import linear_head

    return linear_head(model)


def score_model(model: keras.Model, target: int | FilterTarget) -> keras.Model:
    """A model from the image to one score per sample: the class logit or the filter's mean activation."""
    if isinstance(target, FilterTarget):
        cut = models.submodel(model, target.layer)
        maps = cut.outputs[0]
        reduced = keras.ops.mean(maps[..., target.index], axis=tuple(range(1, len(maps.shape) - 1)))
        return keras.Model(cut.inputs[0], reduced)
    head = _logits(model)
    return keras.Model(head.inputs[0], head.outputs[0][:, target])


def _gradients(scorer: keras.Model, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = tf.convert_to_tensor(batch, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        scores = scorer(x, training=False)
    return tape.gradient(scores, x).numpy(), scores.numpy()


def normalise(values: np.ndarray) -> np.ndarray:
    """A non-negative map scaled to [0, 1] by its maximum (all zero stays zero)."""
    values = np.maximum(np.asarray(values, np.float64), 0)
    top = values.max()
    return (values / top if top > 0 else values).astype(np.float32)


def _resize(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return tf.image.resize(values[None, :, :, None].astype(np.float32), size, method="bilinear").numpy()[0, :, :, 0]


# --- gradient methods ------------------------------------------------------------------------

def saliency(model: keras.Model, image: np.ndarray, target: Target = None) -> np.ndarray:
    """Vanilla gradient: max over channels of |d score / d pixel|."""
    image = np.asarray(image, np.float32)
    scorer = score_model(model, resolve_target(model, image, target))
    gradient, _ = _gradients(scorer, image[None])
    return normalise(np.abs(gradient[0]).max(axis=-1))


def smoothgrad(model: keras.Model, image: np.ndarray, target: Target = None, samples: int = 25,
               noise: float = 0.15, seed: int = 0, batch_size: int = 25) -> np.ndarray:
    """Mean |gradient| over noisy copies (noise std as a share of the input's range), batched."""
    image = np.asarray(image, np.float32)
    scorer = score_model(model, resolve_target(model, image, target))
    sigma = noise * float(image.max() - image.min() or 1.0)
    rng = np.random.default_rng(seed)
    total = np.zeros(image.shape, np.float64)
    for start in range(0, samples, batch_size):
        count = min(batch_size, samples - start)
        noisy = image[None] + rng.normal(0, sigma, (count, *image.shape)).astype(np.float32)
        gradient, _ = _gradients(scorer, noisy)
        total += np.abs(gradient).sum(axis=0)
    return normalise((total / samples).max(axis=-1))


def blurred(image: np.ndarray, sigma: float = 10.0) -> np.ndarray:
    """A heavily blurred copy of the image: Integrated Gradients' baseline that keeps its colours."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(np.asarray(image, np.float32), sigma=(sigma, sigma, 0))


def integrated_gradients(model: keras.Model, image: np.ndarray, target: Target = None,
                         baseline: np.ndarray | str = "black", steps: int = 32, batch_size: int = 32,
                         signed: bool = False, black: np.ndarray | None = None) -> np.ndarray:
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
    scorer = score_model(model, resolve_target(model, image, target))
    alphas = np.linspace(0.0, 1.0, steps + 1, dtype=np.float32)
    gradients = []
    for start in range(0, len(alphas), batch_size):
        chunk = alphas[start:start + batch_size, None, None, None]
        gradient, _ = _gradients(scorer, baseline[None] + chunk * (image - baseline)[None])
        gradients.append(gradient)
    gradients = np.concatenate(gradients)
    average = (gradients[:-1] + gradients[1:]).mean(axis=0) / 2.0
    attributions = (image - baseline) * average
    return attributions if signed else normalise(np.abs(attributions).sum(axis=-1))


# --- class activation maps -------------------------------------------------------------------

def grad_cam_weights(gradients: np.ndarray) -> np.ndarray:
    """Grad-CAM: each channel's weight is its gradient averaged over space. (h, w, K) -> (K,)"""
    return gradients.mean(axis=(0, 1))


def grad_cam_plus_plus_weights(maps: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Grad-CAM++ weights with the exponential-score closed form of the paper (its eq. 19)."""
    g2, g3 = gradients ** 2, gradients ** 3
    denominator = 2 * g2 + maps.sum(axis=(0, 1), keepdims=True) * g3
    alpha = np.where(denominator != 0, g2 / np.where(denominator != 0, denominator, 1), 0)
    return (alpha * np.maximum(gradients, 0)).sum(axis=(0, 1))


def weighted_maps(maps: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ReLU of the weighted sum of the channels. (h, w, K), (K,) -> (h, w)"""
    return np.maximum((maps * weights).sum(axis=-1), 0)


def layer_cam_map(maps: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Layer-CAM: positive gradients weight each position of each channel."""
    return np.maximum((np.maximum(gradients, 0) * maps).sum(axis=-1), 0)


def _maps_and_gradients(model, image, target, layer):
    target = resolve_target(model, image, target)
    layer = models.resolve_layer(model, layer or last_conv_layer(model))
    if isinstance(target, FilterTarget):
        cut = models.submodel(model, [layer, target.layer])
        reduce_axes = tuple(range(1, len(cut.outputs[1].shape) - 1))
        score = lambda outputs: tf.reduce_mean(outputs[1][..., target.index], axis=reduce_axes)  # noqa: E731
    else:
        head = _logits(model)
        cut = models.submodel(head, [layer, head.layers[-1].name])
        score = lambda outputs: outputs[1][:, target]  # noqa: E731
    with tf.GradientTape() as tape:
        outputs = cut(tf.convert_to_tensor(image[None], tf.float32), training=False)
        outputs = list(outputs)
        tape.watch(outputs[0])
        scores = score(outputs)
    return outputs[0].numpy()[0], tape.gradient(scores, outputs[0]).numpy()[0]


def _cam(model, image, target, layer, combine, upsample: bool):
    image = np.asarray(image, np.float32)
    maps, gradients = _maps_and_gradients(model, image, target, layer)
    cam = combine(maps, gradients)
    return normalise(_resize(cam, image.shape[:2])) if upsample else cam


def grad_cam(model: keras.Model, image: np.ndarray, target: Target = None, layer: str | None = None,
             upsample: bool = True) -> np.ndarray:
    """Grad-CAM on a conv layer (default: the last one); `upsample=False` gives the raw layer-size map."""
    return _cam(model, image, target, layer, lambda a, g: weighted_maps(a, grad_cam_weights(g)), upsample)


def grad_cam_plus_plus(model: keras.Model, image: np.ndarray, target: Target = None, layer: str | None = None,
                       upsample: bool = True) -> np.ndarray:
    return _cam(model, image, target, layer, lambda a, g: weighted_maps(a, grad_cam_plus_plus_weights(a, g)),
                upsample)


def layer_cam(model: keras.Model, image: np.ndarray, target: Target = None, layer: str | None = None,
              upsample: bool = True) -> np.ndarray:
    return _cam(model, image, target, layer, layer_cam_map, upsample)


def score_cam(model: keras.Model, image: np.ndarray, target: Target = None, layer: str | None = None,
              max_channels: int = 32, batch_size: int = 32, fill: np.ndarray | None = None) -> np.ndarray:
    """Score-CAM: each channel, upsampled and scaled to [0, 1], masks the image; the target's score on
    the masked image weighs the channel (softmax over channels). Only the `max_channels` channels with
    the largest mean activation are used (Faster Score-CAM)."""
    image = np.asarray(image, np.float32)
    resolved = resolve_target(model, image, target)
    layer = models.resolve_layer(model, layer or last_conv_layer(model))
    maps = np.asarray(models.submodel(model, layer)(image[None], training=False))[0]
    keep = np.argsort(maps.mean(axis=(0, 1)))[::-1][:max_channels]
    scorer = score_model(model, resolved)
    fill = np.zeros_like(image) if fill is None else np.broadcast_to(fill, image.shape)
    masks = np.stack([_scaled01(_resize(maps[:, :, k], image.shape[:2])) for k in keep])
    scores = []
    for start in range(0, len(keep), batch_size):
        m = masks[start:start + batch_size, :, :, None]
        scores.append(np.asarray(scorer(image[None] * m + fill[None] * (1 - m), training=False)))
    scores = np.concatenate(scores)
    weights = np.exp(scores - scores.max())
    weights /= weights.sum()
    return normalise(_resize(weighted_maps(maps[:, :, keep], weights), image.shape[:2]))


def _scaled01(values: np.ndarray) -> np.ndarray:
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def occlusion(model: keras.Model, image: np.ndarray, target: Target = None, patch: int = 8, stride: int = 4,
              fill: np.ndarray | float = 0.0, batch_size: int = 64) -> np.ndarray:
    """How much the score drops when a patch is covered, averaged over the patches covering each pixel.

    `fill`: a value, one per channel, or a whole image of the input's shape (e.g. the preprocessed black
    image) whose pixels under the patch replace the covered ones.
    """
    image = np.asarray(image, np.float32)
    fill = np.broadcast_to(np.asarray(fill, np.float32), image.shape)
    scorer = score_model(model, resolve_target(model, image, target))
    height, width = image.shape[:2]
    base = float(np.asarray(scorer(image[None], training=False))[0])
    corners = [(y, x) for y in range(0, max(height - patch, 0) + 1, stride)
               for x in range(0, max(width - patch, 0) + 1, stride)]
    drops, counts = np.zeros((height, width)), np.zeros((height, width))
    for start in range(0, len(corners), batch_size):
        chunk = corners[start:start + batch_size]
        batch = np.repeat(image[None], len(chunk), axis=0)
        for i, (y, x) in enumerate(chunk):
            batch[i, y:y + patch, x:x + patch] = fill[y:y + patch, x:x + patch]
        scores = np.asarray(scorer(batch, training=False))
        for (y, x), score in zip(chunk, scores):
            drops[y:y + patch, x:x + patch] += base - score
            counts[y:y + patch, x:x + patch] += 1
    return normalise(np.where(counts > 0, drops / np.maximum(counts, 1), 0))


# --- guided backpropagation ------------------------------------------------------------------

@tf.custom_gradient
def _guided_relu(x):
    """ReLU whose backward pass keeps only positive gradients where the input was positive."""

    def backward(dy):
        return dy * tf.cast(dy > 0, dy.dtype) * tf.cast(x > 0, dy.dtype)

    return tf.nn.relu(x), backward


class GuidedReLU(keras.layers.Layer):
    def call(self, x):
        return _guided_relu(x)


def guided(model: keras.Model) -> keras.Model:
    """The same graph and weights with every ReLU, fused ones included, made guided (Springenberg 2015)."""
    new_input = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)
    return keras.Model(new_input, _guided_call(model, new_input), name=f"{model.name}_guided")


def _guided_call(model: keras.Model, x):
    def wrap(layer):
        if isinstance(layer, keras.Model):
            return lambda *args, **kwargs: _guided_call(layer, args[0])
        kind, activation = type(layer).__name__, models._activation_name(layer)
        if kind == "ReLU" or (kind == "Activation" and activation == "relu"):
            return lambda *args, **kwargs: GuidedReLU()(args[0])
        if activation == "relu" and models.has_fused_activation(layer):
            twin = models._linear_twin(layer)
            return lambda *args, **kwargs: GuidedReLU()(twin(*args, **kwargs))
        return layer

    if isinstance(model, keras.Sequential):
        for layer in model.layers:
            x = wrap(layer)(x)
        return x
    return model._run_through_graph(x, operation_fn=wrap)


def guided_gradient(model: keras.Model, image: np.ndarray, target: Target = None) -> np.ndarray:
    """The raw guided-backpropagation gradient (H, W, C) of the target's score."""
    image = np.asarray(image, np.float32)
    resolved = resolve_target(model, image, target)
    if isinstance(resolved, FilterTarget):
        cut = guided(models.submodel(model, resolved.layer))
        maps = cut.outputs[0]
        reduced = keras.ops.mean(maps[..., resolved.index], axis=tuple(range(1, len(maps.shape) - 1)))
        scorer = keras.Model(cut.inputs[0], reduced)
    else:
        head = guided(_logits(model))
        scorer = keras.Model(head.inputs[0], head.outputs[0][:, resolved])
    gradient, _ = _gradients(scorer, image[None])
    return gradient[0]


def guided_backprop(model: keras.Model, image: np.ndarray, target: Target = None) -> np.ndarray:
    """Guided Backpropagation: max over channels of the positive guided gradient."""
    return normalise(np.maximum(guided_gradient(model, image, target), 0).max(axis=-1))


def guided_grad_cam(model: keras.Model, image: np.ndarray, target: Target = None, layer: str | None = None) -> np.ndarray:
    """Guided Grad-CAM: the guided map times the upsampled Grad-CAM (Selvaraju et al. 2017)."""
    image = np.asarray(image, np.float32)
    resolved = resolve_target(model, image, target)
    return normalise(guided_backprop(model, image, resolved) * grad_cam(model, image, resolved, layer))


METHODS = {
    "Saliency": saliency,
    "SmoothGrad": smoothgrad,
    "Integrated Gradients": integrated_gradients,
    "Grad-CAM": grad_cam,
    "Grad-CAM++": grad_cam_plus_plus,
    "Layer-CAM": layer_cam,
    "Score-CAM": score_cam,
    "Guided Backprop": guided_backprop,
    "Guided Grad-CAM": guided_grad_cam,
    "Occlusion": occlusion,
}
"""Every method by the name the dashboard shows; each takes (model, image, target, **options)."""


# --- trust -----------------------------------------------------------------------------------

def mass_inside(attribution: np.ndarray, mask: np.ndarray) -> float:
    """Share of the attribution mass that falls on the object."""
    total = float(attribution.sum())
    return float(attribution[mask].sum()) / total if total > 0 else 0.0


def peak_inside(attribution: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the map's maximum falls on the object."""
    return bool(mask.flat[int(np.argmax(attribution))])


def deletion_curve(model: keras.Model, image: np.ndarray, attribution_map: np.ndarray, target: Target = None,
                   steps: int = 20, fill: np.ndarray | float = 0.0) -> tuple[np.ndarray, np.ndarray, float]:
    """Remove the most-attributed pixels first and watch the score fall (Petsiuk et al. 2018).

    Returns (fractions removed, scores, area under the curve of the score normalised by the full
    image's score); a lower area means the map found what the score depends on.
    """
    image = np.asarray(image, np.float32)
    scorer = score_model(model, resolve_target(model, image, target))
    order = np.argsort(attribution_map.ravel())[::-1]
    fractions = np.linspace(0, 1, steps + 1)
    fill = np.broadcast_to(np.asarray(fill, np.float32), image.shape)
    batch = np.repeat(image[None], len(fractions), axis=0)
    for row, fraction in enumerate(fractions):
        removed = np.zeros(image.shape[:2], bool).ravel()
        removed[order[:int(round(fraction * removed.size))]] = True
        removed = removed.reshape(image.shape[:2])
        batch[row][removed] = fill[removed]
    scores = np.asarray(scorer(batch, training=False), np.float64)
    relative = scores / scores[0] if scores[0] != 0 else scores
    return fractions, scores, float(np.trapezoid(relative, fractions))


def randomised_copies(model: keras.Model, seed: int = 0):
    """Cascading randomisation (Adebayo et al. 2018): yield (layers randomised so far, model copy),
    re-initialising the weighted layers from the top down on a clone; the original is untouched."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    rng = np.random.default_rng(seed)
    weighted = [(path, layer) for path, layer, _ in models.iter_layers(clone)
                if layer.get_weights() and not isinstance(layer, keras.Model)]
    done = []
    for path, layer in reversed(weighted):
        layer.set_weights([rng.normal(0, np.std(w) or 0.05, w.shape).astype(w.dtype) for w in layer.get_weights()])
        done.append(path)
        yield list(done), clone


def sanity_check(model: keras.Model, image: np.ndarray, method, target: Target = None, seed: int = 0,
                 **options) -> list[tuple[str, float]]:
    """Spearman rank correlation between the map of the trained model and of copies with more and
    more top layers randomised: a map that does not change explains the image, not the model."""
    from scipy.stats import spearmanr

    image = np.asarray(image, np.float32)
    resolved = resolve_target(model, image, target)
    reference = method(model, image, resolved, **options).ravel()
    results = []
    for done, clone in randomised_copies(model, seed):
        other = method(clone, image, resolved, **options).ravel()
        correlation = spearmanr(reference, other).statistic if other.std() > 0 else 0.0
        results.append((done[-1], float(np.nan_to_num(correlation))))
    return results
