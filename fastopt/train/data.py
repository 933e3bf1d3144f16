"""Data sets: load, split (seeded), standardise (fitted on the training split only).

    data = load_dataset("digits", seed=0)
    data.X_train, data.y_train, data.X_val, data.y_val, data.X_test, data.y_test

Sources: `linear` is synthetic (y = 2x + 1 + noise, the seed texts' example); `diabetes`,
`breast_cancer`, `wine` and `digits` are read from the files bundled inside the scikit-learn wheel
(no network); `mnist` is read from the four IDX files in a local directory given as `path`.

Regression targets are standardised too (so one learning rate suits every data set);
`Dataset.to_target_units` maps predictions back, and metrics are reported in the original units.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

DATASETS = ("linear", "diabetes", "breast_cancer", "wine", "digits", "mnist")
# the task of each data set, known without loading it (checked against the loaded data in the tests)
DATASET_TASKS = {"linear": "regression", "diabetes": "regression", "breast_cancer": "binary", "wine": "multiclass",
                 "digits": "multiclass", "mnist": "multiclass"}
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass
class Dataset:
    name: str
    task: str  # "regression", "binary" or "multiclass"
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    n_classes: int = 0  # 0 for regression
    feature_mean: np.ndarray = field(default=None, repr=False)
    feature_std: np.ndarray = field(default=None, repr=False)
    target_mean: float = 0.0
    target_std: float = 1.0

    @property
    def n_features(self) -> int:
        return self.X_train.shape[1]

    @property
    def n_outputs(self) -> int:
        return 1 if self.task in ("regression", "binary") else self.n_classes

    def to_target_units(self, y_standardised):
        """Regression predictions back in the units of the original target."""
        return y_standardised * self.target_std + self.target_mean

    def original_linear_coefficients(self, w, b):
        """(w, b) of a linear model fitted on standardised x and y, expressed on the raw data:
        y = sd_y (w . (x - mu) / sd + b) + mu_y  =>  w_raw = sd_y w / sd,  b_raw = sd_y (b - w . mu / sd) + mu_y."""
        w = np.asarray(w, dtype=np.float64).reshape(-1)
        scaled = w / self.feature_std
        w_raw = self.target_std * scaled
        b_raw = self.target_std * (float(b) - float(scaled @ self.feature_mean)) + self.target_mean
        return w_raw, b_raw

    def astype(self, dtype, xp=np):
        """A copy with features in `dtype` on the device of `xp` (labels int64, targets `dtype`)."""
        def features(X):
            return xp.asarray(X.astype(dtype, copy=False))

        def targets(y):
            return xp.asarray(y.astype(dtype if self.task == "regression" else np.int64, copy=False))
        return Dataset(self.name, self.task, features(self.X_train), targets(self.y_train), features(self.X_val),
                       targets(self.y_val), features(self.X_test), targets(self.y_test), self.n_classes,
                       self.feature_mean, self.feature_std, self.target_mean, self.target_std)

    def summary(self) -> str:
        kind = "regression" if self.task == "regression" else f"{self.n_classes} classes"
        return (f"{self.name}: {self.n_features} features, {kind}, "
                f"train/val/test = {len(self.y_train)}/{len(self.y_val)}/{len(self.y_test)}")


# ---------------------------------------------------------------------------------------------- sources

def _linear(n_samples=1000, noise=0.1, seed=0):
    """The seed texts' toy problem: y = 2x + 1 + Gaussian noise, x uniform in [0, 2)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    X = rng.uniform(0.0, 2.0, size=(n_samples, 1))
    y = 2.0 * X[:, 0] + 1.0 + noise * rng.normal(size=n_samples)
    return X, y, "regression", 0


def _sklearn(loader_name):
    def load(**_):
        try:
            import sklearn.datasets as skd
        except ImportError:
            raise ImportError("this data set is read from scikit-learn's bundled files: "
                              "pip install 'fastopt[train]' (scikit-learn)") from None
        bunch = getattr(skd, loader_name)()
        X, y = bunch.data.astype(np.float64), bunch.target
        if loader_name == "load_diabetes":
            return X, y.astype(np.float64), "regression", 0
        n_classes = int(len(np.unique(y)))
        return X, y.astype(np.int64), "binary" if n_classes == 2 else "multiclass", n_classes
    return load


