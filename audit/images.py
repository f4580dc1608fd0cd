"""Images in, model inputs out: sample photos, uploads, folders and zips, and per-model preprocessing.

Everything a user can hand us is turned into uint8 RGB (H, W, 3) arrays first: grayscale is
repeated over three channels, alpha is composited on white, and huge files are refused before they
are decoded (decompression bombs). Preprocessing to a model's float input happens afterwards, in
one place, by a named mode, so the dashboard can show and override which one a model uses.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from audit.errors import ImageError

MAX_PIXELS = 50_000_000
"""Largest image we decode (about 7000 x 7000): a small PNG can expand to gigabytes otherwise."""

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


def decode(data: bytes, name: str = "image") -> np.ndarray:
    """Decode PNG/JPEG/... bytes to uint8 RGB, refusing files that are not images or are too large."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise ImageError(
                    f"{name}: {width} x {height} pixels is more than the {MAX_PIXELS:,} we decode; "
                    "resize it first."
                )
            img.load()
            if img.mode not in ("L", "LA", "RGB", "RGBA"):
                img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
            return to_rgb(np.asarray(img))
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{name}: cannot be read as an image ({exc}).") from exc


def read(path: str | Path) -> np.ndarray:
    """Decode an image file from disk."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot be read ({exc.strerror or exc}).") from exc
    return decode(data, path.name)


def _class_label(relative: Path) -> str | None:
    """The class of an image in a `class_name/image.png` layout (one folder per class)."""
    parts = relative.parts
    return parts[-2] if len(parts) >= 2 else None


def _accept(relative: Path) -> bool:
    hidden = any(part.startswith((".", "__MACOSX")) for part in relative.parts)
    return relative.suffix.lower() in IMAGE_SUFFIXES and not hidden


def read_folder(folder: str | Path, limit: int | None = None) -> list[LabelledImage]:
    """Every image below a folder, sorted by path; subfolder names become labels."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: not a folder.")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and _accept(p.relative_to(folder)))
    images = [
        LabelledImage(str(p.relative_to(folder)), read(p), _class_label(p.relative_to(folder)))
        for p in paths[:limit]
    ]
    if not images:
        raise ImageError(f"{folder}: no images found ({', '.join(IMAGE_SUFFIXES)}).")
    return images


def read_zip(data: bytes, limit: int | None = None) -> list[LabelledImage]:
    """Every image inside a zip archive; members are only read into memory, never extracted."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = sorted(n for n in archive.namelist() if not n.endswith("/") and _accept(Path(n)))
        images = [
            LabelledImage(name, decode(archive.read(name), name), _class_label(Path(name)))
            for name in names[:limit]
        ]
    except zipfile.BadZipFile as exc:
        raise ImageError(f"Not a readable zip archive ({exc}).") from exc
    if not images:
        raise ImageError(f"The zip archive holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    return images


def fit(image: np.ndarray, size: tuple[int, int], mode: str = "crop") -> np.ndarray:
    """Resize uint8 RGB to (H, W): `crop` keeps the aspect ratio by cutting the centre, `squash` does not."""
    height, width = size
    img = Image.fromarray(to_rgb(image))
    if mode == "crop":
        scale = max(width / img.width, height / img.height)
        resized = img.resize((max(width, round(img.width * scale)), max(height, round(img.height * scale))),
                             Image.BILINEAR)
        left = (resized.width - width) // 2
        top = (resized.height - height) // 2
        img = resized.crop((left, top, left + width, top + height))
    elif mode == "squash":
        img = img.resize((width, height), Image.BILINEAR)
    else:
        raise ValueError(f"unknown fit mode {mode!r}")
    return np.asarray(img)


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
