"""Benchmark: each default attribution method beside its minimum, on demo:vgg16 (chelsea, 224x224, a
filter of block5_conv3 as the target), in one run.

A method's minimum is the forward + backward passes it cannot avoid, timed as plain passes of the same
model on the same batch shapes: one image for saliency and the CAMs, 25 noisy copies for SmoothGrad, the
33 path points of Integrated Gradients in its batches of 32. Goal (issue 17): each within 1.5x of its
minimum. Then the page's way: all five in one `shared_passes` block, cheapest first (Grad-CAM++ then
reads Grad-CAM's pass).

    python -m bench.attribution [--repeats 3]
"""

import argparse

import numpy as np
import tensorflow as tf

from audit import attribution, images, models
from bench.timing import best_of

METHODS = ("Saliency", "Grad-CAM", "Grad-CAM++", "SmoothGrad", "Integrated Gradients")  # the page's defaults


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    loaded = models.load("demo:vgg16")
    x = loaded.preprocess(images.sample("chelsea"))[0]
    target = attribution.FilterTarget("block5_conv3", 42)
    scorer = attribution.score_model(loaded.model, target)

    def plain(batch: int):
        """One forward + backward pass of `batch` images: the floor of every gradient method."""
        images_in = tf.convert_to_tensor(np.repeat(x[None], batch, axis=0))

        def run():
            with tf.GradientTape() as tape:
                tape.watch(images_in)
                score = scorer(images_in, training=False)
            return tape.gradient(score, images_in).numpy()

        return run

    minimum_runs = {"Saliency": [plain(1)], "Grad-CAM": [plain(1)], "Grad-CAM++": [plain(1)],
                    "SmoothGrad": [plain(25)], "Integrated Gradients": [plain(32), plain(1)]}
    for runs in minimum_runs.values():
        for run in runs:
            run()  # warm-up
    minimum = {name: sum(best_of(args.repeats, run) for run in runs) for name, runs in minimum_runs.items()}

    def method(name):
        return lambda: attribution.METHODS[name](loaded.model, x, target)

    for name in METHODS:
        method(name)()  # warm-up
    times = {name: best_of(args.repeats, method(name)) for name in METHODS}

    print("demo:vgg16, chelsea 224x224, target: filter 42 of block5_conv3, "
          f"{'GPU' if tf.config.list_logical_devices('GPU') else 'CPU'}, best of {args.repeats}")
    print(f"{'method':24s} {'time':>9s} {'minimum':>9s} {'ratio':>7s}")
    for name in METHODS:
        print(f"{name:24s} {times[name]:8.3f}s {minimum[name]:8.3f}s {times[name] / minimum[name]:6.2f}x")

    def page_order():
        with attribution.shared_passes():
            for name in METHODS:
                method(name)()

    together, alone = best_of(args.repeats, page_order), sum(times.values())
    print(f"{'all five, shared passes':24s} {together:8.3f}s {sum(minimum.values()) - minimum['Grad-CAM++']:8.3f}s "
          f"{together / (sum(minimum.values()) - minimum['Grad-CAM++']):6.2f}x  (one by one: {alone:.3f}s)")


if __name__ == "__main__":
    main()
