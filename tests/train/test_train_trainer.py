"""The training loop: each model learns its data set, determinism, early stopping, schedules, clipping."""
import dataclasses

import numpy as np
import pytest

from fastopt.specs import REGISTRY
from fastopt.train.data import load_dataset
from fastopt.train.experiment import Experiment, recommended_config, recommended_lr
from fastopt.train.models import MLP
from fastopt.train.trainer import SCHEDULES, TrainConfig, build_schedule, describe_divergence, fit


def run(dataset, **overrides):
    overrides.setdefault("progress", False)
    model_fields = {f.name for f in dataclasses.fields(Experiment)} - {"train"}
    own = {k: overrides.pop(k) for k in list(overrides) if k in model_fields}
    return Experiment(dataset=dataset, train=recommended_config(dataset, **overrides), **own).run()


def test_mlp_learns_digits():
    result, model, _ = run("digits")
    assert result.metrics["test"]["accuracy"] >= 0.95
    assert result.history["train_loss"][-1] < result.history["train_loss"][0] / 5


def test_logistic_regression_learns_breast_cancer():
    result, _, _ = run("breast_cancer")
    assert result.metrics["test"]["accuracy"] >= 0.95


def test_multinomial_logistic_learns_wine():
    result, _, _ = run("wine")
    assert result.metrics["test"]["accuracy"] >= 0.9


def test_linear_regression_matches_least_squares_on_diabetes():
    result, _, _ = run("diabetes")
    d = load_dataset("diabetes", seed=0)
    A = np.c_[d.X_train, np.ones(len(d.X_train))]
    coef = np.linalg.lstsq(A, d.y_train, rcond=None)[0]
    pred = d.to_target_units(np.c_[d.X_test, np.ones(len(d.X_test))] @ coef)
    closed_form = np.mean((pred - d.to_target_units(d.y_test)) ** 2)
    assert result.metrics["test"]["mse"] == pytest.approx(closed_form, rel=0.02)


def test_linear_recovers_slope_and_intercept():
    result, _, _ = run("linear")
    coefficients = result.metrics["coefficients"]
    assert coefficients["w"][0] == pytest.approx(2.0, abs=0.05)
    assert coefficients["b"] == pytest.approx(1.0, abs=0.05)


def test_mlp_regression_on_diabetes_beats_the_mean():
    result, _, _ = run("diabetes", model="mlp", hidden_sizes=(16,), epochs=30, lr=0.01)
    assert result.metrics["test"]["r2"] > 0.3


def test_same_seed_same_history_other_seed_differs():
    a, _, _ = run("digits", epochs=3, dropout=0.2, seed=5)
    b, _, _ = run("digits", epochs=3, dropout=0.2, seed=5)
    c, _, _ = run("digits", epochs=3, dropout=0.2, seed=6)
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert a.history[key] == b.history[key]
    assert a.history["train_loss"] != c.history["train_loss"]


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_optimizer_trains(name):
    # conservative learning rates: the point is that each class plugs in and lowers the loss
    lr = {"sgd": 0.05, "lion": 1e-3, "lamb": 1e-2, "adagrad": 0.05}.get(name, 3e-3)
    result, _, _ = run("wine", model="mlp", hidden_sizes=(8,), optimizer=name, lr=lr, epochs=4,
                       schedule="constant")
    assert result.history["train_loss"][-1] < result.history["train_loss"][0]
    assert not result.diverged


def test_optimizer_options_reach_the_class():
    result, _, _ = run("wine", optimizer="sgd", lr=0.05, epochs=3,
                       optimizer_options={"momentum": 0.9, "nesterov": True})
    assert result.config["optimizer_options"] == {"momentum": 0.9, "nesterov": True}
    result, _, _ = run("wine", optimizer="adam", epochs=2, optimizer_options={"beta1": 0.8, "beta2": 0.99})
    assert result.epochs_run == 2
    with pytest.raises(ValueError, match="no hyperparameter"):
        run("wine", optimizer="sgd", lr=0.1, epochs=1, optimizer_options={"beta1": 0.9})


