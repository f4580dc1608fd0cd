"""The sidebar: the model, the explained output, the images, preprocessing and device; the Share box.

Its choices become the `selection.Selection` every page reads; each is a link parameter (pages.links).
"""

from __future__ import annotations

import numpy as np
import streamlit as st
from streamlit.runtime.scriptrunner_utils.exceptions import ScriptControlException

from audit import datasets, device, images, limits, models, precision, storage
from audit.errors import AuditError, WeightsUnavailableError
from pages import links, markup
from pages.selection import Selection, get_model, show_bug

@st.cache_data(show_spinner="Timing bfloat16 against float32 for this model (once)…", max_entries=64)
def compute_precision(fingerprint: str, source: str) -> tuple[str, str]:
    """The precision this model's heavy passes run in where bfloat16 is native, and why (audit.precision.decide:
    measured once per model, as its speed-up differs by architecture)."""
    loaded = get_model(source)
    with loaded.lock:
        return precision.decide(loaded.model, loaded.input_size, "auto")


# --- the images the sidebar offers, decoded once per server --------------------------------------

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


IMAGE_SOURCES = ("Sample photos", "Demo shapes", "Upload", "Server folder")
IMAGE_PARAM = {"Sample photos": "photos", "Demo shapes": "shapes", "Upload": "upload", "Server folder": "folder"}

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
        st.sidebar.warning(f"Unknown keras.applications model in the link ({markup.quoted(initial)}); showing "
                           f"{models.DEFAULT_SOURCE}.")
        initial, initial_choice = models.DEFAULT_SOURCE, models.DEFAULT_SOURCE
    elif initial.startswith("keras:"):
        initial_choice = "keras"
    elif initial.startswith("upload:"):
        initial_choice = "upload"
    elif initial in choices:
        initial_choice = initial
    else:  # file: paths and anything else never come from a link: only uploads by hash do
        st.sidebar.warning(f"The link's model {markup.quoted(initial)} cannot be opened here; showing {models.DEFAULT_SOURCE}.")
        initial_choice = models.DEFAULT_SOURCE
    choice = st.sidebar.selectbox("Model source", list(choices), index=list(choices).index(initial_choice),
                                  format_func=choices.get, key="model_choice")
    source = choice
    if choice == "keras":
        names = list(models.KERAS_APPLICATIONS)
        wanted = initial.split(":")[1] if initial.startswith("keras:") else "MobileNetV2"
        if wanted not in names:
            st.sidebar.warning(f"Unknown keras.applications model {markup.quoted(wanted)} in the link; showing {names[0]}.")
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
        box = st.empty()  # one error box: a failed download replaces the first message, never adds a second
        box.error(markup.escape(str(exc)), icon=":material/cloud_off:")
        st.info("Tick **Random weights (untrained)** in the sidebar to open the architecture anyway, or fetch "
                "the weights into the Keras cache (tens to hundreds of MB; never started by a link).")
        if source.startswith("keras:") and st.button("Download the ImageNet weights", icon=":material/download:"):
            try:
                with st.spinner("Downloading…"):
                    models.load(source, allow_download=True)
            except Exception as failure:  # noqa: BLE001 (network, disk or file errors alike: said in the one box)
                box.error(f"The download of the weights failed: {markup.escape(str(failure))}. "
                          "Open the untrained architecture instead, or copy the weights file into the Keras cache.",
                          icon=":material/cloud_off:")
            else:
                st.rerun()
        return None
    except AuditError as exc:
        st.error(markup.escape(str(exc)), icon=":material/error:")
        return None
    except ScriptControlException:
        raise
    except Exception as exc:  # noqa: BLE001 (a model that fails to open must not take the page with it)
        show_bug(f"Opening {source}", exc)
        return None
    st.query_params["model"] = source
    if loaded.untrained:
        st.sidebar.warning("Untrained: random weights.", icon=":material/warning:")
    return loaded


