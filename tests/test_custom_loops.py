"""Models with a `train_step` of their own (docs/custom-loops.md).

Four kinds of custom training loop: a GAN-style pair, a loss with an extra
term, a model compiled without a loss, and a model whose `call()` does not
take the data's `x`. Each trains exactly as in plain Keras with a
`FisherCallback` or as a `FisherModel` subclass: without a per-example loss
it is not measured (one warning naming the opt-in); with one, the measurement
of the first batch equals a brute-force loop over its examples.
"""

import dataclasses
import math
import pathlib
import re
import warnings
from collections.abc import Callable

import keras
import numpy as np
import pytest
import tensorflow as tf
from fim_helpers import keras_fim_warnings
from fim_reference import (
    flatten_gradients,
    loop_objective_gradients,
    numpy_measurements,
    read_scalars,
)

import keras_fim

BATCH = 8
LEARNING_RATE = 0.05
NOISE = 3
EVERY = 1000  # only step 0 is measured: its variables are the initial ones


def sgd():
    return keras.optimizers.SGD(LEARNING_RATE)


def mean_over_batch(losses):
    return keras.ops.mean(losses)


# -- 1. a GAN-style pair ---------------------------------------------------------


def gan_loss(model, x, y, sample_weight):
    """The generator's loss: the discriminator calling its samples real."""
    noise = keras.random.normal((tf.shape(x)[0], NOISE), seed=model.seed_generator)
    logits = model.discriminator(model.generator(noise))
    return keras.losses.binary_crossentropy(
        tf.ones_like(logits), logits, from_logits=True
    )


class GanStep:
    """A discriminator step, then a generator step, each with its own
    optimizer; `call()` takes noise, the data are real samples only."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.generator = keras.Sequential(
            [
                keras.Input((NOISE,)),
                keras.layers.Dense(5, activation="tanh"),
                keras.layers.Dense(4),
            ],
            name="generator",
        )
        self.discriminator = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(6, activation="tanh"),
                keras.layers.Dense(1),
            ],
            name="discriminator",
        )
        self.seed_generator = keras.random.SeedGenerator(3)
        self.generator_optimizer = sgd()

    def call(self, noise):
        return self.generator(noise)

    def train_step(self, data):
        real = data
        size = tf.shape(real)[0]
        noise = keras.random.normal((size, NOISE), seed=self.seed_generator)
        bce = keras.losses.BinaryCrossentropy(from_logits=True)
        with tf.GradientTape() as tape:
            real_logits = self.discriminator(real)
            fake_logits = self.discriminator(self.generator(noise))
            d_loss = bce(tf.ones_like(real_logits), real_logits) + bce(
                tf.zeros_like(fake_logits), fake_logits
            )
        variables = self.discriminator.trainable_variables
        self.optimizer.apply(tape.gradient(d_loss, variables), variables)
        with tf.GradientTape() as tape:
            g_loss = mean_over_batch(gan_loss(self, real, None, None))
        variables = self.generator.trainable_variables
        self.generator_optimizer.apply(tape.gradient(g_loss, variables), variables)
        return {"d_loss": d_loss, "g_loss": g_loss}


def gan_reference(model, x, y):
    """The generator's per-example gradients, one example at a time, with
    the noise the first step drew (a fresh generator of the same seed)."""
    noise = keras.random.normal(
        (len(x), NOISE), seed=keras.random.SeedGenerator(3)
    ).numpy()

    def example_loss(i):
        logits = model.discriminator(model.generator(noise[i : i + 1]))
        return keras.losses.binary_crossentropy(
            tf.ones_like(logits), logits, from_logits=True
        )[0]

    variables = model.generator.trainable_variables
    return loop_objective_gradients(example_loss, variables, len(x))


# -- 2. a loss with an extra term ------------------------------------------------


def penalised_loss(model, x, y, sample_weight):
    """Squared error plus a penalty on the outputs' size."""
    pred = model(x, training=True)
    return keras.losses.mean_squared_error(y, pred) + 0.1 * keras.ops.sum(
        pred**2, axis=-1
    )


