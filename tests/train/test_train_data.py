"""Data sets: bundled files, splits, standardisation on the training split only, MNIST IDX files."""
import gzip
import struct

import numpy as np
import pytest

from fastopt.train.data import load_dataset, read_idx


@pytest.mark.parametrize("name, task, n_classes, n_features", [
    ("linear", "regression", 0, 1), ("diabetes", "regression", 0, 10), ("breast_cancer", "binary", 2, 30),
    ("wine", "multiclass", 3, 13), ("digits", "multiclass", 10, 64),
])
def test_datasets_load_and_split(name, task, n_classes, n_features):
    d = load_dataset(name, seed=0)
    assert d.task == task and d.n_classes == n_classes and d.n_features == n_features
    n = len(d.y_train) + len(d.y_val) + len(d.y_test)
    assert len(d.y_test) == pytest.approx(0.2 * n, abs=n_classes + 1)
    assert len(d.y_val) == pytest.approx(0.1 * n, abs=n_classes + 1)


def test_standardisation_uses_training_statistics_only():
    d = load_dataset("breast_cancer", seed=0)
    np.testing.assert_allclose(d.X_train.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(d.X_train.std(axis=0), 1.0, atol=1e-10)
    assert np.abs(d.X_test.mean(axis=0)).max() > 1e-3  # test data is not re-centred on itself


def test_image_sets_share_one_scale_across_pixels():
    d = load_dataset("digits", seed=0)
    assert np.ptp(d.feature_std) == 0 and d.X_train.mean() == pytest.approx(0.0, abs=1e-10)


def test_split_is_seeded_and_stratified():
    a, b, c = load_dataset("wine", seed=3), load_dataset("wine", seed=3), load_dataset("wine", seed=4)
    np.testing.assert_array_equal(a.X_test, b.X_test)
    assert not np.array_equal(a.X_test, c.X_test)
    counts_train = np.bincount(a.y_train) / len(a.y_train)
    counts_test = np.bincount(a.y_test) / len(a.y_test)
    np.testing.assert_allclose(counts_train, counts_test, atol=0.05)


def test_linear_target_round_trip():
    d = load_dataset("linear", seed=0, noise=0.0)
    # with no noise the least-squares fit on standardised data maps back to exactly y = 2x + 1
    A = np.c_[d.X_train, np.ones(len(d.X_train))]
    w_s, b_s = np.linalg.lstsq(A, d.y_train, rcond=None)[0]
    w, b = d.original_linear_coefficients([w_s], b_s)
    assert w[0] == pytest.approx(2.0) and b == pytest.approx(1.0)


def test_unknown_dataset_and_bad_split():
    with pytest.raises(ValueError, match="Unknown data set"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split"):
        load_dataset("wine", val_fraction=0.5, test_fraction=0.6)


def _write_idx(path, array, gz=False):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(payload)


def test_mnist_from_local_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (50, 28, 28)), gz=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(50) % 10)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(20) % 10)
    d = load_dataset("mnist", path=str(tmp_path), seed=0)
    assert d.n_features == 784 and d.n_classes == 10
    assert len(d.y_test) == 20 and len(d.y_train) + len(d.y_val) == 50
    assert read_idx(str(tmp_path / "t10k-labels-idx1-ubyte")).tolist() == (np.arange(20) % 10).tolist()


@pytest.mark.parametrize("which", ["train", "t10k"])
def test_mnist_labels_outside_0_to_9_are_refused(tmp_path, which):
    """A label of 200 reached the loss as an IndexError traceback."""
    rng = np.random.default_rng(1)
    _write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 256, (30, 28, 28)))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (10, 28, 28)))
    for name, n in (("train", 30), ("t10k", 10)):
        labels = np.arange(n) % 10
        if name == which:
            labels[n // 2] = 200
        _write_idx(tmp_path / f"{name}-labels-idx1-ubyte", labels)
    with pytest.raises(ValueError, match=f"{which}-labels-idx1-ubyte: the labels go from 0 to 200 \\(digits are 0-9\\)"):
        load_dataset("mnist", path=str(tmp_path))


def _damage(tmp_path, what):
    """The four MNIST files, one of them damaged as `what` says; returns the damaged file's name."""
    rng = np.random.default_rng(2)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (30, 28, 28)), gz=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(30) % 10)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (10, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(10) % 10)
    gz, labels, images = (tmp_path / n for n in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte",
                                                   "t10k-images-idx3-ubyte"))
    if what == "cut gzip":
        gz.write_bytes(gz.read_bytes()[:100])
    elif what == "corrupt gzip":  # the gzip header intact, the deflate data not (zlib.error)
        data = bytearray(gz.read_bytes())
        data[20:60] = bytes(40)
        gz.write_bytes(bytes(data))
    elif what == "not gzip":
        gz.write_bytes(b"no gzip here")
    elif what == "cut header":
        labels.write_bytes(labels.read_bytes()[:6])
    elif what == "a directory":
        labels.unlink()
        labels.mkdir()
    elif what == "no dims":
        labels.write_bytes(bytes([0, 0, 8, 0, 7]))
    elif what == "negative labels":
        labels.write_bytes(struct.pack(">BBBBI", 0, 0, 0x09, 1, 10) + np.full(10, -1, np.int8).tobytes())
    elif what == "ragged int32":
        labels.write_bytes(struct.pack(">BBBBI", 0, 0, 0x0C, 1, 10) + bytes(41))
    elif what == "other image size":
        _write_idx(images, rng.integers(0, 256, (10, 20, 20)))
        return "the test images 400"
    elif what == "no test images":
        _write_idx(images, np.zeros((0, 28, 28)))
        _write_idx(labels, np.zeros(0))
        return "the test files in"
    return gz.name if "gzip" in what else labels.name


@pytest.mark.parametrize("what", ["cut gzip", "corrupt gzip", "not gzip", "cut header", "a directory", "no dims", "negative labels",
                                  "ragged int32", "other image size", "no test images"])
def test_a_damaged_mnist_file_is_a_value_error_naming_it(tmp_path, what):
    """Each used to end in a traceback of another kind (EOFError, BadGzipFile, struct.error, IsADirectoryError,
    IndexError; negative labels trained and crashed in the metrics); now a ValueError that names the file, which
    the CLI reports as a usage error (exit 2)."""
    named = _damage(tmp_path, what)
    with pytest.raises(ValueError) as info:
        load_dataset("mnist", path=str(tmp_path))
    assert named in str(info.value), str(info.value)


def test_mnist_missing_files_error_names_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_dataset("mnist", path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="local IDX files"):
        load_dataset("mnist")


def test_idx_rejects_garbage(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="magic"):
        read_idx(str(bad))


def test_dataset_tasks_table_matches_the_data():
    from fastopt.train.data import DATASET_TASKS, DATASETS
    assert set(DATASET_TASKS) == set(DATASETS)
    for name in DATASETS:
        if name != "mnist":  # needs local files
            assert load_dataset(name, seed=0).task == DATASET_TASKS[name], name
