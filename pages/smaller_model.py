"""The Pruning page's last part: the smaller model, how far it recovers beside a random cut of the same size, what
it forgets, and pruning in steps; every model in a table can be downloaded, the best held-out one first."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st

from audit import images, pruning
from pages import common, jobs, links, markup, pruning_jobs
from pages.selection import Selection, folder_labels, labels_of, user_errors

THUMBNAILS = 12
"""Changed images shown as thumbnails (the rest are in the table)."""


def export(selection: Selection, selection_map: dict, target: pruning.Target) -> str | None:
    """The physically smaller model: sizes and speed before and after, per layer what went, the downloads.
    Returns why only the masked model could be built (None when the smaller one was)."""
    loaded = selection.model
    st.subheader("Export a smaller model")
    selection_key = tuple((layer, tuple(filters)) for layer, filters in selection_map.items())
    with user_errors("Building the smaller model"):
        data, sizes, reason, plan = pruning_jobs.pruned_export(loaded.fingerprint, loaded.source, selection_key,
                                                               target.value if target.kind == "layer" else None)
    if reason:
        st.warning(f"{markup.escape(reason)} The masked model is offered instead.")
    removed, held = plan[plan.removed > 0], plan[plan["kept because"] != ""]
    st.caption(f"{markup.count(int(removed.removed.sum()), 'channel')} leave {markup.count(len(removed), 'layer')}, "
               "whole dependency groups"
               + (f"; {markup.count(len(held), 'layer')} keep their selected filters (see why below)" if len(held) else "")
               + ".")
    with st.expander(f"Per layer: asked, removed and kept ({markup.count(len(plan), 'layer')})"):
        st.dataframe(plan, hide_index=True, width="stretch")
    table = pd.DataFrame([(name, before, after) for name, (before, after) in sizes.items()],
                         columns=["", "before", "after"])
    timed = None
    if jobs.started(selection, "Time both models here", pruning_jobs.speed_key(selection, selection_key),
                    pruning_jobs.speed_passes(selection), "prune_speed", images=0):
        with user_errors("Timing both models"):
            timed = pruning_jobs.pruned_speed(selection, selection_key)
            table = pd.concat([table, timed], ignore_index=True)
    table["change"] = (table["after"] / table["before"] - 1).map(lambda v: f"{v:+.1%}")
    st.dataframe(table, hide_index=True, column_config={
        "before": st.column_config.NumberColumn(format="localized"),
        "after": st.column_config.NumberColumn(format="localized")})
    if loaded.file_bytes:
        st.caption(f"The file as loaded was {loaded.file_bytes:,} bytes; saved again by Keras (weights and "
                   f"architecture, no optimizer state) it is {sizes['file size, saved by Keras (bytes)'][0]:,}: the "
                   "sizes above compare like with like.")
    if timed is not None:
        _speed_note(table.set_index(""))
    download, saved_model = st.columns(2)
    download.download_button("Download the pruned model (.keras)", data, "pruned.keras", type="primary")
    if not reason:
        saved_model.download_button(
            "Download as a SavedModel (.zip, for TF Serving)",
            lambda: pruning_jobs.pruned_saved_model(loaded.fingerprint, loaded.source, selection_key),
            "pruned_saved_model.zip", "application/zip")
    return reason


def _speed_note(rows: pd.DataFrame) -> None:
    """What the timing says beside the multiply-adds (rows: before and after, by name)."""
    macs_before, macs_after = rows.loc["multiply-adds per image", ["before", "after"]]
    latency = next(name for name in rows.index if name.startswith("ms per image"))
    throughput = next(name for name in rows.index if name.startswith("images per second"))
    faster_single = rows.loc[latency, "after"] < 0.95 * rows.loc[latency, "before"]
    faster_batch = rows.loc[throughput, "after"] > 1.05 * rows.loc[throughput, "before"]
    if macs_after < macs_before and not (faster_single or faster_batch):
        st.warning("Fewer multiply-adds, but not less time here, one image at a time nor in batches: on this "
                   "hardware the cut layers were not what the time is spent on (memory-bound or depthwise layers).",
                   icon=":material/timer:")
    elif macs_after < macs_before and faster_batch and not faster_single:
        st.caption("Faster in batches, not one image at a time: at batch 1 the time here goes to the fixed cost "
                   "of each call, which pruning does not remove.")


def _tuning_settings(prefix: str, default_epochs: int, label: str) -> pruning.Tuning:
    """The fine-tuning settings, drawn in an expander and carried in the link."""
    with st.expander("Fine-tuning settings" + (f": {label}" if label else "")):
        c1, c2, c3, c4 = st.columns(4)
        epochs = links.number(c1, "Most epochs", 1, 200, default_epochs, param=f"{prefix}_epochs",
                              key=f"{prefix}_epochs", help="Fine-tuning stops earlier when the validation loss has "
                                                           "not improved for the patience; the best epoch is kept.")
        patience = links.number(c2, "Patience (epochs)", 1, 20, 3 if prefix == "tune" else 2,
                                param=f"{prefix}_patience", key=f"{prefix}_patience")
        learning_rate = links.number(c3, "Learning rate", 1e-5, 1e-1, 1e-3, format="%.5f", param=f"{prefix}_lr",
                                     key=f"{prefix}_lr", help="Adam, with a cosine decay over the most epochs.")
        batchnorm = links.selectbox(c4, "BatchNorm while fine-tuning", list(pruning.BATCHNORM_MODES),
                                    param=f"{prefix}_bn", key=f"{prefix}_bn",
                                    format_func={"frozen": "kept in inference mode",
                                                 "train": "trained, re-estimated each epoch"}.get)
        distill = links.toggle(st, "Distil from the unpruned model (Hinton et al. 2015)", param=f"{prefix}_distill",
                               key=f"{prefix}_distill", value=True,
                               help="The loss adds the KL divergence to the unpruned model's softened outputs "
                                    "(temperature 4, weight 0.7) to the labels' cross-entropy.")
    return pruning.Tuning(max_epochs=int(epochs), patience=int(patience), learning_rate=float(learning_rate),
                          batchnorm=batchnorm, distill=bool(distill))


def _pick_download(where, rows: list[str], best: str, fetch, file_stem: str, key: str) -> str:
    """A choice of the models in a table, the best held-out one first and named so, and its download; returns
    the chosen row."""
    ordered = [best] + [name for name in rows if name != best]
    chosen = where.selectbox("Model to download", ordered, key=key,
                             format_func=lambda name: f"{name} (best held-out accuracy)" if name == best else name)
    where.download_button(f"Download: {chosen} (.keras)", fetch(chosen),
                          f"{file_stem}_{chosen.replace(', ', '_').replace(' ', '_')}.keras", type="primary",
                          key=f"{key}_button")
    return chosen


def _accuracy_chart(table: pd.DataFrame, name: str, size: str):
    """Held-out accuracy of each row with its Wilson interval, beside the unpruned model's interval."""
    before = table.iloc[0]
    rows = table.iloc[1:]
    chart = px.scatter(rows, x="accuracy", y=name, error_x=rows["high"] - rows["accuracy"],
                       error_x_minus=rows["accuracy"] - rows["low"], hover_data={size: ":,"},
                       labels={"accuracy": "held-out accuracy (Wilson 95% interval)", name: ""})
    chart.add_vrect(x0=before["low"], x1=before["high"], fillcolor="rgba(44,160,44,0.15)", line_width=0,
                    annotation_text="unpruned", annotation_position="top left")
    chart.update_xaxes(range=[0, 1.02], tickformat=".0%")
    chart.update_yaxes(autorange="reversed")
    chart.update_layout(height=60 + 34 * len(rows), margin=dict(t=24, b=10))
    return chart


