"""Long work in the dashboard: shared finished results, progress with Cancel, and what a job costs.

A finished result is kept in memory and on disk for every session; a job shows its estimated cost
before it runs, a link starts it by itself only when it is cheap or already done, and Cancel stops it
within one batch.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict

import numpy as np
import pandas as pd
import streamlit as st
from streamlit.runtime.scriptrunner_utils.exceptions import ScriptControlException

from audit import device, storage
from audit.disk_cache import DiskCache
from pages import links, markup
from pages.selection import Selection, stop


log = logging.getLogger("cnn_audit")


@st.cache_resource
def _results() -> tuple[dict, threading.Lock]:
    return OrderedDict(), threading.Lock()


@st.cache_resource
def results_cache() -> DiskCache:
    """Finished tables and arrays on disk, shared by every session and kept across restarts (512 MB at most)."""
    return DiskCache(storage.data_dir() / "cache" / "results")


def _from_disk(key: tuple):
    table = results_cache().get_table(key)
    if table is not None:
        return table
    arrays = results_cache().get(key)
    return None if arrays is None else tuple(arrays[f"part{i}"] for i in range(len(arrays)))


def _to_disk(key: tuple, value) -> None:
    """Keep a finished result on disk; a full or read-only data folder is said, and the result still shown."""
    from audit.errors import StorageError

    try:
        if isinstance(value, pd.DataFrame):
            results_cache().put_table(key, value)
        elif isinstance(value, tuple) and all(isinstance(part, np.ndarray) for part in value):
            results_cache().put(key, {f"part{i}": part for i, part in enumerate(value)})
    except StorageError as exc:
        st.warning(markup.escape(str(exc)), icon=":material/save:")


def shared_result(key: tuple, compute, limit: int = 64):
    """A finished result computed once for its key (fingerprint, images, options), for every session.

    Kept in memory (the last `limit`) and on disk, so a shared link opens fast for the second viewer,
    even after a restart. Long passes are not wrapped in st.cache_data because they draw a progress
    bar as they go; the value is stored only when the pass finishes, so a cancelled pass leaves nothing.
    """
    store, lock = _results()
    with lock:
        if key in store:
            store.move_to_end(key)
            return store[key]
    value = _from_disk(key)
    if value is None:
        value = compute()
        _to_disk(key, value)
    with lock:
        store[key] = value
        while len(store) > limit:
            store.popitem(last=False)
    return value


def has_result(key: tuple) -> bool:
    store, lock = _results()
    with lock:
        return key in store or results_cache().has(key)


@contextlib.contextmanager
def progress_bar(label: str, param: str | None = None, on_cancel=None):
    """A progress callback (done, total) drawing one bar with a Cancel button, both gone when done.

    Cancel reruns the script, which stops the pass at its next update (one batch); nothing half-done is
    kept, and the result named by `param` stays hidden until its button is pressed again (`on_cancel`
    withdraws any other approval). Each update also lets Streamlit stop the pass when the session goes
    away (a closed tab): the next update raises, and the server log says where it stopped.
    """
    slot = st.empty()
    with slot.container():
        bar = st.progress(0.0, text=label)
        cancelled = st.button("Cancel", key=f"cancel_{label}", icon=":material/cancel:")
    if cancelled:
        slot.empty()
        if param is not None:
            links.cancel(param)
        if on_cancel is not None:
            on_cancel()
        st.info(f"{label}: cancelled. Press its button to start again.", icon=":material/cancel:")
        stop()
    reached = [0, 0]

    def update(done: int, total: int, note: str | None = None) -> None:
        reached[:] = done, total
        bar.progress(done / max(total, 1), text=f"{label}: {note or f'{done} / {total}'}")

    try:
        yield update
    except ScriptControlException:  # Cancel (a rerun), Streamlit's Stop or a closed session
        log.info("job %r stopped at %d / %d", label, *reached)
        raise
    slot.empty()


@contextlib.contextmanager
def model_job(selection: Selection, label: str, param: str | None = None, on_cancel=None):
    """A long computation on the selection's model: a progress bar with Cancel (see progress_bar), one job
    per model at a time (a job waiting for another says so and can be cancelled while it waits), on the
    chosen device. Quick views of the model (predictions, the layer table, one map) do not wait for it."""
    loaded = selection.model
    with progress_bar(label, param, on_cancel) as progress:
        while not loaded.job_lock.acquire(timeout=0.5):
            # an update each half second: Cancel or a closed session ends the wait here
            progress(0, 1, "waiting for another job on this model to finish…")
        try:
            with device.scope(selection.device):
                yield progress
        finally:
            loaded.job_lock.release()


# --- what a job costs ------------------------------------------------------------------------

@st.cache_resource
def _pass_times() -> dict:
    return {}


def pass_seconds(selection: Selection) -> float:
    """Seconds of one forward pass of one image on this model here (measured once per model and device);
    a backward pass counts as two."""
    loaded = selection.model
    key = (loaded.fingerprint, selection.device)
    times = _pass_times()
    if key not in times:
        x = np.zeros((4, *loaded.input_size, loaded.model.inputs[0].shape[-1]), np.float32)
        with loaded.lock, device.scope(selection.device):
            loaded.model(x, training=False)  # traced at load; this one is warm
            start = time.perf_counter()
            loaded.model(x, training=False)
            times[key] = (time.perf_counter() - start) / 4
    return times[key]


def about(seconds: float) -> str:
    """A duration as a person would say it."""
    if seconds < 90:
        return f"about {max(1, round(seconds))} s"
    if seconds < 5400:
        return f"about {round(seconds / 60)} min"
    return f"about {seconds / 3600:.1f} h"


def estimate(selection: Selection, passes: float) -> str:
    """What `passes` image passes cost on this model here, as a person would say it."""
    return about(passes * pass_seconds(selection))


def images_within(selection: Selection, passes_per_image: float, available: int, floor: int = 2) -> int:
    """A default image count for a sweep: as many as fit the link budget (a first answer in seconds), at
    least `floor`, at most `available`; the user raises it and sees the new estimate."""
    from audit import limits

    fitting = int(limits.LINK_JOB_SECONDS.value / max(passes_per_image * pass_seconds(selection), 1e-9))
    return max(1, min(available, max(floor, fitting)))


def ascent_passes(selection: Selection, count: int, options) -> float:
    """Image passes of a gallery: forward and backward (3) per filter and step, scaled by its image's area."""
    height, width = selection.model.input_size
    return 3.0 * count * options.steps * max(options.size ** 2 / (height * width), 0.05) * (2 if options.warmup else 1)


def job_shown(selection: Selection, param: str, pressed: bool, inputs: tuple, cached: bool, passes: float,
              where=st) -> bool:
    """Whether a job's result is shown (see links.shown): a link runs it only when it is computed already or
    its estimated cost (image passes x this model's time per pass) is under the link budget; the estimate is
    shown while the result is not."""
    from audit import limits

    on = links.shown(param, pressed, inputs,
                     ready=cached or passes * pass_seconds(selection) <= limits.LINK_JOB_SECONDS.value)
    if not on:
        message = f"Estimated cost here: {estimate(selection, passes)} ({passes:,.0f} image passes)."
        if links.waiting(param):
            message = ("The link shows this result, which this server has not computed yet. " + message +
                       " Press the button to start it.")
        where.caption(message)
    return on
