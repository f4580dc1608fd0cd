"""Long work in the dashboard: shared finished results, progress with Cancel, and what a job costs.

A finished result is kept in memory and on disk for every session; a job shows its estimated cost
before it runs, a link starts it by itself only when it is cheap or already done, and Cancel stops it
within one batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict

import numpy as np
import pandas as pd
import streamlit as st
from streamlit.runtime.scriptrunner_utils.exceptions import ScriptControlException

from audit import admission, cost, device, heads, limits, registry, storage
from audit.disk_cache import DiskCache
from pages import links, markup
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
                _learn(selection, param, time.perf_counter() - start, busy)
        finally:
            loaded.job_lock.release()
            registry.trim_heap()  # what the job's batches took goes back to the system


# --- what a job costs ------------------------------------------------------------------------

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
    model and device on 2 and 8 images (the median of 3 calls each, after one that traces): on a deep network a
    call on a few images costs more than its images (ResNet152 at 64 px: 95 ms for two images, 142 ms for
    eight), which a what-if sweep pays once per cut. A sweep uses 2 images at least (images_within)."""
    loaded = selection.model
    key = (loaded.fingerprint, selection.device)
    times = _pass_times()
    if key not in times:
        outputs = heads.Outputs(loaded.model, selection.output)
        shape = (*loaded.input_size, loaded.model.inputs[0].shape[-1])
        seconds, first_call = {}, None
        with loaded.lock, device.scope(selection.device):
            for count in (2, 8):
                x = np.zeros((count, *shape), np.float32)
                start = time.perf_counter()
                outputs(x)
                first_call = first_call or time.perf_counter() - start  # the model's first call traces
                calls = []
                for _ in range(3):
                    start = time.perf_counter()
                    outputs(x)
                    calls.append(time.perf_counter() - start)
                seconds[count] = float(np.median(calls))
        per_image = max((seconds[8] - seconds[2]) / 6, seconds[8] / 16)  # timing noise cannot make an image free
        _traces()[key] = max(first_call - seconds[2], 0.0)
        times[key] = per_image, max(seconds[2] - 2 * per_image, 0.0)
    return times[key]


@st.cache_resource
def _traces() -> dict:
    """Per model and device: seconds its first forward call spent tracing and compiling, before any work."""
    return {}


def trace_seconds(selection: Selection) -> float:
    """What tracing a new job's function costs on this model, counted once in its estimate: the forward pass's
    trace, twice (a job's function holds a forward and often a backward graph). On 2,883 tiny layers the
    Attribution page said "about 1 s" from the timed pass and took 122 s, all of it tracing."""
    _timed(selection)
    return 2 * _traces().get((selection.model.fingerprint, selection.device), 0.0)


def idle_pass_seconds(selection: Selection) -> float:
    """Seconds of one image's forward pass on this model here (compiled, in a batch), on an idle server."""
    return _timed(selection)[0]


def call_passes(selection: Selection) -> float:
    """A compiled call's fixed cost on this model here, in image passes."""
    per_image, per_call = _timed(selection)
    return per_call / per_image


