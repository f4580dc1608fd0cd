"""Images through a model a batch at a time: as many per call as the server's activation budget allows
(cost.batch_within), each call's bytes reserved from the server's budget (audit.admission), so that no pass
sizes its batches or reserves memory its own way."""

from __future__ import annotations

from typing import Callable, Iterator

import keras
import numpy as np

from audit import admission, cost


def in_batches(model: keras.Model, images: np.ndarray, call: Callable, most: int = 32) -> Iterator:
    """`call(batch)` for each batch of `images` (at most `most` at a time, fewer when the model's activations
    would not fit), in order."""
    step = cost.batch_within(model, max(most, 1))
    for start in range(0, len(images), step):
        batch = images[start:start + step]
        with admission.SERVER.reserve(cost.batch_bytes(model, len(batch)), timeout=60):
            yield call(batch)
