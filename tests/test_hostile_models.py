"""A shared server that no small file can take down: crafted files of kilobytes that would cost gigabytes or
hours, or that lie about what they are, are refused with a sentence; the process that opens them survives.

Each file is generated here (never committed) and opened through models.load in a child process, as a server
would (which tries every new file in a capped grandchild: audit.trial), and through a link in AppTest.
"""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import keras
from streamlit.testing.v1 import AppTest

from audit import storage
from tests.fixtures import LOAD_IN_A_CHILD

ROOT = Path(__file__).resolve().parents[1]


def _rewrite(model: keras.Model, path: Path, change) -> Path:
    """The model saved to `path` with its config.json changed (and weights dropped when `change` says so)."""
    model.save(path.with_suffix(".source.keras"))
    with zipfile.ZipFile(path.with_suffix(".source.keras")) as archive, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        for name in archive.namelist():
            data = archive.read(name)
            if name == "config.json":
                config = json.loads(data)
                change(config)
                data = json.dumps(config).encode()
            out.writestr(name, data)
    path.with_suffix(".source.keras").unlink()
    return path


def _activation(function: dict):
    def change(config):
        config["config"]["layers"][-1]["config"]["activation"] = function
    return change


def _hostile(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """label -> (file, what the refusal must say)."""
    files = {}
    wide = keras.Sequential([keras.Input((2048, 2048, 3)), keras.layers.Conv2D(512, 1),
                             keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
    wide.save(tmp_path / "wide.keras")
    files["a 512-filter 1x1 conv at 2048 x 2048"] = (tmp_path / "wide.keras", "CNN_AUDIT_MAX_ACTIVATION_BYTES")
    upsampling = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.UpSampling2D((1000, 1000)),
                                   keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
    upsampling.save(tmp_path / "upsampling.keras")
    files["UpSampling2D((1000, 1000))"] = (tmp_path / "upsampling.keras", "CNN_AUDIT_MAX_ACTIVATION_BYTES")
    slow = keras.Sequential([keras.Input((2048, 2048, 3)), keras.layers.Conv2D(8, 31, padding="same"),
                             keras.layers.Conv2D(8, 31, padding="same"), keras.layers.GlobalAveragePooling2D(),
                             keras.layers.Dense(2)])
    slow.save(tmp_path / "slow.keras")
    files["two 31x31 convs at 2048 x 2048"] = (tmp_path / "slow.keras", "CNN_AUDIT_MAX_MACS")

    def unbuilt_dense(config):  # a Flatten of 12,288 values into 270,000 units: 3.3e9 parameters, 13 GB
        dense = config["config"]["layers"][-1]
        dense["config"]["units"] = 270_000
        dense.pop("build_config", None)
    small = keras.Sequential([keras.Input((64, 64, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    files["a Dense without build_config asking 13 GB"] = (_rewrite(small, tmp_path / "dense.keras", unbuilt_dense),
                                                           "memory")

    def lstm(config):
        config["config"]["layers"][-1] = {"module": "keras.layers", "class_name": "LSTM", "config": {
            "name": "lstm", "units": 30_000}, "registered_name": None}
    files["an LSTM of 30,000 units"] = (_rewrite(small, tmp_path / "lstm.keras", lstm), "not a layer of an image CNN")

    def many(config):
        relu = {"module": "keras.layers", "class_name": "ReLU", "config": {"name": "r"}, "registered_name": None}
        config["config"]["layers"][2:2] = [{**relu, "config": {"name": f"r{i}"}} for i in range(200_000)]
    files["200,000 layers"] = (_rewrite(small, tmp_path / "many.keras", many), "CNN_AUDIT_MAX_LAYERS")
    files["keras.random.shuffle as an activation"] = (_rewrite(small, tmp_path / "shuffle.keras", _activation(
        {"module": "keras.random", "class_name": "function", "config": "shuffle", "registered_name": "function"})),
        "not one of keras.activations")
    files["keras.ops.cond as an activation"] = (_rewrite(small, tmp_path / "cond.keras", _activation(
        {"module": "keras.ops", "class_name": "function", "config": "cond", "registered_name": "function"})),
        "not one of keras.activations")
    legacy = tmp_path / "deserialize.h5"
    with h5py.File(legacy, "w") as handle:
        handle.attrs["model_config"] = json.dumps({"class_name": "Sequential", "config": {"name": "s", "layers": [
            {"class_name": "InputLayer", "config": {"batch_shape": [None, 8, 8, 3], "name": "in"}},
            {"class_name": "deserialize", "config": {"name": "x"}}]}})
        handle.create_group("model_weights")
    files["a legacy .h5 whose class is the function 'deserialize'"] = (legacy, "not a layer of an image CNN")
    return files




def test_small_hostile_files_are_refused_with_a_sentence_and_bounded_memory(tmp_path):
    files = _hostile(tmp_path)
    assert all(path.stat().st_size < 2_000_000 for path, _ in files.values()), "kilobytes each"
    run = subprocess.run([sys.executable, "-c", LOAD_IN_A_CHILD, json.dumps({k: str(p) for k, (p, _) in files.items()})],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]  # the process that opened them is alive
    report = json.loads(run.stdout.strip().splitlines()[-1])
    for label, (_, said) in files.items():
        kind, message, seconds = report["results"][label]
        assert kind in ("ModelFileError", "UnsafeModelError"), (label, kind, message)
        assert said in message, (label, message)
        assert seconds < 30, (label, seconds)
    assert report["peak"] < 2 * 2**30 and report["trial_peak"] < 2 * 2**30, report


def test_a_link_to_a_hostile_upload_shows_the_refusal_and_the_app_goes_on(tmp_path):
    for label, (path, said) in _hostile(tmp_path).items():
        digest = storage.save_upload(path.read_bytes(), "models", path.name)
        at = AppTest.from_file(str(ROOT / "dashboard.py"), default_timeout=120)
        at.query_params["model"] = f"upload:{digest}"
        at.run()
        assert not at.exception, (label, at.exception)
        shown = " ".join(e.value for e in at.error)
        assert said in shown and path.name in shown, (label, shown)


def _text_elements(at) -> list[str]:
    """The markdown source of everything Streamlit renders as markdown on the page (and the sidebar)."""
    found = []
    for kind in ("markdown", "caption", "error", "warning", "info", "success", "title", "header", "subheader"):
        found += [element.value for element in getattr(at, kind)]
    found += [element.value for element in at.sidebar.markdown]
    return [str(text) for text in found]


def test_hostile_names_are_escaped_on_every_page(tmp_path):
    """File, member, class, layer and model names reach the pages as text: a name that is a markdown image (or
    HTML) must not make every viewer's browser fetch an address, and a model named with spaces works."""
    import io

    import numpy as np
    from PIL import Image

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv![l](x)")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="head")(x),
                        name="my model ![n](x)")  # not a TensorFlow scope name: sub-models are named after it
    model.save(tmp_path / "m.keras")
    hostile = "![m](http://host/m.png)<img src=x>.keras"
    model_digest = storage.save_upload((tmp_path / "m.keras").read_bytes(), "models", hostile)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        # two class folders, "![c](evil)" and "host" (the member below lies in host/ once split at its slashes)
        for index, member in enumerate(["![c](evil)/a.png", "host/b.png", "![t](http://host/track.png).png",
                                        "host/broken.png"]):
            png = io.BytesIO()
            Image.fromarray(np.full((32, 32, 3), 40 * index, np.uint8)).save(png, format="PNG")
            archive.writestr(member, png.getvalue() if "broken" not in member else b"not an image")
    images_digest = storage.save_upload(buffer.getvalue(), "images", "![z](http://host/z.png).zip")
    unescaped = __import__("re").compile(r"(?<!\\)!(?<!\\)\[|(?<!\\)<img")
    for page in ("pages/model.py", "pages/activations.py", "pages/filters.py", "pages/attribution.py",
                 "pages/pruning.py", "pages/report.py"):
        at = AppTest.from_file(str(ROOT / "dashboard.py"), default_timeout=180)
        for key, value in {"model": f"upload:{model_digest}", "images": "upload", "uploads": images_digest,
                           "image": "![t](http://host/track.png).png", "layer": "conv![l](x)",
                           "criterion": "l1"}.items():
            at.query_params[key] = value
        at.run()
        if page != "pages/model.py":
            at.switch_page(page).run()
        assert not at.exception, (page, at.exception)
        texts = _text_elements(at)
        assert not [text for text in texts if "bug of CNN Audit" in text], (page, texts)
        if page in ("pages/model.py", "pages/attribution.py"):  # the model's name, a class's name are shown
            assert any("\\<img" in text or "\\!\\[" in text for text in texts), (page, texts)
        bad = [text for text in texts if unescaped.search(text)]
        assert not bad, (page, bad)


def test_a_huge_head_offers_its_most_likely_classes_not_every_class(tmp_path):
    """A million-class head made the class picker list every class (the browser's RangeError); Dense(200,000) on
    2 pooled features shows the rule at a fifth of the cost: the 1,000 most likely are offered, the top-1 first."""
    import numpy as np

    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(2, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(200_000, activation="softmax", name="head")(x))
    model.save(tmp_path / "m.keras")
    digest = storage.save_upload((tmp_path / "m.keras").read_bytes(), "models", "million.keras")
    at = AppTest.from_file(str(ROOT / "dashboard.py"), default_timeout=180)
    at.query_params["model"] = f"upload:{digest}"
    at.query_params["image"] = "chelsea"
    at.query_params["methods"] = "Saliency"
    at.run()
    at.switch_page("pages/attribution.py").run()
    assert not at.exception, at.exception
    picker = next(box for box in at.selectbox if box.label == "Target class")
    assert len(picker.options) == 1000
    probabilities = at.dataframe[0].value["probability"].to_numpy()
    assert f"class {picker.value}" == at.dataframe[0].value["class"][0] and np.all(np.diff(probabilities) <= 0)
    assert any("1,000 most likely of 200,000 classes" in caption.value for caption in at.caption)
