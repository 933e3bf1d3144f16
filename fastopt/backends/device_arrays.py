"""Array checks for the GPU backends (cupy, numba), with the messages and exception types of the host
checks (fastopt/backends/validate.py, whose helpers it reuses). Every check runs before the first
write, so an error leaves every array unchanged.

Arrays are looked at through `__cuda_array_interface__` (CuPy arrays directly), so a torch CUDA tensor
or a Numba device array is used zero-copy: the kernels write the caller's memory. A tensor that
requires grad hides its interface (torch raises): pass `p.data` / `p.detach()`.

dtypes: float32 and float64 everywhere; float16 params (and grads) on the CuPy backend, whose state
arrays must be float32 (the kernels run float32 math; float16 moments would underflow, the second
moment first). So for a float16 param every state argument is checked against float32, and against
the param's own dtype otherwise.
"""
from __future__ import annotations

import numpy as np

from fastopt.backends.validate import Checked, prepare, validate_arrays

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)


def state_dtype(param_dtype):
    """The dtype the optimizer state of a `param_dtype` param must have on the GPU."""
    return F32 if param_dtype == F16 else param_dtype


class DeviceArray:
    """What the checks and the launchers need of one device array, read once."""

    __slots__ = ("obj", "ptr", "shape", "dtype", "size", "nbytes", "c_contiguous", "writeable")

    def __init__(self, obj, ptr, shape, dtype, c_contiguous, writeable):
        self.obj = obj
        self.ptr = int(ptr)
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        size = 1
        for s in self.shape:
            size *= s
        self.size = size
        self.nbytes = size * self.dtype.itemsize
        self.c_contiguous = c_contiguous
        self.writeable = writeable


def _c_contiguous(shape, strides, itemsize):
    if strides is None or 0 in shape:
        return True
    expected = itemsize
    for n, s in zip(reversed(shape), reversed(strides)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def from_interface(obj, name):
    """DeviceArray of any object exposing __cuda_array_interface__; TypeError otherwise."""
    try:
        cai = obj.__cuda_array_interface__
    except (AttributeError, RuntimeError) as e:  # torch: "... requires grad ..." is a RuntimeError
        raise TypeError(f"{name}: expected a GPU array (CuPy, Numba device array or an object exposing "
                        f"__cuda_array_interface__), got {type(obj).__name__}"
                        + (f" ({e})" if isinstance(e, RuntimeError) else "")) from None
    shape = tuple(cai["shape"])
    dtype = np.dtype(cai["typestr"])
    ptr, readonly = cai["data"]
    return DeviceArray(obj, ptr or 0, shape, dtype, _c_contiguous(shape, cai.get("strides"), dtype.itemsize),
                       not readonly)


class _DeviceApi:
    """The members validate_arrays needs, for DeviceArray views."""

    def __init__(self, describe, dtypes, where):
        self.convert, self.dtypes, self.where = describe, dtypes, where

    pointer = staticmethod(lambda a: a.ptr)
    c_contiguous = staticmethod(lambda a: a.c_contiguous)
    writeable = staticmethod(lambda a: a.writeable)
    state_dtype = staticmethod(state_dtype)


def validate_device_arrays(arrays, names, describe, dtypes, where, read_only_slot=1):
    """arrays = (params, grads, state0, ...), each one array or a list (None: unused state slot).
    describe(obj, label) -> DeviceArray. Returns (lists, is_list): every entry as a list of DeviceArray
    (None kept). Entry read_only_slot is only read (grads of an update: 1); -1 when all are written.
    The checks and messages are the host ones (validate.validate_arrays)."""
    lists = validate_arrays(arrays, names, _DeviceApi(describe, dtypes, where), read_only_slot)
    return lists, isinstance(arrays[0], (list, tuple))


def prepare_device(arrays, names, describe, dtypes, where, read_only_slot=1, indices=None) -> Checked:
    """The checks of validate_device_arrays, as a Checked for a backend's run() and for
    check_prepared_disjoint across the calls of one optimizer step."""
    return prepare(arrays, names, _DeviceApi(describe, dtypes, where), read_only_slot, indices)


FLAG_DTYPES = (np.dtype(np.bool_), np.dtype(np.uint8))


def check_skip_flag(a: DeviceArray) -> DeviceArray:
    """found_inf of a backend's step (the optimizer's device skip flag): one bool/uint8 value."""
    if a.dtype not in FLAG_DTYPES:
        raise TypeError(f"found_inf must be a bool device array, got dtype {a.dtype}")
    if a.size != 1:
        raise ValueError(f"found_inf must hold one value, got shape {a.shape}")
    return a
