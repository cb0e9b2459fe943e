"""Data sets for keras-fim: the bundled digits and four tensorflow-datasets sets.

`load` returns a `DataSplits`: the training and test splits as unbatched,
preprocessed `tf.data.Dataset`s of ``(image, label)`` pairs (``float32`` images
``(height, width, channels)``, ``int64`` labels), their sizes, the input shape,
the number of classes, and the standard training augmentation of the data set.
`DataSplits.train_batches` and `DataSplits.test_batches` build the input
pipelines for `model.fit` / `model.evaluate`; `DataSplits.arrays` gives NumPy
arrays for code that holds the data in memory (`DynamicSampling`).

Names `load` accepts (`NAMES`):

- ``"digits"``: scikit-learn's 1,797 8x8 digit images (`load_digits`), in
  ``[0, 1]``. Bundled with scikit-learn: needs no network and no download.
- ``"cifar10"``, ``"cifar100"``, ``"svhn_cropped"``, ``"mnist"``: read with
  tensorflow-datasets (``pip install tensorflow-datasets``) from `data_dir`.
  Images are scaled to ``[0, 1]`` and normalised per channel with the published
  mean and standard deviation of the training split (`NORMALIZATION`).

A tensorflow-datasets set that is not in `data_dir` is downloaded and prepared
there when ``download=True``; without network (or with ``download=False``)
`load` raises `DatasetUnavailableError` at once, saying how to fetch the data
on another machine.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

#: The names `load` accepts: the bundled digits first, then tensorflow-datasets'.
NAMES = ("digits", "cifar10", "cifar100", "svhn_cropped", "mnist")
_TFDS_NAMES = NAMES[1:]

#: Per-channel ``(mean, std)`` of each training split, for images in ``[0, 1]``:
#: the published population statistics over all pixels of the training set (not
#: computed from the data at hand, so a partial or mocked copy normalises alike).
#: CIFAR-10: mean 125.3/123.0/113.9, std 63.0/62.1/66.7 of 255 (fb.resnet.torch;
#: recomputed e.g. in kuangliu/pytorch-cifar#129). The often copied CIFAR-10 std
#: (0.2023, 0.1994, 0.2010) is the mean of per-image stds, not the set's std.
#: CIFAR-100 and SVHN (train split): the usual constants of the PyTorch
#: literature; MNIST: 0.1307 / 0.3081 (PyTorch's MNIST example).
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn_cropped": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "mnist": ((0.1307,), (0.3081,)),
}

#: ``(training examples, image shape, classes)`` of each tensorflow-datasets
#: set's published train split: what a study's plan needs, without the data.
SPLIT_SHAPES = {
    "cifar10": (50000, (32, 32, 3), 10),
    "cifar100": (50000, (32, 32, 3), 100),
    "svhn_cropped": (73257, (32, 32, 3), 10),
    "mnist": (60000, (28, 28, 1), 10),
}

# Where each set downloads from, probed before a download: tensorflow-datasets
# retries an unreachable host for minutes (urllib3: 10 retries, backoff to 102 s).
_DOWNLOAD_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
    "cifar100": "https://www.cs.toronto.edu/~kriz/",
    "svhn_cropped": "http://ufldl.stanford.edu/housenumbers/",
    "mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
}
_PROBE_TIMEOUT_S = 5.0

# Padding of the CIFAR random crop (the standard 4 pixels, crop back to 32x32).
_CROP_PADDING = 4


class DatasetUnavailableError(RuntimeError):
    """A tensorflow-datasets set is not in `data_dir` and could not be fetched."""


def load_digits(
    test_fraction: float = 0.25, seed: int = 0
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's 1,797 8x8 digit images, as images in [0, 1].

    Returns ``(x_train, y_train), (x_test, y_test)``: float32 arrays shaped
    ``(n, 8, 8, 1)`` and int64 labels 0-9, split deterministically
    (stratified) by `seed`. Needs no network: the data ship with
    scikit-learn.

    Args:
        test_fraction: Float in (0, 1), the fraction of the images held out
            as the test split. Defaults to `0.25`.
        seed: Integer, the random state of the stratified split. Defaults to
            `0`.

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


def random_crop_flip(
    images: tf.Tensor | np.ndarray,
    labels: tf.Tensor | np.ndarray,
    *,
    seed: tf.Tensor | Sequence[int] | None = None,
    padding: int = _CROP_PADDING,
) -> tuple[tf.Tensor, tf.Tensor | np.ndarray]:
    """The standard CIFAR augmentation of a batch: padded random crop and flip.

    Each image is zero-padded by `padding` pixels on every side, cropped back to
    its size at a random offset (each of the ``(2 * padding + 1) ** 2`` offsets
    equally likely) and flipped left-right with probability 1/2, independently
    per image. Pure TensorFlow ops: usable inside `tf.data.Dataset.map`.

    Args:
        images: Tensor or array, a batch of images, shape ``(batch, height,
            width, channels)``.
        labels: Tensor or array, the batch's labels, returned unchanged.
        seed: Shape ``(2,)`` integer tensor (or two integers) seeding the
            stateless random ops, so the same seed gives the same crops and
            flips, or `None` to draw one from TensorFlow's global generator
            (`tf.random.set_seed`). Defaults to `None`.
        padding: Integer >= 0, pixels of zero padding on each side. Defaults
            to `4`.

    Returns:
        ``(images, labels)``, the images with their shape and dtype unchanged.

    Example:

    >>> images = tf.reshape(tf.range(2 * 4 * 4, dtype=tf.float32), (2, 4, 4, 1))
    >>> out, labels = random_crop_flip(images, tf.constant([0, 1]), seed=[1, 2])
    >>> out.shape, labels.numpy().tolist()
    (TensorShape([2, 4, 4, 1]), [0, 1])
    """
    images = tf.convert_to_tensor(images)
    if seed is None:
        seed = tf.random.uniform([2], maxval=tf.int32.max, dtype=tf.int32)
    seeds = tf.random.experimental.stateless_split(seed, num=3)
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    offset_y = tf.random.stateless_uniform(
        [batch], seeds[0], maxval=2 * padding + 1, dtype=tf.int32
    )
    offset_x = tf.random.stateless_uniform(
        [batch], seeds[1], maxval=2 * padding + 1, dtype=tf.int32
    )
    flip = tf.random.stateless_uniform([batch], seeds[2]) < 0.5
    padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
    rows = offset_y[:, None] + tf.range(height)[None, :]  # (batch, height)
    columns = tf.range(width)[None, :]
    # A flip reverses the crop's columns: gathering them in reverse order crops
    # and flips in one gather.
    columns = tf.where(flip[:, None], width - 1 - columns, columns)
    columns = offset_x[:, None] + columns  # (batch, width)
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    cropped = tf.gather(cropped, columns, axis=2, batch_dims=1)
    return cropped, labels


@dataclasses.dataclass(frozen=True)
class DataSplits:
    """A data set's training and test splits, with what a model needs to know.

    Attributes:
        name: The data set's name, one of `NAMES` (or your own).
        train: The training split, unbatched ``(image, label)`` pairs: float32
            ``(height, width, channels)`` images, preprocessed (normalised, not
            augmented), int64 labels, in a fixed order.
        test: The test split, in the same form.
        num_train: The number of training examples.
        num_test: The number of test examples.
        input_shape: The shape of one image, ``(height, width, channels)``.
        num_classes: The number of classes; labels are ``0 .. num_classes - 1``.
        augment: The standard training augmentation, a function on a batch
            ``(images, labels) -> (images, labels)`` of TensorFlow ops (it may
            take a ``seed=`` keyword, a shape ``(2,)`` stateless seed), or `None`
            where the data set has none (digits, MNIST, SVHN).
    """

    name: str
    train: tf.data.Dataset
    test: tf.data.Dataset
    num_train: int
    num_test: int
    input_shape: tuple
    num_classes: int
    augment: Callable | None = None
    # Internal: the splits before preprocessing (cached, e.g. uint8 images) and
    # the preprocessing, elementwise so it applies to one example or a batch.
    # The batch pipelines shuffle and batch the small raw examples, then
    # preprocess whole batches. `None`: `train` / `test` are the sources.
    _train_source: tf.data.Dataset | None = dataclasses.field(
        default=None, repr=False, compare=False, kw_only=True
    )
    _test_source: tf.data.Dataset | None = dataclasses.field(
        default=None, repr=False, compare=False, kw_only=True
    )
    _preprocess: Callable | None = dataclasses.field(
        default=None, repr=False, compare=False, kw_only=True
    )

    def _batches(self, split: str, batch_size, *, shuffle_seed=None, drop=False):
        """`split` batched: from the raw source, shuffled, then preprocessed."""
        _check_batch_size(batch_size)
        if split not in ("train", "test"):
            raise ValueError(
                f"`split` must be one of 'train', 'test'. Received: split={split!r}"
            )
        source = self._train_source if split == "train" else self._test_source
        preprocess = self._preprocess
        if source is None:  # no raw source: `train` / `test` are preprocessed
            source = self.train if split == "train" else self.test
            preprocess = None
        if shuffle_seed is not None:
            size = self.num_train if split == "train" else self.num_test
            source = source.shuffle(
                max(size, 1), seed=shuffle_seed, reshuffle_each_iteration=True
            )
        dataset = source.batch(batch_size, drop_remainder=drop)
        if preprocess is not None:
            dataset = dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
        return dataset

    def train_batches(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        augment: bool = True,
        drop_remainder: bool = False,
    ) -> tf.data.Dataset:
        """The training input pipeline: shuffled, batched, augmented batches.

        Every iteration (epoch) of the returned dataset visits each training
        example exactly once, in a new order; the sequence of orders and of
        augmentations is fixed by `seed`.

        Args:
            batch_size: Examples per batch.
            seed: Seeds the shuffling (reshuffled every epoch) and augmentation.
            augment: Apply `augment` to each batch (when it is not `None`).
            drop_remainder: Drop the last, smaller batch of each epoch.

        Returns:
            A `tf.data.Dataset` of ``(images, labels)`` batches, prefetched.

        Example:

        >>> data = load("digits")
        >>> images, labels = next(iter(data.train_batches(32)))
        >>> images.shape, labels.dtype
        (TensorShape([32, 8, 8, 1]), tf.int64)
        """
        dataset = self._batches(
            "train", batch_size, shuffle_seed=seed, drop=drop_remainder
        )
        if augment and self.augment is not None:
            function = self.augment
            if _takes_seed(function):
                seeds = tf.data.Dataset.random(
                    seed=seed, rerandomize_each_iteration=True
                ).batch(2)
                dataset = tf.data.Dataset.zip(dataset, seeds).map(
                    lambda batch, batch_seed: function(*batch, seed=batch_seed),
                    num_parallel_calls=tf.data.AUTOTUNE,
                )
            else:
                dataset = dataset.map(function, num_parallel_calls=tf.data.AUTOTUNE)
        return dataset.prefetch(tf.data.AUTOTUNE)

    def test_batches(self, batch_size: int) -> tf.data.Dataset:
        """The evaluation input pipeline: the test split in order, batched.

        Args:
            batch_size: Examples per batch (the last batch may be smaller).

        Returns:
            A `tf.data.Dataset` of ``(images, labels)`` batches, prefetched.

        Example:

        >>> data = load("digits")
        >>> sum(int(labels.shape[0]) for _, labels in data.test_batches(100))
        450
        """
        dataset = self._batches("test", batch_size)
        return dataset.prefetch(tf.data.AUTOTUNE)

    def arrays(self, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """One split as NumPy arrays, preprocessed and not augmented.

        Reads the whole split into memory (CIFAR-10's training split: 600 MB of
        float32); the order is that of `train` / `test`.

        Args:
            split: ``"train"`` or ``"test"``.

        Returns:
            ``(x, y)``: float32 images ``(n, *input_shape)``, int64 labels ``(n,)``.

        Example:

        >>> x, y = load("digits").arrays("test")
        >>> x.shape, y.shape, x.dtype, y.dtype
        ((450, 8, 8, 1), (450,), dtype('float32'), dtype('int64'))
        """
        images, labels = [], []
        for x, y in self._batches(split, 4096).as_numpy_iterator():
            images.append(x)
            labels.append(y)
        if not images:
            return (
                np.zeros((0, *self.input_shape), np.float32),
                np.zeros((0,), np.int64),
            )
        return np.concatenate(images), np.concatenate(labels)


def load(
    name: str = "digits",
    *,
    data_dir: str | None = None,
    download: bool = True,
    seed: int = 0,
) -> DataSplits:
    """Load a data set by name: its splits, preprocessing and augmentation.

    Args:
        name: One of `NAMES`: ``"digits"`` (bundled, offline), ``"cifar10"``,
            ``"cifar100"``, ``"svhn_cropped"``, ``"mnist"`` (tensorflow-datasets).
        data_dir: tensorflow-datasets' data folder; `None` for its default
            (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). Unused for digits.
        download: Download and prepare a tensorflow-datasets set missing from
            `data_dir`. With `False`, a missing set raises at once.
        seed: Seeds the digits' train/test split (`load_digits`); the
            tensorflow-datasets sets have fixed splits.

    Returns:
        A `DataSplits`.

    Raises:
        ValueError: `name` is not one of `NAMES`.
        DatasetUnavailableError: The set is not in `data_dir` and `download` is
            `False`, or the download failed (e.g. no network).

    Example:

    >>> data = load("digits")
    >>> data.num_train, data.num_test, data.input_shape, data.num_classes
    (1347, 450, (8, 8, 1), 10)
    """
    if name not in NAMES:
        allowed = ", ".join(repr(n) for n in NAMES)
        raise ValueError(f"`name` must be one of {allowed}. Received: name={name!r}")
    if name == "digits":
        return _load_digits(seed)
    return _load_tfds(name, data_dir=data_dir, download=download)


def _load_digits(seed: int) -> DataSplits:
    (x_train, y_train), (x_test, y_test) = load_digits(seed=seed)
    return DataSplits(
        name="digits",
        train=tf.data.Dataset.from_tensor_slices((x_train, y_train)),
        test=tf.data.Dataset.from_tensor_slices((x_test, y_test)),
        num_train=len(x_train),
        num_test=len(x_test),
        input_shape=tuple(x_train.shape[1:]),
        num_classes=10,
        augment=None,
    )


def _load_tfds(name: str, *, data_dir: str | None, download: bool) -> DataSplits:
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(
            f"Loading {name!r} needs tensorflow-datasets: "
            "`pip install tensorflow-datasets`."
        ) from error

    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        if not download:
            raise _unavailable(name, data_dir, builder, "download=False was given")
        if not _reachable(_DOWNLOAD_URLS.get(name)):
            raise _unavailable(
                name,
                data_dir,
                builder,
                f"its download host ({_DOWNLOAD_URLS[name]}) cannot be reached",
            )
        try:
            builder.download_and_prepare()
        except Exception as error:
            reason = f"the download failed ({type(error).__name__}: {error})"
            raise _unavailable(name, data_dir, builder, reason) from error

    mean, std = (np.asarray(v, np.float32) for v in NORMALIZATION[name])

    def preprocess(images, labels):
        images = (tf.cast(images, tf.float32) / 255.0 - mean) / std
        return images, labels

    sources = {}
    sizes = {}
    for split in ("train", "test"):
        # tfds reads in a fixed order (shuffle_files=False); cache the decoded
        # uint8 images in memory (a quarter of the float32 size).
        source = builder.as_dataset(split=split, as_supervised=True)
        sizes[split] = _count(source)
        sources[split] = source.cache()

    info = builder.info
    return DataSplits(
        name=name,
        train=sources["train"].map(preprocess, num_parallel_calls=tf.data.AUTOTUNE),
        test=sources["test"].map(preprocess, num_parallel_calls=tf.data.AUTOTUNE),
        num_train=sizes["train"],
        num_test=sizes["test"],
        input_shape=tuple(int(d) for d in info.features["image"].shape),
        num_classes=int(info.features["label"].num_classes),
        augment=random_crop_flip if name in ("cifar10", "cifar100") else None,
        _train_source=sources["train"],
        _test_source=sources["test"],
        _preprocess=preprocess,
    )


def _count(dataset: tf.data.Dataset) -> int:
    """The number of elements: the known cardinality, else counted."""
    cardinality = int(dataset.cardinality())
    if cardinality >= 0:
        return cardinality
    return int(dataset.reduce(np.int64(0), lambda count, _: count + 1))


def _unavailable(name, data_dir, builder, reason) -> DatasetUnavailableError:
    where = data_dir if data_dir is not None else "tensorflow-datasets' default"
    return DatasetUnavailableError(
        f"The data set {name!r} is not available: it is not prepared in "
        f"data_dir={where!r} (searched {os.fspath(builder.data_dir)}) and {reason}. "
        f"To fix it, on a machine with network access run `tfds build {name} "
        f"--data_dir DIR` (or `keras-fim train --dataset {name} --data-dir DIR`), "
        f"copy DIR to this machine and pass data_dir=DIR (--data-dir DIR)."
    )


def _reachable(url: str | None, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to `url`'s host opens within `timeout` seconds.

    Unknown hosts, and connections through a proxy, count as reachable: the
    download itself then decides.
    """
    if url is None:
        return True
    parts = urllib.parse.urlsplit(url)
    if urllib.request.getproxies() and not urllib.request.proxy_bypass(parts.hostname):
        return True
    port = parts.port or (443 if parts.scheme == "https" else 80)
    result = []

    def connect():
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    # A thread: name resolution (getaddrinfo) ignores the socket timeout.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(2 * timeout)
    return bool(result and result[0])


def _takes_seed(function) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return "seed" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(
            f"`batch_size` must be a positive int. Received: batch_size={batch_size!r}"
        )
    if batch_size < 1:
        raise ValueError(
            f"`batch_size` must be a positive int. Received: batch_size={batch_size}"
        )
