"""bfloat16 where the hardware computes it natively: the decision, the compute copy, its agreement, the keys."""

import keras
import numpy as np
import pytest

from audit import activations, attribution, device, models, precision, pruning
from tests.fixtures import random_images, tiny_cnn

AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
OLD = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"


def test_precision_follows_the_cpu_flags_and_the_override(monkeypatch):
    monkeypatch.setattr(device.tf.config, "list_physical_devices", lambda kind=None: [])
    before = device.chosen_precision()
    device.use_precision("auto")
    assert device.precision(AMX) == "bfloat16" and "amx_bf16" in device.native_bfloat16(AMX)
    assert device.precision(ZEN4) == "bfloat16" and "avx512_bf16" in device.native_bfloat16(ZEN4)
    assert device.precision(OLD) == "float32" and device.native_bfloat16(OLD) == ""
    try:
        device.use_precision("float32")
        assert device.precision(AMX) == "float32"
        device.use_precision("bfloat16")
        assert device.precision(OLD) == "bfloat16"
        with pytest.raises(Exception, match="choose one of auto, float32, bfloat16"):
            device.use_precision("half")
    finally:
        device.use_precision(before)


def test_the_compute_copy_computes_in_bfloat16_and_hands_on_float32():
    model = tiny_cnn(input_shape=(16, 16, 3), classes=3, seed=1)
    copy = precision.bfloat16_copy(model)
    assert copy is precision.bfloat16_copy(model)  # built once per model
    assert copy.get_layer("conv1").dtype_policy.compute_dtype == "bfloat16"
    assert copy.get_layer("conv1").kernel.dtype == "float32"  # variables stay float32
    for a, b in zip(model.get_weights(), copy.get_weights()):
        np.testing.assert_array_equal(a, b)
    cut = models.submodel(copy, "conv2")
    assert cut.outputs[0].dtype == "float32"  # read back as float32
    assert precision.for_compute(model, "float32") is model and precision.for_compute(model, "bfloat16") is copy


def test_statistics_of_the_bfloat16_copy_stay_within_the_stated_tolerance():
    """A hand-weighted conv whose exact statistics are on paper: bfloat16 (8 bits of mantissa) keeps means within
    1%, APoZ within 0.02 and every dead flag (the definitions' tolerance)."""
    inputs = keras.Input((8, 8, 1))
    conv = keras.layers.Conv2D(3, 1, activation="relu", name="conv")
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(conv(inputs)))
    conv.set_weights([np.array([[[[1.0, -1.0, 0.5]]]], np.float32), np.array([0.0, -100.0, 0.1], np.float32)])
    x = np.random.default_rng(0).uniform(0.1, 3.0, (16, 8, 8, 1)).astype(np.float32)
    exact = activations.filter_stats(model, ["conv"], x)
    fast = activations.filter_stats(precision.bfloat16_copy(model), ["conv"], x)
    np.testing.assert_allclose(exact["mean"], [x.mean(), 0.0, 0.5 * x.mean() + 0.1], rtol=1e-5)
    np.testing.assert_allclose(fast["mean"], exact["mean"], rtol=1e-2, atol=1e-3)
    np.testing.assert_allclose(fast["apoz"], exact["apoz"], atol=0.02)
    assert list(fast["dead"]) == list(exact["dead"]) == [False, True, False]


def test_saliency_and_grad_cam_of_the_copy_correlate_with_float32():
    model = tiny_cnn(input_shape=(16, 16, 3), classes=3, seed=2)
    image = random_images(1, seed=5)[0]
    copy = precision.bfloat16_copy(model)
    for method in (attribution.saliency, attribution.grad_cam):
        exact, fast = method(model, image, 0), method(copy, image, 0)
        assert np.corrcoef(exact.ravel(), fast.ravel())[0, 1] > 0.95, method.__name__
    scores = pruning.filter_scores(copy, random_images(6, seed=1), np.array([0, 1, 2, 0, 1, 2]))
    assert scores[["l1", "mean", "taylor"]].notna().all().all()


def test_every_job_key_differs_between_precisions():
    from audit import filters
    from audit.images import LabelledImage
    from pages import activations_jobs, attribution_jobs, filters_jobs, pruning_jobs
    from pages.selection import Selection, set_key

    loaded = models.load("demo:shapes")
    item = LabelledImage("one", np.zeros((64, 64, 3), np.uint8))
    keys = []
    for mode in ("float32", "bfloat16"):
        chosen = Selection(loaded, [item], item, "tf", "crop", "/CPU:0", precision=mode)
        keys.append((set_key(chosen, "x"), activations_jobs.stats_key(chosen, ("block1_conv1",), 0.0),
                     pruning_jobs.sensitivity_key(chosen, "l1", 4), pruning_jobs.chance_key(chosen, "a", "l1", 4),
                     pruning_jobs.leave_one_out_key(chosen, ("a",), 4),
                     attribution_jobs.trust_key(chosen, "k", ("class", 0), {"Saliency": (None, ())}),
                     filters_jobs._gallery_key(chosen, "block1_conv1", (0,), filters.Options(), 0, False)))
    for exact, fast in zip(*keys):
        assert exact != fast


