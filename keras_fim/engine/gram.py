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

Every product that forms a block is taken in float64 from the (float32,
float64, or widened 16-bit) factors (`gram_of`, `_ghost`): a product of two
float32 numbers is exact in float64, so a block is the exact Gram matrix of
the contributions the factors describe, up to float64 accumulation. A float32
Gram would carry absolute errors of about ``eps32 * ||g_i|| ||g_j||`` per
entry, which hide every eigenvalue below about ``1e-7`` of the largest
(singular values of ``J`` below ``3e-4`` of the largest), while float32
contributions resolve singular values down to about ``eps32`` of ``||J||_F``
(`keras_fim.measurements.noise_floor`). The float64 products cost
about twice the float32 ones on CPU (`benchmarks/precision.py`).

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

GRAM_DTYPE = tf.float64
"""The dtype every Gram product is taken in (see the module docstring)."""

_GRAM_ITEMSIZE = GRAM_DTYPE.size


def gram_of(rows: tf.Tensor) -> tf.Tensor:
    """``R R^T`` in float64 for `rows` shaped ``(B, ...)`` (flattened per
    example): the exact Gram matrix of float32 rows, up to float64
    accumulation."""
    flat = tf.cast(tf.reshape(rows, [tf.shape(rows)[0], -1]), GRAM_DTYPE)
    return tf.matmul(flat, flat, transpose_b=True)


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
    value = None if examples is None else tf.get_static_value(examples)
    if value is None:
        value = tensor.shape[0]
    return int(value) if value is not None else PLANNING_BATCH_SIZE


def _kernel_block(name, batch, positions, m, n, itemsize, budget, ghost, materialise):
    """The block of a kernel whose per-example gradient is
    ``g_i = sum_t a_it^T d_it`` over `positions` (a: m wide, d: n wide).

    ``ghost()`` forms it from the ``(B, B, T, T)`` products of the rows;
    ``materialise(start, stop)`` returns the per-example gradients of the
    output columns ``[start, stop)``, leading axis the batch. Returns
    ``(block, plan)``: the cheaper path that fits `budget`, the materialised
    one split over output columns until each piece fits.
    """
    materialise_cost = batch * (positions or 1) * m * n + batch * batch * m * n
    if positions is not None:
        ghost_bytes = 2 * batch * batch * positions * positions * _GRAM_ITEMSIZE
        ghost_cost = batch * batch * positions * positions * (m + n)
        if ghost_bytes <= budget and ghost_cost <= materialise_cost:
            return ghost(), Plan(name, "ghost", ghost_cost, ghost_bytes)
    # The gradients and their float64 copy for the product.
    gradient_bytes = batch * m * n * (itemsize + _GRAM_ITEMSIZE)
    chunks = max(1, min(n, math.ceil(gradient_bytes / budget)))
    width = math.ceil(n / chunks)
    block = None
    for start in range(0, n, width):
        part = gram_of(materialise(start, start + width))
        block = part if block is None else block + part
    plan = Plan(name, "materialise", materialise_cost, gradient_bytes / chunks, chunks)
    return block, plan


def _ghost(a, d):
    """``sum_{t,s} (a_it . a_js)(d_it . d_js)`` for a: (B, T, m), d: (B, T, n),
    in float64."""
    if a.shape[1] == 1:
        return gram_of(a[:, 0]) * gram_of(d[:, 0])
    a, d = tf.cast(a, GRAM_DTYPE), tf.cast(d, GRAM_DTYPE)
    return tf.einsum(
        "abts,abts->ab",
        tf.einsum("atm,bsm->abts", a, a),
        tf.einsum("atn,bsn->abts", d, d),
    )


def _bias_block(sums):
    """The bias block from each call's per-example cotangent sums."""
    return gram_of(tf.add_n(sums))


def dense_factors(layer, calls, examples):
    """A plain Dense unit's ``(a, d)``: inputs and pre-activation cotangents,
    every call's positions together, ``(B, T, in)`` and ``(B, T, out)``."""
    pairs = [rules.dense_inputs_and_cotangents(layer, c, examples) for c in calls]
    a = tf.concat([p[0] for p in pairs], axis=1)
    d = tf.concat([p[1] for p in pairs], axis=1)
    return a, d


def dense_block(layer, a, d, budget):
    """A Dense unit's block from its `dense_factors`."""
    block, plan = _kernel_block(
        layer.name,
        _static_batch(None, d),
        a.shape[1],
        a.shape[-1],
        d.shape[-1],
        d.dtype.size,
        budget,
        lambda: _ghost(a, d),
        lambda start, stop: tf.einsum("bti,btj->bij", a, d[..., start:stop]),
    )
    if layer.use_bias:
        block += _bias_block([tf.reduce_sum(d, axis=1)])
    return block, plan


