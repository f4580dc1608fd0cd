"""Does every capability work on this model? Each is run once, small, and reported as a cell.

A cell is "ok", "refused" (an AuditError: the audit says why, in words meant for the user) or
"failed" (anything else: a bug of ours). The conformance suite runs this over the architectures
users bring (audit.zoo.architectures, saved and loaded back from files), the README's table of tested
architectures is generated from it, the benchmarks print its first-call times, and
`python -m audit check --model FILE` runs it on a user's own model.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from audit import activations, attribution, filters, images, models, pruning, quantization, usage
from audit.errors import AuditError

# Small settings: every method runs, none for long.
METHOD_OPTIONS = {
    "SmoothGrad": {"samples": 4}, "Integrated Gradients": {"steps": 8}, "Score-CAM": {"max_channels": 4},
    "Occlusion": {"patch": 16, "stride": 16},
}
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")


@dataclass
class Cell:
    capability: str
    status: str  # "ok", "refused" or "failed"
    detail: str = ""
    seconds: float = 0.0


def _run(capability: str, work: Callable[[], object]) -> Cell:
    start = time.perf_counter()
    try:
        work()
    except AuditError as exc:
        return Cell(capability, "refused", str(exc), time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 (a failure is what this records)
        return Cell(capability, "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                    time.perf_counter() - start)
    return Cell(capability, "ok", "", time.perf_counter() - start)


def _finite(values) -> None:
    """Raise when any number (in an array, a list of outputs or a table) is NaN or infinite."""
    import keras

    for part in keras.tree.flatten(values) if isinstance(values, (list, tuple)) else [values]:
        part = np.asarray(part, np.float64)
        if not np.all(np.isfinite(part)):
            raise ValueError(f"non-finite values ({np.size(part) - np.isfinite(part).sum()} of {np.size(part)})")


def check(loaded: models.LoadedModel, progress: Callable[[int, int], None] | None = None) -> list[Cell]:
    """Every capability on one model, with the sample photos; nothing is cached."""
    model = loaded.model
    x = loaded.preprocess([images.sample(name) for name in PHOTOS])
    convs = models.conv_layers(model)
    head = loaded.head()
    first, nested = (convs[0] if convs else ""), [path for path in convs if "/" in path]
    late = models.cam_layer(model) if convs else ""  # the map the head reads (may follow the last conv)
    late_conv = usage.last_spatial_conv(model) if convs else ""
    deepest = nested[len(nested) // 2] if nested else (convs[len(convs) // 2] if convs else "")
    late_options = filters.default_options(model, late, loaded.preprocessing)
    quick = {"steps": 2, "size": min(64, loaded.input_size[0])}
    class_target = 0 if head.is_classifier else (
        attribution.FilterTarget(late, 0) if late else None)

    def scores():
        table = pruning.filter_scores(model, x, output=head.output if head.is_classifier else None)
        _finite(table[["l1", "mean", "fpgm"]].to_numpy(np.float64))
        _finite(table.apoz.dropna().to_numpy(np.float64))  # NaN only where the measured output has no zero floor
        if head.is_classifier:
            _finite(table["taylor"].to_numpy(np.float64))

    def sanity():
        rows = attribution.sanity_check(model, x[0], attribution.saliency, class_target, limit=3)
        _finite([value for _, value in rows])

    def int8_simulation():
        layers = quantization.quantized_layers(model)
        frame, _ = quantization.activation_ranges(model, layers, x[:2])
        simulated = quantization.fake_quantized(model, quantization.per_tensor_ranges(frame), layers)
        _finite(quantization.outputs(simulated, x[:2], head))

    def masks():
        channels = pruning.filter_kernels(model, first).shape[-1]
        copy = pruning.masked(model, {first: [0], late_conv: [channels % 2]} if late_conv != first else {first: [0]})
        _finite(copy(x[:1], training=False))

    work: list[tuple[str, Callable[[], object]]] = [
        ("layer table", lambda: models.layer_table(model)),
        ("predictions", lambda: _finite(loaded.predict(x))),
        ("sub-model inside nesting", lambda: _finite(models.submodel(model, deepest)(x[:1]))),
        ("activation maps", lambda: _finite(activations.layer_maps(model, late, x[:1]))),
        ("statistics", lambda: _finite(activations.filter_stats(model, [first, late], x)[["mean", "std", "max"]])),
        ("gallery, first layer", lambda: filters.render(
            model, first, [0, 1], filters.Options(**quick, preprocessing=loaded.preprocessing))),
        ("gallery, late layer", lambda: filters.render(
            model, late, [0, 1], dataclasses.replace(late_options, **quick, octaves=2, warmup=1))),
    ]
    if head.is_classifier:
        work.append(("class images", lambda: filters.class_images(
            model, [0, 1], filters.Options(**quick, preprocessing=loaded.preprocessing))))
    black = loaded.preprocess(np.zeros((*loaded.input_size, 3), np.uint8))[0]
    for name, method in attribution.METHODS.items():
        options = dict(METHOD_OPTIONS.get(name, {}))
        options.update({"Integrated Gradients": {"black": black}, "Score-CAM": {"fill": black},
                        "Occlusion": {"fill": black}}.get(name, {}))
        for label, target in (("default target", None), ("class 0" if head.is_classifier else "a filter",
                                                         class_target)):
            work.append((f"{name}, {label}", lambda method=method, target=target, options=options: _finite(
                method(model, x[0], target, **options))))
    work += [
        ("sanity check", sanity),
        ("filter scores", scores),
        ("masks", masks),
        ("int8 simulation", int8_simulation),
    ]
    graph = loaded.dependency_graph()
    for kind, group in group_kinds(graph).items():
        work.append((f"surgery, {kind}", lambda group=group: _cut_equals_masked(model, graph, group, x[:1])))
    if not any(name.startswith("surgery") for name, _ in work):
        work.append(("surgery", lambda: pruning.prune(model, {late_conv: [0]}, graph)))
    cells = []
    for done, (capability, job) in enumerate(work):
        cells.append(_run(capability, job))
        if progress is not None:
            progress(done + 1, len(work))
    return cells


GROUP_KINDS = ("chain", "residual", "squeeze-excite", "depthwise", "concatenation")
_MERGES = {"Add", "Subtract", "Average", "Maximum", "Minimum"}


def group_kinds(graph) -> dict[str, object]:
    """One removable dependency group of each kind the model has: channels tied by a concatenation, by a
    multiplication (a squeeze-and-excitation gate), by a residual merge, through a depthwise layer, or a plain
    chain's filter alone."""
    kind_of = {call.path: call.kind for call in graph.calls}
    found = {}
    for group in graph.groups():
        if group.locked:
            continue
        couplers = {kind_of.get(path, "") for path in group.coupled_by}
        members = {kind_of.get(path, "") for path in group.filters}
        kind = ("concatenation" if "Concatenate" in couplers else "squeeze-excite" if "Multiply" in couplers
                else "residual" if couplers & _MERGES
                else "depthwise" if any(member.startswith("Depthwise") for member in members) else "chain")
        found.setdefault(kind, group)
    return {kind: found[kind] for kind in GROUP_KINDS if kind in found}


