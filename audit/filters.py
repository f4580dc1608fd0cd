"""Filter galleries: the input that maximises a filter, grown from noise by gradient ascent.

Erhan et al. 2009; the Keras blog "How convolutional neural networks see the world"; Lucid's
composable objectives, transforms and regularisers (lucid/optvis/render.py). All filters of a
gallery are optimised together as one batch through the sub-model cut at their layer, by one compiled
step traced once per (model, layer, graph constants) and reused by every later gallery there. Random
transforms are drawn per filter from a generator seeded by (seed, filter), so an image does not depend
on which other filters share its batch.

Images are parameterised as pixels or, as in Olah et al. 2017, by a decorrelated Fourier basis
(audit.parameterization); either way the model sees floats in [0, 1] with its own preprocessing applied
inside the graph, so what is optimised is exactly what a photo would go through. The compiled steps are
in audit.ascent.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from audit import ascent, compiled, cost, heads, limits, models, parameterization
from audit.errors import AuditError
from audit.examples import CONTEXT_SIDE, merge_top, patches, top_examples  # noqa: F401 (what a filter fires on in the user's images)
from audit.receptive import receptive_field  # noqa: F401

_CAFFE_MEAN = {"caffe": [103.939, 116.779, 123.68], "caffe_bsds": [104.00699, 116.66877, 122.67892]}
_TORCH_MEAN, _TORCH_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


_LUMINANCE = [0.299, 0.587, 0.114]


def tf_preprocess(pixels01: tf.Tensor, mode: str) -> tf.Tensor:
    """audit.images.preprocess inside the graph, from [0, 1] pixels (so gradients flow through it).

    Grey pixels (one channel) go as LoadedModel.preprocess takes them: as a grey RGB image, then its
    luminance, so a gallery and a photo see the same preprocessing.
    """
    if pixels01.shape[-1] == 1:
        rgb = tf.repeat(pixels01, 3, axis=-1)
        return tf.reduce_sum(tf_preprocess(rgb, mode) * tf.constant(_LUMINANCE), axis=-1, keepdims=True)
    x = pixels01 * 255.0
    if mode == "unit":
        return pixels01
    if mode == "raw":
        return x
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode in _CAFFE_MEAN:
        return x[..., ::-1] - tf.constant(_CAFFE_MEAN[mode])
    if mode == "torch":
        return (pixels01 - tf.constant(_TORCH_MEAN)) / tf.constant(_TORCH_STD)
    raise AuditError(f"Unknown preprocessing {mode!r}.")


@dataclass(frozen=True)
class Options:
    """Everything that shapes a gallery; part of its cache key."""

    size: int = 128
    steps: int = 20
    learning_rate: float = 0.05
    octaves: int = 1  # >1: start smaller and upscale between octaves (multi-scale growth)
    octave_scale: float = 1.4
    jitter: int = 4  # pixels of random shift per step (0: off)
    scale: float = 0.05  # random zoom of +-scale per step (0: off)
    blur_every: int = 0  # Gaussian blur the image every k steps (0: off)
    blur_sigma: float = 0.5
    l2_decay: float = 0.0  # shrink the image towards grey each step
    total_variation: float = 0.0  # weight of the total-variation penalty
    border: float = 0.1  # share of the map ignored on each side (edge effects)
    warmup: int = 0  # first steps ascend the pre-activation, so a closed ReLU can open
    preprocessing: str = "unit"
    parameterization: str = "pixel"  # or "fourier": Lucid's decorrelated Fourier image (no octaves, blur or decay)
    copies: int = 1  # images per filter, pushed apart by the diversity term
    diversity: float = 0.0  # weight of the copies' Gram similarity, in units of the filter's own activation
    negative: bool = False  # descend: what pushes the filter down (on its pre-activation where it has one)

    def __post_init__(self):
        if self.parameterization not in parameterization.PARAMETERIZATIONS:
            raise AuditError(f"Unknown parameterization {self.parameterization!r}: "
                             f"one of {', '.join(parameterization.PARAMETERIZATIONS)}.")
        if not 1 <= self.copies <= MAX_COPIES:
            raise AuditError(f"Copies per filter go from 1 to {MAX_COPIES} (asked: {self.copies}).")

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


PHOTO_SIDE = 96
"""An RGB input at least this big is taken for a photo model (ImageNet-style), where Fourier images can lead."""


def depth(model: keras.Model, layer: str) -> float | None:
    """Where a layer sits among the model's conv layers, from just above 0 (the first) to 1 (the last); None
    for a layer that is no conv."""
    convs = models.conv_layers(model)
    return (convs.index(layer) + 1) / len(convs) if layer in convs else None


DEEP = 0.67
"""The deepest third of the conv layers starts past this depth."""


def default_parameterization(model: keras.Model, layer: str) -> str:
    """Fourier where it measured better on both counts (bench/filter_gallery.py --parameterizations, VGG16 at 30
    steps): the deepest third of a photo model's conv layers, 1.7x the pixel images' median activation at
    block5_conv3 with less high-frequency energy. In the middle (block4_conv1) it reaches 0.8x with less
    high-frequency energy: pixels stay the default there (more activation), and on small or grey inputs, where
    it was not measured."""
    shape = model.inputs[0].shape
    sides = [side or PHOTO_SIDE for side in shape[1:-1]]  # a free size takes photos too
    photo = shape[-1] == 3 and len(sides) == 2 and min(sides) >= PHOTO_SIDE
    where = depth(model, layer)
    return "fourier" if photo and where is not None and where > DEEP else "pixel"


def default_options(model: keras.Model, layer: str, preprocessing: str, parameterization: str = "pixel") -> Options:
    """Sensible defaults by depth: deeper layers want more steps and, in pixel space, octaves and smoothing.

    A Fourier image needs none of the smoothing (its basis is the regulariser): Adam, with the same steps,
    jitter and scale as pixels at that depth, and a warm-up (its near-grey start leaves more ReLUs closed).
    Lucid's step of 0.05 is made for 512 steps; at our 20-60 the step trades activation for high frequencies
    (VGG16, 16 filters, 30 steps, bench/filter_gallery.py): block4_conv1 0.2 -> 0.71x the pixel images'
    activation, 0.3 -> 0.81x, 0.4 -> 0.85x with as much energy above Nyquist/4 as pixels; block5_conv3 0.2 ->
    1.7x with less, 0.3 -> 1.9x with more. Hence 0.3 in the middle and 0.2 in the deepest third. A step that
    decays over the run loses activation (cosine from 0.4: 0.66x); a normalised gradient step blurs (0.6x).
    """
    where = depth(model, layer) or 1.0  # a layer that is no conv is taken for the deepest
    if parameterization == "fourier":
        pixel = default_options(model, layer, preprocessing)
        return Options(steps=pixel.steps, learning_rate=0.2 if where > DEEP else 0.3, warmup=5,
                       preprocessing=preprocessing, parameterization="fourier")
    if where <= 0.34:
        return Options(steps=20, preprocessing=preprocessing)
    # The octaves spend steps at a smaller size: a longer step (0.08, against 0.05 in one octave) and, in
    # the middle, a first octave only 1.2x smaller keep the final activation above tf-keras-vis's on the
    # same job (bench/filter_gallery.py on block4_conv1: 152 against 129-151 over its seeds 0-2).
    if where <= DEEP:
        return Options(steps=30, octaves=2, octave_scale=1.2, blur_every=4, l2_decay=1e-3, learning_rate=0.08,
                       preprocessing=preprocessing)
    return Options(steps=40, octaves=3, blur_every=4, l2_decay=1e-3, total_variation=0.05, warmup=5,
                   learning_rate=0.08, preprocessing=preprocessing)


MAX_COPIES = 8
"""Diverse images per filter at most: each copy costs a full ascent."""

RESPONSE_THRESHOLD = 1e-6
"""A filter responds when its final image drives its mean activation (border excluded) above this: a millionth,
not 0, since a ReLU at its edge leaves round-off (1.1e-36 counted as a response)."""


@dataclass
class Gallery:
    images: np.ndarray  # uint8 (N, size, size, channels of the model's input)
    activations: np.ndarray  # float (N,): final mean activation of each filter on its own image
    curves: np.ndarray  # float (N, steps): the objective per step
    responded: np.ndarray  # bool (N,): the final image drives the filter above RESPONSE_THRESHOLD
    started: np.ndarray  # bool (N,): the ascent on the filter itself moved it above 0 at some step


def response_flags(curves: np.ndarray, final: np.ndarray, warmup: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(started, responded) per filter, the two failures a gallery can show. Never started: its objective
    stayed at or below 0 at every step after the warm-up (a ReLU that never opened: no gradient, so the
    image never moved for it). No response: its final image does not drive it above RESPONSE_THRESHOLD
    (an ascent can open the ReLU on the way and still end at 0)."""
    own = np.asarray(curves)[:, warmup:]
    return (own > 0).any(axis=1), np.asarray(final) > RESPONSE_THRESHOLD