def dense_gram(layer, calls, examples, budget):
    """Dense (every call's positions together); `None` if not plain."""
    if not rules._dense_is_plain(layer):
        return None
    a, d = dense_factors(layer, calls, examples)
    return dense_block(layer, a, d, budget)


def convolution_block(layer, operands, budget):
    """A plain convolution unit's block from its calls' operands."""
    sizes = [o.positions for o in operands]
    positions = None if None in sizes else sum(sizes)
    kernel = layer.kernel.shape

    def ghost():
        pairs = [o.patches() for o in operands]
        return _ghost(
            tf.concat([p[0] for p in pairs], axis=1),
            tf.concat([p[1] for p in pairs], axis=1),
        )

    def materialise(start, stop):
        return tf.add_n([o.kernel_gradients(start, stop) for o in operands])

    d = operands[0].dz
    block, plan = _kernel_block(
        layer.name,
        _static_batch(None, d),
        positions,
        math.prod(kernel[:-1]),
        kernel[-1],
        d.dtype.size,
        budget,
        ghost,
        materialise,
    )
    if layer.use_bias:
        block += _bias_block([tf.reduce_sum(o.dz, axis=[1, 2]) for o in operands])
    return block, plan


def convolution_gram(layer, calls, examples, budget):
    """Plain 1D/2D convolutions; `None` for other kinds."""
    if not rules.convolution_is_plain(layer):
        return None
    operands = [rules.convolution_operands(layer, c, examples) for c in calls]
    return convolution_block(layer, operands, budget)


def _embedding_is_plain(layer) -> bool:
    return not getattr(layer, "lora_enabled", False) and not layer.quantization_mode


def embedding_factors(layer, calls, examples):
    """An Embedding unit's tokens ``(B, T)`` and cotangents ``(B, T, dim)``,
    every call's positions together."""

    def tokens_and_cotangents(call):
        d = call.cotangents[0][:examples]
        batch = tf.shape(d)[0]
        tokens = tf.cast(call.args[0][:examples], tf.int32)
        return (
            tf.reshape(tokens, [batch, -1]),
            tf.reshape(d, [batch, -1, d.shape[-1]]),
        )

    pairs = [tokens_and_cotangents(c) for c in calls]
    tokens = tf.concat([p[0] for p in pairs], axis=1)
    d = tf.concat([p[1] for p in pairs], axis=1)
    return tokens, d


def embedding_block(layer, tokens, d, budget, fallback=False):
    """An Embedding unit's block from its `embedding_factors`: the ghost
    form, or `None` where the rule's ``(B, vocabulary, dim)`` gradients are
    smaller or the ghost form exceeds `budget` (with `fallback`, those
    gradients are then formed from the factors)."""
    batch, positions = _static_batch(None, d), d.shape[1]
    vocabulary = layer.input_dim
    ghost_bytes = (
        None
        if positions is None
        else 2 * batch * batch * positions**2 * _GRAM_ITEMSIZE
    )
    if ghost_bytes is None or ghost_bytes > budget or positions**2 > vocabulary:
        if not fallback:
            return None
        grads = tf.einsum(
            "btv,btn->bvn", tf.one_hot(tokens, vocabulary, dtype=d.dtype), d
        )
        size = vocabulary * layer.output_dim
        plan = Plan(
            layer.name,
            "materialise",
            batch * batch * size,
            batch * size * (d.dtype.size + _GRAM_ITEMSIZE),
        )
        return gram_of(grads), plan
    same = tf.equal(tokens[:, None, :, None], tokens[None, :, None, :])
    d = tf.cast(d, GRAM_DTYPE)
    products = tf.einsum("atn,bsn->abts", d, d)
    block = tf.reduce_sum(tf.where(same, products, tf.zeros_like(products)), [2, 3])
    cost = batch * batch * positions * positions * layer.output_dim
    return block, Plan(layer.name, "ghost", cost, ghost_bytes)


def embedding_gram(layer, calls, examples, budget):
    """Embedding: rows of equal tokens meet in the ghost form."""
    if not _embedding_is_plain(layer):
        return None
    tokens, d = embedding_factors(layer, calls, examples)
    return embedding_block(layer, tokens, d, budget)


def rule_gram(layer, rule, calls, examples):
    """Any unit: its rule's per-example gradients, a variable at a time."""
    per_call = [rule(layer, call, examples) for call in calls]
    block, batch, size = None, None, 0
    for grads in zip(*per_call, strict=True):
        g = tf.add_n([tf.cast(t, grads[0].dtype) for t in grads])
        part = gram_of(g)
        block = part if block is None else block + part
        batch = _static_batch(examples, g)
        size = max(size, math.prod(g.shape[1:]) if g.shape[1:].is_fully_defined() else 0)
        itemsize = g.dtype.size + _GRAM_ITEMSIZE
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


