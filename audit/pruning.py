"""Pruning: per-filter scores, masks for what-if checks, and surgery that really removes filters.

Scores follow the literature: the L1 norm of a filter's weights (Li et al. 2017), APoZ and mean
activation on data (Hu et al. 2016), a first-order Taylor estimate of the loss change (Molchanov et
al. 2017), and redundancy, the largest cosine similarity to another filter of the layer and the
distance to the layer's geometric median (He et al. 2019, FPGM). Masks and surgery follow the
dependency groups of audit.groups: a selection grows to every channel that must go with it, and the
surgery rebuilds the model without them, slicing every weight that reads them.
"""

from __future__ import annotations

import weakref
from dataclasses import astuple, dataclass

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from audit import activations, datasets, groups, heads, models, passes
from audit import graph as model_graph
from audit import images as image_utils
from audit.graph import as_list
from audit.errors import AuditError

_PASSES: "weakref.WeakKeyDictionary[keras.Model, dict]" = weakref.WeakKeyDictionary()
"""Per model, while it lives: compiled score passes and weight-only results (audit never changes weights)."""


class PruningError(AuditError):
    """The model's graph cannot be cut as asked (a residual add or concat, a nested model, ...)."""


# --- scores ----------------------------------------------------------------------------------

def filter_kernels(model: keras.Model, layer: str) -> np.ndarray:
    """Each output channel's effective linear filter as one column: (weights per filter, output channels).

    Conv2D and Dense: the kernel's columns. DepthwiseConv2D: output channel c * m + j applies the
    kernel's (c, j) slice to input channel c alone, so its column is that slice on c and zeros on the
    other inputs (filters on different channels share nothing). SeparableConv2D: the depthwise step
    composed with the pointwise one, the filter a plain Conv2D would need for the same output.
    """
    target = models.get_layer(model, layer)
    kind = type(target).__name__
    if kind in ("DepthwiseConv2D", "DepthwiseConv1D"):
        kernel = np.asarray(target.kernel)  # (kh, kw, in, multiplier)
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
    if type(target).__name__ in ("DepthwiseConv2D", "DepthwiseConv1D"):  # without the zeros of filter_kernels
        kernel = np.asarray(target.kernel)
        return np.abs(kernel).reshape(-1, kernel.shape[-2] * kernel.shape[-1]).sum(axis=0)
    return np.abs(filter_kernels(model, layer)).sum(axis=0)


def _gram(model: keras.Model, layer: str) -> np.ndarray:
    """Inner products between the filters of a layer (filters x filters), float64.

    A depthwise layer's filters only overlap with those on the same input channel: its Gram matrix is
    block-diagonal, built block by block (EfficientNet's 1152-channel depthwise layers would otherwise
    need a 10368 x 1152 matrix of zeros).
    """
    target = models.get_layer(model, layer)
    if type(target).__name__ in ("DepthwiseConv2D", "DepthwiseConv1D"):
        kernel = np.asarray(target.kernel, np.float64)
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
    """A compiled step, kept per model while it lives: a batch in; per measured layer its Taylor sums and
    activation sums out, from one forward and backward pass. Traced once; later image sets reuse it."""
    cache = _PASSES.setdefault(model, {})
    if (points, head) not in cache:
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
                contribution = tf.reduce_sum(a * g, axis=list(range(len(a.shape) - 1)))  # (C,)
                results.append((contribution, *activations.batch_sums(a, threshold).parts()))
            return results

        cache[(points, head)] = (cut, step)
    return cache[(points, head)]


def _scores_pass(model: keras.Model, layers: list[str], images, labels: np.ndarray | None = None,
                 batch_size: int = 32, output: int | None = None, threshold: float = 0.0, progress=None,
                 total: int | None = None, strategy=None) -> tuple[dict[str, activations.FilterSums], dict]:
    """Activation sums and Taylor sums of every layer from the same forward and backward pass, over
    preprocessed images with their labels, or the (x, labels) batches of a streamed set (audit.datasets).
    Both are taken where each filter's channel is used (activations.measures): a * dscore/da after the
    BatchNorm and activation, on the tensor the next layer reads. The Taylor part of a layer is (sum of
    a * dscore/da over images and positions, positions counted): sums of shards merge by addition (see
    taylor_of)."""
    head = heads.find_head(model, output)
    chosen = activations.measures(model, layers)
    points = tuple(dict.fromkeys(measure.measured_at for measure in chosen))
    cut, step = _compiled_pass(model, points, head)
    batch_size = _within_memory(cut, batch_size)
    if isinstance(images, np.ndarray):
        images, total = datasets.in_memory(images, labels, batch_size), len(images)
    shapes = {point: out.shape for point, out in zip(points, cut.outputs[:-1])}
    positions = {m.layer: int(np.prod(shapes[m.measured_at][1:-1])) for m in chosen}
    taylor = {m.layer: (np.zeros(int(shapes[m.measured_at][-1])), 0) for m in chosen}
    sums = {m.layer: activations.FilterSums.empty(int(shapes[m.measured_at][-1]), m.measured_at, m.floored)
            for m in chosen}
    threshold = tf.constant(float(threshold))
    strategy = strategy if strategy is not None else passes.local_replicas()
    for replicas in passes.run(lambda x, y: step(x, y, threshold), images, strategy, progress, total):
        for results in replicas:
            by_point = dict(zip(points, results))
            for measure in chosen:
                contribution, *parts = by_point[measure.measured_at]
                part = activations.to_numpy(tuple(parts), measure)
                total_so_far, counted = taylor[measure.layer]
                taylor[measure.layer] = (total_so_far + np.asarray(contribution, np.float64),
                                         counted + part.images * positions[measure.layer])
                sums[measure.layer] = sums[measure.layer].merge(part)
    return sums, taylor


