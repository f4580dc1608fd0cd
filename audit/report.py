"""A self-contained HTML report of an audit, for people who will not open the dashboard.

One file: the layer table, dead-filter chart, filter galleries, attribution overlays and pruning
candidates, with images as inline PNG and charts as Plotly with its script inlined once, so it opens
offline and can be attached to a ticket. The dashboard's Report page and `cnn-audit report`
both call `build`.
"""

from __future__ import annotations

import base64
import html
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from audit import (activations, attribution, charts, cost, filters, heads, images, limits, models, precision,
                   pruning, render, usage)
from audit.errors import AuditError

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ReportOptions:
    gallery_layers: tuple[str, ...] = ()  # empty: the first and the last conv layer with a map (usage)
    gallery_filters: int = 8
    gallery_steps: int = 0  # 0: each layer's default
    attribution_images: int = 4
    methods: tuple[str, ...] = ("Grad-CAM", "Saliency")
    prune_criterion: str = "dead"  # as on the Pruning page (audit.pruning.CRITERIA)
    prune_target: str = "layer"  # what the share counts (audit.pruning.TARGET_KINDS), as on the Pruning page
    prune_share: float = 0.3  # the target's share: to cut (layer, global) or to keep (params, macs); not for "dead"
    near_dead_apoz: float = 0.99
    fit: str = "crop"
    preprocessing: str = ""  # empty: the model's own
    precision: str = ""  # of the heavy passes: empty, this machine's (audit.device.precision)
    quantize: bool = True  # the int8 section: ranges, the converted model measured with the interpreter
    timing: bool = True  # time the model and the cut one here (milliseconds, images per second)


@dataclass
class _Stages:
    """Counts finished steps of the whole report for one progress bar."""

    total: int
    progress: Progress | None
    done: int = field(default=0)

    def step(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


def _png(pixels: np.ndarray, width: int = 160) -> str:
    data = base64.b64encode(render.png(np.asarray(pixels, dtype=np.uint8))).decode()
    return f'<img src="data:image/png;base64,{data}" width="{width}" alt="">'


def _figure(fig, first: bool, nonce: str) -> str:
    """A Plotly figure whose scripts carry the page's nonce: the only scripts its policy lets run."""
    fig.update_layout(margin=dict(t=20, b=10), template="plotly_white")
    return fig.to_html(full_html=False, include_plotlyjs=True if first else False).replace(
        "<script", f'<script nonce="{nonce}"')


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, border=0, classes="data", float_format=lambda v: f"{v:.4g}", na_rep="")


EXAMPLES = 4
"""Dataset examples per gallery filter: the top four patches, two by two."""


def _figure_cell(pixels: np.ndarray, caption: str) -> str:
    return f"<figure>{_png(pixels)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def attribution_maps(loaded: models.LoadedModel, item: images.LabelledImage, target: attribution.Target,
                     options: ReportOptions, chosen: str = "float32") -> dict[str, np.ndarray]:
    """The report's maps of one image: attribution.explain, the dashboard's own path, with each method's
    defaults (black baselines and fills are black pixels under the report's preprocessing and fit)."""
    with attribution.shared_passes():  # the CAM methods of one image read one pass
        return {method: attribution.explain(loaded, item.pixels, method, target, options.preprocessing or None,
                                            options.fit, precision=chosen)
                for method in options.methods}


