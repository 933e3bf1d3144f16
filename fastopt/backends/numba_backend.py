"""The Numba CUDA backend: kernels/numba (math as @cuda.jit(device=True) functions, compiled lazily on
first use per dtype), on Numba device arrays and on anything exposing __cuda_array_interface__ (CuPy
arrays, torch CUDA tensors), zero-copy and in place. float32 and float64; float16 and bfloat16 params (their own
or float32 grads) and states (state_dtype=, the CPU's rule) with float32 math on their bits, the new 16-bit
params rounded to nearest, Kahan-compensated (kahan=True) or stochastically rounded (stochastic_rounding=True)
with the CPU's and CUDA's bits (kernels/numba/precision.py), every family (LAMB's apply pass, Adan's fourth state
included); 8-bit state (state_dtype="int8", precision.QuantizedState of device arrays) for the elementwise
families (Adan's fourth state too), dequantized, updated and requantized in one pass with the CPU's codes and
scales.

- One launch per list (or array), like the CuPy backend: Numba kernels take arrays, not pointers, so for
  each slot (params, grads, each state) the launcher makes one 1-d view that starts at the lowest address
  of that slot's tensors (no memory is allocated or copied; the kernels index only the tensors' own
  elements) and a table of each tensor's offsets in those views and of the chunks (kernels/numba/
  kernels.py). The table is copied to the device once and reused while the same arrays come back.
- No device allocation per call on the update path: scratch (reduction partials, LAMB's per-tensor
  learning rates, a cast grad_scale, the optimizer guard's outputs) is cached per device and stream and
  grows when needed; Numba has no memory pool and its deferred frees synchronise the device. Results
  handed to the caller (sums of squares, norms, clip coefficients) are new arrays.
- Everything runs on the arrays' device (its context made current) and on the stream that orders the
  work producing them: torch.cuda.current_stream(device) for torch tensors (cuda.external_stream), the
  __cuda_array_interface__ v3 stream for CuPy and other arrays (CuPy exports its current stream), a
  Numba device array's own stream. Foreign arrays are imported with sync=False (no host synchronisation).
Norms and clipping are deterministic two-stage float64 reductions (fixed chunks, fixed-order sums) and
stay on the device; a 0-d device grad_scale is read by the kernels. Under NUMBA_ENABLE_CUDASIM=1 the same
code runs on the CPU simulator (tiny blocks and chunks, so that several chunks per tensor are exercised).
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import importlib.util
import numbers

import numpy as np

from fastopt.backends.cuda_source import BF16, ROUND_KAHAN, ROUND_NEAREST, ROUND_STOCHASTIC
from fastopt.backends import numpy_backend
from fastopt.backends.device_arrays import (F16, F32, F64, DeviceArray, StreamMemo, check_on_device, check_skip_flag,
                                             check_sums_out,
                                             checked_grads, device_index, first_nonempty, from_interface,
                                             prepare_device, prepare_fixed_device, producer_stream, rounding_of,
                                             validate_device_arrays)
from fastopt.backends.validate import bind_grads as _bind_grads
from fastopt.backends.validate import (Checked, check_prepared_disjoint, check_scaled_lr, check_tensor_coefs, comp_slot,
                                      state_slots)
from fastopt.precision import QUANT_BLOCK, QuantizedState, quantizer_arrays
from fastopt.specs import as_float

NAME = "numba"
AVAILABLE = importlib.util.find_spec("numba") is not None
# params: float32 and float64 (math in their dtype), float16 and bfloat16 (float32 math; carried to the kernels
# as their uint16 bits, converted by kernels/numba/precision.py with the CUDA kernels' and CPU loops' bits)
DTYPES = (F32, F64, F16) + ((BF16,) if BF16 is not None else ())
_U16 = np.dtype(np.uint16)
_FIELDS = 12  # int64 columns per tensor of a table (kernels/numba/kernels.py TENSOR_FIELDS)
_CACHE_SIZE = 64


def _cuda():
    from numba import cuda

    from fastopt.kernels.numba.compat import prepare_numba_cuda
    prepare_numba_cuda()  # before anything here compiles (numba-cuda 0.30 with NumPy >= 2.5)
    return cuda


def simulating() -> bool:
    from numba import config
    return bool(config.ENABLE_CUDASIM)


@functools.lru_cache(maxsize=None)
def launch_config():
    """(threads per block, most blocks of a grid-stride kernel, elements per chunk of the table kernels).
    The simulator runs each thread as a Python thread: tiny there, and chunks of 2 blocks' worth so that
    tensors span several chunks. Constants, so that reductions sum in the same order on any GPU."""
    return (32, 4, 64) if simulating() else (256, 1024, 4096)


def int8_chunk() -> int:
    """Elements per chunk of an 8-bit state's table: whole quantization blocks (the chunk of launch_config rounded
    up to a multiple of 256: the same on a GPU, one block of 256 on the simulator)."""
    chunk = launch_config()[2]
    return -(-chunk // QUANT_BLOCK) * QUANT_BLOCK


def _kernels(dtype, kinds=None, chunk=None):
    """The kernels of math dtype `dtype` for arrays stored as `kinds` (kernels.build: the params', grads' and
    states' storage, None for the math dtype's own), for tables of `chunk` elements per chunk (launch_config's
    by default)."""
    from fastopt.kernels.numba import kernels
    block, _, default_chunk = launch_config()
    return kernels.build(np.dtype(dtype), block, default_chunk if chunk is None else chunk, kinds, QUANT_BLOCK)


def _math_dtype(dtype):
    """float32 for 16-bit arrays, else their own."""
    return F32 if np.dtype(dtype).itemsize == 2 else np.dtype(dtype)


def _kind(dtype, math):
    """How arrays of `dtype` are stored for kernels of math dtype `math`: None (as `math`) or the 16-bit name."""
    return None if dtype is None or np.dtype(dtype) == math else np.dtype(dtype).name


def _storage(dtype):
    """The dtype the kernels see: 16-bit floats as their uint16 bits."""
    return _U16 if dtype is not None and dtype.itemsize == 2 else dtype


def _call_kinds(lists):
    """(math dtype, kinds) of an update call's kernels (kernels.build: how its params, grads and states are
    stored; None when all are of the math dtype; 8-bit states: None, their kernels take codes and scales)."""
    params = first_nonempty(lists[0]).dtype
    math = _math_dtype(params)
    states = [lst[0].dtype for lst in lists[2:5] if lst and not isinstance(lst[0], QuantizedState)]
    kinds = (_kind(params, math), _kind(lists[1][0].dtype, math), _kind(states[0] if states else None, math))
    return math, None if kinds == (None, None, None) else kinds


def _kernels_for(dtype):
    """(kernels, math dtype) of the one-array kernels (reductions, scale, clamp) on arrays of `dtype`."""
    math = _math_dtype(dtype)
    return _kernels(math, None if math == dtype else (np.dtype(dtype).name, None, None)), math


def _grid(n):
    block, most, _ = launch_config()
    return max(1, min(-(-n // block), most))


# ---------------------------------------------------------------------------------------------------
# Arrays, devices, streams
# ---------------------------------------------------------------------------------------------------

def _describe(obj, name):
    if simulating() and type(obj).__name__ == "FakeCUDAArray":  # the simulator's device array
        ai = obj.__array_interface__
        return DeviceArray(obj, ai["data"][0], obj.shape, obj.dtype, obj.flags.c_contiguous, obj.flags.writeable)
    a = from_interface(obj, name)
    own = getattr(obj, "dtype", None)
    if a.dtype.kind == "V" and isinstance(own, np.dtype) and own.itemsize == a.dtype.itemsize:
        a.dtype = own  # a bfloat16 CuPy or Numba array: its interface says "<V2", its dtype ml_dtypes' bfloat16
    return a


def _flat(a: DeviceArray):
    """1-d Numba view of a validated array (zero copy). A foreign array (CuPy, torch) is imported with
    sync=False: Numba would otherwise synchronise the producer's stream with the host on every import;
    the kernels are launched on that stream instead (`_stream`), which orders them after its work."""
    obj = a.obj
    if not simulating() and not hasattr(obj, "copy_to_host"):  # CuPy / torch: view through the interface
        obj = _cuda().as_cuda_array(obj, sync=False)
    return obj.reshape(a.size)


def _device_of(a: DeviceArray) -> int:
    """The CUDA device ordinal of an array: torch's/CuPy's own, a Numba array's context, else the
    driver's answer for its pointer."""
    if simulating():
        return 0
    device = device_index(a.obj)
    if device is not None:
        return device
    context = getattr(getattr(a.obj, "gpu_data", None), "context", None)  # a Numba device array
    if context is not None:
        return context.device.id
    if not a.ptr:  # an empty array has no memory: any device will do
        return _cuda().get_current_device().id
    return _pointer_device(a.ptr)


