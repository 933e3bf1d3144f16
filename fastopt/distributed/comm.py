"""The communicator interface the sharded optimizer is written against, and `as_communicator`.

fastopt writes no collective itself: each adapter (one small module per engine) maps these few calls
onto the engine's own collectives.

    rank, size                   this process's rank and the world size
    alloc(n, dtype)              (native, view): a zero-filled flat buffer in the engine's own type (NumPy
                                 for MPI, a torch tensor, a CuPy array) and an array view of the same memory
                                 (NumPy or CuPy) that fastopt's kernels update
    as_array(x, name)            the array view (NumPy or CuPy) of a user's param or gradient, sharing memory;
                                 TypeError for anything the engine does not carry
    native_view(native, lo, hi, shape)   a slice of a native buffer, shaped (what opt.params returns)
    reduce_scatter(send, recv)   recv = this rank's block of the elementwise SUM of every rank's send
                                 (len(send) == size * len(recv)); returns a Request (wait())
    all_gather(flat, block)      in place: every rank's block [r * block, (r + 1) * block) of flat is
                                 replaced by rank r's; returns a Request
    all_reduce_sum(values)       a small float64 NumPy vector summed over ranks (blocking; on the host)
    timeout                      the engine's timeout in seconds (None: none; see the adapter's notes)

A Request is finished by wait(); adapters without non-blocking collectives return one already done.
"""
from __future__ import annotations

import sys

import numpy as np


class Done:
    """A request that is already complete (blocking engines)."""

    __slots__ = ()

    def wait(self) -> None:
        return None


DONE = Done()


class Communicator:
    """Base class of the adapters (see the module docstring for the contract)."""

    engine = "?"
    rank: int = 0
    size: int = 1
    timeout: float | None = None

    def alloc(self, n: int, dtype):  # pragma: no cover - every adapter defines it
        raise NotImplementedError

    def as_array(self, x, name: str):  # pragma: no cover
        raise NotImplementedError

    def native_view(self, native, lo: int, hi: int, shape):
        return native[lo:hi].reshape(shape)

    def reduce_scatter(self, send, recv):  # pragma: no cover
        raise NotImplementedError

    def all_gather(self, flat, block: int):  # pragma: no cover
        raise NotImplementedError

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self):
        return f"<fastopt.distributed {self.engine} communicator rank {self.rank} of {self.size}>"


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
    if "nccl" in module and type(comm).__name__ == "NcclCommunicator":
        from fastopt.distributed.comm_nccl import NcclCommunicator
        return NcclCommunicator(comm)
    raise TypeError(f"comm must be an mpi4py communicator, a torch.distributed process group or a CuPy "
                    f"NcclCommunicator, got {type(comm).__module__}.{type(comm).__name__}")
