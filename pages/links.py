"""The view in the link: every choice that shapes a page is a query parameter, so a link reproduces it.

A widget drawn through this module starts from the value the link carried when the session opened
(once: afterwards the user's changes win), and writes its value back to `st.query_params` on every
run, so the browser's address always is the link to the current view. Link values are only ever
matched against the widget's own options or parsed as numbers: a malformed or hostile value gets a
warning and the default, never an exception, and no value becomes a path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlencode

import streamlit as st

from pages import markup

PARAMS = {
    # frame (sidebar)
    "model": "model source: demo:shapes, demo:shapes-gap, demo:vgg16, keras:<Name>[:untrained], upload:<sha256>",
    "images": "image source: photos, shapes, upload or folder",
    "folder": "a server image set (a folder or zip in the server's image root), by name",
    "uploads": "uploaded images or zips by SHA-256 (repeated)",
    "count": "how many demo shapes, or images of a server folder decoded for the pages",
    "seed": "seed of the demo shapes",
    "image": "the current image, by name",
    "preprocessing": "preprocessing mode",
    "fit": "crop or squash",
    "output": "the output explained, for models with several",
    "exact": "1: heavy passes in float32 even where bfloat16 is native",
    # Model page
    "conv_only": "layer table: convolutional layers only",
    "log": "parameters chart on a log scale",
    # Activations page
    "layer": "layer shown (Activations, Filters)",
    "before": "map before the fused activation",
    "channel": "channel shown over the image",
    "opacity": "overlay opacity",
    "cmap": "colour map",
    "stats_layers": "layers of the statistics (repeated)",
    "measure_at": "where the statistics are measured: used (after BatchNorm and activation) or output",
    "stats": "the statistics are shown",
    "threshold": "dead threshold",
    "apoz": "near-dead APoZ bound",
    "grow_from": "first size of the growing sample of a server folder",
    "grow_to": "last size of the growing sample",
    "grow": "the growing sample's statistics are shown",
    # Filters page
    "pick": "which filters: first, index or top",
    "filters": "filter indices (comma-separated)",
    "n": "how many filters",
    "size": "ascent image size",
    "steps": "ascent steps",
    "lr": "ascent learning rate",
    "octaves": "ascent octaves",
    "jitter": "ascent jitter",
    "scale": "ascent random scale",
    "blur": "blur every k steps",
    "l2": "L2 decay",
    "tv": "total variation weight",
    "warmup": "warm-up steps",
    "basis": "image parameterisation: pixel or fourier",
    "copies": "images per filter",
    "diversity": "diversity weight between a filter's images",
    "negative": "1: negative images (what pushes each filter down)",
    "ascent_seed": "ascent seed",
    "gallery": "the gallery is shown",
    "examples": "the dataset examples under the gallery are shown",
    "compare": "the warm-up comparison is shown",
    "classes": "class-model images for these classes (repeated)",
    "class_images": "the class-model images are shown",
    # Attribution page
    "target": "target class, by name",
    "target_layer": "layer of the target filter",
    "filter": "target filter index",
    "cam_layer": "layer of the CAM methods",
    "methods": "attribution methods (repeated)",
    "samples": "SmoothGrad samples",
    "noise": "SmoothGrad noise",
    "ig_steps": "Integrated Gradients steps",
    "baseline": "Integrated Gradients baseline",
    "channels": "Score-CAM channel cap",
    "patch": "occlusion patch",
    "stride": "occlusion stride",
    "trust": "the deletion and insertion curves are shown",
    "sanity": "the sanity check is shown",
    # Pruning page
    "criterion": "pruning criterion: dead, l1, mean, taylor, fpgm, apoz or bn_scale (Pruning and Report pages)",
    "prune_target": "what the pruning target counts: layer, global, params or macs (Pruning and Report pages)",
    "share": "share of channels to cut, per layer or overall (Pruning and Report pages)",
    "keep": "share of the parameters or multiply-adds to keep (Pruning and Report pages)",
    "prune_steps_measure": "what pruning in steps keeps a share of: params or macs",
    "prune_steps_keep": "the share pruning in steps keeps",
    "prune_steps": "steps of the pruning in steps",
    "prune_steps_epochs": "most fine-tuning epochs per step (each run stops on its validation loss)",
    "prune_steps_patience": "epochs without a better validation loss before a step's fine-tuning stops",
    "prune_steps_lr": "fine-tuning learning rate of the steps",
    "prune_steps_bn": "BatchNorm while the steps fine-tune: frozen or train",
    "prune_steps_distill": "0: the steps fine-tune without distillation from the unpruned model",
    "trade_off": "the pruning in steps is shown",
    "scatter_layer": "layer of the filter scatter",
    "evidence": "filter whose evidence is shown",
    "rank_by": "ranking for sensitivity and chance",
    "measure": "measure of the sensitivity and chance charts",
    "chance_layer": "layer of the chance comparison",
    "sweep_images": "images used by the sensitivity and chance sweeps",
    "tune_epochs": "most fine-tuning epochs (stopping when the validation loss stops improving)",
    "tune_patience": "epochs without a better validation loss before fine-tuning stops",
    "tune_lr": "fine-tuning learning rate",
    "tune_bn": "BatchNorm while fine-tuning: train (re-estimated each epoch) or frozen",
    "tune_distill": "0: fine-tune without distillation from the unpruned model",
    "recovery": "the fine-tuning comparison is shown",
    "sensitivity": "the sensitivity analysis is shown",
    "chance": "the chance comparison is shown",
    "loo_layers": "layers of the leave-one-filter-out check (repeated)",
    "loo_images": "images used by the leave-one-filter-out check",
    "loo": "the leave-one-filter-out check is shown",
    "loo_criterion": "criterion plotted against the true cost",
    # Quantisation page
    "quant_held_out": "held-out images the int8 model is measured on",
    "quant_calibration": "images that calibrate the activation ranges",
    "quant_prune": "share of the parameters kept by pruning before quantising (1.0: no pruning)",
    "quant_others": "1: sensitivity with every other layer int8 too",
    "quant_layer": "layer whose histograms are shown",
    "quant_sensitivity": "the int8 sensitivity is shown",
    "quant_keep": "layers kept in float (repeated)",
    "quant_convert": "the integer model is converted and measured",
    # Report page
    "report_layers": "gallery layers of the report (repeated)",
    "report_filters": "filters per gallery",
    "report_steps": "ascent steps of the report",
    "report_images": "images with attribution overlays",
    "report_methods": "attribution methods of the report (repeated)",
    "report": "the report is built",
}

_OPENED = "_link_opened"  # the query parameters the session was opened with
_USED = "_link_used"  # parameters already applied to their widget
_WARNINGS = "_link_warnings"


def opened() -> dict[str, list[str]]:
    """The link this session was opened with (read on its first run, kept for the session)."""
    if _OPENED not in st.session_state:
        st.session_state[_OPENED] = {name: st.query_params.get_all(name) for name in st.query_params}
        st.session_state[_USED] = set()
        unknown = sorted(set(st.session_state[_OPENED]) - set(PARAMS))
        st.session_state[_WARNINGS] = [f"Unknown link parameter {name[:60]!r} ignored." for name in unknown[:10]]
        for name in unknown:  # the link this session hands on is clean
            del st.query_params[name]
    return st.session_state[_OPENED]


def warn(message: str) -> None:
    st.session_state.setdefault(_WARNINGS, []).append(message)


def warnings() -> list[str]:
    return list(st.session_state.get(_WARNINGS, []))


def from_link(param: str) -> list[str] | None:
    """The link's raw values for `param`, the first time it is asked for in this session, else None."""
    if param not in PARAMS:
        raise KeyError(f"{param!r} is not a registered link parameter")
    link = opened()
    if param not in link or param in st.session_state[_USED]:
        return None
    st.session_state[_USED].add(param)
    return link[param]


