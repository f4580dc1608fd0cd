"""Benchmark: bfloat16 against float32 on the same jobs, in one run: the speed-up and the agreement of each figure.

For demo:vgg16, demo:shapes and untrained MobileNetV2 and ResNet50 on the sample photos (demo shapes for the
demo:shapes model), each job runs on the loaded model and on its bfloat16 compute copy (audit.precision), and
prints: dead-flag agreement and the largest APoZ difference of the statistics, each attribution method's map
correlation, the Spearman correlation of each pruning score, Integrated Gradients' completeness error, the
gallery's median own-filter activation, and each job's time (best of `--repeats`).

    python -m bench.precision [--models demo:vgg16,demo:shapes,keras:MobileNetV2:untrained,keras:ResNet50:untrained]
"""

import argparse
import dataclasses

import numpy as np
from scipy.stats import spearmanr

from audit import activations, attribution, filters, images, models, precision, pruning
from bench.timing import best_of

METHODS = ("Saliency", "SmoothGrad", "Integrated Gradients", "Grad-CAM", "Grad-CAM++", "Score-CAM")


def inputs(loaded: models.LoadedModel, count: int):
    if loaded.source.startswith("demo:shapes"):
        from audit.zoo import shapes

        data = shapes.generate(count, 7)
        return loaded.preprocess(list(data.images)), data.labels
    photos = [images.sample(name) for name in images.SAMPLE_PHOTOS]
    return loaded.preprocess([photos[i % len(photos)] for i in range(count)]), None


def timed(repeats, job):
    job()  # warm: tracing is paid once per model and precision
    seconds = best_of(repeats, job)
    return job(), seconds


def row(name, exact_seconds, fast_seconds, agreement):
    print(f"  {name:34s} {exact_seconds:8.2f} s {fast_seconds:8.2f} s {exact_seconds / fast_seconds:7.2f}x   {agreement}")


def completeness(model, image, target, black):
    """|sum of IG's signed attributions - (score(x) - score(baseline))| over |score(x) - score(baseline)|."""
    signed = attribution.integrated_gradients(model, image, target, signed=True, black=black, steps=32)
    scorer = attribution.score_model(model, attribution.resolve_target(model, image, target))
    difference = float(scorer(image[None])[0] - scorer(black[None])[0])
    return abs(float(signed.sum()) - difference) / max(abs(difference), 1e-12)


def bench(source: str, count: int, repeats: int) -> None:
    loaded = models.load(source)
    exact, fast = loaded.model, precision.bfloat16_copy(loaded.model)
    x, labels = inputs(loaded, count)
    head = loaded.head()
    print(f"{source}: {count} images at {loaded.input_size[0]} px; float32, bfloat16, speed-up, agreement")
    layers = models.conv_layers(exact)
    (a, t32), (b, t16) = (timed(repeats, lambda m=m: activations.filter_stats(m, layers, x)) for m in (exact, fast))
    floored = a.apoz.notna()
    row("statistics (every conv layer)", t32, t16,
        f"dead flags {np.mean(a.dead == b.dead):.4%} equal ({int((a.dead != b.dead).sum())} of {len(a)} differ); "
        f"largest APoZ difference {np.abs(a.apoz[floored] - b.apoz[floored]).max():.4f}; "
        f"largest mean difference {np.nanmax(np.abs(a['mean'] - b['mean']) / (a['std'] + 1e-6)):.3f} std")
    (sa, t32), (sb, t16) = (timed(1, lambda m=m: pruning.filter_scores(m, x, labels)) for m in (exact, fast))
    correlations = []
    for criterion in ("mean", "apoz", "taylor"):
        if sa[criterion].notna().any():
            keep = sa[criterion].notna() & sb[criterion].notna()
            correlations.append(f"{criterion} {spearmanr(sa[criterion][keep], sb[criterion][keep]).statistic:.4f}")
    row("pruning scores", t32, t16, "Spearman " + ", ".join(correlations))
    image = x[0]
    black = loaded.preprocess(np.zeros((*loaded.input_size, 3), np.uint8))[0]
    target = 0 if head.is_classifier else None
    for method in METHODS:
        options = attribution.black_options(method, black)
        run = attribution.METHODS[method]
        (m32, t32), (m16, t16) = (timed(repeats, lambda m=m: run(m, image, target, **options)) for m in (exact, fast))
        agreement = f"map correlation {np.corrcoef(m32.ravel(), m16.ravel())[0, 1]:.4f}"
        if method == "Integrated Gradients" and head.is_classifier:
            agreement += (f"; completeness error {completeness(exact, image, 0, black):.2%} (float32), "
                          f"{completeness(fast, image, 0, black):.2%} (bfloat16)")
        row(method, t32, t16, agreement)
    layer = "block4_conv1" if "block4_conv1" in layers else layers[len(layers) * 2 // 3]
    options = dataclasses.replace(filters.default_options(exact, layer, loaded.preprocessing), size=128, steps=20)
    indices = list(range(min(16, models.output_channels(exact, layer))))
    (g32, t32), (g16, t16) = (timed(1, lambda m=m: filters.render(m, layer, indices, options)) for m in (exact, fast))
    row(f"gallery, 16 filters of {layer}", t32, t16,
        f"median own activation {np.median(g32.activations):.1f} (float32), {np.median(g16.activations):.1f} (bfloat16)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="demo:vgg16,demo:shapes,keras:MobileNetV2:untrained,keras:ResNet50:untrained")
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    for source in args.models.split(","):
        bench(source, args.images, args.repeats)


if __name__ == "__main__":
    main()