def taylor_of(taylor_sums: dict) -> dict[str, np.ndarray]:
    """Taylor scores from (merged) Taylor sums: |mean over images and positions of a * dscore/da|."""
    return {path: np.abs(total / max(counted, 1)) for path, (total, counted) in taylor_sums.items()}


def filter_scores(model: keras.Model, images, labels: np.ndarray | None = None,
                  threshold: float = 0.0, near_dead_apoz: float = 0.99, output: int | None = None,
                  progress=None, total: int | None = None) -> pd.DataFrame:
    """One row per (conv layer, output channel): l1, apoz, mean, taylor, redundancy, nearest, fpgm, dead,
    near_dead, and per-layer normalised copies (`*_norm`, divided by the layer's maximum) to compare
    across layers. Depthwise and separable layers are scored per output channel (see filter_kernels).
    `images`: preprocessed (N, H, W, C) with `labels`, or a streamed set's batches (audit.datasets).
    `progress` (done, total) is called after each batch of images."""
    sums, taylor = score_sums(model, images, labels, threshold, output, progress, total)
    return scores_frame(model, sums, taylor, threshold, near_dead_apoz)


def score_sums(model: keras.Model, images, labels: np.ndarray | None = None, threshold: float = 0.0,
               output: int | None = None, progress=None, total: int | None = None, strategy=None
               ) -> tuple[dict[str, activations.FilterSums], dict]:
    """The partial sums behind filter_scores: activation sums and Taylor sums (empty without a class
    output) of every conv layer. Sums of shards merge (merge_score_sums) into one pass's."""
    layers = models.conv_layers(model)
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
    points = tuple(dict.fromkeys(m.measured_at for m in activations.measures(model, models.conv_layers(model))))
    return _within_memory(_compiled_pass(model, points, head)[0], batch_size)


def _within_memory(cut: keras.Model, batch_size: int) -> int:
    """A batch whose forward and backward pass, with the maps and gradients of every layer kept, fits the
    server's activation budget (limits.BATCH_BYTES, see graph.batch_within)."""
    kept = sum(2 * 4 * int(np.prod(out.shape[1:])) for out in cut.outputs[:-1])
    return model_graph.batch_within(cut, batch_size, passes=3, kept_per_image=kept)


def merge_score_sums(first: tuple[dict, dict], second: tuple[dict, dict]) -> tuple[dict, dict]:
    """Two shards' score_sums as one: activation sums merged, Taylor sums and counts added."""
    sums = {path: part.merge(second[0][path]) for path, part in first[0].items()}
    taylor = {path: (total + second[1][path][0], counted + second[1][path][1])
              for path, (total, counted) in first[1].items()}
    return sums, taylor


def scores_frame(model: keras.Model, sums: dict[str, activations.FilterSums], taylor_sums: dict,
                 threshold: float = 0.0, near_dead_apoz: float = 0.99) -> pd.DataFrame:
    """The filter_scores table from (merged) score_sums and the model's weights."""
    layers = list(sums)
    stats, taylor = activations.stats_frame(sums, threshold), taylor_of(taylor_sums)
    frames = []
    for layer in layers:
        similarity, nearest, fpgm = redundancy(model, layer)
        part = stats[stats.layer == layer].reset_index(drop=True)
        frame = pd.DataFrame({
            "layer": layer, "filter": part["filter"], "l1": l1_norms(model, layer), "apoz": part["apoz"],
            "mean": part["mean"], "redundancy": similarity, "nearest": nearest, "fpgm": fpgm,
            "dead": part["dead"], "near_dead": (part["apoz"] > near_dead_apoz) & ~part["dead"],
            "measured_at": part["measured_at"],
        })
        frame["taylor"] = taylor.get(layer, np.nan)
        for column in ("l1", "mean", "taylor", "fpgm"):
            top = frame[column].max()
            frame[f"{column}_norm"] = frame[column] / top if top and np.isfinite(top) else 0.0
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


# --- masks and surgery -----------------------------------------------------------------------

