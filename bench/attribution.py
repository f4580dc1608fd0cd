"""Benchmark: Grad-CAM against one plain forward + backward pass of the same model, and SmoothGrad
with 25 samples batched against 25 single-image calls, on demo:vgg16 (chelsea, 224x224, a filter of
block5_conv3 as the target), in one run. Goals: Grad-CAM <= 1.3x the plain pass.

    python -m bench.attribution [--repeats 3]
"""

import argparse

import numpy as np
import tensorflow as tf

from audit import attribution, images, models
from bench.timing import best_of


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    loaded = models.load("demo:vgg16")
    x = loaded.preprocess(images.sample("chelsea"))[0]
    target = attribution.FilterTarget("block5_conv3", 42)
    scorer = attribution.score_model(loaded.model, target)

    def plain():
        image = tf.convert_to_tensor(x[None])
        with tf.GradientTape() as tape:
            tape.watch(image)
            score = scorer(image, training=False)
        return tape.gradient(score, image)

    def single_smoothgrad():
        rng = np.random.default_rng(0)
        sigma = 0.15 * float(x.max() - x.min())
        for _ in range(25):
            noisy = x[None] + rng.normal(0, sigma, (1, *x.shape)).astype(np.float32)
            image = tf.convert_to_tensor(noisy)
            with tf.GradientTape() as tape:
                tape.watch(image)
                score = scorer(image, training=False)
            tape.gradient(score, image)

    runs = {
        "plain forward + backward": plain,
        "Grad-CAM (block5_conv3)": lambda: attribution.grad_cam(loaded.model, x, target),
        "SmoothGrad, 25 single calls": single_smoothgrad,
        "SmoothGrad, 25 batched": lambda: attribution.smoothgrad(loaded.model, x, target, samples=25),
    }
    for run in runs.values():
        run()  # warm-up
    times = {name: best_of(args.repeats, run) for name, run in runs.items()}
    for name, seconds in times.items():
        print(f"{name:32s} {seconds:8.3f} s")
    print(f"{'Grad-CAM / plain pass':32s} {times['Grad-CAM (block5_conv3)'] / times['plain forward + backward']:8.2f} x")
    print(f"{'SmoothGrad single / batched':32s} "
          f"{times['SmoothGrad, 25 single calls'] / times['SmoothGrad, 25 batched']:8.2f} x")


if __name__ == "__main__":
    main()
