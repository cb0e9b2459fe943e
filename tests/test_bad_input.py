"""Bad input (issue 6, item 4): every option of FisherCallback, FisherModel,
DynamicSampling and the schedules, a model that is not compiled, losses that
cannot be split per example, an unwritable `log_dir`, a layer the engine
cannot handle and data without labels.

Wrong options raise `ValueError` at construction, naming the argument, the
value received and what is allowed. A model or loss keras-fim cannot measure
is refused at the start of `fit`, before any step. What can only be found
while the measured step is traced (a layer or a loss the engine cannot
handle) skips the measurement for that fit with one warning, and training is
exactly that of plain Keras.
"""

import inspect
import pathlib
import warnings

import fim_helpers as helpers
import keras
import numpy as np
import pytest
import tensorflow as tf
from fim_helpers import assert_same_weights

import keras_fim
from keras_fim.schedules import Automatic, Geometric, Linear, Staged

NAN, INF = float("nan"), float("inf")


def assert_names(error: pytest.ExceptionInfo, name: str, value=None, check_value=True):
    """The message names the argument, the value received and what is allowed."""
    message = str(error.value)
    assert f"`{name}`" in message, message
    assert "must" in message, message  # what is allowed
    if check_value:
        assert f"{name}={value!r}" in message, message


def check_table(rows, make, check=assert_names):
    """`make(name, value)` raises a `ValueError` that `check` accepts, for
    every row. The table is one test (a fresh Keras session per test costs
    more than all its rows); the failures list every row that failed."""
    failures = []
    for name, value in rows:
        try:
            with pytest.raises(ValueError) as error:
                make(name, value)
            check(error, name, value)
        except (AssertionError, pytest.fail.Exception) as failure:
            failures.append(f"{name}={value!r}: {failure}")
    assert not failures, "\n".join(failures)


# -- FisherCallback and FisherModel options ----------------------------------------

FISHER_BAD = [
    ("every_n_steps", 0),
    ("every_n_steps", -3),
    ("every_n_steps", 2.5),
    ("every_n_steps", "5"),
    ("every_n_steps", None),
    ("every_n_steps", True),
    ("dense_epochs", -1),
    ("dense_epochs", 1.5),
    ("dense_epochs", None),
    ("dense_epochs", True),
    ("max_examples", 1),
    ("max_examples", 0),
    ("max_examples", 8.0),
    ("max_examples", "all"),
    ("max_examples", False),
    ("zero_threshold", -0.1),
    ("zero_threshold", 1.0),
    ("zero_threshold", NAN),
    ("zero_threshold", INF),
    ("zero_threshold", "1e-6"),
    ("zero_threshold", True),
    ("ema_decay", -0.1),
    ("ema_decay", 1.0),
    ("ema_decay", NAN),
    ("ema_decay", None),
    ("ema_decay", "0.9"),
    ("ema_decay", True),
    ("log_dir", 3),
    ("log_dir", ["logs"]),
    ("log_dir", ""),
    ("per_layer", 1),
    ("per_layer", "yes"),
    ("per_layer", None),
    ("memory_budget", 0),
    ("memory_budget", -1.0),
    ("memory_budget", NAN),
    ("memory_budget", "1GB"),
    ("memory_budget", True),
    ("reuse_training_pass", 0),
    ("reuse_training_pass", "no"),
    ("reuse_training_pass", None),
    ("fail_mode", "ignore"),
    ("fail_mode", None),
    ("fail_mode", True),
    ("measured_layers", 3),
    ("measured_layers", []),
    ("measured_layers", ["dense", None]),
    ("noise_scale", "sometimes"),
    ("noise_scale", 0),
    ("noise_scale", True),
    ("noise_scale", 2.0),
    ("noise_scale", None),
]

# FisherModel's counterpart is a method (`FisherModel.per_example_loss`).
CALLBACK_ONLY_BAD = [
    ("per_example_loss", "mse"),
    ("per_example_loss", 3),
]


