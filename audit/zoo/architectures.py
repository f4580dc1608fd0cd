"""The models users bring, built offline with random weights: the conformance suite's zoo.

Each builder returns an untrained Keras model in one of the shapes people really open: the
keras.applications families (residual, depthwise, squeeze-excite, dense, inception), Sequential
models wrapping a pretrained base, the TensorFlow tutorials' models, grayscale inputs, binary and
two-output heads. Sizes are small (64-96 px, few classes) so that every capability runs on each of
them in seconds; the graphs are the real ones. Nothing is downloaded (`weights=None`).
"""

from __future__ import annotations

from typing import Callable

import keras

from audit.zoo import keras_hub_classifiers

layers = keras.layers
CLASSES = 5


def _application(name: str, size: int, **kwargs) -> Callable[[], keras.Model]:
    def build():
        constructor = getattr(keras.applications, name)
        return constructor(weights=None, input_shape=(size, size, 3), classes=CLASSES, **kwargs)

    return build


def vgg16_base_sequential(binary: bool = False) -> keras.Model:
    """Deep Learning with Python's transfer-learning pattern: Sequential([VGG16 base, Flatten, Dense, head])."""
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(64, 64, 3))
    head = layers.Dense(1, activation="sigmoid") if binary else layers.Dense(CLASSES, activation="softmax")
    return keras.Sequential([keras.Input((64, 64, 3)), base, layers.Flatten(), layers.Dense(32, activation="relu"),
                             head], name="vgg16_transfer_binary" if binary else "vgg16_transfer")


def transfer_tutorial() -> keras.Model:
    """TensorFlow's transfer-learning tutorial: augmentation, Rescaling to [-1, 1], a MobileNetV2 base called
    with training=False, global pooling, dropout and a single logit (cats vs dogs)."""
    augmentation = keras.Sequential([layers.RandomFlip("horizontal"), layers.RandomRotation(0.2)],
                                    name="data_augmentation")
    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(96, 96, 3))
    inputs = keras.Input((96, 96, 3))
    x = augmentation(inputs)
    x = layers.Rescaling(1.0 / 127.5, offset=-1)(x)
    base.trainable = False  # as the tutorial does: the base is frozen, only the head learns
    x = base(x, training=False)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.2)(x)
    outputs = layers.Dense(1)(x)
    return keras.Model(inputs, outputs, name="transfer_tutorial")


def classification_tutorial() -> keras.Model:
    """TensorFlow's image-classification tutorial: Rescaling(1/255) first, three conv blocks, a logits head."""
    return keras.Sequential([
        keras.Input((64, 64, 3)), layers.Rescaling(1.0 / 255),
        layers.Conv2D(16, 3, padding="same", activation="relu"), layers.MaxPooling2D(),
        layers.Conv2D(32, 3, padding="same", activation="relu"), layers.MaxPooling2D(),
        layers.Conv2D(64, 3, padding="same", activation="relu"), layers.MaxPooling2D(),
        layers.Flatten(), layers.Dense(32, activation="relu"), layers.Dense(CLASSES),
    ], name="classification_tutorial")


def grayscale_cnn(classes: int = 10) -> keras.Model:
    """An MNIST-style 28x28 grayscale CNN with BatchNormalization and separate Activation layers."""
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Conv2D(8, 3, use_bias=False), layers.BatchNormalization(), layers.Activation("relu"),
        layers.Conv2D(16, 3, use_bias=False), layers.BatchNormalization(), layers.Activation("relu"),
        layers.MaxPooling2D(), layers.Flatten(), layers.Dense(classes), layers.Activation("softmax"),
    ], name="grayscale_cnn")


