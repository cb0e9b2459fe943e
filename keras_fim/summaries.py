"""TensorBoard output: the Fisher measurements (``fisher/*``, ``fisher_layers/*``),
`DynamicSampling` (``sampling/*``), and the tag names other modules share.

Written under ``<log_dir>/train`` like `keras.callbacks.TensorBoard`, with the
same x-axis as its batch-level charts: the 1-based number of the training
batch (equal to `optimizer.iterations` after the step), counted over all `fit`
calls. The summaries are written from inside the compiled train step, with a
step tensor, so every measured step lands on its own point even with
`steps_per_execution > 1`.

Resumed runs. keras-fim's callbacks in one process share one writer per log
folder (one event file per `fit`), and at the start of every `fit` the file
gets a ``SessionLog.START`` event at the first step that `fit` will write
(`start_session`). TensorBoard's readers then drop whatever an earlier,
interrupted process wrote at that step or later: after `BackupAndRestore`
resumes a killed run, the steps recomputed since the last backup appear once,
with the resumed values, and the charts continue as if never interrupted.
(TensorBoard's Python reader, `plugin_event_accumulator`, purges on
``SessionLog.START``; its Rust data server drops a series' points at or
after a step written again. The legacy `event_accumulator.EventAccumulator`
never purges tensor summaries, the only kind TF2 writes: read with it, keep
the last value of each step.) A fresh run started in the folder of an old
one therefore hides the old run's points from step 1 on, as TensorBoard does
for any restarted job.
"""

from __future__ import annotations

import math
import os
import time
import warnings
import weakref

import tensorflow as tf
from tensorflow.core.util import event_pb2

from keras_fim._keras_compat import import_event, reopen_file_writer
from keras_fim.measurements import FisherMeasurement

SCALARS = (
    "C_K_bar",
    "L_K",
    "condition_number",
    "condition_number_ema",
    "eigenvalue_max",
    "eigenvalue_min",
    "trace",
    "gradient_norm",
    "gradient_noise_scale",
    "noise_scale",
    "rank",
    "zero_threshold",
    "batch_size",
    "learning_rate",
    "skipped",
)

# `DynamicSampling`'s tags, under "sampling/": every trained step's ...
SAMPLING_SCALARS = ("batch_size", "learning_rate", "learning_rate_gain")
# ... and, for `Automatic`, the signal and its threshold at every decision.
SAMPLING_DECISION_SCALARS = ("signal", "threshold")

# Full tag names that other modules write or read (the study, the reports).
C_K_BAR = "fisher/C_K_bar"
L_K = "fisher/L_K"
LEARNING_RATE = "fisher/learning_rate"
RANK = "fisher/rank"
BATCH_SIZE = "fisher/batch_size"
SPECTRUM = "fisher/spectrum"
TEST_ERROR = "study/test_error"
TEST_LOSS = "study/test_loss"
ITERATIONS = "study/iterations"


def create_writer(log_dir: str):
    """A summary writer for ``<log_dir>/train``, with the chart layout of
    every keras-fim tag (`FisherCallback`'s and `DynamicSampling`'s).

    Callers in one process asking for the same folder while it is open share
    one writer, so that one `fit` writes one event file there (see
    `start_session`); each caller calls `close()` once, and the last one
    closes the file. A closed writer that is still referenced (a
    `FisherCallback` keeps its traced train functions, which write through
    it, for its next `fit`) is reopened on the same resource, with a new
    event file, when its folder is asked for again."""
    path = os.path.join(log_dir, "train")
    key = path if "://" in path else os.path.abspath(path)
    shared = _OPEN_WRITERS.get(key)
    if shared is None:
        shared = _CLOSED_WRITERS.pop(key, None)
        if shared is not None:
            # A new event file on the same resource: train functions traced
            # with this writer (kept by a callback that reuses them) write
            # into it.
            reopen_file_writer(shared.writer, path)
            shared.session_step = None
        else:
            shared = _SharedWriter(tf.summary.create_file_writer(path), key)
        with shared.writer.as_default(step=0):
            _write_layout()
        shared.writer.flush()
        _OPEN_WRITERS[key] = shared
    shared.users += 1
    return shared


