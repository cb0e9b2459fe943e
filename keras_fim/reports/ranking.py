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
  The runs of the predicted run's own configuration (its other seeds) are
  left out with it, so that a seed twin does not give the answer away; and
  with several seeds, each seed's runs are predicted from their own map too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from keras_fim import summaries
from keras_fim.reports.records import RunRecord
from keras_fim.reports.seeds import SeedSpread, seed_spread, spread_over_seeds
from keras_fim.study import split_run_name

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
            point, when at least three configurations have one).
        reason: String or `None`: why the prediction is undefined.
    """

    rho: float
    p: float
    best_recovered: int
    best_count: int
    runs: int
    reason: str | None = None


def predict_in_the_plane(rows: Sequence[dict], when: str) -> PlanePrediction:
    """Leave-one-out: each run's final test error predicted by the map of
    the other configurations' runs' final points, at the run's `when` point.

    Args:
        rows: `Ranking.rows` (``test_error``, ``early_*`` and ``final_*``;
            ``configuration``, where given, groups the seeds of one
            configuration, which are left out together; without it every
            run is a configuration of its own).
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
    groups = np.array([row.get("configuration", row["run"]) for row in usable])
    if len(set(groups)) < 3:
        configurations = (
            f" of {len(set(groups))} configuration(s)"
            if len(set(groups)) < len(usable)
            else ""
        )
        return PlanePrediction(
            math.nan,
            math.nan,
            0,
            0,
            len(usable),
            f"{len(usable)} run(s){configurations} with finite, positive C_K_bar "
            "and L_K; leave-one-out needs at least 3 configurations",
        )
    finals = np.array([point(row, "final") for row in usable])
    queries = np.array([point(row, when) for row in usable])
    errors = np.array([row["test_error"] for row in usable])
    predicted = np.empty(len(usable))
    for i in range(len(usable)):
        others = groups != groups[i]
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
            the other configurations' map (`predict_in_the_plane`).
        spread: each configuration's runs over their seeds
            (`keras_fim.reports.seeds.spread_over_seeds`).
        seed_spread: `keras_fim.reports.seeds.SeedSpread` (test error between
            seeds and between configurations), or `None` with one seed.
        plane_by_seed: ``{"early": {seed: PlanePrediction}, "final": ...}``,
            `predict_in_the_plane` within each seed's runs; empty with one
            seed.
        seed_agreement: how well one seed repeats another
            (`agreement_between_seeds`); empty with one seed.
    """

    rows: list[dict]
    correlations: dict[str, tuple[float, float]]
    early_fraction: float
    plane: dict[str, PlanePrediction] = dataclasses.field(default_factory=dict)
    spread: list[dict] = dataclasses.field(default_factory=list)
    seed_spread: SeedSpread | None = None
    plane_by_seed: dict[str, dict[int, PlanePrediction]] = dataclasses.field(
        default_factory=dict
    )
    seed_agreement: dict[str, list[tuple[int, int, float, float]]] = dataclasses.field(
        default_factory=dict
    )

    def map_predicts(self, when: str) -> bool:
        """Whether the map of the other runs significantly predicts each
        run's test error from its `when` point (``"early"`` or ``"final"``):
        Spearman's rho > 0 with p < 0.05, in every seed's own runs when there
        are several seeds (pooled, seed twins would count as independent
        runs, and the p-value would be too small)."""
        planes = (
            list(self.plane_by_seed[when].values())
            if self.plane_by_seed
            else [self.plane[when]]
        )
        return all(not p.reason and p.rho > 0 and p.p < 0.05 for p in planes)

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
        others = (
            "the other configurations' runs (all seeds of its own left out)"
            if self.seed_spread
            else "the other runs"
        )
        for when in ("early", "final"):
            plane = self.plane.get(when)
            if plane is None:
                continue
            where = f"its {when} point" + (f" ({early})" if when == "early" else "")
            if plane.reason:
                lines.append(
                    f"The map of {others}, queried at {where}: undefined "
                    f"({plane.reason})."
                )
                continue
            verdict = (
                "predicts"
                if self.map_predicts(when)
                else "does not significantly predict"
            )
            if self.plane_by_seed:
                verdict += " in every seed"
            caveat = (
                "; its p-value counts the runs as independent, which the seeds of "
                "one configuration are not: the verdict is seed by seed, below"
                if self.plane_by_seed
                else ""
            )
            lines.append(
                f"The map of {others}, queried at {where}, {verdict} each "
                f"run's final test error: {_spearman_text(plane.rho, plane.p)}, "
                f"{plane.best_recovered} of the {plane.best_count} best-third "
                f"runs recovered ({plane.runs} runs{caveat})."
            )
        for when, by_seed in self.plane_by_seed.items():
            where = f"its {when} point" + (f" ({early})" if when == "early" else "")
            lines.append(
                f"Seed by seed, the map of that seed's other runs, queried at "
                f"{where}: {_per_seed_text(by_seed)}."
            )
        if self.seed_spread:
            lines.append(_spread_text(self.seed_spread))
        if self.seed_agreement:
            lines.append(_agreement_text(self.seed_agreement))
        return lines


def _agreement_text(agreement: dict[str, list[tuple]]) -> str:
    pairs = [(a, b) for a, b, *_ in next(iter(agreement.values()))]
    parts = []
    for quantity, values in agreement.items():
        rhos = [rho for *_, rho, _p in values if math.isfinite(rho)]
        if not rhos:
            parts.append(
                f"{quantity} undefined (fewer than 3 configurations with both seeds, "
                "or values all equal)"
            )
        elif len(values) == 1:
            parts.append(f"{quantity} {_spearman_text(*values[0][2:])}")
        else:
            parts.append(
                f"{quantity} Spearman rho from {min(rhos):.2f} to {max(rhos):.2f}"
            )
    who = (
        f"How seed {pairs[0][1]} repeats seed {pairs[0][0]}"
        if len(pairs) == 1
        else f"How one seed repeats another ({len(pairs)} pairs of seeds)"
    )
    return f"{who}, over the configurations both ran: {'; '.join(parts)}."


def _per_seed_text(by_seed: dict[int, PlanePrediction]) -> str:
    parts = [
        f"seed {seed} undefined ({plane.reason})"
        if plane.reason
        else f"seed {seed} rho = {plane.rho:.2f} (p = {plane.p:.2g}, "
        f"{plane.best_recovered} of {plane.best_count} best-third runs)"
        for seed, plane in by_seed.items()
    ]
    rhos = [plane.rho for plane in by_seed.values() if not plane.reason]
    if len(rhos) > 1:
        parts.append(f"rho from {min(rhos):.2f} to {max(rhos):.2f}")
    return "; ".join(parts)


def _spread_text(spread: SeedSpread) -> str:
    def points(value):
        return f"{value * 100:.2f}"

    return (
        f"Between its {spread.seeds} seeds, a configuration's test error moves by "
        f"{points(spread.mean_range)} percentage points on average (at most "
        f"{points(spread.largest_range)}; pooled standard deviation "
        f"{points(spread.within_std)}, {spread.repeated} configurations); between "
        f"configurations, the mean test errors range from {points(spread.lowest_mean)}% "
        f"to {points(spread.highest_mean)}% (standard deviation "
        f"{points(spread.between_std)})."
    )


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
        configuration, seed = split_run_name(run.name)
        rows.append(
            {**row, **run.hparams, "configuration": configuration, "seed": seed}
        )
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
    spread = spread_over_seeds(rows)
    summary = seed_spread(spread)
    by_seed, agreement = {}, {}
    if len({row["seed"] for row in rows}) > 1:
        by_seed = {when: predict_per_seed(rows, when) for when in ("early", "final")}
        agreement = agreement_between_seeds(rows)
    return Ranking(
        rows,
        correlations,
        float(early_fraction),
        plane,
        spread,
        summary,
        by_seed,
        agreement,
    )


def agreement_between_seeds(
    rows: Sequence[dict],
) -> dict[str, list[tuple[int, int, float, float]]]:
    """How well one seed repeats another: for every two seeds, Spearman's
    rank correlation over the configurations both ran of their test errors
    (how reproducible the ranking the map should predict is) and of their
    final C̄_K and L_K (how reproducible a configuration's place is).

    Args:
        rows: `Ranking.rows` (``configuration``, ``seed``, ``test_error``,
            ``final_C_K_bar``, ``final_L_K``).

    Returns:
        ``{"test error": [(seed_a, seed_b, rho, p), ...], "final C_K_bar":
        ..., "final L_K": ...}``, one tuple per pair of seeds (NaN where
        fewer than three configurations have both values).
    """
    by_seed: dict[int, dict[str, dict]] = {}
    for row in rows:
        by_seed.setdefault(row["seed"], {})[row["configuration"]] = row
    seeds = sorted(by_seed)
    agreement = {}
    for label, key in (
        ("test error", "test_error"),
        ("final C_K_bar", "final_C_K_bar"),
        ("final L_K", "final_L_K"),
    ):
        pairs = []
        for i, a in enumerate(seeds):
            for b in seeds[i + 1 :]:
                both = sorted(by_seed[a].keys() & by_seed[b].keys())
                rho, p = _spearman(
                    [by_seed[a][c][key] for c in both],
                    [by_seed[b][c][key] for c in both],
                )
                pairs.append((a, b, rho, p))
        agreement[label] = pairs
    return agreement


def predict_per_seed(rows: Sequence[dict], when: str) -> dict[int, PlanePrediction]:
    """`predict_in_the_plane` within each seed's runs: each seed's runs are a
    study of their own, and their map predicts each of them left out.

    Args:
        rows: `Ranking.rows` (with ``seed``).
        when: String, ``"early"`` or ``"final"``: where each run is queried.

    Returns:
        ``{seed: PlanePrediction}``, seeds in increasing order.
    """
    return {
        seed: predict_in_the_plane([row for row in rows if row["seed"] == seed], when)
        for seed in sorted({row["seed"] for row in rows})
    }


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
