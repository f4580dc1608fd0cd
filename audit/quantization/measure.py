"""The integer model measured with the interpreter on held-out images: agreement with float (or accuracy), with
Wilson intervals, latency at batch 1, throughput at a larger batch, and its size."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from audit import intervals
from audit.errors import QuantizationError
from audit.quantization.convert import interpreter

THROUGHPUT_BATCH = 32


def run(content: bytes, images: np.ndarray, threads: int | None = None,
        progress: Callable[[int, int], None] | None = None, output: int = 0) -> tuple[np.ndarray, float]:
    """The model's output number `output` (in the Keras model's order) for each image, one image per call (batch
    1, as a phone runs it), and the median seconds of one call."""
    loaded = interpreter(content, threads)
    loaded.allocate_tensors()
    source, target = loaded.get_input_details()[0], output_detail(loaded, output)
    if tuple(source["shape"][1:]) != tuple(np.shape(images)[1:]):
        raise QuantizationError(f"The integer model takes images of shape {tuple(source['shape'][1:])}, "
                                f"not {tuple(np.shape(images)[1:])}.")
    found, seconds = [], []
    for index in range(len(images)):
        loaded.set_tensor(source["index"], np.asarray(images[index:index + 1], source["dtype"]))
        start = time.perf_counter()
        loaded.invoke()
        seconds.append(time.perf_counter() - start)
        found.append(np.array(loaded.get_tensor(target["index"]), np.float64)[0])
        if progress is not None:
            progress(index + 1, len(images))
    return np.asarray(found), float(np.median(seconds)) if seconds else float("nan")


def output_detail(loaded, output: int) -> dict:
    """The interpreter's output that is the Keras model's output number `output`: the converter lists them in
    another order, and names each by the exported function's result (`StatefulPartitionedCall_1:1` is output 1)."""
    details = loaded.get_output_details()
    if len(details) == 1:
        return details[0]
    named = [detail for detail in details if detail["name"].rsplit(":", 1)[-1] == str(output)]
    if len(named) != 1:
        raise QuantizationError(f"The converted model's outputs ({', '.join(d['name'] for d in details)}) do not say "
                                f"which is the model's output {output}.")
    return named[0]


def throughput(content: bytes, images: np.ndarray, batch: int = THROUGHPUT_BATCH, repeats: int = 3,
               threads: int | None = None) -> float:
    """Images per second at `batch` (the interpreter's input resized to it), best of `repeats`."""
    loaded = interpreter(content, threads)
    source = loaded.get_input_details()[0]
    loaded.resize_tensor_input(source["index"], [batch, *np.shape(images)[1:]])
    loaded.allocate_tensors()
    chosen = np.resize(np.asarray(images, source["dtype"]), (batch, *np.shape(images)[1:]))
    loaded.set_tensor(source["index"], chosen)
    loaded.invoke()  # warm-up: the first call plans the kernels
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        loaded.invoke()
        best = min(best, time.perf_counter() - start)
    return batch / best


def evaluate(content: bytes, images: np.ndarray, labels: np.ndarray | None = None,
             reference: np.ndarray | None = None, threads: int | None = None,
             progress: Callable[[int, int], None] | None = None, head=None,
             batch: int = THROUGHPUT_BATCH) -> dict:
    """What the `.tflite` bytes do on `images` (preprocessed): accuracy over the labelled (label >= 0) and
    top-1 agreement with `reference` (the float model's outputs on the same images), each with its Wilson
    interval (for class outputs); the largest and the relative (L2) difference from the reference (the Keras
    model's raw output: `simulate.raw_outputs`); seconds per image at batch 1; images per second at batch 32; the
    file's bytes. `head` (audit.heads.Head) says which output is compared (a model with several) and reads a
    single unit's logits at 0, not 0.5."""
    outputs, seconds = run(content, images, threads, progress, output=head.output if head is not None else 0)
    result = {"images": len(images), "bytes": len(content), "seconds_per_image": seconds,
              "images_per_second": throughput(content, images, batch, threads=threads) if len(images) and batch
              else float("nan"),
              "outputs": outputs}
    predicted = _top1(outputs, head) if _classes(outputs, head) else None
    if predicted is not None and labels is not None and np.any(np.asarray(labels) >= 0):
        known = np.asarray(labels) >= 0
        correct = float(np.sum(predicted[known] == np.asarray(labels)[known]))
        result["accuracy"] = correct / known.sum()
        result["accuracy_low"], result["accuracy_high"] = intervals.wilson_interval(correct, int(known.sum()))
    if reference is not None:
        reference = np.asarray(reference, np.float64).reshape(outputs.shape)
        if _classes(outputs, head):
            agree = float(np.sum(predicted == _top1(reference, head)))
            result["agreement"] = agree / max(len(images), 1)
            result["agreement_low"], result["agreement_high"] = intervals.wilson_interval(agree, len(images))
        result["largest_difference"] = float(np.max(np.abs(outputs - reference))) if len(images) else 0.0
        result["relative_error"] = float(np.linalg.norm(outputs - reference) / max(np.linalg.norm(reference), 1e-12))
    return result


def _top1(values: np.ndarray, head=None) -> np.ndarray:
    """The class of each output: argmax, or for a single unit whether it is over 0.5 (a probability) or 0
    (logits, as `head` says)."""
    values = np.asarray(values)
    if values.ndim == 1 or values.shape[-1] == 1:
        logits = head is not None and head.is_classifier and head.point.where == "output"
        return (values.reshape(len(values)) > (0.0 if logits else 0.5)).astype(int)
    return values.reshape(len(values), -1).argmax(1)


def _classes(values: np.ndarray, head=None) -> bool:
    """Outputs read as classes: as the head says (a pooled feature vector has the shape of class scores), else
    one score per class (a vector), not a map of features."""
    return head.is_classifier if head is not None else np.ndim(values) == 2
