"""Several ranks in one process, one thread each (no engine): the collectives of tests/distributed with
a barrier, sums in rank order (exact for the tests' gradients, multiples of 1/8). `run_ranks(world, fn)`
runs fn(comm) on every rank and returns the results in rank order (re-raising the first error)."""
from __future__ import annotations

import threading

import numpy as np

from fastopt.distributed.comm_base import DONE
from tests.distributed.local_comm import LocalCommunicator


class _World:
    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots = [None] * size


class ThreadCommunicator(LocalCommunicator):
    """LocalCommunicator's NumPy buffers and checks, with every collective done across the threads."""
    engine = "threads"

    def __init__(self, world: _World, rank: int):
        self.world, self.rank, self.size = world, rank, world.size

    def _exchange(self, value):
        w = self.world
        w.barrier.wait()
        w.slots[self.rank] = value
        w.barrier.wait()
        out = list(w.slots)
        w.barrier.wait()
        return out

    def reduce_scatter(self, send, recv):
        sends = self._exchange(send.copy())
        n = recv.size
        total = sends[0][self.rank * n:(self.rank + 1) * n].copy()
        for s in sends[1:]:
            total += s[self.rank * n:(self.rank + 1) * n]
        recv[...] = total
        return DONE

    def all_gather(self, flat, block):
        flats = self._exchange(flat[self.rank * block:(self.rank + 1) * block].copy())
        for r, part in enumerate(flats):
            flat[r * block:(r + 1) * block] = part
        return DONE

    def all_reduce_sum(self, values):
        parts = self._exchange(np.array(values, np.float64))
        total = parts[0].copy()
        for p in parts[1:]:
            total += p
        return total


def run_ranks(world: int, fn, communicator=None):
    """communicator(world, rank): the rank's communicator (default ThreadCommunicator)."""
    communicator = ThreadCommunicator if communicator is None else communicator
    w = _World(world)
    results, errors = [None] * world, [None] * world

    def body(rank):
        try:
            results[rank] = fn(communicator(w, rank))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors[rank] = e
            w.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
    if first is None:
        first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results
