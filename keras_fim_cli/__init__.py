"""The ``keras-fim`` command: ``train`` one run, ``study`` a grid, ``report``.

keras-fim study                      # the default study on the bundled digits
keras-fim train --batch-size 64 --learning-rate 0.1 --log-dir logs/one
keras-fim report logs/study          # HTML report of any folder of runs

A package of its own, outside `keras_fim`: importing `keras_fim` starts
TensorFlow (it must, so that `keras.saving.load_model` finds its classes),
which takes seconds and prints start-up lines. Here the arguments are parsed
first, and `keras_fim` is imported only inside the commands, by
`_import_keras_fim`. The choices and defaults the options show are written
out below; tests/test_cli.py checks they are `keras_fim.study`'s.
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile

import click

MODELS = ("resnet", "densenet")
DATASETS = ("digits", "cifar10", "cifar100", "svhn_cropped", "mnist")
SCHEDULES = ("fixed", "staged")
LEARNING_RATE_DECAYS = ("step", "none")
PRESETS = ("digits", "paper-cifar10", "paper-cifar100")
BATCH_SIZES = "8,16,32,64,128,256"
LEARNING_RATES = "0.025,0.05,0.1,0.2,0.4"
#: `keras_fim.study.RunConfig`'s defaults.
RUN_DEFAULTS = dict(
    model="resnet",
    dataset="digits",
    schedule="fixed",
    batch_size=32,
    learning_rate=0.1,
    learning_rate_decay="step",
    weight_decay=1e-4,
    epochs=12,
    every_n_steps=4,
    seed=0,
)


def _import_keras_fim() -> None:
    """Imports `keras_fim` (and so TensorFlow) with TensorFlow's start-up
    lines kept off the terminal, unless the user set ``TF_CPP_MIN_LOG_LEVEL``.

    Those lines (absl's notice, oneDNN, the CUDA probe and, without a GPU,
    cuInit's error) are written to the process's stderr before TensorFlow
    reads ``TF_CPP_MIN_LOG_LEVEL``, so the level alone does not hide them:
    stderr is sent to a file while TensorFlow starts and finds its devices,
    and shown only if that fails. The level is set to 2 for the rest of the
    run (warnings and errors still show).
    """
    if "keras_fim" in sys.modules or "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        return  # already started, or the user chose what TensorFlow shows
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            import keras_fim  # noqa: F401

            tf.config.list_physical_devices()  # the CUDA probe, now
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


class _NumberList(click.ParamType):
    """A comma-separated list of positive numbers, e.g. ``16,64,256``."""

    name = "list"

    def __init__(self, kind):
        self.kind = kind

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        try:
            items = [self.kind(item) for item in str(value).split(",") if item.strip()]
        except ValueError:
            self.fail(
                f"{value!r} is not a comma-separated list of {self.kind.__name__}s",
                param,
                ctx,
            )
        if any(item <= 0 for item in items):
            self.fail(f"{value!r} holds a value <= 0; all must be > 0", param, ctx)
        return items


def _run_options(function):
    """The options every run takes (`RunConfig`'s fields)."""
    options = [
        click.option(
            "--model",
            type=click.Choice(MODELS),
            default=RUN_DEFAULTS["model"],
            show_default=True,
            help="ResNet (depth 6n+2) or DenseNet-BC (depth 6n+4).",
        ),
        click.option(
            "--depth",
            type=click.IntRange(min=1),
            default=None,
            show_default=True,
            help="The network's depth: ResNet 6n+2 (20, 56, 110), DenseNet-BC 6n+4 (40, 100) "
            "[default: the smallest, 8 or 10].",
        ),
        click.option(
            "--dataset",
            type=click.Choice(DATASETS),
            default=RUN_DEFAULTS["dataset"],
            show_default=True,
            help="digits is bundled (offline); the others come from tensorflow-datasets.",
        ),
        click.option(
            "--data-dir",
            type=click.Path(file_okay=False),
            default=None,
            help="tensorflow-datasets' data folder.",
        ),
        click.option(
            "--learning-rate-decay",
            type=click.Choice(LEARNING_RATE_DECAYS),
            default=RUN_DEFAULTS["learning_rate_decay"],
            show_default=True,
            help="step: x0.1 after 50% and 75% of the epochs.",
        ),
        click.option(
            "--weight-decay",
            type=click.FloatRange(min=0),
            default=RUN_DEFAULTS["weight_decay"],
            show_default=True,
            help="Added to the gradient (g + wd*theta), as the paper's SGD does.",
        ),
        click.option(
            "--epochs",
            type=click.IntRange(min=1),
            default=RUN_DEFAULTS["epochs"],
            show_default=True,
        ),
        click.option(
            "--every-n-steps",
            type=click.IntRange(min=1),
            default=RUN_DEFAULTS["every_n_steps"],
            show_default=True,
            help="Measure the Fisher spectrum every n-th step.",
        ),
        click.option(
            "--zero-threshold",
            type=click.FloatRange(0, 1, max_open=True),
            default=None,
            help="Eigenvalues at most this x the largest count as zero "
            "[default: from the precision: (4u)^2 trace(G)].",
        ),
        click.option(
            "--seed", type=int, default=RUN_DEFAULTS["seed"], show_default=True
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _run_fields(kwargs) -> dict:
    import dataclasses

    from keras_fim.study import RunConfig

    fields = {f.name for f in dataclasses.fields(RunConfig)}
    return {k: v for k, v in kwargs.items() if k in fields}


def _usage_error(error: ValueError) -> click.BadParameter:
    """A usage error (exit 2) naming the flag of the argument `error` names
    (its message starts with the argument in backquotes)."""
    match = re.match(r"`(\w+)`", str(error))
    hint = f"--{match.group(1).replace('_', '-')}" if match else None
    return click.BadParameter(str(error), param_hint=hint)


def _config(**fields):
    from keras_fim.study import RunConfig

    try:
        return RunConfig(**fields)
    except ValueError as error:
        raise _usage_error(error) from error


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(package_name="keras-fim")
def main():
    """Measure the Fisher information of training batches while Keras trains,
    and characterise batch sizes and learning rates (Liao et al., TPAMI 2020)."""


@main.command()
@_run_options
@click.option(
    "--schedule",
    type=click.Choice(SCHEDULES),
    default=RUN_DEFAULTS["schedule"],
    show_default=True,
    help="fixed: --batch-size throughout; staged: 16 -> 256.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=RUN_DEFAULTS["batch_size"],
    show_default=True,
)
@click.option(
    "--learning-rate",
    type=click.FloatRange(min=0, min_open=True),
    default=RUN_DEFAULTS["learning_rate"],
    show_default=True,
)
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False),
    default="logs/train",
    show_default=True,
    help="The run's TensorBoard folder.",
)
def train(log_dir, **kwargs):
    """Train one configuration with FisherCallback and TensorBoard logging."""
    _import_keras_fim()
    from keras_fim import study as study_lib
    from keras_fim.datasets import DatasetUnavailableError

    config = _config(**_run_fields(kwargs))
    try:
        result = study_lib.train(config, log_dir, verbose="auto")
    except DatasetUnavailableError as error:
        raise click.ClickException(str(error)) from error
    click.echo(
        f"{config.name}: test error {result['test_error']:.2%}, C_K_bar {result['C_K_bar']:.4g}, "
        f"L_K {result['L_K']:.4g} ({result['measurements']} of {result['iterations']} steps "
        f"measured, {result['seconds']:.0f} s)"
    )
    click.echo(f"TensorBoard: tensorboard --logdir {log_dir}")


@main.command()
@_run_options
@click.option(
    "--preset",
    type=click.Choice(PRESETS),
    default="digits",
    show_default=True,
    help="digits: the small analogue, offline; paper-cifar10/100: the paper's runs "
    "(ResNet-110, 320 epochs, measured every 50 steps). Options given override it.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print every run's configuration and estimated cost; train nothing.",
)
@click.option(
    "--batch-sizes",
    type=_NumberList(int),
    default=BATCH_SIZES,
    show_default=True,
    help="Fixed batch sizes of the grid.",
)
@click.option(
    "--learning-rates",
    type=_NumberList(float),
    default=LEARNING_RATES,
    show_default=True,
    help="Learning rates of the grid.",
)
@click.option(
    "--schedules",
    default="staged",
    show_default=True,
    help="Dynamic schedules ('' for none).",
)
@click.option(
    "--schedule-learning-rates",
    type=_NumberList(float),
    default="0.1",
    show_default=True,
    help="Learning rates of the dynamic schedules ('' for all of --learning-rates).",
)
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Runs of each configuration, seeded --seed, --seed + 1, ...",
)
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False),
    default="logs/study",
    show_default=True,
    help="The study's folder: one TensorBoard run per configuration.",
)
@click.option(
    "--early-fraction",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.1,
    show_default=True,
    help="The report's early point, a fraction of training.",
)
@click.option(
    "--report/--no-report",
    default=True,
    show_default=True,
    help="Write the HTML report when the study is done.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Runs trained at once, each in its own process with its share of the cores.",
)
@click.pass_context
def study(
    ctx,
    preset,
    dry_run,
    workers,
    batch_sizes,
    learning_rates,
    schedules,
    schedule_learning_rates,
    seeds,
    log_dir,
    early_fraction,
    report,
    **kwargs,
):
    """Train a grid of batch sizes x learning rates (and dynamic schedules).

    Finished runs are skipped, so an interrupted study resumes where it
    stopped. Ends with the ranking table and the report's path.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    _import_keras_fim()
    from keras_fim import study as study_lib
    from keras_fim.datasets import DatasetUnavailableError

    fields = _run_fields(kwargs)
    for name, value in study_lib.PRESETS[preset].items():
        if ctx.get_parameter_source(name) is click.core.ParameterSource.DEFAULT:
            fields[name] = value  # the preset's, unless the option was given
    try:
        configs = study_lib.grid(
            batch_sizes,
            learning_rates,
            [s.strip() for s in schedules.split(",") if s.strip()],
            schedule_learning_rates or None,
            seeds,
            **fields,
        )
    except ValueError as error:
        raise _usage_error(error) from error
    console = _console()
    if dry_run:
        _print_plan(configs, console)
        return
    columns = [
        "{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console) as progress:
        runs = progress.add_task("runs", total=len(configs))
        epochs = progress.add_task("", total=configs[0].epochs, visible=False)

        def start(config, index):
            if workers == 1:  # several runs at once: no one run's epochs to show
                progress.reset(
                    epochs, description=f"{config.name} epochs", visible=True
                )

        def end(config, result, skipped):
            note = (
                "finished earlier, skipped" if skipped else f"{result['seconds']:.0f} s"
            )
            progress.console.print(
                f"{config.name}: test error {result['test_error']:.2%} ({note})"
            )
            progress.advance(runs)

        try:
            study_lib.run_study(
                configs,
                log_dir,
                workers=workers,
                on_run_start=start,
                on_run_end=end,
                on_epoch=lambda config, done: progress.update(epochs, completed=done),
            )
        except KeyboardInterrupt:
            progress.stop()
            console.print(
                f"Interrupted. Finished runs are kept in {log_dir}; run the same command "
                "to train the rest."
            )
            sys.exit(130)
        except (ValueError, DatasetUnavailableError) as error:
            raise click.ClickException(str(error)) from error
    if report:
        _report(log_dir, None, early_fraction, "png", console)


@main.command()
@click.argument("log_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--output",
    type=click.Path(file_okay=False),
    default=None,
    help="Report folder [default: LOG_DIR/report].",
)
@click.option(
    "--early-fraction",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.1,
    show_default=True,
    help="The early point of the ranking, a fraction of training.",
)
@click.option(
    "--format",
    "image_format",
    type=click.Choice(["png", "svg"]),
    default="png",
    show_default=True,
    help="The figures' format.",
)
def report(log_dir, output, early_fraction, image_format):
    """Write an HTML report of every keras-fim run under LOG_DIR."""
    _import_keras_fim()
    _report(log_dir, output, early_fraction, image_format, _console())


def _print_plan(configs, console) -> None:
    from rich.table import Table

    from keras_fim.study import plan

    rows = plan(configs)
    table = Table(title=f"{len(rows)} runs (nothing trained: --dry-run)")
    headings = {
        "run": "run",
        "model": "model",
        "dataset": "data",
        "batch": "batch",
        "learning_rate": "rate",
        "epochs": "epochs",
        "steps": "steps",
        "measured": "measured steps",
        "multiply_adds": "training multiply-adds",
    }
    for heading in headings.values():
        table.add_column(heading, justify="left" if heading == "run" else "right")
    for row in rows:
        table.add_row(
            *(
                f"{row[key]:.3g}" if key == "multiply_adds" else str(row[key])
                for key in headings
            )
        )
    console.print(table)
    total = sum(row["multiply_adds"] for row in rows)
    console.print(
        f"In all: {sum(row['steps'] for row in rows)} steps, "
        f"{sum(row['measured'] for row in rows)} measured, {total:.3g} multiply-adds "
        "of training (three forward passes per example; measuring adds to it)."
    )


def _console():
    """rich's console; 120 columns when the output is not a terminal (a log
    file), where rich would otherwise cut the table to 80."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=120)


