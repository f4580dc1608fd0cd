"""Recovery: what a cut loses and what it wins back, beside a random cut of the same size, on held-out images.

For each of the chosen cut and a random ranking of groups taken to the same number of parameters (or
multiply-adds) by the same machinery: accuracy with its Wilson interval right after the cut, after the
BatchNorm statistics are re-estimated (EagleEye's adaptive BN, Li et al. 2020), and after fine-tuning until the
validation loss stops improving (audit.pruning.tuning). Every smaller model is kept, so the one to ship can be
chosen from the table; also what a classifier shows it knows (accuracy with its interval against chance).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import keras
import numpy as np
import pandas as pd

from audit import copies, cost, graph as model_graph, groups, heads
from audit import images as image_utils
from audit.errors import AuditError
from audit.pruning.batchnorm import batch_norms, recalibrate_bn
from audit.pruning.surgery import prune
from audit.pruning.targets import RANDOM, to_target
from audit.intervals import wilson_interval
from audit.pruning.tuning import Tuned, Tuning, fine_tune

AT_CHANCE_ENTROPY = 0.98
"""Without labels, outputs whose mean normalised entropy is above this are near flat: a model at chance."""


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


def split(labels: np.ndarray, held_out: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices to fine-tune on and to measure on: `held_out` of the images drawn class by class, seeded."""
    test = image_utils.stratified(labels, int(round(len(labels) * held_out)), seed)
    train = np.setdiff1d(np.arange(len(labels)), test)
    if len(test) == 0 or len(train) < 2:
        raise AuditError("Pruning with recovery needs more labelled images: some to fine-tune on, some held out.")
    return train, test


def copy_of(model: keras.Model) -> keras.Model:
    """A separate model with the same architecture and weights (each stage of recovery gets its own)."""
    return copies.with_weights(model)[0]


@dataclass
class Recovered:
    """The recovery table (one row per model), every smaller model by its row's name, and each fine-tuning's
    record."""

    table: pd.DataFrame
    models: dict[str, keras.Model] = field(default_factory=dict)
    tuned: dict[str, Tuned] = field(default_factory=dict)

    def best(self) -> str:
        """The smaller model with the best held-out accuracy (ties: the lower cross-entropy, then the later row)."""
        rows = self.table[self.table.model.isin(list(self.models))]
        order = rows.assign(position=np.arange(len(rows))).sort_values(
            ["accuracy", "cross-entropy", "position"], ascending=[False, True, False])
        return str(order.iloc[0]["model"])


def stages(model: keras.Model, smaller: keras.Model, name: str, images: np.ndarray, labels: np.ndarray,
           train: np.ndarray, test: np.ndarray, tuning: Tuning = Tuning(), seed: int = 0,
           output: int | None = None, progress=None) -> list[tuple[dict, keras.Model, Tuned | None]]:
    """One cut's rows: right after the cut, after BatchNorm recalibration on the fine-tuning images (when the
    model has BatchNorms), fine-tuned (distilled from `model` with tuning.distill); each a separate model."""
    rows = []

    def measured(stage: str, candidate: keras.Model, seconds: float, tuned: Tuned | None = None):
        found = accuracy(candidate, images[test], labels[test], output)
        rows.append(({"model": f"{name}, {stage}", "parameters": candidate.count_params(),
                      "MACs": cost.cost(candidate).macs,
                      **{key: found[key] for key in ("accuracy", "low", "high", "cross-entropy")},
                      "epochs": tuned.epochs if tuned else 0, "seconds": seconds,
                      "how": tuned.describe() if tuned else ""}, candidate, tuned))

    measured("cut", smaller, 0.0)
    start = time.perf_counter()
    if batch_norms(smaller):
        recalibrated = copy_of(smaller)
        recalibrate_bn(recalibrated, images[train])
        measured("BN recalibrated", recalibrated, time.perf_counter() - start)
    tuned_model = copy_of(smaller)
    tuned = fine_tune(tuned_model, images[train], labels[train], tuning, seed=seed, output=output,
                      progress=progress, teacher=model if tuning.distill else None)
    measured("fine-tuned", tuned_model, tuned.seconds, tuned)
    return rows


def recovery(model: keras.Model, selection: dict[str, list[int]], images: np.ndarray, labels: np.ndarray,
             tuning: Tuning = Tuning(), held_out: float = 0.25, seed: int = 0, output: int | None = None,
             progress=None, match: str = "params", random_baseline: bool = True) -> Recovered:
    """The model before pruning, then the chosen cut and a random cut of the same size, each right after the
    cut, after BatchNorm recalibration and after fine-tuning, measured on the same held-out images.

    The images are split once, class by class (seeded): `held_out` of them measure every row; fine-tuning
    sees the rest (of which tuning.validation chooses the epochs). The random cut takes groups in a seeded
    random order from the same layers to the chosen cut's share of parameters (`match="params"`) or of
    multiply-adds (`"macs"`): within 1% where the groups allow.
    """
    labels = np.asarray(labels)
    train, test = split(labels, held_out, seed)
    dependency = groups.DependencyGraph(model)
    chosen = prune(model, selection, dependency)
    cuts = [("chosen ranking", chosen)]
    if random_baseline:
        which = 0 if match == "params" else 1
        share = (chosen.count_params() / model.count_params() if which == 0
                 else cost.cost(chosen).macs / max(cost.cost(model).macs, 1))
        layers = pd.DataFrame({"layer": model_graph.filter_layers(model) or list(selection)})
        random = to_target(model, layers, RANDOM, graph=dependency, seed=seed, **{match: share})
        cuts.append(("random ranking, same size", prune(model, random, dependency)))
    steps = tuning.max_epochs * int(np.ceil(len(train) * (1 - tuning.validation) / tuning.batch_size))
    before = accuracy(model, images[test], labels[test], output)
    rows = [{"model": "before pruning", "parameters": model.count_params(), "MACs": cost.cost(model).macs,
             **{key: before[key] for key in ("accuracy", "low", "high", "cross-entropy")}, "epochs": 0,
             "seconds": 0.0, "how": ""}]
    result = Recovered(pd.DataFrame())
    for index, (name, smaller) in enumerate(cuts):
        def step(done, total, index=index):
            if progress is not None:
                progress(index * steps + min(done, steps), len(cuts) * steps)

        for row, candidate, tuned in stages(model, smaller, name, images, labels, train, test, tuning, seed, output,
                                            step):
            rows.append(row)
            result.models[row["model"]] = candidate
            if tuned is not None:
                result.tuned[row["model"]] = tuned
    result.table = pd.DataFrame(rows)
    result.table.attrs.update(images_tuned=len(train), images_held_out=len(test), held_out=test)
    return result
