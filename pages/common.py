"""The app side of the dashboard: cached calls into `audit`, the current selection, error display.

Pages only draw; they get the model and images from here. Models are kept by `audit.registry` (one per
server process, shared by every session, keyed by the source string, bounded); results are `st.cache_data`
keyed by the model's fingerprint and the images' hash, never by the model object (Streamlit's
caching guide: an unhashed `_model` argument gives stale results when the model changes).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import traceback
from dataclasses import dataclass

import numpy as np
import pandas as pd
import streamlit as st

from audit import (activations, attribution, datasets, device, filters, images, limits, models, pruning, registry,
                   runs, sampling, storage)
from audit.disk_cache import DiskCache
from audit.errors import AuditError
from pages import jobs, markup
from streamlit.runtime.scriptrunner_utils.exceptions import ScriptControlException

log = logging.getLogger("cnn_audit")
if not log.handlers:  # the server log says when a model is really loaded (once per process)
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s cnn_audit %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)


@st.cache_resource
def loaded_models() -> registry.ModelCache:
    """The server's loaded models, shared by every session, bounded by count and bytes (audit.limits)."""
    return registry.ModelCache()


def get_model(source: str) -> models.LoadedModel:
    """Load a model once per server process; every browser session shares it."""
    cache = loaded_models()
    if source in cache:
        return cache.get(source)

    def said(loaded: models.LoadedModel, seconds: float) -> None:
        log.info("loaded model %s (fingerprint %s) in %.1f s", source, loaded.fingerprint, seconds)

    with st.spinner("Loading the model (once for this server)…"):
        return cache.get(source, on_load=said)


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
    return [images.LabelledImage(name, images.decode(data, name, max_side=limits.IMAGE_SIDE.value))], []


@st.cache_resource(show_spinner=False, max_entries=8)
def server_set(name: str) -> datasets.FileSet:
    """A server image set's file list (read once per process; a changed folder needs a restart or a new name)."""
    return datasets.open_set(storage.server_set_path(name))


@st.cache_data(show_spinner="Decoding a sample of the folder…", max_entries=8)
def server_sample(name: str, set_key: str, count: int) -> tuple[list[images.LabelledImage], list[str]]:
    """A seeded sample of a server image set, decoded for the per-image views; and what was skipped."""
    stream = server_set(name).sample(count, 0)
    decoded, skipped = [], []
    for position, file in enumerate(stream.names):
        try:
            decoded.append(images.LabelledImage(file, stream.read(position), stream.labels[position]))
        except AuditError as exc:
            skipped.append(str(exc))
    return decoded, skipped


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
        st.error(markup.escape(str(exc)), icon=":material/error:")
        if stop_page:
            stop()
    except Exception as exc:  # noqa: BLE001 (the last line of defence of a page)
        log.exception("%s failed", what)
        first = markup.escape(str(exc).splitlines()[0][:300]) if str(exc) else ""
        st.error(f"{what} failed: {type(exc).__name__}{': ' + first if first else ''}. This is a bug of CNN "
                 "Audit, not of your model; the details below help us fix it.", icon=":material/bug_report:")
        with st.expander("Details"):
            st.code("".join(traceback.format_exception(exc)), language=None)
        if stop_page:
            stop()


def what_these_mean(page: str) -> None:
    """The page's figures as audit.definitions defines them: the same words as docs/definitions.md."""
    from audit import definitions

    with st.expander("What these numbers mean", icon=":material/function:"):
        st.markdown(definitions.markdown(definitions.for_page(page)))


def section(what: str):
    """A part of the page whose failure is shown in place while the rest of the page is still drawn."""
    return user_errors(what, stop_page=False)


