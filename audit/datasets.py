"""Image sets streamed from disk: a folder, a zip, a list of files, or a tf.data.Dataset a notebook hands in.

An in-memory image set stops at a few thousand images (50,000 at 224 px is 30 GB of floats). A
`FileSet` holds only paths and labels; `batches` reads it through tf.data (parallel decode and fit,
prefetch) with the same decoding rules and limits as `images.read`, so a pass over it runs in constant
memory. Order is the sorted file order and sampling is seeded: the same set and seed give the same
numbers. Unreadable files are skipped and counted, not a reason to stop a long run.
"""

from __future__ import annotations

import hashlib
import threading
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf

from audit import images, limits
from audit.errors import ImageError

BATCH_SIZE = 32


@dataclass(frozen=True)
class FileSet:
    """Image files in a deterministic order, with their class labels where the layout gives them.

    `archive` set: the names are members of that zip (read, never extracted).
    """

    names: tuple[str, ...]
    labels: tuple[str | None, ...]
    root: str  # the folder the names are relative to, or the zip's path
    archive: bool = False
    skipped: list = field(default_factory=list, compare=False, hash=False, repr=False)

    def __len__(self) -> int:
        return len(self.names)

    def _subset(self, positions) -> "FileSet":
        return FileSet(tuple(self.names[i] for i in positions), tuple(self.labels[i] for i in positions),
                       self.root, self.archive)

    def sample(self, count: int, seed: int = 0, skip: int = 0) -> "FileSet":
        """A seeded sample of `count` files, in the set's order; a bigger count keeps the smaller's files
        (the first `count` of one seeded permutation), so a growing sample only adds images. `skip`: leave
        out the first `skip` of them (what a sample of `skip` already holds)."""
        return self._subset(sorted(_permutation(len(self), seed)[skip:count]))

    def shard(self, index: int, count: int) -> "FileSet":
        """The index-th of `count` contiguous shards; the shards in order are the whole set."""
        edges = np.linspace(0, len(self), count + 1).round().astype(int)
        return self._subset(range(edges[index], edges[index + 1]))

    def key(self) -> str:
        """Names the set for caches and run folders: the root, the names and each file's size and time
        (read once per FileSet: a page rerun does not stat 50,000 files again)."""
        return self._key

    @cached_property
    def _key(self) -> str:
        digest = hashlib.sha256(f"{Path(self.root).resolve()}|{self.archive}".encode())
        if self.archive:
            stat = Path(self.root).stat()
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        for name in self.names:
            digest.update(name.encode())
            if not self.archive:
                stat = (Path(self.root) / name).stat()
                digest.update(f":{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()[:16]

    def read(self, position: int) -> np.ndarray:
        """One image as uint8 RGB, by the rules of images.decode (the limits included)."""
        name = self.names[position]
        if not self.archive:
            return images.read(Path(self.root) / name)
        info = _archive(self.root).getinfo(name)
        limits.ZIP_IMAGE_BYTES.check(info.file_size, name, ImageError)
        return images.decode(_archive(self.root).read(info), name, max_side=limits.IMAGE_SIDE.value)


def _permutation(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(count)


_ARCHIVES = threading.local()


def _archive(path: str) -> zipfile.ZipFile:
    """One open ZipFile per thread and archive: tf.data decodes on several threads."""
    opened = getattr(_ARCHIVES, "files", None)
    if opened is None:
        opened = _ARCHIVES.files = {}
    if path not in opened:
        opened[path] = zipfile.ZipFile(path)
    return opened[path]


def from_folder(folder: str | Path) -> FileSet:
    """Every image below a folder, sorted by path; one subfolder per class gives the labels."""
    names = images.folder_files(folder)
    return FileSet(tuple(map(str, names)), tuple(map(images.class_label, names)), str(folder))


def from_zip(path: str | Path) -> FileSet:
    """The images of a zip archive on disk, read member by member (never extracted, never all at once)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [info.filename for info in images.zip_members(archive, Path(path).name)]
    except (zipfile.BadZipFile, OSError) as exc:
        raise ImageError(f"{Path(path).name}: not a readable zip archive ({exc}).") from exc
    if not names:
        raise ImageError(f"{Path(path).name} holds no images ({', '.join(images.IMAGE_SUFFIXES)}).")
    return FileSet(tuple(names), tuple(images.class_label(Path(n)) for n in names), str(path), archive=True)


def from_files(paths: list[str | Path], labels: list[str | None] | None = None) -> FileSet:
    """A list of image files (absolute or relative to the working folder), kept in the given order."""
    if not paths:
        raise ImageError("The list of image files is empty.")
    if labels is not None and len(labels) != len(paths):
        raise ImageError(f"{len(labels)} labels for {len(paths)} files.")
    return FileSet(tuple(str(Path(p).resolve()) for p in paths), tuple(labels or [None] * len(paths)), "/")


def open_set(spec: str | Path) -> FileSet:
    """A folder or a .zip on disk, or a text file listing one image path per line."""
    path = Path(spec)
    if path.is_file() and path.suffix.lower() == ".zip":
        return from_zip(path)
    if path.is_file() and path.suffix.lower() == ".txt":
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        return from_files([p if Path(p).is_absolute() else path.parent / p for p in lines])
    return from_folder(path)


@dataclass(frozen=True)
class Input:
    """How a model takes images: the pixels it is fed after decoding (see models.LoadedModel.preprocess)."""

    prepare: Callable[[np.ndarray], np.ndarray]  # uint8 RGB (H, W, 3) -> float32 (h, w, c)
    shape: tuple[int, int, int]
    class_names: tuple[str, ...] = ()


def model_input(loaded, preprocessing: str | None = None, fit: str = "crop", labels=()) -> Input:
    """The Input of a loaded model (audit.models.LoadedModel), with its class names for the labels: the
    model's, else the set's class folders when they are as many as its classes (audit.heads.class_names)."""
    from audit import heads

    shape = (*loaded.input_size, int(loaded.model.inputs[0].shape[-1]))
    names = heads.class_names(loaded.class_names, loaded.head(), labels)[0] if loaded.head().is_classifier else ()
    return Input(lambda image: loaded.preprocess(image, preprocessing, fit)[0], shape, tuple(names))


def batches(source: FileSet | tf.data.Dataset, model_in: Input, batch_size: int = BATCH_SIZE,
            positions: bool = False) -> tf.data.Dataset:
    """Batches of (x float32 (n, h, w, c), label index int32 (n,), -1 when unknown) in the set's order.

    `positions`: a third element, each image's position in the set (int64), so a result that names images
    stays right when an unreadable file was dropped before them.

    A FileSet is decoded on tf.data's threads (PIL releases the GIL while it decodes); a file that
    cannot be read is dropped and noted in `source.skipped`. A tf.data.Dataset may yield images (uint8
    or encoded bytes, e.g. from TFRecords) or (image, label) pairs, unbatched.
    """
    classes = {name: i for i, name in enumerate(model_in.class_names)}

    def fail(message):
        if isinstance(source, FileSet):
            source.skipped.append(message)
        return np.zeros(model_in.shape, np.float32), np.int32(-1), False

    def from_position(position):
        try:
            image = source.read(int(position))
        except ImageError as exc:
            return fail(str(exc))
        label = source.labels[int(position)]
        return model_in.prepare(image).astype(np.float32), np.int32(classes.get(label, -1)), True

    def from_element(image, label):
        try:
            pixels = (images.decode(image, "a dataset element") if isinstance(image, bytes)
                      else images.to_rgb(image))
        except ImageError as exc:
            return fail(str(exc))
        label = label.decode() if isinstance(label, bytes) else label
        index = classes.get(label, -1) if isinstance(label, str) else int(label)
        return model_in.prepare(pixels).astype(np.float32), np.int32(index), True

    # The tf.data functions below have no tensor-dependent Python control flow: AutoGraph is not needed
    # (and cannot re-read their source when the file changed under a long-running process).
    @tf.autograph.experimental.do_not_convert
    def typed(function, *args):
        x, label, ok = tf.numpy_function(function, args, (tf.float32, tf.int32, tf.bool))
        return tf.ensure_shape(x, model_in.shape), tf.ensure_shape(label, []), ok

    @tf.autograph.experimental.do_not_convert
    def read_position(position):
        return typed(from_position, position)

    @tf.autograph.experimental.do_not_convert
    def read_element(image, label):
        return typed(from_element, image, label)

    @tf.autograph.experimental.do_not_convert
    def unlabelled(image):
        return image, -1

    @tf.autograph.experimental.do_not_convert
    def readable(position, read):
        return read[2]

    @tf.autograph.experimental.do_not_convert
    def pair(position, read):
        return (read[0], read[1], position) if positions else (read[0], read[1])

    if isinstance(source, FileSet):
        elements = tf.data.Dataset.range(len(source)).map(
            tf.autograph.experimental.do_not_convert(lambda position: (position, read_position(position))),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        paired = source if isinstance(source.element_spec, tuple) else source.map(unlabelled)
        elements = paired.enumerate().map(
            tf.autograph.experimental.do_not_convert(lambda position, item: (position, read_element(*item))),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return elements.filter(readable).map(pair).batch(batch_size).prefetch(tf.data.AUTOTUNE)


def images_only(batches: tf.data.Dataset) -> tf.data.Dataset:
    """The x of each (x, labels) batch, for model.predict."""
    return batches.map(tf.autograph.experimental.do_not_convert(lambda x, labels: x))


def in_memory(x: np.ndarray, labels: np.ndarray | None = None, batch_size: int = BATCH_SIZE):
    """An in-memory preprocessed array as the same (x, label) batches: one more kind of set."""
    targets = np.full(len(x), -1, np.int32) if labels is None else np.asarray(labels, np.int32)
    for start in range(0, len(x), batch_size):
        yield (tf.convert_to_tensor(np.asarray(x[start:start + batch_size], np.float32)),
               tf.constant(targets[start:start + batch_size]))
