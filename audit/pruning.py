"""Pruning: per-filter scores, masks for what-if checks, and surgery that really removes filters.

Scores follow the literature: the L1 norm of a filter's weights (Li et al. 2017), APoZ and mean
activation on data (Hu et al. 2016), a first-order Taylor estimate of the loss change (Molchanov et
al. 2017), and redundancy, the largest cosine similarity to another filter of the layer and the
distance to the layer's geometric median (He et al. 2019, FPGM). Surgery rebuilds the model with
fewer filters and slices every weight that reads them (the next conv or dense layer, a following
BatchNormalization, through pooling and Flatten); graphs it cannot follow are refused with the reason.
"""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from audit import activations, heads, models
from audit.errors import AuditError

# Layers a channel passes through unchanged (same channel count, channel order kept).
CHANNEL_PRESERVING = {
    "Activation", "ReLU", "LeakyReLU", "ELU", "PReLU", "Dropout", "SpatialDropout2D", "GaussianNoise",
    "MaxPooling2D", "AveragePooling2D", "ZeroPadding2D", "Cropping2D", "UpSampling2D", "BatchNormalization",
    "LayerNormalization", "GlobalAveragePooling2D", "GlobalMaxPooling2D", "Flatten",
}


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
    flat = filter_kernels(model, layer).astype(np.float64)
    return flat.T @ flat


