"""fastopt.torch.LBFGS: a drop-in for torch.optim.LBFGS that runs fastopt's L-BFGS (fastopt/lbfgs.py) on
zero-copy views of the tensors.

    opt = fastopt.torch.LBFGS(model.parameters(), lr=1, line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss
    opt.step(closure)

Same constructor (signature, defaults, torch's checks: "Invalid learning rate", "Tensor lr must be 1-element",
one param group), same step(closure) (the closure re-evaluates the loss and sets p.grad; it is called under
torch.enable_grad(); a param whose grad is None counts as a zero gradient, a sparse grad is densified, a
complex param is seen through view_as_real), same state under the first param (func_evals, n_iter, d, t,
old_dirs, old_stps, ro, H_diag, prev_flat_grad, prev_loss, al: tensors, 0-d tensors and Python numbers where
torch has them), so that state_dict() is torch's and a torch.optim.LBFGS state dict loads into this class and
back, training continuing identically.

The params are updated in place through NumPy views of CPU tensors (CuPy views of CUDA tensors, on torch's
current stream); each in-place write bumps the params' autograd version counters, as torch's p.add_ and
p.copy_ do. The state's vectors are tensors sharing memory with the arrays the NumPy implementation made;
they are not written in place by a later step (torch copies into prev_flat_grad; here a step makes new
buffers and swaps them in at its end, which is what lets a step that raises restore the params and keep the
state).

maximize=True (keyword-only; torch 2.15's option): the closure's loss and the flat gradient are negated as they
are read, as torch 2.15 does, so the step maximizes f; the state holds -f's values and step() returns the loss
as the closure gave it. Accepted on every torch version; on torch < 2.15, whose LBFGS has no such option, the
param group carries "maximize" only when it is True, so that the groups equal the installed torch's exactly
(torch >= 2.15: always, False by default). load_state_dict checks the loaded groups' hyperparameters as
step() does, before anything changes.

Stricter than torch, before the first closure call of a step and with nothing changed: max_iter, max_eval
and history_size must be ints >= 1 (torch fails mid-step on history_size=0 and does nothing with
max_iter=0), the tolerances finite; a line_search_fn other than None/"strong_wolfe" raises torch's
RuntimeError("only 'strong_wolfe' is supported") at the start of step() (torch raises it after evaluating
the closure once).
"""
from __future__ import annotations

import inspect

import numpy as np
import torch
from torch import Tensor
from torch.nn.parameter import is_lazy

from fastopt.lbfgs import SINGLE_GROUP_MESSAGE, SPEC, STATE_KEYS, ParamVector, check_group, lbfgs_step
from fastopt.specs import as_bool
from fastopt.torch.arrays import array_view, on_torch_stream, resolved_grad
from fastopt.torch.loading import load_between_hooks
from fastopt.torch.views import bump_versions

_NAME = "fastopt.torch.LBFGS"  # for messages

# torch 2.15 added LBFGS(..., *, maximize=False), a group key; earlier torch's groups have no such key
TORCH_HAS_MAXIMIZE = "maximize" in inspect.signature(torch.optim.LBFGS).parameters

__all__ = ["LBFGS"]

_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64,
                 "bfloat16": torch.bfloat16}


def _tensor(a, device) -> Tensor:
    """A tensor over an array's memory (NumPy or CuPy; ml_dtypes' bfloat16 through its bits)."""
    if isinstance(a, np.ndarray):
        if a.dtype.name == "bfloat16":
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)
    return torch.as_tensor(a, device=device)


def _checked_hyperparameters(group: dict) -> dict:
    """check_group of a param group (a tensor lr read as a number, torch's _to_scalar), torch's RuntimeError
    for a bad line_search_fn."""
    values = dict(group)
    if isinstance(values.get("lr"), Tensor):
        values["lr"] = values["lr"].item()
    return check_group(values, line_search_error=RuntimeError)


