"""Many what-if cuts per call, each paying only for the layers after it.

A cut changes nothing before its first silenced layer, so the model's graph is re-run once with a 0/1 mask
input after every layer that can silence channels (conv, depthwise, dense, BatchNormalization: the layers whose
weights `surgery.silenced_weights` zeroes) and cut at checkpoints into traced segments. The tensors before a
checkpoint are computed once per batch; every cut that starts there runs only the segments after it, its images
repeated along the batch axis with one mask row per cut. A cut never copies a kernel, and the segments partition
the graph, so a sweep traces the model about once whatever its number of checkpoints. Zeroing a layer's output is
what zeroing its weights does (surgery.masked), so both give the same outputs.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from audit import admission, compiled, cost, groups, heads
from audit.graph import (Point, Step, as_list, grouped_conv_without_xla, has_grouped_convs, iter_layers,
                         resolve_layer, trace)
from audit.pruning.surgery import SILENCED, silenced_channels

ROWS = 256
"""Rows (images times cuts) per call at most, cut further to the server's activation budget."""

ELEMENT_COST = 8.0
"""Multiply-adds one output element of any call is worth in time (work_after), measured by bench/sweeps.py."""

CHECKPOINTS = 32
"""Checkpoints per sweep at most: a cut between two runs from the earlier one (up to a segment more work), and a
cut from the first runs every segment (a call each)."""


@dataclass
class _Masked:
    """The model's graph on a fresh input, a mask multiplied after every layer that can silence channels."""

    image: object
    scores: object  # the head's class scores (or the features), float32
    paths: list = field(default_factory=list)  # per call: its layer path
    masks: dict = field(default_factory=dict)  # layer path -> mask input (batch, channels)
    producer: dict = field(default_factory=dict)  # tensor id -> call index
    pieces: OrderedDict = field(default_factory=OrderedDict)  # (start, stop) -> a traced segment (Sweep._segment)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _masked_graph(model: keras.Model, head: heads.Head) -> _Masked:
    paths = {id(layer): path for path, layer, _ in iter_layers(model)}
    image = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)
    built = _Masked(image, None)
    grouped = has_grouped_convs(model)

    def replace(layer):
        path = paths.get(id(layer), layer.name)
        run = (grouped_conv_without_xla(layer) if grouped else None) or layer

        def call(*args, **kwargs):
            outputs = as_list(run(*args, **kwargs))
            if type(layer).__name__ in SILENCED and getattr(layer, "weights", None):
                if path not in built.masks:
                    built.masks[path] = keras.Input((outputs[0].shape[-1],), name=f"mask_{len(built.masks)}")
                outputs = [Step(_apply_mask, "mask")(outputs[0], built.masks[path]), *outputs[1:]]
            index = len(built.paths)
            built.paths.append(path)
            for tensor in outputs:
                built.producer[id(tensor)] = index
            return outputs[0] if len(outputs) == 1 else outputs

        return call

    point = head.point if head.is_classifier else Point(resolve_layer(model, head.path))
    found: dict = {}
    trace(model, image, {point.path: {point.where}}, "", found, replace)
    two_classes = head.is_classifier and head.binary
    built.scores = Step(lambda x: _scores(x, two_classes), "scores")(found[point])
    return built


def _apply_mask(x, mask):
    """A map times its (N, channels) 0/1 mask, broadcast over positions."""
    for _ in range(len(x.shape) - 2):
        mask = keras.ops.expand_dims(mask, 1)
    return x * keras.ops.cast(mask, x.dtype)


def _scores(x, two_classes: bool):
    """The head's scores as float32; a binary head's one logit as two classes' (-z, z)."""
    x = keras.ops.cast(x, "float32")
    return keras.ops.concatenate([-x, x], axis=-1) if two_classes else x


