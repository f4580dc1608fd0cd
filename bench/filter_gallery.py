"""Benchmark: how close the gallery comes to the machine's floor, in one run on one job.

demo:vgg16 block4_conv1, 16 filters, 128x128, 20 steps by default. Printed side by side:
- the floor: a plain batched loop, one compiled step (forward to the layer, gradient with respect to
  the input, normalised update; nothing else);
- ours with the layer's default options (in float32 and on the bfloat16 compute copy), and with each
  regulariser alone;
- tf-keras-vis's ActivationMaximization on the same filters (bench-only: pip install -r bench/requirements.txt);
each with its median final own-filter activation (mean over the map, border excluded, measured the same
way for all). Goals (issue 17): ours within 1.3x of the floor, at least 2x faster than tf-keras-vis, at
no lower median activation.

    python -m bench.filter_gallery [--filters 16] [--size 128] [--steps 20] [--layer block4_conv1]
    python -m bench.filter_gallery --parameterizations --steps 40   # pixel against Fourier images (issue 32)
"""

import argparse
import importlib.util
import time
from dataclasses import asdict

import numpy as np
import tensorflow as tf

from audit import filters, models, parameterization, precision


def own_activation(cut, images01, indices, preprocessing, border=0.1):
    """Each image's mean activation of its own filter, border excluded (as filters.render measures it)."""
    maps = np.asarray(cut(filters.tf_preprocess(tf.constant(images01, tf.float32), preprocessing), training=False))
    h, w = maps.shape[1:3]
    bh, bw = int(h * border), int(w * border)
    return np.array([maps[i, bh:h - bh, bw:w - bw, k].mean() for i, k in enumerate(indices)])


def plain_step(cut, learning_rate, preprocessing):
    """The floor's step: compiled once, then only the ascent (forward, input gradient, normalised update)."""

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32), tf.TensorSpec([None], tf.int32)])
    def step(pixels, index):
        with tf.GradientTape() as tape:
            tape.watch(pixels)
            maps = cut(filters.tf_preprocess(pixels, preprocessing), training=False)
            loss = tf.reduce_sum(tf.reduce_mean(tf.gather(maps, index, axis=-1, batch_dims=1), axis=[1, 2]))
        gradient = tape.gradient(loss, pixels)
        norm = tf.sqrt(tf.reduce_mean(tf.square(gradient), axis=[1, 2, 3], keepdims=True)) + 1e-8
        return tf.clip_by_value(pixels + learning_rate * gradient / norm, 0.0, 1.0)

    return step


def plain_loop(step, indices, size, steps):
    pixels, index = tf.constant(filters._start_images(indices, 0, size)), tf.constant(indices, tf.int32)
    for _ in range(steps):
        pixels = step(pixels, index)
    return pixels.numpy()


def peer_tf_keras_vis(model, layer, indices, size, steps, preprocessing):
    """tf-keras-vis's ActivationMaximization with its default regularisers and input modifiers."""
    from tf_keras_vis.activation_maximization import ActivationMaximization
    from tf_keras_vis.utils.scores import CategoricalScore

    import keras

    inputs = keras.Input((size, size, 3))
    cut = models.submodel(model, layer, any_size=True)
    wrapped = keras.Model(inputs, cut(filters.tf_preprocess(inputs, preprocessing)))  # [0, 1] pixels in
    tf.random.set_seed(0)  # its jitter and rotation draw from the global generators: seeded, a run repeats
    np.random.seed(0)
    maximizer = ActivationMaximization(wrapped, clone=False)  # the wrapped model already ends at the layer
    seed = tf.constant(filters._start_images(indices, 0, size))
    images = maximizer(CategoricalScore(indices), steps=steps, seed_input=seed, input_range=(0.0, 1.0))
    return np.clip(np.asarray(images, np.float32) / (255.0 if np.max(images) > 1.5 else 1.0), 0, 1)


