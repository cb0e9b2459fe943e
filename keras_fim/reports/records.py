"""Reading keras-fim runs back from TensorBoard event files.

A *run* is any folder whose ``train/`` subfolder holds keras-fim's
``fisher/*`` charts (a `FisherCallback` or `FisherModel` log dir, or one run
of ``keras-fim study``). Its hyper-parameters come from TensorBoard's HParams
summary when there is one, its test error from ``study/test_error`` or else
from the last ``epoch_accuracy`` of its ``validation/`` folder.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

import numpy as np

from keras_fim import summaries

TRAIN, VALIDATION = "train", "validation"


@dataclasses.dataclass
class RunRecord:
    """What one run logged.

    Attributes:
        name: the run's folder, relative to the log dir read (its own
            folder's name when the log dir read is the run).
        path: the run's folder.
        hparams: ``{name: value}`` from the HParams summary (may be empty).
        scalars: ``{tag: (steps, values)}``, numpy arrays, of every scalar
            of ``train/`` and of the run's own folder.
        spectra: ``(steps, [eigenvalues of F at that step])`` from
            ``fisher/spectrum``, eigenvalues sorted in decreasing order.
        test_error: the final test error, or `None` if the run has none.
    """

    name: str
    path: Path
    hparams: dict
    scalars: dict[str, tuple[np.ndarray, np.ndarray]]
    spectra: tuple[np.ndarray, list[np.ndarray]]
    test_error: float | None

    def series(self, tag: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of `tag`; empty arrays if it was not logged."""
        return self.scalars.get(tag, (np.zeros(0, int), np.zeros(0)))

    @property
    def iterations(self) -> int:
        """The number of training steps the run logged."""
        _steps, values = self.series(summaries.ITERATIONS)
        if len(values):
            return int(values[-1])
        return int(self.series(summaries.C_K_BAR)[0].max(initial=0))

    def epochs_at(self, steps: np.ndarray) -> np.ndarray | None:
        """Fractional epochs of the given steps (from ``study/iterations``),
        or `None` where the run did not record its epoch ends."""
        epochs, ends = self.series(summaries.ITERATIONS)
        if not len(ends):
            return None
        return np.interp(
            steps, np.concatenate([[0], ends]), np.concatenate([[0], epochs])
        )

    def cumulative_learning_rate(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, sum of the learning rates of steps 1..step)`` at the
        measured steps, each measured rate held over the steps since the
        previous measurement (as L_K scales its sum by the sampling ratio)."""
        steps, rates = self.series(summaries.LEARNING_RATE)
        gaps = np.diff(np.concatenate([[0], steps]))
        return steps, np.cumsum(rates * gaps)

    def value_at_fraction(self, tag: str, fraction: float) -> float:
        """`tag`'s value at the last measurement within the first `fraction`
        of the run's steps (the first measurement if none is that early)."""
        steps, values = self.series(tag)
        if not len(values):
            return math.nan
        index = np.searchsorted(steps, fraction * self.iterations, side="right") - 1
        return float(values[max(index, 0)])

    def rank_deficient_share(self) -> float:
        """The share of measurements whose rank is below their batch size
        (eigenvalues at or below the zero threshold); NaN without any."""
        rank_steps, ranks = self.series(summaries.RANK)
        size_steps, sizes = self.series(summaries.BATCH_SIZE)
        common, in_rank, in_size = np.intersect1d(
            rank_steps, size_steps, return_indices=True
        )
        if not len(common):
            return math.nan
        return float(np.mean(ranks[in_rank] < sizes[in_size]))

    def final(self, tag: str) -> float:
        """`tag`'s last value (NaN if it was not logged)."""
        values = self.series(tag)[1]
        return float(values[-1]) if len(values) else math.nan


def _accumulator(path: Path):
    from tensorboard.backend.event_processing import event_accumulator

    accumulator = event_accumulator.EventAccumulator(
        str(path), size_guidance={event_accumulator.TENSORS: 0}
    )
    accumulator.Reload()
    return accumulator


