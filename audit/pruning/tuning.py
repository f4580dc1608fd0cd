"""Fine-tuning a pruned model until it has recovered, not for a fixed number of epochs.

The number of epochs is chosen on held-out data (early stopping: stop when the validation loss has not improved
for `patience` epochs, keep the best weights, up to `max_epochs`), and the learning rate follows a cosine decay
over that budget (Loshchilov and Hutter 2017). BatchNorm statistics are re-estimated on the training images
before (the cut left them normalising what the unpruned model fed them), after every epoch (their moving averages
lag the weights, so an epoch is judged as the model would be shipped) and at the end (audit.pruning.batchnorm);
the BatchNorms train as in training (`batchnorm="train"`, bench/recovery.py: 93.7% against 89.3% kept in
inference mode) or stay in inference mode (`"frozen"`). Optionally the unpruned model teaches the pruned one
(Hinton et al. 2015: the KL divergence of the temperature-softened outputs, times T², beside the labels'
cross-entropy).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from audit import heads
from audit import images as image_utils
from audit.errors import AuditError
from audit.pruning.batchnorm import batch_norms, recalibrate_bn

BATCHNORM_MODES = ("train", "frozen")


@dataclass(frozen=True)
class Tuning:
    """How a pruned model is fine-tuned. Defaults: what bench/recovery.py measured best within minutes here."""

    max_epochs: int = 20
    patience: int = 3
    learning_rate: float = 1e-3
    batch_size: int = 32
    batchnorm: str = "train"  # "train": batch statistics, as in training; "frozen": kept in inference mode
    distill: bool = True  # from the unpruned model: 94.7% [91.5-96.7] against 93.7% without, BN scale at 50%
    temperature: float = 4.0
    soft_weight: float = 0.7  # the distillation term's share of the loss (the labels' cross-entropy the rest)
    validation: float = 0.2  # the share of the fine-tuning images that chooses the epochs

    def __post_init__(self):
        if not 1 <= int(self.max_epochs) <= 200:
            raise AuditError(f"Between 1 and 200 epochs, not {self.max_epochs}.")
        if not 1 <= int(self.patience):
            raise AuditError(f"Patience is at least one epoch, not {self.patience}.")
        if not 0.0 < float(self.learning_rate) <= 1.0:
            raise AuditError(f"The learning rate is between 0 and 1, not {self.learning_rate}.")
        if self.batchnorm not in BATCHNORM_MODES:
            raise AuditError(f"BatchNorm layers are {' or '.join(BATCHNORM_MODES)} while fine-tuning, not "
                             f"{self.batchnorm!r}.")
        if not 0.0 < float(self.validation) < 1.0:
            raise AuditError(f"The validation share is between 0 and 1, not {self.validation}.")


@dataclass
class Tuned:
    """What one fine-tuning did: the validation loss per epoch, the epoch kept, and why it stopped."""

    validation_loss: list[float] = field(default_factory=list)
    training_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0  # 1-based; 0: the weights before fine-tuning were the best
    seconds: float = 0.0
    max_epochs: int = 0
    patience: int = 0
    distilled: bool = False
    images: int = 0
    validation_images: int = 0

    @property
    def epochs(self) -> int:
        return len(self.validation_loss) - 1  # the first value is before any epoch

    def describe(self) -> str:
        """"stopped after 7 epochs: validation loss flat for 3; kept epoch 4" and the like."""
        kept = f"kept epoch {self.best_epoch}" if self.best_epoch else "kept the weights before fine-tuning"
        kept += "; distilled from the unpruned model" if self.distilled else ""
        if self.epochs < self.max_epochs:
            return (f"stopped after {self.epochs} of up to {self.max_epochs} epochs: validation loss not better for "
                    f"{self.patience}; {kept}")
        return f"ran all {self.max_epochs} epochs ({kept}; more epochs might still help)"


def validation_split(labels: np.ndarray, share: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices to train on and to choose the epochs on (`share`, drawn class by class, seeded)."""
    count = max(1, int(round(len(labels) * share)))
    chosen = image_utils.stratified(labels, count, seed)
    rest = np.setdiff1d(np.arange(len(labels)), chosen)
    if len(rest) == 0 or len(chosen) == 0:
        raise AuditError("Fine-tuning needs more labelled images: some to train on and some to choose the epochs.")
    return rest, chosen