def silence(weights: list[np.ndarray], kind: str, channels) -> list[np.ndarray]:
    """A layer's weights with the given output channels made to output zero (before any activation).

    Per output channel whatever the layer: a DepthwiseConv2D's channel c * m + j is its kernel's
    (c, j) slice, not the multiplier axis; a SeparableConv2D's is a pointwise column; a
    BatchNormalization's or LayerScale's are its gamma and beta.
    """
    weights = [w.copy() for w in weights]
    channels = np.asarray(channels)
    if kind in ("BatchNormalization", "LayerScale"):
        for index in range(min(2, len(weights))):  # gamma, beta (LayerScale: its one scale)
            weights[index][..., channels] = 0
        return weights
    if kind in groups.DEPTHWISE:
        kernel = weights[0]
        flat = kernel.reshape(*kernel.shape[:-2], -1)  # a view: (kh, kw, in * multiplier)
        flat[..., channels] = 0
    elif kind in ("SeparableConv2D", "SeparableConv1D"):
        weights[1][..., channels] = 0
    elif kind.endswith("Transpose"):
        weights[0][..., channels, :] = 0
    else:
        weights[0][..., channels] = 0
    bias = 2 if kind in ("SeparableConv2D", "SeparableConv1D") else 1
    if len(weights) > bias:
        weights[bias][channels] = 0
    return weights


SILENCED = groups.SOURCES | groups.DEPTHWISE | {"BatchNormalization", "LayerScale"}
"""Layers whose per-channel parameters make a channel zero (the others pass a zero on as zero)."""


def _silenced_weights(model: keras.Model, graph: groups.DependencyGraph, selection: dict[str, list[int]]
                      ) -> dict[str, list[np.ndarray]]:
    """The weights that silence the selection: whole groups where they can go; a filter whose group is
    locked alone (a what-if the smaller model cannot express), with the normalisation right after it."""
    chosen, _ = graph.expand(selection)
    zeroed: dict[int, np.ndarray] = {}  # tensor id -> channels forced to zero
    for call in graph.calls:
        output = as_list(call.output)[0]
        zeroed[id(output)] = graph.removed(output, chosen)
    for layer, channels in selection.items():  # locked filters: silenced alone, on through a following BN
        path = models.resolve_layer(model, layer)
        tensor = as_list(graph.producers()[path].output)[0]
        alone = np.zeros(len(graph.elements(tensor)), bool)
        alone[list(channels)] = True
        while tensor is not None:
            zeroed[id(tensor)] = zeroed[id(tensor)] | alone
            readers = [call for call in graph.calls if any(t is tensor for t in call.inputs)]
            tensor = (as_list(readers[0].output)[0] if len(readers) == 1 and readers[0].kind
                      in groups.PASS and readers[0].kind != "Flatten" else None)
    weights = {}
    for call in graph.calls:
        mask = zeroed[id(as_list(call.output)[0])]
        if call.kind in SILENCED and mask.any() and call.layer.weights:
            weights[call.path] = silence(call.layer.get_weights(), call.kind, np.flatnonzero(mask))
    return weights


def masked(model: keras.Model, selection: dict[str, list[int]], graph: groups.DependencyGraph | None = None
           ) -> keras.Model:
    """A clone whose selected filters output zero: what-if pruning, the model untouched.

    The selection is expanded to whole dependency groups as `prune` expands it (a filter on a residual
    stream silences that channel in every layer of the stream), so the smaller model computes what
    this one computes. A filter whose group is locked (it reaches the model's output, say) is silenced
    alone: a what-if that surgery cannot make real.
    """
    graph = graph or groups.DependencyGraph(model)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    for path, weights in _silenced_weights(model, graph, selection).items():
        models.get_layer(clone, path).set_weights(weights)
    return clone


def plan(model: keras.Model, selection: dict[str, list[int]], graph: groups.DependencyGraph | None = None
         ) -> pd.DataFrame:
    """What pruning the selection does, per layer: channels before, removed, after, and why any
    selected filter is kept (its group is locked)."""
    graph = graph or groups.DependencyGraph(model)
    chosen, kept = graph.expand(selection)
    rows = []
    for path, call in graph.producers().items():
        mask = graph.removed(as_list(call.output)[0], chosen)
        if mask.any() or path in kept or path in selection:
            rows.append({"layer": path, "channels": len(mask), "selected": len(selection.get(path, [])),
                         "removed": int(mask.sum()), "kept because": kept.get(path, "")})
    return pd.DataFrame(rows, columns=["layer", "channels", "selected", "removed", "kept because"])


def group_table(graph: groups.DependencyGraph, scores: pd.DataFrame, criterion: str = "l1") -> pd.DataFrame:
    """Groups that tie several layers' channels together, with their score: the sum of their filters'
    scores by the criterion (a group goes as one, so its members' costs add up)."""
    by_filter = scores.set_index(["layer", "filter"])[criterion] if criterion in scores else None
    rows = []
    for group in graph.groups():
        if len(group.filters) < 2 and not group.coupled_by:
            continue
        members = [(layer, channel) for layer, channels in group.filters.items() for channel in channels]
        score = (float(sum(by_filter.get(member, np.nan) for member in members)) if by_filter is not None
                 else np.nan)
        rows.append({"group": group.index, "filters": group.size, f"{criterion} (sum)": score,
                     "can go": not group.locked, "coupled by": ", ".join(group.coupled_by),
                     "layers": ", ".join(f"{layer}[{','.join(map(str, channels))}]"
                                         for layer, channels in group.filters.items()),
                     "locked because": group.locked})
    return pd.DataFrame(rows)


