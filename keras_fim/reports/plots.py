"""The report's figures, one function each; every one returns a matplotlib
`Figure` (drawn with the non-interactive Agg canvas)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from keras_fim import summaries
from keras_fim.reports.ranking import Ranking, nearest_runs_model
from keras_fim.reports.records import RunRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LABELS = {summaries.C_K_BAR: r"$\bar{C}_K$", summaries.L_K: r"$L_K$"}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _colors(count: int):
    from matplotlib import colormaps

    return colormaps["viridis"](np.linspace(0, 0.95, max(count, 1)))


def trajectories(runs: Sequence[RunRecord]) -> Figure:
    """C̄_K and L_K of every run against epochs, iterations and the cumulative
    learning rate (log y axes), the paper's three views (Liao et al., TPAMI
    2020).

    Args:
        runs: Sequence of `RunRecord`s, e.g. from `find_runs`; one line per
            run in each panel (a run that did not log a measurement has no
            line in its panels; the epoch panels need ``study/iterations``).
    """
    figure = _figure(13, 7)
    axes = figure.subplots(2, 3, squeeze=False)
    for run, color in zip(runs, _colors(len(runs)), strict=True):
        for row, tag in enumerate(LABELS):
            steps, values = run.series(tag)
            if not len(values):
                continue
            epochs = run.epochs_at(steps)
            if epochs is not None:
                axes[row, 0].plot(epochs, values, color=color, label=run.name)
            axes[row, 1].plot(steps, values, color=color, label=run.name)
            cumulative_steps, cumulative = run.cumulative_learning_rate()
            axes[row, 2].plot(
                np.interp(steps, cumulative_steps, cumulative), values, color=color
            )
    for row, tag in enumerate(LABELS):
        for column, xlabel in enumerate(
            ("epoch", "iteration", "cumulative learning rate")
        ):
            axis = axes[row, column]
            axis.set_yscale("log")
            axis.set_xlabel(xlabel)
            axis.set_ylabel(LABELS[tag])
            axis.grid(True, which="both", alpha=0.3)
    if runs:
        axes[0, 1].legend(fontsize="small", ncols=2)
    return figure


def _knn_surface(points: np.ndarray, errors: np.ndarray, resolution: int = 120):
    """Test error over the (log C̄_K, log L_K) plane by the map's
    interpolation (`keras_fim.reports.ranking.nearest_runs_model`)."""
    low, high = points.min(axis=0), points.max(axis=0)
    pad = np.maximum((high - low) * 0.08, 0.05)
    gx, gy = np.meshgrid(
        np.linspace(low[0] - pad[0], high[0] + pad[0], resolution),
        np.linspace(low[1] - pad[1], high[1] + pad[1], resolution),
    )
    regressor = nearest_runs_model(points, errors)
    surface = regressor.predict(np.column_stack([gx.ravel(), gy.ravel()]))
    return gx, gy, surface.reshape(gx.shape)


def characterisation_map(runs: Sequence[RunRecord]) -> Figure:
    """Final (C̄_K, L_K) of every run with a test error, coloured by it, over
    the interpolated test-error contour (log axes): the paper's map (Liao et
    al., TPAMI 2020, interpolate test error from the 5 nearest runs).

    Args:
        runs: Sequence of `RunRecord`s, e.g. from `find_runs`. Runs without a
            test error, or whose final C̄_K or L_K is not a positive finite
            number, are left out; the contour is drawn from three runs on.
    """
    figure = _figure(8, 6.5)
    axis = figure.subplots()
    named = [
        (
            run.name,
            run.final(summaries.C_K_BAR),
            run.final(summaries.L_K),
            run.test_error,
        )
        for run in runs
        if run.test_error is not None
    ]
    named = [n for n in named if n[1] > 0 and n[2] > 0 and math.isfinite(n[1] * n[2])]
    if not named:
        axis.text(0.5, 0.5, "no finished runs", ha="center", transform=axis.transAxes)
        return figure
    points = np.log10([[c, lk] for _, c, lk, _ in named])
    errors = np.array([e for *_, e in named]) * 100
    levels = None
    if len(named) >= 3:
        gx, gy, surface = _knn_surface(points, errors)
        contour = axis.contourf(
            10**gx, 10**gy, surface, levels=12, cmap="magma_r", alpha=0.55
        )
        levels = contour.levels
        figure.colorbar(contour, ax=axis, label="test error % (interpolated, 5-NN)")
    scatter = axis.scatter(
        10 ** points[:, 0],
        10 ** points[:, 1],
        c=errors,
        cmap="magma_r",
        edgecolors="black",
        s=60,
        zorder=3,
        vmin=None if levels is None else levels[0],
        vmax=None if levels is None else levels[-1],
    )
    if levels is None:
        figure.colorbar(scatter, ax=axis, label="test error %")
    for (name, c, lk, _error), in_percent in zip(named, errors, strict=True):
        axis.annotate(
            f"{name}\n{in_percent:.1f}%",
            (c, lk),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize="x-small",
        )
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel(r"final $\bar{C}_K$ (mean truncated condition number)")
    axis.set_ylabel(r"final $L_K$ (weighted cumulative energy)")
    axis.set_title("Test error over the (C̄_K, L_K) plane")
    return figure


def spectra(runs: Sequence[RunRecord], panels: int = 12) -> Figure:
    """The non-zero eigenvalues of F over training for each run (log10,
    largest, quartiles and smallest), up to `panels` runs.

    Args:
        runs: Sequence of `RunRecord`s, e.g. from `find_runs`; runs that
            logged no spectrum (``fisher/spectrum``) are skipped.
        panels: Integer >= 0, the most runs shown (the first ones with a
            spectrum, one panel each, four per row). Defaults to `12`.
    """
    shown = [run for run in runs if run.spectra[1]][:panels]
    columns = min(4, max(len(shown), 1))
    rows = max(1, math.ceil(len(shown) / columns))
    figure = _figure(3.4 * columns, 2.6 * rows)
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for axis, run in zip(axes, shown, strict=False):
        steps, values = run.spectra
        quantiles = np.array(
            [
                np.quantile(v[v > 0], [0, 0.25, 0.5, 0.75, 1])
                if np.any(v > 0)
                else [np.nan] * 5
                for v in values
            ]
        )
        axis.fill_between(
            steps, quantiles[:, 0], quantiles[:, 4], alpha=0.2, label="min-max"
        )
        axis.fill_between(
            steps, quantiles[:, 1], quantiles[:, 3], alpha=0.4, label="quartiles"
        )
        axis.plot(steps, quantiles[:, 2], lw=1, label="median")
        axis.set_yscale("log")
        axis.set_title(run.name, fontsize="small")
        axis.set_xlabel("iteration", fontsize="small")
    for axis in axes[len(shown) :]:
        axis.set_visible(False)
    if shown:
        axes[0].set_ylabel("eigenvalues of F")
        axes[0].legend(fontsize="x-small")
    return figure


def early_versus_final(ranking: Ranking) -> Figure:
    """Each run's C̄_K and L_K at the early point against its final test error,
    with Spearman's rank correlation.

    Args:
        ranking: `Ranking`, e.g. from `rank_runs`: its rows give the points,
            its correlations the panels' titles and its `early_fraction` the
            axis labels.
    """
    figure = _figure(10, 4)
    axes = figure.subplots(1, 2)
    errors = [row["test_error"] * 100 for row in ranking.rows]
    for axis, name in zip(axes, ("C_K_bar", "L_K"), strict=True):
        values = [row[f"early_{name}"] for row in ranking.rows]
        axis.scatter(values, errors)
        for row, x, y in zip(ranking.rows, values, errors, strict=True):
            axis.annotate(
                row["run"],
                (x, y),
                fontsize="x-small",
                xytext=(3, 3),
                textcoords="offset points",
            )
        rho, p = ranking.correlations[f"early {name}"]
        axis.set_xscale("log")
        axis.set_xlabel(
            f"{LABELS['fisher/' + name]} at {ranking.early_fraction:.0%} of training"
        )
        axis.set_ylabel("final test error %")
        axis.set_title(f"Spearman ρ = {rho:.2f} (p = {p:.2g})")
        axis.grid(True, which="both", alpha=0.3)
    return figure
