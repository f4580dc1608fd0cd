"""Pruning: per-filter scores, the candidates they propose, masks and surgery by dependency groups, what
cutting costs, recovery, and what the cut forgets.

One idea per module, re-exported here so `from audit import pruning` and `pruning.filter_scores(...)` keep
working: `batchnorm` (BN scale factors, BN recalibration), `scores` (L1, APoZ, mean, Taylor, redundancy, FPGM,
BN scale), `selection` (candidates, rankings), `surgery` (masks, plans, the smaller model, multiply-adds),
`targets` (whole groups ranked, or in a random order, and taken until the share, parameters or multiply-adds
asked), `tuning` (fine-tuning with early stopping and distillation), `quality` (what-if, sensitivity, the ranking
against chance, leave-one-out), `recovery` (each cut beside a random one of the same size: cut, recalibrated,
fine-tuned; accuracy against chance), `schedule` (steps, latency, throughput) and `forgetting` (per class, the
changed images). Each reads the ones before it, never the ones after.
"""

from audit.pruning.batchnorm import (  # noqa: F401
    batch_norms,
    bn_scales,
    recalibrate_bn,
)

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
    SAMPLING_ERRORS,
    RELIABLE,
    reliability,
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
    RANDOM,
    channel_counts,
    group_importance,
    select,
    to_target,
    TARGET_KINDS,
    Target,
    selection_for,
    proposed,
)
from audit.pruning.tuning import (  # noqa: F401
    BATCHNORM_MODES,
    Tuning,
    Tuned,
    validation_split,
    fine_tune,
    cross_entropy,
    loss_for,
    targets_for,
)
from audit.pruning.quality import (  # noqa: F401
    QualitySums,
    quality,
    sensitivity,
    what_if,
    ranking_against_chance,
    LOWER_IS_BETTER,
    verdict_against_chance,
    IMPORTANCE,
    leave_one_out,
    importance_correlation,
)
from audit.pruning.sweeps import Sweep, SweepCost  # noqa: F401
from audit.pruning.recovery import (  # noqa: F401
    AT_CHANCE_ENTROPY,
    wilson_interval,
    knowledge,
    accuracy,
    split,
    copy_of,
    Recovered,
    stages,
    recovery,
)
from audit.pruning.schedule import (  # noqa: F401
    TRADE_OFF_METHODS,
    THROUGHPUT_BATCH,
    latency,
    throughput_batch,
    throughput,
    speed,
    iterative,
    trade_off,
)
from audit.pruning.forgetting import (  # noqa: F401
    Forgetting,
    forgets,
    compare,
)
from audit.pruning.export import (  # noqa: F401
    keras_bytes,
    saved_model_zip,
)