def functional(model_class=keras.Model, **kwargs):
    inputs = keras.Input((3,))
    return model_class(inputs, keras.layers.Dense(2)(inputs), **kwargs)


def test_the_table_covers_every_option():
    options = set(inspect.signature(keras_fim.FisherCallback).parameters)
    callback_only = {name for name, _ in CALLBACK_ONLY_BAD}
    assert options == {name for name, _ in FISHER_BAD} | callback_only
    model_options = set(inspect.signature(keras_fim.FisherModel.__init__).parameters)
    assert options - callback_only <= model_options
    assert not callback_only & model_options


def test_bad_fisher_option_is_refused_at_construction():
    check_table(FISHER_BAD, lambda n, v: keras_fim.FisherCallback(**{n: v}))
    check_table(CALLBACK_ONLY_BAD, lambda n, v: keras_fim.FisherCallback(**{n: v}))
    check_table(FISHER_BAD, lambda n, v: functional(keras_fim.FisherModel, **{n: v}))


@pytest.mark.parametrize(
    "name, value, stored",
    [
        ("every_n_steps", np.int64(5), 5),
        ("dense_epochs", np.int32(1), 1),
        ("max_examples", np.int64(4), 4),
        ("zero_threshold", np.float32(0.25), 0.25),
        ("zero_threshold", 0, 0),
        ("ema_decay", np.float32(0.5), 0.5),
        ("ema_decay", 0, 0.0),
        ("log_dir", pathlib.Path("some/logs"), "some/logs"),
        ("log_dir", b"some/logs", "some/logs"),
        ("memory_budget", 2**20, 2**20),
        ("noise_scale", np.int64(4), 4),
    ],
)
def test_numpy_numbers_and_paths_are_accepted(name, value, stored):
    callback = keras_fim.FisherCallback(**{name: value})
    assert callback.get_config()[name] == stored
    model = functional(keras_fim.FisherModel, **{name: value})
    assert model.fisher_options[name] == stored


# -- DynamicSampling and the schedules ------------------------------------------------


def xy(n=20):
    return np.zeros((n, 2), "float32"), np.zeros((n, 1), "float32")


SAMPLING_BAD = [
    ("schedule", 2.5),
    ("schedule", True),
    ("schedule", "16"),
    ("schedule", None),
    ("shuffle", 1),
    ("seed", 1.5),
    ("seed", True),
    ("seed", -1),
    ("drop_remainder", "no"),
    ("allow_shrink", 1),
    ("learning_rate_scaling", None),
    ("learning_rate_scaling", "LINEAR"),
    ("reference_batch_size", 0),
    ("reference_batch_size", 2.5),
    ("batched", "yes"),
    ("preprocess", 3),
    ("log_dir", 3),
    ("log_dir", ""),
    ("mode", "streaming"),
    ("mode", None),
    ("examples_per_epoch", 0),
    ("examples_per_epoch", 2.5),
    ("buffer_size", 0),
    ("buffer_size", True),
]


def test_the_sampling_table_covers_every_option():
    options = set(inspect.signature(keras_fim.DynamicSampling).parameters)
    assert options - {"data"} == {name for name, _ in SAMPLING_BAD}


def test_bad_sampling_option_is_refused_at_construction():
    check_table(
        SAMPLING_BAD,
        lambda n, v: keras_fim.DynamicSampling(xy(), **{"schedule": 4, n: v}),
    )


def test_bad_sampling_data_is_refused():
    rows = [
        ("data", value)
        for value in (
            "abc",
            3.0,
            None,
            xy(0),
            (np.zeros((4, 2)), np.zeros((3, 1))),
            tf.data.Dataset.from_tensor_slices(xy(0)),
            tf.data.Dataset.from_tensor_slices(tf.ragged.constant([[1], [1, 2]])),
        )
    ]
    check_table(
        rows,
        lambda n, v: keras_fim.DynamicSampling(v, schedule=1),
        lambda error, n, v: assert_names(error, n, check_value=False),
    )


