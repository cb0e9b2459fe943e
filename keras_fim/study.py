"""The paper's characterisation study: one training run, and grids of them.

A *run* trains one configuration (model, data, batch size or dynamic
schedule, learning rate) with `FisherCallback` and `keras.callbacks.TensorBoard`
writing into its own folder, records its hyper-parameters for TensorBoard's
HParams dashboard and ends with the test error. A *study* is a grid of runs
under one root folder (batch sizes x learning rates, plus dynamic schedules),
resumable: a finished run has a ``result.json`` and is skipped; an unfinished
one (interrupted by Ctrl-C or a crash) is removed and trained again.

Every run's folder is a TensorBoard log dir::

    <root>/<run>/train/        fisher/*, sampling/* and Keras's batch/epoch charts
    <root>/<run>/validation/   Keras's epoch charts on the test split
    <root>/<run>/              hparams and study/test_error, study/test_loss
    <root>/<run>/result.json   the configuration and final numbers (written last)

`keras_fim.reports.write_report(root)` turns a study into an HTML report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from keras_fim import datasets, models, summaries
from keras_fim._keras_compat import flatten_layers
from keras_fim.callback import FisherCallback
from keras_fim.sampling import DynamicSampling
from keras_fim.schedules import Staged
from keras_fim.validation import check_choice, check_int, check_real

MODELS = ("resnet", "densenet")
SCHEDULES = ("fixed", "staged")
LEARNING_RATE_DECAYS = ("step", "none")
#: The paper's dynamic schedule: five equal stages, 16 -> 256.
PAPER_STAGES = (16, 32, 64, 128, 256)
#: The paper's map: batch sizes x learning rates, trained with one schedule.
PAPER_BATCH_SIZES = (8, 16, 32, 64, 128, 256)
PAPER_LEARNING_RATES = (0.025, 0.05, 0.1, 0.2, 0.4)
#: Full-scale configurations (`RunConfig` fields) of the paper's experiments;
#: "digits" is the small analogue that runs offline in minutes.
PRESETS = {
    "digits": {},
    "paper-cifar10": dict(
        dataset="cifar10", model="resnet", depth=110, epochs=320, every_n_steps=50
    ),
    "paper-cifar100": dict(
        dataset="cifar100", model="resnet", depth=110, epochs=320, every_n_steps=50
    ),
}
SMALLEST_DEPTH = {"resnet": 8, "densenet": 10}
RESULT_FILE = "result.json"
SEED_SUFFIX = "_seed"


def split_run_name(name: str) -> tuple[str, int]:
    """A run's name split into its configuration and seed (`RunConfig.name`'s
    ``_seed<n>`` suffix; 0 without one).

    Args:
        name: String, a run's name (a folder name, or a path ending in one).

    Returns:
        ``(configuration, seed)``.

    Example:

    >>> split_run_name("bs16_lr0.1_seed3"), split_run_name("bs16_lr0.1")
    (('bs16_lr0.1', 3), ('bs16_lr0.1', 0))
    """
    match = re.fullmatch(rf"(.*){SEED_SUFFIX}(\d+)", name)
    return (match.group(1), int(match.group(2))) if match else (name, 0)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training configuration of a study.

    Args:
        model: ``"resnet"`` (the CIFAR ResNet, depth ``6n+2``) or
            ``"densenet"`` (DenseNet-BC, depth ``6n+4``).
        depth: the network's depth; `None` picks the smallest, 8 for the
            ResNet and 10 for DenseNet-BC.
        dataset: a `keras_fim.datasets.load` name. Defaults to ``"digits"``.
        schedule: ``"fixed"`` (every batch of `batch_size`) or ``"staged"``
            (the paper's 16 -> 32 -> 64 -> 128 -> 256 in five equal stages,
            sizes above the training set left out). Defaults to ``"fixed"``.
        batch_size: the batch size of a ``"fixed"`` run. Defaults to `32`.
        learning_rate: SGD's (Nesterov, momentum 0.9) initial rate.
        learning_rate_decay: ``"step"`` (x0.1 after 50% and 75% of the
            epochs, the paper's) or ``"none"``.
        weight_decay: the weight decay the optimizer adds to the gradient,
            as the paper's Torch SGD does (`keras_fim.models.CoupledSGD`; not
            part of any per-example gradient). Defaults to `1e-4`, the
            paper's.
        epochs: the number of epochs.
        every_n_steps: measure every n-th step.
        zero_threshold: Float in [0, 1) or `None`, `FisherCallback`'s
            `zero_threshold`: eigenvalues at most this times the largest
            count as zero; `None` derives it from the precision the
            contributions carry. Defaults to `None`.
        seed: seeds the weights, the data split and the data order; a
            seed other than 0 is part of the run's `name`.
        data_dir: where tensorflow-datasets keeps its data, or `None`.

    Example:

    >>> RunConfig(batch_size=64, learning_rate=0.1).name
    'bs64_lr0.1'
    >>> RunConfig(schedule="staged", learning_rate=0.1, seed=2).name
    'staged_lr0.1_seed2'
    """

    model: str = "resnet"
    depth: int | None = None
    dataset: str = "digits"
    schedule: str = "fixed"
    batch_size: int = 32
    learning_rate: float = 0.1
    learning_rate_decay: str = "step"
    weight_decay: float = 1e-4
    epochs: int = 12
    every_n_steps: int = 4
    zero_threshold: float | None = None
    seed: int = 0
    data_dir: str | None = None

    def __post_init__(self):
        check_choice("model", self.model, MODELS)
        if self.depth is None:  # a frozen dataclass: set the resolved default once
            object.__setattr__(self, "depth", SMALLEST_DEPTH[self.model])
        remainder = 2 if self.model == "resnet" else 4
        if (
            isinstance(self.depth, bool)
            or not isinstance(self.depth, int)
            or self.depth < SMALLEST_DEPTH[self.model]
            or (self.depth - remainder) % 6
        ):
            raise ValueError(
                f"`depth` must be 6n+{remainder} and >= {SMALLEST_DEPTH[self.model]} for "
                f"model={self.model!r}. Received: depth={self.depth!r}"
            )
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice(
            "learning_rate_decay", self.learning_rate_decay, LEARNING_RATE_DECAYS
        )
        for name in ("batch_size", "epochs", "every_n_steps"):
            check_int(name, getattr(self, name), 1)
        check_real("learning_rate", self.learning_rate, 0, include_low=False)
        check_real("weight_decay", self.weight_decay, 0)
        check_real(
            "zero_threshold",
            self.zero_threshold,
            0,
            1,
            include_high=False,
            allow_none=True,
        )

    @property
    def name(self) -> str:
        """The run's folder name: its batch setting and learning rate, then
        ``_seed<n>`` unless the seed is 0 (so a study's folders from before
        seeds were repeated keep their names and are resumed)."""
        size = f"bs{self.batch_size}" if self.schedule == "fixed" else self.schedule
        name = f"{size}_lr{self.learning_rate:g}"
        return f"{name}{SEED_SUFFIX}{self.seed}" if self.seed else name

    def hparams(self) -> dict:
        """The hyper-parameters recorded for TensorBoard's HParams dashboard."""
        return {
            "schedule": self.schedule,
            "batch_size": self.batch_size
            if self.schedule == "fixed"
            else PAPER_STAGES[0],
            "learning_rate": float(self.learning_rate),
            "learning_rate_decay": self.learning_rate_decay,
            "weight_decay": float(self.weight_decay),
            "model": f"{self.model}-{self.depth}",
            "dataset": self.dataset,
            "epochs": self.epochs,
            "seed": self.seed,
            # HParams takes no None: the default threshold is named by its rule.
            "zero_threshold": "precision"
            if self.zero_threshold is None
            else float(self.zero_threshold),
            # The study's networks compute in the global dtype policy's dtype.
            "precision": keras.config.dtype_policy().compute_dtype,
        }


