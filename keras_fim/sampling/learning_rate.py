"""The learning-rate coupling of `DynamicSampling`: a gain of the batch size.

`learning_rate_gain` is a pure function, evaluated inside the compiled train
step on the size of the batch actually trained. `ScaledLearningRate`
multiplies whatever rate the optimizer gives (a float, a schedule, one
changed by other callbacks) by that gain; `scaled_learning_rate` installs it
only while a step is being traced.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from keras_fim._keras_compat import (
    optimizer_learning_rate,
    set_optimizer_learning_rate,
)

LEARNING_RATE_SCALINGS = ("none", "linear", "sqrt", "adascale")


def learning_rate_gain(
    scaling: str,
    batch_size: int | tf.Tensor,
    reference_batch_size: int | tf.Tensor,
    noise_scale: float | tf.Tensor | None = None,
) -> tf.Tensor:
    """The factor on the optimizer's rate for a batch of `batch_size`.

    With ``B`` the batch size, ``B0`` the reference size and ``b`` the
    gradient noise scale: ``"none"`` gives 1 (the paper), ``"linear"``
    ``B/B0``, ``"sqrt"`` ``sqrt(B/B0)``, and ``"adascale"``
    ``(1 + b/B0) / (1 + b/B)``, AdaScale's gain, between 1 and ``B/B0``;
    it is 1 while the noise scale is undefined (NaN, or infinite).

    Sources: the linear scaling rule is Goyal et al. (2017), "Accurate,
    Large Minibatch SGD"; the square-root rule Krizhevsky (2014), "One weird
    trick for parallelizing convolutional neural networks"; the gain
    ``(1 + b/B0) / (1 + b/B)`` is AdaScale's (Johnson, Agrawal, Gu and
    Guestrin 2020, "AdaScale SGD"), with ``b`` McCandlish et al. (2018)'s
    gradient noise scale ``B_simple``.

    Args:
        scaling: String, one of ``"none"``, ``"linear"``, ``"sqrt"``,
            ``"adascale"``.
        batch_size: Integer or integer tensor, ``B``, the size of the batch
            trained.
        reference_batch_size: Integer or integer tensor, ``B0``; a value
            below 1 counts as 1 (`SamplingState` holds 0 before the first
            step).
        noise_scale: Float or float tensor, ``b``; read by ``"adascale"``
            only. Defaults to `None`.

    Returns:
        A float64 scalar tensor.

    Raises:
        ValueError: `scaling` is none of the four.

    Example:

    >>> float(learning_rate_gain("linear", 64, 16))
    4.0
    >>> float(learning_rate_gain("adascale", 64, 16, noise_scale=32.0))
    2.0
    >>> float(learning_rate_gain("adascale", 64, 16, noise_scale=float("nan")))
    1.0
    """
    if scaling not in LEARNING_RATE_SCALINGS:
        raise ValueError(
            f"`scaling` must be one of {LEARNING_RATE_SCALINGS}. "
            f"Received: scaling={scaling!r}"
        )
    batch = tf.cast(batch_size, tf.float64)
    reference = tf.cast(tf.maximum(reference_batch_size, 1), tf.float64)
    ratio = batch / reference
    if scaling == "linear":
        return ratio
    if scaling == "sqrt":
        return tf.sqrt(ratio)
    if scaling == "adascale":
        noise = tf.cast(noise_scale, tf.float64)
        noise = tf.where(tf.math.is_finite(noise), noise, tf.zeros_like(noise))
        return (1.0 + noise / reference) / (1.0 + noise / batch)
    return tf.constant(1.0, tf.float64)


class ScaledLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """The optimizer's own rate `base` times `gain`; installed only while a
    step is being traced, so nothing outside the compiled step changes."""

    def __init__(self, base, gain):
        self.base = base
        self.gain = gain

    def __call__(self, step):
        base = self.base
        if isinstance(base, keras.optimizers.schedules.LearningRateSchedule):
            rate = base(step)
        elif isinstance(base, keras.Variable):
            rate = base.value
        elif callable(base):
            rate = base()
        else:
            rate = base
        rate = tf.convert_to_tensor(rate)
        return rate * tf.cast(self.gain, rate.dtype)

    def get_config(self):  # never serialised: it lives inside one trace
        return {}


def innermost_optimizer(optimizer):
    """The optimizer that applies the rate: a `LossScaleOptimizer` (mixed
    precision) delegates to its `inner_optimizer`."""
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    return optimizer


# Steps being traced inside `scaled_learning_rate`, per optimizer (by id).
_INSTALLED: dict[int, int] = {}


@contextlib.contextmanager
def scaled_learning_rate(optimizer, gain, install: bool = True):
    """Inside, while a step is traced: the rate of `optimizer` times `gain`
    (installed only if `install`), the optimizer's own rate again after.
    Yields the rate applied at the optimizer's current iteration."""
    optimizer = innermost_optimizer(optimizer)
    base = optimizer_learning_rate(optimizer)
    if isinstance(base, ScaledLearningRate):
        # Under tf.distribute every replica's step is traced, in threads
        # that take turns, on the same optimizer: another replica's rate
        # is installed (the same gain, of the global batch).
        base = base.base
    scaled = ScaledLearningRate(base, gain)
    learning_rate = scaled(optimizer.iterations)
    key = id(optimizer)
    _INSTALLED[key] = _INSTALLED.get(key, 0) + 1
    if install:
        set_optimizer_learning_rate(optimizer, scaled)
    try:
        yield learning_rate
    finally:
        # The base again once the last replica's step is traced.
        _INSTALLED[key] -= 1
        if not _INSTALLED[key]:
            del _INSTALLED[key]
            set_optimizer_learning_rate(optimizer, base)
