"""What this run of the dashboard is about: the model and images the sidebar chose (Selection), the loaded
models every session shares, and how a page shows an error.

The bottom of the app side: every page, the jobs and the cached calls import it; it imports no page module.
Models are kept by `audit.registry` (one per server process, shared by every session, keyed by the source
string, bounded); results are keyed by the model's fingerprint and the images' hash, never by the model
object (Streamlit's caching guide: an unhashed `_model` argument gives stale results when the model changes).
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
from dataclasses import dataclass

import numpy as np
import streamlit as st

from audit import datasets, images, models, registry
from audit.errors import AuditError
from pages import links, markup
from streamlit.runtime.scriptrunner_utils.exceptions import ScriptControlException


log = logging.getLogger("cnn_audit")
if not log.handlers:  # the server log says when a model is really loaded (once per process)
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s cnn_audit %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)


@st.cache_resource
def loaded_models() -> registry.ModelCache:
    """The server's loaded models, shared by every session, bounded by count and bytes (audit.limits).
    Made once per server process: the moment to sweep the part files a killed server left in the data folder."""
    from audit import storage

    removed = storage.sweep_parts()
    if removed:
        log.info("removed %d part files left by an interrupted write", removed)
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


@st.cache_data(show_spinner=False, max_entries=64)
def predictions(fingerprint: str, source: str, image_key: str, _pixels: np.ndarray, preprocessing: str,
                fit: str, device_name: str, output: int | None = None) -> np.ndarray:
    """Class probabilities (or the output as it is) for one image; keyed by fingerprint and image hash."""
    loaded = get_model(source)
    return loaded.predict(loaded.preprocess(_pixels, preprocessing, fit), device_name, output)[0]


@contextlib.contextmanager
def user_errors(what: str = "This part of the page", stop_page: bool = True):
    """Show any error as a short message, never a traceback page: an AuditError as it is (it is written
    for the user), anything else as what failed, with an id to quote; the traceback
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
        show_bug(what, exc)
        if stop_page:
            stop()


def show_bug(what: str, exc: Exception) -> None:
    """An unexpected error as a short message naming what failed and an id to quote; the traceback goes to the
    server log only (it names the server's folders and code), under that id."""
    incident = secrets.token_hex(4)
    log.exception("%s failed [incident %s]", what, incident, exc_info=exc)
    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    first = markup.escape(_SERVER_PATH.sub("…", first))
    st.error(f"{what} failed: {type(exc).__name__}{': ' + first if first else ''}. This is a bug of CNN "
             f"Audit, not of your model: quote **{incident}** to whoever runs this server (its log has the "
             "details).", icon=":material/bug_report:")


_SERVER_PATH = re.compile(r"(?:/[^\s/'\"]+){2,}/?")
"""An absolute path of two or more parts, as an exception's message may quote one of the server's files."""


def what_these_mean(page: str) -> None:
    """The page's figures as audit.definitions defines them: the same words as docs/definitions.md."""
    from audit import definitions

    with st.expander("What these numbers mean", icon=":material/function:"):
        st.markdown(definitions.markdown(definitions.for_page(page), tests_on_hover=True), unsafe_allow_html=True)
        st.markdown("<small>✓: checked against an independent computation; hover it for the test.</small>",
                    unsafe_allow_html=True)


def section(what: str):
    """A part of the page whose failure is shown in place while the rest of the page is still drawn."""
    return user_errors(what, stop_page=False)


def stop() -> None:
    """End the page here (as st.stop does), still giving the link to what is shown."""
    links.share_box()
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
    precision: str = "float32"  # of the heavy passes: "bfloat16" on native hardware unless the user asks exact

    @property
    def compute_model(self):
        """The model heavy passes run on: the loaded model, or its bfloat16 copy (audit.precision)."""
        from audit import precision

        return precision.for_compute(self.model.model, self.precision)

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


def set_key(selection: "Selection", *parts) -> tuple:
    return (selection.model.fingerprint, image_set_key(selection), selection.preprocessing, selection.fit,
            selection.precision, *parts)


def image_set_key(selection: "Selection") -> str:
    return images.image_hash([item.pixels for item in selection.image_set])


SET_INPUT_BATCHES = 4
"""A whole image set's model input, which the scores and the what-if hold at once, may take this many batch
budgets (CNN_AUDIT_MAX_BATCH_BYTES): 2,048 images of 224 px are 1.2 GB, of a 1024 px model 25 GB."""


def image_set_input(selection: "Selection") -> np.ndarray:
    """The image set as the model's float input, refused with the count that fits when it would not."""
    from audit import cost, limits

    per_image = cost.input_bytes(selection.model.model)
    fits = SET_INPUT_BATCHES * limits.BATCH_BYTES.value // per_image
    if len(selection.image_set) > fits:
        raise AuditError(f"{len(selection.image_set):,} images at this model's input size take "
                         f"{len(selection.image_set) * per_image / 2**30:.1f} GB held at once; this server allows "
                         f"{fits:,} ({SET_INPUT_BATCHES} x CNN_AUDIT_MAX_BATCH_BYTES). Choose fewer images.")
    return selection.model.preprocess([item.pixels for item in selection.image_set], selection.preprocessing,
                                      selection.fit)


def labels_of(selection: "Selection") -> np.ndarray | None:
    """Class indices of the image set when every image has a label the model knows, else None."""
    if not selection.head.is_classifier:
        return None
    names = selection.class_names()
    if any(item.label not in names for item in selection.image_set):
        return None
    return np.array([names.index(item.label) for item in selection.image_set])


def folder_labels(selection: "Selection") -> list:
    """Each image's class folder (None when it has none): what a sample is stratified by."""
    return [item.label for item in selection.image_set]


def fitted_image(selection: "Selection") -> np.ndarray:
    """The current image resized as the model sees it, for overlays."""
    return images.fit(selection.image.pixels, selection.model.input_size, selection.fit)
