"""Perturbation methods: Score-CAM (Wang et al. 2020, with Faster Score-CAM's channel cap) and occlusion
(Zeiler & Fergus 2014): the target's score on masked or covered copies of the image."""

from __future__ import annotations

import keras
import numpy as np

from audit import cost, models
from audit.attribution.cams import weighted_maps
from audit.attribution.targets import Progress, Scorer, Target, normalise, report_progress, resize, resolve_target

def score_cam(model: keras.Model, image: np.ndarray, target: Target = None, layer: str | None = None,
              max_channels: int = 32, batch_size: int = 32, fill: np.ndarray | None = None,
              output: int | None = None, progress: Progress | None = None) -> np.ndarray:
    """Score-CAM (Wang et al. 2020): each channel, upsampled and scaled to [0, 1], masks the image; the
    target's score on the masked image weighs the channel (softmax over channels). Only the `max_channels`
    channels of largest spatial variance are used (Faster Score-CAM: a flat channel masks nothing)."""
    image = np.asarray(image, np.float32)
    resolved = resolve_target(model, image, target, output)
    layer = models.resolve_layer(model, layer or models.cam_layer(model))
    scorer = Scorer(model, resolved, output, points=(layer,))
    maps = scorer.outputs(image[None])[0][0]
    keep = score_cam_channels(maps, max_channels)
    fill = np.zeros_like(image) if fill is None else np.broadcast_to(fill, image.shape)
    masks = np.stack([_scaled01(resize(maps[:, :, k], image.shape[:2])) for k in keep])
    scores = []
    batch_size = cost.batch_within(model, batch_size)
    for start in range(0, len(keep), batch_size):
        m = masks[start:start + batch_size, :, :, None]
        scores.append(scorer(image[None] * m + fill[None] * (1 - m)))
        report_progress(progress, start + len(m), len(keep))
    scores = np.concatenate(scores)
    weights = np.exp(scores - scores.max())
    weights /= weights.sum()
    return normalise(resize(weighted_maps(maps[:, :, keep], weights), image.shape[:2]))


def score_cam_channels(maps: np.ndarray, cap: int) -> np.ndarray:
    """The `cap` channels of (h, w, K) maps with the largest spatial variance, largest first."""
    return np.argsort(maps.var(axis=(0, 1)), kind="stable")[::-1][:cap]


def _scaled01(values: np.ndarray) -> np.ndarray:
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def patch_starts(size: int, patch: int, stride: int) -> list[int]:
    """Where patches start along one side: every `stride` pixels, plus one flush with the far edge when
    the stride does not land there, so every pixel is covered (64 px, patch 10, stride 4: ..., 52, 54)."""
    last = max(size - patch, 0)
    starts = list(range(0, last + 1, stride))
    return starts if starts[-1] == last else starts + [last]


def occlusion_defaults(size: int) -> tuple[int, int]:
    """The default patch and stride for a side of `size` pixels: an eighth and a sixteenth of it."""
    return max(2, size // 8), max(1, size // 16)


def occlusion(model: keras.Model, image: np.ndarray, target: Target = None, patch: int | None = None,
              stride: int | None = None, fill: np.ndarray | float = 0.0, batch_size: int = 64,
              output: int | None = None, progress: Progress | None = None) -> np.ndarray:
    """How much the score drops when a patch is covered, averaged over the patches covering each pixel.

    `fill`: a value, one per channel, or a whole image of the input's shape (e.g. the preprocessed black
    image) whose pixels under the patch replace the covered ones. Patch and stride default to
    occlusion_defaults of the image's shorter side.
    """
    image = np.asarray(image, np.float32)
    default_patch, default_stride = occlusion_defaults(min(image.shape[:2]))
    patch, stride = patch or default_patch, stride or default_stride
    fill = np.broadcast_to(np.asarray(fill, np.float32), image.shape)
    scorer = Scorer(model, resolve_target(model, image, target, output), output)
    height, width = image.shape[:2]
    base = float(scorer(image[None])[0])
    corners = [(y, x) for y in patch_starts(height, patch, stride) for x in patch_starts(width, patch, stride)]
    drops, counts = np.zeros((height, width)), np.zeros((height, width))
    batch_size = cost.batch_within(model, batch_size)
    for start in range(0, len(corners), batch_size):
        chunk = corners[start:start + batch_size]
        batch = np.repeat(image[None], len(chunk), axis=0)
        for i, (y, x) in enumerate(chunk):
            batch[i, y:y + patch, x:x + patch] = fill[y:y + patch, x:x + patch]
        scores = scorer(batch)
        for (y, x), score in zip(chunk, scores):
            drops[y:y + patch, x:x + patch] += base - score
            counts[y:y + patch, x:x + patch] += 1
        report_progress(progress, start + len(chunk), len(corners))
    return normalise(np.where(counts > 0, drops / np.maximum(counts, 1), 0))
