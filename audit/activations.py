"""Activations: the maps of one layer for one image, and per-filter statistics over an image set.

Statistics are kept as mergeable partial sums (count, sum, sum of squares, max, zero count, images
that fire) reduced on the device inside one compiled function per batch: only a few vectors per
layer leave the device, image sets of any size stream through in constant memory, and shards
computed apart merge exactly (Hu et al. 2016, "Network Trimming", for APoZ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from audit import compiled, cost, datasets, models, passes, usage
from audit.errors import AuditError, NotAnImageModelError


def layer_maps(model: keras.Model, layer: str, x: np.ndarray, pre_activation: bool = False) -> np.ndarray:
    """Activation maps (H, W, C) of one layer for one preprocessed image (1, H, W, C) or (H, W, C)."""
    x = np.asarray(x, np.float32)
    x = x[None] if x.ndim == 3 else x
    cut = models.submodel(model, layer, pre_activation=pre_activation)
    maps = np.asarray(cut(x, training=False))[0]
    if maps.ndim != 3:
        raise NotAnImageModelError(
            f"Layer {layer!r} gives an output of shape {maps.shape}, not maps (height, width, channels).")
    return maps


def normalise(maps: np.ndarray) -> np.ndarray:
    """Each channel scaled to [0, 1] on its own, like MATLAB's mat2gray (flat channels become 0)."""
    low = maps.min(axis=(0, 1), keepdims=True)
    span = maps.max(axis=(0, 1), keepdims=True) - low
    return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1), 0.0).astype(np.float32)


def grid_shape(count: int) -> tuple[int, int]:
    """Rows and columns for a montage: exact and near-square when possible (96 -> 8 x 12)."""
    rows = int(math.isqrt(count))
    while rows > 1 and count % rows:
        rows -= 1
    if count // rows > 3 * rows:  # no good divisor (a prime count): a square-ish grid with blanks
        rows = int(math.isqrt(count))
        return rows, math.ceil(count / rows)
    return rows, count // rows


def montage(maps: np.ndarray, gap: int = 1) -> np.ndarray:
    """All channels of (H, W, C) maps, each normalised, tiled into one (rows*H, cols*W) float image."""
    height, width, count = maps.shape
    rows, cols = grid_shape(count)
    tiles = normalise(maps)
    canvas = np.ones((rows * (height + gap) - gap, cols * (width + gap) - gap), np.float32)
    for index in range(count):
        r, c = divmod(index, cols)
        canvas[r * (height + gap):r * (height + gap) + height, c * (width + gap):c * (width + gap) + width] = \
            tiles[:, :, index]
    return canvas


def strongest_channel(maps: np.ndarray) -> int:
    """The channel with the largest activation anywhere in the map."""
    return int(np.argmax(maps.max(axis=(0, 1))))


