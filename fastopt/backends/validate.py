"""Array checks for the backends written in Python (numpy, cupy, numba); the Cython backend runs the
same checks, with the same messages, in compiled code (kernels/cpu/_cpu_fast.pyx). Every check runs
before the first write, so an error leaves every array unchanged.

A kernel call is checked in one go (`check_arrays`), which also returns the memory spans of its
arrays: an optimizer with several calls per step (groups, dtypes) checks the spans of all of them
against each other (`check_disjoint`) before the first call writes anything.
"""
from __future__ import annotations

import numbers

import numpy as np

from fastopt.arrays import as_numpy
from fastopt.specs import as_float

HOST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class HostArrays:
    """How the checks look at host arrays: converted to NumPy (zero copy); the GPU backends pass their
    own class with the same members (fastopt/backends/device_arrays.py)."""

    dtypes = HOST_DTYPES
    where = "on the CPU"

    @staticmethod
    def convert(obj, name):
        if isinstance(obj, np.ma.MaskedArray):  # the kernels would ignore the mask
            raise TypeError(f"{name} is a masked array; pass its data (np.ma.getdata) or fill it")
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


def dtype_text(dtype) -> str:
    """float32, or >f4 where the byte order is what is wrong."""
    return str(dtype) if dtype.isnative else dtype.str


def label(name, index):
    """How an error message names one array: "grads[3]" in a list, "grads" alone."""
    return name if index is None else f"{name}[{index}]"


def check_arrays(arrays, names, api=HostArrays, read_only_slot=1, indices=None):
    """arrays = (params, grads, state0, ...), each one array or a list; None only for an unused state
    slot (entries 2 and up). indices: how messages number the arrays of a list (default 0, 1, ...; an
    optimizer passes each param's position in its own order).
    Returns (lists, spans): every entry as a list of backend arrays (None kept), and the memory span
    (start, end, written, name, index) of every non-empty array. Entry read_only_slot is only read
    (grads of an update: 1); -1 when every entry is written."""
    first = arrays[0]
    is_list = isinstance(first, (list, tuple))
    lists = []
    for k, entry in enumerate(arrays):
        if entry is None:
            if k < 2:  # params and grads are never optional
                raise TypeError(f"{names[k]} must be {'a list of arrays' if is_list else 'an array'}, got None")
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
    if indices is None:
        indices = range(n) if is_list else (None,)
    ref_dtype = None
    spans = []
    for i in range(n):
        p = None
        index = indices[i]
        for k, lst in enumerate(lists):
            if lst is None:
                continue
            name = names[k]
            obj = lst[i]
            if obj is None:
                raise TypeError(f"{label(name, index)} must be an array, got None")
            a = api.convert(obj, label(name, index))
            lst[i] = a
            if k == 0:
                p = a
                if a.dtype not in api.dtypes:
                    raise TypeError(f"{label(name, index)} has dtype {dtype_text(a.dtype)}; "
                                    f"fastopt updates {' or '.join(str(d) for d in api.dtypes)} arrays "
                                    f"(native byte order) {api.where}")
                if ref_dtype is None:
                    ref_dtype = a.dtype
                elif a.dtype != ref_dtype:
                    raise TypeError(f"{label(name, index)} has dtype {a.dtype} but {label(names[0], indices[0])} "
                                    f"has {ref_dtype}: one call updates one dtype (group the arrays by dtype)")
            else:
                expected = p.dtype if k == 1 else api.state_dtype(p.dtype)
                if a.dtype != expected:
                    why = (f"the dtype of {label(names[0], index)}" if expected == p.dtype else
                           f"{p.dtype} params keep {expected} state; see fastopt.init_state")
                    raise TypeError(f"{label(name, index)} has dtype {dtype_text(a.dtype)}, expected {expected} ({why})")
                if tuple(a.shape) != tuple(p.shape):
                    raise ValueError(f"{label(name, index)} has shape {tuple(a.shape)}, expected {tuple(p.shape)} "
                                     f"(the shape of {label(names[0], index)})")
            if not api.c_contiguous(a):
                raise ValueError(f"{label(name, index)} is not C-contiguous")
            written = k != read_only_slot
            if written and not api.writeable(a):
                raise ValueError(f"{label(name, index)} is read-only")
            if a.size:
                start = api.pointer(a)
                spans.append((start, start + a.nbytes, written, name, index))
    return tuple(lists), spans


class Checked:
    """The arrays of one call after check_arrays and the disjointness check: `lists` as check_arrays
    returns them, `spans` for comparing several calls (check_prepared_disjoint). Nothing is written
    before a call is checked; the backends' run()/scale_() take a Checked instead of raw arrays."""

    __slots__ = ("lists", "spans")

    def __init__(self, lists, spans):
        self.lists, self.spans = lists, spans


def prepare(arrays, names, api=HostArrays, read_only_slot=1, indices=None) -> Checked:
    """check_arrays, then no array of the call may share memory with a written one."""
    lists, spans = check_arrays(arrays, names, api, read_only_slot, indices)
    check_disjoint(spans)
    return Checked(lists, spans)


def validate_arrays(arrays, names, api=HostArrays, read_only_slot=1, indices=None):
    """check_arrays, then no array may share memory with a written one. Returns the lists."""
    lists, spans = check_arrays(arrays, names, api, read_only_slot, indices)
    check_disjoint(spans)
    return lists


def check_disjoint(spans):
    """No array may share memory with an array that is written (read-only arrays may share with each
    other). spans: (start, end, written, name, index) of every array, in any order."""
    spans = sorted(spans, key=lambda s: s[0])
    max_end_any = max_end_written = 0
    for j, (start, end, written, name, index) in enumerate(spans):
        if start < max_end_written or (written and start < max_end_any):
            for (s2, e2, w2, name2, index2) in spans[:j]:
                if e2 > start and (w2 or written):
                    raise ValueError(f"{label(name, index)} shares memory with {label(name2, index2)}")
        max_end_any = max(max_end_any, end)
        if written:
            max_end_written = max(max_end_written, end)


def check_prepared_disjoint(prepared):
    """check_disjoint over several Checked calls: how the backends written in Python compare the calls
    of one optimizer step."""
    check_disjoint([span for checked in prepared for span in checked.spans])


def host_scale(grad_scale) -> float:
    """grad_scale as a Python float for the host backends (a 0-d array is read; on the CPU that is no
    synchronisation). NaN and Inf pass: a non-finite clip coefficient propagates, like torch."""
    if grad_scale is None:
        return 1.0
    if isinstance(grad_scale, numbers.Real) and not isinstance(grad_scale, (bool, np.bool_)):
        value = as_float("grad_scale", grad_scale)
    else:
        shape = getattr(grad_scale, "shape", None)
        dtype = getattr(grad_scale, "dtype", None)
        try:
            kind = np.dtype(dtype).kind if dtype is not None else None
        except TypeError:
            kind = None
        if shape is None or kind != "f":
            raise TypeError(f"grad_scale must be a real number or a 0-d float array, got {grad_scale!r}")
        if tuple(shape) != ():
            raise ValueError(f"grad_scale must be a scalar or a 0-d array, got shape {tuple(shape)}")
        value = float(as_numpy(grad_scale, "grad_scale"))
    return value
