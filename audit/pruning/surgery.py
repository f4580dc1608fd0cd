"""Masks for what-if checks, and surgery that really removes filters, both by dependency groups.

A selection grows to every channel that must go with it (audit.groups, after DepGraph), and the surgery
rebuilds the model without them, slicing every weight that reads them; the smaller model computes what the
masked one computes.
"""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd

from audit import copies, cost
from audit import groups, models
from audit.errors import AuditError
from audit.graph import as_list, is_depthwise

class PruningError(AuditError):
    """The model's graph cannot be cut as asked (a residual add or concat, a nested model, ...)."""


def silence(weights: list[np.ndarray], kind: str, channels) -> list[np.ndarray]:
    """A layer's weights with the given output channels made to output zero (before any activation).

    Per output channel whatever the layer: a DepthwiseConv2D's channel c * m + j is its kernel's
    (c, j) slice, not the multiplier axis; a SeparableConv2D's is a pointwise column; a
    BatchNormalization's or LayerScale's are its gamma and beta.
    """
    weights = [w.copy() for w in weights]
    channels = np.asarray(channels)
    if kind in ("BatchNormalization", "LayerScale"):
        for index in range(min(2, len(weights))):  # gamma, beta (LayerScale: its one scale)
            weights[index][..., channels] = 0
        return weights
    if kind in groups.DEPTHWISE:
        kernel = weights[0]
        flat = kernel.reshape(*kernel.shape[:-2], -1)  # a view: (kh, kw, in * multiplier)
        flat[..., channels] = 0
    elif kind in ("SeparableConv2D", "SeparableConv1D"):
        weights[1][..., channels] = 0
    elif kind.endswith("Transpose"):
        weights[0][..., channels, :] = 0
    else:
        weights[0][..., channels] = 0
    bias = 2 if kind in ("SeparableConv2D", "SeparableConv1D") else 1
    if len(weights) > bias:
        weights[bias][channels] = 0
    return weights


SILENCED = groups.SOURCES | groups.DEPTHWISE | {"BatchNormalization", "LayerScale"}
"""Layers whose per-channel parameters make a channel zero (the others pass a zero on as zero)."""


def silenced_channels(model: keras.Model, graph: groups.DependencyGraph, selection: dict[str, list[int]]
                      ) -> dict[str, np.ndarray]:
    """Per layer whose weights silence the selection, the output channels made zero (a boolean mask): whole
    groups where they can go; a filter whose group is locked alone (a what-if the smaller model cannot express),
    with the normalisation right after it. Zeroing these layers' outputs is the masked model."""
    chosen, _ = graph.expand(selection)
    zeroed: dict[int, np.ndarray] = {}  # tensor id -> channels forced to zero (only the tensors a group reaches)
    for call in graph.calls:
        output = as_list(call.output)[0]
        if graph.touches(output, chosen):
            zeroed[id(output)] = graph.removed(output, chosen)
    for layer, channels in selection.items():  # locked filters: silenced alone, on through a following BN
        path = models.resolve_layer(model, layer)
        tensor = as_list(graph.producers()[path].output)[0]
        alone = np.zeros(len(graph.elements(tensor)), bool)
        alone[list(channels)] = True
        while tensor is not None:
            zeroed[id(tensor)] = zeroed.get(id(tensor), False) | alone
            readers = [call for call in graph.calls if any(t is tensor for t in call.inputs)]
            tensor = (as_list(readers[0].output)[0] if len(readers) == 1 and readers[0].kind
                      in groups.PASS and readers[0].kind != "Flatten" else None)
    channels = {}
    for call in graph.calls:
        mask = zeroed.get(id(as_list(call.output)[0]))
        if mask is not None and call.kind in SILENCED and mask.any() and call.layer.weights:
            channels[call.path] = np.asarray(mask, bool)
    return channels


def silenced_weights(model: keras.Model, graph: groups.DependencyGraph, selection: dict[str, list[int]]
                      ) -> dict[str, list[np.ndarray]]:
    """The weights that silence the selection (`silenced_channels`), by layer path."""
    layers = {call.path: call for call in graph.calls}
    return {path: silence(layers[path].layer.get_weights(), layers[path].kind, np.flatnonzero(mask))
            for path, mask in silenced_channels(model, graph, selection).items()}


