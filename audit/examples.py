"""Dataset examples: the images of the user's set that drive a filter most, each cut at the filter's receptive
field around its peak (Zeiler & Fergus 2014; Olah et al. 2017 show them beside the synthetic images).

For each image and filter, the peak over positions (ties: the first position in row-major order); per filter
the k largest peaks over the set (ties: the lower image index). Batches are reduced on the device to one
value and one position per (image, filter), and only k rows per filter are ever kept: a streamed set or the
shards of a Ray run merge their top-k (`merge_top`) into the same answer as one pass. Each filter is measured
where its channel is used (after its BatchNorm and activation, audit.usage.where_used), as the statistics
are: a BatchNorm with a negative scale turns the raw output's peak into its trough.
"""

from __future__ import annotations

from typing import Callable

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from audit import compiled, cost, datasets, models, usage
from audit.errors import AuditError
from audit.receptive import receptive_field

COLUMNS = ["filter", "rank", "image", "row", "col", "activation"]


def _peaks_fn(model: keras.Model, point: str):
    """A compiled function, kept with the model: a batch in; per image and filter the peak value and its
    flattened position out (argmax takes the first of equal values: row-major order)."""

    def build():
        cut = models.submodel(model, point)
        signature = [tf.TensorSpec([None, *cut.inputs[0].shape[1:]], tf.float32)]

        @tf.function(input_signature=signature)
        def peaks(x):
            maps = tf.cast(cut(x, training=False), tf.float32)
            flat = tf.reshape(maps, [tf.shape(maps)[0], -1, tf.shape(maps)[-1]])  # (n, positions, filters)
            return tf.reduce_max(flat, axis=1), tf.argmax(flat, axis=1, output_type=tf.int32)

        return cut, peaks

    return compiled.kept(model, ("peaks", point), build)


def merge_top(frames: list[pd.DataFrame], k: int) -> pd.DataFrame:
    """The k rows per filter with the largest activation over several partial results (batches, shards),
    ties to the lower image index; ranked 0..k-1."""
    rows = pd.concat([frame for frame in frames if len(frame)], ignore_index=True) if frames else None
    if rows is None or rows.empty:
        return pd.DataFrame(columns=COLUMNS)
    rows = rows.sort_values(["filter", "activation", "image"], ascending=[True, False, True], kind="stable")
    top = rows.groupby("filter", sort=True).head(k).copy()
    top["rank"] = top.groupby("filter").cumcount()
    return top[COLUMNS].reset_index(drop=True)


def top_examples(model: keras.Model, layer: str, images, filters: list[int] | None = None, k: int = 8,
                 batch_size: int = 32, at: str = "used", progress: Callable[[int, int], None] | None = None,
                 total: int | None = None, first_image: int = 0) -> pd.DataFrame:
    """Per filter of `layer`, the k images of the set where its peak activation is highest: a DataFrame with
    filter, rank, image (index in the set's order), row, col (the peak's position in the map) and activation.

    `images`: preprocessed (N, H, W, C), or the (x, labels) batches of a streamed set (audit.datasets; `total`
    its size for the progress; `first_image`: the index of its first image, for a shard of a bigger set), or
    (x, labels, positions) batches (datasets.batches(positions=True)), whose positions (plus `first_image`)
    name the images even when unreadable files were dropped.
    `filters`: all when None. `at`: "used" (where the filter's channel is read,
    as the statistics measure it) or "output" (the layer's own output).
    """
    if k < 1:
        raise AuditError(f"k must be at least 1, not {k}.")
    if at not in ("used", "output"):
        raise AuditError(f"Examples are measured where the filter is used or at its output, not {at!r}.")
    path = models.resolve_layer(model, layer)
    point = usage.where_used(model, path) if at == "used" else path
    cut, peaks = _peaks_fn(model, point)
    height, width, channels = (int(n) for n in cut.outputs[0].shape[1:])
    chosen = np.arange(channels) if filters is None else np.asarray(list(filters), int)
    if chosen.size and (chosen.min() < 0 or chosen.max() >= channels):
        raise AuditError(f"{path} has filters 0 to {channels - 1}; asked for {sorted(set(chosen.tolist()))}.")
    if isinstance(images, np.ndarray):
        batch_size = cost.batch_within(model, batch_size, kept_per_image=4 * height * width * channels)
        images, total = datasets.in_memory(images, None, batch_size), len(images)
    kept, seen = [], first_image
    for batch in images:
        values, positions = (t.numpy() for t in peaks(tf.convert_to_tensor(batch[0], tf.float32)))
        count = len(values)
        named = (first_image + np.asarray(batch[2], np.int64) if len(batch) > 2
                 else np.arange(seen, seen + count))
        part = pd.DataFrame({
            "filter": np.tile(chosen, count), "rank": 0, "image": np.repeat(named, len(chosen)),
            "row": (positions[:, chosen] // width).ravel(), "col": (positions[:, chosen] % width).ravel(),
            "activation": values[:, chosen].astype(np.float64).ravel()})
        kept = [merge_top(kept + [part], k)]  # never more than k rows per filter in memory
        seen += count
        if progress is not None:
            progress(seen - first_image, total or seen - first_image)
    found = merge_top(kept, k)
    found.attrs["measured_at"] = point
    return found


CONTEXT_SIDE = 24
"""A receptive field smaller than this is shown inside a window of this side with the field framed: a first
layer's 3x3 field alone is a colour swatch that says nothing of where in the image it sits."""

FRAME = (255, 220, 0)
"""The frame's colour (yellow): drawn on the pixels just outside the field, so none of the field is hidden."""


def patches(model: keras.Model, examples: pd.DataFrame, pixels: list[np.ndarray] | np.ndarray,
            layer: str | None = None, context: int = 0) -> list[np.ndarray]:
    """Each example's patch of its image (as fitted to the model's input): the receptive field of its peak.
    With `context` (CONTEXT_SIDE on the pages), a field smaller than that is shown in a window of that side
    around it, framed (uint8 RGB)."""
    point = layer or examples.attrs.get("measured_at")
    if point is None:
        raise AuditError("Name the layer whose receptive fields cut the patches.")
    cut = []
    for row in examples.itertuples():
        box = receptive_field(model, point, int(row.row), int(row.col))
        image = np.asarray(pixels[int(row.image)])
        top, left, bottom, right = box
        small = max(bottom - top, right - left) < context <= min(image.shape[:2])
        cut.append(framed(image, box, context) if small else image[top:bottom, left:right])
    return cut


def framed(image: np.ndarray, box: tuple[int, int, int, int], side: int) -> np.ndarray:
    """A `side` x `side` window of a uint8 image around the box (moved inside the image at its borders), as RGB,
    with FRAME on the pixels just outside the box."""
    top, left, bottom, right = box
    height, width = image.shape[:2]
    window_top = int(np.clip((top + bottom - side) // 2, 0, height - side))
    window_left = int(np.clip((left + right - side) // 2, 0, width - side))
    window = np.atleast_3d(np.asarray(image, np.uint8)[window_top:window_top + side, window_left:window_left + side])
    window = np.repeat(window, 3, axis=2) if window.shape[-1] == 1 else window[..., :3].copy()
    rows = np.arange(side)[:, None] + window_top
    cols = np.arange(side)[None, :] + window_left
    around = (rows >= top - 1) & (rows <= bottom) & (cols >= left - 1) & (cols <= right)
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    window[around & ~inside] = FRAME
    return window