def build(loaded: models.LoadedModel, image_set: list[images.LabelledImage], options: ReportOptions = ReportOptions(),
          progress: Progress | None = None) -> str:
    """The report as one HTML string. Raises AuditError for an empty image set or unknown layers.

    A long job: where others share the model, the caller holds `loaded.job_lock` (the dashboard's
    model_job does)."""
    if not image_set:
        raise AuditError("The report needs at least one image.")
    model = loaded.model
    nonce = secrets.token_urlsafe(16)  # the page runs only its own scripts: a name that slipped escaping runs none
    given = len(image_set)
    image_set = image_set[:cost.inputs_within(model, limits.BATCH_BYTES.value)]  # held preprocessed
    chosen = options.precision or precision.decide(model, loaded.input_size)[0]  # bfloat16 where native and faster
    convs = models.conv_layers(model)
    if not convs:
        raise AuditError("The model has no convolutional layer to audit.")
    gallery_layers = [models.resolve_layer(model, name) for name in options.gallery_layers] or \
        list(dict.fromkeys([convs[0], usage.last_spatial_conv(model)]))  # not a 1 x 1 classifier conv
    preprocessing = options.preprocessing or loaded.preprocessing
    shown = image_set[:options.attribution_images]
    stages = _Stages(2 + len(gallery_layers) + len(shown) + int(options.quantize), progress)

    x = loaded.preprocess([item.pixels for item in image_set], preprocessing, options.fit)
    head = loaded.head()
    names, origin = heads.class_names(loaded.class_names, head, [item.label for item in image_set])
    labels = None
    if head.is_classifier and all(item.label in names for item in image_set):
        labels = np.array([names.index(item.label) for item in image_set])
    outputs = loaded.predict(x)
    stages.step()
    compute = precision.for_compute(model, chosen)
    scores = pruning.filter_scores(compute, x, labels, near_dead_apoz=options.near_dead_apoz)
    stages.step()
    sections = []

    table = models.layer_table(model)
    leaves = table[~table.is_container]
    summary = {
        "Model": loaded.title, "Fingerprint": loaded.fingerprint, "Layers": len(leaves),
        "Conv layers": len(convs), "Parameters": f"{int(leaves.params.sum()):,}",
        "Multiply-adds per image": f"{pruning.flops(model):,}", "Images": len(image_set),
        "Preprocessing": preprocessing,
        "Computed in": ("bfloat16 (statistics, scores, galleries and attribution; Integrated Gradients in float32; "
                        "see the definitions for the agreement with float32)" if compute is not model else "float32"),
    }
    warning = ""
    if head.is_classifier:
        found = pruning.knowledge(outputs, labels)
        if labels is not None:
            summary["Accuracy on the images"] = (f"{found['accuracy']:.1%} (95% interval {found['low']:.0%}–"
                                                 f"{found['high']:.0%}; {images.describe_sample(labels, range(len(labels)))}"
                                                 f"; chance {found['chance']:.0%})")
        if origin and origin != "the model":
            summary["Class names"] = f"from {origin}"
        if found["at_chance"]:
            why = ("its accuracy's interval reaches chance" if labels is not None else
                   f"its outputs are near flat (mean normalised entropy {found['entropy']:.2f})")
            warning = (f"<p class='warning'><strong>The model is at chance on these images</strong>: {why}. The "
                       "explanations and pruning candidates below describe noise, not knowledge.</p>")
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items())
    if len(image_set) < given:
        warning += (f"<p class='warning'>The first {len(image_set):,} of the {given:,} images: their model input is "
                    f"held in memory, {cost.input_bytes(model) / 2**20:.1f} MB each, within "
                    f"{limits.BATCH_BYTES.value / 2**30:.1f} GB (CNN_AUDIT_MAX_BATCH_BYTES).</p>")
    sections.append(f"<h2>Model</h2><p>{html.escape(loaded.description)}</p>{warning}"
                    f"<table class='summary'>{rows}</table>")
    layers = table.assign(output_shape=table.output_shape.map(str), kernel_size=table.kernel_size.map(str),
                          strides=table.strides.map(str))
    sections.append(f"<details><summary>Layer table ({len(table)} rows)</summary>{_table(layers)}</details>")

    counts = activations.dead_counts(scores, options.near_dead_apoz)
    chart = charts.dead_bars(counts)
    most = charts.most_idle(counts)
    most = f" Most dead or near-dead: {html.escape(most)}." if most else ""
    sections.append(f"<h2>Dead filters</h2><p>Over {len(image_set)} images, each filter measured where its channel is "
                    "used (after its BatchNorm and activation). Dead: never above 0 (APoZ = 1); near-dead: the others "
                    f"with APoZ (share of values at or below 0) above {options.near_dead_apoz}. No zero floor: the "
                    "filter is used after an activation that is not a ReLU (ELU, swish, linear), where a value at or "
                    "below 0 is not \"off\", so neither is counted." + most + "</p>"
                    f"{_figure(chart, first=True, nonce=nonce)}{_table(counts)}")

    galleries = []
    for layer in gallery_layers:
        count = min(options.gallery_filters, models.output_channels(model, layer))
        settings = filters.default_options(model, layer, preprocessing, filters.default_parameterization(model, layer))
        if options.gallery_steps:
            settings = filters.Options(**{**settings.__dict__, "steps": options.gallery_steps})
        result = filters.render(compute, layer, list(range(count)), settings)
        cells = "".join(_figure_cell(image, f"#{i} · {value:.3g}" + ("" if ok else " · no response" if started
                                                                        else " · never started"))
                        for i, (image, value, ok, started) in enumerate(zip(result.images, result.activations,
                                                                            result.responded, result.started)))
        found = filters.top_examples(compute, layer, x, list(range(count)), k=EXAMPLES)
        cut = filters.patches(model, found, [images.fit(item.pixels, loaded.input_size, options.fit)
                                             for item in image_set], context=filters.CONTEXT_SIDE)
        examples = "".join(_figure_cell(render.patch_grid([cut[n] for n in np.flatnonzero(found["filter"] == i)], EXAMPLES),
                                        f"#{i} fires on " + ", ".join(image_set[int(n)].name for n in
                                                                      found.loc[found["filter"] == i, "image"]))
                           for i in range(count))
        galleries.append(f"<h3>{html.escape(layer)}: first {count} filters</h3><div class='grid'>{cells}</div>"
                         f"<p>What they fire on in these {len(image_set)} images: the {EXAMPLES} images where each "
                         "filter's peak is highest, cut at its receptive field around the peak (a field under "
                         f"{filters.CONTEXT_SIDE} px is framed in yellow inside a window of that side).</p>"
                         f"<div class='grid'>{examples}</div>")
        stages.step()
    sections.append("<h2>Filter galleries</h2><p>Inputs grown from noise by gradient ascent on each filter's mean "
                    "activation; under each tile its final activation. No response: the final image does not drive the "
                    "filter above 0; never started: the ascent never moved it above 0 (no gradient through its "
                    "ReLU).</p>" + "".join(galleries))

    fitted = [images.fit(item.pixels, loaded.input_size, options.fit) for item in shown]
    classes = loaded.head().is_classifier
    rows = []
    for item, picture, xi in zip(shown, fitted, x[:len(shown)]):
        if classes:
            target = int(np.argmax(outputs[len(rows)]))
            said = names[target] + f" ({outputs[len(rows)][target]:.2f})"
        else:
            target = attribution.resolve_target(model, xi, None)
            said = f"filter {target.index} of {target.layer}"
        cells = [_figure_cell(picture, f"{item.name}: {said}")]
        for method, values in attribution_maps(loaded, item, target, options, chosen).items():
            cells.append(_figure_cell(render.overlay(picture, values, 0.5, "Jet"), method))
        rows.append(f"<div class='grid'>{''.join(cells)}</div>")
        stages.step()
    sections.append("<h2>Attribution</h2><p>For the top-1 class (score before the softmax) or, without a class "
                    "output, the most active filter of the last conv layer.</p>" + "".join(rows))

    target = pruning.Target(options.prune_target, options.prune_share)
    selection = pruning.selection_for(loaded.model, scores, options.prune_criterion, target, loaded.dependency_graph())
    candidates = pruning.proposed(scores, selection, options.prune_criterion)
    per_layer = (candidates.groupby(["layer", "why"], sort=False).size().unstack(fill_value=0)
                 .reindex(counts.layer, fill_value=0).reset_index())
    whys = [column for column in per_layer.columns if column != "layer"]
    chart = charts.layer_bars(per_layer, whys, {"dead": "#d62728", "near-dead": "#ff7f0e"})
    chosen = ("dead or near-dead, with their groups" if options.prune_criterion == "dead" else
              f"whole groups by {pruning.CRITERIA[options.prune_criterion]} to the {target.describe()}")
    columns = ["layer", "filter", "why", "measured_at", "l1", "apoz", "mean", "taylor", "redundancy", "nearest"]
    sections.append(f"<h2>Pruning candidates</h2><p>{len(candidates)} of {len(scores)} filters: {html.escape(chosen)}. "
                    "Check them on the dashboard's Pruning page before cutting.</p>"
                    f"{_figure(chart, first=False, nonce=nonce)}"
                    f"<details><summary>Candidates table</summary>{_table(candidates[columns])}</details>")
    sections.append(_what_the_cut_costs(loaded, selection, x, labels, names, image_set, options.fit,
                                        options.timing))
    if options.quantize:
        sections.append(_int8(model, x, labels, head, nonce))
        stages.step()

    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return _PAGE.format(title=html.escape(f"CNN Audit: {loaded.title}"), made=made, nonce=nonce,
                        body="\n".join(sections), columns=GRID_COLUMNS)