class PenalisedStep:
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(6, activation="tanh")
        self.head = keras.layers.Dense(2)

    def call(self, x):
        return self.head(self.hidden(x))

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = mean_over_batch(penalised_loss(self, x, y, None))
        variables = self.trainable_variables
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        return {"loss": loss}


def penalised_reference(model, x, y):
    def example_loss(i):
        return penalised_loss(model, x[i : i + 1], y[i : i + 1], None)[0]

    return loop_objective_gradients(example_loss, model.trainable_variables, len(x))


# -- 3. compiled without a loss --------------------------------------------------


def reconstruction_loss(model, x, y, sample_weight):
    return keras.ops.sum((model(x) - x) ** 2, axis=-1)


class AutoencoderStep:
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.encode = keras.layers.Dense(2, activation="tanh")
        self.decode = keras.layers.Dense(4)

    def call(self, x):
        return self.decode(self.encode(x))

    def train_step(self, data):
        with tf.GradientTape() as tape:
            loss = mean_over_batch(reconstruction_loss(self, data, None, None))
        variables = self.trainable_variables
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        return {"loss": loss}


def reconstruction_reference(model, x, y):
    def example_loss(i):
        return reconstruction_loss(model, x[i : i + 1], None, None)[0]

    return loop_objective_gradients(example_loss, model.trainable_variables, len(x))


# -- 4. call() takes two tensors, the data's x is a pair -------------------------


def scaled_loss(model, x, y, sample_weight):
    features, scale = x
    return keras.losses.mean_squared_error(y, model(features, scale))


class TwoArgumentStep:
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3)

    def call(self, features, scale):
        return self.dense(features) * scale

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = mean_over_batch(scaled_loss(self, x, y, None))
        variables = self.trainable_variables
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        return {"loss": loss}


def scaled_reference(model, x, y):
    features, scale = x

    def example_loss(i):
        pair = (features[i : i + 1], scale[i : i + 1])
        return scaled_loss(model, pair, y[i : i + 1], None)[0]

    return loop_objective_gradients(example_loss, model.trainable_variables, len(y))


# -- the cases --------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    step: type  # the mixin with `train_step`
    loss: Callable  # per_example_loss(model, x, y, sample_weight)
    reference: Callable  # (model, x, y) -> per-example gradients (float64)
    compile_loss: str | None
    measured_layers: list | None
    data: Callable  # () -> (x, y), y None when the data are x only
    measured: Callable  # the model -> the variables measured

    def first_batch(self):
        x, y = self.data()
        x = keras.tree.map_structure(lambda t: t[:BATCH], x)
        return x, None if y is None else y[:BATCH]


def rng():
    return np.random.default_rng(0)


CASES = {
    "gan": Case(
        GanStep,
        gan_loss,
        gan_reference,
        "mse",  # compiled as the model is; its step ignores it
        ["generator"],
        lambda: (rng().normal(size=(32, 4)).astype("float32"), None),
        lambda model: model.generator.trainable_variables,
    ),
    "extra_term": Case(
        PenalisedStep,
        penalised_loss,
        penalised_reference,
        "mse",
        None,
        lambda: (
            rng().normal(size=(32, 5)).astype("float32"),
            rng().normal(size=(32, 2)).astype("float32"),
        ),
        lambda model: model.trainable_variables,
    ),
    "no_compiled_loss": Case(
        AutoencoderStep,
        reconstruction_loss,
        reconstruction_reference,
        None,
        None,
        lambda: (rng().normal(size=(32, 4)).astype("float32"), None),
        lambda model: model.trainable_variables,
    ),
    "call_signature": Case(
        TwoArgumentStep,
        scaled_loss,
        scaled_reference,
        "mse",
        None,
        lambda: (
            (
                rng().normal(size=(32, 4)).astype("float32"),
                rng().uniform(0.5, 2.0, size=(32, 1)).astype("float32"),
            ),
            rng().normal(size=(32, 3)).astype("float32"),
        ),
        lambda model: model.trainable_variables,
    ),
}


