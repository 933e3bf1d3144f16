"""fastopt.train: small models trained with fastopt's fused optimizer steps.

models.py     LinearRegression, LogisticRegression, MLP (hand-written forward/backward, flat buffers)
losses.py     MSE, binary and softmax cross-entropy (stable), L1/L2 penalties
data.py       load_dataset: linear, diabetes, breast_cancer, wine, digits (bundled with scikit-learn), mnist (IDX)
metrics.py    accuracy, macro precision/recall/F1, confusion matrix, MSE, R^2
trainer.py    fit(model, data, TrainConfig): minibatches, schedules, clipping, early stopping, history
composite.py  the composite optimizers (lbfgs full-batch, muon + AdamW, adafactor, sparse_adam) in the trainer
experiment.py Experiment: one run from plain values (used by the CLI and the search)
search.py     grid / random / Optuna TPE search in parallel processes
plots.py      training curves as PNG
cli.py        `fastopt train | compare | search`
"""
from fastopt.train.data import Dataset, load_dataset
from fastopt.train.experiment import Experiment, recommended_config
from fastopt.train.models import MLP, LinearRegression, LogisticRegression
from fastopt.train.trainer import TrainConfig, TrainResult, fit

__all__ = ["Dataset", "load_dataset", "Experiment", "recommended_config", "MLP", "LinearRegression",
           "LogisticRegression", "TrainConfig", "TrainResult", "fit"]
