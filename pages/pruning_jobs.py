"""The Pruning page's work: scores, what-if, sweeps, leave-one-out, recovery and the smaller model, each once
per (model, images, settings) for every session."""

from __future__ import annotations


import numpy as np
import pandas as pd
import streamlit as st

from audit import heads, models, pruning
from audit.errors import AuditError
from pages import jobs, markup
from pages.selection import get_model, Selection, set_key, image_set_input, labels_of
from pages.common import sample_of


def scores_key(selection: "Selection") -> tuple:
    return set_key(selection, "filter_scores", "where used", selection.output)


def filter_scores(selection: "Selection"):
    """Pruning scores for every conv layer, once per (model, image set, preprocessing)."""
    key = scores_key(selection)

    def compute():
        x = image_set_input(selection)
        with jobs.model_job(selection, "Scoring every filter (statistics, Taylor, redundancy)") as progress:
            return pruning.filter_scores(selection.compute_model, x, labels_of(selection), output=selection.output,
                                         progress=progress)

    return jobs.shared_result(key, compute)


def chosen_filters(selection: "Selection", scores: pd.DataFrame, criterion: str, target: pruning.Target) -> dict:
    """The filters the criterion and target propose (whole groups: audit.pruning.selection_for), once per
    (model, images, choice), and the shares of parameters and multiply-adds the pruned model keeps."""
    loaded = selection.model

    def compute():
        graph = loaded.dependency_graph()
        chosen = pruning.selection_for(loaded.model, scores, criterion, target, graph)
        full, kept = pruning.kept_cost(graph, set()), pruning.kept_cost(graph, graph.expand(chosen)[0])
        return chosen, kept[0] / full[0], kept[1] / max(full[1], 1)

    return jobs.shared_result(set_key(selection, "chosen_filters", selection.output, criterion, target), compute)


def tuning_passes(images: int, epochs: int, tuning: pruning.Tuning) -> float:
    """Image passes of one recovery at most (audit.pruning.stages) on `images` labelled images: a quarter held out
    and measured at each stage; of the rest, the validation share measured before and after every epoch, the
    others trained on (3 passes each: forward, backward) for up to `epochs`; BatchNorms re-estimated (2 passes)
    before and after."""
    train = 0.75 * images
    per_epoch = 3 * (1 - tuning.validation) * train + tuning.validation * train
    return epochs * per_epoch + 6 * train + 4 * 0.25 * images


def recovery_passes(images: int, tuning: pruning.Tuning) -> float:
    """Image passes of recovery at most: the chosen cut and a random cut of the same size (tuning_passes each)."""
    return 2 * tuning_passes(images, tuning.max_epochs, tuning)


def trade_off_passes(images: int, steps: int, tuning: pruning.Tuning) -> float:
    """Image passes of pruning in steps beside one cut and a random ranking, at most: per step a scoring (3 passes
    per fine-tuning image: forward, Taylor's backward) and a recovery of up to tuning.max_epochs; the one-shot and
    random cuts to step k's size up to k + 1 times as many epochs."""
    scoring = 3 * 0.75 * images
    iterative = steps * (scoring + tuning_passes(images, tuning.max_epochs, tuning))
    one_cut = scoring + sum(tuning_passes(images, tuning.max_epochs * (k + 1), tuning) for k in range(steps))
    return float(iterative + 2 * one_cut)


def trade_off(selection: "Selection", criterion: str, target: pruning.Target, steps: int, tuning: pruning.Tuning):
    """The iterative pruning's rows beside one cut and a random ranking at its sizes (audit.pruning.trade_off),
    and each method's model at the target size as .keras bytes, once per (model, images, choice, steps, tuning)."""
    loaded = selection.model

    def compute():
        x = image_set_input(selection)
        with jobs.model_job(selection, f"Pruning in {steps} steps, beside one cut and a random ranking",
                            "trade_off") as progress:
            tuned, table = pruning.trade_off(loaded.model, x, labels_of(selection), criterion, steps=steps,
                                             tuning=tuning, progress=progress, output=selection.output,
                                             **{target.kind: target.value})
        return table, {method: pruning.keras_bytes(model) for method, model in tuned.items()}

    return jobs.shared_result(trade_off_key(selection, criterion, target, steps, tuning), compute)