SCHEDULE_BAD = {
    Staged: (
        {"sizes": [8, 16]},
        [
            ("sizes", []),
            ("sizes", "16"),
            ("sizes", 16),
            ("sizes", {16: 1}),
            ("fractions", 0.5),
            ("fractions", [1.0]),
            ("fractions", [0.5, NAN]),
            ("fractions", [1.5, -0.5]),
            ("fractions", [0.5, 0.6]),
        ],
    ),
    Geometric: (
        {"initial": 4},
        [
            ("initial", 0),
            ("initial", 4.0),
            ("factor", 0.5),
            ("factor", NAN),
            ("factor", INF),
            ("factor", "2"),
            ("maximum", 2),
            ("maximum", 16.5),
            ("every_epochs", 0),
            ("every_epochs", 1.5),
            ("every_examples", 0),
        ],
    ),
    Linear: (
        {"initial": 4, "increment": 4},
        [
            ("initial", -1),
            ("increment", 0),
            ("increment", 1.5),
            ("maximum", 2),
            ("every_epochs", 0),
            ("every_examples", -5),
        ],
    ),
    Automatic: (
        {"initial": 4, "maximum": 16},
        [
            ("initial", 0),
            ("maximum", 2),
            ("signal", "loss"),
            ("signal", 3),
            ("threshold", NAN),
            ("threshold", INF),
            ("threshold", "1"),
            ("factor", 1.0),
            ("factor", INF),
            ("factor", NAN),
            ("min_steps", 0),
            ("min_steps", 2.5),
            ("min_measurements", -1),
            ("min_measurements", 1.5),
            ("powers_of_two", "no"),
            ("powers_of_two", 1),
        ],
    ),
}


@pytest.mark.parametrize("schedule", list(SCHEDULE_BAD), ids=lambda s: s.__name__)
def test_the_schedule_table_covers_every_argument(schedule):
    arguments = set(inspect.signature(schedule).parameters)
    assert arguments == {name for name, _ in SCHEDULE_BAD[schedule][1]}


def schedule_message_names(error, name, value):
    # A list's entry is named as `sizes[1]`, with that entry's value.
    message = str(error.value)
    assert f"`{name}" in message and "must" in message, message
    assert repr(value) in message or name == "sizes", message


@pytest.mark.parametrize("schedule", list(SCHEDULE_BAD), ids=lambda s: s.__name__)
def test_bad_schedule_argument_is_refused(schedule):
    base, rows = SCHEDULE_BAD[schedule]
    check_table(rows, lambda n, v: schedule(**{**base, n: v}), schedule_message_names)


def test_schedules_accept_numpy_numbers():
    assert Geometric(np.int64(4), factor=np.float32(2)).factor == 2.0
    grow = Automatic(4, 16, threshold=np.float32(0.5), min_measurements=np.int64(2))
    assert grow.threshold == 0.5 and grow.min_measurements == 2
    assert Staged(np.array([4, 8]), fractions=np.array([0.25, 0.75])).sizes() == [4, 8]


# -- log_dir ---------------------------------------------------------------------


def test_log_dir_under_a_regular_file_is_refused_at_construction(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for log_dir in (blocker, blocker / "logs"):
        for make in (
            lambda d=log_dir: keras_fim.FisherCallback(d),
            lambda d=log_dir: functional(keras_fim.FisherModel, log_dir=d),
            lambda d=log_dir: keras_fim.DynamicSampling(xy(), 4, log_dir=d),
        ):
            with pytest.raises(ValueError) as error:
                make()
            assert_names(error, "log_dir", str(log_dir))
            assert "is a file" in str(error.value)


def compiled(model):
    return helpers.compiled(model, loss="mse")


def test_log_dir_that_became_unwritable_fails_at_fit_start(tmp_path):
    log_dir = tmp_path / "logs"
    callback = keras_fim.FisherCallback(log_dir, every_n_steps=1)
    sampling = keras_fim.DynamicSampling(xy(), 4, log_dir=tmp_path / "sampling")
    log_dir.write_text("")  # now a file
    (tmp_path / "sampling").write_text("")
    for callbacks, data in (([callback], xy()), ([sampling], (sampling.dataset,))):
        model = compiled(functional())
        before = model.get_weights()
        with pytest.raises(ValueError) as error:
            model.fit(*data, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
        assert_names(error, "log_dir", check_value=False)
        assert_same_weights(before, model)  # nothing was trained


# -- the model and its loss --------------------------------------------------------


def train(model_fn, x, y, callbacks, **fit_kwargs):
    keras.utils.set_random_seed(3)
    model = model_fn()
    with helpers.keras_fim_warnings() as messages:
        model.fit(
            x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=callbacks
        )
    return model, messages


def data(n=16, outputs=2):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 3)).astype("float32"), rng.normal(
        size=(n, outputs)
    ).astype("float32")


