"""Spectral measurements of the approximate Fisher, from its Gram matrix.

Pure functions of tensors; no Keras state. Conventions (METHOD.md):

* ``G = J J^T`` is the ``|B| x |B|`` Gram matrix of the per-example
  contributions ``g_i`` (the rows of ``J``).
* The non-zero eigenvalues of the approximate Fisher ``F = J^T J / |B|`` are
  ``eig(G) / |B|``; they are reported as `eigenvalues`.
* The paper's ``e`` are ``sqrt(max(eig(G), 0))``, the singular values of
  ``J``; its truncated condition number ``c_k = max(e) / min(e > 0)`` (Liao,
  Drummond, Reid and Carneiro, TPAMI 2020) is therefore the square root of
  the condition number of ``F`` restricted to its non-zero eigenvalues.
* "Non-zero" means larger than ``zero_threshold * max(eig(G))``. By default
  the threshold is derived from the precision the contributions carry
  (`noise_floor`): an eigenvalue of ``G`` counts as zero when it is at most
  ``max((KAPPA u)^2, SOLVER_FACTOR eps64) * trace(G)``, with ``u`` the unit
  round-off of the contributions' dtype (float32's ``eps`` for a float32
  model). `FisherMeasurement.zero_threshold` reports the threshold used,
  relative to the largest eigenvalue, so ``c_k <= 1 / sqrt(zero_threshold)``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf


class FisherMeasurement(NamedTuple):
    """One measured mini-batch. All values float64 tensors (rank: int32).

    When the Gram matrix (or the eigen-solver's result) is not finite, every
    value is NaN and the rank is 0: the measurement is undefined, and
    `FisherCallback` counts the step as skipped.

    Attributes:
        eigenvalues: Eigenvalues of ``F = J^T J / |B|``, descending, shaped
            ``(|B|,)``; tiny negative round-off is clamped to 0.
        singular_values: The paper's ``e = sqrt(eig(J J^T))``, descending.
        condition_number: The paper's truncated ``c_k = max(e) / min(e)``
            over the non-zero ``e``; NaN when every ``e`` is zero (all-zero
            gradients), 1 for a single example with a non-zero gradient.
        energy: ``||J||_F = sqrt(trace(J J^T))``, the spectrum's energy that
            ``L_K`` accumulates.
        trace: ``trace(F) = ||J||_F^2 / |B|``.
        gradient_norm: Norm of the mini-batch gradient ``(1/|B|) sum_i g_i``.
        gradient_noise_scale: McCandlish et al.'s ``B_simple``; NaN when its
            denominator estimate is not positive or ``|B| = 1``.
        rank: Number of non-zero eigenvalues.
        batch_size: ``|B|``, the number of examples measured.
        zero_threshold: The threshold used, relative to the largest
            eigenvalue: eigenvalues at most ``zero_threshold *
            eigenvalues[0]`` counted as zero (so ``c_k`` is at most
            ``1 / sqrt(zero_threshold)``). NaN when the measurement is.
    """

    eigenvalues: tf.Tensor
    singular_values: tf.Tensor
    condition_number: tf.Tensor
    energy: tf.Tensor
    trace: tf.Tensor
    gradient_norm: tf.Tensor
    gradient_noise_scale: tf.Tensor
    rank: tf.Tensor
    batch_size: tf.Tensor
    zero_threshold: tf.Tensor

    @property
    def eigenvalue_min(self) -> tf.Tensor:
        """The smallest non-zero eigenvalue of ``F`` (NaN if none)."""
        return nonzero_min(self.eigenvalues, self.rank)


KAPPA = 4.0
"""Unit round-offs of ``||J||_F`` below which a singular value of ``J`` is
taken for round-off (a margin of at least 6 over the 0.06-0.62 measured)."""

SOLVER_FACTOR = 64.0
"""Float64 eps of ``trace(G)``: the Gram's accumulation and eigen-solve."""


def unit_roundoff(dtype) -> float:
    """``eps`` of a floating `dtype` (float16, bfloat16, float32, float64)."""
    dtype = tf.as_dtype(dtype)
    if dtype == tf.bfloat16:
        return 2.0**-7
    return float(np.finfo(dtype.as_numpy_dtype).eps)


def noise_floor(precision: float) -> float:
    """The default threshold on the eigenvalues of ``G``, relative to
    ``trace(G)``: ``max((KAPPA * precision)^2, SOLVER_FACTOR * eps64)``.

    Derivation. The computed contributions are ``J + E``, with ``E`` the
    round-off of the dtype they are computed in (unit round-off ``u``:
    float32's ``1.2e-7`` for a float32 model, float16's under
    ``mixed_float16``). Weyl's inequality bounds how far any singular value
    moves by ``||E||_2``, but that bound is far too pessimistic here: on
    the paper's ResNet with BatchNorm, ``||E||_2`` reaches ``70 u ||J||_F``
    at batch 512, almost all of it a relative perturbation of the leading
    directions (the largest eigenvalue moves by ``1e-6`` of itself), while
    the smaller half of the singular values moved by at most ``0.62 u
    ||J||_F`` (batch 16; at most 0.25 from batch 32 to 512;
    ``benchmarks/precision.py`` prints all three). A singular value at most
    ``KAPPA u ||J||_F`` (at least 6 times that) is therefore taken for
    round-off, and since ``||J||_F^2 = trace(G)`` the eigenvalues of
    ``G`` below ``(KAPPA u)^2 trace(G)`` count as zero. The Gram products
    are exact in float64 (`keras_fim.engine.gram`); their accumulation and
    the float64 eigen-solve add errors of about ``eps64 trace(G)`` to the
    eigenvalues of ``G``, hence the second term, which is what bounds a
    float64 model. The bound scales with the spectrum's energy, never with
    the batch size: at float32 it lets ``c_k`` reach about
    ``2e6 / sqrt(trace(G) / max eig(G))``, where the old ``|B| eps32`` of
    the largest eigenvalue capped it at ``1 / sqrt(|B| eps32)`` (181 at
    batch 256) and discarded real eigenvalues.
    """
    return max((KAPPA * precision) ** 2, SOLVER_FACTOR * unit_roundoff(tf.float64))


def nonzero_min(values_descending: tf.Tensor, rank: tf.Tensor) -> tf.Tensor:
    """The smallest of the first `rank` values (NaN when rank is 0)."""
    index = tf.maximum(rank - 1, 0)
    nan = tf.constant(np.nan, values_descending.dtype)
    return tf.where(rank > 0, tf.gather(values_descending, index), nan)


def spectrum_from_gram(
    gram: tf.Tensor,
    zero_threshold: float | None = None,
    precision: float | None = None,
) -> FisherMeasurement:
    """All measurements of one mini-batch from its Gram matrix ``J J^T``.

    Implements Liao et al. (TPAMI 2020): ``e = sqrt(eig(J J^T))`` and the
    truncated condition number ``c_k = max(e) / min(e > 0)``; the energy
    ``||J||_F = sqrt(trace(J J^T))`` that ``L_K`` accumulates; and McCandlish
    et al. (2018)'s gradient noise scale (`gradient_noise_scale`).

    Args:
        gram: Tensor ``(B, B)``, the Gram matrix of per-example gradients.
        zero_threshold: Float in [0, 1) or `None`. Eigenvalues of the Gram
            at most ``zero_threshold * max(eig)`` count as zero; ``0`` keeps
            every positive one (the reference code's exact-zero rule).
            `None` derives it from `precision` (`noise_floor`).
        precision: Float or `None`, the unit round-off of the dtype the
            contributions were computed in (`unit_roundoff`); `None` means
            that of the Gram's dtype when it is below float64, float32's
            otherwise (the engine forms float64 Grams of float32
            contributions and passes the precision they carry).

    Returns:
        A `FisherMeasurement`; eigenvalues are solved in float64. A Gram
        matrix with a NaN or inf entry is never handed to the eigen-solver
        (which fails at run time on one, stopping a compiled train step): the
        measurement is then all NaN with rank 0, as it is when the solver
        returns a non-finite value.

    Example:

    >>> import numpy as np
    >>> jac = np.array([[1.0, 0.0], [0.0, 2.0]])
    >>> m = spectrum_from_gram(jac @ jac.T)
    >>> m.eigenvalues.numpy(), float(m.condition_number)
    (array([2. , 0.5]), 2.0)
    """
    gram = tf.convert_to_tensor(gram)
    if precision is None:
        dtype = gram.dtype if gram.dtype.size < 8 else tf.float32
        precision = unit_roundoff(dtype)
    gram = tf.cast(gram, tf.float64)
    gram = 0.5 * (gram + tf.transpose(gram))
    batch = tf.shape(gram)[0]
    batch_f = tf.cast(batch, tf.float64)
    # The eigen-solver fails at run time on a non-finite matrix (an error that
    # would stop training), so it never sees one: a stand-in is solved, and
    # the result is discarded together with any non-finite solver output.
    finite = tf.reduce_all(tf.math.is_finite(gram))
    solved = tf.linalg.eigvalsh(tf.where(finite, gram, tf.eye(batch, dtype=tf.float64)))
    valid = finite & tf.reduce_all(tf.math.is_finite(solved))
    nan = tf.constant(np.nan, tf.float64)
    gram_eigenvalues = tf.where(valid, tf.maximum(tf.reverse(solved, [0]), 0.0), nan)
    largest = gram_eigenvalues[0]
    squared_norms_sum = tf.where(valid, tf.linalg.trace(gram), nan)  # sum |g_i|^2
    if zero_threshold is None:
        floor = noise_floor(precision) * squared_norms_sum
        zero_threshold = tf.math.divide_no_nan(floor, largest)
    # dtype_hint: a Python float becomes float64 directly, not via float32.
    zero_threshold = tf.cast(
        tf.convert_to_tensor(zero_threshold, dtype_hint=tf.float64), tf.float64
    )
    zero_threshold = tf.where(valid, zero_threshold, nan)
    nonzero = gram_eigenvalues > zero_threshold * largest
    rank = tf.reduce_sum(tf.cast(nonzero & (gram_eigenvalues > 0), tf.int32))
    singular_values = tf.sqrt(gram_eigenvalues)
    condition = singular_values[0] / nonzero_min(singular_values, rank)
    sum_gradient_sq = tf.where(valid, tf.reduce_sum(gram), nan)  # |sum_i g_i|^2
    mean_sq_norm = squared_norms_sum / batch_f  # s
    batch_gradient_sq = sum_gradient_sq / batch_f**2  # m
    return FisherMeasurement(
        eigenvalues=gram_eigenvalues / batch_f,
        singular_values=singular_values,
        condition_number=condition,
        energy=tf.sqrt(squared_norms_sum),
        trace=squared_norms_sum / batch_f,
        gradient_norm=tf.sqrt(tf.maximum(batch_gradient_sq, 0.0)),
        gradient_noise_scale=gradient_noise_scale(
            mean_sq_norm, batch_gradient_sq, batch_f
        ),
        rank=rank,
        batch_size=batch,
        zero_threshold=zero_threshold,
    )


def gradient_noise_scale(
    mean_sq_norm: tf.Tensor | np.float64,
    batch_gradient_sq: tf.Tensor | np.float64,
    batch_size: tf.Tensor | np.float64,
) -> tf.Tensor:
    """McCandlish et al. (2018) ``B_simple = tr(Sigma) / |G|^2``, one batch.

    From "An Empirical Model of Large-Batch Training". With ``s = mean_i
    ||g_i||^2`` and ``m = ||mean_i g_i||^2``: ``tr(Sigma) ~ (s - m) B / (B -
    1)`` and ``|G|^2 ~ (B m - s) / (B - 1)``, both unbiased. NaN when ``B <
    2`` or either estimate is not positive (undefined, never a number with
    the wrong sign).

    Args:
        mean_sq_norm: Float64 scalar (tensor or `np.float64`; a Python
            float would become float32 and fail), ``s = mean_i ||g_i||^2``,
            the mean squared norm of the per-example gradients.
        batch_gradient_sq: Float64 scalar, ``m = ||mean_i g_i||^2``, the
            squared norm of the mini-batch gradient.
        batch_size: Float64 scalar, ``B``, the number of examples the two
            averages are over.

    Returns:
        A float64 scalar tensor, the estimate of ``B_simple``, or NaN.
    """
    denominator = batch_size - 1.0
    safe = tf.maximum(denominator, 1.0)
    trace_sigma = (mean_sq_norm - batch_gradient_sq) * batch_size / safe
    true_gradient_sq = (batch_size * batch_gradient_sq - mean_sq_norm) / safe
    defined = (denominator > 0) & (true_gradient_sq > 0) & (trace_sigma > 0)
    nan = tf.constant(np.nan, tf.float64)
    return tf.where(
        defined, trace_sigma / tf.where(defined, true_gradient_sq, 1.0), nan
    )