def forgetting(selection: Selection, found: pruning.Forgetting, held_out: np.ndarray, row: str) -> None:
    """Which classes pay for the cut and which images changed their answer (Hooker et al. 2019)."""
    overall = found.overall
    st.markdown(f"**What {markup.escape(row)} forgets** (on the {overall['images']:,} held-out images: "
                f"{overall['accuracy before']:.1%} before, {overall['accuracy after']:.1%} after)")
    classes = found.classes
    flagged = found.flagged()
    if flagged:
        st.warning("Lost significantly more than the whole set: " + markup.escape(", ".join(flagged)) +
                   " (one-sided test of each class's change against the set's, Bonferroni over the classes).",
                   icon=":material/warning:")
    else:
        st.caption("No class lost significantly more than the whole set (one-sided test of each class's change "
                   "against the set's, Bonferroni over the classes; a class needs at least "
                   f"{pruning.forgetting.FEWEST} held-out images to be flagged).")
    per_class = int(classes["images"].min()) if len(classes) else 0
    if per_class and per_class < 20:
        st.caption(f"Few images per class (as few as {per_class}): each class's interval is wide, and only a large "
                   "loss can be told from chance.")
    shown = classes.assign(**{"before": [f"{a:.0%} [{lo:.0%}-{hi:.0%}]" for a, lo, hi in
                                         zip(classes["accuracy before"], classes["before low"], classes["before high"])],
                              "after": [f"{a:.0%} [{lo:.0%}-{hi:.0%}]" for a, lo, hi in
                                        zip(classes["accuracy after"], classes["after low"], classes["after high"])]})
    st.dataframe(shown[["class", "images", "before", "after", "drop", "lost", "won", "p-value", "flagged"]],
                 hide_index=True, width="stretch",
                 column_config={"drop": st.column_config.NumberColumn(format="percent"),
                                "p-value": st.column_config.NumberColumn(format="%.3g")})
    flipped = found.flipped
    if not len(flipped):
        st.caption("No held-out image changed its answer.")
        return
    said = ("1 held-out image changed its answer" if len(flipped) == 1 else
            f"{len(flipped):,} held-out images changed their answer")
    st.caption(f"{said} (pruning-identified exemplars, Hooker et al. 2019)"
               + (f"; the first {THUMBNAILS}:" if len(flipped) > THUMBNAILS else ":"))
    columns = st.columns(6)
    for position, (_, item) in enumerate(flipped.head(THUMBNAILS).iterrows()):
        picture = selection.image_set[int(held_out[int(item["image"])])]
        mark = "✓" if item["right after"] else ("✗" if item["right before"] else "·")
        columns[position % 6].image(images.fit(picture.pixels, (96, 96), "crop"), width="stretch", caption=(
            markup.escape(f"{picture.name}: {item['label']}; {item['before']} → {item['after']} {mark}")))
    with st.expander("The changed image in a table" if len(flipped) == 1 else
                     f"All {len(flipped):,} changed images in a table"):
        st.dataframe(flipped.assign(image=[selection.image_set[int(held_out[int(i)])].name for i in flipped["image"]]),
                     hide_index=True, width="stretch")