@pytest.mark.parametrize("fisher_model", [False, True])
def test_a_model_that_is_not_compiled(fisher_model):
    model = functional(keras_fim.FisherModel) if fisher_model else functional()
    callbacks = [] if fisher_model else [keras_fim.FisherCallback()]
    with pytest.raises(ValueError, match="compile"):
        model.fit(*data(), verbose=0, callbacks=callbacks)
    with pytest.raises(ValueError, match="compiled"):
        keras_fim.measure(model, *data(4))


class SquaredActivity(keras.layers.Layer):
    def call(self, h):
        self.add_loss(keras.ops.mean(h**2))
        return h


def add_loss_model(model_class=keras.Model):
    inputs = keras.Input((3,))
    outputs = SquaredActivity()(keras.layers.Dense(2)(inputs))
    model = model_class(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=None)
    return model


@pytest.mark.parametrize("fisher_model", [False, True])
def test_no_labels_and_no_compiled_loss_is_refused_before_training(fisher_model):
    # Keras trains a model with only `add_loss` losses on inputs alone;
    # keras-fim has no per-example loss to measure there.
    x, _ = data()
    plain, _ = train(add_loss_model, x, None, [])
    assert not np.allclose(plain.get_weights()[0], add_loss_model().get_weights()[0])
    model = add_loss_model(keras_fim.FisherModel if fisher_model else keras.Model)
    before = model.get_weights()
    callbacks = [] if fisher_model else [keras_fim.FisherCallback(every_n_steps=1)]
    with pytest.raises(ValueError) as error:
        model.fit(x, epochs=1, verbose=0, callbacks=callbacks)
    assert_names(error, "loss", check_value=False)
    assert "loss=None" in str(error.value) and "add_loss" in str(error.value)
    assert_same_weights(before, model)


def test_labels_missing_for_a_compiled_loss_fail_as_in_plain_keras():
    x, _ = data()
    model = compiled(functional())
    with pytest.raises(ValueError) as plain:
        model.fit(x, epochs=1, verbose=0)
    model = compiled(functional())
    with pytest.raises(type(plain.value)), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, epochs=1, verbose=0, callbacks=[keras_fim.FisherCallback()])


@pytest.mark.parametrize("reduction", [None, "none"])
def test_an_unreduced_loss_is_refused_before_training(reduction):
    x, y = data()
    model = functional()
    loss = keras.losses.MeanSquaredError(reduction=reduction)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    before = model.get_weights()
    with pytest.raises(ValueError) as error:
        model.fit(x, y, verbose=0, callbacks=[keras_fim.FisherCallback()])
    message = str(error.value)
    assert f"reduction={reduction!r}" in message and "sum_over_batch_size" in message
    assert "mean_squared_error" in message
    assert_same_weights(before, model)


def batch_mean_mse(y_true, y_pred):
    """One value for the whole batch: no per-example loss to split."""
    return keras.ops.mean(keras.ops.square(y_true - y_pred))


