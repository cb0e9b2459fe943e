"""Property-based tests (hypothesis) of the measurement mathematics.

METHOD.md defines the approximate Fisher of a batch through the per-example
contributions ``g_i`` (the rows of ``J``) and the Gram ``G = J J^T``. Whatever
the model and the data, that definition implies:

* permuting the examples permutes ``G`` as ``P G P^T`` and leaves the spectrum
  unchanged (also with BatchNorm in training mode, whose batch statistics are
  permutation-invariant, so the contributions are permutation-equivariant);
* multiplying the loss by ``a`` multiplies every ``g_i`` by ``a``: the
  eigenvalues of ``F`` by ``a^2``, ``c_k`` unchanged; a sample weight ``w_i``
  multiplies row ``i`` of ``J`` by ``w_i`` (``G_ij -> w_i w_j G_ij``);
* ``k`` copies of one example give ``k`` identical rows: the rank drops by
  ``k - 1``, and a batch of identical examples has rank 1 and ``c_k = 1``;
* ``C_K bar`` and ``L_K`` are sums of per-measurement terms, so recording a
  sequence in one go or across resumes (state saved and restored) gives the
  same values, those of the formulas.

Models are built once per shape (module cache) in float64 and their weights,
data, permutations, scales and weights are drawn by hypothesis.
"""

import functools
import itertools
import math
import os
import tempfile

import fim_reference as ref
import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_fim
from keras_fim.measurements import FisherMeasurement, spectrum_from_gram
from keras_fim.state import FisherState, attach_state

MODEL_KINDS = ["mlp", "mlp_bn", "cnn", "cnn_bn"]
INDEPENDENT_KINDS = ["mlp", "cnn"]  # no cross-example coupling
INPUT_SHAPES = {"mlp": (5,), "cnn": (5, 5, 2)}
CLASSES = 3
SCCE = "sparse_categorical_crossentropy"


def fast(max_examples):
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


@pytest.fixture(autouse=True)
def _float64():
    """Models, losses and Grams in float64 (floatx is reset by conftest)."""
    old_policy = keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_dtype_policy(old_policy)


_MODELS = {}


def model_for(kind):
    """A built float64 model of `kind`, one per kind for the whole module."""
    if kind not in _MODELS:
        base = kind.split("_")[0]
        layers = [keras.Input(INPUT_SHAPES[base])]
        if base == "mlp":
            layers.append(keras.layers.Dense(6, activation="tanh"))
        else:
            layers.append(keras.layers.Conv2D(3, 3, activation="tanh"))
        if kind.endswith("_bn"):
            layers.append(keras.layers.BatchNormalization())
        if base == "cnn":
            layers.append(keras.layers.Flatten())
        layers.append(keras.layers.Dense(CLASSES, activation="softmax"))
        _MODELS[kind] = keras.Sequential(layers)
    return _MODELS[kind]


def prepared(kind, seed, loss=SCCE, **compile_kwargs):
    """The cached model with weights drawn from `seed`, compiled with `loss`."""
    model = model_for(kind)
    rng = np.random.default_rng(seed)
    for v in model.trainable_variables:
        value = 0.5 * rng.normal(size=v.shape)
        if "gamma" in v.path:
            value += 1.0
        v.assign(value)
    model.compile(optimizer="sgd", loss=loss, **compile_kwargs)
    return model


def batch_data(kind, batch, seed):
    rng = np.random.default_rng(seed + 1)
    x = rng.normal(size=(batch, *INPUT_SHAPES[kind.split("_")[0]]))
    y = rng.integers(0, CLASSES, size=batch).astype("int32")
    return x, y


def gram(model, x, y, sample_weight=None):
    return np.asarray(keras_fim.fisher_gram(model, x, y, sample_weight), np.float64)


def assert_gram_close(actual, expected):
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-11 * scale)


def assert_spectra_close(actual, expected):
    """Same eigenvalues of F (descending), condition number and rank."""
    a_eig = np.asarray(actual.eigenvalues, np.float64)
    e_eig = np.asarray(expected.eigenvalues, np.float64)
    np.testing.assert_allclose(a_eig, e_eig, rtol=1e-9, atol=1e-11 * e_eig[0])
    assert int(actual.rank) == int(expected.rank)
    np.testing.assert_allclose(
        float(actual.condition_number), float(expected.condition_number), rtol=1e-6
    )


seeds = st.integers(0, 2**31 - 1)


@st.composite
def permuted_batches(draw):
    batch = draw(st.integers(2, 12))
    permutation = np.array(draw(st.permutations(range(batch))))
    weighted = draw(st.booleans())
    weights = (
        np.array(draw(st.lists(st.floats(0.1, 3.0), min_size=batch, max_size=batch)))
        if weighted
        else None
    )
    return batch, permutation, weights


# ---------------------------------------------------------------------------
# 1. Permutation of the examples.


