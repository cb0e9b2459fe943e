"""`FisherCallback`: the Fisher spectrum of sampled training batches in `fit`."""

from __future__ import annotations

import warnings
from typing import Any

import keras
import tensorflow as tf

from keras_fim import summaries
from keras_fim._keras_compat import (
    is_default_strategy,
    is_keras_loss_computation,
    is_keras_train_step,
)
from keras_fim.engine.gram import check_fail_mode, check_memory_budget
from keras_fim.engine.record import PerExampleLoss
from keras_fim.measured_step import MeasuredStep
from keras_fim.state import FisherState, attach_state
from keras_fim.train_step import (
    begin_fit,
    compile_train_function,
    end_fit,
    noise_scale_readers,
    same_key,
    train_function_key,
)
from keras_fim.validation import (
    check_bool,
    check_callable,
    check_compiled_loss,
    check_int,
    check_layers,
    check_log_dir,
    check_noise_scale,
    check_real,
)


class FisherCallback(keras.callbacks.Callback):
    """Measures the approximate Fisher information of training batches.

    At the 0-based global training steps 0, N, 2N, ... (``N =
    every_n_steps``), and at every step of the first `dense_epochs` epochs,
    the actual training batch is measured before the weights are updated:
    per-example gradient contributions, the eigenvalues of ``F = J^T J/|B|``
    through the ``|B| x |B|`` Gram matrix, the truncated condition number
    ``c_k`` and the energy ``||J||_F``. From them it keeps the paper's
    running measurements (Liao et al., TPAMI 2020):

    * ``C_K_bar``: the mean of ``c_k`` over the measured steps;
    * ``L_K``: ``sum_k (lr_k / |B_k|) ||J_k||_F``, each measured step counting
      for the steps it stands for (`every_n_steps`, or 1 when measuring
      every step);
    * the exponential average of ``c_k`` (weight `ema_decay`).

    ``C_K_bar`` and ``L_K`` appear in the logs (progress bar, `History`). With
    a `log_dir`, every measurement is written for TensorBoard under
    ``<log_dir>/train`` (tags ``fisher/*``, a histogram of the log10
    eigenvalues and a custom-scalars layout), on the same x-axis as
    `keras.callbacks.TensorBoard`'s batch charts; both may share a `log_dir`.

    Measuring never changes training: the update is the model's own
    `train_step`, BatchNorm statistics and random seeds are not touched, and
    the weights after `fit` equal those of a run without the callback.

    What is measured is the gradient of each example's compiled loss, for a
    model that trains with Keras's own `train_step` and `compute_loss`. A
    model with a `train_step` (or `compute_loss`) of its own optimises an
    objective keras-fim cannot know (a GAN's, a loss with extra terms, one
    that needs no compiled loss): it is measured only with the per-example
    loss its step optimises, `per_example_loss`; without one, `fit` trains
    exactly as without the callback and measures nothing, with one warning
    saying so (docs/custom-loops.md).

    Under `MirroredStrategy` and `MultiWorkerMirroredStrategy` the measured
    batch is the global one (the replicas all-gather their examples' rows;
    every replica records the same values), and under mixed precision the
    per-example contributions are unscaled and accumulated in float32; a
    step whose update a `LossScaleOptimizer` skipped (an overflow) counts as
    skipped. Under other strategies (TPU, parameter server, central
    storage) it warns and leaves training to Keras. See docs/distribute.md.

    Degenerate and failed measurements never stop or change training:

    * A measured step is *skipped* when its ``c_k`` or its ``L_K`` term is
      not finite: NaN or inf in the inputs, the loss or the per-example
      gradients, a Gram matrix that overflows (its products are float64:
      only per-example gradients near 1e150 do), or a non-finite
      eigen-solver result (the solver never sees a non-finite matrix), or,
      with a `per_example_loss`, losses or calls of a measured layer whose
      number of rows is not the batch's (found only when the step runs).
      Its spectrum is then NaN with rank 0. A skipped step is counted in
      ``fisher_state.skipped`` (TensorBoard ``fisher/skipped``) and left
      out of ``C_K_bar``, ``K``, ``L_K`` and the averages.
    * All-zero per-example gradients (a zero loss, weights the output does
      not depend on): eigenvalues 0, rank 0, ``c_k`` undefined (NaN), so
      the step is skipped too.
    * A batch of one is measured: rank 1 (0, and skipped, if its gradient
      is zero), ``c_k = 1``, the one eigenvalue ``||g||^2``; it enters
      ``C_K_bar`` and ``L_K``; the gradient noise scale is undefined.
    * Duplicated (or linearly dependent) examples lower the rank; ``c_k``
      is taken over the non-zero eigenvalues and the step is kept.
    * One warning per `fit` (checked at each epoch end, one read of the
      counters) says how many measurements of that fit were skipped.
    * A measurement that cannot be built while the step is traced (a layer
      or a loss the engine cannot handle) is left out for the whole `fit`,
      with one warning giving the cause.

    Bad input is refused before training: an invalid option raises
    `ValueError` at construction, and `fit` raises `ValueError` at its
    start, before any step, for a model with Keras's own `train_step`
    compiled without a loss (one trained only through `add_loss`, for
    instance on inputs without labels) when no `per_example_loss` is given,
    a loss with ``reduction=None``, or a `log_dir` that cannot be written.

    The running state lives in `model.fisher_state` (Keras variables), so
    `save_weights` and `BackupAndRestore` keep it.

    Args:
        log_dir: Path or `None`. Where to write TensorBoard event files;
            `None` writes none. Defaults to `None`.
        every_n_steps: Integer >= 1, the measurement cadence ``N``. Defaults
            to `50`, as the paper's reference code.
        dense_epochs: Integer >= 0. Measure every step during the first
            `dense_epochs` epochs. Defaults to `0`.
        max_examples: Integer >= 2 or `None`. Measure at most this many
            examples of each batch (the first ones; the batch pass still uses
            the whole batch; under a distribution strategy, of the global
            batch, each replica measuring its first ``max_examples / R``).
            Defaults to `None` (all).
        zero_threshold: Float in [0, 1) or `None`. Eigenvalues at most
            ``zero_threshold * max eigenvalue`` count as zero for the rank and
            the truncated condition number; ``0`` keeps every positive one
            (the reference code's exact-zero rule). `None` derives it from
            the precision the contributions carry: singular values of ``J``
            below ``4 u ||J||_F`` (``u`` the unit round-off of the dtype the
            layers compute in) are round-off
            (`keras_fim.measurements.noise_floor`). The threshold used is
            logged as ``fisher/zero_threshold``. Defaults to `None`.
        ema_decay: Float in [0, 1), the weight of the old value in the
            exponential average of ``c_k``. Defaults to `0.9`.
        per_layer: Boolean. Also write each layer's own spectrum
            (``fisher_layers/<layer>/...``: its share of the trace, largest
            eigenvalue and c_k) to TensorBoard, from the per-layer Gram
            blocks the measurement forms anyway (one small eigen-solve per
            layer). Defaults to `False`.
        memory_budget: Positive number of bytes or `None` (1 GiB): the
            bound on any one layer's largest temporary while measuring
            (`keras_fim.engine.gram`). Defaults to `None`.
        reuse_training_pass: Boolean. Take the per-example contributions
            from the training step's own forward and backward pass where
            that is exact (Keras's own `train_step` and loss, one kind of
            loss reduction, no activity regulariser); otherwise, or when
            `False`, run a separate pass. Defaults to `True`.
        fail_mode: String, what a layer whose rule fails while the
            measurement is built does (as BackPACK's ``fail_mode``):
            ``"error"`` leaves the whole measurement out for this `fit`, with
            one warning giving the cause; ``"warn"`` leaves that layer out of
            ``J`` (the spectrum is the other layers') with one warning naming
            it; ``"skip"`` does the same silently. Layers without a
            registered rule are not failures: the exact generic rule handles
            them. Defaults to `"error"`.
        per_example_loss: `None` or a function ``(model, x, y,
            sample_weight)`` returning one loss per example of the batch,
            shaped ``(batch,)``: the objective the training step follows,
            whose per-example gradients are measured instead of the compiled
            loss's. It receives the batch the step trained (what
            `train_step` received, unpacked as Keras does) and runs after
            the step, statelessly, with the variables as the step found them
            (seed generators included, so random draws repeat the step's
            first ones); it may call the model or any of its layers, in the
            mode it chooses, and must call each measured layer on rows that
            belong to the batch's examples in order. Needed to measure a
            model with its own `train_step` or `compute_loss`. Keras's
            serialisation (`keras.saving.serialize_keras_object`) keeps it in
            `get_config`; a lambda does not load back in safe mode. Defaults
            to `None` (the compiled loss).
        measured_layers: `None`, or layers of the model (or their names,
            at any depth): only their trainable weights make up ``J`` (a
            GAN's generator, say, when its loss is measured). Defaults to
            `None` (every trainable weight).
        noise_scale: String or integer, when the gradient noise scale
            (``model.fisher_state.noise_scale``, TensorBoard
            ``fisher/noise_scale``) is measured where it costs extra passes:
            a batch-coupled model (BatchNorm in training mode) on one device
            needs the gradients of the batch and of its two halves, three
            more forward and backward passes per measured step. Elsewhere it
            comes free from the Gram matrix (independent examples) or the
            replicas' shards, and is always kept. ``"auto"`` runs the passes
            only in a `fit` where something reads the noise scale (a
            `keras_fim.DynamicSampling` with AdaScale, an `Automatic`
            schedule on the noise scale, or a schedule function of one's
            own); ``"always"`` at every measured step; an integer ``n >= 1``
            at every ``n``-th measured step; ``"never"`` not at all. Where
            the passes do not run, ``fisher/noise_scale`` is not written
            and the running averages keep their values. Defaults to
            `"auto"`.

    Example:

    >>> import numpy as np, keras, keras_fim
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> history = model.fit(
    ...     np.random.rand(64, 4), np.random.rand(64, 3), batch_size=16,
    ...     epochs=2, verbose=0,
    ...     callbacks=[keras_fim.FisherCallback(every_n_steps=2)])
    >>> sorted(k for k in history.history if k != "loss")
    ['C_K_bar', 'L_K']
    """

    def __init__(
        self,
        log_dir: str | None = None,
        every_n_steps: int = 50,
        dense_epochs: int = 0,
        max_examples: int | None = None,
        zero_threshold: float | None = None,
        ema_decay: float = 0.9,
        per_layer: bool = False,
        memory_budget: float | None = None,
        reuse_training_pass: bool = True,
        fail_mode: str = "error",
        per_example_loss: PerExampleLoss | None = None,
        measured_layers: list | None = None,
        noise_scale: str | int = "auto",
    ):
        super().__init__()
        self.log_dir = check_log_dir(log_dir)
        self.every_n_steps = check_int("every_n_steps", every_n_steps, 1)
        self.dense_epochs = check_int("dense_epochs", dense_epochs, 0)
        self.max_examples = check_int("max_examples", max_examples, 2, allow_none=True)
        self.zero_threshold = check_real(
            "zero_threshold", zero_threshold, 0, 1, include_high=False, allow_none=True
        )
        self.ema_decay = check_real("ema_decay", ema_decay, 0, 1, include_high=False)
        self.per_layer = check_bool("per_layer", per_layer)
        check_memory_budget(memory_budget)
        self.memory_budget = memory_budget
        self.reuse_training_pass = check_bool(
            "reuse_training_pass", reuse_training_pass
        )
        self.fail_mode = check_fail_mode(fail_mode)
        self.per_example_loss = check_callable(
            "per_example_loss",
            per_example_loss,
            "a function (model, x, y, sample_weight) -> per-example losses",
            allow_none=True,
        )
        self.measured_layers = check_layers("measured_layers", measured_layers)
        self.noise_scale = check_noise_scale(noise_scale)
        # Whether this fit's measuring function runs the half-batch passes
        # (set when the functions are built).
        self._noise_passes = False
        # Set again at every fit's start (`on_train_begin`).
        self._loss = self.per_example_loss
        self._not_measured = None
        self._retrace = False
        self._state: FisherState | None = None
        self._writer = None
        self._functions: dict[str, Any] = {}
        # (key, functions, writer) of the last fit: a later fit with an equal
        # key reuses the traced functions (`_function_key`).
        self._cache: tuple | None = None
        self._epoch = 0
        self._warned = False
        self._unsupported_strategy = None

    def get_config(self) -> dict:
        """The constructor arguments."""
        return {
            "log_dir": self.log_dir,
            "every_n_steps": self.every_n_steps,
            "dense_epochs": self.dense_epochs,
            "max_examples": self.max_examples,
            "zero_threshold": self.zero_threshold,
            "ema_decay": self.ema_decay,
            "per_layer": self.per_layer,
            "memory_budget": self.memory_budget,
            "reuse_training_pass": self.reuse_training_pass,
            "fail_mode": self.fail_mode,
            "per_example_loss": (
                None
                if self.per_example_loss is None
                else keras.saving.serialize_keras_object(self.per_example_loss)
            ),
            "measured_layers": _layer_names(self.measured_layers),
            "noise_scale": self.noise_scale,
        }

    @classmethod
    def from_config(cls, config: dict) -> FisherCallback:
        """A callback from `get_config`'s dictionary."""
        config = dict(config)
        if config.get("per_example_loss") is not None:
            config["per_example_loss"] = keras.saving.deserialize_keras_object(
                config["per_example_loss"]
            )
        return cls(**config)

    @property
    def state(self) -> FisherState | None:
        """The model's `FisherState` (`None` before `set_model`)."""
        return self._state

    # -- lifecycle ---------------------------------------------------------

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model)
        # Attached here, before any on_train_begin, so that BackupAndRestore
        # (which loads weights in its on_train_begin) finds the variables.
        self._state = attach_state(model)

    def on_train_begin(self, logs=None) -> None:
        model = self.model
        # The loss measured: the user's, or the compiled one for a model
        # that trains with Keras's own step and loss computation.
        self._loss = self.per_example_loss
        self._not_measured = None
        if self._loss is None and _own_objective(model):
            self._not_measured = "custom"
        elif self._loss is None:
            check_compiled_loss(model)
        # Counters read at the first epoch (after BackupAndRestore restored
        # them), to warn once if measurements of this fit are skipped.
        self._counters_at_start = None
        self._warned_skipped = False
        # Under a multi-worker strategy only the chief writes (every worker
        # records the same values).
        extended = model.distribute_strategy.extended
        if self.log_dir is not None and getattr(extended, "should_save_summary", True):
            try:
                self._writer = summaries.create_writer(self.log_dir)
            except Exception as error:  # writing logs must never stop training
                raise ValueError(
                    "`log_dir` must be a writable directory. "
                    f"Received: log_dir={self.log_dir!r} ({error})"
                ) from error
        self._steps_per_execution = int(getattr(model, "steps_per_execution", 1) or 1)
        self._unsupported_strategy = _unsupported_strategy(model.distribute_strategy)
        replicas = model.distribute_strategy.num_replicas_in_sync
        if self._not_measured == "custom":
            warnings.warn(
                f"keras-fim does not measure model {model.name!r}: it trains "
                "with a `train_step` (or `compute_loss`) of its own, whose "
                "objective keras-fim cannot know, so this fit trains exactly "
                "as without keras-fim and makes no Fisher measurement. To "
                "measure it, pass the loss the step optimises, one value per "
                "example: `FisherCallback(per_example_loss=fn)` with "
                "`fn(model, x, y, sample_weight)` returning a (batch,) tensor "
                "(in a `FisherModel` subclass, override `per_example_loss(self, "
                "x, y, sample_weight)`). See docs/custom-loops.md.",
                stacklevel=2,
            )
        elif self._loss is not None and replicas > 1:
            self._not_measured = "replicas"
            warnings.warn(
                "keras-fim does not yet measure a `per_example_loss` under "
                f"{replicas} replicas (model {model.name!r}): this fit trains "
                "exactly as without keras-fim and makes no Fisher measurement "
                "(docs/custom-loops.md).",
                stacklevel=2,
            )
        if self._unsupported_strategy and not self._not_measured:
            warnings.warn(
                f"keras-fim does not measure under {self._unsupported_strategy} "
                f"(model {model.name!r}): training continues exactly as without "
                "it, and no Fisher measurement is made in this fit. Supported: "
                "no strategy, OneDeviceStrategy, MirroredStrategy and "
                "MultiWorkerMirroredStrategy (see docs/distribute.md).",
                stacklevel=2,
            )
        # Built at the first batch, after every on_train_begin, so that the
        # step wrappers of other keras-fim callbacks are included.
        self._functions = {}
        begin_fit(model, "fisher", self._end_fit)
        # A Python mirror of state.step, read at the first batch (after every
        # on_train_begin, so after BackupAndRestore has restored it): choosing
        # the function per batch then needs no read from the device.
        self._step = None

    def on_epoch_begin(self, epoch, logs=None) -> None:
        self._epoch = epoch
        self._state.epoch.assign(epoch)
        if getattr(self, "_counters_at_start", 0) is None:  # first epoch of a fit
            self._counters_at_start = self._counters()
        if self._writer is not None:
            # After every on_train_begin (BackupAndRestore has restored the
            # state) and before anything is written: TensorBoard drops the
            # points an interrupted run wrote from this fit's first step on.
            summaries.start_session(self._writer, int(self._state.step.numpy()) + 1)

    def on_epoch_end(self, epoch, logs=None) -> None:
        self._warn_if_skipped()

    def on_train_batch_begin(self, batch, logs=None) -> None:
        if self._unsupported_strategy or self._not_measured:
            return  # Keras's own train function: training as without us
        if not self._functions:
            self._functions = self._train_functions()
        if self._measured_step.in_graph_choice:
            # One function, the decision is taken per step in-graph. Set at
            # every batch: another keras-fim callback may have set its own.
            self.model.train_function = self._functions["measure"]
            return
        if self._step is None:
            self._step = int(self._state.step.numpy())
        measured = (
            self._step % self.every_n_steps == 0 or self._epoch < self.dense_epochs
        )
        name = "measure" if measured else "plain"
        self.model.train_function = self._functions[name]

    def on_train_batch_end(self, batch, logs=None) -> None:
        if self._step is not None:
            self._step += 1
        if self._retrace:
            self._retrace = False
            self._functions = {}
            self._cache = None

    def on_train_end(self, logs=None) -> None:
        self._warn_if_skipped()
        end_fit(self.model, "fisher")

    def _counters(self) -> tuple[int, int]:
        """`(skipped, measurements)`: two reads from the device."""
        state = self._state
        return int(state.skipped.numpy()), int(state.measurements.numpy())

    def _warn_if_skipped(self) -> None:
        """One warning per fit when measurements of this fit were skipped
        (checked at epoch and train end: one device read each)."""
        start = getattr(self, "_counters_at_start", None)
        if start is None or self._warned or getattr(self, "_warned_skipped", True):
            return
        skipped = int(self._state.skipped.numpy()) - start[0]
        if skipped <= 0:
            return
        kept = int(self._state.measurements.numpy()) - start[1]
        self._warned_skipped = True
        warnings.warn(
            f"keras-fim skipped {skipped} of the {skipped + kept} Fisher "
            f"measurements of model {self.model.name!r} in this fit so far: "
            "their values were not finite (NaN or inf in the inputs, the "
            "loss or the per-example gradients, or a Gram matrix too large "
            "for its dtype), every per-example gradient was zero, or a "
            "`per_example_loss` gave another number of rows than the batch "
            "(in its losses or its calls of the measured layers). Skipped "
            "steps are left out of C_K_bar and L_K and counted in "
            "`model.fisher_state.skipped` (TensorBoard: fisher/skipped); "
            "training itself is unaffected. Further skips in this fit are "
            "counted but not warned about.",
            stacklevel=2,
        )

    def _end_fit(self) -> None:
        # Later fits without this callback get Keras's own function; this
        # callback's next fit reuses its own if nothing changed (`_cache`).
        self.model.train_function = None
        self._functions = {}
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    # -- schedule ----------------------------------------------------------

    # -- the train step ----------------------------------------------------

    def _train_functions(self) -> dict:
        """The plain and the measuring train functions: those of the last
        `fit` when nothing they were traced with has changed (Keras keeps
        its own train function across fits likewise), otherwise new ones.
        A new input signature is traced by the functions themselves."""
        self._noise_passes = self._runs_noise_passes()
        key = self._function_key()
        if (
            self._cache is not None
            and key is not None
            and same_key(self._cache[0], key)
        ):
            return self._cache[1]
        self._measured_step = MeasuredStep(
            self.model,
            self._state,
            self,
            self._loss,
            self._noise_passes,
            self._steps_per_execution,
            self._writer,
            self._warn,
            self._request_retrace,
            xla_apart=self._xla_apart(),
            in_graph_choice=self._in_graph_choice(),
        )
        functions = {
            "plain": self._build_train_function(measure=False),
            "measure": self._build_train_function(measure=True),
        }
        # The writer is kept with them: they write through its resource.
        self._cache = None if key is None else (key, functions, self._writer)
        return functions

    def _function_key(self) -> tuple | None:
        """Everything the train functions are traced with (Keras's
        `train_function_key`, the options, this fit's loss, writer and
        state); `None` when they cannot be reused (a wrapper that gave no
        cache key)."""
        base = train_function_key(self.model, self._steps_per_execution)
        if base is None:
            return None
        layers = self.measured_layers
        return (
            *base,
            tuple(sorted((k, v) for k, v in self._options().items())),
            None if layers is None else tuple(layers),
            self.per_example_loss,
            self._loss,
            self._writer,
            self._state,
            self._noise_passes,
        )

    def _runs_noise_passes(self) -> bool:
        """Whether this fit's measured steps may run the half-batch passes of
        a batch-coupled model (`noise_scale`)."""
        if self.noise_scale == "never":
            return False
        if self.noise_scale == "auto":
            return bool(noise_scale_readers(self.model))
        return True

    def _options(self) -> dict:
        """The options the train functions read (plain values)."""
        config = self.get_config()
        for name in ("per_example_loss", "measured_layers"):
            config.pop(name)
        return config

    def _in_graph_choice(self) -> bool:
        """Whether one train function serves every step, measured or not
        (`MeasuredStep.in_graph_choice`): with several steps per execution,
        and on one replica without XLA when not every step is measured.
        Under XLA the unmeasured steps keep Keras's fully compiled function;
        under several replicas the collectives of a measurement must run at
        every step."""
        if self._steps_per_execution > 1:
            return True
        model = self.model
        return (
            self.every_n_steps > 1
            and not model.jit_compile
            and model.distribute_strategy.num_replicas_in_sync == 1
        )

    def _xla_apart(self) -> bool:
        """Whether the measuring function is compiled without XLA, its step
        and Gram by XLA apart (`MeasuredStep.xla_apart`): with
        ``jit_compile=True`` on one replica (Keras itself cannot compile a
        step for several replicas with XLA)."""
        model = self.model
        return (
            bool(model.jit_compile)
            and not model.run_eagerly
            and model.distribute_strategy.num_replicas_in_sync == 1
        )

    def _build_train_function(self, measure: bool):
        def wrap(original_step):
            return lambda data: self._train_step(original_step, data, measure)

        xla = not (measure and self._measured_step.xla_apart)
        return compile_train_function(self.model, inner=wrap, xla=xla)

    def _train_step(self, original_step, data, measure: bool):
        state = self._state
        if not measure:
            logs = original_step(data)
        else:
            logs = self._measured_step(original_step, data)  # a MeasuredStep
        state.step.assign_add(1)
        logs = dict(logs)
        logs["C_K_bar"] = state.condition_mean
        logs["L_K"] = tf.convert_to_tensor(state.energy_sum)
        return logs

    def _request_retrace(self) -> None:
        self._retrace = True

    def _warn(self, error) -> None:
        if not self._warned:
            warnings.warn(
                "keras-fim could not build the Fisher measurement for "
                f"model {self.model.name!r}, so training continues without "
                f"it. Cause: {type(error).__name__}: {error}",
                stacklevel=3,
            )
            self._warned = True


def _own_objective(model) -> bool:
    """Whether `model` trains with a `train_step` or a loss computation of
    its own, whose objective the compiled loss need not be."""
    return not (
        is_keras_train_step(model.train_step) and is_keras_loss_computation(type(model))
    )


def _layer_names(layers) -> list | None:
    """`measured_layers` for a config: names (layers by their name)."""
    if layers is None:
        return None
    return [layer if isinstance(layer, str) else layer.name for layer in layers]


def _unsupported_strategy(strategy) -> str | None:
    """The name of `strategy` when keras-fim does not measure under it
    (TPU, parameter-server and central-storage strategies: untested, and a
    failure there would happen when the step runs, not when it is traced,
    where a measurement that cannot be built is left out); `None` for the
    supported ones."""
    supported = (
        tf.distribute.MirroredStrategy,
        tf.distribute.MultiWorkerMirroredStrategy,
        tf.distribute.OneDeviceStrategy,
    )
    if isinstance(strategy, supported) or is_default_strategy(strategy):
        return None
    return type(strategy).__name__