def build(case, base=keras.Model, override=False, **options):
    """The case's model on `base`, seeded; a `FisherModel` subclass gets
    `per_example_loss` overridden with the case's loss when `override`."""
    namespace = {}
    if override:

        def per_example_loss(self, x, y=None, sample_weight=None):
            return case.loss(self, x, y, sample_weight)

        namespace["per_example_loss"] = per_example_loss
    model_class = type(case.step.__name__, (case.step, base), namespace)
    keras.utils.set_random_seed(1)
    model = model_class(**options)
    model.compile(optimizer=sgd(), loss=case.compile_loss)
    return model


def fit(model, case, callbacks=(), epochs=2):
    x, y = case.data()
    with keras_fim_warnings() as messages:
        model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=epochs,
            shuffle=False,
            verbose=0,
            callbacks=list(callbacks),
        )
    return messages


def model_variables(model):
    """The model's own variables (not keras-fim's state), seeds included."""
    return [
        v
        for v in model.variables
        if not v.path.startswith(("fisher_state/", "sampling_state/"))
    ]


def assert_weights_equal(a, b):
    a, b = model_variables(a), model_variables(b)
    assert len(a) == len(b) > 0
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u.numpy(), v.numpy())


def plain_keras(case):
    model = build(case)
    fit(model, case)
    return model


