"""Numbers on the shapes of model people open, each loaded back from a .keras file.

Grad-CAM for a class is checked against the paper's formula on the layer chain: with the conv maps
A (h x w x K) followed by global average pooling and a dense head, d score_c / d A_k(i, j) =
W[k, c] / (h w), so the weights are W[:, c] / (h w) and the map is ReLU(sum_k weight_k A_k); with a
Flatten, the weights are the dense kernel's rows for each channel averaged over positions. A is
computed by calling the conv layers directly, not through audit's graph machinery.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from audit import attribution, filters, heads, models, pruning
from audit.errors import AuditError

layers = keras.layers


def _from_file(model: keras.Model, tmp_path, name="model") -> models.LoadedModel:
    path = tmp_path / f"{name}.keras"
    model.save(path)
    return models.load(f"file:{path}")


def _image(shape, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32)


def _gap_cam(maps: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The paper's Grad-CAM for a GAP + dense head: weights = W[:, c] / (h w)."""
    h, w = maps.shape[:2]
    return np.maximum((maps * (weights / (h * w))).sum(axis=-1), 0)


def _base(seed=0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(6, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv2")(x)
    return keras.Model(inputs, x, name="base")


def test_grad_cam_by_class_on_a_nested_base_equals_the_formula(tmp_path):
    model = keras.Sequential([keras.Input((16, 16, 3)), _base(), layers.GlobalAveragePooling2D(),
                              layers.Dense(4, activation="softmax", name="head")], name="transfer")
    loaded = _from_file(model, tmp_path)
    image = _image((16, 16, 3))
    base = loaded.model.get_layer("base")
    maps = np.asarray(base.get_layer("conv2")(base.get_layer("conv1")(image[None])))[0]
    kernel = loaded.model.get_layer("head").get_weights()[0]
    assert models.cam_layer(loaded.model) == "base/conv2"
    for target in range(4):
        got = attribution.grad_cam(loaded.model, image, target, upsample=False)
        np.testing.assert_allclose(got, _gap_cam(maps, kernel[:, target]), rtol=1e-4, atol=1e-6)


def test_grad_cam_on_a_sequential_from_a_file_with_a_flatten_head(tmp_path):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((12, 12, 3)), layers.Rescaling(1 / 255), layers.Conv2D(5, 3, activation="relu", name="conv"),
        layers.MaxPooling2D(), layers.Flatten(), layers.Dense(3, name="logits")])
    loaded = _from_file(model, tmp_path)
    assert loaded.preprocessing == "raw" and "Rescaling" in loaded.preprocessing_reason
    image = _image((12, 12, 3)) * 255
    conv = loaded.model.get_layer("conv")
    maps = np.asarray(conv(image[None] / 255))[0]  # (10, 10, 5)
    kernel = loaded.model.get_layer("logits").get_weights()[0].reshape(5, 5, 5, 3)  # after the 2x2 max pool
    a = tf.constant(maps[None])
    for target in range(3):
        with tf.GradientTape() as tape:  # the pool routes each gradient to its window's maximum
            tape.watch(a)
            score = (tf.reshape(tf.nn.max_pool2d(a, 2, 2, "VALID"), (1, -1)) @ kernel.reshape(-1, 3))[:, target]
        gradient = tape.gradient(score, a).numpy()[0]
        expected = np.maximum((maps * gradient.mean(axis=(0, 1))).sum(axis=-1), 0)
        got = attribution.grad_cam(loaded.model, image, target, upsample=False)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("activation", ["sigmoid", None])
