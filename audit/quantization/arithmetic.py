"""Quantise-dequantise by the formulas TensorFlow Lite's int8 scheme uses (its quantization spec).

Weights: symmetric, per output channel, integers in [-127, 127], scale = max|w| / 127, zero point 0.
Activations: asymmetric, per tensor, integers in [-128, 127] over the calibrated range widened to hold 0
(so that 0, the padding and the ReLU floor, is exact), scale = (max - min) / 255, zero point
round(-128 - min / scale). What the model computes is then `(q - zero_point) * scale`: this module gives those
values, so a float model with them in place simulates the integer one.
"""

from __future__ import annotations

import numpy as np


def quantize_dequantize(values, bits: int = 8, axis: int | None = None, symmetric: bool = True,
                        value_range=None) -> np.ndarray:
    """`values` rounded to `bits`-bit integers and back, per tensor (`axis=None`) or per slice along `axis` (a
    conv kernel's output channels: axis=-1). `value_range` (low, high), scalars or one per slice, is the
    calibrated range; without it the values' own. A slice whose range is 0 is returned as it is."""
    values = np.asarray(values, np.float64)
    scale, zero_point, low, high = parameters(values, bits, axis, symmetric, value_range)
    safe = np.where(scale > 0, scale, 1.0)
    quantized = np.clip(np.round(values / safe) + zero_point, low, high)
    return np.where(scale > 0, (quantized - zero_point) * scale, values)


def parameters(values: np.ndarray, bits: int = 8, axis: int | None = None, symmetric: bool = True,
               value_range=None) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(scale, zero point, lowest integer, highest integer), the first two shaped to broadcast on `values`."""
    values = np.asarray(values, np.float64)
    if value_range is None:
        reduce = None if axis is None else tuple(i for i in range(values.ndim) if i != axis % values.ndim)
        minimum = np.min(values, axis=reduce, keepdims=axis is not None)
        maximum = np.max(values, axis=reduce, keepdims=axis is not None)
    else:
        minimum, maximum = (np.asarray(bound, np.float64) for bound in value_range)
        if axis is not None and minimum.ndim:
            shape = [1] * values.ndim
            shape[axis] = -1
            minimum, maximum = minimum.reshape(shape), maximum.reshape(shape)
    if symmetric:
        largest = 2 ** (bits - 1) - 1
        scale = np.maximum(np.abs(minimum), np.abs(maximum)) / largest
        return scale, np.zeros_like(scale), -largest, largest
    lowest, highest = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    minimum, maximum = np.minimum(minimum, 0.0), np.maximum(maximum, 0.0)
    scale = (maximum - minimum) / (highest - lowest)
    zero_point = np.round(lowest - minimum / np.where(scale > 0, scale, 1.0))
    return scale, np.clip(zero_point, lowest, highest), lowest, highest


def quantized_weights(layer) -> list[np.ndarray]:
    """The layer's weights with its kernels quantise-dequantised per output channel (a separable conv's
    depthwise kernel per its channel too; the bias stays: int32 at the product of scales is far finer than the
    activations' steps)."""
    weights = layer.get_weights()
    kernels = 2 if type(layer).__name__.startswith("Separable") else 1
    rounded = []
    for index, kernel in enumerate(weights):
        if index >= kernels:
            rounded.append(kernel)
            continue
        shaped = kernel
        if type(layer).__name__.endswith("Transpose"):
            shaped = np.moveaxis(kernel, -2, -1)
        if type(layer).__name__.startswith(("Depthwise", "Separable")) and index == 0:
            shaped = kernel.reshape(*kernel.shape[:-2], kernel.shape[-2] * kernel.shape[-1])
        values = quantize_dequantize(shaped, 8, axis=-1, symmetric=True)
        if type(layer).__name__.endswith("Transpose"):
            values = np.moveaxis(values, -1, -2)
        rounded.append(values.reshape(kernel.shape).astype(kernel.dtype))
    return rounded
