"""One measured training step: the model's step, then the measurement of its
batch, with the variables as the step found them.

The pass the contributions come from is chosen here: the step's own forward
and backward pass where that is exact (`engine.probes.ProbedPass`), a
recorded pass of its own otherwise (`engine.record.record_pass`), or, for a
model with an objective of its own, a pass through its `per_example_loss`.
So are the Gram source (the local batch's, or the global batch's gathered
from every replica) and the gradient-noise source. Everything then goes the
one way of `engine.pipeline` (`grams_of_pass`, then `measure_grams`), into
`FisherState` and, with a writer, TensorBoard; with ``jit_compile=True`` the
step and the Gram are compiled by XLA, and the eigen-solves run outside it.
`FisherCallback` builds one `MeasuredStep` per set of train functions and
keeps the lifecycle (when to measure, which function, the writer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import keras
import tensorflow as tf

from keras_fim import summaries
from keras_fim._keras_compat import unlowered_cond
from keras_fim.engine.distribute import example_counts, gathered_grams
from keras_fim.engine.noise import (
    gradient_noise_components,
    noise_components_from_gram,
    noise_components_from_groups,
)
from keras_fim.engine.pipeline import (
    PassGrams,
    grams_of_pass,
    local_grams,
    measure_grams,
)
from keras_fim.engine.probes import ProbedPass, reuses_training_pass
from keras_fim.engine.record import PerExampleLoss, record_pass
from keras_fim.engine.scaling import loss_scale, replicas_in_sync, update_applied
from keras_fim.engine.units import batch_size as batch_size_of
from keras_fim.engine.units import read_variables, resolve_layers
from keras_fim.state import FisherState

if TYPE_CHECKING:
    from keras_fim.callback import FisherCallback


class Pending(NamedTuple):
    """A measurement formed up to its Gram matrix, to be solved and
    recorded (a tuple, so that a traced function can return it).

    Attributes:
        grams: The `engine.pipeline.PassGrams` of the measured examples.
        learning_rate: The learning rate of the step's update.
        batch_size: The examples the step trained on (the global batch's
            under a strategy).
        update_applied: Whether the step applied its update (a tensor, or
            `True`).
        measured: Boolean tensor, whether the step counts as a measurement.
        noise_written: Boolean, whether the step gives a noise scale.
        distributed: Boolean, several replicas in sync.
    """

    grams: PassGrams
    learning_rate: tf.Tensor
    batch_size: tf.Tensor
    update_applied: object
    measured: tf.Tensor
    noise_written: bool
    distributed: bool


def compiled_by_xla(fn: Callable[[], object]):
    """`fn()` traced in a function of its own compiled by XLA: its tensors
    come from that function, its other values (Python numbers, `None`) as
    the trace left them."""
    traced = {}

    def compiled():
        traced["result"] = fn()
        return [
            leaf for leaf in tf.nest.flatten(traced["result"]) if tf.is_tensor(leaf)
        ]

    # Without AutoGraph, as Keras compiles its steps.
    tensors = iter(tf.function(compiled, jit_compile=True, autograph=False)())
    return tf.nest.map_structure(
        lambda leaf: next(tensors) if tf.is_tensor(leaf) else leaf, traced["result"]
    )


@dataclasses.dataclass
class MeasuredStep:
    """The measuring train step of one set of train functions.

    Called as ``step(original_step, data)`` inside the traced train
    function: it runs `original_step` (Keras's or the model's own) and
    builds the measurement of `data`'s batch. Nothing that fails while the
    measurement is built stops the step: `warn` is called with the error and
    the step runs as without it.

    Attributes:
        model: The `keras.Model` trained.
        state: Its `FisherState`.
        options: The `FisherCallback` whose options apply (read, never
            written).
        loss: `None` (the compiled loss) or the `per_example_loss` measured.
        noise_passes: Boolean, whether the half-batch passes of a
            batch-coupled model run (`FisherCallback.noise_scale`).
        steps_per_execution: Integer, the steps one function call serves.
        writer: A `tf.summary` writer or `None`.
        warn: Callable ``(error)``: a measurement could not be built.
        request_retrace: Callable ``()``: the functions must be traced again
            after this batch (a model its own first step builds).
        xla_apart: Boolean, whether the step and the Gram run in a function
            of their own compiled by XLA, and the eigen-solves and records
            outside it (a model compiled with ``jit_compile=True``, on one
            replica; the train function is then compiled without XLA).
        in_graph_choice: Boolean, whether one function serves measured and
            unmeasured steps alike, the measurement built under a condition
            on the step (with several steps per execution; and on one
            replica without XLA when not every step is measured: one
            function to trace and optimise instead of two, which halves
            what a first `fit` adds; issue 15). Defaults to
            ``steps_per_execution > 1``.
    """

    model: keras.Model
    state: FisherState
    options: FisherCallback
    loss: PerExampleLoss | None
    noise_passes: bool
    steps_per_execution: int
    writer: object
    warn: Callable[[Exception], None]
    request_retrace: Callable[[], None]
    xla_apart: bool = False
    in_graph_choice: bool | None = None

    def __post_init__(self):
        if self.in_graph_choice is None:
            self.in_graph_choice = self.steps_per_execution > 1

    @property
    def runs_noise_passes(self) -> bool:
        """Whether a batch-coupled model's half batches are run for real:
        when asked for (`noise_passes`), and through the compiled loss only
        (with a custom one the noise scale is left undefined)."""
        return self.noise_passes and self.loss is None

    def is_measured(self, step, epoch):
        """Whether the 0-based global `step` is measured (Python or tensors)."""
        return (epoch < self.options.dense_epochs) | (
            step % self.options.every_n_steps == 0
        )

    def steps_represented(self, epoch):
        """The training steps one measurement stands for (L_K's weight)."""
        dense = tf.cast(epoch, tf.int64) < self.options.dense_epochs
        return tf.where(dense, tf.constant(1, tf.int64), self.options.every_n_steps)

    def __call__(self, original_step, data):
        """Keras's own step, then the measurement of its batch with the
        variables as the step found them: from the step's own forward and
        backward pass where that is exact (`engine.probes.ProbedPass`),
        otherwise from a recorded pass of its own (`engine.record`)."""
        step = self._loss_step if self.loss is None else self._own_loss_step
        if self.xla_apart:
            return self._xla_apart(step, original_step, data)
        logs, form = step(original_step, data)
        if form is None:
            return logs
        if replicas_in_sync() > 1:
            self._record(form())
        else:
            self._when_measured(lambda: self._record(form()))
        return logs

    def _xla_apart(self, step, original_step, data):
        """`step` and the Gram compiled by XLA in a function of their own,
        the eigen-solves and records outside it: inside XLA, whose
        eigen-solver is Jacobi's, a 128 x 128 float64 solve took 100 ms
        against 2.8 ms (LAPACK), and a nested function without XLA does not
        leave it. With several steps per execution, a measured and a plain
        step are the two branches of one condition."""

        def measured():
            def compiled():
                logs, form = step(original_step, data)
                return logs, (None if form is None else form())

            logs, pending = compiled_by_xla(compiled)
            self._record(pending)
            return logs

        if self.steps_per_execution == 1:
            return measured()
        state = self.state
        return tf.cond(
            self.is_measured(state.step, state.epoch),
            measured,
            lambda: compiled_by_xla(lambda: original_step(data)),
        )

    def _loss_step(self, original_step, data):
        """``(logs, form)``: Keras's step run, and `form`, a function giving
        the `Pending` measurement of its batch (or `None`), to be called
        after it (in-graph, under the step's measured condition)."""
        model = self.model
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        inputs = self._step_inputs(x)
        distributed = replicas_in_sync() > 1
        # With several replicas, `max_examples` counts the global batch.
        max_examples = None if distributed else self.options.max_examples
        if self.options.reuse_training_pass and reuses_training_pass(
            model, original_step
        ):
            try:
                layers = resolve_layers(model, self.options.measured_layers)
                probe = ProbedPass(
                    model,
                    x,
                    max_examples,
                    layers=layers,
                    read_values=self.runs_noise_passes,
                )
            except Exception as error:
                self.warn(error)
                return original_step(data), None
            with probe:
                logs = original_step(data)
            recorded = probe.recorded
        else:
            # Read before the update (the reads precede its writes).
            variable_values = read_variables(model)
            logs = original_step(data)
            measured_batch = (x, y, sample_weight)
            if distributed and self.steps_per_execution > 1:
                # The collectives run at every step: on a step that is not
                # measured, a pass over one example serves them.
                state = self.state
                measured_batch = first_examples(
                    measured_batch, self.is_measured(state.step, state.epoch)
                )

            def recorded():
                return record_pass(
                    model,
                    *measured_batch,
                    max_examples=max_examples,
                    variable_values=variable_values,
                    measured_layers=self.options.measured_layers,
                )

        inputs["update_applied"] = update_applied(model, inputs["loss_scale"])
        return logs, lambda: self._form(
            inputs, recorded, (x, y, sample_weight), distributed
        )

    def _own_loss_step(self, original_step, data):
        """As `_loss_step`, for the model's own step and the gradients of
        `per_example_loss` on its batch, with the variables as the step
        found them (one device; `on_train_begin` leaves several replicas
        unmeasured). Whatever fails while the measurement is built leaves
        it out, with one warning: the step itself always runs."""
        model = self.model
        try:
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            scale = loss_scale(model)
            inputs = {
                "learning_rate": current_learning_rate(model),
                "batch_size": batch_size_of(x),
                "loss_scale": scale,
            }
            # Read before the update (the reads precede its writes).
            variables = [*model.trainable_variables, *model.non_trainable_variables]
            variable_values = read_variables(model)
        except Exception as error:  # never let a measurement stop training
            self.warn(error)
            return original_step(data), None
        logs = original_step(data)
        inputs["update_applied"] = update_applied(model, scale)
        if len(variables) != len(
            [*model.trainable_variables, *model.non_trainable_variables]
        ):
            # The step created variables (a model its own first step
            # builds): their values as the step found them are their initial
            # ones, which hold now, while the function is traced. Right for
            # this function's first run only, so it is traced again after
            # that batch.
            self.request_retrace()
            if self.steps_per_execution > 1:
                return logs, None  # one run covers several steps: not measured
            variable_values = values_before(model, variables, variable_values)

        def recorded():
            return record_pass(
                model,
                x,
                y,
                sample_weight,
                max_examples=self.options.max_examples,
                variable_values=variable_values,
                per_example_loss=self.loss,
                measured_layers=self.options.measured_layers,
            )

        return logs, lambda: self._form(inputs, recorded, (x, y, sample_weight), False)

    def _when_measured(self, build) -> None:
        """Runs `build()` at measured steps (in-graph where one function
        serves every step: `in_graph_choice`, under a condition whose
        measured branch stays a function of its own, `unlowered_cond`)."""
        if not self.in_graph_choice:
            build()
            return
        state = self.state

        def measured():
            build()
            return tf.constant(True)

        unlowered_cond(
            self.is_measured(state.step, state.epoch),
            measured,
            lambda: tf.constant(False),
        )

    def _step_inputs(self, x) -> dict:
        """What a measurement needs from before the update: the learning rate
        the update uses and the batch."""
        model = self.model
        if not model.built:
            # A subclassed model builds on its first call, which Keras's
            # own step would make only after the measurement.
            model(x, training=False)
        return {
            "learning_rate": current_learning_rate(model),
            "batch_size": tf.shape(keras.tree.flatten(x)[0])[0],
            "loss_scale": loss_scale(model),
        }

    def _form(self, inputs: dict, recorded, batch, distributed: bool):
        """The `Pending` measurement of one step (graph mode), the first
        half of the one pipeline (`engine.pipeline.grams_of_pass`), or
        `None` (with one warning) when it cannot be built: `recorded()`
        gives the recorded pass, `batch` is ``(x, y, sample_weight)``.

        Under several replicas in sync the Gram source is the global batch's
        (`engine.distribute`: the replicas all-gather their examples'
        factors, outside any `tf.cond`, and record the same values); in a
        function serving several steps it runs at every step, and
        `measured` gates the record and the writes."""
        model, state = self.model, self.state
        measured = tf.constant(True)
        if distributed and self.steps_per_execution > 1:
            measured = self.is_measured(state.step, state.epoch)
        try:
            record = recorded()
            if distributed:
                sizes, counts = example_counts(
                    record.examples, self.options.max_examples, measured
                )
                batch_size = tf.reduce_sum(sizes)

                def grams(r):
                    return gathered_grams(
                        r.units,
                        r.calls,
                        counts,
                        self.options.memory_budget,
                        self.options.fail_mode,
                    )[0]

                def coupled_noise(gram):
                    # The replicas' shards are real batches of their own
                    # (each normalised with its own statistics).
                    return noise_components_from_groups(gram, counts)

            else:
                batch_size = inputs["batch_size"]
                grams = local_grams(self.options.memory_budget, self.options.fail_mode)

                def coupled_noise(gram):
                    # Half batches of a batch-coupled model are run for real
                    # (through the compiled loss: not with a custom one, whose
                    # noise scale is then left undefined), when asked for.
                    nan = tf.constant(float("nan"), tf.float64)
                    if not self.runs_noise_passes:
                        return nan, nan

                    def passes():
                        return gradient_noise_components(
                            model, *batch, record.variable_values
                        )

                    if self.options.noise_scale in ("auto", "always", 1):
                        return passes()
                    # Every n-th measured step (counted before this one).
                    index = state.measurements + state.skipped
                    return tf.cond(
                        tf.equal(index % self.options.noise_scale, 0),
                        passes,
                        lambda: (nan, nan),
                    )

            # A non-finite Gram gives an all-NaN measurement, which
            # `FisherState.record` counts as skipped.
            # Whether this step can give a noise scale: free from the Gram
            # or the shards, or from the passes when they run.
            noise_written = distributed or not record.coupled or self.runs_noise_passes
            formed = grams_of_pass(
                record,
                grams=grams,
                noise=coupled_noise if record.coupled else noise_components_from_gram,
                per_layer=self.options.per_layer,
            )
        except Exception as error:  # never let a measurement stop training
            self.warn(error)
            return None
        return Pending(
            formed,
            inputs["learning_rate"],
            batch_size,
            inputs["update_applied"],
            measured,
            noise_written,
            distributed,
        )

    def _record(self, pending: Pending | None) -> None:
        """Solves a `Pending` measurement (the pipeline's second half,
        `engine.pipeline.measure_grams`) and records it in `FisherState`
        and, with a writer, TensorBoard."""
        if pending is None:
            return
        state = self.state
        try:
            result = measure_grams(pending.grams, self.options.zero_threshold)
        except Exception as error:  # never let a measurement stop training
            self.warn(error)
            return
        state.record(
            result.measurement,
            pending.learning_rate,
            pending.batch_size,
            self.steps_represented(state.epoch),
            self.options.ema_decay,
            result.noise_components,
            measured=pending.measured,
            update_applied=pending.update_applied,
        )
        if self.writer is None:
            return

        def write():
            self._write(
                result.measurement,
                result.layers,
                pending.learning_rate,
                pending.batch_size,
                pending.noise_written,
            )
            return tf.constant(True)

        if not pending.distributed:
            write()
            return
        first = tf.equal(
            tf.distribute.get_replica_context().replica_id_in_sync_group, 0
        )
        # Only the first replica writes (no collective in this branch).
        tf.cond(pending.measured & first, write, lambda: tf.constant(False))

    def _write(
        self, measurement, layers, learning_rate, batch_size, noise_written
    ) -> None:
        state = self.state
        step = state.step + 1
        running = {
            "C_K_bar": state.condition_mean,
            "L_K": state.energy_sum,
            "condition_number_ema": state.condition_ema,
            "skipped": state.skipped,
        }
        if noise_written:
            running["noise_scale"] = state.noise_scale
        summaries.write_measurement(
            self.writer, step, measurement, running, learning_rate, batch_size
        )
        if self.options.per_layer:
            summaries.write_layer_measurements(
                self.writer, step, layers, measurement.trace
            )


def first_examples(batch, measured):
    """`batch` (a nest of tensors), cut to its first example unless
    `measured` (a boolean tensor)."""
    first = next(t for t in keras.tree.flatten(batch) if t is not None)
    size = tf.shape(first)[0]
    keep = tf.where(measured, size, tf.minimum(size, 1))
    return keras.tree.map_structure(lambda t: t if t is None else t[:keep], batch)


def values_before(model, variables, values) -> tuple[list, list]:
    """`read_variables(model)` as before a step that created variables:
    `values` (read from `variables`, trainable then non-trainable) for the
    variables that existed then, and the current (initial) values, read
    eagerly, for those created since."""
    read = dict(zip((id(v) for v in variables), [*values[0], *values[1]], strict=True))

    def value(variable):
        if id(variable) in read:
            return read[id(variable)]
        with tf.init_scope():
            return tf.convert_to_tensor(variable.value)

    return (
        [value(v) for v in model.trainable_variables],
        [value(v) for v in model.non_trainable_variables],
    )


def current_learning_rate(model) -> tf.Tensor:
    optimizer = model.optimizer
    if optimizer is None:
        return tf.constant(float("nan"), tf.float64)
    return tf.cast(optimizer.learning_rate, tf.float64)