def _report(log_dir, output, early_fraction, image_format, console) -> None:
    from rich.table import Table

    from keras_fim.reports import write_report

    try:
        path, ranking = write_report(
            log_dir, output, early_fraction=early_fraction, image_format=image_format
        )
    except (ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from error
    early = f"{ranking.early_fraction:.0%}"
    table = Table(title="Runs ranked by test error")
    for heading in (
        "rank",
        "run",
        "test error",
        f"C_K_bar @{early}",
        f"L_K @{early}",
        "final C_K_bar",
        "final L_K",
        "rank < |B|",
    ):
        table.add_column(heading, justify="left" if heading == "run" else "right")
    for row in ranking.rows:
        table.add_row(
            str(row["rank"]),
            row["run"],
            f"{row['test_error']:.2%}",
            *(
                f"{row[k]:.4g}"
                for k in ("early_C_K_bar", "early_L_K", "final_C_K_bar", "final_L_K")
            ),
            "–"
            if math.isnan(row["rank_deficient"])
            else f"{row['rank_deficient']:.0%}",
        )
    console.print(table)
    if ranking.seed_spread:
        _print_spread(ranking.spread, console)
    if not ranking.rows:
        console.print(
            "No run has a test error (study/test_error, or validation accuracy): "
            "nothing to rank."
        )
    for line in ranking.findings():
        console.print(line)
    console.print(f"Report: {path}")


def _print_spread(spread, console) -> None:
    from rich.table import Table

    table = Table(title="Spread over seeds: mean (min-max)")
    for heading in (
        "configuration",
        "seeds",
        "test error",
        "final C_K_bar",
        "final L_K",
    ):
        table.add_column(
            heading, justify="left" if heading == "configuration" else "right"
        )
    for row in spread:
        table.add_row(
            row["configuration"],
            ",".join(map(str, row["seeds"])),
            f"{row['test_error_mean']:.2%} ({row['test_error_min']:.2%}-"
            f"{row['test_error_max']:.2%})",
            *(
                f"{row[f'{q}_mean']:.4g} ({row[f'{q}_min']:.4g}-{row[f'{q}_max']:.4g})"
                for q in ("final_C_K_bar", "final_L_K")
            ),
        )
    console.print(table)
