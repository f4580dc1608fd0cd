"""Preprocessing from evidence: a trained model whose file does not say what it takes.

The demo shapes CNN was trained on [-1, 1] inputs and has no Rescaling layer: saved to a file and loaded back,
the loader can only assume [0, 1]. The candidates are weighed on labelled shapes: the one chosen must be the
one that gives the model the accuracy it was trained to, computed here by calling Keras on numpy inputs.
"""

from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from audit import cli, models
from audit.errors import AuditError
from audit.zoo import shapes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def unlabelled_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("evidence") / "shapes_without_rescaling.keras"
    models.load("demo:shapes").model.save(path)
    return models.load(f"file:{path}")


def test_with_labels_the_mode_chosen_is_the_one_the_model_was_trained_on(unlabelled_file):
    loaded = unlabelled_file
    assert loaded.preprocessing == "unit" and loaded.preprocessing_assumed
    data = shapes.generate(48, seed=11)
    table = models.preprocessing_evidence(loaded, list(data.images), data.labels)
    assert table.attrs["chosen"] == "tf" and table.attrs["images"] == 48
    rows = table.set_index("mode")
    assert list(rows.index) == ["unit", "tf", "caffe", "torch", "raw"]
    fed = data.images.astype(np.float32) / 127.5 - 1.0  # the training's own preprocessing, by hand
    expected = np.mean(np.asarray(loaded.model(fed)).argmax(axis=1) == data.labels)
    assert rows.loc["tf", "accuracy"] == pytest.approx(expected) and expected > 0.9
    assert rows.loc["unit", "accuracy"] < expected and rows.loc["tf", "low"] < expected <= rows.loc["tf", "high"]
    # coloured shapes on textures are easy: every centred or scaled input gets them all right, and the table says
    # the images cannot tell those modes apart (the mode trained with is kept first)
    assert table.attrs["tied"] == ["caffe", "torch", "raw"] and (rows.loc[["caffe", "torch", "raw"], "accuracy"] == 1).all()


def _threshold_model(tmp_path) -> models.LoadedModel:
    """A hand-weighted classifier saved without a word of its preprocessing: class 1 when the mean input value
    is above 0.25."""
    inputs = keras.Input((8, 8, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(1, 1, use_bias=False, name="mean")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="scores")(pooled))
    model.get_layer("mean").set_weights([np.full((1, 1, 3, 1), 1 / 3, np.float32)])
    model.get_layer("scores").set_weights([np.array([[-10.0, 10.0]], np.float32), np.array([2.5, -2.5], np.float32)])
    model.save(tmp_path / "threshold.keras")
    return models.load(f"file:{tmp_path / 'threshold.keras'}")


PIXELS = [np.full((8, 8, 3), value, np.uint8) for value in (200, 210, 140, 150, 30)]
"""Pixels of 200 are 0.57 in [-1, 1] (class 1); of 140, 0.10 (class 0), but 0.55 in [0, 1], 25 after caffe's
mean, 0.44 after torch's (class 1); of 30, 30 raw (class 1)."""


def test_the_only_mode_that_gives_the_accuracy_is_chosen(tmp_path):
    table = models.preprocessing_evidence(_threshold_model(tmp_path), PIXELS, np.array([1, 1, 0, 0, 0]))
    rows = table.set_index("mode")
    assert table.attrs["chosen"] == "tf" and table.attrs["tied"] == []
    # by hand: 140 and 150 go wrong under every other mode, 30 under raw too
    assert rows.accuracy.to_dict() == {"unit": 0.6, "tf": 1.0, "caffe": 0.6, "torch": 0.6, "raw": 0.4}
    # Wilson at 5 of 5: the low end is 1 / (1 + z^2 / n), the high end 1
    assert rows.loc["tf", "low"] == pytest.approx(1 / (1 + 1.96**2 / 5)) and rows.loc["tf", "high"] == 1.0


