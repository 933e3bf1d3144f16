"""Learning-rate schedules: callables `count -> lr`.

`count` is the number of updates already applied (0 for the first step), as in optax; an optimizer
calls a group's schedule with that group's count. Every schedule is a small object (picklable, with a
readable repr) and returns a Python float.

    constant(lr)
    exponential_decay(init_value, decay_rate, transition_steps=1, staircase=False)
        init_value * decay_rate ** (count / transition_steps)   (floor of the exponent if staircase)
    step_decay(init_value, step_size, gamma=0.1)           init_value * gamma ** (count // step_size)
    multi_step(init_value, milestones, gamma=0.1)          init_value * gamma ** (#milestones <= count)
    linear(init_value, end_value, transition_steps)        straight line, then end_value
    polynomial(init_value, end_value, transition_steps, power=1.0)
        end + (init - end) * (1 - count / transition_steps) ** power, then end_value
    cosine(init_value, decay_steps, end_value=0.0)
        end + (init - end) * (1 + cos(pi * count / decay_steps)) / 2, then end_value
    warmup(schedule, warmup_steps, init_value=0.0)
        linear from init_value (count 0) to schedule(0) (count warmup_steps), then
        schedule(count - warmup_steps); `schedule` may be any schedule or a number
    ReduceLROnPlateau(init_value, mode="min", factor=0.1, patience=10, ...)
        torch.optim.lr_scheduler.ReduceLROnPlateau's rule, driven by `update(metric)`; has
        state_dict() / load_state_dict(), which optimizer checkpoints include

Boundaries follow torch.optim.lr_scheduler: step_decay changes at count = step_size, multi_step at each
milestone, and decays reach their end value exactly at transition_steps / decay_steps.
"""
from __future__ import annotations

import bisect
import math
import numbers

import numpy as np

from fastopt.specs import as_bool, shown

__all__ = ["Schedule", "constant", "exponential_decay", "step_decay", "multi_step", "linear", "polynomial",
           "cosine", "warmup", "ReduceLROnPlateau"]


def is_schedule(value) -> bool:
    """Whether an lr value is a schedule (a callable count -> lr) rather than a number."""
    return callable(value) and not isinstance(value, numbers.Real)


def _real(name, value, *, positive=False, nonneg=False):
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int past float's range
        raise ValueError(f"Invalid {name}: {shown(value)} (too large for a float)") from None
    if not math.isfinite(value) or (positive and value <= 0) or (nonneg and value < 0):
        raise ValueError(f"Invalid {name}: {value}")
    return value


def _count(name, value, *, positive=False):
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < (1 if positive else 0):
        raise ValueError(f"Invalid {name}: {value}")
    return value


class Schedule:
    """Base of the schedules: `schedule(count)` checks count and calls `value(count)`."""

    _fields: tuple = ()

    def __call__(self, count) -> float:
        count = _count("count", count)
        try:
            value = self.value(count)
        except OverflowError:  # a growing schedule (decay_rate > 1) past float range: the usual bad-lr error
            value = math.inf
        if value == math.inf:  # (an overflow in a product, init_value * decay_rate ** n, raises nothing)
            raise ValueError(f"Invalid learning rate: {self!r} at count {count} is too large for a float")
        return value

    def value(self, count: int) -> float:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}({args})"


class constant(Schedule):
    _fields = ("value_",)

    def __init__(self, value):
        self.value_ = _real("value", value, nonneg=True)

    def value(self, count):
        return self.value_

    def __repr__(self):  # the constructor's name for it (the attribute is value_: value is the method)
        return f"constant(value={self.value_!r})"


class exponential_decay(Schedule):
    _fields = ("init_value", "decay_rate", "transition_steps", "staircase")

    def __init__(self, init_value, decay_rate, transition_steps=1, staircase=False):
        self.init_value = _real("init_value", init_value, nonneg=True)
        self.decay_rate = _real("decay_rate", decay_rate, positive=True)
        self.transition_steps = _count("transition_steps", transition_steps, positive=True)
        self.staircase = as_bool("staircase", staircase)

    def value(self, count):
        exponent = count / self.transition_steps
        if self.staircase:
            exponent = count // self.transition_steps
        return self.init_value * self.decay_rate ** exponent


