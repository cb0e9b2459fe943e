"""The factor Keras's training step multiplies the per-example losses by.

Keras's step differentiates ``s / (R N) * sum_i l_i`` (plus weight
regularisation): ``s`` the loss scale of a `LossScaleOptimizer` (1 without
one), ``R`` the replicas in sync, ``N`` the batch size for mean-type
reductions and 1 for ``"sum"`` losses, ``l_i`` the per-example losses of
`keras_fim.engine.losses.per_example_losses`. Its cotangents divided by this
factor are those of the per-example losses (`keras_fim.engine.probes`); a
pass of keras-fim's own multiplies by it under ``mixed_float16``, so that its
16-bit cotangents neither underflow nor overflow more than the step's own.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_fim.engine.losses import reduction_kinds


def replicas_in_sync() -> int:
    """The replicas in sync of the current replica context (1 outside one
    or in cross-replica context)."""
    context = tf.distribute.get_replica_context()
    return 1 if context is None else int(context.num_replicas_in_sync)


def loss_scale(model: keras.Model) -> tf.Tensor | None:
    """The current scale ``s`` of the model's `LossScaleOptimizer` (float32),
    or `None` when its optimizer scales no loss."""
    optimizer = getattr(model, "optimizer", None)
    if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return None
    return tf.cast(optimizer.scale_loss(tf.constant(1.0)), tf.float32)


def training_loss_factor(model: keras.Model, batch) -> tf.Tensor:
    """``s / (R N)``: what Keras's step multiplies ``sum_i l_i`` by, for a
    batch of `batch` examples per replica (read before the step updates
    ``s``)."""
    scale = loss_scale(model)
    scale = tf.constant(1.0) if scale is None else scale
    normaliser = (
        1.0 if reduction_kinds(model) == {"sum"} else tf.cast(batch, tf.float32)
    )
    return scale / (replicas_in_sync() * normaliser)


def pass_loss_factor(model: keras.Model, batch) -> tf.Tensor | None:
    """The factor a pass of keras-fim's own scales its summed loss by: the
    training step's under loss scaling (16-bit passes), `None` otherwise."""
    if loss_scale(model) is None:
        return None
    return training_loss_factor(model, batch)


def update_applied(model: keras.Model, scale_before) -> tf.Tensor | bool:
    """Whether the step applied its update: a `LossScaleOptimizer` halves
    its scale instead when the scaled gradients were not finite (an
    overflow), and never lowers it otherwise. `scale_before`: `loss_scale`
    read before the step."""
    if scale_before is None:
        return True
    return loss_scale(model) >= scale_before
