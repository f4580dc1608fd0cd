"""Images in, model inputs out: sample photos, uploads, folders and zips, and per-model preprocessing.

Everything a user can hand us is turned into uint8 RGB (H, W, 3) arrays first: grayscale is
repeated over three channels, alpha is composited on white, and huge files are refused before they
are decoded (decompression bombs). Preprocessing to a model's float input happens afterwards, in
one place, by a named mode, so the dashboard can show and override which one a model uses.
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from audit import limits
from audit.errors import ImageError

MAX_PIXELS = limits.IMAGE_PIXELS.default
"""Largest image we decode by default (about 7000 x 7000): a small PNG can expand to gigabytes otherwise."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# skimage.data photos that ship inside the package (the others are downloaded on first use).
SAMPLE_PHOTOS = (
    "chelsea", "astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
    "retina", "colorwheel", "camera", "coins", "moon", "logo",
)

PREPROCESSING = {
    "unit": "divide by 255: floats in [0, 1]",
    "tf": "scale to [-1, 1] (Inception, MobileNet, Xception, ResNetV2)",
    "caffe": "RGB to BGR, minus the ImageNet mean (VGG, ResNet)",
    "caffe_bsds": "RGB to BGR, minus the BSDS500 mean of HED",
    "torch": "[0, 1], then ImageNet mean and std per channel (DenseNet)",
    "raw": "pixel values 0..255 as floats (models that rescale inside, e.g. EfficientNet)",
}
"""Preprocessing modes by name, with what each does (shown in the dashboard)."""

_BSDS_MEAN_BGR = np.array([104.00699, 116.66877, 122.67892], dtype=np.float32)


@dataclass(frozen=True)
class LabelledImage:
    """One decoded image with where it came from and, for class folders, its label."""

    name: str
    pixels: np.ndarray  # uint8 (H, W, 3)
    label: str | None = None


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Any 2-D, 1-, 3- or 4-channel array (uint8, bool or float in [0, 1]) as uint8 RGB (H, W, 3)."""
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    elif image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating) and image.size and image.max() <= 1.0:
            image = image * 255.0
        image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4) or min(image.shape[:2]) < 1:
        raise ImageError(f"Not an image: an array of shape {image.shape}; expected (H, W), (H, W, 3) or (H, W, 4).")
    channels = image.shape[2]
    if channels in (2, 4):  # gray or RGB with alpha: composite on white
        alpha = image[:, :, -1:].astype(np.float32) / 255.0
        colour = image[:, :, :-1].astype(np.float32)
        image = np.round(colour * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        channels -= 1
    if channels == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image)


def sample(name: str) -> np.ndarray:
    """One of scikit-image's bundled photos as uint8 RGB (no download)."""
    if name not in SAMPLE_PHOTOS:
        raise ImageError(f"Unknown sample photo {name!r}; choose one of {', '.join(SAMPLE_PHOTOS)}.")
    import skimage.data

    return to_rgb(getattr(skimage.data, name)())


FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
"""The only image formats opened: Pillow's other readers (EPS runs Ghostscript, PSD, ...) are never tried."""


def decode(data: bytes, name: str = "image", max_side: int | None = None) -> np.ndarray:
    """Decode PNG/JPEG/WebP/BMP/GIF/TIFF bytes to uint8 RGB, refusing files that are not images or too large.

    The format, size and shape are checked from the header, before any pixel is decoded; the EXIF orientation
    is applied (a phone's portrait photo stands up); 16-bit images are scaled to 8 bits, not clipped. With
    `max_side`, a larger image is reduced to fit it as it is decoded (JPEG at a reduced scale, the others
    resized right after), so a set of photos holds megabytes, not gigabytes.
    """
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            width, height = img.size
            limits.IMAGE_PIXELS.check(width * height, f"{name} ({width} x {height})", ImageError)
            limits.ASPECT_RATIO.check(max(width, height) / max(1, min(width, height)),
                                      f"{name} ({width} x {height})", ImageError)
            if img.format == "JPEG":  # each scan of a progressive JPEG walks every block of the image again
                limits.JPEG_SCANS.check(jpeg_scans(data), f"{name} ({width} x {height}, progressive)", ImageError)
            if max_side and max(width, height) > max_side:
                img.draft("RGB", (max_side, max_side))  # JPEG decodes at 1/2, 1/4 or 1/8 scale; others ignore it
            img.load()
            img = ImageOps.exif_transpose(img)
            if max_side and max(img.size) > max_side:
                img.thumbnail((max_side, max_side), Image.BILINEAR)
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit grey: 0..65535 to 0..255
                return to_rgb(np.round(np.asarray(img, np.float64) / 257.0).clip(0, 255).astype(np.uint8))
            if img.mode not in ("L", "LA", "RGB", "RGBA"):
                img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
            return to_rgb(np.asarray(img))
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        detail = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc)) or type(exc).__name__
        raise ImageError(f"{name}: cannot be read as an image ({detail}; {', '.join(FORMATS)} are read)."
                         ) from exc


