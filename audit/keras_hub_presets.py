"""KerasHub presets: the folder `save_to_preset` writes (config.json, model.weights.h5, task.json, the
preprocessor's and image converter's JSON), given as a local folder or uploaded as a zip of one.

A preset is screened like a .keras file, file by file, before KerasHub builds anything: every JSON passes
the config screen, the weights pass the HDF5 screen, and nothing else may be in it (tokenizers, sharded or
safetensors weights and Transformers or timm configs are other loaders, which read more files). A folder is
packed first into one zip with fixed dates, so the same folder is the same file (its digest names it) and
the bytes cannot change between the screen and the load.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path, PurePosixPath

from audit import config_screen, limits, model_kinds
from audit.errors import ModelFileError, UnsafeModelError
from audit.keras_hub_models import KERAS_HUB_PREFIX

METADATA = "metadata.json"
MODEL_CONFIGS = ("task.json", "config.json")  # the task's config holds the backbone's; either says the model
OBJECT_CONFIGS = ("config.json", "task.json", "preprocessor.json", "image_converter.json")
WEIGHTS = ("model.weights.h5", "task.weights.h5")
PRESET_FILES = {METADATA, *OBJECT_CONFIGS, *WEIGHTS, "README.md"}
FIXED_DATE = (1980, 1, 1, 0, 0, 0)


def is_preset_folder(folder: Path) -> bool:
    """A folder with a metadata.json that KerasHub wrote (it records the keras_hub version)."""
    return folder.is_dir() and _is_keras_hub_metadata((folder / METADATA).read_bytes()
                                                      if (folder / METADATA).is_file() else b"")


def pack_folder(folder: Path, destination: Path) -> Path:
    """The preset's files in one zip at `destination`, in name order with fixed dates: a folder's zip
    depends on its contents only. Refuses what a preset does not hold, and links (they reach elsewhere)."""
    shown = folder.name
    files = sorted(item for item in folder.iterdir())
    total = 0
    for item in files:
        if item.is_symlink() or not item.is_file():
            raise UnsafeModelError(f"{shown}: {item.name} is {'a link' if item.is_symlink() else 'a folder'}; "
                                   "a KerasHub image preset holds plain files only.")
        _check_member_name(item.name, shown)
        total += item.stat().st_size
    limits.WEIGHT_BYTES.check(total, f"{shown} (its files)", ModelFileError)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(destination, "w", zipfile.ZIP_STORED) as archive:
        for item in files:
            archive.writestr(zipfile.ZipInfo(item.name, date_time=FIXED_DATE), item.read_bytes())
    return destination


def preset_root(archive: zipfile.ZipFile) -> str | None:
    """Where in the archive the preset is ("" at its top, "name/" in one folder), or None: not a preset."""
    for name in archive.namelist():
        path = PurePosixPath(name)
        if path.name == METADATA and len(path.parts) <= 2:
            with archive.open(name) as member:
                if _is_keras_hub_metadata(member.read(1 << 16)):
                    return name[: -len(METADATA)]
    return None


def screen_preset(archive: zipfile.ZipFile, root: str, shown: str) -> None:
    """Every member a preset file, every JSON through the config screen, the weights through the HDF5 one."""
    members = [name for name in archive.namelist() if not name.endswith("/")]
    for name in members:
        if not name.startswith(root):
            raise ModelFileError(f"{shown}: {name} lies outside the preset's folder {root!r}; zip the one folder.")
        _check_member_name(name[len(root):], shown)
    present = {name[len(root):] for name in members}
    if "config.json" not in present:
        raise ModelFileError(f"{shown} is a KerasHub preset without its config.json.")
    configs = {}
    for file in OBJECT_CONFIGS:
        if file in present:
            with archive.open(root + file) as member:
                raw = member.read(config_screen.MAX_CONFIG_BYTES + 1)
            if len(raw) > config_screen.MAX_CONFIG_BYTES:
                raise ModelFileError(f"{shown}: its {file} is over {config_screen.MAX_CONFIG_BYTES >> 20} MiB.")
            configs[file] = config_screen.parse_config(raw, f"{shown} ({file})")
            if not isinstance(configs[file], dict):
                raise ModelFileError(f"{shown}: its {file} does not describe a KerasHub object.")
            config_screen.scan_config(configs[file], f"{shown} ({file})")
    if not str(configs["config.json"].get("registered_name", "")).startswith(KERAS_HUB_PREFIX):
        raise ModelFileError(f"{shown}: its config.json is not a KerasHub backbone's (Transformers and timm "
                             "presets are converted by other loaders, which are not run here).")
    model = next(file for file in MODEL_CONFIGS if file in configs)
    config_screen.check_budgets(configs[model], f"{shown} ({model})")
    model_kinds.check_kinds(configs[model], f"{shown} ({model})")
    if "task.json" in configs:
        _check_image_classifier(configs["task.json"], shown)
    if "model.weights.h5" not in present:
        raise ModelFileError(f"{shown} is a KerasHub preset without its model.weights.h5.")
    for file in WEIGHTS:
        if file in present:
            config_screen.check_hdf5_member(archive, root + file, shown)


def load_preset(archive_path: Path, workdir: Path):
    """The screened preset's image classifier (with its preprocessor), or its backbone when it has no task."""
    import keras_hub

    with zipfile.ZipFile(archive_path) as archive:
        root = preset_root(archive)
        folder = workdir / "preset"
        folder.mkdir()
        for name in archive.namelist():
            if name.startswith(root) and not name.endswith("/"):
                (folder / PurePosixPath(name).name).write_bytes(archive.read(name))
    if (folder / "task.json").is_file():
        return keras_hub.models.ImageClassifier.from_preset(str(folder))
    return keras_hub.models.Backbone.from_preset(str(folder))


def _is_keras_hub_metadata(raw: bytes) -> bool:
    try:
        metadata = json.loads(raw)
    except ValueError:
        return False
    return isinstance(metadata, dict) and "keras_hub_version" in metadata


def _check_member_name(name: str, shown: str) -> None:
    if name not in PRESET_FILES:
        raise UnsafeModelError(
            f"{shown} holds {name!r}, which is not part of a KerasHub image preset (only "
            f"{', '.join(sorted(PRESET_FILES))}); tokenizers, sharded weights and other files are not loaded.")


def _check_image_classifier(task: dict, shown: str) -> None:
    """The task must be an image classifier: another task (a segmenter, a detector) would be rebuilt as one."""
    import inspect

    import keras
    import keras_hub

    found = keras.saving.get_registered_object(task.get("registered_name"))
    if not (inspect.isclass(found) and issubclass(found, keras_hub.models.ImageClassifier)):
        raise ModelFileError(f"{shown}: its task is {task.get('class_name')!r}, not an image classifier; "
                             "only KerasHub image classifiers and backbones are audited.")
