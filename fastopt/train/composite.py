"""The composite optimizers (fastopt.specs.COMPOSITE: lbfgs, muon, adafactor, sparse_adam) in the trainer.

The registry classes take `lr` as a float or a schedule and fold clipping into their kernel; the composite
classes take a float lr and do not clip. `CompositeOptimizer` drives one of them (two for Muon) with the
trainer's interface:

    step(grads) / step(closure=...)   before each update: lr_i = base_i * schedule(count) / schedule(0 scale)
                                      (count = updates already applied, as the registry classes count), set in
                                      every param group; the gradients clipped by fastopt.clip_by_global_norm
                                      when clip_grad_norm is set; then the class's own step
    last_lr                           the learning rate of each inner param group at the last step

so every trainer schedule (ReduceLROnPlateau included) works. How each class sees the model (a DenseNetwork:
one flat param buffer, per-layer weight and bias views into it):

- adafactor: every layer's weight (2-D: factored second moment, O(rows + cols) state) and bias (1-D), step(grads).
- muon: Keller Jordan's recipe (and torch.optim.Muon's documentation): Muon for the hidden weight matrices,
  AdamW (fastopt.AdamW, registry defaults but lr) for the rest: the biases and the output layer's weights (a
  classifier head is not a hidden matrix). The input layer's weights go to Muon: the recipe keeps a
  transformer's embedding on AdamW because it is a lookup table, but an MLP's first layer on digit pixels or
  table columns is an ordinary dense matrix (and with one hidden layer, the default MLP, it is the only hidden
  matrix; excluding it would leave the default model with no Muon matrix at all, i.e. plain AdamW).
  `fastopt compare --optimizers adam,adamw,muon` on digits (20 epochs, cosine, lr 1e-2; test accuracy, seeds
  0/1): muon 0.972/0.992, AdamW (what excluding the first layer gives) 0.972/0.989, Adam 0.972/0.989. Time
  (train_seconds, 20 epochs, 800 steps, the shared 2-core VM under load, interleaved runs): muon 1.2-1.6 s
  against AdamW's 0.28-0.33 s (6.3-7.3 s, and 13-34 s at a busier moment, before the small-matrix
  Newton-Schulz iteration ran on one BLAS thread, fastopt.blas, and its roundings on views made once; same
  params bit for bit). What remains is the iteration itself, in emulated bfloat16 on a 128 x 64 matrix: per
  step 15 sgemm of ~17 us (about 0.25 ms: already 2x AdamW's whole training over 800 steps) and 19 roundings
  to bfloat16 of 5 NumPy integer passes each, plus the float32 FMAs of the lerps and the update.
  Muon sees each weight as torch's (out_features, in_features) matrix (a transposed view, no copy), so its
  shape-dependent lr scale (adjust_lr_fn) is torch's. A model without a hidden layer (linear,
  logistic) has no hidden matrix: refused (ValueError), not silently AdamW. The AdamW part's lr is
  `adamw_lr` (the data set's tuned Adam rate, set by recommended_config; AdamW's registry default when
  unset); the schedule scales both parts alike.
- lbfgs: full batch: one step(closure) per epoch, the closure evaluating the loss and gradient over the whole
  training set (the trainer's loop), up to max_iter iterations each; the epoch's training loss is the loss
  at the step's start. line_search_fn defaults to "strong_wolfe" here (torch's default is None): the fixed
  step x += lr * d has no decrease guarantee (on a nonconvex loss the curvature pairs can make d far too
  long, and nothing then checks the step: the loss can rise), while every
  step the line search accepts satisfies the sufficient-decrease (Armijo) and curvature conditions, with
  lr only its first trial. Measured at lr 1 (seeds 0/1, the recommended epochs; test accuracy or r2): the
  fixed step did not diverge on these small sets (digits 0.955/0.975, strong Wolfe 0.950/0.972; wine,
  linear, breast_cancer identical), but raised the training loss in one epoch of the diabetes MLP
  (10-16-1), where the line search's never rose. --opt line_search_fn=none gives torch's fixed step.
  clip_grad_norm is refused: a clipped gradient is not the loss's gradient, which the line search and the
  curvature pairs need.
- sparse_adam: the MLP's gradients are dense. Each step passes the flat gradient as every row present
  (indices = arange(n)): every row present, so lazy and dense updates agree, and the step is Adam's but for
  eps, which torch's SparseAdam adds to sqrt(v) before v's bias correction (Adam's eps / sqrt(1 - beta2^t)
  in Adam's terms); no weight decay.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

import fastopt
from fastopt.schedules import is_schedule
from fastopt.specs import COMPOSITE, REGISTRY
from fastopt.train.arrays import array_module

# the trainer's defaults where they differ from the class's (see the module docstring)
TRAINER_DEFAULTS = {"lbfgs": {"line_search_fn": "strong_wolfe"}}
# trainer options that are not the class's hyperparameters
EXTRA_OPTIONS = {"muon": {"adamw_lr": None}}
MUON_ADAMW_DEFAULT_LR = float(REGISTRY["adamw"].defaults["lr"])


def is_composite(name) -> bool:
    return name in COMPOSITE


def defaults(name) -> dict:
    """The options the trainer takes for composite `name` and their defaults (the spec's, the trainer's
    overrides, the extra options)."""
    return {**COMPOSITE[name].defaults, **TRAINER_DEFAULTS.get(name, {}), **EXTRA_OPTIONS.get(name, {})}


def class_kwargs(name, options: dict) -> dict:
    """The class's keyword arguments (lr excluded) from the trainer's options under the spec's names:
    sparse_adam's beta1/beta2 become betas=(beta1, beta2); extra options are left out."""
    values = {k: v for k, v in {**defaults(name), **options}.items()
              if k != "lr" and k not in EXTRA_OPTIONS.get(name, {})}
    if name == "sparse_adam":
        values["betas"] = (values.pop("beta1"), values.pop("beta2"))
    return values


