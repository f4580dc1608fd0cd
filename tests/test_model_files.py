"""Untrusted model files are refused before any of their code runs; good files load in safe mode."""

import json
import zipfile

import h5py
import keras
import numpy as np
import pytest

from audit.errors import ModelFileError, UnsafeModelError
from audit.config_screen import scan_config
from audit.model_files import check_model_file, load_model_file
from tests.fixtures import nested_cnn, random_images, tiny_cnn


@pytest.fixture
def keras_never_sees_it(monkeypatch):
    """Refusals must come from our screen, before Keras opens the file at all."""

    def must_not_load(*args, **kwargs):
        raise AssertionError("keras.saving.load_model was called on a file that should be refused")

    monkeypatch.setattr(keras.saving, "load_model", must_not_load)


def _lambda_model(marker, nested=False):
    """A model whose Lambda layer would write `marker` if its code ever ran."""

    def side_effect(x):
        open(marker, "w").write("ran")  # noqa: SIM115
        return x

    inputs = keras.Input((8, 8, 3))
    lam = keras.layers.Lambda(side_effect, name="evil_lambda")
    if nested:
        inner = keras.Sequential([keras.Input((8, 8, 3)), lam, keras.layers.Conv2D(2, 3)], name="inner")
        return keras.Model(inputs, inner(inputs), name="outer")
    return keras.Model(inputs, keras.layers.Conv2D(2, 3)(lam(inputs)))


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_lambda_layers_are_refused_before_their_code_runs(tmp_path, keras_never_sees_it, suffix):
    marker = tmp_path / "marker"
    path = tmp_path / f"lambda{suffix}"
    keras.saving.save_model(_lambda_model(marker), path)
    assert marker.exists()  # building it ran the code once ...
    marker.unlink()  # ... loading must not
    with pytest.raises(UnsafeModelError, match="Lambda"):
        load_model_file(path)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_a_lambda_hidden_in_a_nested_model_is_found(tmp_path, keras_never_sees_it, suffix):
    marker = tmp_path / "marker"
    path = tmp_path / f"nested{suffix}"
    keras.saving.save_model(_lambda_model(marker, nested=True), path)
    marker.unlink(missing_ok=True)
    with pytest.raises(UnsafeModelError, match="layer 'outer/inner/evil_lambda' is a Lambda"):
        load_model_file(path)
    assert not marker.exists()


def _keras_zip(path, config):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        archive.writestr("config.json", json.dumps(config))
        archive.writestr("model.weights.h5", b"")


def test_a_config_naming_a_foreign_module_is_refused_and_nothing_runs(tmp_path, keras_never_sees_it):
    marker = tmp_path / "pwned"
    config = {
        "module": "keras", "class_name": "Sequential", "registered_name": None,
        "config": {"name": "s", "layers": [{
            "module": "os", "class_name": "system", "registered_name": None,
            "config": {"name": "x", "command": f"touch {marker}"},
        }]},
    }
    path = tmp_path / "foreign.keras"
    _keras_zip(path, config)
    with pytest.raises(UnsafeModelError, match="layer 's/x' names the module 'os'"):
        load_model_file(path)
    assert not marker.exists()


def test_keras_helpers_that_fetch_or_read_files_are_refused(tmp_path, keras_never_sees_it):
    """CVE-2025-8747 style: a config naming keras.utils.get_file would download on load."""
    marker = tmp_path / "downloaded"
    source = tmp_path / "payload.txt"
    source.write_text("payload")
    config = {"module": "keras.utils", "class_name": "get_file", "registered_name": None,
              "config": {"fname": str(marker), "origin": source.as_uri()}}
    path = tmp_path / "get_file.keras"
    _keras_zip(path, config)
    with pytest.raises(UnsafeModelError, match="keras.utils.get_file") as refused:
        load_model_file(path)
    assert "web address 'file://" in str(refused.value)
    assert not marker.exists()
    for bad in [
        {"module": "keras", "class_name": "utils.get_file", "config": {}},  # dotted: keras joins names
        {"module": "keras.src.utils.file_utils", "class_name": "get_file", "config": {}},
        {"module": "keras.models", "class_name": "function", "config": "load_model"},
        {"module": "keras.config", "class_name": "function", "config": "enable_unsafe_deserialization"},
        {"module": "builtins", "class_name": "function", "config": "eval"},
        {"module": "keras_hub.src.models", "class_name": "Backbone", "config": {}},
        {"module": "keras.layers", "class_name": "TFSMLayer", "config": {"name": "t"}},
        {"module": "keras.layers", "class_name": "TorchModuleWrapper", "config": {"name": "t"}},
    ]:
        with pytest.raises(UnsafeModelError):
            scan_config(bad)
    scan_config({"module": "builtins", "class_name": "function", "config": "relu",
                 "registered_name": "function"})  # how Keras saves its own functions


