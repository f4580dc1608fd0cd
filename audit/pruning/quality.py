"""What cutting costs: the pruned model's outputs against the model's, per layer and fraction, against chance.

Top-1 agreement, KL divergence, accuracy (or the relative feature error without classes) as mergeable sums,
so a streamed set is measured one batch at a time; per-layer sensitivity (Li et al. 2017), the chosen ranking
against its inverse and random rankings, and leave-one-filter-out costs against each criterion.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import keras
import numpy as np
import pandas as pd

from audit import datasets
from audit.pruning.scores import filter_kernels
from audit.pruning.selection import ranked_layers, ranking
from audit.pruning.sweeps import Sweep

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
           independent: bool = False, *, classes: bool) -> "QualitySums":
        """`classes`: whether the outputs are class probabilities (the head's `is_classifier`), never guessed from
        the shape (a pooled feature vector has the shape of class probabilities)."""
        reference, outputs = np.asarray(reference, np.float64), np.asarray(outputs, np.float64)
        if not classes:
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
            independent: bool = False, *, classes: bool) -> dict[str, float]:
    """How a pruned model's outputs compare with the unpruned ones on the same images.

    For classifiers both are class probabilities (heads.Outputs): top-1 agreement, the KL divergence
    of the pruned from the unpruned distribution (with `independent`, several sigmoid classes: the
    mean of each class's Bernoulli KL), and accuracy over the images whose label is given (>= 0).
    Otherwise (`classes` False: the head's features) the relative error of the features.
    """
    return QualitySums.of(reference, outputs, labels, independent, classes=classes).result()


def sensitivity(model: keras.Model, scores: pd.DataFrame, criterion: str, images,
                labels: np.ndarray | None = None, fractions=np.arange(0.1, 0.91, 0.1), progress=None,
                output: int | None = None, total: int | None = None) -> pd.DataFrame:
    """For each conv layer alone, prune 10%..90% of its filters by the criterion and measure (Li et al. 2017);
    layers the criterion cannot rank (ranked_layers) are left out.

    `images`: preprocessed (N, H, W, C) with `labels`, or a streamed set's (x, labels) batches
    (audit.datasets; `total` its size for the progress). Each batch is read once and every (layer,
    fraction) measured on it (audit.pruning.sweeps: each cut runs only the layers after it), then the
    QualitySums are merged: memory stays that of one batch.
    """
    sweep = Sweep(model, output)
    cuts = []
    for layer in ranked_layers(scores, criterion):  # a layer without such scores is left out
        order = ranking(scores, layer, criterion)
        cuts += [(layer, float(f), order[:int(round(f * len(order)))]) for f in fractions]
    if isinstance(images, np.ndarray):  # one batch: the whole array, as before streaming
        images, total = datasets.in_memory(images, labels, max(len(images), 1)), len(images)
    sums, seen = [QualitySums() for _ in cuts], 0
    for x, targets in images:
        x, targets = np.asarray(x), np.asarray(targets)
        reference = sweep.reference(x)
        done = seen * len(cuts)
        report = None if progress is None else (
            lambda k, _, done=done, size=len(x): progress(done + k * size, (total or seen + size) * len(cuts)))
        outputs = sweep.outputs([{layer: cut} for layer, _, cut in cuts], x, report)
        for k, measured in enumerate(outputs):
            sums[k] = sums[k].merge(QualitySums.of(reference, measured, targets, sweep.independent,
                                                      classes=sweep.head.is_classifier))
        seen += len(x)
    return pd.DataFrame([{"layer": layer, "fraction": fraction, **part.result()}
                         for (layer, fraction, _), part in zip(cuts, sums)])


def what_if(model: keras.Model, selection: dict[str, list[int]], images, labels: np.ndarray | None = None,
            output: int | None = None, progress=None, total: int | None = None) -> dict[str, float]:
    """The model with `selection` silenced (with its dependency groups) against the model itself: quality's
    figures over preprocessed images or a streamed set's batches, one batch in memory at a time."""
    sweep = Sweep(model, output)
    if isinstance(images, np.ndarray):
        images, total = datasets.in_memory(images, labels), len(images)
    sums, seen = QualitySums(), 0
    for x, targets in images:
        x = np.asarray(x)
        sums = sums.merge(QualitySums.of(sweep.reference(x), sweep.outputs([selection], x)[0], np.asarray(targets),
                                         sweep.independent, classes=sweep.head.is_classifier))
        seen += len(x)
        if progress is not None:
            progress(seen, total or seen)
    return sums.result()


def ranking_against_chance(model: keras.Model, scores: pd.DataFrame, layer: str, criterion: str,
                           images: np.ndarray, labels: np.ndarray | None = None, random_rankings: int = 20,
                           fractions=np.arange(0.1, 0.91, 0.1), seed: int = 0, progress=None,
                           output: int | None = None) -> pd.DataFrame:
    """The measure against the fraction pruned for the chosen ranking, its inverse and random rankings."""
    sweep = Sweep(model, output)
    reference = sweep.reference(images)
    order = ranking(scores, layer, criterion)
    rng = np.random.default_rng(seed)
    orders = {"chosen": order, "inverted": order[::-1]}
    orders.update({f"random {i}": list(rng.permutation(order)) for i in range(random_rankings)})
    runs = [(kind, float(f), sequence[:int(round(f * len(sequence)))]) for kind, sequence in orders.items()
            for f in fractions]
    outputs = sweep.outputs([{layer: cut} for _, _, cut in runs], images, progress)
    return pd.DataFrame([{"ranking": kind, "fraction": fraction,
                          **quality(reference, measured, labels, sweep.independent, classes=sweep.head.is_classifier)}
                         for (kind, fraction, _), measured in zip(runs, outputs)])


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


IMPORTANCE = {"l1": 1, "mean": 1, "taylor": 1, "fpgm": 1, "bn_scale": 1, "apoz": -1}
"""Each criterion as an importance (higher: more needed); APoZ counts zeros, so its sign flips."""


def leave_one_out(model: keras.Model, layer: str, images: np.ndarray, labels: np.ndarray | None = None,
                  progress=None, output: int | None = None) -> np.ndarray:
    """The true cost of each filter of a layer: the loss increase when it alone is zeroed.

    Loss: cross-entropy against the labels (else the unpruned model's top-1) for classifiers; the
    relative feature error for models without a class output. One pass of the layers after it per filter.
    """
    sweep = Sweep(model, output)
    reference = sweep.reference(images)
    filters = filter_kernels(model, layer).shape[-1]
    if sweep.head.is_classifier:
        target = labels if labels is not None else reference.argmax(1)

        def loss(outputs):
            return float(-np.mean(np.log(outputs[np.arange(len(target)), target] + 1e-12)))
    else:
        def loss(outputs):
            return float(np.linalg.norm(outputs - reference) / max(np.linalg.norm(reference), 1e-12))
    base = loss(reference)
    outputs = sweep.outputs([{layer: [index]} for index in range(filters)], images, progress)
    changes = np.array([loss(measured) - base for measured in outputs])
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
