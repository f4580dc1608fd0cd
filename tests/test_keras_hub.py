"""KerasHub image classifiers, built from their configs with random weights at 64 px, saved and loaded back as
uploads: their classes are library code the installed keras_hub registers, their preprocessing is read from
the ImageConverter, and what the pages compute on them equals Keras's own graph.
"""

import json
import zipfile

import keras
import numpy as np
import pytest

from audit import attribution, models, storage
from audit.errors import UnsafeModelError

keras_hub = pytest.importorskip("keras_hub")


def resnet_classifier(scale=1 / 255.0, offset=None) -> keras.Model:
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 128],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block", image_shape=(64, 64, 3))
    converter = keras_hub.layers.ResNetImageConverter(image_size=(64, 64), scale=scale, offset=offset)
    preprocessor = keras_hub.models.ResNetImageClassifierPreprocessor(image_converter=converter)
    return keras_hub.models.ResNetImageClassifier(backbone=backbone, num_classes=4, preprocessor=preprocessor)


def _upload(model: keras.Model, tmp_path, name: str) -> models.LoadedModel:
    path = tmp_path / f"{name}.keras"
    model.save(path)
    return models.load("upload:" + storage.save_upload(path.read_bytes(), "models", path.name))


@pytest.fixture(autouse=True)
def _data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_AUDIT_DATA", str(tmp_path / "data"))


def test_a_resnet_classifier_loads_as_an_upload_with_its_converters_preprocessing(tmp_path):
    classifier = resnet_classifier()
    loaded = _upload(classifier, tmp_path, "resnet")
    assert loaded.input_size == (64, 64)
    assert loaded.preprocessing == "unit" and "ImageConverter" in loaded.preprocessing_reason
    assert not loaded.preprocessing_assumed
    table = models.layer_table(loaded.model)
    assert "res_net_backbone" in set(table[table.is_container].path)  # the backbone is the nesting shown
    assert table[~table.is_container].params.sum() == classifier.count_params()
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    x = loaded.preprocess(image)
    np.testing.assert_allclose(x, image[None] / 255.0, rtol=1e-6)
    logits = np.asarray(classifier(x), np.float64)  # the classifier's head has no activation: logits
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(loaded.predict(x), expected, rtol=1e-4, atol=1e-6)
    layer = models.cam_layer(loaded.model)
    assert layer == "res_net_backbone/stack1_block0_out"
    assert attribution.grad_cam(loaded.model, x[0], 1, upsample=False).shape == (8, 8)


@pytest.mark.parametrize("scale, offset, mode", [
    (1 / 127.5, -1.0, "tf"),
    ([1 / (255 * 0.229), 1 / (255 * 0.224), 1 / (255 * 0.225)], [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225],
     "torch"),
    (None, None, "raw"),
])
def test_the_converters_transform_names_the_preprocessing(tmp_path, scale, offset, mode):
    loaded = _upload(resnet_classifier(scale, offset), tmp_path, mode)
    assert loaded.preprocessing == mode


def test_a_keras_hub_name_the_installed_package_does_not_register_is_refused(tmp_path):
    path = tmp_path / "resnet.keras"
    resnet_classifier().save(path)
    forged = tmp_path / "forged.keras"
    with zipfile.ZipFile(path) as original, zipfile.ZipFile(forged, "w") as copy:
        for item in original.infolist():
            data = original.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                config["registered_name"] = "keras_hub>DownloadEverything"
                data = json.dumps(config).encode()
            copy.writestr(item, data)
    with pytest.raises(UnsafeModelError, match="keras_hub>DownloadEverything.*does not register"):
        models.load(f"file:{forged}")


def _zip_folder(folder, path, inside: str = "") -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for item in sorted(folder.iterdir()):
            archive.write(item, inside + item.name)


def test_a_local_preset_folder_and_a_zip_of_it_load_the_classifier_with_its_weights(tmp_path):
    classifier = resnet_classifier(1 / 127.5, -1.0)
    folder = tmp_path / "my_resnet"
    classifier.save_to_preset(str(folder))
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    x = image[None] / 127.5 - 1.0
    logits = np.asarray(classifier(x), np.float64)
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()

    from_folder = models.load(f"file:{folder}")
    assert from_folder.preprocessing == "tf" and "ImageConverter" in from_folder.preprocessing_reason
    np.testing.assert_allclose(from_folder.preprocess(image), x, atol=1e-5)
    np.testing.assert_allclose(from_folder.predict(x), expected, rtol=1e-4, atol=1e-6)
    assert models.load(f"file:{folder}").fingerprint == from_folder.fingerprint  # the same folder, the same model

    archive = tmp_path / "my_resnet.zip"
    _zip_folder(folder, archive, inside="my_resnet/")  # zipped as a folder, as file managers do
    uploaded = models.load("upload:" + storage.save_upload(archive.read_bytes(), "models", archive.name))
    np.testing.assert_allclose(uploaded.predict(x), expected, rtol=1e-4, atol=1e-6)
    assert uploaded.model.count_params() == classifier.count_params()


