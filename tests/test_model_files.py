"""Untrusted model files are refused before any of their code runs; good files load in safe mode."""

import json
import zipfile

import h5py
import keras
import numpy as np
import pytest

from audit.errors import ModelFileError, UnsafeModelError
from audit.model_files import check_model_file, load_model_file, scan_config
from tests.fixtures import random_images, tiny_cnn


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
def test_lambda_layers_are_refused_before_their_code_runs(tmp_path, suffix):
    marker = tmp_path / "marker"
    path = tmp_path / f"lambda{suffix}"
    _lambda_model(marker).save(path)
    marker.unlink(missing_ok=True)  # building it ran the code once; loading must not
    with pytest.raises(UnsafeModelError, match="Lambda"):
        load_model_file(path)
    assert not marker.exists()


def test_a_lambda_hidden_in_a_nested_model_is_found(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "nested.keras"
    _lambda_model(marker, nested=True).save(path)
    marker.unlink(missing_ok=True)
    with pytest.raises(UnsafeModelError, match="inner/evil_lambda"):
        load_model_file(path)
    assert not marker.exists()


def _keras_zip(path, config):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        archive.writestr("config.json", json.dumps(config))
        archive.writestr("model.weights.h5", b"")


def test_a_config_naming_a_foreign_module_is_refused_and_nothing_runs(tmp_path):
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
    with pytest.raises(UnsafeModelError, match="'os'"):
        load_model_file(path)
    assert not marker.exists()
    with pytest.raises(UnsafeModelError, match="custom object"):
        scan_config({"class_name": "Dense", "module": "keras.layers", "registered_name": "mypkg>Evil",
                     "config": {"name": "d"}})
    with pytest.raises(UnsafeModelError, match="vocab.txt"):
        scan_config({"class_name": "StringLookup", "module": "keras.layers",
                     "config": {"name": "lookup", "vocabulary": "/etc/vocab.txt"}})


def test_a_savedmodel_directory_is_refused(tmp_path):
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


def test_hdf5_external_links_and_zip_traversal_are_refused(tmp_path):
    path = tmp_path / "linked.h5"
    tiny_cnn().save(path)
    with h5py.File(path, "a") as handle:
        handle["stolen"] = h5py.ExternalLink("/etc/secrets.h5", "/data")
    with pytest.raises(UnsafeModelError, match="external link"):
        check_model_file(path)
    archive = tmp_path / "traversal.keras"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("config.json", "{}")
        handle.writestr("../evil", b"x")
    with pytest.raises(UnsafeModelError, match="outside the archive"):
        check_model_file(archive)


@pytest.mark.parametrize("name", ["model.keras", "model.h5", "hdf5-named.keras"])
def test_good_models_round_trip_with_equal_predictions(tmp_path, name):
    model = tiny_cnn()
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
