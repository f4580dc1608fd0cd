"""KerasHub image classifiers as users get them, built from their configs with random weights at 64 px.

KerasHub (the Keras team's model library) is where Keras users get pretrained ResNet, MobileNet, EfficientNet,
CSPNet and DenseNet classifiers today: a backbone, a head, and a preprocessor whose ImageConverter says how
pixels become the input. These are small configs of the same classes (nothing is downloaded), for the
conformance table and the tests.
"""

from __future__ import annotations

import keras

CLASSES = 5  # as audit.zoo.architectures
SIZE = 64
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TORCH_SCALE = [1 / (255 * std) for std in IMAGENET_STD]
TORCH_OFFSET = [-mean / std for mean, std in zip(IMAGENET_MEAN, IMAGENET_STD)]


def _classifier(family: str, backbone, scale, offset=None) -> keras.Model:
    """keras_hub.models.<family>ImageClassifier over `backbone`, with its preprocessor and image converter."""
    import keras_hub

    converter = getattr(keras_hub.layers, f"{family}ImageConverter")(image_size=(SIZE, SIZE), scale=scale,
                                                                      offset=offset)
    preprocessor = getattr(keras_hub.models, f"{family}ImageClassifierPreprocessor")(image_converter=converter)
    return getattr(keras_hub.models, f"{family}ImageClassifier")(backbone=backbone, num_classes=CLASSES,
                                                                 preprocessor=preprocessor)


def resnet() -> keras.Model:
    import keras_hub

    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 128],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        image_shape=(SIZE, SIZE, 3))
    return _classifier("ResNet", backbone, TORCH_SCALE, TORCH_OFFSET)


def mobilenet_v3() -> keras.Model:
    import keras_hub

    backbone = keras_hub.models.MobileNetBackbone(
        stackwise_expansion=[[40, 56], [64, 144]], stackwise_num_blocks=[2, 2],
        stackwise_num_filters=[[16, 16], [24, 24]], stackwise_kernel_size=[[3, 3], [5, 5]],
        stackwise_num_strides=[[2, 1], [2, 1]], stackwise_se_ratio=[[None, None], [0.25, 0.25]],
        stackwise_activation=[["relu", "relu"], ["hard_swish", "hard_swish"]],
        stackwise_padding=[[1, 1], [2, 2]], output_num_filters=288, depthwise_filters=8, depthwise_stride=2,
        depthwise_residual=False, last_layer_filter=288, squeeze_and_excite=0.5, image_shape=(SIZE, SIZE, 3))
    return _classifier("MobileNet", backbone, 1 / 127.5, -1.0)


def efficientnet() -> keras.Model:
    """EfficientNet-B0's first two stages (MBConv with squeeze-and-excitation), its 1280-channel top conv."""
    import keras_hub

    backbone = keras_hub.models.EfficientNetBackbone(
        stackwise_width_coefficients=[1.0, 1.0], stackwise_depth_coefficients=[1.0, 1.0],
        stackwise_kernel_sizes=[3, 3], stackwise_num_repeats=[1, 2], stackwise_input_filters=[32, 16],
        stackwise_output_filters=[16, 24], stackwise_expansion_ratios=[1, 6],
        stackwise_squeeze_and_excite_ratios=[0.25, 0.25], stackwise_strides=[1, 2], stackwise_block_types=["v1", "v1"],
        stackwise_force_input_filters=[0, 0], stackwise_nores_option=[False, False], input_shape=(SIZE, SIZE, 3))
    return _classifier("EfficientNet", backbone, TORCH_SCALE, TORCH_OFFSET)


def cspnet() -> keras.Model:
    import keras_hub

    backbone = keras_hub.models.CSPNetBackbone(
        stem_filters=32, stem_kernel_size=3, stem_strides=1, stackwise_depth=[1, 1, 1],
        stackwise_strides=[1, 2, 2], stackwise_num_filters=[32, 64, 128], block_type="dark_block",
        stage_type="dark", image_shape=(SIZE, SIZE, 3))
    return _classifier("CSPNet", backbone, TORCH_SCALE, TORCH_OFFSET)


def densenet() -> keras.Model:
    import keras_hub

    backbone = keras_hub.models.DenseNetBackbone(stackwise_num_repeats=[2, 2, 2], growth_rate=8,
                                                 image_shape=(SIZE, SIZE, 3))
    return _classifier("DenseNet", backbone, TORCH_SCALE, TORCH_OFFSET)


def vgg() -> keras.Model:
    """Keras's clone rebuilds this backbone by code under another name (`vgg_backbone_3`)."""
    import keras_hub

    backbone = keras_hub.models.VGGBackbone(stackwise_num_repeats=[1, 1, 2], stackwise_num_filters=[16, 32, 64],
                                            image_shape=(SIZE, SIZE, 3))
    return _classifier("VGG", backbone, TORCH_SCALE, TORCH_OFFSET)


def xception() -> keras.Model:
    import keras_hub

    backbone = keras_hub.models.XceptionBackbone(stackwise_conv_filters=[[32, 64], [64, 128], [256, 256]],
                                                 stackwise_pooling=[True, True, False], image_shape=(SIZE, SIZE, 3))
    return _classifier("Xception", backbone, 1 / 127.5, -1.0)


def hgnetv2() -> keras.Model:
    """Two stages of Layer-subclass blocks (one light, with depthwise convs), Identity layers built with a dtype
    policy object (their config cannot be written), and a backbone whose output is a dict of stage maps."""
    import keras_hub

    backbone = keras_hub.models.HGNetV2Backbone(
        depths=[1, 2], embedding_size=16, hidden_sizes=[32, 64], stem_channels=[3, 8, 16], hidden_act="relu",
        use_learnable_affine_block=False, stackwise_stage_filters=[(16, 8, 32, 1, 1, 3), (32, 16, 64, 2, 1, 3)],
        apply_downsample=[False, True], use_lightweight_conv_block=[False, True], image_shape=(SIZE, SIZE, 3))
    return _classifier("HGNetV2", backbone, TORCH_SCALE, TORCH_OFFSET)


CLASSIFIERS = {"ResNet": resnet, "MobileNetV3": mobilenet_v3, "EfficientNet": efficientnet, "CSPNet": cspnet,
               "DenseNet": densenet, "VGG": vgg, "Xception": xception, "HGNetV2": hgnetv2}
"""KerasHub classifiers by family name."""
