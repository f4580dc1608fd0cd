"""Can a map be trusted: its mass and peak on a known object, deletion and insertion against random orders
(Petsiuk et al. 2018), and the sanity check of cascading randomisation (Adebayo et al. 2018)."""

from __future__ import annotations

import keras
import numpy as np

from audit import copies, cost, heads, models
from audit.attribution.targets import FilterTarget, Progress, Scorer, Target, report_progress, resolve_target
from audit.errors import AuditError, ImageError

def _same_grid(attribution: np.ndarray, mask: np.ndarray) -> None:
    if attribution.shape != mask.shape:
        raise ImageError(f"The object mask is {mask.shape[0]}x{mask.shape[1]} but the map is "
                         f"{attribution.shape[0]}x{attribution.shape[1]}: fit the mask as its image "
                         "(audit.images.fit_mask).")


def mass_inside(attribution: np.ndarray, mask: np.ndarray) -> float:
    """Share of the attribution mass that falls on the object."""
    _same_grid(attribution, mask)
    total = float(attribution.sum())
    return float(attribution[mask].sum()) / total if total > 0 else 0.0


def peak_inside(attribution: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the map's maximum falls on the object."""
    _same_grid(attribution, mask)
    return bool(mask.flat[int(np.argmax(attribution))])


DELETED_BY = "black pixels (the preprocessed black image), the most attributed first, 5% of the pixels a step"


RANDOM_ORDERS = 5
"""Seeded random orders a map's deletion and insertion areas must beat, each one (not their mean)."""


def deletion_measure(target: Target) -> str:
    """What a deletion curve measures for a target, as the dashboard names it."""
    return ("the filter's mean activation clipped at 0, relative to the intact image" if isinstance(target, FilterTarget)
            else "the target class's probability")


def deletion_curve(model: keras.Model, image: np.ndarray, attribution_map: np.ndarray, target: Target = None,
                   steps: int = 20, fill: np.ndarray | float = 0.0, output: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray, float]:
    """Deletion (Petsiuk et al. 2018): replace pixels by `fill` in the map's order, most attributed first,
    and measure the target after each step: a class's probability (softmax or sigmoid of the explained
    output), or a filter's mean activation clipped at 0 divided by its value on the intact image (NaN when
    the filter does not fire on the intact image: no share of nothing).

    Returns (fractions removed, measures, area under the curve): a lower area means the map found what
    the target depends on; random_curves gives the areas to beat.
    """
    order = np.argsort(np.asarray(attribution_map).ravel(), kind="stable")[::-1]
    fractions, values = _curves(model, image, [order], target, steps, fill, output, insert=False)
    return fractions, values[0], _area(values[0], fractions)


def insertion_curve(model: keras.Model, image: np.ndarray, attribution_map: np.ndarray, target: Target = None,
                    steps: int = 20, fill: np.ndarray | float = 0.0, output: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray, float]:
    """Insertion (Petsiuk et al. 2018): start from the `fill` image and put the image's pixels back in the map's
    order, most attributed first; the same measure as deletion. A higher area means the map found what the
    target depends on."""
    order = np.argsort(np.asarray(attribution_map).ravel(), kind="stable")[::-1]
    fractions, values = _curves(model, image, [order], target, steps, fill, output, insert=True)
    return fractions, values[0], _area(values[0], fractions)


def random_curves(model: keras.Model, image: np.ndarray, target: Target = None, steps: int = 20,
                  fill: np.ndarray | float = 0.0, output: int | None = None, orders: int = RANDOM_ORDERS,
                  seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The chance level of deletion and insertion: the same measures with pixels taken in `orders` seeded
    random orders. For each kind, (fractions, the mean curve, the area of every order). It does not depend on
    any map: one per image and target."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(np.shape(image)[:2]))
    permutations = [rng.permutation(size) for _ in range(orders)]
    found = {}
    for kind in ("deletion", "insertion"):
        fractions, values = _curves(model, image, permutations, target, steps, fill, output, insert=kind == "insertion")
        found[kind] = (fractions, values.mean(axis=0), np.array([_area(row, fractions) for row in values]))
    return found


def beats_random(kind: str, area: float, random_areas: np.ndarray) -> bool:
    """A map beats chance only when its area is better than every random order's by more than the random
    orders differ among themselves (their spread is the measure's noise): below the lowest deletion area
    minus that spread, above the highest insertion area plus it. A tie, a hair's breadth or a NaN is no win."""
    random_areas = np.asarray(random_areas, np.float64)
    if not np.isfinite(area) or not np.all(np.isfinite(random_areas)):
        return False
    spread = random_areas.max() - random_areas.min()
    if kind == "deletion":
        return bool(area < random_areas.min() - spread)
    return bool(area > random_areas.max() + spread)


def saturated(chance: tuple[np.ndarray, np.ndarray, np.ndarray]) -> bool:
    """Whether a deletion curve collapses at its first step in random order (the first 5% of pixels already
    take the measure below a tenth of the intact image's): its areas then differ only in that step and can
    hardly tell maps apart."""
    _, values, _ = chance
    return bool(np.isfinite(values[0]) and values[0] > 0 and values[1] < 0.1 * values[0])


def _area(values: np.ndarray, fractions: np.ndarray) -> float:
    return float(np.trapezoid(values, fractions))


def _curves(model, image, orders, target, steps, fill, output, insert: bool) -> tuple[np.ndarray, np.ndarray]:
    """(fractions, one measure curve per order): pixels taken from the image (deletion) or given back to the
    fill image (insertion) in each order."""
    image = np.asarray(image, np.float32)
    resolved = resolve_target(model, image, target, output)
    fractions = np.linspace(0, 1, steps + 1)
    fill = np.broadcast_to(np.asarray(fill, np.float32), image.shape)
    start, source = (fill, image) if insert else (image, fill)
    batch = np.repeat(start[None], len(orders) * len(fractions) + 1, axis=0)
    batch[-1] = image  # the intact image, the reference of a filter's measure
    for number, order in enumerate(orders):
        for row, fraction in enumerate(fractions):
            changed = np.zeros(order.size, bool)
            changed[order[:int(round(fraction * order.size))]] = True
            changed = changed.reshape(image.shape[:2])
            batch[number * len(fractions) + row][changed] = source[changed]
    if isinstance(resolved, FilterTarget):
        scorer = Scorer(model, resolved, output)
        size = cost.batch_within(model, 32)  # 106 images of 224 px at once took 9 GB on MobileNetV2

        def mean_activation(part: np.ndarray) -> np.ndarray:
            maps = np.maximum(np.asarray(scorer.outputs(part)[-2], np.float64)[..., resolved.index], 0)
            return maps.mean(axis=tuple(range(1, maps.ndim)))

        values = np.concatenate([mean_activation(batch[start:start + size]) for start in range(0, len(batch), size)])
        intact = values[-1]
        values = values[:-1] / intact if intact > 0 else np.full(len(values) - 1, np.nan)
    else:
        values = heads.Outputs(model, output)(batch[:-1], batch_size=32)[:, resolved]  # batched within the budget
    return fractions, values.reshape(len(orders), len(fractions))


def randomised_copies(model: keras.Model, seed: int = 0):
    """Cascading randomisation (Adebayo et al. 2018): yield (layers randomised so far, model copy),
    re-initialising the weighted layers from the top down on a clone, each with its own initialisers
    (a BatchNormalization gets its identity statistics back, never a negative variance); the original
    is untouched. Keras's global random seed is set from `seed` for each layer, so copies repeat."""
    clone, layer_of = copies.with_weights(model)
    weighted = [(path, layer_of(path)) for path in models.weighted_layers(model)]
    done = []
    for step, (path, layer) in enumerate(reversed(weighted)):
        keras.utils.set_random_seed(seed * 100_003 + step)
        layer.set_weights(_fresh_weights(layer, np.random.default_rng([seed, step])))
        done.append(path)
        yield list(done), clone


def _fresh_weights(layer, rng: np.random.Generator) -> list[np.ndarray]:
    """The weights a new copy of the layer starts with (its initialisers); a layer that cannot be rebuilt
    from its config gets a normal draw with each weight's own spread."""
    old = layer.get_weights()
    try:
        fresh = type(layer).from_config(layer.get_config())
        if not fresh.built:
            fresh.build(layer.input.shape)
        new = fresh.get_weights()
    except Exception:  # noqa: BLE001 (any layer Keras cannot rebuild alone: fall back, below)
        new = []
    if [w.shape for w in new] == [w.shape for w in old]:
        return new
    return [rng.normal(0, np.std(w) or 0.05, w.shape).astype(w.dtype) for w in old]


def sanity_check(model: keras.Model, image: np.ndarray, method, target: Target = None, seed: int = 0,
                 limit: int | None = None, output: int | None = None, progress: Progress | None = None,
                 **options) -> list[tuple[str, float]]:
    """Spearman rank correlation between the map of the trained model and of copies with more and
    more top layers randomised (at most `limit` of them): a map that does not change explains the
    image, not the model. A copy whose target score is not finite raises an error, never a number."""
    from scipy.stats import spearmanr

    image = np.asarray(image, np.float32)
    resolved = resolve_target(model, image, target, output)
    extra = {} if output is None else {"output": output}
    reference = method(model, image, resolved, **extra, **options).ravel()
    if reference.std() == 0:
        raise AuditError("The map of the trained model is flat (every pixel equal), so there is nothing to compare "
                         "its randomised copies with; choose another method or target.")
    results = []
    for done, clone in randomised_copies(model, seed):
        score = Scorer(clone, resolved, output)(image[None])
        if not np.all(np.isfinite(score)):
            raise AuditError(f"Randomising {done[-1]} made the model's output non-finite ({score.ravel()[0]}); "
                             "the sanity check stops there.")
        other = method(clone, image, resolved, **extra, **options).ravel()
        correlation = spearmanr(reference, other).statistic if other.std() > 0 else 0.0
        results.append((done[-1], float(np.nan_to_num(correlation))))
        report_progress(progress, len(results), limit or len(models.weighted_layers(model)))
        if limit is not None and len(results) >= limit:
            break
    return results