def test_a_page_in_bfloat16_runs_on_the_copy_and_says_so():
    from tests.fixtures import open_page

    before = device.chosen_precision()
    device.use_precision("bfloat16")
    try:
        at = open_page("pages/attribution.py", {"model": "demo:shapes-gap", "methods": ["Saliency", "Grad-CAM"]})
        assert any("Heavy passes in **bfloat16**" in c.value for c in at.sidebar.caption)
        assert any("Computed in bfloat16" in c.value for c in at.caption)
        assert not at.error, [e.value for e in at.error]
        exact = open_page("pages/attribution.py", {"model": "demo:shapes-gap", "methods": ["Saliency", "Grad-CAM"],
                                                    "exact": "1"})
        assert any("Heavy passes in **float32**" in c.value for c in exact.sidebar.caption)
        assert not any("Computed in bfloat16" in c.value for c in exact.caption)
    finally:
        device.use_precision(before)


def test_auto_chooses_bfloat16_only_where_it_measures_faster(monkeypatch):
    model = tiny_cnn(input_shape=(16, 16, 3), classes=3, seed=3)
    monkeypatch.setattr(device, "native_bfloat16", lambda cpuinfo=None: "test units")
    monkeypatch.setitem(precision._SPEEDUPS, model, 0.8)
    assert precision.decide(model, (16, 16), "auto") == ("float32", "bfloat16 measured 0.80x float32's speed for "
                                                                     "this model here")
    monkeypatch.setitem(precision._SPEEDUPS, model, 2.0)
    assert precision.decide(model, (16, 16), "auto")[0] == "bfloat16"
    assert precision.decide(model, (16, 16), "float32") == ("float32", "as asked")
    monkeypatch.setattr(device, "native_bfloat16", lambda cpuinfo=None: "")
    assert precision.decide(model, (16, 16), "auto") == ("float32", "no native bfloat16 here")


def test_integrated_gradients_stays_float32_when_the_rest_is_bfloat16():
    """Completeness (the attributions sum to the score's change from the baseline) is IG's own check; in bfloat16
    it drifts past 1% on deep nets, so explain() runs it on the float32 model whatever the precision."""
    from audit.loaded_model import LoadedModel

    model = tiny_cnn(input_shape=(16, 16, 3), classes=3, seed=4)
    loaded = LoadedModel(model, "test", "ig", ["a", "b", "c"], (16, 16), "unit", "tiny")
    pixels = np.random.default_rng(6).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    exact = attribution.explain(loaded, pixels, "Integrated Gradients", 1, precision="float32", steps=64)
    fast = attribution.explain(loaded, pixels, "Integrated Gradients", 1, precision="bfloat16", steps=64)
    np.testing.assert_array_equal(fast, exact)
    saliency = attribution.explain(loaded, pixels, "Saliency", 1, precision="bfloat16")  # the others do change
    assert not np.array_equal(saliency, attribution.explain(loaded, pixels, "Saliency", 1, precision="float32"))


def test_the_copy_takes_keras_ops_arithmetic_in_the_graph():
    """MobileNetV3's hard sigmoid is keras.ops arithmetic (weightless Operations without a dtype policy): the copy
    once failed on it, and the sidebar with it, for keras:MobileNetV3Small:untrained."""
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV3Small(weights=None, input_shape=(64, 64, 3), classes=5,
                                                include_preprocessing=False)
    copy = precision.bfloat16_copy(model)
    x = random_images(2, (64, 64, 3), seed=1)
    exact, fast = model(x, training=False).numpy(), copy(x, training=False).numpy().astype(np.float32)
    assert np.abs(fast - exact).max() < 0.05 and fast.argmax(1).tolist() == exact.argmax(1).tolist()


def test_timing_the_bfloat16_copy_of_a_grouped_model_compiles_nothing_with_xla(monkeypatch):
    """Keras runs a grouped convolution called eagerly through XLA, compiled again per batch shape into a cache the
    process never frees: timing a 200-layer grouped model took the server from 1 to 16 GB. The timing runs the
    graph the jobs run (grouped_conv_without_xla): no convolution whose input channels differ from its kernel's."""
    from keras.src.backend.tensorflow import nn as backend_nn

    grouped_calls = []
    original = backend_nn.conv

    def counted(inputs, kernel, *args, **kwargs):
        if inputs.shape[-1] != kernel.shape[-2]:
            grouped_calls.append(inputs.shape)
        return original(inputs, kernel, *args, **kwargs)

    monkeypatch.setattr(backend_nn, "conv", counted)
    keras.utils.set_random_seed(3)
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 1)(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", groups=4)(keras.layers.Conv2D(8, 3, padding="same", groups=8)(x))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x)))
    model(np.zeros((1, 12, 12, 3), np.float32))
    assert len(grouped_calls) == 2  # the spy sees Keras's own eager path
    grouped_calls.clear()
    assert precision.measured_speedup(model, (12, 12)) > 0
    assert grouped_calls == []
