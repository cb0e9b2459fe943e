"""DynamicSampling inside `fit`: which examples, batch sizes, learning rates.

Every expectation is derived from the specification by an independent
reference (numpy permutations and Python loops below); the code under test
is never asked to compute an expected value.
"""

import math
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf
from fim_helpers import assert_same_weights
from fim_reference import read_scalars

import keras_fim
from keras_fim.schedules import Geometric, Linear, SamplingContext, Staged

N = 103  # not a multiple of any size used: every pass ends on a partial batch


# -- the reference ------------------------------------------------------------


def reference_order(n, seed, data_pass, shuffle=True):
    if shuffle:
        return np.random.default_rng([seed, data_pass]).permutation(n)
    return np.arange(n)


def reference_plan(
    n,
    epochs,
    size_of,
    *,
    seed=0,
    shuffle=True,
    drop_remainder=False,
    steps_per_execution=1,
    first_pass=0,
    examples_seen=0,
    step=0,
):
    """Per epoch, the index arrays of the batches trained, by the SPEC.

    `size_of(context)` is asked once per execution (`steps_per_execution`
    steps); `context` has the SamplingContext attributes.
    """
    plan = []
    for epoch in range(epochs):
        data_pass = first_pass + epoch
        order = reference_order(n, seed, data_pass, shuffle)
        position, batches = 0, []
        while position < n:
            size = size_of(
                SimpleNamespace(
                    epoch=epoch,
                    epochs=epochs,
                    step=step,
                    data_pass=data_pass,
                    position=position,
                    examples_seen=examples_seen,
                    num_examples=n,
                )
            )
            for _ in range(steps_per_execution):
                if position >= n:
                    break
                if drop_remainder and n - position < size:
                    position = n  # the short final slice is not trained
                    break
                take = min(size, n - position)
                batches.append(order[position : position + take])
                position += take
                examples_seen += take
                step += 1
        plan.append(batches)
    return plan


def staged_ref(sizes, fractions=None):
    fractions = fractions or [1 / len(sizes)] * len(sizes)
    ends = np.cumsum(fractions)

    def size_of(c):
        progress = (c.data_pass + c.position / c.num_examples) / c.epochs
        for size, end in zip(sizes, ends, strict=True):
            if progress < end:
                return size
        return sizes[-1]

    return size_of


def growing_callable(c):
    # Grows mid-epoch (examples_seen is not a multiple of N at the changes).
    if c.examples_seen < 60:
        return 4
    if c.examples_seen < 170:
        return 8
    return 16


