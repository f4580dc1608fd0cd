"""What a job costs here: the model's timed forward pass (and its first trace), the preparation of the images,
calibrated by how long finished jobs took, stretched by the server's load; said as a person would say it.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict

import numpy as np
import streamlit as st

from audit import device, heads, limits, pruning
from pages.selection import Selection


@st.cache_resource
def _pass_times() -> dict:
    return {}


@st.cache_resource
def _calibration() -> tuple[dict, dict]:
    """Per model, device and precision: the image passes each job's estimate counted (by its link parameter),
    and the ratios of the time jobs took to their estimate (the last 8)."""
    return {}, {}


def _cost_key(selection: Selection) -> tuple:
    return selection.model.fingerprint, selection.device, selection.precision


def _timed(selection: Selection) -> tuple[float, float]:
    """(seconds per image, fixed seconds per call) of the model's compiled forward pass here, timed once per
    model and device on 2 and 8 images (the median of 3 calls each, after a warm one): on a deep network a
    call on a few images costs more than its images (ResNet152 at 64 px: 95 ms for two images, 142 ms for
    eight): the per-image figure is the slope, so a sweep's many cuts per call are not charged a call each."""
    loaded = selection.model
    key = (loaded.fingerprint, selection.device)
    times = _pass_times()
    if key not in times:
        outputs = heads.Outputs(loaded.model, selection.output)
        shape = (*loaded.input_size, loaded.model.inputs[0].shape[-1])
        seconds = {}
        with loaded.lock, device.scope(selection.device):
            for count in (2, 8):
                x = np.zeros((count, *shape), np.float32)
                outputs(x)  # warm (the model's trace was timed at load: LoadedModel.trace_seconds)
                calls = []
                for _ in range(3):
                    start = time.perf_counter()
                    outputs(x)
                    calls.append(time.perf_counter() - start)
                seconds[count] = float(np.median(calls))
        per_image = max((seconds[8] - seconds[2]) / 6, seconds[8] / 16)  # timing noise cannot make an image free
        times[key] = per_image, max(seconds[2] - 2 * per_image, 0.0)
    return times[key]


def trace_seconds(selection: Selection) -> float:
    """What tracing a new job's function costs on this model, counted once in its estimate: the forward pass's
    trace at load (LoadedModel.trace_seconds), twice (a job's function holds a forward and often a backward graph:
    on 1,005 tiny layers Saliency's first call took 1.6x the forward trace, Grad-CAM's 1.75x). On 2,883 tiny
    layers the Attribution page said "about 1 s" from the timed pass and took 122 s, all of it tracing."""
    return 2 * getattr(selection.model, "trace_seconds", 0.0)


def idle_pass_seconds(selection: Selection) -> float:
    """Seconds of one image's forward pass on this model here (compiled, in a batch), on an idle server."""
    return _timed(selection)[0]


@st.cache_resource
def _sweep_costs() -> OrderedDict:
    return OrderedDict()


def sweep_cost(selection: Selection) -> pruning.SweepCost:
    """What a what-if sweep's estimate needs on this model and output (audit.pruning.Sweep.estimate: plain
    numbers, no model held), computed once and kept for the last 32."""
    loaded = selection.model
    key = (loaded.fingerprint, selection.output)
    known = _sweep_costs()
    if key not in known:
        known[key] = pruning.Sweep(loaded.model, selection.output, loaded.dependency_graph()).estimate()
        while len(known) > 32:
            known.popitem(last=False)
    return known[key]


def traces_as_passes(selection: Selection, traces: float) -> float:
    """`traces` traces of the model's forward pass, in image passes (what a job that traces graphs of its own
    pays on its first run, beside the one trace every estimate counts)."""
    return traces * getattr(selection.model, "trace_seconds", 0.0) / max(idle_pass_seconds(selection), 1e-9)


def sweep_passes(selection: Selection, layers: list[str], images: int) -> float:
    """The image passes of a what-if sweep with one cut per entry of `layers` (the layer it cuts) on `images`
    images, the unpruned model's pass included: each cut runs only the layers after its checkpoint, many cuts
    per call (audit.pruning.sweeps); the checkpoints' traces counted as the passes they are worth."""
    found = sweep_cost(selection)
    return images + found.passes(layers, images) + traces_as_passes(selection, found.traces(layers))


def within_link_budget(selection: Selection, passes: float, images: int = 0) -> bool:
    """Whether a link may start this work by itself: its passes at the timed forward pass, and the preparation of
    the `images` it reads, under CNN_AUDIT_LINK_JOB_SECONDS. Neither the server's load nor its history changes
    what a link may start."""
    seconds = passes * idle_pass_seconds(selection) + _preparing(selection, images)
    return seconds + trace_seconds(selection) <= limits.LINK_JOB_SECONDS.value


