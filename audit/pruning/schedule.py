"""Pruning in steps, as practitioners do, and what the smaller model buys: the trade-off curve and its latency.

`iterative` reaches a parameter or multiply-add target in equal steps, re-scoring and fine-tuning between
them (the schedules of Torch-Pruning and TF-MOT; NetAdapt); `trade_off` sets it beside one cut to the same
sizes and a random ranking of groups, each fine-tuned for as many epochs, on the same held-out images: the
accuracy-against-size curve a practitioner decides on. `latency` is measured, not inferred from MACs: fewer
multiply-adds do not always mean less time (depthwise layers, memory-bound layers).
"""

from __future__ import annotations

import time
from typing import Callable

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from audit import cost, groups
from audit import images as image_utils
from audit.errors import AuditError
from audit.pruning.recovery import accuracy, fine_tune
from audit.pruning.scores import filter_scores
from audit.pruning.surgery import prune
from audit.pruning.targets import to_target

Progress = Callable[[int, int], None]
TRADE_OFF_METHODS = ("iterative", "one-shot", "random ranking")


def latency(model: keras.Model, batch_size: int = 1, repeats: int = 20) -> float:
    """Median seconds per image of a warm, compiled prediction of zeros on this machine (224 px where the
    input size is free)."""
    shape = [d or 224 for d in model.inputs[0].shape[1:]]
    x = tf.zeros([batch_size, *shape])
    predict = tf.function(lambda batch: model(batch, training=False))
    for _ in range(3):
        predict(x)  # traced and warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.asarray(predict(x))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / batch_size


