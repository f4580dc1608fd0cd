"""The demo CNNs' architecture: VGG-style conv blocks with fused ReLUs and one of two heads.

Built from code and given weights-only files, so loading a demo never deserialises a config.
The blocks are wide enough (32-64-128 filters) for pruning to have something to find.

- "dense" (`demo:shapes`): four pools, Flatten, Dense 64, softmax, like VGG16's classifier. Its class
  evidence is tied to positions: Grad-CAM's peak lands on the object no more often than the image centre.
- "gap" (`demo:shapes-gap`): the last conv layer averaged over space, then softmax, as in the CAM paper
  (Zhou et al. 2016) and ResNets: class maps line up with the object.
"""

from pathlib import Path

import keras

from audit.zoo.shapes import CLASSES, IMAGE_SIZE

HEADS = ("dense", "gap")
WEIGHTS = {"dense": Path(__file__).resolve().parent / "shapes.weights.h5",
           "gap": Path(__file__).resolve().parent / "shapes_gap.weights.h5"}


def build_model(num_classes: int = len(CLASSES), head: str = "dense") -> keras.Model:
    """Input: RGB scaled to [-1, 1] (uint8 / 127.5 - 1); output: class probabilities.

    Centred inputs and He initialisation let it learn without batch normalisation (with [0, 1]
    inputs and Glorot weights it sat at chance for thousands of steps).
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, not {head!r}")
    layers = keras.layers
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), name="image")
    x = inputs
    for block, filters in ((1, 32), (2, 64), (3, 128)):
        for index in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", activation="relu", kernel_initializer="he_normal",
                              name=f"block{block}_conv{index}")(x)
        if head == "dense" or block < 3:
            x = layers.MaxPooling2D(name=f"block{block}_pool")(x)
    if head == "dense":
        x = layers.MaxPooling2D(name="block4_pool")(x)
        x = layers.Flatten(name="flatten")(x)
        x = layers.Dense(64, activation="relu", kernel_initializer="he_normal", name="fc1")(x)
        x = layers.Dropout(0.3, name="dropout")(x)
    else:
        x = layers.GlobalAveragePooling2D(name="global_pool")(x)
        x = layers.Dropout(0.2, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="shapes_cnn" if head == "dense" else "shapes_gap_cnn")