_OPEN_WRITERS: dict = {}
# Closed writers still referenced (by a callback's traced functions), by
# folder: `create_writer` reopens them rather than creating another resource.
_CLOSED_WRITERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


class _SharedWriter(tf.summary.SummaryWriter):
    """A `tf.summary` writer shared by keras-fim's callbacks (reference
    counted: the last `close()` closes the file)."""

    def __init__(self, writer, key: str):
        self.writer = writer
        self.key = key
        self.users = 0
        self.session_step = None  # the step of this file's SessionLog.START

    def as_default(self, step=None):
        return self.writer.as_default(step)

    def set_as_default(self, step=None):
        self.writer.set_as_default(step)

    def init(self):
        return self.writer.init()

    def flush(self):
        return self.writer.flush()

    def close(self):
        self.users -= 1
        if self.users > 0:
            return None
        if _OPEN_WRITERS.get(self.key) is self:
            del _OPEN_WRITERS[self.key]
            _CLOSED_WRITERS[self.key] = self
        return self.writer.close()

    def __getattr__(self, name):
        if name == "writer":
            raise AttributeError(name)
        return getattr(self.writer, name)


def start_session(writer, first_step: int) -> None:
    """Writes ``SessionLog.START`` at `first_step` (once per event file),
    before anything else of this `fit` at that step or later.

    `first_step` is the first step the `fit` will write (the state's step
    after `BackupAndRestore` restored it, plus one). TensorBoard (with
    ``purge_orphaned_data``, the default) then drops every point at
    `first_step` or later read before it, from any tag of the folder: the
    points an interrupted process wrote after its last backup, which this
    `fit` recomputes. Files are read in name order, which is creation time.
    """
    if getattr(writer, "session_step", None) is not None:
        return
    event = event_pb2.Event(
        wall_time=time.time(),
        step=int(first_step),
        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
    )
    try:
        import_event(writer, event.SerializeToString())
        writer.flush()
    except Exception as error:
        warnings.warn(
            "keras-fim could not mark the start of this fit in the TensorBoard "
            "events, so points an interrupted run wrote after its last backup "
            f"may show twice. Cause: {type(error).__name__}: {error}",
            stacklevel=2,
        )
    if isinstance(writer, _SharedWriter):
        writer.session_step = int(first_step)


def _write_layout() -> None:
    """A custom-scalars layout grouping the keras-fim charts."""
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.custom_scalar import summary as custom_scalar

    def chart(title, *tags):
        return layout_pb2.Chart(
            title=title,
            multiline=layout_pb2.MultilineChartContent(
                tag=[f"^{t}$" if "/" in t else f"^fisher/{t}$" for t in tags]
            ),
        )

    layout = layout_pb2.Layout(
        category=[
            layout_pb2.Category(
                title="keras-fim: the paper's measurements",
                chart=[
                    chart("C_K bar (running mean of c_k)", "C_K_bar"),
                    chart("L_K (weighted cumulative energy)", "L_K"),
                    chart(
                        "c_k and its EMA", "condition_number", "condition_number_ema"
                    ),
                ],
            ),
            layout_pb2.Category(
                title="keras-fim: the Fisher spectrum",
                chart=[
                    chart(
                        "eigenvalues of F (max, min non-zero)",
                        "eigenvalue_max",
                        "eigenvalue_min",
                    ),
                    chart("trace of F", "trace"),
                    chart("rank", "rank"),
                    chart("zero threshold (relative to the largest)", "zero_threshold"),
                ],
            ),
            layout_pb2.Category(
                title="keras-fim: gradient and sampling",
                chart=[
                    chart("mini-batch gradient norm", "gradient_norm"),
                    chart(
                        "gradient noise scale B_simple (batch, running)",
                        "gradient_noise_scale",
                        "noise_scale",
                    ),
                    chart(
                        "batch size and learning rate", "batch_size", "learning_rate"
                    ),
                ],
            ),
            layout_pb2.Category(
                title="keras-fim: dynamic sampling",
                chart=[
                    chart("batch size trained", "sampling/batch_size"),
                    chart("learning rate applied", "sampling/learning_rate"),
                    chart("learning-rate gain", "sampling/learning_rate_gain"),
                    chart(
                        "automatic mode: signal and threshold",
                        "sampling/signal",
                        "sampling/threshold",
                    ),
                ],
            ),
        ]
    )
    tf.summary.experimental.write_raw_pb(
        custom_scalar.pb(layout).SerializeToString(), step=0
    )


