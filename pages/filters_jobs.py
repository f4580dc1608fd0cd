"""The Filters page's work: galleries and class-model images, computed once and kept on disk."""

from __future__ import annotations


import streamlit as st

from audit import filters, images, storage
from audit.disk_cache import DiskCache
from pages import jobs, markup
from pages.selection import Selection, image_set_input, set_key
from pages.common import note_responses


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
        if not classes and _one_positive_each(options):
            note_responses(loaded.fingerprint, layer, indices, result)
        return result
    with jobs.model_job(selection, f"Gradient ascent on {len(indices)} {'classes' if classes else 'filters'}",
                        "class_images" if classes else "gallery") as progress:
        if classes:
            result = filters.class_images(selection.compute_model, list(indices), options, seed, progress,
                                          selection.output)
        else:
            result = filters.render(selection.compute_model, layer, list(indices), options, seed, progress)
    from audit.errors import StorageError

    try:
        gallery_cache().put(key, {"images": result.images, "activations": result.activations,
                                  "curves": result.curves, "responded": result.responded, "started": result.started})
    except StorageError as exc:
        st.warning(markup.escape(str(exc)), icon=":material/save:")
    if not classes and _one_positive_each(options):
        note_responses(loaded.fingerprint, layer, indices, result)
    return result


def _one_positive_each(options: filters.Options) -> bool:
    """Only a gallery of one positive image per filter says whether each filter responds."""
    return options.copies == 1 and not options.negative


def has_gallery(selection: "Selection", layer: str, indices: tuple[int, ...], options: filters.Options, seed: int,
                classes: bool = False) -> bool:
    return gallery_cache().has(_gallery_key(selection, layer, indices, options, seed, classes))


def _gallery_key(selection: "Selection", layer: str, indices: tuple[int, ...], options: filters.Options, seed: int,
                 classes: bool) -> tuple:
    # "v2": galleries stored before the started / responded flags were split are computed again
    return ("gallery", "v2", selection.model.fingerprint, layer, indices, options.key(), seed, classes,
            selection.output if classes else None, selection.precision)


EXAMPLES_SHOWN = 4
"""Dataset examples per filter on the pages: the top four patches, two by two under its tile."""


def examples_key(selection: "Selection", layer: str, indices: tuple[int, ...]) -> tuple:
    return set_key(selection, "examples", layer, indices, EXAMPLES_SHOWN, filters.CONTEXT_SIDE)  # how patches are cut


def examples(selection: "Selection", layer: str, indices: tuple[int, ...]):
    """The images of the set that drive each filter most (filters.top_examples, where the filter is used),
    once per (model, image set, layer, filters) for every session; with each example's patch of its image
    as fitted to the model's input."""
    loaded = selection.model

    def compute():
        x = image_set_input(selection)
        with jobs.model_job(selection, f"Finding what {len(indices)} filters fire on", "examples") as progress:
            found = filters.top_examples(selection.compute_model, layer, x, list(indices), EXAMPLES_SHOWN,
                                         progress=progress)
        pixels = [images.fit(item.pixels, loaded.input_size, selection.fit) for item in selection.image_set]
        return found, filters.patches(loaded.model, found, pixels, context=filters.CONTEXT_SIDE)

    return jobs.shared_result(examples_key(selection, layer, indices), compute)
