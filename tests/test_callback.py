"""FisherCallback and FisherModel inside `fit`: schedule, running values, logs."""

import math
import os
import subprocess
import sys

import fim_reference as ref
import keras
import numpy as np
import pytest
from fim_helpers import assert_same_weights
from fim_reference import read_scalars

import keras_fim


def mlp(model_class=keras.Model, **kwargs):
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh")(inputs)
    outputs = keras.layers.Dense(3, activation="softmax")(h)
    return model_class(inputs, outputs, **kwargs)


def bn_dropout_cnn(model_class=keras.Model, dropout=0.3, **kwargs):
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Dropout(dropout)(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(3, activation="softmax")(h)
    return model_class(inputs, outputs, **kwargs)


def compile_sgd(model, lr=0.1, **kwargs):
    model.compile(
        optimizer=keras.optimizers.SGD(lr),
        loss="sparse_categorical_crossentropy",
        **kwargs,
    )
    return model


def data(n=40, shape=(6,), seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)).astype("float32"), rng.integers(0, 3, n)


class HandComputation(keras.callbacks.Callback):
    """Recomputes c_k and L_K by hand on the same batches, before each update."""

    def __init__(self, x, y, batch_size, every_n_steps):
        super().__init__()
        self.x, self.y, self.batch_size, self.n = x, y, batch_size, every_n_steps
        self.step, self.conditions, self.l_k = 0, [], 0.0

    def on_train_batch_begin(self, batch, logs=None):
        if self.step % self.n == 0:
            start = batch * self.batch_size
            xb = self.x[start : start + self.batch_size]
            yb = self.y[start : start + self.batch_size]
            jac = ref.flatten_gradients(
                ref.loop_per_example_gradients(self.model, xb, yb)
            )
            e = np.sqrt(np.clip(np.linalg.eigvalsh(jac @ jac.T), 0, None))
            tol = len(xb) * np.finfo(np.float32).eps * e.max() ** 2
            nonzero = e[e**2 > tol]
            self.conditions.append(e.max() / nonzero.min())
            lr = float(self.model.optimizer.learning_rate)
            self.l_k += self.n * lr / len(xb) * np.linalg.norm(jac)
        self.step += 1


@pytest.mark.parametrize("jit_compile", [False, True])
def test_running_values_equal_hand_computation(jit_compile):
    x, y = data(40)
    model = compile_sgd(mlp(), jit_compile=jit_compile)
    hand = HandComputation(x, y, batch_size=8, every_n_steps=3)
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[hand, keras_fim.FisherCallback(every_n_steps=3)],
    )
    state = model.fisher_state
    assert int(state.step) == 10
    assert int(state.measurements) == len(hand.conditions) == 4  # steps 0,3,6,9
    np.testing.assert_allclose(
        history.history["C_K_bar"][-1], np.mean(hand.conditions), rtol=1e-3
    )
    np.testing.assert_allclose(history.history["L_K"][-1], hand.l_k, rtol=1e-4)
    ema = hand.conditions[0]
    for c in hand.conditions[1:]:
        ema = 0.9 * ema + 0.1 * c
    np.testing.assert_allclose(float(state.condition_ema), ema, rtol=1e-3)


@pytest.mark.parametrize("model_class", [keras.Model, keras_fim.FisherModel])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_weights_equal_plain_keras(model_class, jit_compile):
    x, y = data(48, (6, 6, 2))

    def train(measure):
        keras.utils.set_random_seed(1)
        kwargs = {"every_n_steps": 2} if model_class is keras_fim.FisherModel else {}
        model = compile_sgd(
            bn_dropout_cnn(model_class, **kwargs), jit_compile=jit_compile
        )
        callbacks = [keras_fim.FisherCallback(every_n_steps=2)] if measure else []
        model.fit(
            x, y, batch_size=16, epochs=2, verbose=0, shuffle=False, callbacks=callbacks
        )
        return model

    plain = train(False) if model_class is keras.Model else None
    if plain is None:  # the FisherModel measures itself: compare with keras.Model
        keras.utils.set_random_seed(1)
        plain = compile_sgd(bn_dropout_cnn(), jit_compile=jit_compile)
        plain.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    measured = train(model_class is keras.Model)
    assert int(measured.fisher_state.measurements) == 3  # steps 0, 2, 4 of 6
    plain_vars = {v.path: v.numpy() for v in plain.variables}
    for v in measured.variables:  # weights, BN statistics, seed state, ...
        if v.path in plain_vars:
            np.testing.assert_array_equal(v.numpy(), plain_vars[v.path], err_msg=v.path)


