"""Mixed precision (issue 6, item 2): ``mixed_float16`` with loss scaling and
``mixed_bfloat16``.

The per-example contributions come from 16-bit passes: under
``mixed_float16`` scaled as Keras's step scales its loss (``s / (R N)``, so
that they neither underflow nor overflow more than the step's own), and
unscaled in float32; the Gram matrix's products and sums are float64.
`TOLERANCES` cover the worst relative differences to a float32 twin of the
same model and weights that ``python benchmarks/mixed_precision.py`` prints
(4 seeds x 2 models x both paths; docs/distribute.md quotes them); the
bfloat16 ones keep a margin for CPUs without native bfloat16.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from fim_helpers import assert_same_weights

import keras_fim
from keras_fim.engine import ProbedPass, grams_from_calls, sum_blocks
from keras_fim.measurements import spectrum_from_gram

TOLERANCES = {
    "mixed_float16": {"top": 1e-3, "large": 2e-2, "trace": 1e-3, "c": 2e-3},
    "mixed_bfloat16": {"top": 4e-2, "large": 6e-2, "trace": 4e-2, "c": 5e-2},
}


@pytest.fixture(autouse=True)
def _float32_afterwards():
    yield
    keras.config.set_dtype_policy("float32")


def build(kind, optimizer=None):
    if kind == "mlp":
        inputs = keras.Input((16,))
        h = keras.layers.Dense(64, activation="relu")(inputs)
        h = keras.layers.Dense(32, activation="tanh")(h)
    else:
        inputs = keras.Input((8, 8, 3))
        h = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(10)(h)
    outputs = keras.layers.Activation("softmax", dtype="float32")(h)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=optimizer or keras.optimizers.SGD(0.1),
        loss="sparse_categorical_crossentropy",
    )
    return model


def batch(kind, n=32, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, 16) if kind == "mlp" else (n, 8, 8, 3)
    return rng.normal(size=shape).astype("float32"), rng.integers(0, 10, n)


def probed_spectrum(model, x, y):
    """The measurement from the training step's own pass (one step)."""

    @tf.function
    def step(x, y):
        probe = ProbedPass(model, x)
        with probe:
            model.train_step((x, y))
        record = probe.recorded()
        return sum_blocks(
            grams_from_calls(record.units, record.calls, record.examples)[0]
        )

    return spectrum_from_gram(step(tf.constant(x), tf.constant(y)))


def assert_close_to_float32(measured, reference, policy):
    tolerance = TOLERANCES[policy]
    e, ref = measured.eigenvalues.numpy(), reference.eigenvalues.numpy()
    assert np.isfinite(e).all()
    assert e[0] == pytest.approx(ref[0], rel=tolerance["top"])
    large = ref >= 1e-2 * ref[0]
    np.testing.assert_allclose(e[large], ref[large], rtol=tolerance["large"])
    assert float(measured.trace) == pytest.approx(
        float(reference.trace), rel=tolerance["trace"]
    )
    assert float(measured.condition_number) == pytest.approx(
        float(reference.condition_number), rel=tolerance["c"]
    )


@pytest.mark.parametrize("kind", ["mlp", "cnn_batchnorm"])
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_spectrum_within_tolerance_of_float32(policy, kind):
    """Same model and weights, one batch: the separate pass (`measure`) and
    the training step's own pass (`ProbedPass`) under mixed precision agree
    with float32 within the stated tolerance; the Gram is float64."""
    x, y = batch(kind)
    reference = build(kind)
    weights = reference.get_weights()
    expected = {"measure": keras_fim.measure(reference, x, y)}
    twin = build(kind)
    twin.set_weights(weights)
    expected["probed"] = probed_spectrum(twin, x, y)
    keras.config.set_dtype_policy(policy)
    model = build(kind)
    model.set_weights(weights)
    assert keras_fim.fisher_gram(model, x, y).dtype == tf.float64
    assert_close_to_float32(keras_fim.measure(model, x, y), expected["measure"], policy)
    model = build(kind)
    model.set_weights(weights)
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert_close_to_float32(probed_spectrum(model, x, y), expected["probed"], policy)