def _noisy_overfitting_setup():
    data = load_dataset("wine", seed=0).astype(np.float32)
    model = MLP(data.n_features, (256,), data.n_classes, seed=0)
    return model, data


def test_early_stopping_stops_and_restores_the_best_weights():
    model, data = _noisy_overfitting_setup()
    config = TrainConfig(lr=0.05, epochs=60, batch_size=16, patience=3, progress=False)
    result = fit(model, data, config)
    assert result.stopped_early and result.epochs_run < 60
    assert result.epochs_run == result.best_epoch + config.patience + 1
    best_val = min(result.history["val_loss"])
    assert result.metrics["val"]["loss"] == pytest.approx(best_val, rel=1e-6)


def test_without_restore_the_last_weights_stay():
    model, data = _noisy_overfitting_setup()
    result = fit(model, data, TrainConfig(lr=0.05, epochs=60, batch_size=16, patience=3, restore_best=False,
                                          progress=False))
    assert result.metrics["val"]["loss"] == pytest.approx(result.history["val_loss"][-1], rel=1e-6)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # NumPy's overflow warnings are silenced inside fit
def test_divergence_is_reported_not_raised():
    model, data = _noisy_overfitting_setup()
    data.X_train = data.X_train * np.float32(1e30)  # overflows to inf in the first forward pass
    result = fit(model, data, TrainConfig(optimizer="sgd", lr=10.0, epochs=5, progress=False))
    assert result.diverged and result.epochs_run == 1
    d = result.divergence  # the first step's loss is huge but finite; the update then overflows
    assert (d["epoch"], d["steps_per_epoch"], d["loss"]) == (1, 4, "training") and d["step"] in (1, 2)
    assert d["global_step"] == d["step"] and d["value"] in ("nan", "inf")
    assert result.metrics is None and result.history["epoch"] == []
    assert describe_divergence(result.divergence).startswith("the training loss became")


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_divergence_mid_training_names_the_epoch_and_step():
    result, _, _ = run("diabetes", optimizer="sgd", lr=100.0, epochs=5, schedule="constant")
    d = result.divergence
    assert result.diverged and d["epoch"] == 1 and 1 < d["step"] <= d["steps_per_epoch"]
    assert d["global_step"] == d["step"] and result.metrics is None


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_optimizer_learns_at_its_recommended_lr(name):
    # no lr given: the data set's tuned Adam rate scaled for the optimizer (experiment.recommended_lr)
    result, _, _ = run("wine", model="mlp", hidden_sizes=(16,), optimizer=name)  # 50 epochs of 4 steps
    assert not result.diverged
    assert result.config["lr"] == recommended_lr("wine", name)
    assert result.history["train_loss"][-1] < result.history["train_loss"][0] / 2
    assert result.metrics["test"]["accuracy"] >= 0.9
    result, _, _ = run("diabetes", optimizer=name, epochs=40)
    assert not result.diverged and result.metrics["test"]["r2"] > 0.4


@pytest.mark.parametrize("name", ["sgd", "lion", "rmsprop"])
def test_the_tuned_factors_learn_digits(name):
    result, _, _ = run("digits", optimizer=name)
    assert not result.diverged and result.metrics["test"]["accuracy"] >= 0.93


def test_rprop_trains_digits_full_batch_by_default():
    """Rprop is a full-batch method: with batches of 32 its digits loss rose after the first epoch at every lr
    (test loss about 10, accuracy 0.89 from the restored first epoch). Recommended now: the whole set."""
    from fastopt.train.experiment import RECOMMENDED_BATCH
    assert recommended_config("digits", optimizer="rprop").batch_size == RECOMMENDED_BATCH["digits"]["rprop"]
    assert recommended_config("digits", optimizer="rprop", batch_size=64).batch_size == 64  # the user's wins
    assert recommended_config("wine", optimizer="rprop").batch_size == recommended_config("wine").batch_size
    result, _, _ = run("digits", optimizer="rprop")
    steps = result.history["train_loss"]
    assert not result.diverged and result.config["batch_size"] >= 1797
    assert steps[-1] < steps[0] / 20 and result.metrics["test"]["loss"] < 0.5
    assert result.metrics["test"]["accuracy"] >= 0.93


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedules_drive_the_learning_rate(schedule):
    result, _, _ = run("wine", epochs=6, lr=0.01, schedule=schedule)
    lrs = result.history["lr"]
    if schedule == "constant":
        assert lrs == [0.01] * 6
    elif schedule == "plateau":
        assert max(lrs) <= 0.01
    else:
        assert lrs[-1] < lrs[0] or (schedule == "warmup_cosine" and lrs[0] < max(lrs))


