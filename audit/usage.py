"""Two questions a user's decision rests on, read from the model's graph.

- Where a filter's channel is used (`where_used`): after the per-channel layers that follow it
  (BatchNormalization, its activation, dropout), the tensor the next layer reads; and whether that tensor
  has a zero floor (`zero_floored`), the condition for APoZ and "dead" to mean anything (Hu et al. 2016
  count zeros after the ReLU).
- Which map the classifier reads (`cam_layer`): the last conv followed forward through per-channel layers
  and merges at the same spatial size, as Keras's Grad-CAM example takes Xception's `block14_sepconv2_act`.
"""

from __future__ import annotations

import keras

from audit.errors import AuditError
from audit.graph import (Call, Flow, Point, activation_name, as_list, conv_layers, flow_of, graph_model,
                         has_fused_activation, resolve_layer)


FILTER_MAKERS = frozenset({"Conv1D", "Conv2D", "Conv3D", "SeparableConv1D", "SeparableConv2D", "Conv1DTranspose",
                           "Conv2DTranspose", "Conv3DTranspose", "DepthwiseConv1D", "DepthwiseConv2D", "Dense"})
"""Layers whose output channels are filters (the ones statistics and pruning rank)."""
AFFINE = frozenset({"BatchNormalization", "LayerScale", "Dropout", "SpatialDropout1D", "SpatialDropout2D",
                    "SpatialDropout3D", "GaussianNoise", "GaussianDropout", "AlphaDropout", "Identity",
                    "ActivityRegularization"})
"""Per-channel layers that are affine (or the identity) at inference: a channel that is zero before one is
constant after it."""
PER_CHANNEL = AFFINE | {"Activation", "ReLU", "LeakyReLU", "ELU", "PReLU"}
"""Layers that act on each channel alone at the same position: a filter's chain runs through them."""
VALUE_KEEPING = frozenset({"MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D",
                           "AveragePooling3D", "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalAveragePooling1D",
                           "GlobalAveragePooling2D", "Flatten", "Reshape", "ZeroPadding1D", "ZeroPadding2D",
                           "Cropping1D", "Cropping2D", "UpSampling1D", "UpSampling2D", "Dropout", "SpatialDropout1D",
                           "SpatialDropout2D", "Identity", "Concatenate"})
"""Layers whose output is non-negative when their inputs are (a zero floor passes through them)."""
MERGES = frozenset({"Add", "Subtract", "Multiply", "Maximum", "Minimum", "Average", "Concatenate"})
ZERO_FLOOR_ACTIVATIONS = ("relu", "relu6")


def _mixes_channels(layer) -> bool:
    return type(layer).__name__ == "Activation" and activation_name(layer) in ("softmax", "log_softmax")


def is_zero_floor_activation(layer) -> bool:
    """A ReLU-family activation: its output is 0 wherever its input is at or below 0 (relu, relu6, a ReLU
    layer without a slope or threshold), so counting zeros (APoZ) and "never above 0" (dead) mean something."""
    if type(layer).__name__ == "ReLU":
        config = layer.get_config()
        return not config.get("negative_slope") and not config.get("threshold")
    return activation_name(layer) in ZERO_FLOOR_ACTIVATIONS


def chain_after(model: keras.Model, layer: str) -> list[Call]:
    """The layer's call and the per-channel layers that follow it while each tensor has one reader:
    BatchNormalization, activations, scaling, dropout; it stops before the first layer that mixes
    channels, merges or changes resolution (that layer is where the channel is used)."""
    flow = flow_of(model)
    call = flow.call(resolve_layer(model, layer))
    if call is None:
        return []
    chain = [call]
    while True:
        readers = flow.readers(as_list(chain[-1].output)[0])
        if len(readers) != 1 or readers[0].kind not in PER_CHANNEL or _mixes_channels(readers[0].layer):
            return chain
        chain.append(readers[0])


def where_used(model: keras.Model, layer: str) -> str:
    """The layer path at which a filter's channel is measured: where it is used.

    For a filter-making layer (conv, depthwise, dense), the end of its per-channel chain (`chain_after`):
    in Conv -> BN -> ReLU the ReLU, in ResNet's Conv -> BN -> Add the BN. When the chain's last
    non-linearity is a ReLU-family activation followed only by affine layers (Conv -> ReLU -> BN, a
    Dropout after the ReLU), that activation: a channel zero there is a constant after it, so its zero
    floor is where "dead" is decided. Any other layer is measured at its own output.
    """
    path = resolve_layer(model, layer)
    chain = chain_after(model, path)
    if not chain or chain[0].kind not in FILTER_MAKERS:
        return path
    for call in reversed(chain):
        if is_zero_floor_activation(call.layer):
            return call.path
        if call.kind not in AFFINE:
            break
    return chain[-1].path


def zero_floored(model: keras.Model, layer: str) -> bool:
    """Whether a layer's output comes out of a ReLU-family activation, directly or through layers that keep
    values non-negative (pooling, flatten, padding, dropout, concatenation of such outputs)."""
    flow = flow_of(model)
    pending = [flow.call(resolve_layer(model, layer))]
    while pending:
        call = pending.pop()
        if call is None:
            return False
        if is_zero_floor_activation(call.layer):
            continue
        if call.kind not in VALUE_KEEPING or has_fused_activation(call.layer) or not call.inputs:
            return False
        pending += [flow.producer(tensor) for tensor in call.inputs]
    return True


# --- the map the classifier reads --------------------------------------------------------------