def geometric_examples_ref(c):
    return min(4 * 2 ** (c.examples_seen // 30), 16)


# -- models that record what the train step received ---------------------------


class Recorder(keras.Model):
    """Functional model whose (eager) train_step keeps a numpy copy of every batch."""

    def train_step(self, data):
        self.__dict__["_seen"].append(keras.tree.map_structure(np.asarray, data))
        return super().train_step(data)


def recorder(inputs, outputs):
    model = Recorder(inputs, outputs)
    object.__setattr__(model, "_seen", [])
    return model


def id_data(n=N):
    # Column 0 a feature, column 1 the example id (exact in float32).
    x = np.stack([np.linspace(-1, 1, n), np.arange(n)], axis=1)
    y = np.sin(np.arange(n, dtype=np.float64))[:, None]
    return x, y


def id_model(**compile_kwargs):
    inputs = keras.Input((2,))
    model = recorder(inputs, keras.layers.Dense(1)(inputs))
    model.compile(
        optimizer=keras.optimizers.SGD(0.001),
        loss="mse",
        run_eagerly=True,
        **compile_kwargs,
    )
    return model


def ids_per_epoch(model, sizes_per_epoch):
    ids = [int(i) for batch in model._seen for i in batch[0][:, 1]]
    out, start = [], 0
    for sizes in sizes_per_epoch:
        out.append(ids[start : start + sum(sizes)])
        start += sum(sizes)
    assert start == len(ids)
    return out


# -- 1. every example exactly once per epoch ------------------------------------


CASES = {
    "staged": dict(schedule=lambda: Staged([4, 8, 32]), ref=staged_ref([4, 8, 32])),
    "callable_mid_epoch": dict(schedule=lambda: growing_callable, ref=growing_callable),
    "geometric_every_examples": dict(
        schedule=lambda: Geometric(4, factor=2, maximum=16, every_examples=30),
        ref=geometric_examples_ref,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("drop_remainder", [False, True])
def test_each_example_once_per_epoch_in_the_reference_order(case, drop_remainder):
    x, y = id_data()
    model = id_model()
    sampling = keras_fim.DynamicSampling(
        (x, y),
        schedule=CASES[case]["schedule"](),
        seed=7,
        drop_remainder=drop_remainder,
    )
    history = model.fit(sampling.dataset, epochs=3, callbacks=[sampling], verbose=0)

    plan = reference_plan(
        N, 3, CASES[case]["ref"], seed=7, drop_remainder=drop_remainder
    )
    expected_sizes = [[len(b) for b in batches] for batches in plan]
    assert len(history.epoch) == 3
    assert sampling.batch_sizes_per_epoch == expected_sizes
    # The train step really received those sizes (not only the bookkeeping).
    assert [len(b[0]) for b in model._seen] == [s for e in expected_sizes for s in e]
    for epoch, (seen, batches) in enumerate(
        zip(ids_per_epoch(model, expected_sizes), plan, strict=True)
    ):
        expected = [int(i) for b in batches for i in b]
        assert seen == expected, f"epoch {epoch}"
        if drop_remainder:
            assert len(set(seen)) == len(seen)  # at most once
        else:
            assert sorted(seen) == list(range(N))  # exactly once
    state = model.sampling_state.read()
    assert state["step"] == sum(len(e) for e in expected_sizes)
    assert state["examples_seen"] == sum(sum(e) for e in expected_sizes)


def test_drop_remainder_drops_only_a_short_final_slice():
    # Staged([4, 8, 32]) over 103 examples: 3 of pass 0 and 7 of passes 1 and
    # 2 are dropped (hand count, independent of the reference loop).
    x, y = id_data()
    model = id_model()
    sampling = keras_fim.DynamicSampling(
        (x, y), Staged([4, 8, 32]), drop_remainder=True
    )
    model.fit(sampling.dataset, epochs=3, callbacks=[sampling], verbose=0)
    assert sampling.batch_sizes_per_epoch == [[4] * 25, [8] * 12, [32] * 3]


def test_without_shuffle_every_epoch_is_in_index_order():
    x, y = id_data()
    model = id_model()
    sampling = keras_fim.DynamicSampling((x, y), Staged([4, 8, 32]), shuffle=False)
    model.fit(sampling.dataset, epochs=3, callbacks=[sampling], verbose=0)
    assert sampling.batch_sizes_per_epoch == [
        [4] * 25 + [3],
        [8] * 12 + [7],
        [32] * 3 + [7],
    ]
    for seen in ids_per_epoch(model, sampling.batch_sizes_per_epoch):
        assert seen == list(range(N))


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_steps_per_execution_decides_once_per_execution(drop_remainder):
    x, y = id_data()
    model = id_model(steps_per_execution=2)
    sampling = keras_fim.DynamicSampling(
        (x, y), growing_callable, seed=3, drop_remainder=drop_remainder
    )
    model.fit(sampling.dataset, epochs=3, callbacks=[sampling], verbose=0)
    plan = reference_plan(
        N,
        3,
        growing_callable,
        seed=3,
        drop_remainder=drop_remainder,
        steps_per_execution=2,
    )
    expected_sizes = [[len(b) for b in batches] for batches in plan]
    assert sampling.batch_sizes_per_epoch == expected_sizes
    assert [len(b[0]) for b in model._seen] == [s for e in expected_sizes for s in e]
    for seen, batches in zip(ids_per_epoch(model, expected_sizes), plan, strict=True):
        assert seen == [int(i) for b in batches for i in b]


# -- 2. structure of the data --------------------------------------------------


def structured_data(n=37, seed=0):
    rng = np.random.default_rng(seed)
    x = {"a": rng.normal(size=(n, 3)), "b": rng.normal(size=(n, 2))}  # float64
    y = {"out1": rng.normal(size=(n, 1)), "out2": rng.normal(size=(n, 2))}
    sw = rng.uniform(0.5, 1.5, size=n)
    return x, y, sw


def structured_model():
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    h = keras.layers.Concatenate()([a, b])
    outputs = {
        "out1": keras.layers.Dense(1, name="out1")(h),
        "out2": keras.layers.Dense(2, name="out2")(h),
    }
    model = recorder({"a": a, "b": b}, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss={"out1": "mse", "out2": "mse"},
        run_eagerly=True,
    )
    return model


def as_float32(tree):
    return keras.tree.map_structure(lambda a: np.asarray(a, np.float32), tree)


@pytest.mark.parametrize(
    "source",
    ["arrays", "unbatched_dataset", "batched_dataset", "batched_dataset_explicit"],
)
def test_structure_and_rows_of_every_batch(source):
    x, y, sw = structured_data()
    n = len(sw)
    kwargs = {}
    if source == "arrays":
        data = (x, y, sw)  # float64: cast to float32
    else:
        data = tf.data.Dataset.from_tensor_slices(as_float32((x, y, sw)))
        if source == "batched_dataset":
            data = data.batch(7)  # unknown leading dim: detected as batched
        elif source == "batched_dataset_explicit":
            data = data.batch(5)
            kwargs = {"batched": True}
    model = structured_model()
    sampling = keras_fim.DynamicSampling(data, Staged([5, 10]), seed=11, **kwargs)
    model.fit(sampling.dataset, epochs=2, callbacks=[sampling], verbose=0)

    plan = reference_plan(n, 2, staged_ref([5, 10]), seed=11)
    batches = [b for e in plan for b in e]
    assert len(model._seen) == len(batches)
    expected_full = as_float32((x, y, sw))
    for seen, index in zip(model._seen, batches, strict=True):
        sx, sy, _ = seen
        assert set(sx) == {"a", "b"} and set(sy) == {"out1", "out2"}
        expected = keras.tree.map_structure(lambda a, i=index: a[i], expected_full)
        for got, want in zip(
            keras.tree.flatten(seen), keras.tree.flatten(expected), strict=True
        ):
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, want)


# -- 3. schedule arithmetic -----------------------------------------------------


def context(epochs=4, data_pass=0, position=0, examples_seen=0, n=100, epoch=None):
    return SamplingContext(
        epoch=data_pass if epoch is None else epoch,
        epochs=epochs,
        step=0,
        data_pass=data_pass,
        position=position,
        examples_seen=examples_seen,
        num_examples=n,
    )


def test_staged_with_fractions():
    schedule = Staged([8, 16, 64], fractions=[0.25, 0.5, 0.25])
    # progress = (data_pass + position/n) / epochs; ends at 0.25 and 0.75.
    cases = {
        (0, 0): 8,
        (0, 99): 8,
        (1, 0): 16,
        (2, 50): 16,
        (2, 99): 16,
        (3, 0): 64,
        (3, 99): 64,
    }
    for (data_pass, position), size in cases.items():
        assert schedule(context(4, data_pass, position)) == size, (data_pass, position)
    # Equal stages by default: 10 epochs, 5 sizes -> 2 epochs each.
    default = Staged([1, 2, 3, 4, 5])
    assert [default(context(10, e)) for e in range(10)] == [
        1,
        1,
        2,
        2,
        3,
        3,
        4,
        4,
        5,
        5,
    ]
    # Mid-pass boundary: 3 epochs, 2 stages -> the change is in the middle of pass 1.
    two = Staged([4, 8])
    assert two(context(3, 1, 49)) == 4 and two(context(3, 1, 51)) == 8


def test_geometric_per_epoch_and_per_examples():
    per_epoch = Geometric(4, factor=3, every_epochs=2)
    assert [per_epoch(context(10, e, n=1000)) for e in range(7)] == [
        4,
        4,
        12,
        12,
        36,
        36,
        108,
    ]
    # Capped at num_examples without maximum.
    assert per_epoch(context(20, 14, n=200)) == 200
    capped = Geometric(5, factor=2, maximum=30, every_examples=100)
    expected = [min(5 * 2 ** (s // 100), 30) for s in (0, 99, 100, 250, 300, 999)]
    assert expected == [5, 5, 10, 20, 30, 30]
    assert [
        capped(context(examples_seen=s, n=1000)) for s in (0, 99, 100, 250, 300, 999)
    ] == expected


def test_linear_per_epoch_and_per_examples():
    per_epoch = Linear(10, increment=6, maximum=30)
    assert [per_epoch(context(10, e)) for e in range(6)] == [10, 16, 22, 28, 30, 30]
    per_examples = Linear(3, increment=2, every_examples=50)
    assert [per_examples(context(examples_seen=s)) for s in (0, 49, 50, 149, 150)] == [
        3,
        3,
        5,
        7,
        9,
    ]
    assert Linear(60, increment=50)(context(10, 3)) == 100  # capped at n


# -- 4. learning-rate coupling ----------------------------------------------------


D = 3


def linear_problem(n=50, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype(np.float32)
    y = (
        x @ np.array([[1.0], [-2.0], [0.5]]) + 0.3 + 0.1 * rng.normal(size=(n, 1))
    ).astype(np.float32)
    return x, y


def assert_weights_equal_replay(model, replayed):
    kernel, bias = replayed
    np.testing.assert_allclose(model.get_weights()[0], kernel, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.get_weights()[1], bias, rtol=1e-5, atol=1e-6)


def linear_model(learning_rate, **compile_kwargs):
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(1, use_bias=True)])
    model.set_weights(
        [np.array([[0.2], [0.1], [-0.3]], np.float32), np.array([0.05], np.float32)]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=learning_rate),
        loss="mse",
        **compile_kwargs,
    )
    return model


def replay_sgd(x, y, plan, base_rate, scaling, reference=None, per_epoch_rate=None):
    """float64 SGD on the mse of a linear model over the planned batches."""
    w = np.array([[0.2], [0.1], [-0.3]])
    b = 0.05
    x, y = x.astype(np.float64), y.astype(np.float64)
    reference = reference or len(plan[0][0])  # the first size trained
    t = 0
    for epoch, batches in enumerate(plan):
        for index in batches:
            xb, yb = x[index], y[index]
            size = len(index)
            r = xb @ w + b - yb
            grad_w, grad_b = 2 / size * xb.T @ r, 2 / size * r.sum()
            gain = {
                "none": 1.0,
                "linear": size / reference,
                "sqrt": math.sqrt(size / reference),
            }[scaling]
            rate = per_epoch_rate(epoch) if per_epoch_rate else base_rate(t)
            w = w - rate * gain * grad_w
            b = b - rate * gain * grad_b
            t += 1
    return w, np.array([b])


@pytest.mark.parametrize("scaling", ["none", "linear", "sqrt"])
def test_learning_rate_gain_follows_the_batch_trained(scaling):
    # 50 examples, Staged([4, 8, 16]) over 3 epochs: every pass ends on a
    # batch of 2, so B changes inside every epoch.
    x, y = linear_problem()
    model = linear_model(0.05)
    sampling = keras_fim.DynamicSampling(
        (x, y), Staged([4, 8, 16]), seed=5, learning_rate_scaling=scaling
    )
    model.fit(sampling.dataset, epochs=3, callbacks=[sampling], verbose=0)
    plan = reference_plan(50, 3, staged_ref([4, 8, 16]), seed=5)
    assert [len(b) for b in plan[0]][-1] == 2  # the premise: a partial batch
    assert_weights_equal_replay(model, replay_sgd(x, y, plan, lambda t: 0.05, scaling))
    assert float(model.optimizer.learning_rate) == pytest.approx(0.05)


def test_learning_rate_gain_with_reference_batch_size():
    x, y = linear_problem()
    model = linear_model(0.05)
    sampling = keras_fim.DynamicSampling(
        (x, y),
        Staged([4, 8, 16]),
        seed=5,
        learning_rate_scaling="linear",
        reference_batch_size=8,
    )
    model.fit(sampling.dataset, epochs=3, callbacks=[sampling], verbose=0)
    plan = reference_plan(50, 3, staged_ref([4, 8, 16]), seed=5)
    assert_weights_equal_replay(
        model, replay_sgd(x, y, plan, lambda t: 0.05, "linear", reference=8)
    )


def test_learning_rate_gain_on_a_learning_rate_schedule():
    x, y = linear_problem()
    decay = keras.optimizers.schedules.ExponentialDecay(
        0.05, decay_steps=5, decay_rate=0.8
    )
    model = linear_model(decay)
    sampling = keras_fim.DynamicSampling(
        (x, y), Staged([4, 8, 16]), seed=5, learning_rate_scaling="linear"
    )
    model.fit(sampling.dataset, epochs=3, callbacks=[sampling], verbose=0)
    plan = reference_plan(50, 3, staged_ref([4, 8, 16]), seed=5)
    # The schedule is evaluated at optimizer.iterations before the step.
    assert_weights_equal_replay(
        model, replay_sgd(x, y, plan, lambda t: 0.05 * 0.8 ** (t / 5), "linear")
    )
    steps = sum(len(e) for e in plan)
    assert int(model.optimizer.iterations) == steps
    # Outside the step the optimizer reads the unscaled schedule.
    assert float(model.optimizer.learning_rate) == pytest.approx(
        0.05 * 0.8 ** (steps / 5)
    )


def test_learning_rate_gain_with_steps_per_execution():
    x, y = linear_problem()
    model = linear_model(0.05, steps_per_execution=2)

    def schedule(c):
        return 4 if c.examples_seen < 30 else (8 if c.examples_seen < 90 else 16)

    sampling = keras_fim.DynamicSampling(
        (x, y), schedule, seed=5, learning_rate_scaling="sqrt"
    )
    model.fit(sampling.dataset, epochs=3, callbacks=[sampling], verbose=0)
    plan = reference_plan(50, 3, schedule, seed=5, steps_per_execution=2)
    assert sampling.batch_sizes_per_epoch == [[len(b) for b in e] for e in plan]
    assert_weights_equal_replay(model, replay_sgd(x, y, plan, lambda t: 0.05, "sqrt"))
    assert float(model.optimizer.learning_rate) == pytest.approx(0.05)


def test_learning_rate_scheduler_callback_still_sets_the_base_rate():
    x, y = linear_problem()
    model = linear_model(0.05)
    sampling = keras_fim.DynamicSampling(
        (x, y), Staged([4, 8, 16]), seed=5, learning_rate_scaling="linear"
    )

    def rates(epoch):
        return 0.05 * 0.5**epoch

    model.fit(
        sampling.dataset,
        epochs=3,
        verbose=0,
        callbacks=[keras.callbacks.LearningRateScheduler(rates), sampling],
    )
    plan = reference_plan(50, 3, staged_ref([4, 8, 16]), seed=5)
    assert_weights_equal_replay(
        model, replay_sgd(x, y, plan, None, "linear", per_epoch_rate=rates)
    )
    assert float(model.optimizer.learning_rate) == pytest.approx(rates(2))


# -- 5. several fits --------------------------------------------------------------


def test_several_fits_continue_the_passes():
    x, y = id_data()
    model = id_model()
    contexts = []

    def schedule(c):
        contexts.append((c.epoch, c.data_pass, c.position))
        return 16

    sampling = keras_fim.DynamicSampling((x, y), schedule, seed=2)
    model.fit(sampling.dataset, epochs=2, callbacks=[sampling], verbose=0)
    first = model.sampling_state.read()
    contexts.clear()
    model._seen.clear()
    model.fit(sampling.dataset, epochs=2, callbacks=[sampling], verbose=0)
    second = model.sampling_state.read()

    # The second fit's passes are passes 2 and 3 (ids in their permutations).
    plan = reference_plan(N, 2, lambda c: 16, seed=2, first_pass=2)
    sizes = [[len(b) for b in e] for e in plan]
    assert sampling.batch_sizes_per_epoch[-2:] == sizes
    for seen, batches in zip(ids_per_epoch(model, sizes), plan, strict=True):
        assert seen == [int(i) for b in batches for i in b]
    assert second["data_pass"] - first["data_pass"] == 2
    assert second["step"] == 2 * first["step"] == 4 * 7
    assert second["examples_seen"] == 4 * N
    # The schedule saw the continued pass counter, from the first step on.
    assert contexts[0][1] == 2 and contexts[-1][1] == 3


# -- 5b. the train function kept across fits (issue 15 item 2) --------------------


@pytest.fixture
def step_traces(monkeypatch):
    """The `DynamicSampling` of every trace of its step, once per trace (the
    gain runs in Python only while the step is traced)."""
    traces = []
    original = keras_fim.DynamicSampling._gain

    def counted(self, batch):
        traces.append(self)
        return original(self, batch)

    monkeypatch.setattr(keras_fim.DynamicSampling, "_gain", counted)
    return traces


def traced_model():
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


def growing(context):
    return 8 if context.step < 20 else 16


@pytest.mark.parametrize("log_dir", [False, True])
def test_later_fits_reuse_the_traced_train_function(tmp_path, step_traces, log_dir):
    x, y = id_data()
    reused_model, fresh_model = traced_model(), traced_model()
    fresh_model.set_weights(reused_model.get_weights())
    options = dict(seed=1, learning_rate_scaling="sqrt")
    log = str(tmp_path) if log_dir else None
    reused = keras_fim.DynamicSampling((x, y), growing, log_dir=log, **options)
    traces = []
    for _ in range(3):
        reused_model.fit(reused.dataset, epochs=1, callbacks=[reused], verbose=0)
        traces.append(sum(s is reused for s in step_traces))
        fresh = keras_fim.DynamicSampling((x, y), growing, **options)
        fresh_model.fit(fresh.dataset, epochs=1, callbacks=[fresh], verbose=0)
    assert traces[0] >= 1 and traces == [traces[0]] * 3
    assert len({id(s) for s in step_traces}) == 4  # a new callback traces its own
    # The sizes grew from 8 to 16 in the second fit; the rate followed.
    assert 16 in reused.batch_sizes_per_epoch[1]
    assert_same_weights(reused_model, fresh_model)
    if log_dir:
        # One event file per fit, each point written once.
        scalars, _ = read_scalars(str(tmp_path), prefix="sampling/")
        steps = int(reused_model.sampling_state.step)
        assert [s for s, _ in scalars["sampling/batch_size"]] == list(
            range(1, steps + 1)
        )


def test_a_changed_option_or_a_recompile_traces_again(step_traces):
    x, y = id_data()
    model = traced_model()
    sampling = keras_fim.DynamicSampling((x, y), 16, seed=1)

    def fit():
        model.fit(sampling.dataset, epochs=1, callbacks=[sampling], verbose=0)
        return len(step_traces)

    first = fit()
    assert fit() == first
    sampling.learning_rate_scaling = "linear"  # read while tracing
    second = fit()
    assert second > first and fit() == second
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    assert fit() > second


def test_with_a_fisher_callback_later_fits_trace_nothing(step_traces):
    x, y = id_data()
    model = traced_model()
    sampling = keras_fim.DynamicSampling((x, y), 16, seed=1)
    fisher = keras_fim.FisherCallback(every_n_steps=2)
    traces = []
    for _ in range(3):
        model.fit(sampling.dataset, epochs=1, callbacks=[fisher, sampling], verbose=0)
        traces.append(len(step_traces))
    # The FisherCallback's function holds this step (one function serves
    # measured and unmeasured steps), and is reused too.
    assert traces[0] >= 1 and traces == [traces[0]] * 3


# -- 6. validation errors ----------------------------------------------------------


def small_xy(n=20):
    return np.zeros((n, 2), np.float32), np.zeros((n, 1), np.float32)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(schedule=0), "schedule"),
        (dict(schedule=-3), "schedule"),
        (dict(schedule=Staged([4, 30])), "schedule"),  # 30 > 20 examples
        (dict(schedule=Geometric(4, maximum=32)), "schedule"),  # maximum > 20
        (dict(schedule=Staged([8, 4])), "allow_shrink"),
        (dict(schedule=4, learning_rate_scaling="cubic"), "learning_rate_scaling"),
        (dict(schedule=4, shuffle=1), "shuffle"),
        (dict(schedule=4, shuffle="yes"), "shuffle"),
        (dict(schedule=4, seed=-1), "seed"),
        (dict(schedule=4, reference_batch_size=0), "reference_batch_size"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_fim.DynamicSampling(small_xy(), **kwargs)


def test_integer_schedule_larger_than_data_raises_at_construction():
    with pytest.raises(ValueError, match="schedule"):
        keras_fim.DynamicSampling(small_xy(20), schedule=21)


def test_bad_schedule_arguments_raise_value_error():
    with pytest.raises(ValueError, match="sizes"):
        Staged([0, 4])
    with pytest.raises(ValueError, match="fractions"):
        Staged([4, 8], fractions=[0.5, 0.6])
    with pytest.raises(ValueError, match="fractions"):
        Staged([4, 8], fractions=[1.0])
    with pytest.raises(ValueError, match="initial"):
        Geometric(0)
    with pytest.raises(ValueError, match="initial"):
        Linear(-1, increment=2)


def test_arrays_with_different_numbers_of_examples():
    with pytest.raises(ValueError, match="data"):
        keras_fim.DynamicSampling((np.zeros((20, 2)), np.zeros((19, 1))), schedule=4)
    with pytest.raises(ValueError, match="data"):
        keras_fim.DynamicSampling(
            ({"a": np.zeros((20, 2)), "b": np.zeros((21, 2))}, np.zeros((20, 1))),
            schedule=4,
        )


def plain_model():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


@pytest.mark.parametrize(
    "schedule, match",
    [
        (lambda c: 8 if c.step < 2 else 4, "allow_shrink"),  # shrinks at step 2
        (lambda c: 4 if c.step < 2 else 21, "schedule"),  # 21 > 20 examples
        (lambda c: 4 if c.step < 2 else 0, "schedule"),
    ],
)
def test_bad_callable_schedule_raises_during_fit(schedule, match):
    model = plain_model()
    sampling = keras_fim.DynamicSampling(small_xy(), schedule)
    with pytest.raises(ValueError, match=match):
        model.fit(sampling.dataset, epochs=2, callbacks=[sampling], verbose=0)
    assert model.sampling_state.read()["step"] == 2  # raised at the third decision


def test_shrinking_callable_allowed_with_allow_shrink():
    model = plain_model()

    def schedule(c):
        return 8 if c.step < 2 else 4

    sampling = keras_fim.DynamicSampling(
        small_xy(), schedule, allow_shrink=True, shuffle=False
    )
    model.fit(sampling.dataset, epochs=2, callbacks=[sampling], verbose=0)
    assert sampling.batch_sizes_per_epoch == [[8, 8, 4], [4] * 5]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(schedule=4, learning_rate_scaling="adascale"), "adascale"),
        (dict(schedule=keras_fim.schedules.Automatic(4, maximum=16)), "Automatic"),
    ],
)
def test_fisher_dependent_options_need_a_fisher_callback(kwargs, match):
    model = plain_model()
    before = [w.copy() for w in model.get_weights()]
    sampling = keras_fim.DynamicSampling(small_xy(), **kwargs)
    with pytest.raises(ValueError, match=match):
        model.fit(sampling.dataset, epochs=1, callbacks=[sampling], verbose=0)
    # Raised at fit start: nothing was trained.
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "case", ["schedule_error_during_fit", "adascale_error_at_fit_start"]
)
def test_a_failed_fit_does_not_change_later_fits(case):
    x, y = linear_problem(20)
    failed, fresh = linear_model(0.05), linear_model(0.05)
    start = fresh.get_weights()
    if case == "schedule_error_during_fit":

        def schedule(c):
            return 4 if c.step < 2 else 2  # shrinks: ValueError

        sampling = keras_fim.DynamicSampling(
            (x, y), schedule, learning_rate_scaling="linear"
        )
        callbacks = list
    else:
        sampling = keras_fim.DynamicSampling(
            (x, y), 4, learning_rate_scaling="adascale"
        )

        # The leftover wrapper is compiled into the FisherCallback's functions.
        def callbacks():
            return [keras_fim.FisherCallback(every_n_steps=1)]

    with pytest.raises(ValueError):
        failed.fit(sampling.dataset, epochs=1, callbacks=[sampling], verbose=0)
    state = failed.sampling_state.read()
    # The same later fit, without DynamicSampling, from the same weights.
    failed.set_weights(start)
    for model in (failed, fresh):
        model.fit(
            x,
            y,
            batch_size=2,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=callbacks(),
        )
    assert failed.sampling_state.read() == state  # a plain fit does not sample
    for a, b in zip(failed.get_weights(), fresh.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# -- 7. XLA ------------------------------------------------------------------------


def test_jit_compile_gives_the_same_weights():
    x, y = linear_problem()

    def train(jit_compile):
        model = linear_model(0.05, jit_compile=jit_compile)
        sampling = keras_fim.DynamicSampling(
            (x, y), Staged([4, 8, 16]), seed=5, learning_rate_scaling="sqrt"
        )
        model.fit(sampling.dataset, epochs=3, callbacks=[sampling], verbose=0)
        return model.get_weights(), sampling.batch_sizes_per_epoch

    (plain, sizes), (xla, xla_sizes) = train(False), train(True)
    assert sizes == xla_sizes
    for a, b in zip(plain, xla, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # And both follow the replay (XLA compiled one step per batch shape).
    plan = reference_plan(50, 3, staged_ref([4, 8, 16]), seed=5)
    for got, want in zip(
        xla, replay_sgd(x, y, plan, lambda t: 0.05, "sqrt"), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# -- 8. validation data and history ------------------------------------------------


def test_validation_data_and_history():
    x, y = linear_problem()
    xv, yv = linear_problem(16, seed=1)
    model = linear_model(0.05)
    sampling = keras_fim.DynamicSampling((x, y), Staged([4, 8, 16]), seed=5)
    history = model.fit(
        sampling.dataset,
        epochs=3,
        callbacks=[sampling],
        verbose=0,
        validation_data=(xv, yv),
    )
    assert history.epoch == [0, 1, 2]
    assert len(history.history["loss"]) == 3
    assert len(history.history["val_loss"]) == 3
    assert all(np.isfinite(history.history["val_loss"]))
    # The last validation ran on the final weights, after the whole last pass.
    np.testing.assert_allclose(
        history.history["val_loss"][-1], model.evaluate(xv, yv, verbose=0), rtol=1e-5
    )
    assert len(sampling.batch_sizes_per_epoch) == 3
    assert sum(sampling.batch_sizes_per_epoch[-1]) == 50


def test_keras_file_keeps_a_fisher_models_sampling_state(tmp_path):
    x, y = linear_problem(20)
    inputs = keras.Input((x.shape[1],))
    model = keras_fim.FisherModel(
        inputs, keras.layers.Dense(1)(inputs), every_n_steps=2
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    sampling = keras_fim.DynamicSampling((x, y), Staged([4, 8]))
    model.fit(sampling.dataset, epochs=3, callbacks=[sampling], verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.sampling_state.read() == model.sampling_state.read()
    # Training the reloaded model continues the sampling: the fourth pass.
    again = keras_fim.DynamicSampling((x, y), Staged([4, 8]))
    loaded.fit(again.dataset, epochs=4, initial_epoch=3, callbacks=[again], verbose=0)
    assert loaded.sampling_state.read()["data_pass"] == 3
    assert again.batch_sizes_per_epoch == [[8, 8, 4]]


def test_plain_model_saves_to_keras_after_dynamic_sampling(tmp_path):
    x, y = linear_problem(20)
    model = linear_model(0.05)
    sampling = keras_fim.DynamicSampling((x, y), Staged([4, 8]))
    model.fit(sampling.dataset, epochs=2, callbacks=[sampling], verbose=0)
    path = str(tmp_path / "plain.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for a, b in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
