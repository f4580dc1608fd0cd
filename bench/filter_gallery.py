"""Benchmark: a 16-filter gallery of demo:vgg16 block4_conv1 (128x128, 20 steps), batched against
the textbook loop (one filter at a time, an eager GradientTape per step, as in the Keras example
"Visualizing what convnets learn"), in the same run. Goal: >= 2x on a 2-core CPU, >= 8x on a GPU.

    python -m bench.filter_gallery [--filters 16] [--size 128] [--steps 20]
"""

import argparse
import time

import numpy as np
import tensorflow as tf

from audit import filters, models


def textbook(model, layer, indices, size, steps, learning_rate, preprocessing):
    """The Keras example's loop: eager, one filter after another, gradient L2-normalised."""
    cut = models.submodel(model, layer, any_size=True)
    results = []
    for index in indices:
        image = tf.Variable(np.random.default_rng(index).uniform(0.4, 0.6, (1, size, size, 3)).astype(np.float32))
        for _ in range(steps):
            with tf.GradientTape() as tape:
                maps = cut(filters.tf_preprocess(image, preprocessing), training=False)
                loss = tf.reduce_mean(maps[:, 2:-2, 2:-2, index])
            gradient = tape.gradient(loss, image)
            image.assign_add(learning_rate * tf.math.l2_normalize(gradient))
        results.append(image.numpy()[0])
    return np.stack(results)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--filters", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    loaded = models.load("demo:vgg16")
    layer, indices = "block4_conv1", list(range(args.filters))
    options = filters.Options(size=args.size, steps=args.steps, jitter=0, scale=0, preprocessing=loaded.preprocessing)

    filters.render(loaded.model, layer, indices[:2], filters.Options(size=args.size, steps=2, jitter=0, scale=0,
                                                                  preprocessing=loaded.preprocessing))  # warm-up
    textbook(loaded.model, layer, indices[:1], args.size, 2, 0.05, loaded.preprocessing)

    start = time.perf_counter()
    filters.render(loaded.model, layer, indices, options)
    batched = time.perf_counter() - start
    start = time.perf_counter()
    textbook(loaded.model, layer, indices, args.size, args.steps, 0.05, loaded.preprocessing)
    loop = time.perf_counter() - start
    device = "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
    print(f"{args.filters} filters of {layer}, {args.size}x{args.size}, {args.steps} steps, on the {device}")
    print(f"{'textbook loop (eager, one filter)':36s} {loop:8.2f} s")
    print(f"{'batched compiled gallery':36s} {batched:8.2f} s")
    print(f"{'speed-up':36s} {loop / batched:8.2f} x")


if __name__ == "__main__":
    main()
