"""Every attribution method by the name the pages show, and the one path from pixels to a map."""

from __future__ import annotations

import keras
import numpy as np

from audit import models
from audit import precision as compute_precision
from audit.attribution.cams import grad_cam, grad_cam_plus_plus, guided_grad_cam, layer_cam
from audit.attribution.gradients import guided_backprop, integrated_gradients, saliency, smoothgrad
from audit.attribution.perturbation import occlusion, score_cam
from audit.attribution.targets import Progress, Target

METHODS = {
    "Saliency": saliency,
    "SmoothGrad": smoothgrad,
    "Integrated Gradients": integrated_gradients,
    "Grad-CAM": grad_cam,
    "Grad-CAM++": grad_cam_plus_plus,
    "Layer-CAM": layer_cam,
    "Score-CAM": score_cam,
    "Guided Backprop": guided_backprop,
    "Guided Grad-CAM": guided_grad_cam,
    "Occlusion": occlusion,
}
"""Every method by the name the dashboard shows; each takes (model, image, target, **options)."""


FLOAT32_METHODS = frozenset({"Integrated Gradients"})
"""Methods that run in float32 even where heavy passes run in bfloat16: their own check (Integrated Gradients'
completeness, the attributions summing to the score's change) would not hold to its tolerance (bench/precision.py)."""

BATCHED = frozenset({"SmoothGrad", "Integrated Gradients", "Score-CAM", "Occlusion"})
"""The methods that run many passes in batches: they take `progress` (done, total) between batches."""


def black_options(method: str, black: np.ndarray) -> dict:
    """Where a method takes the black image: Integrated Gradients' "black" baseline, Score-CAM's and
    occlusion's fill."""
    return {"Integrated Gradients": {"black": black}, "Score-CAM": {"fill": black},
            "Occlusion": {"fill": black}}.get(method, {})


def map_of(model: keras.Model, x: np.ndarray, black: np.ndarray, method: str, target: Target = None,
           progress: Progress | None = None, **options) -> np.ndarray:
    """One method's map of a preprocessed image `x`, with `black` the preprocessed black image of the
    same size (see explain): what the dashboard's cached maps compute."""
    extra = black_options(method, black)
    if method in BATCHED:
        extra["progress"] = progress
    return METHODS[method](model, x, target, **options, **extra)


def explain(loaded: models.LoadedModel, pixels: np.ndarray, method: str, target: Target = None,
            preprocessing: str | None = None, fit: str = "crop", progress: Progress | None = None,
            precision: str = "float32", **options) -> np.ndarray:
    """One method's map for a uint8 RGB image: the code path of the dashboard, the report and notebooks.

    The image and an all-black image of its size both go through the model's preprocessing and fit, so
    a "black" baseline or fill means black pixels whatever the preprocessing (zeros in the model's input
    space would be mid-grey for a [-1, 1] model and the mean colour for a caffe one).
    """
    pixels = np.asarray(pixels)
    x = loaded.preprocess(pixels, preprocessing, fit)[0]
    black = loaded.preprocess(np.zeros_like(pixels), preprocessing, fit)[0]
    model = loaded.model if method in FLOAT32_METHODS else compute_precision.for_compute(loaded.model, precision)
    return map_of(model, x, black, method, target, progress, **options)