@pytest.mark.parametrize("fisher_model", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_without_a_per_example_loss_training_is_keras_and_one_warning(
    name, fisher_model
):
    case = CASES[name]
    if fisher_model:
        model = build(case, keras_fim.FisherModel, every_n_steps=1)
        messages = fit(model, case)
    else:
        model = build(case)
        messages = fit(model, case, [keras_fim.FisherCallback(every_n_steps=1)])
    assert_weights_equal(model, plain_keras(case))
    assert len(messages) == 1, messages
    assert "per_example_loss" in messages[0] and "custom-loops" in messages[0]
    assert int(model.fisher_state.measurements) == 0


@pytest.mark.parametrize("fisher_model", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_per_example_loss_is_measured_on_the_trained_batch(
    name, fisher_model, tmp_path
):
    case = CASES[name]
    options = dict(
        every_n_steps=EVERY, log_dir=str(tmp_path), measured_layers=case.measured_layers
    )
    if fisher_model:
        model = build(case, keras_fim.FisherModel, override=True, **options)
        messages = fit(model, case, epochs=1)
    else:
        model = build(case)
        callback = keras_fim.FisherCallback(per_example_loss=case.loss, **options)
        messages = fit(model, case, [callback], epochs=1)
    assert not messages
    assert_weights_equal(model, plain_keras_one_epoch(case))

    # The brute-force twin: the initial weights, the first batch.
    start = build(case)
    x, y = case.first_batch()
    if not start.trainable_variables:  # built by its first step in `fit`
        case.loss(start, x, y, None)
    jac = flatten_gradients(case.reference(start, x, y))
    expected = numpy_measurements(jac)
    state = model.fisher_state
    assert int(state.measurements) == 1 and int(state.skipped) == 0
    np.testing.assert_allclose(
        float(state.condition_mean), expected["condition_number"], rtol=1e-4
    )
    np.testing.assert_allclose(
        float(state.energy_sum),
        EVERY * LEARNING_RATE / BATCH * expected["energy"],
        rtol=1e-5,
    )
    scalars, _ = read_scalars(str(tmp_path))
    (step, top), *_ = scalars["fisher/eigenvalue_max"]
    assert step == 1
    np.testing.assert_allclose(top, expected["eigenvalues"][0], rtol=1e-5)
    np.testing.assert_allclose(
        scalars["fisher/trace"][0][1], expected["trace"], rtol=1e-5
    )

    # By hand, the same function gives every eigenvalue.
    measured = keras_fim.measure(
        start,
        x,
        y,
        per_example_loss=case.loss,
        measured_layers=case.measured_layers,
    )
    np.testing.assert_allclose(
        measured.eigenvalues.numpy(),
        expected["eigenvalues"],
        rtol=1e-5,
        atol=1e-6 * expected["eigenvalues"][0],
    )
    assert int(measured.rank) == expected["rank"]


def plain_keras_one_epoch(case):
    model = build(case)
    fit(model, case, epochs=1)
    return model


# -- a model built by its own first step -----------------------------------------


def test_a_model_built_by_its_first_step_is_measured_as_a_built_one():
    # The first measuring function runs with the new variables' initial
    # values and is traced again afterwards: every later step is measured
    # with its own variables, as for a model built before `fit`.
    case = CASES["extra_term"]

    def train(prebuild):
        model = build(case)
        if prebuild:
            x, y = case.first_batch()
            case.loss(model, x, y, None)
        callback = keras_fim.FisherCallback(every_n_steps=3, per_example_loss=case.loss)
        assert not fit(model, case, [callback])
        return model

    lazy, built = train(False), train(True)
    assert_weights_equal(lazy, built)
    assert int(lazy.fisher_state.measurements) == 3  # steps 0, 3, 6
    for name in ("condition_sum", "energy_sum", "condition_ema"):
        np.testing.assert_allclose(
            float(getattr(lazy.fisher_state, name)),
            float(getattr(built.fisher_state, name)),
            rtol=1e-6,
        )


# -- a custom objective through compute_loss -------------------------------------


class PenaltyThroughComputeLoss(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.head = keras.layers.Dense(2)

    def call(self, x):
        return self.head(x)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training)
        return loss + 0.1 * keras.ops.mean(y_pred**2)


def test_a_compute_loss_of_its_own_is_a_custom_objective():
    x = rng().normal(size=(32, 5)).astype("float32")
    y = rng().normal(size=(32, 2)).astype("float32")

    def train(callbacks):
        keras.utils.set_random_seed(1)
        model = PenaltyThroughComputeLoss()
        model.compile(optimizer=sgd(), loss="mse")
        with keras_fim_warnings() as messages:
            model.fit(x, y, batch_size=BATCH, verbose=0, callbacks=callbacks)
        return model, messages

    plain, _ = train([])
    model, messages = train([keras_fim.FisherCallback(every_n_steps=1)])
    assert_weights_equal(model, plain)
    assert len(messages) == 1 and "compute_loss" in messages[0]


# -- nothing the per-example loss does stops training ----------------------------


def wrong_rank(model, x, y, sample_weight):
    return keras.ops.expand_dims(penalised_loss(model, x, y, sample_weight), -1)


def raises(model, x, y, sample_weight):
    raise RuntimeError("a bug in the user's loss")


def one_row_short(model, x, y, sample_weight):
    # Known only when the step runs: the batch size is dynamic.
    return penalised_loss(model, x, y, sample_weight)[1:]


def called_on_other_rows(model, x, y, sample_weight):
    pred = model(keras.ops.concatenate([x, x]), training=True)
    return keras.ops.sum(pred**2, axis=-1)[: tf.shape(x)[0]]


@pytest.mark.parametrize(
    "loss, measured_layers, cause",
    [
        (wrong_rank, None, "shaped (batch,)"),
        (raises, None, "a bug in the user's loss"),
        (penalised_loss, ["no_such_layer"], "no layer 'no_such_layer'"),
        (one_row_short, None, None),
        (called_on_other_rows, None, None),
    ],
)
def test_a_failing_per_example_loss_never_stops_or_changes_training(
    loss, measured_layers, cause
):
    case = CASES["extra_term"]
    model = build(case)
    callback = keras_fim.FisherCallback(
        every_n_steps=2, per_example_loss=loss, measured_layers=measured_layers
    )
    messages = fit(model, case, [callback])
    assert_weights_equal(model, plain_keras(case))
    assert int(model.fisher_state.measurements) == 0
    assert len(messages) == 1, messages
    if cause is None:  # found when the step runs: the steps count as skipped
        assert int(model.fisher_state.skipped) == 4
        assert "per_example_loss" in messages[0] and "skipped 2" in messages[0]
    else:  # found while the step is traced: no measurement in this fit
        assert "could not build" in messages[0] and cause in messages[0]


def test_rows_other_than_the_batch_are_an_error_by_hand():
    case = CASES["extra_term"]
    model = build(case)
    x, y = case.first_batch()
    with pytest.raises(ValueError, match="weights exist"):
        keras_fim.measure(model, x, y, per_example_loss=penalised_loss)
    model(x)
    with pytest.raises(ValueError, match="one loss per example"):
        keras_fim.measure(model, x, y, per_example_loss=one_row_short)


# -- options ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(per_example_loss="mse"), "per_example_loss"),
        (dict(measured_layers=3), "measured_layers"),
        (dict(measured_layers=[]), "measured_layers"),
    ],
)
def test_invalid_options_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match) as error:
        keras_fim.FisherCallback(**kwargs)
    assert "Received:" in str(error.value)
    with pytest.raises(ValueError, match=match):
        build(CASES["gan"], keras_fim.FisherModel, **kwargs)