def prune(model: keras.Model, selection: dict[str, list[int]], graph: groups.DependencyGraph | None = None
          ) -> keras.Model:
    """A new, smaller model without the selected filters' groups; the input model is untouched.

    Every group that can go goes: its filters, and every weight that reads its channels (the next
    convs and denses, batch norms, depthwise kernels, the rows of a Dense after Flatten, the other
    side of a residual add, a concatenation's slice). Filters whose group is locked stay (see `plan`).
    Nested models keep their structure: a smaller base inside the same head.
    """
    graph = graph or groups.DependencyGraph(model)
    chosen, kept = graph.expand(selection)
    if not chosen:
        reasons = "; ".join(f"{layer}: {why}" for layer, why in kept.items())
        raise PruningError(f"None of the selected filters can be removed: {reasons or 'nothing was selected'}.")
    configs, weights = {}, {}
    for call in graph.calls:
        output = as_list(call.output)[0]
        out_keep = ~graph.removed(output, chosen)
        in_keep = ~graph.removed(call.inputs[0], chosen) if call.inputs else None
        if not out_keep.any():
            raise PruningError(f"Removing these groups would take every channel of {call.path}; keep some.")
        if out_keep.all() and (in_keep is None or in_keep.all()):
            continue
        config, sliced = _cut(call, in_keep, out_keep)
        if config:
            configs[call.path] = config
        if sliced is not None:
            weights[call.path] = sliced
    paths = {id(layer): path for path, layer, _ in models.iter_layers(model)}

    def clone_layer(layer):
        return type(layer).from_config({**layer.get_config(), **configs.get(paths.get(id(layer)), {})})

    smaller = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    for path in models.weighted_layers(model):
        models.get_layer(smaller, path).set_weights(weights.get(path, models.get_layer(model, path).get_weights()))
    return smaller


def _cut(call: groups.Call, in_keep: np.ndarray | None, out_keep: np.ndarray) -> tuple[dict, list | None]:
    """The config changes and the sliced weights of one layer (None: its weights stay as they are)."""
    kind, layer = call.kind, call.layer
    old = [np.asarray(w) for w in layer.get_weights()]
    count = int(out_keep.sum())
    if kind == "Dense":
        return {"units": count}, [old[0][in_keep][:, out_keep], *[b[out_keep] for b in old[1:]]]
    if kind in ("SeparableConv1D", "SeparableConv2D"):
        multiplier = old[0].shape[-1]
        rows = np.repeat(in_keep, multiplier)
        return {"filters": count}, [old[0][..., in_keep, :], old[1][..., rows, :][..., out_keep],
                                    *[b[out_keep] for b in old[2:]]]
    if kind.endswith("Transpose"):
        return {"filters": count}, [old[0][..., out_keep, :][..., in_keep], *[b[out_keep] for b in old[1:]]]
    if kind in groups.SOURCES:
        return {"filters": count}, [old[0][..., in_keep, :][..., out_keep], *[b[out_keep] for b in old[1:]]]
    if kind in groups.DEPTHWISE:
        return {}, [old[0][..., in_keep, :], *[b[out_keep] for b in old[1:]]]
    if kind == "LayerScale":
        return {"projection_dim": count}, [w[..., out_keep] for w in old]
    if kind == "Reshape":
        return {"target_shape": (*layer.get_config()["target_shape"][:-1], count)}, None
    if old:  # BatchNormalization, PReLU: per-channel parameters on the last axis
        return {}, [w[..., out_keep] for w in old]
    return {}, None


def flops(model: keras.Model) -> int:
    """Multiply-accumulates of conv and dense layers for one image (the cost pruning removes), from the graph's
    symbolic shapes (graph.cost): a Dense applied to every position of a map counts at every position."""
    return model_graph.cost(model).macs


# --- recovery ----------------------------------------------------------------------------------