def _what_the_cut_costs(loaded, selection: dict, x: np.ndarray, labels: np.ndarray | None, names: list[str],
                        image_set: list, fit: str, timing: bool = True) -> str:
    """The candidates cut for real (no fine-tuning): sizes and speed here, and with labels what the cut forgets
    per class and which images change their answer (Hooker et al. 2019)."""
    try:
        smaller = pruning.prune(loaded.model, selection, loaded.dependency_graph())
    except AuditError as exc:  # PruningError, or a graph that cannot be copied
        return f"<h3>What the cut costs</h3><p>{html.escape(str(exc))}</p>"
    sizes = {"Parameters": (loaded.model.count_params(), smaller.count_params()),
             "Multiply-adds per image": (pruning.flops(loaded.model), pruning.flops(smaller))}
    if timing:
        batch = pruning.throughput_batch(loaded.model)
        before, after = pruning.speed(loaded.model, batch_size=batch), pruning.speed(smaller, batch_size=batch)
        sizes.update({f"{name} here": (before[name], after[name]) for name in before})
    rows = "".join(f"<tr><th>{html.escape(name)}</th><td>{a:,.4g}</td><td>{b:,.4g}</td><td>{b / a - 1:+.1%}</td></tr>"
                   for name, (a, b) in sizes.items())
    text = (f"<h3>What the cut costs</h3><p>The candidates removed with their groups, before any fine-tuning (the "
            "dashboard's Pruning page fine-tunes and compares with a random cut of the same size).</p>"
            f"<table class='summary'><tr><th></th><th>before</th><th>after</th><th>change</th></tr>{rows}</table>")
    if labels is None:
        return text + "<p>Without labelled images there is no per-class accuracy to compare.</p>"
    found = pruning.forgets(loaded.model, smaller, x, labels, names)
    overall, flagged = found.overall, found.flagged()
    classes = found.classes.drop(columns=["before low", "before high", "after low", "after high"])
    text += (f"<p>On the {overall['images']} images: accuracy {overall['accuracy before']:.1%} before, "
             f"{overall['accuracy after']:.1%} right after the cut. "
             + (f"<strong>Lost significantly more than the set</strong>: {html.escape(', '.join(flagged))}. "
                if flagged else "No class lost significantly more than the set. ")
             + f"{overall['flipped']} images changed their answer.</p>{_table(classes)}")
    cells = "".join(_figure_cell(images.fit(image_set[int(row.image)].pixels, loaded.input_size, fit),
                                 f"{image_set[int(row.image)].name}: {row.label}; {row.before} → {row.after}")
                    for row in found.flipped.head(GRID_COLUMNS).itertuples())
    return text + (f"<div class='grid'>{cells}</div>" if cells else "")


