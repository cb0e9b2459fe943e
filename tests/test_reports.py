"""The report's reading and statistics against hand-written event files and
brute-force references (no training here)."""

import math

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

from keras_fim.reports import find_runs, rank_runs, read_run, write_report
from keras_fim.reports.plots import _knn_surface


def write_run(
    path,
    *,
    steps,
    condition,
    energy,
    rates,
    test_error=None,
    hparams=None,
    epoch_ends=None,
    spectra=None,
    validation_accuracy=None,
    ranks=None,
    sizes=None,
):
    """A run folder as keras-fim and the study write it."""
    with tf.summary.create_file_writer(str(path / "train")).as_default():
        for i, step in enumerate(steps):
            tf.summary.scalar("fisher/C_K_bar", condition[i], step=step)
            tf.summary.scalar("fisher/L_K", energy[i], step=step)
            tf.summary.scalar("fisher/learning_rate", rates[i], step=step)
            if spectra is not None:
                tf.summary.write("fisher/spectrum", tf.constant(spectra[i]), step=step)
            if ranks is not None:
                tf.summary.scalar("fisher/rank", ranks[i], step=step)
                tf.summary.scalar("fisher/batch_size", sizes[i], step=step)
    with tf.summary.create_file_writer(str(path)).as_default():
        if hparams:
            hp.hparams(hparams, trial_id=path.name)
        if test_error is not None:
            tf.summary.scalar(
                "study/test_error", test_error, step=len(epoch_ends or [1])
            )
        for epoch, end in enumerate(epoch_ends or [], start=1):
            tf.summary.scalar("study/iterations", end, step=epoch)
    if validation_accuracy is not None:
        with tf.summary.create_file_writer(str(path / "validation")).as_default():
            for epoch, accuracy in enumerate(validation_accuracy):
                tf.summary.scalar("epoch_accuracy", accuracy, step=epoch)


def test_read_run_returns_what_was_written(tmp_path):
    spectra = [np.array([4.0, 1.0, 0.0]), np.array([9.0, 2.0, 0.5])]
    write_run(
        tmp_path / "a",
        steps=[5, 10],
        condition=[3.0, 2.5],
        energy=[0.1, 0.3],
        rates=[0.1, 0.01],
        test_error=0.25,
        epoch_ends=[6, 12],
        hparams={"batch_size": 16, "learning_rate": 0.1, "schedule": "fixed"},
        spectra=spectra,
    )
    run = read_run(tmp_path / "a")
    np.testing.assert_array_equal(run.series("fisher/C_K_bar")[0], [5, 10])
    np.testing.assert_allclose(run.series("fisher/L_K")[1], [0.1, 0.3], rtol=1e-6)
    assert run.test_error == pytest.approx(0.25)
    assert run.hparams == {
        "batch_size": 16.0,
        "learning_rate": pytest.approx(0.1),
        "schedule": "fixed",
    }
    assert run.iterations == 12
    np.testing.assert_array_equal(run.spectra[0], [5, 10])
    for read, written in zip(run.spectra[1], spectra, strict=True):
        np.testing.assert_allclose(read, written)
    # Epochs by linear interpolation between epoch ends: step 6 ends epoch 1.
    np.testing.assert_allclose(run.epochs_at(np.array([3, 6, 9, 12])), [0.5, 1, 1.5, 2])


def test_cumulative_learning_rate_and_early_values_against_loops(tmp_path):
    steps = [3, 6, 9, 12, 20]
    rates = [0.4, 0.4, 0.2, 0.2, 0.02]
    values = [10.0, 8.0, 7.0, 6.5, 6.0]
    write_run(
        tmp_path / "r",
        steps=steps,
        condition=values,
        energy=values,
        rates=rates,
        epoch_ends=[10, 20],
    )
    run = read_run(tmp_path / "r")
    expected, previous, total = [], 0, 0.0
    for step, rate in zip(steps, rates, strict=True):
        total += rate * (step - previous)
        previous = step
        expected.append(total)
    np.testing.assert_allclose(run.cumulative_learning_rate()[1], expected, rtol=1e-6)
    for fraction in (0.05, 0.1, 0.3, 0.5, 0.99, 1.0):
        limit = fraction * 20
        within = [v for s, v in zip(steps, values, strict=True) if s <= limit]
        want = within[-1] if within else values[0]
        assert run.value_at_fraction("fisher/C_K_bar", fraction) == pytest.approx(want)
    assert math.isnan(run.value_at_fraction("fisher/absent", 0.5))