def upsample(channel: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One (h, w) map resized bilinearly to (H, W), for an overlay on the image."""
    return tf.image.resize(channel[None, :, :, None], size, method="bilinear").numpy()[0, :, :, 0]


# --- statistics over an image set ------------------------------------------------------------

MEASURE_AT = {"used": "where each filter's channel is used (after its BatchNorm and activation)",
              "output": "each layer's own output (a conv's raw output)"}
"""Where filter statistics are taken (usage.where_used): the decision lives where the channel is used."""


@dataclass(frozen=True)
class Measure:
    """Where one layer's filters are measured, and whether the zero-counting figures mean anything there."""

    layer: str  # the layer asked for (its path)
    measured_at: str  # the layer whose output is measured
    floored: bool  # that output comes out of a ReLU-family activation: APoZ, fires and dead are defined


def measures(model: keras.Model, layers: list[str], at: str = "used") -> list[Measure]:
    """Where each layer is measured: `at="used"` follows a filter's chain (usage.where_used), `"output"` takes
    the layer's own output."""
    if at not in MEASURE_AT:
        raise AuditError(f"Statistics are measured at {' or '.join(MEASURE_AT)}, not {at!r}.")
    found = []
    for layer in layers:
        path = models.resolve_layer(model, layer)
        point = usage.where_used(model, path) if at == "used" else path
        found.append(Measure(path, point, usage.zero_floored(model, point)))
    return found


SUMS_FORMAT = 2
"""The version of the partial sums' fields: part of a run's folder name, so shards of another version are never
merged with these (2: the per-image squares behind the standard errors)."""
ARRAYS = ("count", "images", "total", "squares", "maximum", "quiet", "firing", "quiet_share_squares",
          "image_mean_total", "image_mean_squares")
"""The FilterSums fields that are sums over images (what a shard file and a compiled pass carry)."""


@dataclass
class FilterSums:
    """Per-filter partial sums of one layer; `merge` of two shards equals one pass over both."""

    count: float  # activation values per filter seen (images x positions)
    images: int
    total: np.ndarray  # sum
    squares: np.ndarray  # sum of squares
    maximum: np.ndarray
    quiet: np.ndarray  # values <= the threshold (the APoZ numerator; at threshold 0, the zeros of a ReLU)
    firing: np.ndarray  # images in which the filter exceeds the threshold somewhere
    quiet_share_squares: np.ndarray  # per image, the share of values <= the threshold, squared: APoZ's spread
    image_mean_total: np.ndarray  # per image, the mean value, summed in float64 (the spread subtracts its square)
    image_mean_squares: np.ndarray  # per image, the mean value, squared: the mean's spread over images
    measured_at: str = ""  # the layer whose output was summed ("" for the layer itself)
    floored: bool = True  # that output has a zero floor (see Measure)

    @classmethod
    def empty(cls, channels: int, measured_at: str = "", floored: bool = True) -> "FilterSums":
        return cls(0.0, 0, np.zeros(channels), np.zeros(channels), np.full(channels, -np.inf),
                   np.zeros(channels), np.zeros(channels), np.zeros(channels), np.zeros(channels),
                   np.zeros(channels), measured_at, floored)

    def parts(self) -> tuple:
        return tuple(getattr(self, name) for name in ARRAYS)

    def merge(self, other: "FilterSums") -> "FilterSums":
        return FilterSums(self.count + other.count, self.images + other.images, self.total + other.total,
                          self.squares + other.squares, np.maximum(self.maximum, other.maximum),
                          self.quiet + other.quiet, self.firing + other.firing,
                          self.quiet_share_squares + other.quiet_share_squares,
                          self.image_mean_total + other.image_mean_total,
                          self.image_mean_squares + other.image_mean_squares, self.measured_at or other.measured_at, self.floored and other.floored)

    def frame(self, layer: str, threshold: float = 0.0) -> pd.DataFrame:
        """One row per filter. Without a zero floor (an ELU, a linear projection, a BN before a residual Add)
        a value at or below 0 is not "off": APoZ and fires are NaN and no filter is dead. `apoz_se` and
        `mean_se` are the standard errors of APoZ and of the mean over the images (each image one draw)."""
        mean = self.total / self.count
        variance = np.maximum(self.squares / self.count - mean ** 2, 0.0)
        undefined = np.full(len(self.total), np.nan)
        apoz = self.quiet / self.count

        def standard_error(squares: np.ndarray, average: np.ndarray) -> np.ndarray:
            images = max(self.images, 1)
            return np.sqrt(np.maximum(squares / images - average ** 2, 0.0) / images)

        return pd.DataFrame({
            "layer": layer,
            "filter": np.arange(len(self.total)),
            "mean": mean,
            "std": np.sqrt(variance),
            "max": self.maximum,
            "apoz": apoz if self.floored else undefined,
            "fires": self.firing / self.images if self.floored else undefined,
            "dead": (self.maximum <= threshold) if self.floored else np.zeros(len(self.total), bool),
            "measured_at": self.measured_at or layer,
            "apoz_se": standard_error(self.quiet_share_squares, apoz) if self.floored else undefined,
            "mean_se": standard_error(self.image_mean_squares, self.image_mean_total / max(self.images, 1)),
        })


def batch_sums(a, threshold: float = 0.0) -> FilterSums:
    """The partial sums of one batch of one layer's output (N, ..., C); traceable inside tf.function."""
    a = tf.cast(a, tf.float32)
    axes = list(range(a.shape.rank - 1))
    per_image = tf.reduce_max(a, axis=axes[1:]) if len(axes) > 1 else a  # (N, C)
    positions = int(np.prod(a.shape[1:-1])) if a.shape.rank > 2 else 1
    quiet = tf.cast(a <= threshold, tf.float32)
    quiet_share = tf.reduce_mean(quiet, axis=axes[1:]) if len(axes) > 1 else quiet  # (N, C)
    image_mean = tf.reduce_mean(a, axis=axes[1:]) if len(axes) > 1 else a
    return FilterSums(tf.cast(tf.shape(a)[0] * positions, tf.float64), tf.shape(a)[0],
                      tf.reduce_sum(a, axes), tf.reduce_sum(tf.square(a), axes),
                      tf.reduce_max(per_image, 0),  # from the per-image maxima: one pass over the maps fewer
                      tf.reduce_sum(quiet, axes),
                      tf.reduce_sum(tf.cast(per_image > threshold, tf.float32), 0),
                      # in float64: the standard errors subtract mean² from these (small spreads cancel in float32)
                      tf.reduce_sum(tf.square(tf.cast(quiet_share, tf.float64)), 0),
                      tf.reduce_sum(tf.cast(image_mean, tf.float64), 0),
                      tf.reduce_sum(tf.square(tf.cast(image_mean, tf.float64)), 0))


def to_numpy(parts: tuple, measure: Measure | None = None) -> FilterSums:
    """Partial sums from tensors (FilterSums.parts) to float64 numpy, ready to merge, with where they were
    measured."""
    count, images, *arrays = parts
    where = ("", True) if measure is None else (measure.measured_at, measure.floored)
    return FilterSums(float(count), int(images), *(np.asarray(part, np.float64) for part in arrays), *where)


def _reducer(model: keras.Model, paths: tuple[str, ...], threshold: float):
    """One compiled function, kept with the model (audit.compiled): a batch in (labels unused), per-filter sums
    of every layer out. Traced once; every later set and shard of a run reuses it."""

    def build():
        cut = models.submodel(model, list(paths))
        signature = [tf.TensorSpec([None, *cut.inputs[0].shape[1:]], tf.float32), tf.TensorSpec([None], tf.int32)]

        @tf.function(input_signature=signature)
        def reduce(x, labels):
            outputs = cut(x, training=False)
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            return [batch_sums(a, threshold).parts() for a in outputs]  # tensors out

        return cut, reduce

    return compiled.kept(model, ("sums", paths, threshold), build)


def filter_sums(model: keras.Model, layers: list[str], images, threshold: float = 0.0,
                batch_size: int = 32, progress: Callable[[int, int], None] | None = None,
                total: int | None = None, strategy=None, at: str = "used") -> dict[str, FilterSums]:
    """Partial sums per layer in one pass per batch, over preprocessed images (N, H, W, C) or the
    (x, labels) batches of a streamed set (audit.datasets.batches; give `total` for its progress).
    Each layer's filters are measured where `at` says (see measures). On several local GPUs each batch is
    split over them (audit.passes)."""
    chosen = measures(model, layers, at)
    points = tuple(dict.fromkeys(measure.measured_at for measure in chosen))
    cut, reduce = _reducer(model, points, float(threshold))
    channels = {point: int(out.shape[-1]) for point, out in zip(points, cut.outputs)}
    sums = {m.layer: FilterSums.empty(channels[m.measured_at], m.measured_at, m.floored) for m in chosen}
    if isinstance(images, np.ndarray):
        kept = sum(4 * int(np.prod(out.shape[1:])) for out in cut.outputs)  # the measured maps of each image
        batch_size = cost.batch_within(model, batch_size, kept_per_image=kept)
        images, total = datasets.in_memory(images, None, batch_size), len(images)
    strategy = strategy if strategy is not None else passes.local_replicas()
    for replicas in passes.run(reduce, images, strategy, progress, total):
        for parts in replicas:
            by_point = dict(zip(points, parts))
            for measure in chosen:
                sums[measure.layer] = sums[measure.layer].merge(to_numpy(by_point[measure.measured_at], measure))
    return sums


def filter_stats(model: keras.Model, layers: list[str], images, threshold: float = 0.0,
                 batch_size: int = 32, progress: Callable[[int, int], None] | None = None,
                 total: int | None = None, at: str = "used") -> pd.DataFrame:
    """Per-filter mean, std, max, APoZ, share of images that fire, dead flag, and the layer measured, one row
    per filter (images and `at`: as for filter_sums)."""
    sums = filter_sums(model, layers, images, threshold, batch_size, progress, total, at=at)
    return stats_frame(sums, threshold)


def stats_frame(sums: dict[str, FilterSums], threshold: float = 0.0) -> pd.DataFrame:
    """The statistics DataFrame from (possibly merged) partial sums."""
    return pd.concat([part.frame(layer, threshold) for layer, part in sums.items()], ignore_index=True)


def dead_counts(stats: pd.DataFrame, near_dead_apoz: float = 0.99) -> pd.DataFrame:
    """Per layer: dead filters (never above the threshold), near-dead (APoZ above a bound), filters measured
    where there is no zero floor (neither dead nor alive can be said: `no_zero_floor`), alive, total."""
    flagged = stats.assign(near_dead=(stats.apoz > near_dead_apoz) & ~stats.dead, no_zero_floor=stats.apoz.isna())
    counts = flagged.groupby("layer", sort=False).agg(
        dead=("dead", "sum"), near_dead=("near_dead", "sum"), no_zero_floor=("no_zero_floor", "sum"),
        total=("filter", "size"))
    counts["alive"] = counts.total - counts.dead - counts.near_dead - counts.no_zero_floor
    return counts.reset_index()


def unfloored_layers(stats: pd.DataFrame) -> pd.DataFrame:
    """The layers whose measured output has no zero floor (APoZ NaN), with the layer measured: what a page
    lists when it says why their APoZ and dead counts are not given."""
    part = stats[stats.apoz.isna()]
    if "measured_at" not in part:
        part = part.assign(measured_at=part.layer)
    return part.groupby("layer", sort=False)["measured_at"].first().reset_index()
