"""Per-filter pruning scores: weights (L1 norm, redundancy, FPGM) and data (APoZ, mean activation, Taylor).

The L1 norm of a filter's weights (Li et al. 2017), APoZ and mean activation on data (Hu et al. 2016), a
first-order Taylor estimate of the loss change (Molchanov et al. 2017), redundancy: the largest cosine
similarity to another filter of the layer and the distance to the layer's geometric median (He et al. 2019,
FPGM), and the scale of the BatchNorm after each filter (Liu et al. 2017, audit.pruning.batchnorm). Activation figures and Taylor products are taken where each filter's channel is used (after its
BatchNorm and activation: audit.activations.measures), as sums that merge across batches and shards.
"""

from __future__ import annotations

import weakref

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from audit import activations, compiled, cost, datasets, heads, models, passes
from audit.graph import depthwise_kernel, is_depthwise
from audit.pruning.batchnorm import bn_scales

_PASSES: "weakref.WeakKeyDictionary[keras.Model, dict]" = weakref.WeakKeyDictionary()
"""Per model, while it lives: weight-only results (audit never changes weights)."""


def filter_kernels(model: keras.Model, layer: str) -> np.ndarray:
    """Each output channel's effective linear filter as one column: (weights per filter, output channels).

    Conv2D and Dense: the kernel's columns. DepthwiseConv2D: output channel c * m + j applies the
    kernel's (c, j) slice to input channel c alone, so its column is that slice on c and zeros on the
    other inputs (filters on different channels share nothing). SeparableConv2D: the depthwise step
    composed with the pointwise one, the filter a plain Conv2D would need for the same output.
    """
    target = models.get_layer(model, layer)
    kind = type(target).__name__
    if is_depthwise(target):
        kernel = depthwise_kernel(target)  # (kh, kw, in, multiplier)
        *space, channels, multiplier = kernel.shape
        full = np.zeros((*space, channels, channels * multiplier), kernel.dtype)
        for c in range(channels):
            full[..., c, c * multiplier:(c + 1) * multiplier] = kernel[..., c, :]
        return full.reshape(-1, channels * multiplier)
    if kind in ("SeparableConv2D", "SeparableConv1D"):
        depthwise = np.asarray(target.depthwise_kernel)  # (kh, kw, in, multiplier)
        pointwise = np.asarray(target.pointwise_kernel)  # (1, 1, in * multiplier, filters)
        *space, channels, multiplier = depthwise.shape
        composed = np.einsum("...cm,cmf->...cf", depthwise,
                             pointwise.reshape(channels, multiplier, pointwise.shape[-1]))
        return composed.reshape(-1, pointwise.shape[-1])
    if kind.endswith("Transpose"):  # kernel (kh, kw, out, in)
        kernel = np.asarray(target.kernel)
        return np.moveaxis(kernel, -2, -1).reshape(-1, kernel.shape[-2])
    kernel = np.asarray(getattr(target, "kernel", None) if hasattr(target, "kernel") else target.get_weights()[0])
    return kernel.reshape(-1, kernel.shape[-1])


def l1_norms(model: keras.Model, layer: str) -> np.ndarray:
    """The L1 norm of each output channel's filter (Li et al. 2017)."""
    target = models.get_layer(model, layer)
    if is_depthwise(target):  # without the zeros of filter_kernels
        kernel = depthwise_kernel(target)
        return np.abs(kernel).reshape(-1, kernel.shape[-2] * kernel.shape[-1]).sum(axis=0)
    return np.abs(filter_kernels(model, layer)).sum(axis=0)


def _gram(model: keras.Model, layer: str) -> np.ndarray:
    """Inner products between the filters of a layer (filters x filters), float64.

    A depthwise layer's filters only overlap with those on the same input channel: its Gram matrix is
    block-diagonal, built block by block (EfficientNet's 1152-channel depthwise layers would otherwise
    need a 10368 x 1152 matrix of zeros).
    """
    target = models.get_layer(model, layer)
    if is_depthwise(target):
        kernel = depthwise_kernel(target).astype(np.float64)
        *space, channels, multiplier = kernel.shape
        gram = np.zeros((channels * multiplier,) * 2)
        for c in range(channels):
            block = kernel[..., c, :].reshape(-1, multiplier)
            gram[c * multiplier:(c + 1) * multiplier, c * multiplier:(c + 1) * multiplier] = block.T @ block
        return gram
    flat = filter_kernels(model, layer)
    return (flat.T @ flat).astype(np.float64)  # float32 products, as the weights are stored


