"""One pass over an image set's batches: on one device, or split over every local GPU.

With more than one GPU the batches run under tf.distribute.MirroredStrategy: each replica computes the
partial sums of its slice of the batch, and they are gathered on the device and merged by the same
`merge` as shards (audit.activations.FilterSums). On one GPU or a CPU the step runs as it is.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable

import numpy as np
import tensorflow as tf


@functools.cache
def local_replicas() -> tf.distribute.Strategy | None:
    """A MirroredStrategy over this machine's GPUs when it has several; None on one GPU or a CPU. Built once
    per process: every pass (each shard, each page's statistics) would otherwise set up a new one."""
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy([gpu.name for gpu in gpus]) if len(gpus) > 1 else None


def run(step: Callable, batches: Iterable, strategy: tf.distribute.Strategy | None = None,
        progress: Callable[[int, int | None], None] | None = None, total: int | None = None):
    """Yield, per batch of (x, labels), the step's results as numpy, one copy per replica (a list).

    `step(x, labels)` returns a nested structure of tensors (partial sums). `progress(done, total)` is
    called after each batch; `total` may be None for a set of unknown length.
    """
    done = 0
    if strategy is not None:
        # strategy.run inside a tf.function, as documented; a traced step is handed over as its Python
        # function (strategy.run would keep its one-device input signature, which PerReplica inputs fail).
        inner = getattr(step, "python_function", step)
        replicated = tf.function(lambda x, labels: strategy.run(inner, args=(x, labels)))
    for x, labels in batches:
        if strategy is None:
            results = [tf.nest.map_structure(np.asarray, step(x, labels))]
        else:
            replicas = strategy.num_replicas_in_sync

            def slice_of(context, tensor):
                return tensor[context.replica_id_in_sync_group::replicas]

            x_parts = strategy.experimental_distribute_values_from_function(lambda c: slice_of(c, x))
            label_parts = strategy.experimental_distribute_values_from_function(lambda c: slice_of(c, labels))
            results = [tf.nest.map_structure(np.asarray, part)
                       for part in _split(strategy, replicated(x_parts, label_parts))]
        done += int(x.shape[0])
        yield results
        if progress is not None:
            progress(done, total)


def _split(strategy, per_replica):
    """The per-replica results as one structure per replica, gathered from their devices."""
    flat = tf.nest.flatten(per_replica, expand_composites=False)
    local = [strategy.experimental_local_results(leaf) for leaf in flat]
    return [tf.nest.pack_sequence_as(per_replica, [leaf[r] for leaf in local], expand_composites=False)
            for r in range(strategy.num_replicas_in_sync)]
