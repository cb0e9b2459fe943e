"""Wrapping a model's `train_step` for keras-fim's callbacks, composably.

Keras compiles whatever `model.train_step` is when `make_train_function`
runs, and `fit` calls `model.train_function` afresh at every step. keras-fim's
callbacks change the step without touching the user's model class: each one
registers a *step wrapper* (a function from a step function to a step
function) in `on_train_begin`, and the train function is compiled from Keras's
own step with every registered wrapper around it. `FisherCallback` compiles
its own functions at the first batch (after every `on_train_begin`) with the
other wrappers included, and sets one at every batch, so the callbacks compose
in any order in the `callbacks` list. Each callback also registers how to undo
its changes; see `begin_fit`.
"""

from __future__ import annotations

from collections.abc import Callable

import keras

from keras_fim._keras_compat import (
    compile_loss,
    set_instance_attribute,
    unset_instance_attribute,
)

StepFunction = Callable[[object], dict]
StepWrapper = Callable[[StepFunction], StepFunction]

_WRAPPERS = "_keras_fim_step_wrappers"
_CLEANUPS = "_keras_fim_cleanups"
_READERS = "_keras_fim_noise_scale_readers"


def _model_dict(model: keras.Model, name: str) -> dict:
    value = model.__dict__.get(name)
    if value is None:
        value = {}
        # Kept out of Keras's attribute tracking.
        set_instance_attribute(model, name, value)
    return value


def add_step_wrapper(
    model: keras.Model, key: str, wrapper: StepWrapper, cache_key: object = None
) -> None:
    """Registers `wrapper` under `key` (replacing an earlier one).

    `cache_key`: `None`, or a value (compared with ``==``) equal for two
    registrations whose wrappers trace the same step; a train function
    compiled with it may then be reused by a later `fit` (see
    `wrappers_cache_key`). `None` means never reused."""
    _model_dict(model, _WRAPPERS)[key] = (wrapper, cache_key)


def wrappers_cache_key(model: keras.Model) -> tuple | None:
    """What the registered wrappers contribute to a train function's cache
    key: ``((key, cache_key), ...)``, or `None` when one of them gave none
    (the function is then compiled afresh at every `fit`)."""
    entries = list(_model_dict(model, _WRAPPERS).items())
    if any(cache_key is None for _, (_, cache_key) in entries):
        return None
    return tuple((key, cache_key) for key, (_, cache_key) in entries)


def train_function_key(model: keras.Model, steps_per_execution: int) -> tuple | None:
    """Everything Keras's train function of `model` is traced with (the
    model, its step, compilation and optimizer, the strategy and every
    registered wrapper's cache key), for a callback that keeps its train
    functions for its next `fit` while this stays the same (`same_key`);
    `None` when a wrapper gave no cache key."""
    wrappers = wrappers_cache_key(model)
    if wrappers is None:
        return None
    return (
        model,
        type(model),
        model.__dict__.get("train_step"),
        model.optimizer,
        compile_loss(model),
        model.jit_compile,
        model.run_eagerly,
        steps_per_execution,
        model.distribute_strategy,
        wrappers,
    )


def same_key(a, b) -> bool:
    """Whether two cache keys are equal: plain values by value, tuples item
    by item, anything else (models, optimizers, writers, functions) by
    identity."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(
            same_key(x, y) for x, y in zip(a, b, strict=True)
        )
    if isinstance(a, (str, int, float, bool, type(None))):
        return type(a) is type(b) and a == b
    return a is b


def read_noise_scale(model: keras.Model, key: str) -> None:
    """Says that the callback registered under `key` reads the gradient
    noise scale (`model.fisher_state.noise_scale`) in this fit: a
    `FisherCallback(noise_scale="auto")` then runs the half-batch passes a
    batch-coupled model needs for it. Forgotten at `end_fit(model, key)`."""
    _model_dict(model, _READERS)[key] = True


def noise_scale_readers(model: keras.Model) -> list[str]:
    """The keys of the callbacks that read the noise scale in this fit."""
    return list(_model_dict(model, _READERS))


def begin_fit(model: keras.Model, key: str, cleanup: Callable[[], None]) -> None:
    """Registers what undoes a callback's changes to `model` for this fit.

    The callback calls `end_fit` from `on_train_end`. Keras calls no hook when
    `fit` raises, so the model's next `fit` (or `train_on_batch`) runs the
    cleanups left over first: a failed fit never changes later ones.
    """
    _guard(model)
    _model_dict(model, _CLEANUPS)[key] = cleanup


def end_fit(model: keras.Model, key: str) -> None:
    """Runs and forgets `key`'s cleanup and step wrapper (and that it reads
    the noise scale)."""
    _model_dict(model, _WRAPPERS).pop(key, None)
    _model_dict(model, _READERS).pop(key, None)
    cleanup = _model_dict(model, _CLEANUPS).pop(key, None)
    if cleanup is not None:
        cleanup()


def _guard(model: keras.Model) -> None:
    if "make_train_function" in model.__dict__:
        return
    original = type(model).make_train_function

    def make_train_function(force=False):
        # Keras asks for the function (without force) when a fit starts,
        # before any callback runs: whatever a keras-fim callback left on
        # the model is then stale.
        if not force:
            for key in list(_model_dict(model, _CLEANUPS)):
                end_fit(model, key)
        return original(model, force=force)

    set_instance_attribute(model, "make_train_function", make_train_function)


def compile_train_function(
    model: keras.Model, inner: StepWrapper | None = None, xla: bool = True
):
    """`model.train_function` for Keras's step wrapped by `inner`, then by
    every registered wrapper (outermost last registered).

    `xla`: `False` compiles it without XLA even when the model is compiled
    with ``jit_compile=True`` (the step then compiles what it chooses)."""
    step = model.train_step
    if inner is not None:
        step = inner(step)
    for wrapper, _ in list(_model_dict(model, _WRAPPERS).values()):
        step = wrapper(step)
    # `make_train_function` compiles whatever `model.train_step` is when it
    # runs, with XLA as `model.jit_compile` says then; both are put back
    # right after.
    set_instance_attribute(model, "train_step", step)
    jit_compile = model.jit_compile
    if not xla:
        model.jit_compile = False
    try:
        model.make_train_function(force=True)
        return model.train_function
    finally:
        if not xla:
            model.jit_compile = jit_compile
        unset_instance_attribute(model, "train_step")
