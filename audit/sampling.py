"""Statistics of a big set on a growing seeded sample, and whether its dead counts have settled.

A folder of 50,000 images does not need 50,000 images to show its dead filters. The sample doubles
from a size the user sets; each step computes only the images it adds (the sample of 2n holds the
sample of n) and merges their sums, so growing to n images costs one pass over n images. The counts
have settled when every layer's dead and near-dead counts stay the same over the last doublings.
"""

from __future__ import annotations

from typing import Callable, Iterator

import pandas as pd

from audit import activations, datasets
from audit.errors import AuditError


def sizes(start: int, largest: int) -> list[int]:
    """start, 2 start, 4 start ... and `largest` last."""
    if start < 1 or largest < start:
        raise AuditError(f"A sample grows from at least 1 image up to at least its start (asked {start} to {largest}).")
    steps = [start]
    while steps[-1] * 2 < largest:
        steps.append(steps[-1] * 2)
    return steps + ([largest] if steps[-1] != largest else [])


def growing(model, layers: list[str], image_set: datasets.FileSet, model_in: datasets.Input, start: int,
            largest: int, seed: int = 0, threshold: float = 0.0,
            progress: Callable[[int, int], None] | None = None, at: str = "used") -> Iterator[tuple[int, pd.DataFrame]]:
    """(images so far, filter_stats table) after each doubling of the seeded sample."""
    steps, sums, before = sizes(start, min(largest, len(image_set))), None, 0
    for size in steps:
        added = image_set.sample(size, seed, skip=before)
        part = activations.filter_sums(
            model, layers, datasets.batches(added, model_in), threshold, total=len(added),
            progress=None if progress is None else lambda done, _, before=before: progress(before + done, steps[-1]),
            at=at)
        sums = part if sums is None else {layer: sums[layer].merge(part[layer]) for layer in sums}
        before = size
        yield next(iter(sums.values())).images, activations.stats_frame(sums, threshold)


def history_row(images: int, stats: pd.DataFrame, near_dead_apoz: float = 0.99) -> pd.DataFrame:
    """One sample size's dead and near-dead counts per layer, for the growth chart."""
    return activations.dead_counts(stats, near_dead_apoz).assign(images=images)


def settled(history: pd.DataFrame, doublings: int = 2) -> bool:
    """Every layer's dead and near-dead counts equal over the last `doublings` + 1 sample sizes."""
    sizes_seen = sorted(history.images.unique())
    if len(sizes_seen) < doublings + 1:
        return False
    last = history[history.images.isin(sizes_seen[-(doublings + 1):])]
    return bool((last.groupby("layer")[["dead", "near_dead"]].nunique() == 1).all().all())


def moving_layers(history: pd.DataFrame) -> list[str]:
    """The layers whose dead or near-dead count changed between the last two sample sizes, in network order."""
    sizes_seen = sorted(history.images.unique())
    if len(sizes_seen) < 2:
        return []
    last = history[history.images.isin(sizes_seen[-2:])]
    changed = last.groupby("layer", sort=False)[["dead", "near_dead"]].nunique().gt(1).any(axis=1)
    return list(changed[changed].index)
