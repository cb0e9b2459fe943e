"""tf.distribute: the measurement of the global batch (issue 6, item 1).

MirroredStrategy (2 logical CPU devices) and MultiWorkerMirroredStrategy (2
worker processes on localhost). The strategies need TensorFlow configured before it starts (two logical CPU
devices) or processes of their own (one per worker), so the runs happen in
`tests/distribute_job.py`, in subprocesses; the comparisons are here. The
payload tests run in this process: what the replicas all-gather, formed on
parts of a batch and put together, gives the blocks of the whole batch.
"""

import json
import math
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from fim_helpers import free_port
from fim_reference import read_scalars

import keras_fim
from keras_fim.engine import (
    grams_from_calls,
    noise_components_from_groups,
    payloads_from_calls,
    record_pass,
)
from keras_fim.engine.distribute import bytes_gathered

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distribute_job.py")
RTOL = 2e-5  # float32 sums in another order


def _run_job(args, env=None, timeout=300):
    return subprocess.Popen(
        [sys.executable, JOB, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})},
    )


def _finish_all(processes, timeout):
    """Waits for every process (all of them killed at the deadline or at
    the first failure: a worker whose peer died would wait for ever)."""
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            try:
                output, _ = process.communicate(
                    timeout=max(1.0, deadline - time.monotonic())
                )
            except subprocess.TimeoutExpired:
                pytest.fail("a distribute job timed out")
            assert process.returncode == 0, output[-4000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    out = tmp_path_factory.mktemp("mirrored") / "result.json"
    _finish_all([_run_job(["mirrored", str(out)])], timeout=300)
    return json.loads(out.read_text())


def assert_same_state(a, b, rtol=RTOL):
    for name in ("step", "measurements", "skipped"):
        assert a[name] == b[name], name
    for name in ("condition_sum", "condition_ema", "energy_sum"):
        assert a[name] == pytest.approx(b[name], rel=rtol), name
    for name in ("trace_sigma_ema", "true_gradient_sq_ema"):
        assert a[name] == pytest.approx(b[name], rel=rtol, abs=1e-6), name


@pytest.mark.slow  # the mirrored job (~2 min); CI runs the 2-worker test
@pytest.mark.parametrize("scenario", ["probed", "separate_max13"])
def test_mirrored_measures_the_global_batch(mirrored, scenario):
    """Under MirroredStrategy (2 replicas) C_K bar, L_K and every counter
    equal a single-device run's on the same global batches, with the
    update untouched. With `max_examples` (13 of a global batch of 20) the
    replicas measure 7 and 6 of their examples, shared evenly, and one
    device measuring those 13 gives the same values (the in-graph test
    below takes 5 of 8: 3 and 2)."""
    result = mirrored[scenario]
    assert result["mirrored"]["measurements"] > 0
    assert_same_state(result["mirrored"], result["one"])
    np.testing.assert_allclose(*result["history"], rtol=RTOL)
    assert result["weights"] < 1e-6


@pytest.mark.slow  # the mirrored job (~2 min); CI runs the 2-worker test
@pytest.mark.parametrize("scenario", ["uneven", "empty_shard"])
def test_mirrored_uneven_and_empty_shards(mirrored, scenario):
    """A last batch of 7 (4 + 3) or of 1 (1 + 0: the second replica's shard
    is empty, and an all-gather of nothing would crash): measured like on
    one device."""
    result = mirrored[scenario]
    assert result["mirrored"]["measurements"] == 3
    assert_same_state(result["mirrored"], result["one"])


@pytest.mark.slow  # the mirrored job (~2 min); CI runs the 2-worker test
def test_mirrored_weights_equal_plain_keras(mirrored):
    assert mirrored["weights_vs_plain_keras"] == 0.0


@pytest.mark.slow  # the mirrored job (~2 min); CI runs the 2-worker test
def test_mirrored_tensorboard_points_once_with_the_global_batch(mirrored):
    board = mirrored["tensorboard"]
    assert [step for step, _ in board["fisher/batch_size"]] == [1, 3]
    assert {size for _, size in board["fisher/batch_size"]} == {20.0}
    assert len(board["fisher/C_K_bar"]) == 2
    assert any(tag.endswith("/trace_share") for tag in board["layer_tags"]), board


@pytest.mark.slow  # the mirrored job (~2 min); CI runs the 2-worker test
@pytest.mark.parametrize("reuse", [True, False])
def test_mirrored_decision_in_the_graph(mirrored, reuse):
    """Several steps per function (`measured` a tensor): the collectives run
    at every step outside any branch, and only the measured steps count."""
    result = mirrored[f"in_graph_{reuse}"]
    assert result["mirrored"]["measurements"] == 2
    assert_same_state(result["mirrored"], result["one"])
    assert result["weights"] < 1e-6


@pytest.mark.slow  # the mirrored job (~2 min); CI runs the 2-worker test
def test_mirrored_batchnorm_measures_each_shards_own_pass(mirrored):
    """BatchNorm normalises each replica's shard with that shard's
    statistics, as Keras trains it: the contributions are those of each
    shard's own batch pass (one-device runs on the shards, put together),
    and the noise components take the shards as the small batches."""
    result = mirrored["batchnorm"]
    jac = np.array(result["jacobian"])
    gram = jac @ jac.T
    e = np.sort(np.linalg.eigvalsh(gram))[::-1]
    nonzero = e[e > 16 * np.finfo(np.float32).eps * e[0]]
    state = result["mirrored"]
    assert state["condition_sum"] == pytest.approx(
        math.sqrt(nonzero[0] / nonzero[-1]), rel=1e-4
    )
    assert state["energy_sum"] == pytest.approx(
        0.1 / 16 * math.sqrt(np.trace(gram)), rel=RTOL
    )
    big = gram.sum() / 16**2
    small = (gram[:8, :8].sum() + gram[8:, 8:].sum()) / (2 * 8**2)
    assert state["true_gradient_sq_ema"] == pytest.approx(
        (16 * big - 8 * small) / 8, rel=1e-4
    )
    assert state["trace_sigma_ema"] == pytest.approx(
        (small - big) / (1 / 8 - 1 / 16), rel=1e-4
    )


@pytest.mark.slow  # the mirrored job (~2 min); CI runs the 2-worker test
def test_mirrored_mixed_float16(mirrored):
    """mixed_float16 under the strategy: the loss scale's factor covers the
    replicas; weights identical to plain Keras, values those of one device
    within float16 rounding."""
    result = mirrored["mixed_float16"]
    assert result["weights_vs_plain_keras"] == 0.0
    assert_same_state(result["mirrored"], result["one"], rtol=1e-3)


# -- payloads, in this process ---------------------------------------------------


def _models():
    def conv(filters, size):
        inputs = keras.Input((size, size, 2))
        h = keras.layers.Conv2D(
            filters, 3, padding="same", activation="relu", name="conv"
        )(inputs)
        h = keras.layers.Conv1D(3, 2, padding="causal")(
            keras.layers.Reshape((-1, filters))(h)
        )
        h = keras.layers.LayerNormalization()(keras.layers.Flatten()(h))
        return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(h))

    def sequence():
        inputs = keras.Input((5,), dtype="int32")
        h = keras.layers.Embedding(50, 4, name="embedding")(inputs)
        h = keras.layers.Dense(6, activation="tanh", name="dense")(h)
        return keras.Model(
            inputs,
            keras.layers.Dense(3, activation="softmax")(
                keras.layers.GlobalAveragePooling1D()(h)
            ),
        )

    def two_calls():
        inputs = keras.Input((4,))
        dense = keras.layers.Dense(4, activation="tanh")
        return keras.Model(
            inputs, keras.layers.Dense(3, activation="softmax")(dense(dense(inputs)))
        )

    rng = np.random.default_rng(0)
    return {
        # factors for the 2x2 convolution (18 values < 39 parameters)
        "conv_small": (conv(3, 2), rng.normal(size=(10, 2, 2, 2)).astype("float32")),
        # per-example gradients for the 6x6 one (many positions)
        "conv_large": (conv(3, 6), rng.normal(size=(10, 6, 6, 2)).astype("float32")),
        "sequence": (sequence(), rng.integers(0, 50, (10, 5)).astype("int32")),
        "two_calls": (two_calls(), rng.normal(size=(10, 4)).astype("float32")),
    }


