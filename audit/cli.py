"""The command line: audit a model in a pipeline, without a browser.

    python -m audit report --model demo:shapes --images shapes:60 --out report.html
    python -m audit stats --model path/to/model.keras --images photos/ --csv stats.csv
    python -m audit prune --model demo:shapes --images shapes:480 --share 0.5 --fine-tune 1 --out pruned.keras
    python -m audit check --model path/to/model.keras

Exit codes: 0 done, 1 the audit refused the input (the message is the dashboard's), 2 bad usage,
3 `check` found a capability that failed (a bug of ours), 130 interrupted. A progress bar goes to
stderr, so stdout stays clean for `--csv -`.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from contextlib import contextmanager
from pathlib import Path

from audit.errors import AuditError

IMAGES_HELP = "a folder (one subfolder per class gives labels), a .zip, 'photos' (scikit-image's) or 'shapes:N'"


def _source(text: str) -> str:
    """A model source; a bare path to an existing file is taken as file:<path>."""
    return f"file:{text}" if ":" not in text or Path(text).is_file() else text


def read_images(spec: str):
    """The image set named on the command line."""
    from audit import images

    if spec == "photos":
        return [images.LabelledImage(name, images.sample(name)) for name in images.SAMPLE_PHOTOS]
    if spec.startswith("shapes:"):
        from audit.zoo import shapes

        try:
            count = int(spec.split(":", 1)[1])
        except ValueError:
            raise AuditError(f"{spec!r}: expected shapes:N with N a whole number.") from None
        return shapes.labelled(shapes.generate(count, 12345))
    path = Path(spec)
    if path.is_file() and path.suffix.lower() == ".zip":
        return images.read_zip(path.read_bytes())
    return images.read_folder(path)


@contextmanager
def progress_bar(label: str, quiet: bool):
    """A rich progress bar on stderr yielding a (done, total) callback."""
    if quiet:
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _report(args) -> int:
    from audit import models, report

    loaded = models.load(_source(args.model))
    image_set = read_images(args.images)
    options = report.ReportOptions(
        gallery_layers=tuple(args.gallery_layers or ()), gallery_filters=args.gallery_filters,
        gallery_steps=args.steps, attribution_images=args.attribution_images,
        methods=tuple(args.methods), prune_share=args.prune_share)
    unknown = [m for m in options.methods if m not in _methods()]
    if unknown:
        raise AuditError(f"Unknown attribution method(s) {unknown}; choose from {_methods()}.")
    with progress_bar(f"Auditing {loaded.title}", args.quiet) as progress:
        page = report.build(loaded, image_set, options, progress)
    Path(args.out).write_text(page, encoding="utf-8")
    print(f"wrote {args.out} ({len(page.encode()) / 2**20:.1f} MB) for {loaded.title} on {len(image_set)} images",
          file=sys.stderr)
    return 0


def _stats(args) -> int:
    from audit import activations, models

    loaded = models.load(_source(args.model))
    image_set = read_images(args.images)
    layers = [models.resolve_layer(loaded.model, name) for name in args.layers] or models.conv_layers(loaded.model)
    x = loaded.preprocess([item.pixels for item in image_set])
    with progress_bar("Filter statistics", args.quiet) as progress, loaded.job_lock:
        stats = activations.filter_stats(loaded.model, layers, x, args.threshold, progress=progress)
    if args.csv:
        stats.to_csv(sys.stdout if args.csv == "-" else args.csv, index=False)
    counts = activations.dead_counts(stats, args.near_dead)
    print(counts.to_string(index=False), file=sys.stderr if args.csv == "-" else sys.stdout)
    return 0


def _check(args) -> int:
    """Every capability on the user's model, one line each: what works, what is refused and why."""
    from audit import conformance, models

    loaded = models.load(_source(args.model))
    print(f"{loaded.title}: preprocessing {loaded.preprocessing} ({loaded.preprocessing_reason or 'as named'}); "
          f"{loaded.head().description}")
    with progress_bar("Checking every capability", args.quiet) as progress, loaded.job_lock:
        cells = conformance.check(loaded, progress)
    for cell in cells:
        print(f"{cell.status:8} {cell.capability:40} {cell.seconds:6.1f} s  {cell.detail}")
    return 3 if any(cell.status == "failed" for cell in cells) else 0


