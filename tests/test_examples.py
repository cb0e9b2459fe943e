"""The examples run (one short epoch each), so they cannot rot."""

import importlib.util
import os

import pytest

EXAMPLES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"
)


def load(name):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(EXAMPLES, f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "mode", ["staged", pytest.param("automatic", marks=pytest.mark.slow)]
)
def test_dynamic_sampling_example(tmp_path, capsys, mode):
    load("dynamic_sampling").main(
        ["--mode", mode, "--epochs", "2", "--log-dir", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert "epoch 2:" in out and "batch sizes" in out
    assert os.listdir(tmp_path / mode / "train")


def test_train_digits_example(tmp_path, capsys):
    load("train_digits").main(["--epochs", "1", "--log-dir", str(tmp_path)])
    assert "C_K_bar=" in capsys.readouterr().out


def test_fisher_model_subclass_example(tmp_path, capsys):
    load("fisher_model_subclass").main(["--epochs", "1", "--log-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "epoch 1: C_K_bar=" in out and "restored: every_n_steps=5" in out
    assert "measurements=0" not in out


def test_study_example(tmp_path, capsys):
    # One fixed run (the staged schedule runs in tests/test_study.py).
    arguments = ["--epochs", "1", "--batch-sizes", "512", "--learning-rates", "0.1"]
    load("study").main([*arguments, "--schedules", "--log-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "bs512_lr0.1: test error" in out and "staged" not in out
    assert "report:" in out
    assert (tmp_path / "report" / "index.html").exists()