def _pointer_device(ptr):
    """The device ordinal of a device pointer (cuPointerGetAttribute)."""
    from numba.cuda.cudadrv import driver
    _cuda()
    attr = driver.binding.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
    return int(driver.driver.cuPointerGetAttribute(attr, driver.binding.CUdeviceptr(ptr)))


@contextlib.contextmanager
def _on(device):
    """The device's context current: kernels, streams, views and scratch of a call belong to it."""
    if simulating():
        yield
        return
    with _cuda().gpus[device]:
        yield


_LEGACY, _PER_THREAD = 1, 2  # __cuda_array_interface__ v3 names of the default streams


def _stream(a: DeviceArray, device):
    """The stream to launch on (inside _on(device)): torch's current stream for a torch tensor, the one a
    foreign array's producer exported in __cuda_array_interface__ (CuPy's current stream), a Numba
    array's own stream (0: Numba's default stream). Ordered after the work that made the arrays, with no
    host synchronisation."""
    obj = a.obj
    if simulating():
        return 0
    if hasattr(obj, "copy_to_host"):  # a Numba device array
        return getattr(obj, "stream", 0) or 0
    handle = producer_stream(obj)
    return 0 if handle is None else _external_stream(device, handle)


@functools.lru_cache(maxsize=64)
def _external_stream(device, ptr):
    cuda = _cuda()
    if ptr in (0, _LEGACY):
        return cuda.legacy_default_stream()
    if ptr == _PER_THREAD:
        return cuda.per_thread_default_stream()
    return cuda.external_stream(ptr)


def _stream_key(stream):
    """A stream's handle as an int (tables and scratch are kept per stream)."""
    if isinstance(stream, int):
        return stream
    handle = stream.handle  # a cuda-bindings CUstream (int() works), or a ctypes c_void_p (.value)
    return int(getattr(handle, "value", handle) or 0)


_result_streams = StreamMemo()  # arrays this backend returned -> the stream that wrote them


def _returned(array, stream):
    _result_streams.note(_describe(array, "result").ptr, stream, array)
    return array


