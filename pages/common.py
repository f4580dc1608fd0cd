"""The app side of the dashboard: cached calls into `audit`, the sidebar choices, error display.

Pages only draw; they get the model and images from here. Models are `st.cache_resource` (one per
server process, shared by every session, keyed by the source string); results are `st.cache_data`
keyed by the model's fingerprint and the images' hash, never by the model object (Streamlit's
caching guide: an unhashed `_model` argument gives stale results when the model changes).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pandas as pd
import streamlit as st

from audit import activations, attribution, device, filters, images, models, pruning, storage
from audit.disk_cache import DiskCache
from audit.errors import AuditError, WeightsUnavailableError
from pages import links
from streamlit.runtime.scriptrunner_utils.exceptions import ScriptControlException

IMAGE_SOURCES = ("Sample photos", "Demo shapes", "Upload")
IMAGE_PARAM = {"Sample photos": "photos", "Demo shapes": "shapes", "Upload": "upload"}

log = logging.getLogger("cnn_audit")
if not log.handlers:  # the server log says when a model is really loaded (once per process)
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s cnn_audit %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)


@st.cache_resource(show_spinner="Loading the model (once for this server)…", max_entries=4)
def get_model(source: str) -> models.LoadedModel:
    """Load a model once per server process; every browser session shares it."""
    start = time.perf_counter()
    loaded = models.load(source)
    log.info("loaded model %s (fingerprint %s) in %.1f s", source, loaded.fingerprint, time.perf_counter() - start)
    return loaded


@st.cache_data(show_spinner=False, max_entries=16)
def demo_images(count: int, seed: int):
    """Generated shapes with labels and object masks."""
    from audit.zoo import shapes

    return shapes.generate(count, seed)


@st.cache_data(show_spinner=False)
def sample_photo(name: str) -> np.ndarray:
    return images.sample(name)


@st.cache_data(show_spinner="Decoding images…", max_entries=8)
def decode_upload(digest: str) -> tuple[list[images.LabelledImage], list[str]]:
    """Decode a stored upload (one image, or a zip of images) by its content hash; and what was skipped."""
    data = storage.upload_path("images", digest).read_bytes()
    name = storage.upload_name("images", digest)
    if data[:4] == b"PK\x03\x04":
        return images.read_zip_report(data, name=name)
    return [images.LabelledImage(name, images.decode(data, name))], []


@st.cache_data(show_spinner=False, max_entries=64)
def predictions(fingerprint: str, source: str, image_key: str, _pixels: np.ndarray, preprocessing: str,
                fit: str, device_name: str, output: int | None = None) -> np.ndarray:
    """Class probabilities (or the output as it is) for one image; keyed by fingerprint and image hash."""
    loaded = get_model(source)
    return loaded.predict(loaded.preprocess(_pixels, preprocessing, fit), device_name, output)[0]


@contextlib.contextmanager
def user_errors(what: str = "This part of the page", stop_page: bool = True):
    """Show any error as a short message, never a traceback page: an AuditError as it is (it is written
    for the user), anything else as what failed, with the details in an expander and the traceback
    in the server log. With `stop_page`, the page ends there; otherwise it goes on, keeping the rest."""
    try:
        yield
    except ScriptControlException:  # st.stop and st.rerun
        raise
    except AuditError as exc:
        st.error(str(exc), icon=":material/error:")
        if stop_page:
            stop()
    except Exception as exc:  # noqa: BLE001 (the last line of defence of a page)
        log.exception("%s failed", what)
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        st.error(f"{what} failed: {type(exc).__name__}{': ' + first if first else ''}. This is a bug of CNN "
                 "Audit, not of your model; the details below help us fix it.", icon=":material/bug_report:")
        with st.expander("Details"):
            st.code("".join(traceback.format_exception(exc)), language=None)
        if stop_page:
            stop()


def section(what: str):
    """A part of the page whose failure is shown in place while the rest of the page is still drawn."""
    return user_errors(what, stop_page=False)


def stop() -> None:
    """End the page here (as st.stop does), still giving the link to what is shown."""
    share_box()
    st.stop()


@dataclass
class Selection:
    """What the sidebar chose for this run: the pages read it, nothing else."""

    model: models.LoadedModel
    image_set: list[images.LabelledImage]
    image: images.LabelledImage
    preprocessing: str
    fit: str
    device: str
    masks: np.ndarray | None = None  # object masks of demo shapes, aligned with image_set
    output: int | None = None  # the output explained (None: the classifier heads.find_head picks)

    @property
    def image_key(self) -> str:
        return images.image_hash(self.image.pixels)

    def predict(self) -> np.ndarray:
        return predictions(self.model.fingerprint, self.model.source, self.image_key, self.image.pixels,
                           self.preprocessing, self.fit, self.device, self.output)

    @property
    def head(self):
        """The explained output (audit.heads.Head): classifier or not, its classes, where its scores are."""
        return self.model.head(self.output)

    def class_names(self) -> list[str]:
        """Names of the explained output's classes (class i when the model does not say)."""
        head = self.head
        names = self.model.class_names
        return names if names and len(names) == head.classes else [f"class {i}" for i in range(head.classes)]


