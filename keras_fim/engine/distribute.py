"""The global batch's Gram blocks under `tf.distribute`.

Under a strategy with several replicas in sync (`MirroredStrategy`,
`MultiWorkerMirroredStrategy`), Keras's train step runs once per replica on
that replica's shard of the global batch, and the update applies the sum of
the replicas' gradients. keras-fim measures the *global* batch: each replica
forms the per-example factors of its own examples for every unit (the ghost
form's rows, or the per-example gradients, whichever is fewer values:
`keras_fim.engine.gram.unit_payload`), all-gathers them along the batch, and
every replica then forms the same global Gram blocks, so that every replica
records the same measurement.

Collectives are never placed inside a `tf.cond` (which `MirroredStrategy`
refuses) and never gather an empty tensor (which crashes): every replica
sends at least one row, padded to a common number of rows (the shapes
`TPUStrategy` requires), and the rows that are not measured examples are
dropped after the gather. On a step that is not measured, the same
collectives run on one example per replica, so that a decision taken in the
graph (several steps per execution) needs no collective in a branch.
"""

from __future__ import annotations

import tensorflow as tf

from keras_fim.engine.gram import check_memory_budget, payloads_from_calls
from keras_fim.engine.record import record_pass


def _padded(tensor, rows):
    rank = tensor.shape.rank
    pad = [[0, rows - tf.shape(tensor)[0]]] + [[0, 0]] * (rank - 1)
    padded = tf.pad(tensor, pad)
    padded.set_shape([None, *tensor.shape[1:]])
    return padded


def quotas(sizes, max_examples):
    """How many of its first examples each replica measures when at most
    `max_examples` of the global batch are: the shards taken in turn, one
    example at a time (replica 0's first, replica 1's first, ..., replica
    0's second, ...), so that every replica measures ``max_examples / R``
    examples, one more or less, and a shorter shard's share goes to the
    others. `sizes`: the shards' sizes, int32 ``(R,)``."""
    if max_examples is None:
        return sizes
    positions = tf.range(tf.reduce_max(sizes))
    has = tf.cast(positions[:, None] < sizes[None, :], tf.int32)  # (position, replica)
    before = tf.cumsum(tf.reduce_sum(has, axis=1), exclusive=True)
    rank = before[:, None] + tf.cumsum(has, axis=1, exclusive=True)
    taken = (has > 0) & (rank < max_examples)
    return tf.reduce_sum(tf.cast(taken, tf.int32), axis=0)


def example_counts(batch, max_examples, measured):
    """``(sizes, counts)`` of every replica, in replica order: the sizes of
    their shards and the examples each one measures (`quotas`: all of them,
    or `max_examples` of the global batch shared evenly). On a step that is
    not `measured` every replica measures one example (a shard has at most
    one), so that the collectives still run. One small all-gather."""
    context = tf.distribute.get_replica_context()
    sizes = context.all_gather(tf.reshape(tf.cast(batch, tf.int32), [1]), axis=0)
    quota = quotas(sizes, max_examples)
    counts = tf.where(tf.cast(measured, tf.bool), quota, tf.minimum(sizes, 1))
    return sizes, counts


def gathered_grams(units, calls, counts, memory_budget, fail_mode="error"):
    """The Gram blocks of the examples `counts` says every replica measures
    (`example_counts`), over all replicas: ``(blocks, plans)`` as
    `engine.grams_from_calls` gives them on one device for the global batch.
    Called in replica context by every replica."""
    budget = check_memory_budget(memory_budget)
    context = tf.distribute.get_replica_context()
    mine = tf.gather(counts, context.replica_id_in_sync_group)
    # At least one row is computed (and sent): an empty gather crashes.
    payloads = payloads_from_calls(units, calls, tf.maximum(mine, 1), fail_mode)
    rows = tf.maximum(tf.reduce_max(counts), 1)
    local = [_padded(t, rows) for p in payloads.values() for t in p.tensors]
    gathered = context.all_gather(local, axis=0)
    keep = tf.reshape(tf.range(rows)[None, :] < counts[:, None], [-1])
    gathered = [
        tf.ensure_shape(tf.boolean_mask(t, keep), [None, *s.shape[1:]])
        for t, s in zip(gathered, local, strict=True)
    ]
    blocks, plans, position = {}, [], 0
    for name, payload in payloads.items():
        n = len(payload.tensors)
        block, plan = payload.block(gathered[position : position + n], budget)
        position += n
        blocks[name] = block
        plans.append(plan)
    return blocks, plans


def bytes_gathered(payloads: dict, examples: int) -> int | None:
    """Bytes one replica sends per measurement for `examples` of its
    examples (`None` where a shape is unknown)."""
    total = 0
    for payload in payloads.values():
        if payload.values_per_example is None:
            return None
        itemsize = max(t.dtype.size for t in payload.tensors)
        total += payload.values_per_example * itemsize * examples
    return total


def payload_sizes(model, x, y, sample_weight=None) -> dict:
    """What one example costs a measurement under a distribution strategy.

    Runs a recorded pass of the model on a batch (any size; eagerly is
    fine) and returns, for every unit (layer) whose Gram block the
    measurement forms, ``(kind, bytes per example)``: what each replica
    all-gathers per measured example for that unit, ``kind`` being
    ``"factors"`` (the ghost form's rows) or ``"gradients"`` (the unit's
    per-example gradients). docs/distribute.md gives the formula.

    Example:

    >>> import numpy as np, keras
    >>> from keras_fim.engine.distribute import payload_sizes
    >>> model = keras.Sequential([keras.Input((784,)),
    ...                           keras.layers.Dense(256, name="hidden"),
    ...                           keras.layers.Dense(10, name="head")])
    >>> model.compile(loss="mse")
    >>> payload_sizes(model, np.zeros((2, 784), "float32"),
    ...               np.zeros((2, 10), "float32"))
    {'hidden': ('factors', 4160), 'head': ('factors', 1064)}
    """
    sizes = {}

    @tf.function
    def trace(x, y, sample_weight):
        record = record_pass(model, x, y, sample_weight)
        payloads = payloads_from_calls(record.units, record.calls, record.examples)
        for name, p in payloads.items():
            sizes[name] = (p.kind, bytes_gathered({name: p}, 1))

    # Traced only: the shapes are all that is needed.
    trace.get_concrete_function(x, y, sample_weight)
    return sizes