def stop() -> None:
    """End the page here (as st.stop does), still giving the link to what is shown."""
    from pages import sidebar

    sidebar.share_box()
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
    stream: datasets.FileSet | None = None  # a server folder: image_set is a sample of it, statistics stream it

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
        """Names of the explained output's classes: the model's, else the image set's class folders (see
        audit.heads.class_names), else class i."""
        return self.class_names_and_origin()[0]

    def class_names_and_origin(self) -> tuple[list[str], str]:
        from audit import heads

        return heads.class_names(self.model.class_names, self.head, (item.label for item in self.image_set))


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


@st.cache_data(show_spinner=False, max_entries=16)
def layer_table(fingerprint: str, source: str):
    """The model's layer table, keyed by the fingerprint."""
    return models.layer_table(get_model(source).model)


def map_layers(fingerprint: str, source: str) -> list[str]:
    """Layers whose output is a spatial map (batch, height, width, channels), in network order."""
    table = layer_table(fingerprint, source)
    return [row.path for row in table.itertuples() if row.output_shape is not None and len(row.output_shape) == 4
            and not row.is_container and row.type != "InputLayer"]


@st.cache_data(show_spinner=False, max_entries=16)
def cam_layer(fingerprint: str, source: str) -> tuple[str, str]:
    """The default CAM layer and why (audit.graph.cam_layer_and_reason), once per model."""
    return models.cam_layer_and_reason(get_model(source).model)


def significant(table: pd.DataFrame, digits: int = 3) -> dict:
    """column_config showing every float column with `digits` significant digits (a Taylor score of 7e-13
    reads as 7.00e-13, not 0.0000000000007)."""
    return {column: st.column_config.NumberColumn(format=f"%.{digits}g")
            for column in table.columns if pd.api.types.is_float_dtype(table[column])}


def _dims(value, unknown: str) -> str:
    return "" if value is None else "×".join(unknown if d is None else str(d) for d in value)


def displayable(table):
    """Tuples as readable strings for st.dataframe (Arrow wants one type per column): shapes as 7×7×512,
    and any other mixed column (a ZeroPadding2D's ((1, 1), (1, 1)) beside Conv2D's "same") as text."""
    table = table.copy()
    table["output_shape"] = table["output_shape"].map(lambda v: _dims(v, "N"))
    for column in ("kernel_size", "strides"):
        table[column] = table[column].map(lambda v: _dims(v, "?"))
    for column in table.columns[table.dtypes == object]:
        table[column] = table[column].map(lambda v: v if v is None or isinstance(v, str) else str(v))
    return table


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


def stats_key(selection: "Selection", layers: tuple[str, ...], threshold: float, at: str = "used") -> tuple:
    return set_key(selection, "filter_stats", layers, float(threshold), at)


def fitted_image(selection: "Selection") -> np.ndarray:
    """The current image resized as the model sees it, for overlays."""
    return images.fit(selection.image.pixels, selection.model.input_size, selection.fit)


def filter_stats(selection: "Selection", layers: tuple[str, ...], threshold: float, at: str = "used"):
    """Per-filter statistics over the image set, once per (model, layers, images, threshold, preprocessing,
    where measured)."""
    loaded = selection.model
    key = stats_key(selection, layers, threshold, at)

    def compute():
        pixels = [item.pixels for item in selection.image_set]
        chunk = 256  # preprocess a chunk at a time and merge the sums: memory stays flat
        sums = None
        with jobs.model_job(selection, "Statistics over the image set", "stats") as progress:
            for start in range(0, len(pixels), chunk):
                x = loaded.preprocess(pixels[start:start + chunk], selection.preprocessing, selection.fit)
                part = activations.filter_sums(
                    loaded.model, list(layers), x, threshold,
                    progress=lambda done, _, start=start: progress(start + done, len(pixels)), at=at)
                sums = part if sums is None else {k: sums[k].merge(part[k]) for k in sums}
        return activations.stats_frame(sums, threshold)

    stats = jobs.shared_result(key, compute)
    _note_dead(selection, stats)
    return stats


