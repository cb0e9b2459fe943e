"""The automatic mode: `Automatic`'s decisions on synthetic measurement
streams, and the controller inside `fit` with a `FisherCallback`."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from fim_reference import read_scalars

import keras_fim
from keras_fim.schedules import Automatic, SamplingContext


def context(**fields):
    """A SamplingContext with a 1000-example pass, first epoch, unless given."""
    defaults = dict(
        epoch=0,
        epochs=1,
        step=0,
        data_pass=0,
        position=0,
        examples_seen=0,
        num_examples=1000,
    )
    return SamplingContext(**{**defaults, **fields})


def simulate(schedule, noise_scales, measure_every=5, steps=None):
    """Runs `schedule` over a synthetic stream: at step t the smoothed
    B_simple is noise_scales[t] and a measurement arrives every
    `measure_every` steps. Returns the size used at each step."""
    size, last_change, measured_at_change, sizes = None, 0, 0, []
    for step in range(steps or len(noise_scales)):
        measurements = step // measure_every
        new = schedule(
            context(
                step=step,
                num_examples=10_000,
                batch_size=size,
                steps_since_change=step - last_change,
                measurements=measurements,
                measurements_since_change=measurements - measured_at_change,
                noise_scale=noise_scales[step] if measurements else None,
            )
        )
        if new != size:
            size, last_change, measured_at_change = new, step, measurements
        sizes.append(size)
    return sizes


def test_grows_while_noise_scale_exceeds_the_batch_then_holds():
    # B_simple = 100: 16 -> 32 -> 64 -> 128 (100/64 > 1), then 100/128 < 1.
    sizes = simulate(Automatic(16, maximum=1024, min_steps=10), [100.0] * 200)
    changes = [(t, s) for t, s in enumerate(sizes) if t == 0 or s != sizes[t - 1]]
    assert changes == [(0, 16), (10, 32), (20, 64), (30, 128)]


def test_min_steps_and_fresh_measurements_gate_each_change():
    # Measurements every 25 steps: each change waits for one at the new size.
    sizes = simulate(
        Automatic(8, maximum=64, min_steps=5), [1e6] * 200, measure_every=25
    )
    changes = [t for t in range(1, 200) if sizes[t] != sizes[t - 1]]
    assert changes == [25, 50, 75]
    assert sizes[-1] == 64  # bounded by maximum


def test_powers_of_two_and_factor():
    assert (
        simulate(Automatic(12, maximum=100, min_steps=1, factor=1.5), [1e6] * 40)[-1]
        == 100
    )
    sizes = simulate(Automatic(12, maximum=100, min_steps=1, factor=1.5), [1e6] * 40)
    assert sorted(set(sizes)) == [12, 32, 64, 100]  # ceil(12*1.5)=18 -> 32
    sizes = simulate(
        Automatic(12, maximum=100, min_steps=1, factor=1.5, powers_of_two=False),
        [1e6] * 40,
    )
    assert sorted(set(sizes)) == [12, 18, 27, 41, 62, 93, 100]


def test_no_measurement_no_change_and_falling_signal_stops_growth():
    assert set(simulate(Automatic(16, 256, min_steps=1), [None] * 50)) == {16}
    stream = [1000.0] * 30 + [10.0] * 100
    sizes = simulate(Automatic(16, 256, min_steps=10), stream)
    assert sizes[-1] == sizes[40] == 64


def test_condition_number_and_custom_signals():
    now = context(
        step=99,
        batch_size=16,
        steps_since_change=99,
        measurements=9,
        measurements_since_change=9,
        condition_number=500.0,
    )
    assert Automatic(16, 64, signal="condition_number", threshold=100.0)(now) == 32
    assert Automatic(16, 64, signal="condition_number", threshold=1000.0)(now) == 16
    custom = Automatic(16, 64, signal=lambda c: c.step / 10, threshold=5.0)
    assert custom.signal_value(now) == pytest.approx(9.9)
    assert custom(now) == 32


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(initial=0, maximum=8), "initial"),
        (dict(initial=16, maximum=8), "maximum"),
        (dict(initial=8, maximum=16, signal="loss"), "signal"),
        (dict(initial=8, maximum=16, factor=1.0), "factor"),
        (dict(initial=8, maximum=16, threshold=float("nan")), "threshold"),
        (dict(initial=8, maximum=16, min_steps=0), "min_steps"),
        (dict(initial=8, maximum=16, min_measurements=-1), "min_measurements"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Automatic(**kwargs)


def classifier():
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def data(n=240):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int64") + (x[:, 1] > 0.5)  # learnable
    return x, y


def test_automatic_in_fit_logs_decisions_and_fisher_sees_the_coupled_rate(tmp_path):
    x, y = data()
    model = classifier()
    sampling = keras_fim.DynamicSampling(
        (x, y),
        schedule=Automatic(8, 64, min_steps=4),
        learning_rate_scaling="linear",
        log_dir=str(tmp_path),
    )
    fisher = keras_fim.FisherCallback(every_n_steps=2, log_dir=str(tmp_path))
    model.fit(sampling.dataset, epochs=3, callbacks=[fisher, sampling], verbose=0)

    trained = [b for epoch in sampling.batch_sizes_per_epoch for b in epoch]
    assert all(sum(epoch) == len(x) for epoch in sampling.batch_sizes_per_epoch)
    assert trained[0] == 8 and max(trained) > 8  # B_simple ~ 24 here

    scalars, _ = read_scalars(str(tmp_path), prefix="")
    sizes = dict(scalars["sampling/batch_size"])
    rates = dict(scalars["sampling/learning_rate"])
    assert [sizes[s] for s in range(1, len(trained) + 1)] == trained
    for step, size in sizes.items():  # linear coupling, B0 = 8
        assert rates[step] == pytest.approx(0.05 * size / 8, rel=1e-6)
    # The Fisher measurement's L_K uses the rate actually applied.
    for step, rate in scalars["fisher/learning_rate"]:
        assert rate == pytest.approx(rates[step], rel=1e-6)
    # Every decision shows its signal (B_simple / B) and the threshold.
    assert scalars["sampling/signal"] and {
        v for _, v in scalars["sampling/threshold"]
    } == {1.0}


def test_automatic_without_fisher_callback_is_refused():
    x, y = data()
    model = classifier()
    sampling = keras_fim.DynamicSampling((x, y), schedule=Automatic(8, 64))
    with pytest.raises(ValueError, match="FisherCallback"):
        model.fit(sampling.dataset, epochs=1, callbacks=[sampling], verbose=0)


def keras_batch_gradient_sq(model, x, y, sample_weight=None):
    """|g|^2 of Keras's own loss on one batch, training mode (float64);
    the model's variables are restored afterwards (BatchNorm updates them)."""
    saved = [v.numpy() for v in model.variables]
    with tf.GradientTape() as tape:
        pred = model(x, training=True)
        loss = model.compute_loss(x, y, pred, sample_weight, training=True)
    grads = tape.gradient(loss, model.trainable_variables)
    for v, value in zip(model.variables, saved, strict=True):
        v.assign(value)
    return sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in grads)


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_noise_components_from_batch_and_half_batch_gradients(batch_norm, weighted):
    from keras_fim.engine import gradient_noise_components

    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 6)).astype("float32")
    y = rng.integers(0, 3, size=10)
    w = rng.uniform(0.5, 2.0, size=10).astype("float32") if weighted else None
    layers = [keras.Input((6,)), keras.layers.Dense(8)]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization())
    layers += [keras.layers.Activation("tanh"), keras.layers.Dense(3)]
    model = keras.Sequential(layers)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model(x)
    trace_sigma, true_gradient_sq = gradient_noise_components(model, x, y, w)

    def part(a, lo, hi):
        return None if a is None else a[lo:hi]

    big = keras_batch_gradient_sq(model, x, y, w)
    small = 0.5 * sum(
        keras_batch_gradient_sq(model, x[lo:hi], y[lo:hi], part(w, lo, hi))
        for lo, hi in ((0, 5), (5, 10))
    )
    np.testing.assert_allclose(
        float(true_gradient_sq), (10 * big - 5 * small) / 5, rtol=1e-4
    )
    np.testing.assert_allclose(
        float(trace_sigma), (small - big) / (1 / 5 - 1 / 10), rtol=1e-4
    )
    if not batch_norm and not weighted:
        # Without coupling: E|g_b|^2 = tr(Sigma)/b + |G|^2 makes the same
        # formulas exact on the population of these 10 examples' gradients
        # only in expectation; check the sign and scale against the
        # per-example contributions instead.
        grads = keras_fim.per_example_gradients(model, x, y)
        per_example = np.concatenate(
            [np.asarray(g, np.float64).reshape(10, -1) for g in grads], axis=1
        )
        spread = np.sum(np.var(per_example, axis=0, ddof=1))
        assert 0 < float(trace_sigma) < 10 * spread
    assert np.isnan(float(gradient_noise_components(model, x[:1], y[:1])[0]))