@pytest.fixture
def xla_contexts(monkeypatch):
    """Whether each Gram sum and each eigen-solve was traced inside an XLA
    function (the solve's own op, wherever it is called from)."""
    import tensorflow as tf

    from keras_fim._keras_compat import in_xla_context
    from keras_fim.engine import pipeline

    seen = {"gram": [], "solve": []}

    def spy(name, function):
        def traced(*args, **kwargs):
            seen[name].append(in_xla_context())
            return function(*args, **kwargs)

        return traced

    monkeypatch.setattr(pipeline, "sum_blocks", spy("gram", pipeline.sum_blocks))
    monkeypatch.setattr(tf.linalg, "eigvalsh", spy("solve", tf.linalg.eigvalsh))
    return seen


@pytest.mark.parametrize("model_class", [keras.Model, keras_fim.FisherModel])
@pytest.mark.parametrize("steps_per_execution", [1, 3])
def test_xla_forms_the_gram_and_solves_outside(
    xla_contexts, model_class, steps_per_execution
):
    """With ``jit_compile=True`` the step and the Gram are compiled by XLA,
    the eigen-solves (far slower in XLA) run outside it; the measurements
    equal those without XLA (no dropout: XLA draws other masks) and the
    weights plain Keras's with XLA."""
    x, y = data(48, (6, 6, 2))

    def train(jit_compile, measure=True):
        keras.utils.set_random_seed(1)
        options = {"every_n_steps": 2, "per_layer": True}
        kwargs = options if model_class is keras_fim.FisherModel else {}
        model = compile_sgd(
            bn_dropout_cnn(model_class if measure else keras.Model, 0.0, **kwargs),
            jit_compile=jit_compile,
            steps_per_execution=steps_per_execution,
        )
        callbacks = []
        if measure and model_class is keras.Model:
            callbacks = [keras_fim.FisherCallback(**options)]
        model.fit(
            x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=callbacks
        )
        return model

    xla = train(True)
    assert xla_contexts["gram"] and all(xla_contexts["gram"])
    # The batch's spectrum and the three layers' (per_layer).
    assert len(xla_contexts["solve"]) >= 4 and not any(xla_contexts["solve"])
    state = xla.fisher_state
    assert int(state.measurements) == 3  # steps 0, 2, 4 of 6
    without = train(False).fisher_state
    for name in ("condition_sum", "energy_sum", "trace_sigma_ema"):
        np.testing.assert_allclose(
            float(getattr(state, name)), float(getattr(without, name)), rtol=1e-5
        )
    plain = {v.path: v.numpy() for v in train(True, measure=False).variables}
    for v in xla.variables:  # weights, BN statistics, seed state, ...
        if v.path in plain:
            np.testing.assert_array_equal(v.numpy(), plain[v.path], err_msg=v.path)


def test_steps_per_execution_measures_the_same_steps():
    x, y = data(56)

    def run(spe):
        keras.utils.set_random_seed(2)
        model = compile_sgd(mlp(), steps_per_execution=spe)
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=2,
            verbose=0,
            shuffle=False,
            callbacks=[keras_fim.FisherCallback(every_n_steps=3, dense_epochs=0)],
        )
        return model.fisher_state

    one, three = run(1), run(3)
    assert int(three.step) == int(one.step) == 14
    assert int(three.measurements) == int(one.measurements) == 5  # 0,3,6,9,12
    np.testing.assert_allclose(
        float(three.condition_sum), float(one.condition_sum), rtol=1e-5
    )
    np.testing.assert_allclose(
        float(three.energy_sum), float(one.energy_sum), rtol=1e-5
    )


def test_dense_epochs_then_cadence_and_weights_of_l_k():
    x, y = data(32)
    model = compile_sgd(mlp())
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=3,
        verbose=0,
        shuffle=False,
        callbacks=[keras_fim.FisherCallback(every_n_steps=5, dense_epochs=1)],
    )
    # epoch 0: steps 0-3 all measured; epochs 1-2 (steps 4-11): 5 and 10.
    assert int(model.fisher_state.measurements) == 6