def compare_parameterizations(model, layers, indices, size, steps, pre):
    """Pixel against Fourier images at equal steps, each with its own default options at that layer: median
    own-filter activation, median share of spectral energy above a quarter of Nyquist, time (issue 32)."""
    print(f"\nPixel against Fourier parameterisation: {len(indices)} filters, {size}x{size}, {steps} steps each")
    for layer in layers:
        cut = models.submodel(model, layer, any_size=True)
        measured = {}
        for kind in parameterization.PARAMETERIZATIONS:
            options = filters.Options(**{**asdict(filters.default_options(model, layer, pre, kind)), "size": size,
                                         "steps": steps})
            filters.render(model, layer, indices[:1], options)  # the trace, paid once per layer and kind
            start = time.perf_counter()
            images = filters.render(model, layer, indices, options).images
            seconds = time.perf_counter() - start
            activation = float(np.median(own_activation(cut, images / 255.0, indices, pre)))
            high = float(np.median(parameterization.high_frequency_share(images)))
            measured[kind] = activation
            print(f"{layer:14s} {kind:8s} {seconds:8.2f} s   median own activation {activation:9.3f}   "
                  f"energy above Nyquist/4 {high:6.1%}", flush=True)
        print(f"{layer:14s} fourier / pixel median activation {measured['fourier'] / measured['pixel']:6.2f} x")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--filters", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layer", default="block4_conv1")
    parser.add_argument("--without-alone", action="store_true", help="skip the one-regulariser rows")
    parser.add_argument("--parameterizations", action="store_true",
                        help="only pixel against Fourier images on block4_conv1 and block5_conv3")
    args = parser.parse_args()
    loaded = models.load("demo:vgg16")
    model, layer, pre = loaded.model, args.layer, loaded.preprocessing
    indices = list(range(args.filters))
    if args.parameterizations:
        compare_parameterizations(model, ["block4_conv1", "block5_conv3"], indices, args.size, args.steps, pre)
        return
    cut = models.submodel(model, layer, any_size=True)
    step = plain_step(cut, 0.05, pre)
    defaults = filters.Options(**{**asdict(filters.default_options(model, layer, pre)), "size": args.size,
                                  "steps": args.steps})
    bare = filters.Options(size=args.size, steps=args.steps, jitter=0, scale=0, preprocessing=pre)
    alone = {
        "jitter": {"jitter": 4}, "random scale": {"scale": 0.05}, "blur": {"blur_every": 4},
        "L2 decay": {"l2_decay": 1e-3}, "total variation": {"total_variation": 0.05}, "octaves": {"octaves": 2},
        "warm-up": {"warmup": 5},
    }
    runs = {
        "plain batched loop (floor)": lambda: plain_loop(step, indices, args.size, args.steps),
        "ours, no regulariser": lambda: filters.render(model, layer, indices, bare).images / 255.0,
        "ours, default options": lambda: filters.render(model, layer, indices, defaults).images / 255.0,
        "ours, default options, bfloat16": lambda: filters.render(precision.bfloat16_copy(model), layer, indices,
                                                                  defaults).images / 255.0,
        **{f"ours, {name} alone": (lambda change=change: filters.render(
            model, layer, indices, filters.Options(**{**asdict(bare), **change})).images / 255.0)
           for name, change in ({} if args.without_alone else alone).items()},
    }
    if importlib.util.find_spec("tf_keras_vis"):
        runs["tf-keras-vis ActivationMaximization"] = lambda: peer_tf_keras_vis(model, layer, indices, args.size,
                                                                           args.steps, pre)
    else:
        print("tf-keras-vis is not installed (pip install -r bench/requirements.txt): its row is left out")

    print(f"{args.filters} filters of {layer}, {args.size}x{args.size}, {args.steps} steps, on the "
          f"{'GPU' if tf.config.list_logical_devices('GPU') else 'CPU'}; each run once to warm up, then timed "
          "(a second gallery on the same layer)")
    rows = {}
    for name, run in runs.items():
        run()
        start = time.perf_counter()
        images = run()
        seconds = time.perf_counter() - start
        rows[name] = (seconds, float(np.median(own_activation(cut, images, indices, pre))))
        print(f"{name:40s} {seconds:8.2f} s   median own activation {rows[name][1]:9.3f}", flush=True)
    floor = rows["plain batched loop (floor)"][0]
    ours = rows["ours, default options"][0]
    print(f"{'ours (defaults) / floor':40s} {ours / floor:8.2f} x")
    fast = rows["ours, default options, bfloat16"][0]
    print(f"{'ours float32 / ours bfloat16':40s} {ours / fast:8.2f} x")
    if "tf-keras-vis ActivationMaximization" in rows:
        peer = rows["tf-keras-vis ActivationMaximization"][0]
        print(f"{'tf-keras-vis / ours (defaults)':40s} {peer / ours:8.2f} x")
        print(f"{'tf-keras-vis / ours (defaults, bfloat16)':40s} {peer / fast:8.2f} x")


if __name__ == "__main__":
    main()