@pytest.mark.parametrize("kind", MODEL_KINDS)
@fast(max_examples=5)
@given(seed=seeds, case=permuted_batches())
def test_permutation_permutes_gram_and_keeps_spectrum(kind, seed, case):
    batch, p, weights = case
    model = prepared(kind, seed)
    x, y = batch_data(kind, batch, seed)
    g = gram(model, x, y, weights)
    g_perm = gram(model, x[p], y[p], None if weights is None else weights[p])
    assert_gram_close(g_perm, g[np.ix_(p, p)])  # P G P^T
    assert_spectra_close(spectrum_from_gram(g_perm), spectrum_from_gram(g))


# ---------------------------------------------------------------------------
# 2. Scaling the loss, and sample weights.


def scaled_loss(a):
    def loss(y_true, y_pred):
        return a * keras.losses.sparse_categorical_crossentropy(y_true, y_pred)

    return loss


@pytest.mark.parametrize("how", ["loss_weights", "custom_loss", "sample_weight"])
@fast(max_examples=6)
@given(
    kind=st.sampled_from(MODEL_KINDS),
    seed=seeds,
    batch=st.integers(2, 12),
    magnitude=st.floats(0.01, 100.0),
    negative=st.booleans(),
)
def test_scaling_the_loss_by_a_scales_eigenvalues_by_a_squared(
    how, kind, seed, batch, magnitude, negative
):
    a = -magnitude if negative else magnitude
    x, y = batch_data(kind, batch, seed)
    base = keras_fim.measure(prepared(kind, seed), x, y)
    if how == "loss_weights":
        scaled = keras_fim.measure(prepared(kind, seed, loss_weights=a), x, y)
    elif how == "custom_loss":
        scaled = keras_fim.measure(prepared(kind, seed, loss=scaled_loss(a)), x, y)
    else:
        scaled = keras_fim.measure(prepared(kind, seed), x, y, np.full(batch, a))
    base_eig = np.asarray(base.eigenvalues)
    np.testing.assert_allclose(
        np.asarray(scaled.eigenvalues),
        a**2 * base_eig,
        rtol=1e-9,
        atol=1e-11 * a**2 * base_eig[0],
    )
    np.testing.assert_allclose(float(scaled.energy), abs(a) * float(base.energy))
    assert int(scaled.rank) == int(base.rank)
    np.testing.assert_allclose(
        float(scaled.condition_number), float(base.condition_number), rtol=1e-6
    )


@st.composite
def example_weights(draw):
    batch = draw(st.integers(2, 12))
    weight = st.one_of(st.just(0.0), st.floats(0.05, 4.0))
    return np.array(draw(st.lists(weight, min_size=batch, max_size=batch)))


@fast(max_examples=8)
@given(kind=st.sampled_from(INDEPENDENT_KINDS), seed=seeds, w=example_weights())
def test_sample_weights_scale_rows_of_the_jacobian(kind, seed, w):
    model = prepared(kind, seed)
    x, y = batch_data(kind, len(w), seed)
    g = gram(model, x, y)
    g_w = gram(model, x, y, w)
    assert_gram_close(g_w, np.outer(w, w) * g)
    # Zero weights remove examples: a generic batch of independent examples
    # (fewer than parameters) keeps one dimension per weighted example.
    assert int(spectrum_from_gram(g_w).rank) == int(np.count_nonzero(w))


# ---------------------------------------------------------------------------
# 3. Duplicated examples.


@st.composite
def batches_with_copies(draw):
    batch = draw(st.integers(2, 12))
    all_same = draw(st.booleans())
    copies = batch if all_same else draw(st.integers(2, batch))
    order = draw(st.permutations(range(batch)))
    return batch, np.sort(np.array(order[:copies]))


@fast(max_examples=10)
@given(kind=st.sampled_from(INDEPENDENT_KINDS), seed=seeds, case=batches_with_copies())
def test_copies_of_an_example_reduce_the_rank(kind, seed, case):
    batch, copies = case
    k = len(copies)
    model = prepared(kind, seed)
    x, y = batch_data(kind, batch, seed)
    x[copies], y[copies] = x[copies[0]], y[copies[0]]
    jac = ref.flatten_gradients(keras_fim.per_example_gradients(model, x, y))
    scale = float(np.max(np.abs(jac)))
    for i in copies[1:]:  # identical rows of J, hence of G
        np.testing.assert_allclose(jac[i], jac[copies[0]], rtol=0, atol=1e-12 * scale)
    m = keras_fim.measure(model, x, y)
    assert int(m.rank) <= batch - (k - 1)
    # The other examples are generic and there are more parameters than
    # examples, so exactly the k - 1 copies are lost.
    assert int(m.rank) == batch - k + 1
    eigenvalues = np.asarray(m.eigenvalues)
    assert np.all(eigenvalues[int(m.rank) :] <= batch * 1e-13 * eigenvalues[0])
    if k == batch:  # G = |g|^2 1 1^T: one eigenvalue of F, |g|^2
        assert int(m.rank) == 1
        np.testing.assert_allclose(float(m.condition_number), 1.0, rtol=1e-12)
        np.testing.assert_allclose(eigenvalues[0], jac[0] @ jac[0], rtol=1e-9)


# ---------------------------------------------------------------------------
# 4. C_K bar and L_K across resumes.

NAN, INF = float("nan"), float("inf")


