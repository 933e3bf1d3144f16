"""`as_communicator`: the adapter for an engine's communicator (see comm_base for the interface).

One small module per engine: comm_mpi (mpi4py), comm_torch (torch.distributed), comm_nccl (CuPy NCCL).
"""
from __future__ import annotations

import sys

from fastopt.distributed.comm_base import DONE, Communicator, Done

__all__ = ["as_communicator", "Communicator", "Done", "DONE"]


def as_communicator(comm) -> Communicator:
    """The adapter for `comm`: an mpi4py communicator, a torch.distributed ProcessGroup (or the
    torch.distributed module itself: its default group), a CuPy NcclCommunicator, or an adapter.
    The engine's module is only imported when `comm` comes from it (fastopt never imports torch)."""
    if isinstance(comm, Communicator):
        return comm
    module = type(comm).__module__ or ""
    if module.startswith("mpi4py"):
        from fastopt.distributed.comm_mpi import MPICommunicator
        return MPICommunicator(comm)
    if getattr(comm, "__name__", None) == "torch.distributed" or (
            module.startswith("torch") and "torch.distributed" in sys.modules
            and isinstance(comm, sys.modules["torch.distributed"].ProcessGroup)):
        from fastopt.distributed.comm_torch import TorchCommunicator
        return TorchCommunicator(None if getattr(comm, "__name__", None) == "torch.distributed" else comm)
    dist = sys.modules.get("torch.distributed")
    if type(comm) is int and comm == getattr(getattr(dist, "GroupMember", None), "NON_GROUP_MEMBER", None):
        raise ValueError("comm: this process is not a member of the process group (torch.distributed.new_group "
                         "gives GroupMember.NON_GROUP_MEMBER on the ranks it leaves out)")
    if "nccl" in module and type(comm).__name__ == "NcclCommunicator":
        from fastopt.distributed.comm_nccl import NcclCommunicator
        return NcclCommunicator(comm)
    raise TypeError(f"comm must be an mpi4py communicator, a torch.distributed process group or a CuPy "
                    f"NcclCommunicator, got {type(comm).__module__}.{type(comm).__name__}")