def write(param: str, values: Sequence[str] | str | None) -> None:
    """Put a value in the address bar (None or empty: remove it)."""
    if values is None or (not isinstance(values, str) and len(values) == 0):
        if param in st.query_params:
            del st.query_params[param]
    else:
        st.query_params[param] = values


def _seed(param: str, key: str, read: Callable[[list[str]], Any]) -> None:
    raw = from_link(param)
    if raw is None:
        return
    try:
        st.session_state[key] = read(raw)
    except (ValueError, TypeError, IndexError, KeyError):
        shown = ", ".join(raw)[:80]
        warn(f"The link's {param}={shown!r} does not fit this view; the default is used.")


def _one_of(options: Sequence, show: Callable[[Any], str]) -> Callable[[list[str]], Any]:
    names = [show(option) for option in options]
    return lambda raw: options[names.index(raw[-1])]


def selectbox(where, label: str, options: Sequence, *, param: str, key: str, index: int = 0,
              show: Callable[[Any], str] = str, radio: bool = False, **kwargs):
    """st.selectbox (or st.radio) whose value travels in the link as show(option)."""
    options = list(options)
    _seed(param, key, _one_of(options, show))
    draw = where.radio if radio else where.selectbox
    kwargs.setdefault("format_func", show)
    value = draw(label, options, index=index, key=key, **kwargs)
    write(param, None if value is None or value == options[index] else show(value))
    return value