def masked(model: keras.Model, selection: dict[str, list[int]], graph: groups.DependencyGraph | None = None
           ) -> keras.Model:
    """A clone whose selected filters output zero: what-if pruning, the model untouched.

    The selection is expanded to whole dependency groups as `prune` expands it (a filter on a residual
    stream silences that channel in every layer of the stream), so the smaller model computes what
    this one computes. A filter whose group is locked (it reaches the model's output, say) is silenced
    alone: a what-if that surgery cannot make real.
    """
    graph = graph or groups.DependencyGraph(model)
    return copies.with_weights(model, weights=silenced_weights(model, graph, selection))[0]


def plan(model: keras.Model, selection: dict[str, list[int]], graph: groups.DependencyGraph | None = None,
         share: float | None = None) -> pd.DataFrame:
    """What pruning the selection does, per layer: channels before, selected, removed (with every channel
    coupled to the selected ones), the share removed, and why any selected filter is kept (its group is
    locked); with the `share` asked per layer, the channels that share asks for beside them."""
    graph = graph or groups.DependencyGraph(model)
    chosen, kept = graph.expand(selection)
    rows = []
    for path, call in graph.producers().items():
        mask = graph.removed(as_list(call.output)[0], chosen)
        if mask.any() or path in kept or path in selection:
            rows.append({"layer": path, "channels": len(mask), "asked": round(share * len(mask)) if share else None,
                         "selected": len(selection.get(path, [])), "removed": int(mask.sum()),
                         "share removed": float(mask.mean()), "kept because": kept.get(path, "")})
    columns = ["layer", "channels", "asked", "selected", "removed", "share removed", "kept because"]
    table = pd.DataFrame(rows, columns=columns)
    return table if share is not None else table.drop(columns="asked")


def group_table(graph: groups.DependencyGraph, scores: pd.DataFrame, criterion: str = "l1") -> pd.DataFrame:
    """Groups that tie several layers' channels together, with their score: the sum of their filters'
    scores by the criterion (a group goes as one, so its members' costs add up)."""
    by_filter = scores.set_index(["layer", "filter"])[criterion] if criterion in scores else None
    rows = []
    for group in graph.groups():
        if len(group.filters) < 2 and not group.coupled_by:
            continue
        members = [(layer, channel) for layer, channels in group.filters.items() for channel in channels]
        score = (float(sum(by_filter.get(member, np.nan) for member in members)) if by_filter is not None
                 else np.nan)
        rows.append({"group": group.index, "filters": group.size, f"{criterion} (sum)": score,
                     "can go": not group.locked, "coupled by": ", ".join(group.coupled_by),
                     "layers": ", ".join(f"{layer}[{','.join(map(str, channels))}]"
                                         for layer, channels in group.filters.items()),
                     "locked because": group.locked})
    return pd.DataFrame(rows)


def prune(model: keras.Model, selection: dict[str, list[int]], graph: groups.DependencyGraph | None = None
          ) -> keras.Model:
    """A new, smaller model without the selected filters' groups; the input model is untouched.

    Every group that can go goes: its filters, and every weight that reads its channels (the next
    convs and denses, batch norms, depthwise kernels, the rows of a Dense after Flatten, the other
    side of a residual add, a concatenation's slice). Filters whose group is locked stay (see `plan`).
    Nested models keep their structure (a smaller base inside the same head) unless their input loses channels
    (opened blocks): then the graph is copied flat.
    """
    graph = graph or groups.DependencyGraph(model)
    chosen, kept = graph.expand(selection)
    if not chosen:
        reasons = "; ".join(f"{layer}: {why}" for layer, why in kept.items())
        raise PruningError(f"None of the selected filters can be removed: {reasons or 'nothing was selected'}.")
    configs, weights = {}, {}
    for call in graph.calls:
        output = as_list(call.output)[0]
        out_keep = ~graph.removed(output, chosen)
        in_keep = ~graph.removed(call.inputs[0], chosen) if call.inputs else None
        if not out_keep.any():
            raise PruningError(f"Removing these groups would take every channel of {call.path}; keep some.")
        if out_keep.all() and (in_keep is None or in_keep.all()):
            continue
        config, sliced = _cut(call, in_keep, out_keep)
        if config:
            configs[call.path] = config
        if sliced is not None:
            weights[call.path] = sliced
    paths = {id(layer): path for path, layer, _ in models.iter_layers(model)}

    def clone_layer(layer):
        return copies.fresh_layer(layer, configs.get(paths.get(id(layer)), {}))

    # Keras's clone keeps a nested model's input shape: where an opened block's input loses channels, flat
    return copies.with_weights(model, clone_layer, weights, flat=_cuts_a_nested_input(graph, chosen))[0]


