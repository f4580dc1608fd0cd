"""int8 quantisation: quantise-dequantise checked on paper, the calibrated ranges against numpy and against the
scales TensorFlow Lite's converter chooses, the simulation against the interpreter, layers kept in float, a
pruned model converted, and a model the converter refuses said in one sentence."""

import re

import keras
import numpy as np
import pytest

from audit import heads, pruning, quantization
from audit.errors import QuantizationError, UnknownLayerError


def test_weights_per_channel_and_an_activation_range_on_paper():
    kernel = np.array([[0.5, -0.9], [0.2, 2.0]])  # two output channels (columns)
    # channel 0: scale 0.5 / 127, 0.2 -> round(50.8) = 51 steps; channel 1: scale 2 / 127, -0.9 -> round(-57.15)
    expected = np.array([[0.5, -57 * 2 / 127], [51 * 0.5 / 127, 2.0]])
    np.testing.assert_allclose(quantization.quantize_dequantize(kernel, axis=-1), expected, rtol=1e-12)
    # an activation calibrated to [0, 1.8]: scale 1.8 / 255, zero point -128; 1.0 -> 142 steps, 2.5 clips to 255
    steps = 1.8 / 255
    found = quantization.quantize_dequantize(np.array([0.0, 1.0, 2.5]), symmetric=False, value_range=(0.0, 1.8))
    np.testing.assert_allclose(found, [0.0, 142 * steps, 1.8], rtol=1e-12)
    # a range without 0 is widened to hold it; [-1, 3]: scale 4 / 255, zero point round(-128 + 63.75) = -64,
    # so 0 stays exact and 1.0 is round(63.75) = 64 steps
    scale, zero_point, lowest, highest = quantization.parameters(np.zeros(1), symmetric=False, value_range=(-1, 3))
    assert (float(scale), float(zero_point), lowest, highest) == (4 / 255, -64.0, -128, 127)
    found = quantization.quantize_dequantize(np.array([0.0, 1.0]), symmetric=False, value_range=(-1.0, 3.0))
    np.testing.assert_allclose(found, [0.0, 64 * 4 / 255], rtol=1e-12)
    np.testing.assert_allclose(quantization.quantize_dequantize(np.array([0.6, 0.9]), symmetric=False,
                                                                value_range=(0.5, 1.0)),
                               [153 / 255, 230 / 255], rtol=1e-12)  # [0.5, 1] widened to [0, 1]
    assert np.array_equal(quantization.quantize_dequantize(np.zeros((2, 2)), axis=-1), np.zeros((2, 2)))


