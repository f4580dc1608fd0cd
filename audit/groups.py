"""Dependency groups: the channels that must be removed together, read from the model's own graph.

After DepGraph (Fang et al. 2023; Torch-Pruning's `DependencyGraph`), for Keras. Every channel of every
tensor in the graph (nested models entered, so a base and the head reading it are one graph) is an
element; layers tie elements together:

- a channel passes unchanged through BatchNormalization, activations, pooling, padding, dropout and
  the like (same channel in and out);
- the inputs of Add / Subtract / Multiply / Maximum / Minimum / Average and their output share
  channels (a residual connection, a squeeze-and-excitation gate);
- Concatenate maps each input's channels to an offset range of its output;
- DepthwiseConv2D (and a Conv2D with one group per input channel) passes channel c on as its outputs
  c * m .. c * m + m - 1; a Conv2D whose groups read several channels each is locked;
- Flatten spreads channel c over every position of its output (the Dense after it reads them all);
- Conv, SeparableConv, ConvTranspose and Dense start new channels (their filters): they read their
  input's channels and make their own.

A group is one connected set of elements. Removing a group removes every element in it: the filters
that make those channels and every weight that reads them. Groups that reach the model's input or
output, or a layer that mixes channels in ways the rule does not cover (LayerNormalization,
a Reshape that moves channels, a custom layer), are locked, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from audit import graph as model_graph
from audit.graph import Call, as_list, is_depthwise, is_grouped
from audit.errors import AuditError

SOURCES = {"Conv1D", "Conv2D", "Conv3D", "SeparableConv1D", "SeparableConv2D", "Conv1DTranspose", "Conv2DTranspose",
           "Dense"}
DEPTHWISE = {"DepthwiseConv1D", "DepthwiseConv2D"}
PASS = {
    "BatchNormalization", "Activation", "ReLU", "LeakyReLU", "ELU", "PReLU", "Dropout", "SpatialDropout1D",
    "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "AlphaDropout", "MaxPooling1D", "MaxPooling2D",
    "AveragePooling1D", "AveragePooling2D", "GlobalAveragePooling1D", "GlobalAveragePooling2D",
    "GlobalMaxPooling1D", "GlobalMaxPooling2D", "ZeroPadding1D", "ZeroPadding2D", "Cropping1D", "Cropping2D",
    "UpSampling1D", "UpSampling2D", "LayerScale", "Identity", "Resizing", "CenterCrop", "RandomFlip",
    "RandomRotation", "RandomZoom", "RandomTranslation", "RandomCrop", "RandomContrast", "RandomBrightness",
    "StochasticDepth",
}
REDUCTIONS = {"Mean", "Max", "Min", "Sum"}
MERGE = {"Add", "Subtract", "Multiply", "Maximum", "Minimum", "Average"}
CHANNEL_MIXING_ACTIVATIONS = {"softmax", "log_softmax"}

SUPPORTED = {
    "Conv1D/2D/3D, SeparableConv1D/2D, Conv1D/2DTranspose, Dense": "start groups (their filters) and read their "
                                                                    "input's channels",
    "DepthwiseConv1D/2D, a Conv2D with one group per input channel": "channel c goes on as outputs c*m .. c*m+m-1 "
                                                                    "(m: the depth multiplier)",
    "BatchNormalization, LayerScale, PReLU": "per-channel parameters, sliced with the channel",
    "Activation (not softmax), ReLU, LeakyReLU, ELU, Dropout, pooling (global too), padding, cropping, "
    "upsampling, augmentation": "a channel passes unchanged",
    "Add, Subtract, Multiply, Maximum, Minimum, Average": "their inputs and output share channels (residual "
                                                         "connections, squeeze-and-excitation gates)",
    "Concatenate (channel axis)": "each input's channels map to an offset range of the output",
    "Flatten": "channel c is every position's c: the Dense after it loses those rows",
    "Reshape keeping the channel axis (e.g. to 1x1xC), keras.ops mean/max/min/sum over positions": "a channel "
                                                                                                  "passes unchanged",
    "nested models (one input)": "entered: the base and the head around it are one graph",
    "anything else (LayerNormalization, softmax, other Reshapes, a Conv2D whose groups read several channels, "
    "custom layers)": "locks the channels it touches",
}
"""Which layer kinds the groups follow (the README's table of supported operations)."""


@dataclass
class Group:
    """A set of channels that go together, by the layers whose filters make them."""

    index: int
    filters: dict[str, list[int]]  # layer path -> output channels (of source and depthwise layers)
    coupled_by: list[str] = field(default_factory=list)  # layers that tie channels of several layers
    locked: str = ""  # why it cannot be removed ("" when it can)

    @property
    def size(self) -> int:
        return sum(len(channels) for channels in self.filters.values())


class DependencyGraph:
    """The groups of one model; `expand` turns a selection of filters into whole groups."""

    def __init__(self, model: keras.Model):
        self.model = model
        self.calls, self.input, self.outputs = model_graph.flat_calls(model)
        self._offsets: dict[int, tuple[int, int]] = {}
        self._groups_of: dict[int, frozenset] = {}
        for tensor in [self.input] + [t for call in self.calls for t in [*call.inputs, *as_list(call.output)]]:
            self._element_range(tensor)
        size = self._next
        pairs, locks, couplers = [], {}, []
        for call in self.calls:
            self._link(call, pairs, locks, couplers)
        self._lock(self.input, "it is the model's input image", locks)
        for tensor in self.outputs:
            self._lock(tensor, "its channels are the model's output, which would change", locks)
        first = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros(0, int)
        second = np.concatenate([p[1] for p in pairs]) if pairs else np.zeros(0, int)
        graph = coo_matrix((np.ones(len(first), np.int8), (first, second)), shape=(size, size))
        _, self.component = connected_components(graph, directed=False)
        self._lock_reason: dict[int, str] = {}
        for element, reason in locks.items():
            self._lock_reason.setdefault(int(self.component[element]), reason)
        self._couplers: dict[int, list[str]] = {}
        for path, elements in couplers:
            for component in np.unique(self.component[elements]):
                self._couplers.setdefault(int(component), []).append(path)
        self._producers = {id(as_list(call.output)[0]): call for call in self.calls}

    # --- elements ----------------------------------------------------------------------------

    _next = 0

    def _element_range(self, tensor) -> tuple[int, int]:
        key = id(tensor)
        if key not in self._offsets:
            channels = int(tensor.shape[-1]) if tensor.shape and tensor.shape[-1] is not None else 1
            self._offsets[key] = (self._next, channels)
            self._next += channels
        return self._offsets[key]

    def elements(self, tensor) -> np.ndarray:
        start, channels = self._element_range(tensor)
        return np.arange(start, start + channels)

    def _lock(self, tensor, reason: str, locks: dict) -> None:
        for element in self.elements(tensor):
            locks.setdefault(int(element), reason)

    def _link(self, call: Call, pairs: list, locks: dict, couplers: list) -> None:
        kind, outputs = call.kind, as_list(call.output)
        tensors = [t for t in call.inputs if len(t.shape) >= 2]
        if is_grouped(call.layer):
            for tensor in tensors + outputs:
                self._lock(tensor, f"it goes through the grouped convolution {call.path!r}, whose channels go by "
                                   "whole groups, which the groups do not follow", locks)
            return
        depthwise = is_depthwise(call.layer)
        if kind in SOURCES and not depthwise:
            return  # new channels; the input is read, not passed on
        if len(outputs) != 1:
            for tensor in tensors + outputs:
                self._lock(tensor, f"it goes through {kind} layer {call.path!r}, which has several outputs", locks)
            return
        out = self.elements(outputs[0])
        if depthwise and tensors:
            multiplier = len(out) // max(len(self.elements(tensors[0])), 1)
            pairs.append((out, np.repeat(self.elements(tensors[0]), multiplier)))
            if multiplier > 1:
                couplers.append((call.path, out))
        elif (kind in PASS and not (kind == "Activation" and model_graph.activation_name(call.layer)
                                    in CHANNEL_MIXING_ACTIVATIONS)) or _keeps_channel_axis(call):
            for tensor in tensors:
                if len(self.elements(tensor)) == len(out):
                    pairs.append((out, self.elements(tensor)))
        elif kind in MERGE:
            for tensor in tensors:
                if len(self.elements(tensor)) == len(out):  # an input broadcast over channels adds no tie
                    pairs.append((out, self.elements(tensor)))
            couplers.append((call.path, out))
        elif kind == "Concatenate" and call.layer.axis in (-1, len(outputs[0].shape) - 1):
            start = 0
            for tensor in tensors:
                part = self.elements(tensor)
                pairs.append((out[start:start + len(part)], part))
                start += len(part)
            couplers.append((call.path, out))
        elif kind == "Flatten" and tensors:
            inner = self.elements(tensors[0])
            pairs.append((out, np.tile(inner, len(out) // len(inner))))  # channels last: position * C + c
        else:
            for tensor in tensors + outputs:
                self._lock(tensor, f"it goes through {kind} layer {call.path!r}, which the groups do not follow "
                                   "(it mixes channels or is not a layer we know)", locks)

    # --- groups ------------------------------------------------------------------------------

    def producers(self) -> dict[str, Call]:
        """Source and depthwise layers by path: the layers whose output channels are filters."""
        return {call.path: call for call in self.calls if call.kind in SOURCES | DEPTHWISE}

    def group_of(self, layer: str, channel: int) -> int:
        call = self.producers()[model_graph.resolve_layer(self.model, layer)]
        return int(self.component[self.elements(as_list(call.output)[0])[channel]])

    def locked(self, component: int) -> str:
        return self._lock_reason.get(int(component), "")

    def groups(self) -> list[Group]:
        """Every group that holds at least one filter, in the order of the layers."""
        found: dict[int, Group] = {}
        for path, call in self.producers().items():
            for channel, component in enumerate(self.component[self.elements(as_list(call.output)[0])]):
                component = int(component)
                if component not in found:
                    found[component] = Group(component, {}, sorted(set(self._couplers.get(component, []))),
                                             self.locked(component))
                found[component].filters.setdefault(path, []).append(channel)
        return list(found.values())

    def removable_layers(self) -> list[str]:
        """Layers with a filter whose group may go, in order: where a sweep or a what-if can start (an
        all-convolutional head's class conv reaches the output: none of its filters can)."""
        return list(dict.fromkeys(path for group in self.groups() if not group.locked for path in group.filters))

    def expand(self, selection: dict[str, list[int]]) -> tuple[set[int], dict[str, str]]:
        """The groups of the selected filters, and for the selected filters that cannot go, why (by layer)."""
        producers = self.producers()
        chosen, kept = set(), {}
        for layer, channels in selection.items():
            path = model_graph.resolve_layer(self.model, layer)
            if path not in producers:
                raise AuditError(f"{path} is a {type(model_graph.get_layer(self.model, path)).__name__}: only the filters "
                                 "of conv, depthwise and dense layers can be removed.")
            elements = self.elements(as_list(producers[path].output)[0])
            for channel in channels:
                if not 0 <= int(channel) < len(elements):
                    raise AuditError(f"{path} has channels 0 to {len(elements) - 1}, not {channel}.")
                component = int(self.component[elements[int(channel)]])
                reason = self.locked(component)
                if reason:
                    kept[path] = reason
                else:
                    chosen.add(component)
        return chosen, kept

    def removed(self, tensor, components: set[int]) -> np.ndarray:
        """Which channels of a tensor go with the chosen groups (a boolean mask)."""
        return np.isin(self.component[self.elements(tensor)], list(components))

    def touches(self, tensor, components: set[int]) -> bool:
        """Whether any channel of a tensor goes with the chosen groups: a set test, so that a sweep's cut on a
        500-layer network looks at only the tensors it changes (the groups of each tensor are kept)."""
        kept = self._groups_of.get(id(tensor))
        if kept is None:
            kept = self._groups_of[id(tensor)] = frozenset(np.unique(self.component[self.elements(tensor)]).tolist())
        return not kept.isdisjoint(components)

    def producer(self, tensor) -> Call | None:
        return self._producers.get(id(tensor))


def _keeps_channel_axis(call: Call) -> bool:
    """A Reshape whose output keeps the input's channel axis last (e.g. (C,) to (1, 1, C)), or a keras.ops
    reduction over positions only (a squeeze-and-excitation's `ops.mean(x, axis=(1, 2), keepdims=True)`)."""
    if not call.inputs:
        return False
    if call.kind in REDUCTIONS and model_graph.is_operation(call.layer):
        axis, rank = getattr(call.layer, "axis", None), len(call.inputs[0].shape)
        axes = {int(a) % rank for a in (axis if isinstance(axis, (list, tuple)) else [axis])} if axis is not None \
            else set(range(rank))
        return not axes & {0, rank - 1}
    if call.kind != "Reshape":
        return False
    before, after = call.inputs[0].shape, as_list(call.output)[0].shape
    return before[-1] == after[-1] and int(np.prod(before[1:-1] or [1])) == int(np.prod(after[1:-1] or [1]))