def _int8(model, x: np.ndarray, labels: np.ndarray | None, head, nonce: str) -> str:
    """What int8 does: the layers whose ranges break per-tensor int8, and the integer model (TensorFlow Lite,
    calibrated on every other image, measured on the rest) beside the float one."""
    from audit import quantization

    title = "<h2>Quantisation to int8</h2>"
    if len(x) < 2:
        return title + "<p>Quantising needs at least 2 images (some to calibrate, others to measure on).</p>"
    calibration, held_out = x[::2], x[1::2]
    held_labels = None if labels is None else labels[1::2]
    frame = quantization.ranges(model, calibration)
    problems = quantization.problems(frame)
    flagged = problems[problems.flag != ""]
    chart = charts.layer_bars(problems.fillna(0), ["weights_outlier_ratio", "activations_outlier_ratio",
                                                   "activations_tail"], barmode="group", value_title="ratio",
                              log=True)
    try:
        content = quantization.convert(model, calibration)
        baseline = quantization.convert(model, calibration, integer=False)
    except AuditError as exc:
        return title + f"<p>{html.escape(str(exc))}</p>"
    reference = quantization.raw_outputs(model, held_out, head)
    floated = quantization.evaluate(baseline, held_out, held_labels, reference, head=head)
    measured = quantization.evaluate(content, held_out, held_labels, reference, head=head)
    rows = ""
    for name, result in (("float32 .tflite", floated), ("int8 .tflite", measured)):
        said = "; ".join(f"{measure} {result[measure]:.1%} ({result[measure + '_low']:.0%}–"
                         f"{result[measure + '_high']:.0%})" for measure in ("accuracy", "agreement") if measure in result)
        said += ("; " if said else "") + f"relative error {result['relative_error']:.3g}"
        rows += (f"<tr><th>{name}</th><td>{result['bytes'] / 2**20:.2f} MB</td>"
                 f"<td>{1000 * result['seconds_per_image']:.2f} ms</td><td>{result['images_per_second']:,.0f}</td>"
                 f"<td>{html.escape(said)}</td></tr>")
    return (title + f"<p>Weights int8 per output channel, activations int8 per tensor, calibrated on "
            f"{len(calibration)} of the images and measured on the other {len(held_out)} with the LiteRT "
            "interpreter on this machine. Per layer, the widest channel over the median one and the activations' "
            "maximum over their 99.9th percentile: large ratios break one scale per tensor.</p>"
            f"{_figure(chart, first=False, nonce=nonce)}"
            + (f"<p>Flagged: {html.escape('; '.join(f'{r.layer}: {r.flag}' for r in flagged.itertuples()))}</p>"
               if len(flagged) else "<p>No layer flagged.</p>")
            + "<table class='summary'><tr><th></th><th>size</th><th>batch 1</th><th>images/s at batch 32</th>"
            f"<th>on the held-out images</th></tr>{rows}</table>"
            "<p>The dashboard's Quantisation page simulates int8 layer by layer, keeps chosen layers in float and "
            "offers the .tflite file.</p>")


GRID_COLUMNS = 8  # tiles per row: a gallery of the default 8 filters is one row, an image and its maps another

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'nonce-{nonce}' 'unsafe-eval'; style-src 'unsafe-inline'; img-src data:; font-src data:">
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }}
h1 {{ margin-bottom: 0; }} .made {{ color: #777; }}
table.data, table.summary {{ border-collapse: collapse; font-size: 0.85rem; }}
table.data td, table.data th, table.summary td, table.summary th {{ padding: 2px 8px; border-bottom: 1px solid #eee;
  text-align: left; }}
.grid {{ display: grid; grid-template-columns: repeat({columns}, minmax(0, 1fr)); gap: 8px; margin-bottom: 8px; }}
figure {{ margin: 0; }} .warning {{ background: #fff3cd; padding: 8px 12px; border-radius: 4px; }} figcaption {{ font-size: 0.75rem; color: #555; overflow-wrap: anywhere; }}
.grid img {{ width: 100%; height: auto; image-rendering: pixelated; border-radius: 4px; }}
</style></head><body>
<h1>{title}</h1><p class="made">Made {made} by CNN Audit.</p>
{body}
</body></html>
"""
