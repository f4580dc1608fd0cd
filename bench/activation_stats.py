"""Benchmark: filter statistics for all conv layers of demo:vgg16 against a plain forward pass.

Both run in the same process on the same 64 images at 224x224. The reference is `model.predict`
of the sub-model up to block5_conv3 (the same convolutions; its single output is small enough
to return, where all 13 layers' maps would be 3.5 GB). Goal: statistics <= 1.3x the forward pass.

    python -m bench.activation_stats [--images 64] [--batch 32] [--repeats 3]
"""

import argparse

import numpy as np

from audit import activations, images, models
from bench.timing import best_of


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    loaded = models.load("demo:vgg16")
    photos = [images.sample(name) for name in images.SAMPLE_PHOTOS]
    x = loaded.preprocess([photos[i % len(photos)] for i in range(args.images)])
    layers = models.conv_layers(loaded.model)
    forward = models.submodel(loaded.model, layers[-1])

    run_stats = lambda: activations.filter_stats(loaded.model, layers, x, batch_size=args.batch)  # noqa: E731
    run_predict = lambda: forward.predict(x, batch_size=args.batch, verbose=0)  # noqa: E731
    run_stats(), run_predict()  # warm-up: tracing and graph building are paid once per model
    stats_time = best_of(args.repeats, run_stats)
    predict_time = best_of(args.repeats, run_predict)
    print(f"{args.images} images 224x224, {len(layers)} conv layers, batch {args.batch}, best of {args.repeats}")
    print(f"{'plain predict (to block5_conv3)':34s} {predict_time:8.2f} s")
    print(f"{'filter_stats (all 13 conv layers)':34s} {stats_time:8.2f} s")
    print(f"{'ratio stats / predict':34s} {stats_time / predict_time:8.2f} x")


if __name__ == "__main__":
    np.random.seed(0)
    main()