def residual_model() -> keras.Model:
    """Conv-BN-ReLU twice with a residual add and a softmax head, its BatchNorms given non-trivial statistics."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="r1")(x)
    y = keras.layers.Conv2D(8, 3, padding="same", name="c2")(x)
    y = keras.layers.BatchNormalization(name="bn2")(y)
    y = keras.layers.ReLU(name="r2")(y)
    x = keras.layers.Add(name="add")([x, y])
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax", name="head")(x))
    for name in ("bn1", "bn2"):
        gamma, beta, mean, variance = model.get_layer(name).get_weights()
        model.get_layer(name).set_weights([rng.uniform(0.5, 2, gamma.shape), rng.normal(0, 0.3, beta.shape),
                                           rng.normal(0, 0.2, mean.shape), rng.uniform(0.5, 2, variance.shape)])
    return model


@pytest.fixture(scope="module")
def model_and_images():
    images = np.random.default_rng(1).random((64, 16, 16, 3)).astype(np.float32)
    return residual_model(), images[:32], images[32:]


def test_ranges_equal_numpy_where_the_integer_model_rounds(model_and_images):
    model, calibration, _ = model_and_images
    frame = quantization.ranges(model, calibration)
    weights = frame[(frame.kind == "weights") & (frame.layer == "c2")]
    kernel = model.get_layer("c2").get_weights()[0].reshape(-1, 8)
    np.testing.assert_allclose(weights["max"], kernel.max(0), rtol=1e-6)
    activations = frame[(frame.kind == "activations") & (frame.layer == "c1")]
    assert set(activations.measured_at) == {"r1"}  # after its BatchNorm and ReLU: the fused op's output
    after_relu = keras.Model(model.inputs, model.get_layer("r1").output).predict(calibration, verbose=0)
    np.testing.assert_allclose(activations["max"], after_relu.max((0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(activations["min"], after_relu.min((0, 1, 2)), atol=1e-7)
    problems = quantization.problems(frame)
    assert list(problems.layer) == ["c1", "c2", "head"]
    spans = np.abs(kernel).max(0)
    assert problems.set_index("layer").loc["c2", "weights_outlier_ratio"] == pytest.approx(
        spans.max() / np.median(spans), rel=1e-6)


def test_the_simulation_agrees_with_the_interpreter_and_the_converters_scales_with_ours(model_and_images):
    model, calibration, held_out = model_and_images
    content = quantization.convert(model, calibration)
    ranges = quantization.per_tensor_ranges(
        quantization.activation_ranges(model, quantization.quantized_layers(model), calibration)[0])
    loaded = quantization.interpreter(content)
    scales = {detail["name"]: detail["quantization"][0] for detail in loaded.get_tensor_details()
              if len(detail["shape"]) == 4 and np.dtype(detail["dtype"]) == np.int8}
    fused_c1 = next(name for name in scales if re.search(r"/c1(_\d+)?/convolution", name) and "Relu" in name)
    low, high = ranges["r1"]
    assert scales[fused_c1] == pytest.approx((max(high, 0) - min(low, 0)) / 255, rel=1e-5)

    head = heads.find_head(model)
    simulated = quantization.outputs(quantization.fake_quantized(model, ranges, quantization.quantized_layers(model)),
                                     held_out, head)
    reference = quantization.outputs(model, held_out, head)
    measured = quantization.evaluate(content, held_out, reference=quantization.raw_outputs(model, held_out, head),
                                     head=head)
    # both round the softmax to TFLite's fixed 1/256 steps; the interpreter also rounds the add, the pooling and
    # the logits, which the simulation leaves in float: at most one step apart, a tenth of one on average
    # (over the calibrated range instead of the fixed one, the mean was 0.27 steps)
    steps = np.abs(measured["outputs"] - simulated) * 256
    assert steps.max() <= 1 + 1e-4 and steps.mean() < 0.15
    assert np.max(np.abs(simulated - reference)) > 1e-5  # the simulation does round
    assert measured["bytes"] == len(content) and measured["seconds_per_image"] > 0
    assert 0 <= measured["agreement_low"] <= measured["agreement"] <= measured["agreement_high"] <= 1


def test_sensitivity_per_layer_with_held_out_images(model_and_images):
    model, calibration, held_out = model_and_images
    labels = quantization.outputs(model, held_out, heads.find_head(model)).argmax(1)
    table = quantization.sensitivity(model, held_out, labels, calibration=calibration)
    assert list(table.layer) == ["c1", "c2", "head"] and table.attrs["held_out"]
    assert table.attrs["images"] == 32 and table.attrs["calibration"] == 32
    assert np.all(table.agreement == table.accuracy)  # labels are the float model's top-1
    assert np.all(table.kl >= 0) and np.all(table.kl < 1e-2)
    every = quantization.sensitivity(model, held_out, calibration=calibration, all_but_one=True)
    assert list(every.layer) == ["c1", "c2", "head", "(all)"]


def test_the_switched_graph_runs_what_a_fake_quantised_copy_per_layer_runs(model_and_images):
    """One traced graph with a switch per layer (sensitivity's runs) against a Keras copy of the model built with
    those layers int8 (fake_quantized): the same outputs, one layer at a time and all but one; each layer's
    rounding error from the one float pass equals the copy's tensor at its point against float."""
    import tensorflow as tf

    from audit import models
    from audit.quantization import switched

    model, calibration, held_out = model_and_images
    layers = quantization.quantized_layers(model)
    limits = quantization.per_tensor_ranges(quantization.activation_ranges(model, layers, calibration)[0])
    net = switched.switched(model, layers)
    ranges = [quantization.simulate.rounding_range(model, point, limits) for point in net.points]
    scale, zero_point = net.rounding(ranges)
    run = switched.runner(net)
    x = tf.constant(held_out)
    for quantized in [[layer] for layer in layers] + [[other for other in layers if other != layer] for layer in layers]:
        on = np.isin(net.layers, quantized).astype(np.float32)
        got = run(x, on, net.point_switches(on), scale, zero_point)[0].numpy()
        expected = quantization.fake_quantized(model, limits, quantized)(x).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
        assert np.abs(got - model(x).numpy()).max() > 1e-6
    squared, _, count = switched.error_runner(net)(x, scale[net.point_of], zero_point[net.point_of],
                                                   *np.array(ranges, np.float32)[net.point_of].T)
    for i, layer in enumerate(layers):
        point = net.points[net.point_of[i]]
        alone = quantization.fake_quantized(model, limits, [layer])  # its layer at `point` gives the unrounded
        rounded = quantization.simulate.FakeQuantize(*ranges[net.point_of[i]])(models.submodel(alone, point)(x))
        expected = np.mean((rounded.numpy() - models.submodel(model, point)(x).numpy()) ** 2)
        assert squared.numpy()[i] / count.numpy()[i] == pytest.approx(expected, rel=1e-4)


def test_the_switched_graph_runs_for_inference_through_augmentation_and_a_nested_base():
    """TensorFlow's transfer-learning pattern: augmentation layers (training only), a nested base, dropout. With
    every switch off the switched graph is the model at inference (augmentation and dropout off), and with one
    layer on it equals that layer's fake-quantised copy."""
    import tensorflow as tf

    from audit.quantization import switched

    keras.utils.set_random_seed(5)
    inner = keras.Input((16, 16, 3))
    base = keras.Model(inner, keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inner), name="base")
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.RandomRotation(0.2)(keras.layers.RandomFlip("horizontal")(inputs))
    x = keras.layers.Dropout(0.5)(keras.layers.GlobalAveragePooling2D()(base(x)))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(x))
    images = np.random.default_rng(4).random((6, 16, 16, 3)).astype(np.float32)
    layers = quantization.quantized_layers(model)
    assert layers == ["base/conv", "head"]
    limits = quantization.per_tensor_ranges(quantization.activation_ranges(model, layers, images)[0])
    net = switched.switched(model, layers)
    scale, zero_point = net.rounding([quantization.simulate.rounding_range(model, p, limits) for p in net.points])
    run = switched.runner(net)
    off = np.zeros(len(layers), np.float32)
    got = run(tf.constant(images), off, net.point_switches(off), scale, zero_point)[0].numpy()
    np.testing.assert_allclose(got, model(images, training=False).numpy(), rtol=1e-6)
    on = np.array([1, 0], np.float32)
    got = run(tf.constant(images), on, net.point_switches(on), scale, zero_point)[0].numpy()
    np.testing.assert_allclose(got, quantization.fake_quantized(model, limits, ["base/conv"])(images, training=False),
                               rtol=1e-5, atol=1e-7)