def grid(
    batch_sizes: Iterable[int] = PAPER_BATCH_SIZES,
    learning_rates: Iterable[float] = PAPER_LEARNING_RATES,
    schedules: Iterable[str] = ("staged",),
    schedule_learning_rates: Iterable[float] | None = (0.1,),
    seeds: int = 1,
    **config: Any,
) -> list[RunConfig]:
    """The study's runs: batch sizes x learning rates, then each dynamic
    schedule x its learning rates, each configuration with `seeds` seeds.

    Args:
        batch_sizes: Integers, the fixed batch sizes. Defaults to the
            paper's `PAPER_BATCH_SIZES`, 8 to 256.
        learning_rates: Floats, the initial learning rates. Defaults to the
            paper's `PAPER_LEARNING_RATES`, 0.025 to 0.4.
        schedules: Strings, the dynamic schedules (``"staged"``). Defaults
            to `("staged",)`.
        schedule_learning_rates: Floats or `None`, the rates the dynamic
            schedules run at; `None` for all of `learning_rates`. Defaults
            to `(0.1,)`, the paper's.
        seeds: Integer >= 1, how many times each configuration runs: with
            seeds ``seed``, ``seed + 1``, ... (``seed`` from `config`, 0 by
            default), every configuration of one seed before the next seed's.
            Defaults to `1`.
        **config: further `RunConfig` fields shared by all runs.

    Example:

    >>> [c.name for c in grid([16, 64], [0.1, 0.2], ["staged"], [0.1])]
    ['bs16_lr0.1', 'bs16_lr0.2', 'bs64_lr0.1', 'bs64_lr0.2', 'staged_lr0.1']
    >>> [c.name for c in grid([16], [0.1], [], seeds=3)]
    ['bs16_lr0.1', 'bs16_lr0.1_seed1', 'bs16_lr0.1_seed2']
    """
    seeds = check_int("seeds", seeds, 1)
    first_seed = config.pop("seed", 0)
    learning_rates = list(learning_rates)
    if schedule_learning_rates is None:
        schedule_learning_rates = learning_rates
    fields = [
        dict(batch_size=b, learning_rate=lr)
        for b in batch_sizes
        for lr in learning_rates
    ]
    for schedule in schedules:
        if schedule == "fixed":
            raise ValueError(
                "`schedules` lists dynamic schedules only ('staged'). Received: 'fixed'"
            )
        fields += [
            dict(schedule=schedule, learning_rate=lr) for lr in schedule_learning_rates
        ]
    configs = [
        RunConfig(**run, **config, seed=seed)
        for seed in range(first_seed, first_seed + seeds)
        for run in fields
    ]
    names = [c.name for c in configs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"The grid repeats runs: {duplicates}. Received: {names}")
    return configs


