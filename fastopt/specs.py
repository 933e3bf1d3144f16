"""The optimizer registry: one OptimizerSpec per optimizer, and everything else is generated from it.

A spec says which hyperparameters an optimizer takes (defaults, validation), which state arrays it
keeps (named like torch.optim's state), which of them a given configuration uses, and how the
hyperparameters and the step number fold into the few float64 scalars its kernel reads (bias
corrections, the NAdam momentum product, the RAdam rectifier: computed once per call, on the host).
The functional API (functional.py), the classes, the reference dispatch, the tests and the benchmarks
all loop over REGISTRY.
"""
from __future__ import annotations

import math
import numbers
import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Mapping

import numpy as np

REQUIRED = object()  # default of a hyperparameter that must be given (no registry optimizer has one today)
# a state_fill value: the new state array starts as a copy of its param (schedule-free's z), not a constant
PARAM = "param"


# ---------------------------------------------------------------------------------------------------
# Hyperparameters
# ---------------------------------------------------------------------------------------------------

MAX_STEP = 2 ** 53  # steps are counted exactly in float64 arithmetic up to here


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


class naming_group:
    """``with naming_group(gi, groups):`` a ValueError / TypeError of one param group's values raised inside
    names the group when there are several ("param group 1: Invalid learning rate: nan"); with one group
    torch's message goes out as it is. Other exceptions pass untouched."""

    def __init__(self, gi: int, groups: int):
        self.gi, self.groups = gi, groups

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if (self.groups > 1 and kind in (ValueError, TypeError)
                and not str(error).startswith("param group")):
            raise kind(f"param group {self.gi}: {error}") from None
        return False


def shown(value, limit=40) -> str:
    """A value for an error message, as repr shows it (np.int64(1), dtype('float32'): the type is part of what
    is wrong), cut short (10**400 has 401 digits)."""
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not replace the real error
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def groups_repr(name: str, param_groups, keys=None) -> str:
    """An optimizer's repr in torch.optim's layout: the class name, then each param group's
    hyperparameters (`keys`, in that order; default: every key of the group but "params")."""
    lines = [f"{name} ("]
    for i, group in enumerate(param_groups):
        lines.append(f"Parameter Group {i}")
        lines += [f"    {k}: {group[k]}" for k in (keys or group) if k != "params"]
    lines.append(")")
    return "\n".join(lines)


def as_float(name: str, value, label: str = "") -> float:
    """A real number (int, float, NumPy scalar; not bool) as a Python float, so host-side arithmetic
    is float64 whatever type the caller passed. TypeError for anything else, ValueError when it does
    not fit a float (10**400). Finiteness and ranges are the caller's check."""
    if type(value) is float:
        return value
    if not _is_real(value):
        # torch.optim takes a 0-d Tensor lr/betas (its capturable/fused paths): here a value is read once, as a
        # Python float, so a 0-d array or tensor is refused rather than silently frozen (lr may be a schedule)
        hint = "; pass float(x) (a changing lr is a schedule)" if getattr(value, "shape", None) == () else ""
        raise TypeError(f"{name} must be a real number, got {shown(value)!s} ({type(value).__name__}){hint}")
    try:
        return float(value)
    except (OverflowError, ValueError):
        raise ValueError(f"Invalid {label or name}: {shown(value)} (too large for a float)") from None


def as_bool(name: str, value) -> bool:
    """A flag (bool or NumPy bool) as a Python bool; TypeError naming it for anything else, 0/1 and "yes"
    included (a truthy value passed by mistake must not flip an option silently)."""
    t = type(value)
    if t is bool:
        return value
    if t is np.bool_:
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {shown(value)} ({t.__name__})")


def as_step(step, name="step") -> int:
    """A step number (1-based) as a Python int in [1, MAX_STEP]."""
    if type(step) is not int:
        if not isinstance(step, numbers.Integral) or isinstance(step, (bool, np.bool_)):
            raise TypeError(f"{name} must be an integer (the 1-based number of this step), got {shown(step)} "
                            f"({type(step).__name__})")
        step = int(step)
    if not 1 <= step <= MAX_STEP:
        raise ValueError(f"Invalid {name}: {shown(step)} (the first step is 1; at most 2**53)")
    return step