def test_cosine_schedule_reaches_zero_at_the_last_step():
    config = TrainConfig(lr=0.1, epochs=4, schedule="cosine")
    schedule = build_schedule(config, steps_per_epoch=10)
    assert schedule(0) == pytest.approx(0.1) and schedule(40) == pytest.approx(0.0)


def test_clipping_is_passed_to_the_optimizer():
    clipped, _, _ = run("wine", epochs=2, optimizer="sgd", lr=0.5, clip_grad_norm=1e-4)
    free, _, _ = run("wine", epochs=2, optimizer="sgd", lr=0.5)
    # a tiny max norm shrinks every step: the loss barely moves
    assert clipped.history["train_loss"][-1] > free.history["train_loss"][-1]
    assert clipped.config["clip_grad_norm"] == 1e-4


def test_progress_bar_can_be_turned_on_and_off(capsys):
    run("wine", epochs=2, progress=True)
    assert "epoch" in capsys.readouterr().err
    run("wine", epochs=2, progress=False)
    assert capsys.readouterr().err == ""


def test_invalid_config():
    model, data = _noisy_overfitting_setup()
    with pytest.raises(ValueError, match="epochs"):
        fit(model, data, TrainConfig(epochs=0, progress=False))
    with pytest.raises(ValueError, match="Unknown schedule"):
        fit(model, data, TrainConfig(schedule="sawtooth", progress=False))


@pytest.mark.parametrize("changes, error, match", [
    (dict(optimizer="adamax2"), ValueError, "Unknown optimizer"),
    (dict(lr=-0.1), ValueError, "Invalid learning rate: -0.1"),
    (dict(lr=float("nan")), ValueError, "Invalid learning rate: nan"),
    (dict(epochs=0), ValueError, "Invalid epochs: 0"),
    (dict(epochs=2.0), TypeError, "epochs must be an integer"),
    (dict(batch_size=-1), ValueError, "Invalid batch_size: -1"),
    (dict(seed=-1), ValueError, "Invalid seed: -1"),
    (dict(patience=-1), ValueError, "Invalid patience: -1"),
    (dict(clip_grad_norm=0.0), ValueError, "Invalid clip_grad_norm: 0.0"),
    (dict(min_delta=float("inf")), ValueError, "Invalid min_delta"),
    (dict(optimizer_options={"eps": -1.0}), ValueError, "Invalid .*-1.0"),
    (dict(optimizer_options={"amsgrad": 1}), TypeError, "amsgrad"),
    (dict(optimizer_options={"momentum": 0.9}), ValueError, "adam has no hyperparameter"),
    (dict(optimizer="sgd", optimizer_options={"nesterov": True}), ValueError, "Nesterov"),
    (dict(schedule="sawtooth"), ValueError, "Unknown schedule"),
    (dict(schedule="exponential", schedule_options={"gamma": -1.0}), ValueError, "decay_rate"),
    # schedule options that were ignored or truncated
    (dict(schedule="step", schedule_options={"gama": 0.5}), ValueError,
     r"unknown option\(s\) 'gama' for the 'step' schedule \(it takes: step_epochs, gamma\)"),
    (dict(schedule="constant", schedule_options={"gamma": 0.5}), ValueError, r"\(it takes: none\)"),
    (dict(schedule="warmup_cosine", schedule_options={"warmup_epochs": -2}), ValueError, "Invalid warmup_epochs: -2"),
    (dict(schedule="step", schedule_options={"step_epochs": 0}), ValueError, "Invalid step_epochs: 0 \\(must be > 0\\)"),
    (dict(schedule="plateau", schedule_options={"patience": 1.7}), TypeError, "patience must be an integer, got 1.7"),
    (dict(schedule="plateau", schedule_options={"patience": -1}), ValueError, "Invalid patience: -1"),
])
def test_config_check_names_the_field(changes, error, match):
    with pytest.raises(error, match=match):
        TrainConfig(**changes).check()