def test_several_fits_continue_the_running_state():
    x, y = data(32)
    model = compile_sgd(mlp())
    callback = keras_fim.FisherCallback(every_n_steps=2)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    assert int(model.fisher_state.step) == 8
    assert int(model.fisher_state.measurements) == 4
    # A later fit without the callback trains normally and measures nothing.
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert int(model.fisher_state.measurements) == 4


def test_learning_rate_schedule_enters_l_k():
    x, y = data(32)
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([2], [0.5, 0.05])
    model = mlp()
    model.compile(
        optimizer=keras.optimizers.SGD(schedule), loss="sparse_categorical_crossentropy"
    )
    hand = HandComputation(x, y, batch_size=8, every_n_steps=1)
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        verbose=0,
        shuffle=False,
        callbacks=[hand, keras_fim.FisherCallback(every_n_steps=1)],
    )
    state = model.fisher_state
    assert int(state.measurements) == 4
    # The hand computation reads the scheduled rate (0.5, 0.5, 0.5, 0.05:
    # the boundary is on iterations > 2) before each update.
    np.testing.assert_allclose(float(state.energy_sum), hand.l_k, rtol=1e-4)


@pytest.mark.parametrize("steps_per_execution", [1, 4])
def test_tensorboard_scalars_on_keras_batch_axis(tmp_path, steps_per_execution):
    x, y = data(40)
    model = compile_sgd(mlp(), steps_per_execution=steps_per_execution)
    log_dir = str(tmp_path)
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        verbose=0,
        callbacks=[
            keras_fim.FisherCallback(log_dir=log_dir, every_n_steps=3),
            keras.callbacks.TensorBoard(log_dir, update_freq=1),
        ],
    )
    scalars, accumulator = read_scalars(log_dir)
    expected_tags = {
        "fisher/C_K_bar",
        "fisher/L_K",
        "fisher/condition_number",
        "fisher/eigenvalue_max",
        "fisher/eigenvalue_min",
        "fisher/trace",
        "fisher/gradient_norm",
        "fisher/batch_size",
        "fisher/learning_rate",
    }
    assert expected_tags <= set(scalars)
    # Measured 0-based steps 0, 3, 6, 9 -> 1-based batch numbers 1, 4, 7, 10.
    assert [s for s, _ in scalars["fisher/C_K_bar"]] == [1, 4, 7, 10]
    assert scalars["fisher/L_K"][-1][1] == pytest.approx(
        float(model.fisher_state.energy_sum)
    )
    assert scalars["fisher/batch_size"][0][1] == 8
    assert scalars["fisher/learning_rate"][0][1] == pytest.approx(0.1)
    assert "fisher/log10_eigenvalues" in accumulator.Tags()["tensors"]
    history = scalars["fisher/eigenvalue_max"]
    assert all(v > 0 for _, v in history)


def test_fisher_model_config_and_keras_file_roundtrip(tmp_path):
    model = compile_sgd(
        mlp(
            keras_fim.FisherModel,
            every_n_steps=2,
            dense_epochs=1,
            max_examples=4,
            zero_threshold=1e-6,
            ema_decay=0.5,
        )
    )
    x, y = data(32)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, keras_fim.FisherModel)
    assert loaded.fisher_options == model.fisher_options
    for a, b in zip(
        model.fisher_state.variables, loaded.fisher_state.variables, strict=True
    ):
        assert a.numpy() == b.numpy()
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert int(loaded.fisher_state.step) == 12


def test_subclassed_fisher_model():
    class Net(keras_fim.FisherModel):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.hidden = keras.layers.Dense(5, activation="relu")
            self.out = keras.layers.Dense(3, activation="softmax")

        def call(self, x):
            return self.out(self.hidden(x))

    model = compile_sgd(Net(every_n_steps=1))
    x, y = data(16)
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert int(model.fisher_state.measurements) == 2
    assert math.isfinite(history.history["C_K_bar"][0])


