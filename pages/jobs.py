"""Long work in the dashboard: shared finished results, progress with Cancel, and when a job may start (its cost
is pages.estimates).

A finished result is kept in memory and on disk for every session; a job shows its estimated cost
before it runs, a link starts it by itself only when it is cheap or already done, and Cancel stops it
within one batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import threading
import time
from collections import OrderedDict

import numpy as np
import pandas as pd
import streamlit as st
from streamlit.runtime.scriptrunner_utils.exceptions import ScriptControlException

from audit import admission, cost, device, limits, registry, storage
from audit.disk_cache import DiskCache
from pages import links, markup
from pages.estimates import (  # noqa: F401 (what a job costs: long read from here by the pages)
    about, ascent_passes, busy_factor, busy_note, estimate, idle_pass_seconds, images_within, learn,
    pass_seconds, preparation_seconds, record_passes, sweep_passes, time_left, trace_seconds, traces_as_passes,
    within_link_budget)
from pages.selection import Selection, stop


log = logging.getLogger("cnn_audit")


@st.cache_resource
def _results() -> tuple[dict, threading.Lock]:
    return OrderedDict(), threading.Lock()


@st.cache_resource
def _running() -> dict:
    """The results being computed now, by key: the second request for one waits for it (guarded by _results' lock)."""
    return {}


class Running:
    """A result one session is computing for every session: how far it got, and its value when done."""

    def __init__(self):
        self.finished = threading.Event()
        self.value = None
        self.label = "The same job"
        self.reached: tuple[int, int, str | None] = (0, 1, None)


_COMPUTING: contextvars.ContextVar[Running | None] = contextvars.ContextVar("computing", default=None)


@st.cache_resource
def results_cache() -> DiskCache:
    """Finished tables and arrays on disk, shared by every session and kept across restarts (512 MB at most)."""
    return DiskCache(storage.data_dir() / "cache" / "results")


RESULTS_FORMAT = 2
"""Part of every key on disk: bumped when a kept table's columns change (2: BN scales and standard errors in the
pruning scores), so a server started on an older data folder computes them again instead of reading the old."""


def _from_disk(key: tuple):
    key = (RESULTS_FORMAT, *key)
    table = results_cache().get_table(key)
    if table is not None:
        return table
    arrays = results_cache().get(key)
    return None if arrays is None else tuple(arrays[f"part{i}"] for i in range(len(arrays)))


def _to_disk(key: tuple, value) -> None:
    """Keep a finished result on disk; a full or read-only data folder is said, and the result still shown."""
    from audit.errors import StorageError

    key = (RESULTS_FORMAT, *key)
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
    even after a restart. A request for a result another session is computing waits for it, following
    its progress, and takes its value: two users pressing the same button run one pass. Long passes are
    not wrapped in st.cache_data because they draw a progress bar as they go; the value is stored only
    when the pass finishes, so a cancelled pass leaves nothing (and whoever waited for it computes it).
    """
    store, lock = _results()
    while True:
        with lock:
            if key in store:
                store.move_to_end(key)
                return store[key]
            running = _running().get(key)
            if running is None:
                running = _running()[key] = Running()
                break
        log.info("result %s: waiting for the session computing it", _short(key))
        value = _wait_for(running)
        if value is not None:
            return value
    token = _COMPUTING.set(running)
    try:
        value = _from_disk(key)
        if value is None:
            log.info("result %s: computing", _short(key))  # bench/load.py counts these per result
            started = time.perf_counter()
            value = compute()
            log.info("result %s: computed in %.1f s", _short(key), time.perf_counter() - started)
            _to_disk(key, value)
        running.value = value
    finally:
        _COMPUTING.reset(token)
        with lock:
            _running().pop(key, None)
            if running.value is not None:
                store[key] = running.value
                while len(store) > limit:
                    store.popitem(last=False)
        running.finished.set()
    return value


def _short(key: tuple) -> str:
    return hashlib.sha1(repr(key).encode()).hexdigest()[:12]


def _wait_for(running: Running):
    """Follow another session's pass of the same result with its own bar (Cancel stops only this wait); its
    value, or None when that pass was cancelled or failed."""
    with progress_bar(f"{running.label} (started by another session)") as progress:
        while not running.finished.wait(0.5):
            progress(*running.reached)
    return running.value


def has_result(key: tuple) -> bool:
    store, lock = _results()
    with lock:
        return key in store or results_cache().has((RESULTS_FORMAT, *key))


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
        for key in [key for key in st.session_state if str(key).startswith("_started_")]:
            del st.session_state[key]  # work `started` began waits for its button again
        if param is not None:
            links.cancel(param)
        if on_cancel is not None:
            on_cancel()
        st.info(f"{label}: cancelled. Press its button to start again.", icon=":material/cancel:")
        stop()
    reached = [0, 0]

    running = _COMPUTING.get()
    if running is not None:
        running.label = label

    clock = [0.0, 0]  # when the work (re)started at 0, and where it stood then

    def update(done: int, total: int, note: str | None = None) -> None:
        reached[:] = done, total
        if running is not None:  # whoever waits for the same result follows this bar
            running.reached = (done, total, note)
        now = time.perf_counter()
        if done == 0 or done < clock[1]:  # the start, or a new phase counting again from its beginning
            clock[:] = now, done
        bar.progress(done / max(total, 1), text=f"{label}: {note or f'{done:,} / {total:,}'}"
                                                + time_left(now - clock[0], done - clock[1], total - done))

    try:
        yield update
    except ScriptControlException:  # Cancel (a rerun), Streamlit's Stop or a closed session
        log.info("job %r stopped at %d / %d", label, *reached)
        raise
    except Exception:  # a failed job ends: its bar and Cancel go, the page shows the error where it is caught
        slot.empty()
        raise
    slot.empty()


@contextlib.contextmanager
def model_job(selection: Selection, label: str, param: str | None = None, on_cancel=None):
    """A long computation on the selection's model: a progress bar with Cancel (see progress_bar), one job
    per model at a time (a job waiting for another says so and can be cancelled while it waits), its memory
    reserved from the server's budget (audit.admission: it waits in line, saying its place), on the
    chosen device. Quick views of the model (predictions, the layer table, one map) do not wait for it."""
    loaded = selection.model
    with progress_bar(label, param, on_cancel) as progress:
        while not loaded.job_lock.acquire(timeout=0.5):
            # an update each half second: Cancel or a closed session ends the wait here
            progress(0, 1, "waiting for another job on this model to finish…")
        try:
            with admission.SERVER.reserve(cost.job_bytes(loaded.model), waiting=lambda place: progress(
                    0, 1, f"waiting for memory other sessions' work holds ({place} ahead in line)…")):
                start, busy = time.perf_counter(), busy_factor()
                with device.scope(selection.device):
                    yield progress
                learn(selection, param, time.perf_counter() - start, busy)
        finally:
            loaded.job_lock.release()
            registry.trim_heap()  # what the job's batches took goes back to the system


def started(selection: Selection, what: str, key: tuple, passes: float, button_key: str, where=st,
            images: int | None = None) -> bool:
    """Whether work a page runs by itself (accuracy, scores, what-if, statistics) may run now: finished already,
    or within the link budget (a first answer in seconds, like a link's); otherwise a button says what it costs
    and the work starts on its press, and stays started for these inputs. A link to 2,048 images of a big
    model then shows buttons, and no session pays minutes of CPU for a click it never made."""
    state = f"_started_{button_key}"
    images = len(selection.image_set) if images is None else images  # the whole set is prepared, by default
    if st.session_state.get(state) == key or has_result(key) or within_link_budget(selection, passes, images):
        return True
    if where.button(f"{what} ({estimate(selection, passes, images)} here)", key=button_key,
                    icon=":material/play_arrow:"):
        st.session_state[state] = key
        return True
    where.caption(f"{passes:,.0f} image passes: more than a page starts by itself "
                  f"({limits.LINK_JOB_SECONDS.value} s of work, CNN_AUDIT_LINK_JOB_SECONDS)." + busy_note())
    return False


def job_shown(selection: Selection, param: str, pressed: bool, inputs: tuple, cached: bool, passes: float,
              where=st, images: int = 0) -> bool:
    """Whether a job's result is shown (see links.shown): a link runs it only when it is computed already or
    its estimated cost (image passes x this model's time per pass) is under the link budget; the estimate is
    shown while the result is not."""

    record_passes(selection, param, passes)
    on = links.shown(param, pressed, inputs,
                     ready=cached or within_link_budget(selection, passes, images))
    if not on:
        message = (f"Estimated cost here: {estimate(selection, passes, images)} ({passes:,.0f} image passes)."
                   + busy_note())
        if links.waiting(param):
            message = ("The link shows this result, which this server has not computed yet. " + message +
                       " Press the button to start it.")
        where.caption(message)
    return on
