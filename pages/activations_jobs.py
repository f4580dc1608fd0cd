"""The Activations page's work: statistics over the image set and over a growing sample of a server folder,
and finished command-line runs."""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from audit import activations, datasets, runs, sampling
from pages import jobs
from pages.selection import Selection, set_key
from pages.common import input_chunk, note_dead


def stats_key(selection: "Selection", layers: tuple[str, ...], threshold: float, at: str = "used") -> tuple:
    return set_key(selection, "filter_stats", layers, float(threshold), at)


def filter_stats(selection: "Selection", layers: tuple[str, ...], threshold: float, at: str = "used"):
    """Per-filter statistics over the image set, once per (model, layers, images, threshold, preprocessing,
    where measured)."""
    loaded = selection.model
    key = stats_key(selection, layers, threshold, at)

    def compute():
        pixels = [item.pixels for item in selection.image_set]
        chunk = input_chunk(selection, 256)  # preprocess a chunk at a time and merge the sums: memory stays flat
        sums = None
        with jobs.model_job(selection, "Statistics over the image set", "stats") as progress:
            for start in range(0, len(pixels), chunk):
                x = loaded.preprocess(pixels[start:start + chunk], selection.preprocessing, selection.fit)
                part = activations.filter_sums(
                    selection.compute_model, list(layers), x, threshold,
                    progress=lambda done, _, start=start: progress(start + done, len(pixels)), at=at)
                sums = part if sums is None else {k: sums[k].merge(part[k]) for k in sums}
        return activations.stats_frame(sums, threshold)

    stats = jobs.shared_result(key, compute)
    note_dead(selection, stats)
    return stats


def growing_key(selection: "Selection", layers: tuple[str, ...], threshold: float, start: int, largest: int,
                at: str = "used") -> tuple:
    return (selection.model.fingerprint, selection.stream.key(), selection.preprocessing, selection.fit,
            "growing", layers, float(threshold), int(start), int(largest), at, selection.precision)


def growing_stats(selection: "Selection", layers: tuple[str, ...], threshold: float, start: int,
                  largest: int, at: str = "used") -> pd.DataFrame:
    """Statistics of the server folder on a seeded sample doubling from `start` to `largest` images: every
    size's filter_stats rows with an `images` column (see audit.sampling); once per key, shared."""
    loaded, stream = selection.model, selection.stream

    def compute():
        model_in = datasets.model_input(loaded, selection.preprocessing, selection.fit)
        steps = []
        with jobs.model_job(selection, "Statistics on a growing sample", "grow") as progress:
            began = time.perf_counter()

            def update(done, total):
                rate = done / max(time.perf_counter() - began, 1e-9)
                progress(done, total, f"{done:,} / {total:,} images, {rate:.0f} images/s")

            for count, stats in sampling.growing(selection.compute_model, list(layers), stream, model_in, start, largest,
                                                 threshold=threshold, progress=update, at=at):
                steps.append(stats.assign(images=count))
        return pd.concat(steps, ignore_index=True)

    return jobs.shared_result(growing_key(selection, layers, threshold, start, largest, at), compute)


@st.cache_data(show_spinner=False, max_entries=16)
def finished_run(folder: str, finished: float) -> pd.DataFrame:
    """A finished command-line run's table (audit.runs), read once per file version."""
    return runs.read_result(folder)
