"""keras-fim study end to end: runs, resuming, HParams."""

import dataclasses
import json

import numpy as np
import pytest

from keras_fim import study
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
        ("zero_threshold", 1.0, "zero_threshold"),
        ("zero_threshold", -0.1, "zero_threshold"),
    ],
)
def test_run_config_errors(field, value, match):
    with pytest.raises(ValueError, match=f"`{match}`.*Received: {match}="):
        study.RunConfig(**{field: value})


def test_seeds_repeat_every_configuration_one_seed_after_the_other():
    configs = study.grid([16, 64], [0.1], ["staged"], seeds=2, seed=3)
    assert [(c.name, c.seed) for c in configs] == [
        ("bs16_lr0.1_seed3", 3),
        ("bs64_lr0.1_seed3", 3),
        ("staged_lr0.1_seed3", 3),
        ("bs16_lr0.1_seed4", 4),
        ("bs64_lr0.1_seed4", 4),
        ("staged_lr0.1_seed4", 4),
    ]
    # Seed 0 keeps the name a single-seed study gave it, so it is resumed.
    assert [c.name for c in study.grid([16], [0.1], [], seeds=2)] == [
        "bs16_lr0.1",
        "bs16_lr0.1_seed1",
    ]
    for name, seed in (("bs16_lr0.1_seed12", 12), ("staged_lr0.2", 0)):
        config = study.RunConfig(seed=seed)
        assert study.split_run_name(name)[1] == seed
        assert study.split_run_name(config.name) == ("bs32_lr0.1", seed)
    for seeds in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"`seeds` must be an integer >= 1"):
            study.grid([16], [0.1], [], seeds=seeds)


def test_grid_errors():
    with pytest.raises(ValueError, match="repeats runs"):
        study.grid([16, 16], [0.1], [])
    with pytest.raises(ValueError, match="dynamic schedules only"):
        study.grid([16], [0.1], ["fixed"])
    with pytest.raises(ValueError, match="at least one run"):
        study.run_study([], "unused")


def test_depth_defaults_and_checks_per_model():
    assert study.RunConfig(model="resnet").depth == 8
    assert study.RunConfig(model="densenet").depth == 10
    assert study.RunConfig(model="densenet", depth=40).depth == 40
    with pytest.raises(ValueError, match=r"6n\+4 and >= 10 for model='densenet'"):
        study.RunConfig(model="densenet", depth=8)


def test_zero_threshold_reaches_the_callback_and_the_hparams(tmp_path):
    """A run with a relative threshold logs it at every measurement, and its
    hparams record it (the default is named by its rule)."""
    config = study.RunConfig(
        batch_size=256, epochs=1, every_n_steps=2, zero_threshold=1e-3
    )
    assert config.hparams()["zero_threshold"] == 1e-3
    assert study.RunConfig().hparams()["zero_threshold"] == "precision"
    assert study.RunConfig().hparams()["precision"] == "float32"
    study.train(config, tmp_path)
    (run,) = find_runs(tmp_path)
    _, thresholds = run.series("fisher/zero_threshold")
    assert len(thresholds) and np.allclose(thresholds, 1e-3)
    assert run.hparams["zero_threshold"] == pytest.approx(1e-3)
    assert 0 <= run.rank_deficient_share() <= 1


def test_two_workers_train_every_run_in_processes_of_their_own(tmp_path):
    configs = study.grid([512], [0.1, 0.2], [], epochs=1, every_n_steps=2)
    started, ended = [], []
    results = study.run_study(
        configs,
        tmp_path,
        workers=2,
        on_run_start=lambda config, index: started.append(index),
        on_run_end=lambda config, result, skipped: ended.append(config.name),
    )
    assert list(results) == ["bs512_lr0.1", "bs512_lr0.2"]
    assert sorted(started) == [0, 1] and sorted(ended) == list(results)
    for name, result in results.items():
        assert study.finished_result(tmp_path / name) == result
        assert result["measurements"] >= 1
    with pytest.raises(ValueError, match="`workers` must be an integer >= 1"):
        study.run_study(configs, tmp_path, workers=0)
