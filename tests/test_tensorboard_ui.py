"""TensorBoard as a user sees it: the real server on a keras-fim study, its
HTTP data endpoints, and a real headless Chromium on the dashboards.

The browser test needs Debian's Chromium (`.ci/run` installs it); without it
the test is skipped, except on CI (CI=true), where it fails."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
from fim_helpers import free_port

from keras_fim.reports import find_runs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifacts")
FISHER_TAGS = (
    "fisher/C_K_bar",
    "fisher/L_K",
    "fisher/condition_number",
    "fisher/trace",
)


@pytest.fixture(scope="module")
def tensorboard(tiny_study):
    root = tiny_study[0]
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(root),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast",
            "false",
            "--reload_interval",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            runs = _get(url, "/data/runs")
            if len(runs) >= 2 * len(tiny_study[1]):  # every run's train and validation
                break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(
                f"TensorBoard did not serve the study: {process.communicate()[0]}"
            )
        time.sleep(0.5)
    yield url, tiny_study
    process.terminate()
    process.wait(timeout=30)


def _get(url, path, **query):
    if query:
        path += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url + path, timeout=30) as response:
        return json.loads(response.read())


def test_scalar_endpoints_return_the_logged_values(tensorboard):
    url, (root, configs, _) = tensorboard
    tags = _get(url, "/data/plugin/scalars/tags")
    for run in find_runs(root):
        served = tags[f"{run.name}/train"]
        for tag in FISHER_TAGS:
            assert tag in served
            points = _get(
                url, "/data/plugin/scalars/scalars", run=f"{run.name}/train", tag=tag
            )
            steps, values = run.series(tag)
            np.testing.assert_array_equal([p[1] for p in points], steps)
            np.testing.assert_allclose([p[2] for p in points], values, rtol=1e-6)
    staged = next(c.name for c in configs if c.schedule == "staged")
    assert "sampling/batch_size" in tags[f"{staged}/train"]


def test_histogram_custom_scalar_and_hparams_endpoints(tensorboard):
    url, (_root, configs, results) = tensorboard
    histograms = _get(url, "/data/plugin/histograms/tags")
    assert all(
        "fisher/log10_eigenvalues" in histograms[f"{c.name}/train"] for c in configs
    )
    layout = _get(url, "/data/plugin/custom_scalars/layout")
    titles = [category["title"] for category in layout["category"]]
    assert any("keras-fim" in title for title in titles), titles
    charts = [chart for category in layout["category"] for chart in category["chart"]]
    assert any("^fisher/C_K_bar$" in chart["multiline"]["tag"] for chart in charts)

    experiment = _get(
        url,
        "/data/plugin/hparams/experiment",
        request=json.dumps({"experimentName": ""}),
    )
    names = {h["name"] for h in experiment["hparamInfos"]}
    assert {"batch_size", "learning_rate", "schedule"} <= names
    metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
    assert {"study/test_error", "fisher/C_K_bar", "fisher/L_K"} <= metrics
    groups = _get(
        url,
        "/data/plugin/hparams/session_groups",
        request=json.dumps(
            {
                "experimentName": "",
                "startIndex": 0,
                "sliceSize": 100,
                "allowedStatuses": [
                    "STATUS_UNKNOWN",
                    "STATUS_SUCCESS",
                    "STATUS_FAILURE",
                    "STATUS_RUNNING",
                ],
                "colParams": [],
            }
        ),
    )
    assert len(groups["sessionGroups"]) == len(configs)
    for group in groups["sessionGroups"]:
        name = group["name"]
        config = next(c for c in configs if c.name == name)
        assert group["hparams"]["learning_rate"] == pytest.approx(config.learning_rate)
        error = next(
            m["value"]
            for m in group["metricValues"]
            if m["name"]["tag"] == "study/test_error"
        )
        assert error == pytest.approx(results[name]["test_error"], abs=1e-6)


CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="module")
def browser_page():
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium is missing on CI: .ci/run installs Debian's chromium")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def _visible_filter(page):
    """The tag filter of the dashboard shown (others stay in the page, hidden)."""
    return page.locator("tf-tag-filterer input").locator("visible=true").first


def _drawn_lines(card) -> int:
    """The chart lines with data in a card (SVG paths of at least two points)."""
    lengths = card.locator("path.line").evaluate_all(
        "paths => paths.map(p => (p.getAttribute('d') || '').split(/[LC]/).length)"
    )
    return sum(points >= 2 for points in lengths)


def _screenshot(page, name):
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(
        path=os.path.join(ARTIFACTS, f"tensorboard_{name}.png"), full_page=True
    )


def _wait_for(condition, what, seconds=60):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"TensorBoard never showed {what}")
        time.sleep(0.5)


def test_dashboards_list_and_draw_the_keras_fim_charts(tensorboard, browser_page):
    url, (_root, configs, _) = tensorboard
    page = browser_page
    runs = len(configs)

    # Scalars: filter to the paper's two measurements; one line per run.
    page.goto(f"{url}/#scalars")
    _visible_filter(page).fill("^fisher/(C_K_bar|L_K)$")
    for tag in ("fisher/C_K_bar", "fisher/L_K"):
        card = page.locator("tf-scalar-card").filter(has_text=f"tag: {tag}")
        _wait_for(
            lambda card=card: card.count() == 1 and _drawn_lines(card) >= runs,
            f"{tag} drawn",
        )
    _screenshot(page, "scalars")

    # Histograms: the spectrum of every run.
    page.goto(f"{url}/#histograms")
    _visible_filter(page).fill("log10_eigenvalues")
    charts = page.locator("tf-histogram-loader")
    _wait_for(lambda: charts.count() >= runs, "a log10_eigenvalues histogram per run")
    _wait_for(lambda: charts.first.locator("path").count() > 0, "a histogram drawn")
    assert page.get_by_text("fisher/log10_eigenvalues").count() > 0
    _screenshot(page, "histograms")

    # Custom scalars: keras-fim's categories, with drawn charts.
    page.goto(f"{url}/#custom_scalars")
    _wait_for(
        lambda: page.get_by_text("keras-fim: the paper's measurements").count() > 0,
        "the keras-fim custom-scalar category",
    )
    card = page.locator("tf-custom-scalar-multi-line-chart-card").filter(
        has_text="C_K bar (running mean of c_k)"
    )
    _wait_for(
        lambda: card.count() == 1 and _drawn_lines(card) >= runs, "the C_K bar chart"
    )
    _screenshot(page, "custom_scalars")

    # HParams: every run of the study in the table view with its test error.
    page.goto(f"{url}/#hparams")
    for config in configs:
        _wait_for(
            lambda c=config: page.get_by_text(c.name, exact=True).count() > 0,
            f"the run {config.name} in the HParams table",
        )
    assert page.get_by_text("test error").count() > 0
    _screenshot(page, "hparams")
