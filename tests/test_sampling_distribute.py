"""`DynamicSampling` under `tf.distribute` (issue 14, item 3): a
`MirroredStrategy` over two logical CPU devices, in memory and streamed
(of known and unknown length), against the same runs on one device.

tf.distribute reads the input a few batches ahead of the step, so under a
strategy the sizes are planned ahead of it; the *global* batch follows the
schedule, every example is trained exactly once per epoch (the model counts
them, summed over the replicas), the learning rate follows the global batch,
and a `FisherCallback` measures the global batch. The runs need TensorFlow
configured before it starts, so they happen in `tests/distribute_job.py
sampling`, in a subprocess; the comparisons are here.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distribute_job.py")
MODES = ("in_memory", "stream_known", "stream_unknown")
# Staged([8, 15, 47]) over 3 passes of 47: the last batch of a pass is 7
# (4 + 3 on the two replicas) or 2, and 47 = 24 + 23.
SIZES = [[8] * 5 + [7], [15] * 3 + [2], [47]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sampling") / "result.json"
    done = subprocess.run(
        [sys.executable, JOB, "sampling", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow  # one process running 15 fits on 2 devices (~30 s)
@pytest.mark.parametrize("mode", MODES)
def test_the_global_batch_follows_the_schedule_every_example_once(runs, mode):
    for where in ("mirrored", "one"):
        run = runs[f"uneven_{mode}_{where}"]
        assert run["sizes"] == SIZES, where
        # Each of the 47 examples once per epoch, over both replicas.
        assert run["counts"] == [3.0] * 47, where
        steps = sum(len(sizes) for sizes in SIZES)
        assert run["iterations"] == steps
        state = run["state"]
        assert (state["step"], state["examples_seen"]) == (steps, 3 * 47)
        assert (state["data_pass"], state["position"]) == (2, 47)
    assert (
        runs[f"uneven_{mode}_mirrored"]["state"] == runs[f"uneven_{mode}_one"]["state"]
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["in_memory", "stream_unknown"])
def test_a_last_batch_of_one_example_leaves_a_replica_nothing(runs, mode):
    """17 examples in 8s: the last batch, 1 = 1 + 0, is trained too."""
    run = runs[f"empty_shard_{mode}"]
    assert run["sizes"] == [[8, 8, 1]] * 2
    assert run["counts"] == [2.0] * 17 and run["examples_seen"] == 34


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_the_learning_rate_and_tensorboard_follow_the_global_batch(runs, mode):
    """Written once per step (by the first replica), with the global size;
    the linear coupling on it: 0.1 * B / 8."""
    sizes = [size for epoch in SIZES for size in epoch]
    steps = list(range(1, len(sizes) + 1))
    run = runs[f"uneven_{mode}_mirrored"]
    assert run["batch_size"] == [
        [s, float(b)] for s, b in zip(steps, sizes, strict=True)
    ]
    assert [s for s, _ in run["learning_rate"]] == steps
    np.testing.assert_allclose(
        [rate for _, rate in run["learning_rate"]],
        [0.1 * b / 8 for b in sizes],
        rtol=1e-6,
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["in_memory", "stream_unknown"])
def test_fisher_measures_the_global_batch(runs, mode):
    """Even global batches (8 = 4 + 4, 16 = 8 + 8), AdaScale, a
    measurement every other step: C_K bar, L_K, the noise scale's averages
    and the weights equal a single device's on the same global batches."""
    a, b = runs[f"fisher_{mode}_mirrored"], runs[f"fisher_{mode}_one"]
    assert a["sizes"] == b["sizes"] == [[8] * 6, [16] * 3]
    assert a["sampling"] == b["sampling"]
    assert a["fisher"]["measurements"] == 5
    for name in ("step", "measurements", "skipped"):
        assert a["fisher"][name] == b["fisher"][name], name
    for name in ("condition_sum", "condition_ema", "energy_sum"):
        assert a["fisher"][name] == pytest.approx(b["fisher"][name], rel=2e-5)
    for name in ("trace_sigma_ema", "true_gradient_sq_ema"):
        assert a["fisher"][name] == pytest.approx(b["fisher"][name], rel=2e-5, abs=1e-6)
    np.testing.assert_allclose(a["C_K_bar"], b["C_K_bar"], rtol=2e-5)
    for u, v in zip(a["weights"], b["weights"], strict=True):
        np.testing.assert_allclose(u, v, atol=1e-6)


@pytest.mark.slow
def test_a_schedule_reading_the_measurements_is_refused(runs):
    error = runs["automatic_error"]
    assert "MirroredStrategy, 2 replicas" in error and "schedule=Automatic(" in error
    assert "uses_measurements = False" in error
