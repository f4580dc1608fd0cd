"""A real integer model: TensorFlow Lite's converter, full-integer post-training quantisation calibrated on a
representative set drawn from the user's images, with chosen layers kept in float.

Keeping layers in float goes through the converter's quantization debugger (`denylisted_nodes`, the documented
way to quantise selectively): the converted graph's tensors are named by the Keras layers they come from
(`functional_1/conv2_1/convolution`, fused ops joined by `;`), so each kept layer's tensors are found by its
name, and afterwards its kernel must be float32 in the file, or the conversion is refused.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from typing import Callable

import keras
import numpy as np

from audit import models
from audit.errors import QuantizationError

REPRESENTATIVE_MOST = 256
"""Calibration images the converter runs one by one: TensorFlow's guide suggests a few hundred."""


def convert(model: keras.Model, images: np.ndarray, keep_float=(), representative: int = REPRESENTATIVE_MOST,
            progress: Callable[[int, int], None] | None = None, integer: bool = True) -> bytes:
    """The `.tflite` bytes of `model` with int8 weights and activations (float in and out), calibrated on up to
    `representative` of `images` (preprocessed), the layers in `keep_float` (paths, or names unique in the model)
    left in float. With `integer=False`, the float32 `.tflite` (the baseline an int8 model is measured against)."""
    import tensorflow as tf

    images = np.asarray(images, np.float32)
    if not len(images):
        raise QuantizationError("Converting to int8 needs calibration images; none were given.")
    chosen = images[:representative]
    keep = [models.resolve_layer(model, name) for name in keep_float]

    def dataset():
        for index in range(len(chosen)):
            if progress is not None:
                progress(index + 1, len(chosen))
            yield [chosen[index:index + 1]]

    def converter():
        with contextlib.redirect_stdout(io.StringIO()):  # the export prints its signatures
            made = tf.lite.TFLiteConverter.from_keras_model(model)
        if integer:
            made.optimizations = [tf.lite.Optimize.DEFAULT]
            made.representative_dataset = dataset
            made.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        return made

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            converted = converter().convert()
            if keep:
                nodes = [name for name in _op_outputs(converted) if any(_names_layer(name, path) for path in keep)]
                options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=nodes)
                debugger = tf.lite.experimental.QuantizationDebugger(converter=converter(), debug_dataset=dataset,
                                                                     debug_options=options)
                converted = debugger.get_nondebug_quantized_model()
    except QuantizationError:
        raise
    except Exception as exc:  # the converter raises many kinds (ConverterError, ValueError, RuntimeError)
        raise QuantizationError(f"TensorFlow Lite's converter refused this model: {_reason(exc)}.") from exc
    types = tensor_types(converted) if keep else {}
    still_int8 = [path for path in keep if not _kept_in_float(types, path)]
    if still_int8:
        raise QuantizationError(f"The layers {', '.join(still_int8)} were asked to stay in float but the converter "
                                "did not keep them (not found in the converted graph by their names).")
    return converted


def interpreter(content: bytes, threads: int | None = None):
    """A TFLite interpreter of the bytes: LiteRT's maintained package (ai-edge-litert), TensorFlow's own if it
    is not installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tensorflow.lite import Interpreter
    return Interpreter(model_content=content, num_threads=threads)


def tensor_types(content: bytes) -> dict[str, str]:
    """Every tensor of the converted model, its name to its type (int8, float32, int32)."""
    loaded = interpreter(content)
    return {detail["name"]: np.dtype(detail["dtype"]).name for detail in loaded.get_tensor_details()}


def _op_outputs(content: bytes) -> list[str]:
    """The names of the converted graph's tensors, which the debugger's denylist takes."""
    return list(tensor_types(content))


def _names_layer(tensor: str, path: str) -> bool:
    """Whether a converted tensor's name comes from the layer at `path` (its scope: every nested model's name on
    the way, each maybe suffixed `_1`, so `base/conv1` is not `head/conv1`)."""
    scope = "/".join(rf"{re.escape(part)}(_\d+)?" for part in path.split("/"))
    return re.search(rf"(^|[/;]){scope}/", tensor) is not None


def _kept_in_float(types: dict[str, str], path: str) -> bool:
    kernels = [kind for name, kind in types.items() if _names_layer(name, path)
               and re.search(r"/(convolution|MatMul|BiasAdd|depthwise)", name)]
    return bool(kernels) and all(kind == "float32" for kind in kernels)


def _reason(exc: Exception) -> str:
    """The converter's error in one clause: the operations it has no kernel for, else its first line."""
    text = str(exc)
    missing = sorted({op.strip() for found in re.findall(r"(?:TF Select ops|Custom ops): ([^\n]+)", text)
                      for op in found.split(",")})
    if missing:
        return (f"TensorFlow Lite has no built-in kernel for {', '.join(missing)} (change those layers, or keep "
                "the model in float)")
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
