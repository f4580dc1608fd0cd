"""Maps to pictures: colour maps and overlays of a (H, W) map on an image, as uint8 RGB arrays.

Kept apart from the UI so the report and the command line draw exactly what the dashboard shows.
Colour scales come from Plotly, which the dashboard already uses for its charts.
"""

from __future__ import annotations

import functools

import numpy as np
import plotly.colors

COLOUR_MAPS = ("Viridis", "Inferno", "Jet", "Turbo", "Greys_r")


@functools.lru_cache(maxsize=None)
def _lookup_table(name: str) -> np.ndarray:
    """256 RGB colours sampled from a Plotly colour scale (a trailing `_r` reverses it)."""
    reverse = name.endswith("_r")
    scale = plotly.colors.get_colorscale(name[:-2] if reverse else name)
    colours = plotly.colors.sample_colorscale(scale, np.linspace(0, 1, 256), colortype="tuple")
    table = np.array([plotly.colors.unlabel_rgb(c) if isinstance(c, str) else c for c in colours], np.float64)
    table = table * (255.0 if table.max() <= 1.0 else 1.0)
    return np.round(table[::-1] if reverse else table).astype(np.uint8)


def scale01(values: np.ndarray) -> np.ndarray:
    """Any map linearly scaled to [0, 1] (a flat map becomes 0)."""
    values = np.asarray(values, np.float32)
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def colourise(values: np.ndarray, colour_map: str = "Viridis", normalise: bool = True) -> np.ndarray:
    """A (H, W) map as uint8 RGB through a colour map; values taken as [0, 1] unless normalised."""
    values = scale01(values) if normalise else np.clip(values, 0.0, 1.0)
    return _lookup_table(colour_map)[np.round(values * 255).astype(np.int64)]


def overlay(image: np.ndarray, values: np.ndarray, opacity: float = 0.5, colour_map: str = "Jet") -> np.ndarray:
    """A map (resized beforehand to the image) blended over uint8 RGB at the given opacity."""
    if values.shape != image.shape[:2]:
        raise ValueError(f"map {values.shape} and image {image.shape[:2]} differ in size")
    heat = colourise(values, colour_map).astype(np.float32)
    return np.round(image.astype(np.float32) * (1 - opacity) + heat * opacity).astype(np.uint8)


def png(pixels: np.ndarray) -> bytes:
    """A picture as PNG bytes (floats taken as [0, 1]), for downloads and the HTML report."""
    import io

    from PIL import Image

    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        pixels = np.round(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:  # a grayscale model's picture: Pillow takes (H, W), not (H, W, 1)
        pixels = pixels[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def tiles(pictures: list[np.ndarray], columns: int = 8, gap: int = 2) -> np.ndarray:
    """Same-size uint8 RGB pictures in one grid with white gaps (a gallery as one PNG)."""
    height, width = pictures[0].shape[:2]
    rows = -(-len(pictures) // columns)
    columns = min(columns, len(pictures))
    grid = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, np.uint8)
    for index, picture in enumerate(pictures):
        top, left = (index // columns) * (height + gap), (index % columns) * (width + gap)
        grid[top:top + height, left:left + width] = picture
    return grid


def patch_grid(patches: list[np.ndarray], slots: int = 4, size: int = 48, columns: int = 2) -> np.ndarray:
    """Patches of different sizes (a receptive field clipped at the border is smaller) each resized to `size`
    px, in a grid of `slots` (white where there are fewer): a filter's dataset examples as one picture."""
    from PIL import Image

    squares = [np.asarray(Image.fromarray(np.asarray(p, np.uint8)).convert("RGB").resize((size, size), Image.NEAREST))
               for p in patches[:slots]]
    return tiles(squares + [np.full((size, size, 3), 255, np.uint8)] * (slots - len(squares)), columns=columns)