def current() -> Selection:
    """The sidebar's selection for this run (set by dashboard.py before the page runs)."""
    if "_selection" not in st.session_state:
        # A fresh server's first run of a page URL goes through Streamlit's legacy pages/ folder mode,
        # which skips the frame. Turn that mode off (st.navigation would, had it run) and rerun: the
        # frame then runs and routes to this same page.
        from streamlit.runtime.pages_manager import PagesManager

        PagesManager.uses_pages_directory = False
        st.rerun()
    return st.session_state["_selection"]


def _model_picker() -> models.LoadedModel | None:
    st.sidebar.header("Model")
    choices = {
        "demo:shapes": "Demo CNN on shapes (ours, trained)",
        "demo:shapes-gap": "Demo CNN on shapes, global-pooling head",
        "demo:vgg16": "VGG16 conv base, HED edge weights",
        "keras": "keras.applications…",
        "upload": "Upload a .keras / .h5 file…",
    }
    initial = st.query_params.get("model", models.DEFAULT_SOURCE)
    if initial.startswith("keras:") and initial.split(":")[1] not in models.KERAS_APPLICATIONS:
        st.sidebar.warning(f"Unknown keras.applications model in the link ({initial[:60]!r}); showing "
                           f"{models.DEFAULT_SOURCE}.")
        initial, initial_choice = models.DEFAULT_SOURCE, models.DEFAULT_SOURCE
    elif initial.startswith("keras:"):
        initial_choice = "keras"
    elif initial.startswith("upload:"):
        initial_choice = "upload"
    elif initial in choices:
        initial_choice = initial
    else:  # file: paths and anything else never come from a link: only uploads by hash do
        st.sidebar.warning(f"The link's model {initial!r} cannot be opened here; showing {models.DEFAULT_SOURCE}.")
        initial_choice = models.DEFAULT_SOURCE
    choice = st.sidebar.selectbox("Model source", list(choices), index=list(choices).index(initial_choice),
                                  format_func=choices.get, key="model_choice")
    source = choice
    if choice == "keras":
        names = list(models.KERAS_APPLICATIONS)
        wanted = initial.split(":")[1] if initial.startswith("keras:") else "MobileNetV2"
        if wanted not in names:
            st.sidebar.warning(f"Unknown keras.applications model {wanted!r} in the link; showing {names[0]}.")
        name = st.sidebar.selectbox("Architecture", names, index=names.index(wanted) if wanted in names else 0,
                                    key="keras_name")
        untrained = st.sidebar.checkbox(
            "Random weights (untrained)", value=initial.endswith(":untrained"), key="keras_untrained",
            help="For when the ImageNet weights are not in the Keras cache and cannot be downloaded.")
        source = f"keras:{name}" + (":untrained" if untrained else "")
    elif choice == "upload":
        source = _uploaded_model_source(initial)
        if source is None:
            return None
    try:
        loaded = get_model(source)
    except WeightsUnavailableError as exc:
        st.error(str(exc), icon=":material/cloud_off:")
        st.info("Tick **Random weights (untrained)** in the sidebar to open the architecture anyway, or fetch "
                "the weights into the Keras cache (tens to hundreds of MB; never started by a link).")
        if source.startswith("keras:") and st.button("Download the ImageNet weights", icon=":material/download:"):
            with st.spinner("Downloading…"), user_errors("The download"):
                models.load(source, allow_download=True)
                st.rerun()
        return None
    except AuditError as exc:
        st.error(str(exc), icon=":material/error:")
        return None
    st.query_params["model"] = source
    if loaded.untrained:
        st.sidebar.warning("Untrained: random weights.", icon=":material/warning:")
    return loaded


