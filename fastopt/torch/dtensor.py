"""DTensor params (FSDP2's fully_shard, tensor parallelism): the kernels update each rank's local tensor.

An elementwise update of a DTensor is the same update of every rank's local tensor, provided its grad and
every state tensor are DTensors laid out as the param (same device mesh, placements and global shape):
element i of each local tensor is then one and the same element of the global tensor on every rank. So the
registry optimizers whose update reads one element at a time (all but LAMB and LARS, whose per-tensor norms
span every rank's piece) take DTensor params: the state is made as torch.optim makes it (zeros_like of the
param: DTensors, so state_dict() has torch.optim's layout and torch.distributed.checkpoint reshards it), and
each step runs the fused kernels on the local tensors, with no communication. Clipping and skipping read
the global norm of the DTensor grads as torch.nn.utils.clip_grad_norm_ does (get_total_norm: one collective).

Refused, with the reason: LAMB and LARS; 8-bit state (its float32 scales cover blocks of the local tensor, which
no DTensor layout describes) and stochastic rounding (keyed by the element's index, which would be its index in
the local tensor, not the global one); Partial or mismatched grads and state.
"""
from __future__ import annotations

import torch

__all__ = ["is_dtensor", "local", "check_laid_out_as", "refusal", "total_norm"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def is_dtensor(t) -> bool:
    """Whether t is a torch.distributed.tensor.DTensor (a plain tensor answers without an import)."""
    if type(t) in _PLAIN or not isinstance(t, torch.Tensor):
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without torch.distributed
        return False
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's local tensor of DTensor t (its own memory: writes to it are writes to t), outside autograd."""
    with torch.no_grad():
        return t.to_local()


def _layout(t) -> str:
    return f"placements {tuple(t.placements)} on {t.device_mesh}"


def check_laid_out_as(what: str, t, p) -> None:
    """ValueError (TypeError for a plain tensor) unless t is a DTensor with p's mesh, placements and global shape,
    so that its local tensor holds the same elements as p's."""
    if not is_dtensor(t):
        raise TypeError(f"{what} is a {type(t).__name__} but its param a DTensor: a DTensor param's grad and state "
                        f"are DTensors laid out as the param (state saved for DTensor params: torch.distributed."
                        f"checkpoint, or the optimizer's own state_dict() on each rank)")
    if t.device_mesh != p.device_mesh or tuple(t.placements) != tuple(p.placements) or t.shape != p.shape:
        raise ValueError(f"{what} is a DTensor of shape {tuple(t.shape)} with {_layout(t)}; its param has shape "
                         f"{tuple(p.shape)} with {_layout(p)}: fastopt.torch updates each rank's local tensors, "
                         f"which must hold the same elements (redistribute it as the param)")


def refusal(spec, state_dtype, stochastic_rounding: bool) -> str | None:
    """Why an optimizer configured so cannot update DTensor params (None: it can)."""
    if spec.norms_per_tensor:
        return (f"its update reads per-tensor norms, which span every rank's piece of a DTensor; use "
                f"torch.optim or fastopt.distributed.ShardedOptimizer")
    if isinstance(state_dtype, str) and state_dtype == "int8":
        return "state_dtype='int8' keeps scales per block of the local tensor, which no DTensor layout describes"
    if stochastic_rounding:
        return "stochastic rounding is keyed by the element's index, which a rank only knows in its local tensor"
    return None


def total_norm(grads: list) -> float:
    """The 2-norm of the DTensor grads, as torch.nn.utils.clip_grad_norm_ computes it (the ranks' pieces
    reduced over the mesh: every rank gets the same value)."""
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if is_dtensor(norm):
        norm = norm.full_tensor()
    return float(norm)
