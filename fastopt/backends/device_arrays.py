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

import collections
import sys

import numpy as np

from fastopt.arrays import refuse_lazy_negation
from fastopt.backends import numpy_backend, validate
from fastopt.backends.cuda_source import ROUND_KAHAN, ROUND_NEAREST, ROUND_STOCHASTIC
from fastopt.backends.validate import Checked, prepare, validate_arrays

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)


def state_dtype(param_dtype):
    """The dtype the optimizer state of a `param_dtype` param has on the GPU by default (the Numba backend's
    only one): float32 for 16-bit params (float16, bfloat16), else the param's own."""
    return F32 if param_dtype.itemsize == 2 else param_dtype


class DeviceArray:
    """What the checks and the launchers need of one device array, read once."""

    __slots__ = ("obj", "ptr", "shape", "dtype", "size", "nbytes", "c_contiguous", "writeable", "device")

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
        self.device = None  # the CUDA device ordinal, asked of the backend once (device_of)


def device_of(backend_device):
    """`a -> a's device ordinal` for validate's checks, asking `backend_device(a)` once per DeviceArray (a param's
    view is kept across an optimizer's steps, so its device is read once)."""
    def device(a):
        d = a.device
        if d is None:
            d = a.device = backend_device(a)
        return d
    return device


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
    refuse_lazy_negation(obj, name)
    try:
        cai = obj.__cuda_array_interface__
    except (AttributeError, RuntimeError) as e:  # torch: "... requires grad ..." is a RuntimeError
        raise TypeError(f"{name}: expected a GPU array (CuPy, Numba device array or an object exposing "
                        f"__cuda_array_interface__), got {type(obj).__name__}"
                        + (f" ({e})" if isinstance(e, RuntimeError) else "")) from None
    shape = tuple(cai["shape"])
    dtype = np.dtype(cai["typestr"])
    if dtype.kind == "V" and dtype.itemsize == 2:  # "<V2": torch's bfloat16 (ml_dtypes' bfloat16 has that str)
        dtype = _bfloat16_of(obj, dtype)
    ptr, readonly = cai["data"]
    return DeviceArray(obj, ptr or 0, shape, dtype, _c_contiguous(shape, cai.get("strides"), dtype.itemsize),
                       not readonly)


def _bfloat16_of(obj, dtype):
    """ml_dtypes' bfloat16 for a torch bfloat16 tensor (whose __cuda_array_interface__ says "<V2", as
    ml_dtypes' bfloat16 does), the void dtype otherwise (refused by the dtype checks, naming it)."""
    torch = _torch_tensor(obj)
    if torch is None or obj.dtype != torch.bfloat16:
        return dtype
    try:
        import ml_dtypes
    except ImportError:
        return dtype
    return np.dtype(ml_dtypes.bfloat16)


class _DeviceApi:
    """The members validate_arrays needs, for DeviceArray views. state_dtypes: the backend's kernels take the
    state dtypes the CPU's do (state_dtype=: the host rule, validate.HostArrays.state_ok, and 8-bit state) and
    float32 grads of 16-bit params, else only the default state dtype (state_dtype above) and the params'
    own for grads."""

    def __init__(self, describe, dtypes, where, unchanged=None, stable=None, state_dtypes=False, device=None):
        self.convert, self.dtypes, self.where = describe, dtypes, where
        if device is not None:  # a -> device ordinal: every array of a call on one device (validate.check_arrays)
            self.device = device_of(device)
        self.unchanged = unchanged  # (obj, checked view) -> True when obj is surely as checked (validate._is_current)
        if stable is not None:  # obj -> True when the object itself pins what the kernels read (validate.bind_grads)
            self.stable = stable
        if state_dtypes:  # and float32 grads of 16-bit params (validate.HostArrays.grad_dtypes)
            self.state_ok, self.states_text = validate.HostArrays.state_ok, validate.HostArrays.states_text
            self.grad_dtypes = validate.HostArrays.grad_dtypes
        self.quantized_states = state_dtypes  # 8-bit state (precision.QuantizedState of device arrays) too

    pointer = staticmethod(lambda a: a.ptr)
    c_contiguous = staticmethod(lambda a: a.c_contiguous)
    writeable = staticmethod(lambda a: a.writeable)
    state_dtype = staticmethod(state_dtype)