def read_idx(path):
    """One IDX file (optionally .gz) as a NumPy array: magic (0, 0, dtype code, ndim), big-endian dims.
    A file that cannot be read or is not a whole IDX file is a ValueError naming it and what is wrong."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # a directory, no permission, a cut, non-gzip or corrupt .gz
        raise ValueError(f"{path} cannot be read: {type(e).__name__}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise ValueError(f"{path}: the header is cut short ({len(raw)} bytes, {ndim} dims need {start})")
    dims = struct.unpack(f">{ndim}I", raw[4:start])
    itemsize = np.dtype(dtypes[raw[2]]).itemsize
    if (len(raw) - start) % itemsize:
        raise ValueError(f"{path}: {len(raw) - start} bytes of data are not a whole number of {itemsize}-byte elements")
    data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=start)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} elements")
    return data.reshape(dims)


def _find_idx(directory, stem):
    for candidate in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        full = os.path.join(directory, candidate)
        if os.path.exists(full):
            return full
    return None


def _images(path):
    """An IDX file of images (n, rows, cols) as n rows of pixels scaled to [0, 1]."""
    images = read_idx(path)
    if images.ndim != 3:
        raise ValueError(f"{path}: holds an array of shape {images.shape}, expected images (count, rows, cols)")
    return images.reshape(images.shape[0], images.shape[1] * images.shape[2]).astype(np.float64) / 255.0


def _labels(path):
    """An IDX file of digit labels (n,), each in 0..9."""
    labels = read_idx(path)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: holds an array of shape {labels.shape} and dtype {labels.dtype}, expected "
                         f"integer labels (count,)")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise ValueError(f"{path}: the labels go from {int(labels.min())} to {int(labels.max())} (digits are 0-9)")
    return labels.astype(np.int64)


def mnist_files(path):
    """{"train_images": file, ...}: the four MNIST IDX files in directory `path` (plain or .gz), or a
    FileNotFoundError saying which are missing (the CLI checks them before training starts)."""
    if not path:
        raise FileNotFoundError("mnist is read from local IDX files: pass the directory holding "
                                f"{', '.join(MNIST_FILES.values())} (or .gz) as path= / --data-path")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"mnist: {path!r} is not a directory (expected one holding "
                                f"{', '.join(MNIST_FILES.values())}, plain or .gz)")
    found = {key: _find_idx(path, stem) for key, stem in MNIST_FILES.items()}
    missing = [MNIST_FILES[k] for k, v in found.items() if v is None]
    if missing:
        raise FileNotFoundError(f"mnist: {path!r} lacks {', '.join(missing)} (plain or .gz); fastopt does not "
                                "download data: put the four IDX files there")
    return found


def _mnist(path=None, **_):
    """MNIST from its four IDX files in `path` (plain or .gz), pixels scaled to [0, 1]. Returns the
    official test set separately: it stays the test split."""
    files = mnist_files(path)
    X_train, y_train = _images(files["train_images"]), _labels(files["train_labels"])
    X_test, y_test = _images(files["test_images"]), _labels(files["test_labels"])
    if len(X_train) != len(y_train) or len(X_test) != len(y_test):
        raise ValueError(f"mnist: image and label counts differ in {path!r}")
    if not len(X_train) or not len(X_test):
        raise ValueError(f"mnist: the {'train' if not len(X_train) else 'test'} files in {path!r} hold no images")
    if X_train.shape[1] != X_test.shape[1]:
        raise ValueError(f"mnist: the train images have {X_train.shape[1]} pixels, the test images "
                         f"{X_test.shape[1]} ({path!r})")
    return (X_train, y_train), (X_test, y_test), 10


SOURCES = {
    "linear": _linear,
    "diabetes": _sklearn("load_diabetes"),
    "breast_cancer": _sklearn("load_breast_cancer"),
    "wine": _sklearn("load_wine"),
    "digits": _sklearn("load_digits"),
}


# ---------------------------------------------------------------------------------------------- split

def split_indices(y, fractions, seed, stratify):
    """Seeded random split of range(len(y)) into len(fractions) + 1 parts (the last takes the rest).
    Stratified for classification: each class is split in the same proportions."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 11]))
    groups = [np.flatnonzero(y == c) for c in np.unique(y)] if stratify else [np.arange(len(y))]
    parts = [[] for _ in range(len(fractions) + 1)]
    for idx in groups:
        idx = rng.permutation(idx)
        bounds = np.round(np.cumsum(fractions) * len(idx)).astype(int)
        for part, chunk in zip(parts, np.split(idx, bounds)):
            part.append(chunk)
    # sorted, so a split does not depend on the order the classes were visited in
    return [np.sort(np.concatenate(p)) for p in parts]


