"""Pruning by dependency groups on the networks people use, each saved to .keras and loaded back.

For each model, filters are removed from a layer inside a block and from a coupled group (a residual
add, a concatenation, a depthwise pass-through, a squeeze-and-excitation gate). The parameters lost
are counted by hand from the groups (each layer's kernel dimensions with the channels that stay),
the smaller model's class scores equal the masked model's on real photos, and the smaller file loads
in a fresh process, with plain Keras and through our own screen.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from audit import groups, heads, images, models, pruning
from audit.graph import as_list
from audit.zoo import architectures

CASES = {  # model, (a layer inside a block, a layer of a coupled group)
    "ResNet50": (lambda: keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=5),
                 ("conv3_block2_1_conv", "conv2_block2_3_conv")),
    "MobileNetV2 (alpha 0.35)": (lambda: keras.applications.MobileNetV2(alpha=0.35, weights=None,
                                                                         input_shape=(64, 64, 3), classes=5),
                                 ("block_3_expand", "block_2_project")),
    "EfficientNetB0": (lambda: keras.applications.EfficientNetB0(weights=None, input_shape=(64, 64, 3), classes=5),
                       ("block2a_expand_conv", "block3b_project_conv")),
    "DenseNet121": (lambda: keras.applications.DenseNet121(weights=None, input_shape=(64, 64, 3), classes=5),
                    ("conv3_block4_1_conv", "conv2_block3_2_conv")),
    "Xception": (lambda: keras.applications.Xception(weights=None, input_shape=(71, 71, 3), classes=5),
                 ("block4_sepconv1", "block3_sepconv2")),
    "VGG16 transfer (nested)": (architectures.vgg16_base_sequential, ("vgg16/block3_conv2", "vgg16/block5_conv3")),
}


def _expected_drop(model: keras.Model, graph: groups.DependencyGraph, chosen: set[int]) -> int:
    """Parameters lost, counted per layer from its kernel's shape and the channels that stay."""
    drop = 0
    for call in graph.calls:
        if not call.layer.weights:
            continue
        output = as_list(call.output)[0]
        cout = len(graph.elements(output))
        out_kept = cout - int(graph.removed(output, chosen).sum())
        cin = len(graph.elements(call.inputs[0]))
        in_kept = cin - int(graph.removed(call.inputs[0], chosen).sum())
        if in_kept == cin and out_kept == cout:
            continue
        shapes = [tuple(w.shape) for w in call.layer.weights]
        bias = int(getattr(call.layer, "use_bias", False))
        if call.kind == "Conv2D":
            kh, kw = shapes[0][:2]
            after = kh * kw * in_kept * out_kept + bias * out_kept
        elif call.kind == "Dense":
            after = in_kept * out_kept + bias * out_kept
        elif call.kind == "SeparableConv2D":
            kh, kw, _, m = shapes[0]
            after = kh * kw * in_kept * m + in_kept * m * out_kept + bias * out_kept
        elif call.kind == "DepthwiseConv2D":
            kh, kw, _, m = shapes[0]
            after = kh * kw * in_kept * m + bias * in_kept * m
        elif call.kind == "BatchNormalization":
            after = len(shapes) * out_kept
        else:
            raise AssertionError(f"no hand count for {call.kind}")
        drop += sum(int(np.prod(shape)) for shape in shapes) - after
    return drop


@pytest.fixture(scope="module")
def photos():
    return [images.sample(name) for name in ("chelsea", "astronaut", "coffee")]


SLOWEST = {"DenseNet121", "ResNet50", "Xception", "EfficientNetB0", "MobileNetV2 (alpha 0.35)"}
"""Over 25 s each here: the slow tier (CI runs it too; ResNet50 is also cut to a target in test_pruning_targets);
DenseNet121 and Xception (45-60 s each) only with CNN_AUDIT_ALL_ARCHITECTURES=1, as the heaviest rows of
test_architectures."""
ALL_ONLY = {"DenseNet121", "Xception"}


def _marks(name: str) -> list:
    if name not in SLOWEST:
        return []
    return [pytest.mark.slow] + ([] if name not in ALL_ONLY or os.environ.get("CNN_AUDIT_ALL_ARCHITECTURES") else [
        pytest.mark.skipif(True, reason="set CNN_AUDIT_ALL_ARCHITECTURES=1 to run it (not in CI: CI's hour)")])


@pytest.mark.parametrize("name", [pytest.param(name, marks=_marks(name)) for name in CASES])
def test_groups_cut_from_a_block_and_a_coupled_group_equal_the_masked_model(name, photos, tmp_path):
    build, (inner, coupled) = CASES[name]
    keras.utils.set_random_seed(0)
    build().save(tmp_path / "model.keras")
    loaded = models.load(f"file:{tmp_path / 'model.keras'}")
    model = loaded.model
    graph = groups.DependencyGraph(model)
    selection = {inner: [0, 3], coupled: [1]}
    chosen, kept = graph.expand(selection)
    assert not kept and len(chosen) == 3
    group = next(g for g in graph.groups() if g.index == graph.group_of(coupled, 1))
    assert group.coupled_by or name.startswith("VGG16"), group  # tied by an add, a concatenation, ...

    smaller = pruning.prune(model, selection, graph)
    assert model.count_params() - smaller.count_params() == _expected_drop(model, graph, chosen)
    x = loaded.preprocess(photos)
    head = loaded.head()
    got = np.asarray(heads.scores_model(smaller, head)(x))
    expected = np.asarray(heads.scores_model(pruning.masked(model, selection, graph), head)(x))
    original = np.asarray(heads.scores_model(model, head)(x))
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    assert np.abs(original - expected).max() > 1e-4 * np.abs(expected).max()  # the cut changed something
    if "/" in inner:  # nested models keep their structure: a smaller base inside the same head
        assert isinstance(smaller.layers[0], keras.Model) and smaller.layers[0].name == inner.split("/")[0]

    path = tmp_path / "smaller.keras"
    smaller.save(path)
    assert models.load(f"file:{path}").model.count_params() == smaller.count_params()  # our own screen
    fresh = subprocess.run([sys.executable, "-c", "import sys, keras; m = keras.saving.load_model(sys.argv[1]); "
                            "print(m.count_params())", str(path)], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert int(fresh.stdout.split()[-1]) == smaller.count_params()


def test_the_readme_lists_what_the_groups_follow():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for layers, role in groups.SUPPORTED.items():
        assert f"| {layers} | {role} |" in readme, layers