def _brute_spearman(a, b):
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return result

    ra, rb = np.array(ranks(a)), np.array(ranks(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / math.sqrt((ra**2).sum() * (rb**2).sum()))


def test_ranking_and_spearman_against_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    errors = [0.3, 0.1, 0.2, 0.1, 0.5, 0.05]
    for index, error in enumerate(errors):
        condition = np.sort(rng.uniform(1, 50, 4))[::-1]
        energy = np.cumsum(rng.uniform(0.1, 1, 4))
        write_run(
            tmp_path / f"run{index}",
            steps=[2, 4, 6, 8],
            condition=condition,
            energy=energy,
            rates=[0.1] * 4,
            test_error=error,
            epoch_ends=[4, 8],
        )
    # A run without a test error is read but not ranked.
    write_run(
        tmp_path / "unfinished", steps=[2], condition=[1.0], energy=[1.0], rates=[0.1]
    )
    runs = find_runs(tmp_path)
    assert [r.name for r in runs] == [f"run{i}" for i in range(6)] + ["unfinished"]
    ranking = rank_runs(runs, early_fraction=0.5)
    assert [row["run"] for row in ranking.rows] == [
        "run5",
        "run1",
        "run3",
        "run2",
        "run0",
        "run4",
    ]
    assert [row["rank"] for row in ranking.rows] == [1, 2, 3, 4, 5, 6]
    for name, tag in (("C_K_bar", "fisher/C_K_bar"), ("L_K", "fisher/L_K")):
        early = [
            read_run(tmp_path / row["run"]).series(tag)[1][1] for row in ranking.rows
        ]
        assert [row[f"early_{name}"] for row in ranking.rows] == pytest.approx(early)
        rho, p = ranking.correlations[f"early {name}"]
        assert rho == pytest.approx(
            _brute_spearman(early, [r["test_error"] for r in ranking.rows])
        )
        assert 0 <= p <= 1
    with pytest.raises(ValueError, match="early_fraction"):
        rank_runs(runs, early_fraction=0)


def test_knn_surface_is_the_distance_weighted_mean_of_five_neighbours():
    rng = np.random.default_rng(1)
    points = rng.uniform(0, 2, (9, 2))
    errors = rng.uniform(0, 50, 9)
    gx, gy, surface = _knn_surface(points, errors, resolution=7)
    for i, j in [(0, 0), (3, 4), (6, 2)]:
        query = np.array([gx[i, j], gy[i, j]])
        distances = np.sqrt(((points - query) ** 2).sum(axis=1))
        nearest = np.argsort(distances)[:5]
        weights = 1 / distances[nearest]
        assert surface[i, j] == pytest.approx(
            (weights * errors[nearest]).sum() / weights.sum()
        )


def test_write_report_writes_page_and_figures(tmp_path):
    for index, error in enumerate([0.2, 0.1, 0.4]):
        write_run(
            tmp_path / "logs" / f"bs{16 * 4**index}",
            steps=[1, 2, 3],
            condition=[5.0 + index, 4.0, 3.0 + index],
            energy=[0.1, 0.2, 0.3 * (index + 1)],
            rates=[0.1, 0.1, 0.1],
            test_error=error,
            epoch_ends=[3],
            spectra=[np.array([3.0, 1.0])] * 3,
        )
    path, _ranking = write_report(
        tmp_path / "logs", tmp_path / "out", image_format="svg"
    )
    page = path.read_text()
    assert path == tmp_path / "out" / "index.html"
    for figure in ("early", "map", "trajectories", "spectra"):
        assert (tmp_path / "out" / f"{figure}.svg").stat().st_size > 1000
        assert f'src="{figure}.svg"' in page
    # The table lists the runs best first.
    assert page.index("bs64") < page.index("bs16") < page.index("bs256")
    assert "10.00" in page and "40.00" in page
    with pytest.raises(ValueError, match="image_format"):
        write_report(tmp_path / "logs", image_format="jpg")
    with pytest.raises(ValueError, match="No keras-fim runs"):
        write_report(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="log_dir"):
        write_report(tmp_path / "missing")


def test_validation_accuracy_is_the_fallback_test_error(tmp_path):
    write_run(
        tmp_path / "plain",
        steps=[1],
        condition=[2.0],
        energy=[1.0],
        rates=[0.1],
        validation_accuracy=[0.5, 0.875],
    )
    assert read_run(tmp_path / "plain").test_error == pytest.approx(0.125)


def brute_plane(rows, when):
    """Leave-one-out inverse-distance weighting of the 5 nearest other runs'
    final (log C, log L) points, queried at each run's `when` point: the
    predicted errors, the Spearman rho and the best third recovered. Runs of
    the left-out run's configuration (when rows name one) are left out too."""
    final = np.log10([[r["final_C_K_bar"], r["final_L_K"]] for r in rows])
    query = np.log10([[r[f"{when}_C_K_bar"], r[f"{when}_L_K"]] for r in rows])
    errors = np.array([r["test_error"] for r in rows])
    group = [r.get("configuration", r["run"]) for r in rows]
    predicted = []
    for i in range(len(rows)):
        others = [j for j in range(len(rows)) if group[j] != group[i]]
        distances = np.sqrt(((final[others] - query[i]) ** 2).sum(axis=1))
        nearest = np.argsort(distances)[:5]
        weights = 1 / distances[nearest]
        predicted.append((weights * errors[others][nearest]).sum() / weights.sum())
    third = max(1, round(len(rows) / 3))
    best = set(np.argsort(errors, kind="stable")[:third])
    guessed = set(np.argsort(predicted, kind="stable")[:third])
    return _brute_spearman(predicted, list(errors)), len(best & guessed), third


def plane_rows(seed, n=12, noise=0.0):
    """Runs whose error grows with log C at the end; early points are the
    final ones moved by `noise` decades."""
    rng = np.random.default_rng(seed)
    c = 10 ** rng.uniform(0, 3, n)
    energy = 10 ** rng.uniform(-1, 1, n)
    error = 0.05 + 0.1 * np.log10(c) + rng.normal(0, 0.01, n)
    shift = 10 ** rng.normal(0, noise, (2, n)) if noise else np.ones((2, n))
    return [
        {
            "run": f"r{i:02d}",
            "test_error": float(error[i]),
            "final_C_K_bar": float(c[i]),
            "final_L_K": float(energy[i]),
            "early_C_K_bar": float(c[i] * shift[0, i]),
            "early_L_K": float(energy[i] * shift[1, i]),
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("seed, noise", [(0, 0.0), (1, 0.3), (2, 2.0)])
def test_plane_prediction_is_the_leave_one_out_map(seed, noise):
    from keras_fim.reports.ranking import predict_in_the_plane

    rows = plane_rows(seed, noise=noise)
    for when in ("early", "final"):
        prediction = predict_in_the_plane(rows, when)
        rho, recovered, third = brute_plane(rows, when)
        assert prediction.rho == pytest.approx(rho)
        assert (prediction.best_recovered, prediction.best_count) == (recovered, third)
        assert prediction.runs == len(rows) and prediction.reason is None


def test_findings_say_what_the_data_shows():
    from keras_fim.reports.ranking import Ranking, predict_in_the_plane

    def ranking(rows):
        plane = {w: predict_in_the_plane(rows, w) for w in ("early", "final")}
        correlations = {
            f"{w} {m}": (math.nan, math.nan)
            for w in ("early", "final")
            for m in ("C_K_bar", "L_K")
        }
        return Ranking(rows, correlations, 0.1, plane)

    clear = " ".join(ranking(plane_rows(0)).findings())
    assert "queried at its early point (10% of training), predicts" in clear
    scrambled = plane_rows(3)
    errors = [r["test_error"] for r in scrambled]
    for row, error in zip(scrambled, errors[::-1], strict=True):
        row["test_error"] = error  # the best runs now sit where the worst are
    assert "does not significantly predict" in " ".join(ranking(scrambled).findings())
    two = " ".join(ranking(plane_rows(0, n=2)).findings())
    assert "undefined (2 run(s) with finite, positive C_K_bar and L_K" in two
    assert "needs at least 3 configurations" in two
    assert "nan" not in two.lower().replace("finite", "")


def test_a_log_dir_that_is_one_run_is_named_by_its_folder(tmp_path):
    write_run(
        tmp_path / "bs64_lr0.1",
        steps=[1],
        condition=[2.0],
        energy=[1.0],
        rates=[0.1],
        test_error=0.2,
    )
    assert [r.name for r in find_runs(tmp_path / "bs64_lr0.1")] == ["bs64_lr0.1"]


def test_rank_deficient_share_counts_measurements_below_the_batch_size(tmp_path):
    write_run(
        tmp_path / "run",
        steps=[0, 4, 8, 12],
        condition=[1.0] * 4,
        energy=[1.0] * 4,
        rates=[0.1] * 4,
        ranks=[16, 15, 16, 31],
        sizes=[16, 16, 16, 32],
        test_error=0.1,
    )
    write_run(tmp_path / "old", steps=[0], condition=[1.0], energy=[1.0], rates=[0.1])
    runs = {r.name: r for r in find_runs(tmp_path)}
    assert runs["run"].rank_deficient_share() == pytest.approx(0.5)
    assert math.isnan(runs["old"].rank_deficient_share())
    (row,) = rank_runs(list(runs.values())).rows
    assert row["rank_deficient"] == pytest.approx(0.5)
    path, _ = write_report(tmp_path, tmp_path / "out")
    assert "rank &lt; |B| %" in path.read_text()


def seeded_rows(seed=0, n=9, seeds=2, jitter=0.2):
    """`plane_rows` run with `seeds` seeds: each configuration's seeds sit
    near each other in the plane and end near the same error."""
    rng = np.random.default_rng(seed + 100)
    rows = []
    for s in range(seeds):
        for row in plane_rows(seed, n=n):
            moved = dict(row, configuration=row["run"], seed=s)
            moved["run"] = row["run"] + (f"_seed{s}" if s else "")
            for key in ("final_C_K_bar", "final_L_K", "early_C_K_bar", "early_L_K"):
                moved[key] = row[key] * 10 ** rng.normal(0, jitter * 0.1)
            moved["test_error"] = row["test_error"] + rng.normal(0, 0.01)
            rows.append(moved)
    return rows


def test_a_seed_twin_is_left_out_with_its_run():
    """Each run is predicted by the other configurations' runs only: its
    own configuration's other seeds, its nearest neighbours, would give the
    answer away."""
    from keras_fim.reports.ranking import predict_in_the_plane

    rows = seeded_rows(0)
    for when in ("early", "final"):
        prediction = predict_in_the_plane(rows, when)
        rho, recovered, third = brute_plane(rows, when)
        assert prediction.rho == pytest.approx(rho)
        assert (prediction.best_recovered, prediction.best_count) == (recovered, third)
        assert prediction.runs == 18
    # Without the grouping the twin leaks: a closer, better-looking prediction.
    ungrouped = [{k: v for k, v in r.items() if k != "configuration"} for r in rows]
    leaked = predict_in_the_plane(ungrouped, "final")
    assert leaked.rho == pytest.approx(brute_plane(ungrouped, "final")[0])
    assert leaked.rho > predict_in_the_plane(rows, "final").rho
    # Two configurations, however many seeds: nothing to leave one out from.
    two = predict_in_the_plane(seeded_rows(0, n=2, seeds=3), "early")
    assert math.isnan(two.rho)
    assert two.reason.startswith("6 run(s) of 2 configuration(s)")


def test_each_seed_is_predicted_as_a_study_of_its_own():
    from keras_fim.reports.ranking import predict_per_seed

    rows = seeded_rows(1, seeds=3)
    by_seed = predict_per_seed(rows, "early")
    assert list(by_seed) == [0, 1, 2]
    for seed, prediction in by_seed.items():
        own = [r for r in rows if r["seed"] == seed]
        rho, recovered, third = brute_plane(own, "early")
        assert prediction.rho == pytest.approx(rho)
        assert (prediction.best_recovered, prediction.best_count) == (recovered, third)
        assert prediction.runs == 9


def test_spread_over_seeds_against_hand_computation():
    from keras_fim.reports.seeds import seed_spread, spread_over_seeds

    def row(configuration, seed, error, condition, energy):
        return {
            "configuration": configuration,
            "seed": seed,
            "test_error": error,
            "final_C_K_bar": condition,
            "final_L_K": energy,
        }

    rows = [
        row("a", 0, 0.10, 10.0, 1.0),
        row("a", 1, 0.20, 30.0, 3.0),
        row("a", 2, 0.40, 20.0, math.nan),  # an L_K that was never measured
        row("b", 1, 0.50, 5.0, 2.0),
        row("b", 0, 0.50, 7.0, 4.0),
        row("c", 0, 0.05, 1.0, 1.0),
    ]
    spread = spread_over_seeds(rows)
    assert [e["configuration"] for e in spread] == ["c", "a", "b"]
    c, a, b = spread
    assert a["seeds"] == [0, 1, 2] and b["seeds"] == [0, 1] and c["runs"] == 1
    # a: errors .1, .2, .4: mean 7/30, squared deviations sum 0.0466..., / 2.
    assert a["test_error_mean"] == pytest.approx(0.7 / 3)
    assert a["test_error_std"] == pytest.approx(math.sqrt(0.14 / 3 / 2))
    assert (a["test_error_min"], a["test_error_max"]) == (0.10, 0.40)
    assert a["final_C_K_bar_mean"] == pytest.approx(20.0)
    assert a["final_C_K_bar_std"] == pytest.approx(10.0)
    assert a["final_L_K_mean"] == pytest.approx(2.0)  # over the two finite ones
    assert (a["final_L_K_min"], a["final_L_K_max"]) == (1.0, 3.0)
    assert b["test_error_std"] == 0.0 and math.isnan(c["test_error_std"])
    summary = seed_spread(spread)
    assert summary.seeds == 3 and summary.repeated == 2
    assert summary.mean_range == pytest.approx((0.30 + 0.0) / 2)
    assert summary.largest_range == pytest.approx(0.30)
    # pooled: (2 * var_a + 1 * var_b) / (2 + 1), var_a = 0.14 / 6, var_b = 0
    assert summary.within_std == pytest.approx(math.sqrt(2 * 0.14 / 6 / 3))
    means = [0.05, 0.7 / 3, 0.5]
    mean = sum(means) / 3
    assert summary.between_std == pytest.approx(
        math.sqrt(sum((m - mean) ** 2 for m in means) / 2)
    )
    assert (summary.lowest_mean, summary.highest_mean) == pytest.approx((0.05, 0.5))
    assert seed_spread(spread_over_seeds([r for r in rows if r["seed"] == 0])) is None


def test_a_study_with_seeds_reports_the_spread(tmp_path):
    """Runs named as `keras-fim study --seeds 2` names them: the ranking
    groups them by configuration, the report and the findings show the
    spread and each seed's prediction."""
    errors = {
        "bs16_lr0.1": (0.1, 0.2),
        "bs64_lr0.1": (0.3, 0.3),
        "bs256_lr0.1": (0.5, 0.4),
        "staged_lr0.1": (0.2, 0.1),
    }
    for index, (name, by_seed) in enumerate(errors.items()):
        for seed, error in enumerate(by_seed):
            write_run(
                tmp_path / "logs" / (name + (f"_seed{seed}" if seed else "")),
                steps=[1, 2, 3],
                condition=[5.0 + index, 4.0 + seed, 3.0 + index + seed],
                energy=[0.1, 0.2, 0.3 * (index + 1)],
                rates=[0.1] * 3,
                test_error=error,
                epoch_ends=[3],
            )
    ranking = rank_runs(find_runs(tmp_path / "logs"))
    assert {(r["configuration"], r["seed"]) for r in ranking.rows} == {
        (name, seed) for name in errors for seed in (0, 1)
    }
    assert [e["configuration"] for e in ranking.spread] == [
        "bs16_lr0.1",
        "staged_lr0.1",
        "bs64_lr0.1",
        "bs256_lr0.1",
    ]
    assert ranking.seed_spread.mean_range == pytest.approx(0.3 / 4)
    assert sorted(ranking.plane_by_seed["early"]) == [0, 1]
    assert ranking.plane_by_seed["final"][1].runs == 4
    text = " ".join(ranking.findings())
    assert "all seeds of its own left out" in text
    assert (
        "Seed by seed, the map of that seed's other runs, queried at its early" in text
    )
    assert "Between its 2 seeds, a configuration's test error moves by 7.50 " in text
    # Seed 1 against seed 0: test errors .2 .3 .4 .1 against .1 .3 .5 .2.
    (pair,) = ranking.seed_agreement["test error"]
    assert pair[:2] == (0, 1)
    assert pair[2] == pytest.approx(
        _brute_spearman([0.1, 0.3, 0.5, 0.2], [0.2, 0.3, 0.4, 0.1])
    )
    assert "How seed 1 repeats seed 0, over the configurations both ran: test" in text
    assert (
        "significantly predict in every seed" in text
        or "predicts in every seed" in text
    )
    path, _ = write_report(tmp_path / "logs", tmp_path / "out")
    page = path.read_text()
    assert 'id="spread"' in page and 'id="per-seed"' in page
    assert "counts the runs as independent" in page
    assert "10.00–20.00" in page  # bs16's test error over its seeds, in %
    single = rank_runs(find_runs(tmp_path / "logs" / "bs16_lr0.1"))
    assert single.seed_spread is None and single.plane_by_seed == {}


def test_agreement_between_seeds_is_each_pairs_spearman():
    from keras_fim.reports.ranking import agreement_between_seeds

    rng = np.random.default_rng(5)
    rows = [
        {
            "configuration": f"c{c}",
            "seed": seed,
            "test_error": float(rng.uniform()),
            "final_C_K_bar": float(10 + c + rng.normal(0, 0.5)),
            "final_L_K": float(rng.uniform()),
        }
        for seed in (0, 1, 4)
        for c in range(6)
        if (seed, c) != (4, 5)  # seed 4 did not run c5
    ]
    agreement = agreement_between_seeds(rows)
    assert list(agreement) == ["test error", "final C_K_bar", "final L_K"]
    value = {(r["seed"], r["configuration"], k): r[k] for r in rows for k in r}
    for label, key in (("test error", "test_error"), ("final L_K", "final_L_K")):
        assert [(a, b) for a, b, *_ in agreement[label]] == [(0, 1), (0, 4), (1, 4)]
        for a, b, rho, p in agreement[label]:
            both = [f"c{c}" for c in range(5 if 4 in (a, b) else 6)]
            assert rho == pytest.approx(
                _brute_spearman(
                    [value[a, c, key] for c in both], [value[b, c, key] for c in both]
                )
            )
            assert 0 <= p <= 1


def test_with_seeds_the_map_predicts_only_if_it_does_in_every_seed():
    """Pooled, seed twins count as independent runs and shrink the p-value;
    the verdict is therefore taken seed by seed."""
    from keras_fim.reports.ranking import (
        Ranking,
        predict_in_the_plane,
        predict_per_seed,
    )

    def ranking(rows):
        return Ranking(
            rows,
            {},
            0.1,
            {w: predict_in_the_plane(rows, w) for w in ("early", "final")},
            plane_by_seed={w: predict_per_seed(rows, w) for w in ("early", "final")},
        )

    rows = seeded_rows(0, n=12, seeds=2)
    assert ranking(rows).map_predicts("final")
    # Seed 1's errors reversed: that seed's own map no longer predicts them.
    seed1 = [r for r in rows if r["seed"] == 1]
    for row, error in zip(seed1, [r["test_error"] for r in seed1][::-1], strict=True):
        row["test_error"] = error
    mixed = ranking(rows)
    assert not mixed.plane_by_seed["final"][1].p < 0.05
    assert not mixed.map_predicts("final")