def split(labels: np.ndarray, held_out: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices to fine-tune on and to measure on: `held_out` of the images drawn class by class, seeded."""
    test = image_utils.stratified(labels, int(round(len(labels) * held_out)), seed)
    train = np.setdiff1d(np.arange(len(labels)), test)
    if len(test) == 0 or len(train) == 0:
        raise AuditError("Pruning with recovery needs more labelled images: some to fine-tune on, some held out.")
    return train, test


def _fractions(params: float | None, macs: float | None, steps: int) -> tuple[str, list[float]]:
    if (params is None) == (macs is None):
        raise AuditError("Give one target: the share of parameters or of multiply-adds to keep.")
    if not 1 <= int(steps) <= 20:
        raise AuditError(f"Between 1 and 20 steps, not {steps}.")
    goal = float(params if params is not None else macs)
    if not 0.0 < goal < 1.0:
        raise AuditError(f"The share to keep is between 0 and 1, not {goal}.")
    return ("params" if params is not None else "macs"), [1 - (1 - goal) * (k + 1) / steps for k in range(steps)]


def _size(model: keras.Model) -> tuple[int, int]:
    return model.count_params(), cost.cost(model).macs


def _row(method: str, step: int, model: keras.Model, original: tuple[int, int], after_cut: dict,
         tuned: dict, seconds: float) -> dict:
    params, macs = _size(model)
    return {"method": method, "step": step, "parameters": params, "parameters kept": params / original[0],
            "MACs": macs, "MACs kept": macs / original[1], "latency ms": 1e3 * seconds,
            "accuracy after the cut": after_cut["accuracy"], "accuracy fine-tuned": tuned["accuracy"],
            "low": tuned["low"], "high": tuned["high"]}


def _cut_to(model: keras.Model, scores: pd.DataFrame, criterion: str, measure: str, fraction: float) -> keras.Model:
    """`model` cut so that it keeps `fraction` of its own parameters or MACs, whole groups taken least important
    first by the criterion's `scores`."""
    graph = groups.DependencyGraph(model)
    selection = to_target(model, scores, criterion, graph=graph, **{measure: fraction})
    if selection:
        return prune(model, selection, graph)
    copy = keras.models.clone_model(model)  # nothing to cut at this size: a copy to fine-tune
    copy.set_weights(model.get_weights())
    return copy


def iterative(model: keras.Model, images: np.ndarray, labels: np.ndarray, criterion: str,
              params: float | None = None, macs: float | None = None, steps: int = 3, epochs: int = 1,
              seed: int = 0, progress: Progress | None = None, output: int | None = None
              ) -> tuple[keras.Model, pd.DataFrame]:
    """Reach the target (the share of the original parameters or MACs to keep) in `steps` equal steps: each
    step re-scores the current model on the fine-tuning images, cuts whole groups to the step's size and
    fine-tunes for `epochs`; accuracy is measured on a held-out quarter drawn class by class. One row per
    step: parameters, MACs, latency, accuracy after the cut and after fine-tuning (with its interval)."""
    tuned, table = _run(model, images, labels, criterion, params, macs, steps, epochs, seed, progress, output,
                        methods=("iterative",))
    return tuned["iterative"], table


def trade_off(model: keras.Model, images: np.ndarray, labels: np.ndarray, criterion: str,
              params: float | None = None, macs: float | None = None, steps: int = 3, epochs: int = 1,
              seed: int = 0, progress: Progress | None = None, output: int | None = None
              ) -> tuple[keras.Model, pd.DataFrame]:
    """`iterative`'s rows, and at each of its sizes one cut of the original model (by the same criterion, then
    by a random ranking of groups) fine-tuned for as many epochs as the steps had: whether steps and the
    criterion are worth it at each size. Returns the iterative model and every row."""
    tuned, table = _run(model, images, labels, criterion, params, macs, steps, epochs, seed, progress, output,
                        methods=TRADE_OFF_METHODS)
    return tuned["iterative"], table


def _run(model, images, labels, criterion, params, macs, steps, epochs, seed, progress, output, methods):
    measure, fractions = _fractions(params, macs, steps)
    train, test = split(np.asarray(labels), seed=seed)
    original = _size(model)
    batches = int(np.ceil(len(train) / 32))
    # fine-tuning batches: each iterative step `epochs`; a one-shot cut to step k's size as many as k steps had
    total = sum(epochs * (1 if method == "iterative" else k + 1) * batches for method in methods for k in range(steps))
    done = [0]

    def step_progress(count, _):
        if progress is not None:
            progress(min(done[0] + count, total), total)

    def tune(smaller, epochs_now):
        fine_tune(smaller, images[train], labels[train], epochs_now, seed=seed, output=output, progress=step_progress)
        done[0] += epochs_now * batches

    rows, tuned = [], {}
    before = accuracy(model, images[test], labels[test], output)
    base_seconds = latency(model)
    for method in methods:
        rows.append(_row(method, 0, model, original, before, before, base_seconds))
    # one cut of the original at each size ranks by the original's scores: computed once, not at every size
    original_scores = filter_scores(model, images[train], labels[train], output=output) if methods[1:] else None
    current = model
    for k, fraction in enumerate(fractions):
        relative = fraction * original[0 if measure == "params" else 1] / _size(current)[0 if measure == "params" else 1]
        scores = filter_scores(current, images[train], labels[train], output=output)  # re-scored at every step
        current = _cut_to(current, scores, criterion, measure, min(relative, 1.0))
        after_cut = accuracy(current, images[test], labels[test], output)
        tune(current, epochs)
        rows.append(_row("iterative", k + 1, current, original, after_cut,
                         accuracy(current, images[test], labels[test], output), latency(current)))
        for method in methods[1:]:
            scores = original_scores
            if method == "random ranking":
                rng = np.random.default_rng(seed + k)
                scores = scores.assign(**{criterion: rng.permutation(len(scores)).astype(float) + 1.0})
            once = _cut_to(model, scores, criterion, measure, fraction)
            cut_accuracy = accuracy(once, images[test], labels[test], output)
            tune(once, epochs * (k + 1))
            rows.append(_row(method, k + 1, once, original, cut_accuracy,
                             accuracy(once, images[test], labels[test], output), latency(once)))
    tuned["iterative"] = current
    table = pd.DataFrame(rows)
    table.attrs.update(measure=measure, images_tuned=len(train), images_held_out=len(test), epochs=epochs)
    return tuned, table