def test_every_problem_is_listed_with_its_place():
    config = {"module": "keras.src.models.functional", "class_name": "Functional", "config": {
        "name": "base", "layers": [
            {"module": "keras.layers", "class_name": "Lambda", "config": {
                "name": "lambda_1", "function": {"class_name": "__lambda__", "config": {"code": "AAA"}}}},
            {"module": "keras.layers", "class_name": "Dense", "config": {
                "name": "dense", "kernel_initializer": {"module": "subprocess", "class_name": "Popen",
                                                        "config": {}}}},
            {"module": "keras.layers", "class_name": "TFSMLayer", "config": {
                "name": "sm", "filepath": "gs://bucket/model"}},
            {"module": "keras.src.models.sequential", "class_name": "Sequential", "config": {
                "name": "head", "layers": [{"module": "keras.layers", "class_name": "StringLookup",
                                            "config": {"name": "lookup", "vocabulary": "/etc/vocab.txt"}}]},
             # Keras compiles nested models from their own compile_config even with compile=False.
             "compile_config": {"loss": {"module": "mylib.losses", "class_name": "function",
                                         "config": "focal", "registered_name": "mylib>focal"}}},
        ]}}
    with pytest.raises(UnsafeModelError) as refused:
        scan_config(config)
    message = str(refused.value)
    for expected in ["layer 'base/lambda_1' is a Lambda", "layer 'base/lambda_1' (function) is a __lambda__",
                     "layer 'base/dense' (kernel_initializer) names the module 'subprocess'",
                     "layer 'base/sm' is a TFSMLayer", "layer 'base/sm' names a file or address in 'filepath'",
                     "web address 'gs://bucket/model'", "layer 'base/head/lookup' (StringLookup) would read",
                     "layer 'base/head' (loss) names the module 'mylib.losses'", "custom object 'mylib>focal'"]:
        assert expected in message, expected
    with pytest.raises(UnsafeModelError, match="custom object"):
        scan_config({"class_name": "Dense", "module": "keras.layers", "registered_name": "mypkg>Evil",
                     "config": {"name": "d"}})


def test_a_savedmodel_directory_is_refused(tmp_path, keras_never_sees_it):
    model = tiny_cnn()
    folder = tmp_path / "saved"
    model.export(folder)
    assert (folder / "saved_model.pb").exists()
    with pytest.raises(UnsafeModelError, match="SavedModel"):
        load_model_file(folder)


