"""One BLAS thread for small matrix products (the composite optimizers' NumPy paths).

    with one_blas_thread():
        ...   # NumPy matmuls here run on one BLAS thread; the previous count is restored after

Small products (Muon's Newton-Schulz iteration on a 128 x 64 matrix: ~20 us per matmul; Adafactor's
row/column sums over cache-sized blocks) take less time than OpenBLAS's hand-off to its threads, which on a
busy machine also wait for a core. Measured with `fastopt train` on digits (800 steps) on the shared 2-core
VM: Muon 13-34 s with BLAS's 2 threads -> 1.1-2.7 s; Adafactor 1.7-2.0 s -> 0.7-0.8 s; params bit for bit
the same (sgemm and sgemv split the output between threads, not the sums; tests/test_muon.py and
tests/test_adafactor.py compare one and two threads bit for bit). The thread count is set through
threadpoolctl (a dependency); should it be missing, BLAS keeps its own count (same results, slower on small
products) and a RuntimeWarning says so once.
The setting is process-wide while the block runs (BLAS has no per-call thread count). Each block puts back
what it changed, from the thread that changed it (NumPy's OpenBLAS 0.3.31 ignores counts set from other
threads once the main thread has set one: a block shared by threads and ended by another than the main thread
would leave BLAS on one thread for good), and keeps a count someone set meanwhile (threadpoolctl, another
library) rather than undoing it. So blocks in two Python threads at once may leave the later one on BLAS's own
count once the earlier ends, and a block in another thread may not change the count at all: the same bits, as
above, only slower.
"""
from __future__ import annotations

import warnings

__all__ = ["one_blas_thread", "blas_controllers"]

_found: list = []  # threadpoolctl's controllers of the loaded BLAS libraries, looked up once


def blas_controllers() -> tuple:
    """threadpoolctl's controllers of the BLAS libraries loaded in this process (empty without threadpoolctl)."""
    if not _found:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            warnings.warn("threadpoolctl is not installed: Muon's and Adafactor's small matrix products run on "
                          "BLAS's own thread count (same results, slower on a busy machine)", RuntimeWarning,
                          stacklevel=2)
            _found.append(())
        else:
            _found.append(tuple(ThreadpoolController().select(user_api="blas").lib_controllers))
    return _found[0]


class _OneBlasThread:
    __slots__ = ("saved",)

    def __enter__(self):
        self.saved = []
        for lib in blas_controllers():
            n = lib.get_num_threads()
            if n != 1:
                lib.set_num_threads(1)
                self.saved.append((lib, n))
        return self

    def __exit__(self, *exc):
        for lib, n in self.saved:
            if lib.get_num_threads() == 1:  # else set by someone during the block: theirs stays
                lib.set_num_threads(n)
        return False


def one_blas_thread():
    """A context in which BLAS runs on one thread (the previous counts restored on exit)."""
    return _OneBlasThread()
