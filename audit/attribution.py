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

import contextlib
import contextvars
import hashlib
from dataclasses import dataclass
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from audit import graph, heads, models
from audit.errors import AuditError, ImageError

Progress = Callable[[int, int], None]
"""Called with (done, total) between batches: a dashboard job's bar and its Cancel check."""


def _report(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


@dataclass(frozen=True)
class FilterTarget:
    """The mean activation of one filter of a layer: "which pixels make filter 42 fire"."""

    layer: str
    index: int


Target = int | FilterTarget | None


# --- targets and scores ----------------------------------------------------------------------

def has_class_output(model: keras.Model, output: int | None = None) -> bool:
    return heads.find_head(model, output).is_classifier


def resolve_target(model: keras.Model, image: np.ndarray, target: Target, output: int | None = None
                   ) -> int | FilterTarget:
    """None means the top-1 class, or for models without a class output, the strongest channel of the CAM layer."""
    if isinstance(target, FilterTarget):
        return FilterTarget(models.resolve_layer(model, target.layer), int(target.index))
    head = heads.find_head(model, output)
    if target is not None:
        if not head.is_classifier:
            raise AuditError(f"The model has no class output ({head.description}): choose a filter of a layer "
                             "as the target.")
        if not 0 <= int(target) < head.classes:
            raise AuditError(f"Class {target} is out of range: the model has classes 0 to {head.classes - 1}.")
        return int(target)
    if head.is_classifier:
        scores = np.asarray(heads.scores_model(model, head)(image[None], training=False))[0]
        return int(np.argmax(scores))
    layer = models.cam_layer(model)
    maps = np.asarray(models.submodel(model, layer)(image[None], training=False))[0]
    return FilterTarget(layer, int(np.argmax(maps.mean(axis=(0, 1)))))


def _score_of(target: int | FilterTarget):
    """The scalar per sample that a target names, from the last tensor of a graph model's outputs."""
    if isinstance(target, FilterTarget):  # keras.ops: works on symbolic and on real tensors
        return lambda maps: keras.ops.mean(maps[..., target.index], axis=tuple(range(1, len(maps.shape) - 1)))
    return lambda scores: scores[:, target]


def _graph_with_score(model: keras.Model, target: int | FilterTarget, points: list[models.Point] = (),
                      output: int | None = None, replace=None) -> keras.Model:
    """A model from the image to [tensors at `points`..., the target's tensor], in one pass."""
    points = list(points)
    if isinstance(target, FilterTarget):
        return models.graph_model(model, points + [models.Point(target.layer)], replace=replace)
    return heads.scores_model(model, heads.find_head(model, output), points, replace=replace)


def score_model(model: keras.Model, target: int | FilterTarget, output: int | None = None) -> keras.Model:
    """A model from the image to one score per sample: the class score or the filter's mean activation."""
    graph = _graph_with_score(model, target, output=output)
    return keras.Model(graph.inputs[0], _score_of(target)(graph.outputs[-1]))


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

def saliency(model: keras.Model, image: np.ndarray, target: Target = None, output: int | None = None) -> np.ndarray:
    """Vanilla gradient: max over channels of |d score / d pixel|."""
    image = np.asarray(image, np.float32)
    scorer = score_model(model, resolve_target(model, image, target, output), output)
    gradient, _ = _gradients(scorer, image[None])
    return normalise(np.abs(gradient[0]).max(axis=-1))


def smoothgrad(model: keras.Model, image: np.ndarray, target: Target = None, samples: int = 25,
               noise: float = 0.15, seed: int = 0, batch_size: int = 25, output: int | None = None,
               progress: Progress | None = None) -> np.ndarray:
    """Mean |gradient| over noisy copies (noise std as a share of the input's range), batched."""
    image = np.asarray(image, np.float32)
    scorer = score_model(model, resolve_target(model, image, target, output), output)
    sigma = noise * float(image.max() - image.min() or 1.0)
    rng = np.random.default_rng(seed)
    total = np.zeros(image.shape, np.float64)
    batch_size = graph.batch_within(model, batch_size, passes=3)  # within the server's activation budget
    for start in range(0, samples, batch_size):
        count = min(batch_size, samples - start)
        noisy = image[None] + rng.normal(0, sigma, (count, *image.shape)).astype(np.float32)
        gradient, _ = _gradients(scorer, noisy)
        total += np.abs(gradient).sum(axis=0)
        _report(progress, start + count, samples)
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
    scorer = score_model(model, resolve_target(model, image, target, output), output)
    alphas = np.linspace(0.0, 1.0, steps + 1, dtype=np.float32)
    gradients = []
    batch_size = graph.batch_within(model, batch_size, passes=3)
    for start in range(0, len(alphas), batch_size):
        chunk = alphas[start:start + batch_size, None, None, None]
        gradient, _ = _gradients(scorer, baseline[None] + chunk * (image - baseline)[None])
        gradients.append(gradient)
        _report(progress, min(start + batch_size, len(alphas)), len(alphas))
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


_SHARED_PASSES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("shared_passes", default=None)


@contextlib.contextmanager
def shared_passes():
    """Within this block, CAM methods on the same model, image, target and layer share one pass.

    Grad-CAM, Grad-CAM++, Layer-CAM and Guided Grad-CAM all read the layer's maps and the score's
    gradient with respect to them (Chattopadhyay et al. 2018 derive Grad-CAM++'s weights from the
    first-order gradients), so a second method costs no model run. Scoped, not global: inside the
    block the weights must not change (outside it nothing is kept, so a changed model is never stale).
    """
    token = _SHARED_PASSES.set({})
    try:
        yield
    finally:
        _SHARED_PASSES.reset(token)


def _maps_and_gradients(model, image, target, layer, output=None):
    """The layer's maps and the gradient of the target's score with respect to them, from one pass
    (or from the one already made inside `shared_passes`)."""
    target = resolve_target(model, image, target, output)
    layer = models.resolve_layer(model, layer or models.cam_layer(model))
    kept = _SHARED_PASSES.get()
    if kept is None:
        return _one_pass(model, image, target, layer, output)
    key = (id(model), hashlib.sha1(np.ascontiguousarray(image, np.float32).tobytes()).hexdigest(), image.shape,
           repr(target), layer, output)
    if key not in kept:
        kept[key] = (model, _one_pass(model, image, target, layer, output))  # the model held: its id stays its own
    return kept[key][1]


def _one_pass(model, image, target, layer, output):
    graph = _graph_with_score(model, target, [models.Point(layer)], output)
    x = tf.convert_to_tensor(image[None], tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)  # records every op after the input, also in a frozen base (no trainable weights)
        maps, last = graph(x, training=False)
        scores = _score_of(target)(last)
    gradients = tape.gradient(scores, maps)
    if gradients is None:
        raise AuditError(f"The target's score does not depend on layer {layer!r}: choose a layer before it.")
    return maps.numpy()[0], gradients.numpy()[0]


def _cam(model, image, target, layer, combine, upsample: bool, output=None):
    image = np.asarray(image, np.float32)
    maps, gradients = _maps_and_gradients(model, image, target, layer, output)
    if maps.ndim != 3:
        raise AuditError(f"Layer {layer!r} gives no spatial map (shape {maps.shape}); choose a conv layer.")
    cam = combine(maps, gradients)
    return normalise(_resize(cam, image.shape[:2])) if upsample else cam


def grad_cam(model: keras.Model, image: np.ndarray, target: Target = None, layer: str | None = None,
             upsample: bool = True, output: int | None = None) -> np.ndarray:
    """Grad-CAM on a conv layer (default: the last one); `upsample=False` gives the raw layer-size map."""
    return _cam(model, image, target, layer, lambda a, g: weighted_maps(a, grad_cam_weights(g)), upsample, output)


def grad_cam_plus_plus(model: keras.Model, image: np.ndarray, target: Target = None, layer: str | None = None,
                       upsample: bool = True, output: int | None = None) -> np.ndarray:
    return _cam(model, image, target, layer, lambda a, g: weighted_maps(a, grad_cam_plus_plus_weights(a, g)),
                upsample, output)


def layer_cam(model: keras.Model, image: np.ndarray, target: Target = None, layer: str | None = None,
              upsample: bool = True, output: int | None = None) -> np.ndarray:
    return _cam(model, image, target, layer, layer_cam_map, upsample, output)


def score_cam(model: keras.Model, image: np.ndarray, target: Target = None, layer: str | None = None,
              max_channels: int = 32, batch_size: int = 32, fill: np.ndarray | None = None,
              output: int | None = None, progress: Progress | None = None) -> np.ndarray:
    """Score-CAM (Wang et al. 2020): each channel, upsampled and scaled to [0, 1], masks the image; the
    target's score on the masked image weighs the channel (softmax over channels). Only the `max_channels`
    channels of largest spatial variance are used (Faster Score-CAM: a flat channel masks nothing)."""
    image = np.asarray(image, np.float32)
    resolved = resolve_target(model, image, target, output)
    layer = models.resolve_layer(model, layer or models.cam_layer(model))
    maps = np.asarray(models.submodel(model, layer)(image[None], training=False))[0]
    keep = score_cam_channels(maps, max_channels)
    scorer = score_model(model, resolved, output)
    fill = np.zeros_like(image) if fill is None else np.broadcast_to(fill, image.shape)
    masks = np.stack([_scaled01(_resize(maps[:, :, k], image.shape[:2])) for k in keep])
    scores = []
    batch_size = graph.batch_within(model, batch_size)
    for start in range(0, len(keep), batch_size):
        m = masks[start:start + batch_size, :, :, None]
        scores.append(np.asarray(scorer(image[None] * m + fill[None] * (1 - m), training=False)))
        _report(progress, start + len(m), len(keep))
    scores = np.concatenate(scores)
    weights = np.exp(scores - scores.max())
    weights /= weights.sum()
    return normalise(_resize(weighted_maps(maps[:, :, keep], weights), image.shape[:2]))


def score_cam_channels(maps: np.ndarray, cap: int) -> np.ndarray:
    """The `cap` channels of (h, w, K) maps with the largest spatial variance, largest first."""
    return np.argsort(maps.var(axis=(0, 1)), kind="stable")[::-1][:cap]


def _scaled01(values: np.ndarray) -> np.ndarray:
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def patch_starts(size: int, patch: int, stride: int) -> list[int]:
    """Where patches start along one side: every `stride` pixels, plus one flush with the far edge when
    the stride does not land there, so every pixel is covered (64 px, patch 10, stride 4: ..., 52, 54)."""
    last = max(size - patch, 0)
    starts = list(range(0, last + 1, stride))
    return starts if starts[-1] == last else starts + [last]


def occlusion_defaults(size: int) -> tuple[int, int]:
    """The default patch and stride for a side of `size` pixels: an eighth and a sixteenth of it."""
    return max(2, size // 8), max(1, size // 16)


def occlusion(model: keras.Model, image: np.ndarray, target: Target = None, patch: int | None = None,
              stride: int | None = None, fill: np.ndarray | float = 0.0, batch_size: int = 64,
              output: int | None = None, progress: Progress | None = None) -> np.ndarray:
    """How much the score drops when a patch is covered, averaged over the patches covering each pixel.

    `fill`: a value, one per channel, or a whole image of the input's shape (e.g. the preprocessed black
    image) whose pixels under the patch replace the covered ones. Patch and stride default to
    occlusion_defaults of the image's shorter side.
    """
    image = np.asarray(image, np.float32)
    default_patch, default_stride = occlusion_defaults(min(image.shape[:2]))
    patch, stride = patch or default_patch, stride or default_stride
    fill = np.broadcast_to(np.asarray(fill, np.float32), image.shape)
    scorer = score_model(model, resolve_target(model, image, target, output), output)
    height, width = image.shape[:2]
    base = float(np.asarray(scorer(image[None], training=False))[0])
    corners = [(y, x) for y in patch_starts(height, patch, stride) for x in patch_starts(width, patch, stride)]
    drops, counts = np.zeros((height, width)), np.zeros((height, width))
    batch_size = graph.batch_within(model, batch_size)
    for start in range(0, len(corners), batch_size):
        chunk = corners[start:start + batch_size]
        batch = np.repeat(image[None], len(chunk), axis=0)
        for i, (y, x) in enumerate(chunk):
            batch[i, y:y + patch, x:x + patch] = fill[y:y + patch, x:x + patch]
        scores = np.asarray(scorer(batch, training=False))
        for (y, x), score in zip(chunk, scores):
            drops[y:y + patch, x:x + patch] += base - score
            counts[y:y + patch, x:x + patch] += 1
        _report(progress, start + len(chunk), len(corners))
    return normalise(np.where(counts > 0, drops / np.maximum(counts, 1), 0))


# --- guided backpropagation ------------------------------------------------------------------

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


def _guided_replacement(layer):
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
    resolved = resolve_target(model, image, target, output)
    graph = _graph_with_score(model, resolved, output=output, replace=_guided_replacement)
    scorer = keras.Model(graph.inputs[0], _score_of(resolved)(graph.outputs[-1]))
    gradient, _ = _gradients(scorer, image[None])
    return gradient[0]


def guided_backprop(model: keras.Model, image: np.ndarray, target: Target = None, output: int | None = None
                    ) -> np.ndarray:
    """Guided Backpropagation: max over channels of the positive guided gradient."""
    return normalise(np.maximum(guided_gradient(model, image, target, output), 0).max(axis=-1))


def guided_grad_cam(model: keras.Model, image: np.ndarray, target: Target = None, layer: str | None = None,
                    output: int | None = None) -> np.ndarray:
    """Guided Grad-CAM: the guided map times the upsampled Grad-CAM (Selvaraju et al. 2017)."""
    image = np.asarray(image, np.float32)
    resolved = resolve_target(model, image, target, output)
    return normalise(guided_backprop(model, image, resolved, output) * grad_cam(model, image, resolved, layer,
                                                                                output=output))


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

BATCHED = frozenset({"SmoothGrad", "Integrated Gradients", "Score-CAM", "Occlusion"})
"""The methods that run many passes in batches: they take `progress` (done, total) between batches."""


def black_options(method: str, black: np.ndarray) -> dict:
    """Where a method takes the black image: Integrated Gradients' "black" baseline, Score-CAM's and
    occlusion's fill."""
    return {"Integrated Gradients": {"black": black}, "Score-CAM": {"fill": black},
            "Occlusion": {"fill": black}}.get(method, {})


def map_of(model: keras.Model, x: np.ndarray, black: np.ndarray, method: str, target: Target = None,
           progress: Progress | None = None, **options) -> np.ndarray:
    """One method's map of a preprocessed image `x`, with `black` the preprocessed black image of the
    same size (see explain): what the dashboard's cached maps compute."""
    extra = black_options(method, black)
    if method in BATCHED:
        extra["progress"] = progress
    return METHODS[method](model, x, target, **options, **extra)


def explain(loaded: models.LoadedModel, pixels: np.ndarray, method: str, target: Target = None,
            preprocessing: str | None = None, fit: str = "crop", progress: Progress | None = None,
            **options) -> np.ndarray:
    """One method's map for a uint8 RGB image: the code path of the dashboard, the report and notebooks.

    The image and an all-black image of its size both go through the model's preprocessing and fit, so
    a "black" baseline or fill means black pixels whatever the preprocessing (zeros in the model's input
    space would be mid-grey for a [-1, 1] model and the mean colour for a caffe one).
    """
    pixels = np.asarray(pixels)
    x = loaded.preprocess(pixels, preprocessing, fit)[0]
    black = loaded.preprocess(np.zeros_like(pixels), preprocessing, fit)[0]
    return map_of(loaded.model, x, black, method, target, progress, **options)



# --- trust -----------------------------------------------------------------------------------

def _same_grid(attribution: np.ndarray, mask: np.ndarray) -> None:
    if attribution.shape != mask.shape:
        raise ImageError(f"The object mask is {mask.shape[0]}x{mask.shape[1]} but the map is "
                         f"{attribution.shape[0]}x{attribution.shape[1]}: fit the mask as its image "
                         "(audit.images.fit_mask).")


def mass_inside(attribution: np.ndarray, mask: np.ndarray) -> float:
    """Share of the attribution mass that falls on the object."""
    _same_grid(attribution, mask)
    total = float(attribution.sum())
    return float(attribution[mask].sum()) / total if total > 0 else 0.0


def peak_inside(attribution: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the map's maximum falls on the object."""
    _same_grid(attribution, mask)
    return bool(mask.flat[int(np.argmax(attribution))])


DELETED_BY = "black pixels (the preprocessed black image), the most attributed first, 5% of the pixels a step"
RANDOM_ORDERS = 5
"""Seeded random orders a map's deletion and insertion areas must beat, each one (not their mean)."""


def deletion_measure(target: Target) -> str:
    """What a deletion curve measures for a target, as the dashboard names it."""
    return ("the filter's mean activation clipped at 0, relative to the intact image" if isinstance(target, FilterTarget)
            else "the target class's probability")


def deletion_curve(model: keras.Model, image: np.ndarray, attribution_map: np.ndarray, target: Target = None,
                   steps: int = 20, fill: np.ndarray | float = 0.0, output: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray, float]:
    """Deletion (Petsiuk et al. 2018): replace pixels by `fill` in the map's order, most attributed first,
    and measure the target after each step: a class's probability (softmax or sigmoid of the explained
    output), or a filter's mean activation clipped at 0 divided by its value on the intact image (NaN when
    the filter does not fire on the intact image: no share of nothing).

    Returns (fractions removed, measures, area under the curve): a lower area means the map found what
    the target depends on; random_curves gives the areas to beat.
    """
    order = np.argsort(np.asarray(attribution_map).ravel(), kind="stable")[::-1]
    fractions, values = _curves(model, image, [order], target, steps, fill, output, insert=False)
    return fractions, values[0], _area(values[0], fractions)


def insertion_curve(model: keras.Model, image: np.ndarray, attribution_map: np.ndarray, target: Target = None,
                    steps: int = 20, fill: np.ndarray | float = 0.0, output: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray, float]:
    """Insertion (Petsiuk et al. 2018): start from the `fill` image and put the image's pixels back in the map's
    order, most attributed first; the same measure as deletion. A higher area means the map found what the
    target depends on."""
    order = np.argsort(np.asarray(attribution_map).ravel(), kind="stable")[::-1]
    fractions, values = _curves(model, image, [order], target, steps, fill, output, insert=True)
    return fractions, values[0], _area(values[0], fractions)


def random_curves(model: keras.Model, image: np.ndarray, target: Target = None, steps: int = 20,
                  fill: np.ndarray | float = 0.0, output: int | None = None, orders: int = RANDOM_ORDERS,
                  seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The chance level of deletion and insertion: the same measures with pixels taken in `orders` seeded
    random orders. For each kind, (fractions, the mean curve, the area of every order). It does not depend on
    any map: one per image and target."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(np.shape(image)[:2]))
    permutations = [rng.permutation(size) for _ in range(orders)]
    found = {}
    for kind in ("deletion", "insertion"):
        fractions, values = _curves(model, image, permutations, target, steps, fill, output, insert=kind == "insertion")
        found[kind] = (fractions, values.mean(axis=0), np.array([_area(row, fractions) for row in values]))
    return found


def beats_random(kind: str, area: float, random_areas: np.ndarray) -> bool:
    """A map beats chance only when its area is better than every random order's by more than the random
    orders differ among themselves (their spread is the measure's noise): below the lowest deletion area
    minus that spread, above the highest insertion area plus it. A tie, a hair's breadth or a NaN is no win."""
    random_areas = np.asarray(random_areas, np.float64)
    if not np.isfinite(area) or not np.all(np.isfinite(random_areas)):
        return False
    spread = random_areas.max() - random_areas.min()
    if kind == "deletion":
        return bool(area < random_areas.min() - spread)
    return bool(area > random_areas.max() + spread)


def saturated(chance: tuple[np.ndarray, np.ndarray, np.ndarray]) -> bool:
    """Whether a deletion curve collapses at its first step in random order (the first 5% of pixels already
    take the measure below a tenth of the intact image's): its areas then differ only in that step and can
    hardly tell maps apart."""
    _, values, _ = chance
    return bool(np.isfinite(values[0]) and values[0] > 0 and values[1] < 0.1 * values[0])


def _area(values: np.ndarray, fractions: np.ndarray) -> float:
    return float(np.trapezoid(values, fractions))


def _curves(model, image, orders, target, steps, fill, output, insert: bool) -> tuple[np.ndarray, np.ndarray]:
    """(fractions, one measure curve per order): pixels taken from the image (deletion) or given back to the
    fill image (insertion) in each order."""
    image = np.asarray(image, np.float32)
    resolved = resolve_target(model, image, target, output)
    fractions = np.linspace(0, 1, steps + 1)
    fill = np.broadcast_to(np.asarray(fill, np.float32), image.shape)
    start, source = (fill, image) if insert else (image, fill)
    batch = np.repeat(start[None], len(orders) * len(fractions) + 1, axis=0)
    batch[-1] = image  # the intact image, the reference of a filter's measure
    for number, order in enumerate(orders):
        for row, fraction in enumerate(fractions):
            changed = np.zeros(order.size, bool)
            changed[order[:int(round(fraction * order.size))]] = True
            changed = changed.reshape(image.shape[:2])
            batch[number * len(fractions) + row][changed] = source[changed]
    if isinstance(resolved, FilterTarget):
        maps = np.asarray(models.submodel(model, resolved.layer)(batch, training=False), np.float64)
        values = np.maximum(maps[..., resolved.index], 0).mean(axis=tuple(range(1, maps.ndim - 1)))
        intact = values[-1]
        values = values[:-1] / intact if intact > 0 else np.full(len(values) - 1, np.nan)
    else:
        head = heads.find_head(model, output)
        scores = np.asarray(heads.scores_model(model, head)(batch[:-1], training=False))
        values = heads.probabilities(scores, head)[:, resolved]
    return fractions, values.reshape(len(orders), len(fractions))


def randomised_copies(model: keras.Model, seed: int = 0):
    """Cascading randomisation (Adebayo et al. 2018): yield (layers randomised so far, model copy),
    re-initialising the weighted layers from the top down on a clone, each with its own initialisers
    (a BatchNormalization gets its identity statistics back, never a negative variance); the original
    is untouched. Keras's global random seed is set from `seed` for each layer, so copies repeat."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    weighted = [(path, models.get_layer(clone, path)) for path in models.weighted_layers(clone)]
    done = []
    for step, (path, layer) in enumerate(reversed(weighted)):
        keras.utils.set_random_seed(seed * 100_003 + step)
        layer.set_weights(_fresh_weights(layer, np.random.default_rng([seed, step])))
        done.append(path)
        yield list(done), clone


def _fresh_weights(layer, rng: np.random.Generator) -> list[np.ndarray]:
    """The weights a new copy of the layer starts with (its initialisers); a layer that cannot be rebuilt
    from its config gets a normal draw with each weight's own spread."""
    old = layer.get_weights()
    try:
        fresh = type(layer).from_config(layer.get_config())
        if not fresh.built:
            fresh.build(layer.input.shape)
        new = fresh.get_weights()
    except Exception:  # noqa: BLE001 (any layer Keras cannot rebuild alone: fall back, below)
        new = []
    if [w.shape for w in new] == [w.shape for w in old]:
        return new
    return [rng.normal(0, np.std(w) or 0.05, w.shape).astype(w.dtype) for w in old]


def sanity_check(model: keras.Model, image: np.ndarray, method, target: Target = None, seed: int = 0,
                 limit: int | None = None, output: int | None = None, progress: Progress | None = None,
                 **options) -> list[tuple[str, float]]:
    """Spearman rank correlation between the map of the trained model and of copies with more and
    more top layers randomised (at most `limit` of them): a map that does not change explains the
    image, not the model. A copy whose target score is not finite raises an error, never a number."""
    from scipy.stats import spearmanr

    image = np.asarray(image, np.float32)
    resolved = resolve_target(model, image, target, output)
    extra = {} if output is None else {"output": output}
    reference = method(model, image, resolved, **extra, **options).ravel()
    if reference.std() == 0:
        raise AuditError("The map of the trained model is flat (every pixel equal), so there is nothing to compare "
                         "its randomised copies with; choose another method or target.")
    results = []
    for done, clone in randomised_copies(model, seed):
        score = np.asarray(score_model(clone, resolved, output)(image[None], training=False))
        if not np.all(np.isfinite(score)):
            raise AuditError(f"Randomising {done[-1]} made the model's output non-finite ({score.ravel()[0]}); "
                             "the sanity check stops there.")
        other = method(clone, image, resolved, **extra, **options).ravel()
        correlation = spearmanr(reference, other).statistic if other.std() > 0 else 0.0
        results.append((done[-1], float(np.nan_to_num(correlation))))
        _report(progress, len(results), limit or len(models.weighted_layers(model)))
        if limit is not None and len(results) >= limit:
            break
    return results
