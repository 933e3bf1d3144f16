"""A world-1 communicator in the test process (no engine): the collectives of one rank are copies."""
from __future__ import annotations

import numpy as np

from fastopt.distributed import Communicator
from fastopt.distributed.comm_base import DONE


class LocalCommunicator(Communicator):
    engine = "local"
    rank, size = 0, 1

    def alloc(self, n, dtype):
        a = np.zeros(n, np.dtype(dtype))
        return a, a

    def as_array(self, x, name):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name} must be a NumPy array, got {type(x).__name__}")
        return x

    def reduce_scatter(self, send, recv):
        recv[...] = send
        return DONE

    def all_gather(self, flat, block):
        return DONE

    def all_reduce_sum(self, values):
        return np.array(values, np.float64)
