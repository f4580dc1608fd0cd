"""What the command line's commands share: argument types (each refuses a bad value with argparse's usage line,
exit 2), the model and image set named by the arguments, progress bars, and sharded runs over a set on disk."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from audit.errors import AuditError

IMAGES_HELP = ("a folder (one subfolder per class gives labels), a .zip, a .txt listing image files, 'photos' "
               "(scikit-image's) or 'shapes:N'; folders, zips and lists are streamed from disk")

SHAPES_MAX = 20_000
"""The most demo shapes the command line generates in memory (20,000 x 64 x 64 x 3: 250 MB, 1 GB as floats)."""


def count(low: int, high: int):
    """An argparse type: a whole number in [low, high] (exit 2 with the usage line otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high:,}")
        return value
    return parse


def finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def share(text: str) -> float:
    value = finite(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not a share between 0 and 1")
    return value


def positive(text: str) -> float:
    value = finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not above 0")
    return value


def image_spec(text: str) -> str:
    """--images: 'shapes:N' is checked here (a count, at most SHAPES_MAX); paths are checked when read."""
    if text.startswith("shapes:"):
        count(1, SHAPES_MAX)(text.split(":", 1)[1])
    return text


def model_source(text: str) -> str:
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
def progress_bar(label: str, quiet: bool, unit: str | None = None):
    """A rich progress bar on stderr yielding a (done, total) callback; with a unit, its rate too."""
    if quiet:
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    rate = [TextColumn("{task.fields[rate]}")] if unit else []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *rate, TimeElapsedColumn(),
                  transient=True) as bar:
        task = bar.add_task(label, total=None, rate="")
        first = {}

        def update(done, total):
            now = time.perf_counter()
            first.setdefault("at", (now, done))  # counted from the first call: shards read back are not speed
            start, before = first["at"]
            speed = f"{(done - before) / (now - start):.1f} {unit}/s" if unit and now > start else ""
            bar.update(task, completed=done, total=total, rate=speed)

        yield update


def on_disk(spec: str) -> bool:
    path = Path(spec)
    return path.is_dir() or (path.is_file() and path.suffix.lower() in (".zip", ".txt"))


def file_set(args):
    """The set on disk named by --images, or its seeded --sample."""
    from audit import datasets

    image_set = datasets.open_set(args.images)
    return image_set.sample(min(args.sample, len(image_set)), args.seed) if args.sample else image_set


def streamed(args, loaded, what: str, layers: list[str], image_set=None, **job_fields):
    """A sharded run over a set on disk (audit.runs): resumable, here or on Ray (--ray)."""
    from audit import runs

    image_set = file_set(args) if image_set is None else image_set
    shards = args.shards or max(1, -(-len(image_set) // runs.SHARD_IMAGES))
    job = runs.Job(loaded.source, what, tuple(layers), getattr(args, "threshold", 0.0), at=getattr(args, "at", "used"),
                   preprocessing=loaded.preprocessing, **job_fields)
    where = f"on Ray ({args.ray})" if args.ray else "here"
    with progress_bar(f"{runs.WHATS[what].capitalize()} of {len(image_set):,} images in {shards} shards {where}",
                      args.quiet, unit="images") as progress, loaded.job_lock:
        result = runs.run(loaded, job, image_set, shards, args.ray, progress)
    read_back = shards - len(result.computed)
    print(f"{result.images:,} images ({result.skipped} unreadable skipped) in {result.seconds:.1f} s"
          f"{f', {result.images / result.seconds:.1f} images/s' if result.seconds and not read_back else ''}; "
          f"{read_back} of {shards} shards read back from {result.folder}", file=sys.stderr)
    return result


def load_model(args):
    """The model of --model, with the preprocessing --preprocessing sets (a file does not record its own)."""
    from audit import models

    cache = getattr(args, "loaded_models", None)
    loaded = cache.get(model_source(args.model)) if cache is not None else models.load(model_source(args.model))
    if getattr(args, "preprocessing", None):
        loaded.preprocessing, loaded.preprocessing_reason = args.preprocessing, "set by --preprocessing"
    return loaded


def labels_of(loaded, image_set) -> np.ndarray | None:
    """The images' class indices as the dashboard reads them (the model's class names, else its class folders
    in sorted order: audit.heads.class_names), None when some image has no known class."""
    from audit import heads

    head = loaded.head()
    names, _ = heads.class_names(loaded.class_names, head, [item.label for item in image_set])
    if not head.is_classifier or not all(item.label in names for item in image_set):
        return None
    return np.array([names.index(item.label) for item in image_set])


@contextmanager
def native_lines_hidden():
    """TensorFlow's and LiteRT's C++ start-up lines (oneDNN, CUDA drivers, CPU features, the XNNPACK delegate, the
    converter's settings) are written to the process's stderr before any logging setting applies
    (TF_CPP_MIN_LOG_LEVEL included): the descriptor is pointed at /dev/null, and Python's own stderr (our
    messages, the progress bar) at a copy of the real one. Only when Python's stderr is the process's (a test's
    captured stderr is left alone)."""
    if sys.stderr is not sys.__stderr__ or sys.__stderr__ is None:
        yield
        return
    sys.stderr.flush()
    real = os.dup(2)
    python_side = os.fdopen(os.dup(real), "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    sys.stderr = python_side
    try:
        yield
    finally:
        python_side.flush()
        sys.stderr = sys.__stderr__
        os.dup2(real, 2)
        os.close(real)
        python_side.close()
