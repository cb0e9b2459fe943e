"""keras_fim.measurements: the spectrum, its zero threshold and the one-batch
noise scale, from a Gram matrix, against float64 numpy (tests/reference.py)."""

import fim_reference as ref
import numpy as np
import pytest
import tensorflow as tf

from keras_fim.measurements import (
    KAPPA,
    SOLVER_FACTOR,
    gradient_noise_scale,
    noise_floor,
    nonzero_min,
    spectrum_from_gram,
    unit_roundoff,
)

EPS64 = float(np.finfo(np.float64).eps)


def jacobian(batch, params, rank=None, seed=0, spread=1.0):
    """A ``batch x params`` J of the given rank, singular values spread over
    `spread` decades."""
    rng = np.random.default_rng(seed)
    rank = min(batch, params) if rank is None else rank
    u = np.linalg.qr(rng.normal(size=(batch, rank)))[0]
    v = np.linalg.qr(rng.normal(size=(params, rank)))[0]
    singular = np.logspace(0, -spread, rank)
    return (u * singular) @ v.T


@pytest.mark.parametrize(
    "batch, params, rank, spread, zero_threshold",
    [
        (8, 20, None, 2.0, None),
        (8, 20, 5, 2.0, None),  # rank-deficient: three exact zeros
        (16, 6, None, 1.0, None),  # more examples than parameters
        (8, 20, None, 2.0, 0.0),  # the reference code's exact-zero rule
        (8, 20, None, 3.0, 1e-4),  # a relative threshold cuts the tail
        (1, 5, None, 0.0, None),  # a batch of one
    ],
)
def test_every_field_equals_numpy(batch, params, rank, spread, zero_threshold):
    jac = jacobian(batch, params, rank, spread=spread)
    m = spectrum_from_gram(jac @ jac.T, zero_threshold=zero_threshold)
    expected = ref.numpy_measurements(jac, zero_threshold=zero_threshold)
    assert int(m.rank) == expected["rank"]
    assert int(m.batch_size) == batch
    for name in m._fields:
        if name in ("rank", "batch_size"):
            continue
        value = getattr(m, name).numpy()
        assert getattr(m, name).dtype == tf.float64, name
        # Exact zeros come out of both solvers as round-off of the largest
        # eigenvalue (1e-16 of it; its square root for singular values).
        atol = {"singular_values": 1e-7, "eigenvalues": 1e-14}.get(name, 0.0)
        largest = np.abs(np.ravel(expected[name])[0])
        np.testing.assert_allclose(
            value, expected[name], rtol=1e-9, atol=atol * largest, err_msg=name
        )
    if rank is not None and zero_threshold is None:
        assert int(m.rank) == rank  # the exact zeros are below the floor


def test_the_default_threshold_keeps_what_float32_resolves():
    """c_k of 1e5 (eigenvalue ratio 1e10) is far above the old |B| eps32
    cap (181 at batch 256) and below float32's floor of 2e6/sqrt(B)."""
    jac = jacobian(64, 200, spread=5.0)
    m = spectrum_from_gram((jac @ jac.T).astype(np.float64), precision=2.0**-23)
    assert int(m.rank) == 64
    np.testing.assert_allclose(float(m.condition_number), 1e5, rtol=1e-6)


def test_threshold_scales_with_the_energy_not_the_batch():
    for batch in (8, 64, 256):
        jac = jacobian(batch, 400, spread=1.0)
        gram = jac @ jac.T
        m = spectrum_from_gram(gram, precision=unit_roundoff("float32"))
        expected = noise_floor(unit_roundoff("float32")) * np.trace(gram)
        relative = expected / np.linalg.eigvalsh(gram).max()
        np.testing.assert_allclose(float(m.zero_threshold), relative, rtol=1e-12)


def test_precision_defaults_to_the_grams_dtype_below_float64():
    jac = jacobian(6, 10)
    for dtype, u in (
        ("float16", 2.0**-10),
        ("float32", 2.0**-23),
        ("float64", 2.0**-23),
    ):
        gram = tf.constant(jac @ jac.T, dtype)
        m = spectrum_from_gram(gram)
        expected = noise_floor(u) * float(tf.linalg.trace(tf.cast(gram, tf.float64)))
        largest = float(m.eigenvalues[0]) * 6
        np.testing.assert_allclose(
            float(m.zero_threshold), expected / largest, rtol=1e-6, err_msg=dtype
        )


@pytest.mark.parametrize(
    "dtype, eps",
    [
        ("float16", 2.0**-10),
        ("bfloat16", 2.0**-7),
        ("float32", 2.0**-23),
        ("float64", 2.0**-52),
    ],
)
def test_unit_roundoff(dtype, eps):
    assert unit_roundoff(dtype) == eps


def test_noise_floor_is_the_larger_of_contribution_and_solver_error():
    assert noise_floor(2.0**-23) == (KAPPA * 2.0**-23) ** 2
    assert noise_floor(2.0**-52) == SOLVER_FACTOR * EPS64
    assert noise_floor(2.0**-10) == (KAPPA * 2.0**-10) ** 2


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_gram_is_all_nan_with_rank_zero(bad):
    gram = np.eye(4)
    gram[1, 2] = gram[2, 1] = bad
    m = spectrum_from_gram(gram)
    assert int(m.rank) == 0
    for name in m._fields:
        if name not in ("rank", "batch_size"):
            assert np.all(np.isnan(getattr(m, name).numpy())), name


def test_all_zero_gradients_have_rank_zero_and_no_condition_number():
    m = spectrum_from_gram(np.zeros((3, 3)))
    assert int(m.rank) == 0
    assert np.isnan(float(m.condition_number))
    assert float(m.energy) == 0.0


def test_nonzero_min():
    values = tf.constant([5.0, 3.0, 1.0, 0.0], tf.float64)
    assert float(nonzero_min(values, tf.constant(3))) == 1.0
    assert float(nonzero_min(values, tf.constant(1))) == 5.0
    assert np.isnan(float(nonzero_min(values, tf.constant(0))))


def test_gradient_noise_scale_is_the_unbiased_ratio_or_nan():
    rng = np.random.default_rng(3)
    grads = rng.normal(size=(10, 7)) + 2.0  # a clear mean gradient
    s = float(np.mean(np.sum(grads**2, axis=1)))
    mean = grads.mean(axis=0)
    m = float(mean @ mean)
    tr_sigma = np.trace(np.cov(grads.T))  # unbiased (ddof=1)
    g2 = m - tr_sigma / 10  # |G|^2 unbiased
    value = float(gradient_noise_scale(*np.float64([s, m, 10])))
    np.testing.assert_allclose(value, tr_sigma / g2, rtol=1e-12)
    # No mean gradient: the |G|^2 estimate is not positive, so NaN, never
    # a negative noise scale.
    centred = grads - grads.mean(axis=0)
    s0 = float(np.mean(np.sum(centred**2, axis=1)))
    assert np.isnan(float(gradient_noise_scale(*np.float64([s0, 0, 10]))))
    assert np.isnan(float(gradient_noise_scale(*np.float64([s, m, 1]))))  # one example