def growing_key(selection: "Selection", layers: tuple[str, ...], threshold: float, start: int, largest: int,
                at: str = "used") -> tuple:
    return (selection.model.fingerprint, selection.stream.key(), selection.preprocessing, selection.fit,
            "growing", layers, float(threshold), int(start), int(largest), at)


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

            for count, stats in sampling.growing(loaded.model, list(layers), stream, model_in, start, largest,
                                                 threshold=threshold, progress=update, at=at):
                steps.append(stats.assign(images=count))
        return pd.concat(steps, ignore_index=True)

    return jobs.shared_result(growing_key(selection, layers, threshold, start, largest, at), compute)


@st.cache_data(show_spinner=False, max_entries=16)
def finished_run(folder: str, finished: float) -> pd.DataFrame:
    """A finished command-line run's table (audit.runs), read once per file version."""
    return runs.read_result(folder)


@st.cache_resource
def _dead_known() -> tuple[dict, threading.Lock]:
    return {}, threading.Lock()


def _note_dead(selection: "Selection", stats: pd.DataFrame) -> None:
    """Remember each layer's count of filters never above 0 where it is used on this image set (whatever the
    threshold asked: the maximum does not depend on it), so other pages can show it; none for a layer without
    a zero floor there."""
    store, lock = _dead_known()
    with lock:
        for layer, group in stats.groupby("layer", sort=False):
            if group["apoz"].notna().all():
                store[set_key(selection, layer)] = int((group["max"] <= 0).sum())


def dead_filters(selection: "Selection", layer: str) -> int | None:
    """Filters of `layer` never above 0 on the current image set, if its statistics were computed."""
    store, lock = _dead_known()
    with lock:
        return store.get(set_key(selection, layer))


# --- galleries -------------------------------------------------------------------------------

@st.cache_resource
def gallery_cache() -> DiskCache:
    """Finished galleries on disk, shared by every session and kept across restarts (512 MB at most)."""
    return DiskCache(storage.data_dir() / "cache" / "galleries")


def gallery(selection: "Selection", layer: str, indices: tuple[int, ...], options: filters.Options, seed: int,
            classes: bool = False) -> filters.Gallery:
    """A gallery (or class-model images), computed once for (model, layer, filters, options, seed)."""
    loaded = selection.model
    key = _gallery_key(selection, layer, indices, options, seed, classes)
    stored = gallery_cache().get(key)
    if stored is not None:
        result = filters.Gallery(stored["images"], stored["activations"], stored["curves"], stored["responded"],
                                 stored["started"])
        if not classes:
            _note_responses(loaded.fingerprint, layer, indices, result)
        return result
    with jobs.model_job(selection, f"Gradient ascent on {len(indices)} {'classes' if classes else 'filters'}",
                        "class_images" if classes else "gallery") as progress:
        if classes:
            result = filters.class_images(loaded.model, list(indices), options, seed, progress, selection.output)
        else:
            result = filters.render(loaded.model, layer, list(indices), options, seed, progress)
    from audit.errors import StorageError

    try:
        gallery_cache().put(key, {"images": result.images, "activations": result.activations,
                                  "curves": result.curves, "responded": result.responded, "started": result.started})
    except StorageError as exc:
        st.warning(markup.escape(str(exc)), icon=":material/save:")
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
    return gallery_cache().has(_gallery_key(selection, layer, indices, options, seed, classes))


def _gallery_key(selection: "Selection", layer: str, indices: tuple[int, ...], options: filters.Options, seed: int,
                 classes: bool) -> tuple:
    # "v2": galleries stored before the started / responded flags were split are computed again
    return ("gallery", "v2", selection.model.fingerprint, layer, indices, options.key(), seed, classes,
            selection.output if classes else None)


# --- attribution -----------------------------------------------------------------------------

def target_of(target: tuple) -> attribution.Target:
    """The page's hashable target ("class", i) or ("filter", layer, index) as the attribution API takes it."""
    return target[1] if target[0] == "class" else attribution.FilterTarget(*target[1:])


