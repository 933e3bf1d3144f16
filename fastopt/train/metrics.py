"""Evaluation metrics on host arrays: classification (accuracy, macro precision / recall / F1,
confusion matrix) and regression (MSE, R^2). Small and dependency-free; scikit-learn's definitions
(macro averages over the classes; a class never predicted has precision 0, like zero_division=0)."""
from __future__ import annotations

import numpy as np

from fastopt.train.arrays import to_numpy


def confusion_matrix(y_true, y_pred, n_classes=None):
    """C[i, j] = number of samples of true class i predicted as class j."""
    y_true, y_pred = to_numpy(y_true).astype(np.int64), to_numpy(y_pred).astype(np.int64)
    if n_classes is None:
        n_classes = int(max(y_true.max(initial=-1), y_pred.max(initial=-1))) + 1
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def classification_metrics(y_true, y_pred, n_classes=None) -> dict:
    cm = confusion_matrix(y_true, y_pred, n_classes)
    true_pos = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0)
    actual = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, true_pos / predicted, 0.0)
        recall = np.where(actual > 0, true_pos / actual, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = actual > 0  # macro averages over the classes present in y_true
    return {
        "accuracy": float(true_pos.sum() / max(cm.sum(), 1)),
        "precision_macro": float(precision[present].mean()),
        "recall_macro": float(recall[present].mean()),
        "f1_macro": float(f1[present].mean()),
        "confusion_matrix": cm.tolist(),
    }


def regression_metrics(y_true, y_pred) -> dict:
    y_true = to_numpy(y_true).astype(np.float64).reshape(-1)
    y_pred = to_numpy(y_pred).astype(np.float64).reshape(-1)
    residual = np.sum((y_true - y_pred) ** 2)
    total = np.sum((y_true - y_true.mean()) ** 2)
    return {"mse": float(residual / len(y_true)), "r2": float(1.0 - residual / total) if total > 0 else 0.0}


def evaluate(model, data, X, y) -> dict:
    """Metrics of `model` on (X, y) of data set `data`; regression metrics in the target's own units."""
    outputs = model.outputs(X)
    out = {"loss": float(model.data_loss(outputs, y))}
    predictions = model.decode(outputs)
    if data.task == "regression":
        out.update(regression_metrics(data.to_target_units(to_numpy(y)),
                                      data.to_target_units(to_numpy(predictions))))
    else:
        out.update(classification_metrics(y, predictions, data.n_classes))
    return out


def headline_metric(task) -> tuple[str, str]:
    """(name, direction) of the number reported per epoch: accuracy for classifiers, R^2 for regression."""
    return ("r2", "max") if task == "regression" else ("accuracy", "max")
