"""Regenerates the report figures of the documentation (docs/figures/).

Runs the default study of ``keras-fim study`` (resumable: a finished run in
--log-dir is not trained again), writes its report, and copies the four
figures into docs/figures/:

    python docs/make_figures.py --log-dir logs/study
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from keras_fim import reports, study

FIGURES = ("map", "trajectories", "spectra", "early")
OUTPUT = Path(__file__).resolve().parent / "figures"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", default="logs/study", help="the study's folder")
    args = parser.parse_args(argv)
    study.run_study(study.grid(), args.log_dir)
    report, _ = reports.write_report(args.log_dir)
    OUTPUT.mkdir(exist_ok=True)
    for name in FIGURES:
        shutil.copyfile(report.parent / f"{name}.png", OUTPUT / f"{name}.png")
    print(f"Wrote {', '.join(f'{n}.png' for n in FIGURES)} to {OUTPUT}")


if __name__ == "__main__":
    main()