def _seeds(filters: list[int], seed: int, copies: int, purpose: int) -> list[list[int]]:
    """One seed per image: (seed, filter, purpose) for a filter's first copy, with the copy number after."""
    return [[seed, index, purpose] + ([copy] if copy else []) for index in filters for copy in range(copies)]


def _transform_table(filters: list[int], seed: int, steps: int, options: Options) -> np.ndarray:
    """Per image and step: (dx, dy, zoom). Seeded by (seed, filter, copy) alone: batching cannot change it."""
    seeds = _seeds(filters, seed, options.copies, 1)
    table = np.zeros((steps, len(seeds), 3), np.float32)
    for column, image_seed in enumerate(seeds):
        rng = np.random.default_rng(np.random.SeedSequence(image_seed))
        table[:, column, 0:2] = rng.integers(-options.jitter, options.jitter + 1, (steps, 2)) if options.jitter else 0
        table[:, column, 2] = rng.uniform(-options.scale, options.scale, steps) if options.scale else 0
    return table


def _start_images(filters: list[int], seed: int, size: int, channels: int = 3, copies: int = 1) -> np.ndarray:
    """Grey plus a little noise, per image from its own seed, with the model's input channels."""
    return np.stack([
        0.5 + 0.1 * np.random.default_rng(np.random.SeedSequence(image_seed)).standard_normal(
            (size, size, 3))[..., :channels]
        for image_seed in _seeds(filters, seed, copies, 0)
    ]).astype(np.float32)


