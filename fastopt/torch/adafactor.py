"""fastopt.torch.Adafactor: a drop-in for torch.optim.Adafactor running fastopt's blocked implementation.

    from fastopt.torch import Adafactor      # instead of: from torch.optim import Adafactor
    opt = Adafactor(model.parameters(), lr=1e-2)

Same constructor (params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0, *,
foreach=None, maximize=False), defaults and error messages as torch (foreach is accepted and ignored;
non-finite hyperparameters are refused as well). step(closure=None) reads p.grad and skips params whose
grad is None; state (torch's "step" float32 tensor, "row_var"/"col_var" or "variance"), state_dict(),
param groups, hooks and lr schedulers are torch.optim's, so a torch.optim.Adafactor state dict loads here
and back. The update rule and its cost model are fastopt.adafactor's.

The update runs on zero-copy NumPy views of CPU tensors (the param's own strides: a transposed weight or a
channels_last conv weight is updated in place, its rows and columns as torch's) and on CuPy views of
CUDA tensors (on torch's current stream); autograd's version counters of the params and state written are
bumped as torch's in-place ops do. float32 and float64 params, and 16-bit ones (float16; bfloat16 on the
CPU: CuPy has no bfloat16) with float32 math and float32 state, the param stored rounded to nearest even
(README "Precision"; torch.optim.Adafactor keeps 16-bit state and rounds every intermediate, so the two
differ by a few 16-bit ulps): "row_var"/"col_var"/"variance" are float32 tensors for a 16-bit param, and a
torch.optim state dict (16-bit state) loads widened to float32. Every group's hyperparameters,
grads and state are checked before anything is written. AMP: as torch's Adafactor, this class does not
unscale inside step (GradScaler unscales the grads first).
"""
from __future__ import annotations


import numpy as np
import torch

from fastopt import adafactor as core
from fastopt.arrays import check_disjoint
from fastopt.torch.arrays import array_view, resolved_grad
from fastopt.grad_guard import scaled
from fastopt.torch.composite import CPU, GuardedComposite
from fastopt.torch.loading import load_between_hooks

_NAME = "fastopt.torch.Adafactor"  # for messages

__all__ = ["Adafactor"]

# CuPy has no bfloat16: bfloat16 params on the CPU only
_DTYPES = {"cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
           "cuda": (torch.float32, torch.float64, torch.float16)}
_16BIT = (torch.float16, torch.bfloat16)


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    """float32 state for a 16-bit param (fastopt.adafactor.state_dtype), else the param's dtype."""
    return torch.float32 if p.dtype in _16BIT else p.dtype


_LR_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


