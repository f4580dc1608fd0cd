"""The command line: audit a model in a pipeline, without a browser.

    cnn-audit report --model demo:shapes --images shapes:60 --out report.html
    cnn-audit stats --model path/to/model.keras --images photos/ --csv stats.csv
    cnn-audit scores --model path/to/model.keras --images val/ --ray local --csv scores.csv
    cnn-audit examples --model demo:vgg16 --images photos/ --layer block4_conv1 --k 8 --csv examples.csv
    cnn-audit prune --model demo:shapes --images shapes:480 --params 0.5 --fine-tune 20 --out pruned.keras
    cnn-audit quantize --model path/to/model.keras --images val/ --out model.int8.tflite
    cnn-audit check --model path/to/model.keras

Exit codes: 0 done, 1 the audit refused the input (the message is the dashboard's), 2 bad usage,
3 `check` found a capability that failed (a bug of ours), 130 interrupted. A progress bar goes to
stderr, so stdout stays clean for `--csv -`.
"""

from __future__ import annotations

import argparse
import sys

from pathlib import Path

from audit import cli_common
from audit import cli_quantize
from audit.cli_common import file_set, labels_of, load_model, on_disk, progress_bar, read_images, streamed
from audit.errors import AuditError
from audit.images import PREPROCESSING as PREPROCESSING_MODES


def _report(args) -> int:
    from audit import report

    loaded = load_model(args)
    image_set = read_images(args.images)
    options = report.ReportOptions(
        gallery_layers=tuple(args.gallery_layers or ()), gallery_filters=args.gallery_filters,
        gallery_steps=args.steps, attribution_images=args.attribution_images,
        methods=tuple(args.methods), prune_criterion=args.criterion, prune_target=args.prune_target,
        prune_share=args.prune_share, quantize=not args.no_int8, timing=not args.no_timing)
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
    from audit import activations, models, precision

    loaded = load_model(args)
    layers = [models.resolve_layer(loaded.model, name) for name in args.layers] or models.conv_layers(loaded.model)
    if on_disk(args.images):
        stats = streamed(args, loaded, "stats", layers).table
    else:
        image_set = read_images(args.images)
        x = loaded.preprocess([item.pixels for item in image_set])
        with progress_bar("Filter statistics", args.quiet) as progress, loaded.job_lock:
            stats = activations.filter_stats(precision.for_compute(loaded.model), layers, x, args.threshold,
                                             progress=progress, at=args.at)
    if args.csv:
        stats.to_csv(sys.stdout if args.csv == "-" else args.csv, index=False)
    counts = activations.dead_counts(stats, args.near_dead)
    print(counts.to_string(index=False), file=sys.stderr if args.csv == "-" else sys.stdout)
    return 0


def _scores(args) -> int:
    """Every conv layer's pruning scores over a set on disk, sharded and resumable like `stats`."""
    loaded = load_model(args)
    if not on_disk(args.images):
        raise AuditError("`scores` streams a folder, a .zip or a .txt list of files; "
                         f"{args.images!r} is none of them.")
    scores = streamed(args, loaded, "scores", []).table
    if args.csv:
        scores.to_csv(sys.stdout if args.csv == "-" else args.csv, index=False)
    summary = scores.groupby("layer", sort=False).agg(filters=("filter", "size"), dead=("dead", "sum"),
                                                      near_dead=("near_dead", "sum"), mean_l1=("l1", "mean"))
    print(summary.reset_index().to_string(index=False), file=sys.stderr if args.csv == "-" else sys.stdout)
    return 0


def _examples(args) -> int:
    """Each filter's k images of a set on disk with the highest peak activation, sharded like `scores`."""
    from audit import models

    loaded = load_model(args)
    if not on_disk(args.images):
        raise AuditError(f"`examples` streams a folder, a .zip or a .txt list of files; {args.images!r} is none of them.")
    layer = models.resolve_layer(loaded.model, args.layer)
    table = streamed(args, loaded, "examples", [layer], filters=tuple(args.filters), k=args.k).table
    if args.csv:
        table.to_csv(sys.stdout if args.csv == "-" else args.csv, index=False)
    best = table[table["rank"] == 0][["filter", "file", "activation", "row", "col"]]
    print(best.to_string(index=False), file=sys.stderr if args.csv == "-" else sys.stdout)
    return 0