def saved_count(value, where: str) -> float:
    """A step count read back from a state dict: a number, or a 1-element real array or tensor (torch.optim
    saves a tensor), as a float holding a whole number >= 0. `where` names it in the errors."""
    if hasattr(value, "shape") and hasattr(value, "item"):  # a NumPy/CuPy array or a torch tensor
        kind = str(value.dtype)
        if math.prod(value.shape) != 1 or "bool" in kind or "complex" in kind:
            raise TypeError(f"{where} must be a count (a number or a 1-element real tensor), got "
                            f"{type(value).__name__} of dtype {kind} and shape {tuple(value.shape)}")
        value = value.item()
    if not _is_real(value):
        raise TypeError(f"{where} must be a count (a number or a 1-element real tensor), got {shown(value)} "
                        f"({type(value).__name__})")
    try:
        count = float(value)
    except OverflowError:  # an int past float's range
        raise ValueError(f"{where} is too large for a float: {shown(value)}") from None
    if not (math.isfinite(count) and count >= 0 and count == int(count)):
        raise ValueError(f"{where} must be a whole number >= 0, got {shown(value)}")
    return count


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter: `check(value)` is the valid range of a float one; `label` goes into the
    error message, torch-style: "Invalid learning rate: -0.1"."""

    name: str
    default: object
    doc: str
    kind: str = "float"  # "float" or "bool"
    check: Callable[[float], bool] | None = None
    label: str = ""
    inf_ok: bool = False  # +inf is meaningful (an upper clamp bound: no limit), as torch allows it

    def validate(self, value):
        """The value as a Python float (or bool); TypeError / ValueError naming it when invalid."""
        t = type(value)  # exact-type fast paths first: this runs on every step
        if self.kind == "bool":
            return value if t is bool else as_bool(self.name, value)
        given = value
        if t is not float:
            value = as_float(self.name, value, self.label)
        # every float hyperparameter must be finite (inf or nan would corrupt every parameter), but a bound
        if not (math.isfinite(value) or (self.inf_ok and value == math.inf)) or (
                self.check is not None and not self.check(value)):
            raise ValueError(f"Invalid {self.label or self.name}: {given}")  # as given, as torch echoes it
        return value


# Where a kernel call carries the Kahan compensation: arrays = (params, grads, s0, s1, s2, kahan_comp, s3), a
# fourth state (Adan's) after it, so that the three-state calls keep their layout
COMP_SLOT = 5

# capturable steps: a device row of scalars holds a spec's scalars in its first slots and the lr in this one
# (read by a two-phase family's trust kernel); no spec has more than LR_SLOT scalars (tests/gpu/test_capturable.py).
# Here rather than beside the CUDA sources: fastopt.capture reads it on every import of fastopt, and
# cuda_source imports ml_dtypes (about 1 s)
LR_SLOT = 15


def _nonneg(x):
    return x >= 0.0


def _unit(x):
    return 0.0 <= x < 1.0


def lr(default):
    return Hyper("lr", default, "learning rate (>= 0)", check=_nonneg, label="learning rate")


def beta1(default=0.9):
    return Hyper("beta1", default, "decay of the first moment, in [0, 1)", check=_unit, label="beta1 value")


def beta2(default=0.999):
    return Hyper("beta2", default, "decay of the second moment, in [0, 1)", check=_unit, label="beta2 value")


def eps(default):
    return Hyper("eps", default, "added to the denominator (>= 0)", check=_nonneg, label="epsilon value")


def weight_decay(default=0.0, doc="L2 penalty added to the gradient (>= 0)"):
    return Hyper("weight_decay", default, doc, check=_nonneg, label="weight_decay value")


_COUPLED_OR_DECOUPLED = "L2 penalty added to the gradient, or decoupled weight decay when decoupled_weight_decay (>= 0)"


def flag(name, default, doc):
    return Hyper(name, default, doc, kind="bool")


MAXIMIZE = flag("maximize", False, "maximize the objective (the gradient's sign is flipped)")


def momentum(default=0.0):
    return Hyper("momentum", default, "momentum factor (>= 0)", check=_nonneg, label="momentum value")


# ---------------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OptimizerSpec:
    """Everything about one optimizer except its per-element math (kernels/cuda/<family>.cuh).

    states:          state names in kernel slot order (slot 0, 1, 2 after params and grads)
    optional_states: the states a configuration may not use -> predicate(hp) telling when it does
    uses_step:       whether `step` is an argument (1-based number of the step being taken);
                     step_default is its default (None: required)
    scalars:         (hp, step, grad_scale) -> the kernel's float64 scalars, in the field order of
                     its *Params struct (scalar_names)
    variant:         (hp, step) -> int selecting the kernel's compiled variant
    variants:        every value `variant` can return: the variants compiled for the kernel family (the
                     C++ family table kernels/cuda/families.cuh, the CPU kinds and the CUDA entry names
                     are generated from it; the bits are the family's flags, e.g. SGD_MOMENTUM)
    """

    name: str
    class_name: str
    kernel: str
    summary: str
    rule: str
    hypers: tuple[Hyper, ...]
    states: tuple[str, ...]
    scalar_names: tuple[str, ...]
    scalars: Callable[[Mapping, int, float], tuple]
    variant: Callable[[Mapping, int], int] = lambda hp, step: 0
    variants: tuple[int, ...] = (0,)
    optional_states: Mapping[str, Callable[[Mapping], bool]] = field(default_factory=dict)
    uses_step: bool = True
    step_default: int | None = None
    torch_class: str | None = None
    torch_state_names: Mapping[str, str] = field(default_factory=dict)  # ours -> torch's, where they differ
    # torch.optim conversion hooks (fastopt/statedict.py), where torch keeps its state differently:
    # torch_step: torch keeps a per-param float32 "step" tensor (SGD keeps none; loading then counts 1 step
    #     for a param that has state arrays, else 0). torch_extra_state: torch-only state, a function of the
    #     registry hyperparameters and the step count (NAdam's mu_product): written as float32 tensors,
    #     recomputed (ignored) on loading. torch_group_flags: torch group keys whose value is fixed for this
    #     class (AdamW: decoupled_weight_decay=True; Adam has it as a hyperparameter); a torch dict with
    #     another value belongs to another class.
    torch_step: bool = True
    torch_extra_state: Mapping[str, Callable[[Mapping, int], float]] = field(default_factory=dict)
    # torch_carry: how torch advances each torch_extra_state value from step to step, value after step t =
    #     f(hp, t, value after step t - 1) (NAdam multiplies mu_product by this step's mu; ASGD recomputes eta
    #     and mu from this step's lr). fastopt.torch keeps each param's values and passes the ones stored
    #     after the previous step to the scalars as hp[name]; without them (the functional API, the NumPy
    #     classes) the scalars use torch_extra_state(hp, t - 1): the same for constant hyperparameters.
    torch_carry: Mapping[str, Callable[[Mapping, int, float], float]] = field(default_factory=dict)
    # torch_as_tensor: the torch_extra_state values torch stores as torch.as_tensor(a Python float), so rounded
    #     to torch's default dtype before the state tensor's own (ASGD's eta and mu: after a state dict load of
    #     float64 params they are float64 tensors holding float32 values)
    torch_as_tensor: tuple[str, ...] = ()
    torch_group_flags: Mapping[str, object] = field(default_factory=dict)
    # torch_tuples: torch's group keys that hold several registry hyperparameters as one tuple, in order
    #     (Rprop: etas = (etaminus, etaplus)); betas = (beta1, beta2) is implied (see torch_groups).
    torch_tuples: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # torch_positional: torch's constructor arguments after `params`, in torch's positional order, up to
    #     torch's `*` (torch-only ones such as foreach included; "betas" stands for (beta1, beta2)); None where
    #     torch has no such class (then only lr is positional). The classes take the leading run of these that
    #     are registry hyperparameters positionally (fastopt.SGD(p, 0.1, 0.9): momentum=0.9, as in torch).
    # torch_state_at_init: torch creates this optimizer's state in its constructor (Adagrad: step 0 and the
    #     filled sum), so a torch state dict has state for a param that never took a step; its fill comes from
    #     the constructor's arguments (optimizer.defaults), then and for state made later, not from the group.
    torch_positional: tuple[str, ...] | None = None
    torch_state_at_init: bool = False
    # torch_sparse: torch.optim takes sparse (COO) gradients for this optimizer (SGD, Adagrad): fastopt.torch
    #     makes them dense for its kernels (one warning). The function (hp, complex_param) says why it refuses
    #     them for these hyperparameters (RuntimeError), None when it takes them: where torch refuses them too
    #     (Adagrad's weight_decay) and where the dense update would differ from torch's row-sparse one. None:
    #     refused with torch's RuntimeError, torch_sparse_error or "<torch class> does not support sparse gradients".
    torch_sparse: Callable[[Mapping, bool], str | None] | None = None
    torch_sparse_error: str | None = None
    # state_fill: state name -> (hp -> the value a new state array is filled with); 0.0 for the others
    state_fill: Mapping[str, Callable[[Mapping], float]] = field(default_factory=dict)
    extra_check: Callable[[Mapping], None] | None = None
    two_phase: bool = False  # LAMB: a per-tensor reduction between the moments and the step
    # tensor_coefs: (hp, grad_scale, param_sumsq, grad_sumsq, ndims) -> one float64 coefficient per tensor
    #     (NumPy arrays of the per-tensor sums of squares of p and of g before the update, the params' ndims):
    #     the family's functor reads it as its member `coef` (LARS: the trust ratio, -1 for a tensor it
    #     excludes). The backends run a norms pass (p and g read) first, then the elementwise kernel.
    tensor_coefs: Callable | None = None
    # train_eval: (state, eval_weight, train_weight) for optimizers whose params hold another point than the
    #     one to evaluate (schedule-free: y while training, x for evaluation): the classes get eval() and
    #     train(), which move each param by p = lerp(p, state, weight(hp)) (state: a state array that exists
    #     once the param took a step), and step() refuses to run in eval mode.
    train_eval: tuple[str, Callable[[Mapping], float], Callable[[Mapping], float]] | None = None

    @property
    def norms_per_tensor(self) -> bool:
        """Whether the update reads per-tensor norms (LAMB's two phases, LARS's coefficients): their sums of
        squares run in another order than the NumPy reference's np.dot, so results agree to rounding, not
        bit for bit, and a shard (a piece of a tensor) cannot compute them alone."""
        return self.two_phase or self.tensor_coefs is not None

    @property
    def function_name(self) -> str:
        return f"{self.name}_step"

    @property
    def defaults(self) -> dict:
        return {h.name: h.default for h in self.hypers}

    def validate(self, hp: Mapping, step) -> tuple[dict, int]:
        """(hp, step) checked and converted to Python floats, bools and an int; TypeError / ValueError
        naming the argument otherwise. Called before any array is touched."""
        hp = {h.name: h.validate(hp[h.name]) for h in self.hypers}
        step = as_step(step) if self.uses_step else 1
        if self.extra_check is not None:
            self.extra_check(hp)
        return hp, step

    def state_init(self, hp: Mapping) -> dict[str, float]:
        """The value each state array starts with when it is created (init_state, the classes, the
        reference): 0.0 unless the spec says otherwise (Adagrad's state_sum: initial_accumulator_value;
        PARAM: a copy of the param, schedule-free's z).
        `hp` needs only the hyperparameters the fill values read."""
        out = {}
        for name in self.states:
            fill = self.state_fill[name](hp) if name in self.state_fill else 0.0
            out[name] = fill if fill is PARAM else float(fill)  # PARAM: a copy of the param (schedule-free z)
        return out

    @cached_property
    def positional_hypers(self) -> tuple[str, ...]:
        """The class constructor's positional arguments after `params`, torch's order: the leading run of
        torch_positional that are registry hyperparameters ("betas" for beta1/beta2); ("lr",) where torch
        has no such class."""
        if self.torch_positional is None:
            return ("lr",)
        names = {h.name for h in self.hypers} | ({"betas"} if "beta1" in {h.name for h in self.hypers} else set())
        out = []
        for name in self.torch_positional:
            if name not in names:
                break
            out.append(name)
        return tuple(out)

    @cached_property
    def torch_groups(self) -> dict[str, tuple[str, ...]]:
        """torch's tuple-valued group keys and the registry hyperparameters each holds, in order:
        {"betas": ("beta1", "beta2")} wherever beta1 exists, plus torch_tuples."""
        names = [h.name for h in self.hypers]
        betas = tuple(n for n in names if n.startswith("beta") and n[4:].isdigit())
        return {**({"betas": betas} if betas else {}), **self.torch_tuples}

    def class_keywords(self, values: Mapping) -> dict:
        """Registry-named values as the NumPy class's keywords: beta1 and beta2 as betas=(beta1, beta2)
        when both are given (the classes take torch's pair; Adan's beta3 stays its own keyword)."""
        out = dict(values)
        if "beta1" in out and "beta2" in out:
            out["betas"] = (out.pop("beta1"), out.pop("beta2"))
        return out

    def torch_keywords(self, values: Mapping) -> dict:
        """Registry-named values as torch's keywords: each of torch_groups' tuples (betas, with Adan's three;
        Rprop's etas and step_sizes) made from its names, when all of them are given."""
        out = dict(values)
        for key, names in self.torch_groups.items():
            if all(n in out for n in names):
                out[key] = tuple(out.pop(n) for n in names)
        return out

    @cached_property
    def _state_predicates(self):
        return tuple(self.optional_states.get(s) for s in self.states)

    @cached_property
    def state_options(self) -> tuple[str, ...]:
        """The hyperparameters that decide which states exist or what they start with: the ones the
        optional_states predicates and the state_fill functions read (init_state's options; found by
        running each on the defaults and on every bool flipped, recording the keys it reads)."""
        read: list[str] = []

        class _Recorder(dict):
            def __getitem__(self, key):
                if key not in read:
                    read.append(key)
                return dict.__getitem__(self, key)

            def get(self, key, default=None):
                return self[key] if key in self else default

        base = {h.name: (0.0 if h.default is REQUIRED else h.default) for h in self.hypers}
        trials = [base] + [dict(base, **{h.name: not h.default}) for h in self.hypers if h.kind == "bool"]
        for pred in (*self.optional_states.values(), *self.state_fill.values()):
            for hp in trials:
                pred(_Recorder(hp))
        return tuple(h.name for h in self.hypers if h.name in read)

    def plan_call(self, hp: Mapping, state_for: Callable[[str], object]) -> tuple[tuple, tuple[str, ...]]:
        """(state arguments, argument names) of one kernel call for these hyperparameters: the array(s)
        state_for(name) gives for each state the configuration uses, None for an unused slot, trailing
        unused slots dropped; names start with ("params", "grads"). The one planning helper of the
        functional API and the classes. A fourth state (Adan's) goes after the Kahan compensation's slot
        (arrays = (params, grads, s0, s1, s2, kahan_comp, s3)): that slot is None here (with_kahan fills it)."""
        tail = [state_for(name) if used else None for name, used in zip(self.states, self.active_states(hp))]
        while tail and tail[-1] is None:
            tail.pop()
        names = ("params", "grads") + self.states[:len(tail)]
        if len(tail) > COMP_SLOT - 2:
            tail.insert(COMP_SLOT - 2, None)
            names = names[:COMP_SLOT] + ("kahan_comp",) + names[COMP_SLOT:]
        return tuple(tail), names

    def active_states(self, hp: Mapping) -> tuple[bool, ...]:
        """For each state slot: does this configuration read and write it?"""
        return tuple(True if pred is None else bool(pred(hp)) for pred in self._state_predicates)

    def unmade_states(self, names, saved) -> list:
        """The states among names that no param saved and that the next step makes, as torch makes them:
        SGD's momentum buffer switched on between steps starts at the gradient of the step that first updates
        it, so a state dict saved in between lacks it for a whole group (checked by statedict) and a load
        drops a buffer the optimizer had allocated (optim). Optimizers with torch's step count make all
        their state at the first step: none."""
        if self.torch_step:
            return []
        return [name for name in names if name not in saved]

    def bytes_per_element(self, hp: Mapping, itemsize: int = 4) -> int:
        """Bytes an update must move per parameter: each array read once, each written array written
        once (LAMB: two passes, see lamb.cuh)."""
        nstates = sum(self.active_states(hp))
        if self.two_phase:
            return itemsize * ((2 + nstates + nstates) + (1 + nstates + 1))
        if self.tensor_coefs is not None:  # the norms pass reads p and g, then the update
            return itemsize * (2 + (2 + nstates) + (1 + nstates))
        return itemsize * ((2 + nstates) + (1 + nstates))

    def signature_text(self) -> str:
        """The generated function's signature, e.g. for the README table."""
        # built from the spec, as fastopt.functional builds the function (which imports this module)
        args = ["params", "grads"] + [f"{s}=None" if s in self.optional_states else s for s in self.states]
        kw = []
        if self.uses_step:
            kw.append("step" if self.step_default is None else f"step={self.step_default}")
        kw += [h.name for h in self.hypers if h.default is REQUIRED]
        kw += [f"{h.name}={h.default!r}" for h in self.hypers if h.default is not REQUIRED]
        return f"{self.function_name}({', '.join(args)}, *, {', '.join(kw + ['grad_scale=None', 'backend=None'])})"

    def docstring(self) -> str:
        lines = [self.summary, "", "Update, per element, in place (one fused pass over memory):", ""]
        lines += ["    " + line for line in self.rule.strip("\n").splitlines()]
        lines += ["", "Arrays (one array each, or lists of equal length for one multi-tensor call):",
                  "    params: updated in place.  grads: read only."]
        for s in self.states:
            when = " (only used when this configuration needs it)" if s in self.optional_states else ""
            lines.append(f"    {s}: optimizer state, updated in place{when}.")
        lines += ["", "Hyperparameters:"]
        if self.uses_step:
            lines.append("    step: the 1-based number of the step being taken.")
        for h in self.hypers:
            default = "required" if h.default is REQUIRED else f"default {h.default!r}"
            lines.append(f"    {h.name}: {h.doc} ({default}).")
        lines += [
            "    grad_scale: multiplies the gradient inside the kernel (float, or a 0-d array on the",
            "        params' device): fuses clipping or loss-scale unscaling into the update.",
            "    backend: force a backend ('cython', 'numpy', 'cupy', 'numba').",
            "",
            "Raises TypeError / ValueError naming the bad argument, before any array is modified.",
        ]
        if self.torch_class:
            lines.append(f"Matches torch.optim.{self.torch_class}.")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Host-side scalars
# ---------------------------------------------------------------------------------------------------

def _gs(hp, grad_scale):
    """The gradient multiplier: grad_scale, negated for maximize."""
    return -grad_scale if hp["maximize"] else grad_scale


def _sgd_scalars(hp, step, grad_scale):
    return (_gs(hp, grad_scale), hp["lr"], hp["momentum"], 1.0 - hp["dampening"], hp["weight_decay"])


SGD_MOMENTUM, SGD_NESTEROV, SGD_FIRST_STEP = 1, 2, 4
# nesterov needs momentum; the first step only matters with momentum
_SGD_VARIANTS = (0, SGD_MOMENTUM, SGD_MOMENTUM | SGD_NESTEROV, SGD_MOMENTUM | SGD_FIRST_STEP,
                 SGD_MOMENTUM | SGD_NESTEROV | SGD_FIRST_STEP)


def _sgd_variant(hp, step):
    if hp["momentum"] == 0.0:
        return 0
    v = SGD_MOMENTUM
    if hp["nesterov"]:
        v |= SGD_NESTEROV
    if step == 1:
        v |= SGD_FIRST_STEP
    return v


_SPARSE_DECAY = "weight_decay option is not compatible with sparse gradients"  # torch's Adagrad's words


def _sgd_sparse(hp, complex_param):
    """SGD with sparse gradients: the dense update with zeros where there is no gradient is torch's row-sparse one
    (p - lr * 0, buf * momentum + 0); weight_decay refused (torch's SGD fails in grad.add(param))."""
    return _SPARSE_DECAY if hp["weight_decay"] != 0 else None


def _adagrad_sparse(hp, complex_param):
    """Adagrad with sparse gradients, as torch: weight_decay refused (as SGD's); the dense update equals torch's row-sparse one
    where the other elements' 0 / (sqrt(sum) + eps) is 0, so not with eps = 0 (0 / 0 at a sum never updated), and
    not for complex params (torch's sparse branch uses complex arithmetic, its dense one the real views)."""
    refusal = _sgd_sparse(hp, complex_param)  # weight_decay, as SGD
    if refusal is not None:
        return refusal
    if hp["eps"] == 0:
        return ("fastopt.torch.Adagrad takes sparse gradients with eps > 0 only: they are made dense, and an element "
                "without a gradient would take 0 / (sqrt(0) + 0) where torch leaves it alone")
    if complex_param:
        return ("fastopt.torch.Adagrad does not take sparse gradients of complex params: torch's sparse update of "
                "them uses complex arithmetic, unlike its dense one (which fastopt's kernels run)")
    return None


def _sgd_check(hp):
    if hp["nesterov"] and (hp["momentum"] <= 0.0 or hp["dampening"] != 0.0):
        raise ValueError(
            f"Nesterov momentum requires a momentum and zero dampening (momentum={hp['momentum']}, "
            f"dampening={hp['dampening']})")


def _adagrad_scalars(hp, step, grad_scale):
    clr = hp["lr"] / (1.0 + (step - 1) * hp["lr_decay"])
    return (_gs(hp, grad_scale), clr, hp["eps"], hp["weight_decay"])


RMSPROP_CENTERED, RMSPROP_MOMENTUM = 1, 2


def _rmsprop_scalars(hp, step, grad_scale):
    return (_gs(hp, grad_scale), hp["lr"], hp["alpha"], 1.0 - hp["alpha"], hp["eps"], hp["weight_decay"],
            hp["momentum"])


def _rmsprop_variant(hp, step):
    return (RMSPROP_CENTERED if hp["centered"] else 0) | (RMSPROP_MOMENTUM if hp["momentum"] > 0.0 else 0)


def _moments(hp):
    return (hp["beta1"], 1.0 - hp["beta1"], hp["beta2"], 1.0 - hp["beta2"])


def _weight_decay_split(hp, decoupled):
    """(l2, decay): L2 weight decay adds l2 * p to the gradient; decoupled decay multiplies p by decay."""
    if decoupled:
        return 0.0, 1.0 - hp["lr"] * hp["weight_decay"]
    return hp["weight_decay"], 1.0


def _adam_like_scalars(decoupled):
    def scalars(hp, step, grad_scale):
        bias_correction1 = 1.0 - hp["beta1"] ** step
        bias_correction2 = 1.0 - hp["beta2"] ** step
        l2, decay = _weight_decay_split(hp, decoupled(hp))
        return (_gs(hp, grad_scale), *_moments(hp), hp["eps"], l2, decay, hp["lr"] / bias_correction1,
                1.0 / bias_correction2 ** 0.5)
    return scalars


def _nadam_mu(beta1, momentum_decay, t):
    return beta1 * (1.0 - 0.5 * 0.96 ** (t * momentum_decay))


_MU_EXACT_STEPS = 4096   # running products kept per (beta1, momentum_decay) key
_MU_KEYS = 16            # keys kept (least recently used dropped)
_MU_PRODUCTS: dict = {}
_MU_LOCK = threading.Lock()


def nadam_mu_product(beta1, momentum_decay, t):
    """prod_{i=1..t} mu_i. Up to _MU_EXACT_STEPS it is multiplied in step order like torch's running
    product (cached per key, so a call is O(1) amortised); beyond, it continues from there in closed
    form (_mu_product_tail), so a huge step costs O(1) time and memory."""
    key = (beta1, momentum_decay)
    with _MU_LOCK:
        products = _MU_PRODUCTS.pop(key, None) or [1.0]
        _MU_PRODUCTS[key] = products  # most recently used last
        while len(_MU_PRODUCTS) > _MU_KEYS:
            del _MU_PRODUCTS[next(iter(_MU_PRODUCTS))]
        target = min(t, _MU_EXACT_STEPS)
        while len(products) <= target:
            products.append(products[-1] * _nadam_mu(beta1, momentum_decay, len(products)))
        exact = products[target]
    if t <= _MU_EXACT_STEPS or exact == 0.0:
        return exact
    return exact * _mu_product_tail(beta1, momentum_decay, _MU_EXACT_STEPS, t)


def _mu_product_tail(beta1, momentum_decay, k, t):
    """prod_{i=k+1..t} mu_i = beta1^(t-k) * prod (1 - x_i), x_i = 0.5 r^i, r = 0.96^momentum_decay,
    through log(1 - x) = -sum_j x^j / j summed over i as geometric series (x_i <= 0.5: 60 terms reach
    double precision)."""
    if beta1 == 0.0:
        return 0.0
    n = t - k
    log_sum = n * math.log(beta1)
    r = 0.96 ** momentum_decay
    if r == 1.0:
        log_sum += n * math.log1p(-0.5)
    elif r > 0.0:  # r == 0.0 (momentum_decay past ~1.8e4 underflows): every factor 1 - 0.5 r^i is 1
        for j in range(1, 61):
            rj = r ** j
            # sum_{i=k+1..t} (0.5 r^i)^j = 0.5^j r^(j(k+1)) (1 - r^(j n)) / (1 - r^j)
            log_sum -= (0.5 ** j) * rj ** (k + 1) * -math.expm1(j * n * math.log(r)) / (1.0 - rj) / j
    return math.exp(log_sum)


def _nadam_scalars(hp, step, grad_scale):
    b1, md, lr = hp["beta1"], hp["momentum_decay"], hp["lr"]
    mu = _nadam_mu(b1, md, step)
    mu_next = _nadam_mu(b1, md, step + 1)
    before = hp.get("mu_product")  # fastopt.torch: the param's product after the previous step (torch_carry)
    # torch multiplies in its tensor's dtype (before: a NumPy scalar of it), then reads the product as a float
    mu_product = nadam_mu_product(b1, md, step) if before is None else float(before * mu)
    mu_product_next = mu_product * mu_next
    l2, decay = _weight_decay_split(hp, hp["decoupled_weight_decay"])
    return (_gs(hp, grad_scale), *_moments(hp), hp["eps"], l2, decay, 1.0 / (1.0 - hp["beta2"] ** step),
            lr * (1.0 - mu) / (1.0 - mu_product), lr * mu_next / (1.0 - mu_product_next))


def radam_rectification(beta2, step):
    """(rectified?, rect): RAdam's variance rectification term; rectified when rho_t > 5."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    bias_correction2 = 1.0 - beta2 ** step
    rho_t = rho_inf - 2.0 * step * (beta2 ** step) / bias_correction2
    if rho_t <= 5.0:
        return False, 0.0
    rect = ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)) ** 0.5
    return True, rect


def _radam_scalars(hp, step, grad_scale):
    l2, decay = _weight_decay_split(hp, hp["decoupled_weight_decay"])
    _, rect = radam_rectification(hp["beta2"], step)
    step_size = hp["lr"] / (1.0 - hp["beta1"] ** step)
    return (_gs(hp, grad_scale), *_moments(hp), hp["eps"], l2, decay, step_size,
            step_size * (1.0 - hp["beta2"] ** step) ** 0.5 * rect)


def _radam_variant(hp, step):
    return 1 if radam_rectification(hp["beta2"], step)[0] else 0


def _lamb_scalars(hp, step, grad_scale):
    if hp["bias_correction"]:
        bc1, bc2 = 1.0 - hp["beta1"] ** step, 1.0 - hp["beta2"] ** step
    else:
        bc1 = bc2 = 1.0
    return (_gs(hp, grad_scale), *_moments(hp), hp["eps"], hp["weight_decay"], 1.0 / bc1, 1.0 / bc2)


def _lion_scalars(hp, step, grad_scale):
    return (_gs(hp, grad_scale), hp["lr"], *_moments(hp), 1.0 - hp["lr"] * hp["weight_decay"])


# ---------------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------------

_ADAM_SCALARS = ("grad_scale", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "l2", "decay",
                 "step_size", "inv_bias_correction2_sqrt")
_ADAM_RULE = """\
g = grad_scale * g  (negated if maximize){l2}
m = beta1 * m + (1 - beta1) * g
v = beta2 * v + (1 - beta2) * g^2
if amsgrad: max_exp_avg_sq = max(max_exp_avg_sq, v); use it in place of v
p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
"""


def _adam_spec(name, class_name, summary, wd_default, decoupled):
    """Adam (decoupled=False: L2 weight decay unless its decoupled_weight_decay flag is set, like
    torch.optim.Adam since 2.x) and AdamW (decoupled=True, fixed: torch.optim.AdamW has no such argument
    and writes decoupled_weight_decay=True into its param groups)."""
    if decoupled:
        wd_rule, wd_doc = "\np = p * (1 - lr * weight_decay)      (decoupled, first)", "decoupled weight decay (>= 0)"
        flags, is_decoupled, group_flags = (), (lambda hp: True), {"decoupled_weight_decay": True}
    else:
        wd_rule = (" + weight_decay * p, or p = p * (1 - lr * weight_decay) first when\n"
                   "        decoupled_weight_decay (then Adam is AdamW)")
        wd_doc = _COUPLED_OR_DECOUPLED
        flags = (flag("decoupled_weight_decay", False, "AdamW-style weight decay (Adam is then AdamW)"),)
        is_decoupled, group_flags = (lambda hp: hp["decoupled_weight_decay"]), {}
    return OptimizerSpec(
        name=name, class_name=class_name, kernel="adam", summary=summary,
        rule=_ADAM_RULE.format(l2=wd_rule),
        hypers=(lr(1e-3), beta1(), beta2(), eps(1e-8), weight_decay(wd_default, wd_doc),
                flag("amsgrad", False, "use the AMSGrad variant (max of the second moments)"), *flags, MAXIMIZE),
        states=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
        optional_states={"max_exp_avg_sq": lambda hp: hp["amsgrad"]},
        scalar_names=_ADAM_SCALARS,
        scalars=_adam_like_scalars(is_decoupled),
        variant=lambda hp, step: 1 if hp["amsgrad"] else 0, variants=(0, 1),
        torch_class=class_name,
        torch_group_flags=group_flags,
        torch_positional=("lr", "betas", "eps", "weight_decay", "amsgrad"),
        torch_sparse_error="Adam does not support sparse gradients, please consider SparseAdam instead",
    )


REGISTRY: dict[str, OptimizerSpec] = {}


def class_taking(spec: OptimizerSpec, key: str) -> str | None:
    """The class of spec's kernel where `key`, one of spec.torch_group_flags, is a hyperparameter (AdamW's
    decoupled_weight_decay: Adam), for the message refusing another value of the fixed flag."""
    return next((o.class_name for o in REGISTRY.values() if o.kernel == spec.kernel and o.torch_class
                 and key in o.defaults), None)


def _register(spec: OptimizerSpec) -> OptimizerSpec:
    REGISTRY[spec.name] = spec
    return spec


SGD = _register(OptimizerSpec(
    name="sgd", class_name="SGD", kernel="sgd",
    summary="Stochastic gradient descent with optional (Nesterov) momentum, in place.",
    rule="""\
g = grad_scale * g (negated if maximize) + weight_decay * p
if momentum != 0:
    buf = g                                              on step 1
    buf = momentum * buf + (1 - dampening) * g           afterwards
    g = g + momentum * buf if nesterov else buf
p = p - lr * g
(step defaults to 1, which (re)initialises the momentum buffer: pass step=t with momentum)
""",
    hypers=(lr(1e-3), momentum(),
            Hyper("dampening", 0.0, "dampening of the momentum (finite)", label="dampening value"),
            flag("nesterov", False, "use Nesterov momentum"), weight_decay(), MAXIMIZE),
    states=("momentum_buffer",),
    optional_states={"momentum_buffer": lambda hp: hp["momentum"] != 0.0},
    scalar_names=("grad_scale", "lr", "momentum", "one_minus_dampening", "weight_decay"),
    scalars=_sgd_scalars, variant=_sgd_variant, variants=_SGD_VARIANTS, step_default=1, torch_class="SGD", extra_check=_sgd_check,
    torch_sparse=_sgd_sparse,
    torch_step=False, torch_positional=("lr", "momentum", "dampening", "weight_decay", "nesterov"),
))

ADAGRAD = _register(OptimizerSpec(
    name="adagrad", class_name="Adagrad", kernel="adagrad",
    summary="Adagrad: per-coordinate learning rates from the sum of squared gradients, in place.",
    rule="""\
g = grad_scale * g (negated if maximize) + weight_decay * p
clr = lr / (1 + (t - 1) * lr_decay)
state_sum = state_sum + g^2
p = p - clr * g / (sqrt(state_sum) + eps)
""",
    hypers=(lr(1e-2), Hyper("lr_decay", 0.0, "learning-rate decay (>= 0)", check=_nonneg, label="lr_decay value"),
            weight_decay(),
            Hyper("initial_accumulator_value", 0.0, "the value state_sum starts with when it is created "
                  "(init_state, the classes); a step does not read it (>= 0)", check=_nonneg,
                  label="initial_accumulator_value value"),
            eps(1e-10), MAXIMIZE),
    states=("state_sum",),
    state_fill={"state_sum": lambda hp: hp["initial_accumulator_value"]},
    scalar_names=("grad_scale", "clr", "eps", "weight_decay"),
    scalars=_adagrad_scalars, torch_class="Adagrad", torch_state_names={"state_sum": "sum"},
    torch_sparse=_adagrad_sparse,
    torch_positional=("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps", "foreach"),
    torch_state_at_init=True,
))

RMSPROP = _register(OptimizerSpec(
    name="rmsprop", class_name="RMSprop", kernel="rmsprop",
    summary="RMSprop, plain or centered, with optional momentum, in place.",
    rule="""\
g = grad_scale * g (negated if maximize) + weight_decay * p
square_avg = alpha * square_avg + (1 - alpha) * g^2
if centered: grad_avg = alpha * grad_avg + (1 - alpha) * g
             avg = sqrt(square_avg - grad_avg^2) + eps
else:        avg = sqrt(square_avg) + eps
if momentum > 0: momentum_buffer = momentum * momentum_buffer + g / avg;  p = p - lr * momentum_buffer
else:            p = p - lr * g / avg
""",
    hypers=(lr(1e-2), Hyper("alpha", 0.99, "smoothing constant (>= 0)", check=_nonneg, label="alpha value"),
            eps(1e-8), weight_decay(), momentum(), flag("centered", False, "normalise by the gradient's variance"),
            MAXIMIZE),
    states=("square_avg", "grad_avg", "momentum_buffer"),
    optional_states={"grad_avg": lambda hp: hp["centered"], "momentum_buffer": lambda hp: hp["momentum"] > 0.0},
    scalar_names=("grad_scale", "lr", "alpha", "one_minus_alpha", "eps", "weight_decay", "momentum"),
    scalars=_rmsprop_scalars, variant=_rmsprop_variant, variants=(0, 1, 2, 3), uses_step=False, torch_class="RMSprop",
    # torch's RMSprop has no `*`: every argument is positional
    torch_positional=("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "capturable", "foreach",
                      "maximize", "differentiable"),
))

ADAM = _register(_adam_spec("adam", "Adam", "Adam (optionally AMSGrad) with L2 or decoupled weight decay, in place.", 0.0, False))
ADAMW = _register(_adam_spec("adamw", "AdamW", "AdamW: Adam with decoupled weight decay, in place.", 1e-2, True))

NADAM = _register(OptimizerSpec(
    name="nadam", class_name="NAdam", kernel="nadam",
    summary="NAdam: Adam with Nesterov momentum and a momentum schedule, in place.",
    rule="""\
g = grad_scale * g (negated if maximize); g = g + weight_decay * p, or p = p * (1 - lr * weight_decay)
        when decoupled_weight_decay
mu_t = beta1 * (1 - 0.5 * 0.96^(t * momentum_decay));  P_t = mu_1 * ... * mu_t
m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g^2
denom = sqrt(v / (1 - beta2^t)) + eps
p = p - lr * (1 - mu_t) / (1 - P_t) * g / denom - lr * mu_{t+1} / (1 - P_{t+1}) * m / denom
""",
    hypers=(lr(2e-3), beta1(), beta2(), eps(1e-8), weight_decay(0.0, _COUPLED_OR_DECOUPLED),
            Hyper("momentum_decay", 4e-3, "momentum schedule decay (>= 0)", check=_nonneg,
                  label="momentum_decay value"),
            flag("decoupled_weight_decay", False, "AdamW-style weight decay"), MAXIMIZE),
    states=("exp_avg", "exp_avg_sq"),
    scalar_names=("grad_scale", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "l2", "decay",
                  "inv_bias_correction2", "grad_coef", "exp_avg_coef"),
    scalars=_nadam_scalars, torch_class="NAdam",
    torch_positional=("lr", "betas", "eps", "weight_decay", "momentum_decay", "decoupled_weight_decay"),
    torch_extra_state={"mu_product": lambda hp, t: nadam_mu_product(hp["beta1"], hp["momentum_decay"], t)},
    torch_carry={"mu_product": lambda hp, t, before: before * _nadam_mu(hp["beta1"], hp["momentum_decay"], t)},
))

RADAM = _register(OptimizerSpec(
    name="radam", class_name="RAdam", kernel="radam",
    summary="RAdam: Adam with a rectified adaptive learning rate, in place.",
    rule="""\
g = grad_scale * g (negated if maximize); g = g + weight_decay * p, or p = p * (1 - lr * weight_decay)
        when decoupled_weight_decay
m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g^2
rho_inf = 2 / (1 - beta2) - 1;   rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t)
if rho_t > 5: r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
              p = p - lr * m / (1 - beta1^t) * sqrt(1 - beta2^t) / (sqrt(v) + eps) * r_t
else:         p = p - lr * m / (1 - beta1^t)
""",
    hypers=(lr(1e-3), beta1(), beta2(), eps(1e-8), weight_decay(0.0, _COUPLED_OR_DECOUPLED),
            flag("decoupled_weight_decay", False, "AdamW-style weight decay"), MAXIMIZE),
    states=("exp_avg", "exp_avg_sq"),
    scalar_names=("grad_scale", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "l2", "decay",
                  "step_size", "rect_step_size"),
    scalars=_radam_scalars, variant=_radam_variant, variants=(0, 1), torch_class="RAdam",
    torch_positional=("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay"),
))

ADABELIEF = _register(OptimizerSpec(
    name="adabelief", class_name="AdaBelief", kernel="adabelief",
    summary="AdaBelief (Zhuang et al. 2020): Adam whose step adapts to the belief in the gradient, in place.",
    rule="""\
g = grad_scale * g (negated if maximize); p = p * (1 - lr * weight_decay) when decoupled_weight_decay,
        else g = g + weight_decay * p
m = beta1 * m + (1 - beta1) * g
s = beta2 * s + (1 - beta2) * (g - m)^2 + eps
p = p - lr / (1 - beta1^t) * m / (sqrt(s) / sqrt(1 - beta2^t) + eps)
""",
    hypers=(lr(1e-3), beta1(), beta2(), eps(1e-16), weight_decay(0.0, _COUPLED_OR_DECOUPLED),
            flag("decoupled_weight_decay", True, "AdamW-style weight decay"), MAXIMIZE),
    states=("exp_avg", "exp_avg_var"),
    scalar_names=_ADAM_SCALARS,
    scalars=_adam_like_scalars(lambda hp: hp["decoupled_weight_decay"]),
))

LAMB = _register(OptimizerSpec(
    name="lamb", class_name="LAMB", kernel="lamb",
    summary="LAMB (You et al. 2019): Adam direction scaled per tensor by a trust ratio, in place.",
    rule="""\
g = grad_scale * g (negated if maximize)
m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g^2
u = (m / bc1) / (sqrt(v / bc2) + eps) + weight_decay * p     (bc = 1 - beta^t; 1 without bias_correction)
trust = ||p|| / ||u|| per tensor (1 when either is 0)
p = p - lr * trust * u
""",
    hypers=(lr(1e-3), beta1(), beta2(), eps(1e-6),
            weight_decay(0.0, "weight decay added to the update before the trust ratio: u + weight_decay * p (>= 0)"),
            flag("bias_correction", True, "bias-correct the moments"), MAXIMIZE),
    states=("exp_avg", "exp_avg_sq"),
    scalar_names=("grad_scale", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "weight_decay",
                  "inv_bias_correction1", "inv_bias_correction2"),
    scalars=_lamb_scalars, two_phase=True,
))

LION = _register(OptimizerSpec(
    name="lion", class_name="Lion", kernel="lion",
    summary="Lion (Chen et al. 2023): sign of an interpolated momentum, in place.",
    rule="""\
g = grad_scale * g (negated if maximize)
p = p * (1 - lr * weight_decay)
p = p - lr * sign(beta1 * m + (1 - beta1) * g)
m = beta2 * m + (1 - beta2) * g
""",
    hypers=(lr(1e-4), beta1(0.9), beta2(0.99), weight_decay(0.0, "decoupled weight decay (>= 0)"), MAXIMIZE),
    states=("exp_avg",),
    scalar_names=("grad_scale", "lr", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "decay"),
    scalars=_lion_scalars, uses_step=False,
))


def _adamax_scalars(hp, step, grad_scale):
    return (_gs(hp, grad_scale), hp["beta1"], 1.0 - hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"],
            hp["lr"] / (1.0 - hp["beta1"] ** step))


ADAMAX = _register(OptimizerSpec(
    name="adamax", class_name="Adamax", kernel="adamax",
    summary="Adamax: Adam with the infinity norm of the gradients in place of the second moment, in place.",
    rule="""\
g = grad_scale * g (negated if maximize) + weight_decay * p
m = beta1 * m + (1 - beta1) * g
u = max(beta2 * u, |g| + eps)
p = p - lr / (1 - beta1^t) * m / u
""",
    hypers=(lr(2e-3), beta1(), beta2(), eps(1e-8), weight_decay(), MAXIMIZE),
    states=("exp_avg", "exp_inf"),
    scalar_names=("grad_scale", "beta1", "one_minus_beta1", "beta2", "eps", "weight_decay", "step_size"),
    scalars=_adamax_scalars, torch_class="Adamax",
    torch_positional=("lr", "betas", "eps", "weight_decay", "foreach"),
))


# ---- issue 14: Adadelta, Rprop, ASGD (torch.optim's) and Yogi (Zaheer et al. 2018) ------------------

def _adadelta_scalars(hp, step, grad_scale):
    return (_gs(hp, grad_scale), hp["lr"], hp["rho"], 1.0 - hp["rho"], hp["eps"], hp["weight_decay"])


ADADELTA = _register(OptimizerSpec(
    name="adadelta", class_name="Adadelta", kernel="adadelta",
    summary="Adadelta: step sizes from running averages of squared gradients and squared updates, in place.",
    rule="""\
g = grad_scale * g (negated if maximize) + weight_decay * p
square_avg = rho * square_avg + (1 - rho) * g^2
delta = sqrt(acc_delta + eps) / sqrt(square_avg + eps) * g
acc_delta = rho * acc_delta + (1 - rho) * delta^2
p = p - lr * delta
""",
    hypers=(lr(1.0), Hyper("rho", 0.9, "decay of the running averages, in [0, 1]",
                           check=lambda x: 0.0 <= x <= 1.0, label="rho value"),
            eps(1e-6), weight_decay(), MAXIMIZE),
    states=("square_avg", "acc_delta"),
    scalar_names=("grad_scale", "lr", "rho", "one_minus_rho", "eps", "weight_decay"),
    scalars=_adadelta_scalars, uses_step=False, torch_class="Adadelta",
    torch_positional=("lr", "rho", "eps", "weight_decay", "foreach"),
))


def _rprop_scalars(hp, step, grad_scale):
    return (_gs(hp, grad_scale), hp["etaminus"], hp["etaplus"], hp["step_size_min"], hp["step_size_max"])


def _rprop_check(hp):
    if not 0.0 < hp["etaminus"] < 1.0 < hp["etaplus"]:
        # torch's words, then our argument names (torch passes the pair as etas; fastopt.torch says torch's
        # words only)
        raise ValueError(f"Invalid eta values: {hp['etaminus']}, {hp['etaplus']} (etaminus must be in (0, 1) and "
                         f"etaplus > 1)")


RPROP = _register(OptimizerSpec(
    name="rprop", class_name="Rprop", kernel="rprop",
    summary="Rprop: per-element step sizes grown or shrunk by the sign agreement of successive gradients, "
            "in place.",
    rule="""\
g = grad_scale * g (negated if maximize)
s = sign(g * prev):  factor = etaplus if s > 0, etaminus if s < 0, 1 if s == 0
step_size = clamp(step_size * factor, step_size_min, step_size_max)   (step_size starts at lr)
g = 0 where s < 0
p = p - sign(g) * step_size
prev = g
""",
    hypers=(Hyper("lr", 1e-2, "initial step size (>= 0): fills step_size when the state is made (init_state, a "
                  "class's first step); a step reads step_size, not lr", check=_nonneg, label="learning rate"),
            Hyper("etaminus", 0.5, "step-size factor after a sign change, in (0, 1) (torch's etas[0])",
                  label="etaminus value"),
            Hyper("etaplus", 1.2, "step-size factor while the sign holds, > 1 (torch's etas[1])",
                  label="etaplus value"),
            Hyper("step_size_min", 1e-6, "smallest step size (torch's step_sizes[0])", label="step_size_min value"),
            Hyper("step_size_max", 50.0, "largest step size (torch's step_sizes[1]; inf: no limit)",
                  label="step_size_max value", inf_ok=True),
            MAXIMIZE),
    states=("prev", "step_size"),
    # torch fills a new step_size with the group's lr; a step never reads lr
    state_fill={"step_size": lambda hp: hp["lr"]},
    scalar_names=("grad_scale", "etaminus", "etaplus", "step_size_min", "step_size_max"),
    scalars=_rprop_scalars, uses_step=False, extra_check=_rprop_check, torch_class="Rprop",
    torch_positional=("lr", "etas", "step_sizes"),
    torch_tuples={"etas": ("etaminus", "etaplus"), "step_sizes": ("step_size_min", "step_size_max")},
))


def asgd_eta(hp, t) -> float:
    """ASGD's step size after t steps, torch's expression: lr / (1 + lambd * lr * t)^alpha (an overflowing
    power makes it 0)."""
    try:
        return hp["lr"] / ((1.0 + hp["lambd"] * hp["lr"] * t) ** hp["alpha"])
    except OverflowError:
        return 0.0


def asgd_mu(hp, t) -> float:
    """ASGD's averaging weight after t steps: 1 / max(1, t - t0) (1 before the first step)."""
    return 1.0 if t == 0 else 1.0 / max(1.0, t - hp["t0"])


def _asgd_scalars(hp, step, grad_scale):
    # torch uses the eta and mu it stored after the previous step (computed with that step's lr):
    # fastopt.torch passes them (torch_carry), else they are computed as for a constant lr
    eta = float(hp["eta"]) if "eta" in hp else asgd_eta(hp, step - 1)  # read as a float, like torch's .item()
    mu = float(hp["mu"]) if "mu" in hp else asgd_mu(hp, step - 1)
    return (_gs(hp, grad_scale), hp["weight_decay"], 1.0 - hp["lambd"] * eta, eta, mu)


ASGD = _register(OptimizerSpec(
    name="asgd", class_name="ASGD", kernel="asgd",
    summary="ASGD: SGD with a decaying step size and a running average of the iterates, in place.",
    rule="""\
g = grad_scale * g (negated if maximize) + weight_decay * p
eta = lr / (1 + lambd * lr * (t - 1))^alpha;   mu = 1 / max(1, t - 1 - t0)   (1 on step 1)
p = p * (1 - lambd * eta) - eta * g
ax = ax + (p - ax) * mu   (ax = p when mu == 1)
""",
    hypers=(lr(1e-2), Hyper("lambd", 1e-4, "decay term (>= 0)", check=_nonneg, label="lambd value"),
            Hyper("alpha", 0.75, "power of the step-size decay (>= 0)", check=_nonneg, label="alpha value"),
            Hyper("t0", 1e6, "step at which averaging starts (finite)", label="t0 value"),
            weight_decay(), MAXIMIZE),
    states=("ax",),
    scalar_names=("grad_scale", "weight_decay", "decay", "eta", "mu"),
    scalars=_asgd_scalars, torch_class="ASGD",
    torch_positional=("lr", "lambd", "alpha", "t0", "weight_decay", "foreach", "maximize", "differentiable",
                      "capturable"),
    torch_extra_state={"eta": asgd_eta, "mu": asgd_mu},
    torch_carry={"eta": lambda hp, t, before: asgd_eta(hp, t), "mu": lambda hp, t, before: asgd_mu(hp, t)},
    torch_as_tensor=("eta", "mu"),
))


def _yogi_scalars(hp, step, grad_scale):
    wd = hp["weight_decay"]
    if hp["decoupled_weight_decay"]:
        l2, decay = 0.0, 1.0 - wd * (1.0 if hp["fixed_decay"] else hp["lr"])
    else:
        l2, decay = wd, 1.0
    return (_gs(hp, grad_scale), *_moments(hp), hp["eps"], l2, decay, hp["lr"] / (1.0 - hp["beta1"] ** step),
            1.0 / (1.0 - hp["beta2"] ** step) ** 0.5)


YOGI = _register(OptimizerSpec(
    name="yogi", class_name="Yogi", kernel="yogi",
    summary="Yogi (Zaheer et al. 2018): Adam whose second moment moves additively, by the sign of "
            "v - g^2, in place.",
    rule="""\
g = grad_scale * g (negated if maximize); p = p * (1 - lr * weight_decay) when decoupled_weight_decay
        (1 - weight_decay with fixed_decay), else g = g + weight_decay * p
m = beta1 * m + (1 - beta1) * g
v = v - (1 - beta2) * sign(v - g^2) * g^2
p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
(m and v start at initial_accumulator)
""",
    hypers=(lr(1e-2), beta1(), beta2(),
            Hyper("initial_accumulator", 1e-6, "the value exp_avg and exp_avg_sq start with (>= 0)",
                  check=_nonneg, label="initial_accumulator value"),
            weight_decay(0.0, "weight decay: decoupled (the default) or L2 (>= 0)"),
            flag("decoupled_weight_decay", True, "AdamW-style weight decay"),
            flag("fixed_decay", False, "decoupled decay not scaled by lr"), eps(1e-3), MAXIMIZE),
    states=("exp_avg", "exp_avg_sq"),
    state_fill={"exp_avg": lambda hp: hp["initial_accumulator"], "exp_avg_sq": lambda hp: hp["initial_accumulator"]},
    scalar_names=_ADAM_SCALARS,
    scalars=_yogi_scalars,
))


# ---- Schedule-free SGD and AdamW (Defazio et al. 2024, "The Road Less Scheduled"; the `schedulefree` package) --
# The params hold y (the point gradients are taken at); the state z starts as a copy of the param; the point
# to evaluate is x = lerp(y, z, 1 - 1/beta1) (eval()), and train() goes back (lerp by 1 - beta1).
#
# Host scalars. Step t (k = t - 1 in the package): sched = t / warmup_steps while k < warmup_steps, else 1;
# lr_t = lr * sched; lr_max = max(lr_max, lr_t); weight = t^r * lr_max^weight_lr_power; weight_sum += weight;
# ckp1 = weight / weight_sum (0 when weight_sum is 0). The package carries lr_max and weight_sum per group.
# Design: for a constant lr, lr_max = lr_t (sched never decreases: warmup_steps is a whole number), so
#     ckp1 = w_t / S_t,  w_i = i^r * sched_i^weight_lr_power,  S_t = w_1 + ... + w_t
# with lr^weight_lr_power cancelled (0 when lr is 0 and weight_lr_power is not: the package's 0 / 0 -> 0).
# S_t is a running sum cached per (warmup_steps, r, weight_lr_power), as nadam_mu_product: summed in step
# order up to _SF_EXACT_STEPS (O(1) amortised per call, and the same additions as the NumPy reference), then
# continued in closed form (Euler-Maclaurin over the two power laws), so a huge step costs O(1). The
# functional API and the NumPy classes use it, so there ckp1 does not depend on lr: under a changing lr they
# weight the average as for a constant one. fastopt.torch carries lr_max and weight_sum per param like the
# package (torch_carry; the package keeps them per group: the same while every param of a group steps
# together), so a changing lr (a torch LR scheduler) matches the package there.

_SF_EXACT_STEPS = 4096  # prefix sums kept per (warmup_steps, r, weight_lr_power) key
_SF_KEYS = 16           # keys kept (least recently used dropped)
_SF_SUMS: dict = {}
_SF_LOCK = threading.Lock()


def _sf_sched(warmup_steps, t):
    """The warm-up factor of step t (1-based): t / warmup_steps while t - 1 < warmup_steps, else 1."""
    return t / warmup_steps if t - 1 < warmup_steps else 1.0


def _sf_w(warmup_steps, r, weight_lr_power, t):
    """w_t = t^r * sched_t^weight_lr_power: the package's weight of step t for lr = 1."""
    return (t ** r) * (_sf_sched(warmup_steps, t) ** weight_lr_power)


def _power_sum(s, a, b, base=1.0, q=0.0):
    """sum_{j=a..b} j^s / base^q for integers 1 <= a <= b (s >= q >= 0; every power x^e is taken as
    x^(e - q) * (x / base)^q, so a large q with j <= base cannot overflow): added up when short, else
    Euler-Maclaurin (three correction terms; a > _SF_EXACT_STEPS here, so the remainder is far below double
    precision)."""
    if b < a:
        return 0.0

    def pw(x, e):
        return x ** (e - q) * (x / base) ** q if q else x ** e

    if b - a < 64:
        return math.fsum(pw(float(j), s) for j in range(a, b + 1))
    a, b = float(a), float(b)
    total = (pw(b, s + 1.0) - pw(a, s + 1.0)) / (s + 1.0) + 0.5 * (pw(a, s) + pw(b, s))
    coef, d = s, 1  # coef: s (s-1) ... (s-d+1), the d-th derivative's factor
    for bernoulli_over_factorial in (1.0 / 12.0, -1.0 / 720.0, 1.0 / 30240.0):  # B_2k / (2k)!
        if coef == 0.0:
            break
        total += bernoulli_over_factorial * coef * (pw(b, s - d) - pw(a, s - d))
        coef *= (s - d) * (s - d - 1)
        d += 2
    return total


def schedule_free_weight_sum(warmup_steps, r, weight_lr_power, t):
    """S_t = sum_{i=1..t} w_i (see above): cached running sums in step order up to _SF_EXACT_STEPS, then
    the closed form of the rest (warm-up steps: warmup_steps^-weight_lr_power * i^(r + weight_lr_power);
    later steps: i^r)."""
    key = (warmup_steps, r, weight_lr_power)
    with _SF_LOCK:
        sums = _SF_SUMS.pop(key, None) or [0.0]
        _SF_SUMS[key] = sums  # most recently used last
        while len(_SF_SUMS) > _SF_KEYS:
            del _SF_SUMS[next(iter(_SF_SUMS))]
        target = min(t, _SF_EXACT_STEPS)
        while len(sums) <= target:
            sums.append(sums[-1] + _sf_w(warmup_steps, r, weight_lr_power, len(sums)))
        exact = sums[target]
    if t <= _SF_EXACT_STEPS:
        return exact
    k, w = _SF_EXACT_STEPS, int(warmup_steps)
    warm = 0.0
    if w > k:
        warm = _power_sum(r + weight_lr_power, k + 1, min(t, w), float(warmup_steps), weight_lr_power)
    return exact + warm + _power_sum(r, max(k, w) + 1, t)


def schedule_free_lr_max(hp, t):
    """lr_max after t steps for a constant lr (the package starts it at -1)."""
    return -1.0 if t == 0 else hp["lr"] * _sf_sched(hp["warmup_steps"], t)


def schedule_free_weight_sum_lr(hp, t):
    """weight_sum after t steps for a constant lr: lr^weight_lr_power * S_t (0 before the first step)."""
    if t == 0:
        return 0.0
    return _sf_pow(hp["lr"], hp["weight_lr_power"]) * schedule_free_weight_sum(hp["warmup_steps"], hp["r"],
                                                                               hp["weight_lr_power"], t)


def _sf_pow(x, y):
    """x ** y, inf where it overflows (a huge lr or a carried lr_max to weight_lr_power)."""
    try:
        return x ** y
    except OverflowError:
        return math.inf


def _sf_carry_weight(hp, t):
    """The package's weight of step t from the lr_max carried before it (fastopt.torch)."""
    lr_t = hp["lr"] * _sf_sched(hp["warmup_steps"], t)
    return (t ** hp["r"]) * _sf_pow(max(float(hp["lr_max"]), lr_t), hp["weight_lr_power"])


def schedule_free_host(hp, step):
    """(ckp1, lr_t) of step `step`: carried lr_max / weight_sum when given (fastopt.torch), else the
    constant-lr closed form. Never raises for validated hyperparameters (r <= 16: t^r and the sums of
    2**53 steps fit a float; the powers of a huge lr are inf, and ckp1 is then 1): a step's scalars are
    computed between kernel calls, after earlier groups were written."""
    lr_t = hp["lr"] * _sf_sched(hp["warmup_steps"], step)
    if "weight_sum" in hp:  # as the package: weight_sum += weight; ckp1 = weight / weight_sum
        weight = _sf_carry_weight(hp, step)
        weight_sum = float(hp["weight_sum"]) + weight
        if weight == math.inf:
            ckp1 = 1.0
        else:
            ckp1 = weight / weight_sum if weight_sum != 0.0 else 0.0
    elif hp["lr"] == 0.0 and hp["weight_lr_power"] != 0.0:
        ckp1 = 0.0  # every weight is 0: the package's 0 / 0 -> 0
    else:
        r, power, warmup = hp["r"], hp["weight_lr_power"], hp["warmup_steps"]
        weight_sum = schedule_free_weight_sum(warmup, r, power, step)
        ckp1 = _sf_w(warmup, r, power, step) / weight_sum if weight_sum != 0.0 else 0.0
    return ckp1, lr_t


def _sf_sgd_scalars(hp, step, grad_scale):
    ckp1, lr_t = schedule_free_host(hp, step)
    return (_gs(hp, grad_scale), hp["weight_decay"], ckp1, lr_t * (hp["momentum"] * (1.0 - ckp1) - 1.0), lr_t)


def _sf_adamw_scalars(hp, step, grad_scale):
    ckp1, lr_t = schedule_free_host(hp, step)
    return (_gs(hp, grad_scale), hp["beta2"], 1.0 - hp["beta2"], 1.0 - hp["beta2"] ** step, hp["eps"],
            hp["weight_decay"], ckp1, lr_t * (hp["beta1"] * (1.0 - ckp1) - 1.0), lr_t)


def _whole(x):
    return x >= 0.0 and float(x).is_integer()


def _sf_hypers(lr_default, first):
    return (lr(lr_default), *first,
            Hyper("warmup_steps", 0, "steps of linear learning-rate warm-up (a whole number >= 0)",
                  check=_whole, label="warmup_steps value"),
            # r <= 16: t^r and the sum of the weights of 2**53 steps fit a float (the package overflows)
            Hyper("r", 0.0, "power of the polynomial weighting of the average, in [0, 16]",
                  check=lambda x: 0.0 <= x <= 16.0, label="r value"),
            Hyper("weight_lr_power", 2.0, "the average's weights are lr_max to this power (>= 0)",
                  check=_nonneg, label="weight_lr_power value"),
            MAXIMIZE)


def _open_unit(x):
    return 0.0 < x < 1.0


def _sf_carry():
    return dict(
        torch_extra_state={"lr_max": schedule_free_lr_max, "weight_sum": schedule_free_weight_sum_lr},
        # before: the value after the previous step; hp holds both carried values before this step
        torch_carry={"lr_max": lambda hp, t, before: max(float(before),
                                                         hp["lr"] * _sf_sched(hp["warmup_steps"], t)),
                     "weight_sum": lambda hp, t, before: float(before) + _sf_carry_weight(hp, t)})


_SF_RULE = """\
t: this step (1-based); lr_t = lr * t / warmup_steps while t <= warmup_steps, else lr
ckp1 = w_t / (w_1 + ... + w_t),  w_i = i^r * lr_max_i^weight_lr_power   (0 when the sum is 0; lr_max_i: the
        largest lr_i so far. The functional API and the NumPy classes take lr as constant (lr cancels);
        fastopt.torch carries lr_max and weight_sum like the schedulefree package)
g = grad_scale * g (negated if maximize){adaptive}
g = g + weight_decay * y                       (y: the param, before this step)
y = lerp(y, z, ckp1) + lr_t * ({beta} * (1 - ckp1) - 1) * g
z = z - lr_t * g                               (z starts as a copy of the param)
eval(): y -> x = lerp(y, z, 1 - 1/{beta}); train(): back, lerp(x, z, 1 - {beta})
"""

SCHEDULE_FREE_SGD = _register(OptimizerSpec(
    name="schedule_free_sgd", class_name="ScheduleFreeSGD", kernel="sfsgd",
    summary="Schedule-free SGD (Defazio et al. 2024, as schedulefree.SGDScheduleFree): momentum through "
            "interpolation and averaging, no learning-rate schedule, in place.",
    rule=_SF_RULE.format(adaptive="", beta="momentum"),
    hypers=_sf_hypers(1.0, (Hyper("momentum", 0.9, "momentum (interpolation) factor, in (0, 1)",
                                  check=_open_unit, label="momentum value"),
                            weight_decay(0.0, "L2 penalty at y added to the gradient (>= 0)"))),
    states=("z",),
    state_fill={"z": lambda hp: PARAM},
    scalar_names=("grad_scale", "weight_decay", "ckp1", "y_coef", "lr"),
    scalars=_sf_sgd_scalars,
    train_eval=("z", lambda hp: 1.0 - 1.0 / hp["momentum"], lambda hp: 1.0 - hp["momentum"]),
    **_sf_carry(),
))

SCHEDULE_FREE_ADAMW = _register(OptimizerSpec(
    name="schedule_free_adamw", class_name="ScheduleFreeAdamW", kernel="sfadamw",
    summary="Schedule-free AdamW (Defazio et al. 2024, as schedulefree.AdamWScheduleFree): Adam's "
            "normalised gradient, momentum through interpolation and averaging, no schedule, in place.",
    rule=_SF_RULE.format(
        adaptive="\nv = beta2 * v + (1 - beta2) * g^2;   g = g / (sqrt(v / (1 - beta2^t)) + eps)",
        beta="beta1"),
    hypers=_sf_hypers(0.0025, (Hyper("beta1", 0.9, "interpolation factor (the momentum), in (0, 1)",
                                     check=_open_unit, label="beta1 value"),
                               beta2(), eps(1e-8),
                               weight_decay(0.0, "L2 penalty at y added to the normalised gradient (>= 0)"))),
    states=("z", "exp_avg_sq"),
    state_fill={"z": lambda hp: PARAM},
    scalar_names=("grad_scale", "beta2", "one_minus_beta2", "bias_correction2", "eps", "weight_decay", "ckp1",
                  "y_coef", "lr"),
    scalars=_sf_adamw_scalars,
    train_eval=("z", lambda hp: 1.0 - 1.0 / hp["beta1"], lambda hp: 1.0 - hp["beta1"]),
    **_sf_carry(),
))


# ---- LARS (You et al. 2017), as pytorch_optimizer.LARS ---------------------------------------------------
# Its per-tensor ratio needs the norms of p and g before the update and scales the gradient before it enters
# the momentum buffer: a norms pass (the backends' per-tensor sums of squares of p and g), the ratios on the
# host (_lars_coefs: float64, as reference.lars_trust_ratio and lars.cuh's lars_trust_ratio), then the
# elementwise kernel LarsOp reading its tensor's ratio as `coef` (-1: an excluded tensor, ndim <= 1 with
# exclude_1d). Registered after Adan (the family table's order is the CPU kinds').

LARS_MOMENTUM, LARS_NESTEROV = 1, 2  # variant bits (lars.cuh)


def _lars_scalars(hp, step, grad_scale):
    return (_gs(hp, grad_scale), hp["lr"], hp["momentum"], 1.0 - hp["dampening"], hp["weight_decay"],
            hp["trust_coefficient"], hp["eps"])


def _lars_coefs(hp, grad_scale, param_sumsq, grad_sumsq, ndims):
    """The trust ratio of each tensor (float64), -1 where exclude_1d leaves a tensor (ndim <= 1) without it:
    trust_coefficient * ||p|| / (||g|| + weight_decay * ||p|| + eps), 1 when ||p|| or ||g|| + weight_decay *
    ||p|| is 0; ||g|| is the scaled gradient's (|grad_scale| * the norm of g)."""
    pn = np.sqrt(np.asarray(param_sumsq, dtype=np.float64))
    gn = abs(float(grad_scale)) * np.sqrt(np.asarray(grad_sumsq, dtype=np.float64))
    wd, tc, eps_ = hp["weight_decay"], hp["trust_coefficient"], hp["eps"]
    denom = gn + wd * pn
    ok = (pn > 0.0) & (denom > 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        trust = np.where(ok, tc * pn / np.where(ok, denom + eps_, 1.0), 1.0)
    if hp["exclude_1d"]:
        trust = np.where(np.asarray(ndims, dtype=np.int64).reshape(-1) <= 1, -1.0, trust)
    return np.ascontiguousarray(trust, dtype=np.float64).reshape(-1)


def _lars_variant(hp, step):
    if hp["momentum"] == 0.0:
        return 0
    return LARS_MOMENTUM | (LARS_NESTEROV if hp["nesterov"] else 0)


def _momentum_range(name):
    return Hyper(name, 0.9 if name == "momentum" else 0.0, f"{name} factor, in [0, 1)", check=_unit,
                 label=f"{name} value")


LARS = OptimizerSpec(
    name="lars", class_name="LARS", kernel="lars",
    summary="LARS (You et al. 2017): SGD with momentum whose gradient is scaled per tensor by a trust ratio "
            "(layer-wise adaptive rate), in place.",
    rule="""\
g = grad_scale * g (negated if maximize)
unless exclude_1d and p.ndim <= 1 (biases, norm weights: plain SGD with momentum):
    trust = trust_coefficient * ||p|| / (||g|| + weight_decay * ||p|| + eps)   per tensor
            (1 when ||p|| or ||g|| + weight_decay * ||p|| is 0)
    g = (g + weight_decay * p) * trust
if momentum > 0:
    buf = momentum * buf + (1 - dampening) * g          (buf starts at 0)
    g = g + momentum * buf if nesterov else buf
p = p - lr * g
(pytorch_optimizer.LARS exactly, which has no eps: eps=0 is it; optax.lars differs, see
tests/test_new_optimizers.py)
""",
    hypers=(lr(1e-3), _momentum_range("momentum"), _momentum_range("dampening"),
            weight_decay(0.0, "L2 penalty added to the gradient, inside the trust ratio (>= 0)"),
            Hyper("trust_coefficient", 1e-3, "eta, the trust coefficient (>= 0)", check=_nonneg,
                  label="trust_coefficient value"),
            eps(0.0), flag("nesterov", False, "use Nesterov momentum"),
            flag("exclude_1d", True, "params of ndim <= 1 take neither weight decay nor the trust ratio"),
            MAXIMIZE),
    states=("momentum_buffer",),
    optional_states={"momentum_buffer": lambda hp: hp["momentum"] > 0.0},
    scalar_names=("grad_scale", "lr", "momentum", "one_minus_dampening", "weight_decay", "trust_coefficient",
                  "eps"),
    scalars=_lars_scalars, variant=_lars_variant, variants=(0, LARS_MOMENTUM, LARS_MOMENTUM | LARS_NESTEROV),
    uses_step=False, tensor_coefs=_lars_coefs,
)


# ---- weight averaging (fastopt.ema_update / swa_update): an elementwise kernel family, not an optimizer ----
# Not in REGISTRY (no *_step, class or optimizer tests); kernel_specs() adds it to the compiled family table.

AVERAGE_EMA, AVERAGE_SWA, AVERAGE_COPY = 0, 1, 2  # variants: lerp by weight, running mean, first copy

WEIGHT_AVERAGE = OptimizerSpec(
    name="weight_average", class_name="WeightAverage", kernel="average",
    summary="Weight averaging: averages <- EMA, running mean or copy of params, in place.",
    rule="""\
EMA:  a = lerp(a, p, weight)          (weight = 1 - decay; torch's lerp)
SWA:  a = a + (p - a) / divisor       (divisor = n_averaged + 1)
copy: a = p                           (n_averaged = 0)
""",
    hypers=(), states=(), scalar_names=("grad_scale", "weight", "divisor"),  # grad_scale: unused, as every
    scalars=lambda hp, step, grad_scale: (grad_scale, hp["weight"], hp["divisor"]),  # family has it first
    variant=lambda hp, step: hp["mode"], variants=(AVERAGE_EMA, AVERAGE_SWA, AVERAGE_COPY), uses_step=False,
)

KERNEL_OPS: dict[str, OptimizerSpec] = {WEIGHT_AVERAGE.name: WEIGHT_AVERAGE}


# ---------------------------------------------------------------------------------------------------
# Composite optimizers: a step that is not one elementwise pass over (p, g, states)
# ---------------------------------------------------------------------------------------------------
# lbfgs (closure-driven, history of curvature pairs), muon (Newton-Schulz on 2-D momentum), adafactor
# (factored second moment), sparse_adam (row-sparse gradients). Their update is written in their own module
# (fastopt/<module>.py: the NumPy/CuPy class, and fastopt/torch/<module>.py for torch tensors), which reads
# the hyperparameters, their defaults, checks and docs from here, so that the CLI, the README table and the
# tests list them with the rest. Not in REGISTRY: nothing registry-generated (functional *_step, kernel
# families, the elementwise fuzz tables) applies to them.

@dataclass(frozen=True)
class CompositeSpec:
    """name, class_name (the NumPy class; torch's name where torch has the optimizer), module (under fastopt/),
    summary, rule (the update rule, for docstrings), hypers (validated with Hyper.validate), torch_class."""

    name: str
    class_name: str
    module: str
    summary: str
    rule: str
    hypers: tuple[Hyper, ...]
    torch_class: str | None = None

    @property
    def defaults(self) -> dict:
        return {h.name: h.default for h in self.hypers}


COMPOSITE: dict[str, CompositeSpec] = {}


def _register_composite(spec: CompositeSpec) -> CompositeSpec:
    assert spec.name not in REGISTRY and spec.name not in COMPOSITE, spec.name
    COMPOSITE[spec.name] = spec
    return spec


# lbfgs: closure-driven, one param group (torch's rule). lr and the tolerances are Hyper floats; max_iter,
# history_size (kind "int", >= 1), max_eval (kind "int_or_none": None is max_iter * 5 // 4, as torch) and
# line_search_fn (kind "choice": None or "strong_wolfe") are validated by fastopt/lbfgs.py (Hyper.validate takes
# floats and bools only). The tolerances may be any finite number (torch checks none). maximize (torch 2.15's
# keyword-only option; a group may lack it: torch < 2.15's groups have no such key) is a bool.
LBFGS = _register_composite(CompositeSpec(
    name="lbfgs", class_name="LBFGS", module="lbfgs", torch_class="LBFGS",
    summary="L-BFGS as torch.optim.LBFGS: closure-driven quasi-Newton steps from a history of curvature pairs, "
            "fixed step or strong-Wolfe line search, one param group.",
    rule="""\
per step(closure): evaluate f, g (closure); stop when max|g| <= tolerance_grad; then up to max_iter iterations:
    y = g - g_prev;  s = t_prev d_prev;  if y.s > 1e-10: push (y, s, rho = 1 / y.s) (history_size kept),
                                                          H_diag = y.s / y.y
    d = -H g by the two-loop recursion (q = -g; a_i = rho_i s_i.q; q -= a_i y_i; r = H_diag q;
                                        r += (a_i - rho_i y_i.r) s_i);  first iteration ever: d = -g
    t = lr (first iteration ever: lr * min(1, 1 / sum|g|));  stop when g.d > -tolerance_change
    x += t d (fixed step, f and g re-evaluated) or t from a strong-Wolfe line search (c1 = 1e-4, c2 = 0.9)
    stop after max_iter iterations, max_eval evaluations, max|g| <= tolerance_grad,
         max|t d| <= tolerance_change or |f - f_prev| < tolerance_change
maximize: f and g negated as read (-f minimized; step() returns the closure's first loss as it is)""",
    hypers=(
        Hyper("lr", 1, "learning rate: the step length t of the fixed step and the line search's first trial (>= 0)",
              check=_nonneg, label="learning rate"),
        Hyper("max_iter", 20, "iterations per step() (an int >= 1)", kind="int", label="max_iter"),
        Hyper("max_eval", None, "closure evaluations per step() (an int >= 1; None: max_iter * 5 // 4)",
              kind="int_or_none", label="max_eval"),
        Hyper("tolerance_grad", 1e-7, "stop when max|g| <= tolerance_grad (finite)", label="tolerance_grad"),
        Hyper("tolerance_change", 1e-9, "stop when a step, or the change of the loss, is this small (finite)",
              label="tolerance_change"),
        Hyper("history_size", 100, "curvature pairs (y, s) kept (an int >= 1)", kind="int", label="history_size"),
        Hyper("line_search_fn", None, "None (fixed step t = lr) or 'strong_wolfe'", kind="choice",
              label="line_search_fn"),
        flag("maximize", False, "maximize the objective: the loss and the gradient negated as they are read "
             "(torch 2.15's option; keyword-only)"),
    ),
))


# muon: torch's messages read "<label> should be >= 0 but is: <value>" (fastopt/muon.py formats them from these
# labels); ns_coefficients (kind "triple"), ns_steps (kind "int") and adjust_lr_fn (kind "choice") are validated by
# fastopt/muon.py (Hyper.validate takes floats and bools only).
MUON = _register_composite(CompositeSpec(
    name="muon", class_name="Muon", module="muon", torch_class="Muon",
    summary="Muon (Jordan et al. 2024) as torch.optim.Muon: momentum orthogonalized by a Newton-Schulz iteration, "
            "for 2-D params (hidden-layer weight matrices) only.",
    rule="""\
B = lerp(B, g, 1 - momentum)                       (B = momentum * B + (1 - momentum) * g)
U = lerp(g, B, momentum) if nesterov else B
X = bfloat16(U), transposed when rows > cols;  X /= max(||X||_F, eps)
repeat ns_steps times (bfloat16 values, float32 sums, as torch on the CPU):
    G = X X^T;  X = a X + (b G + c G G) X           ((a, b, c) = ns_coefficients)
p *= 1 - lr * weight_decay                         (decoupled, before the update)
p -= lr * s * X (transposed back);  s = sqrt(max(1, rows/cols)) ("original", None),
                                        0.2 * sqrt(max(rows, cols)) ("match_rms_adamw") or
                                        sqrt(rows/cols) ("spectral_unclamped", torch 2.15's; no clamp)""",
    hypers=(
        Hyper("lr", 1e-3, "learning rate (>= 0)", check=_nonneg, label="Learning rate"),
        Hyper("weight_decay", 0.1, "decoupled weight decay: p *= 1 - lr * weight_decay (>= 0)", check=_nonneg,
              label="weight decay"),
        Hyper("momentum", 0.95, "momentum factor (>= 0)", check=_nonneg, label="momentum"),
        flag("nesterov", True, "Nesterov momentum: orthogonalize lerp(g, B, momentum) instead of B"),
        Hyper("ns_coefficients", (3.4445, -4.7750, 2.0315), "(a, b, c) of the Newton-Schulz polynomial "
              "a X + b (X X^T) X + c (X X^T)^2 X (three finite numbers)", kind="triple",
              label="ns_coefficients"),
        Hyper("eps", 1e-7, "floor of the Frobenius norm that X is divided by (finite)",
              check=math.isfinite, label="epsilon"),
        Hyper("ns_steps", 5, "Newton-Schulz iterations (an int in [0, 100))", kind="int", label="ns_steps"),
        Hyper("adjust_lr_fn", None, "lr scaling by shape: None or 'original' (sqrt(max(1, rows/cols))), "
              "'match_rms_adamw' (0.2 sqrt(max(rows, cols))), 'spectral_unclamped' (sqrt(rows/cols))",
              kind="choice", label="adjust_lr_fn"),
    ),
))

# adafactor: torch's messages read "<label> should be >= 0 but is: <value>" (fastopt/adafactor.py formats
# them from these labels and checks); eps is torch's pair (eps1 or None, eps2), kind "pair": validated by
# fastopt/adafactor.py (Hyper.validate takes floats and bools only), labels "epsilon1" / "epsilon2".
ADAFACTOR = _register_composite(CompositeSpec(
    name="adafactor", class_name="Adafactor", module="adafactor", torch_class="Adafactor",
    summary="Adafactor (Shazeer & Stern 2018) as torch.optim.Adafactor: factored second moment, state O(rows + "
            "cols) per matrix, relative step size, update clipping, decoupled weight decay.",
    rule="""\
t += 1;  w = t^beta2_decay;  rho = min(lr, 1/sqrt(t));  alpha = max(eps2, RMS(p)) * rho
p *= 1 - lr * weight_decay                                    (decoupled, before the update)
g = -g if maximize
ndim >= 2 (the last two dims factored, leading dims batched; m rows, n cols):
    row_var = lerp(row_var, mean_j g^2, w)   col_var = lerp(col_var, mean_i g^2, w)
    V = row_var * col_var / max(mean_i row_var, eps1)
ndim < 2:  variance = lerp(variance, g^2, w);  V = variance
U = g / sqrt(max(V, eps1^2));  p -= alpha / max(1, RMS(U) / d) * U
eps1 None: finfo(dtype).eps of the group's first param with a gradient (as torch).""",
    hypers=(
        Hyper("lr", 1e-2, "relative step size cap and weight-decay scale (>= 0)", check=_nonneg,
              label="Learning rate"),
        Hyper("beta2_decay", -0.8, "second-moment decay exponent: 1 - beta2_t = t^beta2_decay (<= 0)",
              check=lambda x: x <= 0.0, label="beta2_decay"),
        Hyper("eps", (None, 1e-3), "(eps1 or None: finfo(dtype).eps, eps2): eps1 floors the variance "
              "estimate, eps2 the param RMS (each >= 0)", kind="pair", label="epsilon"),
        Hyper("d", 1.0, "update clipping threshold on RMS(U) (>= 1)", check=lambda x: x >= 1.0,
              label="Clipping threshold d"),
        Hyper("weight_decay", 0.0, "decoupled weight decay: p *= 1 - lr * weight_decay (>= 0)", check=_nonneg,
              label="weight_decay"),
        MAXIMIZE,
    ),
))


def _sparse_adam_positive(x):  # torch's SparseAdam wants lr > 0 and eps > 0 (not >= 0)
    return x > 0.0


SPARSE_ADAM = _register_composite(CompositeSpec(
    name="sparse_adam", class_name="SparseAdam", module="sparse_adam", torch_class="SparseAdam",
    summary="Adam for row-sparse gradients (embeddings): only the rows present in the gradient are updated",
    rule="""\
duplicate indices are summed first (torch's coalesce); then, for each row r in the gradient (with its own
step count t, +1 per step that has a gradient, even an empty one):
    g = -g if maximize
    m[r] += (g - m[r]) * (1 - beta1)
    v[r] += (g * g - v[r]) * (1 - beta2)
    p[r] -= lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m[r] / (sqrt(v[r]) + eps)
rows absent from the gradient keep p, m and v unchanged (lazy Adam)
""",
    hypers=(
        Hyper("lr", 1e-3, "learning rate (> 0)", check=_sparse_adam_positive, label="learning rate"),
        Hyper("beta1", 0.9, "decay of the first moment, in [0, 1)", check=_unit,
              label="beta parameter at index 0"),
        Hyper("beta2", 0.999, "decay of the second moment, in [0, 1)", check=_unit,
              label="beta parameter at index 1"),
        Hyper("eps", 1e-8, "added to sqrt(v) (> 0)", check=_sparse_adam_positive, label="epsilon value"),
        MAXIMIZE,
    ),
))


def all_optimizer_names() -> tuple[str, ...]:
    """Every optimizer fastopt has: the elementwise registry, then the composite ones."""
    return (*REGISTRY, *COMPOSITE)


def kernel_specs() -> tuple[OptimizerSpec, ...]:
    """Every spec with a compiled kernel family: the optimizers (REGISTRY), then the other elementwise ops
    (KERNEL_OPS). The family table (cuda_source), the Numba kernels and their scalar names follow this."""
    return (*REGISTRY.values(), *KERNEL_OPS.values())


# ---- issue 14: Adan (Xie et al. 2022), as pytorch_optimizer.Adan (4.1.0) -----------------------------

def _adan_scalars(hp, step, grad_scale):
    b1, b2, b3, lr_, wd = hp["beta1"], hp["beta2"], hp["beta3"], hp["lr"], hp["weight_decay"]
    decouple = hp["weight_decouple"] and wd != 0.0
    return (_gs(hp, grad_scale), 0.0 if step == 1 else 1.0, b1, 1.0 - b1, b2, 1.0 - b2, b3, 1.0 - b3,
            math.sqrt(1.0 - b3 ** step), hp["eps"], 1.0 - lr_ * wd if decouple else 1.0,
            lr_ / (1.0 - b1 ** step), lr_ * b2 / (1.0 - b2 ** step),
            1.0 + lr_ * wd if (wd != 0.0 and not hp["weight_decouple"]) else 1.0)


ADAN = _register(OptimizerSpec(
    name="adan", class_name="Adan", kernel="adan",
    summary="Adan (Xie et al. 2022): adaptive Nesterov momentum from moments of the gradient, of the "
            "gradient difference and of their Nesterov-corrected square, in place.",
    rule="""\
g = grad_scale * g  (negated if maximize)
diff = g - g_prev  (0 on step 1; previous_grad holds -g_prev, as in pytorch_optimizer)
m = beta1 * m + (1 - beta1) * g                       (exp_avg)
d = beta2 * d + (1 - beta2) * diff                    (exp_avg_diff)
n = beta3 * n + (1 - beta3) * (g + beta2 * diff)^2    (exp_avg_sq)
if weight_decouple: p = p * (1 - lr * weight_decay)
denom = sqrt(n) / sqrt(1 - beta3^t) + eps
p = p - lr / (1 - beta1^t) * m / denom - lr * beta2 / (1 - beta2^t) * d / denom
if not weight_decouple: p = p / (1 + lr * weight_decay)
previous_grad = -g
As pytorch_optimizer.Adan (lr, betas = (beta1, beta2, beta3), weight_decay, weight_decouple, eps,
maximize) and the paper's code (sail-sg/Adan: weight_decouple is its no_prox); its max_grad_norm is fastopt's clip_grad_norm (the classes); its use_gc (gradient
centralization, a per-tensor mean) and adanorm (a per-tensor norm) are not elementwise: not offered.
With maximize, pytorch_optimizer 4.1.0 starts previous_grad from the un-negated gradient (its first
difference is then -2 g, not 0); here the first difference is 0 either way.
""",
    hypers=(lr(1e-3), beta1(0.98), Hyper("beta2", 0.92, "decay of the gradient-difference moment, in [0, 1)",
                                         check=_unit, label="beta2 value"),
            Hyper("beta3", 0.99, "decay of the second moment, in [0, 1)", check=_unit, label="beta3 value"),
            weight_decay(0.0, "weight decay (>= 0): proximal, p / (1 + lr * weight_decay), or decoupled"),
            flag("weight_decouple", False, "decoupled weight decay, p * (1 - lr * weight_decay)"),
            eps(1e-8), MAXIMIZE),
    states=("exp_avg", "exp_avg_diff", "exp_avg_sq", "previous_grad"),
    scalar_names=("grad_scale", "first", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "beta3",
                  "one_minus_beta3", "bias_correction3_sqrt", "eps", "decay", "step_size", "diff_step_size",
                  "prox"),
    scalars=_adan_scalars,
))

_register(LARS)  # after Adan: the CPU kinds follow the registry's order


def get_spec(name: str) -> OptimizerSpec:
    try:
        return REGISTRY[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"Unknown optimizer {name!r}; known: {', '.join(REGISTRY)}") from None
