"""Benchmark: what int8 does to a model, before and after pruning, printed side by side in one run.

For demo:vgg16 (HED's VGG16 conv base at 224 px: features, no classes) and the trained Conv-BN-ReLU network
with residual adds that bench/recovery.py trains (audit.zoo.residual, > 95% on generated shapes), and for each
pruned to 50% of its parameters (L1 for VGG16, BN scale for the residual network): the float32 and the int8
`.tflite` files' sizes, latency at batch 1 and throughput at batch 32 with the interpreter (LiteRT), top-1
agreement with float and accuracy (classes) or the relative error of the features, and the layers the
simulation finds most sensitive (one layer int8 at a time, on held-out images).

    python -m bench.quantization [--only vgg16|residual] [--held-out 300]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from audit import heads, images, models, pruning, quantization
from audit.zoo import residual


def _measure(name: str, model, calibration, held_out, labels) -> tuple[list[dict], pd.DataFrame]:
    head = heads.find_head(model)
    reference = quantization.raw_outputs(model, held_out, head)
    rows = []
    for precision in ("float32", "int8"):
        start = time.perf_counter()
        content = quantization.convert(model, calibration, integer=precision == "int8")
        converted = time.perf_counter() - start
        result = quantization.evaluate(content, held_out, labels, reference, head=head)
        rows.append({"model": name, "precision": precision, "MB": len(content) / 2**20,
                     "ms/image b1": 1000 * result["seconds_per_image"], "images/s b32": result["images_per_second"],
                     "agreement": result.get("agreement", np.nan), "accuracy": result.get("accuracy", np.nan),
                     "relative error": result.get("relative_error", np.nan), "convert s": converted})
    rows[1]["size float/int8"] = rows[0]["MB"] / rows[1]["MB"]
    rows[1]["b1 speed-up"] = rows[0]["ms/image b1"] / rows[1]["ms/image b1"]
    rows[1]["b32 speed-up"] = rows[1]["images/s b32"] / rows[0]["images/s b32"]
    start = time.perf_counter()
    sensitive = quantization.sensitivity(model, held_out[:64], labels[:64] if labels is not None else None,
                                         calibration=calibration)
    sensitive["seconds"] = time.perf_counter() - start
    order = ["agreement", "kl"] if "agreement" in sensitive else ["feature_error"]
    sensitive = sensitive.sort_values(order, ascending=[name == "agreement" for name in order])
    return rows, sensitive


def _photos(size: int, count: int) -> np.ndarray:
    """The sample photos and their mirror images, fitted to the model's input (uint8)."""
    found = [images.fit(images.sample(name), (size, size)) for name in images.SAMPLE_PHOTOS]
    found += [photo[:, ::-1] for photo in found]
    return np.stack(found[:count])


def vgg16(held_out: int) -> tuple[list[dict], list[pd.DataFrame]]:
    loaded = models.load("demo:vgg16")
    photos = loaded.preprocess(_photos(224, 24))
    calibration, test = photos[:8], photos[8:8 + min(held_out, 16)]
    rows, sensitive = _measure("demo:vgg16", loaded.model, calibration, test, None)
    scores = pruning.filter_scores(loaded.model, calibration)
    smaller = pruning.prune(loaded.model, pruning.to_target(loaded.model, scores, "l1", params=0.5, seed=0))
    pruned_rows, pruned_sensitive = _measure("demo:vgg16 pruned to 50% (L1)", smaller, calibration, test, None)
    return rows + pruned_rows, [sensitive.assign(model="demo:vgg16"), pruned_sensitive.assign(model="pruned")]


def trained_residual(held_out: int) -> tuple[list[dict], list[pd.DataFrame]]:
    model, train, test = residual.trained()
    calibration = train.images[:200].astype(np.float32)
    x, y = test.images[:held_out].astype(np.float32), test.labels[:held_out]
    rows, sensitive = _measure("residual BN CNN", model, calibration, x, y)
    scores = pruning.filter_scores(model, calibration, train.labels[:200])
    smaller = pruning.prune(model, pruning.to_target(model, scores, "bn_scale", params=0.5, seed=0))
    pruning.recalibrate_bn(smaller, train.images[:1000].astype(np.float32))
    pruned_rows, pruned_sensitive = _measure("residual pruned to 50% (BN scale, recalibrated)", smaller,
                                             calibration, x, y)
    return rows + pruned_rows, [sensitive.assign(model="residual"), pruned_sensitive.assign(model="pruned")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("vgg16", "residual"))
    parser.add_argument("--held-out", type=int, default=300)
    args = parser.parse_args()
    rows, sensitive = [], []
    for name, run in (("residual", trained_residual), ("vgg16", vgg16)):
        if args.only in (None, name):
            found_rows, found_sensitive = run(args.held_out)
            rows += found_rows
            sensitive += found_sensitive
            print(pd.DataFrame(found_rows).to_string(index=False, float_format=lambda v: f"{v:.3g}"), flush=True)
    print("\nThe whole run:")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print("\nMost sensitive layers (one layer int8 at a time, simulated on held-out images):")
    for table in sensitive:
        print(table.head(5).to_string(index=False, float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    main()
