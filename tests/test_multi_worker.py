"""MultiWorkerMirroredStrategy: two worker processes on localhost (issue 6,
item 1). The runs are in `tests/distribute_job.py` (mode ``worker``); see
tests/test_distribute.py for MirroredStrategy."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from fim_reference import read_scalars

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distribute_job.py")
RTOL = 2e-5


def _run_job(args, env=None):
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


def assert_same_state(a, b, rtol=RTOL):
    for name in ("step", "measurements", "skipped"):
        assert a[name] == b[name], name
    for name in ("condition_sum", "condition_ema", "energy_sum"):
        assert a[name] == pytest.approx(b[name], rel=rtol), name
    for name in ("trace_sigma_ema", "true_gradient_sq_ema"):
        assert a[name] == pytest.approx(b[name], rel=rtol, abs=1e-6), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_multi_worker_mirrored_two_processes(tmp_path):
    """Two worker processes on localhost (MultiWorkerMirroredStrategy, one
    CPU replica each) record identical values, equal to one device's
    (C_K bar, L_K, the counters, the noise averages; `max_examples` 9 of
    6 + 6 takes 5 and 4), with weights those of one device; only the chief
    writes TensorBoard events."""
    workers = [f"localhost:{_free_port()}" for _ in range(2)]
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
        for a, b in zip(w0[scenario]["weights"], one[scenario]["weights"]):
            np.testing.assert_allclose(a, b, atol=1e-6)