def _objective_fn(cut_post: keras.Model, cut_pre: keras.Model | None, options: Options):
    """Mean activation of filter k of sample k, border excluded: one value per sample (any image size), with
    the maps it was read from (the diversity term compares them)."""

    def objective(pixels, filters, pre: bool):
        x = tf_preprocess(pixels, options.preprocessing)
        maps = (cut_pre if pre and cut_pre is not None else cut_post)(x, training=False)
        if maps.shape.rank == 2:  # a dense layer or class scores: one value per unit
            return tf.gather(maps, filters, axis=1, batch_dims=1), maps
        chosen = tf.gather(maps, filters, axis=-1, batch_dims=1)  # (N, h, w)
        h, w = tf.shape(chosen)[1], tf.shape(chosen)[2]
        bh = tf.cast(tf.floor(tf.cast(h, tf.float64) * options.border), tf.int32)
        bw = tf.cast(tf.floor(tf.cast(w, tf.float64) * options.border), tf.int32)
        return tf.reduce_mean(chosen[:, bh:h - bh, bw:w - bw], axis=[1, 2]), maps

    return objective


def gallery(model: keras.Model, layer: str, filters, size: int = 128, steps: int = 20, seed: int = 0,
            progress: Callable[[int, int], None] | None = None, **options) -> tuple[np.ndarray, np.ndarray]:
    """Grow one image per filter of `layer`; returns (uint8 images (N, size, size, C), final activations (N,))."""
    result = render(model, layer, list(filters), Options(size=size, steps=steps, **options), seed, progress)
    return result.images, result.activations


@dataclass
class _Compiled:
    """What a gallery traces, kept per model and reused by every later gallery that shares its graph."""

    cut_post: keras.Model
    cut_pre: keras.Model | None
    objective: Callable
    steps: dict  # pre-activation or not -> the compiled ascent step
    floors: dict  # largest size -> the smallest input the cut takes (minimum_size)


def _graph_key(options: Options) -> tuple:
    """The options that are constants of the traced step (the others are its inputs or the loop's)."""
    return (options.preprocessing, options.border, options.learning_rate, options.l2_decay, options.total_variation,
            options.blur_sigma, options.warmup > 0, options.parameterization, options.negative, options.copies,
            options.diversity)


def _compiled(model: keras.Model, what: tuple, options: Options, cuts: Callable[[], tuple]) -> _Compiled:
    """The traced pieces for (`what`, the options' graph constants) on this model, built on first use and kept
    with the model (audit.compiled): a second gallery on the same layer pays only its steps."""

    def build():
        cut_post, cut_pre = cuts()
        objective = _objective_fn(cut_post, cut_pre, options)
        channels_in = int(cut_post.inputs[0].shape[-1])
        spec = tf.TensorSpec([None, *cut_post.inputs[0].shape[1:3], channels_in], tf.float32)
        steps = {pre: (ascent.fourier_step(objective, options, channels_in, pre)
                       if options.parameterization == "fourier" else ascent.pixel_step(objective, options, spec, pre))
                 for pre in {False, cut_pre is not None and options.warmup > 0}}
        return _Compiled(cut_post, cut_pre, objective, steps, {})

    return compiled.kept(model, ("gallery", what, _graph_key(options)), build)


