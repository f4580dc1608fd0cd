"""Pruning: per-filter scores, the candidates they propose, masks and surgery by dependency groups, what
cutting costs, and recovery by fine-tuning.

One idea per module, re-exported here so `from audit import pruning` and `pruning.filter_scores(...)` keep
working: `scores` (L1, APoZ, mean, Taylor, redundancy, FPGM), `selection` (candidates, rankings, the random
baseline), `surgery` (masks, plans, the smaller model, multiply-adds), `targets` (whole groups ranked and taken until
the share, parameters or multiply-adds asked), `quality` (what-if, sensitivity, the
ranking against chance, leave-one-out) and `recovery` (fine-tuning, accuracy against chance). Each reads the
ones before it, never the ones after.
"""

from audit.pruning.scores import (  # noqa: F401
    filter_kernels,
    l1_norms,
    redundancy,
    taylor_scores,
    taylor_scores_of_layers,
    taylor_of,
    filter_scores,
    score_sums,
    scores_batch_size,
    merge_score_sums,
    scores_frame,
)
from audit.pruning.selection import (  # noqa: F401
    lowest_share,
    CRITERIA,
    candidates,
    unavailable,
    ranking,
    ranked_layers,
    random_selection,
)
from audit.pruning.surgery import (  # noqa: F401
    PruningError,
    silence,
    SILENCED,
    silenced_weights,
    masked,
    plan,
    group_table,
    prune,
    flops,
    kept_cost,
)
from audit.pruning.targets import (  # noqa: F401
    SCOPES,
    RANKING_CRITERIA,
    group_importance,
    select,
    to_target,
    TARGET_KINDS,
    Target,
    selection_for,
    proposed,
)
from audit.pruning.quality import (  # noqa: F401
    QualitySums,
    quality,
    MaskedCopy,
    curve,
    sensitivity,
    what_if,
    ranking_against_chance,
    LOWER_IS_BETTER,
    verdict_against_chance,
    IMPORTANCE,
    leave_one_out,
    importance_correlation,
)
from audit.pruning.recovery import (  # noqa: F401
    fine_tune,
    AT_CHANCE_ENTROPY,
    wilson_interval,
    knowledge,
    accuracy,
    recovery,
)
from audit.pruning.schedule import (  # noqa: F401
    TRADE_OFF_METHODS,
    latency,
    split,
    iterative,
    trade_off,
)
from audit.pruning.export import (  # noqa: F401
    keras_bytes,
    saved_model_zip,
)