def validate_device_arrays(arrays, names, describe, dtypes, where, read_only_slot=1, state_dtypes=False, device=None):
    """arrays = (params, grads, state0, ...), each one array or a list (None: unused state slot).
    describe(obj, label) -> DeviceArray. Returns (lists, is_list): every entry as a list of DeviceArray
    (None kept). Entry read_only_slot is only read (grads of an update: 1); -1 when all are written.
    The checks and messages are the host ones (validate.validate_arrays)."""
    lists = validate_arrays(arrays, names, _DeviceApi(describe, dtypes, where, state_dtypes=state_dtypes,
                                                      device=device), read_only_slot)
    return lists, isinstance(arrays[0], (list, tuple))


def prepare_device(arrays, names, describe, dtypes, where, read_only_slot=1, indices=None,
                   state_dtypes=False, device=None) -> Checked:
    """The checks of validate_device_arrays, as a Checked for a backend's run() and for
    check_prepared_disjoint across the calls of one optimizer step."""
    return prepare(arrays, names, _DeviceApi(describe, dtypes, where, state_dtypes=state_dtypes, device=device),
                   read_only_slot, indices)


def prepare_fixed_device(calls, describe, dtypes, where, unchanged=None, stable=None, state_dtypes=False,
                         device=None):
    """validate.prepare_fixed (interface.PrepareOnceBackend) on device arrays: the params and states of an
    optimizer's calls checked once; validate.bind_grads(fixed, grads_per_call) then re-checks what it
    saw and checks the grads. unchanged(obj, view): the backend's cheap proof that an array it checked
    before is as it was (the same CuPy array object, say); any other array is described again.
    stable(obj): the object alone pins its memory, dtype, size and layout (a CuPy array): when every array
    is, bind_grads skips the look at them and, given the same grads as the last step, the checks."""
    return validate.prepare_fixed(calls, _DeviceApi(describe, dtypes, where, unchanged, stable, state_dtypes, device))


def checked_grads(grads, describe, dtypes, where, written, device=None):
    """(lists, is_list) of the gradients of an in-place or reading call: the grads of a prepared update
    (bind_grads / prepare), a prepare_grads batch, or raw arrays, checked here (written: every one must
    be writable)."""
    if isinstance(grads, Checked):
        lists = grads.lists
        return ((lists[1],) if len(lists) > 1 else (lists[0],)), None
    return validate_device_arrays((grads,), ("grads",), describe, dtypes, where, -1 if written else 0, device=device)


def first_nonempty(arrays):
    """The array that decides the device and the stream of a call: the first with elements (an empty array
    may have no memory, hence no device; validate.check_arrays takes the call's device from it too)."""
    return next((a for a in arrays if a.size), arrays[0])


def check_on_device(a: DeviceArray, name: str, device, backend_device) -> None:
    """A call's one-off device array (grad_scale, found_inf) on its params' device (`backend_device(a)`: a's
    ordinal; device None: a call with no element, which launches nothing)."""
    if device is not None and a.ptr and backend_device(a) != device:
        raise ValueError(f"{name} is on device {backend_device(a)} but the params are on device {device}: one call "
                         f"runs on one GPU")


def check_sums_out(a: DeviceArray, n: int, device, backend_device) -> None:
    """`out` of a device sumsq_per_tensor: n float64 contiguous writable values on the grads' device (the
    optimizer passes a slice of its buffer; anything else would be written out of bounds or cast)."""
    if a.dtype != F64 or a.shape != (n,) or not a.c_contiguous or not a.writeable:
        raise ValueError(f"out must be a writable contiguous float64 device array of shape ({n},), got "
                         f"{a.dtype}{list(a.shape)}" + ("" if a.c_contiguous else ", not contiguous")
                         + ("" if a.writeable else ", read-only"))
    check_on_device(a, "out", device, backend_device)


FLAG_DTYPES = (np.dtype(np.bool_), np.dtype(np.uint8))


