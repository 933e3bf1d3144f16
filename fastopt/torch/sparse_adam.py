"""fastopt.torch.SparseAdam: a drop-in for torch.optim.SparseAdam that runs fastopt's row-sparse update
(fastopt.sparse_adam) in place on zero-copy views of the tensors.

    emb = torch.nn.Embedding(100_000, 256, sparse=True)
    opt = fastopt.torch.SparseAdam(emb.parameters(), lr=1e-3)
    loss.backward(); opt.step(); opt.zero_grad()

Same constructor (params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False), defaults and errors as
torch.optim.SparseAdam (lr may be a 1-element tensor; sparse or complex params are refused at construction,
a dense gradient at step() with torch's RuntimeError). step(closure=None) reads p.grad, a sparse COO tensor:
it is coalesced with torch's own grad.coalesce() (repeated indices summed, as torch.optim does), and its
indices()/values() are handed to fastopt.sparse_adam as NumPy views (CPU) or CuPy views (CUDA, on torch's
current stream), together with views of the param and of its exp_avg / exp_avg_sq. The state is torch's:
{"step": int, "exp_avg", "exp_avg_sq"} per param, created on its first gradient; state_dict() /
load_state_dict() are torch.optim.Optimizer's, so a torch.optim.SparseAdam state dict loads here and back.

Differences from torch.optim.SparseAdam. On bad input: every group is checked (dense gradients,
hyperparameters, index ranges) before the first write, where torch raises midway with earlier params (and
their step counts) already updated; a non-finite lr or eps is refused (torch runs with it). A float32 tensor lr
(torch.tensor(0.05)) gives a float32 step size, as in torch; a float16 or bfloat16 one is read as a Python
float (torch computes its step size in 16 bits).

Layouts: a contiguous param is updated in its own storage. A param in another dense layout (a transposed
weight) cannot have its rows gathered through a flat view of its memory, so its param and state are copied
to contiguous tensors, updated there and copied back (a full pass over them; embedding weights, the use of
this optimizer, are contiguous). Autograd's version counters of the param, exp_avg and exp_avg_sq are bumped
once per updated param (not for an empty gradient, like torch).
"""
from __future__ import annotations

import numpy as np
import torch

from fastopt.arrays import check_disjoint, writable_view
from fastopt.sparse_adam import check_calls_disjoint, prepare_step
from fastopt.torch.arrays import on_torch_stream
from fastopt.torch.composite import CPU, GuardedComposite
from fastopt.torch.views import kernel_view

__all__ = ["SparseAdam"]


def _lr_value(lr):
    """A float32 tensor lr (torch.tensor(0.05)) as a NumPy float32: fastopt.sparse_adam then computes the step
    size in float32, as torch does; any other tensor lr as a Python float."""
    if not isinstance(lr, torch.Tensor):
        return lr
    return np.float32(lr.item()) if lr.dtype == torch.float32 else float(lr.item())


