"""Running measurements kept in Keras variables: C_K bar, L_K, the EMA of c_k.

The state is a small layer attached to the model (`model.fisher_state`). Keras
saves the layers it finds among a model's attributes, so `save_weights`,
`keras.callbacks.BackupAndRestore` and (for `FisherModel`) `.keras` files keep
its variables with the weights.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_fim._keras_compat import distribute_strategy, set_instance_attribute
from keras_fim.measurements import FisherMeasurement


@keras.saving.register_keras_serializable(package="keras_fim")
class FisherState(keras.layers.Layer):
    """Counters and running sums of the Fisher measurements.

    They accumulate the two measurements of Liao, Drummond, Reid and
    Carneiro (TPAMI 2020): ``C_K bar = (1/K) sum_k c_k`` over the ``K``
    measured steps, and ``L_K = sum_k (lr_k / |B_k|) ||J_k||_F`` divided by
    the sampling ratio (each measured step counts for the steps it stands
    for), so that ``L_K`` approximates the sum over all steps.

    Variables (all non-trainable):
        step: int64, training steps taken so far (over all `fit` calls).
        epoch: int64, the epoch being trained.
        measurements: int64, ``K``, measured steps that entered C_K bar.
        skipped: int64, measured steps left out of the running values: their
            ``c_k`` or ``L_K`` term was not finite (NaN or inf values, or
            all-zero gradients, where ``c_k`` is undefined).
        condition_sum: float64, ``sum_k c_k``.
        condition_ema: float64, exponential average of ``c_k``.
        energy_sum: float64, ``L_K``.
        trace_sigma_ema, true_gradient_sq_ema: float64, exponential averages
            of the unbiased estimates of ``tr(Sigma)`` and ``|G|^2`` from the
            gradients of each measured batch and of its halves, whose ratio
            is the smoothed gradient noise scale `noise_scale` (McCandlish
            et al. 2018 average the two separately, as here).

    Args:
        name: String, the layer's name. Defaults to `"fisher_state"`.
    """

    def __init__(self, name: str = "fisher_state", **kwargs):
        super().__init__(name=name, trainable=False, **kwargs)

        def counter(name, dtype):
            return self.add_weight(
                name=name,
                shape=(),
                dtype=dtype,
                initializer="zeros",
                trainable=False,
                aggregation="only_first_replica",
            )

        self.step = counter("step", "int64")
        self.epoch = counter("epoch", "int64")
        self.measurements = counter("measurements", "int64")
        self.skipped = counter("skipped", "int64")
        self.condition_sum = counter("condition_sum", "float64")
        self.condition_ema = counter("condition_ema", "float64")
        self.energy_sum = counter("energy_sum", "float64")
        self.trace_sigma_ema = counter("trace_sigma_ema", "float64")
        self.true_gradient_sq_ema = counter("true_gradient_sq_ema", "float64")
        self.built = True

    @property
    def condition_mean(self) -> tf.Tensor:
        """``C_K bar = (1/K) sum_k c_k`` (0 before the first measurement)."""
        count = tf.cast(self.measurements, tf.float64)
        return tf.math.divide_no_nan(tf.convert_to_tensor(self.condition_sum), count)

    @property
    def noise_scale(self) -> tf.Tensor:
        """Smoothed ``B_simple = tr(Sigma) / |G|^2``; NaN while undefined.

        Both averages are of *unbiased* estimates, which a few noisy batches
        can drive below zero (seen on EfficientNetB0: ``|G|^2`` at -86707
        after a few measurements). A ratio with a non-positive factor has no
        meaning, so it is undefined then, as before the first measurement;
        it is never reported as a number with the wrong sign. See
        docs/concepts.md for how many measurements a stable value needs.
        """
        trace_sigma = tf.convert_to_tensor(self.trace_sigma_ema)
        true_gradient_sq = tf.convert_to_tensor(self.true_gradient_sq_ema)
        defined = (trace_sigma > 0) & (true_gradient_sq > 0)
        return tf.where(
            defined,
            trace_sigma / tf.where(defined, true_gradient_sq, 1.0),
            tf.constant(float("nan"), tf.float64),
        )

    def record(
        self,
        measurement: FisherMeasurement,
        learning_rate: tf.Tensor,
        batch_size: tf.Tensor,
        steps_represented: tf.Tensor,
        ema_decay: float,
        noise_components: tuple = (float("nan"), float("nan")),
        measured=True,
        update_applied=True,
    ) -> tf.Tensor:
        """Adds one measured step; returns whether it was finite (kept).

        `measured` (boolean, or a boolean tensor): whether the step is a
        measurement at all; when False nothing changes (the values are
        ignored; under a distribution strategy the record runs at every
        step, outside any branch). `update_applied` (likewise): whether the
        training step applied its update; a measured step whose update was
        skipped (a loss-scale overflow under ``mixed_float16``) is counted
        as skipped.

        `noise_components` are the step's estimates of ``tr(Sigma)`` and
        ``|G|^2`` (`engine.gradient_noise_components`); their averages give
        `noise_scale`. ``L_K`` grows by ``steps_represented * lr / |B| * ||J||_F``, with
        ``||J||_F`` scaled up by ``sqrt(|B| / measured)`` when only some
        examples of the batch were measured; multiplying by
        `steps_represented` is Liao et al. (2020)'s division of ``L_K`` by
        the sampling ratio. A kept step adds its ``c_k`` to ``sum_k c_k``,
        whose mean over ``K`` is `condition_mean` (``C_K bar``).
        """
        counted = tf.cast(measured, tf.bool)
        c = measurement.condition_number
        energy = measurement.energy
        batch = tf.cast(batch_size, tf.float64)
        measured = tf.cast(measurement.batch_size, tf.float64)
        term = (
            tf.cast(steps_represented, tf.float64)
            * tf.cast(learning_rate, tf.float64)
            / batch
            * energy
            * tf.sqrt(batch / measured)
        )
        ok = (
            counted
            & tf.cast(update_applied, tf.bool)
            & tf.math.is_finite(c)
            & tf.math.is_finite(term)
        )
        first = tf.equal(self.measurements, 0)
        ema = tf.where(first, c, ema_decay * self.condition_ema + (1 - ema_decay) * c)
        self.condition_sum.assign_add(tf.where(ok, c, 0.0))
        self.condition_ema.assign(tf.where(ok, ema, self.condition_ema))
        self.energy_sum.assign_add(tf.where(ok, term, 0.0))
        self.measurements.assign_add(tf.where(ok, 1, 0))
        self.skipped.assign_add(tf.where(counted & ~ok, 1, 0))
        trace_sigma, true_gradient_sq = (
            tf.cast(v, tf.float64) for v in noise_components
        )
        usable = ok & tf.math.is_finite(trace_sigma + true_gradient_sq)
        unset = tf.equal(self.trace_sigma_ema, 0.0) & tf.equal(
            self.true_gradient_sq_ema, 0.0
        )
        for average, value in (
            (self.trace_sigma_ema, trace_sigma),
            (self.true_gradient_sq_ema, true_gradient_sq),
        ):
            updated = tf.where(
                unset, value, ema_decay * average + (1 - ema_decay) * value
            )
            average.assign(tf.where(usable, updated, average))
        return ok


@keras.saving.register_keras_serializable(package="keras_fim")
class SamplingState(keras.layers.Layer):
    """Where `DynamicSampling` stands, so that a resumed run continues it.

    Variables (int64, non-trainable): `step` (training steps taken under
    dynamic sampling), `data_pass` and `position` (the pass over the data
    and the examples of it already trained), `examples_seen`, `batch_size`
    (the current size, 0 before the first step), `last_change_step`,
    `measurements_at_change` (Fisher measurements when the size last
    changed), `reference_batch_size` (the size the learning rate is
    given for) and `open_epoch` (the Keras epoch whose steps are being
    trained, plus one; 0 between epochs: a backup taken on a pass's last
    step, before its epoch ended, says so, and the resumed epoch ends at
    once rather than training the next pass).

    Args:
        name: String, the layer's name. Defaults to `"sampling_state"`.
    """

    NAMES = (
        "step",
        "data_pass",
        "position",
        "examples_seen",
        "batch_size",
        "last_change_step",
        "measurements_at_change",
        "reference_batch_size",
        "open_epoch",
    )

    def __init__(self, name: str = "sampling_state", **kwargs):
        super().__init__(name=name, trainable=False, **kwargs)
        for variable_name in self.NAMES:
            setattr(
                self,
                variable_name,
                self.add_weight(
                    name=variable_name,
                    shape=(),
                    dtype="int64",
                    initializer="zeros",
                    trainable=False,
                    aggregation="only_first_replica",
                ),
            )
        self.built = True

    def read(self) -> dict:
        """All counters as Python integers (one device read each)."""
        return {name: int(getattr(self, name).numpy()) for name in self.NAMES}

    def write(self, values: dict) -> None:
        for name, value in values.items():
            getattr(self, name).assign(value)


def attach_state(
    model: keras.Model, attribute: str = "fisher_state", factory=FisherState
):
    """`model.<attribute>`, created with `factory()` and attached on first use."""
    state = getattr(model, attribute, None)
    if state is None:
        # Under the model's distribution strategy, as its own variables:
        # mirrored, each written once per step ("only_first_replica").
        strategy = distribute_strategy(model)
        if strategy is not None:
            with strategy.scope():
                state = factory()
        else:
            state = factory()
        # Untracked on purpose: `model.weights`, `get_weights()` and
        # `summary()` stay those of the user's model (a Sequential would not
        # track it anyway). Keras's weight saving walks the model's
        # attributes, so `save_weights`/`BackupAndRestore` still keep it.
        set_instance_attribute(model, attribute, state)
    return state