def two_outputs(class_first: bool = True) -> keras.Model:
    """A classifier with an auxiliary regression output (a box or a score), in either output order."""
    inputs = keras.Input((64, 64, 3))
    x = layers.Conv2D(8, 3, activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(16, 3, activation="relu", name="conv2")(x)
    pooled = layers.GlobalAveragePooling2D()(x)
    classes = layers.Dense(CLASSES, activation="softmax", name="classes")(pooled)
    box = layers.Dense(4, name="box")(pooled)
    outputs = [classes, box] if class_first else [box, classes]
    return keras.Model(inputs, outputs, name="two_outputs" if class_first else "two_outputs_box_first")


def separable_cnn() -> keras.Model:
    """Depthwise and separable convolutions with BN and ReLU6, as in MobileNet-style models."""
    inputs = keras.Input((64, 64, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)
    x = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="depthwise")(x)
    x = layers.BatchNormalization(name="depthwise_bn")(x)
    x = layers.ReLU(6.0, name="depthwise_relu")(x)
    x = layers.SeparableConv2D(16, 3, padding="same", activation="relu", name="separable")(x)
    x = layers.Conv2D(24, 1, activation="relu", name="pointwise")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(CLASSES, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="separable_cnn")


SOURCES = {
    "ResNet50": "keras.applications, 64 px", "MobileNetV2": "keras.applications, 64 px",
    "MobileNetV3Small": "keras.applications, 64 px", "EfficientNetB0": "keras.applications, 64 px",
    "DenseNet121": "keras.applications, 64 px", "InceptionV3": "keras.applications, 75 px",
    "Xception": "keras.applications, 71 px", "ConvNeXtTiny": "keras.applications, 64 px",
    "VGG16 base + Dense (Sequential)": "Sequential([VGG16 base, Flatten, Dense, Dense softmax])",
    "VGG16 base + sigmoid (Sequential)": "Sequential([VGG16 base, Flatten, Dense, Dense(1, sigmoid)])",
    "Transfer-learning tutorial": "TF tutorial: augmentation, Rescaling, frozen MobileNetV2 base, Dense(1)",
    "Image-classification tutorial": "TF tutorial: Sequential, Rescaling(1/255), logits head",
    "Grayscale 28x28 CNN": "Sequential, 1 channel, BatchNormalization, separate Activation layers",
    "Two outputs (classes first)": "Functional, softmax classes + linear box",
    "Two outputs (box first)": "Functional, linear box + softmax classes",
    "Separable / depthwise CNN": "Functional, DepthwiseConv2D (multiplier 2), SeparableConv2D, ReLU6",
    **{f"KerasHub {family}": f"keras_hub {family.replace('V3', '')}ImageClassifier with its preprocessor, 64 px"
       for family in keras_hub_classifiers.CLASSIFIERS},
}
"""Where each architecture comes from, for the README's table."""

ARCHITECTURES: dict[str, Callable[[], keras.Model]] = {
    "ResNet50": _application("ResNet50", 64),
    "MobileNetV2": _application("MobileNetV2", 64),
    "MobileNetV3Small": _application("MobileNetV3Small", 64),
    "EfficientNetB0": _application("EfficientNetB0", 64),
    "DenseNet121": _application("DenseNet121", 64),
    "InceptionV3": _application("InceptionV3", 75),
    "Xception": _application("Xception", 71),
    "ConvNeXtTiny": _application("ConvNeXtTiny", 64),
    "VGG16 base + Dense (Sequential)": vgg16_base_sequential,
    "VGG16 base + sigmoid (Sequential)": lambda: vgg16_base_sequential(binary=True),
    "Transfer-learning tutorial": transfer_tutorial,
    "Image-classification tutorial": classification_tutorial,
    "Grayscale 28x28 CNN": grayscale_cnn,
    "Two outputs (classes first)": two_outputs,
    "Two outputs (box first)": lambda: two_outputs(class_first=False),
    "Separable / depthwise CNN": separable_cnn,
    **{f"KerasHub {family}": build for family, build in keras_hub_classifiers.CLASSIFIERS.items()},
}
"""Every architecture by the name the conformance table shows."""


def build(name: str, seed: int = 0) -> keras.Model:
    """One architecture with seeded random weights."""
    keras.utils.set_random_seed(seed)
    return ARCHITECTURES[name]()
