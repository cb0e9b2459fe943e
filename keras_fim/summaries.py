"""TensorBoard output of the Fisher measurements.

Written under ``<log_dir>/train`` like `keras.callbacks.TensorBoard`, with the
same x-axis as its batch-level charts: the 1-based number of the training
batch (equal to `optimizer.iterations` after the step), counted over all `fit`
calls. The summaries are written from inside the compiled train step, with a
step tensor, so every measured step lands on its own point even with
`steps_per_execution > 1`.
"""

from __future__ import annotations

import math
import os

import tensorflow as tf

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
    "rank",
    "batch_size",
    "learning_rate",
    "skipped",
)


def create_writer(log_dir: str):
    """A summary writer for ``<log_dir>/train``, with the chart layout of
    every keras-fim tag (`FisherCallback`'s and `DynamicSampling`'s)."""
    writer = tf.summary.create_file_writer(os.path.join(log_dir, "train"))
    with writer.as_default(step=0):
        _write_layout()
    writer.flush()
    return writer


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
                ],
            ),
            layout_pb2.Category(
                title="keras-fim: gradient and sampling",
                chart=[
                    chart("mini-batch gradient norm", "gradient_norm"),
                    chart("gradient noise scale B_simple", "gradient_noise_scale"),
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
    """Writes one measured step (graph-safe)."""
    values = {
        **running,
        "condition_number": measurement.condition_number,
        "eigenvalue_max": measurement.eigenvalues[0],
        "eigenvalue_min": measurement.eigenvalue_min,
        "trace": measurement.trace,
        "gradient_norm": measurement.gradient_norm,
        "gradient_noise_scale": measurement.gradient_noise_scale,
        "rank": measurement.rank,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
    }
    # "fisher/" ends with a slash: an absolute name scope, so the tags stay
    # "fisher/..." even when written inside a tf.cond or while loop.
    with writer.as_default(step=step), tf.name_scope("fisher/"):
        for name in SCALARS:
            value = tf.cast(values[name], tf.float64)
            # Undefined values (B_simple with a negative |G|^2 estimate, ...)
            # are left out rather than drawn as NaN.
            with tf.summary.record_if(tf.math.is_finite(value)):
                tf.summary.scalar(name, value)
        nonzero = measurement.eigenvalues[: measurement.rank]
        tf.summary.histogram("log10_eigenvalues", tf.math.log(nonzero) / math.log(10.0))
        tf.summary.write("fisher/spectrum", measurement.eigenvalues)


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