def test_without_labels_the_current_mode_stays_and_the_changes_are_counted(tmp_path):
    table = models.preprocessing_evidence(_threshold_model(tmp_path), PIXELS)
    assert table.attrs["chosen"] == "unit" and "accuracy" not in table
    # by hand, top-1 under unit 1 1 1 1 0; tf 1 1 0 0 0; raw 1 1 1 1 1; caffe and torch as unit
    assert table.set_index("mode").changed.to_dict() == {"unit": 0.0, "tf": 0.4, "caffe": 0.0, "torch": 0.0, "raw": 0.2}
    assert table.attrs["changed"] == 0.4


def test_a_model_without_classes_is_refused_in_a_sentence():
    with pytest.raises(AuditError, match="needs a class output"):
        models.preprocessing_evidence(models.load("demo:vgg16"), [np.zeros((8, 8, 3), np.uint8)])


def test_every_command_takes_the_preprocessing(unlabelled_file, tmp_path):
    parser = cli.parser()
    for command in ("report", "stats", "scores", "examples", "prune", "check"):
        extra = {"report": ["--out", "x.html"], "prune": ["--out", "x.keras"], "examples": ["--layer", "c"]}.get(command, [])
        images = [] if command == "check" else ["--images", "shapes:4"]
        args = parser.parse_args([command, "--model", "demo:shapes", *images, "--preprocessing", "tf", *extra])
        assert args.preprocessing == "tf"
    tables = {}
    for name, model, asked in (("demo", "demo:shapes", []), ("file_tf", unlabelled_file.source, ["--preprocessing", "tf"]),
                               ("file", unlabelled_file.source, [])):
        out = tmp_path / f"{name}.csv"
        assert cli.main(["stats", "--model", model, "--images", "shapes:6", "--layers", "block1_conv2", "--quiet",
                         "--csv", str(out), *asked]) == 0
        tables[name] = pd.read_csv(out)
    # the demo's own default is [-1, 1]: the file told so by --preprocessing gives its numbers, the guess others
    np.testing.assert_allclose(tables["file_tf"]["mean"], tables["demo"]["mean"], rtol=1e-5)
    assert not np.allclose(tables["file"]["mean"], tables["demo"]["mean"], rtol=1e-2)


def test_the_model_page_offers_the_mode_the_labels_choose_and_uses_it(tmp_path):
    """The threshold model uploaded with a zip of labelled images (folder 1: bright, folder 0: mid-grey and dark):
    the Model page weighs the candidates by itself (5 x 20 images is within a link's budget), offers [-1, 1],
    and its button makes it the sidebar's preprocessing; weighed again, it is kept."""
    import io
    import zipfile

    from PIL import Image
    from streamlit.testing.v1 import AppTest

    from audit import storage

    loaded = _threshold_model(tmp_path)
    digest = storage.save_upload((tmp_path / "threshold.keras").read_bytes(), "models", "threshold.keras")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index, value in enumerate([200, 205, 210, 215, 220, 225, 230, 235] + [140, 145, 150, 155, 158] * 2
                                      + [20, 30]):
            png = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(png, format="PNG")
            archive.writestr(f"{int(value > 180)}/{index}.png", png.getvalue())
    images_digest = storage.save_upload(buffer.getvalue(), "images", "grey.zip")
    assert loaded.preprocessing_assumed
    at = AppTest.from_file(str(ROOT / "dashboard.py"), default_timeout=180)
    for key, value in {"model": f"upload:{digest}", "images": "upload", "uploads": images_digest}.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, at.exception
    warnings = [warning.value for warning in at.warning]
    assert any(text.startswith("**tf** gives the best accuracy on 20 images") and "100.0%" in text
               for text in warnings), warnings
    at.button(key="preprocessing_use").click().run()
    assert not at.exception, at.exception
    assert any("tf gives the best accuracy on 20 images" in caption.value and "kept" in caption.value
               for caption in at.caption), [caption.value for caption in at.caption]