def test_a_single_unit_head_is_binary_and_both_classes_have_maps(tmp_path, activation):
    model = keras.Sequential([keras.Input((16, 16, 3)), _base(2), layers.GlobalAveragePooling2D(),
                              layers.Dense(1, activation=activation, name="unit")])
    loaded = _from_file(model, tmp_path)
    head = loaded.head()
    assert head.is_classifier and head.binary and head.classes == 2 and head.distribution == "sigmoid"
    image = _image((16, 16, 3), seed=3)
    base = loaded.model.get_layer("base")
    maps = np.asarray(base(image[None]))[0]
    w = loaded.model.get_layer("unit").get_weights()[0][:, 0]
    np.testing.assert_allclose(attribution.grad_cam(loaded.model, image, 1, upsample=False), _gap_cam(maps, w),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(attribution.grad_cam(loaded.model, image, 0, upsample=False), _gap_cam(maps, -w),
                               rtol=1e-4, atol=1e-6)
    # probabilities are [1 - p, p] of the unit's sigmoid, also for the linear (logits) unit
    logit = float(maps.mean(axis=(0, 1)) @ w + loaded.model.get_layer("unit").get_weights()[1][0])
    p = 1 / (1 + np.exp(-logit))
    np.testing.assert_allclose(loaded.predict(image[None])[0], [1 - p, p], rtol=1e-5)


def test_class_names_come_from_the_image_folders_in_keras_order_when_the_model_has_none(tmp_path):
    """A transfer-learning model saved without class names: image_dataset_from_directory numbered its class
    folders in sorted order, so folders 'dogs' and 'cats' are classes 1 and 0."""
    model = keras.Sequential([keras.Input((16, 16, 3)), _base(2), layers.GlobalAveragePooling2D(),
                              layers.Dense(1, name="unit")])
    head = _from_file(model, tmp_path).head()
    names, origin = heads.class_names(None, head, ["dogs", "cats", None, "dogs"])
    assert names == ["cats", "dogs"] and "image folders" in origin
    # three folders for two classes, or no classifier: no guess
    assert heads.class_names(None, head, ["a", "b", "c"]) == (["class 0", "class 1"], "")
    assert heads.class_names(["no", "yes"], head, ["cats", "dogs"]) == (["no", "yes"], "the model")
    features = _from_file(keras.Sequential([keras.Input((16, 16, 3)), _base(2)]), tmp_path, "features").head()
    assert heads.class_names(None, features, ["cats"]) == ([], "")


@pytest.mark.parametrize("class_first", [True, False])
def test_a_two_output_model_explains_its_classifier_in_either_order(tmp_path, class_first):
    keras.utils.set_random_seed(4)
    inputs = keras.Input((16, 16, 3))
    maps = _base(4)(inputs)
    pooled = layers.GlobalAveragePooling2D()(maps)
    classes = layers.Dense(3, activation="softmax", name="classes")(pooled)
    box = layers.Dense(4, name="box")(pooled)
    model = keras.Model(inputs, [classes, box] if class_first else [box, classes])
    loaded = _from_file(model, tmp_path)
    head = loaded.head()
    assert head.path == "classes" and head.output == (0 if class_first else 1)
    image = _image((16, 16, 3), seed=5)
    a = np.asarray(loaded.model.get_layer("base")(image[None]))[0]
    kernel = loaded.model.get_layer("classes").get_weights()[0]
    for target in range(3):
        np.testing.assert_allclose(attribution.grad_cam(loaded.model, image, target, upsample=False),
                                   _gap_cam(a, kernel[:, target]), rtol=1e-4, atol=1e-6)
    probabilities = loaded.predict(image[None])[0]
    np.testing.assert_allclose(probabilities, np.asarray(loaded.model(image[None])[0 if class_first else 1])[0],
                               rtol=1e-5)
    # the regression output can be chosen on purpose: it has no classes
    assert not loaded.head(1 if class_first else 0).is_classifier
    with pytest.raises(AuditError, match="no class output"):
        attribution.grad_cam(loaded.model, image, 0, output=1 if class_first else 0)


def test_the_class_score_is_the_input_of_a_separate_softmax_layer(tmp_path):
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(3, 3, use_bias=False), layers.BatchNormalization(),
                              layers.Activation("relu"), layers.Flatten(), layers.Dense(4, name="dense"),
                              layers.Activation("softmax")])
    loaded = _from_file(model, tmp_path)
    head = loaded.head()
    assert head.point.where == "input" and head.distribution == "softmax"
    x = _image((2, 8, 8, 1))
    logits_model = keras.Model(loaded.model.inputs[0], loaded.model.get_layer("dense").output)
    np.testing.assert_allclose(heads.scores_model(loaded.model, head)(x), logits_model(x), rtol=1e-5)


def test_features_out_of_a_pooled_base_are_not_classes():
    model = keras.applications.MobileNetV2(include_top=False, pooling="avg", weights=None, input_shape=(32, 32, 3))
    head = heads.find_head(model)
    assert not head.is_classifier and "features" in head.description
    image = _image((32, 32, 3))
    target = attribution.resolve_target(model, image, None)
    assert isinstance(target, attribution.FilterTarget)


def test_logits_heads_give_the_same_taylor_scores_and_kl_as_their_softmax_twin():
    keras.utils.set_random_seed(6)
    inputs = keras.Input((10, 10, 3))
    x = layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = layers.GlobalAveragePooling2D()(x)
    softmax = keras.Model(inputs, layers.Dense(3, activation="softmax", name="out")(x))
    logits = keras.models.clone_model(softmax, clone_function=lambda layer: type(layer).from_config(
        {**layer.get_config(), "activation": "linear"} if layer.name == "out" else layer.get_config()))
    logits.set_weights(softmax.get_weights())
    images = _image((6, 10, 10, 3), seed=7)
    labels = np.array([0, 1, 2, 0, 1, 2])
    np.testing.assert_allclose(pruning.taylor_scores(logits, "conv", images, labels),
                               pruning.taylor_scores(softmax, "conv", images, labels), rtol=1e-4)


    def what_if(model):
        return pruning.what_if(model, {"conv": [1]}, images, labels)

    with_softmax, with_logits = what_if(softmax), what_if(logits)
    assert np.isfinite(with_logits["kl"]) and with_logits["kl"] > 0
    assert with_logits == pytest.approx(with_softmax, rel=1e-4)