def fine_tune(model: keras.Model, images: np.ndarray, labels: np.ndarray, tuning: Tuning = Tuning(),
              seed: int = 0, output: int | None = None, progress=None, teacher: keras.Model | None = None,
              train_all: bool = True) -> Tuned:
    """Train a (pruned) model in place on labelled images until its validation loss stops improving.

    A seeded `tuning.validation` share of the images (class by class) chooses the epochs; the rest trains.
    The loss is the cross-entropy on the explained output's class scores (softmax, or sigmoid for binary and
    sigmoid heads), plus with `tuning.distill` the softened KL to `teacher` (the unpruned model). With
    `train_all`, frozen layers (a transfer model's base) train too: the pruned layers must adapt; every layer's
    trainable flag is as before afterwards. Pass the pruned copy, never the loaded model.
    """
    head = heads.find_head(model, output)
    if not head.is_classifier:
        raise AuditError(f"Fine-tuning needs a class output ({head.description}).")
    if tuning.distill and teacher is None:
        raise AuditError("Distillation needs the unpruned model as the teacher.")
    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    labels = np.asarray(labels)
    train, validation = validation_split(labels, tuning.validation, seed)
    x = np.asarray(images, np.float32)
    flags = {id(layer): layer.trainable for layer in _all_layers(model)}
    norms = batch_norms(model)
    try:
        if train_all:
            model.trainable = True
        if norms:
            recalibrate_bn(model, x[train])  # the cut left them normalising what the unpruned model fed them
        if tuning.batchnorm == "frozen":
            for layer in norms:
                layer.trainable = False  # Keras 3: a BatchNorm that is not trainable runs in inference mode
        scorer = heads.scores_model(model, head)
        targets = targets_for(labels, head, None if not tuning.distill else _scores_of(teacher, head, x))
        steps = int(np.ceil(len(train) / tuning.batch_size))
        schedule = keras.optimizers.schedules.CosineDecay(tuning.learning_rate, tuning.max_epochs * steps)
        scorer.compile(optimizer=keras.optimizers.Adam(schedule), loss=loss_for(head, tuning))
        record = Tuned(max_epochs=tuning.max_epochs, patience=tuning.patience, images=len(train),
                       validation_images=len(validation), distilled=tuning.distill)
        refresh = None
        if norms and tuning.batchnorm == "train":  # the moving statistics lag the weights: judge each epoch as
            def refresh():                         # the model would be shipped, with them re-estimated
                recalibrate_bn(model, x[train])
        stopper = _EarlyStopping(scorer, head, x[validation], labels[validation], tuning.patience, record, refresh)
        callbacks = [stopper] + ([] if progress is None else [_Progress(progress, tuning.max_epochs * steps)])
        history = scorer.fit(x[train], targets[train], epochs=tuning.max_epochs, batch_size=tuning.batch_size,
                             shuffle=True, verbose=0, callbacks=callbacks)
        record.training_loss = [float(value) for value in history.history.get("loss", [])]
        stopper.restore()
        if norms:
            recalibrate_bn(model, x[train])  # the statistics of the kept weights, exactly
    finally:
        for layer in _all_layers(model):
            layer.trainable = flags.get(id(layer), layer.trainable)
    record.seconds = time.perf_counter() - start
    return record


def _all_layers(model: keras.Model) -> list:
    found = [model]
    for layer in model.layers:
        found += _all_layers(layer) if isinstance(layer, keras.Model) else [layer]
    return found