def test_each_layers_rounding_error_agrees_with_tensorflow_lites_quantization_debugger(model_and_images):
    """The debugger runs each int8 op of the converted model beside its float twin on the same input (layer by
    layer, not accumulated) and reports the mean squared difference and the tensor's scale. Per conv, in steps
    of that scale, the simulation's rounding error agrees within 20% (the converter gave c2's output the Add's
    wider scale, so its error in steps, not in units, is what both measure alike)."""
    import io

    import pandas as pd
    import tensorflow as tf

    model, calibration, held_out = model_and_images
    table = quantization.sensitivity(model, held_out, calibration=calibration).set_index("layer")

    def dataset(images):
        return lambda: ([images[index:index + 1]] for index in range(len(images)))

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = dataset(calibration)
    debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=dataset(held_out))
    debugger.run()
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    found = pd.read_csv(io.StringIO(dump.getvalue()))
    for layer in ("c1", "c2"):
        row = found[(found.op_name == "CONV_2D") & found.tensor_name.str.contains(rf"/{layer}(?:_\d+)?/")].iloc[0]
        steps = np.sqrt(row.mean_squared_error) / row.scale
        assert table.loc[layer, "rounding_steps"] == pytest.approx(steps, rel=0.2)
    assert table.loc["c1", "clipped"] == 0 and table.loc["c2", "clipped"] > 0  # c2's range, not the Add's: clips
    assert (table[["rounding_steps"]].to_numpy() < 1).all()


