"""keras_fim.datasets: the digits, tensorflow-datasets sets (mocked), errors.

No test downloads anything: the tensorflow-datasets sets come from
`tfds.testing.mock_data`, and every download is patched.
"""

from __future__ import annotations

import collections
import socket

import numpy as np
import pytest
import tensorflow as tf

from keras_fim import datasets
from keras_fim.datasets import DatasetUnavailableError, DataSplits, load, load_digits

tfds = pytest.importorskip("tensorflow_datasets")
requests = pytest.importorskip("requests")

# The published training-set statistics, written out again here on purpose.
EXPECTED_STATS = {
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
    "svhn_cropped": ([0.4377, 0.4438, 0.4728], [0.1980, 0.2010, 0.1970]),
    "mnist": ([0.1307], [0.3081]),
}
EXPECTED_INFO = {  # input_shape, num_classes
    "cifar10": ((32, 32, 3), 10),
    "cifar100": ((32, 32, 3), 100),
    "svhn_cropped": ((32, 32, 3), 10),
    "mnist": ((28, 28, 1), 10),
}
MOCK_EXAMPLES = 24


def _rows(x, y):
    """Each example as bytes (image and label), for multiset comparisons."""
    x = np.asarray(x).reshape(len(x), -1)
    return collections.Counter(
        xi.tobytes() + np.int64(yi).tobytes() for xi, yi in zip(x, y, strict=True)
    )


def _epoch(dataset):
    xs, ys = zip(*dataset.as_numpy_iterator(), strict=True)
    return list(xs), list(ys)


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def test_digits_match_load_digits(digits):
    (x, y), (xt, yt) = load_digits()
    assert isinstance(digits, DataSplits)
    assert digits.name == "digits"
    assert (digits.num_train, digits.num_test) == (1347, 450)
    assert digits.input_shape == (8, 8, 1)
    assert digits.num_classes == 10
    assert digits.augment is None
    for split, (ex, ey) in (("train", (x, y)), ("test", (xt, yt))):
        ax, ay = digits.arrays(split)
        assert ax.dtype == np.float32 and ay.dtype == np.int64
        np.testing.assert_array_equal(ax, ex)
        np.testing.assert_array_equal(ay, ey)
    # The unbatched datasets: same elements, same order, same dtypes.
    element = digits.train.element_spec
    assert element[0].shape == (8, 8, 1) and element[0].dtype == tf.float32
    assert element[1].shape == () and element[1].dtype == tf.int64
    tx, ty = _epoch(digits.train)
    np.testing.assert_array_equal(np.stack(tx), x)
    np.testing.assert_array_equal(np.array(ty), y)
    test_x = np.concatenate([b[0] for b in digits.test_batches(128)])
    np.testing.assert_array_equal(test_x, xt)


def test_digits_deterministic_and_seeded(digits):
    again = load("digits")
    other = load("digits", seed=1)
    np.testing.assert_array_equal(again.arrays("train")[0], digits.arrays("train")[0])
    assert other.num_train == digits.num_train
    assert not np.array_equal(other.arrays("train")[0], digits.arrays("train")[0])


def test_train_batches_cover_each_example_once_and_reshuffle(digits):
    x, y = digits.arrays("train")
    dataset = digits.train_batches(100, seed=3)
    orders = []
    for _ in range(2):
        bx, by = _epoch(dataset)
        assert [len(b) for b in by] == [100] * 13 + [47]
        assert all(b.shape[1:] == (8, 8, 1) for b in bx)
        ex, ey = np.concatenate(bx), np.concatenate(by)
        assert _rows(ex, ey) == _rows(x, y)
        orders.append(ex)
    assert not np.array_equal(orders[0], orders[1]), "no reshuffle between epochs"
    # The seed fixes the sequence of orders; another seed gives another.
    np.testing.assert_array_equal(
        np.concatenate(_epoch(digits.train_batches(100, seed=3))[0]), orders[0]
    )
    other = np.concatenate(_epoch(digits.train_batches(100, seed=4))[0])
    assert not np.array_equal(other, orders[0])


def test_train_batches_drop_remainder(digits):
    _, by = _epoch(digits.train_batches(100, drop_remainder=True))
    assert [len(b) for b in by] == [100] * 13
    spec = digits.train_batches(100, drop_remainder=True).element_spec
    assert spec[0].shape == (100, 8, 8, 1)


