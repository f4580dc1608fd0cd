"""Advice that holds on the models users bring: samples that represent the set, a model at chance said so,
and one answer for the Pruning page, the report and the command line."""

import io
import re
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from audit import cli, images, models, pruning, storage
from audit.zoo import shapes
from tests.fixtures import open_page, random_images, tiny_cnn


def test_the_wilson_interval_equals_the_formula_on_paper():
    # Wilson 1927 for 8 of 10: (2np + z^2 -+ z sqrt(z^2 + 4np(1-p))) / (2(n + z^2)) = 0.4902 and 0.9433
    low, high = pruning.wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert pruning.wilson_interval(0, 5)[0] == 0.0 and pruning.wilson_interval(5, 5)[1] == 1.0


def test_a_random_weight_classifier_is_at_chance_and_the_trained_demo_is_not():
    labels = np.repeat(np.arange(3), 10)
    model = tiny_cnn(classes=3, seed=4)  # random weights
    found = pruning.accuracy(model, random_images(30, seed=7), labels)
    assert found["at_chance"] and found["chance"] == pytest.approx(1 / 3)
    assert found["low"] <= found["accuracy"] <= found["high"]
    loaded = models.load("demo:shapes")
    data = shapes.generate(60, 3)
    trained = pruning.accuracy(loaded.model, loaded.preprocess(list(data.images)), data.labels)
    assert not trained["at_chance"] and trained["low"] > trained["chance"]
    # without labels: flat outputs are at chance, confident ones are not
    flat = pruning.knowledge(np.full((4, 2), 0.5))
    assert flat["at_chance"] and flat["entropy"] == pytest.approx(1.0) and np.isnan(flat["accuracy"])
    assert not pruning.knowledge(np.tile([[0.99, 0.01]], (4, 1)))["at_chance"]


def test_stratified_samples_are_balanced_seeded_and_grow_by_prefix():
    labels = ["cat"] * 30 + ["dog"] * 6 + ["fox"] * 12
    drawn = images.stratified(labels, 9, seed=3)
    assert images.per_class(labels, drawn) == {"cat": 3, "dog": 3, "fox": 3}
    assert len(set(drawn)) == 9
    np.testing.assert_array_equal(drawn, images.stratified(labels, 9, seed=3))
    assert not np.array_equal(drawn, images.stratified(labels, 9, seed=4))
    np.testing.assert_array_equal(images.stratified(labels, 20, seed=3)[:9], drawn)  # a bigger sample keeps it
    # as far as the set allows: dog runs out at 6, the others share the rest within one image
    assert images.per_class(labels, images.stratified(labels, 30, seed=0)) == {"cat": 12, "dog": 6, "fox": 12}
    assert images.describe_sample(labels, drawn) == "9 images, 3 per class (3 classes)"
    assert images.balanced_count(10, labels) == 9 and images.balanced_count(2, labels) == 2
    assert images.describe_sample([None] * 4, range(4)) == "4 images (no labels)"


def test_sweeps_measure_every_class_not_the_first_folder():
    loaded = models.load("demo:shapes")
    data = shapes.generate(24, 5)
    order = np.argsort(data.labels, kind="stable")  # sorted by class, as a zip of class folders is read
    labels = data.labels[order]
    chosen = images.stratified(labels, 4, seed=0)
    assert len(set(labels[chosen])) == 4  # the first four images would all be one class
    assert len(set(labels[:4])) == 1
    x = loaded.preprocess([data.images[i] for i in order[chosen]])
    scores = pruning.filter_scores(loaded.model, x, labels[chosen])
    curves = pruning.sensitivity(loaded.model, scores[scores.layer == "block3_conv2"], "l1", x, labels[chosen],
                                 fractions=[0.0])
    assert curves.accuracy.item() == pytest.approx(np.mean(
        loaded.predict(x).argmax(1) == labels[chosen]))


def _flat_upload() -> str:
    """A two-class model that says 0.5 / 0.5 for every image (zero weights in its head), uploaded."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255),
                              keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
                              keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(2, activation="softmax", kernel_initializer="zeros", name="head")])
    folder = Path(storage.data_dir()) / "scratch"
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "flat.keras")
    return storage.save_upload((folder / "flat.keras").read_bytes(), "models", "flat.keras")


def _class_zip() -> str:
    """A zip of two class folders, 6 images each, the first folder read first."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for label in ("bright", "dark"):
            for index in range(6):
                pixels = rng.integers(150, 255, (32, 32, 3)) if label == "bright" else rng.integers(0, 100, (32, 32, 3))
                png = io.BytesIO()
                Image.fromarray(pixels.astype(np.uint8)).save(png, format="PNG")
                archive.writestr(f"{label}/{index}.png", png.getvalue())
    return storage.save_upload(buffer.getvalue(), "images", "classes.zip")


def _app(page: str, **query):
    return open_page(page, query)


def test_an_upload_at_chance_is_said_so_before_its_explanations_and_sweeps_see_both_classes():
    link = {"model": f"upload:{_flat_upload()}", "images": "upload", "uploads": _class_zip()}
    model_page = _app("pages/model.py", **link)
    assert any(m.label == "Accuracy on the images" for m in model_page.metric)
    assert any("95% interval" in c.value and "6 per class (2 classes)" in c.value for c in model_page.caption)
    for page in ("pages/model.py", "pages/attribution.py", "pages/pruning.py"):
        at = model_page if page == "pages/model.py" else _app(page, **link)
        warnings = [w.value for w in at.warning if "at chance" in w.value]
        assert len(warnings) == 1, (page, [w.value for w in at.warning])
    pruning_page = _app("pages/pruning.py", **link, criterion="l1", share="0.5", sweep_images="4")
    assert any(c.value == "The sweeps measure on 4 images, 2 per class (2 classes)." for c in pruning_page.caption)


def test_the_report_lists_the_candidates_the_pruning_page_lists_for_the_same_link():
    from pages import jobs

    link = {"count": "12", "criterion": "l1", "share": "0.5"}
    page = _app("pages/pruning.py", **link)
    shown = int(re.match(r"(\d+) candidates of", page.subheader[0].value).group(1))
    _app("pages/report.py", **link, report="1", report_steps="1", report_filters="1", report_images="1")
    store, _ = jobs._results()
    reports = [value for value in store.values() if isinstance(value, str) and "<h2>Pruning candidates</h2>" in value]
    listed = int(re.search(r"<h2>Pruning candidates</h2><p>(\d+) of", reports[-1]).group(1))
    assert listed == shown == 224  # half of each of the demo's six layers (448 filters)


def test_the_command_line_fine_tunes_from_class_folders(tmp_path, capsys):
    model = tmp_path / "flat.keras"
    model.write_bytes(storage.upload_path("models", _flat_upload()).read_bytes())
    archive = tmp_path / "classes.zip"
    archive.write_bytes(storage.upload_path("images", _class_zip()).read_bytes())
    out = tmp_path / "pruned.keras"
    code = cli.main(["prune", "--model", str(model), "--images", str(archive), "--share", "0.5", "--fine-tune", "1",
                     "--out", str(out), "--quiet"])
    assert code == 0 and out.exists()
    assert keras.saving.load_model(out).get_layer("conv").filters == 2
    printed = capsys.readouterr().out
    assert "random ranking, same size, fine-tuned" in printed and "stopped after" in printed or "ran all 1" in printed
    saved = next(line for line in printed.splitlines() if line.startswith("Saved: "))
    assert saved.endswith("the best held-out accuracy. Per class on the 3 held-out images:")  # a quarter of 12
    assert "bright" in printed and "dark" in printed and "changed their answer" in printed