def attribution_map(selection: "Selection", input_key: str, x: np.ndarray, black: np.ndarray, target: tuple,
                    method: str, options: tuple, on_cancel=None) -> np.ndarray:
    """One method's map, once per (model, exact input and baseline, target, method, options) for every session.

    `input_key` hashes the model's input and `black` (the black image after preprocessing: the baseline of
    Integrated Gradients and the fill of Score-CAM and occlusion), so image, preprocessing and fit are all
    in the key. A batched method runs as a job (a bar, Cancel, one job per model); a one-pass method is a
    quick call that never waits for another user's job.
    """
    loaded = selection.model
    resolved = target_of(target)

    def compute():
        if method in attribution.BATCHED:
            with jobs.model_job(selection, method, on_cancel=on_cancel) as progress:
                return (attribution.map_of(loaded.model, x, black, method, resolved, progress, **dict(options)),)
        with loaded.lock, device.scope(selection.device):
            return (attribution.map_of(loaded.model, x, black, method, resolved, **dict(options)),)

    return jobs.shared_result(("attribution", loaded.fingerprint, input_key, target, method, options), compute)[0]


TRUST_PASSES = 2 * 21
"""Image passes of one map's deletion and insertion curves (20 steps each, and the intact image)."""
RANDOM_TRUST_PASSES = 2 * 21 * attribution.RANDOM_ORDERS
"""Image passes of the random orders' curves: the chance level every map of an image and target is held to."""


def trust_key(selection: "Selection", input_key: str, target: tuple, maps: dict) -> tuple:
    return ("trust", selection.model.fingerprint, input_key, target, tuple((m, o) for m, (_, o) in maps.items()))


def trust_curves(selection: "Selection", input_key: str, x: np.ndarray, black: np.ndarray, target: tuple,
                 maps: dict[str, tuple[np.ndarray, tuple]]) -> dict:
    """Deletion and insertion curves (audit.attribution) of every map {method: (values, options)} and of the
    random orders ("random orders"), once per (model, input, target, maps) for every session; a job with a bar."""
    loaded = selection.model
    resolved = target_of(target)

    def compute():
        with jobs.model_job(selection, "Deletion and insertion curves", "trust") as progress:
            found = {"random orders": attribution.random_curves(loaded.model, x, resolved, fill=black,
                                                                output=selection.output)}
            progress(1, len(maps) + 1)
            for done, (method, (values, _)) in enumerate(maps.items()):
                found[method] = {kind: curve(loaded.model, x, values, resolved, fill=black, output=selection.output)
                                 for kind, curve in (("deletion", attribution.deletion_curve),
                                                     ("insertion", attribution.insertion_curve))}
                progress(done + 2, len(maps) + 1)
        return found

    return jobs.shared_result(trust_key(selection, input_key, target, maps), compute)


# --- pruning ---------------------------------------------------------------------------------

def labels_of(selection: "Selection") -> np.ndarray | None:
    """Class indices of the image set when every image has a label the model knows, else None."""
    if not selection.head.is_classifier:
        return None
    names = selection.class_names()
    if any(item.label not in names for item in selection.image_set):
        return None
    return np.array([names.index(item.label) for item in selection.image_set])


def filter_scores(selection: "Selection"):
    """Pruning scores for every conv layer, once per (model, image set, preprocessing)."""
    loaded = selection.model
    key = set_key(selection, "filter_scores", "where used", selection.output)

    def compute():
        x = image_set_input(selection)
        with jobs.model_job(selection, "Scoring every filter (statistics, Taylor, redundancy)") as progress:
            return pruning.filter_scores(loaded.model, x, labels_of(selection), output=selection.output,
                                         progress=progress)

    return jobs.shared_result(key, compute)


