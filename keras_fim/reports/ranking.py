"""Ranking runs by test error, and whether early measurements predict it."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from keras_fim import summaries
from keras_fim.reports.records import RunRecord

MEASUREMENTS = {"C_K_bar": summaries.C_K_BAR, "L_K": summaries.L_K}


@dataclasses.dataclass
class Ranking:
    """Runs ranked by final test error.

    Attributes:
        rows: one dict per run with a test error, best first: ``rank``,
            ``run``, ``test_error``, then ``C_K_bar`` and ``L_K`` at the end
            (``final_*``) and at the early point (``early_*``), and the run's
            hyper-parameters.
        correlations: ``{"early C_K_bar": (rho, p), ...}``: Spearman's rank
            correlation (and its p-value) between each measurement, early
            and final, and the final test error. NaN with fewer than three
            runs.
        early_fraction: where the early point is, as a fraction of each
            run's steps.
    """

    rows: list[dict]
    correlations: dict[str, tuple[float, float]]
    early_fraction: float


def rank_runs(runs: Sequence[RunRecord], early_fraction: float = 0.1) -> Ranking:
    """Ranks the runs that have a test error and correlates their measurements
    with it.

    Args:
        runs: the runs, e.g. from `find_runs`.
        early_fraction: the early point, in (0, 1]: each run's measurements
            are taken at its last measurement within this fraction of its
            steps. Defaults to `0.1` (10% of training).

    Example:

    >>> rank_runs([]).rows
    []
    """
    if isinstance(early_fraction, bool) or not (
        isinstance(early_fraction, (int, float)) and 0 < early_fraction <= 1
    ):
        raise ValueError(
            f"`early_fraction` must be in (0, 1]. Received: early_fraction={early_fraction!r}"
        )
    rows = []
    for run in runs:
        if run.test_error is None:
            continue
        row = {"run": run.name, "test_error": run.test_error}
        for name, tag in MEASUREMENTS.items():
            row[f"early_{name}"] = run.value_at_fraction(tag, early_fraction)
            row[f"final_{name}"] = run.final(tag)
        rows.append({**row, **run.hparams})
    rows.sort(key=lambda row: (row["test_error"], row["run"]))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    correlations = {}
    for when in ("early", "final"):
        for name in MEASUREMENTS:
            correlations[f"{when} {name}"] = _spearman(
                [row[f"{when}_{name}"] for row in rows],
                [row["test_error"] for row in rows],
            )
    return Ranking(rows, correlations, float(early_fraction))


def _spearman(a: list[float], b: list[float]) -> tuple[float, float]:
    pairs = [
        (x, y)
        for x, y in zip(a, b, strict=True)
        if math.isfinite(x) and math.isfinite(y)
    ]
    if (
        len(pairs) < 3
        or len({x for x, _ in pairs}) < 2
        or len({y for _, y in pairs}) < 2
    ):
        return math.nan, math.nan
    from scipy.stats import spearmanr

    result = spearmanr([x for x, _ in pairs], [y for _, y in pairs])
    return float(result.statistic), float(result.pvalue)
