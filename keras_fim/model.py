"""`FisherModel`: a `keras.Model` that measures its own training batches."""

from __future__ import annotations

import inspect

import keras

from keras_fim._keras_compat import Functional, functional_init_arguments
from keras_fim.callback import FisherCallback
from keras_fim.engine.losses import per_example_losses
from keras_fim.state import FisherState, SamplingState

_OPTIONS = (
    "every_n_steps",
    "dense_epochs",
    "max_examples",
    "zero_threshold",
    "ema_decay",
    "log_dir",
    "per_layer",
    "memory_budget",
    "reuse_training_pass",
    "fail_mode",
    "measured_layers",
    "noise_scale",
)


@keras.saving.register_keras_serializable(package="keras_fim")
class FisherModel(keras.Model):
    """A `keras.Model` that measures the Fisher spectrum while it trains.

    Use it like `keras.Model`, functionally (``FisherModel(inputs, outputs,
    every_n_steps=50)``) or as the base class of a subclassed model. Every
    `fit` measures the actual training batch before the update at the 0-based
    global steps 0, N, 2N, ... exactly as `keras_fim.FisherCallback` does (it
    runs one internally), and leaves the update to Keras's own `train_step`,
    so the weights stay identical to a plain `keras.Model`. A subclass with a
    `train_step` (or `compute_loss`) of its own trains with it, unchanged,
    and is measured once it overrides `per_example_loss` with the loss its
    step optimises (otherwise `fit` warns once and measures nothing; see
    docs/custom-loops.md). The options below
    round-trip through `get_config` and `.keras` files; the running state
    (``model.fisher_state``: C_K bar, L_K, counters; ``model.sampling_state``:
    where a `DynamicSampling` stands) is saved with the weights.

    Args:
        *args: Positional arguments of `keras.Model` (e.g. inputs, outputs).
        every_n_steps: Integer >= 1, the measurement cadence. Defaults to 50.
        dense_epochs: Integer >= 0, epochs measured at every step. Defaults
            to 0.
        max_examples: Integer >= 2 or `None`, examples measured per batch.
        zero_threshold: Float in [0, 1) or `None`, the relative zero
            threshold of the eigenvalues (`None`: derived from the precision
            of the contributions; see `FisherCallback`).
        ema_decay: Float in [0, 1), weight of the old value in the EMA of c_k.
        log_dir: Path or `None`, where TensorBoard event files go.
        per_layer: Boolean, also log each layer's own spectrum.
        memory_budget: Bytes or `None` (1 GiB), the bound on one layer's
            largest temporary while measuring.
        reuse_training_pass: Boolean, measure from the training step's own
            pass where exact.
        fail_mode: String, ``"error"``, ``"warn"`` or ``"skip"``: what a
            layer whose rule fails does (see `FisherCallback`).
        measured_layers: `None` (all), or layers of the model or their
            names: only their weights are measured (see `FisherCallback`).
        noise_scale: ``"auto"``, ``"always"``, ``"never"`` or an integer
            cadence: when a batch-coupled model's gradient noise scale is
            measured, at the cost of three more passes per measured step
            (see `FisherCallback`). Defaults to ``"auto"``: when something
            in the `fit` reads it.
        **kwargs: Keyword arguments of `keras.Model`.

    Example:

    >>> import numpy as np, keras, keras_fim
    >>> inputs = keras.Input((4,))
    >>> outputs = keras.layers.Dense(3)(inputs)
    >>> model = keras_fim.FisherModel(inputs, outputs, every_n_steps=2)
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> _ = model.fit(np.random.rand(32, 4), np.random.rand(32, 3),
    ...               batch_size=8, verbose=0)
    >>> int(model.fisher_state.measurements)
    2
    """

    def __new__(cls, *args, **kwargs):
        # Keras makes a Model subclass called with (inputs, outputs) functional
        # by rewriting the class's bases for good, which would then break
        # subclassing FisherModel in the same process. A dedicated functional
        # subclass keeps FisherModel itself a plain Model.
        if cls is FisherModel and functional_init_arguments(args, kwargs):
            return keras.Model.__new__(FunctionalFisherModel)
        return super().__new__(cls)

    def __init__(
        self,
        *args,
        every_n_steps: int = 50,
        dense_epochs: int = 0,
        max_examples: int | None = None,
        zero_threshold: float | None = None,
        ema_decay: float = 0.9,
        log_dir: str | None = None,
        per_layer: bool = False,
        memory_budget: float | None = None,
        reuse_training_pass: bool = True,
        fail_mode: str = "error",
        measured_layers: list | None = None,
        noise_scale: str | int = "auto",
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        overridden = type(self).per_example_loss is not FisherModel.per_example_loss
        # Validates the options and holds them.
        self._fisher = FisherCallback(
            log_dir=log_dir,
            every_n_steps=every_n_steps,
            dense_epochs=dense_epochs,
            max_examples=max_examples,
            zero_threshold=zero_threshold,
            ema_decay=ema_decay,
            per_layer=per_layer,
            memory_budget=memory_budget,
            reuse_training_pass=reuse_training_pass,
            fail_mode=fail_mode,
            per_example_loss=_model_per_example_loss if overridden else None,
            measured_layers=measured_layers,
            noise_scale=noise_scale,
        )
        self.fisher_state = FisherState()
        # Tracked here (a plain model gets it untracked from DynamicSampling),
        # so that `.keras` files keep where dynamic sampling stands too.
        self.sampling_state = SamplingState()

    @property
    def fisher_options(self) -> dict:
        """The measurement options, as given to the constructor."""
        config = self._fisher.get_config()
        return {name: config[name] for name in _OPTIONS}

    def per_example_loss(self, x, y=None, sample_weight=None):
        """The loss of each example of a batch: what `fit` measures.

        Override it in a subclass whose `train_step` (or `compute_loss`) is
        its own, with the loss that step optimises, one value per example;
        its per-example gradients are measured on the batch the step trained
        (`FisherCallback`'s `per_example_loss`, with `self` as the model).
        Without an override, a model with Keras's own step is measured with
        its compiled loss, and one with a step of its own is not measured.

        It runs statelessly, after the step, with the variables as the step
        found them; it may call the model or any of its layers, in the mode
        it chooses, each measured layer on rows of the batch's examples in
        order. This default is the compiled loss of ``self(x,
        training=True)``, per example, as measured for Keras's own step.

        Args:
            x: The inputs of the batch, as `train_step` received them.
            y: Its targets, or `None`.
            sample_weight: Its sample weights, or `None`.

        Returns:
            A floating tensor shaped ``(batch,)``.
        """
        return per_example_losses(self, y, self(x, training=True), sample_weight)

    def fit(self, *args, **kwargs):
        """`keras.Model.fit`, with the Fisher measurement added.

        Takes exactly the arguments of `keras.Model.fit`.
        """
        bound = inspect.signature(keras.Model.fit).bind(self, *args, **kwargs)
        callbacks = bound.arguments.get("callbacks") or []
        if not isinstance(callbacks, keras.callbacks.CallbackList):
            callbacks = [*callbacks, self._fisher]
        bound.arguments["callbacks"] = callbacks
        return super().fit(*bound.args[1:], **bound.kwargs)

    def get_config(self) -> dict:
        config = super().get_config()
        return {**config, **self.fisher_options}


def _model_per_example_loss(model, x, y, sample_weight):
    """`FisherCallback`'s `per_example_loss` for a `FisherModel` subclass
    that overrides its method."""
    return model.per_example_loss(x, y, sample_weight)


class FunctionalFisherModel(FisherModel, Functional):
    """What ``FisherModel(inputs, outputs, ...)`` builds (a `FisherModel`).

    Named ``FisherModel`` and registered as ``keras_fim>FisherModel`` (and,
    for files saved by keras-fim 0.1, as ``keras_fim>FunctionalFisherModel``),
    so that a saved functional `FisherModel` loads back as a class named
    `FisherModel`."""


keras.saving.register_keras_serializable("keras_fim", "FunctionalFisherModel")(
    FunctionalFisherModel
)
FunctionalFisherModel.__name__ = FunctionalFisherModel.__qualname__ = "FisherModel"
# Registered last under this name: what "keras_fim>FisherModel" loads as (a
# FisherModel saved from Python is functional; subclasses have names of
# their own).
keras.saving.register_keras_serializable("keras_fim", "FisherModel")(
    FunctionalFisherModel
)