@dataclass(frozen=True)
class SweepCost:
    """What a sweep costs before it runs: per layer with filters the first call a cut of it can change (a cut of
    all its filters: no cut of it starts earlier), and per call index (and one past the last) the share of one
    pass spent from that call on."""

    starts: dict
    work_after: np.ndarray
    end: int

    def passes(self, layers: list[str | None], images: int) -> float:
        """Passes of the whole model over one image for one cut per entry of `layers` (the layer cut; None: no
        cut) on `images` images: each cut the share from its checkpoint on, and the work up to the last checkpoint
        once. Errs long: a cut of a few filters may start later than its layer's every filter."""
        starts = [self.starts.get(layer, self.end) if layer else self.end for layer in layers]
        kept = spread_checkpoints(sorted(set(starts) - {self.end}), CHECKPOINTS)
        reach = 1.0 - self.work_after[kept[-1]] if kept else 0.0
        return images * (reach + sum(float(self.work_after[checkpoint_of(start, kept)]) for start in starts
                                     if start != self.end))

    def traces(self, layers: list[str | None]) -> float:
        """Whole-model traces a first sweep of these layers' cuts pays: its segments partition the graph from the
        input to the output, so one, whatever the checkpoints (none without a cut)."""
        return 1.0 if any(self.starts.get(layer, self.end) != self.end for layer in layers if layer) else 0.0


def _after(weights: np.ndarray) -> np.ndarray:
    after = np.append(np.cumsum(weights[::-1])[::-1], 0.0)
    return after / max(after[0], 1e-12)