def check_skip_flag(a: DeviceArray) -> DeviceArray:
    """found_inf of a backend's step (the optimizer's device skip flag): one bool/uint8 value."""
    if a.dtype not in FLAG_DTYPES:
        raise TypeError(f"found_inf must be a bool device array, got dtype {a.dtype}")
    if a.size != 1:
        raise ValueError(f"found_inf must hold one value, got shape {a.shape}")
    return a


# ---------------------------------------------------------------------------------------------------
# Streams: every launch is ordered after the work that produced its inputs
# ---------------------------------------------------------------------------------------------------

LEGACY_STREAM, PER_THREAD_STREAM = 1, 2  # __cuda_array_interface__ v3 names of the two default streams


def rounding_of(prepared, stochastic) -> tuple:
    """(rounding, key, index0) of a GPU backend's call: to nearest; Kahan-compensated when it has a compensation
    (slot 5, checked by prepare: the params' 16-bit dtype); stochastic with `stochastic` (a
    precision.StochasticRounding: its key and index offset go to the kernels). Raises before anything runs on
    what the CPU refuses too: both at once or stochastic rounding of non-16-bit params."""
    kahan = validate.comp_slot(prepared.lists) is not None
    if not kahan and stochastic is None:
        return ROUND_NEAREST, 0, 0
    numpy_backend.check_rounding(prepared, stochastic)
    if kahan:
        return ROUND_KAHAN, 0, 0
    return ROUND_STOCHASTIC, int(stochastic.key), int(stochastic.index_offset)


def _torch_tensor(obj):
    """torch, when obj is a torch tensor (torch is then imported already: fastopt never imports it)."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and isinstance(obj, torch.Tensor) else None


def producer_stream(obj):
    """The CUDA stream (a cudaStream_t as an int; 0 or 1 the legacy default stream, 2 the per-thread
    default stream) on which work on `obj` is ordered, or None when the array names none:
      - a torch CUDA tensor: torch.cuda.current_stream(tensor.device) (torch exports
        __cuda_array_interface__ v2, without a stream, so torch itself is asked);
      - any other object: the `stream` of its __cuda_array_interface__ v3 (CuPy exports its current
        stream there, Numba a device array's stream).
    None: the caller uses its own library's stream (CuPy's current stream, a Numba array's stream)."""
    torch = _torch_tensor(obj)
    if torch is not None:
        return int(torch.cuda.current_stream(obj.device).cuda_stream)
    try:
        stream = obj.__cuda_array_interface__.get("stream")
    except (AttributeError, RuntimeError):
        return None
    return None if stream is None else int(stream)


def device_index(obj):
    """The CUDA device ordinal of a torch tensor or a CuPy array; None for other objects (the backend
    asks the driver about the pointer)."""
    torch = _torch_tensor(obj)
    if torch is not None:
        return obj.device.index
    device = getattr(obj, "device", None)
    if type(obj).__module__.startswith("cupy") and device is not None:
        return device.id
    return None


class StreamMemo:
    """The stream each device array a backend returned was written on, by device address (bounded): the
    kernels that read such an array later (the norm from sums of squares, the optimizer's guard) are
    launched on that stream, hence after its producer, whatever stream is current by then. Keyed by
    address because CuPy arrays take no attributes nor weak references; so each entry also holds the array
    it was noted for: its memory, hence its address, stays its own while the entry lasts. By address alone,
    an array the caller made later at a recycled address (CuPy's pool hands a freed block out again at
    once) would be read on the old result's stream, unordered after its own producer."""

    def __init__(self, size=256):
        self._streams: collections.OrderedDict = collections.OrderedDict()
        self._size = size

    def note(self, ptr, stream, owner):
        """`owner`: the array at ptr (kept alive with the entry)."""
        self._streams[int(ptr)] = (stream, owner)
        self._streams.move_to_end(int(ptr))
        if len(self._streams) > self._size:
            self._streams.popitem(last=False)

    def get(self, ptr, default=None):
        entry = self._streams.get(int(ptr))
        return default if entry is None else entry[0]

    def clear(self):
        self._streams.clear()
