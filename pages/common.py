"""Cached calls several pages share: the layer table and maps, what the classifier knows, the sweep sample,
and what one page learnt that another shows (dead filters, gallery responses).

Each page's own calls live beside it (pages/<page>_jobs.py); this holds only what more than one page reads.
"""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import streamlit as st

from audit import activations, cost, device, filters, images, limits, models, pruning
from pages import jobs, markup
from pages.selection import get_model, section, Selection, set_key, labels_of, folder_labels, user_errors


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
    """The default CAM layer and why (audit.usage.cam_layer_and_reason), once per model."""
    return models.cam_layer_and_reason(get_model(source).model)


@st.cache_data(show_spinner=False, max_entries=16)
def last_map_conv(fingerprint: str, source: str) -> str:
    """The last conv layer whose output is a map larger than 1 x 1 (audit.usage.last_spatial_conv), once per
    model: a gallery's default late layer, never a 1 x 1 classifier conv."""
    from audit import usage

    return usage.last_spatial_conv(get_model(source).model)


COLUMN_HELP = {
    "taylor": "Taylor score (Molchanov et al. 2019): |activation × d score / d activation|, summed. Empty where the "
              "model has no class output (no score to differentiate).",
    "apoz": "Share of the filter's values at or below 0. Empty where the filter is used after an activation "
            "without a zero floor (ELU, swish, linear), where 0 is not \"off\".",
    "fpgm": "Distance to the layer's geometric median (He et al. 2019): small means replaceable.",
    "redundancy": "Cosine similarity to the most similar filter of the layer.",
    "bn_scale": "|gamma| of the BatchNormalization on the filter's channel (Liu et al. 2017, Network Slimming). Empty "
                "where the channel meets no BatchNorm.",
    "apoz_se": "Standard error of the APoZ over the images: its sampling noise.",
    "mean_se": "Standard error of the mean activation over the images: its sampling noise.",
    "taylor_se": "Standard error of the Taylor score over the images: its sampling noise.",
}


def number_columns(table: pd.DataFrame, digits: int = 3) -> dict:
    """column_config for st.dataframe: whole numbers with thousands separators (154,665,344), floats with
    `digits` significant digits (a Taylor score of 7e-13 reads as 7.00e-13, not 0.0000000000007), and the
    columns whose empty cells need a word (COLUMN_HELP) explained on hover."""
    config = {}
    for column in table.columns:
        help_text = COLUMN_HELP.get(column)
        if pd.api.types.is_bool_dtype(table[column]):
            continue
        if pd.api.types.is_integer_dtype(table[column]):
            config[column] = st.column_config.NumberColumn(format="localized", help=help_text)
        elif pd.api.types.is_float_dtype(table[column]):
            config[column] = st.column_config.NumberColumn(format=f"%.{digits}g", help=help_text)
    return config


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


CACHED_MAP_BYTES = 32 * 2**20
"""The largest layer's maps kept for reuse (32 of them at most: 1 GB). A 1024 x 1024 model's 64-channel maps are
268 MB each: 32 kept were 8.6 GB, so bigger maps are computed again when asked."""


def layer_maps(fingerprint: str, source: str, layer: str, image_key: str, pixels: np.ndarray,
               preprocessing: str, fit: str, pre_activation: bool, device_name: str) -> np.ndarray:
    """One layer's maps for the current image, keyed by fingerprint, layer and image hash; kept when small."""
    model = get_model(source).model
    shape = models.get_layer(model, layer).output
    shape = (shape[0] if isinstance(shape, (list, tuple)) else shape).shape[1:]
    compute = _kept_maps if 4 * np.prod([d or 1 for d in shape]) <= CACHED_MAP_BYTES else _maps
    return compute(fingerprint, source, layer, image_key, pixels, preprocessing, fit, pre_activation, device_name)


def _maps(fingerprint: str, source: str, layer: str, image_key: str, _pixels: np.ndarray,
          preprocessing: str, fit: str, pre_activation: bool, device_name: str) -> np.ndarray:
    loaded = get_model(source)
    x = loaded.preprocess(_pixels, preprocessing, fit)
    with loaded.lock, device.scope(device_name):
        return activations.layer_maps(loaded.model, layer, x, pre_activation)


_kept_maps = st.cache_data(show_spinner=False, max_entries=32)(_maps)


