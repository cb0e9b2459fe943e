"""Persistence: a `.keras` file keeps every `FisherModel` option and the
running state; a run killed (SIGKILL) mid-epoch and resumed by
`BackupAndRestore` repeats the uninterrupted one, TensorBoard events included.

TensorBoard's view of the events is read with
`plugin_event_accumulator.EventAccumulator`, the reader of TensorBoard's own
server (``--load_fast=false``); its fast Rust server drops a series' points
from a step written again on, which gives the same view.
"""

import glob
import inspect
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_fim
from keras_fim import summaries
from keras_fim.model import _OPTIONS

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "persistence_job.py")

# A value other than the default for every FisherModel option (a new option
# without one here fails the round-trip test).
NON_DEFAULT = {
    "every_n_steps": 2,
    "dense_epochs": 1,
    "max_examples": 4,
    "zero_threshold": 1e-6,
    "ema_decay": 0.5,
    "log_dir": None,  # set per test: a temporary folder
    "per_layer": True,
    "memory_budget": 2**28,
    "reuse_training_pass": False,
    "fail_mode": "warn",
    "measured_layers": ["hidden"],
    "noise_scale": "always",
}


def tensorboard_view(log_dir, prefix="fisher"):
    """{tag: [(step, value)]} of the tags under `prefix`, as TensorBoard's
    server reads ``<log_dir>/train`` (all points kept, orphans purged)."""
    from tensorboard.backend.event_processing import plugin_event_accumulator

    accumulator = plugin_event_accumulator.EventAccumulator(
        os.path.join(str(log_dir), "train"), size_guidance={"tensors": 0}
    )
    accumulator.Reload()
    return {
        tag: [
            (e.step, tf.make_ndarray(e.tensor_proto)) for e in accumulator.Tensors(tag)
        ]
        for tag in accumulator.Tags()["tensors"]
        if tag.startswith(prefix)
    }


def raw_events(log_dir):
    """[(file, step, "START" or tag)] of every event file, oldest first."""
    events = []
    for path in sorted(glob.glob(os.path.join(str(log_dir), "train", "*tfevents*"))):
        for raw in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(raw.numpy())
            name = os.path.basename(path)
            if event.session_log.status == tf.compat.v1.SessionLog.START:
                events.append((name, event.step, "START"))
            events.extend((name, event.step, v.tag) for v in event.summary.value)
    return events


def assert_same_view(actual, expected):
    assert sorted(actual) == sorted(expected)
    for tag, points in expected.items():
        assert [s for s, _ in actual[tag]] == [s for s, _ in points], tag
        for (step, a), (_, b) in zip(actual[tag], points, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=f"{tag} at {step}")


# -- .keras ------------------------------------------------------------------


def test_keras_file_keeps_every_option_and_the_running_state(tmp_path):
    defaults = inspect.signature(keras_fim.FisherModel.__init__).parameters
    missing = [name for name in _OPTIONS if name not in NON_DEFAULT]
    assert not missing, f"give the new options a non-default value: {missing}"
    options = {name: NON_DEFAULT[name] for name in _OPTIONS}
    options["log_dir"] = str(tmp_path / "logs")
    for name, value in options.items():
        assert value != defaults[name].default, name

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype("float32")
    y = rng.integers(0, 3, 40)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="tanh", name="hidden")(inputs)
    model = keras_fim.FisherModel(
        inputs, keras.layers.Dense(3, activation="softmax")(hidden), **options
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss="sparse_categorical_crossentropy",
    )

    def train(m, epochs, initial_epoch=0):
        sampling = keras_fim.DynamicSampling(
            (x, y), keras_fim.schedules.Staged([8, 16])
        )
        m.fit(
            sampling.dataset,
            epochs=epochs,
            initial_epoch=initial_epoch,
            callbacks=[sampling],
            shuffle=False,  # the sampling shuffles
            verbose=0,
        )

    train(model, 2)
    state = {v.path: v.numpy() for v in model.fisher_state.variables}
    assert state["fisher_state/measurements"] > 0
    assert model.sampling_state.read()["batch_size"] == 16
    path = str(tmp_path / "model.keras")
    model.save(path)

    loaded = keras.models.load_model(path)
    assert type(loaded) is type(model)
    assert loaded.fisher_options == options
    for a, b in (
        (model.fisher_state.variables, loaded.fisher_state.variables),
        (model.sampling_state.variables, loaded.sampling_state.variables),
        (model.optimizer.variables, loaded.optimizer.variables),
        (model.weights, loaded.weights),
    ):
        for va, vb in zip(a, b, strict=True):
            np.testing.assert_array_equal(va.numpy(), vb.numpy(), err_msg=va.path)

    # Both continue for two epochs: the same measurements and weights.
    train(model, 4, initial_epoch=2)
    continued = tensorboard_view(options["log_dir"])
    # The loaded model's events go to a file named after a later second, so
    # TensorBoard reads them last (names order the files of a folder).
    time.sleep(1.05 - time.time() % 1)
    train(loaded, 4, initial_epoch=2)
    for a, b in (
        (model.fisher_state.variables, loaded.fisher_state.variables),
        (model.sampling_state.variables, loaded.sampling_state.variables),
        (model.weights, loaded.weights),
    ):
        for va, vb in zip(a, b, strict=True):
            np.testing.assert_allclose(
                va.numpy(), vb.numpy(), rtol=1e-6, err_msg=va.path
            )
    assert int(loaded.fisher_state.step) == int(model.fisher_state.step) > 0

    # The loaded model restarted from the saved state: TensorBoard shows its
    # points in place of those the original wrote after the save, each once
    # and equal to them.
    assert_same_view(tensorboard_view(options["log_dir"]), continued)
    starts = [
        step for _, step, what in raw_events(options["log_dir"]) if what == "START"
    ]
    saved_step = int(state["fisher_state/step"])
    assert starts == [1, saved_step + 1, saved_step + 1]


