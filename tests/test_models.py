import keras
import numpy as np
import pandas as pd
import pytest

from audit import models, sources
from audit.errors import (
    NotAnImageModelError,
    UnknownLayerError,
    UnknownSourceError,
    WeightsUnavailableError,
)
from tests.fixtures import nested_cnn, random_images, tiny_cnn

# keras.applications.VGG16(include_top=False) at 224x224: (layer, output shape, parameters).
VGG16_CONV_BASE = [
    ("block1_conv1", (None, 224, 224, 64), 1_792), ("block1_conv2", (None, 224, 224, 64), 36_928),
    ("block1_pool", (None, 112, 112, 64), 0),
    ("block2_conv1", (None, 112, 112, 128), 73_856), ("block2_conv2", (None, 112, 112, 128), 147_584),
    ("block2_pool", (None, 56, 56, 128), 0),
    ("block3_conv1", (None, 56, 56, 256), 295_168), ("block3_conv2", (None, 56, 56, 256), 590_080),
    ("block3_conv3", (None, 56, 56, 256), 590_080), ("block3_pool", (None, 28, 28, 256), 0),
    ("block4_conv1", (None, 28, 28, 512), 1_180_160), ("block4_conv2", (None, 28, 28, 512), 2_359_808),
    ("block4_conv3", (None, 28, 28, 512), 2_359_808), ("block4_pool", (None, 14, 14, 512), 0),
    ("block5_conv1", (None, 14, 14, 512), 2_359_808), ("block5_conv2", (None, 14, 14, 512), 2_359_808),
    ("block5_conv3", (None, 14, 14, 512), 2_359_808), ("block5_pool", (None, 7, 7, 512), 0),
]


@pytest.fixture(scope="module")
def vgg16():
    return models.load("demo:vgg16")


def test_vgg16_layer_table_matches_known_shapes_and_parameters(vgg16):
    table = models.layer_table(vgg16.model).set_index("name")
    for name, shape, params in VGG16_CONV_BASE:
        assert table.loc[name, "output_shape"] == shape, name
        assert table.loc[name, "params"] == params, name
    assert table.params.sum() == 14_714_688
    assert list(table.index[table.is_conv]) == [n for n, _, _ in VGG16_CONV_BASE if "conv" in n]
    conv = table.loc["block3_conv2"]
    assert (conv.filters, conv.kernel_size, conv.strides, conv.padding, conv.activation) == (
        256, (3, 3), (1, 1), "same", "relu")
    assert table.loc["block2_pool", "kernel_size"] == (2, 2)


def test_vgg16_carries_the_hed_weights_not_random_ones(vgg16):
    import h5py

    with h5py.File(sources.hed_weights_path()) as weights:
        expected = weights["block5/layers/conv2d_2/vars/0"][()]
    np.testing.assert_array_equal(vgg16.model.get_layer("block5_conv3").get_weights()[0], expected)
    assert vgg16.class_names is None and vgg16.preprocessing == "caffe_bsds"
    assert "BSDS500" in vgg16.description and "edge" in vgg16.description


def test_fingerprint_is_stable_and_differs_between_models(vgg16):
    again = models.load("demo:vgg16")
    shapes = models.load("demo:shapes")
    gap = models.load("demo:shapes-gap")
    assert again.fingerprint == vgg16.fingerprint
    assert len({shapes.fingerprint, gap.fingerprint, vgg16.fingerprint}) == 3
    assert gap.class_names == shapes.class_names and gap.source == "demo:shapes-gap"
    assert "GlobalAveragePooling2D" in set(models.layer_table(gap.model).type)
    assert len(vgg16.fingerprint) == 16


def test_nested_models_are_flattened_with_their_path():
    model = nested_cnn()
    table = models.layer_table(model)
    assert list(table.path) == ["base", "base/image", "base/conv1", "base/pool1", "base/conv2", "gap", "head"]
    assert list(table.depth) == [0, 1, 1, 1, 1, 0, 0]
    assert table.loc[table.path == "base", "is_container"].item()
    leaves = table[~table.is_container]
    assert leaves.params.sum() == model.count_params() == (3 * 9 * 4 + 4) + (4 * 9 * 8 + 8) + (8 * 2 + 2)
    assert models.conv_layers(model) == ["base/conv1", "base/conv2"]
    assert table.loc[table.path == "base/conv2", "output_shape"].item() == (None, 3, 3, 8)


