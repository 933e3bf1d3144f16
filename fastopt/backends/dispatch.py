"""Which backend updates a given set of arrays.

- numpy.ndarray, and any object exposing its memory through the buffer protocol,
  __array_interface__ or CPU DLPack (e.g. a torch CPU tensor)  -> "cython" (or "numpy")
- cupy.ndarray, and any object exposing __cuda_array_interface__ (e.g. a torch CUDA tensor) -> "cupy"
- Numba CUDA device arrays -> "numba"

The choice can be forced per call (backend=), per block (use_backend) or by FASTOPT_BACKEND. A block or
environment choice applies to the arrays it can handle (a GPU backend name leaves host arrays on the
CPU default, and the other way round); a per-call backend= that cannot handle the arrays is an error.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import warnings

import numpy as np

from fastopt.arrays import array_device

HOST_BACKENDS = ("cython", "numpy")
DEVICE_BACKENDS = ("cupy", "numba")
BACKENDS = HOST_BACKENDS + DEVICE_BACKENDS

_forced: contextvars.ContextVar = contextvars.ContextVar("fastopt_backend", default=None)
_loaded: dict = {}
_warned_fallback = False


def check_backend_name(name):
    """The name of a backend, or ValueError listing the valid ones."""
    if name not in BACKENDS:
        raise ValueError(f"Invalid backend: {name!r} (choose from {', '.join(BACKENDS)})")
    return name


def forced_backend():
    """The backend name of the innermost use_backend block, None outside one (the same object until a
    block is entered or left: callers cache on its identity)."""
    return _forced.get()


@contextlib.contextmanager
def use_backend(name: str):
    """Within the block, update arrays with backend `name` where it can handle them."""
    token = _forced.set(check_backend_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


def _module(name):
    mod = _loaded.get(name)
    if mod is None:
        mod = importlib.import_module(f"fastopt.backends.{name}_backend")
        _loaded[name] = mod
    return mod


def cython_available() -> bool:
    return _module("cython").AVAILABLE



def _first_array(params, name="params"):
    if isinstance(params, (list, tuple)):
        if not len(params):
            return None
        if params[0] is None:
            raise TypeError(f"{name}[0] must be an array, got None")
        return params[0]
    if params is None:
        raise TypeError(f"{name} must be an array or a list of arrays, got None")
    return params


def check_empty_call(arrays, names):
    """A call with an empty list of params updates nothing; every other argument must be an empty
    list too (an array, None or a longer list there is a mistake worth reporting)."""
    for k in range(1, len(arrays)):
        entry = arrays[k]
        if entry is None and k >= 2:  # an unused state slot
            continue
        if not isinstance(entry, (list, tuple)):
            raise TypeError(f"{names[k]} must be a list of arrays, like {names[0]}; got {type(entry).__name__}")
        if len(entry):
            raise ValueError(f"{names[k]} has {len(entry)} arrays but {names[0]} has 0")


def backend_for(params, backend=None, name="params"):
    """The backend module for `params` (one array or a list); None for an empty list (after checking
    a forced backend's name)."""
    first = _first_array(params, name)
    if first is None:
        if backend is not None:
            check_backend_name(backend)
        return None
    if backend is None and type(first) is np.ndarray and _forced.get() is None and \
            "FASTOPT_BACKEND" not in os.environ and _cython.AVAILABLE:
        return _cython  # the common case, without the general resolution below (it runs every step)
    device = array_device(first, f"{name}[0]" if isinstance(params, (list, tuple)) else name)
    if backend is not None:
        check_backend_name(backend)
        if (backend in HOST_BACKENDS) != (device == "host"):
            raise ValueError(f"backend {backend!r} cannot update {type(first).__module__}.{type(first).__name__} "
                             f"arrays ({device} memory)")
        name = backend
    else:
        name = _forced.get() or os.environ.get("FASTOPT_BACKEND") or None
        if name is not None:
            check_backend_name(name)
            if (name in HOST_BACKENDS) != (device == "host"):
                name = None
        if name is None:
            if device == "host":
                name = "cython"
            else:
                name = "numba" if type(first).__module__.startswith("numba") else "cupy"
    if name == "cython" and not cython_available():
        _warn_fallback()
        name = "numpy"
    return _module(name)


def _warn_fallback():
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        reason = getattr(_module("cython"), "IMPORT_ERROR", None)
        if reason is None:  # no import failed (AVAILABLE was switched off): no reason to give
            warnings.warn("fastopt: the compiled CPU extension is not available (build it with `pip install .`); "
                          "using the much slower NumPy reference", RuntimeWarning, stacklevel=4)
        else:
            warnings.warn(f"fastopt: the compiled CPU extension failed to load ({reason}); using the much slower "
                          "NumPy reference (rebuild it with `pip install .`)", RuntimeWarning, stacklevel=4)


_cython = _module("cython")
