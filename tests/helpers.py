"""Helpers shared by the test modules, imported as ``fim_helpers`` (conftest
registers it; pytest's importlib mode puts nothing of tests/ on sys.path).

The brute-force references live in tests/reference.py (``fim_reference``);
this module holds only the scaffolding several test modules need."""

import contextlib
import socket
import warnings

import keras
import numpy as np


def compiled(model, loss="sparse_categorical_crossentropy", optimizer=None, **kwargs):
    """`model` compiled with plain SGD (learning rate 0.1 unless `optimizer`)."""
    model.compile(
        optimizer=keras.optimizers.SGD(0.1) if optimizer is None else optimizer,
        loss=loss,
        **kwargs,
    )
    return model


def labels(n, classes=3, seed=0):
    """`n` integer class labels in [0, classes)."""
    return np.random.default_rng(seed).integers(0, classes, n)


def assert_same_weights(a, b):
    """Two models' (or two weight lists') values are bitwise identical."""
    a = a if isinstance(a, list) else a.get_weights()
    b = b if isinstance(b, list) else b.get_weights()
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)


def free_port(host="127.0.0.1") -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def keras_fim_warnings():
    """Collects, into the list it yields, the messages of the keras-fim
    warnings raised inside (every one: the filter is "always")."""
    messages = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield messages
    messages.extend(str(w.message) for w in caught if "keras-fim" in str(w.message))
