"""mpi4py adapter: NumPy arrays on the host, MPI's own collectives.

reduce_scatter is MPI_Ireduce_scatter_block and all_gather MPI_Iallgather (in place), both
non-blocking (MPI-3), so that the optimizer can update one bucket while the next is in flight; with an
MPI library older than MPI-3 the blocking forms are used (one warning says so). The scalar all-reduce
is a blocking MPI_Allreduce.

Failures: MPI has no timeouts. When a rank dies (killed, or an uncaught exception in a script run as
`python -m mpi4py script.py`, which calls MPI_Abort), the MPI launcher aborts the whole job; a rank
that only raises and exits normally would leave the others waiting in the next collective, which is
why every mismatch fastopt can detect is reported on every rank at the same collective (see
fastopt.distributed.sharded).
"""
from __future__ import annotations

import warnings

import numpy as np

from fastopt.distributed.comm_base import DONE, Communicator


class _Request:
    __slots__ = ("request",)

    def __init__(self, request):
        self.request = request

    def wait(self) -> None:
        self.request.Wait()


class _Result:
    __slots__ = ("request", "out")

    def __init__(self, request, out):
        self.request, self.out = request, out

    def wait(self):
        self.request.Wait()
        return self.out


class MPICommunicator(Communicator):
    engine = "mpi"
    timeout = None  # MPI aborts the job when a rank dies; there is no timeout to set

    def __init__(self, comm):
        from mpi4py import MPI
        self._mpi = MPI
        if comm == MPI.COMM_NULL:
            raise ValueError("comm is MPI.COMM_NULL (this process is not part of the communicator)")
        if comm.Is_inter():
            raise ValueError("comm must be an intra-communicator (an inter-communicator has two groups)")
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self._nonblocking = MPI.Get_version() >= (3, 0)
        if not self._nonblocking:
            warnings.warn(f"MPI {MPI.Get_version()} has no non-blocking collectives (MPI-3): fastopt.distributed "
                          "overlaps no communication with the update", RuntimeWarning, stacklevel=3)

    def alloc(self, n, dtype):
        a = np.zeros(n, np.dtype(dtype))
        return a, a

    def as_array(self, x, name):
        if not isinstance(x, np.ndarray):
            if hasattr(x, "__cuda_array_interface__"):
                raise TypeError(f"{name}: the MPI communicator carries NumPy arrays on the host, got a GPU "
                                f"array ({type(x).__name__}); use a CuPy NcclCommunicator or torch.distributed")
            if hasattr(x, "__array_interface__") or isinstance(x, memoryview):
                return np.asarray(x)
            raise TypeError(f"{name} must be a NumPy array, got {type(x).__name__}")
        return x

    def reduce_scatter(self, send, recv):
        if self._nonblocking:
            return _Request(self.comm.Ireduce_scatter_block(send, recv, op=self._mpi.SUM))
        self.comm.Reduce_scatter_block(send, recv, op=self._mpi.SUM)
        return DONE

    def all_gather(self, flat, block):
        if self._nonblocking:
            return _Request(self.comm.Iallgather(self._mpi.IN_PLACE, flat))
        self.comm.Allgather(self._mpi.IN_PLACE, flat)
        return DONE

    def start_all_reduce_sum(self, values):
        if not self._nonblocking:
            return super().start_all_reduce_sum(values)
        values = np.ascontiguousarray(values, np.float64)
        out = np.empty_like(values)
        return _Result(self.comm.Iallreduce(values, out, op=self._mpi.SUM), out)

    def all_reduce_sum(self, values):
        values = np.ascontiguousarray(values, np.float64)
        out = np.empty_like(values)
        self.comm.Allreduce(values, out, op=self._mpi.SUM)
        return out