def test_backup_and_restore_keeps_running_state(tmp_path):
    x, y = data(32)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("interrupted")

    def run(callbacks, epochs=4):
        keras.utils.set_random_seed(3)
        model = compile_sgd(mlp())
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=epochs,
            verbose=0,
            shuffle=False,
            callbacks=[keras_fim.FisherCallback(every_n_steps=3), *callbacks],
        )
        return model

    reference = run([])
    backup = str(tmp_path / "backup")
    with pytest.raises(RuntimeError):
        run([keras.callbacks.BackupAndRestore(backup), Interrupt()])
    resumed = run([keras.callbacks.BackupAndRestore(backup)])
    for a, b in zip(
        reference.fisher_state.variables, resumed.fisher_state.variables, strict=True
    ):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, err_msg=a.path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_steps": 2.5}, "every_n_steps"),
        ({"dense_epochs": -1}, "dense_epochs"),
        ({"max_examples": 1}, "max_examples"),
        ({"zero_threshold": 1.5}, "zero_threshold"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"log_dir": 3}, "log_dir"),
    ],
)
def test_invalid_options_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_fim.FisherCallback(**kwargs)
    with pytest.raises(ValueError, match=match):
        mlp(keras_fim.FisherModel, **kwargs)


def test_uncompiled_model_is_a_clear_error():
    model = mlp()
    with pytest.raises(ValueError, match="compiled"):
        keras_fim.measure(model, *data(4))


def test_failed_measurement_never_stops_training():
    class Odd(keras.layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1],), initializer="ones")

        def call(self, x):
            return x * self.w

    def broken_rule(layer, call, examples):
        raise NotImplementedError("no rule for this layer")

    keras_fim.register_rule(Odd, broken_rule)
    try:
        x, y = data(16)

        def train(callbacks):
            keras.utils.set_random_seed(4)
            inputs = keras.Input((6,))
            outputs = keras.layers.Dense(3, activation="softmax")(Odd()(inputs))
            model = compile_sgd(keras.Model(inputs, outputs))
            model.fit(
                x,
                y,
                batch_size=8,
                epochs=1,
                verbose=0,
                shuffle=False,
                callbacks=callbacks,
            )
            return model

        plain = train([])
        with pytest.warns(UserWarning, match="could not build the Fisher measurement"):
            measured = train([keras_fim.FisherCallback(every_n_steps=1)])
        assert_same_weights(plain, measured)
        assert int(measured.fisher_state.measurements) == 0
    finally:
        from keras_fim.engine.rules import DEFAULT_REGISTRY

        DEFAULT_REGISTRY.unregister(Odd)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_masked_gru_trains_identically_with_and_without_xla(jit_compile):
    rng = np.random.default_rng(5)
    x = rng.integers(1, 20, (32, 7))
    x[:, 5:] = 0  # padding, masked by the Embedding
    y = rng.integers(0, 3, 32)

    def train(callbacks):
        keras.utils.set_random_seed(6)
        model = keras.Sequential(
            [
                keras.Input((7,), dtype="int32"),
                keras.layers.Embedding(20, 4, mask_zero=True),
                keras.layers.GRU(5),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
        compile_sgd(model, jit_compile=jit_compile)
        model.fit(
            x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=callbacks
        )
        return model

    plain = train([])
    measured = train([keras_fim.FisherCallback(every_n_steps=1)])
    assert int(measured.fisher_state.measurements) == 4
    assert int(measured.fisher_state.skipped) == 0
    assert_same_weights(plain, measured)


def test_plain_model_weights_list_is_unchanged_but_state_is_saved(tmp_path):
    x, y = data(16)
    model = compile_sgd(mlp())
    before = [v.path for v in model.weights]
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        verbose=0,
        callbacks=[keras_fim.FisherCallback(every_n_steps=1)],
    )
    assert [v.path for v in model.weights] == before
    path = str(tmp_path / "w.weights.h5")
    model.save_weights(path)
    fresh = compile_sgd(mlp())
    state = keras_fim.state.attach_state(fresh)
    fresh.load_weights(path)
    assert int(state.measurements) == 2 and int(state.step) == 2
    assert float(state.energy_sum) == float(model.fisher_state.energy_sum)


# -- no retracing across fits (issue 15 item 2) --------------------------------


@pytest.fixture
def measure_traces(monkeypatch):
    """How many times a measuring train step was traced (a Python side
    effect of the traced function: it runs once per trace)."""
    traces = []
    from keras_fim.measured_step import MeasuredStep

    original = MeasuredStep._record

    def counted(self, *args, **kwargs):
        traces.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MeasuredStep, "_record", counted)
    return traces