def trade_off_key(selection: "Selection", criterion: str, target: pruning.Target, steps: int,
                  tuning: pruning.Tuning) -> tuple:
    return set_key(selection, "trade_off", selection.output, criterion, target, int(steps), tuning)


def what_if(selection: "Selection", chosen: dict[str, list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (or outputs without classes) of the model and of its masked copy on the image
    set, once per (model, images, filters, output)."""
    loaded = selection.model

    def compute():
        x = image_set_input(selection)
        with jobs.model_job(selection, "Running both models on the image set"):
            sweep = pruning.Sweep(selection.compute_model, selection.output, loaded.dependency_graph())
            return sweep.reference(x), sweep.outputs([chosen], x)[0]

    return jobs.shared_result(what_if_key(selection, chosen), compute)


def what_if_key(selection: "Selection", chosen: dict[str, list[int]]) -> tuple:
    return set_key(selection, "what_if", selection.output, tuple((k, tuple(v)) for k, v in chosen.items()))


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

    def compute():
        x, labels = _sample(selection, count)
        with jobs.model_job(selection, "Sensitivity, layer by layer", "sensitivity") as progress:
            return pruning.sensitivity(selection.compute_model, scores, criterion, x, labels, progress=progress,
                                       output=selection.output)

    return jobs.shared_result(sensitivity_key(selection, criterion, count), compute)


def sensitivity_key(selection: "Selection", criterion: str, count: int) -> tuple:
    return set_key(selection, "sensitivity", "stratified", criterion, selection.output, int(count))


def ranking_against_chance(selection: "Selection", scores, layer: str, criterion: str, count: int):
    """One layer pruned by the ranking, its inverse and 20 random rankings on a stratified sample of `count`
    images, once per (model, images, layer)."""

    def compute():
        x, labels = _sample(selection, count)
        with jobs.model_job(selection, "Rankings", "chance") as progress:
            return pruning.ranking_against_chance(selection.compute_model, scores, layer, criterion, x, labels,
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
        with jobs.model_job(selection, f"Leave-one-filter-out on {markup.count(total, 'filter')} of {markup.count(len(layers), 'layer')}", "loo") \
                as progress:
            for layer, before in zip(layers, np.cumsum([0] + sizes[:-1])):
                changes = pruning.leave_one_out(
                    selection.compute_model, layer, x, labels, output=selection.output,
                    progress=lambda i, n, before=int(before), layer=layer: progress(
                        before + min(i, n), total, f"{before + min(i, n)} / {total} filters (now {layer})"))
                frames.append(pd.DataFrame({"layer": layer, "filter": np.arange(len(changes)), "cost": changes}))
        return pd.concat(frames, ignore_index=True)

    return jobs.shared_result(leave_one_out_key(selection, layers, count), compute)


def leave_one_out_key(selection: "Selection", layers: tuple[str, ...], count: int) -> tuple:
    return set_key(selection, "leave_one_out", "stratified", tuple(layers), int(count), selection.output)


def recovery_key(selection: "Selection", chosen: dict[str, list[int]], tuning: pruning.Tuning, match: str) -> tuple:
    return set_key(selection, "recovery", selection.output, tuning, match,
                   tuple((k, tuple(v)) for k, v in chosen.items()))


def recovery(selection: "Selection", chosen: dict[str, list[int]], tuning: pruning.Tuning, match: str) -> dict:
    """The chosen cut and a random cut of the same size (`match`: parameters or multiply-adds), each cut, with its
    BatchNorms re-estimated and fine-tuned (audit.pruning.recovery), once per (model, images, filters, settings):
    the table, every smaller model as .keras bytes, what each fine-tuning did, and per row what the cut forgets
    on the held-out images (audit.pruning.forgets)."""
    loaded = selection.model

    def compute():
        x, labels = image_set_input(selection), labels_of(selection)
        with jobs.model_job(selection, "Fine-tuning the pruned model and a random one of the same size",
                            "recovery") as progress:
            found = pruning.recovery(loaded.model, chosen, x, labels, tuning, output=selection.output,
                                     progress=progress, match=match)
        held_out = found.table.attrs["held_out"]
        names = selection.class_names()
        before = heads.Outputs(loaded.model, selection.output)(x[held_out])
        forgets = {name: pruning.compare(before, heads.Outputs(model, selection.output)(x[held_out]),
                                         labels[held_out], names) for name, model in found.models.items()}
        return {"table": found.table, "best": found.best(), "held_out": held_out, "forgets": forgets,
                "how": {name: tuned.describe() for name, tuned in found.tuned.items()},
                "models": {name: pruning.keras_bytes(model) for name, model in found.models.items()}}

    return jobs.shared_result(recovery_key(selection, chosen, tuning, match), compute)


@st.cache_data(show_spinner="Building the smaller model…", max_entries=8)
def pruned_export(fingerprint: str, source: str, selection_key: tuple, share: float | None = None
                  ) -> tuple[bytes, dict, str | None, pd.DataFrame]:
    """The smaller model as .keras bytes, its before/after sizes, why the masked one is given instead (when
    no selected group can go), and per layer what was removed and what was kept and why."""
    import tempfile
    from pathlib import Path

    loaded = get_model(source)
    graph = loaded.dependency_graph()
    chosen = {layer: list(filters) for layer, filters in selection_key}
    reason = None
    with loaded.lock:
        plan = pruning.plan(loaded.model, chosen, graph, share=share)
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
                "file size, saved by Keras (bytes)": (original.stat().st_size, len(data)),
            }
    return data, sizes, reason, plan


SPEED_REPEATS = 10
"""Timed calls at batch 1 (half as many at the serving batch), after 3 warm-up calls, for each of the two models."""


def speed_passes(selection: "Selection") -> float:
    """Image passes of timing both models: (3 + 10) calls of one image and (3 + 5) of the serving batch each."""
    batch = pruning.throughput_batch(selection.model.model)
    return 2 * ((3 + SPEED_REPEATS) + (3 + SPEED_REPEATS // 2) * batch)


def speed_key(selection: "Selection", selection_key: tuple) -> tuple:
    return (selection.model.fingerprint, selection.device, "speed", selection_key)


def pruned_speed(selection: "Selection", selection_key: tuple) -> pd.DataFrame:
    """Latency at batch 1 and throughput at the serving batch of the model and of its smaller copy, on this
    machine, as table rows (name, before, after): timed in a job (minutes for VGG16 at batch 64 on 2 cores)."""
    loaded = selection.model

    def compute():
        with jobs.model_job(selection, "Timing both models") as progress:
            progress(0, 2)
            chosen = {layer: list(filters) for layer, filters in selection_key}
            with loaded.lock:
                try:
                    smaller = pruning.prune(loaded.model, chosen, loaded.dependency_graph())
                except AuditError:
                    smaller = pruning.masked(loaded.model, chosen, loaded.dependency_graph())
            batch = pruning.throughput_batch(loaded.model)
            before = pruning.speed(loaded.model, SPEED_REPEATS, batch_size=batch)
            progress(1, 2)
            after = pruning.speed(smaller, SPEED_REPEATS, batch_size=batch)
        return pd.DataFrame([(f"{name} here", before[name], after[name]) for name in before],
                            columns=["", "before", "after"])

    return jobs.shared_result(speed_key(selection, selection_key), compute)


@st.cache_data(show_spinner="Exporting the SavedModel…", max_entries=4)
def pruned_saved_model(fingerprint: str, source: str, selection_key: tuple) -> bytes:
    """The smaller model as a zipped SavedModel (for TF Serving), built when its download is pressed."""
    loaded = get_model(source)
    with loaded.lock:
        smaller = pruning.prune(loaded.model, {layer: list(filters) for layer, filters in selection_key},
                                loaded.dependency_graph())
        return pruning.saved_model_zip(smaller)
