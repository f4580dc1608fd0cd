"""The model's graph: its layers (nested models entered), the tensors between them, sub-models cut at any point.

The bottom of the model side of `audit`: `models`, `heads`, `groups` and everything that reads a model
import this, and it imports none of them. A layer is named by its path (`base/block1_conv1` inside a
nested model). The graph is always re-run on a fresh symbolic input rather than read from
`layer.output`: a Sequential model loaded from a file keeps a stale partial graph there, and a nested
model's layers have their own separate graph.

Two questions a user's decision rests on are answered here, from the graph alone:
- where a filter's channel is used (`where_used`): after the per-channel layers that follow it
  (BatchNormalization, its activation, dropout), the tensor the next layer reads; and whether that
  tensor has a zero floor (`zero_floored`), the condition for APoZ and "dead" to mean anything
  (Hu et al. 2016 count zeros after the ReLU);
- which map the classifier reads (`cam_layer`): the last conv followed forward through per-channel
  layers and merges at the same spatial size, as Keras's Grad-CAM example takes Xception's
  `block14_sepconv2_act`.
"""

from __future__ import annotations

import difflib
import weakref
from dataclasses import dataclass

import keras
import numpy as np

from audit.errors import AuditError, UnknownLayerError

CONV_TYPES = frozenset({
    "Conv1D", "Conv2D", "Conv3D", "SeparableConv1D", "SeparableConv2D", "DepthwiseConv1D",
    "DepthwiseConv2D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
})


def iter_layers(model: keras.Model, prefix: str = ""):
    """Yield (path, layer, depth) for every layer, descending into nested models (path `outer/inner`)."""
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        yield path, layer, prefix.count("/")
        if isinstance(layer, keras.Model):
            yield from iter_layers(layer, path + "/")


def activation_name(layer) -> str | None:
    """The name of a layer's activation (`relu` for a ReLU layer), None for layers without one."""
    if type(layer).__name__ == "ReLU":
        return "relu"
    activation = getattr(layer, "activation", None)
    if activation is None:
        return None
    name = getattr(activation, "__name__", None) or type(activation).__name__
    return name


def weighted_layers(model: keras.Model) -> list[str]:
    """Paths of the layers that carry weights (nested models themselves left out), in order."""
    return [path for path, layer, _ in iter_layers(model) if layer.weights and not isinstance(layer, keras.Model)]


def conv_layers(model: keras.Model) -> list[str]:
    """Paths of all convolutional layers, in order."""
    return [path for path, layer, _ in iter_layers(model) if type(layer).__name__ in CONV_TYPES]


def output_channels(model: keras.Model, name: str) -> int:
    """Channels (filters, units) of a layer's output: a DepthwiseConv2D has inputs x multiplier of them."""
    output = get_layer(model, name).output
    return int((output[0] if isinstance(output, (list, tuple)) else output).shape[-1])


