"""Where in the input a position of a layer looks: its receptive field, from the layer chain's kernels, strides,
padding and dilation (Araujo et al., "Computing Receptive Fields of Convolutional Neural Networks", Distill 2019).

Each tensor of the flattened graph (nested models entered) carries, per axis, where its position 0 starts in
the input, how far one step moves there (the jump) and how many input pixels one position sees. A merge
(Add, Concatenate) sees the union of its inputs. A squeeze-and-excitation gate (a 1x1 map broadcast over the
positions) is left out: it scales a channel everywhere, it does not move where the filter looks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras

from audit import graph
from audit.errors import AuditError

_WINDOWED = {"Conv2D", "DepthwiseConv2D", "SeparableConv2D", "MaxPooling2D", "AveragePooling2D"}


@dataclass(frozen=True)
class Field:
    """Per axis (rows, columns): the input pixel where position 0's window starts (negative inside the
    padding), the input pixels between neighbouring positions, and the window's size in input pixels."""

    start: tuple[float, float]
    jump: tuple[float, float]
    size: tuple[float, float]

    def window(self, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
               before: tuple[int, int]) -> "Field":
        """After a window of `kernel` taps `dilation` apart, moved `stride` positions, `before` of padding."""
        return Field(tuple(s - p * j for s, p, j in zip(self.start, before, self.jump)),
                     tuple(j * t for j, t in zip(self.jump, stride)),
                     tuple(z + (d * (k - 1)) * j for z, k, d, j in zip(self.size, kernel, dilation, self.jump)))

    def union(self, other: "Field") -> "Field":
        ends = [max(a + b, c + d) for a, b, c, d in zip(self.start, self.size, other.start, other.size)]
        starts = [min(a, c) for a, c in zip(self.start, other.start)]
        return Field(tuple(starts), self.jump, tuple(e - s for e, s in zip(ends, starts)))


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[-1]))


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    """TensorFlow's "same": the padding before the first row (the smaller half of the total)."""
    effective = dilation * (kernel - 1) + 1
    total = max((math.ceil(size / stride) - 1) * stride + effective - size, 0)
    return total // 2


def _spatial(tensor) -> tuple | None:
    shape = tensor.shape
    return tuple(shape[1:3]) if len(shape) == 4 else None


def _field_after(call: graph.Call, fields: list[Field], input_size: tuple) -> Field | None:
    """The field of a call's output from its inputs' fields (`input_size`: their map's height and width), or
    None when its output has no positions."""
    layer, kind = call.layer, call.kind
    output = graph.as_list(call.output)[0]
    pooled = kind.startswith("Global") or (  # also keras.ops.mean(x, axis=(1, 2), keepdims=True): a 1x1 of a map
        kind not in _WINDOWED and _spatial(output) == (1, 1) and tuple(input_size) != (1, 1))
    if _spatial(output) is None or pooled:
        return None  # pooled over positions (also keepdims' 1x1, a squeeze-and-excitation's), flattened: no map
    field = fields[0]
    for other in fields[1:]:
        field = field.union(other)
    if kind in _WINDOWED:
        kernel = _pair(getattr(layer, "kernel_size", None) or layer.pool_size)
        stride = _pair(layer.strides)
        dilation = _pair(getattr(layer, "dilation_rate", 1))
        if layer.padding == "same":
            before = tuple(_same_padding(int(n), k, s, d) for n, k, s, d in zip(input_size, kernel, stride, dilation))
        else:
            before = (0, 0)
        return field.window(kernel, stride, dilation, before)
    if kind == "ZeroPadding2D":
        (top, _), (left, _) = layer.padding
        return field.window((1, 1), (1, 1), (1, 1), (int(top), int(left)))
    if kind == "Cropping2D":
        (top, _), (left, _) = layer.cropping
        return field.window((1, 1), (1, 1), (1, 1), (-int(top), -int(left)))
    if tuple(input_size) != _spatial(output):
        raise AuditError(f"The receptive field cannot be followed through {call.path} ({kind}), which changes the "
                         "map's size in a way this computation does not know.")
    return field  # positions pass unchanged: BatchNormalization, activations, Add, Multiply, Concatenate, ...


def receptive_field(model: keras.Model, layer: str, row: int, col: int) -> tuple[int, int, int, int]:
    """The input pixels (top, left, bottom, right; bottom and right exclusive, clipped to the image) that
    position (row, col) of `layer`'s output sees."""
    path = graph.resolve_layer(model, layer)
    shape = model.inputs[0].shape
    if None in tuple(shape[1:3]):
        raise AuditError("The model takes images of any size: the receptive field needs a fixed input size.")
    flow = graph.flow_of(model)
    fields = {id(flow.input): Field((0.0, 0.0), (1.0, 1.0), (1.0, 1.0))}
    target = flow.call(path)
    if target is None:
        raise AuditError(f"Layer {path!r} is not called on the way from the input to the outputs.")
    for call in flow.calls:
        maps = [t for t in call.inputs if id(t) in fields and _spatial(t) not in (None, (1, 1))]
        if not maps:
            continue
        found = _field_after(call, [fields[id(t)] for t in maps], _spatial(maps[0]))
        for tensor in graph.as_list(call.output):
            if found is not None:
                fields[id(tensor)] = found
        if call is target:
            break
    output = graph.as_list(target.output)[0]
    if id(output) not in fields:
        raise AuditError(f"Layer {path!r} gives no spatial map (output {tuple(output.shape)}): it has no receptive "
                         "field per position.")
    height, width = (int(n) for n in _spatial(output))
    if not (0 <= row < height and 0 <= col < width):
        raise AuditError(f"Position ({row}, {col}) is outside {path}'s {height}x{width} map.")
    field = fields[id(output)]
    top = field.start[0] + row * field.jump[0]
    left = field.start[1] + col * field.jump[1]
    size_h, size_w = (int(n) for n in shape[1:3])
    return (int(max(0, top)), int(max(0, left)), int(min(size_h, top + field.size[0])),
            int(min(size_w, left + field.size[1])))
