"""What the cut forgets: which classes pay for it, and which images change their answer.

A pruned model can keep its top-1 accuracy and lose one class (Hooker et al. 2019, "What do compressed deep
neural networks forget?"; the images whose prediction changes are their pruning-identified exemplars). Per class:
accuracy before and after with Wilson intervals, and whether the class lost significantly more than the whole
set did: an exact one-sided permutation test (would as many lost answers, net of won ones, fall among this many
images drawn at random from the set? the multivariate hypergeometric distribution of lost and won answers),
Bonferroni-corrected for the number of classes. Exact because lost answers are rare: one image lost in 90
is p = 15/90 for a class of 15, where a normal approximation says 0.013.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd
from scipy.special import gammaln

from audit import heads
from audit.intervals import wilson_interval

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


def at_least(net: int, drawn: int, lost: int, won: int, total: int) -> float:
    """P(lost - won among `drawn` images drawn without replacement from `total` is at least `net`), when the set
    holds `lost` images that lost their right answer and `won` that gained one: the exact permutation test."""
    def log_choose(n, k):
        return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)

    rest = total - lost - won
    l_values = np.arange(0, min(lost, drawn) + 1)[:, None]
    w_values = np.arange(0, min(won, drawn) + 1)[None, :]
    others = drawn - l_values - w_values
    valid = (others >= 0) & (others <= rest) & (l_values - w_values >= net)
    if not valid.any():
        return 0.0
    logs = (log_choose(lost, l_values) + log_choose(won, w_values) + log_choose(rest, np.clip(others, 0, rest))
            - log_choose(total, drawn))
    return float(min(1.0, np.exp(logs[valid]).sum()))


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
    overall_drop, total = float(change.mean()), len(labels)
    lost_all, won_all = int((change == 1).sum()), int((change == -1).sum())
    present = sorted(set(labels.tolist()))
    rows = []
    for label in present:
        members = labels == label
        count = int(members.sum())
        drop = float(change[members].mean())
        lost, won = int(((change == 1) & members).sum()), int(((change == -1) & members).sum())
        p_value = at_least(lost - won, count, lost_all, won_all, total)
        low_before, high_before = wilson_interval(right_before[members].sum(), count)
        low_after, high_after = wilson_interval(right_after[members].sum(), count)
        rows.append({"class": names[label], "images": count,
                     "accuracy before": float(right_before[members].mean()), "before low": low_before,
                     "before high": high_before, "accuracy after": float(right_after[members].mean()),
                     "after low": low_after, "after high": high_after, "drop": drop,
                     "lost": lost, "won": won,
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
