"""Opening untrusted model files: screen everything before Keras deserialises anything.

A shared dashboard loads files from strangers, and Keras's `safe_mode` alone has been bypassed
several times (CVE-2025-1550, -8747, -9905, -9906, CVE-2026-1462). So we never rely on it alone:

1. only `.keras` (zip) and `.h5` (HDF5) files and KerasHub presets (a folder packed into a zip, or its zip),
   told apart by their magic bytes, never a SavedModel folder (an executable TensorFlow graph);
2. the model config is read as plain JSON, without building anything, and refused when it asks
   for code (audit.config_screen);
3. HDF5 links and storage that reach outside the file, and zip members that point outside the
   archive, are refused;
4. only then is a private copy, under a name we chose, loaded with `safe_mode=True`.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from audit import config_screen, keras_hub_presets, limits, model_kinds
from audit.errors import ModelFileError, UnsafeModelError

ZIP_MAGIC = b"PK\x03\x04"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def load_model_file(path: str | Path, shown: str | None = None):
    """Screen, then load a .keras or .h5 file (or a zipped KerasHub preset) in safe mode, from a private copy
    named by us.

    The bytes are copied first and the copy is what gets screened and loaded, so the file cannot
    change in between; the user's path string never reaches Keras (which follows remote paths).
    """
    import keras

    path = Path(path)
    shown = shown or path.name  # an upload is named by its file name, not its hash
    _refuse_folder_or_missing(path)
    from audit import storage

    scratch = storage.data_dir() / "tmp"  # everything the app writes stays under its data folder
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cnn-audit-", dir=scratch) as folder:
        staged = Path(folder) / "upload"
        shutil.copyfile(path, staged)
        kind = _screen(staged, shown)
        copy = staged.rename(Path(folder) / f"model.{kind}")
        try:
            if kind == "preset":
                return keras_hub_presets.load_preset(copy, Path(folder))
            return keras.saving.load_model(copy, compile=False, safe_mode=True)
        except Exception as exc:  # Keras raises many types on bad files; all mean "cannot load"
            detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            if isinstance(exc, MemoryError) or "ResourceExhausted" in type(exc).__name__ or "OOM" in str(exc):
                raise ModelFileError(f"{shown}: building its layers needs more memory than this process may "
                                     "use (its config declares more weights than its file holds?); refused.") from exc
            if "safe_mode" in str(exc) or "unsafe" in str(exc).lower():
                raise UnsafeModelError(f"{shown} was refused by Keras's safe mode ({detail}).") from exc
            raise ModelFileError(
                f"{shown} passed the checks but could not be loaded as a Keras model (corrupt, "
                f"truncated or made by an incompatible Keras?): {detail}") from exc


def check_model_file(path: str | Path, shown: str | None = None) -> str:
    """Screen a model file without loading it; return its format ("keras", "h5" or "preset") or raise."""
    path = Path(path)
    _refuse_folder_or_missing(path)
    return _screen(path, shown or path.name)


def pack_preset_folder(path: Path, scratch: Path) -> Path:
    """A KerasHub preset folder as one zip under `scratch`, named by its contents' SHA-256: from then on it
    is a file like an upload (screened, vetted, cached by digest). Any other folder is refused."""
    import hashlib

    if not keras_hub_presets.is_preset_folder(path):
        _refuse_folder_or_missing(path)
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cnn-audit-", dir=scratch) as folder:
        packed = keras_hub_presets.pack_folder(path, Path(folder) / "preset.zip")
        target = scratch / f"preset-{hashlib.sha256(packed.read_bytes()).hexdigest()}.zip"
        packed.replace(target)
    return target


def _refuse_folder_or_missing(path: Path) -> None:
    if path.is_dir():
        raise UnsafeModelError(
            f"{path.name} is a folder (a TensorFlow SavedModel?). SavedModels are executable graphs "
            "and are never loaded here; save the model as one .keras file (model.save('model.keras')). "
            "A KerasHub preset folder (save_to_preset: config.json, metadata.json, model.weights.h5) loads.")
    if not path.is_file():
        raise ModelFileError(f"No model file at {path}.")


def _screen(path: Path, shown: str) -> str:
    """Format by magic bytes only (the extension is the uploader's claim), then the checks."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(ZIP_MAGIC):
        return _screen_zip(path, shown)
    if head == HDF5_MAGIC:
        config = _hdf5_config(path, shown)
        config_screen.check_budgets(config, shown)
        config_screen.scan_config(config, shown)
        model_kinds.check_kinds(config, shown)
        return "h5"
    raise ModelFileError(
        f"{shown} is not a Keras model file: expected a .keras (zip) or .h5 (HDF5) file, and its "
        "first bytes are neither.")


def _screen_zip(path: Path, shown: str) -> str:
    """A .keras archive or a zipped KerasHub preset: members that escape it, its size and checksums, then its
    configs and HDF5 weights."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            for name in names:
                member = PurePosixPath(name.replace("\\", "/"))
                if member.is_absolute() or ".." in member.parts or re.match(r"^[A-Za-z]:", name):
                    raise UnsafeModelError(f"{shown}: the archive member {name!r} points outside the archive.")
            limits.ARCHIVE_MEMBERS.check(len(names), shown, ModelFileError)
            unpacked = sum(info.file_size for info in archive.infolist())
            limits.WEIGHT_BYTES.check(unpacked, f"{shown} (its members)", ModelFileError)
            broken = archive.testzip()
            if broken is not None:
                raise ModelFileError(f"{shown} is corrupt: the archive member {broken!r} fails its checksum.")
            root = keras_hub_presets.preset_root(archive)
            if root is not None:
                keras_hub_presets.screen_preset(archive, root, shown)
                return "preset"
            if "config.json" not in names:
                raise ModelFileError(f"{shown} is a zip archive but not a .keras model (it has no config.json).")
            with archive.open("config.json") as member:
                raw = member.read(config_screen.MAX_CONFIG_BYTES + 1)
            if len(raw) > config_screen.MAX_CONFIG_BYTES:
                raise ModelFileError(
                    f"{shown}: its config.json is over {config_screen.MAX_CONFIG_BYTES >> 20} MiB; refused.")
            config = config_screen.parse_config(raw, shown)
            if not isinstance(config, dict):
                raise ModelFileError(f"{shown}: its config.json does not describe a model.")
            config_screen.check_budgets(config, shown)
            config_screen.scan_config(config, shown)
            model_kinds.check_kinds(config, shown)
            for name in names:
                if name.endswith((".h5", ".hdf5")):
                    config_screen.check_hdf5_member(archive, name, shown)
            return "keras"
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, RuntimeError, ValueError) as exc:
        raise ModelFileError(
            f"{shown} is corrupt or truncated: it cannot be read as a zip archive ({exc}).") from exc


def _hdf5_config(path: Path, shown: str) -> dict:
    """model_config of a legacy .h5 file, after refusing links and storage outside the file."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            config_screen.check_hdf5(handle, shown)
            config = handle.attrs.get("model_config")
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise ModelFileError(f"{shown} is corrupt or truncated: it cannot be read as HDF5 ({exc}).") from exc
    if config is None:
        raise ModelFileError(
            f"{shown} holds weights only (no model_config): it needs the architecture too; save "
            "the whole model with model.save('model.keras').")
    config = config_screen.parse_config(config if isinstance(config, bytes) else str(config).encode(), shown)
    if not isinstance(config, dict):
        raise ModelFileError(f"{shown}: its model_config does not describe a model.")
    return config