def input_chunk(selection: "Selection", most: int) -> int:
    """How many images to preprocess at once: at most `most`, their float input within the batch budget (256
    images of a 1024 px model were 3.2 GB before the model saw them)."""
    return cost.inputs_within(selection.model.model, limits.BATCH_BYTES.value, most)


def knowledge(selection: "Selection", ask: bool = False) -> dict | None:
    """What the classifier shows it knows on the image set (audit.pruning.knowledge: accuracy with its Wilson
    interval against chance, or how flat its outputs are without labels); None without a class output, or while
    the pass is not started: it runs by itself only when known or within the link budget, else (with `ask`) on
    the press of a button. Shared and kept like the other results."""
    if not selection.head.is_classifier:
        return None
    loaded = selection.model
    key = set_key(selection, "knowledge", selection.output)
    count = len(selection.image_set)
    if ask:
        if not jobs.started(selection, f"Measure the accuracy on {count:,} images", key, count, "accuracy_go"):
            return None
    elif not (jobs.has_result(key) or jobs.within_link_budget(selection, count, count)):
        return None
    if not jobs.has_result(key) and loaded.job_lock.locked():  # a page does not wait behind another user's job
        st.caption("What the model knows on these images is measured when the job running on this model now ends: "
                   "open the page again then.")
        return None

    def compute():
        pixels = [item.pixels for item in selection.image_set]
        chunk = input_chunk(selection, 64)
        parts = []
        with jobs.model_job(selection, "Measuring what the model knows on the images") as progress:
            for start in range(0, len(pixels), chunk):
                progress(start, len(pixels))
                parts.append(loaded.predict(loaded.preprocess(pixels[start:start + chunk], selection.preprocessing,
                                                              selection.fit), selection.device, selection.output))
        return pruning.knowledge(np.concatenate(parts), labels_of(selection))

    return jobs.shared_result(key, compute)


def preprocessing_choice(selection: "Selection") -> None:
    """The file says nothing of its preprocessing: the candidates weighed on the images (audit
    .preprocessing_evidence). With labels the best accuracy is offered as the sidebar's choice; without, how many
    top-1 predictions each candidate changes, and the user confirms."""
    loaded = selection.model
    count = len(selection.image_set)
    labels = labels_of(selection)
    st.caption(f"{markup.escape(loaded.title)} has no rescaling layer and no known architecture, so its file does not "
               f"say how pixels become its input; **{markup.escape(selection.preprocessing)}** is in use. Each "
               "candidate is tried on the images" + (": the best accuracy wins." if labels is not None else
                                                      " (no labels: how many top-1 predictions it changes)."))
    key = set_key(selection, "preprocessing_evidence", selection.preprocessing)
    candidates = len(dict.fromkeys([selection.preprocessing, *models.PREPROCESSING_CANDIDATES]))
    if not jobs.started(selection, f"Weigh {candidates} preprocessings on {count:,} images", key, candidates * count,
                        "preprocessing_go", images=candidates * count):
        return

    def compute():
        with jobs.model_job(selection, "Weighing the preprocessings on the images") as progress:
            return models.preprocessing_evidence(loaded, [item.pixels for item in selection.image_set], labels,
                                                 selection.fit, selection.preprocessing, progress)

    with user_errors("Weighing the preprocessings"):
        table = jobs.shared_result(key, compute)
    shown = table.assign(meaning=[images.PREPROCESSING[mode] for mode in table["mode"]])
    st.dataframe(shown, hide_index=True, width="stretch", column_config={
        **number_columns(shown), "changed": st.column_config.ProgressColumn(
            "top-1 changed", min_value=0.0, max_value=1.0, format="percent",
            help=f"Share of the images whose top-1 class differs from the one under {selection.preprocessing}.")})
    chosen, widget = table.attrs["chosen"], f"preprocessing_{loaded.source}"
    sample = images.describe_sample(folder_labels(selection), range(count), markup.escape)
    chance = float(np.bincount(labels).max() / len(labels)) if labels is not None else 0.0
    rows = table.set_index("mode")
    if labels is not None and rows.loc[chosen, "low"] <= chance:
        st.warning(f"No candidate's accuracy on {sample} is clearly above chance ({chance:.0%}): the images cannot "
                   "choose. Check that the labels are the model's classes (a file without class names takes the "
                   "folders in sorted order) and the weights, then choose by the model's documentation.",
                   icon=":material/help:")
    elif labels is not None and chosen != selection.preprocessing:
        best, current = rows.loc[chosen], rows.loc[selection.preprocessing]
        st.warning(f"**{chosen}** gives the best accuracy on {sample}: {best.accuracy:.1%} (95% interval "
                   f"{best.low:.0%}–{best.high:.0%}) against {current.accuracy:.1%} under "
                   f"{markup.escape(selection.preprocessing)}."
                   + (f" Tied with {', '.join(table.attrs['tied'])}: these images cannot tell them apart."
                      if table.attrs["tied"] else ""), icon=":material/tune:")
        st.button(f"Use {chosen}", key="preprocessing_use", on_click=st.session_state.update, args=({widget: chosen},))
    elif labels is not None:
        st.caption(f"{markup.escape(selection.preprocessing)} gives the best accuracy on {sample}: kept.")
    elif table.attrs["changed"] > 0:
        st.warning(f"Up to {table.attrs['changed']:.0%} of the top-1 predictions on {sample} change with the "
                   "preprocessing and there are no labels to decide: check the model's documentation and confirm "
                   "the choice.", icon=":material/help:")
        confirmed = st.radio("The preprocessing the model was trained with", list(table["mode"]), horizontal=True,
                             index=None, key="preprocessing_confirm")
        if confirmed and confirmed != selection.preprocessing:
            st.button(f"Use {confirmed}", key="preprocessing_use", on_click=st.session_state.update,
                      args=({widget: confirmed},))
    else:
        st.caption(f"No top-1 prediction on {sample} changes between the candidates: the choice does not matter here.")