def multiselect(where, label: str, options: Sequence, *, param: str, key: str, default: Sequence,
                show: Callable[[Any], str] = str, **kwargs) -> list:
    options = list(options)
    names = [show(option) for option in options]

    def read(raw: list[str]) -> list:
        # repeated parameters (what we write), or one comma-separated value (handier to type)
        values = [part for item in raw for part in ([item] if item in names else item.split(",")) if part]
        return [options[names.index(v)] for v in dict.fromkeys(values)]

    _seed(param, key, read)
    kwargs.setdefault("format_func", show)
    value = where.multiselect(label, options, default=list(default), key=key, **kwargs)
    write(param, None if value == list(default) else [show(v) for v in value])
    return value


def number(where, label: str, low, high, value, *, param: str, key: str, slider: bool = False, **kwargs):
    """st.number_input or st.slider whose value travels in the link; outside [low, high] is malformed."""
    kind = float if isinstance(value, float) else int

    def read(raw: list[str]):
        parsed = kind(raw[-1])
        if not math.isfinite(parsed) or not (low is None or parsed >= low) or not (high is None or parsed <= high):
            raise ValueError(parsed)
        return parsed

    _seed(param, key, read)
    draw = where.slider if slider else where.number_input
    chosen = draw(label, low, high, value, key=key, **kwargs)
    write(param, None if chosen == value else repr(chosen) if kind is float else str(chosen))
    return chosen


def toggle(where, label: str, *, param: str, key: str, value: bool = False, **kwargs) -> bool:
    flags = {"1": True, "true": True, "0": False, "false": False}
    _seed(param, key, lambda raw: flags[raw[-1].lower()])
    chosen = where.toggle(label, value=value, key=key, **kwargs)
    write(param, None if chosen == value else str(int(chosen)))
    return chosen


def text(where, label: str, value: str, *, param: str, key: str, max_chars: int = 200, **kwargs) -> str:
    _seed(param, key, lambda raw: raw[-1][:max_chars])
    chosen = where.text_input(label, value, key=key, max_chars=max_chars, **kwargs)
    write(param, None if chosen == value else chosen)
    return chosen


def shown(param: str, pressed: bool, inputs: tuple, ready: bool = True) -> bool:
    """Whether a result that a button reveals is shown: pressed, or named by the link, for these inputs.

    Changing an input hides the result again (no long pass starts by itself). A link shows it only when
    `ready` (already computed, or cheap): otherwise `waiting(param)` is true and the page asks for a click.
    """
    key = f"_shown_{param}"
    raw = from_link(param)
    if pressed or (raw is not None and raw[-1] == "1" and ready):
        st.session_state[key] = inputs
        st.session_state.pop(f"_waiting_{param}", None)
    elif raw is not None and raw[-1] == "1":
        st.session_state[f"_waiting_{param}"] = True
    on = st.session_state.get(key) == inputs
    write(param, "1" if on else None)
    return on


def waiting(param: str) -> bool:
    """The link asked for this result, which is not computed and too costly to start without a click."""
    return bool(st.session_state.get(f"_waiting_{param}"))


def cancel(param: str) -> None:
    """Hide a result whose job was cancelled: it stays hidden until its button is pressed again."""
    st.session_state.pop(f"_shown_{param}", None)
    st.session_state.pop(f"_waiting_{param}", None)
    write(param, None)


def url() -> str:
    """The link to the current view: the page's address and the query parameters."""
    query = urlencode([(name, value) for name in st.query_params for value in st.query_params.get_all(name)])
    return (st.context.url or "") + ("?" + query if query else "")


def show_link_warnings(where) -> None:
    for message in warnings():
        where.warning(markup.escape(message), icon=":material/link_off:")


def share_box() -> None:
    """The link to this view, with a copy button; drawn last, when every widget has written its value (and
    the link's warnings, where the sidebar left room for them)."""
    notices = st.session_state.get("_link_notices")
    if notices is not None:
        show_link_warnings(notices)
    with st.sidebar.popover("Share this view", icon=":material/link:", width="stretch"):
        st.caption("Anyone on this server who opens the link sees this page with the same choices "
                   "(uploads are named by their content hash).")
        st.code(url(), language=None, wrap_lines=True)
