"""numba-cuda 0.30 with NumPy >= 2.5 (no numpy.row_stack): fastopt's Numba backend imports numba-cuda's array
module with a stand-in row_stack present only during that import (kernels/numba/compat.py). Checked with a
stand-in NumPy module (the scoping) and, in child processes, with numpy.row_stack deleted the way NumPy 2.5
removed it: numba-cuda alone fails on its first compile, through fastopt it compiles, and NumPy has no
row_stack afterwards. No GPU needed (compile_ptx)."""
from __future__ import annotations

import os
import subprocess
import sys
import types

import numpy as np
import pytest

pytest.importorskip("numba")

from fastopt.kernels.numba import compat  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_attribute_exists_only_inside_the_block():
    fake_numpy = types.SimpleNamespace(vstack=np.vstack)
    with compat.attribute_while(fake_numpy, "row_stack", compat._row_stack) as added:
        assert added and fake_numpy.row_stack is compat._row_stack
        np.testing.assert_array_equal(fake_numpy.row_stack(([1, 2], [3, 4])), [[1, 2], [3, 4]])
    assert not hasattr(fake_numpy, "row_stack")


def test_an_existing_attribute_is_left_alone():
    own = object()
    fake_numpy = types.SimpleNamespace(row_stack=own)
    with compat.attribute_while(fake_numpy, "row_stack", compat._row_stack) as added:
        assert not added and fake_numpy.row_stack is own
    assert fake_numpy.row_stack is own


def test_removed_even_when_the_import_fails():
    fake_numpy = types.SimpleNamespace()
    with pytest.raises(ImportError):
        with compat.attribute_while(fake_numpy, "row_stack", compat._row_stack):
            raise ImportError("numba-cuda broke")
    assert not hasattr(fake_numpy, "row_stack")


def test_prepare_imports_the_array_module_with_row_stack_present_then_removes_it(monkeypatch):
    fake_numpy = types.SimpleNamespace(vstack=np.vstack)
    seen = []

    def importer(name):
        seen.append((name, getattr(fake_numpy, "row_stack", None)))

    monkeypatch.setattr(compat, "_prepared", False)
    monkeypatch.delitem(sys.modules, compat.ARRAY_MODULE, raising=False)
    compat.prepare_numba_cuda(fake_numpy, importer)
    assert seen == [(compat.ARRAY_MODULE, compat._row_stack)]
    assert not hasattr(fake_numpy, "row_stack")
    compat.prepare_numba_cuda(fake_numpy, importer)  # once per process
    assert len(seen) == 1


_CHILD = r"""
import sys
import numpy
if hasattr(numpy, "row_stack"):  # NumPy 2.5 removed it, from __all__ too (which scipy, imported by numba-cuda,
    del numpy.row_stack  # copies); an older NumPy here plays the part
if "row_stack" in numpy.__all__:
    numpy.__all__.remove("row_stack")
from numba import cuda
import numba.cuda.dispatcher as dispatcher
if not cuda.is_available():
    class StandIn:  # compile_ptx asks the current device for its compute capability (tests/gpu/ptx_checks.py)
        compute_capability = (8, 0)
    dispatcher.get_current_device = lambda: StandIn()
from numba import float32, int64, uint8, types
if sys.argv[1] == "fastopt":
    from fastopt.kernels.numba import kernels as nk
    kernel = nk.build(numpy.dtype(numpy.float32), 256, 4096)["clamp"].py_func
    argtypes = (float32[::1], int64[:, ::1], int64[:, ::1], float32)
else:
    def kernel(x):
        x[0] = 1.0
    argtypes = (float32[::1],)
try:
    ptx, _ = cuda.compile_ptx(kernel, argtypes, cc=(8, 0))
except Exception as e:
    print(f"COMPILE FAILED {type(e).__name__}: {e}")
    sys.exit(3)
print("COMPILED", "row_stack after:", hasattr(numpy, "row_stack"))
"""


def _child(mode):
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode], cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    if "NVVM" in out and "COMPILED" not in out and "row_stack" not in out:
        pytest.skip("libNVVM not found: pip install nvidia-cuda-nvcc-cu12")
    return proc.returncode, out


def test_without_the_measure_numba_cuda_fails_on_numpy_without_row_stack():
    """The control: if this starts compiling, numba-cuda no longer needs the measure (compat.py says
    which versions did)."""
    rc, out = _child("plain")
    assert rc == 3 and "row_stack" in out, out[-3000:]


def test_fastopt_kernels_compile_on_numpy_without_row_stack_and_leave_it_absent():
    rc, out = _child("fastopt")
    assert rc == 0 and "COMPILED row_stack after: False" in out, out[-3000:]
