"""TorchOptimizer: the torch.optim.Optimizer subclass behind every fastopt.torch class.

A step plans every kernel call first (all checks, nothing written: hyperparameters, grads, layouts,
the backend's prepare() of every call, overlaps between calls), then runs them, then commits the new
state and the step counts. Params are grouped per (group, dtype, device, step count): torch keeps one
step count per param, and a param whose grad is None is skipped and keeps its count.

Precision (README "Precision"; CPU tensors, and CUDA tensors through the CuPy backend's precision modules):
state_dtype= ("float32", "bfloat16", "float16", a torch
dtype, or "int8"), kahan=True (state "kahan_comp", the param's dtype) and stochastic_rounding=True with
seed= (16-bit params). 8-bit state (state_dtype="int8", float32/bfloat16/float16 params; not LAMB, ASGD or
schedule-free: precision.INT8_REFUSED) keeps two tensors per state in the param's state dict, the keys of
the NumPy classes' state dicts:
    state[p]["<name>"]         uint8 codes, the param's shape and memory layout
    state[p]["<name>_absmax"]  float32 scales, ceil(numel / 256): block k covers elements 256k..256k+255
                               of the param in memory order (C order for a contiguous param)
    value = precision.dynamic_map(signed)[code] * absmax[block]   (signed map unless the state is never
                               negative: precision.NONNEGATIVE_STATES)
viewed zero-copy as precision.QuantizedState by the kernels (views.state_view, cached per param). The
element index that keys stochastic rounding is likewise the position in the param's memory (a transposed
param rounds as its contiguous storage does, not as a C-ordered copy of it). Loading
a state dict keeps codes and scales uint8/float32 (torch.optim's loader would cast them to the param's
dtype); a float state (a torch.optim state dict) loaded into an 8-bit optimizer is quantized at the next
step, 8-bit state loaded into a float-state optimizer dequantized; torch_state_dict() gives the state dict
with 8-bit state dequantized, for torch.optim.
"""
from __future__ import annotations

import copy
import math
import warnings
import numpy as np
import torch
from torch.nn.parameter import is_lazy

from fastopt.arrays import to_host
from fastopt.backends import cython_backend
from fastopt.backends.dispatch import backend_for
from fastopt.clip import clip_coefficient
from fastopt.functional import rounding_options, with_kahan
from fastopt.precision import INT8_REFUSED, QuantizedState, StochasticRounding, quant_blocks, signed_state
from fastopt.specs import PARAM, OptimizerSpec, naming_group, saved_count, shown
import fastopt.torch.arguments as arguments
import fastopt.torch.dtensor as dtensor
import fastopt.torch.loading as loading
from fastopt.torch.arrays import resolved_grad
from fastopt.torch.plan import Bucket, Plan
from fastopt.torch.steady import Steady
from fastopt.torch.views import (ABSMAX, ParamEntry, bump_versions, check_own_memory, dense_span, flat_tensors,
                                 kernel_view, layout, numpy_bfloat16, state_view)

# the params the kernels update, per device: float32 and float64; 16-bit params (float32 math and float32
# state: 16-bit moments would underflow) float16 and bfloat16 (CUDA: where the CuPy backend has bfloat16
# modules, i.e. with ml_dtypes, which names bfloat16 for NumPy and CuPy)
SIXTEEN_BIT = (torch.float16, torch.bfloat16)
# complex params as torch.optim takes them: each element a pair of independent reals (torch.view_as_real, the
# kernels' view of param, grad and state), their state complex like the param
COMPLEX = (torch.complex64, torch.complex128)
KERNEL_DEVICES = ("cpu", "cuda")


def kernel_dtypes(device_type: str) -> tuple:
    """The param dtypes the kernels update on a device type (one of KERNEL_DEVICES)."""
    if device_type == "cpu":
        return (torch.float32, torch.float64, torch.float16, torch.bfloat16) + COMPLEX
    # imported on use: the CUDA sources' dtype table imports ml_dtypes, about 1 s that a CPU user need not pay
    from fastopt.backends import cuda_source
    return (torch.float32, torch.float64, torch.float16) + (
        (torch.bfloat16,) if cuda_source.BF16 is not None else ()) + COMPLEX


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a param's state tensors: float32 for 16-bit params, else the param's (the backends'
    rule, validate.HostArrays.state_dtype / device_arrays.state_dtype)."""
    return torch.float32 if param_dtype in SIXTEEN_BIT else param_dtype


KAHAN = "kahan_comp"  # the state entry of the Kahan compensation (kahan=True), in the param's dtype
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "float64": torch.float64}
INT8 = "int8"  # state_dtype="int8": 8-bit block-wise state (what _state_dtype_of returns for it)


def is_int8(choice) -> bool:
    return isinstance(choice, str) and choice == INT8


def check_int8_optimizer(spec) -> None:
    """ValueError for state_dtype='int8' on an optimizer whose state must stay exact (the NumPy classes'
    message: precision.INT8_REFUSED)."""
    if spec.name in INT8_REFUSED:
        raise ValueError(f"Invalid state_dtype: 'int8' for {spec.name!r}: {INT8_REFUSED[spec.name]}")


def chosen_state_dtype(choice, param_dtype: torch.dtype):
    """The dtype of a param's state tensors for state_dtype=`choice` (None: state_dtype(param_dtype));
    the NumPy classes' rule (fastopt.init_state): float32 params keep float32, bfloat16 or float16 state,
    16-bit params float32 or their own dtype, float64 params float64; "int8" (INT8: 8-bit block-wise state)
    for float32, float16 and bfloat16 params (CPU and CUDA: the kernels take the same). ValueError naming
    state_dtype."""
    if choice is None:
        return state_dtype(param_dtype)
    if is_int8(choice):
        if param_dtype not in (torch.float32, *SIXTEEN_BIT):
            raise ValueError(f"Invalid state_dtype: 'int8' for a {str(param_dtype).replace('torch.', '')} param "
                             f"(8-bit state is for float32, float16 or bfloat16 params)")
        return INT8
    wanted = STATE_DTYPES.get(choice, choice) if isinstance(choice, str) else choice
    if not isinstance(wanted, torch.dtype):
        raise TypeError(f"state_dtype must be one of {', '.join(STATE_DTYPES)}, a torch dtype or None, got "
                        f"{shown(choice)}")
    own = param_dtype
    ok = wanted == own or (wanted == torch.float32 and own not in (torch.float64, *COMPLEX)) or (
        own == torch.float32 and wanted in SIXTEEN_BIT)
    if not ok:
        allowed = {torch.float64: "float64", torch.float32: "float32, bfloat16 or float16",
                   torch.complex64: "complex64", torch.complex128: "complex128"}.get(
            own, f"float32 or {str(own).replace('torch.', '')}")
        raise ValueError(f"Invalid state_dtype: {shown(choice)} for a {str(own).replace('torch.', '')} param (its "
                         f"state may be {allowed})")
    return wanted


def grad_dtypes(param_dtype: torch.dtype) -> tuple:
    """The dtypes a grad may have: the param's, and float32 for a 16-bit param."""
    return (param_dtype, torch.float32) if param_dtype in SIXTEEN_BIT else (param_dtype,)


