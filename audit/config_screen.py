"""The screen of a model's config and weights files, read as data before Keras builds anything.

A config (a .keras's config.json, a legacy .h5's model_config, a KerasHub preset's JSON files) is refused
when it asks for code: Lambda and other code-carrying layers, serialised functions, objects from modules
outside Keras's model-building namespaces (or classes the installed keras_hub does not register), custom
registered objects, files or web addresses; and when what it declares (depth, input, parameters) is past the
server's limits. HDF5 weights are refused when they link or store outside their file.
"""

from __future__ import annotations

import json
import re

from audit import limits
from audit.errors import ModelFileError, UnsafeModelError
from audit.keras_hub_models import KERAS_HUB_MODULES, KERAS_HUB_PREFIX, keras_hub_module_problem, keras_hub_problem

MAX_CONFIG_BYTES = 64 * 2**20  # a real config.json is kilobytes; more is a decompression bomb

# Classes whose config carries or reaches code that would run when the model is rebuilt.
CODE_CLASSES = {
    "Lambda": "a Lambda layer carries Python code, which would run when the model is loaded (safe "
              "mode refuses it too); rebuild the model without Lambda layers, or replace them with "
              "standard layers",
    "TFSMLayer": "a TFSMLayer loads a TensorFlow SavedModel, an executable graph that is never loaded here",
    "TorchModuleWrapper": "a TorchModuleWrapper unpickles a PyTorch module, and unpickling runs code",
    "JaxLayer": "a JaxLayer wraps Python functions, which are code",
    "FlaxLayer": "a FlaxLayer wraps a Flax module, which is Python code",
    "__lambda__": "a serialised Python lambda is bytecode that would run",
}
# Preprocessing layers that accept a file path (or URL) instead of an inline vocabulary.
FILE_READING_LAYERS = {"StringLookup", "IntegerLookup", "IndexLookup", "TextVectorization", "Hashing", "Discretization"}
VOCABULARY_KEYS = ("vocabulary", "idf_weights", "bin_boundaries")
PATH_KEYS = {"filepath", "file_path", "path", "filename", "vocabulary_path", "url", "uri"}
# Keras namespaces that hold model-building objects. Others (utils, saving, config, callbacks,
# datasets, applications, preprocessing, export, backend, ...) download, read or write files,
# or change global settings: CVE-2025-8747 used keras.utils.get_file from a config.
MODELLING_NAMESPACES = {"layers", "models", "ops", "activations", "initializers", "regularizers",
                        "constraints", "losses", "metrics", "optimizers", "dtype_policies",
                        "quantizers", "random"}
# Where Keras looks up a function saved as {"module": "builtins", "class_name": "function"}.
BUILTIN_FUNCTION_MODULES = ("activations", "constraints", "initializers", "losses", "metrics",
                            "optimizers", "regularizers")
LAYER_KEYS = {"layers", "layer", "forward_layer", "backward_layer"}
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

def parse_config(raw: bytes, shown: str):
    """The config as JSON; nesting deep enough to exhaust Python's stack is refused, not a crash."""
    try:
        return json.loads(raw)
    except RecursionError as exc:
        raise ModelFileError(f"{shown}: its config nests deeper than Python can read; refused "
                             f"({limits.CONFIG_DEPTH.variable} bounds the depth we accept).") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ModelFileError(f"{shown}: its config is not valid JSON ({exc}).") from exc


def check_budgets(config, shown: str) -> None:
    """What the config declares, against the server's limits, before Keras builds anything: its depth,
    the input size, and the parameters its layers would allocate (from each layer's build shape)."""
    limits.CONFIG_DEPTH.check(_depth(config), shown, ModelFileError)
    parameters, pixels = 0, 0
    for node in _objects(config):
        kind, layer = node.get("class_name"), node.get("config") if isinstance(node.get("config"), dict) else {}
        if kind == "InputLayer":
            shape = layer.get("batch_shape") or layer.get("batch_input_shape") or []
            if len(shape) >= 3:
                pixels = max(pixels, _product(shape[1:-1]))
        parameters += _declared_parameters(kind, layer, node.get("build_config"))
    limits.INPUT_PIXELS.check(pixels, f"{shown} (its input)", ModelFileError)
    limits.PARAMETERS.check(parameters, shown, ModelFileError)


def _depth(node, level: int = 0) -> int:
    if level > limits.CONFIG_DEPTH.value:
        return level
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    return max((_depth(child, level + 1) for child in children), default=level)