def render(model: keras.Model, layer: str, filters: list[int], options: Options, seed: int = 0,
           progress: Callable[[int, int], None] | None = None) -> Gallery:
    """The gallery with its loss curves and response flags (see `gallery` for the short form)."""
    path = models.resolve_layer(model, layer)

    def cuts():
        cut_post = models.submodel(model, path)
        any_size = len(cut_post.outputs[0].shape) == 4  # maps: any image size works up to a conv layer
        if any_size:
            cut_post = models.submodel(model, path, any_size=True)
        fused = models.has_fused_activation(models.get_layer(model, path))
        if options.negative and fused:  # below a ReLU's zero nothing pushes further: descend what it reads
            return models.submodel(model, path, pre_activation=True, any_size=any_size), None
        cut_pre = (models.submodel(model, path, pre_activation=True, any_size=any_size)
                   if options.warmup and fused else None)
        return cut_post, cut_pre

    return _grow(_compiled(model, ("layer", path), options, cuts), path, filters, options, seed, progress)


def class_images(model: keras.Model, classes: list[int], options: Options, seed: int = 0,
                 progress: Callable[[int, int], None] | None = None, output: int | None = None) -> Gallery:
    """Class-model images: the input that maximises each class score before the softmax (Simonyan et al.
    2014: maximising a probability can be done by pushing the other classes down instead)."""
    head = heads.find_head(model, output)
    options = Options(**{**asdict(options), "warmup": 0})  # class scores have no ReLU to open
    pieces = _compiled(model, ("classes", head.output), options, lambda: (heads.scores_model(model, head), None))
    return _grow(pieces, "the class scores", list(classes), options, seed, progress)


def minimum_size(cut: keras.Model, largest: int) -> int:
    """The smallest square input (up to `largest`) for which the cut still gives a map of at least 1 x 1.

    Deep layers of InceptionV3 or Xception need tens of pixels (valid convolutions and strides shrink
    the map); the multi-scale octaves never start below this.
    """
    channels = cut.inputs[0].shape[-1]

    def fits(size: int) -> bool:
        try:
            shape = cut.compute_output_spec(keras.KerasTensor((1, size, size, channels))).shape
        except Exception:  # noqa: BLE001 (Keras raises several types for a negative dimension)
            return False
        return all(d is None or d >= 1 for d in shape[1:-1])

    low, high = 1, largest
    if not fits(high):
        return largest
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle + 1, high)
    return low


