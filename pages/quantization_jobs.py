"""The Quantisation page's work: ranges, sensitivity, the integer model and its measures, each computed once per
(model, images, options) for every session (jobs.shared_result), behind a progress bar with Cancel."""

from __future__ import annotations

import numpy as np
import pandas as pd

from audit import images, pruning, quantization
from pages import jobs
from pages.selection import Selection, folder_labels, labels_of, set_key

THROUGHPUT_PASSES = 4 * quantization.THROUGHPUT_BATCH
"""Images the throughput timing runs per model (a warm-up and three timed batches)."""
CONVERSION_TRACES = 8
"""One conversion to .tflite costs about this many traces of the model's forward pass (its graph exported,
optimised, calibrated): 6.1x the load's trace on the shapes demo, 9.8x on KerasHub's MobileNetV3, 6.1x on
MobileNetV2 and 7.4x on DenseNet121 at 64 px; the page's estimate had said "about 2 s" for a 9 s job."""


def split(selection: Selection, calibration: int, held_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint image indices: `held_out` stratified by class (every class within one image of the others), and
    `calibration` others (seeded). The integer model is measured on images it was not calibrated on."""
    labels = folder_labels(selection)
    tested = images.stratified(labels, held_out, seed=0)
    rest = np.setdiff1d(np.arange(len(labels)), tested)
    chosen = np.random.default_rng(0).permutation(rest)[:calibration]
    return np.sort(chosen), np.asarray(tested)


def most_calibration(selection: Selection) -> int:
    return max(len(selection.image_set) - 1, 1)


def _inputs(selection: Selection, indices: np.ndarray) -> np.ndarray:
    pixels = [selection.image_set[int(i)].pixels for i in indices]
    return selection.model.preprocess(pixels, selection.preprocessing, selection.fit)


def _labels(selection: Selection, indices: np.ndarray) -> np.ndarray | None:
    labels = labels_of(selection)
    return None if labels is None else labels[indices]


def model_to_quantize(selection: Selection, calibration: int, held_out: int, keep_params: float):
    """The loaded model, or (keep_params < 1) a copy pruned to that share of its parameters (BN scale where it
    has BatchNorms, else L1, scored on the calibration images) with its BatchNorms recalibrated on them."""
    return _pruned(selection, calibration, held_out, keep_params) if keep_params < 1 else selection.model.model


def _pruned(selection: Selection, calibration: int, held_out: int, keep_params: float):
    def compute():
        chosen, _ = split(selection, calibration, held_out)
        x = _inputs(selection, chosen)
        with jobs.model_job(selection, "Pruning before quantising"):
            model = selection.model.model
            scores = pruning.filter_scores(model, x)
            criterion = "bn_scale" if scores["bn_scale"].notna().any() else "l1"
            smaller = pruning.prune(model, pruning.to_target(model, scores, criterion, params=keep_params, seed=0))
            pruning.recalibrate_bn(smaller, x)
            return smaller, criterion

    key = set_key(selection, "quantization_pruned", int(calibration), int(held_out), float(keep_params))
    return jobs.shared_result(key, compute, limit=4)[0]


def ranges_key(selection: Selection, calibration: int, held_out: int, keep_params: float) -> tuple:
    return set_key(selection, "quantization_ranges", int(calibration), int(held_out), float(keep_params))


def ranges(selection: Selection, calibration: int, held_out: int, keep_params: float) -> tuple[pd.DataFrame, dict]:
    """The ranges of every conv and dense layer on the calibration images, and the activations' samples."""

    def compute():
        chosen, _ = split(selection, calibration, held_out)
        model = model_to_quantize(selection, calibration, held_out, keep_params)
        with jobs.model_job(selection, "Dynamic ranges", "quant_ranges") as progress:
            layers = quantization.quantized_layers(model)
            activations, samples = quantization.activation_ranges(model, layers, _inputs(selection, chosen),
                                                                  progress=progress)
            return pd.concat([quantization.weight_ranges(model, layers), activations], ignore_index=True), samples

    return jobs.shared_result(ranges_key(selection, calibration, held_out, keep_params), compute)


def sensitivity_key(selection: Selection, calibration: int, held_out: int, keep_params: float, others: bool) -> tuple:
    return set_key(selection, "quantization_sensitivity", int(calibration), int(held_out), float(keep_params),
                   bool(others), selection.output)


def sensitivity(selection: Selection, calibration: int, held_out: int, keep_params: float, others: bool):
    def compute():
        chosen, tested = split(selection, calibration, held_out)
        model = model_to_quantize(selection, calibration, held_out, keep_params)
        with jobs.model_job(selection, "Sensitivity, layer by layer", "quant_sensitivity") as progress:
            return quantization.sensitivity(model, _inputs(selection, tested), _labels(selection, tested),
                                            calibration=_inputs(selection, chosen), all_but_one=others,
                                            progress=progress, output=selection.output)

    return jobs.shared_result(sensitivity_key(selection, calibration, held_out, keep_params, others), compute)


def integer_key(selection: Selection, calibration: int, held_out: int, keep_params: float, keep: tuple) -> tuple:
    return set_key(selection, "quantization_integer", int(calibration), int(held_out), float(keep_params), keep)


def integer_model(selection: Selection, calibration: int, held_out: int, keep_params: float, keep: tuple) -> dict:
    """The int8 and float32 .tflite files of the model, measured with the interpreter on the held-out images."""

    def compute():
        chosen, tested = split(selection, calibration, held_out)
        model = model_to_quantize(selection, calibration, held_out, keep_params)
        x, labels = _inputs(selection, tested), _labels(selection, tested)
        with jobs.model_job(selection, "Converting and measuring", "quant_convert") as progress:
            calibration_x = _inputs(selection, chosen)
            content = quantization.convert(model, calibration_x, keep_float=list(keep),
                                           progress=lambda done, total: progress(done, 3 * total))
            baseline = quantization.convert(model, calibration_x, integer=False)
            head = selection.head
            reference = quantization.raw_outputs(model, x, head)
            floated = quantization.evaluate(baseline, x, labels, reference, head=head)
            measured = quantization.evaluate(content, x, labels, reference, head=head)
            progress(1, 1)
        forgot = None
        if labels is not None and head.is_classifier and np.ndim(measured["outputs"]) == 2:
            forgot = pruning.compare(quantization.comparable(reference, head),
                                     quantization.comparable(measured["outputs"], head), labels, selection.class_names())
        return {"int8": content, "float32": baseline, "measured": measured, "floated": floated,
                "forgets": forgot, "held_out": tested, "calibration": len(chosen), "model": model.name,
                "parameters": model.count_params()}

    return jobs.shared_result(integer_key(selection, calibration, held_out, keep_params, keep), compute, limit=8)
