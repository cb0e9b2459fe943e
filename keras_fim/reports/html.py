"""Writes the HTML report of a folder of runs."""

from __future__ import annotations

import datetime
import math
import os
from pathlib import Path

from keras_fim.reports import plots
from keras_fim.reports.ranking import Ranking, rank_runs
from keras_fim.reports.records import find_runs

IMAGE_FORMATS = ("png", "svg")

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>keras-fim report: {{ log_dir }}</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 78em; color: #222; }
 table { border-collapse: collapse; font-size: 0.9em; }
 th, td { border-bottom: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
 th:nth-child(2), td:nth-child(2) { text-align: left; }
 #spread th:first-child, #spread td:first-child { text-align: left; }
 img { max-width: 100%; }
 .note { color: #555; font-size: 0.9em; }
</style></head><body>
<h1>keras-fim report</h1>
<p class="note">{{ runs|length }} runs in <code>{{ log_dir }}</code>, {{ ranking.rows|length }}
with a test error; written {{ written }}. C&#772;<sub>K</sub>: the running mean of the
truncated condition number; L<sub>K</sub>: the weighted cumulative energy
(Liao et al., TPAMI 2020).</p>

<h2>Ranking by test error</h2>
<table id="ranking">
<tr><th>rank</th><th>run</th><th>test error %</th>
<th>C&#772;<sub>K</sub> at {{ early }}</th><th>L<sub>K</sub> at {{ early }}</th>
<th>final C&#772;<sub>K</sub></th><th>final L<sub>K</sub></th>
<th>rank &lt; |B| %</th></tr>
{% for row in ranking.rows %}<tr><td>{{ row.rank }}</td><td>{{ row.run }}</td>
<td>{{ "%.2f"|format(row.test_error * 100) }}</td>
<td>{{ "%.4g"|format(row.early_C_K_bar) }}</td><td>{{ "%.4g"|format(row.early_L_K) }}</td>
<td>{{ "%.4g"|format(row.final_C_K_bar) }}</td><td>{{ "%.4g"|format(row.final_L_K) }}</td>
<td>{{ "%.0f"|format(row.rank_deficient * 100) }}</td></tr>
{% endfor %}</table>

<p class="note">rank &lt; |B|: the share of a run's measurements with eigenvalues at or
below the zero threshold{% if zero_threshold %} ({{ zero_threshold }}){% endif %}
(duplicated or dependent examples, or directions below the contributions' precision).</p>

{% if ranking.seed_spread %}
<h3>Spread over seeds</h3>
<p class="note">Runs whose names differ only by <code>_seed&lt;n&gt;</code> are one
configuration: its mean and its range (min–max) over its {{ ranking.seed_spread.seeds }}
seeds, best mean test error first. A seed sets the weights' initialisation, the data's
order and, for the digits, the train/test split.</p>
<table id="spread"><tr><th>configuration</th><th>seeds</th>
<th>test error %</th><th>min–max</th>
<th>final C&#772;<sub>K</sub></th><th>min–max</th>
<th>final L<sub>K</sub></th><th>min–max</th></tr>
{% for row in ranking.spread %}<tr><td>{{ row.configuration }}</td><td>{{ row.seeds|join(", ") }}</td>
<td>{{ "%.2f"|format(row.test_error_mean * 100) }}</td>
<td>{{ "%.2f"|format(row.test_error_min * 100) }}–{{ "%.2f"|format(row.test_error_max * 100) }}</td>
<td>{{ "%.4g"|format(row.final_C_K_bar_mean) }}</td>
<td>{{ "%.4g"|format(row.final_C_K_bar_min) }}–{{ "%.4g"|format(row.final_C_K_bar_max) }}</td>
<td>{{ "%.4g"|format(row.final_L_K_mean) }}</td>
<td>{{ "%.4g"|format(row.final_L_K_min) }}–{{ "%.4g"|format(row.final_L_K_max) }}</td></tr>
{% endfor %}</table>
{% endif %}

<h3>Do early measurements predict the outcome?</h3>
<p>Spearman's rank correlation with the final test error (p-value in brackets; positive:
larger values, worse runs).</p>
<table id="correlations"><tr><th></th><th>measurement</th><th>ρ</th><th>p</th></tr>
{% for name, (rho, p) in ranking.correlations.items() %}<tr><td></td><td>{{ name }}</td>
<td>{{ "%.3f"|format(rho) }}</td><td>{{ "%.2g"|format(p) }}</td></tr>
{% endfor %}</table>
<ul id="findings">{% for line in ranking.findings() %}<li>{{ line }}</li>{% endfor %}</ul>
{% if ranking.plane_by_seed %}
<p>Seed by seed: each seed's runs as a study of their own, each run's test error predicted
by the map of that seed's other runs (Spearman &rho; of predicted and actual errors, and
the best third recovered).</p>
<table id="per-seed"><tr><th>seed</th><th>runs</th>
{% for when in ranking.plane_by_seed %}<th>{{ when }} point: ρ</th><th>p</th><th>best third</th>{% endfor %}</tr>
{% for seed in ranking.plane_by_seed.early %}<tr><td>{{ seed }}</td>
<td>{{ ranking.plane_by_seed.early[seed].runs }}</td>
{% for when, by_seed in ranking.plane_by_seed.items() %}{% set plane = by_seed[seed] %}
<td>{{ "%.2f"|format(plane.rho) }}</td><td>{{ "%.2g"|format(plane.p) }}</td>
<td>{{ plane.best_recovered }} of {{ plane.best_count }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% endif %}
<img src="{{ figures.early }}" alt="early measurements against test error">

<h2>The map: final (C&#772;<sub>K</sub>, L<sub>K</sub>) and test error</h2>
<p>Each point is a run (each seed of a configuration its own point); the colour is its
test error; the filled contour interpolates the error from the 5 nearest runs on log axes.
{% if ranking.plane.final and not ranking.plane.final.reason %}Left out one at a time (with
the other seeds of its configuration), each run's final test error is predicted by this map
of the others with Spearman &rho; =
{{ "%.2f"|format(ranking.plane.final.rho) }} (p = {{ "%.2g"|format(ranking.plane.final.p) }}){% if ranking.plane_by_seed %}{% set seeds = ranking.plane_by_seed.final.values()|list %}
(that p-value counts the runs as independent, which the seeds of one configuration are not;
seed by seed, from {{ "%.2f"|format(seeds|map(attribute="rho")|min) }} to
{{ "%.2f"|format(seeds|map(attribute="rho")|max) }}){% endif %}:
{% if ranking.map_predicts("final") %}test error varies smoothly over the plane, so good
configurations share a region{% else %}the map does not significantly predict test
error{% if ranking.plane_by_seed %} in every seed{% endif %}, so these runs do not show a
region of good configurations{% endif %}.{% endif %}</p>
<img src="{{ figures.map }}" alt="characterisation map">

<h2>Trajectories</h2>
<img src="{{ figures.trajectories }}" alt="C_K bar and L_K against epochs, iterations and cumulative learning rate">

<h2>The spectrum over training</h2>
<img src="{{ figures.spectra }}" alt="eigenvalues of F over training">
</body></html>
"""


def write_report(
    log_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    early_fraction: float = 0.1,
    image_format: str = "png",
) -> tuple[Path, Ranking]:
    """Writes ``index.html`` and its figures for every run under `log_dir`.

    Args:
        log_dir: a folder of runs (e.g. a ``keras-fim study`` folder, or any
            `FisherCallback` log dir).
        output_dir: where to write; defaults to ``<log_dir>/report``.
        early_fraction: the early point of the ranking table, a fraction of
            training in (0, 1]. Defaults to `0.1`.
        image_format: ``"png"`` or ``"svg"``.

    Returns:
        The path of ``index.html`` and the `Ranking`.

    Raises:
        FileNotFoundError: `log_dir` does not exist.
        ValueError: no keras-fim run under `log_dir`, or a bad option.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(
            f"`image_format` must be one of {IMAGE_FORMATS}. Received: "
            f"image_format={image_format!r}"
        )
    runs = find_runs(log_dir)
    if not runs:
        raise ValueError(
            f"No keras-fim runs (folders whose train/ holds fisher/C_K_bar) under "
            f"log_dir={str(log_dir)!r}."
        )
    ranking = rank_runs(runs, early_fraction)
    output_dir = (
        Path(output_dir) if output_dir is not None else Path(log_dir) / "report"
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "early": plots.early_versus_final(ranking),
        "map": plots.characterisation_map(runs),
        "trajectories": plots.trajectories(runs),
        "spectra": plots.spectra(runs),
    }
    names = {}
    for name, figure in figures.items():
        names[name] = f"{name}.{image_format}"
        figure.savefig(output_dir / names[name], dpi=110)
    import jinja2

    environment = jinja2.Environment(autoescape=True)
    environment.filters["format"] = lambda spec, value: (
        "–" if isinstance(value, float) and math.isnan(value) else spec % value
    )
    page = environment.from_string(_TEMPLATE).render(
        log_dir=str(log_dir),
        runs=runs,
        ranking=ranking,
        early=f"{early_fraction:.0%}",
        zero_threshold=_zero_thresholds(runs),
        figures=names,
        written=datetime.datetime.now().isoformat(timespec="seconds"),
    )
    path = output_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path, ranking


def _zero_thresholds(runs) -> str:
    """The runs' zero-threshold settings, from their hparams (study runs)."""
    settings = sorted(
        {
            str(r.hparams["zero_threshold"])
            for r in runs
            if "zero_threshold" in r.hparams
        }
    )
    if not settings:
        return ""
    return "zero_threshold " + ", ".join(
        "from the precision" if v == "precision" else v for v in settings
    )
