"""Repeated configurations: how far a configuration's outcome moves between
its seeds, against how far it moves between configurations.

Runs are one configuration when their names differ only by the seed suffix
of `keras_fim.study.RunConfig.name` (``bs16_lr0.1``, ``bs16_lr0.1_seed1``;
`keras_fim.study.split_run_name`). The rows are `Ranking.rows`, which carry
each run's ``configuration`` and ``seed``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

SPREAD = ("test_error", "final_C_K_bar", "final_L_K")
"""The quantities whose spread over seeds is reported."""


def spread_over_seeds(rows: Sequence[dict]) -> list[dict]:
    """Each configuration's runs summarised over their seeds.

    Args:
        rows: `Ranking.rows` (``configuration``, ``seed`` and the `SPREAD`
            quantities).

    Returns:
        One dict per configuration, best mean test error first (then by
        name): ``configuration``, ``seeds`` (sorted), ``runs``, and for
        each quantity ``q`` of `SPREAD` its ``q_mean``, ``q_min``,
        ``q_max`` and ``q_std`` (the sample standard deviation, NaN for a
        single run) over the runs where it is finite.

    Example:

    >>> rows = [{"configuration": "a", "seed": s, "test_error": e,
    ...          "final_C_K_bar": 10.0, "final_L_K": 1.0}
    ...         for s, e in [(0, 0.1), (1, 0.3)]]
    >>> (row,) = spread_over_seeds(rows)
    >>> row["seeds"], round(row["test_error_mean"], 3), row["test_error_max"]
    ([0, 1], 0.2, 0.3)
    """
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["configuration"], []).append(row)
    spread = []
    for configuration, members in groups.items():
        entry = {
            "configuration": configuration,
            "seeds": sorted(row["seed"] for row in members),
            "runs": len(members),
        }
        for quantity in SPREAD:
            values = np.array([row[quantity] for row in members], dtype=float)
            values = values[np.isfinite(values)]
            empty = not len(values)
            entry[f"{quantity}_mean"] = math.nan if empty else float(values.mean())
            entry[f"{quantity}_min"] = math.nan if empty else float(values.min())
            entry[f"{quantity}_max"] = math.nan if empty else float(values.max())
            entry[f"{quantity}_std"] = (
                float(values.std(ddof=1)) if len(values) > 1 else math.nan
            )
        spread.append(entry)
    return sorted(spread, key=lambda e: (e["test_error_mean"], e["configuration"]))


@dataclasses.dataclass(frozen=True)
class SeedSpread:
    """Test error between seeds against test error between configurations.

    Attributes:
        seeds: Integer, how many different seeds the runs have.
        repeated: Integer, the configurations with at least two runs.
        mean_range: Float, the mean over those of their test error's
            max - min.
        largest_range: Float, the largest such range.
        within_std: Float, the pooled standard deviation of test error
            within those configurations (variances weighted by runs - 1).
        between_std: Float, the sample standard deviation of the
            configurations' mean test errors (all configurations).
        lowest_mean: Float, the best configuration's mean test error.
        highest_mean: Float, the worst configuration's mean test error.
    """

    seeds: int
    repeated: int
    mean_range: float
    largest_range: float
    within_std: float
    between_std: float
    lowest_mean: float
    highest_mean: float


def seed_spread(spread: Sequence[dict]) -> SeedSpread | None:
    """Summarises `spread_over_seeds`; `None` when no configuration has
    runs with two different seeds.

    Args:
        spread: `spread_over_seeds`'s list.

    Returns:
        A `SeedSpread`, or `None`.

    Example:

    >>> spread = [{"seeds": [0, 1], "test_error_min": 0.1, "test_error_max": 0.3,
    ...            "test_error_mean": 0.2, "test_error_std": 0.1414},
    ...           {"seeds": [0, 1], "test_error_min": 0.5, "test_error_max": 0.6,
    ...            "test_error_mean": 0.55, "test_error_std": 0.0707}]
    >>> summary = seed_spread(spread)
    >>> round(summary.mean_range, 3), round(summary.between_std, 3)
    (0.15, 0.247)
    """
    repeated = [e for e in spread if len(set(e["seeds"])) > 1]
    if not repeated:
        return None
    ranges = [e["test_error_max"] - e["test_error_min"] for e in repeated]
    degrees = [len(e["seeds"]) - 1 for e in repeated]
    variances = [e["test_error_std"] ** 2 for e in repeated]
    means = np.array([e["test_error_mean"] for e in spread])
    return SeedSpread(
        seeds=len({seed for e in spread for seed in e["seeds"]}),
        repeated=len(repeated),
        mean_range=float(np.mean(ranges)),
        largest_range=float(np.max(ranges)),
        within_std=math.sqrt(np.dot(degrees, variances) / sum(degrees)),
        between_std=float(means.std(ddof=1)) if len(means) > 1 else math.nan,
        lowest_mean=float(means.min()),
        highest_mean=float(means.max()),
    )
