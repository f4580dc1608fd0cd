"""What a loaded model is: the model with what the app knows about it (LoadedModel), the preprocessing a file
expects and why, its fingerprint, and the layer table.

Where models come from is audit.sources; audit.models.load joins the two.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field

import keras
import numpy as np
import pandas as pd

from audit import batches, device, groups, heads
from audit import images as image_utils
from audit.errors import NotAnImageModelError
from audit.keras_hub_models import converter_preprocessing
from audit.graph import CONV_TYPES, activation_name, is_operation, iter_layers


@dataclass
class LoadedModel:
    """A model ready for auditing, with everything the app needs to know about it.

    Streamlit shares one loaded model between all sessions' threads. `job_lock` lets one long job (a
    pass over an image set, a gallery, a sweep) run at a time per model, bounding its memory and CPU.
    `lock` serialises the quick calls (a prediction, one layer's maps, one map) and guards the model's
    own caches; a job does not hold it, so the quick views of everyone else never wait for a job. A quick
    call may run beside a job: both only read the model (pruning and randomising work on copies; nothing
    writes its weights after loading), and TensorFlow runs ops and traced functions from several
    threads at once.
    """

    model: keras.Model
    source: str
    fingerprint: str
    class_names: list[str] | None
    input_size: tuple[int, int]
    preprocessing: str
    description: str
    untrained: bool = False
    preprocessing_reason: str = ""
    display_name: str = ""  # shown instead of the source (an upload's file name, not its hash)
    file_bytes: int | None = None  # the size of the file it was loaded from (None: built from code)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    job_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    cost: object = field(default=None, repr=False, compare=False)  # audit.graph.Cost of one image, set by load
    trace_seconds: float = 0.0  # what tracing its forward pass took at load (a job's first call pays as much again)
    _outputs: dict = field(default_factory=dict, repr=False, compare=False)
    _graph: object = field(default=None, repr=False, compare=False)

    @property
    def title(self) -> str:
        """The name shown to users; untrained weights are always said so."""
        name = self.display_name or self.source
        return f"{name} (untrained)" if self.untrained and "untrained" not in name else name

    @property
    def file_stem(self) -> str:
        """The title as a safe file-name stem for downloads (an upload's file name, not its hash)."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.title).strip("_.") or "model"

    def head(self, output: int | None = None):
        """The output that is explained (audit.heads): the classifier, or the one asked for."""
        return self._outputs_of(output).head

    def predict(self, x: np.ndarray, device_name: str | None = None, output: int | None = None) -> np.ndarray:
        """Class probabilities of the explained output on a preprocessed batch (also for a logits or a
        single-unit head), or that output as it is when it has no classes; one caller at a time, in batches
        within the activation budget, each reserved from the server's (audit.batches)."""
        x = np.asarray(x, np.float32)
        outputs = self._outputs_of(output)

        def forward(batch):
            with self.lock, device.scope(device_name):
                return outputs.forward(batch).numpy()  # traced once: an eager call is 6x slower

        parts = list(batches.in_batches(self.model, x, forward, len(x)))
        values = np.concatenate(parts) if parts else np.zeros((0, *outputs.graph.outputs[0].shape[1:]), np.float32)
        return heads.probabilities(values, outputs.head) if outputs.head.is_classifier else values

    @property
    def preprocessing_assumed(self) -> bool:
        """Whether the preprocessing is a guess: the file has no rescaling layer and no known architecture."""
        return self.preprocessing_reason == ASSUMED_REASON

    def dependency_graph(self):
        """The model's dependency groups (audit.groups), built once and kept with the model."""
        with self.lock:
            if self._graph is None:
                self._graph = groups.DependencyGraph(self.model)
            return self._graph

    def _outputs_of(self, output: int | None):
        with self.lock:
            if output not in self._outputs:
                self._outputs[output] = heads.Outputs(self.model, output)
            return self._outputs[output]

    def preprocess(self, images, preprocessing: str | None = None, fit: str = "crop") -> np.ndarray:
        """uint8 RGB images (one (H, W, 3) or a batch or list) to this model's float input batch."""
        batch = images if isinstance(images, (list, tuple)) else list(np.asarray(images)[None]
                                                                      if np.ndim(images) == 3 else images)
        fitted = np.stack([image_utils.fit(image, self.input_size, fit) for image in batch])
        x = image_utils.preprocess(fitted, preprocessing or self.preprocessing)
        if self.model.inputs[0].shape[-1] == 1:  # grayscale model: luminance of the RGB input
            x = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)[:, None]
        return x


# Layers at the input that leave pixel values as they are (at inference) or only move them.
_VALUE_KEEPING = ("InputLayer", "RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation", "RandomCrop",
                  "RandomContrast", "RandomBrightness", "Resizing", "CenterCrop")
ASSUMED_REASON = "no rescaling layer at the input and no known architecture: assumed to take [0, 1]; check it"
"""The reason given when the file says nothing of its preprocessing (audit.preprocessing_evidence weighs it)."""

# keras.applications model names (they keep them in files) and the preprocessing each was trained with.
_FAMILIES = (
    (r"vgg1[69]$", "caffe", "VGG"), (r"resnet\d+$", "caffe", "ResNet (v1)"), (r"resnet\d+v2$", "tf", "ResNetV2"),
    (r"mobilenet_\d", "tf", "MobileNet"), (r"mobilenetv2_", "tf", "MobileNetV2"),
    (r"densenet\d+$", "torch", "DenseNet"), (r"inception_v3$", "tf", "InceptionV3"),
    (r"inception_resnet_v2$", "tf", "InceptionResNetV2"), (r"xception$", "tf", "Xception"),
    (r"nasnet_", "tf", "NASNet"),
)


def detect_preprocessing(model: keras.Model) -> tuple[str, str]:
    """The preprocessing a model file expects, and why we think so.

    Files do not record their preprocessing. A model that rescales or normalises inside, right after
    its input (`Rescaling(1/255)`, the tutorials' `Rescaling(1/127.5, offset=-1)`, EfficientNet's and
    ConvNeXt's own layers), takes pixel values 0-255; a keras.applications network, on its own or as a
    transfer-learning base, is recognised by its name and gets its family's preprocessing; a KerasHub
    classifier's ImageConverter says it (audit.keras_hub_models); anything else is assumed to take [0, 1].
    """
    from_converter = converter_preprocessing(model)
    if from_converter is not None:
        return from_converter
    first = _first_value_layer(model)
    if first is not None:
        kind = type(first).__name__
        if kind == "Rescaling":
            scale, offset = first.get_config()["scale"], first.get_config()["offset"]
            return "raw", (f"the model starts with a Rescaling layer ({first.name}: x * {scale:.6g} + {offset:.6g}), "
                           "so it takes pixel values 0-255")
        if kind == "Normalization":
            return "raw", f"the model starts with a Normalization layer ({first.name}), so it takes pixel values 0-255"
    for name in [model.name] + [layer.name for _, layer, _ in iter_layers(model) if isinstance(layer, keras.Model)]:
        for pattern, mode, family in _FAMILIES:
            if re.match(pattern, name.lower()):
                where = "the model" if name == model.name else f"its base {name!r}"
                return mode, f"{where} is keras.applications' {family}, trained with this preprocessing"
    return "unit", ASSUMED_REASON


def _first_value_layer(model: keras.Model):
    """The first layer after the input that changes pixel values, entering nested models and skipping
    augmentation (inactive at inference); None when the input branches."""
    layer = model
    while isinstance(layer, keras.Model):
        following = _readers_of_input(layer)
        while following is not None and (type(following).__name__ in _VALUE_KEEPING or _is_augmentation(following)):
            following = _next_layer(layer, following)
        if following is None:
            return None
        layer = following
    return layer


def _is_augmentation(layer) -> bool:
    return isinstance(layer, keras.Model) and all(type(inner).__name__ in _VALUE_KEEPING for inner in layer.layers)


def _readers_of_input(model: keras.Model):
    layers = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    return layers[0] if layers else None


def _next_layer(model: keras.Model, layer):
    """The layer after `layer` when the graph is a chain there (Sequential, or one reader), else None."""
    if isinstance(model, keras.Sequential):
        index = model.layers.index(layer)
        return model.layers[index + 1] if index + 1 < len(model.layers) else None
    readers = [node.operation for node in _graph_nodes(model)
               if any(t._keras_history.operation is layer for t in node.input_tensors)]
    return readers[0] if len(readers) == 1 else None


def _graph_nodes(model: keras.Model) -> list:
    return [node for nodes in model._nodes_by_depth.values() for node in nodes
            if node.operation is not None and not node.is_input]


def fingerprint_of(kind: str, digest: str) -> str:
    return hashlib.sha256(f"{kind}|{digest}".encode()).hexdigest()[:16]


def weights_digest(model: keras.Model) -> str:
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.asarray(weight.numpy()).tobytes())
    return digest.hexdigest()


