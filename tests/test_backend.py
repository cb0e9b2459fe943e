"""keras-fim needs Keras's TensorFlow backend: on any other, importing it
raises one `ImportError` naming the backend (issue 14, item 5). Each case
runs in a fresh process: Keras fixes its backend when first imported."""

import importlib.util
import os
import subprocess
import sys

import pytest

# Keras reads its backend once, at import; `keras_fim` reads it back through
# `keras.backend.backend()`, so answering "jax" there is what a jax install
# with KERAS_BACKEND=jax looks like to the check.
SIMULATED = """
import keras
keras.backend.backend = lambda: {backend!r}
try:
    import keras_fim
except ImportError as error:
    print("ImportError:", error)
else:
    print("imported")
"""


def _python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env},
    )


@pytest.mark.parametrize("backend", ["jax", "torch", "numpy"])
def test_another_backend_is_refused_at_import_naming_it(backend):
    result = _python(SIMULATED.format(backend=backend))
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("ImportError:"), out
    assert f"on the {backend!r} backend" in out
    assert "TensorFlow backend" in out and "KERAS_BACKEND=tensorflow" in out


def test_tensorflow_backend_imports():
    result = _python(SIMULATED.format(backend="tensorflow"))
    assert result.stdout.strip() == "imported", result.stderr[-3000:]


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_backend_variable_is_refused(backend):
    """The real thing, where that backend is installed."""
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    result = _python("import keras_fim", KERAS_BACKEND=backend)
    assert result.returncode == 1
    assert "ImportError: keras-fim needs Keras's TensorFlow backend" in result.stderr
    assert f"on the {backend!r} backend" in result.stderr