def jpeg_scans(data: bytes) -> int:
    """How many scans a JPEG's bytes hold (its start-of-scan markers), without decoding: in the entropy-coded
    data a 0xFF byte is always followed by 0x00 or a restart marker, so each 0xFF 0xDA starts a scan (an EXIF
    thumbnail's own scan counts too: an upper bound). A baseline photo has 1, a progressive one about 10; a
    file of thousands of tiny scans over a large declared image costs minutes of decoding for a few KB."""
    return data.count(b"\xff\xda")


def header_pixels(data_or_file, name: str) -> int:
    """Width x height from an image's header alone (nothing decoded); 0 when it is not an image we read."""
    try:
        with Image.open(data_or_file, formats=FORMATS) as img:
            return img.size[0] * img.size[1]
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return 0


def read(path: str | Path) -> np.ndarray:
    """Decode an image file from disk."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot be read ({exc.strerror or exc}).") from exc
    return decode(data, path.name, max_side=limits.IMAGE_SIDE.value)


def class_label(relative: Path) -> str | None:
    """The class of an image in a `class_name/image.png` layout (one folder per class)."""
    parts = relative.parts
    return parts[-2] if len(parts) >= 2 else None


def _accept(relative: Path) -> bool:
    hidden = any(part.startswith((".", "__MACOSX")) for part in relative.parts)
    return relative.suffix.lower() in IMAGE_SUFFIXES and not hidden


def folder_files(folder: str | Path) -> list[Path]:
    """The image files below a folder, relative to it and sorted (hidden ones left out); none is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: not a folder.")
    relative = sorted(p.relative_to(folder) for p in folder.rglob("*")
                      if p.is_file() and _accept(p.relative_to(folder)))
    if not relative:
        raise ImageError(f"{folder}: no images found ({', '.join(IMAGE_SUFFIXES)}).")
    return relative


def read_folder(folder: str | Path, limit: int | None = None) -> list[LabelledImage]:
    """Every image below a folder, sorted by path; subfolder names become labels."""
    return [LabelledImage(str(p), read(Path(folder) / p), class_label(p)) for p in folder_files(folder)[:limit]]


def zip_members(archive: zipfile.ZipFile, name: str) -> list[zipfile.ZipInfo]:
    """The image members of an archive, sorted by name, within the member-count limit (read from its directory)."""
    infos = sorted((i for i in archive.infolist() if not i.is_dir() and _accept(Path(i.filename))),
                   key=lambda i: i.filename)
    limits.ARCHIVE_MEMBERS.check(len(infos), name, ImageError)
    return infos


def read_zip(data: bytes, limit: int | None = None, name: str = "the zip archive") -> list[LabelledImage]:
    """Every image inside a zip archive; members are only read into memory, never extracted."""
    return read_zip_report(data, limit, name)[0]