def resolve_layer(model: keras.Model, name: str) -> str:
    """The full path of a layer given its path or its bare name (when that is unique)."""
    paths = [path for path, _, _ in iter_layers(model)]
    if name in paths:
        return name
    matches = [path for path in paths if path.rsplit("/", 1)[-1] == name]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UnknownLayerError(f"Layer name {name!r} is ambiguous: {', '.join(matches)}. Give its path.")
    close = difflib.get_close_matches(name, paths + [p.rsplit("/", 1)[-1] for p in paths], n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownLayerError(f"The model has no layer {name!r}.{hint}")


def get_layer(model: keras.Model, name: str):
    """The layer object at a path (or unique bare name)."""
    layer = model
    try:  # a full path: one lookup per nesting level
        for part in name.split("/"):
            layer = layer.get_layer(part)
        return layer
    except (ValueError, AttributeError):
        pass
    path = resolve_layer(model, name)
    for candidate, layer, _ in iter_layers(model):
        if candidate == path:
            return layer
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Point:
    """One tensor of a model's graph, named by layer path: the layer's output, its output before its own
    (fused) activation, or its input (what a separate Softmax or Activation layer receives)."""

    path: str
    where: str = "output"  # "output", "pre_activation" or "input"


def submodel(model: keras.Model, layers: str | list[str], pre_activation: bool = False,
             any_size: bool = False) -> keras.Model:
    """A model from the input to the named layers' outputs, sharing the original's weights.

    Keras builds a Functional model from its outputs backwards, so nothing past the requested
    layers is computed. With `pre_activation`, layers with a fused activation (Conv2D(activation=
    "relu")) give their output before it. With `any_size`, the input takes images of any height and
    width (fine up to a conv layer, not through a Flatten or Dense).
    """
    single = isinstance(layers, str)
    names = [layers] if single else list(layers)
    if not names:
        raise AuditError("submodel needs at least one layer name.")
    where = "pre_activation" if pre_activation else "output"
    cut = graph_model(model, [Point(name, where) for name in names], any_size=any_size)
    return keras.Model(cut.inputs[0], cut.outputs[0], name=cut.name) if single else cut


def graph_model(model: keras.Model, points: list[Point], any_size: bool = False,
                extra=None, replace=None) -> keras.Model:
    """A model from a fresh input to the tensors at `points`, in one run of the model's own graph.

    The graph is re-run on a new input rather than read from `layer.output`: a Sequential model
    loaded from a file keeps a stale partial graph there (node 0), and a nested model's layers have
    their own separate graph. Nested models are entered, so a layer inside a pretrained base and the
    head that reads the base come from the same pass, and gradients flow from one to the other.
    `extra(tensors) -> tensors` may add computations on the found tensors (e.g. the class scores);
    `replace(layer) -> callable or None` swaps layers for others in the new graph (guided ReLUs), the
    loaded model itself unchanged.
    """
    points = [Point(resolve_layer(model, point.path), point.where) for point in points]
    wanted: dict[str, set[str]] = {}
    for point in points:
        wanted.setdefault(point.path, set()).add(point.where)
    shape = model.inputs[0].shape
    new_input = keras.Input(batch_shape=(None, None, None, shape[-1]) if any_size else shape,
                            dtype=model.inputs[0].dtype)
    found: dict[Point, object] = {}
    trace(model, new_input, wanted, "", found, replace)
    missing = [point.path for point in points if point not in found]
    if missing:
        raise AuditError(f"The layers {', '.join(missing)} are not on the path from the model's input to its "
                         "outputs (a layer the graph never calls, or one inside a nested model with several "
                         "inputs).")
    outputs = [found[point] for point in points]
    if extra is not None:
        outputs = extra(outputs)
    name = f"{model.name}_to_{points[-1].path.replace('/', '_')}"
    return keras.Model(new_input, outputs, name=name)


def has_fused_activation(layer) -> bool:
    """Whether a layer applies a non-linear activation of its own (so its pre-activation differs)."""
    return activation_name(layer) not in (None, "linear") and hasattr(layer, "get_config") \
        and "activation" in layer.get_config()


def linear_twin(layer, input_shape=None):
    """A copy of a layer with its activation removed, carrying the same weights."""
    config = {**layer.get_config(), "activation": "linear", "name": f"{layer.name}_pre_activation"}
    twin = type(layer).from_config(config)
    twin.build(input_shape if input_shape is not None else layer.input.shape)
    twin.set_weights(layer.get_weights())
    return twin


def trace(model: keras.Model, x, wanted: dict[str, set[str]], prefix: str, found: dict, replace=None):
    """Call `model`'s layers on symbolic `x`, entering nested models that hold a wanted layer (all of them
    with `replace`); store the wanted tensors in `found` and return the model's output."""

    def wrap(layer):
        path = prefix + layer.name

        def call(*args, **kwargs):
            inside = isinstance(layer, keras.Model) and len(layer.inputs) == 1 \
                and (replace is not None or any(w.startswith(path + "/") for w in wanted))
            swapped = None if inside or replace is None else replace(layer)
            if inside:
                output = trace(layer, args[0], wanted, path + "/", found, replace)
            else:
                output = (swapped or layer)(*args, **kwargs)
            for where in wanted.get(path, ()):
                if where == "input":
                    found[Point(path, where)] = args[0]
                elif where == "pre_activation" and has_fused_activation(layer):
                    found[Point(path, where)] = linear_twin(layer, args[0].shape)(*args, **kwargs)
                else:
                    found[Point(path, where)] = output
            return output

        return call

    if isinstance(model, keras.Sequential):
        for layer in model.layers:
            x = wrap(layer)(x)
        return x
    return model._run_through_graph(x, operation_fn=wrap)  # Keras 3's own graph walk (Functional.call uses it)




# --- the flattened graph: every leaf layer call, and who reads what ------------------------------

@dataclass
class Call:
    """One call of a leaf layer in the flattened graph (nested models entered)."""

    path: str
    layer: object
    inputs: list
    output: object

    @property
    def kind(self) -> str:
        return type(self.layer).__name__


def as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def flat_calls(model: keras.Model, batch_shape: tuple | None = None) -> tuple[list[Call], object, list]:
    """Every leaf layer call of the model on a fresh input (of `batch_shape`, else the model's own), nested
    models entered, in execution order; with that input and the model's outputs. Symbolic: nothing runs."""
    paths = {id(layer): path for path, layer, _ in iter_layers(model)}
    calls: list[Call] = []

    def record(layer):
        def call(*args, **kwargs):
            output = layer(*args, **kwargs)
            inputs = [t for t in keras.tree.flatten(args) if isinstance(t, keras.KerasTensor)]
            calls.append(Call(paths.get(id(layer), layer.name), layer, inputs, output))
            return output

        return call

    shape = batch_shape or model.inputs[0].shape
    new_input = keras.Input(batch_shape=shape, dtype=model.inputs[0].dtype)
    outputs = trace(model, new_input, {}, "", {}, record)
    return calls, new_input, as_list(outputs)


# --- what one image costs, from symbolic shapes ------------------------------------------------

def _values(tensor) -> int:
    return int(np.prod([d or 1 for d in tensor.shape[1:]], dtype=np.int64))


def _macs(call: Call) -> int:
    """Multiply-adds of one call for one image: convolutions and dense layers (the rest is element-wise)."""
    layer, kind = call.layer, call.kind
    if not call.inputs or not hasattr(layer, "kernel_size") and kind != "Dense":
        return 0
    out, source = as_list(call.output)[0], call.inputs[0]
    channels_in, channels_out = int(source.shape[-1] or 1), int(out.shape[-1] or 1)
    positions_out = _values(out) // channels_out
    kernel = int(np.prod(getattr(layer, "kernel_size", (1,))))
    if kind == "Dense":
        return _values(source) * channels_out
    if kind.startswith("Depthwise"):
        return positions_out * channels_out * kernel
    if kind.startswith("Separable"):
        middle = channels_in * int(getattr(layer, "depth_multiplier", 1))
        return positions_out * middle * kernel + positions_out * middle * channels_out
    if kind.endswith("Transpose"):
        return (_values(source) // channels_in) * channels_in * kernel * channels_out
    return positions_out * channels_out * kernel * channels_in // int(getattr(layer, "groups", 1) or 1)


@dataclass(frozen=True)
class Cost:
    """What one image costs a model at one input size, read from the graph's symbolic shapes."""

    activation_bytes: int  # every layer's output, float32: what a pass that keeps all maps holds
    peak_bytes: int  # the most held at once when each output is freed after its last reader
    macs: int  # multiply-adds of the convolutions and dense layers
    layers: int  # leaf layer calls


_COSTS: "weakref.WeakKeyDictionary[keras.Model, dict]" = weakref.WeakKeyDictionary()


def cost(model: keras.Model, size: tuple[int, int] | None = None) -> Cost:
    """The cost of one image of `size` (height, width; the model's own input size when it has one), from the
    shapes Keras infers symbolically: nothing is allocated or computed, so a file can be judged before its
    first pass. Kept per model and size while the model lives."""
    known = _COSTS.setdefault(model, {})
    if size not in known:
        known[size] = _cost(model, size)
    return known[size]


def batch_within(model: keras.Model, batch_size: int, passes: int = 1, kept_per_image: int = 0) -> int:
    """The largest batch up to `batch_size` whose activations fit limits.BATCH_BYTES: one image's peak (times
    `passes`: 3 for a forward and a backward pass) plus what the job keeps per image (maps it returns)."""
    from audit import limits

    per_image = passes * cost(model).peak_bytes + int(kept_per_image)
    return int(max(1, min(batch_size, limits.BATCH_BYTES.value // max(per_image, 1))))


def _cost(model: keras.Model, size: tuple[int, int] | None) -> Cost:
    shape = tuple(model.inputs[0].shape)
    height = shape[1] or (size or (224, 224))[0]
    width = shape[2] or (size or (224, 224))[1]
    calls, _, outputs = flat_calls(model, (1, height, width, *shape[3:]))
    last_use: dict[int, int] = {}
    for index, call in enumerate(calls):
        for tensor in call.inputs:
            last_use[id(tensor)] = index
    for tensor in outputs:
        last_use[id(tensor)] = len(calls)
    freed = np.zeros(len(calls) + 2, np.int64)
    held = peak = total = 0
    for index, call in enumerate(calls):
        made = sum(4 * _values(tensor) for tensor in as_list(call.output))
        total += made
        held += made
        peak = max(peak, held)
        for tensor in as_list(call.output):
            freed[last_use.get(id(tensor), index) + 1] += 4 * _values(tensor)
        held -= freed[index + 1]
    return Cost(int(total), int(peak), int(sum(_macs(call) for call in calls)), len(calls))


class Flow:
    """The flattened graph read as producers and readers of tensors: which call made a tensor, which
    calls read it. Built once per model (`flow_of`)."""

    def __init__(self, model: keras.Model):
        self.calls, self.input, self.outputs = flat_calls(model)
        self.order = {id(call): index for index, call in enumerate(self.calls)}
        self._by_path: dict[str, Call] = {}
        self._producer: dict[int, Call] = {}
        self._readers: dict[int, list[Call]] = {}
        for call in self.calls:
            self._by_path.setdefault(call.path, call)  # a layer called twice: its first call
            for tensor in as_list(call.output):
                self._producer[id(tensor)] = call
            for tensor in call.inputs:
                self._readers.setdefault(id(tensor), []).append(call)

    def call(self, path: str) -> Call | None:
        return self._by_path.get(path)

    def producer(self, tensor) -> Call | None:
        return self._producer.get(id(tensor))

    def readers(self, tensor) -> list[Call]:
        return self._readers.get(id(tensor), [])


_FLOWS: "weakref.WeakKeyDictionary[keras.Model, Flow]" = weakref.WeakKeyDictionary()


def flow_of(model: keras.Model) -> Flow:
    """The model's Flow, kept while the model lives (the model's weights never change it)."""
    if model not in _FLOWS:
        _FLOWS[model] = Flow(model)
    return _FLOWS[model]


# --- where a filter's channel is used, and whether it has a zero floor ----------------------------

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
    1 x 1 classifier, a flat map)."""
    convs = conv_layers(model)
    if not convs:
        raise AuditError("The model has no convolutional layer to take a class activation map from.")
    cut = graph_model(model, [Point(path) for path in convs])
    for path, output in zip(reversed(convs), reversed(cut.outputs)):
        if len(output.shape) == 4 and (output.shape[1] or 2) * (output.shape[2] or 2) > 1:
            return path
    return convs[-1]


def cam_layer_and_reason(model: keras.Model) -> tuple[str, str]:
    """The default layer of Grad-CAM and its family, and why.

    From the last convolutional layer whose map is larger than 1 x 1, follow its output forward through
    per-channel layers (BatchNormalization, activations) and merges (Add, Multiply, Concatenate) while the
    map keeps its size; stop before pooling, resizing or flattening. The last tensor reached is the map the
    head reads: ResNet50's `conv5_block3_out` (after the residual Add and its ReLU, not the branch's conv),
    MobileNetV2's `out_relu`, VGG16's `block5_conv3` (a max-pool follows).
    """
    start = last_spatial_conv(model)
    flow = flow_of(model)
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
            if (reader.kind in PER_CHANNEL and not _mixes_channels(reader.layer)) or reader.kind in MERGES:
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
