"""Opening untrusted model files: screen everything before Keras deserialises anything.

A shared dashboard loads files from strangers, and Keras's `safe_mode` alone has been bypassed
several times (CVE-2025-1550, -8747, -9905, -9906, CVE-2026-1462). So we: accept only `.keras`
(zip) and `.h5` (HDF5) by their magic bytes, never a SavedModel; read the config as plain JSON and
refuse Lambda layers, anything from modules outside Keras, custom registered objects, serialised
functions, lookup layers reading files, and HDF5 links or storage outside the file; and only then
load a copy whose file name we chose, with safe mode on.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from audit.errors import ModelFileError, UnsafeModelError

ZIP_MAGIC = b"PK\x03\x04"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"

CODE_LAYERS = {
    "Lambda": "a Lambda layer carries Python code, which would run when the model is loaded "
              "(safe mode refuses it); rebuild the model with standard layers",
    "TFSMLayer": "a TFSMLayer loads a TensorFlow SavedModel, an executable graph we never load",
    "function": "a serialised Python function is code",
    "__lambda__": "a serialised Python lambda is code",
}
FILE_READING_LAYERS = {"StringLookup", "IntegerLookup", "TextVectorization", "Hashing", "Discretization"}
PATH_KEYS = {"filepath", "path", "vocabulary", "vocabulary_path", "file_path", "url"}


def check_model_file(path: str | Path) -> str:
    """Screen a model file without loading it; return its format ("keras" or "h5") or raise."""
    path = Path(path)
    if path.is_dir():
        raise UnsafeModelError(
            f"{path.name} is a folder (a TensorFlow SavedModel?). SavedModels are executable graphs and are "
            "never loaded here; save the model as .keras (model.save('model.keras')).")
    if not path.is_file():
        raise ModelFileError(f"No model file at {path}.")
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(ZIP_MAGIC):
        scan_config(_zip_config(path))
        return "keras"
    if head == HDF5_MAGIC:
        scan_config(_hdf5_config(path))
        return "h5"
    raise ModelFileError(
        f"{path.name} is not a Keras model file: expected a .keras (zip) or .h5 (HDF5) file, "
        "and its first bytes are neither.")


def _zip_config(path: Path) -> dict:
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                member = PurePosixPath(name)
                if member.is_absolute() or ".." in member.parts or "\\" in name:
                    raise UnsafeModelError(f"{path.name}: the archive member {name!r} points outside the archive.")
            if "config.json" not in archive.namelist():
                raise ModelFileError(f"{path.name} is a zip archive but not a .keras model (no config.json).")
            broken = archive.testzip()
            if broken is not None:
                raise ModelFileError(f"{path.name} is corrupt: the member {broken!r} fails its checksum.")
            return json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ModelFileError(f"{path.name} is corrupt or truncated: it cannot be read as a zip archive ({exc}).") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path.name}: its config.json is not valid JSON ({exc}).") from exc


def _hdf5_config(path: Path) -> dict:
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            _check_hdf5_links(handle, path.name)
            config = handle.attrs.get("model_config")
    except (OSError, RuntimeError, KeyError) as exc:
        raise ModelFileError(f"{path.name} is corrupt or truncated: it cannot be read as HDF5 ({exc}).") from exc
    if config is None:
        raise ModelFileError(
            f"{path.name} holds weights only (no model_config): it needs the architecture too; save the "
            "whole model with model.save('model.keras').")
    try:
        return json.loads(config.decode() if isinstance(config, bytes) else config)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path.name}: its model_config is not valid JSON ({exc}).") from exc


def _check_hdf5_links(group, file_name: str, prefix: str = "") -> None:
    """Refuse external links, virtual datasets and external storage: they read other files."""
    import h5py

    for name in group:
        link = group.get(name, getlink=True)
        where = f"{prefix}/{name}"
        if isinstance(link, h5py.ExternalLink):
            raise UnsafeModelError(f"{file_name}: {where} is an external link to {link.filename!r}; refused.")
        if isinstance(link, h5py.SoftLink):
            continue  # points inside this file; its target is visited on its own
        item = group[name]
        if isinstance(item, h5py.Dataset):
            if item.is_virtual or item.external:
                raise UnsafeModelError(f"{file_name}: the dataset {where} reads data from other files; refused.")
        elif isinstance(item, h5py.Group):
            _check_hdf5_links(item, file_name, where)


def scan_config(config) -> None:
    """Walk a whole model config (nested models too) and refuse anything that is code."""
    problems: list[str] = []
    _walk(config, "", problems)
    if problems:
        unique = list(dict.fromkeys(problems))
        raise UnsafeModelError("This model file is refused: " + "; ".join(unique) + ".")


def _is_keras_module(module: str) -> bool:
    return module == "keras" or module.startswith("keras.")


def _walk(node, where: str, problems: list[str]) -> None:
    if isinstance(node, list):
        for item in node:
            _walk(item, where, problems)
        return
    if not isinstance(node, dict):
        return
    class_name = node.get("class_name")
    config = node.get("config") if isinstance(node.get("config"), dict) else {}
    name = config.get("name") if isinstance(config.get("name"), str) else None
    here = f"{where}/{name}" if name and class_name else where
    label = f"layer '{here.lstrip('/')}'" if here else "the model"
    if isinstance(class_name, str) and class_name in CODE_LAYERS:
        problems.append(f"{label} is a {class_name}: {CODE_LAYERS[class_name]}")
    module = node.get("module")
    if isinstance(module, str) and not _is_keras_module(module):
        problems.append(f"{label} names the module {module!r}, outside Keras: only Keras's own objects are loaded")
    registered = node.get("registered_name")
    if isinstance(registered, str) and class_name and registered != class_name and not registered.startswith("keras"):
        problems.append(f"{label} is the custom object {registered!r}: custom code cannot be vetted")
    if class_name in FILE_READING_LAYERS:
        for key in ("vocabulary", "bin_boundaries", "salt"):
            if isinstance(config.get(key), str):
                problems.append(f"{label} ({class_name}) reads its {key} from the path {config[key]!r}")
    for key, value in node.items():
        if key in PATH_KEYS and isinstance(value, str) and value and class_name not in FILE_READING_LAYERS:
            problems.append(f"{label} has a file path or address in {key!r}: {value!r}")
        _walk(value, here, problems)


def load_model_file(path: str | Path):
    """Screen, then load a .keras or .h5 file in safe mode from a copy whose name we chose."""
    import keras

    path = Path(path)
    kind = check_model_file(path)
    with tempfile.TemporaryDirectory(prefix="cnn-audit-") as folder:
        copy = Path(folder) / f"model.{kind}"
        shutil.copyfile(path, copy)
        try:
            return keras.saving.load_model(copy, compile=False, safe_mode=True)
        except Exception as exc:  # Keras raises many types on bad files; all mean "cannot load"
            raise ModelFileError(
                f"{path.name} could not be loaded as a Keras model: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from exc
