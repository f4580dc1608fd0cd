"""What a filter fires on in the user's images: receptive fields against paper and gradients, the top
examples against a brute-force numpy search, in memory, in batches and in shards."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from audit import datasets, filters, models
from audit.errors import AuditError


def _chain() -> keras.Model:
    """16x16 input; conv 3x3 valid; conv 3x3 stride 2 same; zero padding 1; conv 3x3 valid (7x7 out)."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((16, 16, 1)),
        keras.layers.Conv2D(2, 3, name="c1"),
        keras.layers.Conv2D(2, 3, strides=2, padding="same", name="c2"),
        keras.layers.ZeroPadding2D(1, name="pad"),
        keras.layers.Conv2D(2, 3, name="c3"),
    ])


def test_the_receptive_field_of_a_three_conv_chain_is_the_one_on_paper():
    # on paper: c1 sees 3 px, jump 1; c2 (14 -> 7, "same" pads 1 in all, 0 before) 3 + 2 = 5 px, jump 2, from 0;
    # the padding moves the start to -2; c3 sees 5 + 2 * 2 = 9 px, jump 2: position p covers [2p - 2, 2p + 7)
    model = _chain()
    assert filters.receptive_field(model, "c3", 0, 0) == (0, 0, 7, 7)
    assert filters.receptive_field(model, "c3", 3, 2) == (4, 2, 13, 11)
    assert filters.receptive_field(model, "c3", 6, 6) == (10, 10, 16, 16)
    assert filters.receptive_field(model, "c1", 5, 7) == (5, 7, 8, 10)
    assert filters.receptive_field(model, "c2", 1, 0) == (2, 0, 7, 5)


def test_the_receptive_field_is_where_the_gradient_reaches():
    """With positive weights and no activation, d out[r, c] / d input is non-zero exactly on the field."""
    model = _chain()
    for layer in model.layers:
        layer.set_weights([np.abs(w) + 0.1 for w in layer.get_weights()])
    x = tf.constant(np.ones((1, 16, 16, 1), np.float32))
    for row, col in ((0, 0), (3, 2), (6, 6), (2, 5)):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = model(x)[0, row, col, 0]
        reached = np.argwhere(tape.gradient(value, x).numpy()[0, :, :, 0] != 0)
        top, left = reached.min(axis=0)
        bottom, right = reached.max(axis=0) + 1
        assert filters.receptive_field(model, "c3", row, col) == (top, left, bottom, right)


