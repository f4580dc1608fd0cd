"""Class activation maps: Grad-CAM (Selvaraju et al. 2017), Grad-CAM++ (Chattopadhay et al. 2018), Layer-CAM
(Jiang et al. 2021) and Guided Grad-CAM; the maths in small functions over arrays, the passes shared."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib

import keras
import numpy as np

from audit import models
from audit.attribution.gradients import guided_backprop
from audit.attribution.targets import Scorer, Target, normalise, resize, resolve_target
from audit.errors import AuditError

def grad_cam_weights(gradients: np.ndarray) -> np.ndarray:
    """Grad-CAM: each channel's weight is its gradient averaged over space. (h, w, K) -> (K,)"""
    return gradients.mean(axis=(0, 1))


def grad_cam_plus_plus_weights(maps: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Grad-CAM++ weights with the exponential-score closed form of the paper (its eq. 19)."""
    g2, g3 = gradients ** 2, gradients ** 3
    denominator = 2 * g2 + maps.sum(axis=(0, 1), keepdims=True) * g3
    alpha = np.where(denominator != 0, g2 / np.where(denominator != 0, denominator, 1), 0)
    return (alpha * np.maximum(gradients, 0)).sum(axis=(0, 1))


def weighted_maps(maps: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ReLU of the weighted sum of the channels. (h, w, K), (K,) -> (h, w)"""
    return np.maximum((maps * weights).sum(axis=-1), 0)


def layer_cam_map(maps: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Layer-CAM: positive gradients weight each position of each channel."""
    return np.maximum((np.maximum(gradients, 0) * maps).sum(axis=-1), 0)


_SHARED_PASSES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("shared_passes", default=None)


@contextlib.contextmanager
def shared_passes():
    """Within this block, CAM methods on the same model, image, target and layer share one pass.

    Grad-CAM, Grad-CAM++, Layer-CAM and Guided Grad-CAM all read the layer's maps and the score's
    gradient with respect to them (Chattopadhyay et al. 2018 derive Grad-CAM++'s weights from the
    first-order gradients), so a second method costs no model run. Scoped, not global: inside the
    block the weights must not change (outside it nothing is kept, so a changed model is never stale).
    """
    token = _SHARED_PASSES.set({})
    try:
        yield
    finally:
        _SHARED_PASSES.reset(token)


def _maps_and_gradients(model, image, target, layer, output=None):
    """The layer's maps and the gradient of the target's score with respect to them, from one pass
    (or from the one already made inside `shared_passes`)."""
    target = resolve_target(model, image, target, output)
    layer = models.resolve_layer(model, layer or models.cam_layer(model))
    kept = _SHARED_PASSES.get()
    if kept is None:
        return _one_pass(model, image, target, layer, output)
    key = (id(model), hashlib.sha1(np.ascontiguousarray(image, np.float32).tobytes()).hexdigest(), image.shape,
           repr(target), layer, output)
    if key not in kept:
        kept[key] = (model, _one_pass(model, image, target, layer, output))  # the model held: its id stays its own
    return kept[key][1]


def _one_pass(model, image, target, layer, output):
    (maps,), (gradients,), _ = Scorer(model, target, output, points=(layer,)).point_gradients(image[None])
    if np.isnan(gradients).all():
        raise AuditError(f"The target's score does not depend on layer {layer!r}: choose a layer before it.")
    return maps[0], gradients[0]


def _cam(model, image, target, layer, combine, upsample: bool, output=None):
    image = np.asarray(image, np.float32)
    maps, gradients = _maps_and_gradients(model, image, target, layer, output)
    if maps.ndim != 3:
        raise AuditError(f"Layer {layer!r} gives no spatial map (shape {maps.shape}); choose a conv layer.")
    cam = combine(maps, gradients)
    return normalise(resize(cam, image.shape[:2])) if upsample else cam


def grad_cam(model: keras.Model, image: np.ndarray, target: Target = None, layer: str | None = None,
             upsample: bool = True, output: int | None = None) -> np.ndarray:
    """Grad-CAM on a conv layer (default: the last one); `upsample=False` gives the raw layer-size map."""
    return _cam(model, image, target, layer, lambda a, g: weighted_maps(a, grad_cam_weights(g)), upsample, output)


def grad_cam_plus_plus(model: keras.Model, image: np.ndarray, target: Target = None, layer: str | None = None,
                       upsample: bool = True, output: int | None = None) -> np.ndarray:
    return _cam(model, image, target, layer, lambda a, g: weighted_maps(a, grad_cam_plus_plus_weights(a, g)),
                upsample, output)


def layer_cam(model: keras.Model, image: np.ndarray, target: Target = None, layer: str | None = None,
              upsample: bool = True, output: int | None = None) -> np.ndarray:
    return _cam(model, image, target, layer, layer_cam_map, upsample, output)


def guided_grad_cam(model: keras.Model, image: np.ndarray, target: Target = None, layer: str | None = None,
                    output: int | None = None) -> np.ndarray:
    """Guided Grad-CAM: the guided map times the upsampled Grad-CAM (Selvaraju et al. 2017)."""
    image = np.asarray(image, np.float32)
    resolved = resolve_target(model, image, target, output)
    return normalise(guided_backprop(model, image, resolved, output) * grad_cam(model, image, resolved, layer,
                                                                                output=output))