def _uploaded_model_source(initial: str) -> str | None:
    upload = st.sidebar.file_uploader("Model file", type=["keras", "h5"], key="model_upload",
                                      help="Screened before loading; Lambda layers and custom code are refused.")
    if upload is not None:
        try:
            return "upload:" + storage.save_upload(upload.getvalue(), "models")
        except AuditError as exc:
            st.sidebar.error(str(exc))
            return None
    if initial.startswith("upload:"):
        return initial  # a link naming an upload on this server
    st.info("Upload a `.keras` or `.h5` model file in the sidebar.")
    return None


def _image_picker(loaded: models.LoadedModel) -> tuple[list[images.LabelledImage], np.ndarray | None]:
    st.sidebar.header("Images")
    default_source = "Demo shapes" if loaded.source in models.SHAPES_DEMOS else "Sample photos"
    kind = links.selectbox(st.sidebar, "Image source", IMAGE_SOURCES, index=IMAGE_SOURCES.index(default_source),
                           param="images", key=f"image_source_{loaded.source}", radio=True, horizontal=True,
                           show=IMAGE_PARAM.get, format_func=str)
    if kind == "Demo shapes":
        count = links.number(st.sidebar, "How many", 6, 2048, 60, step=6, param="count", key="demo_count")
        seed = links.number(st.sidebar, "Seed", 0, 2**31 - 1, 12345, param="seed", key="demo_seed")
        data = demo_images(int(count), int(seed))
        from audit.zoo import shapes

        return shapes.labelled(data), data.masks
    photos = [images.LabelledImage(name, sample_photo(name)) for name in images.SAMPLE_PHOTOS]
    if kind == "Sample photos":
        return photos, None
    files = st.sidebar.file_uploader("Images or a zip (one folder per class)", accept_multiple_files=True,
                                     type=["png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff", "zip"],
                                     key="image_upload")
    digests = []
    for file in files or []:
        try:
            digests.append(storage.save_upload(file.getvalue(), "images", file.name))
        except AuditError as exc:
            st.sidebar.error(str(exc))
    if not files:  # a link names earlier uploads on this server by their content hash
        digests = links.from_link("uploads") or st.session_state.get("_linked_uploads", [])
        st.session_state["_linked_uploads"] = digests
    decoded: list[images.LabelledImage] = []
    for digest in dict.fromkeys(digests):
        try:
            found, skipped = decode_upload(digest)
        except AuditError as exc:
            st.sidebar.error(str(exc))
            continue
        decoded += found
        if skipped:
            with st.sidebar.expander(f"{len(skipped)} files skipped", icon=":material/warning:"):
                st.write("\n".join(f"- {reason}" for reason in skipped))
    links.write("uploads", [d for d in dict.fromkeys(digests) if storage.is_digest(d)])
    if not decoded:
        st.sidebar.info("Upload images to use them; meanwhile the sample photos are used.")
        return photos, None
    return decoded, None


def sidebar() -> Selection | None:
    """Draw the sidebar and return the selection, or None when no model could be opened."""
    links.opened()
    notices = st.sidebar.container()  # the link's problems, if any, go on top
    loaded = _model_picker()
    if loaded is None:
        _show_link_warnings(notices)
        return None
    output = _output_picker(loaded)
    image_set, masks = _image_picker(loaded)
    names = [item.name for item in image_set]
    index = links.selectbox(st.sidebar, "Current image", range(len(names)), show=names.__getitem__,
                            param="image", key=f"current_image_{len(names)}_{names[0]}")
    with st.sidebar.expander("Preprocessing and device"):
        preprocessing = links.selectbox(st, "Preprocessing", list(images.PREPROCESSING),
                                        index=list(images.PREPROCESSING).index(loaded.preprocessing),
                                        format_func=lambda m: f"{m}: {images.PREPROCESSING[m]}",
                                        param="preprocessing", key=f"preprocessing_{loaded.source}")
        if loaded.preprocessing_reason:
            st.caption(f"Default **{loaded.preprocessing}**: {loaded.preprocessing_reason}.")
        fit = links.selectbox(st, "Resize", ("crop", "squash"), param="fit", key="fit", radio=True,
                              horizontal=True, help="crop keeps the aspect ratio and cuts the centre; squash stretches.")
        devices = device.available()
        device_name = st.selectbox("Run on", devices, format_func=device.describe, key="device")
    selection = Selection(loaded, image_set, image_set[index], preprocessing, fit, device_name, masks, output)
    st.session_state["_selection"] = selection
    st.session_state["_link_notices"] = notices
    return selection


