"""Which preprocessing a model takes, weighed on the user's images when its file does not say.

A file records no preprocessing. When the model has no Rescaling or Normalization at its input and no
keras.applications base, the loader assumes [0, 1] (audit.loaded_model.detect_preprocessing); a
mini-Xception trained on (x / 255 - 0.5) * 2 then changed its top-1 class on 6 of 12 faces. Each candidate is
run on the images: with labels the one with the best accuracy is the evidence's choice; without, the share of
top-1 predictions that move away from the current mode's tells the user whether the choice matters here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from audit import cost, limits
from audit.errors import AuditError
from audit.intervals import wilson_interval
from audit.loaded_model import LoadedModel

CANDIDATES = ("unit", "tf", "caffe", "torch", "raw")
"""The modes tried ([0, 1], [-1, 1], caffe's BGR minus the mean, torch's mean and std, raw 0-255): the ways
models are trained in practice. HED's caffe_bsds belongs to one model and is never a guess."""


def preprocessing_evidence(loaded: LoadedModel, pixels, labels=None, fit: str = "crop",
                           current: str | None = None, progress=None) -> pd.DataFrame:
    """One row per candidate mode (images.PREPROCESSING's common ones): `accuracy` with its Wilson `low` and
    `high` when there are labels, `changed` (the share of top-1 predictions that differ from those under the
    `current` mode, the model's default when None) and `confidence` (the mean top-1 probability). The mode the
    evidence chooses is in `.attrs["chosen"]`: the best accuracy (the current mode on a tie, else the first
    candidate), or without labels the current mode; `.attrs["tied"]` the other modes as accurate as the chosen one
    (a ReLU network without biases to speak of answers the same to x and 255 x: the images cannot tell those
    apart), `.attrs["changed"]` the largest share of top-1 predictions any candidate changes."""
    if not loaded.head().is_classifier:
        raise AuditError("Weighing preprocessings needs a class output: this model's output has no classes to "
                         "compare (choose the preprocessing by its documentation).")
    if not len(pixels):
        raise AuditError("Weighing preprocessings needs at least one image.")
    current = current or loaded.preprocessing
    modes = list(dict.fromkeys([current, *CANDIDATES]))
    chunk = cost.inputs_within(loaded.model, limits.BATCH_BYTES.value, 64)  # float inputs held at once
    tops, confidence = {}, {}
    for done, mode in enumerate(modes):
        probabilities = np.concatenate([loaded.predict(loaded.preprocess(list(pixels[start:start + chunk]), mode, fit))
                                        for start in range(0, len(pixels), chunk)])
        tops[mode], confidence[mode] = probabilities.argmax(axis=1), float(probabilities.max(axis=1).mean())
        if progress is not None:
            progress(done + 1, len(modes))
    rows = []
    for mode in modes:
        row = {"mode": mode, "changed": float(np.mean(tops[mode] != tops[current])), "confidence": confidence[mode]}
        if labels is not None:
            correct = int(np.sum(tops[mode] == np.asarray(labels)))
            row["accuracy"] = correct / len(labels)
            row["low"], row["high"] = wilson_interval(correct, len(labels))
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs["chosen"] = current if labels is None else modes[int(np.argmax(table["accuracy"].to_numpy()))]
    table.attrs["tied"] = [] if labels is None else [
        mode for mode, accuracy in zip(modes, table["accuracy"]) if mode != table.attrs["chosen"]
        and accuracy == table["accuracy"].max()]
    table.attrs["changed"] = float(table["changed"].max())
    table.attrs["images"] = len(pixels)
    return table