def write_measurement(
    writer,
    step: tf.Tensor,
    measurement: FisherMeasurement,
    running: dict,
    learning_rate: tf.Tensor,
    batch_size: tf.Tensor,
) -> None:
    """Writes one measured step (graph-safe); a name of `SCALARS` missing
    from `running` and the measurement's values is not written."""
    values = {
        **running,
        "condition_number": measurement.condition_number,
        "eigenvalue_max": measurement.eigenvalues[0],
        "eigenvalue_min": measurement.eigenvalue_min,
        "trace": measurement.trace,
        "gradient_norm": measurement.gradient_norm,
        "gradient_noise_scale": measurement.gradient_noise_scale,
        "rank": measurement.rank,
        "zero_threshold": measurement.zero_threshold,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
    }
    # "fisher/" ends with a slash: an absolute name scope, so the tags stay
    # "fisher/..." even when written inside a tf.cond or while loop.
    with writer.as_default(step=step), tf.name_scope("fisher/"):
        for name in SCALARS:
            if name not in values:  # not measured in this fit
                continue
            value = tf.cast(values[name], tf.float64)
            # Undefined values (B_simple with a non-positive estimate, ...)
            # are left out rather than drawn as NaN or with a wrong sign.
            with tf.summary.record_if(tf.math.is_finite(value)):
                tf.summary.scalar(name, value)
        nonzero = measurement.eigenvalues[: measurement.rank]
        tf.summary.histogram("log10_eigenvalues", tf.math.log(nonzero) / math.log(10.0))
        tf.summary.write(SPECTRUM, measurement.eigenvalues)


def write_layer_measurements(
    writer, step: tf.Tensor, layers: dict, total_trace: tf.Tensor
) -> None:
    """Writes each layer's own spectrum (`FisherCallback(per_layer=True)`):
    ``fisher_layers/<layer>/trace_share``, ``eigenvalue_max`` and
    ``condition_number``."""
    with writer.as_default(step=step):
        for name, measurement in layers.items():
            with tf.name_scope(f"fisher_layers/{name}/"):
                values = {
                    "trace_share": measurement.trace / total_trace,
                    "eigenvalue_max": measurement.eigenvalues[0],
                    "condition_number": measurement.condition_number,
                }
                for tag, value in values.items():
                    value = tf.cast(value, tf.float64)
                    with tf.summary.record_if(tf.math.is_finite(value)):
                        tf.summary.scalar(tag, value)


def write_sampling_step(
    writer,
    step: tf.Tensor,
    batch_size: tf.Tensor,
    learning_rate: tf.Tensor,
    learning_rate_gain: tf.Tensor,
) -> None:
    """Writes one step trained by `DynamicSampling` (graph-safe):
    ``sampling/batch_size``, ``sampling/learning_rate`` (the rate applied)
    and ``sampling/learning_rate_gain``."""
    values = {
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "learning_rate_gain": learning_rate_gain,
    }
    # An absolute name scope, as for "fisher/".
    with writer.as_default(step=step), tf.name_scope("sampling/"):
        for name in SAMPLING_SCALARS:
            tf.summary.scalar(name, values[name])


def write_sampling_decision(writer, step: int, signal: float, threshold: float) -> None:
    """Writes the signal of an `Automatic` decision and the threshold it is
    compared with: ``sampling/signal`` and ``sampling/threshold``."""
    values = {"signal": signal, "threshold": threshold}
    with writer.as_default(step=step):
        for name in SAMPLING_DECISION_SCALARS:
            tf.summary.scalar(f"sampling/{name}", values[name])
