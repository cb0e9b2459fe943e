"""The embedded default data set: scikit-learn's bundled digits (offline)."""

from __future__ import annotations


def load_digits(test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn's 1,797 8x8 digit images, as images in [0, 1].

    Returns ``(x_train, y_train), (x_test, y_test)``: float32 arrays shaped
    ``(n, 8, 8, 1)`` and int labels 0-9, split deterministically (stratified)
    by `seed`. Needs no network: the data ship with scikit-learn.

    Example:

    >>> (x, y), (xt, yt) = load_digits()
    >>> x.shape, xt.shape
    ((1347, 8, 8, 1), (450, 8, 8, 1))
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ValueError(
            f"`test_fraction` must be in (0, 1). Received: test_fraction={test_fraction}"
        )
    digits = sklearn_digits()
    images = (digits.images / 16.0).astype("float32")[..., None]
    labels = digits.target.astype("int64")
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return (x_train, y_train), (x_test, y_test)