@pytest.mark.parametrize("log_dir", [False, True])
def test_a_second_fit_reuses_the_traced_functions(tmp_path, measure_traces, log_dir):
    x, y = data(32, shape=(6, 6, 2))
    model = compile_sgd(bn_dropout_cnn())
    log = str(tmp_path) if log_dir else None
    callback = keras_fim.FisherCallback(log_dir=log, every_n_steps=2)
    for _ in range(3):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    assert len(measure_traces) == 1
    assert int(model.fisher_state.measurements) == 6
    if log_dir:
        # One event file per fit, each point written once.
        # (Sorted: the reader takes event files in name order, and TF names
        # files of one second by a counter, so "...10.v2" sorts before "...9.v2".)
        scalars, _ = read_scalars(str(tmp_path))
        assert sorted(s for s, _ in scalars["fisher/C_K_bar"]) == [1, 3, 5, 7, 9, 11]
        assert max(scalars["fisher/L_K"])[1] == pytest.approx(
            float(model.fisher_state.energy_sum)
        )


@pytest.mark.parametrize("jit_compile", [False, True])
def test_unmeasured_steps_share_the_measuring_function(monkeypatch, jit_compile):
    """On one replica without XLA, one train function serves measured and
    unmeasured steps (the choice in-graph): Keras's step is traced once, not
    once more for a plain function, the cadence holds and the weights are
    plain Keras's. Under XLA the unmeasured steps keep Keras's compiled
    function (two traces)."""
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    traces = []
    original = TensorFlowTrainer.train_step

    def counted(self, data):
        traces.append(self)
        return original(self, data)

    monkeypatch.setattr(TensorFlowTrainer, "train_step", counted)
    x, y = data(56)
    model = compile_sgd(mlp(), jit_compile=jit_compile)
    plain = compile_sgd(mlp(), jit_compile=jit_compile)
    plain.set_weights(model.get_weights())
    fit = dict(x=x, y=y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    model.fit(**fit, callbacks=[keras_fim.FisherCallback(every_n_steps=3)])
    assert sum(t is model for t in traces) == (2 if jit_compile else 1)
    assert int(model.fisher_state.measurements) == 3  # steps 0, 3 and 6 of 7
    plain.fit(**fit)
    assert_same_weights(model, plain)


def test_reused_functions_train_as_plain_keras_and_as_fresh_ones(measure_traces):
    x, y = data(32)
    fresh_model, reused_model, plain = (compile_sgd(mlp()) for _ in range(3))
    for other in (fresh_model, plain):
        other.set_weights(reused_model.get_weights())
    reused = keras_fim.FisherCallback(every_n_steps=2)
    for _ in range(2):
        fit = dict(x=x, y=y, batch_size=8, epochs=1, verbose=0, shuffle=False)
        reused_model.fit(**fit, callbacks=[reused])
        fresh_model.fit(**fit, callbacks=[keras_fim.FisherCallback(every_n_steps=2)])
        plain.fit(**fit)
    assert sum(c.options is reused for c in measure_traces) == 1
    assert_same_weights(reused_model, plain)
    for name in ("energy_sum", "condition_sum", "measurements", "step"):
        assert float(getattr(reused_model.fisher_state, name)) == float(
            getattr(fresh_model.fisher_state, name)
        ), name


def test_a_changed_option_a_recompile_or_another_callback_traces_again(measure_traces):
    x, y = data(32)
    model = compile_sgd(mlp())
    callback = keras_fim.FisherCallback(every_n_steps=2)

    def fit(xs=x):
        model.fit(xs, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
        return len(measure_traces)

    assert fit() == 1
    assert fit() == 1
    callback.ema_decay = 0.5  # read while tracing
    assert fit() == 2
    compile_sgd(model)
    assert fit() == 3
    other = keras_fim.FisherCallback(every_n_steps=2)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[other])
    assert len(measure_traces) == 4


# -- the noise passes only when read (issue 15 item 4) -------------------------


@pytest.fixture
def noise_passes(monkeypatch):
    """[traces, runs]: how often the half-batch passes were traced, and a
    variable counting how often they ran."""
    import tensorflow as tf

    from keras_fim import measured_step as callback_module

    runs = tf.Variable(0, dtype=tf.int64)
    counts = {"traces": 0, "runs": runs}
    original = callback_module.gradient_noise_components

    def counted(*args, **kwargs):
        counts["traces"] += 1
        runs.assign_add(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(callback_module, "gradient_noise_components", counted)
    return counts


def bn_fit(noise_scale, log_dir=None, sampling=None, epochs=1):
    keras.utils.set_random_seed(1)
    x, y = data(48, shape=(6, 6, 2))
    model = compile_sgd(bn_dropout_cnn())
    fisher = keras_fim.FisherCallback(
        log_dir=log_dir, every_n_steps=2, noise_scale=noise_scale
    )
    if sampling is None:
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=epochs,
            verbose=0,
            shuffle=False,
            callbacks=[fisher],
        )
    else:
        sampling = keras_fim.DynamicSampling(
            (x, y), schedule=8, learning_rate_scaling=sampling, shuffle=False
        )
        model.fit(
            sampling.dataset, epochs=epochs, verbose=0, callbacks=[fisher, sampling]
        )
    return model


def test_auto_runs_no_noise_passes_without_a_reader(noise_passes, tmp_path):
    model = bn_fit("auto", log_dir=str(tmp_path))
    state = model.fisher_state
    assert noise_passes["traces"] == 0 and int(noise_passes["runs"]) == 0
    assert int(state.measurements) == 3
    assert float(state.trace_sigma_ema) == 0.0  # never set
    assert np.isnan(float(state.noise_scale))
    scalars, _ = read_scalars(str(tmp_path))
    assert "fisher/noise_scale" not in scalars  # nothing read it: not written
    assert "fisher/C_K_bar" in scalars


def test_auto_with_a_reader_equals_always(noise_passes):
    read = bn_fit("auto", sampling="adascale")
    assert noise_passes["traces"] >= 1
    assert int(noise_passes["runs"]) == int(read.fisher_state.measurements) == 3
    always = bn_fit("always", sampling="adascale")
    plain_always = bn_fit("always")
    for name in ("trace_sigma_ema", "true_gradient_sq_ema", "condition_sum"):
        value = float(getattr(read.fisher_state, name))
        assert value != 0.0, name
        assert value == float(getattr(always.fisher_state, name)), name
    # Without a reader "auto" records the same spectra, only not the noise.
    no_reader = bn_fit("auto")
    assert float(no_reader.fisher_state.condition_sum) == float(
        plain_always.fisher_state.condition_sum
    )
    assert_same_weights(no_reader, plain_always)


def test_noise_scale_cadence_and_never(noise_passes):
    model = bn_fit(2, epochs=2)  # 6 measured steps: passes at the 1st, 3rd, 5th
    assert int(model.fisher_state.measurements) == 6
    assert int(noise_passes["runs"]) == 3
    assert float(model.fisher_state.trace_sigma_ema) != 0.0
    never = bn_fit("never")
    assert (
        int(noise_passes["runs"]) == 3
        and float(never.fisher_state.trace_sigma_ema) == 0.0
    )
    # Free noise components (no batch coupling) are kept whatever the option.
    x, y = data(32)
    free = compile_sgd(mlp())
    free.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        verbose=0,
        callbacks=[keras_fim.FisherCallback(every_n_steps=1, noise_scale="never")],
    )
    assert float(free.fisher_state.trace_sigma_ema) != 0.0
    assert int(noise_passes["runs"]) == 3