def _output_picker(loaded: models.LoadedModel) -> int | None:
    """For models with several outputs, which one to explain (default: the classifier); None for one output."""
    from audit import heads

    described = heads.outputs(loaded.model)
    if len(described) == 1:  # the Model page says how its output is read
        return None
    chosen = loaded.head().output
    output = links.selectbox(st.sidebar, "Explain output", range(len(described)), index=chosen, param="output",
                             key=f"output_{loaded.fingerprint}", show=lambda i: described[i].path,
                             format_func=lambda i: f"{described[i].path} ({'classes' if described[i].is_classifier else 'no classes'})")
    st.sidebar.caption(described[output].description[0].upper() + described[output].description[1:] + ".")
    return int(output)


def _show_link_warnings(where) -> None:
    for message in links.warnings():
        where.warning(message, icon=":material/link_off:")


def share_box() -> None:
    """The link to this view, with a copy button; drawn last, when every widget has written its value."""
    notices = st.session_state.get("_link_notices")
    if notices is not None:
        _show_link_warnings(notices)
    with st.sidebar.popover("Share this view", icon=":material/link:", width="stretch"):
        st.caption("Anyone on this server who opens the link sees this page with the same choices "
                   "(uploads are named by their content hash).")
        st.code(links.url(), language=None, wrap_lines=True)


@st.cache_data(show_spinner=False, max_entries=16)
def layer_table(fingerprint: str, source: str):
    """The model's layer table, keyed by the fingerprint."""
    return models.layer_table(get_model(source).model)


def _dims(value, unknown: str) -> str:
    return "" if value is None else "×".join(unknown if d is None else str(d) for d in value)


def displayable(table):
    """Tuples as readable strings for st.dataframe (Arrow wants one type per column)."""
    table = table.copy()
    table["output_shape"] = table["output_shape"].map(lambda v: _dims(v, "N"))
    for column in ("kernel_size", "strides"):
        table[column] = table[column].map(lambda v: _dims(v, "?"))
    return table


# --- results shared by every session ---------------------------------------------------------

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
        st.warning(str(exc), icon=":material/save:")


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
def progress_bar(label: str, param: str | None = None):
    """A progress callback (done, total) drawing one bar with a Cancel button, both gone when done.

    Cancel reruns the script, which stops the pass at its next update (one batch); nothing half-done is
    kept, and the result named by `param` stays hidden until its button is pressed again.
    """
    slot = st.empty()
    with slot.container():
        bar = st.progress(0.0, text=label)
        cancelled = st.button("Cancel", key=f"cancel_{label}", icon=":material/cancel:")
    if cancelled:
        slot.empty()
        if param is not None:
            links.cancel(param)
        st.info(f"{label}: cancelled. Press its button to start again.", icon=":material/cancel:")
        stop()

    def update(done: int, total: int) -> None:
        bar.progress(done / max(total, 1), text=f"{label}: {done} / {total}")

    yield update
    slot.empty()


# --- what a job costs ------------------------------------------------------------------------

@st.cache_resource
def _pass_times() -> dict:
    return {}


def pass_seconds(selection: "Selection") -> float:
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


def ascent_passes(selection: "Selection", count: int, options) -> float:
    """Image passes of a gallery: forward and backward (3) per filter and step, scaled by its image's area."""
    height, width = selection.model.input_size
    return 3.0 * count * options.steps * max(options.size ** 2 / (height * width), 0.05) * (2 if options.warmup else 1)


def job_shown(selection: "Selection", param: str, pressed: bool, inputs: tuple, cached: bool, passes: float,
              where=st) -> bool:
    """Whether a job's result is shown (see links.shown): a link runs it only when it is computed already or
    its estimated cost (image passes x this model's time per pass) is under the link budget; the estimate is
    shown while the result is not."""
    from audit import limits

    seconds = passes * pass_seconds(selection)
    on = links.shown(param, pressed, inputs, ready=cached or seconds <= limits.LINK_JOB_SECONDS.value)
    if not on:
        message = f"Estimated cost here: {about(seconds)} ({passes:,.0f} image passes)."
        if links.waiting(param):
            message = ("The link shows this result, which this server has not computed yet. " + message +
                       " Press the button to start it.")
        where.caption(message)
    return on


