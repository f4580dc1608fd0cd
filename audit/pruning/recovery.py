"""Recovery by fine-tuning, and what a classifier shows it knows: accuracy with its interval against chance."""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd

from audit import groups, heads
from audit import images as image_utils
from audit.errors import AuditError
from audit.pruning.selection import random_selection
from audit.pruning.surgery import prune

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