def redundancy(model: keras.Model, layer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per filter: largest cosine similarity to another filter, which one, and the FPGM criterion of
    He et al. 2019: the filter's summed distance to all the other filters of its layer (small: near the
    geometric median, so the others can stand in for it).

    All three come from the filters' inner products: |a - b|^2 = |a|^2 + |b|^2 - 2 a.b. They depend on
    the weights alone, so they are kept per model, checked against a checksum of the weights.
    """
    weights = [np.asarray(w) for w in models.get_layer(model, layer).weights]
    checksum = tuple((w.shape, float(np.sum(w, dtype=np.float64)), float(np.abs(w).sum(dtype=np.float64)))
                     for w in weights)
    cache = _PASSES.setdefault(model, {})
    known = cache.get(("redundancy", layer))
    if known is not None and known[0] == checksum:
        return known[1]
    result = _redundancy(model, layer)
    cache[("redundancy", layer)] = (checksum, result)
    return result


def _redundancy(model: keras.Model, layer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    gram = _gram(model, layer)
    squared = np.diag(gram).copy()
    norms = np.sqrt(squared).astype(np.float32)
    similarity = gram.astype(np.float32) / np.maximum(np.outer(norms, norms), 1e-30)  # cosines: float32 is plenty
    np.fill_diagonal(similarity, -np.inf)
    nearest = similarity.argmax(axis=1)
    distances = gram  # in place, float64: |a|^2 + |b|^2 - 2 a.b cancels for close filters
    distances *= -2
    distances += squared[:, None]
    distances += squared[None, :]
    np.maximum(distances, 0, out=distances)
    np.sqrt(distances, out=distances)
    np.fill_diagonal(distances, 0)
    return similarity.max(axis=1).astype(np.float64), nearest, distances.sum(axis=1)


def taylor_scores(model: keras.Model, layer: str, images: np.ndarray, labels: np.ndarray | None = None,
                  batch_size: int = 32, output: int | None = None) -> np.ndarray:
    """|mean over images and positions of a * d(score)/da| per filter (Molchanov et al. 2017): the
    score is the log-probability of the label, or of the model's own top-1 when there are no labels."""
    return taylor_scores_of_layers(model, [layer], images, labels, batch_size, output)[models.resolve_layer(model, layer)]


def taylor_scores_of_layers(model: keras.Model, layers: list[str], images: np.ndarray,
                            labels: np.ndarray | None = None, batch_size: int = 32,
                            output: int | None = None) -> dict[str, np.ndarray]:
    """Taylor scores of several layers from one forward and backward pass per batch.

    The log-probability comes from the class scores (log-softmax, or log-sigmoid for sigmoid and
    binary heads), so a logits head gives the same numbers as its softmax twin, never log(logit).
    """
    return taylor_of(_scores_pass(model, layers, images, labels, batch_size, output)[1])


def _compiled_pass(model: keras.Model, points: tuple[str, ...], head: heads.Head):
    """A compiled step, kept with the model (audit.compiled): a batch in; per measured layer its Taylor sums
    and activation sums out, from one forward and backward pass. Traced once; later image sets reuse it."""

    def build():
        cut = heads.scores_model(model, head, [models.Point(point) for point in points])
        signature = [tf.TensorSpec([None, *cut.inputs[0].shape[1:]], tf.float32), tf.TensorSpec([None], tf.int32),
                     tf.TensorSpec([], tf.float32)]

        @tf.function(input_signature=signature)
        def step(x, labels, threshold):
            with tf.GradientTape() as tape:
                tape.watch(x)  # records every op after the input, also in a frozen base (no trainable weights)
                *maps, scores = cut(x, training=False)
                top = tf.cast(tf.argmax(scores, axis=-1), tf.int32)
                chosen = tf.where(labels >= 0, labels, top)  # -1: the model's own top-1
                score = tf.reduce_sum(tf.gather(heads.log_probability(scores, head), chosen, axis=1, batch_dims=1))
            gradients = tape.gradient(score, maps)
            results = []
            for a, g in zip(maps, gradients):
                g = tf.zeros_like(a) if g is None else g
                product = a * g
                contribution = tf.reduce_sum(product, axis=list(range(len(a.shape) - 1)))  # (C,)
                per_image = tf.reduce_mean(product, axis=list(range(1, len(a.shape) - 1))) if len(a.shape) > 2 \
                    else product  # (N, C): each image's mean a * g, whose spread is the score's sampling noise
                per_image = tf.cast(per_image, tf.float64)
                results.append((contribution, tf.reduce_sum(per_image, 0), tf.reduce_sum(tf.square(per_image), 0),
                                *activations.batch_sums(a, threshold).parts()))
            return results

        return cut, step

    return compiled.kept(model, ("scores", points, head), build)


