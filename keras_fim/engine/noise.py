"""Gradient noise: McCandlish et al.'s unbiased estimates of ``tr(Sigma)``
and ``|G|^2``, whose ratio is the gradient noise scale ``B_simple``.

From the squared norms of the gradients of a batch (``|g_B|^2``, size ``B``)
and of smaller batches (``|g_b|^2``, their mean, size ``b``), McCandlish et
al. (2018, appendix A):

``|G|^2 = (B |g_B|^2 - b |g_b|^2) / (B - b)`` and
``tr(Sigma) = (|g_b|^2 - |g_B|^2) / (1/b - 1/B)``.

Three sources give those norms: real passes over the batch and its two
halves (`gradient_noise_components`: exact with batch-coupled layers), the
Gram matrix of independent per-example gradients
(`noise_components_from_gram`: free, wrong for BatchNorm in training mode),
and the replicas' shards of a global batch (`noise_components_from_groups`).
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from keras_fim._keras_compat import call_has_training_arg
from keras_fim.engine.capture import dense_gradient
from keras_fim.engine.losses import per_example_losses
from keras_fim.engine.scaling import pass_loss_factor
from keras_fim.engine.units import batch_size, read_variables


def gradient_noise_components(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any = None,
    variable_values: tuple | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Estimates ``tr(Sigma)`` and ``|G|^2`` from mini-batch gradients.

    McCandlish et al. (2018, appendix A): with ``|g_B|^2`` the squared norm
    of the gradient of the whole batch (size ``B``) and ``|g_b|^2`` the mean
    over its two halves (size ``b = B // 2``),

    ``|G|^2 = (B |g_B|^2 - b |g_b|^2) / (B - b)`` and
    ``tr(Sigma) = (|g_b|^2 - |g_B|^2) / (1/b - 1/B)``,

    both unbiased; their ratio is the gradient noise scale ``B_simple``.
    Each gradient is that of a real batch (a stateless pass in training mode,
    the compiled loss without regularisation), so this holds for
    batch-coupled layers too, where the per-example contributions of
    BatchNorm in training mode are negatively correlated and the
    per-example estimate of `measure` is undefined. Returns float64 NaNs for
    a batch of fewer than 2 examples. `variable_values`: the values of the
    trainable and non-trainable variables to use (read now if `None`).
    """
    if variable_values is None:
        variable_values = read_variables(model)
    trainable, non_trainable = variable_values
    kwargs = {"training": True} if call_has_training_arg(model) else {}
    # Mixed precision: scaled as Keras's step scales its loss, unscaled in
    # float32 (16-bit gradients of a mean loss would underflow otherwise).
    scale = pass_loss_factor(model, 1)

    def squared_norm(start, stop):
        def part(t):
            return None if t is None else t[start:stop]

        xs, ys, ws = (keras.tree.map_structure(part, t) for t in (x, y, sample_weight))
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            y_pred, _ = model.stateless_call(trainable, non_trainable, xs, **kwargs)
            losses = per_example_losses(model, ys, y_pred, ws)
            loss = tf.reduce_sum(losses) / tf.cast(stop - start, losses.dtype)
            if scale is not None:
                loss = loss * tf.cast(scale, loss.dtype)
        grads = tape.gradient(
            loss, trainable, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        # An Embedding's gradient is IndexedSlices (repeated rows add up).
        total = tf.add_n(
            [
                tf.reduce_sum(tf.cast(dense_gradient(g, v), tf.float64) ** 2)
                for g, v in zip(grads, trainable, strict=True)
            ]
        )
        return total if scale is None else total / tf.cast(scale, tf.float64) ** 2

    batch = batch_size(x)
    half = tf.maximum(batch // 2, 1)
    big = squared_norm(0, batch)
    small = 0.5 * (squared_norm(0, half) + squared_norm(half, 2 * half))
    return unbiased_components(batch, half, big, small)


def unbiased_components(batch, half, big, small, defined=None):
    """McCandlish et al.'s unbiased estimates (appendix A) from the squared
    gradient norms of a batch of `batch` examples (`big`) and of smaller
    batches of `half` examples (`small`, their mean); NaN unless `defined`
    (by default: at least 2 examples)."""
    batch_f, half_f = tf.cast(batch, tf.float64), tf.cast(half, tf.float64)
    defined = batch_f >= 2 if defined is None else defined
    safe = tf.where(defined, batch_f - half_f, 1.0)
    true_gradient_sq = (batch_f * big - half_f * small) / safe
    trace_sigma = (small - big) / tf.where(defined, 1.0 / half_f - 1.0 / batch_f, 1.0)
    nan = tf.constant(float("nan"), tf.float64)
    return tf.where(defined, trace_sigma, nan), tf.where(defined, true_gradient_sq, nan)


def noise_components_from_gram(gram: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`gradient_noise_components` from the Gram matrix of independent
    per-example gradients: a half batch's gradient is the mean of its
    examples' gradients, so every squared norm is a sum of Gram entries.
    Wrong for batch-coupled models (BatchNorm in training mode), whose
    half batches must be run for real."""
    gram = tf.cast(gram, tf.float64)
    batch = tf.shape(gram)[0]
    half = tf.maximum(batch // 2, 1)

    def squared_norm(start, stop):
        n = tf.cast(stop - start, tf.float64)
        return tf.reduce_sum(gram[start:stop, start:stop]) / (n * n)

    big = squared_norm(0, batch)
    small = 0.5 * (squared_norm(0, half) + squared_norm(half, 2 * half))
    return unbiased_components(batch, half, big, small)


def noise_components_from_groups(gram: tf.Tensor, counts: tf.Tensor):
    """`gradient_noise_components` with real sub-batches as the small
    batches: the Gram rows come in groups of `counts` (the replicas'
    shards, in order), each of which the model ran as a batch of its own,
    so a group's gradient is the mean of its rows' contributions even where
    examples interact (BatchNorm normalising each replica's shard).

    ``|g_B|^2`` is that of all rows, ``|g_b|^2`` the mean over the
    non-empty groups, ``b`` the mean group size; NaN with fewer than two
    non-empty groups."""
    gram = tf.cast(gram, tf.float64)
    counts = tf.cast(counts, tf.int32)
    groups = tf.size(counts)
    batch = tf.shape(gram)[0]
    members = tf.one_hot(tf.repeat(tf.range(groups), counts), groups, dtype=tf.float64)
    sums = tf.linalg.diag_part(
        tf.matmul(members, tf.matmul(gram, members), transpose_a=True)
    )
    sizes = tf.cast(counts, tf.float64)
    nonempty = counts > 0
    used = tf.reduce_sum(tf.cast(nonempty, tf.float64))
    small = tf.reduce_sum(
        tf.where(nonempty, sums / tf.where(nonempty, sizes**2, 1.0), 0.0)
    ) / tf.maximum(used, 1.0)
    batch_f = tf.cast(batch, tf.float64)
    big = tf.reduce_sum(gram) / batch_f**2
    mean_size = batch_f / tf.maximum(used, 1.0)
    return unbiased_components(batch_f, mean_size, big, small, defined=used >= 2)
