"""Ranking runs by test error, and whether early measurements predict it.

Two tests of the paper's claim that good configurations can be identified
early in training:

* per axis: Spearman's rank correlation between each measurement (C̄_K,
  L_K), early and final, and the final test error;
* in the plane, which is what the paper claims: each run's final test error
  is predicted from the *other* runs' final (C̄_K, L_K) points by the map's
  interpolation (inverse-distance weighting of the 5 nearest runs on log
  axes, `nearest_runs_model`), queried at the run's early point (and, for
  comparison, at its final point); the rank correlation of predicted and
  actual errors and the share of the best third recovered say how well.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from keras_fim import summaries
from keras_fim.reports.records import RunRecord

MEASUREMENTS = {"C_K_bar": summaries.C_K_BAR, "L_K": summaries.L_K}
NEIGHBOURS = 5
"""The map's interpolation: the paper's 5 nearest runs."""


def nearest_runs_model(points: np.ndarray, errors: np.ndarray):
    """The map's interpolation of test error over the plane: a fitted
    inverse-distance-weighted regressor of the `NEIGHBOURS` nearest runs.

    Args:
        points: Array ``(runs, 2)``, each run's ``(log10 C̄_K, log10 L_K)``.
        errors: Array ``(runs,)``, their test errors.

    Returns:
        A fitted `sklearn.neighbors.KNeighborsRegressor` (at most as many
        neighbours as runs).
    """
    from sklearn.neighbors import KNeighborsRegressor

    regressor = KNeighborsRegressor(
        n_neighbors=min(NEIGHBOURS, len(points)), weights="distance"
    )
    return regressor.fit(points, errors)


@dataclasses.dataclass(frozen=True)
class PlanePrediction:
    """How well a point of the (C̄_K, L_K) plane predicts the final test error,
    leave-one-out over the runs.

    Attributes:
        rho: Float, Spearman's rank correlation of predicted and actual test
            errors (NaN when undefined: `reason` says why).
        p: Float, its p-value.
        best_recovered: Integer, how many of the best third of the runs (by
            actual test error) are also in the best third by prediction.
        best_count: Integer, the size of that best third.
        runs: Integer, the runs predicted (those with a finite, positive
            point and at least two other runs).
        reason: String or `None`: why the prediction is undefined.
    """

    rho: float
    p: float
    best_recovered: int
    best_count: int
    runs: int
    reason: str | None = None


def predict_in_the_plane(rows: list[dict], when: str) -> PlanePrediction:
    """Leave-one-out: each run's final test error predicted by the map of
    the other runs' final points, at the run's `when` point.

    Args:
        rows: `Ranking.rows` (``test_error``, ``early_*`` and ``final_*``).
        when: String, ``"early"`` or ``"final"``: where each run is queried.

    Returns:
        A `PlanePrediction`.

    Example:

    Three good runs near C̄_K = 1, three bad ones near 100: each run's
    error is predicted from its neighbours, so the clusters are told apart
    (rho 0.6), while within a cluster the order is the neighbours' guess.

    >>> points = [(1, .1), (1.1, .11), (1.2, .12), (100, .5), (110, .55), (120, .6)]
    >>> rows = [{"run": f"r{i}", "test_error": e, "early_C_K_bar": c,
    ...          "early_L_K": 1.0, "final_C_K_bar": c, "final_L_K": 1.0}
    ...         for i, (c, e) in enumerate(points)]
    >>> prediction = predict_in_the_plane(rows, "early")
    >>> round(prediction.rho, 2), prediction.best_count, prediction.runs
    (0.6, 2, 6)
    """

    def point(row, prefix):
        values = [row[f"{prefix}_{name}"] for name in MEASUREMENTS]
        if all(math.isfinite(v) and v > 0 for v in values):
            return np.log10(values)
        return None

    usable = [
        row
        for row in rows
        if point(row, "final") is not None and point(row, when) is not None
    ]
    if len(usable) < 3:
        return PlanePrediction(
            math.nan,
            math.nan,
            0,
            0,
            len(usable),
            f"{len(usable)} run(s) with finite, positive C_K_bar and L_K; "
            "leave-one-out needs at least 3",
        )
    finals = np.array([point(row, "final") for row in usable])
    queries = np.array([point(row, when) for row in usable])
    errors = np.array([row["test_error"] for row in usable])
    predicted = np.empty(len(usable))
    for i in range(len(usable)):
        others = np.arange(len(usable)) != i
        model = nearest_runs_model(finals[others], errors[others])
        predicted[i] = model.predict(queries[i : i + 1])[0]
    rho, p = _spearman(list(predicted), list(errors))
    best_count = max(1, round(len(usable) / 3))
    names = [row["run"] for row in usable]
    best = set(np.lexsort((names, errors))[:best_count])
    best_predicted = set(np.lexsort((names, predicted))[:best_count])
    reason = None
    if math.isnan(rho):
        reason = "the predicted or the actual test errors are all equal"
    return PlanePrediction(
        rho, p, len(best & best_predicted), best_count, len(usable), reason
    )


@dataclasses.dataclass
class Ranking:
    """Runs ranked by final test error.

    Attributes:
        rows: one dict per run with a test error, best first: ``rank``,
            ``run``, ``test_error``, then ``C_K_bar`` and ``L_K`` at the end
            (``final_*``) and at the early point (``early_*``),
            ``rank_deficient`` (the share of its measurements with rank
            below the batch size, `RunRecord.rank_deficient_share`), and
            the run's hyper-parameters.
        correlations: ``{"early C_K_bar": (rho, p), ...}``: Spearman's rank
            correlation (and its p-value) between each measurement, early
            and final, and the final test error. NaN with fewer than three
            runs.
        early_fraction: where the early point is, as a fraction of each
            run's steps.
        plane: ``{"early": PlanePrediction, "final": PlanePrediction}``: how
            well each run's early (final) point predicts its test error from
            the other runs' map (`predict_in_the_plane`).
    """

    rows: list[dict]
    correlations: dict[str, tuple[float, float]]
    early_fraction: float
    plane: dict[str, PlanePrediction] = dataclasses.field(default_factory=dict)

    def findings(self) -> list[str]:
        """What the data shows about early identification, in sentences
        (for the report and the command line)."""
        early = f"{self.early_fraction:.0%} of training"
        lines = []
        for name in MEASUREMENTS:
            parts = []
            for when in ("early", "final"):
                rho, p = self.correlations[f"{when} {name}"]
                parts.append(
                    f"{when} {_spearman_text(rho, p)}"
                    if math.isfinite(rho)
                    else f"{when} undefined ({_undefined(self.rows, when, name)})"
                )
            lines.append(f"{name} alone against test error: {'; '.join(parts)}.")
        for when in ("early", "final"):
            plane = self.plane.get(when)
            if plane is None:
                continue
            where = f"its {when} point" + (f" ({early})" if when == "early" else "")
            if plane.reason:
                lines.append(
                    f"The map of the other runs, queried at {where}: undefined "
                    f"({plane.reason})."
                )
                continue
            verdict = (
                "predicts"
                if plane.rho > 0 and plane.p < 0.05
                else "does not significantly predict"
            )
            lines.append(
                f"The map of the other runs, queried at {where}, {verdict} each "
                f"run's final test error: {_spearman_text(plane.rho, plane.p)}, "
                f"{plane.best_recovered} of the {plane.best_count} best-third "
                f"runs recovered ({plane.runs} runs)."
            )
        return lines


def _spearman_text(rho: float, p: float) -> str:
    return f"Spearman rho = {rho:.2f} (p = {p:.2g})"


def _undefined(rows: list[dict], when: str, name: str) -> str:
    values = [row[f"{when}_{name}"] for row in rows]
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 3:
        return f"{len(finite)} run(s) with a finite value; needs 3"
    return "the values or the test errors are all equal"


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
        row = {
            "run": run.name,
            "test_error": run.test_error,
            "rank_deficient": run.rank_deficient_share(),
        }
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
    plane = {when: predict_in_the_plane(rows, when) for when in ("early", "final")}
    return Ranking(rows, correlations, float(early_fraction), plane)


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
