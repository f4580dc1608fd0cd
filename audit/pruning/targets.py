"""Pruning to what the user asks: the share asked is the share cut, or the model keeps the asked fraction of its
parameters or multiply-adds.

Filters are not chosen layer by layer and then grown through their dependency groups (which cut far more than
asked: a 50% share once removed 90% of a MobileNetV2's parameters). Whole groups are ranked instead, as
DepGraph and Torch-Pruning do: a group's importance is the criterion over every filter in it, each layer's
scores normalised by that layer's mean, then averaged over the group (Fang et al. 2023; Torch-Pruning's
default reduction: a sum would make every group spanning several layers look important, and a global
ranking would then empty the layers whose channels stand alone). Groups go least important first until the
channels actually removed reach the target.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd

from audit import groups
from audit.errors import AuditError
from audit.graph import as_list
from audit.pruning.selection import CRITERIA, candidates, unavailable
from audit.pruning.surgery import kept_cost

SCOPES = ("layer", "global")
RANKING_CRITERIA = tuple(name for name in CRITERIA if name != "dead")
RANDOM = "random"
"""The baseline every criterion must beat (Mittal et al. 2018): the groups in a seeded random order, taken to the
same target by the same machinery."""


def group_importance(graph: groups.DependencyGraph, scores: pd.DataFrame, criterion: str, seed: int = 0
                     ) -> list[tuple[float, groups.Group]]:
    """The groups that can go, least important first, with their importance: each layer's scores divided by
    the layer's mean magnitude (APoZ as 1 - APoZ: more zeros, less important), averaged over the group's
    filters that have a score. Groups without any scored filter are left out: nothing says what they are worth.
    `criterion="random"`: every group with a filter in a scored layer, in a random order drawn with `seed`."""
    if criterion not in RANKING_CRITERIA + (RANDOM,):
        raise AuditError(f"Groups are ranked by one of {', '.join(RANKING_CRITERIA)}, not {criterion!r}.")
    if criterion == RANDOM:
        scored = set(scores["layer"])
        free = [group for group in graph.groups() if not group.locked and scored & set(group.filters)]
        draws = np.random.default_rng(seed).random(len(free))
        return sorted(zip(draws.tolist(), free), key=lambda item: item[0])
    if criterion not in scores or scores[criterion].isna().all():
        raise AuditError(unavailable(criterion))
    values = 1.0 - scores["apoz"] if criterion == "apoz" else scores[criterion].astype(float)
    scale = values.abs().groupby(scores["layer"]).transform("mean").replace(0.0, 1.0)
    normalised = dict(zip(zip(scores["layer"], scores["filter"].astype(int)), values / scale))
    ranked = []
    for group in graph.groups():
        if group.locked:
            continue
        members = [normalised.get((layer, channel), np.nan)
                   for layer, channels in group.filters.items() for channel in channels]
        defined = [value for value in members if np.isfinite(value)]
        if defined:
            ranked.append((float(np.mean(defined)), group))
    ranked.sort(key=lambda item: (item[0], item[1].index))
    return ranked


def _channels(graph: groups.DependencyGraph) -> dict[str, int]:
    return {path: len(graph.elements(as_list(call.output)[0])) for path, call in graph.producers().items()}


def _ceilings(channels: dict[str, int], max_per_layer: float, original: dict[str, int] | None = None
              ) -> dict[str, int]:
    """How many channels each layer may still lose: `max_per_layer` of its `original` count (a model cut before,
    in steps) less what it has lost already, and never its last channel."""
    if not 0.0 < max_per_layer <= 1.0:
        raise AuditError(f"The most any layer may lose is a share between 0 and 1, not {max_per_layer}.")
    original = {**channels, **(original or {})}
    return {path: max(0, min(int(max_per_layer * original[path]), original[path] - 1) - (original[path] - count))
            for path, count in channels.items()}


def channel_counts(model: keras.Model, graph: groups.DependencyGraph | None = None) -> dict[str, int]:
    """Output channels of every layer whose channels are filters (conv, depthwise, dense), by path: what
    `to_target`'s `original` takes when a model is cut in steps."""
    return _channels(graph or groups.DependencyGraph(model))


def _in_turn(ranked: list[tuple[float, groups.Group]], most: dict[str, int]):
    """The ranked groups taken in turn, each only while no layer would lose more channels than `most` allows it."""
    removed: Counter = Counter()
    for _, group in ranked:
        if all(removed[path] + len(cut) <= most[path] for path, cut in group.filters.items()):
            removed.update({path: len(cut) for path, cut in group.filters.items()})
            yield group


def _as_selection(taken: list[groups.Group]) -> dict[str, list[int]]:
    selection: dict[str, list[int]] = {}
    for group in taken:
        for layer, channels in group.filters.items():
            selection.setdefault(layer, []).extend(channels)
    return {layer: sorted(channels) for layer, channels in selection.items()}


def select(model: keras.Model, scores: pd.DataFrame, criterion: str, share: float, scope: str = "layer",
           max_per_layer: float = 0.9, graph: groups.DependencyGraph | None = None) -> dict[str, list[int]]:
    """Filters to remove (layer -> channels, whole groups) so that the share of channels removed is the share
    asked: in each scored layer (`scope="layer"`, never over it, short of it by less than one group) or over
    all the scored layers' channels (`scope="global"`, reaching it, over by less than one group). No layer
    loses more than `max_per_layer` of its channels, nor its last one."""
    if not 0.0 <= float(share) <= 1.0:
        raise AuditError(f"The share to cut is between 0 and 1, not {share}.")
    if scope not in SCOPES:
        raise AuditError(f"The share applies per layer or globally ({', '.join(SCOPES)}), not {scope!r}.")
    graph = graph or groups.DependencyGraph(model)
    channels = _channels(graph)
    ceiling = _ceilings(channels, max_per_layer)
    scored = set(scores["layer"]) & set(channels)
    ranked = group_importance(graph, scores, criterion)
    if scope == "layer":
        target = {path: int(round(share * count)) if path in scored else count for path, count in channels.items()}
        return _as_selection(list(_in_turn(ranked, {path: min(target[path], ceiling[path]) for path in channels})))
    goal = int(round(share * sum(channels[path] for path in scored)))
    taken, total = [], 0
    for group in _in_turn(ranked, ceiling):
        if total >= goal:
            break
        taken.append(group)
        total += sum(len(cut) for path, cut in group.filters.items() if path in scored)
    return _as_selection(taken)


