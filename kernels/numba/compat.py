"""numba-cuda on the NumPy in use: one scoped compatibility measure, applied by fastopt's Numba backend
(kernels.py calls prepare_numba_cuda() before it defines a kernel; nothing else in fastopt needs it).

numba-cuda 0.30.x (seen with 0.30.4) registers an overload for `numpy.row_stack` when its array module
(numba.cuda.np.arrayobj) is imported, which happens on the first kernel compile. NumPy 2.5 removed
`row_stack`, so with NumPy >= 2.5 that first compile raises
    AttributeError: module 'numpy' has no attribute 'row_stack'
(numba 0.68's own CPU copy of the module already checks the NumPy version). prepare_numba_cuda() imports
that module once with a stand-in `numpy.row_stack` (NumPy < 2.5's: vstack) present ONLY during the
import, then removes it: NumPy is left exactly as it was (code calling numpy.row_stack still fails as
NumPy 2.5 intends), and numba-cuda keeps an overload of the stand-in that nothing can call. With a NumPy
that has row_stack, nothing is changed. Under the CUDA simulator nothing is compiled, nothing is done.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys

import numpy as np

ARRAY_MODULE = "numba.cuda.np.arrayobj"  # the numba-cuda module that names numpy.row_stack at import


def _row_stack(tup, *, dtype=None, casting="same_kind"):
    """numpy.row_stack as NumPy < 2.5 defined it: an alias of numpy.vstack."""
    return np.vstack(tup, dtype=dtype, casting=casting)


@contextlib.contextmanager
def attribute_while(module, name, value):
    """`module.<name> = value` inside the block when the module lacks `name`, removed on exit; nothing is
    changed when it has it. Yields whether the attribute was added."""
    if hasattr(module, name):
        yield False
        return
    setattr(module, name, value)
    try:
        yield True
    finally:
        if getattr(module, name, None) is value:
            delattr(module, name)


_prepared = False


def prepare_numba_cuda(numpy_module=np, import_module=importlib.import_module) -> None:
    """Import numba-cuda's array module with numpy.row_stack present (see the module docstring); once
    per process. The arguments exist for the tests (a stand-in NumPy and importer)."""
    global _prepared
    if _prepared:
        return
    from numba import config
    if not config.ENABLE_CUDASIM and ARRAY_MODULE not in sys.modules and importlib.util.find_spec(ARRAY_MODULE):
        with attribute_while(numpy_module, "row_stack", _row_stack):
            import_module(ARRAY_MODULE)
    _prepared = True
