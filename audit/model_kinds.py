"""What an image-CNN file may hold: its layer kinds, its activations and how many layers, read from the config.

The screen in audit.model_files refuses code; this refuses what is not an image CNN or would lie about
itself, by name and before Keras builds anything:

- layers only of the kinds an image CNN is made of (convolutions, pooling, normalisation, activations,
  merges, reshaping, dropout, image preprocessing and augmentation, nested models), Keras's own layer
  classes of keras.applications (ConvNeXt's LayerScale), and the element-wise `keras.ops` a functional
  graph records for `x + 3` or `x * gate` (MobileNetV3's hard-sigmoid). Recurrent, attention, text and
  embedding layers are refused by name: what they cost is not counted here (an LSTM of 30,000 units is
  14 GB with no parameters declared in the way a conv declares them);
- activations only by the names Keras registers in `keras.activations` (not any function of `keras.ops`
  or `keras.random`: `keras.random.shuffle` as an activation would permute the outputs at every call);
- legacy .h5 class names that are layer classes (a function named as a class, `deserialize`, is not);
- at most limits.LAYERS layers (200,000 layers cost minutes before any error).
"""

from __future__ import annotations

from audit import limits
from audit.errors import ModelFileError, UnsafeModelError

IMAGE_CNN_LAYERS = frozenset({
    "InputLayer", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
    "Convolution1D", "Convolution2D", "Convolution3D", "SeparableConv1D", "SeparableConv2D", "DepthwiseConv1D",
    "DepthwiseConv2D", "Dense", "Activation", "Identity", "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax",
    "BatchNormalization", "LayerNormalization", "GroupNormalization", "UnitNormalization", "RMSNormalization",
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D", "AveragePooling3D",
    "MaxPool1D", "MaxPool2D", "MaxPool3D", "AvgPool1D", "AvgPool2D", "AvgPool3D", "GlobalMaxPooling1D",
    "GlobalMaxPooling2D", "GlobalMaxPooling3D", "GlobalAveragePooling1D", "GlobalAveragePooling2D",
    "GlobalAveragePooling3D", "GlobalMaxPool1D", "GlobalMaxPool2D", "GlobalMaxPool3D", "GlobalAvgPool1D",
    "GlobalAvgPool2D", "GlobalAvgPool3D", "Flatten", "Reshape", "Permute", "Cropping1D", "Cropping2D", "Cropping3D",
    "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "UpSampling1D", "UpSampling2D", "UpSampling3D", "Add",
    "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Concatenate", "Dropout", "SpatialDropout1D",
    "SpatialDropout2D", "SpatialDropout3D", "GaussianDropout", "GaussianNoise", "AlphaDropout",
    "ActivityRegularization", "Rescaling", "Normalization", "Resizing", "CenterCrop", "RandomFlip", "RandomRotation",
    "RandomZoom", "RandomTranslation", "RandomCrop", "RandomContrast", "RandomBrightness", "RandomGrayscale",
    "RandomHue", "RandomSaturation", "RandomSharpness", "RandomColorDegeneration", "RandomColorJitter",
    "Sequential", "Functional", "Model",
})
"""Layer classes (by class name, in keras.layers or keras) an image CNN is made of."""

ELEMENTWISE_OPS = {
    "keras.src.ops.numpy": frozenset({
        "Add", "Subtract", "Multiply", "Divide", "TrueDivide", "Maximum", "Minimum", "Negative", "Absolute", "Abs",
        "Sqrt", "Square", "Exp", "Log", "Power", "Clip", "Reciprocal", "Sign", "Floor", "Ceil", "Round", "Mean", "Sum",
        "Max", "Min", "Reshape", "Transpose", "Concatenate", "Squeeze", "ExpandDims", "Tanh", "Pad"}),
    "keras.src.ops.nn": frozenset({
        "Relu", "Relu6", "Sigmoid", "HardSigmoid", "HardSilu", "Silu", "Gelu", "Elu", "Selu", "Softplus", "Softsign",
        "LeakyRelu", "Softmax", "LogSoftmax"}),
    "keras.src.ops.core": frozenset({"Cast"}),
}
"""The `keras.ops` a functional graph may record as layers: element-wise arithmetic and shape changes (padding,
reshapes, transposes: KerasHub's backbones pad), whose cost the graph's symbolic shapes bound once built
(audit.models.check_cost); no matmul, convolution, control flow or randomness."""

CONTAINERS = frozenset({"Sequential", "Functional", "Model"})


