"""A characterisation study from Python: a grid of batch sizes and learning
rates, then the report (what `keras-fim study` does from the shell).

    python examples/study.py --epochs 12 --log-dir logs/example-study
    tensorboard --logdir logs/example-study   # HParams, scalars, custom scalars
"""

from __future__ import annotations

import argparse

from keras_fim import reports, study


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument(
        "--learning-rates", type=float, nargs="+", default=[0.025, 0.1, 0.4]
    )
    parser.add_argument(
        "--schedules",
        nargs="*",
        default=["staged"],
        help="dynamic schedules, run at the middle learning rate",
    )
    parser.add_argument("--log-dir", default="logs/example-study")
    args = parser.parse_args(argv)

    configs = study.grid(
        args.batch_sizes,
        args.learning_rates,
        args.schedules,
        [args.learning_rates[len(args.learning_rates) // 2]],
        epochs=args.epochs,
    )
    results = study.run_study(
        configs,
        args.log_dir,
        on_run_end=lambda config, result, skipped: print(
            f"{config.name}: test error {result['test_error']:.2%}"
            + (" (finished earlier)" if skipped else "")
        ),
    )
    path, ranking = reports.write_report(args.log_dir)
    best = ranking.rows[0]
    print(f"best: {best['run']} ({best['test_error']:.2%}) of {len(results)} runs")
    for name, (rho, p) in ranking.correlations.items():
        print(f"Spearman rho({name}, test error) = {rho:.2f} (p = {p:.2g})")
    print(f"report: {path}")


if __name__ == "__main__":
    main()