def test_fit_keeps_averages_of_the_noise_components_and_their_ratio():
    x, y = data()
    model = classifier()
    expected = {"trace": None, "true": None}

    class Replay(keras.callbacks.Callback):
        """At each measured step, before the update, the same estimates
        from Keras's own batch gradients, averaged by hand (decay 0.5)."""

        def on_train_batch_begin(self, batch, logs=None):
            if batch % 3:
                return
            xb, yb = x[24 * batch : 24 * batch + 24], y[24 * batch : 24 * batch + 24]
            big = keras_batch_gradient_sq(model, xb, yb)
            small = 0.5 * (
                keras_batch_gradient_sq(model, xb[:12], yb[:12])
                + keras_batch_gradient_sq(model, xb[12:], yb[12:])
            )
            values = {
                "true": (24 * big - 12 * small) / 12,
                "trace": (small - big) / (1 / 12 - 1 / 24),
            }
            for key, value in values.items():
                old = expected[key]
                expected[key] = value if old is None else 0.5 * old + 0.5 * value

    fisher = keras_fim.FisherCallback(every_n_steps=3, ema_decay=0.5)
    model.fit(
        x,
        y,
        batch_size=24,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[Replay(), fisher],
    )
    state = model.fisher_state
    assert int(state.measurements) == 4  # steps 0, 3, 6, 9 of 10
    assert float(state.trace_sigma_ema) == pytest.approx(expected["trace"], rel=1e-3)
    assert float(state.true_gradient_sq_ema) == pytest.approx(
        expected["true"], rel=1e-3
    )
    assert float(state.noise_scale) == pytest.approx(
        expected["trace"] / expected["true"], rel=1e-3
    )