def _depthwise_model(seed=7) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="depthwise")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU(6.0, name="relu6")(x)
    x = layers.SeparableConv2D(4, 3, padding="same", name="separable")(x)
    outputs = layers.Dense(2, activation="softmax", name="out")(layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(seed)  # BN statistics that are not the identity, so zeroing must reach them
    model.get_layer("bn").set_weights([rng.uniform(0.5, 1.5, 6), rng.normal(0, 0.3, 6), rng.normal(0, 0.3, 6),
                                       rng.uniform(0.5, 1.5, 6)])
    return model


def test_masking_one_depthwise_channel_changes_that_channel_only():
    model = _depthwise_model()
    x = _image((2, 8, 8, 3), seed=8) * 2 - 1
    before = np.asarray(models.submodel(model, "relu6")(x))
    copy = pruning.masked(model, {"depthwise": [3]})
    after = np.asarray(models.submodel(copy, "relu6")(x))
    np.testing.assert_array_equal(after[..., 3], 0)
    np.testing.assert_allclose(np.delete(after, 3, axis=-1), np.delete(before, 3, axis=-1), rtol=1e-6)
    assert np.abs(before[..., 3]).max() > 0.01  # the channel was alive before


def test_depthwise_and_separable_scores_are_per_output_channel():
    model = _depthwise_model()
    kernel = model.get_layer("depthwise").kernel.numpy()  # (3, 3, 3 inputs, 2 multiplier)
    l1 = pruning.l1_norms(model, "depthwise")
    assert l1.shape == (6,)
    for c in range(3):
        for m in range(2):  # output channel c * 2 + m
            assert l1[c * 2 + m] == pytest.approx(np.abs(kernel[:, :, c, m]).sum(), rel=1e-6)
    similarity, _, _ = pruning.redundancy(model, "depthwise")
    flat = pruning.filter_kernels(model, "depthwise")  # the sparse full filters, as a plain conv holds them
    cosine = flat.T @ flat / np.outer(np.linalg.norm(flat, axis=0), np.linalg.norm(flat, axis=0))
    np.fill_diagonal(cosine, -np.inf)
    np.testing.assert_allclose(similarity, cosine.max(axis=1), rtol=1e-5)
    # separable: the composed filter equals what a plain conv needs to give the same output
    separable = model.get_layer("separable")
    composed = pruning.filter_kernels(model, "separable").reshape(3, 3, 6, 4)
    z = tf.constant(_image((1, 8, 8, 6), seed=9))
    np.testing.assert_allclose(separable(z) - separable.bias, tf.nn.conv2d(z, composed, 1, "SAME"), atol=1e-5)
    x = _image((4, 8, 8, 3), seed=10)
    scores = pruning.filter_scores(model, x)
    assert scores.groupby("layer").size().to_dict() == {"depthwise": 6, "separable": 4}


def test_guided_backprop_keeps_relu6_forward_and_only_changes_the_backward_pass():
    model = _depthwise_model()
    x = _image((1, 8, 8, 3), seed=11) * 40  # large inputs: many units above the cap of 6
    guided = attribution.Scorer(model, 0, replace=attribution.guided_replacement)
    plain = heads.scores_model(model, heads.find_head(model))
    np.testing.assert_allclose(guided.outputs(x)[-2], plain(x), rtol=1e-5)
    # backward: positive gradients only, and none through a unit above the cap
    relu = attribution.GuidedReLU(max_value=6.0)
    z = tf.constant([[-1.0, 2.0, 7.0, 3.0]])
    with tf.GradientTape() as tape:
        tape.watch(z)
        y = relu(z)
        loss = tf.reduce_sum(y * tf.constant([[1.0, 1.0, 1.0, -1.0]]))
    np.testing.assert_array_equal(y, [[0, 2, 6, 3]])
    np.testing.assert_array_equal(tape.gradient(loss, z), [[0, 1, 0, 0]])


@pytest.mark.slow  # about 40 s: every randomised copy the sanity check makes
def test_every_randomised_copy_of_a_batchnorm_model_gives_finite_outputs(tmp_path):
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=3)
    loaded = _from_file(model, tmp_path)
    x = _image((1, 32, 32, 3)) * 2 - 1
    steps = 0
    for done, copy in attribution.randomised_copies(loaded.model, seed=0):
        steps += 1
        assert np.all(np.isfinite(copy(x))), done[-1]
        layer = models.get_layer(copy, done[-1])
        if type(layer).__name__ == "BatchNormalization":
            assert (layer.moving_variance.numpy() > 0).all()
    assert steps == len(models.weighted_layers(loaded.model))
    rows = attribution.sanity_check(loaded.model, x[0], attribution.saliency, 0, limit=4)
    assert len(rows) == 4 and all(np.isfinite(value) for _, value in rows)


