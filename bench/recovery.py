"""Benchmark: does the cut recover, and which model would you ship? Printed side by side in one run.

Trains a Conv-BN-ReLU CNN with residual adds (audit.zoo.residual) on generated shapes to > 95% held-out
accuracy, then on a labelled set of the user's kind (`--images`, a quarter held out, class by class):

1. Criteria at three sizes: L1, BN scale, Taylor and a random ranking taken to the same share of parameters by
   the same machinery; held-out accuracy right after the cut, after BatchNorm recalibration, after the default
   recovery (audit.pruning.Tuning, distilled from the unpruned model) and without distillation; seconds of each.
2. The fine-tuning settings at 50% of the parameters (BN scale): BatchNorm frozen or trained, distillation,
   learning rate, patience, the most epochs.
3. Pruning in 3 steps against one cut and a random ranking at the same sizes, each with the same budget.

    python -m bench.recovery [--images 1200] [--sizes 0.7 0.5 0.3] [--skip-settings] [--skip-steps]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import pandas as pd

from audit import pruning
from audit.zoo import residual, shapes


def _table(rows: list[dict]) -> str:
    frame = pd.DataFrame(rows)
    return frame.to_string(index=False, float_format=lambda v: f"{v:.3f}")


def criteria(model, x, y, sizes, tuning) -> list[dict]:
    train, test = pruning.split(y)
    scores = pruning.filter_scores(model, x[train], y[train])
    graph_rows = []
    for size in sizes:
        for criterion in ("l1", "bn_scale", "taylor", pruning.RANDOM):
            selection = pruning.to_target(model, scores, criterion, params=size, seed=0)
            smaller = pruning.prune(model, selection)
            row = {"keep": size, "criterion": criterion, "parameters kept": smaller.count_params() / model.count_params()}
            for label, settings in (("default", tuning), ("not distilled", dataclasses.replace(tuning, distill=False))):
                stages = pruning.stages(model, smaller, criterion, x, y, train, test, settings)
                by_stage = {found["model"].split(", ", 1)[1]: found for found, _, _ in stages}
                if label == "default":
                    row["cut"] = by_stage["cut"]["accuracy"]
                    row["BN recalibrated"] = by_stage["BN recalibrated"]["accuracy"]
                    row["recal s"] = by_stage["BN recalibrated"]["seconds"]
                tuned = next(found for found, _, record in stages if record is not None)
                row[f"{label}"] = tuned["accuracy"]
                row[f"{label} low"] = tuned["low"]
                row[f"{label} epochs"] = tuned["epochs"]
                row[f"{label} s"] = tuned["seconds"]
            graph_rows.append(row)
            print(_table([row]), flush=True)
    return graph_rows


def settings(model, x, y, base, criterion) -> list[dict]:
    train, test = pruning.split(y)
    scores = pruning.filter_scores(model, x[train], y[train])
    smaller = pruning.prune(model, pruning.to_target(model, scores, criterion, params=0.5))
    other = "train" if base.batchnorm == "frozen" else "frozen"
    variants = {"default": base, f"BN {other}": dataclasses.replace(base, batchnorm=other),
                "not distilled": dataclasses.replace(base, distill=False),
                "lr 3e-3": dataclasses.replace(base, learning_rate=3e-3),
                "lr 3e-4": dataclasses.replace(base, learning_rate=3e-4),
                "patience 5": dataclasses.replace(base, patience=5),
                "max 40 epochs": dataclasses.replace(base, max_epochs=40),
                "lr 2e-3": dataclasses.replace(base, learning_rate=2e-3)}
    rows = []
    for name, tuning in variants.items():
        stages = pruning.stages(model, smaller, "l1", x, y, train, test, tuning)
        found, _, record = stages[-1]
        rows.append({"settings": name, "accuracy": found["accuracy"], "low": found["low"], "high": found["high"],
                     "cross-entropy": found["cross-entropy"], "epochs": record.epochs, "seconds": record.seconds})
        print(_table(rows[-1:]), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1200, help="the labelled set a user brings")
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.7, 0.5, 0.3], help="shares of parameters kept")
    parser.add_argument("--skip-criteria", action="store_true")
    parser.add_argument("--skip-settings", action="store_true")
    parser.add_argument("--settings-criterion", default="bn_scale", help="the criterion the settings are compared on")
    parser.add_argument("--skip-steps", action="store_true")
    args = parser.parse_args()
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 40)
    start = time.perf_counter()
    model, _, held_out = residual.trained()
    trained_in = time.perf_counter() - start
    data = shapes.generate(args.images, 103, residual.SIZE)
    x, y = data.images.astype(np.float32), data.labels
    before = pruning.accuracy(model, held_out.images.astype(np.float32), held_out.labels)
    print(f"Trained {model.count_params():,} parameters in {trained_in:.0f} s: {before['accuracy']:.1%} "
          f"[{before['low']:.1%}-{before['high']:.1%}] on {len(held_out.labels)} held-out images.")
    tuning = pruning.Tuning()
    train, test = pruning.split(y)
    unpruned = pruning.accuracy(model, x[test], y[test])
    print(f"On the {len(test)} images the recoveries are measured on: {unpruned['accuracy']:.1%} "
          f"[{unpruned['low']:.1%}-{unpruned['high']:.1%}] before pruning.")
    if not args.skip_criteria:
        print(f"\n1. Criteria ({args.images} labelled images, a quarter held out; default recovery {tuning}):")
        rows = criteria(model, x, y, args.sizes, tuning)
        print(_table(rows))
    if not args.skip_settings:
        print(f"\n2. Fine-tuning settings at 50% of the parameters ({args.settings_criterion}):")
        print(_table(settings(model, x, y, tuning, args.settings_criterion)))
    if not args.skip_steps:
        print("\n3. Three steps against one cut and a random ranking (BN scale), 50% of the parameters:")
        step_start = time.perf_counter()
        _, curve = pruning.trade_off(model, x, y, "bn_scale", params=0.5, steps=3)
        print(curve.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"({time.perf_counter() - step_start:.0f} s)")
    print(f"\nTotal {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