class step_decay(Schedule):
    _fields = ("init_value", "step_size", "gamma")

    def __init__(self, init_value, step_size, gamma=0.1):
        self.init_value = _real("init_value", init_value, nonneg=True)
        self.step_size = _count("step_size", step_size, positive=True)
        self.gamma = _real("gamma", gamma, nonneg=True)

    def value(self, count):
        return self.init_value * self.gamma ** (count // self.step_size)


class multi_step(Schedule):
    _fields = ("init_value", "milestones", "gamma")

    def __init__(self, init_value, milestones, gamma=0.1):
        self.init_value = _real("init_value", init_value, nonneg=True)
        if not isinstance(milestones, (list, tuple, range)):
            raise TypeError(f"milestones must be a list of step counts, got {milestones!r}")
        milestones = [_count("milestones", m) for m in milestones]
        if milestones != sorted(milestones):
            raise ValueError(f"Invalid milestones: {milestones} (must be increasing)")
        self.milestones = tuple(milestones)
        self.gamma = _real("gamma", gamma, nonneg=True)

    def value(self, count):
        return self.init_value * self.gamma ** bisect.bisect_right(self.milestones, count)


class polynomial(Schedule):
    _fields = ("init_value", "end_value", "transition_steps", "power")

    def __init__(self, init_value, end_value, transition_steps, power=1.0):
        self.init_value = _real("init_value", init_value, nonneg=True)
        self.end_value = _real("end_value", end_value, nonneg=True)
        self.transition_steps = _count("transition_steps", transition_steps, positive=True)
        self.power = _real("power", power, positive=True)

    def value(self, count):
        if count >= self.transition_steps:
            return self.end_value
        return _between(self.init_value, self.end_value, (1.0 - count / self.transition_steps) ** self.power)


class linear(polynomial):
    _fields = ("init_value", "end_value", "transition_steps")

    def __init__(self, init_value, end_value, transition_steps):
        super().__init__(init_value, end_value, transition_steps, 1.0)


class cosine(Schedule):
    _fields = ("init_value", "decay_steps", "end_value")

    def __init__(self, init_value, decay_steps, end_value=0.0):
        self.init_value = _real("init_value", init_value, nonneg=True)
        self.decay_steps = _count("decay_steps", decay_steps, positive=True)
        self.end_value = _real("end_value", end_value, nonneg=True)

    def value(self, count):
        if count >= self.decay_steps:
            return self.end_value
        return _between(self.init_value, self.end_value, 0.5 * (1.0 + math.cos(math.pi * count / self.decay_steps)))


def _between(init_value: float, end_value: float, weight: float) -> float:
    """init_value at weight 1, end_value at weight 0 (both exactly, as torch's schedulers start at the base lr),
    the weighted mean between."""
    if init_value == end_value:  # (the weighted sum of two equal values can round off them)
        return init_value
    return init_value * weight + end_value * (1.0 - weight)


def _as_schedule(schedule):
    if isinstance(schedule, numbers.Real) and not isinstance(schedule, (bool, np.bool_)):
        return constant(schedule)
    if not callable(schedule):
        raise TypeError(f"schedule must be a schedule (callable count -> lr) or a number, got {schedule!r}")
    return schedule


class warmup(Schedule):
    _fields = ("schedule", "warmup_steps", "init_value")

    def __init__(self, schedule, warmup_steps, init_value=0.0):
        self.schedule = _as_schedule(schedule)
        self.warmup_steps = _count("warmup_steps", warmup_steps)
        self.init_value = _real("init_value", init_value, nonneg=True)

    def value(self, count):
        if count < self.warmup_steps:
            target = float(self.schedule(0))
            return self.init_value + (target - self.init_value) * count / self.warmup_steps
        return float(self.schedule(count - self.warmup_steps))

    # a wrapped stateful schedule (ReduceLROnPlateau) keeps its state through checkpoints
    def state_dict(self):
        inner = getattr(self.schedule, "state_dict", None)
        return {"schedule": inner()} if inner is not None else {}

    def load_state_dict(self, state):
        """The wrapped schedule's state (state["schedule"]; {} when it keeps none), checked by it."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict (from state_dict()), got {type(state).__name__}")
        saves = getattr(self.schedule, "state_dict", None) is not None  # what state_dict() above writes
        loads = getattr(self.schedule, "load_state_dict", None) is not None
        unknown = sorted(map(repr, set(state) - ({"schedule"} if saves else set())))
        if unknown:
            raise ValueError(f"state has the key(s) {', '.join(unknown)}, expected "
                             f"{'only schedule' if saves else 'none'} (the state of {self.schedule!r})")
        if saves and loads:
            if "schedule" not in state:
                raise KeyError(f"state has no 'schedule' (the state of {self.schedule!r})")
            self.schedule.load_state_dict(state["schedule"])


def _fits_float(x) -> bool:
    try:
        float(x)
    except OverflowError:  # an int past float's range
        return False
    return True


class ReduceLROnPlateau(Schedule):
    """lr = init_value until `update(metric)` has seen `patience` + 1 updates without improvement, then
    lr *= factor (not below min_lr), then `cooldown` updates of rest: torch's ReduceLROnPlateau rule.
    Use as an optimizer's lr and call `update(validation_loss)` once per epoch; `schedule(count)`
    returns the current value whatever count is."""

    _fields = ("init_value", "mode", "factor", "patience", "threshold", "threshold_mode", "cooldown", "min_lr")

    def __init__(self, init_value, mode="min", factor=0.1, patience=10, threshold=1e-4, threshold_mode="rel",
                 cooldown=0, min_lr=0.0, eps=1e-8):
        self.init_value = _real("init_value", init_value, nonneg=True)
        if not isinstance(mode, str) or mode not in ("min", "max"):  # (an array's `in` asks its truth value)
            raise ValueError(f"Invalid mode: {mode!r} (choose 'min' or 'max')")
        if not isinstance(threshold_mode, str) or threshold_mode not in ("rel", "abs"):
            raise ValueError(f"Invalid threshold_mode: {threshold_mode!r} (choose 'rel' or 'abs')")
        self.mode, self.threshold_mode = mode, threshold_mode
        self.factor = _real("factor", factor, nonneg=True)
        if self.factor >= 1.0:
            raise ValueError(f"Invalid factor: {self.factor} (must be < 1)")
        self.patience = _count("patience", patience)
        self.threshold = _real("threshold", threshold, nonneg=True)
        self.cooldown = _count("cooldown", cooldown)
        self.min_lr = _real("min_lr", min_lr, nonneg=True)
        self.eps = _real("eps", eps, nonneg=True)
        self.lr = self.init_value
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad = 0
        self.cooldown_counter = 0

    def value(self, count):
        return self.lr

    def _better(self, metric):
        if self.mode == "min":
            limit = self.best * (1.0 - self.threshold) if self.threshold_mode == "rel" else self.best - self.threshold
            return metric < limit
        limit = self.best * (1.0 + self.threshold) if self.threshold_mode == "rel" else self.best + self.threshold
        return metric > limit

    def update(self, metric) -> float:
        """Record a metric (e.g. the validation loss); returns the learning rate from now on."""
        try:
            metric = float(metric)  # a number, a NumPy scalar, a one-element array or tensor, as torch takes
        except (TypeError, ValueError) as e:
            raise TypeError(f"metric must be a real number, got {shown(metric)} ({e})") from None
        except OverflowError:  # an int past float's range
            raise ValueError(f"Invalid metric: {shown(metric)} (beyond the range of a float)") from None
        if self._better(metric):
            self.best = metric
            self.num_bad = 0
        else:
            self.num_bad += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad = 0
        if self.num_bad > self.patience:
            new_lr = max(self.lr * self.factor, self.min_lr)
            if self.lr - new_lr > self.eps:
                self.lr = new_lr
            self.cooldown_counter = self.cooldown
            self.num_bad = 0
        return self.lr

    def state_dict(self) -> dict:
        return {"lr": self.lr, "best": self.best, "num_bad": self.num_bad, "cooldown_counter": self.cooldown_counter}

    def load_state_dict(self, state: dict) -> None:
        """Every field checked (named in the message) before the first is set: a bad state changes nothing."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict (from state_dict()), got {type(state).__name__}")
        missing = [key for key in ("lr", "best", "num_bad", "cooldown_counter") if key not in state]
        if missing:
            raise KeyError(f"state has no {missing[0]!r} (keys: lr, best, num_bad, cooldown_counter)")
        lr = _real("state['lr']", state["lr"], nonneg=True)
        best = state["best"]
        if not isinstance(best, numbers.Real) or isinstance(best, (bool, np.bool_)) or not _fits_float(best) \
                or math.isnan(best):
            raise ValueError(f"Invalid state['best']: {shown(best)} (a real number or +-inf)")
        num_bad = _count("state['num_bad']", state["num_bad"])
        cooldown_counter = _count("state['cooldown_counter']", state["cooldown_counter"])
        self.lr, self.best, self.num_bad, self.cooldown_counter = lr, float(best), num_bad, cooldown_counter
