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

from fastopt.backends.validate import _check_disjoint, _label

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


def validate_device_arrays(arrays, names, describe, dtypes, where, read_only_slot=1):
    """arrays = (params, grads, state0, ...), each one array or a list (None: unused state slot).
    describe(obj, label) -> DeviceArray. Returns (lists, is_list): every entry as a list of DeviceArray
    (None kept). Entry read_only_slot is only read (grads of an update: 1); -1 when all are written."""
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
    ref_dtype = None
    spans = []
    for i in range(len(lists[0])):
        p = None
        for k, lst in enumerate(lists):
            if lst is None:
                continue
            label = _label(names, k, i, is_list)
            a = describe(lst[i], label)
            lst[i] = a
            if k == 0:
                p = a
                if a.dtype not in dtypes:
                    raise TypeError(f"{label} has dtype {a.dtype}; fastopt updates "
                                    f"{' or '.join(str(d) for d in dtypes)} arrays {where}")
                if ref_dtype is None:
                    ref_dtype = a.dtype
                elif a.dtype != ref_dtype:
                    raise TypeError(f"{label} has dtype {a.dtype} but {names[0]}[0] has {ref_dtype}: one call "
                                    f"updates one dtype (group the arrays by dtype)")
            else:
                expected = p.dtype if k <= 1 else state_dtype(p.dtype)
                if a.dtype != expected:
                    why = (f"the dtype of {_label(names, 0, i, is_list)}" if expected == p.dtype else
                           f"float16 params keep float32 state; see fastopt.init_state")
                    raise TypeError(f"{label} has dtype {a.dtype}, expected {expected} ({why})")
                if a.shape != p.shape:
                    raise ValueError(f"{label} has shape {a.shape}, expected {p.shape} "
                                     f"(the shape of {_label(names, 0, i, is_list)})")
            if not a.c_contiguous:
                raise ValueError(f"{label} is not C-contiguous")
            written = k != read_only_slot
            if written and not a.writeable:
                raise ValueError(f"{label} is read-only")
            if a.size:
                spans.append((a.ptr, a.ptr + a.nbytes, written, k, i))
    _check_disjoint(spans, names, is_list)
    return tuple(lists), is_list