class LBFGS(torch.optim.Optimizer):
    """L-BFGS, torch.optim.LBFGS's algorithm and interface, run by fastopt (see fastopt/torch/lbfgs.py).

    Args as torch.optim.LBFGS: params, lr=1, max_iter=20, max_eval=None (max_iter * 5 // 4),
    tolerance_grad=1e-7, tolerance_change=1e-9, history_size=100, line_search_fn=None or "strong_wolfe",
    and keyword-only maximize=False (a bool; torch 2.15's option: the loss and the gradient negated, the
    returned loss the closure's). On torch < 2.15 torch.optim.LBFGS itself has no maximize; this class takes
    it there too, and its param group then carries the key only when maximize is True.

    Update rule:

    {rule}
    """

    def __init__(self, params, lr: float | Tensor = 1, max_iter: int = 20, max_eval: int | None = None,
                 tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9, history_size: int = 100,
                 line_search_fn: str | None = None, *, maximize: bool = False) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        defaults = {"lr": lr, "max_iter": max_iter, "max_eval": max_eval, "tolerance_grad": tolerance_grad,
                    "tolerance_change": tolerance_change, "history_size": history_size,
                    "line_search_fn": line_search_fn}
        maximize = as_bool("maximize", maximize)
        if TORCH_HAS_MAXIMIZE or maximize:
            defaults["maximize"] = maximize
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError(SINGLE_GROUP_MESSAGE)
        self._vec = None          # ParamVector over the params' views, while the params keep their storage
        self._vec_key = None
        self._core_of = {}        # id(state tensor) -> (tensor, its array or NumPy scalar)
        self._tensor_of = {}      # id(array or NumPy scalar) -> (it, its tensor)

    @property
    def _params(self) -> list:
        """The params, as torch.optim.LBFGS names them (its state is under the first one: scripts log
        opt.state[opt._params[0]]["n_iter"])."""
        return self.param_groups[0]["params"]

    # --- state dicts -------------------------------------------------------------------------------
    def load_state_dict(self, state_dict) -> None:
        """torch.optim's, after the loaded groups' hyperparameters are checked as step() checks them
        (TypeError / ValueError naming the value, nothing changed), so that a bad value (maximize="yes",
        max_iter=0) does not wait for the next step to fail. Other keys (a user's "name", what lr schedulers
        add) load as in torch. The values checked are those torch loads: after the load_state_dict pre-hooks
        (fastopt.torch.loading)."""
        def check(loaded):
            groups = loaded.get("param_groups") if isinstance(loaded, dict) else None
            for group in groups if isinstance(groups, (list, tuple)) else ():
                if isinstance(group, dict):
                    _checked_hyperparameters(group)

        load_between_hooks(self, lambda: super(LBFGS, self).load_state_dict(state_dict), check)

    # --- views --------------------------------------------------------------------------------------
    def _vector(self, params) -> tuple[ParamVector, list]:
        tensors = [torch.view_as_real(p) if p.is_complex() else p for p in params]
        key = [(p, p.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device) for p, t in zip(params, tensors)]
        if self._vec is not None and len(key) == len(self._vec_key) and all(
                a[0] is b[0] and a[1:] == b[1:] for a, b in zip(key, self._vec_key)):
            return self._vec, tensors
        devices = {t.device for t in tensors}
        if len(devices) != 1:
            raise ValueError(f"LBFGS needs all params on one device, got {sorted(map(str, devices))}")
        for i, t in enumerate(tensors):
            if t.dtype not in _TORCH_DTYPES.values():
                raise TypeError(f"params[{i}] has dtype {t.dtype}: LBFGS takes floating-point (or complex) params")
        if sum(t.numel() for t in tensors) == 0:
            raise ValueError("LBFGS needs at least one param element (every param has size 0)")
        self._vec, self._vec_key = ParamVector([array_view(t, _NAME) for t in tensors]), key
        return self._vec, tensors

    # --- state: torch's tensors <-> the arrays and scalars of fastopt.lbfgs ---------------------------
    def _core_value(self, value, key, vec, device, torch_dtype):
        if isinstance(value, list):
            return [self._core_value(v, f"{key}[{i}]", vec, device, torch_dtype) for i, v in enumerate(value)]
        if not isinstance(value, Tensor):
            return value  # Python numbers and None, as torch keeps them
        known = self._core_of.get(id(value))
        if known is not None and known[0] is value:
            return known[1]
        if value.device != device:
            raise ValueError(f"state {key!r} is on {value.device}, the params on {device}")
        if value.dim() == 0:
            core = np.dtype(vec.dtype).type(value.item())
        else:
            if value.dim() != 1 or value.numel() != vec.n:
                raise ValueError(f"state {key!r} has shape {tuple(value.shape)}, expected ({vec.n},) "
                                 f"(the params' total size)")
            if value.dtype != torch_dtype:
                raise TypeError(f"state {key!r} has dtype {value.dtype}, the params' flat dtype is {torch_dtype}")
            core = array_view(value.contiguous() if not value.is_contiguous() else value, _NAME)
        self._core_of[id(value)] = (value, core)
        return core

    def _torch_value(self, value, device, torch_dtype):
        if isinstance(value, list):
            return [self._torch_value(v, device, torch_dtype) for v in value]
        if value is None or type(value) in (int, float):
            return value
        known = self._tensor_of.get(id(value))
        if known is not None and known[0] is value:
            return known[1]
        if isinstance(value, np.generic):
            out = torch.tensor(float(value), dtype=torch_dtype, device=device)
        else:
            out = _tensor(value, device)
        self._tensor_of[id(value)] = (value, out)
        self._core_of[id(out)] = (out, value)
        return out

    def _remember(self, state):
        """Keep the tensor <-> array pairs of the state as it is now (and only those)."""
        core_of, tensor_of = {}, {}

        def walk(tensor_value):
            if isinstance(tensor_value, list):
                for v in tensor_value:
                    walk(v)
            elif isinstance(tensor_value, Tensor):
                pair = self._core_of.get(id(tensor_value))
                if pair is not None and pair[0] is tensor_value:
                    core_of[id(tensor_value)] = pair
                    tensor_of[id(pair[1])] = (pair[1], tensor_value)
        for v in state.values():
            walk(v)
        self._core_of, self._tensor_of = core_of, tensor_of

    # --- the step -------------------------------------------------------------------------------------
    # torch.compile runs the whole step as it is, closure calls included (torch's LBFGS is not traced either):
    # see TorchOptimizer._fastopt_update
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure):  # type: ignore[override]
        """Perform a single optimization step.

        Args:
            closure (Callable): A closure that reevaluates the model and returns the loss.
        """
        if len(self.param_groups) != 1:
            raise AssertionError(f"Expected exactly one param_group, but got {len(self.param_groups)}")
        closure = torch.enable_grad()(closure)
        group = self.param_groups[0]
        hp = _checked_hyperparameters(group)
        params = group["params"]
        # a lazy module's params get their storage in the model's first forward: then the closure's first
        # call (torch's LBFGS makes it before touching the params) runs before the params' views are made
        first = [closure()] if any(is_lazy(p) for p in params) else []
        vec, tensors = self._vector(params)
        device = tensors[0].device
        torch_dtype = _TORCH_DTYPES[np.dtype(vec.dtype).name]
        state = self.state[params[0]]
        unknown = [k for k in state if k not in STATE_KEYS]
        if unknown:
            raise ValueError(f"LBFGS state has unknown entries {unknown}")
        core_state = {k: self._core_value(v, k, vec, device, torch_dtype) for k, v in state.items()}

        bumped = [vec.writes]

        def bump():
            """Autograd's version of every param bumped once the params were written since the last bump (as
            torch's p.add_/p.copy_ do): a graph that saw the old values raises instead of a wrong gradient."""
            if vec.writes != bumped[0]:
                bump_versions(params)
                bumped[0] = vec.writes

        def evaluate():
            bump()
            loss = first.pop() if first else closure()
            value = float(loss)
            grads = []
            for i, (p, t) in enumerate(zip(params, tensors)):
                g = p.grad
                if g is None:
                    grads.append(None)
                    continue
                if g.is_sparse:
                    g = g.to_dense()
                g = resolved_grad(g)
                if g.is_complex():
                    g = torch.view_as_real(g)
                if g.shape != t.shape or g.dtype != t.dtype or g.device != device:
                    raise ValueError(f"params[{i}].grad has shape {tuple(g.shape)}, dtype {g.dtype} on "
                                     f"{g.device}; its param {tuple(t.shape)}, {t.dtype} on {device}")
                grads.append(array_view(g, _NAME))
            return loss, value, vec.gather(grads)

        try:
            with on_torch_stream(device):
                orig_loss, new = lbfgs_step(vec, evaluate, core_state, hp)
        finally:
            bump()
        for key, value in new.items():
            state[key] = self._torch_value(value, device, torch_dtype)
        self._remember(state)
        return orig_loss


LBFGS.__doc__ = LBFGS.__doc__.replace("    {rule}", "\n".join("        " + line for line in SPEC.rule.splitlines()))