def _cuts_a_nested_input(graph: groups.DependencyGraph, chosen: set[int]) -> bool:
    """Whether a nested model's input loses channels (an opened block's, not a base's image)."""
    made_by = {id(tensor): call.path for call in graph.calls for tensor in as_list(call.output)}
    for call in graph.calls:
        scope = call.path.rpartition("/")[0]
        for tensor in call.inputs if scope else ():
            if not made_by.get(id(tensor), "").startswith(scope + "/") and graph.removed(tensor, chosen).any():
                return True
    return False


def kept_cost(graph: groups.DependencyGraph, chosen: set[int]) -> tuple[int, int]:
    """Parameters and multiply-adds per image of the model with the `chosen` groups removed, without building it:
    every cut layer's weights sliced as `prune` slices them (on one-byte stand-ins of their shapes), and each
    conv and dense call's multiply-adds scaled by the shares of its input and output channels kept."""
    params = macs = 0
    for call in graph.calls:
        output = as_list(call.output)[0]
        out_keep = ~graph.removed(output, chosen)
        in_keep = ~graph.removed(call.inputs[0], chosen) if call.inputs else None
        weights = _weights_of(call.layer)
        changed = not out_keep.all() or (in_keep is not None and not in_keep.all())
        sliced = _cut(call, in_keep, out_keep, [np.empty(w.shape, np.uint8) for w in weights])[1] if changed else None
        params += sum(int(np.prod(w.shape)) for w in (weights if sliced is None else sliced))
        macs += cost.call_macs(call, float(in_keep.mean()) if in_keep is not None and in_keep.size else 1.0,
                               float(out_keep.mean()) if out_keep.size else 1.0)
    return params, int(macs)


def _weights_of(layer) -> list:
    """A layer's weights; none for keras.ops arithmetic in a graph (MobileNetV3's hard sigmoid: x + 3, * 1/6),
    which is a weightless operation, not a layer."""
    return list(layer.weights) if isinstance(layer, keras.layers.Layer) else []


def _cut(call: groups.Call, in_keep: np.ndarray | None, out_keep: np.ndarray, old: list | None = None
         ) -> tuple[dict, list | None]:
    """The config changes and the sliced weights of one layer (None: its weights stay as they are); `old`: the
    weights to slice (the layer's own by default)."""
    kind, layer = call.kind, call.layer
    if old is None:
        old = [np.asarray(w) for w in _weights_of(layer)]
    count = int(out_keep.sum())
    if kind == "Dense":
        return {"units": count}, [old[0][in_keep][:, out_keep], *[b[out_keep] for b in old[1:]]]
    if kind in ("SeparableConv1D", "SeparableConv2D"):
        multiplier = old[0].shape[-1]
        rows = np.repeat(in_keep, multiplier)
        return {"filters": count}, [old[0][..., in_keep, :], old[1][..., rows, :][..., out_keep],
                                    *[b[out_keep] for b in old[2:]]]
    if kind.endswith("Transpose"):
        return {"filters": count}, [old[0][..., out_keep, :][..., in_keep], *[b[out_keep] for b in old[1:]]]
    if kind in groups.SOURCES and is_depthwise(layer):  # a Conv2D with one group per input channel
        return {"filters": count, "groups": int(in_keep.sum())}, [old[0][..., out_keep], *[b[out_keep] for b in old[1:]]]
    if kind in groups.SOURCES:
        return {"filters": count}, [old[0][..., in_keep, :][..., out_keep], *[b[out_keep] for b in old[1:]]]
    if kind in groups.DEPTHWISE:
        return {}, [old[0][..., in_keep, :], *[b[out_keep] for b in old[1:]]]
    if kind == "LayerScale":
        return {"projection_dim": count}, [w[..., out_keep] for w in old]
    if kind == "Reshape":
        return {"target_shape": (*layer.get_config()["target_shape"][:-1], count)}, None
    if old:  # BatchNormalization, PReLU: per-channel parameters on the last axis
        return {}, [w[..., out_keep] for w in old]
    return {}, None


def flops(model: keras.Model) -> int:
    """Multiply-accumulates of conv and dense layers for one image (the cost pruning removes), from the graph's
    symbolic shapes (audit.cost): a Dense applied to every position of a map counts at every position."""
    return cost.cost(model).macs