def _scores_pass(model: keras.Model, layers: list[str], images, labels: np.ndarray | None = None,
                 batch_size: int = 32, output: int | None = None, threshold: float = 0.0, progress=None,
                 total: int | None = None, strategy=None) -> tuple[dict[str, activations.FilterSums], dict]:
    """Activation sums and Taylor sums of every layer from the same forward and backward pass, over
    preprocessed images with their labels, or the (x, labels) batches of a streamed set (audit.datasets).
    Both are taken where each filter's channel is used (activations.measures): a * dscore/da after the
    BatchNorm and activation, on the tensor the next layer reads. The Taylor part of a layer is (sum of
    a * dscore/da over images and positions, positions counted, sum over images of each image's mean a * g
    squared, images counted, sum of each image's mean a * g in float64): sums of shards merge by addition (see
    taylor_of and taylor_errors)."""
    head = heads.find_head(model, output)
    chosen = activations.measures(model, layers)
    points = tuple(dict.fromkeys(measure.measured_at for measure in chosen))
    cut, step = _compiled_pass(model, points, head)
    batch_size = _within_memory(cut, batch_size)
    if isinstance(images, np.ndarray):
        images, total = datasets.in_memory(images, labels, batch_size), len(images)
    shapes = {point: out.shape for point, out in zip(points, cut.outputs[:-1])}
    positions = {m.layer: int(np.prod(shapes[m.measured_at][1:-1])) for m in chosen}
    taylor = {m.layer: (np.zeros(int(shapes[m.measured_at][-1])), 0, np.zeros(int(shapes[m.measured_at][-1])), 0,
                        np.zeros(int(shapes[m.measured_at][-1]))) for m in chosen}
    sums = {m.layer: activations.FilterSums.empty(int(shapes[m.measured_at][-1]), m.measured_at, m.floored)
            for m in chosen}
    threshold = tf.constant(float(threshold))
    strategy = strategy if strategy is not None else passes.local_replicas()
    for replicas in passes.run(lambda x, y: step(x, y, threshold), images, strategy, progress, total):
        for results in replicas:
            by_point = dict(zip(points, results))
            for measure in chosen:
                contribution, image_total, squares, *parts = by_point[measure.measured_at]
                part = activations.to_numpy(tuple(parts), measure)
                taylor[measure.layer] = merge_taylor(taylor[measure.layer], (
                    np.asarray(contribution, np.float64), part.images * positions[measure.layer],
                    np.asarray(squares, np.float64), part.images, np.asarray(image_total, np.float64)))
                sums[measure.layer] = sums[measure.layer].merge(part)
    return sums, taylor


def taylor_of(taylor_sums: dict) -> dict[str, np.ndarray]:
    """Taylor scores from (merged) Taylor sums: |mean over images and positions of a * dscore/da|."""
    return {path: np.abs(parts[0] / max(parts[1], 1)) for path, parts in taylor_sums.items()}


def taylor_errors(taylor_sums: dict) -> dict[str, np.ndarray]:
    """The standard error of each Taylor score over the images (each image's mean a * dscore/da one draw)."""
    errors = {}
    for path, (_, _, squares, images, image_total) in taylor_sums.items():
        images = max(images, 1)
        errors[path] = np.sqrt(np.maximum(squares / images - (image_total / images) ** 2, 0.0) / images)
    return errors


def merge_taylor(first: tuple, second: tuple) -> tuple:
    """Two Taylor sums (total, positions counted, squares, images counted, per-image total) as one."""
    return tuple(a + b for a, b in zip(first, second))


