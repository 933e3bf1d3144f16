"""fastopt.torch.Muon: a drop-in for torch.optim.Muon running fastopt.muon's implementation.

    from fastopt.torch import Muon          # instead of: from torch.optim import Muon
    opt = Muon([p for p in model.parameters() if p.ndim == 2], lr=0.02, momentum=0.95)

Same constructor (params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn=None), defaults and error
messages as torch ("Muon only supports 2D parameters ...", "Learning rate should be >= 0 but is: ...",
"Adjust learning rate function ... is not supported"). adjust_lr_fn="spectral_unclamped" (lr * sqrt(rows /
cols), torch 2.15's option) is accepted on every torch version, also where torch.optim.Muon lacks it.
Stricter than torch, and at construction as well as at each step: ns_steps must be an int in [0, 100) and
ns_coefficients three finite numbers (torch raises those from inside step(), after updating the params
before), hyperparameters finite. step(closure=None)
reads p.grad and skips params whose grad is None; state ("momentum_buffer", made as torch makes it:
zeros_like(grad)), state_dict(), param groups, hooks and lr schedulers are torch.optim's, so a
torch.optim.Muon state dict loads here and back.

The update (rule, precision: the Newton-Schulz iteration in bfloat16 values with float32 sums as torch on
the CPU; cost model) is fastopt.muon's, run on zero-copy NumPy views of CPU tensors (the tensors' own
strides: a transposed weight is updated in place) and on CuPy views of CUDA tensors (on torch's current
stream; cuBLAS sgemm for the matmuls); autograd's version counters of the params and buffers written are
bumped as torch's in-place ops do. float32, float64 and float16 params, and bfloat16 ones on the CPU (CuPy
has no bfloat16), with the buffer in the param's dtype as torch (see fastopt.muon for torch 2.13's bfloat16
quirks that are not reproduced). Every group's hyperparameters, grads and buffers are checked before anything
is written.
"""
from __future__ import annotations


import numpy as np
import torch

from fastopt import muon as core
from fastopt.arrays import check_disjoint
from fastopt.torch.arrays import array_view, resolved_grad
from fastopt.grad_guard import scaled
from fastopt.torch.composite import CPU, GuardedComposite

_NAME = "fastopt.torch.Muon"  # for messages

__all__ = ["Muon"]

# CuPy has no bfloat16: bfloat16 params on the CPU only
_DTYPES = {"cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
           "cuda": (torch.float32, torch.float64, torch.float16)}


_LR_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


class Muon(GuardedComposite):
    __doc__ = __doc__

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True,
                 ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315), eps: float = 1e-7,
                 ns_steps: int = 5, adjust_lr_fn: str | None = None, *, clip_grad_norm: float | None = None,
                 skip_nonfinite: bool = False) -> None:
        self._init_guard(clip_grad_norm, skip_nonfinite)
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                    "ns_coefficients": ns_coefficients, "eps": eps, "ns_steps": ns_steps,
                    "adjust_lr_fn": adjust_lr_fn}
        core.check_hyperparameters(defaults)  # torch's checks and words first, then fastopt's stricter ones
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter with size: "
                                     f"{p.size()}")
        self._workspace = core.Workspace()

    def __setstate__(self, state):
        super().__setstate__(state)
        self._workspace = core.Workspace()

    def _plan(self):
        """Every check of a step, nothing written: [(param, grad, the grad's array view, hp, buffer or None)]."""
        plan, written, read = [], [], []
        for gi, group in enumerate(self.param_groups):
            try:
                hp = core.check_hyperparameters(group)
            except KeyError as e:
                raise ValueError(f"param group {gi}: {e.args[0]}") from None
            lr = group["lr"]
            if isinstance(lr, torch.Tensor) and lr.dim() == 0 and lr.dtype in _LR_DTYPES:
                hp["lr_dtype"] = _LR_DTYPES[lr.dtype]  # torch then computes the decay and step size in it
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if torch.is_complex(p):
                    raise RuntimeError("Muon does not support complex parameters")
                if g.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
                if p.ndim != 2:
                    raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter with size: "
                                     f"{p.size()}")
                if p.device.type not in _DTYPES:
                    raise TypeError(f"fastopt.torch.Muon runs on CPU and CUDA tensors, got {p.device}")
                if p.dtype not in _DTYPES[p.device.type]:
                    raise TypeError(f"fastopt.torch.Muon updates {', '.join(map(str, _DTYPES[p.device.type]))} "
                                    f"params on {p.device.type}, got {p.dtype}")
                if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
                    raise ValueError(f"a grad ({g.dtype}, {tuple(g.shape)}, {g.device}) does not match its param "
                                     f"({p.dtype}, {tuple(p.shape)}, {p.device})")
                if g.layout != torch.strided:
                    raise RuntimeError("Muon does not support sparse gradients")
                buf = self.state[p].get("momentum_buffer") if p in self.state else None
                if buf is not None and (buf.dtype != p.dtype or buf.shape != p.shape or buf.device != p.device):
                    raise ValueError(f"the momentum_buffer ({buf.dtype}, {tuple(buf.shape)}, {buf.device}) does not "
                                     f"match its param ({p.dtype}, {tuple(p.shape)}, {p.device})")
                grad_view = array_view(resolved_grad(g), _NAME)
                plan.append((p, g, grad_view, hp, buf))
                written += [("a param", array_view(p, _NAME))] + ([] if buf is None else [
                    ("a momentum_buffer", array_view(buf, _NAME))])
                read.append(("a grad", grad_view))
        devices = {p.device.type for p, *_ in plan}
        if len(devices) > 1:
            raise TypeError("fastopt.torch.Muon: params on the CPU and on CUDA in one optimizer")
        # a grad that is (a view of) another param, or params that are views of one tensor: each param is
        # written before the next one's arrays are read
        check_disjoint(written, read)  # no cache: the views are new at every step
        return plan

    def _plan_device(self, plan) -> torch.device:
        return plan[0][0].device if plan else CPU

    def _plan_grads(self, plan) -> list:
        return [grad_view for _, _, grad_view, _, _ in plan]

    def _scaled_plan(self, plan, coef: float):
        return [(p, g, scaled(grad_view, coef), hp, buf) for p, g, grad_view, hp, buf in plan]

    def _apply(self, plan) -> list:
        """One Muon update of every planned param (see the class docstring); returns the tensors written."""
        written = []
        for p, g, grad_view, hp, buf in plan:
            if buf is None:
                buf = torch.zeros_like(g, memory_format=torch.preserve_format)
                self.state[p]["momentum_buffer"] = buf
            core.muon_update(array_view(p, _NAME), grad_view, array_view(buf, _NAME), hp, self._workspace)
            written += (p, buf)
        return written