@pytest.mark.parametrize("name", ["conv_small", "conv_large", "sequence", "two_calls"])
def test_payloads_of_parts_give_the_whole_batchs_blocks(name):
    """What each replica sends (its examples' factors or gradients), put
    together from two parts of a batch, forms the blocks of the whole
    batch: the same as `grams_from_calls` on it."""
    model, x = _models()[name]
    model.compile(loss="sparse_categorical_crossentropy")
    y = np.arange(len(x)) % 3
    whole = record_pass(model, x, y)
    blocks, _ = grams_from_calls(whole.units, whole.calls, whole.examples)
    parts = []
    for part in (slice(0, 6), slice(6, 10)):
        record = record_pass(model, x[part], y[part])
        parts.append(payloads_from_calls(record.units, record.calls, record.examples))
    for key, payload in parts[0].items():
        tensors = [
            tf.concat([a, b], 0)
            for a, b in zip(payload.tensors, parts[1][key].tensors, strict=True)
        ]
        block, _ = payload.block(tensors, 1 << 30)
        np.testing.assert_allclose(block, blocks[key], rtol=2e-4, atol=1e-6)
    kinds = {key: p.kind for key, p in parts[0].items()}
    if name == "conv_small":
        assert kinds["conv"] == "factors"
    if name == "conv_large":
        assert kinds["conv"] == "gradients"
    if name == "sequence":
        # 5 positions x (4 + 6) values > 4 x 6 + 6 parameters
        assert kinds["embedding"] == "factors" and kinds["dense"] == "gradients"
    if name == "two_calls":  # one unit, its two calls' positions together
        assert len(kinds) == 2 and set(kinds.values()) == {"factors"}
    assert bytes_gathered(parts[0], 6) == sum(
        6 * p.values_per_example * max(t.dtype.size for t in p.tensors)
        for p in parts[0].values()
    )