@pytest.mark.parametrize("changes, match", [
    (dict(dataset="iris"), "Unknown data set"),
    (dict(model="cnn"), "Unknown model"),
    (dict(dataset="wine", model="linear"), "linear model is for regression"),
    (dict(dataset="diabetes", model="logistic"), "logistic regression is for classification"),
    (dict(model="mlp", hidden_sizes=(8, 0)), "Invalid hidden_sizes"),
    (dict(model="mlp", dropout=1.0), "Invalid dropout"),
    (dict(l2=-1.0), "Invalid l2"),
    (dict(dtype="float16"), "Unknown dtype"),
    (dict(device="tpu"), "Unknown device"),
])
def test_experiment_check_before_loading_data(changes, match):
    with pytest.raises(ValueError, match=match):
        Experiment(**changes).check()


class _DeviceLikeModule:
    """Stands in for CuPy in fit(): any array module that is not NumPy takes the device path (losses
    checked once per epoch, no per-step synchronisation)."""

    def __getattr__(self, name):
        return getattr(np, name)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_divergence_on_the_device_path_reports_the_first_bad_step(monkeypatch):
    import fastopt.train.trainer as trainer
    monkeypatch.setattr(trainer, "array_module", lambda _: _DeviceLikeModule())
    result, _, _ = run("diabetes", optimizer="sgd", lr=100.0, epochs=5, schedule="constant")
    monkeypatch.undo()
    reference, _, _ = run("diabetes", optimizer="sgd", lr=100.0, epochs=5, schedule="constant")
    assert result.diverged and result.divergence == reference.divergence and result.metrics is None
    monkeypatch.setattr(trainer, "array_module", lambda _: _DeviceLikeModule())
    fine, _, _ = run("wine", epochs=3)
    assert not fine.diverged and len(fine.history["train_loss"]) == 3


def test_warmup_and_step_epochs_in_fractions_and_zero():
    """warmup_epochs=0 used to build a one-step warm-up (the first step at lr 0); step_epochs below one
    passed the option check and then failed in fit's check with 'Invalid step_size: 0'; a warm-up longer
    than the run was taken silently (the peak lr never reached)."""
    config = TrainConfig(lr=0.1, epochs=4, schedule="warmup_cosine", schedule_options={"warmup_epochs": 0})
    config.check()
    schedule = build_schedule(config, steps_per_epoch=10)
    assert schedule(0) == 0.1 and schedule(40) == pytest.approx(0.0)
    config = TrainConfig(lr=0.1, epochs=4, schedule="warmup_cosine", schedule_options={"warmup_epochs": 0.5})
    schedule = build_schedule(config, steps_per_epoch=10)
    assert schedule(0) == 0.0 and schedule(5) == 0.1 and schedule(4) < 0.1
    config = TrainConfig(lr=0.1, epochs=2, schedule="warmup_cosine", schedule_options={"warmup_epochs": 5})
    with pytest.raises(ValueError, match=r"Invalid warmup_epochs: 5 \(more than epochs=2"):
        config.check()
    config = TrainConfig(lr=0.1, epochs=4, schedule="step", schedule_options={"step_epochs": 0.5})
    config.check()
    schedule = build_schedule(config, steps_per_epoch=10)
    assert [schedule(c) for c in (4, 5, 10)] == [0.1, pytest.approx(0.01), pytest.approx(0.001)]
    assert build_schedule(config, steps_per_epoch=1).step_size == 1  # half an epoch of one step: one step
