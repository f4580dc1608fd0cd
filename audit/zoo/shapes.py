"""Generated coloured shapes on textured backgrounds: the demo model's data, with ground truth.

Every image carries one object whose exact mask is returned with it, so attribution maps can be
checked against where the object really is. Image i of a seed is drawn from its own generator
(seeded by (seed, i)), so it is the same whatever the number of images asked for.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

CLASSES = ("circle", "square", "triangle", "star", "cross", "ring")
IMAGE_SIZE = 64


class ShapesData(NamedTuple):
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int64 (N,)
    masks: np.ndarray  # bool (N, H, W): True on the object's pixels


def labelled(data: ShapesData) -> list:
    """The shapes as audit.images.LabelledImage ("shape i", pixels, class name)."""
    from audit.images import LabelledImage

    return [LabelledImage(f"shape {i}", data.images[i], CLASSES[data.labels[i]]) for i in range(len(data.labels))]


def write_folder(data: ShapesData, folder, offset: int = 0) -> None:
    """The shapes as PNG files in one subfolder per class (a validation folder on disk, for streamed runs);
    file i is named by offset + i, so several calls can fill one folder."""
    from pathlib import Path

    from PIL import Image

    for i, (image, label) in enumerate(zip(data.images, data.labels)):
        path = Path(folder) / CLASSES[label] / f"{offset + i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)


def _polygon_mask(x: np.ndarray, y: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """Pixels inside a polygon (even-odd rule), vectorised over the grid."""
    inside = np.zeros(x.shape, bool)
    x0, y0 = corners[-1]
    for x1, y1 in corners:
        crosses = (y1 > y) != (y0 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            at = (x0 - x1) * (y - y1) / (y0 - y1) + x1
        inside ^= crosses & (x < at)
        x0, y0 = x1, y1
    return inside


def _regular(n: int, radius: float, angle: float, inner: float | None = None) -> np.ndarray:
    """Corners of a regular polygon (or a star when `inner` radius is given), centred on 0."""
    count = 2 * n if inner else n
    theta = angle + np.arange(count) * 2 * np.pi / count
    radii = np.where(np.arange(count) % 2, inner, radius) if inner else np.full(count, radius)
    return np.stack([radii * np.cos(theta), radii * np.sin(theta)], axis=1)


def shape_mask(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The mask of one object of a class, at a random size, place and rotation, fully inside."""
    radius = rng.uniform(0.17, 0.33) * size
    margin = radius + 1
    cx, cy = rng.uniform(margin, size - margin, 2)
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = x - cx, y - cy
    name = CLASSES[label]
    if name == "circle":
        return dx ** 2 + dy ** 2 <= radius ** 2
    if name == "ring":
        distance = np.sqrt(dx ** 2 + dy ** 2)
        return (distance <= radius) & (distance >= radius * rng.uniform(0.5, 0.65))
    if name == "cross":
        c, s = np.cos(angle), np.sin(angle)
        u, v = np.abs(dx * c + dy * s), np.abs(-dx * s + dy * c)
        arm = radius * rng.uniform(0.28, 0.38)
        return ((u <= radius) & (v <= arm)) | ((v <= radius) & (u <= arm))
    corners = {
        "square": lambda: _regular(4, radius * 1.2, angle),
        "triangle": lambda: _regular(3, radius * 1.25, angle),
        "star": lambda: _regular(5, radius * 1.2, angle, inner=radius * 0.5),
    }[name]()
    return _polygon_mask(dx, dy, corners)


def background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A float RGB texture in [0, 1]: a gradient, stripes, a checker or blotches, with noise."""
    y, x = np.mgrid[0:size, 0:size] / size
    base, other = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    kind = rng.integers(4)
    if kind == 0:  # gradient
        angle = rng.uniform(0, 2 * np.pi)
        t = np.clip((np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5)) + 0.5, 0, 1)
    elif kind == 1:  # stripes
        angle, frequency = rng.uniform(0, np.pi), rng.uniform(3, 10)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * frequency * (np.cos(angle) * x + np.sin(angle) * y))
    elif kind == 2:  # checker
        cells = rng.integers(3, 9)
        t = ((np.floor(x * cells) + np.floor(y * cells)) % 2).astype(float)
    else:  # smooth blotches: a few random Gaussian bumps
        t = np.zeros_like(x)
        for _ in range(4):
            cx, cy, width = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.3)
            t += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * width ** 2))
        t = t / t.max()
    t = t * rng.uniform(0.3, 0.8)  # the texture never spans the full contrast of the object
    image = base * (1 - t[..., None]) + other * t[..., None]
    return np.clip(image + rng.normal(0, 0.04, image.shape), 0, 1)


def _object_colour(backdrop: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random colour far enough from the background under the object to be seen."""
    under = backdrop[mask].mean(axis=0)
    for _ in range(20):
        colour = rng.uniform(0, 1, 3)
        if np.abs(colour - under).sum() > 0.9:
            return colour
    return 1.0 - np.round(under)  # fall back to the opposite corner of the colour cube


def generate(n: int, seed: int, size: int = IMAGE_SIZE) -> ShapesData:
    """`n` images with balanced labels (image i has class i % len(CLASSES)) and object masks."""
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.arange(n, dtype=np.int64) % len(CLASSES)
    masks = np.empty((n, size, size), bool)
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        backdrop = background(size, rng)
        mask = shape_mask(int(labels[i]), size, rng)
        colour = _object_colour(backdrop, mask, rng)
        shaded = colour * rng.uniform(0.85, 1.0) + rng.normal(0, 0.03, (size, size, 3))
        image = np.where(mask[..., None], np.clip(shaded, 0, 1), backdrop)
        images[i] = np.round(image * 255).astype(np.uint8)
        masks[i] = mask
    return ShapesData(images, labels, masks)
