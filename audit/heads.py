"""What a model's output means: which output is the classifier, where its class scores are, and how
they become probabilities.

Class scores are always taken before the output's squashing: the pre-activation of a Dense layer with
a softmax or sigmoid, the input of a separate `Softmax` / `Activation` layer, or a linear layer's
output as it is (a logits head). Gradients of a softmax output can grow a class by pushing the others
down (Simonyan et al. 2014); scores before it do not. A single unit (`Dense(1, "sigmoid")` or a linear
`Dense(1)`, the cats-vs-dogs tutorials) is a binary classifier: class 1's score is the unit's logit and
class 0's its negation, so "why cat" and "why dog" are both answerable. A vector that comes out of a
pooling or a conv layer is features, not classes. With several outputs the classifier is the first
softmax one (else sigmoid, else linear), or the one the caller names, never silently output 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from audit import batches, compiled, graph
from audit.errors import AuditError

_SQUASHES = ("softmax", "sigmoid")


@dataclass(frozen=True)
class Head:
    """One output of a model, read as a classifier or not."""

    output: int  # index in model.outputs
    path: str  # the layer that makes it
    point: graph.Point | None  # where the class scores are; None: not a classifier
    classes: int  # class scores (2 for a single-unit binary head)
    distribution: str  # "softmax" or "sigmoid": how scores become probabilities ("" for features)
    binary: bool
    description: str

    @property
    def is_classifier(self) -> bool:
        return self.point is not None


def outputs(model: keras.Model) -> list[Head]:
    """Every output of the model, each read as a classifier or as features.

    A linear Dense output is logits only when no output ends in a softmax or sigmoid; beside one (a
    classifier with a box or a score) it is read as a regression.
    """
    read = [_read_output(model, index) for index in range(len(model.outputs))]
    if any(head.is_classifier and head.point.where != "output" for head in read):
        read = [Head(head.output, head.path, None, 0, "", False,
                     head.description.split("):")[0] + f"): {head.classes} linear values beside a softmax or sigmoid "
                     "output, read as a regression, not classes")
                if head.is_classifier and head.point.where == "output" else head for head in read]
    return read


def find_head(model: keras.Model, output: int | None = None) -> Head:
    """The output to explain: the one named, or the first softmax, sigmoid, then linear classifier.

    Without any classifier, the first output (features or maps): it has no class scores.
    """
    heads = outputs(model)
    if output is not None:
        if not 0 <= int(output) < len(heads):
            raise AuditError(f"Output {output} does not exist: the model has {len(heads)} output(s).")
        return heads[int(output)]
    for rank in (_by_softmax, _by_sigmoid, _by_linear_vector, _by_linear_unit):
        for head in heads:
            if rank(head):
                return head
    return heads[0]


def class_names(known: list[str] | None, head: Head, labels) -> tuple[list[str], str]:
    """The explained output's class names, and where they come from.

    The model's own names when it has as many as classes; else, for the demo shapes (audit.zoo.shapes) and a
    model with as many classes, the generator's class order; else, when the images come from as many class
    folders as there are classes, the folder names in sorted order: the indices Keras's
    `image_dataset_from_directory` gave them in training (a transfer-learning model saved without its class
    names); else "class i".
    """
    if known and len(known) == head.classes:
        return list(known), "the model"
    from audit.zoo import shapes

    present = {label for label in labels if label}
    if head.is_classifier and present and present <= set(shapes.CLASSES) and len(shapes.CLASSES) == head.classes:
        return list(shapes.CLASSES), "the demo shapes' own class order (the generator's, as a model trained on them has it)"
    folders = sorted(present)
    if head.is_classifier and len(folders) == head.classes:
        return folders, "the image folders, in sorted order (how Keras's image_dataset_from_directory numbers them)"
    return [f"class {i}" for i in range(head.classes)], ""


def _by_softmax(head: Head) -> bool:
    return head.is_classifier and head.distribution == "softmax" and head.point.where != "output"


def _by_sigmoid(head: Head) -> bool:
    return head.is_classifier and head.distribution == "sigmoid" and head.point.where != "output"


def _by_linear_vector(head: Head) -> bool:
    return head.is_classifier and head.point.where == "output" and not head.binary


def _by_linear_unit(head: Head) -> bool:
    return head.is_classifier and head.point.where == "output"


def _producer(model: keras.Model, index: int, prefix: str = "") -> tuple[str, object]:
    """The layer (by path) that makes output `index`, inside nested models too."""
    if isinstance(model, keras.Sequential):
        layer, tensor_index = model.layers[-1], 0
    else:
        history = model.outputs[index]._keras_history
        layer, tensor_index = history.operation, history.tensor_index
    path = prefix + layer.name
    if isinstance(layer, keras.Model):
        return _producer(layer, tensor_index, path + "/")
    return path, layer


def _read_output(model: keras.Model, index: int) -> Head:
    path, layer = _producer(model, index)
    shape = tuple(model.outputs[index].shape)
    kind = type(layer).__name__
    activation = "softmax" if kind == "Softmax" else graph.activation_name(layer)
    label = f"output {index} ({layer.name!r}, {kind}"
    if len(shape) != 2:
        return Head(index, path, None, 0, "", False, f"{label} of shape {shape}): maps, not class scores")
    units = int(shape[-1])
    if activation in _SQUASHES and kind in ("Softmax", "Activation"):
        point, how = graph.Point(path, "input"), f"the input of its {activation}"
    elif activation in _SQUASHES and graph.has_fused_activation(layer):
        point, how = graph.Point(path, "pre_activation"), f"its output before the {activation}"
    elif kind == "Dense" and activation in (None, "linear"):
        point, how = graph.Point(path, "output"), "its output as it is (logits)"
        activation = "sigmoid" if units == 1 else "softmax"
    else:
        return Head(index, path, None, 0, "", False, f"{label}, {units} values): features, not class scores")
    binary = units == 1 and activation == "sigmoid"
    if binary:
        what = "a binary classifier: class 1 is the unit's logit, class 0 its negation"
    else:
        what = f"{units} classes, probabilities by {activation}"
    return Head(index, path, point, 2 if binary else units, activation, binary,
                f"{label}): {what}; class scores are {how}")


def scores_model(model: keras.Model, head: Head, points: list[graph.Point] = (), any_size: bool = False,
                 replace=None) -> keras.Model:
    """A model from the image to [tensors at `points`..., class scores (N, classes)], in one pass
    (`replace`: see graph.graph_model)."""
    if not head.is_classifier:
        raise AuditError(f"The model has no class output ({head.description}): choose a filter of a layer "
                         "as the target.")
    points = list(points)

    def add_scores(tensors):
        logits = tensors[-1]
        if head.binary:
            logits = graph.Step(lambda x: keras.ops.concatenate([-x, x], axis=-1), "two_classes")(logits)
        return tensors[:-1] + [logits]

    return graph.graph_model(model, points + [head.point], any_size=any_size, extra=add_scores, replace=replace)


def probabilities(scores: np.ndarray, head: Head) -> np.ndarray:
    """Class probabilities from class scores: softmax, or a sigmoid per class (binary: [1 - p, p])."""
    scores = np.asarray(scores, np.float64)
    if head.distribution == "sigmoid":
        return 1.0 / (1.0 + np.exp(-scores))
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def log_probability(scores: tf.Tensor, head: Head) -> tf.Tensor:
    """log p(class) for every class, from the scores, without log(0): the Taylor criterion's score."""
    if head.distribution == "sigmoid":
        return tf.math.log_sigmoid(scores)
    return tf.nn.log_softmax(scores, axis=-1)