# -- undefined noise scales ------------------------------------------------------


def _measurement():
    from keras_fim.measurements import spectrum_from_gram

    return spectrum_from_gram(np.diag([4.0, 1.0]))


@pytest.mark.parametrize(
    "components, defined",
    [
        ((2.0, 0.5), True),
        ((2.0, -86707.0), False),  # |G|^2 below zero (seen on EfficientNetB0)
        ((-3.0, 0.5), False),  # tr(Sigma) below zero
        ((-3.0, -0.5), False),  # both: the ratio would be positive, and wrong
        ((0.0, 0.5), False),
    ],
)
def test_running_noise_scale_is_undefined_unless_both_estimates_are_positive(
    components, defined
):
    state = keras_fim.FisherState()
    assert np.isnan(float(state.noise_scale))  # before any measurement
    state.record(_measurement(), 0.1, 2, 1, 0.9, components)
    value = float(state.noise_scale)
    if defined:
        assert value == pytest.approx(components[0] / components[1])
    else:
        assert np.isnan(value)
    # The averages themselves are kept as estimated, signs included, so
    # that later measurements can bring them back.
    assert float(state.true_gradient_sq_ema) == components[1]


def test_noise_scale_comes_back_when_the_averages_turn_positive():
    state = keras_fim.FisherState()
    state.record(_measurement(), 0.1, 2, 1, 0.5, (4.0, -1.0))
    assert np.isnan(float(state.noise_scale))
    state.record(_measurement(), 0.1, 2, 1, 0.5, (4.0, 3.0))  # EMA: 4, 1
    assert float(state.noise_scale) == pytest.approx(4.0)


def test_per_batch_noise_scale_is_undefined_unless_both_estimates_are_positive():
    from keras_fim.measurements import gradient_noise_scale

    def b_simple(s, m, batch):
        s, m, batch = (tf.constant(v, tf.float64) for v in (s, m, batch))
        return float(gradient_noise_scale(s, m, batch))

    assert b_simple(3.0, 1.0, 4.0) == pytest.approx((2 * 4 / 3) / ((4 - 3) / 3))
    assert np.isnan(b_simple(3.0, 0.5, 4.0))  # |G|^2 estimate (4 m - s) < 0
    assert np.isnan(b_simple(1.0, 2.0, 4.0))  # tr(Sigma) estimate (s - m) < 0
    assert np.isnan(b_simple(3.0, 1.0, 1.0))  # a batch of one


def test_adascale_gain_is_one_while_the_noise_scale_is_undefined():
    x, y = np.zeros((64, 3), "float32"), np.zeros((64, 1), "float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    sampling = keras_fim.DynamicSampling(
        (x, y), schedule=16, learning_rate_scaling="adascale"
    )
    sampling.set_model(model)
    fisher = keras_fim.FisherCallback()
    fisher.set_model(model)
    model.sampling_state.reference_batch_size.assign(16)
    model.fisher_state.true_gradient_sq_ema.assign(-5.0)
    model.fisher_state.trace_sigma_ema.assign(40.0)
    assert float(sampling._gain(tf.constant(64))) == 1.0
    model.fisher_state.true_gradient_sq_ema.assign(1.0)  # B_simple = 40
    expected = (1 + 40 / 16) / (1 + 40 / 64)
    assert float(sampling._gain(tf.constant(64))) == pytest.approx(expected)


def test_fit_never_logs_a_wrong_signed_noise_scale(tmp_path):
    """BatchNorm, batches of 8: the half-batch estimates often fall below
    zero. Whatever is logged is positive; undefined steps are left out."""
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(96, 6)).astype("float32")
    y = rng.integers(0, 3, 96)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        verbose=0,
        callbacks=[
            keras_fim.FisherCallback(
                str(tmp_path), every_n_steps=1, noise_scale="always"
            )
        ],
    )
    scalars, _ = read_scalars(str(tmp_path))
    logged = scalars.get("fisher/noise_scale", [])
    assert all(v > 0 for _, v in logged)
    assert all(v > 0 for _, v in scalars.get("fisher/gradient_noise_scale", []))
    assert 0 < len(logged) < 24  # some of the 24 measured steps were undefined
    state = model.fisher_state
    if not np.isfinite(float(state.noise_scale)):
        assert min(float(state.trace_sigma_ema), float(state.true_gradient_sq_ema)) <= 0