def _tensors(accumulator) -> tuple[dict, list]:
    """Scalars ``{tag: (steps, values)}`` and the ``fisher/spectrum`` tensors."""
    from tensorboard.util import tensor_util

    scalars, spectra = {}, []
    for tag in accumulator.Tags()["tensors"]:
        events = accumulator.Tensors(tag)
        arrays = [tensor_util.make_ndarray(e.tensor_proto) for e in events]
        if tag == summaries.SPECTRUM:
            spectra = [
                (e.step, a.astype(float)) for e, a in zip(events, arrays, strict=True)
            ]
        elif arrays and all(a.ndim == 0 and a.dtype.kind in "fiu" for a in arrays):
            scalars[tag] = (
                np.array([e.step for e in events], dtype=np.int64),
                np.array([float(a) for a in arrays]),
            )
    return scalars, spectra


def _hparams(accumulator) -> dict:
    from tensorboard.plugins.hparams import metadata

    try:
        content = accumulator.PluginTagToContent(metadata.PLUGIN_NAME)
    except KeyError:  # the run logged no hyper-parameters
        return {}
    data = content.get(metadata.SESSION_START_INFO_TAG)
    if data is None:
        return {}
    info = metadata.parse_session_start_info_plugin_data(data)
    hparams = {}
    for name, value in info.hparams.items():
        kind = value.WhichOneof("kind")
        hparams[name] = getattr(value, kind) if kind else None
    return hparams


def read_run(path: str | os.PathLike, name: str | None = None) -> RunRecord:
    """Reads the run in folder `path`.

    Example:

    >>> import tempfile
    >>> read_run(tempfile.mkdtemp()).scalars
    {}
    """
    path = Path(path)
    scalars, spectra = {}, []
    if (path / TRAIN).is_dir():
        scalars, spectra = _tensors(_accumulator(path / TRAIN))
    own = _accumulator(path)
    own_scalars, _ = _tensors(own)
    scalars.update(own_scalars)
    test_error = None
    if summaries.TEST_ERROR in scalars:
        test_error = float(scalars[summaries.TEST_ERROR][1][-1])
    elif (path / VALIDATION).is_dir():
        accuracy = _tensors(_accumulator(path / VALIDATION))[0].get("epoch_accuracy")
        if accuracy is not None:
            test_error = 1.0 - float(accuracy[1][-1])
    # Eigenvalues past the rank are below the zero threshold: drop them.
    rank_steps, ranks = scalars.get(summaries.RANK, ([], []))
    rank_at = dict(
        zip(np.asarray(rank_steps).tolist(), np.asarray(ranks).tolist(), strict=True)
    )
    spectra = [(s, v[: int(rank_at.get(s, len(v)))]) for s, v in spectra]
    spectrum_steps = np.array([s for s, _ in spectra], dtype=np.int64)
    return RunRecord(
        name=name or path.name,
        path=path,
        hparams=_hparams(own),
        scalars=scalars,
        spectra=(spectrum_steps, [v for _, v in spectra]),
        test_error=test_error,
    )


def _natural(name: str) -> list:
    """Sort key: numbers inside names compare as numbers (bs16 < bs64 < bs256)."""
    return [
        (0, float(part), "") if part[:1].isdigit() else (1, 0.0, part)
        for part in re.findall(r"\d+(?:\.\d+)?|\D+", name)
    ]


def find_runs(log_dir: str | os.PathLike) -> list[RunRecord]:
    """Every run under `log_dir` (itself included) that logged ``fisher/C_K_bar``,
    sorted by name, numbers in names by value.

    Raises:
        FileNotFoundError: `log_dir` does not exist.
    """
    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        raise FileNotFoundError(
            f"`log_dir` must be an existing folder of TensorBoard runs. Received: "
            f"log_dir={str(log_dir)!r}"
        )
    runs = []
    for train in sorted(log_dir.glob(f"**/{TRAIN}")):
        if not train.is_dir() or not any(train.glob("events.out.tfevents.*")):
            continue
        run = train.parent
        # A log dir that is itself a run is named by its folder, not ".".
        name = run.resolve().name if run == log_dir else str(run.relative_to(log_dir))
        record = read_run(run, name=name)
        if summaries.C_K_BAR in record.scalars:
            runs.append(record)
    return sorted(runs, key=lambda run: _natural(run.name))
