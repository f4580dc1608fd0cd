"""Benchmark: all-layer pruning scores against one forward and backward pass over the same images.

ResNet50 (weights=None) at 96x96 on 32 photos: `pruning.filter_scores` for every conv layer (statistics
in one pass per batch, Taylor scores from one tape over every conv output, L1 / redundancy / FPGM from
the weights) against the floor, one compiled forward pass and gradient of the class score with
respect to the input. Both warm (graphs built once). Goal: scores within 3x the floor.

    python -m bench.pruning_scores [--images 32] [--size 96] [--repeats 3] [--model ResNet50]
"""

import argparse

import keras
import numpy as np
import tensorflow as tf

from audit import heads, images, pruning
from bench.timing import best_of


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="ResNet50")
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, args.model)(weights=None, input_shape=(args.size, args.size, 3), classes=10)
    photos = [images.fit(images.sample(name), (args.size, args.size)) for name in images.SAMPLE_PHOTOS]
    x = np.stack([photos[i % len(photos)] for i in range(args.images)]).astype(np.float32) / 127.5 - 1
    scorer = heads.scores_model(model, heads.find_head(model))

    @tf.function
    def forward_backward(batch):
        with tf.GradientTape() as tape:
            tape.watch(batch)
            score = tf.reduce_sum(tf.reduce_max(scorer(batch, training=False), axis=-1))
        return tape.gradient(score, batch)

    floor = lambda: [forward_backward(tf.constant(x[i:i + 32])) for i in range(0, len(x), 32)]  # noqa: E731
    scores = lambda: pruning.filter_scores(model, x)  # noqa: E731
    floor(), scores()  # warm-up
    floor_time, scores_time = best_of(args.repeats, floor), best_of(args.repeats, scores)
    layers = len(pruning.filter_scores(model, x[:2]).layer.unique())
    print(f"{args.model} {args.size}x{args.size}, {args.images} images, {layers} conv layers, best of {args.repeats}")
    print(f"{'one forward + backward pass':34s} {floor_time:8.2f} s")
    print(f"{'filter_scores (every conv layer)':34s} {scores_time:8.2f} s")
    print(f"{'ratio scores / floor':34s} {scores_time / floor_time:8.2f} x")


if __name__ == "__main__":
    main()