@st.composite
def measured_steps(draw):
    # No subnormal values: TensorFlow's CPU kernels flush them to zero (the
    # numpy reference does not), which says nothing about keras-fim.
    floats = functools.partial(st.floats, allow_subnormal=False)
    batch = draw(st.integers(1, 256))
    return dict(
        condition=draw(st.one_of(floats(1.0, 1e6), st.sampled_from([NAN, INF]))),
        energy=draw(floats(0.0, 1e3)),
        learning_rate=draw(st.one_of(floats(1e-5, 2.0), st.just(NAN))),
        batch_size=batch,
        measured=draw(st.integers(1, batch)),  # max_examples
        steps_represented=draw(st.integers(1, 100)),  # every_n_steps, or 1
        noise=draw(
            st.tuples(
                st.one_of(floats(-10.0, 10.0), st.just(NAN)),
                st.one_of(floats(0.0, 10.0), st.just(NAN)),
            )
        ),
    )


def as_measurement(step):
    def f64(v):
        return tf.constant(v, tf.float64)

    nan = f64(NAN)
    return FisherMeasurement(
        eigenvalues=tf.fill([step["measured"]], nan),
        singular_values=tf.fill([step["measured"]], nan),
        condition_number=f64(step["condition"]),
        energy=f64(step["energy"]),
        trace=nan,
        gradient_norm=nan,
        gradient_noise_scale=nan,
        rank=tf.constant(step["measured"], tf.int32),
        batch_size=tf.constant(step["measured"], tf.int32),
        zero_threshold=nan,
    )


def record_all(state, steps, ema_decay):
    for step in steps:
        state.record(
            as_measurement(step),
            tf.constant(step["learning_rate"], tf.float64),
            tf.constant(step["batch_size"], tf.int32),
            tf.constant(step["steps_represented"], tf.int64),
            ema_decay,
            tuple(tf.constant(v, tf.float64) for v in step["noise"]),
        )


def tiny_model():
    inputs = keras.Input((1,))
    return keras.Model(inputs, keras.layers.Dense(1)(inputs))


def state_values(state):
    return {v.name: v.numpy() for v in state.weights}


def expected_running_values(steps, ema_decay):
    """C_K bar, L_K, K, skipped and the EMA of c_k, straight from the formulas."""
    conditions, l_k, skipped, ema = [], 0.0, 0, None
    for s in steps:
        term = (
            s["steps_represented"]  # 1 / sampling ratio
            * s["learning_rate"]
            / s["batch_size"]
            * s["energy"]  # ||J||_F of the measured examples ...
            * math.sqrt(s["batch_size"] / s["measured"])  # ... of the batch
        )
        if not (math.isfinite(s["condition"]) and math.isfinite(term)):
            skipped += 1
            continue
        c = s["condition"]
        ema = c if ema is None else ema_decay * ema + (1 - ema_decay) * c
        conditions.append(c)
        l_k += term
    mean = float(np.mean(conditions)) if conditions else 0.0
    return mean, l_k, len(conditions), skipped, 0.0 if ema is None else ema


@fast(max_examples=25)
@given(
    steps=st.lists(measured_steps(), min_size=1, max_size=10),
    cut_fractions=st.lists(st.floats(0.0, 1.0), max_size=3),
    ema_decay=st.floats(0.0, 0.99, allow_subnormal=False),
    how=st.sampled_from(["set_weights", "weights_file"]),
)
def test_running_values_are_the_same_across_resumes(
    steps, cut_fractions, ema_decay, how
):
    one_go = FisherState()
    record_all(one_go, steps, ema_decay)

    cuts = sorted({round(f * len(steps)) for f in cut_fractions})
    bounds = [0, *cuts, len(steps)]
    segments = [steps[a:b] for a, b in itertools.pairwise(bounds)]
    with tempfile.TemporaryDirectory() as directory:
        model = tiny_model()
        state = attach_state(model)
        for i, segment in enumerate(segments):
            if i:  # resume: a fresh state restored from the saved one
                if how == "set_weights":
                    fresh = FisherState()
                    fresh.set_weights(state.get_weights())
                    state = fresh
                else:
                    path = os.path.join(directory, f"resume{i}.weights.h5")
                    model.save_weights(path)
                    model = tiny_model()
                    state = attach_state(model)
                    state_before = state_values(state)
                    model.load_weights(path)
                    assert all(v == 0 for v in state_before.values())
            record_all(state, segment, ema_decay)

    resumed, direct = state_values(state), state_values(one_go)
    assert resumed.keys() == direct.keys()
    for name in direct:  # the same operations on the same values
        np.testing.assert_array_equal(resumed[name], direct[name], err_msg=name)

    mean, l_k, count, skipped, ema = expected_running_values(steps, ema_decay)
    for s in (state, one_go):
        assert int(s.measurements) == count
        assert int(s.skipped) == skipped
        np.testing.assert_allclose(float(s.condition_mean), mean, rtol=1e-12)
        np.testing.assert_allclose(float(s.energy_sum), l_k, rtol=1e-12)
        np.testing.assert_allclose(float(s.condition_ema), ema, rtol=1e-12)