def filter_scores(model: keras.Model, images, labels: np.ndarray | None = None,
                  threshold: float = 0.0, near_dead_apoz: float = 0.99, output: int | None = None,
                  progress=None, total: int | None = None) -> pd.DataFrame:
    """One row per (conv or pointwise Dense layer, output channel): l1, apoz, mean, taylor, redundancy, nearest, fpgm, bn_scale
    (NaN where no BatchNorm follows), dead, near_dead, and per-layer normalised copies (`*_norm`, divided by the layer's maximum) to compare
    across layers. Depthwise and separable layers are scored per output channel (see filter_kernels).
    `images`: preprocessed (N, H, W, C) with `labels`, or a streamed set's batches (audit.datasets).
    `progress` (done, total) is called after each batch of images."""
    sums, taylor = score_sums(model, images, labels, threshold, output, progress, total)
    return scores_frame(model, sums, taylor, threshold, near_dead_apoz)


def score_sums(model: keras.Model, images, labels: np.ndarray | None = None, threshold: float = 0.0,
               output: int | None = None, progress=None, total: int | None = None, strategy=None
               ) -> tuple[dict[str, activations.FilterSums], dict]:
    """The partial sums behind filter_scores: activation sums and Taylor sums (empty without a class
    output) of every layer graph.filter_layers names. Sums of shards merge (merge_score_sums) into one pass's."""
    layers = models.filter_layers(model)
    if heads.find_head(model, output).is_classifier:  # statistics and Taylor scores from one pass
        return _scores_pass(model, layers, images, labels, output=output, threshold=threshold, progress=progress,
                            total=total, strategy=strategy)
    return activations.filter_sums(model, layers, images, threshold, progress=progress, total=total,
                                   strategy=strategy), {}


def scores_batch_size(model: keras.Model, output: int | None = None, batch_size: int = 32) -> int:
    """The batch a scores pass takes (a streamed set is batched to it): see _within_memory."""
    head = heads.find_head(model, output)
    if not head.is_classifier:
        return batch_size
    points = tuple(dict.fromkeys(m.measured_at for m in activations.measures(model, models.filter_layers(model))))
    return _within_memory(_compiled_pass(model, points, head)[0], batch_size)


def _within_memory(cut: keras.Model, batch_size: int) -> int:
    """A batch whose forward and backward pass, with the maps and gradients of every layer kept, fits the
    server's activation budget (limits.BATCH_BYTES, see cost.batch_within)."""
    kept = sum(2 * 4 * int(np.prod(out.shape[1:])) for out in cut.outputs[:-1])
    return cost.batch_within(cut, batch_size, passes=3, kept_per_image=kept)


def merge_score_sums(first: tuple[dict, dict], second: tuple[dict, dict]) -> tuple[dict, dict]:
    """Two shards' score_sums as one: activation sums merged, Taylor sums and counts added."""
    sums = {path: part.merge(second[0][path]) for path, part in first[0].items()}
    taylor = {path: merge_taylor(parts, second[1][path]) for path, parts in first[1].items()}
    return sums, taylor


def scores_frame(model: keras.Model, sums: dict[str, activations.FilterSums], taylor_sums: dict,
                 threshold: float = 0.0, near_dead_apoz: float = 0.99) -> pd.DataFrame:
    """The filter_scores table from (merged) score_sums and the model's weights."""
    layers = list(sums)
    stats, taylor, taylor_se = activations.stats_frame(sums, threshold), taylor_of(taylor_sums), taylor_errors(taylor_sums)
    scales = bn_scales(model, layers)
    frames = []
    for layer in layers:
        similarity, nearest, fpgm = redundancy(model, layer)
        part = stats[stats.layer == layer].reset_index(drop=True)
        frame = pd.DataFrame({
            "layer": layer, "filter": part["filter"], "l1": l1_norms(model, layer), "apoz": part["apoz"],
            "mean": part["mean"], "redundancy": similarity, "nearest": nearest, "fpgm": fpgm,
            "dead": part["dead"], "near_dead": (part["apoz"] > near_dead_apoz) & ~part["dead"],
            "measured_at": part["measured_at"], "apoz_se": part["apoz_se"], "mean_se": part["mean_se"],
        })
        frame["taylor"] = taylor.get(layer, np.nan)
        frame["taylor_se"] = taylor_se.get(layer, np.nan)
        frame["bn_scale"] = scales[layer]
        for column in ("l1", "mean", "taylor", "fpgm"):
            top = frame[column].max()
            frame[f"{column}_norm"] = frame[column] / top if top and np.isfinite(top) else 0.0
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
