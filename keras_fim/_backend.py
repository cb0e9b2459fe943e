"""keras-fim runs only on Keras's TensorFlow backend.

The measurements are built from TensorFlow ops inside Keras's TensorFlow
train step (`tf.function`, `tf.distribute`, `tf.data`, `tf.summary`). On
another backend, importing used to succeed and `fit` failed later with an
unrelated `AttributeError`; importing this module (the first thing `keras_fim`
does) now raises `ImportError`, naming the backend.
"""

from __future__ import annotations

import keras


def require_tensorflow_backend() -> None:
    """`ImportError` unless Keras runs on its TensorFlow backend.

    Reads `keras.backend.backend()` (set by ``KERAS_BACKEND`` or
    ``~/.keras/keras.json``, fixed once Keras is imported).
    """
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ImportError(
            "keras-fim needs Keras's TensorFlow backend, but Keras is running "
            f"on the {backend!r} backend. Set KERAS_BACKEND=tensorflow (or "
            '"backend": "tensorflow" in ~/.keras/keras.json) before Keras is '
            f"first imported. Received: keras.backend.backend()={backend!r}"
        )


require_tensorflow_backend()
