"""Which filters to propose: candidates by a criterion and a share, rankings, and whether a criterion can tell
a layer's filters apart on the images it was measured on.

One answer for the Pruning page, the report and the command line (`candidates`); a layer whose score is
undefined (APoZ without a zero floor, Taylor without classes) is left out with the reason (`unavailable`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from audit.errors import AuditError
from audit.definitions import PRUNING_CRITERIA as CRITERIA  # defined without TensorFlow: the CLI's help

def lowest_share(scores: pd.DataFrame, criterion: str, share: float) -> pd.Series:
    """Rows among the lowest `share` of their layer by a score (ties in row order): the candidates. A layer
    whose score is undefined (NaN: APoZ without a zero floor, Taylor without classes) gives none."""
    rank = scores.groupby("layer")[criterion].rank(method="first")
    return rank <= (scores.groupby("layer")["filter"].transform("size") * share).astype(int)



def candidates(scores: pd.DataFrame, criterion: str, share: float) -> pd.DataFrame:
    """The filters proposed for removal, one answer for the Pruning page, the report and the command line:
    the dead and near-dead ones (criterion "dead"), or the lowest `share` of each layer by the criterion
    (APoZ: the highest first). Rows of `scores` in their order, with `why` (the criterion's name)."""
    if criterion not in CRITERIA:
        raise AuditError(f"Unknown pruning criterion {criterion!r}; choose one of {', '.join(CRITERIA)}.")
    if not 0.0 <= float(share) <= 1.0:
        raise AuditError(f"The share of each layer to cut is between 0 and 1, not {share}.")
    if criterion == "dead":
        chosen = scores.dead | scores.near_dead
        why = np.where(scores.dead, "dead", "near-dead")
        return scores.assign(why=why)[chosen]
    if criterion not in scores or scores[criterion].isna().all():
        raise AuditError(unavailable(criterion))
    ranked = scores.assign(apoz=-scores.apoz) if criterion == "apoz" else scores  # APoZ: most zeros first
    return scores.assign(why=CRITERIA[criterion])[lowest_share(ranked, criterion, share)]


def unavailable(criterion: str) -> str:
    """Why a criterion has no scores for a model or a layer."""
    if criterion == "taylor":
        return "Taylor scores need a class output (they are the gradient of the class's log-probability)."
    if criterion in ("apoz", "dead"):
        return ("APoZ and dead filters are defined only where a filter's output has a zero floor (after a ReLU); "
                "this layer's filters are used after an activation without one (ELU, swish, linear).")
    if criterion == "bn_scale":
        return ("BatchNorm scales need a BatchNormalization (with a scale) on the filter's channel; this layer's "
                "channel meets none.")
    return f"No {criterion} scores."


def ranking(scores: pd.DataFrame, layer: str, criterion: str) -> list[int]:
    """The layer's filters in pruning order: the lowest score first (dead first for APoZ: highest first)."""
    part = scores[scores.layer == layer]
    if criterion not in part or part[criterion].isna().all():
        raise AuditError(f"{layer}: {unavailable(criterion)}")
    ascending = criterion != "apoz"
    return list(part.sort_values(criterion, ascending=ascending, kind="stable")["filter"].astype(int))


def ranked_layers(scores: pd.DataFrame, criterion: str) -> list[str]:
    """The layers a criterion can rank (the others have no such score: see `unavailable`)."""
    defined = scores.groupby("layer", sort=False)[criterion].apply(lambda values: values.notna().any())
    return [layer for layer, ok in defined.items() if ok]


SAMPLING_ERRORS = {"apoz": "apoz_se", "mean": "mean_se", "taylor": "taylor_se"}
"""The criteria measured on images, by the column holding each filter's standard error over the images."""
RELIABLE = 0.5
"""The least share of a criterion's spread between a layer's filters that must be more than sampling noise."""


def reliability(scores: pd.DataFrame, criterion: str) -> pd.DataFrame:
    """Per layer, whether a criterion can tell the layer's filters apart on these images: the spread of the
    scores between filters (their variance), the sampling noise of one filter's score (the mean squared standard
    error over the images) and the reliability 1 - noise / spread (classical test theory: the share of the spread
    that is not noise), `distinct` when it reaches RELIABLE. Weight criteria (L1, FPGM, BN scale) have no
    sampling noise: reliability 1 where their scores differ."""
    rows = []
    error_column = SAMPLING_ERRORS.get(criterion)
    for layer, part in scores.groupby("layer", sort=False):
        values = part[criterion].astype(float)
        if values.isna().all():
            continue
        spread = float(values.var(ddof=1)) if len(values) > 1 else 0.0
        noise = float(np.nanmean(part[error_column].astype(float) ** 2)) if error_column in part else 0.0
        value = 1.0 - noise / spread if spread > 0 else 0.0
        rows.append({"layer": layer, "spread": np.sqrt(spread), "noise": np.sqrt(noise),
                     "reliability": max(0.0, value), "distinct": value >= RELIABLE})
    return pd.DataFrame(rows, columns=["layer", "spread", "noise", "reliability", "distinct"])
