"""keras_fim.validation: every check returns the normalised value or raises
one message shape, naming the argument, what is allowed and the value."""

import re

import keras
import numpy as np
import pytest

from keras_fim import validation


def refused(check, name, value, allowed, *args, **kwargs):
    message = f"`{name}` must be {allowed}. Received: {name}={value!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        check(name, value, *args, **kwargs)


def test_check_int():
    assert validation.check_int("n", np.int64(3), 1) == 3
    assert type(validation.check_int("n", np.int64(3), 1)) is int
    assert validation.check_int("n", None, 1, allow_none=True) is None
    refused(validation.check_int, "n", 0, "an integer >= 1", 1)
    refused(validation.check_int, "n", 2.0, "an integer >= 1", 1)
    refused(validation.check_int, "n", True, "an integer")
    refused(validation.check_int, "n", None, "an integer")
    refused(
        validation.check_int, "n", "x", "an integer >= 0 or None", 0, allow_none=True
    )


def test_check_real():
    assert validation.check_real("r", np.float32(0.5), 0, 1) == 0.5
    assert validation.check_real("r", 3, 0) == 3.0
    assert validation.check_real("r", float("inf"), 0, allow_inf=True) == float("inf")
    refused(
        validation.check_real, "r", 1.0, "a number in [0, 1)", 0, 1, include_high=False
    )
    refused(validation.check_real, "r", 0.0, "a number > 0", 0, include_low=False)
    refused(validation.check_real, "r", 2.0, "a number <= 1", None, 1)
    refused(validation.check_real, "r", float("nan"), "a number")
    refused(validation.check_real, "r", float("inf"), "a number >= 0", 0)
    refused(validation.check_real, "r", False, "a number")
    refused(
        validation.check_real,
        "r",
        "1",
        "a number in [0, 1] or None",
        0,
        1,
        allow_none=True,
    )


def test_check_bool_and_choice():
    assert validation.check_bool("b", False) is False
    refused(validation.check_bool, "b", 1, "True or False")
    refused(validation.check_bool, "b", "yes", "True or False")
    assert validation.check_choice("c", "warn", ("error", "warn")) == "warn"
    refused(
        validation.check_choice,
        "c",
        "fail",
        "one of ('error', 'warn')",
        ("error", "warn"),
    )
    refused(validation.check_choice, "c", None, "one of ('error',)", ("error",))


def test_check_log_dir(tmp_path):
    assert validation.check_log_dir(None) is None
    assert validation.check_log_dir(tmp_path / "a" / "b") == str(tmp_path / "a" / "b")
    assert validation.check_log_dir("gs://bucket/run") == "gs://bucket/run"
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"`where` must be a directory .* is a file"):
        validation.check_log_dir(tmp_path / "file" / "logs", name="where")
    with pytest.raises(ValueError, match=r"`log_dir` must be None or a non-empty path"):
        validation.check_log_dir("")
    with pytest.raises(ValueError, match=r"of type int"):
        validation.check_log_dir(3)


def model(loss):
    inputs = keras.Input((3,))
    m = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    if loss != "not compiled":
        m.compile(optimizer="sgd", loss=loss)
    return m


def test_check_compiled_loss():
    validation.check_compiled_loss(model("mse"))
    validation.check_compiled_loss(
        model(keras.losses.MeanSquaredError(reduction="sum"))
    )
    with pytest.raises(ValueError, match="must be compiled"):
        validation.check_compiled_loss(model("not compiled"))
    with pytest.raises(ValueError, match=r"Received: loss=None"):
        validation.check_compiled_loss(model(None))
    with pytest.raises(ValueError, match=r"reduction=None"):
        validation.check_compiled_loss(
            model(keras.losses.MeanSquaredError(reduction=None))
        )