def forward_multiply_adds(model: keras.Model) -> int:
    """Multiply-adds of one example's forward pass through the layers with a
    kernel (dense layers and convolutions; the rest is negligible beside
    them): at each output position, every kernel entry once.

    Args:
        model: A built functional `keras.Model`.

    Returns:
        The count, an integer.

    Example:

    >>> inputs = keras.Input((6, 6, 2))
    >>> h = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    >>> outputs = keras.layers.Dense(3)(keras.layers.Flatten()(h))
    >>> forward_multiply_adds(keras.Model(inputs, outputs))  # 36*(3*3*2*4) + 144*3
    3024
    """
    total = 0
    for layer in flatten_layers(model, include_self=False, recursive=True):
        kernel = getattr(layer, "kernel", None)
        if kernel is not None:
            positions = math.prod(layer.output.shape[1:-1])
            total += positions * math.prod(kernel.shape)
    return total


def training_cost(config: RunConfig, num_train: int, multiply_adds: int) -> dict:
    """What training `config` takes, estimated without training.

    Args:
        config: The run's `RunConfig`.
        num_train: Integer, the training examples per epoch.
        multiply_adds: Integer, one example's forward multiply-adds
            (`forward_multiply_adds`).

    Returns:
        ``steps`` (training steps; a staged run's five equal stages at their
        sizes), ``measured`` (steps `FisherCallback` measures) and
        ``multiply_adds`` (of training: forward and backward, counted as three
        forward passes per example, the usual rule).
    """
    if config.schedule == "fixed":
        steps = config.epochs * math.ceil(num_train / config.batch_size)
    else:
        sizes = [b for b in PAPER_STAGES if b <= num_train] or [num_train]
        steps = sum(
            math.ceil(config.epochs / len(sizes) * num_train / b) for b in sizes
        )
    return {
        "steps": steps,
        "measured": math.ceil(steps / config.every_n_steps),
        "multiply_adds": 3 * multiply_adds * num_train * config.epochs,
    }