def last_spatial_conv(model: keras.Model) -> str:
    """The last convolutional layer whose output is a map larger than 1 x 1 (MobileNetV3's last conv is a
    1 x 1 classifier, a flat map), not counting an all-convolutional head's class conv (`class_conv`)."""
    convs = conv_layers(model)
    if not convs:
        raise AuditError("The model has no convolutional layer to take a class activation map from.")
    head = class_conv(model)
    cut = graph_model(model, [Point(path) for path in convs])
    for path, output in zip(reversed(convs), reversed(cut.outputs)):
        if path != head and len(output.shape) == 4 and (output.shape[1] or 2) * (output.shape[2] or 2) > 1:
            return path
    return convs[-1]


CLASS_SCORES = ("softmax", "sigmoid")
HEAD_TAIL = frozenset({"GlobalAveragePooling2D", "GlobalMaxPooling2D", "Flatten", "Reshape", "Softmax"}) | PER_CHANNEL
"""What may follow an all-convolutional head's class conv on the way to the output: pooling and the softmax."""


def class_conv(model: keras.Model) -> str | None:
    """The class conv of an all-convolutional head (mini-Xception, SqueezeNet, Network-in-Network): the last
    conv, on a map larger than 1 x 1, with one channel per class of a model output, followed only by pooling,
    per-channel layers and a softmax (or sigmoid) up to that output. None for any other head: a base pooled
    to features (MobileNetV2 with pooling="avg") has no softmax."""
    convs = conv_layers(model)
    if not convs:
        return None
    flow = flow_of(model)
    call = flow.call(convs[-1])
    if call is None:
        return None
    tensor = as_list(call.output)[0]
    if len(tensor.shape) != 4 or (tensor.shape[1] or 2) * (tensor.shape[2] or 2) <= 1:
        return None
    outputs, scored = {id(output) for output in flow.outputs}, activation_name(call.layer) in CLASS_SCORES
    while id(tensor) not in outputs:
        readers = flow.readers(tensor)
        if len(readers) != 1 or readers[0].kind not in HEAD_TAIL:
            return None
        scored = scored or readers[0].kind == "Softmax" or activation_name(readers[0].layer) in CLASS_SCORES
        tensor = as_list(readers[0].output)[0]
    return call.path if scored and tensor.shape[-1] == as_list(call.output)[0].shape[-1] else None


def _position_wise(call: Call) -> bool:
    """A call that keeps each position of a map to itself: per-channel layers, merges, and what mixes channels
    at one position only (ConvNeXt's LayerNormalization over channels and its pointwise Dense layers)."""
    if call.kind in MERGES or (call.kind in PER_CHANNEL and not _mixes_channels(call.layer)) or call.kind == "Dense":
        return True
    if call.kind == "LayerNormalization":
        axes = [axis % 4 for axis in as_list(call.layer.axis)]
        return axes == [3]
    return False


def cam_layer_and_reason(model: keras.Model) -> tuple[str, str]:
    """The default layer of Grad-CAM and its family, and why.

    From the last convolutional layer whose map is larger than 1 x 1, follow its output forward through
    position-wise layers (BatchNormalization, activations, LayerNormalization over channels, pointwise Dense)
    and merges (Add, Multiply, Concatenate, keras.ops sums) while the map keeps its size; stop before pooling,
    resizing or flattening. The last tensor reached is the map the head reads: ResNet50's `conv5_block3_out`
    (after the residual Add and its ReLU, not the branch's conv), MobileNetV2's `out_relu`, VGG16's
    `block5_conv3` (a max-pool follows), ConvNeXt's last residual sum. An all-convolutional head reads the
    map its class conv takes.
    """
    flow = flow_of(model)
    head = class_conv(model)
    if head is not None:
        source = flow.producer(flow.call(head).inputs[0])
        if source is not None and source.path:
            classes = as_list(flow.call(head).output)[0].shape[-1]
            return source.path, (f"the map the all-convolutional head reads: {head} has one channel per class "
                                 f"({classes}) and only pooling and the softmax follow it")
    start = last_spatial_conv(model)
    first = flow.call(start)
    if first is None:
        return start, "the last convolutional layer with a spatial map"
    size = tuple(as_list(first.output)[0].shape[1:3])
    reached, pending, kinds = {id(first): first}, [first], []
    while pending:
        for reader in flow.readers(as_list(pending.pop().output)[0]):
            out = as_list(reader.output)[0]
            if id(reader) in reached or len(out.shape) != 4 or tuple(out.shape[1:3]) != size:
                continue
            if _position_wise(reader):
                reached[id(reader)] = reader
                pending.append(reader)
                kinds.append(reader.kind)
    last = max(reached.values(), key=lambda call: flow.order[id(call)])
    if last is first:
        return start, (f"the last convolutional layer with a spatial map; what follows it ({_next_kind(flow, first)}) "
                       "pools, resizes or flattens")
    through = ", ".join(dict.fromkeys(kinds))
    return last.path, (f"the map the head reads: the last convolutional layer, {start}, followed forward through "
                       f"{through} at the same {size[0]}×{size[1]} size, up to the pooling or flattening")


def _next_kind(flow: Flow, call: Call) -> str:
    readers = flow.readers(as_list(call.output)[0])
    return ", ".join(dict.fromkeys(reader.kind for reader in readers)) or "the model's output"


def cam_layer(model: keras.Model) -> str:
    """The default layer of Grad-CAM and its family (see cam_layer_and_reason)."""
    return cam_layer_and_reason(model)[0]
