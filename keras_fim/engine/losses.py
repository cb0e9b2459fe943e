"""Per-example losses from a model's compiled loss.

Keras reduces every compiled loss to one scalar. The Fisher engine needs the
loss of each example instead: the value whose gradient is that example's
contribution to the mini-batch gradient. For a loss reduced with
``"sum_over_batch_size"`` (the Keras default) the compiled loss is
``sum_i l_i / |B|``; we return the ``l_i``, so that ``sum_i l_i = |B| * loss``.
Sample weights and masks enter exactly as Keras applies them, loss weights of
several outputs multiply their terms, and regularisation losses
(``model.losses``) are left out on purpose: they are not part of any
example's loss (METHOD.md).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_fim._keras_compat import (
    LossFunctionWrapper,
    apply_mask,
    compile_loss,
    compiled_losses,
    flat_losses,
    get_keras_mask,
    squeeze_or_expand_to_same_rank,
    user_loss,
)
from keras_fim.validation import check_compiled_loss

MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")
"""Reductions whose compiled loss is ``sum_i l_i / |B|`` in terms of the
per-example losses ``l_i`` this module returns ("sum": ``sum_i l_i``)."""


def _resolve(path, structure):
    for key in path:
        structure = structure[key]
    return structure


def _align_y_true(y_true, y_pred):
    """Gives `y_true` the structure of `y_pred` (lists vs dicts vs flat)."""
    if not tf.nest.is_nested(y_pred):
        return y_true
    try:
        keras.tree.assert_same_structure(y_true, y_pred)
        return y_true
    except (ValueError, TypeError):
        return keras.tree.pack_sequence_as(y_pred, keras.tree.flatten(y_true))


def _one_loss(loss_fn, y_t, y_p, sample_weight) -> tf.Tensor:
    """Per-example values of one Keras `Loss`, shaped `(batch,)`."""
    in_mask = get_keras_mask(y_p)
    y_p = keras.ops.convert_to_tensor(y_p, dtype=loss_fn.dtype)
    y_t = keras.ops.convert_to_tensor(y_t, dtype=loss_fn.dtype)
    values = loss_fn.call(y_t, y_p)
    if values.shape.rank == 0:
        raise ValueError(
            "keras-fim needs the loss of each example: a loss that keeps the "
            f"batch dimension. Received: a loss {loss_fn.name!r} that returns "
            f"one value for the whole batch (shape {values.shape})."
        )
    out_mask = get_keras_mask(values)
    mask = in_mask
    if in_mask is not None and out_mask is not None:
        mask = tf.logical_and(tf.cast(in_mask, tf.bool), tf.cast(out_mask, tf.bool))
    elif out_mask is not None:
        mask = out_mask
    values = tf.convert_to_tensor(values, dtype=loss_fn.dtype)
    reduction = loss_fn.reduction
    if reduction is None or reduction == "none":
        raise ValueError(
            "keras-fim needs a loss that Keras reduces over the batch. "
            f"Received: a loss {loss_fn.name!r} with reduction={reduction!r}; "
            "allowed: 'sum_over_batch_size', 'mean', 'sum', "
            "'mean_with_sample_weight'."
        )
    if mask is not None:
        mask = tf.convert_to_tensor(mask, dtype=values.dtype)
    weights = apply_mask(sample_weight, mask, dtype=values.dtype, reduction=reduction)
    if weights is not None:
        weights = tf.cast(weights, values.dtype)
        values, weights = squeeze_or_expand_to_same_rank(values, weights)
        values = values * weights
    batch = tf.shape(values)[0]
    per_example = tf.reshape(values, [batch, -1])
    per_example = tf.reduce_sum(per_example, axis=1)
    if reduction == "mean_with_sample_weight":
        if weights is not None:
            per_example *= tf.cast(batch, values.dtype) / tf.reduce_sum(weights)
    elif reduction in MEAN_REDUCTIONS:
        # Keras divides the sum by the number of loss elements; an example's
        # loss is its share times |B|, i.e. the mean over its own elements.
        elements = tf.cast(tf.size(values), values.dtype)
        per_example *= tf.cast(batch, values.dtype) / elements
    return per_example


def per_example_losses(
    model: keras.Model, y_true, y_pred, sample_weight=None
) -> tf.Tensor:
    """Returns each example's compiled loss, shaped `(batch,)`, in float32+.

    The values sum to ``|B|`` times the compiled loss without its
    regularisation terms (for mean-type reductions).
    """
    check_compiled_loss(model)
    loss = compile_loss(model)
    y_true = _align_y_true(y_true, y_pred)
    if not loss.built:
        loss.build(y_true, y_pred)
    total = None
    for path, loss_fn, loss_weight, _ in flat_losses(loss):
        y_t, y_p = _resolve(path, y_true), _resolve(path, y_pred)
        if sample_weight is not None and tf.nest.is_nested(sample_weight):
            weight = _resolve(path, sample_weight)
        else:
            weight = sample_weight
        value = _one_loss(loss_fn, y_t, y_p, weight)
        value = tf.cast(value, tf.float32) if value.dtype.size < 4 else value
        if loss_weight is not None:
            value = keras.ops.multiply(value, loss_weight)  # as Keras: exact in float64
        total = value if total is None else total + tf.cast(value, total.dtype)
    if total is None:
        raise ValueError(
            "keras-fim found no loss to differentiate: every output's loss is "
            f"None. Received: loss={user_loss(loss)!r}."
        )
    return total


def reduction_kinds(model) -> set:
    """``"mean"`` (`MEAN_REDUCTIONS`) or ``"sum"`` (or another reduction's
    name) for each compiled loss."""

    def reduction(loss):
        return loss.reduction if isinstance(loss, keras.losses.Loss) else "mean"

    return {
        "mean" if reduction(loss) in MEAN_REDUCTIONS else reduction(loss)
        for loss in compiled_losses(model)
    }


def keras_losses_only(model) -> bool:
    """Whether every compiled loss is one of Keras's own (whose values keep
    the batch dimension, as `keras_fim.engine.probes.ProbedPass` assumes)."""

    def builtin(loss):
        if isinstance(loss, str):
            return True
        if isinstance(loss, LossFunctionWrapper):
            return builtin(loss.fn)
        owner = type(loss) if isinstance(loss, keras.losses.Loss) else loss
        return getattr(owner, "__module__", "").startswith("keras.")

    return all(builtin(loss) for loss in compiled_losses(model))