def test_a_squeeze_excitation_written_in_keras_ops_keeps_the_maps_field():
    """KerasHub's squeeze-and-excitation pools by `ops.mean(x, axis=(1, 2), keepdims=True)`: its gate is the whole
    image's context with no positions (as keras.applications' GlobalAveragePooling squeeze is counted), and the
    gated map keeps c1's field on paper (3 px, jump 1, "same" padding 1 before)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(2, 3, padding="same", name="c1")(inputs)
    gate = keras.layers.Conv2D(2, 1, activation="sigmoid", name="gate")(keras.ops.mean(x, axis=(1, 2), keepdims=True))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1, name="after")(x * gate))
    assert filters.receptive_field(model, "after", 3, 4) == (2, 3, 5, 6)
    assert filters.receptive_field(model, "c1", 0, 0) == (0, 0, 2, 2)


def test_vgg16_block3_conv1_sees_24_pixels_4_apart():
    """Known: after two 3x3 convs, a 2x2 pool, two more and a pool, block3_conv1 sees 24x24, jump 4, from -10."""
    model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(224, 224, 3))
    assert filters.receptive_field(model, "block3_conv1", 10, 20) == (30, 70, 54, 94)
    assert filters.receptive_field(model, "block3_conv1", 0, 0) == (0, 0, 14, 14)
    assert filters.receptive_field(model, "block1_conv1", 0, 0) == (0, 0, 2, 2)
    with pytest.raises(AuditError, match="outside"):
        filters.receptive_field(model, "block3_conv1", 56, 0)


def _small_model() -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((12, 12, 3)), keras.layers.Conv2D(4, 3, activation="relu", name="c1"),
                             keras.layers.MaxPooling2D(name="pool"), keras.layers.Conv2D(5, 3, activation="relu", name="c2")])


def _brute_force(maps: np.ndarray, k: int) -> list[tuple]:
    """(filter, rank, image, row, col, activation) by plain numpy: each image's first peak, the k largest."""
    rows = []
    for f in range(maps.shape[-1]):
        found = []
        for image in range(len(maps)):
            flat = maps[image, :, :, f].ravel()
            position = int(np.argmax(flat))
            found.append((-float(flat[position]), image, position))
        for rank, (negative, image, position) in enumerate(sorted(found)[:k]):
            rows.append((f, rank, image, position // maps.shape[2], position % maps.shape[2], -negative))
    return rows


def _rows(frame) -> list[tuple]:
    return [(int(r.filter), int(r.rank), int(r.image), int(r.row), int(r.col), float(r.activation))
            for r in frame.itertuples()]


def test_top_examples_equal_a_brute_force_search_in_memory_in_batches_and_in_shards():
    model = _small_model()
    x = np.random.default_rng(2).uniform(0, 1, (10, 12, 12, 3)).astype(np.float32)
    x[7] = x[3]  # a tie: the lower image index first
    maps = keras.Model(model.inputs, model.get_layer("c2").output)(x).numpy()
    expected = _brute_force(maps, 3)
    whole = filters.top_examples(model, "c2", x, k=3)
    got = _rows(whole)
    assert [row[:5] for row in got] == [row[:5] for row in expected]
    np.testing.assert_allclose([row[5] for row in got], [row[5] for row in expected], rtol=1e-6)
    batched = filters.top_examples(model, "c2", datasets.in_memory(x, None, 3), k=3, total=10)
    assert _rows(batched) == got
    shards = [filters.top_examples(model, "c2", x[:4], k=3), filters.top_examples(model, "c2", x[4:], k=3, first_image=4)]
    assert _rows(filters.merge_top(shards, 3)) == got
    assert sorted(whole.loc[whole["filter"] == 0, "image"]) == sorted(r[2] for r in expected if r[0] == 0)
    chosen = filters.top_examples(model, "c2", x, filters=[4, 1], k=2)
    assert sorted(set(chosen["filter"])) == [1, 4] and len(chosen) == 4


def test_examples_are_cut_at_the_receptive_field_of_their_peak():
    model = _small_model()
    x = np.random.default_rng(3).uniform(0, 1, (4, 12, 12, 3)).astype(np.float32)
    found = filters.top_examples(model, "c2", x, filters=[0], k=2)
    cut = filters.patches(model, found, x)
    for row, patch in zip(found.itertuples(), cut):
        top, left, bottom, right = filters.receptive_field(model, "c2", int(row.row), int(row.col))
        np.testing.assert_array_equal(patch, x[int(row.image)][top:bottom, left:right])
        assert patch.shape[:2] == (min(bottom, 12) - top, right - left) and patch.shape[0] <= 8  # c1 sees 3, the pool 4, c2 4 + 2 * 2


def test_a_bad_filter_or_k_is_refused_in_words():
    model = _small_model()
    x = np.zeros((2, 12, 12, 3), np.float32)
    with pytest.raises(AuditError, match="filters 0 to 4"):
        filters.top_examples(model, "c2", x, filters=[5])
    with pytest.raises(AuditError, match="at least 1"):
        filters.top_examples(model, "c2", x, k=0)
    with pytest.raises(AuditError, match="no layer"):
        filters.top_examples(model, "nope", x)
    assert models.resolve_layer(model, "c2") == "c2"


def test_a_small_receptive_field_is_framed_inside_a_window_around_it():
    """A first layer's 3x3 field at output (5, 7) covers rows 5-7 and columns 7-9 of a 32 px image: shown in the
    24 px window starting at row 6 - 12 = -6 -> 0 (clipped at the border) and column 8 - 12 = -4 -> 0, the field's
    own pixels untouched and the ring just outside it yellow; a field of 24 px or more is cut as before."""
    import pandas as pd

    from audit.examples import FRAME

    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 3, name="c")(inputs))
    image = np.random.default_rng(5).integers(0, 200, (32, 32, 3)).astype(np.uint8)
    found = pd.DataFrame({"filter": [0], "rank": [0], "image": [0], "row": [5], "col": [7], "activation": [1.0]})
    (window,) = filters.patches(model, found, [image], layer="c", context=24)
    assert window.shape == (24, 24, 3)
    np.testing.assert_array_equal(window[5:8, 7:10], image[5:8, 7:10])  # the field itself
    ring = np.zeros((24, 24), bool)
    ring[4:9, 6:11] = True
    ring[5:8, 7:10] = False
    assert (window[ring] == FRAME).all() and ring.sum() == 16
    np.testing.assert_array_equal(window[~ring], image[:24, :24][~ring])  # the rest of the window as it is
    (field,) = filters.patches(model, found, [image], layer="c")  # no context: the field alone
    np.testing.assert_array_equal(field, image[5:8, 7:10])
    grey = filters.patches(model, found, [image[..., 0]], layer="c", context=24)[0]  # a grey image framed in colour
    assert grey.shape == (24, 24, 3) and (grey[5:8, 7:10, 1] == image[5:8, 7:10, 0]).all()