def _scores_of(model: keras.Model, head: heads.Head, x: np.ndarray) -> np.ndarray:
    """The class scores (logits) of `model` on `x`, in batches."""
    return _logits(heads.scores_model(model, head), x)


def _logits(scorer: keras.Model, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    return np.concatenate([np.asarray(scorer(x[start:start + batch_size], training=False), np.float32)
                           for start in range(0, len(x), batch_size)])


def targets_for(labels: np.ndarray, head: heads.Head, teacher: np.ndarray | None = None) -> np.ndarray:
    """What the loss reads per image: the label (one-hot for sigmoid heads), then the teacher's scores."""
    truth = (np.eye(head.classes, dtype=np.float32)[labels] if head.distribution == "sigmoid"
             else labels.astype(np.float32)[:, None])
    return truth if teacher is None else np.concatenate([truth, teacher.astype(np.float32)], axis=1)


def loss_for(head: heads.Head, tuning: Tuning):
    """Cross-entropy from class scores; with distillation, (1 - w) of it plus w T² KL(teacher_T || student_T)."""
    sigmoid = head.distribution == "sigmoid"
    width = head.classes if sigmoid else 1
    weight, temperature = float(tuning.soft_weight), float(tuning.temperature)

    def loss(y_true, y_pred):
        y_pred = tf.cast(y_pred, tf.float32)
        truth = y_true[:, :width]
        if sigmoid:
            hard = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(truth, y_pred), axis=-1)
        else:
            hard = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(truth[:, 0], tf.int32), y_pred)
        if not tuning.distill:
            return hard
        teacher, student = y_true[:, width:] / temperature, y_pred / temperature
        if sigmoid:
            p = tf.sigmoid(teacher)
            soft = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(p, student)
                                  - tf.nn.sigmoid_cross_entropy_with_logits(p, teacher), axis=-1)
        else:
            p = tf.nn.softmax(teacher)
            soft = tf.reduce_sum(p * (tf.nn.log_softmax(teacher) - tf.nn.log_softmax(student)), axis=-1)
        return (1.0 - weight) * hard + weight * temperature ** 2 * soft

    return loss


def cross_entropy(scores: np.ndarray, labels: np.ndarray, head: heads.Head) -> float:
    """Mean -log p(label) from class scores, as `knowledge` reports it."""
    probabilities = heads.probabilities(scores, head)
    return float(-np.mean(np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, 1.0))))


class _EarlyStopping(keras.callbacks.Callback):
    """Measures the validation cross-entropy before training and after every epoch, stops after `patience`
    epochs without improvement, and keeps the best weights (the ones before training count)."""

    def __init__(self, scorer: keras.Model, head: heads.Head, x: np.ndarray, labels: np.ndarray, patience: int,
                 record: Tuned, refresh=None):
        super().__init__()
        self.scorer, self.head, self.x, self.labels, self.patience, self.record = (scorer, head, x, labels, patience,
                                                                                   record)
        self.refresh = refresh
        self.best_weights = scorer.get_weights()
        record.validation_loss = [self._loss()]
        self.best, self.waited = record.validation_loss[0], 0

    def _loss(self) -> float:
        return cross_entropy(_logits(self.scorer, self.x), self.labels, self.head)

    def on_epoch_end(self, epoch, logs=None):
        if self.refresh is not None:
            self.refresh()
        value = self._loss()
        self.record.validation_loss.append(value)
        if value < self.best - 1e-6:
            self.best, self.waited, self.record.best_epoch = value, 0, epoch + 1
            self.best_weights = self.scorer.get_weights()
        else:
            self.waited += 1
            if self.waited >= self.patience:
                self.scorer.stop_training = True

    def restore(self) -> None:
        self.scorer.set_weights(self.best_weights)


class _Progress(keras.callbacks.Callback):
    def __init__(self, progress, total: int):
        super().__init__()
        self.progress, self.total, self.done = progress, total, 0

    def on_train_batch_end(self, batch, logs=None):
        self.done += 1
        self.progress(min(self.done, self.total), self.total)