def fine_tune(model: keras.Model, images: np.ndarray, labels: np.ndarray, epochs: int = 2,
              learning_rate: float = 1e-3, batch_size: int = 32, seed: int = 0, output: int | None = None,
              progress=None, train_all: bool = True) -> tuple[keras.Model, dict]:
    """Train a (pruned) model for a few epochs on labelled images; returns it and its loss history.

    Every pruning paper reports its numbers after such a run. The loss is the cross-entropy on the
    explained output's class scores (softmax, or sigmoid for binary and sigmoid heads), so logits,
    softmax and single-unit heads all train correctly. With `train_all`, frozen layers (a transfer
    model's base) are unfrozen: the pruned layers are the ones that must adapt. The model is changed
    in place (pass the pruned copy, never the loaded model); seeded for repeatable runs.
    """
    head = heads.find_head(model, output)
    if not head.is_classifier:
        raise AuditError(f"Fine-tuning needs a class output ({head.description}).")
    keras.utils.set_random_seed(seed)
    if train_all:
        model.trainable = True
    scorer = heads.scores_model(model, head)
    if head.distribution == "sigmoid":
        targets = np.eye(head.classes, dtype=np.float32)[labels]
        loss = keras.losses.BinaryCrossentropy(from_logits=True)
    else:
        targets, loss = np.asarray(labels), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    scorer.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss)
    callbacks = []
    if progress is not None:
        steps = epochs * int(np.ceil(len(images) / batch_size))
        done = [0]

        class Report(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                done[0] += 1
                progress(done[0], steps)

        callbacks.append(Report())
    history = scorer.fit(np.asarray(images, np.float32), targets, epochs=epochs, batch_size=batch_size,
                         shuffle=True, verbose=0, callbacks=callbacks)
    return model, history.history


AT_CHANCE_ENTROPY = 0.98
"""Without labels, outputs whose mean normalised entropy is above this are near flat: a model at chance."""


def wilson_interval(successes: float, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default): honest at 0%, 100% and on few images."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def knowledge(probabilities: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Whether a classifier's outputs on some images show it knows anything, from its class probabilities.

    With labels: top-1 accuracy, its Wilson 95% interval (`low`, `high`), mean cross-entropy, `chance` (the
    share of the most common label: what always answering that class scores) and `at_chance` (the interval
    reaches chance). Without labels: `at_chance` when the outputs are near flat (mean normalised entropy above
    AT_CHANCE_ENTROPY). `entropy` and `images` either way.
    """
    probabilities = np.asarray(probabilities, np.float64)
    classes = probabilities.shape[1]
    rows = probabilities / np.maximum(probabilities.sum(axis=1, keepdims=True), 1e-12)
    entropy = float(np.mean(-np.sum(rows * np.log(np.clip(rows, 1e-12, 1.0)), axis=1)) / np.log(max(classes, 2)))
    result = {"images": len(probabilities), "entropy": entropy}
    if labels is None:
        return {**result, "accuracy": np.nan, "cross-entropy": np.nan, "low": np.nan, "high": np.nan,
                "chance": 1.0 / classes, "at_chance": entropy > AT_CHANCE_ENTROPY}
    labels = np.asarray(labels)
    correct = float(np.sum(probabilities.argmax(axis=1) == labels))
    low, high = wilson_interval(correct, len(labels))
    chosen = np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, 1.0)
    chance = float(np.bincount(labels).max() / len(labels))
    return {**result, "accuracy": correct / len(labels), "cross-entropy": float(-np.mean(np.log(chosen))),
            "low": low, "high": high, "chance": chance, "at_chance": low <= chance}


def accuracy(model: keras.Model, images: np.ndarray, labels: np.ndarray | None = None,
             output: int | None = None) -> dict:
    """Top-1 accuracy and mean cross-entropy of the explained output on labelled images (the loss still
    moves when the accuracy stands at 100%), with the interval and the chance level of `knowledge`."""
    return knowledge(heads.Outputs(model, output)(images), labels)


def _measured(model: keras.Model, images: np.ndarray, labels: np.ndarray, output: int | None) -> dict:
    found = accuracy(model, images, labels, output)
    return {name: found[name] for name in ("accuracy", "low", "high", "cross-entropy")}


def random_selection(selection: dict[str, list[int]], model: keras.Model, seed: int = 0) -> dict[str, list[int]]:
    """As many filters per layer as the selection, drawn at random (seeded): the baseline every ranking
    has to beat (Mittal et al. 2018)."""
    rng = np.random.default_rng(seed)
    return {layer: sorted(rng.choice(filter_kernels(model, layer).shape[-1], len(channels), replace=False).tolist())
            for layer, channels in selection.items()}


def recovery(model: keras.Model, selection: dict[str, list[int]], images: np.ndarray, labels: np.ndarray,
             epochs: int = 1, learning_rate: float = 1e-3, held_out: float = 0.25, seed: int = 0,
             output: int | None = None, progress=None) -> tuple[pd.DataFrame, keras.Model]:
    """Accuracy and cross-entropy on held-out images before pruning, after pruning, after fine-tuning, and for a random
    selection of the same size per layer pruned and fine-tuned the same way; and the fine-tuned model.

    The images are split once, class by class (images.stratified, seeded): fine-tuning sees the rest,
    accuracy (with its Wilson interval) is measured on the held-out share only.
    """
    cut = int(round(len(images) * held_out))
    test = image_utils.stratified(labels, cut, seed)
    train = np.setdiff1d(np.arange(len(images)), test)
    if cut == 0 or len(train) == 0:
        raise AuditError("Recovery needs more labelled images: some to fine-tune on and some held out.")
    graph = groups.DependencyGraph(model)
    steps = [0]

    def step(done, total):
        if progress is not None:
            progress(steps[0] + done, 2 * total)

    rows = [{"model": "before pruning", **_measured(model, images[test], labels[test], output),
             "parameters": model.count_params()}]
    tuned = None
    for name, chosen in (("chosen ranking", selection), ("random ranking", random_selection(selection, model, seed))):
        smaller = prune(model, chosen, graph)
        rows.append({"model": f"{name}, pruned", **_measured(smaller, images[test], labels[test], output),
                     "parameters": smaller.count_params()})
        fine_tune(smaller, images[train], labels[train], epochs, learning_rate, seed=seed, output=output,
                  progress=step)
        steps[0] += epochs * int(np.ceil(len(train) / 32))
        rows.append({"model": f"{name}, fine-tuned", **_measured(smaller, images[test], labels[test], output),
                     "parameters": smaller.count_params()})
        if tuned is None:
            tuned = smaller
    return pd.DataFrame(rows), tuned


# --- what cutting costs ----------------------------------------------------------------------

@dataclass
class QualitySums:
    """The sums behind `quality` over some images: sums of disjoint batches or shards merge, so a
    streamed set is measured one batch at a time and gives the figures of one pass over all of it."""

    images: int = 0
    agree: float = 0.0  # top-1 the same
    kl: float = 0.0  # per image KL, summed
    labelled: int = 0  # images with a known label (>= 0)
    correct: float = 0.0
    squared_error: float = 0.0  # models without classes: |outputs - reference|^2
    squared_reference: float = 0.0
    classes: bool = True

    @classmethod
    def of(cls, reference: np.ndarray, outputs: np.ndarray, labels: np.ndarray | None = None,
           independent: bool = False) -> "QualitySums":
        reference, outputs = np.asarray(reference, np.float64), np.asarray(outputs, np.float64)
        if not (reference.ndim == 2 and reference.shape[-1] > 1):
            return cls(len(reference), squared_error=float(np.sum((outputs - reference) ** 2)),
                       squared_reference=float(np.sum(reference ** 2)), classes=False)
        p, q = np.clip(reference, 1e-12, 1.0), np.clip(outputs, 1e-12, 1.0)
        if independent:
            p1, q1 = np.clip(1 - reference, 1e-12, 1.0), np.clip(1 - outputs, 1e-12, 1.0)
            kl = np.mean(reference * np.log(p / q) + (1 - reference) * np.log(p1 / q1), axis=1)
        else:
            kl = np.sum(reference * (np.log(p) - np.log(q)), axis=1)
        known = np.zeros(len(reference), bool) if labels is None else np.asarray(labels) >= 0
        predicted = outputs.argmax(1)
        return cls(len(reference), float(np.sum(reference.argmax(1) == predicted)), float(np.sum(kl)),
                   int(known.sum()), float(np.sum(predicted[known] == np.asarray(labels)[known])) if known.any() else 0.0)

    def merge(self, other: "QualitySums") -> "QualitySums":
        """The sums of both; an empty start (QualitySums()) takes the kind of what is merged into it."""
        classes = other.classes if not self.images else self.classes
        return QualitySums(*(a + b for a, b in zip(astuple(self)[:-1], astuple(other)[:-1])), classes=classes)

    def result(self) -> dict[str, float]:
        if not self.classes:
            return {"feature_error": float(np.sqrt(self.squared_error) / max(np.sqrt(self.squared_reference), 1e-12))}
        result = {"agreement": self.agree / max(self.images, 1), "kl": self.kl / max(self.images, 1)}
        if self.labelled:
            result["accuracy"] = self.correct / self.labelled
        return result


def quality(reference: np.ndarray, outputs: np.ndarray, labels: np.ndarray | None = None,
            independent: bool = False) -> dict[str, float]:
    """How a pruned model's outputs compare with the unpruned ones on the same images.

    For classifiers both are class probabilities (heads.Outputs): top-1 agreement, the KL divergence
    of the pruned from the unpruned distribution (with `independent`, several sigmoid classes: the
    mean of each class's Bernoulli KL), and accuracy over the images whose label is given (>= 0).
    Otherwise the relative error of the features.
    """
    return QualitySums.of(reference, outputs, labels, independent).result()


class MaskedCopy:
    """One clone of the model whose filters (with their groups) can be silenced and restored cheaply."""

    def __init__(self, model: keras.Model, output: int | None = None):
        self.model = model
        self.graph = groups.DependencyGraph(model)
        self.copy = masked(model, {}, self.graph)
        self.reference = heads.Outputs(model, output)
        self.outputs_of_copy = heads.Outputs(self.copy, head=self.reference.head)

    def quality(self, reference: np.ndarray, outputs: np.ndarray, labels: np.ndarray | None = None) -> dict:
        return quality(reference, outputs, labels, self.reference.independent)

    def outputs(self, selection: dict[str, list[int]], images: np.ndarray) -> np.ndarray:
        touched = _silenced_weights(self.model, self.graph, selection)
        for path, weights in touched.items():
            models.get_layer(self.copy, path).set_weights(weights)
        try:
            return self.outputs_of_copy(images)
        finally:
            for path in touched:  # restore
                models.get_layer(self.copy, path).set_weights(models.get_layer(self.model, path).get_weights())


def lowest_share(scores: pd.DataFrame, criterion: str, share: float) -> pd.Series:
    """Rows among the lowest `share` of their layer by a score (ties in row order): the candidates. A layer
    whose score is undefined (NaN: APoZ without a zero floor, Taylor without classes) gives none."""
    rank = scores.groupby("layer")[criterion].rank(method="first")
    return rank <= (scores.groupby("layer")["filter"].transform("size") * share).astype(int)


CRITERIA = {
    "dead": "dead or near-dead (APoZ)",
    "l1": "lowest L1 norm (Li et al. 2017)",
    "mean": "lowest mean activation",
    "taylor": "lowest Taylor score (Molchanov et al. 2017)",
    "fpgm": "smallest summed distance to the layer's other filters (FPGM, He et al. 2019)",
    "apoz": "highest APoZ (Hu et al. 2016)",
}
"""Ways to choose candidates, by the code a link, the report and the command line carry. "dead" takes no share."""


def candidates(scores: pd.DataFrame, criterion: str, share: float) -> pd.DataFrame:
    """The filters proposed for removal, one answer for the Pruning page, the report and the command line:
    the dead and near-dead ones (criterion "dead"), or the lowest `share` of each layer by the criterion
    (APoZ: the highest first). Rows of `scores` in their order, with `why` (the criterion's name)."""
    if criterion not in CRITERIA:
        raise AuditError(f"Unknown pruning criterion {criterion!r}; choose one of {', '.join(CRITERIA)}.")
    if not 0.0 <= float(share) <= 1.0:
        raise AuditError(f"The share of each layer to cut is between 0 and 1, not {share}.")
    if criterion == "dead":
        chosen = scores.dead | scores.near_dead
        why = np.where(scores.dead, "dead", "near-dead")
        return scores.assign(why=why)[chosen]
    if criterion not in scores or scores[criterion].isna().all():
        raise AuditError(unavailable(criterion))
    ranked = scores.assign(apoz=-scores.apoz) if criterion == "apoz" else scores  # APoZ: most zeros first
    return scores.assign(why=CRITERIA[criterion])[lowest_share(ranked, criterion, share)]


def unavailable(criterion: str) -> str:
    """Why a criterion has no scores for a model or a layer."""
    if criterion == "taylor":
        return "Taylor scores need a class output (they are the gradient of the class's log-probability)."
    if criterion in ("apoz", "dead"):
        return ("APoZ and dead filters are defined only where a filter's output has a zero floor (after a ReLU); "
                "this layer's filters are used after an activation without one (ELU, swish, linear).")
    return f"No {criterion} scores."


def ranking(scores: pd.DataFrame, layer: str, criterion: str) -> list[int]:
    """The layer's filters in pruning order: the lowest score first (dead first for APoZ: highest first)."""
    part = scores[scores.layer == layer]
    if criterion not in part or part[criterion].isna().all():
        raise AuditError(f"{layer}: {unavailable(criterion)}")
    ascending = criterion != "apoz"
    return list(part.sort_values(criterion, ascending=ascending, kind="stable")["filter"].astype(int))


def ranked_layers(scores: pd.DataFrame, criterion: str) -> list[str]:
    """The layers a criterion can rank (the others have no such score: see `unavailable`)."""
    defined = scores.groupby("layer", sort=False)[criterion].apply(lambda values: values.notna().any())
    return [layer for layer, ok in defined.items() if ok]


def curve(copy: MaskedCopy, layer: str, order: list[int], images: np.ndarray, reference: np.ndarray,
          labels: np.ndarray | None, fractions) -> list[dict]:
    rows = []
    for fraction in fractions:
        cut = order[:int(round(fraction * len(order)))]
        rows.append({"fraction": float(fraction), **copy.quality(reference, copy.outputs({layer: cut}, images), labels)})
    return rows


def sensitivity(model: keras.Model, scores: pd.DataFrame, criterion: str, images,
                labels: np.ndarray | None = None, fractions=np.arange(0.1, 0.91, 0.1), progress=None,
                output: int | None = None, total: int | None = None) -> pd.DataFrame:
    """For each conv layer alone, prune 10%..90% of its filters by the criterion and measure (Li et al. 2017);
    layers the criterion cannot rank (ranked_layers) are left out.

    `images`: preprocessed (N, H, W, C) with `labels`, or a streamed set's (x, labels) batches
    (audit.datasets; `total` its size for the progress). Each batch is read once and every (layer,
    fraction) measured on it, then the QualitySums are merged: memory stays that of one batch.
    """
    copy = MaskedCopy(model, output)
    cuts = []
    for layer in ranked_layers(scores, criterion):  # a layer without such scores is left out
        order = ranking(scores, layer, criterion)
        cuts += [(layer, float(f), order[:int(round(f * len(order)))]) for f in fractions]
    if isinstance(images, np.ndarray):  # one batch: the whole array, as before streaming
        images, total = datasets.in_memory(images, labels, max(len(images), 1)), len(images)
    sums, seen = [QualitySums() for _ in cuts], 0
    for x, targets in images:
        x, targets = np.asarray(x), np.asarray(targets)
        reference = copy.reference(x)
        for k, (layer, _, cut) in enumerate(cuts):
            sums[k] = sums[k].merge(QualitySums.of(reference, copy.outputs({layer: cut}, x), targets,
                                                   copy.reference.independent))
            if progress is not None:
                progress(seen * len(cuts) + (k + 1) * len(x), (total or seen + len(x)) * len(cuts))
        seen += len(x)
    return pd.DataFrame([{"layer": layer, "fraction": fraction, **part.result()}
                         for (layer, fraction, _), part in zip(cuts, sums)])


def what_if(model: keras.Model, selection: dict[str, list[int]], images, labels: np.ndarray | None = None,
            output: int | None = None, progress=None, total: int | None = None) -> dict[str, float]:
    """The model with `selection` silenced (with its dependency groups) against the model itself: quality's
    figures over preprocessed images or a streamed set's batches, one batch in memory at a time."""
    copy = MaskedCopy(model, output)
    if isinstance(images, np.ndarray):
        images, total = datasets.in_memory(images, labels), len(images)
    sums, seen = QualitySums(), 0
    for x, targets in images:
        x = np.asarray(x)
        sums = sums.merge(QualitySums.of(copy.reference(x), copy.outputs(selection, x), np.asarray(targets),
                                         copy.reference.independent))
        seen += len(x)
        if progress is not None:
            progress(seen, total or seen)
    return sums.result()


def ranking_against_chance(model: keras.Model, scores: pd.DataFrame, layer: str, criterion: str,
                           images: np.ndarray, labels: np.ndarray | None = None, random_rankings: int = 20,
                           fractions=np.arange(0.1, 0.91, 0.1), seed: int = 0, progress=None,
                           output: int | None = None) -> pd.DataFrame:
    """The measure against the fraction pruned for the chosen ranking, its inverse and random rankings."""
    copy = MaskedCopy(model, output)
    reference = copy.reference(images)
    order = ranking(scores, layer, criterion)
    rng = np.random.default_rng(seed)
    orders = {"chosen": order, "inverted": order[::-1]}
    orders.update({f"random {i}": list(rng.permutation(order)) for i in range(random_rankings)})
    rows = []
    for done, (kind, sequence) in enumerate(orders.items()):
        rows += [{"ranking": kind, **row} for row in curve(copy, layer, sequence, images, reference, labels, fractions)]
        if progress is not None:
            progress(done + 1, len(orders))
    return pd.DataFrame(rows)


LOWER_IS_BETTER = {"kl", "feature_error"}
"""Columns of quality() where a smaller value means the pruned model stayed closer to the original."""


def verdict_against_chance(runs: pd.DataFrame, measure: str, fraction: float = 0.5) -> dict:
    """At one fraction of ranking_against_chance: how many random rankings the chosen one beats (ties do
    not count) and whether the inverted ranking is worse than every random one."""
    part = runs[np.isclose(runs.fraction, fraction)]
    sign = -1 if measure in LOWER_IS_BETTER else 1
    random = sign * part.loc[part.ranking.str.startswith("random"), measure].to_numpy()
    chosen = sign * part.loc[part.ranking == "chosen", measure].item()
    inverted = sign * part.loc[part.ranking == "inverted", measure].item()
    return {"beaten": int((chosen > random).sum()), "random": len(random),
            "inverted_worst": bool(inverted < random.min())}


# --- do the scores predict the real cost? ----------------------------------------------------

IMPORTANCE = {"l1": 1, "mean": 1, "taylor": 1, "fpgm": 1, "apoz": -1}
"""Each criterion as an importance (higher: more needed); APoZ counts zeros, so its sign flips."""


def leave_one_out(model: keras.Model, layer: str, images: np.ndarray, labels: np.ndarray | None = None,
                  progress=None, output: int | None = None) -> np.ndarray:
    """The true cost of each filter of a layer: the loss increase when it alone is zeroed.

    Loss: cross-entropy against the labels (else the unpruned model's top-1) for classifiers; the
    relative feature error for models without a class output. One forward pass per filter.
    """
    copy = MaskedCopy(model, output)
    reference = copy.reference(images)
    filters = filter_kernels(model, layer).shape[-1]
    classifier = copy.reference.head.is_classifier
    if classifier:
        target = labels if labels is not None else reference.argmax(1)

        def loss(outputs):
            return float(-np.mean(np.log(outputs[np.arange(len(target)), target] + 1e-12)))
    else:
        def loss(outputs):
            return float(np.linalg.norm(outputs - reference) / max(np.linalg.norm(reference), 1e-12))
    base = loss(reference)
    changes = np.empty(filters)
    for index in range(filters):
        changes[index] = loss(copy.outputs({layer: [index]}, images)) - base
        if progress is not None:
            progress(index + 1, filters)
    return changes


def importance_correlation(scores: pd.DataFrame, changes: dict[str, np.ndarray]) -> pd.DataFrame:
    """Per layer, the Spearman rank correlation of each criterion (as an importance) with the true cost.

    Positive: the criterion ranks the filters the way removing them really hurts.
    """
    rows = []
    for layer, cost in changes.items():
        part = scores[scores.layer == layer].sort_values("filter")
        truth = pd.Series(cost).rank()
        row = {"layer": layer}
        for criterion, sign in IMPORTANCE.items():
            if criterion in part and part[criterion].notna().all():
                row[criterion] = float((sign * part[criterion].reset_index(drop=True)).rank().corr(truth))
        rows.append(row)
    return pd.DataFrame(rows)