def test_a_non_finite_copy_is_an_error_not_a_number():
    model = _depthwise_model()
    x = _image((8, 8, 3), seed=12)

    def explode(layer):  # a layer whose fresh weights are NaN: its copy outputs NaN
        return [np.full_like(w, np.nan) for w in layer.get_weights()]

    from audit.attribution import trust

    original = trust._fresh_weights
    trust._fresh_weights = lambda layer, rng: explode(layer)
    try:
        with pytest.raises(AuditError, match="non-finite"):
            attribution.sanity_check(model, x, attribution.saliency, 0)
    finally:
        trust._fresh_weights = original


def test_the_cam_default_skips_a_1x1_classifier_conv():
    model = keras.applications.MobileNetV3Small(weights=None, input_shape=(64, 64, 3), classes=4)
    assert models.conv_layers(model)[-1] == "logits"
    layer = models.cam_layer(model)
    assert layer != "logits" and models.get_layer(model, layer).output.shape[1] > 1


@pytest.mark.slow  # 15-25 s here: the default tier stays near 15 minutes
def test_preprocessing_is_read_from_the_model(tmp_path):
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    vgg = _from_file(keras.Sequential([keras.Input((32, 32, 3)), base, layers.Flatten(), layers.Dense(2)]),
                     tmp_path, "vgg")
    assert vgg.preprocessing == "caffe" and "vgg16" in vgg.preprocessing_reason
    inputs = keras.Input((32, 32, 3))
    x = keras.Sequential([layers.RandomFlip("horizontal")], name="augmentation")(inputs)
    x = layers.Rescaling(1 / 127.5, offset=-1)(x)
    x = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))(x)
    tutorial = _from_file(keras.Model(inputs, layers.Dense(1)(layers.GlobalAveragePooling2D()(x))), tmp_path, "tl")
    assert tutorial.preprocessing == "raw" and "Rescaling" in tutorial.preprocessing_reason
    fed = tutorial.preprocess(np.full((32, 32, 3), 255, np.uint8))
    assert fed.max() == 255.0  # 0-255 in, the model's own Rescaling maps it to [-1, 1]
    plain = _from_file(keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(2, 3), layers.Flatten(),
                                         layers.Dense(2)]), tmp_path, "plain")
    assert plain.preprocessing == "unit" and "assumed" in plain.preprocessing_reason


def test_grayscale_galleries_and_class_images_start_from_grey_noise():
    keras.utils.set_random_seed(8)
    model = keras.Sequential([keras.Input((12, 12, 1)), layers.Conv2D(4, 3, activation="relu", name="conv"),
                              layers.Flatten(), layers.Dense(3, activation="softmax")])
    gallery = filters.render(model, "conv", [0, 1], filters.Options(size=16, steps=5))
    assert gallery.images.shape == (2, 16, 16, 1)
    classes = filters.class_images(model, [0, 2], filters.Options(steps=10, jitter=0, scale=0))
    assert classes.images.shape == (2, 12, 12, 1) and (classes.curves[:, -1] > classes.curves[:, 0]).all()


def test_galleries_of_deep_inception_layers_never_shrink_below_what_the_layer_needs():
    model = keras.applications.InceptionV3(weights=None, input_shape=(75, 75, 3), classes=3)
    cut = models.submodel(model, "mixed10", any_size=True)
    floor = filters.minimum_size(cut, 75)
    assert 60 < floor <= 75  # 75 is InceptionV3's documented minimum input
    with pytest.raises(Exception):
        cut(np.zeros((1, floor - 1, floor - 1, 3), np.float32))
    result = filters.render(model, "mixed10", [0], filters.Options(size=75, steps=2, octaves=3))
    assert result.images.shape == (1, 75, 75, 3)


def test_the_demo_shapes_keep_their_generators_class_order_for_a_model_saved_without_names(tmp_path):
    """A model trained on the demo shapes (audit.zoo.residual, saved to a file without class names) numbers the
    classes as the generator does, not alphabetically: read alphabetically it would look at chance."""
    from audit.zoo import shapes

    model = keras.Sequential([keras.Input((16, 16, 3)), _base(2), layers.GlobalAveragePooling2D(),
                              layers.Dense(len(shapes.CLASSES), activation="softmax")])
    head = _from_file(model, tmp_path).head()
    names, origin = heads.class_names(None, head, ["star", "circle", "ring"])
    assert names == list(shapes.CLASSES) == ["circle", "square", "triangle", "star", "cross", "ring"]
    assert "generator" in origin