def test_noise_components_from_groups_equal_real_sub_batches():
    """With the groups real batches of their own (the replicas' shards), the
    small-batch gradient is each group's mean contribution: for independent
    examples and two equal groups, the half-batch estimate."""
    rng = np.random.default_rng(1)
    jac = rng.normal(size=(8, 5))
    gram = tf.constant(jac @ jac.T)
    from keras_fim.engine import noise_components_from_gram

    grouped = noise_components_from_groups(gram, tf.constant([4, 4]))
    halves = noise_components_from_gram(gram)
    np.testing.assert_allclose(grouped, halves, rtol=1e-12)
    # An empty group is left out; one group alone leaves them undefined.
    np.testing.assert_allclose(
        noise_components_from_groups(gram, tf.constant([4, 0, 4])), halves, rtol=1e-12
    )
    assert np.isnan(noise_components_from_groups(gram, tf.constant([8, 0]))).all()


def test_unsupported_strategy_warns_and_trains_as_without_keras_fim():
    """Under a strategy keras-fim has not been tested with (here
    CentralStorageStrategy) it warns once and leaves Keras's own train
    function: the weights are those of plain Keras."""
    strategy = tf.distribute.experimental.CentralStorageStrategy(["CPU:0"])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4)).astype("float32"), rng.integers(0, 3, 32)
    weights = []
    for callbacks in ([keras_fim.FisherCallback(every_n_steps=1)], []):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = keras.Sequential(
                [keras.Input((4,)), keras.layers.Dense(3, activation="softmax")]
            )
            model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
        if callbacks:
            with pytest.warns(UserWarning, match="CentralStorageStrategy"):
                history = model.fit(x, y, batch_size=8, verbose=0, callbacks=callbacks)
            assert "C_K_bar" not in history.history
        else:
            model.fit(x, y, batch_size=8, verbose=0)
        weights.append(model.get_weights())
    for a, b in zip(*weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_multi_worker_mirrored_two_processes(tmp_path):
    """Two worker processes on localhost (MultiWorkerMirroredStrategy, one
    CPU replica each) record identical values, equal to one device's
    (C_K bar, L_K, the counters, the noise averages; `max_examples` 9 of
    6 + 6 takes 5 and 4), with weights those of one device; only the chief
    writes TensorBoard events."""
    workers = [f"localhost:{free_port('localhost')}" for _ in range(2)]
    processes = []
    for index in range(2):
        config = {
            "cluster": {"worker": workers},
            "task": {"type": "worker", "index": index},
        }
        processes.append(
            _run_job(
                [
                    "worker",
                    str(tmp_path / f"worker{index}.json"),
                    str(tmp_path / "logs"),
                ],
                env={"TF_CONFIG": json.dumps(config)},
            )
        )
    processes.append(_run_job(["worker", str(tmp_path / "one.json")]))
    _finish_all(processes, timeout=240)
    w0, w1, one = (
        json.loads((tmp_path / f"{name}.json").read_text())
        for name in ("worker0", "worker1", "one")
    )
    # Only the chief wrote events: one file, one point per measured step.
    assert len(os.listdir(tmp_path / "logs" / "train")) == 1
    scalars, _ = read_scalars(str(tmp_path / "logs"))
    assert [step for step, _ in scalars["fisher/C_K_bar"]] == [1, 3, 5, 7]
    assert {size for _, size in scalars["fisher/batch_size"]} == {12.0}
    for scenario in ("probed", "separate_max9"):
        assert w0[scenario]["state"] == w1[scenario]["state"]
        assert w0[scenario]["state"]["measurements"] > 0
        assert_same_state(w0[scenario]["state"], one[scenario]["state"])
        np.testing.assert_allclose(
            w0[scenario]["C_K_bar"], one[scenario]["C_K_bar"], rtol=RTOL
        )
        for a, b in zip(w0[scenario]["weights"], one[scenario]["weights"], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)
