"""What an attribution explains and how it is scored: a class's score before the squash, or one filter's mean.

Gradients are taken on the class score before the softmax (a rebuilt linear head; the loaded model is never
changed), or on the mean activation of one filter, which is also the target for models without a class
output. The small helpers every method shares live here (Captum's `_utils`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from audit import heads, models
from audit.errors import AuditError

Progress = Callable[[int, int], None]
"""Called with (done, total) between batches: a dashboard job's bar and its Cancel check."""


def report_progress(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


@dataclass(frozen=True)
class FilterTarget:
    """The mean activation of one filter of a layer: "which pixels make filter 42 fire"."""

    layer: str
    index: int


Target = int | FilterTarget | None


def has_class_output(model: keras.Model, output: int | None = None) -> bool:
    return heads.find_head(model, output).is_classifier


def resolve_target(model: keras.Model, image: np.ndarray, target: Target, output: int | None = None
                   ) -> int | FilterTarget:
    """None means the top-1 class, or for models without a class output, the strongest channel of the CAM layer."""
    if isinstance(target, FilterTarget):
        return FilterTarget(models.resolve_layer(model, target.layer), int(target.index))
    head = heads.find_head(model, output)
    if target is not None:
        if not head.is_classifier:
            raise AuditError(f"The model has no class output ({head.description}): choose a filter of a layer "
                             "as the target.")
        if not 0 <= int(target) < head.classes:
            raise AuditError(f"Class {target} is out of range: the model has classes 0 to {head.classes - 1}.")
        return int(target)
    if head.is_classifier:
        scores = np.asarray(heads.scores_model(model, head)(image[None], training=False))[0]
        return int(np.argmax(scores))
    layer = models.cam_layer(model)
    maps = np.asarray(models.submodel(model, layer)(image[None], training=False))[0]
    return FilterTarget(layer, int(np.argmax(maps.mean(axis=(0, 1)))))


def score_of(target: int | FilterTarget):
    """The scalar per sample that a target names, from the last tensor of a graph model's outputs."""
    if isinstance(target, FilterTarget):  # keras.ops: works on symbolic and on real tensors
        return lambda maps: keras.ops.mean(maps[..., target.index], axis=tuple(range(1, len(maps.shape) - 1)))
    return lambda scores: scores[:, target]


def graph_with_score(model: keras.Model, target: int | FilterTarget, points: list[models.Point] = (),
                      output: int | None = None, replace=None) -> keras.Model:
    """A model from the image to [tensors at `points`..., the target's tensor], in one pass."""
    points = list(points)
    if isinstance(target, FilterTarget):
        return models.graph_model(model, points + [models.Point(target.layer)], replace=replace)
    return heads.scores_model(model, heads.find_head(model, output), points, replace=replace)


def score_model(model: keras.Model, target: int | FilterTarget, output: int | None = None) -> keras.Model:
    """A model from the image to one score per sample: the class score or the filter's mean activation."""
    graph = graph_with_score(model, target, output=output)
    return keras.Model(graph.inputs[0], score_of(target)(graph.outputs[-1]))


def gradients_of(scorer: keras.Model, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = tf.convert_to_tensor(batch, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        scores = scorer(x, training=False)
    return tape.gradient(scores, x).numpy(), scores.numpy()


def normalise(values: np.ndarray) -> np.ndarray:
    """A non-negative map scaled to [0, 1] by its maximum (all zero stays zero)."""
    values = np.maximum(np.asarray(values, np.float64), 0)
    top = values.max()
    return (values / top if top > 0 else values).astype(np.float32)


def resize(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return tf.image.resize(values[None, :, :, None].astype(np.float32), size, method="bilinear").numpy()[0, :, :, 0]
