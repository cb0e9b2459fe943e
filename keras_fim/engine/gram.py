"""Gram blocks, unit by unit, without materialising what need not be.

The Gram matrix ``G = J J^T`` of per-example contributions is a sum of one
``(B, B)`` block per unit (layer), since units own disjoint weights. A block
can often be formed without the unit's per-example gradients:

* Dense (and any layer whose gradient is a sum of outer products
  ``g_i = sum_t a_it^T d_it``): ``G_ij = sum_{t,s} (a_it . a_js)(d_it . d_js)``,
  the "ghost" form; for one position per example it is
  ``(A A^T) * (D D^T)``.
* Convolutions: the same over spatial positions, with ``a`` the im2col
  patches. Materialising ``g_i = P_i^T D_i`` is cheaper when there are many
  positions, the ghost form when there are few; a cost model chooses.
* Embedding: ``G_ij = sum_{t,s} [tok_it = tok_js] (d_it . d_js)``, never the
  ``(B, vocabulary, dim)`` gradients.
* Everything else (normalisation layers, attention, recurrent layers, the
  generic rule): the unit's per-example gradients from its rule, one
  variable at a time, each ``(B, variable size)``.

Costs are counted in multiply-adds and memory in bytes of the largest
temporary; a path whose temporary exceeds the memory budget is not taken,
and a materialised kernel gradient is split over output channels until each
piece fits. The batch size in these plans is the static one, or
`PLANNING_BATCH_SIZE` when the graph leaves it unknown.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import tensorflow as tf

from keras_fim.engine import rules
from keras_fim.engine.capture import LayerCall

DEFAULT_MEMORY_BUDGET = 1 << 30
"""Bytes: the default bound on one unit's largest temporary (1 GiB)."""

PLANNING_BATCH_SIZE = 256
"""The batch size plans assume when the graph does not know it."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one unit's Gram block is formed.

    Attributes:
        layer: The unit layer's name.
        path: ``"ghost"``, ``"materialise"`` (per-example kernel gradients,
            im2col for convolutions) or ``"rule"`` (the unit's per-example
            rule, one variable at a time).
        multiply_adds: Estimated multiply-adds of the block.
        peak_bytes: Estimated bytes of its largest temporary.
        chunks: Pieces the materialised kernel gradient is split into.
    """

    layer: str
    path: str
    multiply_adds: float
    peak_bytes: float
    chunks: int = 1


def _static_batch(examples, tensor) -> int:
    value = tf.get_static_value(examples)
    if value is None:
        value = tensor.shape[0]
    return int(value) if value is not None else PLANNING_BATCH_SIZE


def _outer_product_gram(a, d, budget, name):
    """The block of ``g_i = sum_t a_it^T d_it`` (a: (B, T, m), d: (B, T, n)).

    Returns ``(block, plan)``; chooses the ghost form or materialising
    ``g_i``, split over the columns of ``d`` to fit `budget`.
    """
    batch = _static_batch(tf.shape(a)[0], a)
    positions, m, n = a.shape[1], a.shape[-1], d.shape[-1]
    itemsize = d.dtype.size
    materialise_cost = (positions or 1) * batch * m * n + batch * batch * m * n
    if positions is not None:
        ghost_bytes = 2 * batch * batch * positions * positions * itemsize
        ghost_cost = batch * batch * positions * positions * (m + n)
        if ghost_bytes <= budget and ghost_cost <= materialise_cost:
            if positions == 1:
                block = tf.matmul(a[:, 0], a[:, 0], transpose_b=True) * tf.matmul(
                    d[:, 0], d[:, 0], transpose_b=True
                )
            else:
                block = tf.einsum(
                    "abts,abts->ab",
                    tf.einsum("atm,bsm->abts", a, a),
                    tf.einsum("atn,bsn->abts", d, d),
                )
            return block, Plan(name, "ghost", ghost_cost, ghost_bytes)
    gradient_bytes = batch * m * n * itemsize
    chunks = max(1, min(n, math.ceil(gradient_bytes / budget)))
    width = math.ceil(n / chunks)
    block = None
    for start in range(0, n, width):
        g = tf.einsum("btm,btn->bmn", a, d[..., start : start + width])
        g = tf.reshape(g, [tf.shape(g)[0], -1])
        part = tf.matmul(g, g, transpose_b=True)
        block = part if block is None else block + part
    plan = Plan(name, "materialise", materialise_cost, gradient_bytes / chunks, chunks)
    return block, plan