@st.cache_resource
def _preparations() -> dict:
    return {}


def preparation_seconds(selection: Selection) -> float:
    """Seconds to make one image of the set the model's input (resized, preprocessed), timed once per model, fit
    and preprocessing on up to 8 images of the set: 2,048 demo shapes resized to MobileNetV2's 224 px cost half as
    much as their statistics, and a link's estimate without it started 48 s of work under a 20 s budget."""
    key = (selection.model.fingerprint, selection.fit, selection.preprocessing)
    known = _preparations()
    if key not in known:
        pixels = [item.pixels for item in selection.image_set[:8]]
        start = time.perf_counter()
        selection.model.preprocess(pixels, selection.preprocessing, selection.fit)
        known[key] = (time.perf_counter() - start) / max(len(pixels), 1)
    return known[key]


def _preparing(selection: Selection, images: int) -> float:
    return images * preparation_seconds(selection) if images else 0.0


def pass_seconds(selection: Selection) -> float:
    """Seconds one image pass of a job takes on this model here when the server is idle: the timed forward
    pass, corrected by how long this model's finished jobs took against their estimates (decoding,
    preprocessing, several outputs, the bfloat16 copy); a backward pass counts as two."""
    ratios = _calibration()[1].get(_cost_key(selection))
    return idle_pass_seconds(selection) * (float(np.median(ratios)) if ratios else 1.0)


def learn(selection: Selection, param: str | None, seconds: float, busy: float) -> None:
    """Keep how long a finished job took against its estimate (both idle: the busy factor taken out)."""
    expected, ratios = _calibration()
    passes = expected.get((*_cost_key(selection), param)) if param else None
    if passes:
        predicted = passes * idle_pass_seconds(selection) * busy
        kept = ratios.setdefault(_cost_key(selection), [])
        kept.append(min(max(seconds / max(predicted, 1e-9), 0.1), 10.0))
        del kept[:-8]


def record_passes(selection: Selection, param: str, passes: float) -> None:
    """The image passes a job's estimate counted, kept so that its finished time calibrates the next ones."""
    _calibration()[0][(*_cost_key(selection), param)] = passes


def busy_factor() -> float:
    """How much slower a new job runs now than on an idle server, from the kernel's measure of demand: with
    `load` runnable threads (the 1-minute load average) on `cores`, a job wanting every core gets about
    cores / (load + cores) of them: 1 + load / cores. Every job on the machine, of every session and model
    (and any other process), counts; a probe timed in this process would read Python's lock, not the cores."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform: no correction
        return 1.0
    return 1.0 + load / max(os.cpu_count() or 1, 1)


def about(seconds: float) -> str:
    """A duration as a person would say it."""
    if seconds < 90:
        return f"about {max(1, round(seconds))} s"
    if seconds < 5400:
        return f"about {round(seconds / 60)} min"
    return f"about {seconds / 3600:.1f} h"


def time_left(elapsed: float, done: int, remaining: int) -> str:
    """", about 2 min left" from the rate so far, once there is one (a second of work and a step done)."""
    if done <= 0 or remaining <= 0 or elapsed < 1.0:
        return ""
    return f", {about(remaining * elapsed / done)} left"


def estimate(selection: Selection, passes: float, images: int = 0) -> str:
    """What `passes` image passes (and preparing `images` images) cost on this model here now, as a person would
    say it (longer while the server is busy: see busy_note)."""
    seconds = passes * pass_seconds(selection) + _preparing(selection, images) + trace_seconds(selection)
    return about(seconds * busy_factor())


def busy_note() -> str:
    """A sentence when the estimates are stretched by a busy server, else nothing."""
    busy = busy_factor()
    return f" The server is busy: work runs about {busy:.1f}x slower than on an idle one now." if busy >= 1.5 else ""


def images_within(selection: Selection, layers: list[str], available: int, floor: int = 2) -> int:
    """A default image count for a sweep with one cut per entry of `layers` (see sweep_passes): as many as fit the
    link budget (a first answer in seconds), at least `floor`, at most `available`; the user raises it and sees
    the new estimate."""
    fixed = sweep_passes(selection, layers, 0) * idle_pass_seconds(selection) + trace_seconds(selection)
    per_image = max(sweep_passes(selection, layers, 1) - sweep_passes(selection, layers, 0), 1e-9)
    fitting = int((limits.LINK_JOB_SECONDS.value - fixed) / (per_image * idle_pass_seconds(selection)))
    return max(1, min(available, max(floor, fitting)))


def ascent_passes(selection: Selection, count: int, options) -> float:
    """Image passes of a gallery: forward and backward (3) per image (filters x copies) and step, scaled by its
    image's area."""
    height, width = selection.model.input_size
    return (3.0 * count * options.copies * options.steps * max(options.size ** 2 / (height * width), 0.05)
            * (2 if options.warmup else 1))
