"""A trained Conv-BN-ReLU network with residual adds: the kind of model users prune, made here in minutes.

Pruning advice and recovery are judged on trained BatchNorm networks, not on random weights nor only on our
BN-free demo: after a BatchNorm the activation statistics look alike for every filter (APoZ near 0.5), the
BN scale factors carry the signal, and a cut shifts the statistics the next BatchNorm expects. The benches
and the slow tests train this one on generated shapes (seeded), to > 95% held-out accuracy.

    model, train, held_out = residual.trained()
"""

from __future__ import annotations

import keras
import numpy as np

from audit.zoo import shapes

SIZE = 32
"""Input side: shapes at 32 px stay distinguishable and train in about a minute on two cores."""


def build(width: int = 16, classes: int = len(shapes.CLASSES), size: int = SIZE) -> keras.Model:
    """Rescaling (pixels 0-255 in), a stem and three residual stages (width, 2 width, 4 width channels), each
    conv followed by BatchNormalization and ReLU; 1x1 projections where the width changes; global pooling and
    a softmax. About 40 k parameters at width 16."""
    layers = keras.layers
    inputs = keras.Input((size, size, 3), name="image")
    x = layers.Rescaling(1 / 255, name="rescale")(inputs)
    x = _conv_bn(x, width, "stem", relu=True)
    for stage, filters in enumerate((width, 2 * width, 4 * width), start=1):
        shortcut = x
        if shortcut.shape[-1] != filters:
            shortcut = _conv_bn(shortcut, filters, f"s{stage}_proj", relu=False, kernel=1)
        y = _conv_bn(x, filters, f"s{stage}_conv1", relu=True)
        y = _conv_bn(y, filters, f"s{stage}_conv2", relu=False)
        x = layers.Add(name=f"s{stage}_add")([shortcut, y])
        x = layers.ReLU(name=f"s{stage}_relu")(x)
        if stage < 3:
            x = layers.MaxPooling2D(name=f"s{stage}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="residual_bn_cnn")


def _conv_bn(x, filters: int, name: str, relu: bool, kernel: int = 3):
    layers = keras.layers
    x = layers.Conv2D(filters, kernel, padding="same", use_bias=False, kernel_initializer="he_normal",
                      name=f"{name}")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x


def trained(train_images: int = 4000, held_out_images: int = 600, epochs: int = 14, width: int = 16,
            seed: int = 0, verbose: int = 0) -> tuple[keras.Model, shapes.ShapesData, shapes.ShapesData]:
    """The network trained on generated shapes (seeded: images of seed 101, held-out ones of seed 102), with
    both sets (uint8 pixels, the model's own input). Adam with a step down of the learning rate for the last
    quarter of the epochs."""
    keras.utils.set_random_seed(seed)
    train = shapes.generate(train_images, 101, SIZE)
    held_out = shapes.generate(held_out_images, 102, SIZE)
    model = build(width)
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [int(0.75 * epochs) * int(np.ceil(train_images / 32))], [2e-3, 4e-4])
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(train.images.astype(np.float32), train.labels, batch_size=32, epochs=epochs, shuffle=True,
              verbose=verbose)
    clean = build(width)  # without the optimizer's state
    clean.set_weights(model.get_weights())
    return clean, train, held_out
