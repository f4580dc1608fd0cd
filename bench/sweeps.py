"""Benchmark: a sensitivity sweep on a deep network, the old path against audit.pruning.sweeps, and the floor.

Every layer whose filters can go, at `--fractions` shares of its filters (lowest L1 first), on `--images` photos
at 64 px (keras.applications, weights=None, 10 classes):
- old: one masked clone, the cut's silenced weights written into it and restored per cut, the whole network run
  per cut (the path the sweeps replaced), timed on a seeded sample of the cuts and scaled to all of them;
- new: `pruning.Sweep.outputs` over every cut (cold: its graphs traced in the run; warm: a second run);
- floor: the sum over cuts of one compiled pass of the layers after the cut's checkpoint, measured.
The new path's outputs equal the old path's on the sampled cuts (largest difference printed), and the sweep's
own estimate (`Sweep.passes`) is printed beside the time it took.

    python -m bench.sweeps [--only DenseNet121|ResNet152] [--images 16] [--fractions 9] [--old-cuts 60]
"""

from __future__ import annotations

import argparse
import time

import keras
import numpy as np
import pandas as pd

from audit import groups, heads, images, pruning
from bench.timing import best_of


def _photos(count: int, size: int) -> np.ndarray:
    found = [images.fit(images.sample(name), (size, size)) for name in images.SAMPLE_PHOTOS]
    return np.stack([found[i % len(found)] for i in range(count)]).astype(np.float32) / 127.5 - 1


def _cuts(model: keras.Model, graph: groups.DependencyGraph, fractions: int) -> list[dict]:
    cuts = []
    for layer in graph.removable_layers():
        order = list(np.argsort(np.abs(pruning.filter_kernels(model, layer)).sum(0), kind="stable"))
        for share in np.linspace(0.1, 0.9, fractions):
            cuts.append({layer: [int(i) for i in order[:int(round(share * len(order)))]]})
    return cuts


def _old_outputs(model, graph, cuts, x) -> tuple[list[np.ndarray], float]:
    """The old path: one clone, silenced weights written and restored per cut, the whole network per cut."""
    clone = pruning.masked(model, {}, graph)
    head = heads.find_head(model)
    outputs = heads.Outputs(clone, head=head)
    outputs(x)  # traced before the clock
    found, start = [], time.perf_counter()
    for cut in cuts:
        touched = pruning.silenced_weights(model, graph, cut)
        for path, weights in touched.items():
            clone.get_layer(path.split("/")[-1]).set_weights(weights)
        found.append(outputs(x))
        for path in touched:
            clone.get_layer(path.split("/")[-1]).set_weights(model.get_layer(path.split("/")[-1]).get_weights())
    return found, time.perf_counter() - start


def run(name: str, count: int, fractions: int, old_cuts: int) -> dict:
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(64, 64, 3), classes=10)
    x = _photos(count, 64)
    graph = groups.DependencyGraph(model)
    cuts = _cuts(model, graph, fractions)
    sweep = pruning.Sweep(model, graph=graph)
    start = time.perf_counter()
    sweep.reference(x)
    first = time.perf_counter() - start
    forward = best_of(3, lambda: sweep.reference(x))
    traced = first - forward  # what the page's estimate knows as the model's trace at load
    per_image = forward / count
    estimate = sweep.passes(cuts, count)
    traces = sweep.estimate().traces([next(iter(cut)) for cut in cuts])
    start = time.perf_counter()
    new = sweep.outputs(cuts, x)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    sweep.outputs(cuts, x)
    warm = time.perf_counter() - start
    floor = sweep.floor_seconds(cuts, x)
    sample = sorted(np.random.default_rng(0).choice(len(cuts), min(old_cuts, len(cuts)), replace=False))
    old, seconds = _old_outputs(model, graph, [cuts[i] for i in sample], x)
    difference = max(float(np.abs(o - new[i]).max()) for o, i in zip(old, sample))
    old_all = seconds / len(sample) * len(cuts)
    return {"model": name, "layers cut": len(graph.removable_layers()), "cuts": len(cuts), "images": count,
            "forward s": forward, "old s (scaled)": old_all, "new cold s": cold, "new warm s": warm,
            "floor s": floor, "half a pass per cut s": 0.5 * forward * len(cuts),
            "old / new warm": old_all / warm, "new warm / half pass per cut": warm / (0.5 * forward * len(cuts)),
            "new warm / floor": warm / floor, "trace s": traced, "traces counted": traces,
            "estimate cold s": (count + estimate) * per_image + traces * traced,
            "estimate warm s": (count + estimate) * per_image, "max |old - new|": difference}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["DenseNet121", "ResNet152"])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--fractions", type=int, default=9)
    parser.add_argument("--old-cuts", type=int, default=60, help="cuts timed on the old path, scaled to all")
    args = parser.parse_args()
    rows = [run(name, args.images, args.fractions, args.old_cuts)
            for name in ([args.only] if args.only else ["DenseNet121", "ResNet152"])]
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.precision", 3):
        print(pd.DataFrame(rows).set_index("model").T)


if __name__ == "__main__":
    main()