def plan(configs: Sequence[RunConfig]) -> list[dict]:
    """Every run's configuration and estimated cost, without data or
    training (``keras-fim study --dry-run``).

    Args:
        configs: Sequence of `RunConfig`s.

    Returns:
        One dict per run: ``run`` (its name), ``model`` (e.g.
        ``"resnet-110"``), ``dataset``, ``batch`` (the batch size, or the
        schedule's sizes), ``learning_rate``, ``epochs``, and
        `training_cost`'s ``steps``, ``measured`` and ``multiply_adds``.

    Example:

    >>> rows = plan(grid([8, 256], [0.1], [], dataset="cifar10", depth=20))
    >>> [(row["run"], row["steps"]) for row in rows]
    [('bs8_lr0.1', 75000), ('bs256_lr0.1', 2352)]
    """
    rows, counted = [], {}
    for config in configs:
        if config.dataset in datasets.SPLIT_SHAPES:
            num_train, shape, classes = datasets.SPLIT_SHAPES[config.dataset]
        else:
            data = datasets.load(config.dataset, seed=config.seed)
            num_train, shape, classes = (
                data.num_train,
                data.input_shape,
                data.num_classes,
            )
        key = (config.model, config.depth, tuple(shape), classes)
        if key not in counted:
            counted[key] = forward_multiply_adds(build_model(config, shape, classes))
        sizes = "16-256 staged" if config.schedule == "staged" else config.batch_size
        rows.append(
            {
                "run": config.name,
                "model": f"{config.model}-{config.depth}",
                "dataset": config.dataset,
                "batch": sizes,
                "learning_rate": config.learning_rate,
                "epochs": config.epochs,
                **training_cost(config, num_train, counted[key]),
            }
        )
    return rows


def build_model(
    config: RunConfig, input_shape: tuple[int | None, ...], num_classes: int
) -> keras.Model:
    """The network of `config`, compiled as the paper trains it.

    Args:
        config: `RunConfig`; its `model` and `depth` choose the network
            (`keras_fim.models.cifar_resnet` or `keras_fim.models.densenet_bc`)
            and its `learning_rate` and `weight_decay` the optimizer
            (`keras_fim.models.compile_like_the_paper`; a weight decay of 0
            means none).
        input_shape: Tuple, the image shape (channels last), e.g. a
            `DataSplits.input_shape`.
        num_classes: Integer, the number of classes.

    Returns:
        A compiled `keras.Model`.
    """
    if config.model == "resnet":
        model = models.cifar_resnet(input_shape, num_classes, depth=config.depth)
    else:
        model = models.densenet_bc(input_shape, num_classes, depth=config.depth)
    return models.compile_like_the_paper(
        model, config.learning_rate, weight_decay=config.weight_decay or None
    )


class _EpochRecorder(keras.callbacks.Callback):
    """Writes ``study/iterations`` (steps done) at every epoch end, so that
    reports can put per-step charts on an epoch axis, and reports progress."""

    def __init__(self, writer, on_epoch: Callable[[int], None] | None):
        super().__init__()
        self._writer = writer
        self._on_epoch = on_epoch

    def on_epoch_end(self, epoch, logs=None):
        with self._writer.as_default():
            tf.summary.scalar(
                summaries.ITERATIONS,
                int(self.model.optimizer.iterations),
                step=epoch + 1,
            )
        self._writer.flush()
        if self._on_epoch is not None:
            self._on_epoch(epoch + 1)


