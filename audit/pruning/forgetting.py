"""What the cut forgets: which classes pay for it, and which images change their answer.

A pruned model can keep its top-1 accuracy and lose one class (Hooker et al. 2019, "What do compressed deep
neural networks forget?"; the images whose prediction changes are their pruning-identified exemplars). Per class:
accuracy before and after with Wilson intervals, and whether the class lost significantly more than the whole
set did: the mean change over the class's images against the mean over all images, a one-sided z-test for a
sample drawn without replacement from the set (the normal form of the permutation test), Bonferroni-corrected
for the number of classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd
from scipy.stats import norm

from audit import heads
from audit.pruning.recovery import wilson_interval

LEVEL = 0.05
"""The family-wise error rate of the flags (over all classes)."""
FEWEST = 5
"""A class with fewer held-out images is never flagged: too few to tell."""


@dataclass
class Forgetting:
    """Per class (`classes`), the changed images (`flipped`), and the whole set's accuracies (`overall`)."""

    classes: pd.DataFrame
    flipped: pd.DataFrame
    overall: dict

    def flagged(self) -> list[str]:
        return list(self.classes.loc[self.classes.flagged, "class"])


def forgets(model: keras.Model, smaller: keras.Model, images: np.ndarray, labels: np.ndarray,
            names: list[str] | None = None, output: int | None = None) -> Forgetting:
    """Per class accuracy of `model` and `smaller` on the same labelled images, with the classes that lost
    significantly more than the set, and every image whose top-1 answer changed (with both answers)."""
    head = heads.find_head(model, output)
    before = heads.Outputs(model, head=head)(images)
    after = heads.Outputs(smaller, head=head)(images)
    return compare(before, after, labels, names)


def compare(before: np.ndarray, after: np.ndarray, labels: np.ndarray, names: list[str] | None = None) -> Forgetting:
    """`forgets` from the two models' class probabilities on the same images."""
    labels = np.asarray(labels)
    first, second = np.asarray(before).argmax(1), np.asarray(after).argmax(1)
    names = names or [f"class {index}" for index in range(np.asarray(before).shape[1])]
    right_before, right_after = first == labels, second == labels
    change = right_before.astype(float) - right_after.astype(float)  # 1: lost, -1: won
    overall_drop, spread, total = float(change.mean()), float(change.var()), len(labels)
    present = sorted(set(labels.tolist()))
    rows = []
    for label in present:
        members = labels == label
        count = int(members.sum())
        drop = float(change[members].mean())
        finite = (total - count) / max(total - 1, 1)  # sampling without replacement from the set
        scale = np.sqrt(spread / count * finite)
        p_value = float(norm.sf((drop - overall_drop) / scale)) if scale > 0 else 1.0
        low_before, high_before = wilson_interval(right_before[members].sum(), count)
        low_after, high_after = wilson_interval(right_after[members].sum(), count)
        rows.append({"class": names[label], "images": count,
                     "accuracy before": float(right_before[members].mean()), "before low": low_before,
                     "before high": high_before, "accuracy after": float(right_after[members].mean()),
                     "after low": low_after, "after high": high_after, "drop": drop,
                     "lost": int(((change == 1) & members).sum()), "won": int(((change == -1) & members).sum()),
                     "p-value": p_value,
                     "flagged": bool(count >= FEWEST and drop > overall_drop and p_value < LEVEL / len(present))})
    flipped_at = np.flatnonzero(first != second)
    flipped = pd.DataFrame({
        "image": flipped_at, "label": [names[i] for i in labels[flipped_at]],
        "before": [names[i] for i in first[flipped_at]], "after": [names[i] for i in second[flipped_at]],
        "p before": np.asarray(before)[flipped_at, first[flipped_at]],
        "p after": np.asarray(after)[flipped_at, second[flipped_at]],
        "right before": right_before[flipped_at], "right after": right_after[flipped_at]})
    overall = {"images": total, "accuracy before": float(right_before.mean()),
               "accuracy after": float(right_after.mean()), "drop": overall_drop, "flipped": len(flipped_at)}
    return Forgetting(pd.DataFrame(rows), flipped, overall)