def _host_hyperparameters(group) -> dict:
    """The group's hyperparameters with a 1-element Tensor lr read as a float (torch's _to_scalar), and its
    dtype under "lr_dtype" for a 0-d float32/float64 one: torch then computes the step size in that dtype
    (another lr tensor is read as its float value)."""
    values = {k: group[k] for k in ("lr", "beta2_decay", "eps", "d", "weight_decay", "maximize")}
    lr = values["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        values["lr"] = lr.item()
        if lr.dim() == 0 and lr.dtype in _LR_DTYPES:
            values["lr_dtype"] = _LR_DTYPES[lr.dtype]
    return values


def _checked(group) -> dict:
    values = _host_hyperparameters(group)
    hp = core.check_hyperparameters(values)
    if "lr_dtype" in values:
        hp["lr_dtype"] = values["lr_dtype"]
    return hp


class Adafactor(GuardedComposite):
    __doc__ = __doc__

    def __init__(self, params, lr: float | torch.Tensor = 1e-2, beta2_decay: float = -0.8,
                 eps: tuple[float | None, float] = (None, 1e-3), d: float = 1.0, weight_decay: float = 0.0, *,
                 foreach: bool | None = None, maximize: bool = False, clip_grad_norm: float | None = None,
                 skip_nonfinite: bool = False) -> None:
        self._init_guard(clip_grad_norm, skip_nonfinite)
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        core.check_hyperparameters(_host_hyperparameters(dict(
            lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay, maximize=maximize)))
        defaults = {"lr": lr, "beta2_decay": beta2_decay, "eps": eps, "d": d, "weight_decay": weight_decay,
                    "foreach": foreach, "maximize": maximize}
        super().__init__(params, defaults)
        self._workspace = core.Workspace()

    def __setstate__(self, state):
        super().__setstate__(state)
        self._workspace = core.Workspace()
        for group in self.param_groups:
            group.setdefault("foreach", None)
            for p in group["params"]:
                p_state = self.state.get(p, [])
                if len(p_state) != 0 and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=torch.float32)

    def load_state_dict(self, state_dict) -> None:
        """torch.optim's load, except that the state of a 16-bit param stays float32 (torch casts floating
        state to the param's dtype, which would round this class's float32 state): the saved tensors are
        copied in float32 (a torch.optim state dict's 16-bit state, widened, exactly), from the dict torch
        loads (after the load_state_dict pre-hooks) and before the post-hooks (fastopt.torch.loading)."""
        load_between_hooks(self, lambda: super(Adafactor, self).load_state_dict(state_dict), lambda loaded: loaded,
                           self._widen_loaded)

    def _widen_loaded(self, state_dict) -> None:
        ids = {saved: p for saved_group, group in zip(state_dict["param_groups"], self.param_groups)
               for saved, p in zip(saved_group["params"], group["params"])}
        for saved, entry in state_dict["state"].items():
            p = ids.get(saved)
            if p is None or p.dtype not in _16BIT:
                continue
            for name in core.state_shapes(p.shape):
                value = entry.get(name)
                if isinstance(value, torch.Tensor):
                    self.state[p][name] = value.detach().to(device=p.device, dtype=torch.float32, copy=True)

    def _view(self, t: torch.Tensor, views: dict):
        """The array view of a param or state tensor, kept from the last step while the tensor keeps its
        storage, shape and strides (`p.data = ...` or a loaded state makes a new one)."""
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        hit = self._views.get(id(t))
        view = hit[2] if hit is not None and hit[0] is t and hit[1] == key else array_view(t, _NAME)
        views[id(t)] = (t, key, view)
        return view

    def _plan(self):
        """Every group's params with a grad, checked; nothing written (no state made yet)."""
        plan, written, read = [], [], []
        views = {}
        if not hasattr(self, "_views"):
            self._views = {}
        for gi, group in enumerate(self.param_groups):
            hp = _checked(group)
            eps1 = None
            for p in group["params"]:
                if p.grad is None:
                    continue
                if torch.is_complex(p):
                    raise RuntimeError("Adafactor does not support complex parameters")
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                if p.dtype not in _DTYPES.get(p.device.type, ()):
                    raise TypeError(f"fastopt.torch.Adafactor takes "
                                    f"{', '.join(map(str, _DTYPES.get(p.device.type, ())))} params on "
                                    f"{p.device.type}, got {p.dtype}")
                g = p.grad
                if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
                    raise ValueError(f"a grad ({g.dtype}, {tuple(g.shape)}, {g.device}) does not match its "
                                     f"param ({p.dtype}, {tuple(p.shape)}, {p.device})")
                pa, ga = self._view(p, views), array_view(resolved_grad(g), _NAME)
                core.check_param(pa, "a param")
                state = self.state.get(p)
                arrays = None
                if state:
                    if "step" not in state or not torch.is_tensor(state["step"]) or state["step"].numel() != 1:
                        raise ValueError(f"param group {gi}: a param's state has no 1-element 'step' tensor")
                    arrays = {}
                    for name in core.state_shapes(p.shape):
                        s = state.get(name)
                        if not isinstance(s, torch.Tensor) or s.device != p.device:
                            raise ValueError(f"param group {gi}: state '{name}' must be a tensor on {p.device}")
                        arrays[name] = self._view(s, views)
                    core.check_state(arrays, pa, f"param group {gi}: state")
                    written += [(f"state '{k}'", a) for k, a in arrays.items()]
                if eps1 is None:
                    eps1 = core.group_eps1(hp, pa.dtype)  # the group's first param with a grad (torch)
                plan.append((p, pa, ga, arrays, hp, eps1))
                written.append(("a param", pa))
                read.append(("a grad", ga))
        self._ranges = check_disjoint(written, read, getattr(self, "_ranges", None))
        self._views = views
        return plan

    def _plan_device(self, plan) -> torch.device:
        return plan[0][0].device if plan else CPU

    def _plan_grads(self, plan) -> list:
        return [ga for _, _, ga, _, _, _ in plan]

    def _scaled_plan(self, plan, coef: float):
        return [(p, pa, scaled(ga, coef), arrays, hp, eps1) for p, pa, ga, arrays, hp, eps1 in plan]

    def _apply(self, plan) -> list:
        """One Adafactor step of the planned params (torch.optim.Adafactor's rule; see fastopt.adafactor)."""
        touched = []
        with core.one_blas_thread_on_host(plan[0][1] if plan else None):
            self._update_all(plan, touched)
        return touched

    def _update_all(self, plan, touched) -> None:
        """Each planned param's state made (torch's, float32 for 16-bit params) and its update; the tensors
        written appended to `touched`."""
        for p, pa, ga, arrays, hp, eps1 in plan:
            state = self.state[p]
            if not state:  # torch's initial state
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                if p.dim() > 1:
                    row_shape, col_shape = list(p.shape), list(p.shape)
                    row_shape[-1] = 1
                    col_shape[-2] = 1
                    state["row_var"] = p.new_zeros(row_shape, dtype=_state_dtype(p))
                    state["col_var"] = p.new_zeros(col_shape, dtype=_state_dtype(p))
                else:
                    state["variance"] = torch.zeros_like(p, memory_format=torch.preserve_format,
                                                         dtype=_state_dtype(p))
                arrays = {name: array_view(state[name], _NAME) for name in core.state_shapes(p.shape)}
            step_t = state["step"]
            step_t += 1
            core.update(pa, ga, arrays, step_t.item(), hp, eps1, self._workspace)
            touched.append(p)
            touched += [state[name] for name in arrays]


_RULE = "\n".join("    " + line for line in core.SPEC.rule.splitlines())
Adafactor.__doc__ += f"\nUpdate rule (per param):\n\n{_RULE}\n"
