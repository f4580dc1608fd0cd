"""Benchmark: the attribution methods' first and later calls beside one compiled forward + backward pass, on
demo:vgg16 (224x224, a filter of block5_conv3 as the target) or any source, in one run.

A method's floor is the passes it cannot avoid, timed as a compiled forward + backward of the same model on
the same batch shapes (one image for saliency and the CAMs, 25 noisy copies for SmoothGrad, the 33 path
points of Integrated Gradients in batches of 32). The first call traces the graph; later calls must reuse it
(audit.compiled): another image, and another target (class or filter), each timed against the floor. Goal
(issue 31): saliency and Grad-CAM within 1.3x of the floor on a second call.

    python -m bench.attribution [--source demo:vgg16] [--repeats 3]
"""

import argparse
import time

import numpy as np
import tensorflow as tf

from audit import attribution, images, models
from bench.timing import best_of

METHODS = ("Saliency", "Grad-CAM", "Grad-CAM++", "SmoothGrad", "Integrated Gradients")  # the page's defaults
FLOOR_BATCHES = {"Saliency": [1], "Grad-CAM": [1], "Grad-CAM++": [1], "SmoothGrad": [25],
                 "Integrated Gradients": [32, 1]}


def compiled_floor(model, target, x: np.ndarray, batches: list[int], repeats: int) -> float:
    """One compiled forward + backward pass per batch, built here apart from audit's own cache."""
    graph = attribution.graph_with_score(model, target)
    score = ((lambda t: tf.reduce_mean(t[..., target.index], axis=[1, 2])) if isinstance(target, attribution.FilterTarget)
             else (lambda t: t[:, target]))

    @tf.function
    def run(batch):
        with tf.GradientTape() as tape:
            tape.watch(batch)
            value = score(graph(batch, training=False))
        return tape.gradient(value, batch)

    inputs = [tf.constant(np.repeat(x[None], size, axis=0)) for size in batches]
    for batch in inputs:
        run(batch).numpy()  # traced before timing
    return sum(best_of(repeats, lambda b=batch: run(b).numpy()) for batch in inputs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default="demo:vgg16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    loaded = models.load(args.source)
    size = loaded.input_size
    first_image, second_image = (loaded.preprocess(images.sample(name))[0] for name in ("chelsea", "coffee"))
    if loaded.head().is_classifier:
        targets, what = (0, 1), "class"
    else:
        layer = models.cam_layer(loaded.model)
        targets, what = (attribution.FilterTarget(layer, 42), attribution.FilterTarget(layer, 7)), f"filter of {layer}"
    model = loaded.model
    print(f"{args.source}, {size[0]}x{size[1]}, targets: two a {what}, "
          f"{'GPU' if tf.config.list_logical_devices('GPU') else 'CPU'}, best of {args.repeats}")
    print(f"{'method':22s} {'first call':>11s} {'other image':>12s} {'other target':>13s} {'floor':>8s} "
          f"{'image ratio':>12s} {'target ratio':>13s}")
    for name in METHODS:
        method = attribution.METHODS[name]
        start = time.perf_counter()
        method(model, first_image, targets[0])
        first = time.perf_counter() - start
        other_image = best_of(args.repeats, lambda: method(model, second_image, targets[0]))
        other_target = best_of(args.repeats, lambda: method(model, second_image, targets[1]))
        floor = compiled_floor(model, targets[1], second_image, FLOOR_BATCHES[name], args.repeats)
        print(f"{name:22s} {first:10.3f}s {other_image:11.3f}s {other_target:12.3f}s {floor:7.3f}s "
              f"{other_image / floor:11.2f}x {other_target / floor:12.2f}x")


if __name__ == "__main__":
    main()