def test_arguments_checked(digits):
    with pytest.raises(ValueError, match="`split` must be one of"):
        digits.arrays("validation")
    with pytest.raises(ValueError, match="batch_size"):
        digits.train_batches(0)
    with pytest.raises(TypeError, match="batch_size"):
        digits.test_batches(2.5)


# ---------------------------------------------------------------- tfds (mocked)


@pytest.fixture(scope="module")
def mocked():
    """Per tensorflow-datasets name: the loaded splits and the raw mock images."""
    loaded = {}
    for name in EXPECTED_STATS:
        with (
            tfds.testing.mock_data(num_examples=MOCK_EXAMPLES),
            pytest.MonkeyPatch.context() as patch,
        ):
            patch.setattr(
                datasets, "_reachable", lambda url: True
            )  # mock data: no network
            data = load(name)
            raw = {}
            for split in ("train", "test"):
                ds = tfds.builder(name).as_dataset(split=split, as_supervised=True)
                xs, ys = _epoch(ds)
                raw[split] = (np.stack(xs), np.array(ys))
            # Read everything inside the mock context.
            arrays = {split: data.arrays(split) for split in ("train", "test")}
            counted = {split: sum(1 for _ in getattr(data, split)) for split in raw}
        loaded[name] = data, raw, arrays, counted
    return loaded


@pytest.mark.parametrize("name", list(EXPECTED_STATS))
def test_tfds_sets_preprocessed(mocked, name):
    data, raw, arrays, counted = mocked[name]
    shape, num_classes = EXPECTED_INFO[name]
    assert data.name == name
    assert data.input_shape == shape
    assert data.num_classes == num_classes
    assert data.num_train == counted["train"] == MOCK_EXAMPLES
    assert data.num_test == counted["test"] == MOCK_EXAMPLES
    mean, std = (np.array(v, np.float32) for v in EXPECTED_STATS[name])
    for split in ("train", "test"):
        images, labels = raw[split]
        assert images.dtype == np.uint8
        x, y = arrays[split]
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.shape == (MOCK_EXAMPLES, *shape)
        expected = (images.astype(np.float32) / 255.0 - mean) / std
        np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(y, labels)
        assert y.min() >= 0 and y.max() < num_classes
    spec = data.train.element_spec
    assert spec[0].shape == shape and spec[0].dtype == tf.float32
    assert spec[1].shape == () and spec[1].dtype == tf.int64


@pytest.mark.parametrize("name", ["mnist", "svhn_cropped"])
def test_no_augmentation(mocked, name):
    data, _, arrays, _ = mocked[name]
    assert data.augment is None
    x, y = arrays["train"]
    bx, by = _epoch(data.train_batches(10, seed=1))
    assert [len(b) for b in by] == [10, 10, 4]
    # Unaugmented: the batches hold exactly the preprocessed examples.
    assert _rows(np.concatenate(bx), np.concatenate(by)) == _rows(x, y)


def _crop_matches(image, source, padding=4):
    """The (dy, dx, flipped) with which `image` is a crop of padded `source`."""
    height, width = source.shape[:2]
    padded = np.pad(source, ((padding, padding), (padding, padding), (0, 0)))
    found = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[dy : dy + height, dx : dx + width]
            for flipped, candidate in ((False, crop), (True, crop[:, ::-1])):
                if np.array_equal(image, candidate):
                    found.append((dy, dx, flipped))
    return found


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_augmentation_crops_and_flips(mocked, name):
    data, _, arrays, _ = mocked[name]
    assert data.augment is not None
    x, y = arrays["train"]
    # Augmentation changes neither the order nor the labels: compare with the
    # same seed's unaugmented epoch.
    plain_x, plain_y = _epoch(data.train_batches(8, seed=5, augment=False))
    aug_x, aug_y = _epoch(data.train_batches(8, seed=5))
    plain_x, aug_x = np.concatenate(plain_x), np.concatenate(aug_x)
    np.testing.assert_array_equal(np.concatenate(aug_y), np.concatenate(plain_y))
    assert aug_x.shape == plain_x.shape == (MOCK_EXAMPLES, 32, 32, 3)
    assert _rows(plain_x, np.concatenate(plain_y)) == _rows(x, y)
    matches = [_crop_matches(a, p) for a, p in zip(aug_x, plain_x, strict=True)]
    assert all(len(m) == 1 for m in matches), matches
    offsets = {m[0][:2] for m in matches}
    flips = {m[0][2] for m in matches}
    assert flips == {False, True}
    assert len(offsets) > 3
    assert any(dy != dx for dy, dx in offsets), "vertical, horizontal offsets tied"
    # Fixed by the seed.
    again = np.concatenate(_epoch(data.train_batches(8, seed=5))[0])
    np.testing.assert_array_equal(again, aug_x)