def _adamw_lr(options) -> float:
    value = options.get("adamw_lr")
    if value is None:
        return MUON_ADAMW_DEFAULT_LR
    if (not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)) or not math.isfinite(value)
            or value < 0):
        raise ValueError(f"Invalid adamw_lr: {value!r} (must be a finite number >= 0)")
    return float(value)


def check(name, options: dict, lr: float, clip_grad_norm) -> None:
    """Raise what building the optimizer would raise, without a model: the class is constructed on small
    stand-in arrays, so its own checks (which name the option) run before any data is loaded."""
    if name == "lbfgs" and clip_grad_norm is not None:
        raise ValueError(f"lbfgs does not take clip_grad_norm (got {clip_grad_norm}): its line search and "
                         "curvature pairs need the loss's true gradient; leave it unset")
    kwargs = class_kwargs(name, options)
    cls = getattr(fastopt, COMPOSITE[name].class_name)
    stand_in = np.zeros((2, 2), np.float32) if name in ("muon", "adafactor") else np.zeros(2, np.float32)
    cls([stand_in], lr=lr, **kwargs)
    if name == "muon":
        _adamw_lr(options)


class CompositeOptimizer:
    """One composite optimizer (see the module docstring) over a DenseNetwork's flat param buffer.

    CompositeOptimizer(name, model, lr, options, clip_grad_norm=None, *, base_lr=None)
        lr: a float or a fastopt schedule (count -> lr); base_lr: the rate a schedule scales (needed with a
        schedule): Muon's AdamW part gets adamw_lr * schedule(count) / base_lr (1 when base_lr is 0);
        options: the spec's hyperparameters (lr excluded) and, for muon, adamw_lr.
    step(grads): grads = [the model's flat gradient buffer] (adafactor, muon, sparse_adam).
    step(closure=closure) (lbfgs): closure() -> (loss, [flat gradient]); returns the first loss.
    last_lr: the learning rate of each inner param group at the last step (muon: [Muon's, AdamW's]).
    """

    def __init__(self, name, model, lr, options=None, clip_grad_norm=None, *, base_lr=None):
        if not is_composite(name):
            raise ValueError(f"{name!r} is not a composite optimizer; those are {', '.join(COMPOSITE)}")
        options = dict(options or {})
        self.name, self.lr, self.clip_grad_norm = name, lr, clip_grad_norm
        self.count = 0  # updates applied: what a schedule is called with
        if base_lr is None:
            if is_schedule(lr):  # schedule(0) is no base: a warm-up starts near 0
                raise ValueError("base_lr is needed with a schedule: the learning rate the schedule scales "
                                 "(the trainer's lr); Muon's AdamW part follows the schedule relative to it")
            base_lr = lr
        base = float(base_lr)
        self._base = base
        check(name, options, base, clip_grad_norm)
        self._sizes = [int(s) for s in model.sizes]
        self._layout = _layout(self._sizes)
        self._flat = model.params
        kwargs = class_kwargs(name, options)
        params = [self._flat]
        self._adamw = None
        if name == "muon":
            if len(self._sizes) < 3:
                raise ValueError("muon needs a model with a hidden layer (Muon updates the hidden weight "
                                 "matrices; the output layer's weights go to AdamW): use --model mlp")
            hidden, rest = self._muon_split(params)
            self._main = fastopt.Muon(hidden, lr=base, **kwargs)
            self._adamw_base = _adamw_lr(options)
            self._adamw = fastopt.AdamW(rest, lr=self._adamw_base)
        elif name == "adafactor":
            self._main = fastopt.Adafactor(self._views(params[0]), lr=base, **kwargs)
        elif name == "sparse_adam":
            self._main = fastopt.SparseAdam(params, lr=base, **kwargs)
            xp = array_module(self._flat)
            self._rows = xp.arange(self._flat.shape[0])  # every row present: dense Adam, lazy semantics
        else:
            self._main = fastopt.LBFGS(params, lr=base, **kwargs)
        self._last_lr = [base] + ([self._adamw_base] if self._adamw is not None else [])

    # ---- the model's layout -------------------------------------------------------------------------
    def _views(self, flat):
        """Per layer: the weight (fan_in, fan_out) and the bias, views into the flat buffer (the
        DenseNetwork layout: each layer's weight, row-major, then its bias)."""
        out = []
        for offset, (a, b) in self._layout:
            out.append(flat[offset:offset + a * b].reshape(a, b))
            out.append(flat[offset + a * b:offset + a * b + b])
        return out

    def _muon_split(self, flats):
        """(hidden weights as (out, in) views, [biases and the output layer's weight])."""
        views = self._views(flats[0])
        weights, biases = views[0::2], views[1::2]
        return [w.T for w in weights[:-1]], [*biases, weights[-1]]

    # ---- the step -----------------------------------------------------------------------------------
    @property
    def optimizers(self) -> list:
        """The fastopt optimizers this one drives: [Muon, AdamW] for muon, else [the class]."""
        return [self._main] + ([self._adamw] if self._adamw is not None else [])

    @property
    def last_lr(self) -> list:
        return list(self._last_lr)

    def _set_lr(self) -> None:
        value = float(self.lr(self.count) if is_schedule(self.lr) else self.lr)
        if not (math.isfinite(value) and value >= 0):  # checked before any group is changed
            raise ValueError(f"Invalid learning rate: {value} (the schedule's value after {self.count} updates; "
                             "must be a finite number >= 0)")
        lrs = [value]
        for group in self._main.param_groups:
            group["lr"] = value
        if self._adamw is not None:
            scale = value / self._base if self._base > 0 else 1.0
            lrs.append(self._adamw_base * scale)
            for group in self._adamw.param_groups:
                group["lr"] = lrs[-1]
        self._last_lr = lrs

    def step(self, grads=None, closure=None):
        if self.name == "lbfgs":
            if closure is None or grads is not None:
                raise TypeError("lbfgs is closure-driven: call step(closure=closure)")
            self._set_lr()
            loss = self._main.step(closure)
            self.count += 1
            return loss
        if closure is not None:
            raise TypeError(f"{self.name} takes step(grads), not a closure")
        if not isinstance(grads, (list, tuple)) or len(grads) != 1:
            raise TypeError(f"grads must be [the model's flat gradient buffer], got {type(grads).__name__}")
        flat = grads[0]
        if tuple(flat.shape) != tuple(self._flat.shape) or flat.dtype != self._flat.dtype:
            raise ValueError(f"grads[0] has shape {tuple(flat.shape)} and dtype {flat.dtype}; the params "
                             f"{tuple(self._flat.shape)} and {self._flat.dtype}")
        self._set_lr()
        if self.clip_grad_norm is not None:
            fastopt.clip_by_global_norm([flat], self.clip_grad_norm)
        if self.name == "muon":
            hidden, rest = self._muon_split([flat])
            self._main.step(hidden)
            self._adamw.step(rest)
        elif self.name == "adafactor":
            self._main.step(self._views(flat))
        else:
            self._main.step([(self._rows, flat)])
        self.count += 1
        return None


def _layout(sizes):
    layout, offset = [], 0
    for a, b in zip(sizes[:-1], sizes[1:]):
        layout.append((offset, (a, b)))
        offset += a * b + b
    return layout