def _prune(args) -> int:
    """Score, choose the lowest share of each layer, cut by dependency groups, optionally fine-tune; save."""
    from audit import models, pruning

    loaded = models.load(_source(args.model))
    image_set = read_images(args.images)
    x = loaded.preprocess([item.pixels for item in image_set])
    names = loaded.class_names
    labels = (np.array([names.index(item.label) for item in image_set])
              if names and all(item.label in names for item in image_set) else None)
    with progress_bar("Scoring every filter", args.quiet), loaded.job_lock:
        scores = pruning.filter_scores(loaded.model, x, labels)
    if args.criterion not in scores or scores[args.criterion].isna().all():
        raise AuditError(f"No {args.criterion} scores for this model (Taylor needs a class output).")
    layers = [models.resolve_layer(loaded.model, name) for name in args.layers] or list(dict.fromkeys(scores.layer))
    part = scores[scores.layer.isin(layers)]
    ranked = part.assign(apoz=-part.apoz) if args.criterion == "apoz" else part  # APoZ: most zeros first
    chosen = part[pruning.lowest_share(ranked, args.criterion, args.share)]
    selection = {layer: sorted(group["filter"].astype(int)) for layer, group in chosen.groupby("layer", sort=False)}
    with loaded.job_lock:
        plan = pruning.plan(loaded.model, selection)
        print(plan.to_string(index=False))
        if args.fine_tune:
            if labels is None:
                raise AuditError("--fine-tune needs labelled images (one subfolder per class named like the "
                                 "model's classes, or shapes:N for the demo models).")
            with progress_bar("Fine-tuning", args.quiet) as progress:
                table, smaller = pruning.recovery(loaded.model, selection, x, labels, args.fine_tune, args.lr,
                                                  progress=progress)
            print(table.to_string(index=False))
        else:
            smaller = pruning.prune(loaded.model, selection)
    smaller.save(args.out)
    print(f"{args.out}: {smaller.count_params():,} parameters (from {loaded.model.count_params():,})")
    return 0


def _methods() -> list[str]:
    from audit import attribution

    return list(attribution.METHODS)


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="python -m audit", description="Audit a trained image CNN.")
    commands = main.add_subparsers(dest="command", required=True)

    def common(sub):
        sub.add_argument("--model", default="demo:shapes",
                         help="demo:shapes, demo:shapes-gap, demo:vgg16, keras:<Name>[:untrained], "
                              "or a .keras/.h5 file")
        sub.add_argument("--images", required=True, help=IMAGES_HELP)
        sub.add_argument("--quiet", action="store_true", help="no progress bar")

    report = commands.add_parser("report", help="a self-contained HTML report")
    common(report)
    report.add_argument("--out", required=True, help="the .html file to write")
    report.add_argument("--gallery-layers", nargs="*", help="conv layers to draw (default: first and last)")
    report.add_argument("--gallery-filters", type=int, default=8, help="filters per gallery")
    report.add_argument("--steps", type=int, default=0, help="gradient-ascent steps (default: per layer)")
    report.add_argument("--attribution-images", type=int, default=4, help="images with attribution overlays")
    report.add_argument("--methods", nargs="+", default=["Grad-CAM", "Saliency"], help="attribution methods")
    report.add_argument("--prune-share", type=float, default=0.3, help="lowest-L1 share listed per layer")
    report.set_defaults(run=_report)

    stats = commands.add_parser("stats", help="per-filter activation statistics and dead-filter counts")
    common(stats)
    stats.add_argument("--layers", nargs="*", default=[], help="layers (default: every conv layer)")
    stats.add_argument("--threshold", type=float, default=0.0, help="a filter is dead if never above this")
    stats.add_argument("--near-dead", type=float, default=0.99, help="near-dead: APoZ above this")
    stats.add_argument("--csv", help="write the per-filter table here ('-': stdout)")
    stats.set_defaults(run=_stats)

    prune = commands.add_parser("prune", help="remove the lowest-scored filters by dependency groups; save the model")
    common(prune)
    prune.add_argument("--out", required=True, help="the .keras file to write")
    prune.add_argument("--criterion", default="l1", choices=["l1", "mean", "taylor", "fpgm", "apoz"],
                       help="rank filters by this score (lowest first; APoZ: highest first)")
    prune.add_argument("--share", type=float, default=0.3, help="share of each layer's filters to remove")
    prune.add_argument("--layers", nargs="*", default=[], help="layers to prune (default: every conv layer)")
    prune.add_argument("--fine-tune", type=int, default=0, metavar="EPOCHS",
                       help="fine-tune for this many epochs and compare with a random ranking (needs labels)")
    prune.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    prune.set_defaults(run=_prune)

    check = commands.add_parser("check", help="run every capability once on a model: ok, refused (why), failed")
    check.add_argument("--model", required=True, help="a .keras/.h5 file or a model source")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    check.set_defaults(run=_check)
    return main


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except AuditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
