"""The model's graph: its layers (nested models entered), the tensors between them, sub-models cut at any point.

The bottom of the model side of `audit`: `models`, `heads`, `groups` and everything that reads a model
import this, and it imports none of them. A layer is named by its path (`base/block1_conv1` inside a
nested model). The graph is always re-run on a fresh symbolic input rather than read from
`layer.output`: a Sequential model loaded from a file keeps a stale partial graph there, and a nested
model's layers have their own separate graph. What the graph tells about one image's cost is audit.cost;
where a filter's channel is used and which map the head reads is audit.usage.
"""

from __future__ import annotations


import difflib
import itertools
import re
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
    """Yield (path, layer, depth) for every layer, descending into nested models (path `outer/inner`). The
    keras.ops calls of a functional graph come in their place among the layers (`is_operation`): ConvNeXt's
    residual `inputs + x` is the map its head reads, and a user asks for it by its node's name (`add_35`)."""
    for layer in (model.operations if isinstance(model, keras.Function) else model.layers):
        path = f"{prefix}{layer.name}"
        yield path, layer, prefix.count("/")
        if isinstance(layer, keras.Model):
            yield from iter_layers(layer, path + "/")


def is_operation(layer) -> bool:
    """A keras.ops call in a functional graph (`ops.add`, `ops.pad`): a node without weights or a layer's config."""
    return not isinstance(layer, keras.layers.Layer)


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
    return [path for path, layer, _ in iter_layers(model)
            if not is_operation(layer) and layer.weights and not isinstance(layer, keras.Model)]


def conv_layers(model: keras.Model) -> list[str]:
    """Paths of all convolutional layers, in order."""
    return [path for path, layer, _ in iter_layers(model) if type(layer).__name__ in CONV_TYPES]


def filter_layers(model: keras.Model) -> list[str]:
    """Paths of the layers whose output channels pruning ranks, in order: every conv layer, and the Dense layers
    applied to a map at each position (ConvNeXt's pointwise convolutions, 95% of its parameters: 1x1 convs in
    all but name). A Dense layer on a flat vector is a classifier's, left out as before."""
    pointwise = {call.path for call in flow_of(model).calls
                 if call.kind == "Dense" and call.inputs and len(call.inputs[0].shape) >= 4}
    return [path for path, layer, _ in iter_layers(model) if type(layer).__name__ in CONV_TYPES or path in pointwise]


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
    if any_size and replace is None:  # every nested model entered: its own Input would hold it to its old size
        replace = lambda layer: None  # noqa: E731
    if has_grouped_convs(model):
        chosen = replace
        replace = lambda layer: (chosen(layer) if chosen else None) or grouped_conv_without_xla(layer)  # noqa: E731
    trace(model, new_input, wanted, "", found, replace)
    missing = [point.path for point in points if point not in found]
    if missing:
        raise AuditError(f"The layers {', '.join(missing)} are not on the path from the model's input to its "
                         "outputs (a layer the graph never calls, or one inside a nested model with several "
                         "inputs).")
    # a bfloat16 compute copy (audit.precision) hands on float32: sums, maxima and softmax stay exact
    outputs = [_float32(found[point]) for point in points]
    if extra is not None:
        outputs = extra(outputs)
    return keras.Model(new_input, outputs, name=scope_name(f"{model.name}_to_{points[-1].path}"))


def rename_for_tensorflow(model: keras.Model) -> dict[str, str]:
    """Give the model and every layer (nested ones too) a name TensorFlow takes as a scope, in place; the renamed
    ones, old name to new. Keras saves and loads `my conv` or `conv![l](x)`, but every traced call of such a
    layer fails ("not a valid scope name"), and every page traces."""
    taken = {layer.name for layer in _every_layer(model)}
    renamed = {}
    for layer in [model, *_every_layer(model)]:
        if layer.name != scope_name(layer.name):
            new, index = scope_name(layer.name), 1
            while new in taken:
                new, index = f"{scope_name(layer.name)}_{index}", index + 1
            renamed[layer.name] = layer.name = new
            taken.add(new)
    return renamed


def _every_layer(model) -> list:
    found = []
    for layer in getattr(model, "layers", []):
        found.append(layer)
        found += _every_layer(layer)
    return found


def is_depthwise(layer) -> bool:
    """A depthwise convolution: DepthwiseConv1D/2D, or a Conv with one group per input channel (ConvNeXt's and
    KerasHub MobileNet's form), whose output channel c * m + j reads input channel c alone."""
    if type(layer).__name__ in ("DepthwiseConv1D", "DepthwiseConv2D"):
        return True
    return _groups(layer) > 1 and int(layer.kernel.shape[-2]) == 1


def is_grouped(layer) -> bool:
    """A Conv whose groups each read several input channels (ResNeXt, RegNet): its channels go by whole groups."""
    return _groups(layer) > 1 and int(layer.kernel.shape[-2]) > 1