def train(
    config: RunConfig,
    log_dir: str | os.PathLike,
    *,
    verbose: int | str = 0,
    on_epoch: Callable[[int], None] | None = None,
    data: datasets.DataSplits | None = None,
) -> dict:
    """Trains one run of the study and returns its result.

    Writes the TensorBoard events described in the module docstring into
    `log_dir`, then ``result.json`` (the configuration and the final
    numbers), which marks the run finished.

    Args:
        config: the run's `RunConfig`.
        log_dir: the run's folder.
        verbose: `fit`'s verbosity.
        on_epoch: called with the number of finished epochs (progress bars).
        data: the loaded data set, to share one load between runs.

    Returns:
        The result: ``config``, ``test_error``, ``test_loss``, ``C_K_bar``,
        ``L_K``, ``iterations``, ``measurements``, ``seconds``.
    """
    log_dir = Path(log_dir)
    data = data or datasets.load(
        config.dataset, data_dir=config.data_dir, seed=config.seed
    )
    keras.utils.set_random_seed(config.seed)
    model = build_model(config, data.input_shape, data.num_classes)
    run_writer = tf.summary.create_file_writer(str(log_dir))
    with run_writer.as_default():
        from tensorboard.plugins.hparams import api as hp

        hp.hparams(config.hparams(), trial_id=config.name)
    callbacks = [
        FisherCallback(
            log_dir=str(log_dir),
            every_n_steps=config.every_n_steps,
            zero_threshold=config.zero_threshold,
        ),
        keras.callbacks.TensorBoard(str(log_dir)),
        _EpochRecorder(run_writer, on_epoch),
    ]
    if config.learning_rate_decay == "step":
        callbacks.append(keras.callbacks.LearningRateScheduler(_step_decay(config)))
    fit_kwargs = dict(epochs=config.epochs, verbose=verbose, shuffle=False)
    if config.schedule == "fixed":
        train_data = data.train_batches(config.batch_size, seed=config.seed)
    else:
        sizes = [s for s in PAPER_STAGES if s <= data.num_train] or [data.num_train]
        sampling = DynamicSampling(
            data.train,
            Staged(sizes),
            seed=config.seed,
            batched=False,
            preprocess=data.augment,
            log_dir=str(log_dir),
        )
        train_data = sampling.dataset
        callbacks.append(sampling)
    test_data = data.test_batches(256)
    start = time.perf_counter()
    model.fit(train_data, validation_data=test_data, callbacks=callbacks, **fit_kwargs)
    seconds = time.perf_counter() - start
    test_loss, test_accuracy = model.evaluate(test_data, verbose=0)
    state = model.fisher_state
    result = {
        "config": dataclasses.asdict(config),
        "test_error": 1.0 - float(test_accuracy),
        "test_loss": float(test_loss),
        "C_K_bar": float(state.condition_mean),
        "L_K": float(state.energy_sum),
        "iterations": int(model.optimizer.iterations),
        "measurements": int(state.measurements),
        "seconds": seconds,
    }
    with run_writer.as_default():
        tf.summary.scalar(
            summaries.TEST_ERROR, result["test_error"], step=config.epochs
        )
        tf.summary.scalar(summaries.TEST_LOSS, result["test_loss"], step=config.epochs)
    run_writer.close()
    _write_json_atomically(log_dir / RESULT_FILE, result)
    return result


def _step_decay(config: RunConfig) -> Callable[[int], float]:
    """x0.1 once half and again once three quarters of the epochs are done
    (the paper's 161st and 241st of 320)."""

    def rate(epoch: int, _current=None) -> float:
        done = epoch / config.epochs
        return config.learning_rate * 0.1 ** ((done >= 0.5) + (done >= 0.75))

    return rate


def _write_json_atomically(path: Path, value) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(value, indent=2))
    os.replace(partial, path)


def finished_result(run_dir: str | os.PathLike) -> dict | None:
    """The result of a finished run in `run_dir`, or `None`.

    Args:
        run_dir: Path of a run's folder; the run is finished when it holds a
            ``result.json``.

    Returns:
        The parsed ``result.json`` (the configuration and final numbers), or
        `None` when the file does not exist.
    """
    path = Path(run_dir) / RESULT_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def write_hparams_config(root: str | os.PathLike, configs: Sequence[RunConfig]) -> None:
    """Declares the study's hyper-parameters and metrics for HParams.

    Args:
        root: Path of the study's folder; the declaration is written there
            as a TensorBoard event file.
        configs: Non-empty sequence of `RunConfig`s, the study's runs; each
            hyper-parameter's values are those they take (`RunConfig.hparams`).
    """
    from tensorboard.plugins.hparams import api as hp

    names = configs[0].hparams().keys()
    hparams = [
        hp.HParam(name, hp.Discrete(sorted({c.hparams()[name] for c in configs})))
        for name in names
    ]
    metrics = [
        hp.Metric(summaries.TEST_ERROR, display_name="test error"),
        hp.Metric(summaries.C_K_BAR, group="train", display_name="C_K bar"),
        hp.Metric(summaries.L_K, group="train", display_name="L_K"),
        hp.Metric("epoch_accuracy", group="validation", display_name="test accuracy"),
    ]
    with tf.summary.create_file_writer(str(root)).as_default():
        hp.hparams_config(hparams=hparams, metrics=metrics)