def sweep_passes(selection: Selection, calls: float, images_per_call: int) -> float:
    """The image passes of a sweep that calls the model `calls` times on the same images (one call per cut,
    in heads.Outputs' batches), each call's fixed cost counted in the passes it is worth."""
    return calls * (images_per_call + -(-images_per_call // heads.BATCH) * call_passes(selection))


def within_link_budget(selection: Selection, passes: float) -> bool:
    """Whether a link may start this work by itself: its passes at the timed forward pass, under
    CNN_AUDIT_LINK_JOB_SECONDS. Neither the server's load nor its history changes what a link may start."""
    return passes * idle_pass_seconds(selection) + trace_seconds(selection) <= limits.LINK_JOB_SECONDS.value


def pass_seconds(selection: Selection) -> float:
    """Seconds one image pass of a job takes on this model here when the server is idle: the timed forward
    pass, corrected by how long this model's finished jobs took against their estimates (decoding,
    preprocessing, several outputs, the bfloat16 copy); a backward pass counts as two."""
    ratios = _calibration()[1].get(_cost_key(selection))
    return idle_pass_seconds(selection) * (float(np.median(ratios)) if ratios else 1.0)


def _learn(selection: Selection, param: str | None, seconds: float, busy: float) -> None:
    """Keep how long a finished job took against its estimate (both idle: the busy factor taken out)."""
    expected, ratios = _calibration()
    passes = expected.get((*_cost_key(selection), param)) if param else None
    if passes:
        predicted = passes * idle_pass_seconds(selection) * busy
        kept = ratios.setdefault(_cost_key(selection), [])
        kept.append(min(max(seconds / max(predicted, 1e-9), 0.1), 10.0))
        del kept[:-8]


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


def estimate(selection: Selection, passes: float) -> str:
    """What `passes` image passes cost on this model here now, as a person would say it (longer while the
    server is busy: see busy_note)."""
    return about((passes * pass_seconds(selection) + trace_seconds(selection)) * busy_factor())


def busy_note() -> str:
    """A sentence when the estimates are stretched by a busy server, else nothing."""
    busy = busy_factor()
    return f" The server is busy: work runs about {busy:.1f}x slower than on an idle one now." if busy >= 1.5 else ""


def images_within(selection: Selection, calls: float, available: int, floor: int = 2) -> int:
    """A default image count for a sweep of `calls` calls on the same images (see sweep_passes): as many as
    fit the link budget (a first answer in seconds), at least `floor`, at most `available`; the user raises
    it and sees the new estimate."""
    budget = limits.LINK_JOB_SECONDS.value / max(calls * idle_pass_seconds(selection), 1e-9)
    fitting = int(budget - call_passes(selection))
    return max(1, min(available, max(floor, fitting)))


def ascent_passes(selection: Selection, count: int, options) -> float:
    """Image passes of a gallery: forward and backward (3) per image (filters x copies) and step, scaled by its
    image's area."""
    height, width = selection.model.input_size
    return (3.0 * count * options.copies * options.steps * max(options.size ** 2 / (height * width), 0.05)
            * (2 if options.warmup else 1))


def started(selection: Selection, what: str, key: tuple, passes: float, button_key: str, where=st) -> bool:
    """Whether work a page runs by itself (accuracy, scores, what-if, statistics) may run now: finished already,
    or within the link budget (a first answer in seconds, like a link's); otherwise a button says what it costs
    and the work starts on its press, and stays started for these inputs. A link to 2,048 images of a big
    model then shows buttons, and no session pays minutes of CPU for a click it never made."""
    state = f"_started_{button_key}"
    if st.session_state.get(state) == key or has_result(key) or within_link_budget(selection, passes):
        return True
    if where.button(f"{what} ({estimate(selection, passes)} here)", key=button_key, icon=":material/play_arrow:"):
        st.session_state[state] = key
        return True
    where.caption(f"{passes:,.0f} image passes: more than a page starts by itself "
                  f"({limits.LINK_JOB_SECONDS.value} s of work, CNN_AUDIT_LINK_JOB_SECONDS)." + busy_note())
    return False


def job_shown(selection: Selection, param: str, pressed: bool, inputs: tuple, cached: bool, passes: float,
              where=st) -> bool:
    """Whether a job's result is shown (see links.shown): a link runs it only when it is computed already or
    its estimated cost (image passes x this model's time per pass) is under the link budget; the estimate is
    shown while the result is not."""

    _calibration()[0][(*_cost_key(selection), param)] = passes
    on = links.shown(param, pressed, inputs,
                     ready=cached or within_link_budget(selection, passes))
    if not on:
        message = f"Estimated cost here: {estimate(selection, passes)} ({passes:,.0f} image passes)." + busy_note()
        if links.waiting(param):
            message = ("The link shows this result, which this server has not computed yet. " + message +
                       " Press the button to start it.")
        where.caption(message)
    return on
