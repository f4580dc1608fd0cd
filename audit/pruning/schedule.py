"""Pruning in steps, as practitioners do, and what the smaller model buys: the trade-off curve and its speed.

`iterative` reaches a parameter or multiply-add target in equal steps, re-scoring, re-estimating the BatchNorms
and fine-tuning between them (the schedules of Torch-Pruning and TF-MOT; NetAdapt); `trade_off` sets it beside
one cut to the same sizes and a random ranking of groups taken to the same sizes by the same machinery, each
given the same fine-tuning budget (up to as many epochs as the steps had, each run stopping on its own
validation loss), on the same held-out images: the accuracy-against-size curve a practitioner decides on.
`latency` and `throughput` are measured, not inferred from MACs: fewer multiply-adds do not always mean less
time (depthwise layers, memory-bound layers), and batch 1 is not how a server runs.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from audit import cost, groups
from audit.errors import AuditError
from audit.pruning.batchnorm import recalibrate_bn
from audit.pruning.recovery import accuracy, copy_of, split
from audit.pruning.scores import filter_scores
from audit.pruning.surgery import prune
from audit.pruning.targets import RANDOM, channel_counts, to_target
from audit.pruning.tuning import Tuning, fine_tune

Progress = Callable[[int, int], None]
TRADE_OFF_METHODS = ("iterative", "one-shot", "random ranking")
THROUGHPUT_BATCH = 64
"""The batch at which throughput is measured (cut to the server's activation budget)."""


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
        tf.nest.map_structure(np.asarray, predict(x))  # waits for every output (a model may have several)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / batch_size


def throughput_batch(model: keras.Model, batch_size: int = THROUGHPUT_BATCH) -> int:
    """The batch `throughput` uses: `batch_size`, cut to the server's activation budget."""
    return cost.batch_within(model, batch_size)


def throughput(model: keras.Model, batch_size: int = THROUGHPUT_BATCH, repeats: int = 5) -> float:
    """Images per second at a serving batch (throughput_batch), from the median of warm compiled predictions."""
    return 1.0 / latency(model, throughput_batch(model, batch_size), repeats)


def speed(model: keras.Model, repeats: int = 10, batch_size: int | None = None) -> dict[str, float]:
    """Milliseconds per image at batch 1 and images per second at a serving batch (`batch_size`, else
    throughput_batch: pass the unpruned model's to compare two models at one batch), as the tables show them."""
    batch = batch_size or throughput_batch(model)
    return {"ms per image, batch 1": 1e3 * latency(model, 1, repeats),
            f"images per second, batch {batch}": 1.0 / latency(model, batch, max(3, repeats // 2))}


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
         recalibrated: dict, tuned: dict, epochs: int, seconds: float) -> dict:
    params, macs = _size(model)
    return {"method": method, "step": step, "parameters": params, "parameters kept": params / original[0],
            "MACs": macs, "MACs kept": macs / original[1], "latency ms": 1e3 * seconds,
            "accuracy after the cut": after_cut["accuracy"], "after BN recalibration": recalibrated["accuracy"],
            "accuracy fine-tuned": tuned["accuracy"], "low": tuned["low"], "high": tuned["high"],
            "cross-entropy": tuned["cross-entropy"], "epochs": epochs}


def _cut_to(model: keras.Model, scores: pd.DataFrame, criterion: str, measure: str, fraction: float, seed: int = 0,
            original: dict[str, int] | None = None) -> keras.Model:
    """`model` cut so that it keeps `fraction` of its own parameters or MACs, whole groups taken least important
    first by the criterion's `scores` (or in a random order, `criterion="random"`); no layer loses more than
    0.9 of its `original` channels."""
    graph = groups.DependencyGraph(model)
    selection = to_target(model, scores, criterion, graph=graph, seed=seed, original=original, **{measure: fraction})
    return prune(model, selection, graph) if selection else copy_of(model)  # nothing to cut: a copy to fine-tune


def iterative(model: keras.Model, images: np.ndarray, labels: np.ndarray, criterion: str,
              params: float | None = None, macs: float | None = None, steps: int = 3,
              tuning: Tuning = Tuning(max_epochs=3, patience=2), seed: int = 0, progress: Progress | None = None,
              output: int | None = None) -> tuple[keras.Model, pd.DataFrame]:
    """Reach the target (the share of the original parameters or MACs to keep) in `steps` equal steps: each
    step re-scores the current model on the fine-tuning images, cuts whole groups to the step's size (no layer
    losing more than 0.9 of its original channels over all steps), re-estimates the BatchNorms and fine-tunes
    (up to tuning.max_epochs, stopping on the validation loss); accuracy is measured on a held-out quarter drawn
    class by class. One row per step: parameters, MACs, latency, accuracy after the cut, after BN recalibration
    and after fine-tuning (with its interval)."""
    tuned, table = _run(model, images, labels, criterion, params, macs, steps, tuning, seed, progress, output,
                        methods=("iterative",))
    return tuned["iterative"], table


def trade_off(model: keras.Model, images: np.ndarray, labels: np.ndarray, criterion: str,
              params: float | None = None, macs: float | None = None, steps: int = 3,
              tuning: Tuning = Tuning(max_epochs=3, patience=2), seed: int = 0, progress: Progress | None = None,
              output: int | None = None) -> tuple[dict[str, keras.Model], pd.DataFrame]:
    """`iterative`'s rows, and at each of its sizes one cut of the original model (by the same criterion, then by
    a random ranking of groups taken to the same size) fine-tuned with as large a budget as the steps had so far
    (up to k x tuning.max_epochs at step k, each stopping on its own validation loss): whether steps and the
    criterion are worth it at each size. Returns the model of each method at the target size, and every row."""
    return _run(model, images, labels, criterion, params, macs, steps, tuning, seed, progress, output,
                methods=TRADE_OFF_METHODS)


def _run(model, images, labels, criterion, params, macs, steps, tuning, seed, progress, output, methods):
    measure, fractions = _fractions(params, macs, steps)
    labels = np.asarray(labels)
    train, test = split(labels, seed=seed)
    original, channels = _size(model), channel_counts(model)
    batches = int(np.ceil(len(train) * (1 - tuning.validation) / tuning.batch_size))
    # the fine-tuning budget in batches: each iterative step max_epochs; a one-shot cut to step k's size k + 1 times
    budget = [tuning.max_epochs * batches * (1 if method == "iterative" else k + 1)
              for method in methods for k in range(steps)]
    total, done = sum(budget), [0]

    def tune(smaller, k, method):
        """BN re-estimated, then fine-tuned within the budget of step k; returns the recalibrated accuracy."""
        share = budget[methods.index(method) * steps + k]
        recalibrate_bn(smaller, images[train])
        recalibrated = accuracy(smaller, images[test], labels[test], output)
        budget_tuning = dataclasses.replace(tuning, max_epochs=tuning.max_epochs * (1 if method == "iterative"
                                                                                  else k + 1))
        record = fine_tune(smaller, images[train], labels[train], budget_tuning, seed=seed, output=output,
                           teacher=model if tuning.distill else None,
                           progress=None if progress is None else
                           lambda count, _: progress(min(done[0] + count, total), total))
        done[0] += share
        return recalibrated, record.epochs

    rows, tuned = [], {}
    before = accuracy(model, images[test], labels[test], output)
    base_seconds = latency(model)
    for method in methods:
        rows.append(_row(method, 0, model, original, before, before, before, 0, base_seconds))
    # one cut of the original at each size ranks by the original's scores: computed once, not at every size
    original_scores = filter_scores(model, images[train], labels[train], output=output) if methods[1:] else None
    current = model
    for k, fraction in enumerate(fractions):
        index = 0 if measure == "params" else 1
        relative = fraction * original[index] / _size(current)[index]
        scores = filter_scores(current, images[train], labels[train], output=output)  # re-scored at every step
        current = _cut_to(current, scores, criterion, measure, min(relative, 1.0), seed, channels)
        after_cut = accuracy(current, images[test], labels[test], output)
        recalibrated, epochs = tune(current, k, "iterative")
        rows.append(_row("iterative", k + 1, current, original, after_cut, recalibrated,
                         accuracy(current, images[test], labels[test], output), epochs, latency(current)))
        for method in methods[1:]:
            once = _cut_to(model, original_scores, RANDOM if method == "random ranking" else criterion, measure,
                           fraction, seed + k)
            cut_accuracy = accuracy(once, images[test], labels[test], output)
            recalibrated, epochs = tune(once, k, method)
            rows.append(_row(method, k + 1, once, original, cut_accuracy, recalibrated,
                             accuracy(once, images[test], labels[test], output), epochs, latency(once)))
            tuned[method] = once
    tuned["iterative"] = current
    table = pd.DataFrame(rows)
    table.attrs.update(measure=measure, images_tuned=len(train), images_held_out=len(test),
                       max_epochs=tuning.max_epochs)
    return tuned, table
