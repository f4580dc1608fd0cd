"""The model graph: where a filter is used, whether that has a zero floor, and the map the head reads."""

import keras
import pytest

from audit import usage
from tests.fixtures import nested_cnn


@pytest.mark.parametrize("name, expected", [
    ("ResNet50", "conv5_block3_out"),  # after the residual Add and its ReLU, not the branch's conv5_block3_3_conv
    ("ResNet50V2", "post_relu"),
    ("MobileNetV2", "out_relu"),
    ("EfficientNetB0", "top_activation"),
    ("VGG16", "block5_conv3"),  # a max-pool follows it
])
def test_the_cam_layer_is_the_map_the_head_reads(name, expected):
    model = getattr(keras.applications, name)(weights=None, input_shape=(64, 64, 3), classes=4)
    layer, why = usage.cam_layer_and_reason(model)
    assert layer == expected
    assert why


def test_where_used_follows_batchnorm_and_activation_in_keras_applications():
    model = keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3), classes=4)
    assert usage.where_used(model, "Conv1") == "Conv1_relu" and usage.zero_floored(model, "Conv1_relu")
    assert usage.where_used(model, "block_1_depthwise") == "block_1_depthwise_relu"
    # a linear bottleneck: its BN output goes to the next block (or a residual Add), no zero floor
    assert usage.where_used(model, "block_1_project") == "block_1_project_BN"
    assert not usage.zero_floored(model, "block_1_project_BN")
    assert usage.where_used(model, "predictions") == "predictions"  # softmax mixes channels: the layer itself


def test_where_used_inside_a_nested_base_and_through_value_keeping_layers():
    model = nested_cnn()
    assert usage.where_used(model, "conv1") == "base/conv1"  # a fused ReLU: the conv's own output
    assert usage.zero_floored(model, "base/conv1") and usage.zero_floored(model, "base/pool1")
    assert not usage.zero_floored(model, "head")
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)  # Conv -> ReLU -> BN: a dead channel is a constant here
    x = keras.layers.Conv2D(2, 3, name="next")(x)
    model = keras.Model(inputs, x)
    assert usage.where_used(model, "conv") == "conv"


def test_names_tensorflow_refuses_are_renamed_on_load_and_the_model_traces(tmp_path):
    """A model named "my model" with a layer "my conv" inside a nested base saves and loads in Keras, but every
    traced call failed ("not a valid scope name"): loaded through our loader they are renamed, said so, and a
    compiled sub-model gives the eager model's numbers."""
    import numpy as np
    import tensorflow as tf

    from audit import graph, models

    keras.utils.set_random_seed(0)
    inner_in = keras.Input((8, 8, 3))
    base = keras.Model(inner_in, keras.layers.Conv2D(2, 3, name="my conv")(inner_in), name="base model")
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D(name="pool")(base(inputs))
    keras.Model(inputs, keras.layers.Dense(2, name="_head")(x), name="my model").save(tmp_path / "m.keras")
    loaded = models.load(f"file:{tmp_path / 'm.keras'}")
    assert loaded.model.name == "my_model" and loaded.model.get_layer("base_model").get_layer("my_conv")
    assert "'my conv' is 'my_conv'" in loaded.description and "'_head' is 'm_head'" in loaded.description
    x = np.random.default_rng(0).random((2, 8, 8, 3), np.float32)
    cut = graph.submodel(loaded.model, "base_model/my_conv")
    expected = loaded.model.get_layer("base_model")(x)
    np.testing.assert_allclose(tf.function(cut)(x), expected, rtol=1e-6)
    np.testing.assert_allclose(tf.function(loaded.model)(x), loaded.model(x), rtol=1e-6)


def test_grouped_convolutions_run_per_group_without_xla_and_give_the_models_numbers():
    """Keras runs a grouped Conv2D through XLA on the CPU, compiled again per batch shape into a cache the process
    never frees (200 grouped layers: 1.3 GB per shape). The graphs we build run one convolution per group: the
    model's own numbers, and no XLA-compiled function in the traced graph (the model's own call has one)."""
    import numpy as np
    import tensorflow as tf

    from audit import graph, heads

    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 8))
    x = keras.layers.Conv2D(16, 3, groups=4, activation="relu", padding="same", name="g1")(inputs)
    x = keras.layers.Conv2D(8, 3, groups=2, strides=2, name="g2")(x)
    x = keras.layers.Conv2D(16, 3, groups=8, padding="same", name="depthwise_x2")(x)  # ConvNeXt's depthwise form
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x)))
    images = np.random.default_rng(0).random((5, 12, 12, 8), np.float32)
    built = graph.graph_model(model, [graph.Point("g1"), graph.Point(model.layers[-1].name)])
    first, last = built(images)
    np.testing.assert_allclose(last, model(images), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first, keras.Model(inputs, model.get_layer("g1").output)(images), rtol=1e-5, atol=1e-6)
    spec = tf.TensorSpec((None, 12, 12, 8))

    def compiled_by_xla(function) -> bool:
        return "_XlaMustCompile" in str(tf.function(function).get_concrete_function(spec).graph.as_graph_def())

    assert compiled_by_xla(lambda t: model(t)) and not compiled_by_xla(lambda t: built(t))
    outputs = heads.Outputs(model)
    np.testing.assert_allclose(outputs(images), keras.ops.softmax(model(images)), rtol=1e-5, atol=1e-6)