# -- payloads: what a replica contributes to the global batch's blocks --------


@dataclasses.dataclass
class Payload:
    """One unit's share of a replica's examples, to be all-gathered.

    Attributes:
        tensors: Tensors with the examples first (``(b, ...)``); gathered
            along that axis across replicas, they describe the global batch.
        block: ``block(gathered_tensors, budget) -> (block, plan)``, the
            unit's Gram block from the gathered tensors.
        kind: ``"factors"`` (the ghost form's rows: a Dense unit's inputs and
            cotangents, a convolution's inputs and cotangents, an
            Embedding's tokens and cotangents) or ``"gradients"`` (the
            unit's per-example gradients, flattened).
        values_per_example: The number of values one example sends (`None`
            where a shape is unknown).
    """

    tensors: list
    block: object
    kind: str
    values_per_example: int | None


def _flat(gradients) -> tf.Tensor:
    """Per-example gradients (one tensor per variable) as one ``(b, P)``."""
    flat = [tf.reshape(g, [tf.shape(g)[0], -1]) for g in gradients]
    dtype = max((g.dtype for g in flat), key=lambda d: d.size)
    flat = [tf.cast(g, dtype) for g in flat]
    return flat[0] if len(flat) == 1 else tf.concat(flat, axis=1)


def gradients_payload(name, gradients) -> Payload:
    """A payload of materialised per-example gradients."""
    flat = _flat(gradients)

    def block(tensors, budget):
        g = tensors[0]
        batch = _static_batch(None, g)
        size = g.shape[-1] or 0
        plan = Plan(
            name,
            "materialise",
            batch * batch * size,
            batch * size * (g.dtype.size + _GRAM_ITEMSIZE),
        )
        return gram_of(g), plan

    return Payload([flat], block, "gradients", flat.shape[-1])


def _values(*shapes):
    """Values per example of tensors shaped `shapes` (batch axis dropped)."""
    total = 0
    for shape in shapes:
        dims = shape[1:]
        if any(d is None for d in dims):
            return None
        total += math.prod(dims)
    return total


def _parameters(layer) -> int:
    return sum(math.prod(v.shape) for v in layer.trainable_variables)


def unit_payload(layer, rule, calls: list[LayerCall], examples) -> Payload:
    """What one replica sends so that every replica can form the unit's
    Gram block over the global batch: the ghost form's factors where they
    are fewer values per example than the unit's parameters (Dense and
    Embedding, as a rule), otherwise the per-example gradients (convolutions
    with many positions, every other layer). The block formed from the
    gathered factors is exactly `unit_gram`'s on the global batch."""
    parameters = _parameters(layer)
    if isinstance(layer, keras.layers.Dense) and rule is rules.dense_rule:
        if rules._dense_is_plain(layer):
            a, d = dense_factors(layer, calls, examples)
            values = _values(a.shape, d.shape)
            if values is not None and values <= parameters:
                return Payload(
                    [a, d],
                    lambda t, budget: dense_block(layer, t[0], t[1], budget),
                    "factors",
                    values,
                )
    elif isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D)) and (
        rule is rules.convolution_rule
    ):
        if rules.convolution_is_plain(layer):
            operands = [rules.convolution_operands(layer, c, examples) for c in calls]
            tensors = [t for o in operands for t in (o.x, o.dz)]
            values = _values(*(t.shape for t in tensors))
            if values is not None and values <= parameters:

                def block(t, budget):
                    gathered = [
                        dataclasses.replace(o, x=t[2 * i], dz=t[2 * i + 1])
                        for i, o in enumerate(operands)
                    ]
                    return convolution_block(layer, gathered, budget)

                return Payload(tensors, block, "factors", values)
    elif (
        isinstance(layer, keras.layers.Embedding)
        and rule is rules.per_example_rule
        and _embedding_is_plain(layer)
    ):
        tokens, d = embedding_factors(layer, calls, examples)
        values = _values(tokens.shape, d.shape)
        if values is not None and values <= parameters:
            return Payload(
                [tokens, d],
                lambda t, budget: embedding_block(
                    layer, t[0], t[1], budget, fallback=True
                ),
                "factors",
                values,
            )
    per_call = [rule(layer, call, examples) for call in calls]
    gradients = [
        tf.add_n([tf.cast(t, grads[0].dtype) for t in grads])
        for grads in zip(*per_call, strict=True)
    ]
    return gradients_payload(layer.name, gradients)