def _cut_equals_masked(model, graph, group, x) -> None:
    """Remove one group (by its first filter) and check the smaller model computes what the masked one does."""
    layer, channels = next(iter(group.filters.items()))
    selection = {layer: [channels[0]]}
    import keras

    smaller = pruning.prune(model, selection, graph)
    expected = keras.tree.flatten(pruning.masked(model, selection, graph)(x, training=False))
    got = keras.tree.flatten(smaller(x, training=False))
    for mine, theirs in zip(got, expected, strict=True):  # every output of a multi-output model
        mine, theirs = np.asarray(mine, np.float64), np.asarray(theirs, np.float64)
        error = float(np.abs(mine - theirs).max() / max(np.abs(theirs).max(), 1e-12))
        if not error <= 1e-4:
            raise ValueError(f"the smaller model differs from the masked one by {error:.2g} (relative)")


# --- the README's table ----------------------------------------------------------------------

TABLE_START = "<!-- architectures table: generated by python -m bench.architectures --readme -->"
TABLE_END = "<!-- end of the architectures table -->"
GROUPS = {
    "Layers, maps, statistics": ("layer table", "predictions", "sub-model inside nesting", "activation maps",
                                 "statistics"),
    "Galleries": ("gallery, first layer", "gallery, late layer", "class images"),
    "Attribution": tuple(attribution.METHODS),
    "Sanity check": ("sanity check",),
    "Scores, masks": ("filter scores", "masks"),
    "Surgery": ("surgery",),
    "int8": ("int8 simulation",),
    "Report": ("report",),
    "CLI": ("cli stats", "cli scores", "cli prune", "cli quantize"),
}


@dataclass
class Summary:
    """One model's line of the table: how it was read, and its cells."""

    source: str
    preprocessing: str
    head: str
    cells: list[Cell]


def summarise(loaded: models.LoadedModel, source: str, cells: list[Cell]) -> Summary:
    head = loaded.head()
    if not head.is_classifier:
        read = "no classes"
    elif head.binary:
        read = "binary (one unit)"
    else:
        read = f"{head.classes} classes, {'logits' if head.point.where == 'output' else head.distribution}"
    return Summary(source, loaded.preprocessing, read, cells)


def _group_cell(cells: list[Cell], capabilities: tuple[str, ...]) -> str:
    chosen = [cell for cell in cells if cell.capability.split(",")[0] in capabilities
              or cell.capability in capabilities]
    if not chosen:
        return "n/a"
    ok = sum(cell.status == "ok" for cell in chosen)
    if ok == len(chosen):
        return f"ok ({ok})" if len(chosen) > 1 else "ok"
    problems = [cell for cell in chosen if cell.status != "ok"]
    reasons = "; ".join(dict.fromkeys(f"{cell.status}: {_first_sentence(cell.detail)}" for cell in problems))
    return (f"{ok} of {len(chosen)} ok; " if len(chosen) > 1 else "") + reasons.replace("|", "/")


def _first_sentence(text: str, limit: int = 160) -> str:
    sentence = text.split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= limit else sentence[:limit].rsplit(" ", 1)[0] + " …"


def markdown_table(summaries: dict[str, Summary]) -> str:
    """The README's table: one row per architecture, one column per group of capabilities."""
    header = ["Model", "Source", "Read as", "Preprocessing", *GROUPS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, summary in summaries.items():
        row = [name, summary.source, summary.head, summary.preprocessing]
        row += [_group_cell(summary.cells, capabilities) for capabilities in GROUPS.values()]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
