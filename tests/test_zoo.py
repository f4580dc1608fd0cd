import numpy as np
import pytest

from audit.zoo import shapes
from audit.zoo.model import HEADS, WEIGHTS, build_model


def test_generator_is_deterministic_by_seed_and_index():
    a = shapes.generate(10, seed=7)
    b = shapes.generate(10, seed=7)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    first = shapes.generate(5, seed=7)
    np.testing.assert_array_equal(first.images, a.images[:5])  # image i does not depend on n
    assert not np.array_equal(shapes.generate(5, seed=8).images, first.images)
    assert a.images.dtype == np.uint8 and a.images.shape == (10, 64, 64, 3)
    assert a.masks.dtype == bool and a.masks.shape == (10, 64, 64)


def test_classes_are_balanced():
    data = shapes.generate(6 * 7, seed=0)
    assert len(shapes.CLASSES) >= 6
    assert np.bincount(data.labels).tolist() == [7] * len(shapes.CLASSES)


def test_masks_cover_the_object_and_only_the_object():
    data = shapes.generate(60, seed=3)
    cover = data.masks.mean(axis=(1, 2))
    assert cover.min() > 0.02 and cover.max() < 0.5
    for image, mask in zip(data.images.astype(float), data.masks):
        inside = image[mask].mean(axis=0)
        ring = np.zeros_like(mask)  # the background just around the object
        ys, xs = np.nonzero(mask)
        ring[max(ys.min() - 3, 0):ys.max() + 4, max(xs.min() - 3, 0):xs.max() + 4] = True
        ring &= ~mask
        # object pixels are one flat colour (small noise); background differs clearly from it
        assert image[mask].std(axis=0).max() < 20
        assert np.abs(image[ring] - inside).sum(axis=1).mean() > 60


@pytest.mark.parametrize("head", HEADS)
def test_the_demo_models_are_vgg_style_and_small(head):
    model = build_model(head=head)
    assert 200_000 < model.count_params() < 800_000
    conv = [layer.name for layer in model.layers if type(layer).__name__ == "Conv2D"]
    assert conv == [f"block{b}_conv{i}" for b in (1, 2, 3) for i in (1, 2)]
    cam_size = model.get_layer("block3_conv2").output.shape[1]  # the Grad-CAM layer: 16 x 16
    assert cam_size == 16 and (type(model.layers[-3]).__name__ == "GlobalAveragePooling2D") == (head == "gap")


@pytest.mark.parametrize("head", HEADS)
def test_trained_weights_reach_95_percent_on_fresh_images(head):
    model = build_model(head=head)
    model.load_weights(WEIGHTS[head])
    test = shapes.generate(600, seed=12345)  # a seed the training script never uses
    predicted = model.predict(test.images / np.float32(127.5) - 1, batch_size=100, verbose=0).argmax(axis=1)
    accuracy = (predicted == test.labels).mean()
    assert accuracy >= 0.95, accuracy
