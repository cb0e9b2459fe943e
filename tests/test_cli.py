"""The `keras-fim` command: help, argument errors, the report command, and a
real `keras-fim study` interrupted with Ctrl-C and rerun."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

import keras_fim_cli
from keras_fim_cli import main

# What TensorFlow prints as it starts (absl, oneDNN, the CUDA probe, cuInit).
STARTUP_LINES = ("absl", "oneDNN", "cuda", "cuInit", "cpu_feature_guard")


@pytest.mark.parametrize("command", [[], ["train"], ["study"], ["report"]])
def test_cli_help(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output


@pytest.mark.parametrize("command", [[], ["study"]])
def test_help_imports_neither_tensorflow_nor_keras_fim(command):
    """`keras-fim --help` is parsed before anything heavy is imported:
    `python -X importtime` lists every module the process imported."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "keras_fim_cli", *command, "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: keras-fim ")
    imported = [
        line.rsplit("|", 1)[-1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    ]
    assert "click" in imported  # the listing is there
    heavy = ("tensorflow", "keras", "keras_fim", "numpy", "rich")
    assert not [m for m in imported if m.split(".")[0] in heavy]
    assert [
        line
        for line in result.stderr.splitlines()
        if not line.startswith("import time:")
    ] == []


def test_a_command_that_starts_tensorflow_prints_none_of_its_startup_lines():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    command = [sys.executable, "-m", "keras_fim_cli", "study", "--dry-run"]
    grid = ["--batch-sizes", "8", "--learning-rates", "0.1", "--schedules", ""]
    result = subprocess.run(
        [*command, *grid], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "1 runs (nothing trained: --dry-run)" in result.stdout
    printed = result.stdout + result.stderr
    assert not [word for word in STARTUP_LINES if word in printed], result.stderr


def test_the_options_defaults_and_choices_are_the_librarys():
    """The command writes them out so that --help needs no keras_fim."""
    from keras_fim import datasets, study

    default = study.RunConfig()
    assert {
        name: getattr(default, name) for name in keras_fim_cli.RUN_DEFAULTS
    } == keras_fim_cli.RUN_DEFAULTS
    assert keras_fim_cli.MODELS == study.MODELS
    assert keras_fim_cli.SCHEDULES == study.SCHEDULES
    assert keras_fim_cli.LEARNING_RATE_DECAYS == study.LEARNING_RATE_DECAYS
    assert tuple(study.PRESETS) == keras_fim_cli.PRESETS
    assert keras_fim_cli.DATASETS == datasets.NAMES
    assert keras_fim_cli.BATCH_SIZES.split(",") == [
        str(b) for b in study.PAPER_BATCH_SIZES
    ]
    assert [float(r) for r in keras_fim_cli.LEARNING_RATES.split(",")] == list(
        study.PAPER_LEARNING_RATES
    )
    fields = {"depth", "data_dir", "zero_threshold"} | set(keras_fim_cli.RUN_DEFAULTS)
    assert {f.name for f in dataclasses.fields(study.RunConfig)} == fields


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["study", "--batch-sizes", "16,x"], "not a comma-separated list of ints"),
        (["study", "--schedules", "cosine"], "`schedule` must be one of"),
        (["train", "--learning-rate", "-1"], "--learning-rate"),
        (["train", "--model", "vgg"], "--model"),
        (["report", "/does/not/exist"], "does not exist"),
        (["train", "--dataset", "foo"], "Invalid value for '--dataset'"),
        (["study", "--batch-sizes", "0"], "Invalid value for '--batch-sizes'"),
        (["study", "--learning-rates", "0.1,-1"], "'--learning-rates'"),
        (["train", "--zero-threshold", "1"], "Invalid value for '--zero-threshold'"),
        (["train", "--depth", "9"], "Invalid value for --depth: `depth` must be 6n+2"),
        (["study", "--seeds", "0"], "Invalid value for '--seeds'"),
        (["study", "--seeds", "-2"], "Invalid value for '--seeds'"),
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
        "keras_fim_cli",
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
    # Into the second run: interrupt as soon as its folder appears (a fixed
    # sleep let a fast machine finish the second run before the signal).
    second = root / "bs512_lr0.2"
    while (
        not second.exists() and process.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    time.sleep(0.5)
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


def test_dry_run_plans_the_papers_runs_without_training(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "study",
            "--preset",
            "paper-cifar100",
            "--dry-run",
            "--log-dir",
            str(tmp_path),
        ],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    assert "31 runs (nothing trained: --dry-run)" in result.output
    assert result.output.count("resnet-110") == 31
    assert result.output.count("cifar100") == 31
    # bs8: 320 epochs of 50000 examples; ResNet-110's 2.53e8 multiply-adds.
    assert "2000000" in result.output and "1.21e+16" in result.output
    assert not any(tmp_path.iterdir())  # nothing written
    given = CliRunner().invoke(
        main,
        ["study", "--preset", "paper-cifar10", "--dry-run", "--epochs", "2"],
        terminal_width=200,
    )
    assert "12500" in given.output  # bs8: 2 epochs (the option given wins)


def test_a_paper_preset_trains_on_tensorflow_datasets(tmp_path, monkeypatch):
    """The preset's data come through tensorflow-datasets (mock data here),
    with the options given overriding the preset's network and length."""
    import tensorflow_datasets as tfds

    from keras_fim import datasets

    monkeypatch.setattr(datasets, "_reachable", lambda url: True)
    with tfds.testing.mock_data(num_examples=24):
        result = CliRunner().invoke(
            main,
            [
                "study",
                "--preset",
                "paper-cifar10",
                *("--depth", "8", "--epochs", "1", "--every-n-steps", "2"),
                *("--batch-sizes", "12", "--learning-rates", "0.1", "--schedules", ""),
                *("--log-dir", str(tmp_path), "--no-report"),
            ],
        )
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "bs12_lr0.1" / "result.json").read_text())
    assert saved["config"]["dataset"] == "cifar10"
    assert saved["config"]["depth"] == 8 and saved["config"]["every_n_steps"] == 2
    assert saved["iterations"] == 2 and saved["measurements"] == 1