def knowledge_sentence(selection: "Selection", found: dict) -> str:
    """The accuracy with its interval and the sample behind it, or the outputs' flatness, in words."""
    labels = labels_of(selection)
    if labels is None:
        return (f"no labels on these {found['images']} images; the outputs' mean normalised entropy is "
                f"{found['entropy']:.2f} (1: every class equally likely)")
    sample = images.describe_sample(folder_labels(selection), range(len(labels)), markup.escape)
    return (f"accuracy {found['accuracy']:.1%} (95% interval {found['low']:.0%}–{found['high']:.0%}) on {sample}; "
            f"chance {found['chance']:.0%}, the share of the most common class")


def warn_if_at_chance(selection: "Selection") -> None:
    """One warning before a page's results when the model shows no knowledge on these images: explanations and
    pruning advice would then describe noise."""
    with section("Checking what the model knows"):
        found = knowledge(selection)
        if found is None and selection.head.is_classifier:
            st.caption("Whether the model knows anything about these images is not measured yet: its accuracy "
                       f"pass ({jobs.estimate(selection, len(selection.image_set), len(selection.image_set))}) starts on the Model page.")
        if found is None or not found["at_chance"]:
            return
        why = "its interval reaches chance" if labels_of(selection) is not None else "its outputs are near flat"
        st.warning(f"**The model is at chance on these images**: {knowledge_sentence(selection, found)}; {why}. "
                   "What this page shows describes noise, not knowledge: check the weights, the preprocessing "
                   "and the output explained before acting on it.", icon=":material/warning:")


def sample_of(selection: "Selection", count: int) -> np.ndarray:
    """Indices of a seeded sample of `count` images with every class within one image of the others
    (audit.images.stratified): the images the sweeps measure on."""
    return images.stratified(folder_labels(selection), count, seed=0)


def sample_sentence(selection: "Selection", count: int) -> str:
    """"12 images, 4 per class (3 classes)": what a sweep is measured on."""
    return images.describe_sample(folder_labels(selection), sample_of(selection, count), markup.escape)


@st.cache_resource
def _dead_known() -> tuple[dict, threading.Lock]:
    return {}, threading.Lock()


def note_dead(selection: "Selection", stats: pd.DataFrame) -> None:
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


@st.cache_resource
def _responses() -> tuple[dict, threading.Lock]:
    return {}, threading.Lock()


def note_responses(fingerprint: str, layer: str, indices: tuple[int, ...], result: filters.Gallery) -> None:
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


def precision_note(selection: Selection) -> str:
    """What a page says after a result computed in bfloat16 ("" in float32)."""
    if selection.precision != "bfloat16":
        return ""
    return (" Computed in bfloat16 on this hardware's native units (the definitions give each figure's agreement "
            "with float32; the sidebar's Exact switch recomputes in float32).")