# -- the event files -----------------------------------------------------------


def test_callbacks_share_one_writer_per_folder(tmp_path):
    first = summaries.create_writer(str(tmp_path))
    second = summaries.create_writer(os.path.join(str(tmp_path), "."))
    assert second is first
    other = summaries.create_writer(str(tmp_path / "other"))
    assert other is not first
    summaries.start_session(first, 5)
    summaries.start_session(second, 9)  # once per file: ignored
    first.close()
    with second.as_default(step=7):  # still open for the other user
        tf.summary.scalar("fisher/x", 1.0)
    second.close()
    other.close()
    third = summaries.create_writer(str(tmp_path))  # a new file
    # The same (still referenced) writer, reopened on its resource.
    assert third is first and third.session_step is None
    third.close()
    events = raw_events(tmp_path)
    assert [
        (step, what) for _, step, what in events if what != "custom_scalars__config__"
    ] == [
        (5, "START"),
        (7, "fisher/x"),
    ]
    assert len({name for name, _, _ in events}) == 2


# -- a real kill ---------------------------------------------------------------


def start_job(out_dir, kill_at_step=None):
    command = [sys.executable, JOB, str(out_dir)]
    if kill_at_step is not None:
        command.append(str(kill_at_step))
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(job):
    _, stderr = job.communicate(timeout=300)
    return job.returncode, stderr[-3000:]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_twice_mid_epoch_and_resumed_run_repeats_the_uninterrupted_one(
    tmp_path,
):
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    # The uninterrupted run goes alongside the interrupted one.
    uninterrupted = start_job(whole)
    # 4 epochs of 20 steps; steps 0, 3, 6, ... measured (points 1, 4, 7, ...);
    # backups every 7 steps of each process.
    #  - 1st process: last backup after step 49, killed before 0-based step 53
    #    (in the 3rd epoch): its point 52 is recomputed by the next process.
    #  - 2nd process (from 49): backups after 56, 63, 70; killed before
    #    0-based step 70 (4th epoch), just after a backup that includes the
    #    measured point 70, which nobody recomputes.
    try:
        for kill_at_step in (53, 70):
            returncode, stderr = finish(start_job(interrupted, kill_at_step))
            assert returncode == -signal.SIGKILL, stderr
            assert not (interrupted / "result.npz").exists()
        returncode, stderr = finish(start_job(interrupted))
        assert returncode == 0, stderr
    finally:
        returncode, stderr = finish(uninterrupted)
    assert returncode == 0, stderr

    a = np.load(whole / "result.npz")
    b = np.load(interrupted / "result.npz")
    assert int(a["iterations"]) == int(b["iterations"]) == 80
    assert int(b["first_step"]) == 70  # the last process started from a backup
    for key in a.files:
        if key not in ("weights", "first_step"):
            assert a[key] == pytest.approx(b[key], rel=1e-12), key
    np.testing.assert_allclose(a["weights"], b["weights"], rtol=1e-6, atol=1e-7)

    # The raw event stream: three files, each opened by a START marker at the
    # first step its process writes; the first process's point 52 is there
    # twice (it was written, then recomputed).
    events = raw_events(interrupted / "logs")
    files = sorted({name for name, _, _ in events})
    assert len(files) == 3
    for name, first_step in zip(files, (1, 50, 71), strict=True):
        own = [(step, what) for n, step, what in events if n == name]
        fisher = [i for i, (_, what) in enumerate(own) if what.startswith("fisher/")]
        assert own.index((first_step, "START")) < fisher[0]
    written = [step for _, step, what in events if what == "fisher/C_K_bar"]
    assert sorted({s for s in written if written.count(s) > 1}) == [52]

    # TensorBoard's view: every point of the uninterrupted run once, with its
    # value (scalars, the histogram and the spectrum).
    expected = tensorboard_view(whole / "logs")
    assert [s for s, _ in expected["fisher/C_K_bar"]] == list(range(1, 80, 3))
    assert {"fisher/log10_eigenvalues", "fisher/spectrum"} <= set(expected)
    assert_same_view(tensorboard_view(interrupted / "logs"), expected)
    assert expected["fisher/L_K"][-1][1] == pytest.approx(float(a["energy_sum"]))
