"""The training loop: shuffled minibatches, any fastopt optimizer by name, a learning-rate schedule,
fused gradient clipping, early stopping that restores the best weights, a per-epoch history.

    result = fit(model, data, TrainConfig(optimizer="adam", lr=1e-3, epochs=20, batch_size=32))
    result.history["val_loss"], result.metrics["test"]["accuracy"]

The model keeps parameters and gradients in one flat buffer each, so every optimizer step is one
fused kernel call (with clipping folded into it as a gradient scale). The composite optimizers (lbfgs,
muon, adafactor, sparse_adam) run through fastopt/train/composite.py, which sees the model's layers; lbfgs
trains full batch, one closure-driven step per epoch (batch_size is not used). Everything random (shuffling
here, initial weights and dropout in the model) derives from `seed`: the same seed gives the same
history, bit for bit, on the same machine.
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import asdict, dataclass, field

import numpy as np

import fastopt
from fastopt import schedules
from fastopt.specs import COMPOSITE, REQUIRED, get_spec
import fastopt.train.composite as composite  # the module, not the package (its __init__ imports this one)
from fastopt.train.arrays import array_module, to_numpy
from fastopt.train.metrics import evaluate, headline_metric

SCHEDULES = ("constant", "cosine", "warmup_cosine", "exponential", "step", "plateau")
# the TrainConfig.schedule_options each schedule reads (others are refused, not ignored)
SCHEDULE_OPTIONS = {"constant": (), "cosine": ("end_value",), "warmup_cosine": ("warmup_epochs", "end_value"),
                    "exponential": ("gamma",), "step": ("step_epochs", "gamma"), "plateau": ("gamma", "patience")}
SGD_DEFAULT_LR = 0.01  # torch's SGD has no default learning rate; the trainer needs one


@dataclass
class TrainConfig:
    optimizer: str = "adam"  # any name in fastopt.specs.all_optimizer_names() (composites: fastopt/train/composite.py)
    lr: float | None = None  # None: the optimizer's default (SGD: SGD_DEFAULT_LR)
    # other hyperparameters under the registry's names (momentum, beta1, beta2, weight_decay, eps, ...);
    # composites: their spec's names (max_iter, ns_steps, line_search_fn, ...) and muon's adamw_lr
    optimizer_options: dict = field(default_factory=dict)
    epochs: int = 20
    batch_size: int = 32
    schedule: str = "constant"
    schedule_options: dict = field(default_factory=dict)
    clip_grad_norm: float | None = None
    patience: int | None = None  # early stopping on the validation loss; None: off
    min_delta: float = 0.0  # an improvement must lower the validation loss by more than this
    # with early stopping (patience set): end on the weights of the best validation epoch. Without it the
    # last weights are kept: a convex model should end at its optimum, not at a noisy validation minimum.
    restore_best: bool = True
    seed: int = 0
    progress: bool = True

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        default = option_defaults(self.optimizer)["lr"]
        return SGD_DEFAULT_LR if default is REQUIRED else float(default)

    def check(self) -> None:
        """Raise ValueError / TypeError naming the field and its value for anything fit() would reject,
        without touching data: the optimizer and its hyperparameters, the schedule, the counts."""
        known = option_defaults(self.optimizer)  # ValueError for an unknown name
        for name, low in (("epochs", 1), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"{name} must be an integer, got {value!r}")
            if value < low:
                raise ValueError(f"Invalid {name}: {value} (must be >= {low})")
        if self.patience is not None:
            if not _is_int(self.patience):
                raise TypeError(f"patience must be an integer, got {self.patience!r}")
            if self.patience < 0:
                raise ValueError(f"Invalid patience: {self.patience} (must be >= 0)")
        if self.clip_grad_norm is not None and not (_is_finite(self.clip_grad_norm) and self.clip_grad_norm > 0):
            raise ValueError(f"Invalid clip_grad_norm: {self.clip_grad_norm} (must be a finite number > 0)")
        if not (_is_finite(self.min_delta) and self.min_delta >= 0):
            raise ValueError(f"Invalid min_delta: {self.min_delta} (must be a finite number >= 0)")
        if self.lr is not None and not (_is_finite(self.lr) and self.lr >= 0):
            raise ValueError(f"Invalid learning rate: {self.lr} (must be a finite number >= 0)")
        _check_known(self.optimizer, self.optimizer_options, known)
        if composite.is_composite(self.optimizer):  # the class's own checks, on stand-in arrays
            composite.check(self.optimizer, self.optimizer_options, self.resolved_lr(), self.clip_grad_norm)
        else:
            spec = get_spec(self.optimizer)
            spec.validate({**spec.defaults, **self.optimizer_options, "lr": self.resolved_lr()}, 1)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        build_schedule(self, steps_per_epoch=1)  # the schedule's own checks (its options)


def option_defaults(optimizer) -> dict:
    """The hyperparameters the trainer takes for `optimizer` (a registry or composite name) and their
    defaults; ValueError naming every known optimizer for an unknown name."""
    if isinstance(optimizer, str) and optimizer in COMPOSITE:
        return composite.defaults(optimizer)
    try:
        return get_spec(optimizer).defaults
    except ValueError:
        from fastopt.specs import all_optimizer_names
        raise ValueError(f"Unknown optimizer {optimizer!r}; known: {', '.join(all_optimizer_names())}") from None


def _check_known(optimizer, options, known) -> None:
    unknown = set(options) - set(known)
    if unknown:
        raise ValueError(f"{optimizer} has no hyperparameter(s) {', '.join(sorted(unknown))}; "
                         f"it takes {', '.join(h for h in known if h != 'lr')}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


@dataclass
class TrainResult:
    history: dict  # per epoch: epoch, train_loss, val_loss, val_<metric>, lr, seconds
    metrics: dict | None  # "train", "val", "test" -> metrics of the final (restored) model; None if diverged
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    diverged: bool
    train_seconds: float  # the epochs themselves, without data loading or final evaluation
    config: dict
    # where training diverged (see fit), else None; metrics is None then
    divergence: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def build_optimizer(params, config: TrainConfig, steps_per_epoch: int, model=None):
    """(optimizer, lr): fastopt.<Class>(params, lr=<schedule or float>, ...) from the registry name in config;
    a composite name gives a composite.CompositeOptimizer over `model` (its layers: see that module)."""
    options = dict(config.optimizer_options)
    _check_known(config.optimizer, options, option_defaults(config.optimizer))
    if composite.is_composite(config.optimizer):
        if model is None:
            raise ValueError(f"{config.optimizer} is a composite optimizer: build_optimizer needs the model")
        lr = build_schedule(config, steps_per_epoch)
        return composite.CompositeOptimizer(config.optimizer, model, lr, options, config.clip_grad_norm,
                                            base_lr=config.resolved_lr()), lr
    spec = get_spec(config.optimizer)
    if "beta1" in options or "beta2" in options:  # the classes take torch's betas=(beta1, beta2)
        options = spec.class_keywords({"beta1": spec.defaults["beta1"], "beta2": spec.defaults["beta2"], **options})
    lr = build_schedule(config, steps_per_epoch)
    cls = getattr(fastopt, spec.class_name)
    return cls(params, lr=lr, clip_grad_norm=config.clip_grad_norm, **options), lr


def build_schedule(config: TrainConfig, steps_per_epoch: int):
    """The learning rate as a float or a fastopt.schedules object counting optimizer steps.
    Epoch-based options (step_epochs, warmup_epochs) are converted to steps here."""
    lr = config.resolved_lr()
    name, opts = config.schedule, dict(config.schedule_options)
    _check_schedule_options(name, opts)
    total = config.epochs * steps_per_epoch
    if name == "constant":
        return lr
    if name == "cosine":
        return schedules.cosine(lr, total, end_value=opts.get("end_value", 0.0))
    if name == "warmup_cosine":
        warmup_epochs = opts.get("warmup_epochs", 1)
        if warmup_epochs > config.epochs:
            raise ValueError(f"Invalid warmup_epochs: {warmup_epochs} (more than epochs={config.epochs}: the "
                             "run would end before the peak lr)")
        warm = int(round(warmup_epochs * steps_per_epoch))
        decay = schedules.cosine(lr, max(1, total - warm), end_value=opts.get("end_value", 0.0))
        return schedules.warmup(decay, warm) if warm else decay  # warmup_epochs=0: the first step at lr
    if name == "exponential":  # gamma per epoch
        return schedules.exponential_decay(lr, opts.get("gamma", 0.9), transition_steps=steps_per_epoch)
    if name == "step":
        step_epochs = opts.get("step_epochs", max(1, config.epochs // 3))
        # a fraction of an epoch is a whole number of steps, at least one
        return schedules.step_decay(lr, max(1, int(round(step_epochs * steps_per_epoch))), gamma=opts.get("gamma", 0.1))
    if name == "plateau":  # driven by the validation loss, once per epoch
        return schedules.ReduceLROnPlateau(lr, factor=opts.get("gamma", 0.5), patience=int(opts.get("patience", 2)))
    raise ValueError(f"Unknown schedule {name!r}; use one of {', '.join(SCHEDULES)}")


def _check_schedule_options(name, opts) -> None:
    """ValueError / TypeError naming a schedule option the schedule does not read, or an epoch count or
    patience out of range (the schedule classes check gamma and end_value themselves)."""
    if name not in SCHEDULE_OPTIONS:
        raise ValueError(f"Unknown schedule {name!r}; use one of {', '.join(SCHEDULES)}")
    unknown = sorted(set(opts) - set(SCHEDULE_OPTIONS[name]), key=str)
    if unknown:
        takes = ", ".join(SCHEDULE_OPTIONS[name]) or "none"
        raise ValueError(f"schedule_options: unknown option(s) {', '.join(map(repr, unknown))} for the {name!r} "
                         f"schedule (it takes: {takes})")
    for key, positive in (("warmup_epochs", False), ("step_epochs", True)):
        if key in opts:
            value = opts[key]
            if not _is_finite(value):
                raise TypeError(f"{key} must be a finite number of epochs, got {value!r}")
            if value < 0 or (positive and value == 0):
                raise ValueError(f"Invalid {key}: {value} (must be {'>' if positive else '>='} 0)")
    if "patience" in opts:
        if not _is_int(opts["patience"]):
            raise TypeError(f"patience must be an integer, got {opts['patience']!r}")
        if opts["patience"] < 0:
            raise ValueError(f"Invalid patience: {opts['patience']} (must be >= 0)")


def _progress_bar(config, description):
    if not config.progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is a convenience: train without it
        return None
    return tqdm(total=config.epochs, desc=description, unit="epoch", leave=False)


def _nonfinite_word(value) -> str:
    return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"


def fit(model, data, config: TrainConfig, description: str = "train") -> TrainResult:
    """Train `model` on `data` (arrays already in the model's dtype and on its device).

    Divergence: training stops at the first non-finite training loss (NaN or Inf) or, at the end of an
    epoch, a non-finite validation loss. The result then has diverged=True, `divergence` says where
    ({"epoch", "step" (1-based within the epoch), "global_step", "loss", "value"}), the history holds
    the epochs completed before it, and `metrics` is None: the weights are no longer meaningful.
    NumPy's floating-point warnings (overflow, invalid) are silenced during training and evaluation:
    the loss is checked explicitly instead of flooding the terminal. On the CPU the loss is checked
    after every step; on the GPU once per epoch (a per-step check would synchronise every step), and
    the first non-finite step of that epoch is then reported."""
    config.check()
    xp = array_module(model.params)
    X, y = data.X_train, data.y_train
    n = X.shape[0]
    full_batch = config.optimizer == "lbfgs"  # one closure-driven step per epoch over the whole training set
    batch_size = n if full_batch else min(config.batch_size, n)
    steps_per_epoch = math.ceil(n / batch_size)
    optimizer, lr = build_optimizer([model.params], config, steps_per_epoch, model=model)
    grads = [model.grads]
    shuffle_rng = np.random.default_rng(np.random.SeedSequence([config.seed, 3]))
    metric_name, _ = headline_metric(data.task)
    on_host = xp is np

    history = {"epoch": [], "train_loss": [], "val_loss": [], f"val_{metric_name}": [], "lr": [], "seconds": []}
    best_loss, best_epoch, best_params, bad_epochs = math.inf, 0, None, 0
    stopped_early = False
    divergence = None
    epochs_run = 0
    bar = _progress_bar(config, description)
    train_seconds = 0.0
    # optimizers with train()/eval() (spec.train_eval: schedule-free) train at y and are evaluated at x
    switch = getattr(getattr(optimizer, "spec", None), "train_eval", None) is not None
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for epoch in range(1, config.epochs + 1):
                epochs_run = epoch
                if switch:
                    optimizer.train()
                start = time.perf_counter()
                # one gather per epoch; the minibatches are then contiguous slices (views, no copies)
                order = shuffle_rng.permutation(n)
                if not on_host:
                    order = xp.asarray(order)
                Xs, ys = X[order], y[order]
                total = 0.0
                step_losses = []
                for step, lo in enumerate(range(0, n, batch_size), start=1):
                    xb, yb = Xs[lo:lo + batch_size], ys[lo:lo + batch_size]
                    if full_batch:
                        def closure(xb=xb, yb=yb):
                            return model.loss_and_grad(xb, yb), grads
                        # the loss at the step's start point, as a minibatch epoch records each batch's
                        loss = optimizer.step(closure=closure)
                    else:
                        loss = model.loss_and_grad(xb, yb)
                    if on_host:
                        value = float(loss)
                        if not math.isfinite(value):
                            divergence = _divergence(epoch, step, steps_per_epoch, "training", value)
                            break
                        total += value * xb.shape[0]
                    else:
                        step_losses.append(loss)
                        total = total + loss * xb.shape[0]
                    if not full_batch:
                        optimizer.step(grads)
                if divergence is None and not on_host and step_losses:
                    finite = to_numpy(xp.isfinite(xp.stack(step_losses)))  # one synchronisation per epoch
                    if not finite.all():
                        first = int(np.argmin(finite))  # the first False
                        divergence = _divergence(epoch, first + 1, steps_per_epoch, "training",
                                                 float(step_losses[first]))
                if divergence is not None:
                    train_seconds += time.perf_counter() - start
                    break
                train_loss = float(total) / n
                if switch:  # schedule-free: evaluate (and keep the best of) the averaged point x
                    optimizer.eval()
                val = evaluate(model, data, data.X_val, data.y_val)
                if not math.isfinite(val["loss"]):
                    divergence = _divergence(epoch, None, steps_per_epoch, "validation", val["loss"])
                    train_seconds += time.perf_counter() - start
                    break
                seconds = time.perf_counter() - start
                train_seconds += seconds
                history["epoch"].append(epoch)
                history["train_loss"].append(train_loss)
                history["val_loss"].append(val["loss"])
                history[f"val_{metric_name}"].append(val[metric_name])
                history["lr"].append(float(optimizer.last_lr[0]))
                history["seconds"].append(seconds)
                if isinstance(lr, schedules.ReduceLROnPlateau):
                    lr.update(val["loss"])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{train_loss:.4g}", val_loss=f"{val['loss']:.4g}",
                                    **{f"val_{metric_name}": f"{val[metric_name]:.4f}"})
                if val["loss"] < best_loss - config.min_delta:
                    best_loss, best_epoch, bad_epochs = val["loss"], epoch, 0
                    if config.restore_best and config.patience is not None:
                        best_params = model.snapshot()
                else:
                    bad_epochs += 1
                    if config.patience is not None and bad_epochs > config.patience:
                        stopped_early = True
                        break
            metrics = None
            if divergence is None:
                if switch:
                    optimizer.eval()
                if config.restore_best and best_params is not None:
                    model.restore(best_params)
                metrics = {split: evaluate(model, data, getattr(data, f"X_{split}"), getattr(data, f"y_{split}"))
                           for split in ("train", "val", "test")}
    finally:
        if bar is not None:
            bar.close()
    return TrainResult(history=history, metrics=metrics, best_epoch=best_epoch, epochs_run=epochs_run,
                       stopped_early=stopped_early, diverged=divergence is not None, train_seconds=train_seconds,
                       config=asdict(config), divergence=divergence)


def _divergence(epoch, step, steps_per_epoch, which, value) -> dict:
    return {"epoch": epoch, "step": step, "steps_per_epoch": steps_per_epoch,
            "global_step": None if step is None else (epoch - 1) * steps_per_epoch + step,
            "loss": which, "value": _nonfinite_word(value)}


def describe_divergence(divergence: dict) -> str:
    """'the training loss became inf at epoch 1, step 4 of 9' (for messages)."""
    if divergence["step"] is None:
        return f"the {divergence['loss']} loss became {divergence['value']} after epoch {divergence['epoch']}"
    return (f"the {divergence['loss']} loss became {divergence['value']} at epoch {divergence['epoch']}, "
            f"step {divergence['step']} of {divergence['steps_per_epoch']}")
