"""Tiny models shared by the tests: small enough to build in milliseconds, with known answers."""

import keras
import numpy as np


def tiny_cnn(input_shape=(16, 16, 3), classes=3, seed=0) -> keras.Model:
    """A Functional conv-pool-dense classifier with seeded weights."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(input_shape, name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="valid", activation="relu", name="conv2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="tiny_cnn")


def nested_cnn(seed=0) -> keras.Model:
    """A Sequential that wraps a Functional base, as users wrap keras.applications bases."""
    base = tiny_cnn(seed=seed)
    base = keras.Model(base.inputs[0], base.get_layer("conv2").output, name="base")
    return keras.Sequential(
        [keras.Input((16, 16, 3)), base, keras.layers.GlobalAveragePooling2D(name="gap"),
         keras.layers.Dense(2, name="head")],
        name="wrapped",
    )


def random_images(n=2, shape=(16, 16, 3), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, *shape)).astype(np.float32)