def test_submodel_equals_the_full_models_intermediate_output():
    model = tiny_cnn()
    x = random_images()
    cut = models.submodel(model, "conv2")
    reference = keras.Model(model.inputs[0], model.get_layer("conv2").output)(x)
    np.testing.assert_allclose(cut(x), reference, rtol=1e-6)
    # nothing past conv2 is in the sub-model
    assert [layer.name for layer in cut.layers][-1] == "conv2"
    assert "predictions" not in [layer.name for layer in cut.layers]


def test_submodel_reaches_inside_nested_models():
    model = nested_cnn()
    x = random_images(3)
    conv1, head = models.submodel(model, ["conv1", "head"])(x)
    base = model.get_layer("base")
    np.testing.assert_allclose(conv1, keras.Model(base.inputs[0], base.get_layer("conv1").output)(x), rtol=1e-6)
    np.testing.assert_allclose(head, model(x), rtol=1e-5)
    # weights are shared, not copied: the sub-model follows the original
    single = models.submodel(model, "base/conv2")
    assert any(w is base.get_layer("conv2").kernel for w in single.weights)


def test_unknown_layer_names_raise_a_typed_error_with_suggestions():
    with pytest.raises(UnknownLayerError, match="Did you mean conv1"):
        models.submodel(tiny_cnn(), "conv_1")
    with pytest.raises(UnknownLayerError):
        models.resolve_layer(nested_cnn(), "nope")


def test_unknown_sources_raise_typed_errors():
    for source in ("shapes", "demo:resnet", "keras:NotANet", "hub:vgg", "keras:VGG16:pretrained"):
        with pytest.raises(UnknownSourceError):
            models.load(source)


def test_non_image_models_are_refused():
    flat = keras.Sequential([keras.Input((10,)), keras.layers.Dense(2)])
    with pytest.raises(NotAnImageModelError, match="images"):
        models.check_image_model(flat)
    a, b = keras.Input((8, 8, 3)), keras.Input((8, 8, 3))
    with pytest.raises(NotAnImageModelError, match="2 inputs"):
        models.check_image_model(keras.Model([a, b], keras.layers.Add()([a, b])))


def test_imagenet_weights_unavailable_gives_a_clear_error_and_an_untrained_fallback(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # an empty cache

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- offline")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    import keras.src.applications.mobilenet_v2 as mobilenet_v2

    monkeypatch.setattr(mobilenet_v2.file_utils, "get_file", offline)
    with pytest.raises(WeightsUnavailableError, match="keras:MobileNetV2:untrained") as refused:
        models.load("keras:MobileNetV2")
    message = str(refused.value)  # whole sentences, none of the fetch error's fragments ("None -- offline")
    assert "None" not in message and "offline" not in message and message.endswith("random weights.")
    untrained = models.load("keras:MobileNetV2:untrained")
    assert untrained.untrained and "untrained" in untrained.title
    assert untrained.class_names is None and untrained.input_size == (224, 224)
    assert untrained.preprocessing == "tf"
    # seeded: the same random weights, hence the same fingerprint, every time
    assert models.load("keras:MobileNetV2:untrained").fingerprint == untrained.fingerprint


def test_untrained_loads_at_once_get_the_weights_of_a_lone_load():
    """Three threads building keras:MobileNetV3Small:untrained at once: each gets the weights a lone load gets
    (they drew from one global generator in turn before), and the fingerprint is those weights' digest."""
    from concurrent.futures import ThreadPoolExecutor

    from audit.loaded_model import weights_digest

    lone = models.load("keras:MobileNetV3Small:untrained")
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda _: models.load("keras:MobileNetV3Small:untrained"), range(3)))
    digest = weights_digest(lone.model)
    assert [weights_digest(loaded.model) for loaded in together] == [digest] * 3
    assert {loaded.fingerprint for loaded in together} == {lone.fingerprint}


