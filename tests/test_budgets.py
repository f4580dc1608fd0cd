"""Cost is an attack too: small files that declare gigabytes are refused from what they declare.

Every hostile file is generated here (never committed) and opened in a child process, as a server
would, which reports each refusal, its time and the process's peak memory: each must be an
AuditError naming the limit, within seconds, the whole child under 1 GB.
"""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from audit.errors import ModelFileError
from audit.model_files import check_model_file
from tests.fixtures import LOAD_IN_A_CHILD

ROOT = Path(__file__).resolve().parents[1]


def _tiny(tmp_path) -> Path:
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3), keras.layers.Flatten(),
                              keras.layers.Dense(5, name="dense")])
    path = tmp_path / "tiny.keras"
    model.save(path)
    return path


def _rewrite(source: Path, target: Path, change=None, extra: dict | None = None) -> Path:
    """A copy of a .keras archive with its config changed and members added."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for name in archive.namelist():
            data = archive.read(name)
            if name == "config.json" and change is not None:
                config = json.loads(data)
                change(config)
                data = json.dumps(config).encode()
            out.writestr(name, data)
        for name, data in (extra or {}).items():
            out.writestr(name, data)
    return target


def _legacy_h5(tmp_path, name: str, config: str | None = None) -> Path:
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3), keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    path = tmp_path / name
    with h5py.File(path, "w") as handle:
        handle.attrs["model_config"] = config or json.dumps({"class_name": "Sequential",
                                                            "config": model.get_config()})
        handle.create_group("model_weights")
    return path


def _hostile_files(tmp_path) -> dict[str, Path]:
    tiny = _tiny(tmp_path)

    def huge_dense(config):
        config["config"]["layers"][-1]["config"]["units"] = 750_000_000

    files = {"a Dense of 750M units": _rewrite(tiny, tmp_path / "dense.keras", huge_dense)}
    big_input = keras.Sequential([keras.Input((12000, 12000, 3)), keras.layers.Conv2D(1, 1),
                                  keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
    big_input.save(tmp_path / "input.keras")
    files["a 12000 x 12000 input"] = tmp_path / "input.keras"
    declared = _legacy_h5(tmp_path, "declared.h5")
    with h5py.File(declared, "a") as handle:
        handle["model_weights"].create_dataset("huge", shape=(1_040_000_000,), dtype="float32")  # 3.9 GiB, no data
    files["an HDF5 weight declared 3.9 GiB"] = declared
    linked = _legacy_h5(tmp_path, "linked.h5")
    with h5py.File(linked, "a") as handle:
        handle["model_weights"].create_dataset("one", shape=(268_435_456,), dtype="float32")  # 1 GiB, no data
        for copy in ("two", "three", "four"):
            handle["model_weights"][copy] = handle["model_weights"]["one"]  # hard links to the same dataset
    files["one 1 GiB dataset linked four times"] = linked
    deep = "[" * 100_000 + "]" * 100_000
    files["a config nesting 100,000 arrays"] = _legacy_h5(tmp_path, "deep.h5", deep)
    return files




def test_small_files_declaring_gigabytes_are_refused_within_seconds_and_little_memory(tmp_path):
    files = _hostile_files(tmp_path)
    assert all(path.stat().st_size < 250_000 for path in files.values())  # kilobytes each
    run = subprocess.run([sys.executable, "-c", LOAD_IN_A_CHILD, json.dumps({k: str(v) for k, v in files.items()})],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    expected = {"a Dense of 750M units": "CNN_AUDIT_MAX_PARAMETERS",
                "a 12000 x 12000 input": "CNN_AUDIT_MAX_INPUT_PIXELS",
                "an HDF5 weight declared 3.9 GiB": "CNN_AUDIT_MAX_WEIGHT_BYTES",
                "one 1 GiB dataset linked four times": "CNN_AUDIT_MAX_WEIGHT_BYTES",
                "a config nesting 100,000 arrays": "CNN_AUDIT_MAX_CONFIG_DEPTH"}
    for label, variable in expected.items():
        kind, message, seconds = report["results"][label]
        assert kind == "ModelFileError", (label, kind, message)
        assert variable in message, (label, message)
        assert seconds < 10, (label, seconds)
    assert report["peak"] < 2**30, report["peak"]


def test_archives_that_inflate_are_refused_from_their_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_AUDIT_MAX_WEIGHT_BYTES", str(20 * 2**20))
    tiny = _tiny(tmp_path)
    inflating = _rewrite(tiny, tmp_path / "inflate.keras", extra={"model.weights.h5": b"\0" * (40 * 2**20)})
    assert inflating.stat().st_size < 1_000_000
    with pytest.raises(ModelFileError, match="its members.: .* bytes of weights once unpacked"):
        check_model_file(inflating)
    assets = _rewrite(tiny, tmp_path / "assets.keras",
                      extra={f"assets/{i}.bin": b"\0" * (5 * 2**20) for i in range(12)})
    with pytest.raises(ModelFileError, match="CNN_AUDIT_MAX_WEIGHT_BYTES"):
        check_model_file(assets)
    monkeypatch.setenv("CNN_AUDIT_MAX_ARCHIVE_MEMBERS", "5")
    crowded = _rewrite(tiny, tmp_path / "crowded.keras", extra={f"assets/{i}": b"x" for i in range(10)})
    with pytest.raises(ModelFileError, match="13 files in the archive"):
        check_model_file(crowded)


def test_a_lookup_layer_reading_a_vocabulary_file_is_refused():
    from audit.errors import UnsafeModelError
    from audit.config_screen import scan_config

    config = {"class_name": "IndexLookup", "module": "keras.layers",
              "config": {"name": "lookup", "vocabulary": "/etc/passwd"}}
    with pytest.raises(UnsafeModelError, match="vocabulary from the file or address '/etc/passwd'"):
        scan_config(config)


def test_a_good_model_within_the_limits_still_loads(tmp_path):
    from audit import models

    path = _tiny(tmp_path)
    assert models.load(f"file:{path}").model.count_params() == 3 * 3 * 3 * 4 + 4 + 144 * 5 + 5
    assert np.isfinite(models.load(f"file:{path}").predict(np.zeros((1, 8, 8, 3), np.float32))).all()


def test_the_readme_lists_every_limit_with_its_default():
    from audit import limits

    readme = (ROOT / "README.md").read_text()
    for limit in limits.ALL:
        assert f"| `{limit.variable}` | {limit.default:,} |" in readme, limit.variable