def check_kinds(config: dict, shown: str) -> None:
    """Refuse, by name, layers that are not an image CNN's, activations Keras does not register, legacy class
    names that are not layer classes, and more layers than limits.LAYERS."""
    problems: list[str] = []
    count = _walk_layers(config, problems, legacy="module" not in config)
    limits.LAYERS.check(count, shown, ModelFileError)
    for where, value in _activations(config):
        problem = _activation_problem(value)
        if problem:
            problems.append(f"layer '{where}' {problem}")
    if problems:
        unique = list(dict.fromkeys(problems))
        more = f" (and {len(unique) - 8} more)" if len(unique) > 8 else ""
        raise UnsafeModelError(f"{shown} is refused: " + "; ".join(unique[:8]) + more + ".")


def _walk_layers(model: dict, problems: list[str], legacy: bool, prefix: str = "") -> int:
    """Check every layer object of a model config (nested models entered); return how many there are."""
    layers = (model.get("config") or {}).get("layers") if isinstance(model.get("config"), dict) else None
    count = 0
    stack = [(layer, prefix) for layer in reversed(layers if isinstance(layers, list) else [])]
    while stack:
        layer, where = stack.pop()
        count += 1
        if count > limits.LAYERS.value:
            return count
        if not isinstance(layer, dict):
            problems.append(f"{where or 'the model'} lists a layer that is not an object")
            continue
        name = (layer.get("config") or {}).get("name") if isinstance(layer.get("config"), dict) else None
        path = f"{where}{name}" if isinstance(name, str) else f"{where}?"
        problem = _kind_problem(layer, legacy)
        if problem:
            problems.append(f"layer '{path}' {problem}")
            continue
        inner = (layer.get("config") or {}).get("layers") if layer.get("class_name") in CONTAINERS else None
        if isinstance(inner, list):
            stack.extend((child, f"{path}/") for child in reversed(inner))
    return count


def _kind_problem(layer: dict, legacy: bool) -> str | None:
    kind, module = layer.get("class_name"), layer.get("module")
    if not isinstance(kind, str):
        return "has no class name"
    if module is None and not legacy:
        return f"({kind}) names no module"
    if module is None or module in ("keras", "keras.layers", "keras.models", "keras.src.models.functional",
                                    "keras.src.models.sequential", "keras.src.models.model"):
        if kind in IMAGE_CNN_LAYERS:
            return None
        return (f"is a {kind}, not a layer of an image CNN (convolutions, pooling, normalisation, activations, "
                "merges, reshaping, dropout, image preprocessing)")
    if module in ELEMENTWISE_OPS:
        if kind in ELEMENTWISE_OPS[module]:
            return None
        return f"records the operation {module}.{kind}, not an element-wise one this server can bound"
    if isinstance(module, str) and module.startswith("keras.src.applications."):
        return None  # Keras's own layer classes of its applications; model_files checks they are layer classes
    if isinstance(module, str) and module.startswith(("keras_hub.src.models.", "keras_hub.src.layers.")):
        return None  # a KerasHub backbone or layer: model_files checks the installed keras_hub registers it
    return f"is {module}.{kind}, not a layer of an image CNN"


def _activations(node, where: str = ""):
    """(layer name, value) of every `activation` field in a config."""
    stack = [(node, where)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, dict):
            config = item.get("config") if isinstance(item.get("config"), dict) else {}
            name = config.get("name") if isinstance(config.get("name"), str) else where
            for key in ("activation", "recurrent_activation"):
                if key in config:
                    yield name, config[key]
            stack.extend((value, name) for value in item.values())
        elif isinstance(item, list):
            stack.extend((value, where) for value in item)


def _activation_problem(value) -> str | None:
    """None when the activation is one Keras registers by name (or an image-CNN activation layer)."""
    if value is None:
        return None
    if isinstance(value, str):
        name = value
    elif isinstance(value, dict) and value.get("class_name") == "function":
        module = value.get("module")
        if module not in (None, "builtins", "keras.activations", "keras.src.activations.activations"):
            return f"has the activation {module}.{value.get('config')}, not one of keras.activations"
        name = value.get("config")
    elif isinstance(value, dict) and value.get("class_name") in IMAGE_CNN_LAYERS and \
            value.get("module") in (None, "keras.layers"):
        return None  # an activation layer object (LeakyReLU(0.1) passed as the activation)
    else:
        return "has an activation that is neither a name nor a Keras activation"
    if isinstance(name, str) and name in registered_activations():
        return None
    return f"has the activation {str(name)[:60]!r}, which keras.activations does not register by that name"


def registered_activations() -> frozenset[str]:
    """The activation names Keras registers (relu, swish, hard_silu, ...)."""
    import keras

    return frozenset(name for name in dir(keras.activations)
                     if not name.startswith("_") and name not in ("get", "serialize", "deserialize")
                     and callable(getattr(keras.activations, name)))
