"""Calibrated path choices kept on disk, per machine, across processes.

Calibrating (`keras_fim.engine.gram.path_choice`) times each candidate way of
forming a kernel's Gram block: a few seconds of a network's first measured
`fit` (issue 15). The result depends on the shapes, the machine and the
TensorFlow build, not on the process, so it is kept in a JSON file and the
next process on the same machine takes it from there.

The file holds one section per machine fingerprint (processor, core count,
TensorFlow's thread settings and oneDNN switch, the TensorFlow and keras-fim
versions), so a home folder shared between machines keeps each machine's
own timings. Writes merge with what other processes wrote and replace the
file atomically.

Where: the environment variable ``KERAS_FIM_CALIBRATION_CACHE`` names the
file; ``off`` (or ``0``, ``false``, empty) turns the store off. Unset, it is
``$KERAS_HOME/keras_fim/calibrations.json`` (``~/.keras`` without
``KERAS_HOME``, as Keras keeps its own files).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import tempfile
import warnings

import tensorflow as tf

CACHE_ENV = "KERAS_FIM_CALIBRATION_CACHE"
"""The environment variable naming the file (``off`` disables it)."""

_OFF = ("", "0", "off", "false", "no", "none")
_LOADED: dict = {}  # path -> {fingerprint: {key: [method, {method: seconds}]}}
_UNWRITABLE: set = set()  # paths already warned about


def cache_path() -> str | None:
    """The file calibrations are kept in, or `None` when it is off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        value = value.strip()
        return None if value.lower() in _OFF else os.path.expanduser(value)
    home = os.environ.get("KERAS_HOME") or os.path.join(
        os.path.expanduser("~"), ".keras"
    )
    return os.path.join(home, "keras_fim", "calibrations.json")


@functools.cache
def _processor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint() -> str:
    """What the timings depend on besides the shapes."""
    from keras_fim import __version__

    threading = tf.config.threading
    return "|".join(
        str(part)
        for part in (
            _processor(),
            os.cpu_count(),
            threading.get_intra_op_parallelism_threads(),
            threading.get_inter_op_parallelism_threads(),
            os.environ.get("TF_ENABLE_ONEDNN_OPTS", ""),
            tf.__version__,
            __version__,
        )
    )


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        warnings.warn(
            f"keras-fim cannot read its calibration cache {path!r} "
            f"({type(error).__name__}: {error}); it calibrates anew and "
            f"rewrites the file. Set {CACHE_ENV}=off to keep none.",
            stacklevel=3,
        )
        return {}
    return data if isinstance(data, dict) else {}


def load(key: str):
    """``(method, {method: seconds})`` kept for `key` on this machine, or
    `None`."""
    path = cache_path()
    if path is None:
        return None
    if path not in _LOADED:
        _LOADED[path] = _read(path)
    entry = _LOADED[path].get(fingerprint(), {}).get(key)
    if not (isinstance(entry, list) and len(entry) == 2):
        return None
    method, seconds = entry
    return method, dict(seconds)


def store(key: str, method: str, seconds: dict) -> None:
    """Keeps a calibration: merged into the file, which is replaced
    atomically. A file that cannot be written warns once and is left."""
    path = cache_path()
    if path is None:
        return
    data = _read(path)
    data.setdefault(fingerprint(), {})[key] = [method, seconds]
    _LOADED[path] = data
    folder = os.path.dirname(path) or "."
    temporary = None
    try:
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(data, file)
        os.replace(temporary, path)
    except OSError as error:
        if temporary is not None and os.path.exists(temporary):
            os.remove(temporary)
        if path not in _UNWRITABLE:
            _UNWRITABLE.add(path)
            warnings.warn(
                f"keras-fim cannot write its calibration cache {path!r} "
                f"({type(error).__name__}: {error}); calibrations are kept "
                f"for this process only. Set {CACHE_ENV} to a writable file, "
                "or to off.",
                stacklevel=3,
            )


def forget() -> None:
    """Forgets what was read from disk (the file itself stays)."""
    _LOADED.clear()
