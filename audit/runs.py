"""Runs over big image sets: sharded, resumable, in this process or on Ray.

A run splits a streamed set (audit.datasets) into contiguous shards. Each shard's partial sums are
written to the run's folder under the data folder as soon as the shard is done, so a run interrupted
and started again computes only the shards still missing; the driver merges the shards in order
(FilterSums.merge, the same as one pass) and writes the table a dashboard reads (`finished`). The
shards run here one after another, or as Ray actors (an existing engine: `address` "local" starts an
embedded Ray on this machine, anything else is a cluster's address) that load the model once each,
on a GPU where the cluster has them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from audit import activations, datasets, examples, models, precision, pruning, storage
from audit.errors import AuditError

WHATS = {"stats": "filter statistics", "scores": "pruning scores", "examples": "dataset examples"}
SHARD_IMAGES = 1000
"""Images per shard by default: what a restart can lose, and a unit of work for one Ray actor."""
RESULT = "result.csv"
LOCK = ".lock"  # held while a run computes its shards


@dataclass(frozen=True)
class Job:
    """What a run computes; every field is part of the run folder's name."""

    source: str  # the model source every worker loads (a file path must be readable by every worker)
    what: str = "stats"  # stats: filter_stats of `layers`; scores: filter_scores of every conv layer;
    # examples: top_examples of the one layer in `layers` (its `filters`, all when empty; `k` per filter)
    layers: tuple[str, ...] = ()
    threshold: float = 0.0
    preprocessing: str | None = None
    fit: str = "crop"
    at: str = "used"  # stats: where each filter is measured (activations.MEASURE_AT); scores: always where used
    precision: str = ""  # of the passes: "float32" or "bfloat16" ("": precision.decide's for the model here)
    filters: tuple[int, ...] = ()
    k: int = 8

    def __post_init__(self):
        if self.what not in WHATS:
            raise AuditError(f"Unknown run {self.what!r}; choose one of {', '.join(WHATS)}.")
        if self.what == "examples" and len(self.layers) != 1:
            raise AuditError("Dataset examples are found for one layer at a time.")


@dataclass
class Result:
    folder: Path
    table: pd.DataFrame  # filter_stats or filter_scores rows
    images: int  # images that went into the figures
    skipped: int  # files that could not be read
    seconds: float  # of this call (0 when every shard was already on disk)
    computed: list[int]  # the shards this call computed (the others were read back)


def folder_of(job: Job, fingerprint: str, image_set: datasets.FileSet, shards: int) -> Path:
    """runs/<key>: the key names the job, the model's weights, the set's files and the shard count."""
    text = json.dumps([asdict(job), fingerprint, image_set.key(), shards, activations.SUMS_FORMAT], sort_keys=True)
    return storage.data_dir() / "runs" / hashlib.sha256(text.encode()).hexdigest()[:20]


def shard_sums(loaded: models.LoadedModel, job: Job, shard: datasets.FileSet, folders: tuple[str, ...],
               progress: Callable[[int, int], None] | None = None, first: int = 0) -> dict[str, np.ndarray]:
    """One shard's partial sums as named arrays (what a shard file holds). `folders`: the whole set's
    class folders, so every shard numbers the labels alike (a shard may hold only some classes). `first`:
    the shard's first position in the whole set (dataset examples name their images by it)."""
    model_in = datasets.model_input(loaded, job.preprocessing, job.fit, folders)
    compute = precision.for_compute(loaded.model, job.precision or None)  # bfloat16 where it is native
    if job.what == "examples":  # the shard's k best per filter: merged with the others' by merge_top
        found = examples.top_examples(compute, job.layers[0], datasets.batches(shard, model_in, positions=True),
                                      list(job.filters) or None, job.k, at=job.at, progress=progress,
                                      total=len(shard), first_image=first)
        return {"skipped": np.array(len(shard.skipped)), "measured_at": np.array(found.attrs["measured_at"]),
                **{f"examples|{name}": found[name].to_numpy() for name in examples.COLUMNS}}
    if job.what == "stats":
        batches = datasets.batches(shard, model_in)
        sums = activations.filter_sums(compute, list(job.layers), batches, job.threshold,
                                       progress=progress, total=len(shard), at=job.at)
        taylor = {}
    else:
        batches = datasets.batches(shard, model_in, pruning.scores_batch_size(compute))
        sums, taylor = pruning.score_sums(compute, batches, threshold=job.threshold, progress=progress,
                                          total=len(shard))
    arrays = {"skipped": np.array(len(shard.skipped))}
    for path, part in sums.items():
        arrays.update({f"{path}|{name}": np.asarray(getattr(part, name)) for name in activations.ARRAYS})
        arrays[f"{path}|measured_at"], arrays[f"{path}|floored"] = np.array(part.measured_at), np.array(part.floored)
    for path, (total, counted, squares, images, image_total) in taylor.items():
        arrays[f"{path}|taylor"], arrays[f"{path}|taylor_count"] = np.asarray(total), np.array(counted)
        arrays[f"{path}|taylor_squares"], arrays[f"{path}|taylor_images"] = np.asarray(squares), np.array(images)
        arrays[f"{path}|taylor_image_total"] = np.asarray(image_total)
    return arrays