@st.cache_data(show_spinner=False, max_entries=32)
def layer_maps(fingerprint: str, source: str, layer: str, image_key: str, _pixels: np.ndarray,
               preprocessing: str, fit: str, pre_activation: bool, device_name: str) -> np.ndarray:
    """One layer's maps for the current image, keyed by fingerprint, layer and image hash."""
    loaded = get_model(source)
    x = loaded.preprocess(_pixels, preprocessing, fit)
    with loaded.lock, device.scope(device_name):
        return activations.layer_maps(loaded.model, layer, x, pre_activation)


def image_set_key(selection: "Selection") -> str:
    return images.image_hash([item.pixels for item in selection.image_set])


def stats_key(selection: "Selection", layers: tuple[str, ...], threshold: float) -> tuple:
    return set_key(selection, "filter_stats", layers, float(threshold))


def fitted_image(selection: "Selection") -> np.ndarray:
    """The current image resized as the model sees it, for overlays."""
    return images.fit(selection.image.pixels, selection.model.input_size, selection.fit)


def filter_stats(selection: "Selection", layers: tuple[str, ...], threshold: float):
    """Per-filter statistics over the image set, once per (model, layers, images, threshold, preprocessing)."""
    loaded = selection.model
    key = stats_key(selection, layers, threshold)

    def compute():
        pixels = [item.pixels for item in selection.image_set]
        chunk = 256  # preprocess a chunk at a time and merge the sums: memory stays flat
        sums = None
        with progress_bar("Statistics over the image set", "stats") as progress:
            for start in range(0, len(pixels), chunk):
                x = loaded.preprocess(pixels[start:start + chunk], selection.preprocessing, selection.fit)
                with loaded.lock, device.scope(selection.device):
                    part = activations.filter_sums(
                        loaded.model, list(layers), x, threshold,
                        progress=lambda done, _, start=start: progress(start + done, len(pixels)))
                sums = part if sums is None else {k: sums[k].merge(part[k]) for k in sums}
        return activations.stats_frame(sums, threshold)

    return shared_result(key, compute)


# --- galleries -------------------------------------------------------------------------------

@st.cache_resource
def gallery_cache() -> DiskCache:
    """Finished galleries on disk, shared by every session and kept across restarts (512 MB at most)."""
    return DiskCache(storage.data_dir() / "cache" / "galleries")


def gallery(selection: "Selection", layer: str, indices: tuple[int, ...], options: filters.Options, seed: int,
            classes: bool = False) -> filters.Gallery:
    """A gallery (or class-model images), computed once for (model, layer, filters, options, seed)."""
    loaded = selection.model
    key = ("gallery", loaded.fingerprint, layer, indices, options.key(), seed, classes,
           selection.output if classes else None)
    stored = gallery_cache().get(key)
    if stored is not None:
        result = filters.Gallery(stored["images"], stored["activations"], stored["curves"], stored["responded"])
        if not classes:
            _note_responses(loaded.fingerprint, layer, indices, result)
        return result
    with progress_bar(f"Gradient ascent on {len(indices)} {'classes' if classes else 'filters'}",
                      "class_images" if classes else "gallery") as progress:
        with loaded.lock, device.scope(selection.device):
            if classes:
                result = filters.class_images(loaded.model, list(indices), options, seed, progress, selection.output)
            else:
                result = filters.render(loaded.model, layer, list(indices), options, seed, progress)
    from audit.errors import StorageError

    try:
        gallery_cache().put(key, {"images": result.images, "activations": result.activations,
                                  "curves": result.curves, "responded": result.responded})
    except StorageError as exc:
        st.warning(str(exc), icon=":material/save:")
    if not classes:
        _note_responses(loaded.fingerprint, layer, indices, result)
    return result


@st.cache_resource
def _responses() -> tuple[dict, threading.Lock]:
    return {}, threading.Lock()


def _note_responses(fingerprint: str, layer: str, indices: tuple[int, ...], result: filters.Gallery) -> None:
    """Remember each filter's gradient-ascent response, so the pruning scores can show it."""
    store, lock = _responses()
    with lock:
        known = store.setdefault((fingerprint, layer), {})
        for index, value in zip(indices, result.activations):
            known[int(index)] = float(value)