def scalar_dtype():
    """The dtype torch.optim gives its 0-d step and mu_product tensors: float64 when that is the default
    dtype, else float32 (torch.optim.optimizer._get_scalar_dtype for a non-fused optimizer)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _extra_state_dtype(spec) -> torch.dtype:
    """The dtype of a new torch_extra_state tensor: torch's scalar dtype where torch has the optimizer (NAdam's
    mu_product, ASGD's eta and mu, as torch keeps them), else float64: schedule-free's lr_max and weight_sum are
    running values that the NumPy class and the schedulefree package keep as Python floats (float32 tensors
    drifted 1.5e-8 relative from them in float64 after a few steps)."""
    return scalar_dtype() if spec.torch_class else torch.float64


# the state dict's key of the stochastic rounding count of an optimizer without torch's step count (SGD)
ROUNDING_STEPS = "fastopt_rounding_steps"

def _can_have_grad(p: torch.Tensor) -> bool:
    """Whether autograd can give p a gradient (a float or complex dtype). Others (an integer counter
    registered as an nn.Parameter with requires_grad=False) are taken into a group as torch.optim takes
    them, and never updated: a grad set on one by hand is refused at the step."""
    return p.dtype.is_floating_point or p.dtype.is_complex


def _restart_refused(state, name: str, number: int, value) -> ValueError:
    """A param that has taken steps (its "step" is in the state) without state `name`: a damaged state dict, or an
    option switched on after steps. torch.optim fails there too; restarting it from zero would go on silently
    with another trajectory (momentum buffers excepted: torch's SGD makes a missing one)."""
    what = "missing" if name not in state else "None" if value is None else f"a {type(value).__name__}, not a tensor"
    return ValueError(f"state {name!r} of params[{number}] is {what} but the param has taken steps (a damaged state "
                      f"dict, or an option switched on after steps): torch.optim fails here too")


def _must_exist(state, name: str) -> bool:
    """Whether a missing state `name` is refused rather than made (see _restart_refused)."""
    return bool(state) and "step" in state and name not in (KAHAN, "momentum_buffer")


class TorchOptimizer(torch.optim.Optimizer):
    """A torch.optim.Optimizer whose step runs fastopt's fused kernels in place on the params' storage.

    Subclasses (one per registry optimizer, fastopt/torch/__init__.py) set `spec`. fastopt's extras:
    clip_grad_norm (global-norm clipping fused into the update, torch.nn.utils.clip_grad_norm_
    semantics) and skip_nonfinite (a NaN/Inf gradient skips the whole step; counted in skipped_steps);
    the precision options state_dtype (incl. "int8": 8-bit block-wise state, see the module docstring),
    kahan and stochastic_rounding/seed, fixed for the optimizer's life, the NumPy classes' checks and
    messages (CUDA params: state_dtype other than the default, kahan and stochastic rounding refused).
    """

    spec: OptimizerSpec
    # torch.amp.GradScaler hands the scale and its inf flag to step() (optimizer.grad_scale/found_inf):
    # unscaling is fused into the update, and a step with an inf is skipped. p.grad stays scaled (torch's fused
    # kernels write the unscaled grads back: one more write per element, not made here; README)
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict, clip_grad_norm=None, skip_nonfinite=False, state_dtype=None,
                 kahan=False, stochastic_rounding=False, seed=0):
        self.clip_grad_norm, self.skip_nonfinite = arguments.check_extras(clip_grad_norm, skip_nonfinite)
        # precision (README "Precision"): fixed for the optimizer's life, checked per param as it arrives
        rounding_options(0, stochastic_rounding, seed, 0, kahan)
        if is_int8(state_dtype):
            check_int8_optimizer(self.spec)
        if state_dtype is not None and not isinstance(STATE_DTYPES.get(state_dtype, state_dtype)
                                                      if isinstance(state_dtype, str) else state_dtype, torch.dtype):
            chosen_state_dtype(state_dtype, torch.float32)  # the TypeError naming state_dtype (per param: _check_param)
        self.state_dtype, self.kahan = state_dtype, bool(kahan)
        self.stochastic_rounding, self.seed = bool(stochastic_rounding), int(seed)
        self.rounding_steps = 0  # steps taken with stochastic rounding (the key of optimizers without a count)
        arguments.registry_hp(self.spec, defaults)  # torch checks its defaults in the constructor too
        self.skipped_steps = 0
        self._fastopt_entries: dict = {}   # id(param) -> ParamEntry
        self._fastopt_templates: dict = {}  # id(group) -> the last step's kernel calls of the group
        self._fastopt_warned: set = set()
        self._fastopt_steady = None        # steady.Steady: the last step's calls, while only grads change
        self._fastopt_constructed = False
        super().__init__(params, defaults)
        self._fastopt_constructed = True
        if self.spec.torch_state_at_init:
            # torch makes this optimizer's state in its constructor (Adagrad), filled from the constructor's
            # arguments (not the groups' own values): the same here
            hp = arguments.registry_hp(self.spec, defaults)
            for group in self.param_groups:
                for p in group["params"]:
                    if _can_have_grad(p):
                        self.state[p].update(self._initial_state(hp, p))

    # --- param groups -------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, then fastopt's checks of the group (nothing added when they fail)."""
        before = len(self.param_groups)
        super().add_param_group(param_group)
        try:
            group = self.param_groups[-1]
            hp = arguments.registry_hp(self.spec, group)
            for p in group["params"]:
                # a lazy module's param (UninitializedParameter) has no storage before the model's first
                # forward: torch.optim takes it, and the step checks it as it checks every new param
                if _can_have_grad(p) and not is_lazy(p):
                    self._check_param(p)
        except Exception:
            del self.param_groups[before:]
            raise
        if self.spec.torch_state_at_init and self._fastopt_constructed:
            for p in group["params"]:  # a group added later: as torch makes it at the first step, from the
                if _can_have_grad(p):  # constructor's arguments (_new_state)
                    self.state[p].update(self._initial_state(hp, p))

    def _initial_state(self, hp, p) -> dict:
        """A param's state before its first step, with torch's names: count 0, arrays filled."""
        spec = self.spec
        state = {"step": torch.tensor(0.0, dtype=scalar_dtype())} if spec.torch_step else {}
        for name, on in zip(spec.states, spec.active_states(hp)):
            if on:
                tname = spec.torch_state_names.get(name, name)
                value = self._new_state(spec, hp, name, p)
                if isinstance(value, tuple):  # 8-bit state: codes and scales
                    state[tname], state[tname + ABSMAX] = value
                else:
                    state[tname] = value
        return state

    def _check_param(self, p):
        if dtensor.is_dtensor(p):  # the kernels update its local tensor (fastopt/torch/dtensor.py)
            why = dtensor.refusal(self.spec, self.state_dtype, self.stochastic_rounding)
            if why is not None:
                raise TypeError(f"{type(self).__name__} does not take DTensor params (FSDP2's fully_shard, tensor "
                                f"parallelism): {why}")
            dtensor.check_placements(p)
            p = dtensor.local(p)
        self._check_kernel_param(p)
        if p.dtype in COMPLEX and self.spec.norms_per_tensor:
            raise TypeError(f"{type(self).__name__} does not take complex params (its per-tensor norms have no "
                            f"torch.optim definition for them), got a {p.dtype} param of shape {tuple(p.shape)}")
        chosen_state_dtype(self.state_dtype, p.dtype)
        if (self.kahan or self.stochastic_rounding) and p.dtype not in SIXTEEN_BIT:
            option = "kahan=True" if self.kahan else "stochastic_rounding=True"
            raise ValueError(f"{option} is for float16 or bfloat16 params; got a {str(p.dtype).replace('torch.', '')} "
                             f"param of shape {tuple(p.shape)}")

    @staticmethod
    def _check_kernel_param(p):
        if p.requires_grad:  # a frozen wrapper param (a quantized base weight beside adapters) never gets a grad
            check_own_memory(p)
        if p.device.type not in KERNEL_DEVICES:
            raise ValueError(f"fastopt.torch runs on CPU and CUDA tensors, got a param on {p.device}")
        dtypes = kernel_dtypes(p.device.type)
        if p.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"fastopt.torch updates {names} params on {p.device.type.upper()}, got a {p.dtype} "
                            f"param of shape {tuple(p.shape)}")
        if p.layout != torch.strided or dense_span(p.detach()) is None:
            raise ValueError(f"fastopt.torch needs dense params (every element once in one span of memory), "
                             f"got shape {tuple(p.shape)} with strides {p.stride()}")
        if p.dtype == torch.bfloat16:
            numpy_bfloat16()  # the TypeError naming ml_dtypes, at construction rather than at the first step

    # --- pickling, deepcopy --------------------------------------------------------------------------
    def __getstate__(self):
        state = super().__getstate__()
        state["fastopt"] = {"clip_grad_norm": self.clip_grad_norm, "skip_nonfinite": self.skip_nonfinite,
                            "skipped_steps": self.skipped_steps, "state_dtype": self.state_dtype,
                            "kahan": self.kahan, "stochastic_rounding": self.stochastic_rounding, "seed": self.seed,
                            "rounding_steps": self.rounding_steps}
        return state

    def __setstate__(self, state):
        # unpickling passes fastopt's extras; torch's load_state_dict calls this too, with state and
        # param_groups only: the optimizer then keeps its own extras
        current = {k: self.__dict__[k] for k in ("clip_grad_norm", "skip_nonfinite", "skipped_steps", "state_dtype",
                                                 "kahan", "stochastic_rounding", "seed", "rounding_steps")
                   if k in self.__dict__}
        extras = state.pop("fastopt", current)
        super().__setstate__(state)
        for group in self.param_groups:  # torch.optim's __setstate__ fills the flags a saved group lacks (a
            for key, value in self.defaults.items():  # state dict of an older torch): ours and torch's own
                if value is None or isinstance(value, bool):  # (foreach, fused, capturable, differentiable, ...)
                    group.setdefault(key, value)
            group.update(self.spec.torch_group_flags)  # as torch.optim.AdamW's __setstate__ (a loaded Adam dict)
        self.clip_grad_norm, self.skip_nonfinite = arguments.check_extras(extras.get("clip_grad_norm"),
                                                                 extras.get("skip_nonfinite", False))
        self.skipped_steps = extras.get("skipped_steps", 0)
        self.state_dtype, self.kahan = extras.get("state_dtype"), extras.get("kahan", False)
        self.stochastic_rounding, self.seed = extras.get("stochastic_rounding", False), extras.get("seed", 0)
        self.rounding_steps = extras.get("rounding_steps", 0)
        self._fastopt_entries = {}
        self._fastopt_templates = {}
        self._fastopt_warned = set()
        self._fastopt_steady = None
        self._fastopt_constructed = True

    # --- state dicts ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch.optim's state dict; with stochastic rounding on an optimizer torch keeps no step count for
        (SGD), also ROUNDING_STEPS: the count that keys the rounding, so a resumed run rounds as an
        uninterrupted one (torch.optim ignores the key)."""
        sd = super().state_dict()
        if self.stochastic_rounding and not self.spec.torch_step:
            sd[ROUNDING_STEPS] = self.rounding_steps
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's load_state_dict, except that state torch would cast to the param's dtype keeps its
        own where the cast would change it: the uint8 codes and float32 scales of 8-bit state ("<name>" and
        "<name>_absmax", state_dtype="int8") and the float32 state of 16-bit params (torch rounds it to the
        param's dtype). The next step converts what does not fit this optimizer's state dtype: float state
        into 8-bit state is quantized, 8-bit state into float state dequantized. The checks and the kept
        tensors are of the dict torch loads (after the load_state_dict pre-hooks), put back before the
        post-hooks (fastopt.torch.loading)."""
        loading.load_between_hooks(self, lambda: super(TorchOptimizer, self).load_state_dict(state_dict),
                                   self._kept_on_load, self._restore_on_load)

    def _kept_on_load(self, state_dict) -> tuple[list, int | None]:
        """The saved tensors torch's load would cast and this optimizer keeps as saved: (param, key, tensor)
        each; and the saved rounding step count (None in a torch.optim state dict: this optimizer keeps its
        own). Checks the per-param entries first (arguments.check_saved_state)."""
        arguments.check_saved_state(state_dict)
        rounding_steps = None
        if isinstance(state_dict, dict) and ROUNDING_STEPS in state_dict:
            rounding_steps = int(saved_count(state_dict[ROUNDING_STEPS], f"state_dict[{ROUNDING_STEPS!r}]"))
        saved = state_dict.get("state", {}) if isinstance(state_dict, dict) else {}
        keep, extra = [], self.spec.torch_extra_state
        ids = [i for g in state_dict.get("param_groups", []) for i in g.get("params", [])] \
            if isinstance(state_dict, dict) else []
        params = [p for g in self.param_groups for p in g["params"]]
        where = {pid: k for k, pid in enumerate(ids)}
        if isinstance(saved, dict) and len(ids) == len(params):
            for pid, entry in saved.items():
                k = where.get(pid)
                if k is None or not isinstance(entry, dict):
                    continue
                p = params[k]
                for key, v in entry.items():
                    if key == "step" or not isinstance(v, torch.Tensor):
                        continue
                    quantized = isinstance(key, str) and (key.endswith(ABSMAX) and key[:-len(ABSMAX)] in entry or
                                                          key + ABSMAX in entry)
                    # uint8: 8-bit codes, even without their scales (the step then names what is missing); the
                    # carried running values of an optimizer torch has not (schedule-free's float64 lr_max and
                    # weight_sum: torch would round them to the param's dtype, bfloat16 ones the step cannot read)
                    if quantized or v.dtype == torch.uint8 or (p.dtype in SIXTEEN_BIT and v.dtype == torch.float32) \
                            or (key in extra and not self.spec.torch_class):
                        keep.append((p, key, v))
        return keep, rounding_steps

    def _restore_on_load(self, kept) -> None:
        keep, rounding_steps = kept
        for p, key, v in keep:
            if p in self.state and key in self.state[p]:
                self.state[p][key] = v.to(device=p.device)
        for entry in self.state.values():  # torch.optim.SGD's momentum buffer made from sparse grads is sparse
            for key, v in entry.items():
                if isinstance(v, torch.Tensor) and v.is_sparse:
                    entry[key] = v.to_dense()
        if rounding_steps is not None:
            self.rounding_steps = rounding_steps

    def torch_state_dict(self) -> dict:
        """state_dict() as torch.optim's class takes it: 8-bit state ("<name>" codes + "<name>_absmax") as
        float32 tensors of the dequantized values (in the param's shape and layout), and no Kahan
        compensation ("kahan_comp", which torch has no use for); everything else as state_dict() has it.
        The other way needs nothing: a torch.optim state dict loads into an 8-bit optimizer (quantized)."""
        sd = self.state_dict()
        state = {}
        for pid, entry in sd["state"].items():
            out = {}
            for key, v in entry.items():
                if key == KAHAN or (isinstance(key, str) and key.endswith(ABSMAX) and key[:-len(ABSMAX)] in entry):
                    continue
                if isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and key + ABSMAX in entry:
                    flat = not v.is_contiguous()
                    values = QuantizedState(kernel_view(v, flat), entry[key + ABSMAX].detach().cpu().numpy(),
                                            signed_state(self._registry_name(key))).dequantize()
                    v = torch.empty_like(v, dtype=torch.float32)
                    kernel_view(v, flat)[...] = values
                out[key] = v
            state[pid] = out
        return {"state": state, "param_groups": sd["param_groups"]}

    def _registry_name(self, torch_name: str) -> str:
        """The registry name of a state torch names `torch_name` (spec.torch_state_names)."""
        for name, tname in self.spec.torch_state_names.items():
            if tname == torch_name:
                return name
        return torch_name

    # --- the step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One update of every param that has a grad; `closure` re-evaluates the model and returns the
        loss (run with gradients enabled, as in torch.optim)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._fastopt_update()
        return loss

    # torch.compile runs the update as it is (a graph break; a closure passed to step() is traced as usual): it
    # is one fused kernel call per group and dtype already, and dynamo would trace its NumPy views as torch ops
    # (wrong types, a recompile every step)
    @torch.compiler.disable
    def _fastopt_update(self) -> None:
        steady = self._fastopt_steady
        plan = steady.plan(self) if steady is not None else None  # only the grads changed: the short path
        if plan is None:
            self._fastopt_steady = None
            arguments.check_listed_once(self.param_groups)
            try:
                plan = self._plan()
            except (TypeError, ValueError):
                if not self._fastopt_entries:
                    raise
                # the cached views passed only the cheap checks: plan again from scratch; a real error repeats
                self._fastopt_entries.clear()
                self._fastopt_templates.clear()
                plan = self._plan()
        # one thread count for the whole step (the clip/skip norms and the update): as many OpenMP threads as torch
        # uses (torch takes counts past fastopt's cap), for this Python thread's kernels only:
        # fastopt.set_num_threads's count stays as set (another thread may set it). Results do not depend on it.
        previous = cython_backend.override_threads(min(torch.get_num_threads(), cython_backend.MAX_THREADS))
        try:
            grad_scale = self._grad_scale(plan)
            if grad_scale is not False:
                self._run(plan, grad_scale)
        finally:
            cython_backend.override_threads(previous)

    def _warn_once(self, key, message):
        if key not in self._fastopt_warned:
            self._fastopt_warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _plan(self) -> Plan:
        """Every check of this step, nothing written (new state tensors are made, not yet stored)."""
        spec = self.spec
        entries = self._fastopt_entries
        new_state, counted, items = [], [], []
        number = -1
        sharded_plan = False
        for gi, group in enumerate(self.param_groups):
            with naming_group(gi, len(self.param_groups)):
                hp = arguments.registry_hp(spec, group)
            used = tuple(name for name, on in zip(spec.states, spec.active_states(hp)) if on)
            if self.kahan:
                used += (KAHAN,)
            names = tuple(spec.torch_state_names.get(name, name) for name in used)
            for p in group["params"]:
                number += 1
                g = p.grad
                if g is None:
                    continue
                state = self.state.get(p)
                entry = entries.get(id(p))
                # a DTensor: the kernels see its local tensors (lp, g and the state's; fastopt/torch/dtensor.py)
                sharded = dtensor.is_dtensor(p)
                if sharded:
                    lp = dtensor.local(p)
                    valid = isinstance(entry, dtensor.ShardEntry) and entry.valid(p, lp, state, names)
                    entry = entry.entry if valid else None
                    if entry is None:
                        self._check_param(p)
                    dtensor.check_laid_out_as(f"grads[{number}]", g, p)
                    g = dtensor.local(g)
                    sharded_plan = True
                else:
                    lp = p
                    if entry is not None and (isinstance(entry, dtensor.ShardEntry)  # (of a DTensor that had this id)
                                              or not entry.valid(p, state, names)):
                        entry = None
                if entry is not None:
                    gv = entry.cached_grad_view(g)
                    if gv is None:
                        gv, copied = self._grad_view(number, lp, g, entry.flat, entry.layout, hp)
                        # only a view of g's own memory is kept: a copy (sparse made dense, another layout, a
                        # resolved conj/neg bit) is made again each step, or new values in g would not be seen;
                        # a DTensor's local grad is a new view each step
                        if not copied and not sharded:
                            entry.remember_grad(g, gv)
                    count = self._count(entry, state, used, names, counted)
                    items.append([group, p, gv, entry, None, count, number])
                    continue
                # first step of this param, or its storage or state changed: the full checks
                if not sharded:
                    self._check_param(p)
                flat = not lp.is_contiguous()
                gv, _ = self._grad_view(number, lp, g, flat, layout(lp), hp)
                fresh, tensors = {}, []
                for name, tname in zip(used, names):
                    t = state.get(tname) if state else None
                    if sharded and isinstance(t, torch.Tensor):  # (8-bit state is refused for DTensors: _check_param)
                        dtensor.check_laid_out_as(f"state {tname!r} of params[{number}]", t, p)
                    if self._state_dtype_of(name, p) == INT8:  # 8-bit state: (codes, absmax)
                        t = self._int8_state(number, spec, hp, name, tname, p, state, fresh)
                    elif isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and state.get(tname + ABSMAX) is not None:
                        # 8-bit state loaded into an optimizer without state_dtype="int8": dequantized
                        t = fresh[tname] = self._dequantized(number, tname, t, state[tname + ABSMAX], p, name)
                        fresh[tname + ABSMAX] = None  # removed from the state at commit
                    elif not isinstance(t, torch.Tensor):
                        if _must_exist(state, name):
                            raise _restart_refused(state, tname, number, t)
                        if t is not None:  # (SGD's momentum_buffer: None restarts it, as in torch; a list is no buffer)
                            raise TypeError(f"state {tname!r} of params[{number}] is a {type(t).__name__}, not a "
                                            f"tensor (torch.optim fails on it too)")
                        t = fresh[tname] = self._new_state(spec, hp, name, p)
                    elif t.dtype.is_complex != p.dtype.is_complex:  # the kernels would see unlike views
                        raise TypeError(f"state {tname!r} of params[{number}] has dtype {t.dtype}; the state of a "
                                        f"{p.dtype} param is {self._state_dtype_of(name, p)}")
                    elif t.shape == p.shape and (layout(t) != layout(p) or (
                            t.dtype != self._state_dtype_of(name, p) and (t.dtype.is_floating_point or t.dtype.is_complex))):
                        # loaded in another layout, or another dtype (a torch.optim state dict of 16-bit params
                        # keeps 16-bit state; a float32 one into state_dtype="bfloat16"; complex128 state of a
                        # complex64 param): converted into the param's layout and the state dtype (rounded to
                        # nearest even, torch's cast)
                        t = fresh[tname] = torch.empty_like(p, dtype=self._state_dtype_of(name, p)).copy_(t)
                    if sharded:
                        t = dtensor.local(t)
                    tensors.append(t)
                if spec.torch_step and not (state and "step" in state):
                    if state and any(isinstance(state.get(tname), torch.Tensor) for tname in names):
                        raise _restart_refused(state, "step", number, None)  # moments without their count
                    fresh["step"] = None  # made at commit time with its new value
                for name, f in spec.torch_extra_state.items():
                    t = state.get(name) if state else None
                    if isinstance(t, torch.Tensor):
                        continue
                    if arguments.is_real(t):  # a number (an older torch's state dict): kept, as a tensor
                        fresh[name] = torch.tensor(float(t), dtype=_extra_state_dtype(spec))
                    elif _must_exist(state, name):
                        raise _restart_refused(state, name, number, t)
                    else:
                        fresh[name] = torch.tensor(f(hp, 0), dtype=_extra_state_dtype(spec))
                if fresh:
                    new_state.append((p, fresh))
                    count = 0 if "step" in fresh or not spec.torch_step else None
                    entry = None
                    if count is None:
                        counted.append(state["step"])
                    elif not spec.torch_step:
                        count = self._count(None, state, used, names, counted)
                else:
                    entry = ParamEntry(lp, state, names, used, tuple(tensors), tuple(signed_state(n) for n in used))
                    # (a DTensor's entry is over its local tensors, kept with the DTensors that it stands for)
                    entries[id(p)] = dtensor.ShardEntry(p, entry, tuple(state[n] for n in names)) if sharded else entry
                    count = self._count(entry, state, used, names, counted)
                pending = (flat, tuple(tensors), used, lp) if entry is None else None
                items.append([group, p, gv, entry, pending, count, number])
        if len(entries) > number + 1:  # params left the optimizer (groups edited): let their views go
            keep = {id(p) for group in self.param_groups for p in group["params"]}
            for key in [k for k in entries if k not in keep]:
                del entries[key]
        templates = self._fastopt_templates
        if len(templates) > len(self.param_groups):  # a group was removed: its kernel-call lists too
            keep = {id(group) for group in self.param_groups}
            for key in [k for k in templates if k not in keep]:
                del templates[key]
        if counted:  # step counts not known from the last step, read in one go
            values = iter(self._read_counts(counted))
            for item in items:
                if item[5] is None:
                    item[5] = next(values)
        self._read_carried(items, new_state)
        buckets = []
        start = 0
        for group in self.param_groups:  # items are in group order
            stop = start
            while stop < len(items) and items[stop][0] is group:
                stop += 1
            buckets += self._group_buckets(group, items[start:stop])
            start = stop
        plan = Plan(buckets, new_state, sharded=sharded_plan)
        self._prepare(plan)
        return plan

    def _group_buckets(self, group, items) -> list:
        """The kernel calls of one group: one per (dtype, device, step count). When every param has a
        cached entry and the group's params, entries and counts are those of the last step (the steady
        state), the last step's lists are reused and only the grad views are new."""
        signature = tuple((item[3], item[5], item[7], item[2].dtype) for item in items)
        cached = self._fastopt_templates.get(id(group))
        if cached is not None and cached[0] == signature and cached[1] is group:
            out = []
            for template, positions in cached[2]:
                b = copy.copy(template)
                b.grad_views = [items[i][2] for i in positions]
                out.append(b)
            return out
        buckets, positions = {}, {}
        for i, (group_, p, gv, entry, pending, count, number, carried) in enumerate(items):
            # one call per param dtype, device, count, carried state (its values and their dtypes: an equal
            # float32 and float64 mu_product advance each in its own) and grad dtype (a 16-bit param's grad may
            # be float32: the grads of one call share one dtype)
            key = (*(entry.kind if entry is not None else (p.dtype, p.device)), count, carried,
                   tuple(map(type, carried)), gv.dtype)
            b = buckets.get(key)
            if b is None:
                b = buckets[key] = Bucket(group=group, step=count + 1,
                                          carried=dict(zip(self.spec.torch_carry, carried)))
                positions[key] = []
            positions[key].append(i)
            b.numbers.append(number)
            b.params.append(p)
            b.entries.append(entry)
            b.grad_views.append(gv)
            b.written.append(p)
            if entry is not None:
                b.param_views.append(entry.view)
                views, tensors, used = entry.state_views, entry.tensors, entry.used
            else:
                flat, tensors, used, lp = pending
                b.param_views.append(kernel_view(lp, flat))
                views = [state_view(t, flat, signed_state(n)) for t, n in zip(tensors, used)]
            for name, v in zip(used, views):
                b.state_views.setdefault(name, []).append(v)
            b.written += flat_tensors(tensors)
        if all(item[3] is not None for item in items):
            self._fastopt_templates[id(group)] = (signature, group, [(b, positions[k]) for k, b in buckets.items()])
        else:
            self._fastopt_templates.pop(id(group), None)
        return list(buckets.values())

    def _count(self, entry, state, used, names, counted):
        """The param's step count before this step, None when it must be read from its tensor."""
        if not self.spec.torch_step:  # torch keeps no count (SGD): the step that creates the state is the first
            return 1 if state and all(n in state for n in names) else 0
        step_t = state.get("step")
        count = entry.known_count(step_t) if entry is not None else None
        if count is None:
            counted.append(step_t)
        return count

    def _grad_view(self, number, p, g, flat, param_layout, hp):
        """The kernel view of a grad: fast for the usual contiguous grad of a contiguous param (its shape
        and dtype are checked by the backend's prepare); otherwise every check, and a grad in another
        layout than its param is copied into the param's layout (with one warning); a sparse grad made dense
        (_dense_grad). Returns (the view, whether it is of a copy of g rather than of g's memory)."""
        source = g  # every copy below replaces g
        # the backend checks a grad against its param's view; a complex param's view is real, so its grad (and a
        # complex grad) takes the checks below
        if not flat and not g.is_complex() and not p.is_complex():
            try:
                if g.is_contiguous() and not g.requires_grad:
                    return g.numpy(), False  # raises for CUDA, sparse, conjugated... grads: the checks below
            except (RuntimeError, TypeError, ValueError):
                pass
        if g.is_sparse:
            g = self._dense_grad(number, p, g, hp)
            if layout(g) != param_layout:  # (into the param's layout, without the layout warning below)
                g = torch.empty_like(p, dtype=g.dtype).copy_(g)
        self._check_grad(number, p, g)
        g = resolved_grad(g)  # a lazily conjugated or negated grad: its values, not its memory's
        if dense_span(g) is None or layout(g) != param_layout:
            # another layout, or not dense at all (an expanded or sliced grad set by hand or by a hook)
            self._warn_once(("layout", number), (
                f"fastopt.torch: the gradient of param {number} (shape {tuple(p.shape)}) has strides "
                f"{g.stride()}, the param {p.stride()}: it is copied into the param's layout on each "
                f"step (make the gradient's layout match the param's to avoid the copy)"))
            g = torch.empty_like(p, dtype=g.dtype).copy_(g)
        return kernel_view(g, flat), g is not source

    def _dense_grad(self, number, p, g, hp):
        """A sparse COO grad as a dense tensor, for the optimizers torch takes them for (spec.torch_sparse: SGD,
        Adagrad; the values are torch's: an element without a gradient is updated with a zero one, which leaves
        it as torch's sparse update does), with torch's RuntimeError otherwise."""
        spec = self.spec
        if spec.torch_sparse is None:
            raise RuntimeError(spec.torch_sparse_error
                               or f"{spec.torch_class or spec.class_name} does not support sparse gradients")
        refused = spec.torch_sparse(hp, p.is_complex())
        if refused is not None:
            raise RuntimeError(refused)
        if g.layout != torch.sparse_coo or g.shape != p.shape:
            raise ValueError(f"grads[{number}] is a {g.layout} tensor of shape {tuple(g.shape)}; its param has shape "
                             f"{tuple(p.shape)} (sparse gradients: torch.sparse_coo, the param's shape)")
        self._warn_once(("sparse", number), (
            f"fastopt.torch.{type(self).__name__}: the sparse gradient of param {number} (shape {tuple(p.shape)}) is "
            f"made dense for the update, a pass over the whole param and state where torch.optim updates the "
            f"gradient's rows only (same values: the other elements take a zero gradient)"))
        return g.to_dense()

    @staticmethod
    def _check_grad(number, p, g):
        if g.layout != torch.strided:
            raise TypeError(f"grads[{number}]: sparse gradients are not supported by fastopt.torch")
        if g.dtype not in grad_dtypes(p.dtype):
            also = " (or float32)" if p.dtype in SIXTEEN_BIT else ""
            raise TypeError(f"grads[{number}] has dtype {g.dtype} but its param has {p.dtype}{also}")
        if g.shape != p.shape:
            raise ValueError(f"grads[{number}] has shape {tuple(g.shape)} but its param has {tuple(p.shape)}")
        if g.device != p.device:
            raise ValueError(f"grads[{number}] is on {g.device} but its param is on {p.device}")

    def _state_dtype_of(self, name, p) -> torch.dtype:
        """The dtype of the state `name` (registry name) of param p: the compensation has the param's."""
        return p.dtype if name == KAHAN else chosen_state_dtype(self.state_dtype, p.dtype)

    def kernel_states(self, b):
        """(state lists, argument names) of bucket b's kernel call: the registry's plan, and the Kahan
        compensation in its slot (kahan=True)."""
        state_lists, names = self.spec.plan_call(b.hp, b.state_views.get)
        if self.kahan:
            return with_kahan(state_lists, names, b.state_views[KAHAN])
        return state_lists, names

    def _new_state(self, spec, hp, name, p):
        """A new state tensor of p (torch's layout of p, its state dtype), filled as the spec says; for 8-bit
        state the pair (codes: uint8 like p, absmax: float32, one per 256 elements) of the fill quantized."""
        if spec.torch_state_at_init:  # torch fills it from the constructor's arguments, whatever the group says
            hp = arguments.registry_hp(spec, self.defaults)
        fill = spec.state_init(hp).get(name, 0.0)
        dtype = self._state_dtype_of(name, p)
        if dtype == INT8:
            q = QuantizedState.from_float(np.full(min(p.numel(), 1), fill, np.float32), signed_state(name))
            codes = torch.empty_like(p, dtype=torch.uint8, memory_format=torch.preserve_format)
            if codes.numel():
                codes.fill_(int(q.codes[0]))  # one value: every code is the fill's, every block's scale too
            absmax = torch.full((quant_blocks(p.numel()),), float(q.absmax[0]) if q.absmax.size else 0.0,
                                dtype=torch.float32, device=p.device)
            return codes, absmax
        if fill is PARAM:  # schedule-free's z: a copy of the param (the schedulefree package's clone)
            return torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format).copy_(p.detach())
        if fill == 0.0:
            return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if dtype in COMPLEX:  # both reals of each element (torch.optim's complex(fill, fill): Adagrad, Rprop)
            fill = complex(fill, fill)
        return torch.full_like(p, fill, dtype=dtype, memory_format=torch.preserve_format)

    def _int8_state(self, number, spec, hp, name, tname, p, state, fresh):
        """The (codes, absmax) of 8-bit state `name` of p for this step: the state's tensors as they are
        (checked by the backend's prepare: shapes, dtypes, block count), new ones (in `fresh`) for a first
        step, and the float state of a torch.optim state dict (or an optimizer without state_dtype="int8")
        quantized in p's memory order. Codes in another layout than p are requantized in p's order."""
        t = state.get(tname) if state else None
        a = state.get(tname + ABSMAX) if state else None
        if not isinstance(t, torch.Tensor):
            if a is not None:
                raise ValueError(f"state of param {number}: {tname + ABSMAX} without {tname} (the 8-bit codes of the "
                                 f"state)")
            if _must_exist(state, name):
                raise _restart_refused(state, tname, number, t)
            codes, absmax = fresh[tname], fresh[tname + ABSMAX] = self._new_state(spec, hp, name, p)
            return codes, absmax
        if t.dtype == torch.uint8:
            if not isinstance(a, torch.Tensor):
                raise ValueError(f"state of param {number}: {tname} holds 8-bit codes (uint8) but {tname + ABSMAX} "
                                 f"(their float32 scales) is {'missing' if a is None else type(a).__name__}")
            if t.shape != p.shape or layout(t) == layout(p) or p.numel() == 0:
                return t, a  # the backend's checks say what is wrong with it, if anything
            values = self._dequantized(number, tname, t, a, p, name)  # in t's memory order, then p's
        elif t.is_floating_point() and t.shape == p.shape:
            values = t
        else:
            return t, a if isinstance(a, torch.Tensor) else torch.zeros(0)  # the backend's error names it
        # quantized on the host in p's memory order (the NumPy quantizer), then moved to p's device in p's layout
        wide = torch.empty_like(p, dtype=torch.float32, device="cpu").copy_(values)
        flat = not p.is_contiguous()
        q = QuantizedState.from_float(kernel_view(wide, flat), signed_state(name))
        codes = torch.empty_like(p, dtype=torch.uint8, device="cpu")
        kernel_view(codes, flat)[...] = q.codes
        codes, absmax = codes.to(p.device), torch.from_numpy(q.absmax).to(p.device)
        fresh[tname], fresh[tname + ABSMAX] = codes, absmax
        return codes, absmax

    def _dequantized(self, number, tname, codes, absmax, p, name):
        """The float values of 8-bit state (codes in their own memory order), as a tensor like `codes` in
        the dtype p's state takes without state_dtype="int8" (float32 for 8-bit ones)."""
        if codes.shape != p.shape or dense_span(codes) is None:
            raise ValueError(f"state of param {number}: {tname} has shape {tuple(codes.shape)}, expected "
                             f"{tuple(p.shape)}")
        if not (isinstance(absmax, torch.Tensor) and absmax.dtype == torch.float32 and absmax.dim() == 1
                and absmax.numel() == quant_blocks(p.numel())):
            raise ValueError(f"state of param {number}: {tname + ABSMAX} must be a float32 tensor of "
                             f"{quant_blocks(p.numel())} scales (one per 256 elements)")
        flat = not codes.is_contiguous()
        host = codes.detach().cpu()  # dequantized on the host (the NumPy map), in the codes' memory order
        values = QuantizedState(kernel_view(host, flat), absmax.detach().cpu().numpy(), signed_state(name)).dequantize()
        out = torch.empty_like(host, dtype=torch.float32)
        kernel_view(out, flat)[...] = values
        dtype = self._state_dtype_of(name, p)
        return (out if dtype == INT8 else out.to(dtype)).to(codes.device)

    @staticmethod
    def _read_counts(steps) -> list[int]:
        """The step counts (float tensors, torch's layout; plain numbers from old state dicts too)."""
        for t in steps:  # advanced by one after the update: a dtype that cannot count would fail then
            if isinstance(t, torch.Tensor) and (t.dtype == torch.bool or t.dtype.is_complex):
                raise TypeError(f"a step count in the optimizer state has dtype {t.dtype} (a float or integer "
                                f"tensor counts steps)")
        out = []
        for v in TorchOptimizer._read_scalars(steps, "a step count"):
            v = float(v)
            if not (math.isfinite(v) and v >= 0 and v == int(v)):
                raise ValueError(f"Invalid step count in the optimizer state: {v} (a whole number >= 0)")
            out.append(int(v))
        return out

    def _prepare(self, plan: Plan) -> None:
        """The backends' checks of every call, then of the calls against each other."""
        spec = self.spec
        per_backend: dict = {}
        for b in plan.buckets:
            b.hp = arguments.registry_hp(spec, b.group, b.step)
            if b.carried:  # torch's state carried from the last step (spec.torch_carry): read by the scalars
                b.hp.update(b.carried)
            b.backend = backend_for(b.param_views)
            state_lists, names = self.kernel_states(b)
            # the params' numbers in messages; None when they are 0, 1, 2... (the same messages, less work)
            numbers = None if b.numbers[-1] == len(b.numbers) - 1 else b.numbers
            b.prepared = b.backend.prepare((b.param_views, b.grad_views, *state_lists), names, numbers)
            per_backend.setdefault(b.backend, []).append(b.prepared)
        for backend, prepared in per_backend.items():
            if len(prepared) > 1:
                backend.check_disjoint(prepared)

    def _grad_scale(self, plan: Plan):
        """The factor the kernels multiply the grads by (GradScaler's unscale times the clip coefficient),
        or False when the step is skipped (an inf found by GradScaler, or skip_nonfinite)."""
        found_inf = getattr(self, "found_inf", None)   # set by torch.amp.GradScaler.step
        found = found_inf is not None and float(found_inf.sum()) != 0.0
        guarded = self.clip_grad_norm is not None or self.skip_nonfinite
        if found and not (guarded and plan.sharded):
            return False  # GradScaler counts it and lowers its scale; torch.optim takes no step either
        scale = getattr(self, "grad_scale", None)
        inv_scale = 1.0 if scale is None else 1.0 / float(scale)
        if not guarded:
            return inv_scale
        total, local_sums = 0.0, {}
        for b in plan.buckets:
            sq = to_host(b.backend.sumsq_per_tensor(b.grad_views))
            if not plan.sharded:
                total += float(np.sum(sq, dtype=np.float64))
                continue
            for p, value in zip(b.params, sq):
                if dtensor.is_dtensor(p):  # its local piece: summed over the ranks below (fastopt/torch/dtensor.py)
                    key = dtensor.norm_group(p)
                    local_sums[key] = local_sums.get(key, 0.0) + float(value)
                else:
                    total += float(value)
        if local_sums:  # a collective: every rank takes part, an inf found by GradScaler or not (then skipped below)
            total += dtensor.global_sum(local_sums)
        if found:
            return False
        norm = math.sqrt(total) * inv_scale
        if self.skip_nonfinite and not math.isfinite(norm):
            self.skipped_steps += 1
            return False
        if self.clip_grad_norm is None:
            return inv_scale
        # the norm was read back to the host (on a GPU: one synchronisation, only with clipping/skipping)
        return inv_scale * float(clip_coefficient(np.float64(norm), self.clip_grad_norm))

    def _run(self, plan: Plan, grad_scale: float) -> None:
        spec = self.spec
        if len(plan.buckets) > 1:
            # every call's kernel scalars before the first call writes (the backends compute them again):
            # scalars raising for a later call would otherwise leave the earlier calls written
            for b in plan.buckets:
                spec.scalars(b.hp, b.step, 1.0)
        if self.stochastic_rounding:
            self.rounding_steps += 1
        for b in plan.buckets:  # on step()'s thread count
            if self.stochastic_rounding:
                # keyed by (seed, the params' step count), element i of each param; torch keeps no count
                # for SGD: there, the number of steps this optimizer took (rounding_steps)
                key_step = b.step if spec.torch_step else self.rounding_steps
                b.backend.run(b.prepared, spec, b.hp, b.step, grad_scale,
                              stochastic=StochasticRounding(self.seed, key_step))
            else:
                b.backend.run(b.prepared, spec, b.hp, b.step, grad_scale)
        if plan.steady is not None:
            plan.steady.commit(plan)
        else:
            self._commit(plan)
            self._fastopt_steady = None if plan.sharded else Steady.build(self, plan)

    def _commit(self, plan: Plan) -> None:
        """Store new state, advance the step counts and the accumulated torch state, bump versions."""
        spec = self.spec
        made_step = set()
        bucket_of = {id(p): b for b in plan.buckets for p in b.params} if plan.new_state else {}
        for p, fresh in plan.new_state:
            state = self.state[p]
            for name, value in fresh.items():
                if value is None and name != "step":  # the scales of 8-bit state that was dequantized
                    state.pop(name, None)
                    continue
                if name == "step":
                    value = torch.tensor(float(bucket_of[id(p)].step), dtype=scalar_dtype())
                    made_step.add(id(p))
                state[name] = value
        written = []
        for b in plan.buckets:
            written += b.written
        entries = []
        if spec.torch_step:
            advance = []
            for b in plan.buckets:
                for p, entry in zip(b.params, b.entries):
                    if id(p) in made_step:
                        continue
                    state = entry.state if entry is not None else self.state[p]
                    step_t = state["step"]
                    if not isinstance(step_t, torch.Tensor):  # a plain number (an old state dict)
                        state["step"] = torch.tensor(float(b.step), dtype=scalar_dtype())
                        continue
                    if entry is not None:
                        entries.append((entry, step_t, b.step))
                        if entry.write_count(step_t, b.step):
                            written.append(step_t)  # written through NumPy: its version is bumped below
                            continue
                    advance.append(step_t)
            if advance:
                torch._foreach_add_(advance, 1)  # one call, as torch.optim advances its step tensors (an int:
                # a loaded int64 count takes it too, as torch's step_t += 1)
        if spec.torch_extra_state:
            self._advance_extra_state(plan)
        bump_versions(written)
        for entry, step_t, step in entries:
            entry.counted(step_t, step)

    def _advance_extra_state(self, plan: Plan) -> None:
        """Torch-only state (NAdam's mu_product, ASGD's eta and mu) after this step, as torch advances it
        (spec.torch_carry: from this step's hyperparameters and the value before the step)."""
        for b in plan.buckets:
            for name in self.spec.torch_extra_state:
                # through a float64 tensor: a value past the state's float32 range is stored as inf, as
                # torch.as_tensor stores it (and the steady path's NumPy store); fill_ of the Python float
                # raised instead, after the kernels had written the params
                value = torch.tensor(arguments.extra_state_value(self.spec, name, b), dtype=torch.float64)
                for p in b.params:
                    self.state[p][name].fill_(value)

    def _read_carried(self, items, new_state) -> None:
        """Append to each planned item the values of its torch-carried state before this step (a tuple in
        spec.torch_carry's order; () when the optimizer carries none), read in one go."""
        carry = self.spec.torch_carry
        if not carry:
            for item in items:
                item.append(())
            return
        fresh_of = {id(p): fresh for p, fresh in new_state}
        tensors = []
        for item in items:
            p = item[1]
            fresh = fresh_of.get(id(p), {})
            state = self.state.get(p) or {}
            for name in carry:
                t = fresh[name] if name in fresh else state.get(name)
                if not isinstance(t, torch.Tensor):  # changed in the state after a step (a cached param skips _plan's
                    raise _restart_refused(state, name, item[6], t)  # checks): step() plans again, then refuses
                tensors.append(t)
        values = self._read_scalars(tensors, "torch-only state (mu_product, eta, mu)")
        for v in values:
            if not math.isfinite(v):
                raise ValueError(f"Invalid value in the optimizer state: {v} (torch-only state must be finite)")
        k = len(carry)
        for i, item in enumerate(items):
            item.append(tuple(values[i * k:(i + 1) * k]))

    @staticmethod
    def _read_scalars(values, what: str) -> list:
        """One-element tensors (or numbers) as NumPy scalars of their dtype (float32 tensors as float32, other
        tensors and numbers as float64), one call for the usual 0-d float CPU tensors of one dtype: torch
        advances its carried state in the tensor's dtype (NAdam's mu_product *= mu in float32), and so do
        the spec's torch_carry functions given these. TypeError naming `what` for anything else."""
        if values and all(
                isinstance(v, torch.Tensor) and v.device.type == "cpu" and v.dtype == values[0].dtype and v.dim() == 0
                for v in values) and values[0].is_floating_point():
            return list(torch.stack(values).numpy())
        try:  # (float32 and float64 state side by side: a torch state dict's float64 one beside a new float32 one)
            return [(np.float32 if isinstance(v, torch.Tensor) and v.dtype == torch.float32 else np.float64)(
                v.item() if isinstance(v, torch.Tensor) else float(v)) for v in values]
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{what} in the optimizer state is not a number or a one-element tensor") from None


class SharesStateMemory:
    """share_memory() for the classes whose torch class has it (torch.optim.Adagrad, whose state exists from
    the constructor on): every param's state tensors (not its step count) moved to shared memory, for training
    from several processes at once."""

    def share_memory(self) -> None:
        """torch.optim.Adagrad's share_memory(): the state tensors in shared memory (Hogwild training)."""
        for group in self.param_groups:
            for p in group["params"]:
                for key, value in self.state.get(p, {}).items():
                    if key != "step" and isinstance(value, torch.Tensor):
                        value.share_memory_()
