"""keras-fim study end to end: runs, resuming, HParams, the CLI."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from keras_fim import study
from keras_fim.cli import main
from keras_fim.reports import find_runs


def test_every_run_has_its_folder_result_and_events(tiny_study):
    root, configs, results = tiny_study
    assert sorted(results) == sorted(c.name for c in configs)
    runs = {run.name: run for run in find_runs(root)}
    assert sorted(runs) == sorted(results)
    for config in configs:
        result = json.loads((root / config.name / "result.json").read_text())
        assert result == results[config.name]
        run = runs[config.name]
        # The final values in result.json are the last ones in the events.
        assert result["C_K_bar"] == pytest.approx(run.final("fisher/C_K_bar"), rel=1e-6)
        assert result["L_K"] == pytest.approx(run.final("fisher/L_K"), rel=1e-6)
        # evaluate() after fit sees the weights of the last validation pass.
        validation = find_validation_accuracy(root / config.name)
        assert result["test_error"] == pytest.approx(1 - validation, abs=1e-6)
        assert run.test_error == pytest.approx(result["test_error"], abs=1e-6)
        assert run.hparams == pytest.approx(config.hparams())
        assert run.iterations == result["iterations"]


def find_validation_accuracy(run_dir):
    from keras_fim.reports.records import _accumulator, _tensors

    return float(
        _tensors(_accumulator(run_dir / "validation"))[0]["epoch_accuracy"][1][-1]
    )


def test_fixed_runs_train_the_batch_size_and_step_decay(tiny_study):
    root, configs, results = tiny_study
    from keras_fim.datasets import load

    examples = load("digits").num_train
    for config in configs:
        run = next(r for r in find_runs(root) if r.name == config.name)
        sizes = run.series("fisher/batch_size")[1]
        rates = run.series("fisher/learning_rate")
        epochs = run.epochs_at(rates[0])
        if config.schedule == "fixed":
            assert set(sizes) <= {config.batch_size, examples % config.batch_size}
            assert results[config.name]["iterations"] == 2 * -(
                -examples // config.batch_size
            )
        else:
            assert sizes.max() > sizes.min()
        # x0.1 from half of the epochs (epoch 1 of 2) on.
        expected = [
            config.learning_rate * (0.1 if e > 1 else 1) for e in np.ceil(epochs)
        ]
        np.testing.assert_allclose(rates[1], expected, rtol=1e-5)


def test_finished_runs_are_skipped_and_unfinished_ones_retrained(
    tiny_study, tmp_path, monkeypatch
):
    root, configs, _ = tiny_study
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    unfinished = configs[1].name
    (copy / unfinished / "result.json").unlink()
    before = {
        c.name: (copy / c.name / "result.json").stat().st_mtime_ns
        for c in configs
        if c.name != unfinished
    }
    events = sorted((copy / unfinished / "train").glob("events*"))
    trained, skipped, folders = [], [], []

    def train(config, log_dir, **kwargs):  # the real one: the Ctrl-C test below
        folders.append(
            sorted(p.name for p in log_dir.iterdir()) if log_dir.exists() else []
        )
        return {"config": dataclasses.asdict(config)}

    monkeypatch.setattr(study, "train", train)
    study.run_study(
        configs,
        copy,
        on_run_end=lambda c, r, was_skipped: (
            skipped if was_skipped else trained
        ).append(c.name),
    )
    assert trained == [unfinished]
    assert folders == [[]]  # trained from an empty folder
    assert sorted(skipped) == sorted(before)
    for name, mtime in before.items():
        assert (copy / name / "result.json").stat().st_mtime_ns == mtime
    # The interrupted run's old events were removed, not appended to.
    assert not any(path.exists() for path in events)
    # A finished run of another configuration is never overwritten.
    changed = [dataclasses.replace(configs[0], epochs=3)]
    with pytest.raises(ValueError, match="another configuration"):
        study.run_study(changed, copy)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("model", "vgg", "model"),
        ("schedule", "cosine", "schedule"),
        ("depth", 0, "depth"),
        ("depth", 12, "depth"),
        ("batch_size", 2.5, "batch_size"),
        ("learning_rate", 0, "learning_rate"),
        ("learning_rate", float("nan"), "learning_rate"),
        ("epochs", True, "epochs"),
        ("learning_rate_decay", "cos", "learning_rate_decay"),
    ],
)
def test_run_config_errors(field, value, match):
    with pytest.raises(ValueError, match=f"`{match}`.*Received: {match}="):
        study.RunConfig(**{field: value})


def test_grid_errors():
    with pytest.raises(ValueError, match="repeats runs"):
        study.grid([16, 16], [0.1], [])
    with pytest.raises(ValueError, match="dynamic schedules only"):
        study.grid([16], [0.1], ["fixed"])
    with pytest.raises(ValueError, match="at least one run"):
        study.run_study([], "unused")


@pytest.mark.parametrize("command", [[], ["train"], ["study"], ["report"]])
def test_cli_help(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["study", "--batch-sizes", "16,x"], "not a comma-separated list of ints"),
        (["study", "--schedules", "cosine"], "`schedule` must be one of"),
        (["train", "--learning-rate", "-1"], "--learning-rate"),
        (["train", "--model", "vgg"], "--model"),
        (["report", "/does/not/exist"], "does not exist"),
    ],
)
def test_cli_bad_arguments(arguments, message):
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2
    assert message in result.output


def test_cli_report_prints_ranking_and_path(tiny_study, tmp_path):
    root, _configs, results = tiny_study
    result = CliRunner().invoke(
        main, ["report", str(root), "--output", str(tmp_path / "r")]
    )
    assert result.exit_code == 0, result.output
    best = min(results, key=lambda name: (results[name]["test_error"], name))
    assert "Runs ranked by test error" in result.output
    assert result.output.index(best) < min(
        result.output.index(name) for name in results if name != best
    )
    assert f"Report: {tmp_path / 'r' / 'index.html'}" in result.output.replace("\n", "")
    assert (tmp_path / "r" / "map.png").exists()


@pytest.mark.slow  # a real `keras-fim study` subprocess, interrupted and rerun
def test_ctrl_c_keeps_finished_runs_and_the_rerun_completes(tmp_path):
    root = tmp_path / "study"
    command = [
        sys.executable,
        "-m",
        "keras_fim.cli",
        "study",
        "--log-dir",
        str(root),
        "--batch-sizes",
        "512",
        "--learning-rates",
        "0.1,0.2",
        "--schedules",
        "",
        "--epochs",
        "2",
        "--every-n-steps",
        "4",
        "--no-report",
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    first = root / "bs512_lr0.1" / "result.json"
    deadline = time.monotonic() + 300
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.exists(), process.communicate()[0]
    time.sleep(3)  # into the second run
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 130, output
    assert "Interrupted" in output
    finished = json.loads(first.read_text())
    assert not (root / "bs512_lr0.2" / "result.json").exists()
    rerun = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "bs512_lr0.1" in rerun.stdout and "skipped" in rerun.stdout
    assert json.loads(first.read_text()) == finished
    assert (root / "bs512_lr0.2" / "result.json").exists()


def test_depth_defaults_and_checks_per_model():
    assert study.RunConfig(model="resnet").depth == 8
    assert study.RunConfig(model="densenet").depth == 10
    assert study.RunConfig(model="densenet", depth=40).depth == 40
    with pytest.raises(ValueError, match=r"6n\+4 and >= 10 for model='densenet'"):
        study.RunConfig(model="densenet", depth=8)
