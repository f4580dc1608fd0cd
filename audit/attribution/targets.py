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

from audit import compiled, heads, models
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
        return int(np.argmax(Scorer(model, 0, output).outputs(image[None])[-2][0]))
    layer = models.cam_layer(model)
    maps = Scorer(model, FilterTarget(layer, 0)).outputs(image[None])[-2][0]
    return FilterTarget(layer, int(np.argmax(maps.mean(axis=(0, 1)))))


def graph_with_score(model: keras.Model, target: int | FilterTarget, points: list[models.Point] = (),
                     output: int | None = None, replace=None) -> keras.Model:
    """A model from the image to [tensors at `points`..., the target's tensor], in one pass."""
    points = list(points)
    if isinstance(target, FilterTarget):
        return models.graph_model(model, points + [models.Point(target.layer)], replace=replace)
    return heads.scores_model(model, heads.find_head(model, output), points, replace=replace)


def _score_of_index(filter_target: bool):
    """The target's score per sample from the last tensor, the class or filter index a tensor (not traced in)."""
    if filter_target:
        return lambda maps, index: tf.reduce_mean(tf.cast(tf.gather(maps, index, axis=-1), tf.float32),
                                                  axis=list(range(1, len(maps.shape) - 1)))
    return lambda scores, index: tf.cast(tf.gather(scores, index, axis=1), tf.float32)


@dataclass(frozen=True)
class _Pass:
    forward: Callable  # (x, index) -> [tensors at the points..., the last tensor, the score]
    backward: Callable  # (x, index) -> [d score / d x] or, with points, [tensors at the points..., d score / d each]


def _compiled_pass(model: keras.Model, target: int | FilterTarget, points: tuple[str, ...], output: int | None,
                   replace) -> _Pass:
    """The forward and backward passes for a kind of target, traced once per (model, target kind and layer,
    points, output, replacement) and kept with the model (audit.compiled): a new image, class or filter
    index reuses them. With points, the backward pass stops at them (a CAM needs no input gradient)."""
    filter_target = isinstance(target, FilterTarget)
    key = ("attribution", target.layer if filter_target else "class", points, output, replace)

    def build() -> _Pass:
        graph = graph_with_score(model, target, [models.Point(point) for point in points], output, replace)
        score = _score_of_index(filter_target)
        signature = [tf.TensorSpec([None, *graph.inputs[0].shape[1:]], tf.float32), tf.TensorSpec([], tf.int32)]

        @tf.function(input_signature=signature)
        def forward(x, index):
            tensors = as_list(graph(x, training=False))
            return [*tensors, score(tensors[-1], index)]

        @tf.function(input_signature=signature)
        def backward(x, index):
            with tf.GradientTape() as tape:
                tape.watch(x)  # records every op after the input, also in a frozen base (no trainable weights)
                tensors = as_list(graph(x, training=False))
                scores = score(tensors[-1], index)
            at = tensors[:-1] if points else [x]
            gradients = tape.gradient(scores, at)
            # a point the score does not depend on has no gradient: NaN says so (zeros would look like an answer)
            gradients = [g if g is not None else tf.fill(tf.shape(t), float("nan")) for g, t in zip(gradients, at)]
            return [*(tensors[:-1] if points else []), *gradients, scores]

        return _Pass(forward, backward)

    return compiled.kept(model, key, build)


def as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class Scorer:
    """One score per image for a target: a class's score before the squash, or a filter's mean activation;
    compiled once per kind of target (audit.compiled), so another image, class or filter pays no tracing.

    `points` are layers whose tensors (and the score's gradients with respect to them) come out of the same
    pass; `replace` swaps layers in the graph (graph.graph_model), e.g. guided ReLUs.
    """

    def __init__(self, model: keras.Model, target: int | FilterTarget, output: int | None = None,
                 points: tuple[str, ...] = (), replace=None):
        self.target, self.points = target, tuple(points)
        self.index = tf.constant(target.index if isinstance(target, FilterTarget) else int(target), tf.int32)
        self._pass = _compiled_pass(model, target, self.points, output, replace)

    def outputs(self, batch: np.ndarray) -> list[np.ndarray]:
        """[tensors at the points..., the last tensor (class scores or the layer's maps), the scores (N,)]."""
        return [t.numpy() for t in self._pass.forward(tf.convert_to_tensor(batch, tf.float32), self.index)]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """The scores (N,) of a batch."""
        return self.outputs(batch)[-1]

    def gradients(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(d score / d input, the scores) of a batch."""
        gradient, scores = (t.numpy() for t in self._pass.backward(tf.convert_to_tensor(batch, tf.float32),
                                                                     self.index))
        return gradient, scores

    def point_gradients(self, batch: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """(tensors at the points, d score / d each of them (NaN where the score does not depend on it), the
        scores) of a batch, from one pass that goes back no further than the points."""
        if not self.points:
            raise AuditError("point_gradients needs the scorer's points (layer names).")
        found = [t.numpy() for t in self._pass.backward(tf.convert_to_tensor(batch, tf.float32), self.index)]
        count = len(self.points)
        return found[:count], found[count:2 * count], found[-1]


def score_model(model: keras.Model, target: int | FilterTarget, output: int | None = None) -> Scorer:
    """The compiled scorer of a target (see Scorer): `score_model(model, 3)(batch)` gives class 3's scores."""
    return Scorer(model, target, output)


def normalise(values: np.ndarray) -> np.ndarray:
    """A non-negative map scaled to [0, 1] by its maximum (all zero stays zero)."""
    values = np.maximum(np.asarray(values, np.float64), 0)
    top = values.max()
    return (values / top if top > 0 else values).astype(np.float32)


def resize(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return tf.image.resize(values[None, :, :, None].astype(np.float32), size, method="bilinear").numpy()[0, :, :, 0]