def read_zip_report(data: bytes, limit: int | None = None, name: str = "the zip archive"
                    ) -> tuple[list[LabelledImage], list[str]]:
    """The images of a zip archive and, for each member skipped, which and why.

    Sizes are read from the archive's directory before a member is decompressed, and the archive's total
    pixels from the members' headers before any is decoded; a member that cannot be read is skipped (said
    so), not a reason to refuse the whole archive; each image is kept at most limits.IMAGE_SIDE on its
    longer side.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise ImageError(f"{name}: not a readable zip archive ({exc}).") from exc
    infos = zip_members(archive, name)[:limit]
    pixels = 0
    for info in infos:  # the budget from the headers first: a refusal costs milliseconds, not a decode
        if info.file_size <= limits.ZIP_IMAGE_BYTES.value:
            try:
                with archive.open(info) as member:
                    pixels += header_pixels(member, info.filename)
            except (zipfile.BadZipFile, OSError, RuntimeError, EOFError):
                continue
        limits.ZIP_TOTAL_PIXELS.check(pixels, name, ImageError)
    images, skipped = [], []
    side = limits.IMAGE_SIDE.value
    for info in infos:  # one member at a time, reduced to the pages' size as it is decoded, then freed
        try:
            limits.ZIP_IMAGE_BYTES.check(info.file_size, info.filename, ImageError)
            image = decode(archive.read(info), info.filename, max_side=side)
        except (ImageError, zipfile.BadZipFile, OSError, RuntimeError, EOFError) as exc:
            skipped.append(str(exc) if isinstance(exc, ImageError) else f"{info.filename}: unreadable ({exc}).")
            continue
        images.append(LabelledImage(info.filename, image, class_label(Path(info.filename))))
    if not images:
        reasons = f" Skipped: {' '.join(skipped[:3])}" if skipped else ""
        raise ImageError(f"{name} holds no readable images ({', '.join(IMAGE_SUFFIXES)}).{reasons}")
    return images, skipped


def fit(image: np.ndarray, size: tuple[int, int], mode: str = "crop") -> np.ndarray:
    """Resize uint8 RGB to (H, W): `crop` keeps the aspect ratio by cutting the centre, `squash` does not."""
    height, width = size
    img = Image.fromarray(to_rgb(image))
    if mode == "crop":  # the centre box with the target's aspect, resized straight to the target size
        scale = max(width / img.width, height / img.height)
        box_width, box_height = min(img.width, width / scale), min(img.height, height / scale)
        left, top = (img.width - box_width) / 2, (img.height - box_height) / 2
        img = img.resize((width, height), Image.BILINEAR, box=(left, top, left + box_width, top + box_height))
    elif mode == "squash":
        img = img.resize((width, height), Image.BILINEAR)
    else:
        raise ValueError(f"unknown fit mode {mode!r}")
    return np.asarray(img)


def fit_mask(mask: np.ndarray, size: tuple[int, int], mode: str = "crop") -> np.ndarray:
    """A boolean object mask resized exactly as `fit` resizes its image (a 64-px shape under a 224-px model)."""
    grey = np.where(np.asarray(mask, bool), 255, 0).astype(np.uint8)
    return fit(grey, size, mode)[..., 0] >= 128


def preprocess(images: np.ndarray, mode: str) -> np.ndarray:
    """uint8 RGB (N, H, W, 3) to a model's float32 input by a named mode (see PREPROCESSING)."""
    from keras.applications import imagenet_utils

    x = np.asarray(images, dtype=np.float32)
    if mode == "unit":
        return x / 255.0
    if mode == "raw":
        return x
    if mode in ("tf", "caffe", "torch"):
        return imagenet_utils.preprocess_input(x.copy(), data_format="channels_last", mode=mode)
    if mode == "caffe_bsds":
        return x[..., ::-1] - _BSDS_MEAN_BGR
    raise ValueError(f"Unknown preprocessing {mode!r}; choose one of {', '.join(PREPROCESSING)}.")


def image_hash(images: np.ndarray | list[np.ndarray]) -> str:
    """A short content hash of one image or an image set: the cache key for results on those pixels."""
    digest = hashlib.sha256()
    for image in images if isinstance(images, list) else [images]:
        image = np.ascontiguousarray(image)
        digest.update(str((image.shape, image.dtype.str)).encode())
        digest.update(image.tobytes())
    return digest.hexdigest()[:16]


def stratified(labels, count: int, seed: int = 0) -> np.ndarray:
    """Indices of `count` images drawn class by class: every class within one image of the others, as far as
    the set allows (a class that runs out leaves its turn to the others), seeded.

    `labels` are any hashable per image (class names or indices; None for all is one class). The draw goes
    round the classes (in a seeded order), one image each, each class's images in a seeded order; so the
    first k indices of a larger draw are the draw of k, and a sweep on a few images sees every class before
    it sees a second image of any.
    """
    labels = list(labels)
    count = max(0, min(int(count), len(labels)))
    rng = np.random.default_rng(seed)
    classes = sorted({label for label in labels}, key=str)
    members = {label: [] for label in classes}
    for index, label in enumerate(labels):
        members[label].append(index)
    queues = [list(rng.permutation(members[label])) for label in (classes[i] for i in rng.permutation(len(classes)))]
    drawn: list[int] = []
    while len(drawn) < count:
        for queue in queues:
            if queue and len(drawn) < count:
                drawn.append(int(queue.pop(0)))
    return np.asarray(drawn, dtype=int)


def per_class(labels, indices) -> dict:
    """How many of the chosen images each class has, for "N images, k per class" (in sorted class order)."""
    chosen = [list(labels)[int(i)] for i in indices]
    return {label: chosen.count(label) for label in sorted(set(list(labels)), key=str)}


def describe_sample(labels, indices, show=str) -> str:
    """"12 images, 4 per class (3 classes)" or "12 images: cat 5, dog 7" or "12 images (no labels)" (`show`
    writes a class name, e.g. escaped for markdown)."""
    counts = per_class(labels, indices)
    total = len(indices)
    noun = "image" if total == 1 else "images"
    if list(counts) == [None] or not counts:
        return f"{total} {noun} (no labels)"
    values = set(counts.values())
    if len(values) == 1:
        return f"{total} {noun}, {values.pop()} per class ({len(counts)} classes)"
    return f"{total} {noun}: " + ", ".join(f"{show(label)} {n}" for label, n in counts.items())


def balanced_count(budget: int, labels) -> int:
    """The number of images to draw within `budget` so that every class gets as many (at least one each when
    the budget allows; the whole budget when it cannot cover every class), never more than the set has."""
    labels = list(labels)
    classes = max(len(set(labels)), 1)
    budget = max(1, min(int(budget), len(labels)))
    return budget if budget < classes else budget - budget % classes
