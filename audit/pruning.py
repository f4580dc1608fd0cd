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

from audit import activations, models
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

def l1_norms(model: keras.Model, layer: str) -> np.ndarray:
    kernel = np.asarray(models.get_layer(model, layer).get_weights()[0])
    return np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0)


def redundancy(model: keras.Model, layer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per filter: largest cosine similarity to another filter, which one, and distance to the
    layer's geometric median (small: replaceable by the others, He et al. 2019)."""
    kernel = np.asarray(models.get_layer(model, layer).get_weights()[0])
    flat = kernel.reshape(-1, kernel.shape[-1]).T.astype(np.float64)  # (filters, weights)
    unit = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = similarity.argmax(axis=1)
    squared = (flat ** 2).sum(axis=1)  # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b, without an (F, F, W) array
    distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * flat @ flat.T, 0))
    median = flat[distances.sum(axis=1).argmin()]  # the filter closest to all others
    return similarity.max(axis=1), nearest, np.linalg.norm(flat - median, axis=1)


def taylor_scores(model: keras.Model, layer: str, images: np.ndarray, labels: np.ndarray | None = None,
                  batch_size: int = 32) -> np.ndarray:
    """|mean over images and positions of a * d(score)/da| per filter (Molchanov et al. 2017): the
    score is the log-probability of the label, or of the model's own top-1 when there are no labels."""
    path = models.resolve_layer(model, layer)
    cut = models.submodel(model, [path, model.layers[-1].name])
    total, count = None, 0
    for start in range(0, len(images), batch_size):
        x = tf.convert_to_tensor(images[start:start + batch_size], tf.float32)
        with tf.GradientTape() as tape:
            maps, output = cut(x, training=False)
            tape.watch(maps)
            chosen = labels[start:start + batch_size] if labels is not None else tf.argmax(output, axis=-1)
            score = tf.reduce_sum(tf.math.log(tf.gather(output, chosen, axis=1, batch_dims=1) + 1e-12))
        gradient = tape.gradient(score, maps)
        contribution = tf.reduce_sum(maps * gradient, axis=list(range(1, len(maps.shape) - 1)))  # (N, C)
        part = np.asarray(tf.reduce_sum(contribution, axis=0), np.float64)
        total = part if total is None else total + part
        count += len(x)
    positions = int(np.prod(cut.outputs[0].shape[1:-1]))
    return np.abs(total / (count * positions))


def filter_scores(model: keras.Model, images: np.ndarray, labels: np.ndarray | None = None,
                  threshold: float = 0.0, near_dead_apoz: float = 0.99) -> pd.DataFrame:
    """One row per (conv layer, filter): l1, apoz, mean, taylor, redundancy, nearest, fpgm, dead, near_dead,
    and per-layer normalised copies (`*_norm`, divided by the layer's maximum) to compare across layers."""
    layers = models.conv_layers(model)
    stats = activations.filter_stats(model, layers, images, threshold)
    has_classes = len(model.outputs[0].shape) == 2 and model.outputs[0].shape[-1] > 1
    frames = []
    for layer in layers:
        similarity, nearest, fpgm = redundancy(model, layer)
        part = stats[stats.layer == layer].reset_index(drop=True)
        frame = pd.DataFrame({
            "layer": layer, "filter": part["filter"], "l1": l1_norms(model, layer), "apoz": part["apoz"],
            "mean": part["mean"], "redundancy": similarity, "nearest": nearest, "fpgm": fpgm,
            "dead": part["dead"], "near_dead": (part["apoz"] > near_dead_apoz) & ~part["dead"],
        })
        frame["taylor"] = taylor_scores(model, layer, images, labels) if has_classes else np.nan
        for column in ("l1", "mean", "taylor", "fpgm"):
            top = frame[column].max()
            frame[f"{column}_norm"] = frame[column] / top if top and np.isfinite(top) else 0.0
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


# --- masks and surgery -----------------------------------------------------------------------

