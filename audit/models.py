"""Models: load one by its source string, check what one image costs, and warm it up once.

The model side of `audit` in three rooms under this one: audit.graph (the model's graph: layers, nested
models, sub-models, where a filter is used, the CAM layer, the cost of one image), audit.sources (where a
model comes from: demos, HED, keras.applications, files and uploads with their screens) and
audit.loaded_model (what a loaded model is: LoadedModel, its preprocessing, fingerprint and layer table).
Their public names are re-exported here, so `models.load`, `models.submodel` and the rest keep working.
"""

from __future__ import annotations

import time
from pathlib import Path

import keras
import numpy as np

from audit import limits
from audit.errors import ModelFileError
from audit.graph import (  # noqa: F401 (the model graph's public names, long read from here)
    CONV_TYPES,
    Point,
    activation_name,
    conv_layers,
    filter_layers,
    get_layer,
    graph_model,
    has_fused_activation,
    iter_layers,
    output_channels,
    resolve_layer,
    submodel,
    weighted_layers,
)
from audit.cost import cost as graph_cost
from audit.usage import cam_layer, cam_layer_and_reason, class_conv, where_used, zero_floored  # noqa: F401
from audit.loaded_model import (  # noqa: F401
    LoadedModel,
    check_image_model,
    detect_preprocessing,
    layer_table,
)
from audit.preprocessing_evidence import CANDIDATES as PREPROCESSING_CANDIDATES, preprocessing_evidence  # noqa: F401
from audit.sources import (  # noqa: F401
    DEFAULT_SOURCE,
    DEMO_SOURCES,
    KERAS_APPLICATIONS,
    SHAPES_DEMOS,
    imagenet_class_names,
    open_source,
    parse_source,
)


def load(source: str = DEFAULT_SOURCE, allow_download: bool = False) -> LoadedModel:
    """Load a model by its source string, check it takes images, and warm it up once.

    keras.applications weights missing from the Keras cache are downloaded only with `allow_download`.
    """
    kind, argument = parse_source(source)
    loaded = open_source(source, allow_download)
    check_image_model(loaded.model)
    shown = loaded.display_name or (Path(argument).name if kind == "file" else loaded.title)
    loaded.cost = check_cost(loaded.model, loaded.input_size, shown)
    try:  # the first call traces the graph the pages use (grouped convolutions without XLA); paid at load, and timed
        one = np.zeros((1, *loaded.input_size, loaded.model.inputs[0].shape[-1]), np.float32)
        start = time.perf_counter()
        loaded.predict(one)
        traced = time.perf_counter()
        loaded.predict(one)
        loaded.trace_seconds = max((traced - start) - (time.perf_counter() - traced), 0.0)
    except Exception as exc:  # noqa: BLE001 (a model that cannot run one image is refused in a sentence)
        text = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise ModelFileError(f"{shown} loaded, but running it on one image failed "
                             f"({type(exc).__name__}: {text}).") from exc
    return loaded


def check_cost(model: keras.Model, size: tuple[int, int], shown: str):
    """What one image costs at the size the pages run it (audit.cost, from symbolic shapes), against
    this server's limits, before anything is computed: the activations held at once, the multiply-adds and
    the layer count. A 30 KB file asking for an 8 GB activation is refused here, not by the kernel."""
    found = graph_cost(model, size)
    limits.ACTIVATION_BYTES.check(found.peak_bytes, f"{shown} (one image at {size[0]}×{size[1]})", ModelFileError)
    limits.MACS.check(found.macs, f"{shown} (one image at {size[0]}×{size[1]})", ModelFileError)
    limits.LAYERS.check(found.layers, shown, ModelFileError)
    return found
