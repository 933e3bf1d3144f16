"""DTensor params (FSDP2's fully_shard, tensor parallelism): the kernels update each rank's local tensor.

An elementwise update of a DTensor is the same update of every rank's local tensor, provided its grad and
every state tensor are DTensors laid out as the param (same device mesh, placements and global shape):
element i of each local tensor is then one and the same element of the global tensor on every rank. So the
registry optimizers whose update reads one element at a time (all but LAMB and LARS, whose per-tensor norms
span every rank's piece) take DTensor params: the state is made as torch.optim makes it (zeros_like of the
param: DTensors, so state_dict() has torch.optim's layout and torch.distributed.checkpoint reshards it), and
each step runs the fused kernels on the local tensors, with no communication. Clipping and skipping read
the global norm: each rank's float64 sums of squares of its local grads (the kernels', as for plain tensors),
summed over the ranks that hold different pieces (per mesh and sharding pattern, an all-reduce of one number
along each mesh dim that shards).
Plain params beside DTensor ones are taken as replicated, the same on every rank, as FSDP2 leaves the params it
does not shard: their squares are counted once.

Refused, with the reason: LAMB and LARS; a Partial placement; 8-bit state (its float32 scales cover blocks of
the local tensor, which no DTensor layout describes) and stochastic rounding (keyed by the element's index,
which would be its index in the local tensor, not the global one); Partial or mismatched grads and state.
"""
from __future__ import annotations

import torch

__all__ = ["is_dtensor", "local", "check_laid_out_as", "check_placements", "refusal", "norm_group", "global_sum",
           "ShardEntry"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_DTENSOR = False  # torch.distributed.tensor.DTensor once looked up (None: torch without torch.distributed)


def _dtensor_class():
    """torch.distributed.tensor.DTensor, imported on first use (None: torch built without torch.distributed)."""
    global _DTENSOR
    if _DTENSOR is False:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:
            DTensor = None
        _DTENSOR = DTensor
    return _DTENSOR


def is_dtensor(t) -> bool:
    """Whether t is a torch.distributed.tensor.DTensor (a plain tensor answers without an import)."""
    if type(t) in _PLAIN or not isinstance(t, torch.Tensor):
        return False
    klass = _dtensor_class()
    return klass is not None and isinstance(t, klass)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's local tensor of DTensor t (its own memory: writes to it are writes to t), outside autograd."""
    if not torch.is_grad_enabled():  # (a step runs without: no context to enter, 2 us per tensor)
        return t.to_local()
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
    mesh = t.device_mesh  # (one mesh object per mesh, as a rule: the identity answers without DeviceMesh.__eq__)
    if (mesh is not p.device_mesh and mesh != p.device_mesh) or t.placements != p.placements or t.shape != p.shape:
        raise ValueError(f"{what} is a DTensor of shape {tuple(t.shape)} with {_layout(t)}; its param has shape "
                         f"{tuple(p.shape)} with {_layout(p)}: fastopt.torch updates each rank's local tensors, "
                         f"which must hold the same elements (redistribute it as the param)")


def refusal(spec, state_dtype, stochastic_rounding: bool) -> str | None:
    """Why an optimizer configured so cannot update DTensor params (None: it can)."""
    if spec.norms_per_tensor:
        return ("its update reads per-tensor norms, which span every rank's piece of a DTensor (use torch.optim for "
                "such params)")
    if isinstance(state_dtype, str) and state_dtype == "int8":
        return "state_dtype='int8' keeps scales per block of the local tensor, which no DTensor layout describes"
    if stochastic_rounding:
        return "stochastic rounding is keyed by the element's index, which a rank only knows in its local tensor"
    return None


def check_placements(p) -> None:
    """ValueError for a DTensor param with a Partial placement: its local tensors are addends of its elements, not
    the elements, and an update of each addend is not the update of their sum."""
    if any(pl.is_partial() for pl in p.placements):
        raise ValueError(f"a DTensor param with placements {tuple(p.placements)}: a Partial placement holds addends "
                         f"of the elements (a pending reduction), which an update cannot take one by one; "
                         f"redistribute it to Shard or Replicate")


def norm_group(t) -> tuple:
    """The key under which a DTensor's local sum of squares is added up before the reduction: its mesh and, per
    mesh dim, whether the ranks along it hold different pieces (Shard, and _StridedShard, which FSDP2 makes over
    tensor parallelism and whose is_shard() is False) or the same elements (Replicate; Partial is refused:
    check_placements)."""
    return t.device_mesh, tuple(not p.is_replicate() for p in t.placements)


def global_sum(local_sums: dict) -> float:
    """The sum over every piece of the DTensors of {norm_group: this rank's float64 sum over its local tensors}:
    per group, an all-reduce (sum) over each mesh dim that shards, none over those that replicate. Every rank
    calls it with the same groups in the same order (the params' order) and gets the same value."""
    import torch.distributed as dist
    total = 0.0
    for (mesh, sharded), value in local_sums.items():
        t = torch.tensor([float(value)], dtype=torch.float64, device=mesh.device_type)
        for dim, shards in enumerate(sharded):
            if shards:
                dist.all_reduce(t, group=mesh.get_group(dim))
        total += float(t[0])
    return total


class ShardEntry:
    """A DTensor param's views.ParamEntry (made over its local tensors: the kernel views, the step count) and what
    shows that it still applies on a later step: the same DTensor objects as param and as each state, the same
    local memory of each (the entry's pointers) and the same layout of the param's. Then the step skips the
    checks of the param and its state: the plan of a step costs 18 us per DTensor param instead of 86 (AdamW, 50
    params of 64 x 64, this 2-core CPU)."""

    __slots__ = ("param", "states", "entry")

    def __init__(self, p, entry, states: tuple):
        self.param, self.entry, self.states = p, entry, states

    def valid(self, p, lp, state, names: tuple) -> bool:
        return p is self.param and self.entry.holds(lp, state, names) and all(
            state.get(name) is s and local(s).data_ptr() == ptr
            for name, s, ptr in zip(names, self.states, self.entry.check_ptrs))