def _sq_stream(sq):
    """The stream that wrote sums of squares (or a norm) this backend returned: the kernels that read
    them launch there."""
    return _result_streams.get(_describe(sq, "sq").ptr, getattr(sq, "stream", 0) or 0)


_WHERE = "on the GPU with the numba backend"


def _validate(arrays, names, read_only_slot=1):
    return validate_device_arrays(arrays, names, _describe, DTYPES, _WHERE, read_only_slot, device=_device_of)


# ---------------------------------------------------------------------------------------------------
# Tables and scratch (cached per device and stream: nothing is allocated per call once they exist)
# ---------------------------------------------------------------------------------------------------

# (slot of a call's lists, table column): params, grads, s0-s2, the fourth state (slot 6), the compensation (5),
# and the absmax of 8-bit states s0-s3 (slots 7-10: the launcher's, after the call's own)
_SPAN_COLUMNS = ((0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (6, 6), (5, 7), (7, 8), (8, 9), (9, 10), (10, 11))


def table_layout(lists, chunk):
    """The host side of one multi-tensor launch: (spans, tensors, chunks, offsets). lists: per slot
    (params, grads, states s0-s2, the Kahan compensation, a fourth state, the absmax of 8-bit states s0-s3; None
    unused) a list of arrays with .ptr, .size, .dtype, at least one of them not empty. spans: (lowest address,
    elements from there to the end of the last array) per _SPAN_COLUMNS entry: the params, grads, s0, s1, s2, the
    fourth state (the call's slot 6), the compensation (slot 5) and the four absmax (slots 7-10), None for an
    unused slot; tensors (nt, 12) int64: each tensor's element offset in each span, its size in column 5
    (kernels.py T_N; the fourth state's offset in column 6, the compensation's in 7, the absmax' in 8-11);
    chunks (nb, 2) int64: (tensor, first element); offsets (nt + 1) int64: each tensor's first chunk (the
    reductions' segments)."""
    sizes = np.array([a.size for a in lists[0]], dtype=np.int64)
    n = len(sizes)
    tensors = np.zeros((n, _FIELDS), dtype=np.int64)
    tensors[:, 5] = sizes
    spans = []
    for k, col in _SPAN_COLUMNS:
        lst = lists[k] if k < len(lists) else None
        if lst is None:
            spans.append(None)
            continue
        live = [i for i in range(n) if sizes[i]]
        base = min(lst[i].ptr for i in live)
        itemsize = lst[live[0]].dtype.itemsize
        for i in live:
            offset, rest = divmod(lst[i].ptr - base, itemsize)
            if rest:
                raise ValueError(f"array {i} of a {lst[i].dtype} list is not aligned to its element size "
                                 f"(address {lst[i].ptr:#x})")
            tensors[i, col] = offset
        spans.append((base, int(max(tensors[i, col] + lst[i].size for i in live))))
    counts = (sizes + chunk - 1) // chunk
    offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    nchunks = int(offsets[-1])
    owner = np.repeat(np.arange(n, dtype=np.int64), counts)
    first = (np.arange(nchunks, dtype=np.int64) - np.repeat(offsets[:-1], counts)) * chunk
    return spans, tensors, np.stack((owner, first), axis=1), offsets


def _span_view(base, n, dtype):
    """A 1-d array of n elements of `dtype` at device address `base` (no allocation: the memory belongs
    to the caller's arrays, which are alive for the call)."""
    if simulating():  # the simulator's device arrays are NumPy arrays: the same view of host memory
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        buffer = (ctypes.c_char * (n * dtype.itemsize)).from_address(base)
        return FakeCUDAArray(np.frombuffer(buffer, dtype=dtype, count=n))
    desc = {"shape": (n,), "typestr": dtype.str, "data": (base, False), "strides": None, "version": 3,
            "stream": None}
    return _cuda().from_cuda_array_interface(desc, owner=None, sync=False)


class _Table:
    """One set of tensors ready to launch: per span (table_layout's: P, G, S0, S1, S2, S3, C in `views`, the 8-bit
    states' absmax A0-A3 in `scales`) its view (the params' view for an unused one, never read), and the table
    on the device: tensors, chunks and offsets in one int64 buffer."""

    __slots__ = ("views", "scales", "buffer", "host", "tensors", "chunks", "offsets", "ntensors", "nchunks")

    def __init__(self, lists, device, stream, chunk):
        spans, tensors, chunks, offsets = table_layout(lists, chunk)
        dtypes = [None if k >= len(lists) or lists[k] is None else _storage(lists[k][0].dtype)
                  for k, _ in _SPAN_COLUMNS]
        views = [None if span is None else _span_view(span[0], span[1], dtype) for span, dtype in zip(spans, dtypes)]
        views = [views[0] if v is None else v for v in views]
        self.views, self.scales = views[:7], views[7:]
        self.ntensors, self.nchunks = len(tensors), len(chunks)
        self.host = np.concatenate((tensors.ravel(), chunks.ravel(), offsets))  # alive while the copy may run
        self.buffer = _table_buffer(device, stream, self.host.size)  # may be larger: a recycled one
        self.buffer[:self.host.size].copy_to_device(self.host, stream=stream)
        nt, nc = _FIELDS * self.ntensors, 2 * self.nchunks
        self.tensors = self.buffer[:nt].reshape(self.ntensors, _FIELDS)
        self.chunks = self.buffer[nt:nt + nc].reshape(self.nchunks, 2)
        self.offsets = self.buffer[nt + nc:self.host.size]


_tables: collections.OrderedDict = collections.OrderedDict()
_spare_buffers: dict = {}  # (device, stream key) -> device buffers of evicted tables, for the next ones


def _table_buffer(device, stream, n):
    """An int64 device buffer of at least n elements for a table on this device and stream: an evicted table's
    when one is large enough (the stream orders the reuse after the kernels that read it), else a new
    one. Recycling instead of freeing matters: Numba frees device memory in batches that synchronise the
    device, and gradients in new arrays every step make a new table every step."""
    spare = _spare_buffers.setdefault((device, _stream_key(stream)), [])
    for i, buffer in enumerate(spare):
        if buffer.size >= n:
            return spare.pop(i)
    return _cuda().device_array(max(n, 64), dtype=np.int64, stream=stream)


def _table(lists, device, stream, chunk=None):
    """The table of these tensors (inside _on(device)) in chunks of `chunk` elements (launch_config's by default),
    from the cache when the same arrays come back on the same stream (its copy to the device is ordered on that
    stream)."""
    chunk = launch_config()[2] if chunk is None else chunk
    key = (device, _stream_key(stream), chunk,
           tuple(None if lst is None else tuple((a.ptr, a.size, a.dtype.char) for a in lst) for lst in lists))
    table = _tables.get(key)
    if table is None:
        table = _tables[key] = _Table(lists, device, stream, chunk)
        if len(_tables) > _CACHE_SIZE:
            (old_device, old_stream, _, _), old = _tables.popitem(last=False)
            spare = _spare_buffers.setdefault((old_device, old_stream), [])
            spare.append(old.buffer)
            del spare[:-8]  # a few spares per stream
    else:
        _tables.move_to_end(key)
    return table


_scratch: collections.OrderedDict = collections.OrderedDict()


def _scratch_array(device, stream, purpose, n, dtype):
    """n elements of device scratch for `purpose`, reused by every call on this device and stream (the
    stream orders the reuse) and grown when a call needs more. Inside _on(device). A new buffer starts as
    zeros (one copy when it is made): step_guard's counter without a `skipped` of the caller's is read and
    incremented, and compute-sanitizer's initcheck flagged its first read."""
    key = (device, _stream_key(stream), purpose, np.dtype(dtype))
    buffer = _scratch.get(key)
    if buffer is None or buffer.size < n:
        # at least 256, then doubling: each replaced buffer is a deferred free, and Numba frees them in
        # batches that synchronise the device (10 pending by default)
        size = max(n, 256, 2 * buffer.size if buffer is not None else 0)
        buffer = _scratch[key] = _cuda().to_device(np.zeros(size, dtype=dtype), stream=stream)
        if len(_scratch) > _CACHE_SIZE:
            _scratch.popitem(last=False)
    else:
        _scratch.move_to_end(key)
    return buffer[:n]


@functools.lru_cache(maxsize=None)
def _ones(device, dtype):
    return _cuda().to_device(np.ones(1, dtype=dtype))


@functools.lru_cache(maxsize=None)
def _never(device):
    return _cuda().to_device(np.zeros(1, dtype=np.uint8))


def _device_scale(grad_scale, dtype, device, stream=0):
    """(host factor, 1-element device array of the math dtype the kernels read). Inside _on(device)."""
    if grad_scale is None:
        return 1.0, _ones(device, dtype)
    if isinstance(grad_scale, numbers.Real) and not isinstance(grad_scale, (bool, np.bool_)):
        return as_float("grad_scale", grad_scale), _ones(device, dtype)
    if isinstance(grad_scale, np.ndarray):
        from fastopt.backends.validate import host_scale
        return host_scale(grad_scale), _ones(device, dtype)
    a = _describe(grad_scale, "grad_scale")
    if a.dtype.kind != "f" and a.dtype != BF16:
        raise TypeError(f"grad_scale must be a real number or a 0-d float array, got dtype {a.dtype}")
    if a.shape != ():
        raise ValueError(f"grad_scale must be a scalar or a 0-d array, got shape {a.shape}")
    check_on_device(a, "grad_scale", device, _device_of)
    if a.dtype == dtype:
        return 1.0, _flat(a)
    # widened exactly by the kernels of its own storage (a 16-bit value: its bits), read in the math dtype
    src = _span_view(a.ptr, 1, _U16) if a.dtype.itemsize == 2 else _flat(a)
    dst = _scratch_array(device, stream, "grad_scale", 1, dtype)
    _kernels_for(a.dtype)[0]["cast_scalar"][1, 1, stream](src, dst)
    return 1.0, dst


def _skip_flag(found_inf, device):
    """One-element device array the kernels read: when set they return without writing."""
    if found_inf is None:
        return _never(device)
    a = check_skip_flag(_describe(found_inf, "found_inf"))
    check_on_device(a, "found_inf", device, _device_of)
    return _flat(a)


# ---------------------------------------------------------------------------------------------------
# Backend interface
# ---------------------------------------------------------------------------------------------------

def prepare(arrays, names, indices=None):
    """Check the arrays of one update (nothing is written or launched); run() launches it. The state dtypes,
    8-bit states and the float32 grads of 16-bit params are the CPU's (device_arrays state_dtypes=True)."""
    return prepare_device(arrays, names, _describe, DTYPES, _WHERE, 1, indices, state_dtypes=True,
                          device=_device_of)


def prepare_grads(grads, name="grads", indices=None):
    """Check arrays for an in-place operation (nothing written): how an optimizer checks its params."""
    return prepare_device((grads,), (name,), _describe, DTYPES, _WHERE, -1, indices, device=_device_of)


check_disjoint = check_prepared_disjoint  # across the prepared calls of one optimizer step


def prepare_fixed(calls):
    """Check an optimizer's params and states once (interface.PrepareOnceBackend, validate.prepare_fixed)."""
    return prepare_fixed_device(calls, _describe, DTYPES, _WHERE, state_dtypes=True, device=_device_of)


def bind_grads(fixed, grads_per_call):
    """The prepared calls of one step (validate.bind_grads): the grads checked, the rest re-checked."""
    return _bind_grads(fixed, grads_per_call)


def step(spec, arrays, names, hp, step, grad_scale, found_inf=None, stochastic=None, tensor_coefs=None):
    run(prepare(arrays, names), spec, hp, step, grad_scale, found_inf, stochastic, tensor_coefs=tensor_coefs)


def run(prepared, spec, hp, step, grad_scale, found_inf=None, stochastic=None, tensor_coefs=None):
    """The update in place; tensor_coefs: given per-tensor coefficients (host numbers,
    validate.check_tensor_coefs) instead of the norms pass. 16-bit params and states run float32 math on their
    bits (kernels.build's kinds); the new 16-bit params are stored to nearest, Kahan-compensated (the
    compensation in the table's T_C column) or stochastically rounded (device_arrays.rounding_of), every family.
    8-bit states (precision.QuantizedState): the family's update_q8 kernel (_run_int8)."""
    rounding, key, index0 = rounding_of(prepared, stochastic)
    given = check_tensor_coefs(spec, tensor_coefs, len(prepared.lists[0]))
    lists = prepared.lists
    int8 = _is_int8(lists)
    if int8:
        numpy_backend.check_int8(prepared, spec)  # an optimizer whose state must stay exact: refused by name
    first = first_nonempty(lists[0])
    dtype, kinds = _call_kinds(lists)
    device = _device_of(first)
    with _on(device):
        skip = _skip_flag(found_inf, device)
        if not any(a.size for a in lists[0]):
            return
        stream = _stream(first, device)
        host_scale, gs = _device_scale(grad_scale, dtype, device, stream)
        h = tuple(dtype.type(x) for x in spec.scalars(hp, step, host_scale))
        variant = spec.variant(hp, step)
        used = _used(lists)
        block = launch_config()[0]
        coefs = None
        if spec.tensor_coefs is not None:  # LARS: one number per tensor, from a norms pass over p and g
            coefs = _tensor_coefs(spec, hp, host_scale, gs, lists, dtype, stream) if given is None else \
                _cuda().to_device(given.astype(dtype), stream=stream)
        if int8:
            _run_int8(spec, lists, kinds, h, gs, used, variant, skip, coefs, rounding, key, index0, device, stream)
            return
        k = _kernels(dtype, kinds)
        table = _table(lists, device, stream)
        P, G, S0, S1, S2, S3, C = table.views
        grid = (table.nchunks, block, stream)
        if spec.two_phase:  # the states and per chunk the norms of p and u; lr * trust ratio per tensor; the step
            scaled_lr = _trust(k, spec, hp, table, h, gs, used, variant, skip, device, stream, dtype)
            _apply(k, spec, grid, table, h, scaled_lr, used, variant, skip, rounding, key, index0)
        elif rounding != ROUND_NEAREST:  # one kernel signature for every family (kernels.make_update_rounded)
            k[f"update_{_SUFFIX[rounding]}"][spec.kernel][grid](
                P, G, S0, S1, S2, S3, C, table.tensors, table.chunks, h, gs, used, variant, skip,
                _ones(device, dtype) if coefs is None else coefs, np.int64(key), _bits64(index0))
        elif len(spec.states) > 3:  # a four-state family (Adan): S3 too
            k["update"][spec.kernel][grid](P, G, S0, S1, S2, S3, table.tensors, table.chunks, h, gs, used, variant,
                                           skip)
        elif coefs is not None:
            k["update"][spec.kernel][grid](P, G, S0, S1, S2, table.tensors, table.chunks, h, gs, used, variant, skip,
                                           coefs)
        else:
            k["update"][spec.kernel][grid](P, G, S0, S1, S2, table.tensors, table.chunks, h, gs, used, variant, skip)


_SUFFIX = {ROUND_KAHAN: "kahan", ROUND_STOCHASTIC: "sr"}  # kernels.build's names of the rounded kernels


def _is_int8(lists) -> bool:
    """Whether a prepared call's states are 8-bit (validated: all of them or none)."""
    return any(lst and isinstance(lst[0], QuantizedState) for lst in lists[2:5])


@functools.lru_cache(maxsize=None)
def _quantizer_tables(device):
    """The 8-bit state's maps, midpoints and buckets on `device` (precision.quantizer_arrays), copied by its first
    8-bit step (a synchronous copy) and kept. Inside _on(device)."""
    return tuple(_cuda().to_device(a) for a in quantizer_arrays())


def _bits64(value: int) -> np.int64:
    """An unsigned 64-bit count (a stochastic-rounding index offset, up to 2^64 - 1) as the int64 of the same bits:
    the kernels read its two 32-bit halves (np.int64 of a value >= 2^63 is an OverflowError)."""
    return np.int64(value - (1 << 64) if value >= 1 << 63 else value)


def _run_int8(spec, lists, kinds, h, gs, used, variant, skip, coefs, rounding, key, index0, device, stream):
    """An update with 8-bit states: one launch of the family's update_q8 kernel (update_q8_kahan / _sr for the
    rounded 16-bit params) over a table of whole quantization blocks, the codes in the states' columns and the
    absmax in T_A0-T_A3. Inside _on(device)."""
    states = state_slots(lists)
    codes = [None if lst is None else [q.codes for q in lst] for lst in states]
    table_lists = list(lists[:2]) + codes[:3] + [comp_slot(lists), codes[3]]
    table_lists += [None if lst is None else [q.absmax for q in lst] for lst in states]
    chunk = int8_chunk()
    table = _table(table_lists, device, stream, chunk)
    P, G, S0, S1, S2, S3, C = table.views
    A0, A1, A2, A3 = table.scales
    maps, mids, buckets = _quantizer_tables(device)
    signed = sum(1 << j for j, lst in enumerate(states) if lst and lst[0].signed)
    name = "update_q8" if rounding == ROUND_NEAREST else f"update_q8_{_SUFFIX[rounding]}"
    kernel = _kernels(F32, kinds, chunk)[name][spec.kernel]
    kernel[table.nchunks, launch_config()[0], stream](
        P, G, S0, S1, S2, S3, A0, A1, A2, A3, C, table.tensors, table.chunks, h, gs, used, variant, skip,
        _ones(device, F32) if coefs is None else coefs, np.int64(key), _bits64(index0), maps, mids, buckets,
        np.int64(signed))


def _used(lists) -> int:
    """The live state slots of a call, bit k for s0-s2 (the call's slots 2-4) and bit 3 for a fourth state (6)."""
    return sum(1 << j for j, lst in enumerate(state_slots(lists)) if lst is not None)


def _apply(k, spec, grid, table, h, scaled_lr, used, variant, skip, rounding, key, index0):
    """A two-phase family's second pass (p -= scaled_lr[t] * u) with the new params stored by the rounding: the apply
    kernel (to nearest: the fewest arguments) or apply_kahan / apply_sr (with the compensation, key and index0)."""
    P, _, S0, S1, S2, _, C = table.views
    if rounding == ROUND_NEAREST:
        k["apply"][spec.kernel][grid](P, S0, S1, S2, table.tensors, table.chunks, h, scaled_lr, used, variant, skip)
    else:
        k[f"apply_{_SUFFIX[rounding]}"][spec.kernel][grid](P, S0, S1, S2, C, table.tensors, table.chunks, h, scaled_lr,
                                                           used, variant, skip, np.int64(key), _bits64(index0))


def _trust(k, spec, hp, table, h, gs, used, variant, skip, device, stream, dtype):
    """A two-phase family's first pass and its trust ratios on the device (no host round trip): the moments
    kernel (new states, per chunk the sums of p^2 and u^2) and lr * trust ratio per tensor, returned."""
    block = launch_config()[0]
    P, G, S0, S1, S2, _, _ = table.views
    partials = _scratch_array(device, stream, "partials", 2 * table.nchunks, np.float64)
    scaled_lr = _scratch_array(device, stream, "scaled_lr", table.ntensors, dtype)
    k["moments"][spec.kernel][table.nchunks, block, stream](P, G, S0, S1, S2, table.tensors, table.chunks, h, gs, used,
                                                            variant, partials, skip)
    k["trust"][table.ntensors, block, stream](partials, table.offsets, np.float64(hp["lr"]), scaled_lr)
    return scaled_lr


def _two_phase_launch(prepared, spec, hp, step, grad_scale, found_inf, stochastic, entry, body):
    """The checks and set-up run() makes for a two-phase call, then body(k, table, h, gs, used, variant, skip,
    block, device, stream, dtype, rounding, key, index0) inside _on(device); None when the call has no element."""
    if not spec.two_phase:
        raise ValueError(f"{entry}: {spec.function_name} is not a two-phase update (only spec.two_phase: LAMB)")
    rounding, key, index0 = rounding_of(prepared, stochastic)
    lists = prepared.lists
    first = first_nonempty(lists[0])
    dtype, kinds = _call_kinds(lists)
    device = _device_of(first)
    with _on(device):
        skip = _skip_flag(found_inf, device)
        if not any(a.size for a in lists[0]):
            return None
        stream = _stream(first, device)
        host_scale, gs = _device_scale(grad_scale, dtype, device, stream)
        h = tuple(dtype.type(x) for x in spec.scalars(hp, step, host_scale))
        table = _table(lists, device, stream)
        return body(_kernels(dtype, kinds), table, h, gs, _used(lists), spec.variant(hp, step), skip,
                    launch_config()[0], device, stream, dtype, rounding, key, index0)


def run_phase1(prepared, spec, hp, step, grad_scale, found_inf=None, stochastic=None):
    """A two-phase update's first pass alone (the moments kernel: states written); a host float64 array
    (narrays, 2): sum p^2 and sum u^2 of each array, its chunks' partials added in chunk order on the host
    (one synchronisation; zeros while found_inf is set). See cython_backend.run_phase1."""
    out = np.zeros((len(prepared.lists[0]), 2), dtype=np.float64)

    def body(k, table, h, gs, used, variant, skip, block, device, stream, dtype, *rounding):
        P, G, S0, S1, S2, _, _ = table.views
        partials = _scratch_array(device, stream, "partials", 2 * table.nchunks, np.float64)
        k["moments"][spec.kernel][table.nchunks, block, stream](P, G, S0, S1, S2, table.tensors, table.chunks, h,
                                                                gs, used, variant, partials, skip)
        sums = partials[:2 * table.nchunks].copy_to_host(stream=stream)
        if hasattr(stream, "synchronize"):  # a stream object (0: the default stream, synchronous copies)
            stream.synchronize()
        nt = _FIELDS * table.ntensors
        owners = table.host[nt:nt + 2 * table.nchunks].reshape(-1, 2)[:, 0]
        np.add.at(out, owners, sums.reshape(-1, 2))

    _two_phase_launch(prepared, spec, hp, step, grad_scale, found_inf, stochastic, "run_phase1", body)
    return out


def run_phase2(prepared, spec, hp, step, grad_scale, scaled_lr, found_inf=None, stochastic=None):
    """A two-phase update's second pass alone (the apply kernel) with scaled_lr[i] (host numbers: lr times the
    whole tensor's trust ratio, stored in the math dtype as the trust kernel stores it) for array i; checked
    (validate.check_scaled_lr) before any launch."""
    lrs = check_scaled_lr(scaled_lr, len(prepared.lists[0]))

    def body(k, table, h, gs, used, variant, skip, block, device, stream, dtype, rounding, key, index0):
        lr_device = _cuda().to_device(lrs.astype(dtype), stream=stream)
        _apply(k, spec, (table.nchunks, block, stream), table, h, lr_device, used, variant, skip, rounding, key, index0)

    _two_phase_launch(prepared, spec, hp, step, grad_scale, found_inf, stochastic, "run_phase2", body)


def _tensor_coefs(spec, hp, host_scale, gs, lists, dtype, stream):
    """spec.tensor_coefs of a call (LARS's trust ratios) as a device array of the math dtype: the per-tensor sums
    of squares of p and g on the device, the ratios on the host (one synchronisation: the host formula is the
    CPU backends' own, specs._lars_coefs), copied back on the call's stream."""
    cuda = _cuda()
    pp = sumsq_per_tensor(Checked((lists[0],), None)).copy_to_host(stream=stream)  # the params, checked already
    gg = sumsq_per_tensor(Checked((lists[1],), None)).copy_to_host(stream=stream)
    scale = float(host_scale) * float(gs.copy_to_host(stream=stream)[0])
    if hasattr(stream, "synchronize"):  # a stream object (0: the default stream, synchronous copies)
        stream.synchronize()
    coefs = spec.tensor_coefs(hp, scale, pp, gg, [len(a.shape) for a in lists[0]])
    return cuda.to_device(coefs.astype(dtype), stream=stream)


def _grads_call(grads, written):
    """(lists, device) of a call on gradients: raw arrays (checked here), a prepare_grads batch or a
    prepared update (its grads)."""
    lists, _ = checked_grads(grads, _describe, DTYPES, _WHERE, written, device=_device_of)
    return lists, _device_of(first_nonempty(lists[0]))


def sumsq_per_tensor(grads, out=None):
    """Sum of squares of each array: float64 device array of shape (len,), deterministic. `out`: a
    float64 device array of that shape to write instead. Runs on the grads' stream, which the result
    remembers."""
    cuda = _cuda()
    lists, device = _grads_call(grads, False)
    arrays = lists[0]
    if out is not None:
        check_sums_out(_describe(out, "out"), len(arrays), device, _device_of)
    block = launch_config()[0]
    with _on(device):
        stream = _stream(first_nonempty(arrays), device)
        if out is None:
            out = cuda.device_array(len(arrays), dtype=np.float64, stream=stream)
        k, _ = _kernels_for(arrays[0].dtype)
        if any(a.size for a in arrays):
            table = _table(lists, device, stream)
            partials = _scratch_array(device, stream, "partials", table.nchunks, np.float64)
            k["sumsq"][table.nchunks, block, stream](table.views[0], table.tensors, table.chunks, partials)
            offsets = table.offsets
        else:  # no element anywhere: every segment is empty, the sums are 0
            partials = _scratch_array(device, stream, "partials", 1, np.float64)
            # zeros that nothing writes (not a new array per call: its deferred free would, a few calls
            # later, synchronise the device inside a step; seen on an H200 with LAMB)
            offsets = _scratch_array(device, stream, "zero_offsets", len(arrays) + 1, np.int64)
        k["sum_segments"][len(arrays), block, stream](partials, offsets, out)
    return _returned(out, stream)


def _global_norm(sq, max_norm=None):
    cuda = _cuda()
    with _on(_device_of(_describe(sq, "sq"))):
        stream = _sq_stream(sq)
        norm = cuda.device_array(1, dtype=np.float64, stream=stream)
        coef = cuda.device_array(1, dtype=np.float64, stream=stream)
        _kernels(F64)["global_norm"][1, launch_config()[0], stream](sq, norm, np.float64(max_norm or 0.0), coef,
                                                                    max_norm is not None)
    return _returned(norm, stream), coef


def device_ordinal(like) -> int:
    """The CUDA device ordinal of the array `like` (interface.DeviceBackend)."""
    return _device_of(_describe(like, "like"))


def device_zeros(n, dtype, like):
    """A device array of n zeros of `dtype` (the optimizer's guard buffers) on the device of `like`,
    made on its stream, which the kernels reading it use."""
    a = _describe(like, "like")
    device = _device_of(a)
    with _on(device):
        stream = _stream(a, device)
        return _returned(_cuda().to_device(np.zeros(n, dtype=dtype), stream=stream), stream)


def device_full(shape, fill, dtype, like):
    """An array of `shape` filled with `fill` on the device of `like`, copied on its stream, so the first
    update (on that stream) reads it filled: how optimizer state for device params should be made."""
    a = _describe(like, "like")
    device = _device_of(a)
    with _on(device):
        return _cuda().to_device(np.full(shape, fill, dtype=dtype), stream=_stream(a, device))


def step_guard(sq, max_norm=None, skip_nonfinite=False, skipped=None):
    """The optimizer's per-step guard in ONE launch, no host synchronisation: from the per-tensor sums of
    squares `sq`, the clip coefficient (0-d float64, None without max_norm) and the skip flag (0-d
    uint8, None without skip_nonfinite); `skipped` (a 0-d int64 device counter) is incremented when
    the step is skipped. Returns (coef, found_inf): scratch of this device and stream, valid until the
    next step_guard there (the optimizer's update kernels read them on the same stream)."""
    device = _device_of(_describe(sq, "sq"))
    with _on(device):
        stream = _sq_stream(sq)
        coef = _scratch_array(device, stream, "guard_coef", 1, np.float64)
        flag = _scratch_array(device, stream, "guard_flag", 1, np.uint8)
        counter = _flat(_describe(skipped, "skipped")) if skipped is not None else \
            _scratch_array(device, stream, "guard_counter", 1, np.int64)
        mode = (1 if max_norm is not None else 0) | (2 if skip_nonfinite else 0)
        _kernels(F64)["step_guard"][1, launch_config()[0], stream](sq, np.float64(max_norm or 0.0), coef, flag,
                                                                   counter, mode)
    return (coef.reshape(()) if max_norm is not None else None,
            flag.reshape(()) if skip_nonfinite else None)


def global_norm(sq):
    """sqrt(sum(sq)) as a 0-d float64 device array (no host synchronisation)."""
    return _global_norm(sq)[0].reshape(())


@functools.lru_cache(maxsize=None)
def _coefficient_kernel():
    """One thread: out[0] = clip coefficient of norm[0], with the kernels' own clip_coefficient (float64)."""
    cuda = _cuda()
    from fastopt.kernels.numba import math as fmath
    coefficient = fmath.build(F64)["clip_coefficient"]

    @cuda.jit
    def clip_coefficient_kernel(norm, max_norm, out):
        out[0] = coefficient(norm[0], max_norm)

    return clip_coefficient_kernel


def clip_coefficient(total_norm, max_norm):
    """min(1, max_norm / (total_norm + 1e-6)) of a norm on the device (NaN for a NaN norm), as a 0-d
    float64 device array computed there without reading the norm back: pass it on as grad_scale=."""
    cuda = _cuda()
    a = _describe(total_norm, "total_norm")
    if a.size != 1:
        raise ValueError(f"total_norm must be a scalar or a 0-d array, got shape {a.shape}")
    device = _device_of(a)
    with _on(device):
        stream = _result_streams.get(a.ptr) or _stream(a, device)
        norm = _flat(a)
        if a.dtype != F64:
            norm64 = cuda.device_array(1, dtype=np.float64, stream=stream)
            _kernels(F64)["cast_scalar"][1, 1, stream](norm, norm64)
            norm = norm64
        out = cuda.device_array(1, dtype=np.float64, stream=stream)
        _coefficient_kernel()[1, 1, stream](norm, np.float64(max_norm), out)
    return _returned(out, stream).reshape(())


def _scale_each(lists, device, mode, host_coef, coef, max_norm):
    """One launch: every array scaled (inside _on(device)); see kernels.py `scale`."""
    arrays = lists[0]
    if not any(a.size for a in arrays):
        return
    stream = _stream(first_nonempty(arrays), device)
    table = _table(lists, device, stream)
    _kernels_for(arrays[0].dtype)[0]["scale"][table.nchunks, launch_config()[0], stream](
        table.views[0], table.tensors, table.chunks, mode, np.float64(host_coef), coef, np.float64(max_norm))


def clip_by_global_norm(grads, sq, max_norm):
    norm, coef = _global_norm(sq, max_norm)
    lists, device = _grads_call(grads, True)
    with _on(device):
        _scale_each(lists, device, 1, 1.0, coef, 0.0)
    return norm.reshape(())


def clip_by_norm(grads, sq, max_norm):
    lists, device = _grads_call(grads, True)
    with _on(device):
        _scale_each(lists, device, 2, 1.0, sq, max_norm)
        stream = _stream(first_nonempty(lists[0]), device)
        norms = _cuda().device_array(sq.size, dtype=np.float64, stream=stream)
        _kernels(F64)["sqrt_all"][_grid(sq.size), launch_config()[0], stream](sq, norms)
    out = [_returned(norms[i:i + 1], stream).reshape(()) for i in range(sq.size)]
    return out if isinstance(grads, (list, tuple)) else out[0]


def scale_(grads, coef):
    lists, device = _grads_call(grads, True)
    with _on(device):
        if isinstance(coef, numbers.Real) and not isinstance(coef, (bool, np.bool_)):
            _scale_each(lists, device, 0, float(coef), _ones(device, F64), 0.0)
            return
        _, dev = _device_scale(coef, F64, device, _stream(first_nonempty(lists[0]), device))
        _scale_each(lists, device, 1, 1.0, dev, 0.0)


def clamp_(grads, clip_value):
    lists, device = _grads_call(grads, True)
    arrays = lists[0]
    if not any(a.size for a in arrays):
        return
    k, math = _kernels_for(arrays[0].dtype)
    with _on(device):
        stream = _stream(first_nonempty(arrays), device)
        table = _table(lists, device, stream)
        k["clamp"][table.nchunks, launch_config()[0], stream](table.views[0], table.tensors, table.chunks,
                                                              math.type(clip_value))
