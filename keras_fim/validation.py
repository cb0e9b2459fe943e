r"""Checks of argument values, for every public class and the command line.

Each check returns the value (normalised: numpy numbers become Python ones)
or raises `ValueError` with one message shape: the argument's name, what is
allowed, and the value received, e.g. ``\`every_n_steps\` must be an integer
>= 1. Received: every_n_steps=0``.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable

import keras

from keras_fim._keras_compat import compile_loss


def _fail(name: str, allowed: str, value, allow_none: bool = False):
    if allow_none:
        allowed += " or None"
    raise ValueError(f"`{name}` must be {allowed}. Received: {name}={value!r}")


def is_integer(value) -> bool:
    """Whether `value` is an integer (numpy's too), booleans excluded."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """Whether `value` is a real number (numpy's too), booleans excluded."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(
    name: str, value, minimum: int | None = None, *, allow_none: bool = False
) -> int | None:
    """An integer, at least `minimum` if given (`None` if `allow_none`)."""
    if value is None and allow_none:
        return None
    if not is_integer(value) or (minimum is not None and value < minimum):
        allowed = "an integer" + ("" if minimum is None else f" >= {minimum}")
        _fail(name, allowed, value, allow_none)
    return int(value)


def _interval(low, high, include_low, include_high) -> str:
    if high is None:
        return f"a number {'>=' if include_low else '>'} {low:g}"
    if low is None:
        return f"a number {'<=' if include_high else '<'} {high:g}"
    left, right = "[" if include_low else "(", "]" if include_high else ")"
    return f"a number in {left}{low:g}, {high:g}{right}"


def check_real(
    name: str,
    value,
    low: float | None = None,
    high: float | None = None,
    *,
    include_low: bool = True,
    include_high: bool = True,
    allow_none: bool = False,
    allow_inf: bool = False,
) -> float | None:
    """A real number within the bounds given (NaN never; infinity only
    with `allow_inf`, and only where the bounds admit it)."""
    if value is None and allow_none:
        return None
    allowed = (
        "a number"
        if low is None and high is None
        else _interval(low, high, include_low, include_high)
    )
    if allow_inf:
        allowed += " (inf allowed)"
    if not is_real(value) or math.isnan(value):
        _fail(name, allowed, value, allow_none)
    if math.isinf(value) and not allow_inf:
        _fail(name, allowed, value, allow_none)
    inside = (low is None or value > low or (include_low and value == low)) and (
        high is None or value < high or (include_high and value == high)
    )
    if not inside:
        _fail(name, allowed, value, allow_none)
    return float(value)


def check_bool(name: str, value) -> bool:
    """`True` or `False` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        _fail(name, "True or False", value)
    return value


def check_choice(name: str, value, allowed: Iterable[str]) -> str:
    """One of `allowed` (strings)."""
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        _fail(name, f"one of {allowed}", value)
    return value


NOISE_SCALE_MODES = ("auto", "always", "never")


def check_noise_scale(value) -> str | int:
    """`FisherCallback`'s `noise_scale`: one of `NOISE_SCALE_MODES`, or an
    integer >= 1 (a cadence in measured steps)."""
    if is_integer(value):
        if value < 1:
            _fail(
                "noise_scale", f"one of {NOISE_SCALE_MODES} or an integer >= 1", value
            )
        return int(value)
    if not isinstance(value, str) or value not in NOISE_SCALE_MODES:
        _fail("noise_scale", f"one of {NOISE_SCALE_MODES} or an integer >= 1", value)
    return value


def check_callable(name: str, value, allowed: str, *, allow_none: bool = False):
    """A callable (`None` if `allow_none`); `allowed` describes it."""
    if value is None and allow_none:
        return None
    if not callable(value):
        _fail(name, allowed, value, allow_none)
    return value


def check_layers(name: str, value) -> list | None:
    """`None`, or layers given by name or as `keras.layers.Layer`s (one, or a
    non-empty list or tuple of them), as a list."""
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items or not all(isinstance(v, (str, keras.layers.Layer)) for v in items):
        _fail(
            name,
            "None, a layer or a layer name, or a non-empty list of them",
            value,
        )
    return items


def check_log_dir(log_dir, name: str = "log_dir") -> str | None:
    """`log_dir` as a `str` (or `None`); `ValueError` naming `name` when it is
    not a path, or when a part of it that exists is not a directory (a path
    under a regular file). Remote paths (``gs://...``) pass unchecked."""
    if log_dir is None:
        return None
    if not isinstance(log_dir, (str, bytes, os.PathLike)):
        raise ValueError(
            f"`{name}` must be None or a path (str or os.PathLike). "
            f"Received: {name}={log_dir!r} of type {type(log_dir).__name__}"
        )
    path = os.fsdecode(os.fspath(log_dir))
    if not path:
        raise ValueError(
            f"`{name}` must be None or a non-empty path. Received: {name}={path!r}"
        )
    if "://" not in path:
        part = os.path.abspath(path)
        while not os.path.exists(part) and os.path.dirname(part) != part:
            part = os.path.dirname(part)
        if os.path.exists(part) and not os.path.isdir(part):
            raise ValueError(
                f"`{name}` must be a directory that can be created or written. "
                f"Received: {name}={path!r}, but {part!r} is a file, not a "
                "directory."
            )
    return path


def check_compiled_loss(model: keras.Model) -> None:
    """`ValueError` unless `model` is compiled with a loss keras-fim can
    split per example (checked at the start of `fit`, before any step)."""

    if not getattr(model, "compiled", False):
        raise ValueError(
            "keras-fim measures the gradients of the compiled loss, so the "
            f"model must be compiled. Received: model {model.name!r}, not "
            "compiled. Call `model.compile(optimizer=..., loss=...)` first."
        )
    loss = getattr(model, "loss", None)
    leaves = [v for v in keras.tree.flatten(loss) if v is not None] if loss else []
    if compile_loss(model) is None or not leaves:
        raise ValueError(
            "keras-fim measures the gradient of each example's compiled loss, "
            "so the model must be compiled with a `loss`: a Keras loss, its "
            "name, or a function of (y_true, y_pred) giving one value per "
            f"example. Received: loss={loss!r} for model {model.name!r}. A "
            "model trained only through `add_loss` (for instance fitted on "
            "inputs without labels) has no compiled per-example loss to "
            "measure: pass the loss it optimises as `per_example_loss` "
            "(see docs/custom-loops.md)."
        )
    for leaf in leaves:
        if isinstance(leaf, keras.losses.Loss) and leaf.reduction in (None, "none"):
            raise ValueError(
                "keras-fim needs a loss that Keras reduces over the batch, to "
                f"split it per example. Received: loss={leaf!r} (name "
                f"{leaf.name!r}) with reduction={leaf.reduction!r}. Allowed "
                "reductions: 'sum_over_batch_size' (the default), 'mean', "
                "'sum', 'mean_with_sample_weight'."
            )