def test_a_preset_with_a_file_no_image_preset_holds_or_code_in_its_task_is_refused(tmp_path):
    folder = tmp_path / "preset"
    resnet_classifier().save_to_preset(str(folder))
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(UnsafeModelError, match="tokenizer.json.*not part of a KerasHub image preset"):
        models.load(f"file:{folder}")
    (folder / "tokenizer.json").unlink()
    task = json.loads((folder / "task.json").read_text())
    task["config"]["backbone"]["config"]["name"] = {"class_name": "Lambda", "config": {"name": "x"}}
    (folder / "task.json").write_text(json.dumps(task))
    with pytest.raises(UnsafeModelError, match="Lambda"):
        models.load(f"file:{folder}")


def test_a_folder_that_is_no_preset_is_refused_as_a_saved_model(tmp_path):
    folder = tmp_path / "saved_model"
    folder.mkdir()
    (folder / "saved_model.pb").write_bytes(b"\0")
    with pytest.raises(UnsafeModelError, match="SavedModel"):
        models.load(f"file:{folder}")


def test_a_mobilenet_v3_classifiers_blocks_open_into_nested_models_of_their_own_layers(tmp_path):
    """KerasHub's MobileNet blocks are Layer subclasses that call their convs in `call`: loaded, each is a nested
    model of the same layers, so the table, the maps and the scores reach every conv inside; what the model and an
    inner conv compute equals KerasHub's own classifier (its blocks called as they are)."""
    from audit import activations
    from audit.zoo import keras_hub_classifiers

    original = keras_hub_classifiers.mobilenet_v3()
    loaded = _upload(original, tmp_path, "mobilenet")
    table = models.layer_table(loaded.model)
    conv_reduce = "mobile_net_backbone/block_2_1/block_2_1_se/block_2_1_se_conv_reduce"
    assert table.set_index("path").loc[conv_reduce, "params"] == 144 * 40 + 40  # the squeeze-excite's 1x1 conv
    assert len(models.conv_layers(loaded.model)) == 23  # 3 outside the blocks before: input, classifier convs
    cam = models.cam_layer(loaded.model)  # the map pooled: the last block's activation (its name counted by Keras)
    assert cam.startswith("mobile_net_backbone/block_3_0/")
    assert isinstance(models.get_layer(loaded.model, cam), keras.layers.Activation)
    assert "Its 6 blocks" in loaded.description  # said on the Model page
    x = loaded.preprocess(np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
    np.testing.assert_allclose(loaded.model(x, training=False), original(x, training=False), rtol=1e-5, atol=1e-6)
    backbone = original.backbone
    before = keras.Model(backbone.inputs, backbone.get_layer("block_0_0").output)(x)
    expected = backbone.get_layer("block_1_0").conv1(before).numpy()
    got = activations.layer_maps(loaded.model, "mobile_net_backbone/block_1_0/block_1_0_conv1", x[:1])
    np.testing.assert_allclose(got, expected[0], rtol=1e-5, atol=1e-5)


def test_a_block_with_weights_of_its_own_stays_whole():
    """Only a container opens: a layer with a weight of its own (not in a sublayer) stays one node; a model whose
    block calls TensorFlow's own ops stays as it is; the opened model computes what the original did."""
    from audit.opened_blocks import is_block, open_blocks

    class Scaled(keras.layers.Layer):  # a conv and a weight of its own
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = keras.layers.Conv2D(4, 3, padding="same")

        def build(self, input_shape):
            self.conv.build(input_shape)
            self.scale = self.add_weight(shape=(4,), initializer="ones")

        def call(self, x):
            return self.conv(x) * self.scale

    class Container(keras.layers.Layer):  # two convs, no weight of its own
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.first = keras.layers.Conv2D(4, 3, padding="same", name="first")
            self.second = keras.layers.Conv2D(4, 1, name="second")

        def build(self, input_shape):
            self.first.build(input_shape)
            self.second.build(input_shape)

        def call(self, x):
            return self.second(keras.ops.relu(self.first(x))) + x

    keras.utils.set_random_seed(0)
    image = keras.Input((8, 8, 4))
    model = keras.Model(image, Scaled(name="scaled")(Container(name="container")(image)))
    assert [is_block(layer) for layer in model.layers[1:]] == [True, False]
    opened = open_blocks(model, (8, 8))
    assert [type(layer).__name__ for layer in opened.layers] == ["InputLayer", "Functional", "Scaled"]
    inner = opened.layers[1]
    assert inner.layers[0].name == "container_input"
    assert inner.get_layer("first") is model.layers[1].first  # the same layers: the same weights
    assert sum(isinstance(layer, keras.layers.Conv2D) for layer in inner.layers) == 2

    class TensorFlowOps(Container):  # TensorFlow's own ops: they run in a traced graph, not on a Keras input
        def call(self, x):
            import tensorflow as tf

            return tf.nn.relu(self.first(x))

    kept = keras.Model(image, TensorFlowOps(name="tf_ops")(image))
    assert open_blocks(kept, (8, 8)) is kept
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
    np.testing.assert_allclose(opened(x).numpy(), model(x).numpy(), rtol=1e-6)


def test_a_mobilenet_v3_classifier_prunes_inside_its_blocks_to_the_masked_model(tmp_path):
    """A filter group inside an opened block (the middle of the removable layers) is cut: the smaller model
    computes what the masked model computes, and saves and loads back through the same screens."""
    from audit import groups, heads, pruning
    from audit.zoo import keras_hub_classifiers

    loaded = _upload(keras_hub_classifiers.mobilenet_v3(), tmp_path, "mobilenet")
    model = loaded.model
    rng = np.random.default_rng(2)  # BatchNorm statistics that carry a signal through 20 random blocks
    for _, layer, _ in models.iter_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.3, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.05, 0.2, variance.shape)])
    graph = groups.DependencyGraph(model)
    layer = graph.removable_layers()[len(graph.removable_layers()) // 2]
    assert layer.count("/") == 2  # mobile_net_backbone/<block>/<conv>: inside a block
    selection = {layer: list(range(0, models.output_channels(model, layer), 2))}  # every other filter
    smaller = pruning.prune(model, selection, graph)
    assert smaller.count_params() < model.count_params()
    x = loaded.preprocess(np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8))
    head = heads.find_head(model)
    masked = pruning.Sweep(model, graph=graph).outputs([selection], x)[0]
    assert np.abs(masked - heads.Outputs(model)(x)).max() > 1e-3  # the cut changes the outputs
    np.testing.assert_allclose(heads.Outputs(smaller, head=head)(x), masked, atol=1e-5)
    reloaded = _upload(smaller, tmp_path, "smaller")
    np.testing.assert_allclose(reloaded.predict(x), masked, atol=1e-5)