def ascent_responses(fingerprint: str) -> dict[tuple[str, int], float]:
    """(layer, filter) -> the final activation of its gallery tile, for every gallery drawn on this server."""
    store, lock = _responses()
    with lock:
        return {(layer, index): value for (owner, layer), known in store.items() if owner == fingerprint
                for index, value in known.items()}


def has_gallery(selection: "Selection", layer: str, indices: tuple[int, ...], options: filters.Options, seed: int,
                classes: bool = False) -> bool:
    key = ("gallery", selection.model.fingerprint, layer, indices, options.key(), seed, classes,
           selection.output if classes else None)
    return gallery_cache().has(key)


# --- attribution -----------------------------------------------------------------------------

@st.cache_data(show_spinner=False, max_entries=256)
def attribution_map(fingerprint: str, source: str, image_key: str, _x: np.ndarray, _black: np.ndarray,
                    preprocessing: str, target: tuple, method: str, options: tuple, device_name: str) -> np.ndarray:
    """One method's map, keyed by (fingerprint, image hash, preprocessing, target, method, options).

    `_black` (the black image after preprocessing) is the baseline of Integrated Gradients and the
    fill of Score-CAM and occlusion; it follows from the preprocessing, which is in the key.
    """
    loaded = get_model(source)
    resolved = target[1] if target[0] == "class" else attribution.FilterTarget(*target[1:])
    extra = {"Integrated Gradients": {"black": _black}, "Score-CAM": {"fill": _black},
             "Occlusion": {"fill": _black}}.get(method, {})
    with loaded.lock, device.scope(device_name):
        return attribution.METHODS[method](loaded.model, _x, resolved, **dict(options), **extra)


@st.cache_data(show_spinner=False, max_entries=256)
def deletion(fingerprint: str, source: str, image_key: str, _x: np.ndarray, _map: np.ndarray, map_key: tuple,
             target: tuple, _fill: np.ndarray, device_name: str, output: int | None = None):
    loaded = get_model(source)
    resolved = target[1] if target[0] == "class" else attribution.FilterTarget(*target[1:])
    with loaded.lock, device.scope(device_name):
        return attribution.deletion_curve(loaded.model, _x, _map, resolved, fill=_fill, output=output)


# --- pruning ---------------------------------------------------------------------------------

def labels_of(selection: "Selection") -> np.ndarray | None:
    """Class indices of the image set when every image has a label the model knows, else None."""
    names = selection.model.class_names
    if not names or any(item.label not in names for item in selection.image_set):
        return None
    return np.array([names.index(item.label) for item in selection.image_set])


def filter_scores(selection: "Selection"):
    """Pruning scores for every conv layer, once per (model, image set, preprocessing)."""
    loaded = selection.model
    key = set_key(selection, "filter_scores", selection.output)

    def compute():
        x = image_set_input(selection)
        with st.spinner("Scoring every filter (statistics, Taylor, redundancy)…"), loaded.lock, \
                device.scope(selection.device):
            return pruning.filter_scores(loaded.model, x, labels_of(selection), output=selection.output)

    return shared_result(key, compute)


def set_key(selection: "Selection", *parts) -> tuple:
    return (selection.model.fingerprint, image_set_key(selection), selection.preprocessing, selection.fit, *parts)


def image_set_input(selection: "Selection") -> np.ndarray:
    return selection.model.preprocess([item.pixels for item in selection.image_set], selection.preprocessing,
                                      selection.fit)


