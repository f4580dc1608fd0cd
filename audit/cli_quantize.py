"""`cnn-audit quantize`: dynamic ranges, per-layer int8 sensitivity, the integer model and its measures.

    cnn-audit quantize --model model.keras --images val/ --out model.int8.tflite --csv sensitivity.csv
    cnn-audit quantize --model demo:shapes --images shapes:400 --prune-params 0.5 --keep-float head

The ranges stream the whole set (a folder, a .zip, a .txt list: one batch in memory at a time); calibration and
held-out images are disjoint seeded samples of it, read into memory (the converter and the interpreter take
arrays). With --prune-params the model is first pruned to that share of its parameters (BN scale where it has
BatchNorms, else L1) and BatchNorm recalibrated, then quantised.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from audit.cli_common import count, labels_of, load_model, on_disk, progress_bar, read_images, share
from audit.errors import AuditError


def add_command(commands, common) -> None:
    quantize = commands.add_parser("quantize", help="int8: ranges, per-layer sensitivity, the .tflite and its measures")
    common(quantize)
    quantize.add_argument("--calibration", type=count(1, 10_000), default=200,
                          help="images that calibrate the activation ranges (default 200)")
    quantize.add_argument("--held-out", type=count(1, 100_000), default=300,
                          help="other images the int8 model is measured on (default 300)")
    quantize.add_argument("--seed", type=count(0, 2**32 - 1), default=0, help="the samples' seed")
    quantize.add_argument("--keep-float", nargs="*", default=[], metavar="LAYER", help="layers left in float")
    quantize.add_argument("--prune-params", type=share, help="prune to this share of the parameters first")
    quantize.add_argument("--skip-sensitivity", action="store_true", help="no per-layer simulation")
    quantize.add_argument("--batch", type=count(0, 1024), default=32,
                          help="the batch throughput is timed at (default 32; 0: not timed)")
    quantize.add_argument("--out", help="write the int8 .tflite here")
    quantize.add_argument("--csv", help="write the per-layer table (ranges and sensitivity) here ('-': stdout)")
    quantize.set_defaults(run=run)


def run(args) -> int:
    from audit import heads, models, pruning, quantization

    loaded = load_model(args)
    calibration, held_out, labels, ranges_input, total = _images(args, loaded)
    model = loaded.model
    if args.prune_params is not None:
        with progress_bar("Scoring every filter to prune", args.quiet), loaded.job_lock:
            scores = pruning.filter_scores(model, calibration)
            criterion = "bn_scale" if scores["bn_scale"].notna().any() else "l1"
            model = pruning.prune(model, pruning.to_target(model, scores, criterion, params=args.prune_params, seed=0))
            pruning.recalibrate_bn(model, calibration)
        print(f"pruned by {criterion} to {model.count_params() / loaded.model.count_params():.1%} of the parameters "
              "(BatchNorm recalibrated on the calibration images)")
    keep = [models.resolve_layer(model, name) for name in args.keep_float]
    with progress_bar("Dynamic ranges", args.quiet, unit="images") as progress, loaded.job_lock:
        frame = quantization.ranges(model, ranges_input(model), progress=progress, total=total)
    table = quantization.problems(frame)
    if not args.skip_sensitivity:
        with progress_bar("Sensitivity, one layer int8 at a time", args.quiet) as progress, loaded.job_lock:
            sensitive = quantization.sensitivity(model, held_out, labels, calibration=calibration, progress=progress)
        table = table.merge(sensitive, on="layer", how="left")
    with progress_bar("Converting (calibration)", args.quiet) as progress, loaded.job_lock:
        content = quantization.convert(model, calibration, keep_float=keep, progress=progress)
        baseline = quantization.convert(model, calibration, integer=False)
    head = heads.find_head(model)
    reference = quantization.raw_outputs(model, held_out, head)
    with progress_bar("Measuring with the interpreter", args.quiet, unit="images") as progress:
        floated = quantization.evaluate(baseline, held_out, labels, reference, head=head, batch=args.batch)
        measured = quantization.evaluate(content, held_out, labels, reference, progress=progress, head=head,
                                         batch=args.batch)
    if args.csv:
        table.to_csv(sys.stdout if args.csv == "-" else args.csv, index=False)
    out = sys.stderr if args.csv == "-" else sys.stdout
    measures = ("agreement", "kl", "accuracy", "feature_error", "rounding_steps", "clipped")
    shown = ["layer", "flag"] + [column for column in measures if column in table]
    print(table[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}"), file=out)
    print(_summary(floated, measured, len(held_out), len(calibration), keep, args.batch), file=out)
    if args.out:
        Path(args.out).write_bytes(content)
        print(f"wrote {args.out}", file=out)
    return 0


def _images(args, loaded):
    """Calibration and held-out arrays (disjoint seeded samples), their labels, and what the ranges stream."""
    from audit import datasets

    if on_disk(args.images):
        files = datasets.open_set(args.images)
        if len(files) < 2:
            raise AuditError(f"{args.images} holds {len(files)} readable images; quantising needs at least 2.")
        calibration_count = min(args.calibration, len(files) // 2)
        chosen = files.sample(calibration_count, args.seed)
        rest = files.sample(min(calibration_count + args.held_out, len(files)), args.seed, skip=calibration_count)
        model_in = datasets.model_input(loaded, labels=files.labels)
        calibration = _array(datasets.batches(chosen, model_in))
        held_out, labels = _array(datasets.batches(rest, model_in), True)
        return (calibration, held_out, labels if np.any(labels >= 0) else None,
                lambda model: datasets.batches(files, model_in), len(files))
    image_set = read_images(args.images)
    if len(image_set) < 2:
        raise AuditError(f"{args.images} holds {len(image_set)} images; quantising needs at least 2.")
    order = np.random.default_rng(args.seed).permutation(len(image_set))
    calibration_count = min(args.calibration, len(image_set) // 2)
    first, rest = order[:calibration_count], order[calibration_count:calibration_count + args.held_out]
    x = loaded.preprocess([item.pixels for item in image_set])
    labels = labels_of(loaded, image_set)
    return (x[first], x[rest], None if labels is None else labels[rest], lambda model: x[first], len(first))


def _array(batches, with_labels: bool = False):
    parts, labels = [], []
    for x, y in batches:
        parts.append(np.asarray(x))
        labels.append(np.asarray(y))
    x = np.concatenate(parts) if parts else np.zeros((0,), np.float32)
    return (x, np.concatenate(labels)) if with_labels else x


def _summary(floated: dict, measured: dict, held_out: int, calibration: int, keep: list[str], batch: int) -> str:
    def said(result):
        parts = []
        for name in ("accuracy", "agreement"):
            if name in result:
                parts.append(f"{name} {result[name]:.1%} [{result[name + '_low']:.1%}, {result[name + '_high']:.1%}]")
        if "relative_error" in result:
            parts.append(f"relative error of the outputs {result['relative_error']:.3g}")
        return ", ".join(parts)

    def rate(result, versus=None):
        if not batch:
            return ""
        ratio = f" ({result['images_per_second'] / versus['images_per_second']:.2f}x)" if versus else ""
        return f", {result['images_per_second']:.0f} images/s at batch {batch}{ratio}"

    return (f"float32 .tflite: {floated['bytes'] / 2**20:.2f} MB, {1000 * floated['seconds_per_image']:.2f} ms per "
            f"image at batch 1{rate(floated)}; {said(floated)}\n"
            f"int8 .tflite: {measured['bytes'] / 2**20:.2f} MB ({floated['bytes'] / measured['bytes']:.1f}x smaller), "
            f"{1000 * measured['seconds_per_image']:.2f} ms per image "
            f"({floated['seconds_per_image'] / measured['seconds_per_image']:.2f}x){rate(measured, floated)}; "
            f"{said(measured)}\n"
            f"on {held_out} held-out images, calibrated on {calibration} others"
            + (f"; kept in float: {', '.join(keep)}" if keep else ""))
