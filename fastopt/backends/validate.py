"""Array checks for the backends written in Python (numpy, cupy, numba); the Cython backend runs the
same checks, with the same messages, in compiled code (kernels/cpu/_cpu_fast.pyx). Every check runs
before the first write, so an error leaves every array unchanged."""
from __future__ import annotations

import numbers

import numpy as np

from fastopt.backends.dispatch import as_numpy

HOST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class HostArrays:
    """How the checks look at host arrays: converted to NumPy (zero copy); the GPU backends pass their
    own class with the same members (fastopt/backends/device_arrays.py)."""

    dtypes = HOST_DTYPES
    where = "on the CPU"

    @staticmethod
    def convert(obj, name):
        return as_numpy(obj, name)

    @staticmethod
    def pointer(a):
        return a.__array_interface__["data"][0]

    @staticmethod
    def c_contiguous(a):
        return a.flags.c_contiguous

    @staticmethod
    def writeable(a):
        return a.flags.writeable

    @staticmethod
    def state_dtype(param_dtype):
        """The dtype a state array of a `param_dtype` param must have."""
        return param_dtype


def _label(names, k, i, is_list):
    return f"{names[k]}[{i}]" if is_list else names[k]


def validate_arrays(arrays, names, api=HostArrays, read_only_slot=1):
    """arrays = (params, grads, state0, ...), each one array or a list (None: unused state slot).
    Returns the same tuple with every entry as a list of backend arrays (None kept).
    Entry read_only_slot is only read (grads of an update: 1); -1 when every entry is written."""
    first = arrays[0]
    is_list = isinstance(first, (list, tuple))
    lists = []
    for k, entry in enumerate(arrays):
        if entry is None:
            lists.append(None)
            continue
        if isinstance(entry, (list, tuple)) != is_list:
            raise TypeError(f"{names[k]} must be {'a list of arrays' if is_list else 'one array'}, like {names[0]}; "
                            f"got {type(entry).__name__}")
        if is_list:
            if len(entry) != len(first):
                raise ValueError(f"{names[k]} has {len(entry)} arrays but {names[0]} has {len(first)}")
            lists.append(list(entry))
        else:
            lists.append([entry])
    n = len(lists[0])
    ref_dtype = None
    spans = []
    for i in range(n):
        p = None
        for k, lst in enumerate(lists):
            if lst is None:
                continue
            label = _label(names, k, i, is_list)
            a = api.convert(lst[i], label)
            lst[i] = a
            if k == 0:
                p = a
                if a.dtype not in api.dtypes:
                    raise TypeError(f"{label} has dtype {a.dtype}; fastopt updates "
                                    f"{' or '.join(str(d) for d in api.dtypes)} arrays {api.where}")
                if ref_dtype is None:
                    ref_dtype = a.dtype
                elif a.dtype != ref_dtype:
                    raise TypeError(f"{label} has dtype {a.dtype} but {names[0]}[0] has {ref_dtype}: one call "
                                    f"updates one dtype (group the arrays by dtype)")
            else:
                expected = p.dtype if k == 1 else api.state_dtype(p.dtype)
                if a.dtype != expected:
                    why = (f"the dtype of {_label(names, 0, i, is_list)}" if expected == p.dtype else
                           f"{p.dtype} params keep {expected} state; see fastopt.init_state")
                    raise TypeError(f"{label} has dtype {a.dtype}, expected {expected} ({why})")
                if tuple(a.shape) != tuple(p.shape):
                    raise ValueError(f"{label} has shape {tuple(a.shape)}, expected {tuple(p.shape)} "
                                     f"(the shape of {_label(names, 0, i, is_list)})")
            if not api.c_contiguous(a):
                raise ValueError(f"{label} is not C-contiguous")
            written = k != read_only_slot
            if written and not api.writeable(a):
                raise ValueError(f"{label} is read-only")
            if a.size:
                start = api.pointer(a)
                spans.append((start, start + a.nbytes, written, k, i))
    _check_disjoint(spans, names, is_list)
    return tuple(lists)


def _check_disjoint(spans, names, is_list):
    """No array may share memory with an array that is written (grads may share with each other)."""
    spans.sort(key=lambda s: s[0])
    max_end_any = max_end_written = 0
    for j, (start, end, written, k, i) in enumerate(spans):
        if start < max_end_written or (written and start < max_end_any):
            for (s2, e2, w2, k2, i2) in spans[:j]:
                if e2 > start and (w2 or written):
                    raise ValueError(f"{_label(names, k, i, is_list)} shares memory with "
                                     f"{_label(names, k2, i2, is_list)}")
        max_end_any = max(max_end_any, end)
        if written:
            max_end_written = max(max_end_written, end)


def host_scale(grad_scale) -> float:
    """grad_scale as a Python float for the host backends (a 0-d array is read; on the CPU that is no
    synchronisation)."""
    if grad_scale is None:
        return 1.0
    if isinstance(grad_scale, numbers.Real) and not isinstance(grad_scale, (bool, np.bool_)):
        return float(grad_scale)
    shape = getattr(grad_scale, "shape", None)
    dtype = getattr(grad_scale, "dtype", None)
    if shape is None or dtype is None or np.dtype(dtype).kind != "f":
        raise TypeError(f"grad_scale must be a real number or a 0-d float array, got {grad_scale!r}")
    if tuple(shape) != ():
        raise ValueError(f"grad_scale must be a scalar or a 0-d array, got shape {tuple(shape)}")
    return float(as_numpy(grad_scale, "grad_scale"))