@pytest.mark.parametrize("reuse_training_pass", [False, True])
def test_a_loss_without_batch_dimension_skips_the_measurement_with_a_warning(
    reuse_training_pass,
):
    x, y = data()
    callback = keras_fim.FisherCallback(
        every_n_steps=1, reuse_training_pass=reuse_training_pass
    )

    def model_fn():
        model = functional()
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=batch_mean_mse)
        return model

    plain, _ = train(model_fn, x, y, [])
    measured, messages = train(model_fn, x, y, [callback])
    assert_same_weights(plain, measured)
    assert len(messages) == 1 and "could not build" in messages[0]
    assert "batch dimension" in messages[0]
    assert int(measured.fisher_state.measurements) == 0


# -- layers ------------------------------------------------------------------------


class Scale(keras.layers.Layer):
    """A custom layer with a weight of its own and no registered rule."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="ones")

    def call(self, x):
        return keras.ops.tanh(x * self.w) + keras.ops.mean(x * self.w, axis=0)


def loop_gradients(model, x, y):
    loss = keras.losses.MeanSquaredError()
    rows = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            value = loss(y[i : i + 1], model(x[i : i + 1]))
        rows.append(tape.gradient(value, model.trainable_variables))
    return rows


def test_a_custom_layer_gets_the_exact_generic_rule():
    x, y = data(4)
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(2)(Scale()(inputs))
    model = compiled(keras.Model(inputs, outputs))
    grams = keras_fim.fisher_gram(model, x, y)
    # The layer couples the examples (a batch mean), so compare the Gram of
    # the contributions with autodiff's sum over examples.
    with tf.GradientTape() as tape:
        total = keras.ops.sum(
            keras.ops.mean((model(x, training=True) - y) ** 2, axis=-1)
        )
    batch_gradient = tape.gradient(total, model.trainable_variables)
    contributions = keras_fim.per_example_gradients(model, x, y)
    for g, c in zip(batch_gradient, contributions, strict=True):
        np.testing.assert_allclose(
            g.numpy(), c.numpy().sum(axis=0), rtol=1e-5, atol=1e-6
        )
    assert grams.shape == (4, 4)


class FeatureMajor(keras.layers.Layer):
    """Returns its outputs with the features on axis 0: outside the engine's
    contract (each layer's outputs hold the examples on axis 0)."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="ones")

    def call(self, x):
        return keras.ops.transpose(x * self.w)


class BatchMajor(keras.layers.Layer):
    def call(self, x):
        return keras.ops.transpose(x)


def test_a_layer_outside_the_engines_contract_skips_with_one_warning():
    x, y = data(16)

    def model_fn():
        inputs = keras.Input((3,))
        h = BatchMajor()(FeatureMajor()(inputs))
        return compiled(keras.Model(inputs, keras.layers.Dense(2)(h)))

    plain, _ = train(model_fn, x, y, [])
    measured, messages = train(
        model_fn, x, y, [keras_fim.FisherCallback(every_n_steps=1)]
    )
    assert len(messages) == 1 and "could not build" in messages[0]
    assert int(measured.fisher_state.measurements) == 0
    assert_same_weights(plain, measured)


class TiedDecoder(keras.layers.Layer):
    """Uses another layer's kernel (tied weights), owning no weight itself."""

    def __init__(self, encoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder

    def call(self, h):
        return keras.ops.matmul(h, keras.ops.transpose(self.encoder.kernel))


@pytest.mark.xfail(
    strict=True,
    reason="documented limit (FAQ): a weight used by a layer that does not own "
    "it gets no per-example contribution from that use",
)
def test_tied_weights_used_by_another_layer():
    x, y = data(4, outputs=3)
    inputs = keras.Input((3,))
    encoder = keras.layers.Dense(2, use_bias=False)
    outputs = TiedDecoder(encoder)(encoder(inputs))
    model = compiled(keras.Model(inputs, outputs))
    contributions = keras_fim.per_example_gradients(model, x, y)
    for i, row in enumerate(loop_gradients(model, x, y)):
        for g, c in zip(row, contributions, strict=True):
            np.testing.assert_allclose(g.numpy(), c[i].numpy(), rtol=1e-4, atol=1e-6)