def _objects(node):
    """Every serialised object (a dict with a class name) in a config, nested ones included."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "class_name" in item:
                yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _product(values) -> int:
    total = 1
    for value in values:
        total *= int(value) if isinstance(value, (int, float)) and value and value > 0 else 1
    return total


def _declared_parameters(kind, layer: dict, build) -> int:
    """The weights a layer allocates when built (the big kinds; the rest are small). Without a build shape
    the input is taken as one channel: a lower bound that still catches a Dense of millions of units."""
    shape = (build or {}).get("input_shape") if isinstance(build, dict) else None
    channels = shape[-1] if isinstance(shape, list) and shape and isinstance(shape[-1], (int, float)) else 1
    channels = max(int(channels or 1), 1)
    kernel = _product(layer.get("kernel_size") or [1]) if isinstance(layer.get("kernel_size"), list) else \
        _product([layer.get("kernel_size") or 1])

    def number(key):
        value = layer.get(key)
        return int(value) if isinstance(value, (int, float)) and value > 0 else 1

    if kind == "Dense":
        return channels * number("units") + number("units")
    if kind in ("Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"):
        return kernel * channels * number("filters") // number("groups") + number("filters")
    if kind in ("DepthwiseConv1D", "DepthwiseConv2D"):
        return (kernel + 1) * channels * number("depth_multiplier")
    if kind in ("SeparableConv1D", "SeparableConv2D"):
        multiplier = number("depth_multiplier")
        return kernel * channels * multiplier + channels * multiplier * number("filters") + number("filters")
    if kind == "Embedding":
        return number("input_dim") * number("output_dim")
    if kind in ("BatchNormalization", "LayerNormalization"):
        return 4 * channels
    return 0


def _declared_weight_bytes(group, seen: set | None = None) -> int:
    """Bytes the HDF5 datasets declare (shape x item size), counted once per link: four links to one
    empty 1 GiB dataset would be read four times."""
    import h5py

    seen = set() if seen is None else seen
    total = 0
    for name in group:
        link = group.get(name, getlink=True)
        if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
            continue
        item = group[name]
        if isinstance(item, h5py.Dataset):
            total += _product(item.shape) * item.dtype.itemsize
        elif isinstance(item, h5py.Group) and item.id not in seen:
            seen.add(item.id)
            total += _declared_weight_bytes(item, seen)
    return total


def check_hdf5(handle, shown: str) -> None:
    """An open HDF5 file (h5py): no links or storage outside it, and declared bytes within the limit."""
    _check_hdf5_links(handle, shown)
    limits.WEIGHT_BYTES.check(_declared_weight_bytes(handle), shown, ModelFileError)


def check_hdf5_member(archive, name: str, shown: str) -> None:
    """The weights inside a .keras are HDF5 too; h5py would follow their links to other files."""
    import h5py

    try:
        with archive.open(name) as member, h5py.File(member, "r") as handle:
            check_hdf5(handle, f"{shown} ({name})")
    except OSError as exc:
        raise ModelFileError(f"{shown} is corrupt or truncated: its {name} cannot be read ({exc}).") from exc


def _check_hdf5_links(group, shown: str, prefix: str = "", seen: set | None = None) -> None:
    """Refuse external links, virtual datasets and external storage: each reads another file.

    `visititems` skips links, so links are listed one by one; hard links may form cycles, hence
    `seen`. Soft links point inside this file, whose objects are all visited anyway.
    """
    import h5py

    seen = set() if seen is None else seen
    for name in group:
        link = group.get(name, getlink=True)
        where = f"{prefix}/{name}"
        if isinstance(link, h5py.ExternalLink):
            raise UnsafeModelError(
                f"{shown}: {where} is an external link to {link.filename!r}, another file; refused.")
        if isinstance(link, h5py.SoftLink):
            continue
        item = group[name]
        if item.id in seen:
            continue
        seen.add(item.id)
        if isinstance(item, h5py.Dataset):
            if item.is_virtual:
                raise UnsafeModelError(f"{shown}: the dataset {where} is virtual (reads other files); refused.")
            if item.external:
                raise UnsafeModelError(f"{shown}: the dataset {where} stores its data in other files; refused.")
        elif isinstance(item, h5py.Group):
            _check_hdf5_links(item, shown, where, seen)


def scan_config(config, shown: str = "This model file") -> None:
    """Walk a whole model config (nested models, wrapped layers, compile configs) and refuse code.

    Raises one UnsafeModelError that lists every problem with where it is. Nested objects'
    `compile_config` is scanned too: Keras compiles nested models from it even when the outer
    load passes compile=False.
    """
    problems: list[str] = []
    _walk(config, "", None, problems)
    if problems:
        unique = list(dict.fromkeys(problems))
        raise UnsafeModelError(f"{shown} is refused: " + "; ".join(unique) + ".")


def _walk(node, where: str, key: str | None, problems: list[str]) -> None:
    """`where` is the path of layer names so far; `key` the field holding this node."""
    if isinstance(node, list):
        for item in node:
            _walk(item, where, key, problems)
        return
    if isinstance(node, str):
        if URL.match(node.strip()):
            problems.append(f"{_label(where, key)} holds the web address {node[:120]!r}; models "
                            "must not fetch anything")
        return
    if not isinstance(node, dict):
        return
    class_name = node.get("class_name")
    config = node.get("config") if isinstance(node.get("config"), dict) else {}
    name = config.get("name") if isinstance(config.get("name"), str) else None
    if class_name is not None and name and (not where or key in LAYER_KEYS):
        where, key = f"{where}/{name}" if where else name, None
    label = _label(where, key)
    if class_name is not None:
        _check_object(node, class_name, config, label, problems)
    for field, value in node.items():
        if field in PATH_KEYS and isinstance(value, str) and value:
            problems.append(f"{label} names a file or address in {field!r}: {value[:120]!r}")
        if field == "function_type" and value == "lambda":
            problems.append(f"{label} holds a serialised Python function (bytecode)")
        _walk(value, where, field if field != "config" else key, problems)


def _label(where: str, key: str | None) -> str:
    place = f"layer '{where}'" if where else "the model"
    return f"{place} ({key})" if key else place


def _check_object(node: dict, class_name, config: dict, label: str, problems: list[str]) -> None:
    """One serialised object: its class, the module Keras would import it from, its name."""
    if not isinstance(class_name, str):
        problems.append(f"{label} has a class name that is not a string")
        return
    if class_name in CODE_CLASSES:
        problems.append(f"{label} is a {class_name}: {CODE_CLASSES[class_name]}")
    if class_name in FILE_READING_LAYERS:
        for field in VOCABULARY_KEYS:
            if isinstance(config.get(field), str):
                problems.append(f"{label} ({class_name}) would read its {field} from the file or "
                                f"address {config[field][:120]!r}")
    registered = node.get("registered_name")
    if isinstance(registered, str) and registered.startswith(KERAS_HUB_PREFIX):
        problem = keras_hub_problem(registered, node.get("module"), class_name)
        if problem:
            problems.append(f"{label} {problem}")
        return  # a class of the installed keras_hub, resolved by its registration, never by the file's module
    if registered is not None and registered != class_name:
        problems.append(f"{label} is the custom object {registered!r}: custom objects are code that "
                        "cannot be vetted")
    if "module" not in node:
        return  # legacy .h5 configs: Keras looks the class up among its own layers only
    module = node["module"]
    # What Keras resolves: `module.class_name`, or `module.<config>` for a saved function,
    # or `module.<spec_name>` for a TypeSpec.
    if class_name == "function":
        target = node.get("config")
    elif class_name == "__typespec__":
        target = node.get("spec_name")
    else:
        target = class_name
    if isinstance(module, str) and module.startswith(KERAS_HUB_MODULES) and isinstance(target, str):
        problem = keras_hub_module_problem(module, target)
    else:
        problem = _module_problem(module, target, class_name == "function")
    if problem:
        problems.append(f"{label} {problem}")


def _module_problem(module, target, is_function: bool) -> str | None:
    if not isinstance(module, str):
        return f"names a module that is not a string ({module!r})"
    if not isinstance(target, str) or not IDENTIFIER.match(target):
        return f"names the object {target!r} in {module!r}, which is not a plain name"
    if module == "builtins" and is_function:
        if _is_keras_builtin_function(target):
            return None  # how Keras saves its own functions, e.g. a loss passed as a function
        return f"names the Python function {target!r}, which is not one of Keras's own functions"
    if module != "keras" and not module.startswith("keras."):
        return (f"names the module {module!r}, outside Keras: only Keras's own model-building "
                "objects are loaded")
    parts = module.split(".")[1:]
    if parts[:1] == ["src"]:
        parts = parts[1:]
    namespace = parts[0] if parts else ""
    if namespace and namespace not in MODELLING_NAMESPACES and not (
            namespace == "applications" and _is_keras_layer_class(module, target)):
        return (f"names {module}.{target}, which is not a model-building object (Keras's "
                f"{namespace!r} namespace reads, downloads or changes things)")
    if namespace in ("", "models") and not target[0].isupper():
        return f"names the function {module}.{target}, which is not a model-building object"
    return None


def _is_keras_layer_class(module: str, name: str) -> bool:
    """A layer class that Keras itself defines outside its layers namespace (ConvNeXt's LayerScale in
    keras.src.applications.convnext): model-building, and loaded by Keras's safe mode."""
    import importlib
    import importlib.util
    import inspect

    import keras

    try:
        if importlib.util.find_spec(module) is None:
            return False
        candidate = getattr(importlib.import_module(module), name, None)
    except (ImportError, ValueError):
        return False
    return inspect.isclass(candidate) and issubclass(candidate, keras.layers.Layer) \
        and candidate.__module__ == module


def _is_keras_builtin_function(name: str) -> bool:
    import keras

    if name.startswith("_") or name in ("get", "serialize", "deserialize"):
        return False
    return any(callable(getattr(getattr(keras, module), name, None))
               for module in BUILTIN_FUNCTION_MODULES)