def test_a_layer_kept_in_float_stays_float_and_a_pruned_model_converts(model_and_images):
    model, calibration, held_out = model_and_images
    types = quantization.tensor_types(quantization.convert(model, calibration, keep_float=["c2"]))

    def kernel(layer):  # the scope's prefix counts the models built before in this process
        return next(kind for name, kind in types.items() if re.search(rf"/{layer}(_\d+)?/convolution$", name))

    assert kernel("c2") == "float32" and kernel("c1") == "int8"
    smaller = pruning.prune(model, {"c1": [0, 1, 2, 3]})
    assert smaller.get_layer("c1").filters == 4
    content = quantization.convert(smaller, calibration)
    measured = quantization.evaluate(content, held_out)
    assert measured["outputs"].shape == (32, 4)
    np.testing.assert_allclose(measured["outputs"].sum(1), 1.0, atol=0.02)  # still a softmax, in 1/256 steps


def test_a_layer_kept_in_float_is_found_by_its_path_in_a_nested_model():
    """Two nested blocks each with a layer named `conv`: keeping `first/conv` in float leaves `second/conv` int8,
    and the bare name `conv` is refused as ambiguous rather than keeping both."""
    def block(name):
        inputs = keras.Input((8, 8, 4))
        return keras.Model(inputs, keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs),
                           name=name)

    inputs = keras.Input((8, 8, 3))
    x = block("second")(block("first")(keras.layers.Conv2D(4, 1, name="stem")(inputs)))
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="head")(x))
    calibration = np.random.default_rng(2).random((8, 8, 8, 3)).astype(np.float32)
    types = quantization.tensor_types(quantization.convert(model, calibration, keep_float=["first/conv"]))
    kernels = {name: kind for name, kind in types.items() if name.endswith("conv_1/convolution")}
    assert {name.split("/")[1]: kind for name, kind in kernels.items()} == {"first_1": "float32", "second_1": "int8"}
    with pytest.raises(UnknownLayerError, match="ambiguous"):
        quantization.convert(model, calibration, keep_float=["conv"])


