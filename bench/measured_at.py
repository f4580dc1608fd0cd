"""Benchmark (a measurement, not a speed): where a filter is measured changes which filters look dead.

Trains a Conv -> BatchNorm -> ReLU version of the demo CNN on the generated shapes (seeded), then
takes the statistics of its six conv layers on held-out images twice: on each conv's raw output, and
where each filter's channel is used (after its BatchNorm and ReLU, audit.usage.where_used). Prints
validation accuracy, dead and near-dead counts for both, and how many of the highest-APoZ 30% of each
layer the two agree on, beside what two random rankings would share (30%).

    python -m bench.measured_at [--epochs 3] [--train 4000] [--images 200]
"""

import argparse

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from audit import activations, pruning
from audit.zoo import shapes
from audit.zoo.train import augment, scale


def conv_bn_relu(classes: int) -> keras.Model:
    inputs = keras.Input((shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3))
    x = inputs
    for block, filters in ((1, 16), (2, 32), (3, 64)):
        for index in (1, 2):
            name = f"block{block}_conv{index}"
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name)(x)
            x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
            x = keras.layers.ReLU(name=f"{name}_relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(x))


def zeros_counted(model: keras.Model, layers: list[str], x: np.ndarray, at: str) -> pd.DataFrame:
    """APoZ, dead and near-dead counted at `at` whether or not there is a zero floor (what the raw output gave
    before the statistics moved to where each filter is used)."""
    frames = []
    for layer, part in activations.filter_sums(model, layers, x, at=at).items():
        apoz, dead = part.quiet / part.count, part.maximum <= 0
        frames.append(pd.DataFrame({"layer": layer, "filter": np.arange(len(apoz)), "apoz": apoz, "dead": dead,
                                    "near_dead": (apoz > 0.99) & ~dead}))
    return pd.concat(frames, ignore_index=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    model = conv_bn_relu(len(shapes.CLASSES))
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    train = shapes.generate(args.train, 1)
    rng = np.random.default_rng(0)
    for _ in range(args.epochs):
        model.fit(scale(augment(train.images, rng)), train.labels, batch_size=32, epochs=1, verbose=0)
    validation = shapes.generate(args.images, 2)
    x = scale(validation.images).astype(np.float32)
    accuracy = pruning.accuracy(model, x, validation.labels)
    convs = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    raw, used = zeros_counted(model, convs, x, "output"), zeros_counted(model, convs, x, "used")
    shared, total = 0, 0
    for layer in convs:
        top = int(0.3 * (raw.layer == layer).sum())
        first = set(raw[raw.layer == layer].nlargest(top, "apoz", keep="first")["filter"])
        second = set(used[used.layer == layer].nlargest(top, "apoz", keep="first")["filter"])
        shared, total = shared + len(first & second), total + top
    print(f"Conv -> BN -> ReLU CNN, {args.epochs} epochs on {args.train} shapes; {args.images} held-out images: "
          f"accuracy {accuracy['accuracy']:.1%} (95% {accuracy['low']:.1%}-{accuracy['high']:.1%})")
    print(f"{'measured at':28s} {'dead':>5s} {'near-dead':>10s}")
    print(f"{'the raw conv output':28s} {int(raw.dead.sum()):5d} {int(raw.near_dead.sum()):10d}")
    print(f"{'where used (after BN, ReLU)':28s} {int(used.dead.sum()):5d} {int(used.near_dead.sum()):10d}")
    print(f"highest-APoZ 30% of each layer: {shared} of {total} filters in common ({shared / total:.0%}; two random "
          "rankings share 30%)")


if __name__ == "__main__":
    main()
