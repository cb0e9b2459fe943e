"""Wrapping a model's `train_step` for keras-fim's callbacks, composably.

Keras compiles whatever `model.train_step` is when `make_train_function`
runs, and `fit` calls `model.train_function` afresh at every step. keras-fim's
callbacks change the step without touching the user's model class: each one
registers a *step wrapper* (a function from a step function to a step
function) in `set_model`, and the train function is compiled from Keras's own
step with every registered wrapper around it. `FisherCallback` compiles its
own functions with the other wrappers included and sets one at every batch,
so the callbacks compose in any order in the `callbacks` list.
"""

from __future__ import annotations

from typing import Callable

import keras

StepFunction = Callable[[object], dict]
StepWrapper = Callable[[StepFunction], StepFunction]

_WRAPPERS = "_keras_fim_step_wrappers"


def _wrappers(model: keras.Model) -> dict:
    wrappers = model.__dict__.get(_WRAPPERS)
    if wrappers is None:
        wrappers = {}
        # object.__setattr__: keep Keras's attribute tracking out of it.
        object.__setattr__(model, _WRAPPERS, wrappers)
    return wrappers


def add_step_wrapper(model: keras.Model, key: str, wrapper: StepWrapper) -> None:
    """Registers `wrapper` under `key` (replacing an earlier one)."""
    _wrappers(model)[key] = wrapper


def remove_step_wrapper(model: keras.Model, key: str) -> None:
    _wrappers(model).pop(key, None)


def compile_train_function(model: keras.Model, inner: StepWrapper | None = None):
    """`model.train_function` for Keras's step wrapped by `inner`, then by
    every registered wrapper (outermost last registered)."""
    step = model.train_step
    if inner is not None:
        step = inner(step)
    for wrapper in list(_wrappers(model).values()):
        step = wrapper(step)
    # `make_train_function` compiles whatever `model.train_step` is when it
    # runs; the instance attribute is removed right after.
    object.__setattr__(model, "train_step", step)
    try:
        model.make_train_function(force=True)
        return model.train_function
    finally:
        object.__delattr__(model, "train_step")