def check_image_model(model: keras.Model) -> None:
    """Refuse models that do not take one batch of images (N, H, W, 1 or 3)."""
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) != 1:
        raise NotAnImageModelError(f"The model has {len(inputs)} inputs; CNN Audit needs exactly one image input.")
    shape = tuple(inputs[0].shape)
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise NotAnImageModelError(
            f"The model's input has shape {shape}; CNN Audit needs images (batch, height, width, 1 or 3 "
            "channels), channels last."
        )


# --- the layer table ------------------------------------------------------------------------

def _output_shape(layer) -> tuple | None:
    try:
        output = layer.output
    except (AttributeError, ValueError, RuntimeError):
        return None
    if isinstance(output, dict):  # a backbone's named stage outputs (KerasHub's HGNetV2)
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        output = output[0]
    return tuple(output.shape)


def _pair(value) -> tuple | None:
    """A kernel size or stride as a tuple: Keras's layers hold tuples, KerasHub's blocks may hold an int."""
    if value is None:
        return None
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def layer_table(model: keras.Model) -> pd.DataFrame:
    """One row per layer, nested models flattened (like MATLAB's net.Layers).

    Rows of nested models themselves are kept (`is_container`) so the nesting stays visible; sum
    `params` over the other rows to get the model's total without counting twice.
    """
    rows = []
    for index, (path, layer, depth) in enumerate(iter_layers(model)):
        kind = type(layer).__name__
        kernel = getattr(layer, "kernel_size", None) or getattr(layer, "pool_size", None)
        rows.append({
            "index": index,
            "path": path,
            "name": layer.name,
            "type": kind,
            "output_shape": _output_shape(layer),
            "params": 0 if is_operation(layer) or not layer.built else int(layer.count_params()),
            "activation": activation_name(layer),
            "filters": getattr(layer, "filters", None) or getattr(layer, "units", None),
            "kernel_size": _pair(kernel),
            "strides": _pair(getattr(layer, "strides", None)),
            "padding": getattr(layer, "padding", None),
            "is_conv": kind in CONV_TYPES,
            "is_container": isinstance(layer, keras.Model),
            "is_operation": is_operation(layer),
            "depth": depth,
        })
    table = pd.DataFrame(rows)
    for column in ("filters",):
        table[column] = table[column].astype("Int64")
    return table
