"""Thread counts across Python threads and processes: cython_backend.thread_count is the calling thread's
alone, and a forked child of a process whose kernels ran on several threads runs its kernels on one (libgomp's
threads do not survive fork: its first parallel region in the child waited for them forever)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

import fastopt
from fastopt.backends import cython_backend

needs_extension = pytest.mark.skipif(not cython_backend.AVAILABLE, reason="the compiled extension is not built")


@needs_extension
def test_thread_count_is_the_calling_threads_alone():
    before = fastopt.get_num_threads()
    seen = {}

    def other():
        seen["other"] = cython_backend.threads_here()

    try:
        with cython_backend.thread_count(3):
            assert cython_backend.threads_here() == 3 and fastopt.get_num_threads() == before
            worker = threading.Thread(target=other)
            worker.start()
            worker.join()
            fastopt.set_num_threads(2)  # the process-wide count changes under the override, which stays
            assert cython_backend.threads_here() == 3
        assert seen["other"] == before and cython_backend.threads_here() == fastopt.get_num_threads() == 2
    finally:
        fastopt.set_num_threads(before)


_FORK = r"""
import os, signal, sys
import numpy as np, fastopt
from fastopt.kernels.cpu import _cpu_fast
fastopt.set_num_threads(2)
n = 1 << 20  # past the one-thread threshold: a parallel region of 2 threads starts OpenMP's pool
p, g = np.linspace(-1, 1, n, dtype=np.float32), np.full(n, 0.5, np.float32)
m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
fastopt.adam_step(p, g, m, v, step=1, lr=1e-3)
want = [a.copy() for a in (p, m, v)]
fastopt.adam_step(*want[:1], g, *want[1:], step=2, lr=1e-3)
pid = os.fork()
if pid == 0:
    signal.alarm(60)  # a hang ends the child, not the test run
    threads = fastopt.get_num_threads()
    fastopt.adam_step(p, g, m, v, step=2, lr=1e-3)
    same = all(a.tobytes() == b.tobytes() for a, b in zip((p, m, v), want))
    os._exit(0 if threads == 1 and same else 3)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status), "parent threads", fastopt.get_num_threads())
"""


@needs_extension
def test_a_forked_child_of_a_multithreaded_parent_steps_on_one_thread():
    from fastopt.kernels.cpu import _cpu_fast
    if not hasattr(os, "fork") or not _cpu_fast.OPENMP:
        pytest.skip("needs fork and an OpenMP build")
    out = subprocess.run([sys.executable, "-c", _FORK], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    # the child finished on one thread with the parent's bits; the parent keeps its own count
    assert out.stdout.split() == ["child", "0", "parent", "threads", "2"], out.stdout + out.stderr


@needs_extension
def test_a_child_of_a_parent_that_never_ran_threads_keeps_its_count():
    from fastopt.kernels.cpu import _cpu_fast
    if not hasattr(os, "fork"):
        pytest.skip("needs fork")
    script = ("import os, fastopt\nfastopt.set_num_threads(2)\npid = os.fork()\n"
              "if pid == 0:\n    os._exit(fastopt.get_num_threads())\n"
              "_, status = os.waitpid(pid, 0)\nprint(os.waitstatus_to_exitcode(status))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == ("2" if _cpu_fast.OPENMP else "1"), out.stdout + out.stderr


_FORK_TORCH = r"""
import os, signal
import torch, fastopt, fastopt.torch as ft
torch.set_num_threads(2)  # torch keeps its count in a forked child: fastopt.torch asks for 2 there too
p = torch.nn.Parameter(torch.linspace(-1, 1, 1 << 20))
p.grad = torch.full((1 << 20,), 0.5)
opt = ft.Adam([p], lr=1e-3)
opt.step(), opt.step()
pid = os.fork()
if pid == 0:
    signal.alarm(60)
    opt.step()
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""


@needs_extension
def test_a_forked_child_steps_a_torch_optimizer_on_one_thread():
    """torch's thread count survives fork, and a fastopt.torch step's override asked the child's kernels for it:
    the child still hung after the first fix."""
    pytest.importorskip("torch")
    from fastopt.kernels.cpu import _cpu_fast
    if not hasattr(os, "fork") or not _cpu_fast.OPENMP:
        pytest.skip("needs fork and an OpenMP build")
    out = subprocess.run([sys.executable, "-c", _FORK_TORCH], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["child", "0"], out.stdout + out.stderr


def test_override_threads_checks_its_range():
    for bad in (-1, cython_backend.MAX_THREADS + 1, 1.5, True):
        with pytest.raises(ValueError, match="Invalid thread override"):
            cython_backend.override_threads(bad)


def _blas_counts():
    from fastopt.blas import blas_controllers
    return [lib.get_num_threads() for lib in blas_controllers()]


def test_one_blas_thread_keeps_a_count_set_during_the_block():
    """A count set inside the block (threadpoolctl, another library) is kept, not undone at the block's end;
    nested blocks and a raising block put the previous count back."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from fastopt.blas import blas_controllers, one_blas_thread
    assert blas_controllers()
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        with one_blas_thread():
            with one_blas_thread():
                assert all(n == 1 for n in _blas_counts())
            assert all(n == 1 for n in _blas_counts())
            threadpoolctl.threadpool_limits(limits=3, user_api="blas")
        assert all(n == 3 for n in _blas_counts())
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        with pytest.raises(RuntimeError, match="inside"):
            with one_blas_thread():
                raise RuntimeError("inside")
        assert all(n == 2 for n in _blas_counts())


_MUON_THREADS = """
import threading, numpy as np, fastopt

def run_big(steps=30):
    rng = np.random.default_rng(0)
    p = rng.standard_normal((128, 257)).astype(np.float32)  # past muon.SINGLE_THREAD_MACS: BLAS's own count
    opt = fastopt.Muon([p], lr=1e-2)
    for _ in range(steps):
        opt.step([rng.standard_normal(p.shape).astype(np.float32)])
    return p

def run_small(stop):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((64, 32)).astype(np.float32)  # small: one BLAS thread (fastopt.blas.one_blas_thread)
    opt = fastopt.Muon([q], lr=1e-2)
    while not stop.is_set():
        opt.step([rng.standard_normal(q.shape).astype(np.float32)])

out, stop = {}, threading.Event()
small = threading.Thread(target=run_small, args=(stop,))
small.start()
big = threading.Thread(target=lambda: out.setdefault("p", run_big()))
big.start()
big.join()
stop.set()
small.join()
print(np.array_equal(out["p"], run_big()))
"""


def test_muon_in_a_thread_gets_the_same_bits_whatever_another_thread_steps():
    """A small Muon in one thread lowered BLAS's process-wide count (fastopt.blas.one_blas_thread) under another
    thread's large Muon, whose sgemm sums depend on the count on some OpenBLAS kernels (3e-5 apart on the AVX2 VM,
    a different amount each run). Both threads are started before the main thread sets any count (a fresh
    process: OpenBLAS then takes counts from any thread)."""
    pytest.importorskip("threadpoolctl")
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", _MUON_THREADS], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["True"], out.stdout + out.stderr