def to_target(model: keras.Model, scores: pd.DataFrame, criterion: str, params: float | None = None,
              macs: float | None = None, max_per_layer: float = 0.9, graph: groups.DependencyGraph | None = None,
              seed: int = 0, original: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Filters to remove (whole groups, least important first over the model) so that the pruned model keeps
    `params` of its parameters or `macs` of its multiply-adds per image (a fraction; one of the two), as close
    as the groups allow (within 0.02 unless one group is bigger). Counted on the graph without building a model
    at each step (surgery.kept_cost), by bisection over how many groups go. `criterion="random"` takes the groups
    in a random order (`seed`): the baseline at the same size. `original`: the channel counts of the model
    before earlier steps (channel_counts), against which `max_per_layer` is counted."""
    if (params is None) == (macs is None):
        raise AuditError("Give one target: the share of parameters or of multiply-adds to keep.")
    fraction = float(params if params is not None else macs)
    if not 0.0 < fraction <= 1.0:
        raise AuditError(f"The share to keep is between 0 and 1, not {fraction}.")
    graph = graph or groups.DependencyGraph(model)
    ceiling = _ceilings(_channels(graph), max_per_layer, original)
    order = list(_in_turn(group_importance(graph, scores, criterion, seed), ceiling))  # what a global ranking takes
    which = 0 if params is not None else 1
    full = kept_cost(graph, set())[which]

    @functools.cache
    def kept(count: int) -> float:
        return kept_cost(graph, {group.index for group in order[:count]})[which] / full

    if kept(len(order)) > fraction + 0.02:
        raise AuditError(f"Removing every group that can go (at most {max_per_layer:.0%} of any layer) keeps "
                         f"{kept(len(order)):.1%} of the {'parameters' if which == 0 else 'multiply-adds'}, "
                         f"more than the {fraction:.1%} asked.")
    low, high = 0, len(order)  # kept(low) > fraction >= kept(high)
    if kept(0) <= fraction:
        return {}
    while high - low > 1:
        middle = (low + high) // 2
        if kept(middle) > fraction:
            low = middle
        else:
            high = middle
    best = low if abs(kept(low) - fraction) < abs(kept(high) - fraction) else high
    return _as_selection(order[:best])


TARGET_KINDS = {
    "layer": "share of each layer's channels to cut",
    "global": "share of all channels to cut",
    "params": "share of the parameters to keep",
    "macs": "share of the multiply-adds to keep",
}
"""What a pruning target counts, by the code a link, the report and the command line carry."""


@dataclass(frozen=True)
class Target:
    """What the user asks of a pruning: a share to cut (`layer`, `global`) or to keep (`params`, `macs`)."""

    kind: str = "layer"
    value: float = 0.3
    max_per_layer: float = 0.9

    def __post_init__(self):
        if self.kind not in TARGET_KINDS:
            raise AuditError(f"Unknown pruning target {self.kind!r}; choose one of {', '.join(TARGET_KINDS)}.")
        if not 0.0 <= float(self.value) <= 1.0 or (self.kind in ("params", "macs") and float(self.value) == 0.0):
            raise AuditError(f"The {TARGET_KINDS[self.kind]} is between 0 and 1, not {self.value}.")

    def describe(self) -> str:
        return f"{TARGET_KINDS[self.kind]}: {self.value:.0%}"


def selection_for(model: keras.Model, scores: pd.DataFrame, criterion: str, target: Target,
                  graph: groups.DependencyGraph | None = None) -> dict[str, list[int]]:
    """The filters the Pruning page, the report and the command line propose for a criterion and a target: the
    dead and near-dead ones for "dead" (whatever the target; their groups go with them), else whole groups by
    `select` (a share to cut) or `to_target` (a share of parameters or multiply-adds to keep)."""
    if criterion == "dead":
        chosen = candidates(scores, "dead", 0.0)
        return {layer: sorted(part["filter"].astype(int)) for layer, part in chosen.groupby("layer", sort=False)}
    if target.kind in ("layer", "global"):
        return select(model, scores, criterion, target.value, target.kind, target.max_per_layer, graph)
    return to_target(model, scores, criterion, max_per_layer=target.max_per_layer, graph=graph,
                     **{target.kind: target.value})


def proposed(scores: pd.DataFrame, selection: dict[str, list[int]], criterion: str) -> pd.DataFrame:
    """The rows of `scores` a selection removes, with `why`: dead or near-dead, or the criterion's name (a filter
    coupled to a chosen one goes with its group and is listed too)."""
    chosen = pd.Series(list(zip(scores["layer"], scores["filter"].astype(int)))).isin(
        {(layer, channel) for layer, channels in selection.items() for channel in channels}).to_numpy()
    why = (np.where(scores["dead"], "dead", np.where(scores["near_dead"], "near-dead", "coupled"))
           if criterion == "dead" else CRITERIA[criterion])
    return scores.assign(why=why)[chosen]
