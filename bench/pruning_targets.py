"""Benchmark: what pruning to a target buys and costs, printed side by side in one run.

1. Latency: demo:vgg16 and an untrained MobileNetV2 (224 px) pruned to keep 50% of their multiply-adds (L1,
   whole groups): parameters, MACs and the median time per image of a warm compiled prediction before and
   after, at batch 1 and 8 (fewer MACs are not always less time).
2. Steps against one cut: demo:shapes to 50% of its parameters in 3 steps (re-scored and fine-tuned 1 epoch
   between them) beside one cut of the original to each step's size and a random ranking of groups, each
   fine-tuned as long, accuracy on the same held-out quarter (seeded).

    python -m bench.pruning_targets [--images 480] [--steps 3]
"""

import argparse

import numpy as np
import pandas as pd

from audit import cost, models, pruning


def latency_rows(source: str) -> list[dict]:
    loaded = models.load(source)
    model = loaded.model
    rows = [{"model": source, "MACs kept": 1.0, "parameters": model.count_params(), "MACs": cost.cost(model).macs,
             "ms/image, batch 1": 1e3 * pruning.latency(model), "ms/image, batch 8": 1e3 * pruning.latency(model, 8, 10)}]
    scores = pd.DataFrame([{"layer": layer, "filter": index, "l1": value}
                           for layer in models.conv_layers(model)
                           for index, value in enumerate(pruning.l1_norms(model, layer))])
    graph = loaded.dependency_graph()
    smaller = pruning.prune(model, pruning.to_target(model, scores, "l1", macs=0.5, graph=graph), graph)
    rows.append({"model": source, "MACs kept": cost.cost(smaller).macs / cost.cost(model).macs,
                 "parameters": smaller.count_params(), "MACs": cost.cost(smaller).macs,
                 "ms/image, batch 1": 1e3 * pruning.latency(smaller),
                 "ms/image, batch 8": 1e3 * pruning.latency(smaller, 8, 10)})
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    pd.set_option("display.width", 200)
    table = pd.DataFrame([row for source in ("demo:vgg16", "keras:MobileNetV2:untrained")
                          for row in latency_rows(source)])
    print("Latency at 50% of the multiply-adds (L1, whole groups; median of a warm compiled prediction here):")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    for source, group in table.groupby("model", sort=False):
        before, after = group.iloc[0], group.iloc[1]
        print(f"  {source}: {before['ms/image, batch 1'] / after['ms/image, batch 1']:.2f}x faster at batch 1, "
              f"{before['ms/image, batch 8'] / after['ms/image, batch 8']:.2f}x at batch 8, for "
              f"{before['MACs'] / after['MACs']:.2f}x fewer MACs")

    from audit.zoo import shapes

    loaded = models.load("demo:shapes")
    data = shapes.generate(args.images, 2026)
    x = loaded.preprocess(list(data.images))
    _, curve = pruning.trade_off(loaded.model, x, data.labels, "l1", params=0.5, steps=args.steps, epochs=1, seed=0)
    print(f"\ndemo:shapes to 50% of its parameters in {args.steps} steps ({curve.attrs['images_tuned']} images to "
          f"fine-tune on, {curve.attrs['images_held_out']} held out):")
    columns = ["method", "step", "parameters kept", "MACs kept", "accuracy after the cut", "accuracy fine-tuned",
               "low", "high", "latency ms"]
    print(curve[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    last = curve[curve.step == args.steps].set_index("method")["accuracy fine-tuned"]
    print("  at the final size, fine-tuned: " + ", ".join(f"{name} {value:.1%}" for name, value in last.items()))
    np.testing.assert_equal(len(curve), 3 * (args.steps + 1))


if __name__ == "__main__":
    main()