def masked(model: keras.Model, selection: dict[str, list[int]]) -> keras.Model:
    """A clone whose selected filters output zero: what-if pruning, the model untouched.

    Zeroing a filter's kernel and bias is not enough when a BatchNormalization follows (it would turn
    the zeros into beta - gamma * mean / std), so that BN's gamma and beta are zeroed too.
    """
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    readers = _consumers(model)
    for layer, filters in selection.items():
        name = models.resolve_layer(model, layer)
        channels = list(filters)
        target = clone.get_layer(name)
        weights = [w.copy() for w in target.get_weights()]
        weights[0][..., channels] = 0
        if len(weights) > 1:
            weights[1][channels] = 0
        target.set_weights(weights)
        try:
            chain = _downstream(model, name, readers)
        except PruningError:  # a branch: the zeros reach it as they are
            chain = readers.get(name, [])[:1]
        for passed in chain:
            if type(model.get_layer(passed)).__name__ == "BatchNormalization":
                norm = clone.get_layer(passed)
                gamma, beta, *rest = [w.copy() for w in norm.get_weights()]
                gamma[channels], beta[channels] = 0, 0
                norm.set_weights([gamma, beta, *rest])
    return clone


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
        if kind == "Conv2D":
            kh, kw, cin, cout = layer.get_weights()[0].shape
            h, w = layer.output.shape[1:3]
            total += kh * kw * cin * cout * h * w
        elif kind == "Dense":
            total += int(np.prod(layer.get_weights()[0].shape))
    return int(total)


# --- what cutting costs ----------------------------------------------------------------------

def quality(reference: np.ndarray, outputs: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    """How a pruned model's outputs compare with the unpruned ones on the same images."""
    if reference.ndim == 2 and reference.shape[-1] > 1:
        result = {
            "agreement": float(np.mean(reference.argmax(1) == outputs.argmax(1))),
            "kl": float(np.mean(np.sum(reference * (np.log(reference + 1e-12) - np.log(outputs + 1e-12)), axis=1))),
        }
        if labels is not None:
            result["accuracy"] = float(np.mean(outputs.argmax(1) == labels))
        return result
    return {"feature_error": float(np.linalg.norm(outputs - reference) / max(np.linalg.norm(reference), 1e-12))}


class MaskedCopy:
    """One clone of the model whose filters can be silenced and restored cheaply, step after step."""

    def __init__(self, model: keras.Model):
        self.model = model
        self.copy = masked(model, {})
        self.readers = _consumers(model)

    def outputs(self, selection: dict[str, list[int]], images: np.ndarray) -> np.ndarray:
        touched = []
        for layer, filters in selection.items():
            chain = [layer]
            try:
                chain += [n for n in _downstream(self.model, layer, self.readers)
                          if type(self.model.get_layer(n)).__name__ == "BatchNormalization"]
            except PruningError:
                pass
            for name in chain:
                target = self.copy.get_layer(name)
                weights = [w.copy() for w in self.model.get_layer(name).get_weights()]
                if name == layer:
                    weights[0][..., list(filters)] = 0
                    if len(weights) > 1:
                        weights[1][list(filters)] = 0
                else:
                    weights[0][list(filters)], weights[1][list(filters)] = 0, 0
                target.set_weights(weights)
                touched.append(name)
        result = np.asarray(self.copy.predict(images, verbose=0, batch_size=64))
        for name in touched:  # restore
            self.copy.get_layer(name).set_weights(self.model.get_layer(name).get_weights())
        return result


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
        rows.append({"fraction": float(fraction), **quality(reference, copy.outputs({layer: cut}, images), labels)})
    return rows


def sensitivity(model: keras.Model, scores: pd.DataFrame, criterion: str, images: np.ndarray,
                labels: np.ndarray | None = None, fractions=np.arange(0.1, 0.91, 0.1), progress=None) -> pd.DataFrame:
    """For each conv layer alone, prune 10%..90% of its filters by the criterion and measure (Li et al. 2017)."""
    copy = MaskedCopy(model)
    reference = np.asarray(model.predict(images, verbose=0, batch_size=64))
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
                           fractions=np.arange(0.1, 0.91, 0.1), seed: int = 0, progress=None) -> pd.DataFrame:
    """The measure against the fraction pruned for the chosen ranking, its inverse and random rankings."""
    copy = MaskedCopy(model)
    reference = np.asarray(model.predict(images, verbose=0, batch_size=64))
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
                  progress=None) -> np.ndarray:
    """The true cost of each filter of a layer: the loss increase when it alone is zeroed.

    Loss: cross-entropy against the labels (else the unpruned model's top-1) for classifiers; the
    relative feature error for models without a class output. One forward pass per filter.
    """
    copy = MaskedCopy(model)
    reference = np.asarray(model.predict(images, verbose=0, batch_size=64))
    filters = int(model.get_layer(layer).filters)
    classifier = reference.ndim == 2 and reference.shape[-1] > 1
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