def _bias_gram(d):
    s = tf.reduce_sum(d, axis=1)
    return tf.matmul(s, s, transpose_b=True)


def _concat_positions(pairs):
    a, d = zip(*pairs, strict=True)
    return tf.concat(a, axis=1), tf.concat(d, axis=1)


def dense_gram(layer, calls, examples, budget):
    """Dense (every call's positions together); `None` if not plain."""
    if not rules._dense_is_plain(layer):
        return None
    a, d = _concat_positions(
        [rules.dense_inputs_and_cotangents(layer, c, examples) for c in calls]
    )
    block, plan = _outer_product_gram(a, d, budget, layer.name)
    return (block + _bias_gram(d) if layer.use_bias else block), plan


def convolution_gram(layer, calls, examples, budget):
    """Plain 1D/2D convolutions by im2col; `None` for other kinds."""
    if not rules.convolution_is_im2col(layer):
        return None
    a, d = _concat_positions(
        [rules.convolution_patches(layer, c, examples) for c in calls]
    )
    block, plan = _outer_product_gram(a, d, budget, layer.name)
    return (block + _bias_gram(d) if layer.use_bias else block), plan


def embedding_gram(layer, calls, examples, budget):
    """Embedding: rows of equal tokens meet in the ghost form."""
    if getattr(layer, "lora_enabled", False) or layer.quantization_mode:
        return None

    def tokens_and_cotangents(call):
        d = call.cotangents[0][:examples]
        batch = tf.shape(d)[0]
        tokens = tf.cast(call.args[0][:examples], tf.int32)
        return (
            tf.reshape(tokens, [batch, -1]),
            tf.reshape(d, [batch, -1, d.shape[-1]]),
        )

    tokens, d = _concat_positions([tokens_and_cotangents(c) for c in calls])
    batch, positions = _static_batch(examples, d), d.shape[1]
    if positions is None:
        return None
    ghost_bytes = 2 * batch * batch * positions * positions * d.dtype.size
    vocabulary = layer.input_dim
    if ghost_bytes > budget or positions * positions > vocabulary:
        return None  # the rule's (B, vocabulary, dim) gradients are smaller
    same = tf.equal(tokens[:, None, :, None], tokens[None, :, None, :])
    products = tf.einsum("atn,bsn->abts", d, d)
    block = tf.reduce_sum(tf.where(same, products, tf.zeros_like(products)), [2, 3])
    cost = batch * batch * positions * positions * layer.output_dim
    return block, Plan(layer.name, "ghost", cost, ghost_bytes)


def rule_gram(layer, rule, calls, examples):
    """Any unit: its rule's per-example gradients, a variable at a time."""
    per_call = [rule(layer, call, examples) for call in calls]
    block, batch, size = None, None, 0
    for grads in zip(*per_call, strict=True):
        g = tf.add_n([tf.cast(t, grads[0].dtype) for t in grads])
        flat = tf.reshape(g, [tf.shape(g)[0], -1])
        part = tf.matmul(flat, flat, transpose_b=True)
        block = part if block is None else block + tf.cast(part, block.dtype)
        batch = _static_batch(examples, flat)
        size = max(size, flat.shape[-1] or 0)
    itemsize = block.dtype.size
    parameters = sum(math.prod(v.shape) for v in layer.trainable_variables)
    plan = Plan(layer.name, "rule", batch * batch * parameters, batch * size * itemsize)
    return block, plan


GRAM_RULES = {
    keras.layers.Dense: dense_gram,
    keras.layers.Conv1D: convolution_gram,
    keras.layers.Conv2D: convolution_gram,
    keras.layers.Embedding: embedding_gram,
}


def unit_gram(
    layer, rule, calls: list[LayerCall], examples, budget: float = DEFAULT_MEMORY_BUDGET
):
    """The Gram block of one unit over all its recorded calls, and its plan.

    The special forms apply only where the unit's rule is the built-in one
    (a rule registered by the user takes precedence).
    """
    builtin = {
        keras.layers.Dense: rules.dense_rule,
        keras.layers.Conv1D: rules.convolution_rule,
        keras.layers.Conv2D: rules.convolution_rule,
        keras.layers.Embedding: rules.per_example_rule,
    }
    for cls, gram_rule in GRAM_RULES.items():
        if isinstance(layer, cls) and rule is builtin[cls]:
            result = gram_rule(layer, calls, examples, budget)
            if result is not None:
                return result
            break
    return rule_gram(layer, rule, calls, examples)