def _uploaded_model_source(initial: str) -> str | None:
    upload = st.sidebar.file_uploader(
        "Model file", type=["keras", "h5", "hdf5", "zip"], key="model_upload",
        help="A .keras or .h5 file, or a zip of a KerasHub preset folder (save_to_preset). Screened before "
             "loading; Lambda layers and custom code are refused.")
    if upload is not None:
        try:
            return "upload:" + storage.save_upload(upload.getvalue(), "models", upload.name)
        except AuditError as exc:
            st.sidebar.error(markup.escape(str(exc)))
            return None
    if initial.startswith("upload:"):  # a link naming an upload on this server: the picker is empty, so say what is in
        digest = initial.split(":", 1)[1]
        if storage.is_digest(digest):
            st.sidebar.caption(f"In use, from the link: **{markup.escape(storage.upload_name('models', digest))}**, "
                               "uploaded to this server earlier. Upload a file to replace it.")
        return initial
    st.info("Upload a `.keras` or `.h5` (`.hdf5`) model file, or a zip of a KerasHub preset folder, in the sidebar.")
    return None


_CHOSEN_SOURCE = "_chosen_image_source"
"""The image source the user chose (not a model's default): a new model opens with it, not with its default."""


def _image_picker(loaded: models.LoadedModel) -> tuple[list[images.LabelledImage], np.ndarray | None, datasets.FileSet | None]:
    st.sidebar.header("Images")
    default_source = "Demo shapes" if loaded.source in models.SHAPES_DEMOS else "Sample photos"
    key = f"image_source_{loaded.source}"
    if key not in st.session_state and _CHOSEN_SOURCE in st.session_state:  # another model: the user's choice stays
        st.session_state[key] = st.session_state[_CHOSEN_SOURCE]
    kind = links.selectbox(st.sidebar, "Image source", IMAGE_SOURCES, index=IMAGE_SOURCES.index(default_source),
                           param="images", key=key, radio=True, horizontal=True, show=IMAGE_PARAM.get, format_func=str)
    if kind != default_source or _CHOSEN_SOURCE in st.session_state:
        st.session_state[_CHOSEN_SOURCE] = kind
    if kind == "Demo shapes":
        count = links.number(st.sidebar, "How many", 6, 2048, 60, step=6, param="count", key="demo_count")
        seed = links.number(st.sidebar, "Seed", 0, 2**31 - 1, 12345, param="seed", key="demo_seed")
        data = demo_images(int(count), int(seed))
        from audit.zoo import shapes

        return shapes.labelled(data), data.masks, None
    photos = [images.LabelledImage(name, sample_photo(name)) for name in images.SAMPLE_PHOTOS]
    if kind == "Sample photos":
        return photos, None, None
    if kind == "Server folder":
        return _server_folder(photos)
    files = st.sidebar.file_uploader("Images or a zip (one folder per class)", accept_multiple_files=True,
                                     type=["png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff", "zip"],
                                     key="image_upload")
    digests = []
    for file in files or []:
        try:
            digests.append(storage.save_upload(file.getvalue(), "images", file.name))
        except AuditError as exc:
            st.sidebar.error(markup.escape(str(exc)))
    if files:  # kept: the uploader forgets its files when it is not drawn for a run (another model, another page)
        st.session_state["_linked_uploads"] = digests
    else:  # a link names earlier uploads on this server by their content hash
        digests = links.from_link("uploads") or st.session_state.get("_linked_uploads", [])
        st.session_state["_linked_uploads"] = digests
        named = [storage.upload_name("images", d) for d in dict.fromkeys(digests) if storage.is_digest(d)]
        if named:
            st.sidebar.caption("In use, from the link: " + markup.escape(", ".join(named[:5]))
                               + (f" and {len(named) - 5} more" if len(named) > 5 else "")
                               + ", uploaded to this server earlier. Upload files to replace them.")
    decoded: list[images.LabelledImage] = []
    for digest in dict.fromkeys(digests):
        try:
            found, skipped = decode_upload(digest)
        except AuditError as exc:
            st.sidebar.error(markup.escape(str(exc)))
            continue
        decoded += found
        _show_skipped(skipped)
    links.write("uploads", [d for d in dict.fromkeys(digests) if storage.is_digest(d)])
    if not decoded:
        st.sidebar.info("Upload images to use them; meanwhile the sample photos are used.")
        return photos, None, None
    return decoded, None, None


