"""The BLAS thread count for the composite optimizers' NumPy matrix products.

    with one_blas_thread():
        ...   # NumPy matmuls here run on one BLAS thread; the previous count is restored after
    with steady_blas_count():
        ...   # no other Python thread's one_blas_thread block changes the count meanwhile

Small products (Muon's Newton-Schulz iteration on a 128 x 64 matrix: ~20 us per matmul; Adafactor's
row/column sums over cache-sized blocks) take less time than OpenBLAS's hand-off to its threads, which on a
busy machine also wait for a core. Measured with `fastopt train` on digits (800 steps) on the shared 2-core
VM: Muon 13-34 s with BLAS's 2 threads -> 1.1-2.7 s; Adafactor 1.7-2.0 s -> 0.7-0.8 s. Adafactor's results do
not depend on the count (tests/test_adafactor.py: one and two threads bit for bit); Muon's may (OpenBLAS
0.3.31's Haswell sgemm on the AVX2 VM sums some products differently on one and two threads, ~3e-5 apart
after 30 steps of a 128 x 257 param; its AVX-512 kernels did not; tests/test_muon.py compares within 1e-3).
The thread count is set through threadpoolctl (a dependency); should it be missing, BLAS keeps its own count
(slower on small products) and a RuntimeWarning says so once.

BLAS's count is process-wide (no per-call count), so the blocks of all Python threads take one lock: a
one_blas_thread block and a steady_blas_count block (around products whose bits may depend on the count:
Muon's large matrices) run one at a time. So a Muon step gives the same bits whatever other threads'
optimizers do meanwhile (one thread's small Muon lowered the count under another's large one). Each block
puts back what it changed, from the thread that changed it, and keeps a count someone set meanwhile
(threadpoolctl, another library) rather than undoing it. NumPy's OpenBLAS 0.3.31 ignores counts set from
other threads once the main thread has set one: there a block in another thread leaves BLAS on the main
thread's count (Adafactor's bits the same, Muon's those of that count).
"""
from __future__ import annotations

import os
import threading
import warnings

__all__ = ["one_blas_thread", "steady_blas_count", "blas_controllers"]

_found: list = []  # threadpoolctl's controllers of the loaded BLAS libraries, looked up once
_count_lock = threading.RLock()  # held by every block (re-entrant: blocks nest in one thread)


def _new_lock_in_child() -> None:
    """A forked child starts with a free lock: one held by another thread of the parent would never be released
    there (the child has only the forking thread)."""
    global _count_lock
    _count_lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)


def blas_controllers() -> tuple:
    """threadpoolctl's controllers of the BLAS libraries loaded in this process (empty without threadpoolctl)."""
    if not _found:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            warnings.warn("threadpoolctl is not installed: Muon's and Adafactor's small matrix products run on "
                          "BLAS's own thread count (slower on a busy machine; Muon's bits may differ)", RuntimeWarning,
                          stacklevel=2)
            _found.append(())
        else:
            _found.append(tuple(ThreadpoolController().select(user_api="blas").lib_controllers))
    return _found[0]


class _OneBlasThread:
    __slots__ = ("saved",)

    def __enter__(self):
        _count_lock.acquire()
        try:
            self.saved = []
            for lib in blas_controllers():
                n = lib.get_num_threads()
                if n != 1:
                    lib.set_num_threads(1)
                    self.saved.append((lib, n))
        except BaseException:
            _count_lock.release()
            raise
        return self

    def __exit__(self, *exc):
        try:
            for lib, n in self.saved:
                if lib.get_num_threads() == 1:  # else set by someone during the block: theirs stays (a 1 set
                    # meanwhile cannot be told from the block's own and is undone)
                    lib.set_num_threads(n)
        finally:
            _count_lock.release()
        return False


def one_blas_thread():
    """A context in which BLAS runs on one thread (the previous counts restored on exit)."""
    return _OneBlasThread()


def steady_blas_count():
    """A context in which no other Python thread's one_blas_thread block changes BLAS's thread count (for
    products whose bits depend on it); blocks of other threads wait for it to end."""
    return _count_lock  # looked up at the call: a forked child's new lock