class Sweep:
    """What-if cuts of one model's explained output, run many per call from checkpoints (see the module).

    `outputs(cuts, images)` gives, per cut (a selection: layer -> filters, expanded to dependency groups as
    `surgery.masked` expands it), the class probabilities (or the features) of the masked model.
    """

    def __init__(self, model: keras.Model, output: int | None = None, graph: groups.DependencyGraph | None = None):
        self.model = model
        self.graph = graph or groups.DependencyGraph(model)
        self.reference = heads.Outputs(model, output)
        self.head = self.reference.head
        self._first_call: dict[str, int] = {}
        for index, call in enumerate(self.graph.calls):
            self._first_call.setdefault(call.path, index)
        self._end = len(self.graph.calls)  # a cut's start when it changes nothing
        self._cost: SweepCost | None = None
        self._built: _Masked | None = None

    @property
    def _net(self) -> _Masked:
        """The masked graph and its traced pieces, built once per model and head (audit.compiled) and shared by
        every sweep on them; an estimate never builds it."""
        if self._built is None:
            net = compiled.kept(self.model, ("masked graph", self.head), lambda: _masked_graph(self.model, self.head))
            if net.paths != [call.path for call in self.graph.calls]:
                raise AssertionError("the masked graph's calls are not the dependency graph's")
            self._built = net
        return self._built

    @property
    def independent(self) -> bool:
        return self.reference.independent

    def masks(self, selection: dict[str, list[int]]) -> dict[str, np.ndarray]:
        """The channels the selection silences, per layer path (surgery.silenced_channels)."""
        return silenced_channels(self.model, self.graph, selection)

    def start(self, masks: dict[str, np.ndarray]) -> int:
        """The first call a cut changes (past the last call when it changes nothing)."""
        return min((self._first_call[path] for path in masks), default=self._end)

    def passes(self, cuts: list[dict[str, list[int]]], images: int) -> float:
        """What `outputs(cuts, images)` costs, in passes of the whole model over one image (SweepCost.passes)."""
        return self.estimate().passes([next(iter(cut), None) for cut in cuts], images)

    def estimate(self) -> SweepCost:
        """The plain numbers a sweep's estimate needs, for every layer with filters: computed once per sweep, kept
        by a page per model (they read no images and trace nothing)."""
        if self._cost is None:
            starts = {}
            for path, call in self.graph.producers().items():
                channels = int(as_list(call.output)[0].shape[-1])
                starts[path] = self.start(self.masks({path: list(range(channels))}))
            self._cost = SweepCost(starts, _after(self._weights()), self._end)
        return self._cost

    def _weights(self) -> np.ndarray:
        """Per call, its time: multiply-adds plus ELEMENT_COST per output element (the normalisations,
        activations, adds and concatenations of a deep network at a small size cost as much as its convolutions)."""
        return np.array([cost.call_macs(call) + ELEMENT_COST * sum(int(np.prod([d or 1 for d in t.shape[1:]]))
                                                                   for t in as_list(call.output))
                         for call in self.graph.calls])

    def floor_seconds(self, cuts: list[dict[str, list[int]]], images: np.ndarray, samples: int = 24,
                      repeats: int = 2) -> float:
        """The floor of a sweep here: the sum over cuts of one compiled pass of the layers after the cut's own
        first changed call, on `images` (what bench/sweeps.py compares the sweep with). Measured at up to
        `samples` of the distinct starts, evenly spread (each suffix traced as one piece and warmed first, the
        best of `repeats`), and read between them by the call index."""
        images = np.asarray(images, np.float32)
        starts = [self.start(self.masks(cut)) for cut in cuts]
        measured = spread_checkpoints(sorted(set(starts) - {self._end}), samples)
        values, at, seconds = {id(self._net.image): tf.convert_to_tensor(images)}, 0, []
        for start in measured:
            if start != at:
                values, at = self._step(values, at, start, [], len(images)), start
            self._step(values, start, self._end, [], len(images))
            best = np.inf
            for _ in range(repeats):
                began = time.perf_counter()
                self._step(values, start, self._end, [], len(images))[id(self._net.scores)].numpy()
                best = min(best, time.perf_counter() - began)
            seconds.append(best)
        live = [start for start in starts if start != self._end]
        return float(np.interp(live, measured, seconds).sum()) if live else 0.0

    def outputs(self, cuts: list[dict[str, list[int]]], images: np.ndarray, progress=None) -> list[np.ndarray]:
        """Per cut, the masked model's outputs on `images` (comparable with `self.reference(images)`), a batch
        of images at a time; `progress(cuts done, cuts)` as calls finish."""
        images = np.asarray(images, np.float32)
        masks = [self.masks(cut) for cut in cuts]
        starts = [self.start(found) for found in masks]
        size = max(1, cost.batch_within(self.model, heads.BATCH))
        parts: list[list] = [[] for _ in cuts]
        for first in range(0, len(images), size):
            batch = images[first:first + size]
            for k, value in enumerate(self._batch(masks, starts, batch, first / len(images), len(batch) / len(images),
                                                  progress)):
                parts[k].append(value)
        return [np.concatenate(found) if found else np.zeros((0,)) for found in parts]

    def _batch(self, masks: list[dict], starts: list[int], images: np.ndarray, before: float, share: float,
               progress) -> list[np.ndarray]:
        """Every cut's outputs on one batch: the frontier advanced from checkpoint to checkpoint, and at each the
        cuts that start there (up to the next) run the segments from it to the output."""
        results: list = [None] * len(masks)
        for k in [k for k, start in enumerate(starts) if start == self._end]:
            results[k] = self.reference(images)
        checkpoints = spread_checkpoints(sorted(set(starts) - {self._end}), CHECKPOINTS)
        bounds = [*checkpoints, self._end]
        values, at = {id(self._net.image): tf.convert_to_tensor(images)}, 0
        done = sum(start == self._end for start in starts)
        for index, checkpoint in enumerate(checkpoints):
            if checkpoint != at:  # the batch's frontier moved on by one segment, unmasked
                values, at = self._step(values, at, checkpoint, [], len(images)), checkpoint
            mine = [k for k, start in enumerate(starts)
                    if start != self._end and checkpoint_of(start, checkpoints) == checkpoint]
            order = iter(mine)
            for chunk in self._suffix(values, bounds[index:], [masks[k] for k in mine], len(images)):
                for value in chunk:
                    results[next(order)] = value
                done += len(chunk)
                if progress is not None:
                    progress(int(round(len(masks) * (before + share * done / len(masks)))), len(masks))
        return results

    # --- segments of the graph -----------------------------------------------------------------------

    def _frontier(self, start: int, wanted: list) -> tuple[list, list[str]]:
        """What the calls from `start` on need to make `wanted`: the tensors made before call `start` (or the
        image), and the layer paths of the masks they read. Walked on Keras's own graph, so the operations
        between layer calls (a mask's product, the head's scores) are followed too."""
        masks = {id(tensor): path for path, tensor in self._net.masks.items()}
        frontier, paths, seen, stack = [], [], set(), list(wanted)
        while stack:
            tensor = stack.pop()
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            if id(tensor) in masks:
                paths.append(masks[id(tensor)])
                continue
            index = self._net.producer.get(id(tensor))
            if tensor is self._net.image or (index is not None and index < start):
                frontier.append(tensor)
                continue
            operation, node_index, _ = tensor._keras_history
            stack.extend(operation._inbound_nodes[node_index].input_tensors)
        return sorted(frontier, key=lambda t: self._net.producer.get(id(t), -1)), paths

    def _segment(self, start: int, stop: int):
        """The traced function of the calls from `start` to `stop` (the output's scores when `stop` is the end):
        (function, its frontier inputs, its masks' layer paths, the tensors it makes, the ids of the earlier
        tensors read after it). Kept per model, so every
        sweep and session reuses it: the segments of a sweep partition the graph, and trace it once in all."""
        key = (start, stop)
        with self._net.lock:
            if key not in self._net.pieces:
                after = [] if stop == self._end else self._frontier(stop, [self._net.scores])[0]
                made = ([self._net.scores] if stop == self._end
                        else [t for t in after if self._net.producer.get(id(t), -1) >= start])
                passing = [id(t) for t in after if self._net.producer.get(id(t), -1) < start]  # read after it
                frontier, paths = self._frontier(start, made)
                part = keras.Model([*frontier, *[self._net.masks[path] for path in paths]], made)
                signature = [tf.TensorSpec([None, *t.shape[1:]], t.dtype)
                             for t in [*frontier, *[self._net.masks[path] for path in paths]]]
                run = tf.function(lambda *xs: [tf.cast(y, tf.float32) if y.dtype == tf.bfloat16 else y
                                               for y in as_list(part(list(xs), training=False))],
                                  input_signature=signature)
                self._net.pieces[key] = (run, frontier, paths, made, passing)
                while len(self._net.pieces) > 4 * CHECKPOINTS:
                    self._net.pieces.popitem(last=False)
            return self._net.pieces[key]

    def _step(self, values: dict, start: int, stop: int, cuts: list[dict], images: int) -> dict:
        """The frontier at `stop` from the one at `start`: one segment on `values` (the batch's images, or for
        `cuts` their rows: each cut's images, its mask row repeated on them)."""
        run, frontier, paths, made, passing = self._segment(start, stop)
        rows = len(cuts) * images if cuts else images
        feeds = [values[id(t)] for t in frontier]
        for path in paths:
            channels = self._net.masks[path].shape[-1]
            if not any(path in found for found in cuts):
                feeds.append(tf.ones((rows, channels)))
                continue
            rows_of = np.ones((len(cuts), channels), np.float32)
            for k, found in enumerate(cuts):
                if path in found:
                    rows_of[k, found[path]] = 0.0
            feeds.append(tf.constant(np.repeat(rows_of, images, axis=0)))
        following = {key: values[key] for key in passing}
        following.update({id(t): value for t, value in zip(made, run(*feeds))})
        return following

    def _suffix(self, values: dict, bounds: list[int], masks: list[dict], images: int):
        """The outputs of the cuts starting at `bounds[0]`, a call's worth of rows at a time: the frontier's
        values repeated per cut, then each segment to the output."""
        per_call = max(1, cost.batch_within(self.model, ROWS) // max(images, 1))
        for first in range(0, len(masks), per_call):
            chunk = masks[first:first + per_call]
            rows = len(chunk) * images
            with admission.SERVER.reserve(cost.batch_bytes(self.model, rows), timeout=60):
                step = {key: tf.tile(value, [len(chunk)] + [1] * (len(value.shape) - 1)) for key, value in values.items()}
                for start, stop in zip(bounds, bounds[1:]):
                    step = self._step(step, start, stop, chunk, images)
                scores = step[id(self._net.scores)].numpy()
            parts = [scores[k * images:(k + 1) * images] for k in range(len(chunk))]
            yield [heads.probabilities(part, self.head) if self.head.is_classifier else part for part in parts]


def spread_checkpoints(starts: list[int], limit: int) -> list[int]:
    """At most `limit` of the sorted starts, spread evenly; the first always kept (every cut needs one at or
    before its start)."""
    if len(starts) <= limit:
        return starts
    picked = np.unique(np.linspace(0, len(starts) - 1, limit).round().astype(int))
    return [starts[i] for i in picked]


def checkpoint_of(start: int, checkpoints: list[int]) -> int:
    """The last checkpoint at or before `start`."""
    return checkpoints[int(np.searchsorted(checkpoints, start, side="right")) - 1]