def _show_skipped(skipped: list[str]) -> None:
    """The files of an image set that could not be read, and why, folded away in the sidebar."""
    if skipped:
        with st.sidebar.expander(f"{len(skipped)} files skipped", icon=":material/warning:"):
            st.write("\n".join(f"- {markup.escape(reason)}" for reason in skipped))


def _server_folder(photos):
    """A validation folder kept on the server: the pages decode a seeded sample of it, the statistics stream it."""
    names = storage.server_sets()
    if not names:
        st.sidebar.info(f"No image sets on this server yet: put a folder (one subfolder per class) or a .zip in "
                        f"{storage.image_root()} (or set CNN_AUDIT_IMAGE_ROOT). Meanwhile the sample photos are used.")
        return photos, None, None
    name = links.selectbox(st.sidebar, "Image set", names, param="folder", key="server_set")
    try:
        stream = server_set(name)
    except AuditError as exc:
        st.sidebar.error(markup.escape(str(exc)))
        return photos, None, None
    count = links.number(st.sidebar, "Images for the pages", 1, 2048, min(60, len(stream)), param="count",
                         key=f"server_count_{name}", help="A seeded sample, decoded for the per-image views; the "
                         "statistics can stream the whole set.")
    sample, skipped = server_sample(name, stream.key(), min(int(count), len(stream)))
    _show_skipped(skipped)
    st.sidebar.caption(f"{len(stream):,} images in {markup.escape(name)}; {len(sample)} decoded for the pages.")
    return (sample, None, stream) if sample else (photos, None, None)


def sidebar() -> Selection | None:
    """Draw the sidebar and return the selection, or None when no model could be opened."""
    links.opened()
    notices = st.sidebar.container()  # the link's problems, if any, go on top
    loaded = _model_picker()
    if loaded is None:
        links.show_link_warnings(notices)
        return None
    output = _output_picker(loaded)
    image_set, masks, stream = _image_picker(loaded)
    names = [item.name for item in image_set]
    index = links.selectbox(st.sidebar, "Current image", range(len(names)), show=names.__getitem__,
                            param="image", key=f"current_image_{len(names)}_{names[0]}")
    with st.sidebar.expander("Preprocessing and device"):
        preprocessing = links.selectbox(st, "Preprocessing", list(images.PREPROCESSING),
                                        index=list(images.PREPROCESSING).index(loaded.preprocessing),
                                        format_func=lambda m: f"{m}: {images.PREPROCESSING[m]}",
                                        param="preprocessing", key=f"preprocessing_{loaded.source}")
        if loaded.preprocessing_reason:
            st.caption(f"Default **{loaded.preprocessing}**: {markup.escape(loaded.preprocessing_reason)}.")
        fit = links.selectbox(st, "Resize", ("crop", "squash"), param="fit", key="fit", radio=True,
                              horizontal=True, help="crop keeps the aspect ratio and cuts the centre; squash stretches.")
        devices = device.available()
        device_name = st.selectbox("Run on", devices, format_func=device.describe, key="device")
        asked, native = device.chosen_precision(), device.native_bfloat16()
        possible = asked == "bfloat16" or (asked == "auto" and bool(native))
        exact = links.toggle(st, "Exact (float32)", param="exact", key="exact", disabled=not possible,
                             help="Heavy passes (statistics, scores, sweeps, galleries, attribution) run in bfloat16 "
                                  "where the hardware computes it natively and it measures faster for this model; "
                                  "their agreement with float32 is in the definitions. Exact runs them in float32.")
        if exact or not possible:
            computed, why = "float32", ("as asked" if exact else "set by CNN_AUDIT_PRECISION" if asked == "float32"
                                        else "no native bfloat16 here")
        elif asked == "bfloat16":
            computed, why = "bfloat16", "set by CNN_AUDIT_PRECISION"
        else:
            computed, why = compute_precision(loaded.fingerprint, loaded.source)
        st.caption(f"Heavy passes in **{computed}** ({why}).")
    selection = Selection(loaded, image_set, image_set[index], preprocessing, fit, device_name, masks, output,
                          stream, computed)
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
    st.sidebar.caption(markup.escape(described[output].description[0].upper() + described[output].description[1:]) + ".")
    return int(output)
