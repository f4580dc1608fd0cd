"""Benchmark: int8 sensitivity one layer at a time on deep networks, a fake-quantised copy per layer (the old
path) against the switched graph that `quantization.sensitivity` runs, side by side in one run.

keras.applications bases at 64 px (weights=None, pooled features: a random network's softmax is too flat for
int8 to move it, its features are not), every conv layer, ranges calibrated on
`--images` photos and measured on as many others:
- old: per layer, `fake_quantized` (a Keras copy of the graph with that layer int8) called eagerly on the images,
  timed on a seeded sample of `--old-layers` layers and scaled to all of them;
- new: `quantization.sensitivity` (one traced graph with a switch per layer, and one float pass for every
  layer's own rounding error), cold (its graph traced in the run) and warm (a second run);
- the new runs' outputs equal the old path's on the sampled layers (largest difference of the feature error).

    python -m bench.int8_sensitivity [--only MobileNetV2|DenseNet121|ResNet50] [--images 16] [--old-layers 12]
"""

from __future__ import annotations

import argparse
import time

import keras
import numpy as np
import pandas as pd

from audit import heads, images, quantization
from audit.pruning.quality import QualitySums

MODELS = ("MobileNetV2", "ResNet50", "DenseNet121")


def _photos(count: int, size: int, skip: int = 0) -> np.ndarray:
    found = [images.fit(images.sample(name), (size, size)) for name in images.SAMPLE_PHOTOS]
    found += [photo[:, ::-1] for photo in found]
    return np.stack([found[(skip + i) % len(found)] for i in range(count)]).astype(np.float32) / 127.5 - 1


def run(name: str, count: int, old_layers: int) -> dict:
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(64, 64, 3), include_top=False, pooling="avg")
    calibration, held_out = _photos(count, 64), _photos(count, 64, skip=count)
    layers = quantization.quantized_layers(model)
    start = time.perf_counter()
    cold = quantization.sensitivity(model, held_out, calibration=calibration)
    cold_seconds = time.perf_counter() - start
    start = time.perf_counter()
    quantization.sensitivity(model, held_out, calibration=calibration)
    warm_seconds = time.perf_counter() - start

    limits = quantization.per_tensor_ranges(quantization.activation_ranges(model, layers, calibration)[0])
    head = heads.find_head(model)
    reference = quantization.outputs(model, held_out, head)
    sampled = sorted(np.random.default_rng(0).choice(len(layers), min(old_layers, len(layers)), replace=False))
    start, differences = time.perf_counter(), []
    for index in sampled:
        simulated = quantization.outputs(quantization.fake_quantized(model, limits, [layers[index]]), held_out, head)
        error = QualitySums.of(reference, simulated, classes=False).result()["feature_error"]
        differences.append(abs(error - cold.feature_error[index]))
    old_seconds = (time.perf_counter() - start) / len(sampled) * len(layers)
    return {"model": name, "layers": len(layers), "images": count, "old (scaled) s": old_seconds,
            "new cold s": cold_seconds, "new warm s": warm_seconds, "old / new cold": old_seconds / cold_seconds,
            "old / new warm": old_seconds / warm_seconds, "largest |error old - new|": max(differences),
            "largest feature error": float(cold.feature_error.max()), "worst rounding steps": float(cold.rounding_steps.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=MODELS)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--old-layers", type=int, default=12)
    args = parser.parse_args()
    rows = []
    for name in [args.only] if args.only else MODELS:
        rows.append(run(name, args.images, args.old_layers))
        print(pd.DataFrame(rows[-1:]).to_string(index=False, float_format=lambda v: f"{v:.3g}"), flush=True)
    print("\nThe whole run:")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    main()