def recovery(selection: Selection, selection_map: dict, target: pruning.Target, reason: str | None) -> None:
    """Each cut (the chosen one, a random one of the same size) right after the cut, with its BatchNorms
    re-estimated and fine-tuned until the validation loss stops improving; what the chosen model forgets."""
    st.subheader("Recovery: how much accuracy does the cut cost?")
    st.caption("The labelled images are split once, class by class (seeded): a quarter held out measures every row; "
               "fine-tuning trains on the rest, of which a fifth chooses the epochs. The chosen cut is set beside a "
               "random ranking of whole groups taken to the same number of "
               + ("multiply-adds" if target.kind == "macs" else "parameters")
               + " (Mittal et al. 2018: random cuts often catch up after fine-tuning). Each is measured right after "
                 "the cut, after its BatchNorm statistics are re-estimated on the fine-tuning images (EagleEye, Li "
                 "et al. 2020) and after fine-tuning.")
    labels = labels_of(selection)
    if labels is None or not selection.head.is_classifier:
        st.info("Recovery fine-tunes: it needs labelled images the model's classes name: demo shapes, or an uploaded "
                "zip with one folder per class.")
        return
    if reason:
        st.info("No selected group can be removed, so there is no smaller model to fine-tune.")
        return
    tuning = _tuning_settings("tune", 20, "")  # the defaults: bench/recovery.py
    passes = pruning_jobs.recovery_passes(len(selection.image_set), tuning)
    pressed = st.button(f"Fine-tune and compare (up to {jobs.estimate(selection, passes)} here)", key="prune_tune")
    match = "macs" if target.kind == "macs" else "params"
    key = pruning_jobs.recovery_key(selection, selection_map, tuning, match)
    if not jobs.job_shown(selection, "recovery", pressed, key, jobs.has_result(key), passes):
        return
    with user_errors("Fine-tuning"):
        found = pruning_jobs.recovery(selection, selection_map, tuning, match)
    table = found["table"]
    st.caption(f"Fine-tuned on {table.attrs['images_tuned']:,} images, measured on "
               f"{images.describe_sample(folder_labels(selection), table.attrs['held_out'], markup.escape)} held out.")
    st.plotly_chart(_accuracy_chart(table, "model", "parameters"), width="stretch")
    shown = table.drop(columns="how")
    shown.attrs = {}  # the held-out indices are for the thumbnails, not for the table
    st.dataframe(shown, hide_index=True, width="stretch",
                 column_config={**common.number_columns(table),
                                **{name: st.column_config.NumberColumn(format="percent")
                                   for name in ("accuracy", "low", "high")}})
    for name, how in found["how"].items():
        st.caption(f"{markup.escape(name)}: {markup.escape(how)}.")
    row = _pick_download(st, list(found["models"]), found["best"], found["models"].get, selection.model.file_stem,
                         "recovery_download")
    forgetting(selection, found["forgets"][row], found["held_out"], row)


