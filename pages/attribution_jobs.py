"""The Attribution page's work: each method's map and the maps' deletion and insertion curves, once per input."""

from __future__ import annotations


import numpy as np

from audit import attribution, device
from pages import jobs
from pages.selection import Selection


def compute_for(selection: Selection, method: str):
    """The model a method runs on: the selection's compute model, but float32 for the methods whose own check
    bfloat16 would break (attribution.FLOAT32_METHODS)."""
    return selection.model.model if method in attribution.FLOAT32_METHODS else selection.compute_model


def target_of(target: tuple) -> attribution.Target:
    """The page's hashable target ("class", i) or ("filter", layer, index) as the attribution API takes it."""
    return target[1] if target[0] == "class" else attribution.FilterTarget(*target[1:])


def attribution_map(selection: "Selection", input_key: str, x: np.ndarray, black: np.ndarray, target: tuple,
                    method: str, options: tuple, on_cancel=None) -> np.ndarray:
    """One method's map, once per (model, exact input and baseline, target, method, options) for every session.

    `input_key` hashes the model's input and `black` (the black image after preprocessing: the baseline of
    Integrated Gradients and the fill of Score-CAM and occlusion), so image, preprocessing and fit are all
    in the key. A batched method runs as a job (a bar, Cancel, one job per model); a one-pass method is a
    quick call that never waits for another user's job.
    """
    loaded = selection.model
    resolved = target_of(target)

    def compute():
        if method in attribution.BATCHED:
            with jobs.model_job(selection, method, on_cancel=on_cancel) as progress:
                return (attribution.map_of(compute_for(selection, method), x, black, method, resolved, progress,
                                           **dict(options)),)
        with loaded.lock, device.scope(selection.device):
            return (attribution.map_of(compute_for(selection, method), x, black, method, resolved, **dict(options)),)

    key = ("attribution", loaded.fingerprint, input_key, target, method, options, selection.precision)
    return jobs.shared_result(key, compute)[0]


TRUST_PASSES = 2 * 21
"""Image passes of one map's deletion and insertion curves (20 steps each, and the intact image)."""


RANDOM_TRUST_PASSES = 2 * 21 * attribution.RANDOM_ORDERS
"""Image passes of the random orders' curves: the chance level every map of an image and target is held to."""


def trust_key(selection: "Selection", input_key: str, target: tuple, maps: dict) -> tuple:
    return ("trust", selection.model.fingerprint, input_key, target, tuple((m, o) for m, (_, o) in maps.items()),
            selection.precision)


def trust_curves(selection: "Selection", input_key: str, x: np.ndarray, black: np.ndarray, target: tuple,
                 maps: dict[str, tuple[np.ndarray, tuple]]) -> dict:
    """Deletion and insertion curves (audit.attribution) of every map {method: (values, options)} and of the
    random orders ("random orders"), once per (model, input, target, maps) for every session; a job with a bar."""
    resolved = target_of(target)

    def compute():
        with jobs.model_job(selection, "Deletion and insertion curves", "trust") as progress:
            found = {"random orders": attribution.random_curves(selection.compute_model, x, resolved, fill=black,
                                                                output=selection.output)}
            progress(1, len(maps) + 1)
            for done, (method, (values, _)) in enumerate(maps.items()):
                found[method] = {kind: curve(selection.compute_model, x, values, resolved, fill=black, output=selection.output)
                                 for kind, curve in (("deletion", attribution.deletion_curve),
                                                     ("insertion", attribution.insertion_curve))}
                progress(done + 2, len(maps) + 1)
        return found

    return jobs.shared_result(trust_key(selection, input_key, target, maps), compute)