def _grow(compiled: _Compiled, what: str, filters: list[int], options: Options, seed: int, progress) -> Gallery:
    """The gallery in chunks whose forward and backward passes fit the batch budget (512 filters of a 224 px layer
    were one batch of tens of GB); each image's ascent is its own, so chunks give the one batch's images."""
    shape = compiled.cut_post.inputs[0].shape
    size = options.size if shape[1] is None else int(shape[1])
    per_filter = 3 * options.copies * cost.cost(compiled.cut_post, (size, size)).peak_bytes
    chunk = max(1, limits.BATCH_BYTES.value // max(per_filter, 1))
    starts = range(0, max(len(filters), 1), chunk)  # none: the batch says what is wrong
    parts = [_grow_batch(compiled, what, filters[start:start + chunk], options, seed, None if progress is None else
                         lambda done, total, number=number: progress(number * total + done, len(starts) * total))
             for number, start in enumerate(starts)]
    return Gallery(*(np.concatenate([getattr(part, name) for part in parts]) for name in Gallery.__annotations__))


def _grow_batch(compiled: _Compiled, what: str, filters: list[int], options: Options, seed: int, progress) -> Gallery:
    cut_post = compiled.cut_post
    if cut_post.inputs[0].shape[1] is not None:  # through a Flatten/Dense only the model's own size does
        options = Options(**{**asdict(options), "size": int(cut_post.inputs[0].shape[1]), "octaves": 1})
    channels = int(cut_post.outputs[0].shape[-1])
    if not filters or min(filters) < 0 or max(filters) >= channels:
        raise AuditError(f"Filters must be between 0 and {channels - 1} for {what}.")
    table = _transform_table(filters, seed, options.steps, options)
    index = tf.constant([f for f in filters for _ in range(options.copies)], tf.int32)
    grow = _grow_fourier if options.parameterization == "fourier" else _grow_pixels
    pixels, curves = grow(compiled, filters, options, seed, index, table, progress)
    final = compiled.objective(pixels, index, False)[0].numpy()
    curve = np.stack(curves, axis=1) if curves else np.zeros((len(index), 0))
    sign = -1.0 if options.negative else 1.0  # a negative image "responds" when it pushes the filter below 0
    started, responded = response_flags(sign * curve, sign * final,
                                        options.warmup if compiled.cut_pre is not None else 0)
    images = np.round(pixels.numpy() * 255).astype(np.uint8)
    return Gallery(images, final.astype(np.float64), curve, responded, started)


def _grow_pixels(compiled: _Compiled, filters, options: Options, seed: int, index, table, progress):
    """Pixel-space ascent, optionally multi-scale (octaves); returns (final pixels, per-step values)."""
    cut_post, cut_pre, steps = compiled.cut_post, compiled.cut_pre, compiled.steps
    if options.octaves > 1 and options.size not in compiled.floors:
        compiled.floors[options.size] = minimum_size(cut_post, options.size)
    floor = compiled.floors[options.size] if options.octaves > 1 else options.size
    sizes = [max(min(16, options.size), floor, int(round(options.size / options.octave_scale ** k)))
             for k in range(options.octaves)]
    sizes = sizes[::-1]
    per_octave = np.diff(np.linspace(0, options.steps, options.octaves + 1).round().astype(int))
    pixels = tf.constant(_start_images(filters, seed, sizes[0], int(cut_post.inputs[0].shape[-1]), options.copies))
    curves, done = [], 0
    for size, count in zip(sizes, per_octave):
        pixels = tf.image.resize(pixels, (size, size), method="bilinear") if pixels.shape[1] != size else pixels
        for _ in range(count):
            blur_now = bool(options.blur_every) and (done + 1) % options.blur_every == 0 and done + 1 < options.steps
            step = steps[cut_pre is not None and done < options.warmup]
            pixels, values = step(pixels, index, tf.constant(table[done]), tf.constant(blur_now))
            curves.append(values.numpy())
            done += 1
            if progress is not None:
                progress(done, options.steps)
    return pixels, curves


def _grow_fourier(compiled: _Compiled, filters, options: Options, seed: int, index, table, progress):
    """Fourier-space ascent at the final size (the basis already favours the low frequencies that octaves
    and blur buy in pixel space); returns (final pixels, per-step values)."""
    size, channels = options.size, int(compiled.cut_post.inputs[0].shape[-1])
    spectra = tf.constant(parameterization.start_spectra(_seeds(filters, seed, options.copies, 0), size, channels))
    scale = tf.constant(parameterization.spectrum_scale(size, size))
    m, v, t = tf.zeros_like(spectra), tf.zeros_like(spectra), tf.constant(0.0)
    curves = []
    for done in range(options.steps):
        step = compiled.steps[compiled.cut_pre is not None and done < options.warmup]
        spectra, m, v, t, values = step(spectra, m, v, t, scale, index, tf.constant(table[done]))
        curves.append(values.numpy())
        if progress is not None:
            progress(done + 1, options.steps)
    return parameterization.to_pixels(spectra, scale), curves


def first_layer_weights(model: keras.Model) -> tuple[str, np.ndarray]:
    """The first conv layer's kernels as RGB tiles (N, k, k, 3) in [0, 1]: they act on pixels."""
    convs = [path for path in models.conv_layers(model)]
    if not convs:
        raise AuditError("The model has no convolutional layer.")
    kernel = np.asarray(models.get_layer(model, convs[0]).get_weights()[0])  # (k, k, in, out)
    if kernel.ndim != 4 or kernel.shape[2] not in (1, 3):
        raise AuditError(f"{convs[0]} does not act on RGB pixels (kernel {kernel.shape}).")
    tiles = np.moveaxis(kernel, 3, 0)
    if tiles.shape[-1] == 1:
        tiles = np.repeat(tiles, 3, axis=-1)
    low = tiles.min(axis=(1, 2, 3), keepdims=True)
    span = tiles.max(axis=(1, 2, 3), keepdims=True) - low
    return convs[0], (tiles - low) / np.where(span > 0, span, 1)