def _check(args) -> int:
    """Every capability on the user's model, one line each: what works, what is refused and why."""
    from audit import conformance

    loaded = load_model(args)
    print(f"{loaded.title}: preprocessing {loaded.preprocessing} ({loaded.preprocessing_reason or 'as named'}); "
          f"{loaded.head().description}")
    with progress_bar("Checking every capability", args.quiet) as progress, loaded.job_lock:
        cells = conformance.check(loaded, progress)
    for cell in cells:
        print(f"{cell.status:8} {cell.capability:40} {cell.seconds:6.1f} s  {cell.detail}")
    return 3 if any(cell.status == "failed" for cell in cells) else 0


def _prune(args) -> int:
    """Score, choose the lowest share of each layer, cut by dependency groups, optionally fine-tune; save.

    A set on disk is streamed: its scores are a sharded run (resumable, --ray) and the pruned model is
    measured against the model over the whole set, one batch in memory at a time."""
    from audit import datasets, models, precision, pruning

    loaded = load_model(args)
    from_disk = on_disk(args.images) and not args.fine_tune  # fine-tuning trains on the images in memory
    if from_disk:
        files = file_set(args)
        scores = streamed(args, loaded, "scores", [], files).table
    else:
        image_set = read_images(args.images)
        labels = labels_of(loaded, image_set)
        if args.fine_tune and labels is None:  # said before any work, never after the plan
            raise AuditError("--fine-tune needs labelled images: one subfolder per class (in a folder or a .zip), "
                             "named like the model's classes or, for a model saved without class names, as many "
                             "folders as it has classes (in sorted order); or shapes:N for the demo models.")
        x = loaded.preprocess([item.pixels for item in image_set])
        with progress_bar("Scoring every filter", args.quiet), loaded.job_lock:
            scores = pruning.filter_scores(precision.for_compute(loaded.model), x, labels)
    layers = [models.resolve_layer(loaded.model, name) for name in args.layers] or list(dict.fromkeys(scores.layer))
    target = _target(args)
    graph = loaded.dependency_graph()
    if args.steps:
        if from_disk or labels is None:
            raise AuditError("--steps fine-tunes between the cuts: it needs labelled images in memory (class "
                             "folders, a .zip of them, or shapes:N), and --params or --macs.")
        with progress_bar(f"Pruning in {args.steps} steps, beside one cut and a random ranking", args.quiet) \
                as progress, loaded.job_lock:
            smaller, table = pruning.trade_off(loaded.model, x, labels, args.criterion, steps=args.steps,
                                               tuning=_tuning(args, default_epochs=3), progress=progress,
                                               **{target.kind: target.value})
        print(table.to_string(index=False))
        final = table[table.step == table.step.max()].set_index("method")["accuracy fine-tuned"]
        best = str(final.idxmax())
        print(f"Saved: {best}, the best held-out accuracy at the target size ({final[best]:.1%}).")
        return _save(args, loaded.model, smaller[best])
    selection = pruning.selection_for(loaded.model, scores[scores.layer.isin(layers)], args.criterion, target, graph)
    with loaded.job_lock:
        plan = pruning.plan(loaded.model, selection, graph, share=target.value if target.kind == "layer" else None)
        print(plan.to_string(index=False))
        if args.fine_tune:
            with progress_bar("Fine-tuning", args.quiet) as progress:
                recovered = pruning.recovery(loaded.model, selection, x, labels, _tuning(args), progress=progress,
                                             match="macs" if target.kind == "macs" else "params")
            _print_recovery(recovered, loaded, x, labels, image_set)
            smaller = recovered.models[recovered.best()]
        else:
            smaller = pruning.prune(loaded.model, selection)
        if from_disk:
            batches = datasets.batches(files, datasets.model_input(loaded, labels=files.labels))
            with progress_bar("Measuring the pruned model on the set", args.quiet, unit="images") as progress:
                measured = pruning.what_if(precision.for_compute(loaded.model), selection, batches, progress=progress,
                                           total=len(files))
            print("pruned against the model on the whole set: " +
                  ", ".join(f"{name} {value:.4g}" for name, value in measured.items()))
    return _save(args, loaded.model, smaller)


