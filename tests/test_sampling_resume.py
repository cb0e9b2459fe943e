"""A run killed mid-training and resumed by BackupAndRestore continues the
dynamic sampling exactly: same batch sizes and learning rates at every step,
same C_K bar / L_K and weights as a run that was never interrupted.

The job (tests/sampling_job.py) runs in separate processes; the interrupted
one is killed with SIGKILL, so nothing is saved on the way out.
"""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from fim_reference import read_scalars

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sampling_job.py")


def run_job(out_dir, mode, kill_at_step=None, save_freq=None):
    command = [sys.executable, JOB, str(out_dir), mode]
    command.append("-" if kill_at_step is None else str(kill_at_step))
    if save_freq is not None:
        command.append(str(save_freq))
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.slow  # tests/test_persistence.py kills a DynamicSampling run twice
@pytest.mark.parametrize("mode", ["in_memory", "stream"])
def test_killed_and_resumed_run_repeats_the_uninterrupted_one(tmp_path, mode):
    """In memory from an epoch's backup; streamed from a backup mid-pass,
    where the resumed pass skips the examples its recorded position says
    were trained."""
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    done = run_job(whole, mode)
    assert done.returncode == 0, done.stderr[-3000:]

    a = np.load(whole / "result.npz")
    steps = int(a["iterations"])
    # Killed three quarters in: in the fourth or fifth of five epochs, after
    # BackupAndRestore saved the earlier ones.
    killed = run_job(interrupted, mode, kill_at_step=3 * steps // 4)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (interrupted / "result.npz").exists()
    resumed = run_job(interrupted, mode)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert_same_run(whole, interrupted, 0, 3 * steps // 4)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.slow  # three processes per mode, as the test above
@pytest.mark.parametrize("mode", ["in_memory", "stream"])
def test_backup_on_the_last_step_of_a_pass_resumes_without_an_extra_pass(
    tmp_path, mode
):
    """A `BackupAndRestore(save_freq=int)` backup taken on a pass's last step
    (before the epoch ends, so Keras restarts that epoch) resumes into an
    epoch of no step, the pass being done, and then the next pass: not a
    pass more than the uninterrupted run (issue 14, item 4)."""
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    done = run_job(whole, mode)
    assert done.returncode == 0, done.stderr[-3000:]
    a = np.load(whole / "result.npz")
    epoch_steps = [int(n) for n in a["steps_per_epoch"]]
    assert len(epoch_steps) == 5
    # Backups every `last` steps: the first on the third pass's last step,
    # the next after the kill, one step into the fourth pass.
    last = sum(epoch_steps[:3])
    assert 2 * last > last + 1 and last + 1 < sum(epoch_steps)
    killed = run_job(interrupted, mode, kill_at_step=last + 1, save_freq=last)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run_job(interrupted, mode, save_freq=last)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    b = np.load(interrupted / "result.npz")
    # Restarted at the third epoch: it ends at once, the fourth and fifth train.
    assert [int(n) for n in b["steps_per_epoch"]] == [0, *epoch_steps[3:]]
    assert_same_run(whole, interrupted, last, last + 1)


def assert_same_run(whole, interrupted, first_step, killed_at):
    """The interrupted run (resumed from step `first_step`, or any step
    before `killed_at` for 0) ends as the whole run did: counters, C_K bar,
    L_K, weights, and the batch size and learning rate of every step."""
    a = np.load(whole / "result.npz")
    steps = int(a["iterations"])
    b = np.load(interrupted / "result.npz")
    assert int(b["iterations"]) == steps
    # The resumed process started from the backup, not from scratch.
    if first_step:
        assert int(b["first_step"]) == first_step
    else:
        assert 0 < int(b["first_step"]) < killed_at
    for key in a.files:
        if key not in ("weights", "first_step", "steps_per_epoch"):
            assert a[key] == pytest.approx(b[key], rel=1e-12), key
    np.testing.assert_allclose(a["weights"], b["weights"], rtol=1e-6, atol=1e-7)
    # The batch size really changed during training.
    assert int(a["sampling_batch_size"]) > 8

    # Every step's batch size and learning rate, as TensorBoard shows them
    # (for the interrupted run, the resumed process's values replace the
    # steps it repeated).
    whole_scalars, _ = read_scalars(whole / "logs", prefix="sampling/")
    resumed_scalars, _ = read_scalars(interrupted / "logs", prefix="sampling/")
    for tag in ("sampling/batch_size", "sampling/learning_rate"):
        assert [s for s, _ in whole_scalars[tag]] == list(range(1, steps + 1)), tag
        # Events come oldest file first: the last value of a step wins.
        last = dict(resumed_scalars[tag])
        assert sorted(last) == list(range(1, steps + 1)), tag
        np.testing.assert_allclose(
            [last[s] for s in range(1, steps + 1)],
            [v for _, v in whole_scalars[tag]],
            rtol=1e-6,
            err_msg=tag,
        )
    sizes = [v for _, v in whole_scalars["sampling/batch_size"]]
    assert sizes[0] == 8 and len(set(sizes)) > 2
