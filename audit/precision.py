"""A compute copy of a model in bfloat16: the same graph and weights, its layers computing in bfloat16.

Keras's `mixed_bfloat16` policy keeps each variable in float32 and casts it to bfloat16 for the computation, the
standard way to train and run on bfloat16 hardware (GPUs of compute capability 8.0 and up, CPUs with AMX or
AVX-512 BF16, through oneDNN). The copy is built once per model and dropped with it (a weak cache); the loaded
model itself is never changed. Whatever reads the copy's outputs gets float32 (graph.graph_model casts), so
sums, means, maxima and softmax stay float32. Surgery, exports and fine-tuning keep using the float32 model.
"""

from __future__ import annotations

import weakref

import keras

from audit import device

_COPIES: "weakref.WeakKeyDictionary[keras.Model, keras.Model]" = weakref.WeakKeyDictionary()
POLICY = "mixed_bfloat16"


def bfloat16_copy(model: keras.Model) -> keras.Model:
    """The model with every layer under the mixed_bfloat16 policy (the input stays float32), same weights."""
    if model not in _COPIES:
        def clone(layer):
            config = layer.get_config()
            if type(layer).__name__ != "InputLayer":
                config["dtype"] = keras.DTypePolicy(POLICY)
            return type(layer).from_config(config)

        copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
        copy.set_weights(model.get_weights())
        _COPIES[model] = copy
    return _COPIES[model]


def for_compute(model: keras.Model, precision: str | None = None) -> keras.Model:
    """The model heavy passes run on: its bfloat16 copy when the precision is bfloat16, else the model."""
    return bfloat16_copy(model) if (precision or device.precision()) == "bfloat16" else model