class SparseAdam(GuardedComposite):
    """torch.optim.SparseAdam's rule (lazy Adam: only the rows present in the sparse gradient are updated),
    per param with its own step count t:

        g = coalesce(p.grad), negated if maximize
        m[r] += (g - m[r]) * (1 - beta1);   v[r] += (g * g - v[r]) * (1 - beta2)
        p[r] -= lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m[r] / (sqrt(v[r]) + eps)

    See the module docstring for how it runs and where it differs on bad input.
    """

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, maximize: bool = False, *, clip_grad_norm: float | None = None,
                 skip_nonfinite: bool = False) -> None:
        self._init_guard(clip_grad_norm, skip_nonfinite)
        # torch's checks, order and messages (torch/optim/sparse_adam.py)
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 < lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 < eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "maximize": maximize}
        super().__init__(params, defaults)
        sparse_params, complex_params = [], []
        for index, group in enumerate(self.param_groups):
            for d_index, p in enumerate(group["params"]):
                if p.is_sparse:
                    sparse_params.append([index, d_index])
                if p.is_complex():
                    complex_params.append([index, d_index])
        if sparse_params:
            raise ValueError(f"Sparse params at indices {sparse_params}: SparseAdam requires dense parameter tensors")
        if complex_params:
            raise ValueError(
                f"Complex params at indices {complex_params}: SparseAdam does not support complex parameters")

    def _plan(self):
        """Phase 1 of a step (every param whose grad, a sparse COO tensor, is not None): check every group and
        coalesce every gradient, writing nothing; the kernels' calls prepared."""
        calls, new_states, counted, copies, updated = [], [], [], [], []
        # (number, param, exp_avg, exp_avg_sq, coalesced grad) of every param stepped: with a strided tensor
        # among them, their own memory is checked too (the calls see its contiguous copy, which shares nothing);
        # names are made only then, off the usual path
        own = []
        flat = 0  # the params' numbers across groups in messages (as the state dict numbers them)
        device = CPU  # a CUDA param's device: the CuPy work runs on torch's current stream there
        for group in self.param_groups:
            params, grads, ms, vs, steps, tensors, numbers = [], [], [], [], [], [], []
            for j, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("SparseAdam does not support dense gradients, please consider Adam instead")
                state = self.state.get(p)  # get: self.state is a defaultdict, and a failed step adds nothing
                if not state:  # torch's state, created when the step goes ahead
                    state = {"step": 0,
                             "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                             "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                    new_states.append((p, state))
                missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in state]
                if missing:
                    raise ValueError(f"the state of a param with a grad has no {missing[0]!r} (a damaged state dict)")
                count = int(state["step"]) + 1
                counted.append((p, state, count))
                g = p.grad.coalesce()  # torch's summation of repeated indices; itself when already coalesced
                m, v = state["exp_avg"], state["exp_avg_sq"]
                pd = p.detach()
                nnz = int(g.indices().shape[1])
                own.append((flat + j, pd, m, v, g))
                if not (pd.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
                    work = (pd.contiguous(), m.contiguous(), v.contiguous())
                    if nnz:  # copied back after the update, through views (no extra version bump)
                        copies.append(((pd, m, v), work))
                    pd, m, v = work
                params.append(kernel_view(pd, False))
                ms.append(kernel_view(m, False))
                vs.append(kernel_view(v, False))
                grads.append((kernel_view(g.indices(), False), kernel_view(g.values(), False)))
                steps.append(count)
                tensors.append((p, state, nnz))
                numbers.append(flat + j)
            flat += len(group["params"])
            if not params:
                continue
            beta1, beta2 = group["betas"]
            if not isinstance(params[0], np.ndarray):
                device = tensors[0][0].device
            with on_torch_stream(device):
                calls.append(prepare_step(params, grads, ms, vs, step=steps, lr=_lr_value(group["lr"]),
                                          beta1=beta1, beta2=beta2, eps=group["eps"],
                                          maximize=group.get("maximize", False), param_numbers=numbers))
            updated.extend((p, state) for p, state, nnz in tensors if nnz > 0)
        check_calls_disjoint(calls)
        if copies:
            check_disjoint([(f"{name}params[{number}]", kernel_view(t, False)) for number, *tensors, _ in own
                            for name, t in zip(("", "exp_avg of ", "exp_avg_sq of "), tensors)],
                           [(f"grad values of params[{number}]", kernel_view(g.values(), False))
                            for number, *_, g in own])
        return calls, new_states, counted, copies, updated, device

    def _plan_device(self, plan) -> torch.device:
        return plan[-1]

    def _plan_sum_sq(self, plan) -> float:
        return sum(call.sum_of_squares() for call in plan[0])

    def _scaled_plan(self, plan, coef: float):
        calls, *rest = plan
        return ([call.scaled(coef) for call in calls], *rest)

    def _apply(self, plan) -> list:
        """Phase 2 of a step: the writes; returns the tensors written."""
        calls, new_states, counted, copies, updated, _ = plan
        for p, state in new_states:
            self.state[p] = state
        for call in calls:
            call.run()
        for originals, work in copies:
            for dst, src in zip(originals, work):  # NumPy / CuPy views: no version bump of their own
                view = writable_view(kernel_view(dst, False), "param")
                view[...] = writable_view(kernel_view(src, False), "param")
        for p, state, count in counted:
            state["step"] = count
        return [t for p, state in updated for t in (p, state["exp_avg"], state["exp_avg_sq"])]