@keras.saving.register_keras_serializable(package="keras_fim_tests")
def registered_loss(model, x, y, sample_weight):
    return penalised_loss(model, x, y, sample_weight)


def test_config_round_trip():
    callback = keras_fim.FisherCallback(
        per_example_loss=registered_loss, measured_layers=["head"]
    )
    config = callback.get_config()
    assert config["measured_layers"] == ["head"]
    restored = keras_fim.FisherCallback.from_config(config)
    assert restored.per_example_loss is registered_loss
    assert restored.get_config() == config
    model = build(CASES["gan"], keras_fim.FisherModel, measured_layers=["generator"])
    assert model.fisher_options["measured_layers"] == ["generator"]
    assert "per_example_loss" not in model.fisher_options


# -- Keras's own step: measured_layers, and add_loss models -----------------------


def test_measured_layers_with_keras_own_step():
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(4, activation="tanh", name="hidden")(inputs)
    outputs = keras.layers.Dense(2, name="head")(hidden)
    keras.utils.set_random_seed(1)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=sgd(), loss="mse")
    x, y = CASES["extra_term"].first_batch()
    head = model.get_layer("head")
    expected = numpy_measurements(
        flatten_gradients(
            loop_objective_gradients(
                lambda i: keras.losses.mean_squared_error(
                    y[i : i + 1], model(x[i : i + 1])
                )[0],
                head.trainable_variables,
                len(x),
            )
        )
    )
    measured = keras_fim.measure(model, x, y, measured_layers=["head"])
    np.testing.assert_allclose(
        measured.eigenvalues.numpy(), expected["eigenvalues"], rtol=1e-5, atol=1e-9
    )
    # In fit, from the training step's own pass.
    callback = keras_fim.FisherCallback(every_n_steps=EVERY, measured_layers=[head])
    model.fit(x, y, batch_size=BATCH, verbose=0, callbacks=[callback])
    np.testing.assert_allclose(
        float(model.fisher_state.condition_mean),
        expected["condition_number"],
        rtol=1e-4,
    )


class SquaredActivity(keras.layers.Layer):
    def call(self, h):
        self.add_loss(keras.ops.mean(h**2))
        return h


def test_an_add_loss_model_is_measured_with_its_per_example_loss():
    def make():
        keras.utils.set_random_seed(1)
        inputs = keras.Input((4,))
        outputs = SquaredActivity()(keras.layers.Dense(2, name="dense")(inputs))
        model = keras.Model(inputs, outputs)
        model.compile(optimizer=sgd())
        return model

    def activity(model, x, y, sample_weight):
        return keras.ops.mean(model(x) ** 2, axis=-1)

    x = rng().normal(size=(32, 4)).astype("float32")
    plain = make()
    plain.fit(x, batch_size=BATCH, verbose=0)
    model = make()
    callback = keras_fim.FisherCallback(every_n_steps=1, per_example_loss=activity)
    model.fit(x, batch_size=BATCH, verbose=0, callbacks=[callback])
    assert_weights_equal(model, plain)
    assert int(model.fisher_state.measurements) == 4


# -- docs/custom-loops.md ---------------------------------------------------------


def test_the_documented_example_runs(capsys):
    page = pathlib.Path(__file__).resolve().parents[1] / "docs" / "custom-loops.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    assert len(blocks) == 2
    namespace = {"__name__": "custom_loops_example"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for block in blocks:
            exec(compile(block, str(page), "exec"), namespace)
    assert not [w for w in caught if "keras-fim" in str(w.message)]
    first, second = capsys.readouterr().out.split("\n")[:2]
    c_k_bar, measurements = first.split()
    assert math.isfinite(float(c_k_bar)) and int(measurements) == 4
    assert int(second) == 2
