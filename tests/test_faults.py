"""Faults inside `fit` (issue 6, item 3): what a measurement does with
non-finite gradients, a batch of one, all-zero gradients, duplicated examples
and an eigen-solver failure, as the FisherCallback docstring and the FAQ state.

Every case trains exactly as plain Keras (the weights are compared bit for
bit), a skipped measurement is counted in `fisher_state.skipped` (TensorBoard
`fisher/skipped`) and one warning per fit says so.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from fim_helpers import assert_same_weights, keras_fim_warnings
from fim_reference import read_scalars

import keras_fim
from keras_fim.measurements import spectrum_from_gram

SKIP_WARNING = "keras-fim skipped"


def mlp(kernel_initializer="glorot_uniform"):
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(
                5, activation="tanh", kernel_initializer=kernel_initializer
            ),
            keras.layers.Dense(2, kernel_initializer=kernel_initializer),
        ]
    )


def regression_data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype("float32"), rng.normal(size=(n, 2)).astype(
        "float32"
    )


def fit(
    x,
    y,
    callbacks,
    *,
    loss="mse",
    lr=0.05,
    batch_size=8,
    epochs=1,
    kernel_initializer="glorot_uniform",
    **compile_kwargs,
):
    keras.utils.set_random_seed(7)
    model = mlp(kernel_initializer)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=loss, **compile_kwargs)
    with keras_fim_warnings() as messages:
        model.fit(
            x,
            y,
            batch_size=batch_size,
            epochs=epochs,
            shuffle=False,
            verbose=0,
            callbacks=callbacks,
        )
    return model, messages


def counters(model):
    state = model.fisher_state
    return int(state.measurements), int(state.skipped)


def huge_mse(y_true, y_pred):
    """The mean squared error times 1e25: per-example gradients near 1e25
    (finite in float32), whose squares overflow the float32 Gram matrix."""
    return 1e25 * keras.ops.mean(keras.ops.square(y_true - y_pred), axis=-1)


# -- non-finite values ---------------------------------------------------------


def test_gradients_too_large_for_a_float32_gram_are_measured(tmp_path):
    """Per-example gradients near 1e25 are finite in float32; their squares
    overflow float32 but not the float64 Gram products: measured, kept."""
    x, y = regression_data()
    kwargs = {"loss": huge_mse, "lr": 1e-27, "epochs": 2}
    plain, _ = fit(x, y, [], **kwargs)
    log_dir = str(tmp_path)
    measured, messages = fit(
        x, y, [keras_fim.FisherCallback(log_dir, every_n_steps=1)], **kwargs
    )
    assert all(np.isfinite(w).all() for w in measured.get_weights())
    assert_same_weights(plain, measured)
    assert counters(measured) == (4, 0)
    assert messages == []
    scalars, _ = read_scalars(log_dir)
    assert [v for _, v in scalars["fisher/rank"]] == [8.0] * 4  # full rank
    assert all(v > 1e40 for _, v in scalars["fisher/eigenvalue_max"])


def test_a_gram_that_overflows_float64_is_skipped(tmp_path):
    """A float64 model whose gradients' squares overflow even float64: the
    measured steps are skipped (rank 0, nothing drawn), training unchanged."""
    keras.config.set_floatx("float64")
    x, y = (a.astype("float64") for a in regression_data())

    def enormous_mse(y_true, y_pred):
        return 1e170 * keras.ops.mean(keras.ops.square(y_true - y_pred), axis=-1)

    kwargs = {"loss": enormous_mse, "lr": 1e-200, "epochs": 2}
    plain, _ = fit(x, y, [], **kwargs)
    log_dir = str(tmp_path)
    measured, messages = fit(
        x, y, [keras_fim.FisherCallback(log_dir, every_n_steps=1)], **kwargs
    )
    assert_same_weights(plain, measured)
    assert counters(measured) == (0, 4)  # all 4 measured steps skipped
    state = measured.fisher_state
    assert float(state.condition_mean) == 0.0 and float(state.energy_sum) == 0.0
    # One warning for the whole fit (2 epochs, 4 skipped steps), at the end
    # of the first epoch with a skipped step.
    assert len(messages) == 1 and SKIP_WARNING in messages[0]
    assert "2 of the 2" in messages[0]
    scalars, _ = read_scalars(log_dir)
    assert scalars["fisher/skipped"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert "fisher/condition_number" not in scalars  # NaN points are not drawn
    assert [v for _, v in scalars["fisher/rank"]] == [0.0] * 4
    assert "fisher/eigenvalue_max" not in scalars


@pytest.mark.parametrize(
    "fault, jit_compile",
    [("nan_input", False), ("nan_input", True), ("overflowing_loss", False)],
)
def test_one_bad_example_in_a_batch(fault, jit_compile):
    x, y = regression_data()
    if fault == "nan_input":
        x[3, 1] = np.nan  # the first batch's fourth example
    else:
        # Its squared error overflows float32 (the loss is inf); its gradient
        # is finite but its squared norm in the Gram matrix overflows too.
        y[3, 0] = 1e20
    plain, _ = fit(x, y, [], jit_compile=jit_compile)
    measured, messages = fit(
        x, y, [keras_fim.FisherCallback(every_n_steps=1)], jit_compile=jit_compile
    )
    # Plain Keras trains to NaN or huge weights; measuring changes nothing.
    kernel = plain.get_weights()[0]
    assert not np.isfinite(kernel).all() or np.abs(kernel).max() > 1e10
    assert_same_weights(plain, measured)
    if fault == "nan_input":
        assert counters(measured) == (0, 2)  # NaN weights after the first update
        assert len(messages) == 1 and SKIP_WARNING in messages[0]
    else:
        # An infinite loss with finite per-example gradients (their squares
        # fit the float64 Gram products): both steps are measured.
        assert counters(measured) == (2, 0)
        assert messages == []


# -- degenerate spectra ----------------------------------------------------------


def test_all_zero_gradients_are_skipped_with_one_warning_per_fit(tmp_path):
    # Zero weights and zero targets: zero loss, every per-example gradient 0.
    x, _ = regression_data()
    y = np.zeros((16, 2), "float32")
    # Two steps per execution: the counters are read per epoch all the same.
    kwargs = {"kernel_initializer": "zeros", "epochs": 2, "steps_per_execution": 2}
    plain, _ = fit(x, y, [], **kwargs)
    log_dir = str(tmp_path)
    callback = keras_fim.FisherCallback(log_dir, every_n_steps=1)
    measured, messages = fit(x, y, [callback], **kwargs)
    assert_same_weights(plain, measured)
    assert counters(measured) == (0, 4)
    assert len(messages) == 1 and SKIP_WARNING in messages[0]
    scalars, _ = read_scalars(log_dir)
    # Rank 0, c_k undefined (not drawn), the spectrum all zeros.
    assert [v for _, v in scalars["fisher/rank"]] == [0.0] * 4
    assert [v for _, v in scalars["fisher/eigenvalue_max"]] == [0.0] * 4
    assert "fisher/condition_number" not in scalars
    # A later fit warns again (once).
    with keras_fim_warnings() as messages:
        measured.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    again = [m for m in messages if SKIP_WARNING in m]
    assert len(again) == 1 and "2 of the 2" in again[0]
    assert counters(measured) == (0, 6)


def test_batch_of_one_is_measured_with_c_k_one(tmp_path):
    # 17 examples in batches of 8: the last batch holds one example.
    x, y = regression_data(17)
    plain, _ = fit(x, y, [])
    log_dir = str(tmp_path)
    measured, messages = fit(x, y, [keras_fim.FisherCallback(log_dir, every_n_steps=1)])
    assert_same_weights(plain, measured)
    assert counters(measured) == (3, 0)
    assert messages == []
    scalars, _ = read_scalars(log_dir)
    last = {tag: dict(points).get(3) for tag, points in scalars.items()}
    assert last["fisher/batch_size"] == 1
    assert last["fisher/rank"] == 1
    assert last["fisher/condition_number"] == 1.0
    assert last["fisher/trace"] == pytest.approx(last["fisher/eigenvalue_max"])
    assert last["fisher/gradient_noise_scale"] is None  # undefined, not drawn
    c = [v for _, v in scalars["fisher/condition_number"]]
    assert float(measured.fisher_state.condition_mean) == pytest.approx(np.mean(c))


def test_duplicated_examples_lower_the_rank_not_the_spectrum(tmp_path):
    x, y = regression_data(4)
    doubled = (np.concatenate([x, x]), np.concatenate([y, y]))
    runs = {}
    for name, (xs, ys) in {"distinct": (x, y), "doubled": doubled}.items():
        log_dir = str(tmp_path / name)
        model, messages = fit(
            xs,
            ys,
            [keras_fim.FisherCallback(log_dir, every_n_steps=1)],
            batch_size=len(xs),
        )
        assert counters(model) == (1, 0) and messages == []
        runs[name] = {t: v[0][1] for t, v in read_scalars(log_dir)[0].items()}
    assert runs["doubled"]["fisher/batch_size"] == 8
    assert runs["doubled"]["fisher/rank"] == runs["distinct"]["fisher/rank"] == 4
    # F = J^T J / |B| is the same matrix for the doubled batch.
    for tag in ("condition_number", "eigenvalue_max", "eigenvalue_min", "trace"):
        assert runs["doubled"][f"fisher/{tag}"] == pytest.approx(
            runs["distinct"][f"fisher/{tag}"], rel=1e-5
        ), tag


# -- the eigen-solver ----------------------------------------------------------------


@pytest.mark.parametrize("jit_compile", [None, False, True])
@pytest.mark.parametrize(
    "gram",
    [[[1.0, 2.0], [2.0, np.inf]], [[np.nan, 0.0], [0.0, 1.0]], [[-np.inf]]],
    ids=["inf", "nan", "one"],
)
def test_non_finite_gram_gives_nan_measurement_not_an_error(gram, jit_compile):
    gram = tf.constant(gram, tf.float32)
    solve = spectrum_from_gram
    if jit_compile is not None:
        solve = tf.function(spectrum_from_gram, jit_compile=jit_compile)
    m = solve(gram)
    assert np.isnan(m.eigenvalues.numpy()).all()
    assert np.isnan(m.condition_number.numpy())
    assert np.isnan(m.energy.numpy()) and np.isnan(m.trace.numpy())
    assert int(m.rank) == 0 and int(m.batch_size) == gram.shape[0]


def test_the_solver_itself_fails_on_a_nan_matrix():
    # Why the guard exists: on CPU the eigen-solver raises at run time
    # (inside a compiled train step, that would stop training).
    with tf.device("/cpu:0"), pytest.raises(tf.errors.InvalidArgumentError):
        tf.linalg.eigvalsh(tf.constant([[np.nan, 0.0], [0.0, 1.0]], tf.float64))


def test_solver_returning_nan_is_skipped_and_training_is_unchanged(monkeypatch):
    x, y = regression_data()
    plain, _ = fit(x, y, [])

    def failing_solver(matrix):
        return tf.fill(tf.shape(matrix)[:1], tf.constant(np.nan, matrix.dtype))

    monkeypatch.setattr(tf.linalg, "eigvalsh", failing_solver)
    measured, messages = fit(x, y, [keras_fim.FisherCallback(every_n_steps=1)])
    assert_same_weights(plain, measured)
    assert counters(measured) == (0, 2)
    assert len(messages) == 1 and SKIP_WARNING in messages[0]


def test_solver_failing_while_traced_skips_the_measurement(monkeypatch):
    x, y = regression_data()
    plain, _ = fit(x, y, [])

    def unavailable_solver(matrix):
        raise NotImplementedError("no eigen-solver here")

    monkeypatch.setattr(tf.linalg, "eigvalsh", unavailable_solver)
    measured, messages = fit(x, y, [keras_fim.FisherCallback(every_n_steps=1)])
    assert_same_weights(plain, measured)
    assert counters(measured)[0] == 0  # nothing entered C_K_bar
    assert len(messages) == 1 and "could not build" in messages[0]