def _unpack(arrays) -> tuple[dict, dict]:
    paths = list(dict.fromkeys(key.split("|")[0] for key in arrays if "|" in key))
    sums = {path: activations.FilterSums(float(arrays[f"{path}|count"]), int(arrays[f"{path}|images"]),
                                         *(np.asarray(arrays[f"{path}|{name}"], np.float64)
                                           for name in activations.ARRAYS[2:]),
                                         str(arrays[f"{path}|measured_at"]), bool(arrays[f"{path}|floored"]))
            for path in paths}
    taylor = {path: (np.asarray(arrays[f"{path}|taylor"], np.float64), int(arrays[f"{path}|taylor_count"]),
                     np.asarray(arrays[f"{path}|taylor_squares"], np.float64), int(arrays[f"{path}|taylor_images"]),
                     np.asarray(arrays[f"{path}|taylor_image_total"], np.float64))
              for path in paths if f"{path}|taylor" in arrays}
    return sums, taylor


def _write(path: Path, arrays: dict) -> None:
    """Atomically: a run killed mid-write leaves no half shard that a restart would trust."""
    partial = storage.part_path(path)
    with open(partial, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(partial, path)


def run(loaded: models.LoadedModel, job: Job, image_set: datasets.FileSet, shards: int = 8,
        address: str | None = None, progress: Callable[[int, int], None] | None = None) -> Result:
    """Compute `job` over the set: the shards not yet on disk, then the merged table (written beside them).

    `progress(images done, images in the set)` counts shards read back from disk as done.
    """
    if not 1 <= shards <= len(image_set):
        raise AuditError(f"Between 1 and {len(image_set)} shards for {len(image_set)} images (asked {shards}).")
    chosen = job.precision or precision.decide(loaded.model, loaded.input_size)[0]
    job = Job(**{**asdict(job), "precision": chosen})  # part of the run's key
    if job.what != "scores":
        layers = tuple(models.resolve_layer(loaded.model, name) for name in job.layers) or tuple(
            models.conv_layers(loaded.model))
        job = Job(**{**asdict(job), "layers": layers})
    folder = folder_of(job, loaded.fingerprint, image_set, shards)
    folder.mkdir(parents=True, exist_ok=True)
    with _one_run_at_a_time(folder):
        storage.sweep_parts(folder)  # what a run killed mid-write left
        return _run_in(folder, loaded, job, image_set, shards, address, progress)


@contextlib.contextmanager
def _one_run_at_a_time(folder: Path):
    """Two runs of one job (two command lines, a notebook beside them) compute its shards once: the second
    waits here for the first, then finds every shard written and only merges them."""
    with open(folder / LOCK, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_in(folder: Path, loaded: models.LoadedModel, job: Job, image_set: datasets.FileSet, shards: int,
            address: str | None, progress: Callable[[int, int], None] | None) -> Result:
    (folder / "job.json").write_text(json.dumps({**asdict(job), "title": loaded.title, "fingerprint": loaded.fingerprint,
                                                 "images": len(image_set), "root": image_set.root, "shards": shards}))
    files = [folder / f"shard-{k:05d}.npz" for k in range(shards)]
    todo = [k for k in range(shards) if not files[k].exists()]
    sizes = [len(image_set.shard(k, shards)) for k in range(shards)]
    firsts = [int(n) for n in np.cumsum([0, *sizes[:-1]])]  # each shard's first position in the set
    before = sum(sizes) - sum(sizes[k] for k in todo)
    report = progress or (lambda done, total: None)
    folders = tuple(sorted({label for label in image_set.labels if label}))
    report(before, len(image_set))
    start = time.perf_counter()
    if address:
        _on_ray(address, job, image_set, folders, shards, todo, files, sizes, firsts, before, report)
    else:
        for k in todo:
            _write(files[k], shard_sums(loaded, job, image_set.shard(k, shards), folders,
                                        lambda done, _, before=before: report(before + done, len(image_set)),
                                        first=firsts[k]))
            before += sizes[k]
    if job.what == "examples":
        return _examples_result(folder, job, image_set, files, start if todo else None, todo)
    merged, skipped = None, 0
    for path in files:
        with np.load(path) as arrays:
            part = _unpack(arrays)
            skipped += int(arrays["skipped"])
        merged = part if merged is None else pruning.merge_score_sums(merged, part)
    sums, taylor = merged
    table = (activations.stats_frame(sums, job.threshold) if job.what == "stats"
             else pruning.scores_frame(loaded.model, sums, taylor, job.threshold))
    table.to_csv(folder / RESULT, index=False)
    seen = next(iter(sums.values())).images
    return Result(folder, table, seen, skipped, time.perf_counter() - start if todo else 0.0, todo)


def _examples_result(folder: Path, job: Job, image_set: datasets.FileSet, files: list[Path], start: float | None,
                     todo: list[int]) -> Result:
    """The shards' top-k merged into the set's (the same rows as one pass: merge_top), each named by its file."""
    parts, skipped, measured_at = [], 0, job.layers[0]
    for path in files:
        with np.load(path) as arrays:
            parts.append(pd.DataFrame({name: arrays[f"examples|{name}"] for name in examples.COLUMNS}))
            skipped += int(arrays["skipped"])
            measured_at = str(arrays["measured_at"])
    table = examples.merge_top(parts, job.k)
    table["file"] = [image_set.names[int(i)] for i in table["image"]]
    table.attrs["measured_at"] = measured_at
    table.to_csv(folder / RESULT, index=False)
    seconds = time.perf_counter() - start if start is not None else 0.0
    return Result(folder, table, len(image_set) - skipped, skipped, seconds, todo)


class _ShardWorker:
    """A Ray actor: loads the model once, then computes the shards it is handed."""

    def __init__(self, source: str):
        self.loaded = models.load(source)

    def compute(self, job: Job, shard: datasets.FileSet, folders: tuple[str, ...], index: int,
                first: int) -> tuple[int, dict]:
        return index, shard_sums(self.loaded, job, shard, folders, first=first)


def _on_ray(address, job, image_set, folders, shards, todo, files, sizes, firsts, before, report) -> None:
    """The missing shards as Ray actor calls; each shard file is written by the driver as it arrives."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError as exc:
        raise AuditError("--ray needs Ray (pip install ray).") from exc
    passed = {name: value for name, value in os.environ.items() if name.startswith(("CNN_AUDIT_", "TF_CPP"))}
    passed["CNN_AUDIT_DATA"] = str(storage.data_dir())  # the package is copied: its default folder would move
    ray.init(address=None if address == "local" else address, ignore_reinit_error=True, include_dashboard=False,
             log_to_driver=False, logging_level="ERROR",
             runtime_env={"py_modules": [str(Path(__file__).parent)], "env_vars": passed})
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    count = max(1, min(len(todo), gpus or int(resources.get("CPU", 1))))
    worker = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0)(_ShardWorker)
    pool = ActorPool([worker.remote(job.source) for _ in range(count)])
    done = before
    for k, arrays in pool.map_unordered(
            lambda actor, k: actor.compute.remote(job, image_set.shard(k, shards), folders, k, firsts[k]), todo):
        _write(files[k], arrays)
        done += sizes[k]
        report(done, len(image_set))


def finished(fingerprint: str, whats: tuple[str, ...] = tuple(WHATS)) -> list[dict]:
    """The finished runs of a model (by its weights) that compute one of `whats`, newest first: each
    job.json with its folder."""
    found = []
    for path in (storage.data_dir() / "runs").glob("*/job.json"):
        if (path.parent / RESULT).exists():
            job = json.loads(path.read_text())
            if job.get("fingerprint") == fingerprint and job.get("what") in whats:
                found.append({**job, "folder": str(path.parent), "finished": (path.parent / RESULT).stat().st_mtime})
    return sorted(found, key=lambda job: -job["finished"])


def read_result(folder: str | Path) -> pd.DataFrame:
    """A finished run's table (filter_stats or filter_scores rows), as the command line wrote it."""
    path = Path(folder) / RESULT
    if not path.exists():
        raise AuditError(f"{Path(folder).name}: no finished result.")
    return pd.read_csv(path)