def knowledge(selection: "Selection") -> dict | None:
    """What the classifier shows it knows on the image set (audit.pruning.knowledge: accuracy with its Wilson
    interval against chance, or how flat its outputs are without labels); None without a class output. A
    quick call (a prediction pass), shared and kept like the other results."""
    if not selection.head.is_classifier:
        return None
    loaded = selection.model

    def compute():
        pixels = [item.pixels for item in selection.image_set]
        parts = [loaded.predict(loaded.preprocess(pixels[start:start + 64], selection.preprocessing, selection.fit),
                                selection.device, selection.output) for start in range(0, len(pixels), 64)]
        return pruning.knowledge(np.concatenate(parts), labels_of(selection))

    return jobs.shared_result(set_key(selection, "knowledge", selection.output), compute)


def knowledge_sentence(selection: "Selection", found: dict) -> str:
    """The accuracy with its interval and the sample behind it, or the outputs' flatness, in words."""
    labels = labels_of(selection)
    if labels is None:
        return (f"no labels on these {found['images']} images; the outputs' mean normalised entropy is "
                f"{found['entropy']:.2f} (1: every class equally likely)")
    sample = images.describe_sample(folder_labels(selection), range(len(labels)), markup.escape)
    return (f"accuracy {found['accuracy']:.0%} (95% interval {found['low']:.0%}–{found['high']:.0%}) on {sample}; "
            f"chance {found['chance']:.0%}, the share of the most common class")


def warn_if_at_chance(selection: "Selection") -> None:
    """One warning before a page's results when the model shows no knowledge on these images: explanations and
    pruning advice would then describe noise."""
    with section("Checking what the model knows"):
        found = knowledge(selection)
        if found is None or not found["at_chance"]:
            return
        why = "its interval reaches chance" if labels_of(selection) is not None else "its outputs are near flat"
        st.warning(f"**The model is at chance on these images**: {knowledge_sentence(selection, found)}; {why}. "
                   "What this page shows describes noise, not knowledge: check the weights, the preprocessing "
                   "and the output explained before acting on it.", icon=":material/warning:")


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
        with jobs.model_job(selection, "Running both models on the image set"):
            masked = pruning.masked(loaded.model, chosen, loaded.dependency_graph())
            head = loaded.head(selection.output)
            return heads.Outputs(loaded.model, head=head)(x), heads.Outputs(masked, head=head)(x)

    return jobs.shared_result(set_key(selection, "what_if", selection.output,
                                 tuple((k, tuple(v)) for k, v in chosen.items())), compute)


def folder_labels(selection: "Selection") -> list:
    """Each image's class folder (None when it has none): what a sample is stratified by."""
    return [item.label for item in selection.image_set]


def sample_of(selection: "Selection", count: int) -> np.ndarray:
    """Indices of a seeded sample of `count` images with every class within one image of the others
    (audit.images.stratified): the images the sweeps measure on."""
    return images.stratified(folder_labels(selection), count, seed=0)


def sample_sentence(selection: "Selection", count: int) -> str:
    """"12 images, 4 per class (3 classes)": what a sweep is measured on."""
    return images.describe_sample(folder_labels(selection), sample_of(selection, count), markup.escape)