def redundancy(model: keras.Model, layer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per filter: largest cosine similarity to another filter, which one, and distance to the
    layer's geometric median (small: replaceable by the others, He et al. 2019).

    All three come from the filters' inner products: |a - b|^2 = |a|^2 + |b|^2 - 2 a.b.
    """
    gram = _gram(model, layer)
    squared = np.diag(gram).copy()
    norms = np.sqrt(squared)
    similarity = gram / np.maximum(np.outer(norms, norms), 1e-24)
    np.fill_diagonal(similarity, -np.inf)
    nearest = similarity.argmax(axis=1)
    distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * gram, 0))
    median = distances.sum(axis=1).argmin()  # the filter closest to all others
    return similarity.max(axis=1), nearest, distances[median]


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
    head = heads.find_head(model, output)
    paths = [models.resolve_layer(model, layer) for layer in layers]
    cut = heads.scores_model(model, head, [models.Point(path) for path in paths])
    per_image = sum(int(np.prod(out.shape[1:])) for out in cut.outputs[:-1])
    batch_size = max(1, min(batch_size, (64 * 2**20) // max(per_image, 1)))  # maps and gradients within ~512 MB
    totals = {path: 0.0 for path in paths}
    count = 0
    for start in range(0, len(images), batch_size):
        x = tf.convert_to_tensor(images[start:start + batch_size], tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(x)  # records every op after the input, also in a frozen base (no trainable weights)
            *maps, scores = cut(x, training=False)
            chosen = labels[start:start + batch_size] if labels is not None else tf.argmax(scores, axis=-1)
            log_p = tf.gather(heads.log_probability(scores, head), chosen, axis=1, batch_dims=1)
            score = tf.reduce_sum(log_p)
        gradients = tape.gradient(score, maps)
        for path, a, g in zip(paths, maps, gradients):
            g = tf.zeros_like(a) if g is None else g
            contribution = tf.reduce_sum(a * g, axis=list(range(0, len(a.shape) - 1)))  # (C,)
            totals[path] = totals[path] + np.asarray(contribution, np.float64)
        count += len(x)
    return {path: np.abs(totals[path] / (count * int(np.prod(out.shape[1:-1]))))
            for path, out in zip(paths, cut.outputs[:-1])}


def filter_scores(model: keras.Model, images: np.ndarray, labels: np.ndarray | None = None,
                  threshold: float = 0.0, near_dead_apoz: float = 0.99, output: int | None = None) -> pd.DataFrame:
    """One row per (conv layer, output channel): l1, apoz, mean, taylor, redundancy, nearest, fpgm, dead,
    near_dead, and per-layer normalised copies (`*_norm`, divided by the layer's maximum) to compare
    across layers. Depthwise and separable layers are scored per output channel (see filter_kernels)."""
    layers = models.conv_layers(model)
    stats = activations.filter_stats(model, layers, images, threshold)
    has_classes = heads.find_head(model, output).is_classifier
    taylor = taylor_scores_of_layers(model, layers, images, labels, output=output) if has_classes else {}
    frames = []
    for layer in layers:
        similarity, nearest, fpgm = redundancy(model, layer)
        part = stats[stats.layer == layer].reset_index(drop=True)
        frame = pd.DataFrame({
            "layer": layer, "filter": part["filter"], "l1": l1_norms(model, layer), "apoz": part["apoz"],
            "mean": part["mean"], "redundancy": similarity, "nearest": nearest, "fpgm": fpgm,
            "dead": part["dead"], "near_dead": (part["apoz"] > near_dead_apoz) & ~part["dead"],
        })
        frame["taylor"] = taylor.get(layer, np.nan)
        for column in ("l1", "mean", "taylor", "fpgm"):
            top = frame[column].max()
            frame[f"{column}_norm"] = frame[column] / top if top and np.isfinite(top) else 0.0
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


# --- masks and surgery -----------------------------------------------------------------------

def silence(weights: list[np.ndarray], kind: str, channels: list[int]) -> list[np.ndarray]:
    """A layer's weights with the given output channels made to output zero (before any activation).

    Per output channel whatever the layer: a DepthwiseConv2D's channel c * m + j is its kernel's
    (c, j) slice, not the multiplier axis; a SeparableConv2D's is a pointwise column.
    """
    weights = [w.copy() for w in weights]
    channels = list(channels)
    if kind in ("DepthwiseConv2D", "DepthwiseConv1D"):
        kernel = weights[0]
        flat = kernel.reshape(*kernel.shape[:-2], -1)  # a view: (kh, kw, in * multiplier)
        flat[..., channels] = 0
    elif kind in ("SeparableConv2D", "SeparableConv1D"):
        weights[1][..., channels] = 0
    elif kind.endswith("Transpose"):
        weights[0][..., channels, :] = 0
    else:
        weights[0][..., channels] = 0
    bias = {"SeparableConv2D": 2, "SeparableConv1D": 2}.get(kind, 1)
    if len(weights) > bias:
        weights[bias][channels] = 0
    return weights


def _following_norms(model: keras.Model, path: str) -> list[str]:
    """Paths of the BatchNormalization layers that normalise a layer's channels before any mixing.

    Zeroing a filter is not enough when a BN follows: it would turn the zeros into beta - gamma *
    mean / std. Followed through channel-preserving layers in the graph that holds the layer.
    """
    container, name, prefix = _container(model, path)
    readers = _consumers(container)
    found, current = [], name
    while len(readers.get(current, [])) == 1:
        layer = container.get_layer(readers[current][0])
        kind = type(layer).__name__
        if kind == "BatchNormalization":
            found.append(prefix + layer.name)
        elif kind not in CHANNEL_PRESERVING:
            break
        current = layer.name
    return found


def _container(model: keras.Model, path: str) -> tuple[keras.Model, str, str]:
    """The (nested) model that holds a layer, the layer's name in it, and that model's path prefix."""
    path = models.resolve_layer(model, path)
    *outer, name = path.split("/")
    container = model
    for part in outer:
        container = container.get_layer(part)
    return container, name, "".join(f"{part}/" for part in outer)


def masked(model: keras.Model, selection: dict[str, list[int]]) -> keras.Model:
    """A clone whose selected filters output zero: what-if pruning, the model untouched.

    Layers are named by path, inside nested models too; channels are output channels of any conv
    type. A BatchNormalization that follows gets those channels' gamma and beta zeroed as well.
    """
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    for layer, filters in selection.items():
        _silence_in(clone, model, models.resolve_layer(model, layer), list(filters))
    return clone


def _silence_in(copy: keras.Model, model: keras.Model, path: str, channels: list[int]) -> list[str]:
    """Silence `channels` of `path` in `copy` (a clone of `model`); returns the paths whose weights changed."""
    target = models.get_layer(model, path)
    models.get_layer(copy, path).set_weights(silence(target.get_weights(), type(target).__name__, channels))
    touched = [path]
    for norm in _following_norms(model, path):
        gamma, beta, *rest = [w.copy() for w in models.get_layer(model, norm).get_weights()]
        gamma[channels], beta[channels] = 0, 0
        models.get_layer(copy, norm).set_weights([gamma, beta, *rest])
        touched.append(norm)
    return touched


def _graph_inputs(model: keras.Model) -> dict[str, list[str]]:
    """For each layer, the layers whose outputs it reads, in the model's own graph only.

    A layer's `_inbound_nodes` also hold every later call on it (the sub-models the other pages
    build share the loaded model's layers), so the nodes are taken from the model's graph itself.
    """
    graph = model._functional if isinstance(model, keras.Sequential) else model
    sources: dict[str, list[str]] = {}
    for nodes in graph._nodes_by_depth.values():
        for node in nodes:
            if node.operation is None or node.is_input:
                continue
            sources[node.operation.name] = [t._keras_history.operation.name for t in node.input_tensors]
    return sources


def _consumers(model: keras.Model) -> dict[str, list[str]]:
    """Which layers read each layer's output."""
    readers: dict[str, list[str]] = {layer.name: [] for layer in model.layers}
    for reader, sources in _graph_inputs(model).items():
        for source in sources:
            readers.setdefault(source, []).append(reader)
    return readers


def _downstream(model: keras.Model, start: str, readers: dict[str, list[str]]) -> list[str]:
    """The chain from a pruned layer to the first layer that mixes channels (conv or dense)."""
    chain, current = [], start
    while True:
        following = readers.get(current, [])
        if len(following) != 1:
            if not following:
                raise PruningError(f"{start}'s filters feed the model's output directly; removing them would "
                                   "change the output's shape.")
            raise PruningError(f"{start}'s output is read by {len(following)} layers ({', '.join(following)}): "
                               "a branch or a residual connection. Removing filters there would need the same "
                               "cut in every branch; use the masked model instead.")
        layer = model.get_layer(following[0])
        kind = type(layer).__name__
        chain.append(layer.name)
        if kind in ("Conv2D", "Dense"):
            return chain
        if kind in ("Add", "Concatenate", "Multiply", "Average", "Subtract", "Maximum", "Minimum"):
            raise PruningError(f"{start}'s output goes into {kind} layer {layer.name!r} (a residual add or "
                               "concat): its channels must line up with another branch, so the surgery cannot "
                               "remove them alone. Use the masked model instead.")
        if kind not in CHANNEL_PRESERVING:
            raise PruningError(f"The surgery cannot follow {start}'s channels through {kind} layer {layer.name!r}.")
        current = layer.name


def prune(model: keras.Model, selection: dict[str, list[int]]) -> keras.Model:
    """A new, smaller model without the selected filters; the input model is untouched."""
    if any(isinstance(layer, keras.Model) for layer in model.layers):
        raise PruningError("The model contains a nested model; flatten it before pruning (surgery works on one "
                           "graph level).")
    readers = _consumers(model)
    keep_out: dict[str, np.ndarray] = {}  # layer -> output channels kept (for pruned conv layers)
    keep_in: dict[str, tuple[str, np.ndarray]] = {}  # layer -> (how, kept input channels)
    for name, filters in selection.items():
        layer = model.get_layer(models.resolve_layer(model, name))
        if type(layer).__name__ != "Conv2D":
            raise PruningError(f"{layer.name} is a {type(layer).__name__}; only Conv2D filters can be removed.")
        drop = set(int(f) for f in filters)
        keep = np.array([c for c in range(layer.filters) if c not in drop])
        if len(keep) == 0:
            raise PruningError(f"Removing all {layer.filters} filters of {layer.name} would cut the model in two.")
        keep_out[layer.name] = keep
        chain = _downstream(model, layer.name, readers)
        flatten = any(type(model.get_layer(n)).__name__ == "Flatten" for n in chain)
        for passed in chain[:-1]:
            if type(model.get_layer(passed)).__name__ == "BatchNormalization":
                keep_in[passed] = ("batchnorm", keep)
        keep_in[chain[-1]] = ("flatten" if flatten else "channels", keep)

    def clone_layer(layer):
        config = layer.get_config()
        if layer.name in keep_out:
            config["filters"] = int(len(keep_out[layer.name]))
        return type(layer).from_config(config)

    smaller = keras.models.clone_model(model, clone_function=clone_layer)
    for old in model.layers:
        weights = [np.asarray(w) for w in old.get_weights()]
        if not weights:  # (the clone renames its input layer, which has no weights)
            continue
        new = smaller.get_layer(old.name)
        if old.name in keep_in:
            how, keep = keep_in[old.name]
            if how == "batchnorm":
                weights = [w[keep] for w in weights]
            elif how == "flatten":  # a Dense after Flatten reads (h, w, c) flattened channels-last
                kernel = weights[0].reshape(-1, _flatten_channels(model, old.name), weights[0].shape[-1])
                weights[0] = kernel[:, keep, :].reshape(-1, weights[0].shape[-1])
            else:  # the next conv reads them on its input axis, a dense after global pooling on its rows
                weights[0] = weights[0][..., keep, :] if weights[0].ndim == 4 else weights[0][keep]
        if old.name in keep_out:
            keep = keep_out[old.name]
            weights[0] = weights[0][..., keep]
            if len(weights) > 1:
                weights[1] = weights[1][keep]
        new.set_weights(weights)
    return smaller


def _flatten_channels(model: keras.Model, dense: str) -> int:
    """Channels per position of the Flatten feeding a dense layer."""
    sources = _graph_inputs(model)
    name = sources[dense][0]
    while type(model.get_layer(name)).__name__ != "Flatten":
        name = sources[name][0]
    return int(model.get_layer(name).input.shape[-1])


def flops(model: keras.Model) -> int:
    """Multiply-accumulates of conv and dense layers for one image (the cost pruning removes)."""
    total = 0
    for _, layer, _ in models.iter_layers(model):
        kind = type(layer).__name__
        if kind in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Conv2DTranspose"):
            weights = layer.get_weights()
            kh, kw, a, b = weights[0].shape  # (.., in, out), (.., in, multiplier), transpose (.., out, in)
            h, w = (layer.input if kind == "Conv2DTranspose" else layer.output).shape[1:3]
            total += kh * kw * a * b * h * w
            if kind == "SeparableConv2D":  # the pointwise step after the depthwise one
                total += int(np.prod(weights[1].shape)) * h * w
        elif kind == "Dense":
            total += int(np.prod(layer.get_weights()[0].shape))
    return int(total)


# --- what cutting costs ----------------------------------------------------------------------

def quality(reference: np.ndarray, outputs: np.ndarray, labels: np.ndarray | None = None,
            independent: bool = False) -> dict[str, float]:
    """How a pruned model's outputs compare with the unpruned ones on the same images.

    For classifiers both are class probabilities (heads.Outputs): top-1 agreement, the KL divergence
    of the pruned from the unpruned distribution (with `independent`, several sigmoid classes: the
    mean of each class's Bernoulli KL), and accuracy when labels are given. Otherwise the relative
    error of the features.
    """
    if reference.ndim == 2 and reference.shape[-1] > 1:
        p, q = np.clip(reference, 1e-12, 1.0), np.clip(outputs, 1e-12, 1.0)
        if independent:
            p1, q1 = np.clip(1 - reference, 1e-12, 1.0), np.clip(1 - outputs, 1e-12, 1.0)
            kl = np.mean(reference * np.log(p / q) + (1 - reference) * np.log(p1 / q1), axis=1)
        else:
            kl = np.sum(reference * (np.log(p) - np.log(q)), axis=1)
        result = {"agreement": float(np.mean(reference.argmax(1) == outputs.argmax(1))), "kl": float(np.mean(kl))}
        if labels is not None:
            result["accuracy"] = float(np.mean(outputs.argmax(1) == labels))
        return result
    return {"feature_error": float(np.linalg.norm(outputs - reference) / max(np.linalg.norm(reference), 1e-12))}


class MaskedCopy:
    """One clone of the model whose filters can be silenced and restored cheaply, step after step."""

    def __init__(self, model: keras.Model, output: int | None = None):
        self.model = model
        self.copy = masked(model, {})
        self.reference = heads.Outputs(model, output)
        self.outputs_of_copy = heads.Outputs(self.copy, head=self.reference.head)

    def quality(self, reference: np.ndarray, outputs: np.ndarray, labels: np.ndarray | None = None) -> dict:
        return quality(reference, outputs, labels, self.reference.independent)

    def outputs(self, selection: dict[str, list[int]], images: np.ndarray) -> np.ndarray:
        touched = []
        for layer, filters in selection.items():
            touched += _silence_in(self.copy, self.model, models.resolve_layer(self.model, layer), list(filters))
        try:
            return self.outputs_of_copy(images)
        finally:
            for path in touched:  # restore
                models.get_layer(self.copy, path).set_weights(models.get_layer(self.model, path).get_weights())


def lowest_share(scores: pd.DataFrame, criterion: str, share: float) -> pd.Series:
    """Rows among the lowest `share` of their layer by a score (ties in row order): the candidates."""
    rank = scores.groupby("layer")[criterion].rank(method="first")
    return rank <= (scores.groupby("layer")["filter"].transform("size") * share).astype(int)


def ranking(scores: pd.DataFrame, layer: str, criterion: str) -> list[int]:
    """The layer's filters in pruning order: the lowest score first (dead first for APoZ: highest first)."""
    part = scores[scores.layer == layer]
    ascending = criterion != "apoz"
    return list(part.sort_values(criterion, ascending=ascending, kind="stable")["filter"].astype(int))


def curve(copy: MaskedCopy, layer: str, order: list[int], images: np.ndarray, reference: np.ndarray,
          labels: np.ndarray | None, fractions) -> list[dict]:
    rows = []
    for fraction in fractions:
        cut = order[:int(round(fraction * len(order)))]
        rows.append({"fraction": float(fraction), **copy.quality(reference, copy.outputs({layer: cut}, images), labels)})
    return rows


def sensitivity(model: keras.Model, scores: pd.DataFrame, criterion: str, images: np.ndarray,
                labels: np.ndarray | None = None, fractions=np.arange(0.1, 0.91, 0.1), progress=None,
                output: int | None = None) -> pd.DataFrame:
    """For each conv layer alone, prune 10%..90% of its filters by the criterion and measure (Li et al. 2017)."""
    copy = MaskedCopy(model, output)
    reference = copy.reference(images)
    layers = list(dict.fromkeys(scores.layer))
    rows = []
    for done, layer in enumerate(layers):
        rows += [{"layer": layer, **row} for row in
                 curve(copy, layer, ranking(scores, layer, criterion), images, reference, labels, fractions)]
        if progress is not None:
            progress(done + 1, len(layers))
    return pd.DataFrame(rows)


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