def _target(args):
    """The pruning target the arguments ask: --params or --macs (a share to keep), else --share per --scope."""
    from audit import pruning

    if args.params is not None and args.macs is not None:
        raise AuditError("Give --params or --macs, not both.")
    if args.steps and args.params is None and args.macs is None:
        raise AuditError("--steps needs a target to reach: --params or --macs (the share to keep).")
    if args.params is not None or args.macs is not None:
        kind, value = ("params", args.params) if args.params is not None else ("macs", args.macs)
    else:
        kind, value = args.scope, args.share
    return pruning.Target(kind, value, args.max_per_layer)


def _tuning(args, default_epochs: int = 20):
    from audit import pruning

    return pruning.Tuning(max_epochs=args.fine_tune or default_epochs, patience=args.patience,
                          learning_rate=args.lr, distill=args.distill)


def _print_recovery(recovered, loaded, x, labels, image_set) -> None:
    """The recovery table, what each fine-tuning did, and what the saved model forgets, per class."""
    from audit import heads, pruning

    print(recovered.table.drop(columns="how").to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for name, tuned in recovered.tuned.items():
        print(f"{name}: {tuned.describe()}")
    best = recovered.best()
    held_out = recovered.table.attrs["held_out"]
    names, _ = heads.class_names(loaded.class_names, loaded.head(), [item.label for item in image_set])
    forgot = pruning.forgets(loaded.model, recovered.models[best], x[held_out], labels[held_out], names)
    print(f"Saved: {best}, the best held-out accuracy. Per class on the {len(held_out)} held-out images:")
    print(forgot.classes.drop(columns=["before low", "before high", "after low", "after high"]).to_string(
        index=False, float_format=lambda v: f"{v:.3g}"))
    flagged = forgot.flagged()
    print((f"Classes that lost significantly more than the set: {', '.join(flagged)}." if flagged else
           "No class lost significantly more than the set.")
          + f" {forgot.overall['flipped']} of {len(held_out)} held-out images changed their answer"
          + (": " + ", ".join(image_set[int(held_out[i])].name for i in forgot.flipped["image"][:10])
             + (" ..." if len(forgot.flipped) > 10 else "") if len(forgot.flipped) else "") + ".")


def _save(args, model, smaller) -> int:
    """Write the smaller model (and its SavedModel), and say what it keeps and how fast it runs here."""
    from audit import pruning

    smaller.save(args.out)
    if args.saved_model:
        smaller.export(args.saved_model, format="tf_saved_model", verbose=False)
    timed = ""
    if not args.no_timing:
        batch = pruning.throughput_batch(model)
        before, after = pruning.speed(model, batch_size=batch), pruning.speed(smaller, batch_size=batch)
        (latency, throughput), (latency_after, throughput_after) = before.values(), after.values()
        timed = (f"; here {latency_after:.2f} ms per image at batch 1 (from {latency:.2f}) and "
                 f"{throughput_after:,.0f} images per second at batch {batch} (from {throughput:,.0f})")
    print(f"{args.out}: {smaller.count_params():,} parameters (from {model.count_params():,}, "
          f"{smaller.count_params() / model.count_params():.1%}), {pruning.flops(smaller):,} multiply-adds per image "
          f"({pruning.flops(smaller) / pruning.flops(model):.1%}){timed}"
          + (f"; SavedModel in {args.saved_model}" if args.saved_model else ""))
    return 0


def _criteria() -> dict[str, str]:
    from audit.definitions import PRUNING_CRITERIA

    return PRUNING_CRITERIA


def _methods() -> list[str]:
    from audit import attribution

    return list(attribution.METHODS)


def parser(prog: str = "cnn-audit") -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog=prog, description="Audit a trained image CNN.")
    main.add_argument("--debug", action="store_true", help="an unexpected error shows its traceback")

    def preprocessing_option(sub):
        sub.add_argument("--preprocessing", choices=list(PREPROCESSING_MODES),
                         help="how pixels become the model's input (default: read from the model, else [0, 1]: "
                              "the dashboard's Model page weighs the candidates on your images)")
    commands = main.add_subparsers(dest="command", required=True)

    def common(sub):
        sub.add_argument("--model", default="demo:shapes",
                         help="demo:shapes, demo:shapes-gap, demo:vgg16, keras:<Name>[:untrained], "
                              "or a .keras/.h5 file")
        sub.add_argument("--images", required=True, type=cli_common.image_spec, help=cli_common.IMAGES_HELP)
        sub.add_argument("--quiet", action="store_true", help="no progress bar")
        preprocessing_option(sub)
        sub.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto",
                         help="heavy passes in bfloat16 where the hardware computes it natively (auto), or as asked")

    def streaming(sub):
        sub.add_argument("--shards", type=cli_common.count(0, 100_000), default=0,
                         help="split a set on disk into this many shards (default: one per 1,000 images); "
                              "a restarted run reads back the shards already done")
        sub.add_argument("--ray", metavar="ADDRESS",
                         help="run the shards on Ray: 'local' (an embedded Ray here) or a cluster's address")
        sub.add_argument("--sample", type=cli_common.count(0, 100_000_000), default=0, help="a seeded sample of this many images")
        sub.add_argument("--seed", type=cli_common.count(0, 2**32 - 1), default=0, help="the sample's seed")

    report = commands.add_parser("report", help="a self-contained HTML report")
    common(report)
    report.add_argument("--out", required=True, help="the .html file to write")
    report.add_argument("--gallery-layers", nargs="*", help="conv layers to draw (default: first and last)")
    report.add_argument("--gallery-filters", type=cli_common.count(1, 512), default=8, help="filters per gallery")
    report.add_argument("--steps", type=cli_common.count(0, 2000), default=0, help="gradient-ascent steps (default: per layer)")
    report.add_argument("--attribution-images", type=cli_common.count(0, 256), default=4, help="images with attribution overlays")
    report.add_argument("--methods", nargs="+", default=["Grad-CAM", "Saliency"], help="attribution methods")
    report.add_argument("--criterion", default="dead", choices=list(_criteria()),
                        help="pruning candidates listed: dead (dead or near-dead) or the lowest share by a score, as "
                             "on the Pruning page")
    report.add_argument("--prune-target", default="layer", choices=["layer", "global", "params", "macs"],
                        help="what --prune-share counts: channels cut per layer or overall, parameters or MACs kept")
    report.add_argument("--prune-share", type=cli_common.share, default=0.3, help="the target's share")
    report.add_argument("--no-int8", action="store_true", help="leave out the int8 section (a TFLite conversion)")
    report.add_argument("--no-timing", action="store_true", help="do not time the model and the cut one here")
    report.set_defaults(run=_report)

    stats = commands.add_parser("stats", help="per-filter activation statistics and dead-filter counts")
    common(stats)
    stats.add_argument("--layers", nargs="*", default=[], help="layers (default: every conv layer)")
    stats.add_argument("--threshold", type=cli_common.finite, default=0.0, help="a filter is dead if never above this")
    stats.add_argument("--at", default="used", choices=["used", "output"],
                       help="measure each filter where its channel is used (after its BatchNorm and activation; the "
                            "default) or at the layer's own output")
    stats.add_argument("--near-dead", type=cli_common.share, default=0.99, help="near-dead: APoZ above this")
    stats.add_argument("--csv", help="write the per-filter table here ('-': stdout)")
    stats.set_defaults(run=_stats)
    streaming(stats)

    scores = commands.add_parser("scores", help="every conv layer's pruning scores over a set on disk (streamed)")
    common(scores)
    scores.add_argument("--threshold", type=cli_common.finite, default=0.0, help="APoZ counts values at or below this")
    scores.add_argument("--csv", help="write the per-filter table here ('-': stdout)")
    scores.set_defaults(run=_scores)
    streaming(scores)

    examples = commands.add_parser("examples", help="each filter's top images of a set on disk (streamed, sharded)")
    common(examples)
    examples.add_argument("--layer", required=True, help="the conv layer whose filters are searched")
    examples.add_argument("--filters", nargs="*", type=cli_common.count(0, 1_000_000), default=[],
                          help="filter indices (default: every filter of the layer)")
    examples.add_argument("--k", type=cli_common.count(1, 100), default=8, help="images kept per filter")
    examples.add_argument("--at", default="used", choices=["used", "output"],
                          help="find each filter's peak where its channel is used (default) or at the layer's output")
    examples.add_argument("--csv", help="write filter, rank, image, row, col, activation, file here ('-': stdout)")
    examples.set_defaults(run=_examples)
    streaming(examples)

    prune = commands.add_parser("prune", help="remove the lowest-scored filters by dependency groups; save the model")
    common(prune)
    prune.add_argument("--out", required=True, help="the .keras file to write")
    prune.add_argument("--criterion", default="l1", choices=list(_criteria()),
                       help="rank filters by this score (lowest first; APoZ: highest first; dead: every dead or "
                            "near-dead filter)")
    prune.add_argument("--share", type=cli_common.share, default=0.3,
                       help="share of channels to remove, whole dependency groups (0 to 1), per --scope")
    prune.add_argument("--scope", default="layer", choices=["layer", "global"],
                       help="the share of each layer, or of all the layers' channels together")
    prune.add_argument("--params", type=cli_common.share, help="instead of --share: the share of the parameters to keep")
    prune.add_argument("--macs", type=cli_common.share, help="instead of --share: the share of multiply-adds to keep")
    prune.add_argument("--max-per-layer", type=cli_common.share, default=0.9, help="the most any layer may lose")
    prune.add_argument("--steps", type=cli_common.count(0, 20), default=0,
                       help="reach --params or --macs in this many steps, fine-tuning up to --fine-tune epochs (3 "
                            "by default) between them, beside one cut and a random ranking of the same sizes given "
                            "the same budget; saves the best at the target size (needs labels)")
    prune.add_argument("--saved-model", help="also export a SavedModel (for TF Serving) to this folder")
    prune.add_argument("--no-timing", action="store_true", help="do not time both models here")
    prune.add_argument("--layers", nargs="*", default=[], help="layers to prune (default: every conv layer)")
    prune.add_argument("--fine-tune", type=cli_common.count(0, 200), default=0, metavar="EPOCHS",
                       help="fine-tune for up to this many epochs (stopping when the validation loss stops "
                            "improving), beside a random cut of the same size, and save the best (needs labels)")
    prune.add_argument("--patience", type=cli_common.count(1, 50), default=3,
                       help="epochs without a better validation loss before fine-tuning stops")
    prune.add_argument("--lr", type=cli_common.positive, default=1e-3, help="fine-tuning learning rate (cosine decay)")
    prune.add_argument("--no-distill", dest="distill", action="store_false",
                       help="fine-tune on the labels alone, not also distilled from the unpruned model (Hinton et "
                            "al. 2015; the default distils)")
    prune.set_defaults(run=_prune)
    streaming(prune)

    cli_quantize.add_command(commands, common)
    check = commands.add_parser("check", help="run every capability once on a model: ok, refused (why), failed")
    check.add_argument("--model", required=True, help="a .keras/.h5 file or a model source")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    preprocessing_option(check)
    check.set_defaults(run=_check)
    return main


def main(argv: list[str] | None = None, prog: str = "cnn-audit", loaded_models=None) -> int:
    """The `cnn-audit` command (installed by `pip install -e .`), also `python -m audit`. `loaded_models` (an
    audit.registry.ModelCache) hands the commands models loaded already (audit.surfaces runs several on one)."""
    args = parser(prog).parse_args(argv)
    args.loaded_models = loaded_models
    try:
        if getattr(args, "precision", "auto") != "auto":
            import os

            os.environ["CNN_AUDIT_PRECISION"] = args.precision  # this process and its Ray workers
            from audit import device

            device.use_precision(args.precision)
        if args.debug:
            return args.run(args)
        with cli_common.native_lines_hidden():
            return args.run(args)
    except AuditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 (a bug of ours: one line, the traceback with --debug)
        if args.debug:
            raise
        text = str(exc).splitlines()[0][:300] if str(exc) else ""
        print(f"error: {type(exc).__name__}: {text} (a bug of CNN Audit, not of your model or images: run again "
              "with --debug for the traceback to report)", file=sys.stderr)
        return 1