IMAGE_DATASETS = ("digits", "mnist")


def _standardiser(X, per_feature):
    """Mean and std of the training features. Tables: per feature. Images: one mean and std over all
    pixels, since pixels share a unit; per-pixel statistics would blow a rare stroke in a nearly blank
    border pixel up to tens of standard deviations (on digits that costs ~1% test accuracy)."""
    if not per_feature:
        std = X.std() or 1.0
        return np.full(X.shape[1], X.mean()), np.full(X.shape[1], std)
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    std[std == 0] = 1.0  # constant features stay 0 instead of dividing by 0
    return mean, std


def load_dataset(name, *, seed=0, val_fraction=0.1, test_fraction=0.2, standardize=True, path=None,
                 n_samples=1000, noise=0.1) -> Dataset:
    """Load data set `name` (one of DATASETS), split it with `seed` into train / validation / test and
    standardise features (and regression targets) with statistics of the training split only
    (images: one mean and std over all pixels, see _standardiser).

    val_fraction and test_fraction are fractions of the whole set (mnist: its own test file is the test
    split and val_fraction is taken from its training file). `path`: the IDX directory for mnist.
    `n_samples`, `noise`: the size and noise level of `linear`."""
    if name not in DATASETS:
        raise ValueError(f"Unknown data set {name!r}; known: {', '.join(DATASETS)}")
    if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"Invalid split: val_fraction={val_fraction}, test_fraction={test_fraction}")
    if name == "mnist":
        (X, y), (X_test, y_test), n_classes = _mnist(path)
        task = "multiclass"
        train_idx, val_idx = split_indices(y, [1.0 - val_fraction], seed, stratify=True)
        X_train, y_train, X_val, y_val = X[train_idx], y[train_idx], X[val_idx], y[val_idx]
    else:
        if name == "linear":
            X, y, task, n_classes = _linear(n_samples=n_samples, noise=noise, seed=seed)
        else:
            X, y, task, n_classes = SOURCES[name]()
        train_share = 1.0 - val_fraction - test_fraction
        train_idx, val_idx, test_idx = split_indices(y, [train_share, val_fraction], seed,
                                                     stratify=task != "regression")
        X_train, y_train, X_val, y_val = X[train_idx], y[train_idx], X[val_idx], y[val_idx]
        X_test, y_test = X[test_idx], y[test_idx]

    mean, std = _standardiser(X_train, name not in IMAGE_DATASETS) if standardize else (np.zeros(X.shape[1]), np.ones(X.shape[1]))
    y_mean, y_std = 0.0, 1.0
    if task == "regression" and standardize:
        y_mean, y_std = float(y_train.mean()), float(y_train.std()) or 1.0

    def fx(A):
        return (A - mean) / std

    def fy(v):
        return (v - y_mean) / y_std if task == "regression" else v
    return Dataset(name, task, fx(X_train), fy(y_train), fx(X_val), fy(y_val), fx(X_test), fy(y_test),
                   n_classes, mean, std, y_mean, y_std)
