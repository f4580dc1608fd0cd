"""KerasHub image classifiers: which of their classes load, and what their ImageConverter says of the input.

KerasHub (the Keras team's model library) ships ResNet, MobileNet, EfficientNet, CSPNet, DenseNet and ConvNeXt
classifiers. Their classes are library code like Keras's own, but only the ones the installed package registers
(audit.model_files asks `keras_hub_problem`). A classifier's `preprocessor.image_converter` holds how pixels
become the input (x * scale + offset, per channel or not) and the image size: read, not guessed.
"""

from __future__ import annotations

import numpy as np

from audit import images

MATCHED_MODES = ("unit", "tf", "torch", "raw")
"""The modes a converter's x * scale + offset can be (caffe's BGR swap is no such transform)."""


def image_converter(model):
    """The model's KerasHub ImageConverter, or None (a plain Keras model, or a classifier saved without one)."""
    preprocessor = getattr(model, "preprocessor", None)
    return getattr(preprocessor, "image_converter", None)


def converter_preprocessing(model) -> tuple[str, str] | None:
    """(mode, why) from the ImageConverter, or None without one. A converter whose transform is none of the
    named modes is said with its numbers, and [0, 1] is assumed (the Model page weighs the candidates)."""
    converter = image_converter(model)
    if converter is None:
        return None
    config = converter.get_config()
    scale = np.asarray(1.0 if config.get("scale") is None else config["scale"], np.float64)
    offset = np.asarray(0.0 if config.get("offset") is None else config["offset"], np.float64)
    pixels = np.array([[[[0, 0, 0], [64, 128, 192], [255, 255, 255]]]], np.float64)
    converted = pixels * scale + offset
    said = f"x × {np.round(scale, 6).tolist()} + {np.round(offset, 6).tolist()}"
    for mode in MATCHED_MODES:
        if np.allclose(images.preprocess(pixels.astype(np.float32), mode), converted, rtol=1e-3, atol=1e-3):
            return mode, f"its KerasHub ImageConverter ({type(converter).__name__}) feeds {said}"
    return "unit", (f"its KerasHub ImageConverter ({type(converter).__name__}) feeds {said}, none of the named "
                    "preprocessings: [0, 1] assumed; check it")


def converter_size(model) -> tuple[int, int] | None:
    """The image size the ImageConverter resizes to, for a model whose input takes any size."""
    converter = image_converter(model)
    size = None if converter is None else converter.get_config().get("image_size")
    return (int(size[0]), int(size[1])) if size else None


KERAS_HUB_PREFIX = "keras_hub>"
KERAS_HUB_MODULES = ("keras_hub.src.models.", "keras_hub.src.layers.")
"""Where the installed keras_hub keeps its model-building classes (backbones, classifiers, their preprocessors
and image converters); its tokenizers and utilities read files and are never loaded."""


def keras_hub_problem(registered: str, module, class_name: str) -> str | None:
    """None when `registered` is a model-building class the installed keras_hub registers under that name, in
    the module the file names; else why not. KerasHub is where Keras users get pretrained classifiers: its
    classes are library code like Keras's own, but only the ones the installed package defines."""
    import inspect

    import keras

    try:
        import keras_hub  # noqa: F401 (importing it registers its classes)
    except ImportError:
        return f"is {registered!r}, a KerasHub class, and keras_hub is not installed on this server"
    found = keras.saving.get_registered_object(registered)
    if not (inspect.isclass(found) and issubclass(found, keras.layers.Layer)
            and found.__module__.startswith(KERAS_HUB_MODULES)):
        return f"is {registered!r}, which the installed keras_hub does not register as a model-building class"
    if found.__name__ != class_name or found.__module__ != module:
        return (f"is {registered!r} but names {module}.{class_name}, not where the installed keras_hub defines it "
                f"({found.__module__}.{found.__name__})")
    return None


def keras_hub_module_problem(module: str, class_name: str) -> str | None:
    """None when `module.class_name` is a layer class the installed keras_hub defines there without registering it
    (MobileNetV3's blocks, which its backbone builds by code: a pruned copy saves them by module); else why not.
    Library code like a registered class: the module must be keras_hub's own and define the class itself."""
    import importlib
    import inspect
    import sys

    import keras

    if not module.startswith(KERAS_HUB_MODULES):
        return f"names the module {module!r}, which is not one of keras_hub's models or layers"
    try:
        import keras_hub  # noqa: F401 (its models' modules come with it)
    except ImportError:
        return f"names {module}.{class_name}, a KerasHub class, and keras_hub is not installed on this server"
    if module not in sys.modules:  # importing keras_hub imports every model's module: any other is not its own
        return f"names the module {module!r}, which the installed keras_hub does not have"
    found = getattr(importlib.import_module(module), class_name, None)
    if not (inspect.isclass(found) and issubclass(found, keras.layers.Layer) and found.__module__ == module):
        return f"names {module}.{class_name}, which is not a layer class the installed keras_hub defines there"
    return None