def _start_worker(threads: int) -> None:
    """A study worker process: TensorFlow's op threads split between the
    workers, so that they do not oversubscribe the cores."""
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def _train_in_worker(config: RunConfig, run_dir: str) -> dict:
    return train(config, run_dir)


def run_study(
    configs: Sequence[RunConfig],
    root: str | os.PathLike,
    *,
    workers: int = 1,
    on_run_start: Callable[[RunConfig, int], None] | None = None,
    on_epoch: Callable[[RunConfig, int], None] | None = None,
    on_run_end: Callable[[RunConfig, dict, bool], None] | None = None,
) -> dict[str, dict]:
    """Trains every configuration not yet finished under `root`.

    A run whose folder holds a ``result.json`` is skipped (its result is
    reused); a folder without one is left from an interrupted run and is
    removed before the run trains again. An interrupted study (Ctrl-C)
    therefore keeps its finished runs, and running it again completes it.

    Args:
        configs: Sequence of `RunConfig`s, the runs, e.g. from `grid`.
        root: Path of the study's folder (one subfolder per run).
        workers: Integer >= 1, how many runs train at once, each in a
            process of its own with its share of the CPU cores (small
            networks leave cores idle: two workers on two cores train the
            digits study about 1.5x faster). Runs are seeded alike whatever
            the number; with several, the thread count per run differs, so
            results agree up to float round-off. Defaults to `1`.
        on_run_start: Callable or `None`, called as ``(config, index)``
            before a run trains (with several workers: when it is started).
        on_epoch: Callable or `None`, called as ``(config, epochs_done)``
            after every epoch (with one worker only).
        on_run_end: Callable or `None`, called as ``(config, result,
            skipped)`` after a run.

    Returns:
        ``{run name: result}`` for every configuration.
    """
    if not configs:
        raise ValueError("`configs` must list at least one run. Received: []")
    workers = check_int("workers", workers, 1)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_hparams_config(root, configs)
    results, pending = {}, []
    for index, config in enumerate(configs):
        run_dir = root / config.name
        result = finished_result(run_dir)
        if result is not None:
            if result["config"] != dataclasses.asdict(config):
                raise ValueError(
                    f"{run_dir} holds a finished run of another configuration "
                    f"({result['config']}); it is kept. Use another folder for this "
                    f"study, or remove that run. Received: {dataclasses.asdict(config)}"
                )
            results[config.name] = result
            if on_run_end is not None:
                on_run_end(config, result, True)
            continue
        if run_dir.exists():
            shutil.rmtree(run_dir)
        pending.append((index, config))
    if workers == 1 or len(pending) < 2:
        _train_here(pending, root, results, on_run_start, on_epoch, on_run_end)
    else:
        _train_in_workers(pending, root, results, workers, on_run_start, on_run_end)
    return {config.name: results[config.name] for config in configs}


def _train_here(pending, root, results, on_run_start, on_epoch, on_run_end) -> None:
    loaded: dict[tuple, datasets.DataSplits] = {}
    for index, config in pending:
        if on_run_start is not None:
            on_run_start(config, index)
        key = (config.dataset, config.data_dir, config.seed)
        if key not in loaded:
            loaded[key] = datasets.load(
                config.dataset, data_dir=config.data_dir, seed=config.seed
            )
        result = train(
            config,
            root / config.name,
            data=loaded[key],
            on_epoch=None if on_epoch is None else lambda e, c=config: on_epoch(c, e),
        )
        results[config.name] = result
        if on_run_end is not None:
            on_run_end(config, result, False)


def _train_in_workers(pending, root, results, workers, on_run_start, on_run_end):
    import concurrent.futures
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn: a fork of a process whose TensorFlow runtime has started can hang.
    with concurrent.futures.ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(threads,),
    ) as pool:
        running = {}
        try:
            for index, config in pending:
                if on_run_start is not None:
                    on_run_start(config, index)
                future = pool.submit(_train_in_worker, config, str(root / config.name))
                running[future] = config
            for future in concurrent.futures.as_completed(running):
                config = running[future]
                results[config.name] = future.result()
                if on_run_end is not None:
                    on_run_end(config, results[config.name], False)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