def test_random_crop_flip_direct():
    images = np.random.default_rng(0).random((32, 6, 5, 2)).astype(np.float32)
    labels = np.arange(32)
    out, out_labels = datasets.random_crop_flip(images, labels, seed=[3, 4])
    np.testing.assert_array_equal(out_labels, labels)
    out = out.numpy()
    assert out.shape == images.shape and out.dtype == np.float32
    matches = [_crop_matches(o, i) for o, i in zip(out, images, strict=True)]
    assert all(len(m) == 1 for m in matches)
    assert {m[0][2] for m in matches} == {False, True}
    offsets = {m[0][:2] for m in matches}
    assert len(offsets) > 5
    assert any(dy != dx for dy, dx in offsets)
    same, _ = datasets.random_crop_flip(images, labels, seed=[3, 4])
    np.testing.assert_array_equal(same.numpy(), out)
    # Unseeded (TensorFlow's global generator), inside a tf.data map as
    # DynamicSampling applies it.
    batches = tf.data.Dataset.from_tensors((images, labels))
    unseeded, _ = next(iter(batches.map(datasets.random_crop_flip)))
    assert all(
        len(_crop_matches(o, i)) == 1
        for o, i in zip(unseeded.numpy(), images, strict=True)
    )


def test_prepared_set_loads_without_download(monkeypatch):
    calls = []
    monkeypatch.setattr(
        tfds.core.DatasetBuilder, "is_prepared", lambda self: True, raising=True
    )
    with tfds.testing.mock_data(num_examples=3), monkeypatch.context() as patch:
        patch.setattr(
            tfds.core.DatasetBuilder,
            "download_and_prepare",
            lambda self, *a, **k: calls.append(1),
        )
        data = load("mnist", download=False)
        assert data.num_train == 3
    assert calls == []


# ---------------------------------------------------------------- errors


def test_unknown_name():
    with pytest.raises(ValueError) as info:
        load("foo")
    message = str(info.value)
    assert message.startswith("`name` must be one of 'digits', 'cifar10', ")
    for name in datasets.NAMES:
        assert repr(name) in message
    assert message.endswith("Received: name='foo'")


def test_not_prepared_without_download(tmp_path, monkeypatch):
    def no_download(self, *args, **kwargs):
        raise AssertionError("download attempted")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    with pytest.raises(DatasetUnavailableError) as info:
        load("cifar10", data_dir=str(tmp_path), download=False)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "'cifar10'" in message and str(tmp_path) in message
    assert "download=False" in message
    assert "tfds build cifar10" in message and "--data-dir" in message


def _offline_download(self, *args, **kwargs):
    # What tensorflow-datasets raises offline, after its retries.
    raise requests.exceptions.ConnectionError(
        "Max retries exceeded (Failed to resolve 'storage.googleapis.com')"
    )


def test_download_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "_reachable", lambda url: True)
    monkeypatch.setattr(
        tfds.core.DatasetBuilder, "download_and_prepare", _offline_download
    )
    with pytest.raises(DatasetUnavailableError) as info:
        load("mnist", data_dir=str(tmp_path))
    message = str(info.value)
    assert "'mnist'" in message and str(tmp_path) in message
    assert "ConnectionError" in message and "tfds build mnist" in message
    assert isinstance(info.value.__cause__, OSError)


def test_unreachable_host_fails_before_download(tmp_path, monkeypatch):
    calls = []

    def download(self, *args, **kwargs):
        calls.append(1)
        raise AssertionError("download attempted")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download)
    probed = []
    monkeypatch.setattr(
        datasets, "_reachable", lambda url, *a, **k: probed.append(url) or False
    )
    with pytest.raises(DatasetUnavailableError, match="cannot be reached") as info:
        load("svhn_cropped", data_dir=str(tmp_path))
    assert str(tmp_path) in str(info.value)
    assert probed == ["http://ufldl.stanford.edu/housenumbers/"]
    assert calls == []


def test_reachable_probe(monkeypatch):
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("ALL_PROXY", raising=False)
    monkeypatch.delenv("all_proxy", raising=False)
    seen = []

    def refuse(address, timeout=None):
        seen.append(address)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert not datasets._reachable("https://example.invalid/x/", timeout=0.5)
    assert seen == [("example.invalid", 443)]
    assert datasets._reachable(None)

    class Connection:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Connection())
    assert datasets._reachable("http://example.invalid/")