def test_preprocess_resizes_and_applies_the_models_mode(vgg16):
    image = np.zeros((100, 200, 3), np.uint8)
    image[..., 0] = 200  # pure red
    x = vgg16.preprocess(image)
    assert x.shape == (1, 224, 224, 3) and x.dtype == np.float32
    # caffe_bsds: BGR order, minus the BSDS500 mean
    np.testing.assert_allclose(x[0, 100, 100], [0 - 104.00699, 0 - 116.66877, 200 - 122.67892], rtol=1e-5)


def test_concurrent_predictions_on_one_shared_model_match_serial_ones():
    from concurrent.futures import ThreadPoolExecutor

    loaded = models.LoadedModel(tiny_cnn(), "test", "f" * 16, None, (16, 16), "unit", "tiny")
    batches = [random_images(4, seed=s) for s in range(16)]
    serial = [loaded.predict(x) for x in batches]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(loaded.predict, batches))
    for a, b in zip(serial, parallel):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_quick_call_beside_a_running_job_reads_the_same_model_and_does_not_wait_for_it():
    """A job holds the model's job slot for minutes; a prediction meanwhile neither waits nor changes."""
    import threading
    import time

    from audit import activations

    loaded = models.LoadedModel(tiny_cnn(), "test", "f" * 16, None, (16, 16), "unit", "tiny")
    images, probe = random_images(64, seed=1), random_images(4, seed=2)
    alone_stats = activations.filter_stats(loaded.model, ["conv1", "conv2"], images)
    alone = loaded.predict(probe)
    inside, done, results = threading.Event(), threading.Event(), []

    def job():
        deadline = time.monotonic() + 60  # a quick call that waited for the job would find it over
        with loaded.job_lock:
            inside.set()
            while not done.is_set() and time.monotonic() < deadline:
                results.append(activations.filter_stats(loaded.model, ["conv1", "conv2"], images, batch_size=8))

    worker = threading.Thread(target=job)
    worker.start()
    try:
        assert inside.wait(30)
        for _ in range(20):
            assert loaded.job_lock.locked()  # the job is still running
            np.testing.assert_allclose(loaded.predict(probe), alone, rtol=1e-6)
    finally:
        done.set()
        worker.join(60)
    for stats in results:
        pd.testing.assert_frame_equal(stats, alone_stats, rtol=1e-5)


def test_a_keras_application_link_never_starts_a_download(monkeypatch, tmp_path):
    import urllib.request

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # an empty cache

    def network(*args, **kwargs):
        raise AssertionError("a download was started")

    monkeypatch.setattr(urllib.request, "urlopen", network)
    monkeypatch.setattr(urllib.request, "urlretrieve", network)
    with pytest.raises(WeightsUnavailableError, match="were not downloaded"):
        models.load("keras:MobileNetV2")
    assert not any(path.suffix == ".h5" for path in tmp_path.rglob("*"))


README_KERAS_NAMES = __import__("re").findall(r"^\| (\w+) \| keras\.applications", (
    __import__("pathlib").Path(__file__).resolve().parent.parent / "README.md").read_text(), __import__("re").M)


def test_the_readme_tables_keras_names_are_all_offered():
    assert len(README_KERAS_NAMES) >= 8
    assert set(README_KERAS_NAMES) <= set(sources.KERAS_APPLICATIONS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(sources.KERAS_APPLICATIONS))
def test_every_offered_keras_architecture_opens_untrained_through_its_source(name):
    """The sidebar's keras:<Name>:untrained, not a file built by the test: the path a user clicks (a free input
    size once made MobileNetV3 fail here with a TypeError)."""
    loaded = models.load(f"keras:{name}:untrained")
    assert loaded.untrained and loaded.class_names is None
    height, width = loaded.input_size
    assert 200 <= height == width <= 331
    pixels = np.random.default_rng(0).integers(0, 256, (height + 7, width + 3, 3), dtype=np.uint8)
    probabilities = loaded.predict(loaded.preprocess(pixels))[0]
    assert probabilities.shape == (1000,) and abs(float(probabilities.sum()) - 1.0) < 1e-3
    table = models.layer_table(loaded.model)
    assert len(table) > 10 and table["params"][~table["is_container"]].sum() == loaded.model.count_params()
    assert models.conv_layers(loaded.model)