BATCH = 64
"""Images per call of Outputs (cut further to the server's activation budget)."""


class Outputs:
    """What a model says about images, in comparable form: the explained output's class probabilities,
    or for models without classes that output as it is (features or maps). What-if pruning compares
    these between a model and its masked copy."""

    def __init__(self, model: keras.Model, output: int | None = None, head: Head | None = None):
        self.head = head = head or find_head(model, output)
        self.graph, self.forward = compiled.kept(model, ("outputs", head), lambda: _compiled_outputs(model, head))

    @property
    def independent(self) -> bool:
        """Each class its own yes/no (several sigmoid units), not one distribution over classes."""
        return self.head.distribution == "sigmoid" and not self.head.binary

    def __call__(self, images: np.ndarray, batch_size: int = BATCH) -> np.ndarray:
        images = np.asarray(images, np.float32)
        parts = list(batches.in_batches(self.graph, images, lambda batch: self.forward(batch).numpy(), batch_size))
        values = np.concatenate(parts) if parts else np.zeros((0, *self.graph.outputs[0].shape[1:]), np.float32)
        return probabilities(values, self.head) if self.head.is_classifier else values


def _compiled_outputs(model: keras.Model, head: Head) -> tuple[keras.Model, tf.types.experimental.PolymorphicFunction]:
    """The model from the image to the head's scores (or its output), and one traced call of it: a what-if sweep
    calls it thousands of times on a few images, where Keras's predict spends 2-3x the pass itself on its
    data pipeline (ResNet152 at 64 px, one image: 113 ms against 46 ms)."""
    scores = scores_model(model, head) if head.is_classifier else graph.graph_model(model, [graph.Point(head.path)])
    signature = [tf.TensorSpec([None, *scores.inputs[0].shape[1:]], tf.float32)]
    return scores, tf.function(lambda x: tf.cast(scores(x, training=False), tf.float32), input_signature=signature)