def test_a_pooled_feature_vector_is_measured_by_its_error_not_by_a_top1_agreement():
    """A base pooled to features has the shape of class scores: the integer model is compared by the features'
    relative error (numpy), with no agreement or accuracy of an argmax over features."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="c")(inputs)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    images = np.random.default_rng(3).random((12, 16, 16, 3)).astype(np.float32)
    head = heads.find_head(model)
    reference = quantization.raw_outputs(model, images[6:], head)
    measured = quantization.evaluate(quantization.convert(model, images[:6]), images[6:],
                                     labels=np.zeros(6, int), reference=reference, head=head)
    assert "agreement" not in measured and "accuracy" not in measured
    expected = np.linalg.norm(measured["outputs"] - reference) / np.linalg.norm(reference)
    assert measured["relative_error"] == pytest.approx(expected) and 0 < expected < 0.1


def test_a_model_the_converter_refuses_is_a_sentence():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    model = keras.Model(inputs, keras.layers.Flatten()(keras.ops.erfinv(keras.ops.tanh(x))))
    with pytest.raises(QuantizationError, match="no built-in kernel for Erfinv"):
        quantization.convert(model, np.random.default_rng(0).random((4, 8, 8, 3)).astype(np.float32))
    with pytest.raises(QuantizationError, match="calibration images"):
        quantization.convert(model, np.zeros((0, 8, 8, 3), np.float32))


def test_the_command_line_measures_and_writes_the_int8_model(tmp_path, capsys):
    from audit import cli

    out, table = tmp_path / "shapes.int8.tflite", tmp_path / "layers.csv"
    code = cli.main(["quantize", "--model", "demo:shapes", "--images", "shapes:24", "--calibration", "12",
                     "--keep-float", "predictions", "--out", str(out), "--csv", str(table), "--quiet"])
    assert code == 0
    said = capsys.readouterr().out
    assert "int8 .tflite" in said and "on 12 held-out images, calibrated on 12 others" in said
    assert "kept in float: predictions" in said
    types = quantization.tensor_types(out.read_bytes())
    assert any("predictions" in name and kind == "float32" for name, kind in types.items())
    assert any("block1_conv1" in name and kind == "int8" for name, kind in types.items())
    import pandas as pd

    layers = pd.read_csv(table)
    assert list(layers.layer[:2]) == ["block1_conv1", "block1_conv2"] and "agreement" in layers


@pytest.mark.parametrize("layer, kernel_index, output_axis", [
    (keras.layers.DepthwiseConv2D(3, depth_multiplier=2), 0, None),  # channels: input x multiplier
    (keras.layers.SeparableConv2D(5, 3), 1, -1),  # the pointwise kernel makes the output channels
    (keras.layers.Conv2DTranspose(5, 3), 0, -2),  # (h, w, out, in)
])
def test_each_output_channel_of_every_conv_kind_is_on_its_own_int8_grid(layer, kernel_index, output_axis):
    from audit.quantization.arithmetic import quantized_weights

    keras.utils.set_random_seed(3)
    layer.build((None, 8, 8, 4))
    weights = [np.random.default_rng(4).normal(size=w.shape).astype(np.float32) for w in layer.get_weights()]
    layer.set_weights(weights)
    kernel, rounded = weights[kernel_index], quantized_weights(layer)[kernel_index]
    if output_axis is None:
        kernel, rounded = kernel.reshape(9, -1), rounded.reshape(9, -1)
    else:
        kernel, rounded = (np.moveaxis(a, output_axis, -1).reshape(-1, a.shape[output_axis]) for a in (kernel, rounded))
    steps = rounded / (np.abs(kernel).max(0) / 127)  # each channel's own scale: whole steps, its largest at 127
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    np.testing.assert_allclose(np.abs(steps).max(0), 127, rtol=1e-5)
    assert np.max(np.abs(rounded - kernel) / (np.abs(kernel).max(0) / 127)) <= 0.5 + 1e-4


def test_a_two_output_model_is_measured_on_its_class_output_whatever_order_the_converter_lists():
    from audit.zoo import architectures

    keras.utils.set_random_seed(0)
    model = architectures.build("Two outputs (box first)")  # outputs: the box (4), then the classes (5)
    x = np.random.default_rng(2).random((6, 64, 64, 3)).astype(np.float32)
    head = heads.find_head(model)
    assert head.output == 1
    measured = quantization.evaluate(quantization.convert(model, x), x,
                                     reference=quantization.raw_outputs(model, x, head), head=head)
    assert measured["outputs"].shape == (6, 5)
    assert measured["relative_error"] < 0.05  # int8 against float on the same output, not the box