def steps(selection: Selection, criterion: str, target: pruning.Target) -> None:
    """Pruning in steps to a size, beside one cut and a random ranking of the same sizes given the same budget."""
    st.subheader("Prune in steps to a size")
    st.caption("Practitioners prune in steps with fine-tuning between them (Torch-Pruning's and TF-MOT's schedules, "
               "NetAdapt). Each step re-scores the current model on the fine-tuning images, cuts whole groups to the "
               "step's size (no layer losing more than 90% of its original channels over all steps), re-estimates "
               "the BatchNorms and fine-tunes; beside it, one cut of the original to each step's size by the same "
               "criterion, and a random ranking of groups to the same size, each given as many epochs as the steps "
               "had, every run stopping on its own validation loss. Accuracy on the same held-out quarter.")
    if labels_of(selection) is None or not selection.head.is_classifier:
        st.info("Pruning in steps fine-tunes between the cuts: it needs labelled images the model's classes name.")
        return
    if criterion == "dead":
        st.info("Choose a ranking criterion above (dead filters give no order to take groups in).")
        return
    c1, c2, c3 = st.columns(3)
    measure = links.selectbox(c1, "Keep a share of", ["params", "macs"], param="prune_steps_measure",
                              key="prune_steps_measure",
                              format_func={"params": "parameters", "macs": "multiply-adds"}.get)
    default_keep = target.value if target.kind == measure else 0.5
    keep = links.number(c2, "Share to keep", 0.1, 0.95, float(default_keep), step=0.05, param="prune_steps_keep",
                        key="prune_steps_keep")
    count = links.number(c3, "Steps", 1, 10, 3, param="prune_steps", key="prune_steps")
    tuning = _tuning_settings("prune_steps", 3, "for each step")
    goal = pruning.Target(measure, float(keep))
    passes = pruning_jobs.trade_off_passes(len(selection.image_set), int(count), tuning)
    pressed = st.button(f"Prune in {int(count)} steps and compare (up to {jobs.estimate(selection, passes)} here)",
                        key="prune_steps_go")
    key = pruning_jobs.trade_off_key(selection, criterion, goal, int(count), tuning)
    if not jobs.job_shown(selection, "trade_off", pressed, key, jobs.has_result(key), passes):
        return
    with user_errors("Pruning in steps"):
        curve, tuned = pruning_jobs.trade_off(selection, criterion, goal, int(count), tuning)
    size = "parameters kept" if measure == "params" else "MACs kept"
    chart = px.line(curve, x=size, y="accuracy fine-tuned", color="method", markers=True,
                    error_y=curve["high"] - curve["accuracy fine-tuned"],
                    error_y_minus=curve["accuracy fine-tuned"] - curve["low"],
                    labels={size: f"share of the {'parameters' if measure == 'params' else 'multiply-adds'} kept",
                            "accuracy fine-tuned": "held-out accuracy after fine-tuning"})
    chart.update_xaxes(autorange="reversed")
    chart.update_layout(height=380, margin=dict(t=10))
    st.plotly_chart(chart, width="stretch")
    st.caption(f"Fine-tuned on {curve.attrs['images_tuned']:,} images, measured on {curve.attrs['images_held_out']:,} "
               "held out (bars: Wilson 95% intervals; where the methods' intervals overlap they cannot be told apart "
               "on these images).")
    counts = {name: st.column_config.NumberColumn(format="localized") for name in ("parameters", "MACs")}
    st.dataframe(curve, hide_index=True, width="stretch", column_config={**common.number_columns(curve), **counts})
    final = curve[curve.step == curve.step.max()].set_index("method")
    best = str(final["accuracy fine-tuned"].idxmax())
    _pick_download(st, list(tuned), best, tuned.get, selection.model.file_stem, "steps_download")