# -- no noise a user sees (issue 15 item 6) ------------------------------------


@pytest.fixture
def tf_log():
    """The messages TensorFlow's logger emits, and Python's warnings."""
    import logging
    import warnings

    import tensorflow as tf

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logger = tf.get_logger()
    logger.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield records, caught
    logger.removeHandler(handler)


def embedding_model(batch_norm=False):
    layers = [keras.Input((5,), dtype="int32"), keras.layers.Embedding(20, 4)]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization())
    layers += [keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(3)]
    model = keras.Sequential(layers)
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def noisy(messages):
    return [
        m
        for m in messages
        if "IndexedSlices" in m or "retracing" in m or "parallel_iterations" in m
    ]


FIT_WITH_A_CADENCE = """
import keras, numpy as np, keras_fim
inputs = keras.Input((8, 8, 2))
h = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
h = keras.layers.BatchNormalization()(h)
h = keras.layers.GlobalAveragePooling2D()(h)
model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(h))
model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
x, y = np.random.rand(32, 8, 8, 2).astype("float32"), np.arange(32) % 3
callback = keras_fim.FisherCallback(every_n_steps=2)
model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[callback])
assert int(model.fisher_state.measurements) == 4
"""


def test_a_fit_with_a_cadence_logs_no_tensorflow_warning():
    """TensorFlow's own logging on (as a user has it): a fit whose steps
    are measured under an in-graph condition makes TensorFlow log no
    warning or error (grappler logged one for a softmax it could not cost
    there, before its cotangent came from the recorded output)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [sys.executable, "-c", FIT_WITH_A_CADENCE],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    logged = [
        line
        for line in result.stderr.splitlines()
        if line[:1] in "WE" and line[1:5].isdigit() and "cuda" not in line.lower()
    ]
    assert logged == [], result.stderr


@pytest.mark.parametrize("reuse_training_pass", [True, False])
def test_embedding_fits_and_measure_loops_warn_about_nothing(
    tf_log, reuse_training_pass
):
    records, caught = tf_log
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 20, (32, 5)), rng.integers(0, 3, 32)
    for batch_norm in (False, True):
        model = embedding_model(batch_norm)
        callback = keras_fim.FisherCallback(
            every_n_steps=1,
            noise_scale="always",
            reuse_training_pass=reuse_training_pass,
        )
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
        assert int(model.fisher_state.measurements) == 4
        for i in range(8):  # measure in a Python loop, batches of one shape
            batch = slice(4 * i, 4 * i + 4)
            keras_fim.measure(model, x[batch], y[batch])
            keras_fim.fisher_gram(model, x[batch], y[batch])
    assert not noisy(records)
    assert not noisy([str(w.message) for w in caught])


class Scale(keras.layers.Layer):  # the generic (pfor) rule
    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.w


def scale_model():
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(4), Scale(), keras.layers.Dense(3)]
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_per_example_gradients_in_a_loop_warn_about_nothing(tf_log):
    records, caught = tf_log
    model = scale_model()
    x, y = data(48)
    for i in range(6):  # batches of one shape, as a loop over a dataset
        grads = keras_fim.per_example_gradients(
            model, x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]
        )
    assert not noisy(records)
    assert not noisy([str(w.message) for w in caught])
    logits = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None
    )
    expected = ref.loop_per_example_gradients(model, x[40:], y[40:], loss=logits)
    for g, e in zip(grads, expected, strict=True):
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-5, atol=1e-7)


def test_measure_in_a_loop_traces_once_and_equals_a_traced_call():
    import tensorflow as tf

    model = scale_model()
    x, y = data(48)
    results = [keras_fim.measure(model, x[i : i + 8], y[i : i + 8]) for i in (0, 8)]
    ((_, function),) = model._keras_fim_api_functions.values()
    assert function.experimental_get_tracing_count() == 1
    for _ in range(4):
        keras_fim.measure(model, x[:8], y[:8])
    assert function.experimental_get_tracing_count() == 1
    direct = tf.function(lambda a, b: keras_fim.measure(model, a, b))(x[8:16], y[8:16])
    np.testing.assert_allclose(
        results[1].eigenvalues.numpy(), direct.eigenvalues.numpy(), rtol=1e-12
    )


def test_measure_after_a_recompile_or_a_frozen_layer_is_traced_again():
    """The function kept on the model for repeated `measure` calls is not
    reused once what it read changed: the compiled loss (its weights) or the
    trainable variables."""
    model = compile_sgd(mlp())
    x, y = data(16)
    base = keras_fim.measure(model, x, y).eigenvalues.numpy()
    model.compile(
        optimizer="sgd", loss="sparse_categorical_crossentropy", loss_weights=0.5
    )
    scaled = keras_fim.measure(model, x, y).eigenvalues.numpy()
    np.testing.assert_allclose(scaled, 0.25 * base, rtol=1e-9)
    model.layers[1].trainable = False  # the hidden Dense (0 is the Input)
    frozen = keras_fim.measure(model, x, y)
    head = ref.flatten_gradients(
        ref.loop_per_example_gradients(model, x, y)
    )  # the trainable (last) layer's gradients only
    np.testing.assert_allclose(
        frozen.eigenvalues.numpy(),
        0.25 * np.linalg.eigvalsh(head @ head.T)[::-1] / len(x),
        rtol=1e-5,
        atol=1e-9,
    )
