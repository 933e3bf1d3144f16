"""The communicator interface the sharded optimizer is written against (the adapters' base class).

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
    start_all_reduce_sum(values) the same, non-blocking where the engine allows: a Request whose wait()
                                 returns the sums
    timeout                      the engine's timeout in seconds (None: none; see the adapter's notes)

A Request is finished by wait(); adapters without non-blocking collectives return one already done.
"""
from __future__ import annotations

import numpy as np


class Done:
    """A request that is already complete (blocking engines)."""

    __slots__ = ()

    def wait(self) -> None:
        return None


DONE = Done()


class Ready:
    """A finished request that carries a result (blocking engines)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def wait(self):
        return self.value


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

    def start_all_reduce_sum(self, values: np.ndarray):
        return Ready(self.all_reduce_sum(values))

    def __repr__(self):
        return f"<fastopt.distributed {self.engine} communicator rank {self.rank} of {self.size}>"