def _groups(layer) -> int:
    if type(layer).__name__ not in ("Conv1D", "Conv2D", "Conv3D") or getattr(layer, "kernel", None) is None:
        return 1
    return int(getattr(layer, "groups", 1) or 1)


def depthwise_kernel(layer) -> np.ndarray:
    """A depthwise layer's kernel as (*space, input channels, multiplier): a grouped Conv's (*space, 1, filters)
    holds output c * m + j in column c * m + j, the same order."""
    kernel = np.asarray(layer.kernel)
    if type(layer).__name__.startswith("Depthwise"):
        return kernel
    return kernel.reshape(*kernel.shape[:-2], int(layer.groups), kernel.shape[-1] // int(layer.groups))


def has_grouped_convs(model: keras.Model) -> bool:
    return any(_grouped(layer) for layer in _every_layer(model))


def _grouped(layer) -> bool:
    return type(layer).__name__ == "Conv2D" and _groups(layer) > 1 \
        and getattr(layer, "data_format", "channels_last") == "channels_last"


def grouped_conv_without_xla(layer):
    """A grouped Conv2D as one layer computing a depthwise convolution (one group per channel) or one convolution
    per group and a concatenation, or None for any other layer. Keras runs a grouped convolution through XLA on
    the CPU, compiled again for each batch shape into a cache the process never frees (200 grouped layers: 1.3 GB
    per new batch shape, 4.2 GB left after the model went); these need no XLA and give the same numbers. A layer,
    not loose keras.ops calls: those would take names ("add") a loaded model's own nodes may already hold."""
    return GroupedConvWithoutXLA(layer) if _grouped(layer) else None


class GroupedConvWithoutXLA(keras.layers.Layer):
    """See grouped_conv_without_xla; it shares the wrapped layer's kernel and bias."""

    def __init__(self, conv):
        super().__init__(name=scope_name(f"{conv.name}_without_xla"), dtype=conv.dtype_policy)
        self.conv = conv

    def build(self, input_shape):
        self.built = True

    def call(self, x):
        conv, groups = self.conv, int(self.conv.groups)
        kernel = keras.ops.cast(conv.kernel, x.dtype)
        if groups == int(x.shape[-1]):  # one group per channel (ConvNeXt's depthwise): a depthwise convolution
            height, width, _, filters = kernel.shape
            y = keras.ops.depthwise_conv(x, keras.ops.reshape(kernel, (height, width, groups, filters // groups)),
                                         strides=conv.strides, padding=conv.padding, dilation_rate=conv.dilation_rate)
        else:
            y = keras.ops.concatenate([
                keras.ops.conv(part, weights, strides=conv.strides, padding=conv.padding,
                               dilation_rate=conv.dilation_rate)
                for part, weights in zip(keras.ops.split(x, groups, axis=-1), keras.ops.split(kernel, groups, axis=-1))
            ], axis=-1)
        if conv.use_bias:
            y = y + keras.ops.cast(conv.bias, y.dtype)
        return conv.activation(y)

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)


def scope_name(name: str) -> str:
    """A name TensorFlow takes as a root name scope (letters, digits, `_.-`, not starting with `_` or `-`): a
    model a user named "my model" broke every page that built a sub-model named after it."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return safe if re.match(r"[A-Za-z0-9.]", safe) else f"m{safe}"


def has_fused_activation(layer) -> bool:
    """Whether a layer applies a non-linear activation of its own (so its pre-activation differs)."""
    return activation_name(layer) not in (None, "linear") and hasattr(layer, "get_config") \
        and "activation" in layer.get_config()


def linear_twin(layer, input_shape=None):
    """A copy of a layer with its activation removed, carrying the same weights."""
    config = {**layer.get_config(), "activation": "linear", "name": scope_name(f"{layer.name}_pre_activation")}
    twin = type(layer).from_config(config)
    twin.build(input_shape if input_shape is not None else layer.input.shape)
    twin.set_weights(layer.get_weights())
    return twin


class Step(keras.layers.Layer):
    """One computation of ours in a graph built over a loaded model, as a layer with a name of its own: a loose
    keras.ops call takes an automatic name ("multiply", "cast") counted per thread, which the model's own nodes
    (a squeeze-excite's `x * gate`, loaded in another thread) may already hold, and Keras refuses the graph."""

    _made = itertools.count()

    def __init__(self, function, label: str):
        super().__init__(name=f"cnn_audit_{label}_{next(Step._made)}")
        self.function = function

    def call(self, *args):
        return self.function(*args)


def _float32(tensor):
    """A tensor as float32 (a bfloat16 compute copy's outputs); float32 and multi-output values as they are."""
    if isinstance(tensor, (list, tuple)) or getattr(tensor, "dtype", "float32") in ("float32", "int32", "int64"):
        return tensor
    return Step(lambda x: keras.ops.cast(x, "float32"), "float32")(tensor)


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
                    output = _float32(output)  # a bfloat16 copy's tensor, read and differentiated as float32
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