@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_fit_first_measurement_close_to_float32(policy, reuse):
    """In `fit`, one measured step (the first, on the same weights): C_K bar
    and L_K within the tolerance of a float32 fit's."""
    x, y = batch("mlp", n=64)
    values = {}
    for run_policy in ("float32", policy):
        keras.config.set_dtype_policy(run_policy)
        keras.utils.set_random_seed(0)
        model = build("mlp")
        model.fit(
            x,
            y,
            batch_size=32,
            shuffle=False,
            verbose=0,
            callbacks=[
                keras_fim.FisherCallback(every_n_steps=100, reuse_training_pass=reuse)
            ],
        )
        state = model.fisher_state
        assert int(state.measurements.numpy()) == 1
        values[run_policy] = (float(state.condition_mean), float(state.energy_sum))
    tolerance = TOLERANCES[policy]
    assert values[policy][0] == pytest.approx(values["float32"][0], rel=tolerance["c"])
    assert values[policy][1] == pytest.approx(
        values["float32"][1], rel=tolerance["trace"]
    )


class HandComputation(keras.callbacks.Callback):
    """c_k and the L_K term of each batch from `keras_fim.measure` before the
    step, kept when the step applied its update (the loss scale did not
    drop); the steps whose update was skipped are counted."""

    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size
        self.conditions, self.l_k, self.overflows = [], 0.0, 0

    def _scale(self):
        optimizer = self.model.optimizer
        return float(optimizer.scale_loss(tf.constant(1.0)))

    def on_train_batch_begin(self, batch, logs=None):
        rows = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
        self.before = self._scale()
        self.measurement = keras_fim.measure(self.model, self.x[rows], self.y[rows])
        self.lr = float(self.model.optimizer.learning_rate.numpy())

    def on_train_batch_end(self, batch, logs=None):
        if self._scale() < self.before:
            self.overflows += 1
            return
        self.conditions.append(float(self.measurement.condition_number))
        self.l_k += self.lr / self.batch_size * float(self.measurement.energy)


@pytest.mark.parametrize("reuse", [True, False])
def test_loss_scale_overflow_steps_are_skipped(reuse):
    """``mixed_float16`` with a loss scale too large at first: the steps
    whose scaled gradients overflow (Keras skips their update and halves the
    scale) count as skipped and stay out of C_K bar and L_K, which equal the
    hand computation over the other steps; the weights are those of plain
    Keras."""
    keras.config.set_dtype_policy("mixed_float16")
    x, y = batch("mlp", n=160)

    def model():
        keras.utils.set_random_seed(0)
        return build(
            "mlp",
            keras.optimizers.LossScaleOptimizer(
                keras.optimizers.SGD(0.1), initial_scale=2.0**20
            ),
        )

    measured, hand = model(), HandComputation(x, y, 16)
    with pytest.warns(UserWarning, match="skipped"):
        measured.fit(
            x,
            y,
            batch_size=16,
            shuffle=False,
            verbose=0,
            callbacks=[
                hand,
                keras_fim.FisherCallback(every_n_steps=1, reuse_training_pass=reuse),
            ],
        )
    state = measured.fisher_state
    assert hand.overflows >= 1
    assert int(state.skipped.numpy()) == hand.overflows
    assert int(state.measurements.numpy()) == 10 - hand.overflows
    assert float(state.condition_mean) == pytest.approx(
        np.mean(hand.conditions), rel=1e-4
    )
    assert float(state.energy_sum.numpy()) == pytest.approx(hand.l_k, rel=1e-4)
    plain = model()
    plain.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    assert_same_weights(measured, plain)


@pytest.mark.parametrize("reuse", [True, False])
def test_bfloat16_fit_weights_identical_to_plain_keras(reuse):
    keras.config.set_dtype_policy("mixed_bfloat16")
    x, y = batch("cnn", n=64)
    weights, models = [], []
    for callbacks in (
        [keras_fim.FisherCallback(every_n_steps=1, reuse_training_pass=reuse)],
        [],
    ):
        keras.utils.set_random_seed(0)
        model = build("cnn")
        model.fit(
            x,
            y,
            batch_size=16,
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=callbacks,
        )
        weights.append(model.get_weights())
        models.append(model)
    assert int(models[0].fisher_state.measurements.numpy()) == 8
    for a, b in zip(*weights, strict=True):
        np.testing.assert_array_equal(a, b)
