"""Quantisation: what int8 does to a model, layer by layer, and the integer model itself, measured.

One idea per module, each reading the ones before it: `arithmetic` (quantise-dequantise by TensorFlow Lite's
formulas), `ranges` (weights per channel, activations where the integer model materialises them, what breaks
per-tensor int8), `simulate` (the float model with int8 rounding in place; per-layer sensitivity), `convert`
(TensorFlow Lite's converter, layers kept in float) and `measure` (the interpreter on held-out images).
"""

from audit.quantization.arithmetic import parameters, quantize_dequantize  # noqa: F401
from audit.quantization.convert import convert, interpreter, tensor_types  # noqa: F401
from audit.quantization.measure import THROUGHPUT_BATCH, evaluate, run, throughput  # noqa: F401
from audit.quantization.ranges import (  # noqa: F401
    OUTLIER_RATIO,
    TAIL_RATIO,
    activation_ranges,
    problems,
    quantized_layers,
    ranges,
    weight_ranges,
)
from audit.quantization.simulate import (  # noqa: F401
    comparable,
    fake_quantized,
    outputs,
    per_tensor_ranges,
    raw_outputs,
    sensitivity,
)