def what_if(selection: "Selection", chosen: dict[str, list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (or outputs without classes) of the model and of its masked copy on the image
    set, once per (model, images, filters, output)."""
    from audit import heads

    loaded = selection.model

    def compute():
        x = image_set_input(selection)
        with st.spinner("Running both models on the image set…"), loaded.lock, device.scope(selection.device):
            masked = pruning.masked(loaded.model, chosen, dependency_graph(loaded.fingerprint, loaded.source))
            head = loaded.head(selection.output)
            return heads.Outputs(loaded.model, head=head)(x), heads.Outputs(masked, head=head)(x)

    return shared_result(set_key(selection, "what_if", selection.output,
                                 tuple((k, tuple(v)) for k, v in chosen.items())), compute)


def sensitivity(selection: "Selection", scores, criterion: str):
    """Each conv layer pruned alone from 10% to 90%, once per (model, images, criterion)."""
    loaded = selection.model

    def compute():
        x = image_set_input(selection)
        with progress_bar("Sensitivity, layer by layer", "sensitivity") as progress, loaded.lock, device.scope(selection.device):
            return pruning.sensitivity(loaded.model, scores, criterion, x, labels_of(selection), progress=progress,
                                       output=selection.output)

    return shared_result(set_key(selection, "sensitivity", criterion, selection.output), compute)


def ranking_against_chance(selection: "Selection", scores, layer: str, criterion: str):
    """One layer pruned by the ranking, its inverse and 20 random rankings, once per (model, images, layer)."""
    loaded = selection.model

    def compute():
        x = image_set_input(selection)
        with progress_bar("Rankings", "chance") as progress, loaded.lock, device.scope(selection.device):
            return pruning.ranking_against_chance(loaded.model, scores, layer, criterion, x, labels_of(selection),
                                                  progress=progress, output=selection.output)

    return shared_result(set_key(selection, "chance", layer, criterion, selection.output), compute)


def leave_one_out(selection: "Selection", layers: tuple[str, ...], count: int):
    """The true cost of every filter of the layers on the first `count` images, once per (model, images)."""
    loaded = selection.model

    def compute():
        x = image_set_input(selection)[:count]
        labels = labels_of(selection)
        frames = []
        with progress_bar("Leave-one-filter-out", "loo") as progress, loaded.lock, device.scope(selection.device):
            for done, layer in enumerate(layers):
                changes = pruning.leave_one_out(loaded.model, layer, x, None if labels is None else labels[:count],
                                                progress=lambda i, n, done=done: progress(done * n + i, len(layers) * n),
                                                output=selection.output)
                frames.append(pd.DataFrame({"layer": layer, "filter": np.arange(len(changes)), "cost": changes}))
        return pd.concat(frames, ignore_index=True)

    return shared_result(set_key(selection, "leave_one_out", layers, count, selection.output), compute)


def recovery(selection: "Selection", chosen: dict[str, list[int]], epochs: int, learning_rate: float):
    """Prune, fine-tune and compare with a random ranking of the same size, once per (model, images,
    filters, settings): the table and the fine-tuned model as .keras bytes (kept in memory)."""
    import tempfile
    from pathlib import Path

    loaded = selection.model

    def compute():
        x = image_set_input(selection)
        with progress_bar("Fine-tuning the pruned model and a random one", "recovery") as progress, loaded.lock, \
                device.scope(selection.device):
            table, tuned = pruning.recovery(loaded.model, chosen, x, labels_of(selection), epochs, learning_rate,
                                            output=selection.output, progress=progress)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "fine_tuned.keras"
            tuned.save(path)
            return table, path.read_bytes()

    key = set_key(selection, "recovery", selection.output, int(epochs), float(learning_rate),
                  tuple((k, tuple(v)) for k, v in chosen.items()))
    return shared_result(key, compute)


@st.cache_resource(show_spinner="Reading the dependency groups…", max_entries=4)
def dependency_graph(fingerprint: str, source: str):
    """The model's dependency groups (audit.groups), once per model for every session."""
    from audit import groups

    loaded = get_model(source)
    with loaded.lock:
        return groups.DependencyGraph(loaded.model)


@st.cache_data(show_spinner="Building the smaller model…", max_entries=8)
def pruned_export(fingerprint: str, source: str, selection_key: tuple) -> tuple[bytes, dict, str | None, pd.DataFrame]:
    """The smaller model as .keras bytes, its before/after sizes, why the masked one is given instead (when
    no selected group can go), and per layer what was removed and what was kept and why."""
    import tempfile
    from pathlib import Path

    loaded = get_model(source)
    graph = dependency_graph(fingerprint, source)
    chosen = {layer: list(filters) for layer, filters in selection_key}
    reason = None
    with loaded.lock:
        plan = pruning.plan(loaded.model, chosen, graph)
        try:
            smaller = pruning.prune(loaded.model, chosen, graph)
        except AuditError as exc:
            reason = str(exc)
            smaller = pruning.masked(loaded.model, chosen, graph)
        with tempfile.TemporaryDirectory() as folder:
            original, pruned = Path(folder) / "original.keras", Path(folder) / "pruned.keras"
            loaded.model.save(original)
            smaller.save(pruned)
            data = pruned.read_bytes()
            sizes = {
                "parameters": (loaded.model.count_params(), smaller.count_params()),
                "multiply-adds per image": (pruning.flops(loaded.model), pruning.flops(smaller)),
                "file size (bytes)": (original.stat().st_size, len(data)),
            }
    return data, sizes, reason, plan