def test_an_unregistered_keras_hub_class_is_read_only_where_keras_hub_defines_a_layer():
    from audit.keras_hub_models import keras_hub_module_problem

    module = "keras_hub.src.models.mobilenet.mobilenet_backbone"
    assert keras_hub_module_problem(module, "DepthwiseConvBlock") is None
    assert "not a layer class" in keras_hub_module_problem(module, "keras")  # a name imported there, not a layer
    assert "not a layer class" in keras_hub_module_problem("keras_hub.src.models.mobilenet.mobilenet_backbone", "ops")
    assert "does not have" in keras_hub_module_problem("keras_hub.src.models.not_a_model", "Layer")
    assert "not one of keras_hub's models" in keras_hub_module_problem("keras_hub.src.utils.preset_utils", "Preset")


@pytest.mark.slow  # 15 s each here; their conformance rows (slow tier too) run every capability on them
@pytest.mark.parametrize("family", ["VGG", "HGNetV2"])
def test_copies_keep_every_layer_where_keras_clone_would_not(family, tmp_path):
    """Keras's clone rebuilds a KerasHub VGG backbone by code under another name (`vgg_backbone_3`), and HGNetV2's
    blocks hold Identity layers whose config cannot be written (opened with fresh ones): the masked copy, the smaller model, the sanity
    check's randomised copies and the bfloat16 copy still compute from every layer, with the model's weights."""
    from audit import groups, heads, precision, pruning
    from audit.attribution import trust
    from audit.zoo import keras_hub_classifiers

    keras.utils.set_random_seed(0)
    loaded = _upload(keras_hub_classifiers.CLASSIFIERS[family](), tmp_path, family)
    model = loaded.model
    x = loaded.preprocess(np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
    expected = model(x, training=False).numpy()
    np.testing.assert_allclose(pruning.masked(model, {})(x, training=False), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(precision.bfloat16_copy(model)(x, training=False), expected, rtol=0.1, atol=0.05)
    graph = groups.DependencyGraph(model)
    layer = graph.removable_layers()[0]
    selection = {layer: [0]}
    head = heads.find_head(model)
    masked = heads.Outputs(pruning.masked(model, selection, graph), head=head)(x)
    np.testing.assert_allclose(heads.Outputs(pruning.prune(model, selection, graph), head=head)(x), masked,
                               rtol=1e-4, atol=1e-6)
    _, copy = next(trust.randomised_copies(model))
    assert np.abs(copy(x, training=False).numpy() - expected).max() > 1e-6  # the top layer re-drawn
    np.testing.assert_allclose(model(x, training=False), expected)  # the model itself untouched
    again = _upload(model, tmp_path, f"{family}_again")  # the loaded (opened) model saves and loads back
    np.testing.assert_allclose(again.model(x, training=False), expected, rtol=1e-5, atol=1e-6)