def _sample(selection: "Selection", count: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The model's input and labels (None without) for the stratified sample of `count` images."""
    chosen = sample_of(selection, count)
    labels = labels_of(selection)
    pixels = [selection.image_set[int(i)].pixels for i in chosen]
    x = selection.model.preprocess(pixels, selection.preprocessing, selection.fit)
    return x, None if labels is None else labels[chosen]


def sensitivity(selection: "Selection", scores, criterion: str, count: int):
    """Each conv layer pruned alone from 10% to 90% on a stratified sample of `count` images, once per (model,
    images, criterion)."""
    loaded = selection.model

    def compute():
        x, labels = _sample(selection, count)
        with jobs.model_job(selection, "Sensitivity, layer by layer", "sensitivity") as progress:
            return pruning.sensitivity(loaded.model, scores, criterion, x, labels, progress=progress,
                                       output=selection.output)

    return jobs.shared_result(sensitivity_key(selection, criterion, count), compute)


def sensitivity_key(selection: "Selection", criterion: str, count: int) -> tuple:
    return set_key(selection, "sensitivity", "stratified", criterion, selection.output, int(count))


def ranking_against_chance(selection: "Selection", scores, layer: str, criterion: str, count: int):
    """One layer pruned by the ranking, its inverse and 20 random rankings on a stratified sample of `count`
    images, once per (model, images, layer)."""
    loaded = selection.model

    def compute():
        x, labels = _sample(selection, count)
        with jobs.model_job(selection, "Rankings", "chance") as progress:
            return pruning.ranking_against_chance(loaded.model, scores, layer, criterion, x, labels,
                                                  progress=progress, output=selection.output)

    return jobs.shared_result(chance_key(selection, layer, criterion, count), compute)


def chance_key(selection: "Selection", layer: str, criterion: str, count: int) -> tuple:
    return set_key(selection, "chance", "stratified", layer, criterion, selection.output, int(count))


def leave_one_out(selection: "Selection", layers: tuple[str, ...], count: int):
    """The true cost of every filter of the layers on a stratified sample of `count` images, once per (model,
    images)."""
    loaded = selection.model

    def compute():
        x, labels = _sample(selection, count)
        frames = []
        sizes = [models.output_channels(loaded.model, layer) for layer in layers]
        total = sum(sizes)
        with jobs.model_job(selection, f"Leave-one-filter-out on {total} filters of {len(layers)} layers", "loo") \
                as progress:
            for layer, before in zip(layers, np.cumsum([0] + sizes[:-1])):
                changes = pruning.leave_one_out(
                    loaded.model, layer, x, labels, output=selection.output,
                    progress=lambda i, n, before=int(before), layer=layer: progress(
                        before + min(i, n), total, f"{before + min(i, n)} / {total} filters (now {layer})"))
                frames.append(pd.DataFrame({"layer": layer, "filter": np.arange(len(changes)), "cost": changes}))
        return pd.concat(frames, ignore_index=True)

    return jobs.shared_result(leave_one_out_key(selection, layers, count), compute)


def leave_one_out_key(selection: "Selection", layers: tuple[str, ...], count: int) -> tuple:
    return set_key(selection, "leave_one_out", "stratified", tuple(layers), int(count), selection.output)


def recovery(selection: "Selection", chosen: dict[str, list[int]], epochs: int, learning_rate: float):
    """Prune, fine-tune and compare with a random ranking of the same size, once per (model, images,
    filters, settings): the table and the fine-tuned model as .keras bytes (kept in memory)."""
    import tempfile
    from pathlib import Path

    loaded = selection.model

    def compute():
        x = image_set_input(selection)
        with jobs.model_job(selection, "Fine-tuning the pruned model and a random one", "recovery") as progress:
            table, tuned = pruning.recovery(loaded.model, chosen, x, labels_of(selection), epochs, learning_rate,
                                            output=selection.output, progress=progress)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "fine_tuned.keras"
            tuned.save(path)
            return table, path.read_bytes()

    key = set_key(selection, "recovery", selection.output, int(epochs), float(learning_rate),
                  tuple((k, tuple(v)) for k, v in chosen.items()))
    return jobs.shared_result(key, compute)


@st.cache_data(show_spinner="Building the smaller model…", max_entries=8)
def pruned_export(fingerprint: str, source: str, selection_key: tuple) -> tuple[bytes, dict, str | None, pd.DataFrame]:
    """The smaller model as .keras bytes, its before/after sizes, why the masked one is given instead (when
    no selected group can go), and per layer what was removed and what was kept and why."""
    import tempfile
    from pathlib import Path

    loaded = get_model(source)
    graph = loaded.dependency_graph()
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
