import numpy as np
import pytest

from fastopt.train.metrics import classification_metrics, confusion_matrix, regression_metrics


def test_against_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    m = classification_metrics(y, p, 4)
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(y, p))
    assert m["precision_macro"] == pytest.approx(sk.precision_score(y, p, average="macro"))
    assert m["recall_macro"] == pytest.approx(sk.recall_score(y, p, average="macro"))
    assert m["f1_macro"] == pytest.approx(sk.f1_score(y, p, average="macro"))
    assert m["confusion_matrix"] == sk.confusion_matrix(y, p).tolist()
    t, q = rng.normal(size=50), rng.normal(size=50)
    r = regression_metrics(t, q)
    assert r["mse"] == pytest.approx(sk.mean_squared_error(t, q))
    assert r["r2"] == pytest.approx(sk.r2_score(t, q))


def test_confusion_matrix_layout():
    cm = confusion_matrix([0, 0, 1, 2], [0, 1, 1, 0], 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_class_never_predicted_has_zero_precision():
    m = classification_metrics([0, 1, 1], [1, 1, 1], 2)
    assert m["precision_macro"] == pytest.approx((0 + 2 / 3) / 2)