def test_truncated_and_non_model_files_raise_the_typed_error(tmp_path):
    good = tmp_path / "good.keras"
    tiny_cnn().save(good)
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        load_model_file(truncated)
    text = tmp_path / "notes.h5"
    text.write_text("just some text, renamed")
    with pytest.raises(ModelFileError, match="not a Keras model file"):
        load_model_file(text)
    weights_only = tmp_path / "only.weights.h5"
    tiny_cnn().save_weights(weights_only)
    with pytest.raises(ModelFileError, match="weights only"):
        load_model_file(weights_only)
    with pytest.raises(ModelFileError, match="No model file"):
        load_model_file(tmp_path / "missing.keras")
    no_config = tmp_path / "no_config.keras"
    with zipfile.ZipFile(no_config, "w") as handle:
        handle.writestr("metadata.json", "{}")
    with pytest.raises(ModelFileError, match="no config.json"):
        load_model_file(no_config)
    bad_json = tmp_path / "bad_json.keras"
    with zipfile.ZipFile(bad_json, "w") as handle:
        handle.writestr("config.json", "{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_model_file(bad_json)


def test_hdf5_external_links_and_zip_traversal_are_refused(tmp_path):
    path = tmp_path / "linked.h5"
    tiny_cnn().save(path)
    with h5py.File(path, "a") as handle:
        handle["stolen"] = h5py.ExternalLink("/etc/secrets.h5", "/data")
    with pytest.raises(UnsafeModelError, match="external link"):
        check_model_file(path)

    raw = tmp_path / "raw.bin"
    raw.write_bytes(bytes(16))
    for kind in ["external", "virtual"]:
        path = tmp_path / f"{kind}.h5"
        tiny_cnn().save(path)
        with h5py.File(path, "a") as handle:
            if kind == "external":
                handle.create_dataset("outside", shape=(4,), dtype="f4", external=[(str(raw), 0, 16)])
            else:
                layout = h5py.VirtualLayout(shape=(4,), dtype="f4")
                layout[:] = h5py.VirtualSource(str(tmp_path / "other.h5"), "data", shape=(4,))
                handle.create_virtual_dataset("virtual", layout)
        with pytest.raises(UnsafeModelError, match="other files"):
            check_model_file(path)

    cyclic = tmp_path / "cyclic.h5"  # hard links may loop; the walk must still end
    tiny_cnn().save(cyclic)
    with h5py.File(cyclic, "a") as handle:
        handle["model_weights/loop"] = handle["model_weights"]
    assert check_model_file(cyclic) == "h5"

    good = tmp_path / "good.keras"  # the weights inside a .keras are HDF5 too
    tiny_cnn().save(good)
    with zipfile.ZipFile(good) as handle:
        members = {name: handle.read(name) for name in handle.namelist()}
    weights = tmp_path / "model.weights.h5"
    weights.write_bytes(members["model.weights.h5"])
    with h5py.File(weights, "a") as handle:
        handle["stolen"] = h5py.ExternalLink("/etc/secrets.h5", "/data")
    members["model.weights.h5"] = weights.read_bytes()
    linked = tmp_path / "linked.keras"
    with zipfile.ZipFile(linked, "w") as handle:
        for name, data in members.items():
            handle.writestr(name, data)
    with pytest.raises(UnsafeModelError, match=r"model.weights.h5.*external link"):
        check_model_file(linked)

    archive = tmp_path / "traversal.keras"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("config.json", "{}")
        handle.writestr("../evil", b"x")
    with pytest.raises(UnsafeModelError, match="outside the archive"):
        check_model_file(archive)


@pytest.mark.parametrize("name", ["model.keras", "model.h5", "hdf5-named.keras", "nested.keras"])
def test_good_models_round_trip_with_equal_predictions(tmp_path, name):
    model = nested_cnn() if name.startswith("nested") else tiny_cnn()
    # A loss passed as a function is saved as {"module": "builtins", "class_name": "function"}.
    model.compile(optimizer="adam", loss=keras.losses.sparse_categorical_crossentropy, metrics=["accuracy"])
    path = tmp_path / name
    keras.saving.save_model(model, path.with_suffix(".h5") if name.startswith("hdf5") else path)
    if name.startswith("hdf5"):  # an HDF5 file with a .keras name: the magic bytes decide
        path.with_suffix(".h5").rename(path)
        assert check_model_file(path) == "h5"
    x = random_images(3)
    np.testing.assert_allclose(load_model_file(path)(x), model(x), rtol=1e-6)


def test_standard_architectures_pass_the_screen():
    mobilenet = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3))
    scan_config(json.loads(json.dumps(keras.saving.serialize_keras_object(mobilenet))))
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("relu")(x)
    y = keras.layers.Conv2D(4, 1)(x)
    x = keras.layers.Concatenate()([keras.layers.Add()([x, y]), x])
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.Dropout(0.2)(x)))
    scan_config(json.loads(json.dumps(keras.saving.serialize_keras_object(model))))
