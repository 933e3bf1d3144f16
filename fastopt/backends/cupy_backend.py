"""The CuPy backend: launches the RawKernels of kernels/cuda/{update,reduce}.cu (source assembled by
cuda_source.py) on CuPy arrays and on anything exposing __cuda_array_interface__ (torch CUDA tensors),
zero-copy and in place.

- One cupy.RawModule per (device, dtype), compiled on first use and cached (CuPy also caches the
  binary on disk). float16 params run float32 math on float32 state.
- One array: a grid-stride kernel with 16-byte vector loads when every pointer is 16-byte aligned, one
  vector per thread (the grid is not capped).
  A list: ONE launch per call (a table of tensor pointers and sizes, one block per chunk of
  cuda_source.CHUNK elements); the table lives on the device and is reused while the same pointers
  come back (an optimizer stepping the same parameters), so a steady-state step copies nothing to the
  device: the hyperparameters travel by value in the launch.
- 8-bit state (precision.QuantizedState of CuPy arrays, state_dtype="int8"): the table path always (codes
  in the state columns, scales beside them), the family's _q8 kernel of an int8 module; the quantizer
  tables are uploaded once per device.
- Norms are two-stage deterministic reductions in float64 and stay on the device (0-d arrays);
  grad_scale may be such a 0-d array: clip-then-update never synchronises with the host.
Streams: every launch, and every scratch allocation (CuPy's memory pool is stream-ordered), happens on
the device of the arrays and on the stream that orders the work producing them: CuPy's current stream
for CuPy arrays, torch.cuda.current_stream(device) for torch CUDA tensors, the exported
__cuda_array_interface__ v3 stream for other arrays (device_arrays.producer_stream; the first array of
the call decides). Arrays this backend returns (sums of squares, norms, coefficients, flags) remember
their stream, so the kernels that read them later run after their producer, whatever stream is
current by then.
"""
from __future__ import annotations

import collections
import contextlib
import importlib.util
import numbers

import numpy as np

from fastopt.backends import cuda_source, numpy_backend
from fastopt.backends.device_arrays import (F16, F32, F64, DeviceArray, StreamMemo, check_on_device, check_skip_flag,
                                             check_sums_out,
                                             checked_grads, device_index, first_nonempty, from_interface,
                                             prepare_device, prepare_fixed_device, producer_stream, rounding_of,
                                             validate_device_arrays)
from fastopt.backends.validate import bind_grads as _bind_grads
from fastopt.backends.validate import (Checked, check_prepared_disjoint, check_scaled_lr, check_tensor_coefs, comp_slot,
                                      state_slots)
from fastopt.precision import QuantizedState, quantizer_arrays
# LR_SLOT: the lr's slot in a device row of scalars (two-phase families' trust kernel)
from fastopt.specs import LR_SLOT, as_float

NAME = "cupy"
AVAILABLE = importlib.util.find_spec("cupy") is not None

BLOCK = cuda_source.BLOCK
CHUNK = cuda_source.CHUNK
TABLE_FIELDS = cuda_source.TABLE_FIELDS
_STATE_COLUMNS = ((2, 9), (3, 10), (4, 11), (8, 13))  # s0-s3: (values or codes, absmax) columns of device.cuh's table
# the params' dtypes the kernels update: bfloat16 too where ml_dtypes names it (CuPy's bfloat16 arrays)
DTYPES = tuple(cuda_source.DTYPES)
_BLOCKS_PER_SM = 8            # grid cap of fo_touch (the benchmark's old ceiling kernel)
_MAX_GRID = 2 ** 31 - 1       # gridDim.x limit
_TABLE_CACHE_SIZE = 64
_SCALARS = np.dtype([("v", np.float64, (16,)), ("key", np.uint64), ("index0", np.uint64)])  # device.cuh `Scalars`
_GS_KIND = {F16: 1, F32: 2, F64: 3}  # device.cuh device_scale's kinds of a device grad_scale
if cuda_source.BF16 is not None:
    _GS_KIND[cuda_source.BF16] = 4
_modules: dict = {}
_functions: dict = {}
_sm_counts: dict = {}
_tables: collections.OrderedDict = collections.OrderedDict()
_pinned_tables: list = []  # tables used on a stream other than their own: kept (see _order_after_upload)
_external_streams: dict = {}  # (cudaStream_t, device) -> cupy Stream
_result_streams = StreamMemo()  # arrays this backend returned -> the stream that wrote them
_quantizers: dict = {}  # device -> the 8-bit state's maps, midpoints and buckets there (precision.quantizer_arrays)


def _cupy():
    import cupy
    return cupy


# ---------------------------------------------------------------------------------------------------
# Arrays
# ---------------------------------------------------------------------------------------------------

def _describe(obj, name):
    cp = _cupy()
    if isinstance(obj, cp.ndarray):
        return DeviceArray(obj, obj.data.ptr, obj.shape, obj.dtype, obj.flags.c_contiguous, True)
    return from_interface(obj, name)


def _unchanged(obj, view) -> bool:
    """A CuPy array checked before (view, its DeviceArray) is surely still as checked when it is the same
    object with the same shape: an ndarray's memory (data) and dtype are read-only; its shape is not (a
    same-size reshape in place). Anything else (torch tensors, whose storage can be swapped under the same
    object) is described again. Saves the optimizer's step a description of every param and state
    (about 7 us per tensor on an H200 machine's CPU, 1.5 ms of a 200-tensor step). An 8-bit state: both its
    arrays so, and the same map."""
    if isinstance(obj, QuantizedState):
        return (isinstance(view, QuantizedState) and obj.signed == view.signed and _unchanged(obj.codes, view.codes)
                and _unchanged(obj.absmax, view.absmax))
    return view.obj is obj and isinstance(obj, _cupy().ndarray) and obj.shape == view.shape


def _stable(obj) -> bool:
    """A CuPy array pins what the kernels read for its whole life: its memory and dtype cannot change, its
    size neither, and a C-contiguous one stays so (only a same-size reshape in place is possible, which
    the elementwise kernels do not see). validate.bind_grads then neither looks at the optimizer's arrays
    again nor, given the same gradient arrays as the last step, checks anything: a 200-tensor class step's
    host time is then its launches."""
    return isinstance(obj, _cupy().ndarray)


def _device_of(a: DeviceArray) -> int:
    cp = _cupy()
    if isinstance(a.obj, cp.ndarray):
        return a.obj.device.id
    device = device_index(a.obj)  # torch: tensor.device
    if device is not None:
        return device
    if a.ptr:
        return cp.cuda.runtime.pointerGetAttributes(a.ptr).device
    return cp.cuda.runtime.getDevice()


# ---------------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------------

class _StreamHandle:
    """A raw cudaStream_t in the CUDA stream protocol, which cupy.cuda.Stream.from_external takes."""

    __slots__ = ("ptr",)

    def __init__(self, ptr):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


def _external_stream(handle, device):
    """The CuPy stream of a raw handle (0/1 legacy default, 2 per-thread default, else a cudaStream_t)."""
    key = (handle, device)
    stream = _external_streams.get(key)
    if stream is None:
        cp = _cupy()
        if len(_external_streams) >= 64:
            _external_streams.pop(next(iter(_external_streams)))
        if hasattr(cp.cuda.Stream, "from_external"):  # CuPy >= 14 (ExternalStream is deprecated there)
            stream = cp.cuda.Stream.from_external(_StreamHandle(handle))
        else:
            stream = cp.cuda.ExternalStream(handle, device)
        _external_streams[key] = stream
    return stream


def _stream_of(a: DeviceArray, device):
    """The stream that orders the work producing `a`: CuPy's current stream for a CuPy array, torch's
    current stream for a torch tensor, the exported one for other arrays (CuPy's current stream when an
    array exports none)."""
    cp = _cupy()
    if not isinstance(a.obj, cp.ndarray):
        handle = producer_stream(a.obj)
        if handle is not None:
            return _external_stream(handle, device)
    return cp.cuda.get_current_stream(device)


@contextlib.contextmanager
def _on(device, stream):
    """`device` and `stream` current: launches, allocations and copies inside go there."""
    cp = _cupy()
    with cp.cuda.Device(device), stream:
        yield


def _returned(array, stream):
    """Remember the stream that writes `array` (returned to the caller): see _stream_of_result."""
    _result_streams.note(array.data.ptr, stream, array)
    return array


def _stream_of_result(array):
    """The stream that wrote an array this backend returned (sums of squares, norms...), else CuPy's
    current stream: the kernels that read it are launched there, after its producer."""
    cp = _cupy()
    return _result_streams.get(array.data.ptr) or cp.cuda.get_current_stream(array.device.id)


_WHERE = "on the GPU"


def _validate(arrays, names, read_only_slot=1):
    return validate_device_arrays(arrays, names, _describe, DTYPES, _WHERE, read_only_slot, state_dtypes=True,
                                  device=_device_of)


# ---------------------------------------------------------------------------------------------------
# Modules and tables
# ---------------------------------------------------------------------------------------------------

def _function(device, dtype, name):
    """Entry point `name` of the module for `dtype` (cuda_source.module_key: a params' dtype, or (params' dtype,
    state dtype, rounding) for another state dtype or rounding) on `device`, compiled on first use."""
    key = (device, dtype, name)
    fn = _functions.get(key)
    if fn is None:
        cp = _cupy()
        mod = _modules.get((device, dtype))
        if mod is None:
            with cp.cuda.Device(device):
                mod = cp.RawModule(code=cuda_source.kernel_source(), options=cuda_source.compile_options(dtype))
            _modules[(device, dtype)] = mod
        with cp.cuda.Device(device):
            fn = mod.get_function(name)
        _functions[key] = fn
    return fn


def _reduction_function(device, name):
    """A dtype-independent kernel (the float64 reductions over sums of squares: fo_global_norm,
    fo_step_guard), the same code in every module: taken from a module already compiled for the device,
    so that float32 users never compile the float64 module for it (seconds on a first call)."""
    for dtype in (F32, F16, F64):
        if (device, dtype) in _modules:
            return _function(device, dtype, name)
    return _function(device, F32, name)


def _max_blocks(device):
    n = _sm_counts.get(device)
    if n is None:
        cp = _cupy()
        n = _sm_counts[device] = cp.cuda.Device(device).attributes["MultiProcessorCount"] * _BLOCKS_PER_SM
    return n


def _aligned(*arrays):
    return all(a is None or a.ptr % 16 == 0 for a in arrays)


def _codes(a):
    """The array a table column points to: an array itself, or an 8-bit state's codes (its absmax goes to
    columns 9-11, or 13 for a fourth state)."""
    return a.codes if isinstance(a, QuantizedState) else a


def table_layout(lists):
    """The host image of the multi-tensor table of device.cuh: (int64 array, ntensors, nchunks, byte
    offset of the chunk list). lists: per slot (params, grads, states; None unused) a list of arrays
    with .ptr and .size; slot 6 a fourth state (Adan), column 8; slot 5 the Kahan compensation, column 12.
    An 8-bit state (a precision.QuantizedState of such arrays) puts its codes in its state column and its
    absmax in the one beside it in _STATE_COLUMNS."""
    n = len(lists[0])
    fields = np.zeros((n, TABLE_FIELDS), dtype=np.int64)
    for k in range(min(len(lists), 2)):
        if lists[k] is not None:
            fields[:, k] = [a.ptr for a in lists[k]]
    for lst, (column, absmax_column) in zip(state_slots(lists), _STATE_COLUMNS):
        if lst is not None:
            fields[:, column] = [_codes(a).ptr for a in lst]
            if lst and isinstance(lst[0], QuantizedState):
                fields[:, absmax_column] = [a.absmax.ptr for a in lst]
    if comp_slot(lists) is not None:  # the Kahan compensation
        fields[:, 12] = [a.ptr for a in comp_slot(lists)]
    sizes = np.array([a.size for a in lists[0]], dtype=np.int64)
    counts = (sizes + CHUNK - 1) // CHUNK
    first = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    fields[:, 5] = sizes
    fields[:, 6] = [_aligned(*(_codes(lst[i]) for lst in lists if lst is not None)) for i in range(n)]
    fields[:, 7] = first
    nchunks = int(counts.sum())
    owner = np.repeat(np.arange(n, dtype=np.int64), counts)
    index = np.arange(nchunks, dtype=np.int64) - np.repeat(first, counts)
    return np.concatenate((fields.ravel(), (owner << 32) | index)), n, nchunks, fields.nbytes


class _Table:
    """Device copy of the multi-tensor table of one set of tensors. `ready`: an event recorded after its
    upload on `stream` (the stream it was made on), until a later use finds it done (then None)."""

    __slots__ = ("buffer", "tensors", "chunks", "ntensors", "nchunks", "stream", "ready", "pinned", "scratch")

    def __init__(self, lists, device, stream):
        cp = _cupy()
        host, self.ntensors, self.nchunks, offset = table_layout(lists)
        if _capturing(stream):
            raise RuntimeError("fastopt: these tensors' pointer table is uploaded by their first step, which "
                               "cannot happen while the stream is captured into a CUDA graph: run one step "
                               "before capturing (a warm-up step, as torch's capturable optimizers need)")
        with cp.cuda.Device(device):
            self.buffer = cp.asarray(host)  # on `stream`, the current one (inside _on)
            self.ready = stream.record()
        self.tensors = self.buffer.data.ptr
        self.chunks = self.tensors + offset
        self.stream = stream.ptr
        self.pinned = False
        self.scratch = {}

    def scratch_array(self, name, n, dtype, stream):
        """A device buffer of n elements for `name` kept with the table, one per stream (the stream orders its
        reuse by the next call). Not a pool allocation per call: a kernel captured into a CUDA graph keeps the
        address, and memory returned to the pool after the capture could be handed to someone else while
        the graph still writes it. Call inside _on()."""
        key = (name, stream.ptr)
        a = self.scratch.get(key)
        if a is None or a.size < n:
            a = self.scratch[key] = _cupy().empty(max(n, 1), dtype=dtype)
        return a[:n]


def _capturing(stream) -> bool:
    is_capturing = getattr(stream, "is_capturing", None)
    return bool(is_capturing()) if is_capturing is not None else False


def _order_after_upload(table, stream):
    """A table made on another stream: `stream` waits for its upload (on the device; on the host while the
    stream is being captured, once: a graph cannot wait for work outside it). The table is then pinned
    (never evicted, never freed): a kernel on this stream, or a graph captured on it, may still read it
    after the stream that allocated it has reused an evicted table's memory."""
    if table.ready is not None:
        if table.ready.done:
            table.ready = None
        elif _capturing(stream):
            table.ready.synchronize()
            table.ready = None
        else:
            stream.wait_event(table.ready)
    if not table.pinned:
        table.pinned = True
        _pinned_tables.append(table)


def _table(lists, device, stream):
    """The table of these tensors, from the cache when the same pointers and sizes come back (on another
    stream too, ordered after the upload: a CUDA graph captured on its own stream finds the table of the
    eager steps before it); call inside _on()."""
    key = (device, tuple(None if lst is None else tuple(_table_entry(a) for a in lst) for lst in lists))
    table = _tables.get(key)
    if table is None:
        table = _tables[key] = _Table(lists, device, stream)
        if len(_tables) > _TABLE_CACHE_SIZE:
            _tables.popitem(last=False)
    else:
        _tables.move_to_end(key)
        _reuse_table(table, stream)
    return table


def _table_entry(a):
    """What a table records of one array: its pointer and size (an 8-bit state's: its codes' and absmax's)."""
    if isinstance(a, QuantizedState):
        return a.codes.ptr, a.absmax.ptr, a.codes.size
    return a.ptr, a.size


def _reuse_table(table, stream):
    """A table made before, used again on `stream`: ordered after its upload when that was another stream;
    pinned when captured (a graph holds its address, and its scratch's, from now on)."""
    if table.stream != stream.ptr:
        _order_after_upload(table, stream)
    elif not table.pinned and _capturing(stream):
        table.pinned = True
        _pinned_tables.append(table)


def _memo_table(prepared, name, lists, device, stream):
    """The table of `lists` (a Checked call's), kept in its memo: a class step given the same arrays as
    the last one gets the same Checked back (validate.bind_grads) and skips building the table's key (a
    tuple of every pointer: ~0.3 us per tensor). Other callers pass raw arrays: the table cache as usual."""
    memo = getattr(prepared, "memo", _NO_MEMO)
    if memo is _NO_MEMO:
        return _table(lists, device, stream)
    if memo is None:
        memo = prepared.memo = {}
    table = memo.get(name)
    if table is None or table[0] != device:
        table = memo[name] = (device, _table(lists, device, stream))
    else:
        _reuse_table(table[1], stream)
    return table[1]


_NO_MEMO = object()


def _module_of(lists, rounding=cuda_source.ROUND_NEAREST):
    """The module of a call's update kernels (cuda_source.module_key): its params' dtype and, when not the
    default, its states' (one dtype per call, validated), the params' rounding (_rounding) and its grads'
    (float32 grads of 16-bit params; one dtype per call, validated)."""
    states = [lst[0] for k, lst in enumerate(lists) if k >= 2 and k != 5 and lst]  # slot 5: Kahan's compensation
    grads = lists[1][0].dtype if len(lists) > 1 and lists[1] else None
    if states and isinstance(states[0], QuantizedState):  # 8-bit state (validated: all of the call's or none)
        return cuda_source.module_key(lists[0][0].dtype, cuda_source.INT8, rounding, grads)
    return cuda_source.module_key(lists[0][0].dtype, states[0].dtype if states else None, rounding, grads)


class _Launch:
    """What run() works out once per Checked call (kept in its memo): whether any element is there, the
    module of its dtypes (cuda_source.module_key: the params' dtype and, when not the default, the states'),
    the device, whether its states are 8-bit, and for one array its kernel's pointer arguments, size, vector flag and
    grid."""

    __slots__ = ("nonempty", "dtype", "device", "int8", "single")

    def __init__(self, lists):
        params = lists[0]
        self.nonempty = any(a.size for a in params)
        self.dtype = _module_of(lists) if params else None
        self.device = _device_of(first_nonempty(params)) if self.nonempty else None
        self.int8 = _int8(self.dtype)
        self.single = None
        if self.nonempty and len(params) == 1 and not self.int8:  # 8-bit state: the table path
            slots = [lst[0] if lst is not None else None for lst in lists] + [None] * (7 - len(lists))
            n = params[0].size
            # one vector per thread, not capped: measured on an H100 at 2^28 (issue 11), a grid capped at 8
            # blocks per SM (3-5 resident) reached 2765 GB/s, the uncapped one 2909; the loop is grid-stride
            grid = min(_blocks(n, 16 // params[0].dtype.itemsize), _MAX_GRID)
            # p, g, s0, s1, s2, s3: slot 5 (the Kahan compensation) goes through the table (run), slot 6 is s3
            self.single = (tuple(_ptr(a) for a in slots[:5] + slots[6:]), np.int64(n), np.int32(_aligned(*slots)),
                           grid)


def _launch_of(prepared) -> _Launch:
    memo = prepared.memo
    if memo is None:
        memo = prepared.memo = {}
    launch = memo.get("launch")
    if launch is None:
        launch = memo["launch"] = _Launch(prepared.lists)
    return launch


# ---------------------------------------------------------------------------------------------------
# Launch arguments
# ---------------------------------------------------------------------------------------------------

def _ptr(a):
    return np.uint64(0 if a is None else a.ptr)


def _pack(scalars, key=0, index0=0):
    packed = np.zeros((), dtype=_SCALARS)
    packed["v"][:len(scalars)] = scalars
    packed["key"], packed["index0"] = key, index0
    return packed[()]


def _grad_scale(grad_scale, device):
    """(host factor, device pointer, kind) of grad_scale: a real number, or a 0-d float array on the GPU
    (on the call's device) read by the kernel (no synchronisation)."""
    if grad_scale is None:
        return 1.0, np.uint64(0), np.int32(0)
    if isinstance(grad_scale, numbers.Real) and not isinstance(grad_scale, (bool, np.bool_)):
        return as_float("grad_scale", grad_scale), np.uint64(0), np.int32(0)
    if isinstance(grad_scale, np.ndarray):
        from fastopt.backends.validate import host_scale
        return host_scale(grad_scale), np.uint64(0), np.int32(0)
    a = _describe(grad_scale, "grad_scale")
    if a.dtype not in _GS_KIND:
        raise TypeError(f"grad_scale must be a real number or a 0-d float array, got dtype {a.dtype}")
    if a.shape != ():
        raise ValueError(f"grad_scale must be a scalar or a 0-d array, got shape {a.shape}")
    check_on_device(a, "grad_scale", device, _device_of)
    return 1.0, np.uint64(a.ptr), np.int32(_GS_KIND[a.dtype])


def _skip_flag(found_inf, device):
    """Device pointer of the skip flag (0: never skip): a one-element bool/uint8 device array on the call's
    device, read by the kernels, which return without writing when it is set."""
    if found_inf is None:
        return np.uint64(0)
    a = check_skip_flag(_describe(found_inf, "found_inf"))
    check_on_device(a, "found_inf", device, _device_of)
    return np.uint64(a.ptr)


def _blocks(n, per_thread):
    return max(1, -(-n // (BLOCK * per_thread)))


# ---------------------------------------------------------------------------------------------------
# Backend interface
# ---------------------------------------------------------------------------------------------------

def prepare(arrays, names, indices=None):
    """Check the arrays of one update (nothing is written or launched); run() launches it."""
    return prepare_device(arrays, names, _describe, DTYPES, _WHERE, 1, indices, state_dtypes=True,
                          device=_device_of)


def prepare_grads(grads, name="grads", indices=None):
    """Check arrays for an in-place operation (nothing written): how an optimizer checks its params."""
    return prepare_device((grads,), (name,), _describe, DTYPES, _WHERE, -1, indices, device=_device_of)


check_disjoint = check_prepared_disjoint  # across the prepared calls of one optimizer step


def prepare_fixed(calls):
    """Check an optimizer's params and states once (interface.PrepareOnceBackend, validate.prepare_fixed)."""
    return prepare_fixed_device(calls, _describe, DTYPES, _WHERE, _unchanged, _stable, state_dtypes=True,
                                device=_device_of)


def bind_grads(fixed, grads_per_call):
    """The prepared calls of one step (validate.bind_grads): the grads checked, the rest re-checked."""
    return _bind_grads(fixed, grads_per_call)


def step(spec, arrays, names, hp, step, grad_scale, found_inf=None, stochastic=None, tensor_coefs=None):
    run(prepare(arrays, names), spec, hp, step, grad_scale, found_inf, stochastic, tensor_coefs=tensor_coefs)


def _rounding(prepared, stochastic, scalars_at):
    """(rounding of the module, key, index0) of a call (device_arrays.rounding_of, whose refusals it makes), and
    stochastic rounding refused in a capturable step (its key changes every step)."""
    mode = rounding_of(prepared, stochastic)
    if stochastic is not None and scalars_at is not None:
        raise NotImplementedError("stochastic_rounding=True with capturable=True: the rounding key changes every "
                                  "step, and a captured step would replay one")
    return mode


def run(prepared, spec, hp, step, grad_scale, found_inf=None, stochastic=None, tensor_coefs=None, scalars_at=None):
    """The update in place; tensor_coefs: given per-tensor coefficients (host numbers,
    validate.check_tensor_coefs) instead of the norms pass; scalars_at: the kernels read the step's scalars
    from this device row (16 float64: capturable=True, select_scalars) instead of spec.scalars(hp, step)
    (`step` then only picks the kernel variant)."""
    rounding, key, index0 = _rounding(prepared, stochastic, scalars_at)
    given = check_tensor_coefs(spec, tensor_coefs, len(prepared.lists[0]))
    lists = prepared.lists
    params = lists[0]
    launch = _launch_of(prepared)
    skip = _skip_flag(found_inf, launch.device if launch.nonempty else None)
    if launch.int8:
        numpy_backend.check_int8(prepared, spec)  # an optimizer whose state must stay exact: refused by name
    if not launch.nonempty:
        return
    dtype, device = launch.dtype, launch.device
    if rounding != cuda_source.ROUND_NEAREST:
        dtype = _module_of(lists, rounding)
    stream = _stream_of(first_nonempty(params), device)
    host_scale, gs_ptr, gs_kind = _grad_scale(grad_scale, device)
    scalars = _pack(spec.scalars(hp, step, host_scale) if scalars_at is None else (), key, index0)
    at = np.uint64(0) if scalars_at is None else np.uint64(scalars_at.data.ptr)
    with _on(device, stream):
        if spec.two_phase:
            _two_phase(spec.kernel, lists, dtype, device, stream, scalars, gs_ptr, gs_kind, hp["lr"], skip, at,
                       _memo_table(prepared, "table", lists, device, stream))
            return
        variant = spec.variant(hp, step)
        if launch.int8:
            _run_int8(prepared, spec, hp, host_scale, grad_scale, gs_kind, dtype, device, stream, scalars, gs_ptr,
                      skip, variant, given, at)
            return
        if spec.tensor_coefs is not None:
            _per_tensor(spec, hp, host_scale, grad_scale, gs_kind, lists, dtype, device, stream, scalars, gs_ptr,
                        skip, variant, given, at)
            return
        if launch.single is not None and rounding != cuda_source.ROUND_KAHAN:  # Kahan: the table's c column
            pointers, n, vec, grid = launch.single
            fn = _function(device, dtype, cuda_source.update_kernel_name(spec.kernel, variant, False))
            fn((grid,), (BLOCK,), (*pointers, n, scalars, gs_ptr, gs_kind, vec, skip, at))
        else:
            table = _memo_table(prepared, "table", lists, device, stream)
            if table.nchunks:
                fn = _function(device, dtype, cuda_source.update_kernel_name(spec.kernel, variant, True))
                fn((table.nchunks,), (BLOCK,),
                   (np.uint64(table.tensors), np.uint64(table.chunks), scalars, gs_ptr, gs_kind, skip, at))


def _per_tensor(spec, hp, host_scale, grad_scale, gs_kind, lists, dtype, device, stream, scalars, gs_ptr, skip,
                variant, given=None, at=np.uint64(0)):
    """A family reading one number per tensor (spec.tensor_coefs: LARS's trust ratio): the per-tensor sums of
    squares of p and g on the device, the numbers on the host (one synchronisation; the CPU backends' own
    formula, specs._lars_coefs), then the family's multi-tensor kernel with them (a single array too); the
    numbers `given` (host float64, one per tensor) instead when the caller has them. Inside _on()."""
    table = _table(lists, device, stream)
    if not table.nchunks:
        return
    coefs = _tensor_coefs(spec, hp, host_scale, grad_scale, gs_kind, lists, given)
    fn = _function(device, dtype, cuda_source.update_kernel_name(spec.kernel, variant, True))
    fn((table.nchunks,), (BLOCK,), (np.uint64(table.tensors), np.uint64(table.chunks), scalars, gs_ptr, gs_kind,
                                    skip, coefs, at))


def _tensor_coefs(spec, hp, host_scale, grad_scale, gs_kind, lists, given=None):
    """The per-tensor numbers of a call (spec.tensor_coefs) on the device: `given` (host float64), or the
    sums of squares of p and g reduced on the device and the numbers made on the host (one synchronisation;
    the CPU backends' own formula, specs._lars_coefs). Inside _on()."""
    cp = _cupy()
    if given is not None:
        return cp.asarray(given, dtype=cp.float64)
    pp = sumsq_per_tensor(Checked((lists[0],), None)).get()  # the params, checked already
    gg = sumsq_per_tensor(Checked((lists[1],), None)).get()
    scale = host_scale if gs_kind == 0 else float(cp.asarray(grad_scale).get())  # a 0-d device grad_scale
    return cp.asarray(spec.tensor_coefs(hp, scale, pp, gg, [len(a.shape) for a in lists[0]]), dtype=cp.float64)


def _int8(key) -> bool:
    """Whether a module_key is an 8-bit state module's (state_dtype="int8")."""
    return key is not None and cuda_source.module_dtypes(key)[1] == cuda_source.INT8


def _quantizer_tables(device, stream):
    """The 8-bit state's maps, midpoints and buckets on `device` (precision.quantizer_arrays), uploaded by its
    first 8-bit step and kept; inside _on()."""
    tables = _quantizers.get(device)
    if tables is None:
        if _capturing(stream):
            raise RuntimeError("fastopt: the 8-bit state's quantizer tables are uploaded by the first 8-bit step on a "
                               "device, which cannot happen while the stream is captured into a CUDA graph: run one "
                               "step before capturing (a warm-up step, as torch's capturable optimizers need)")
        cp = _cupy()
        tables = tuple(cp.asarray(a) for a in quantizer_arrays())
        stream.record().synchronize()  # uploaded before any stream reads them: once per device
        _quantizers[device] = tables
    return tables


def _run_int8(prepared, spec, hp, host_scale, grad_scale, gs_kind, dtype, device, stream, scalars, gs_ptr, skip,
              variant, given=None, at=np.uint64(0)):
    """An update with 8-bit states (precision.QuantizedState of CuPy arrays): one launch of the family's _q8
    kernel over the table (codes in the state columns, scales in 9-11; one array too), after the norms pass of
    a family reading a number per tensor (LARS). Every block dequantizes, updates and requantizes whole
    256-element blocks in one pass, with the CPU's bits. Inside _on()."""
    lists = prepared.lists
    table = _memo_table(prepared, "table", lists, device, stream)
    if not table.nchunks:
        return
    coefs = np.uint64(0)
    if spec.tensor_coefs is not None:
        coefs = _tensor_coefs(spec, hp, host_scale, grad_scale, gs_kind, lists, given)
    maps, mids, buckets = _quantizer_tables(device, stream)
    states = state_slots(lists)
    signed = sum(1 << k for k, slot in enumerate(states) if slot and slot[0].signed)
    fn = _function(device, dtype, cuda_source.int8_kernel_name(spec.kernel, variant))
    fn((table.nchunks,), (BLOCK,), (np.uint64(table.tensors), np.uint64(table.chunks), scalars, gs_ptr, gs_kind, coefs,
                                    maps, mids, buckets, np.int32(signed), skip, at))


def _two_phase(family, lists, dtype, device, stream, scalars, gs_ptr, gs_kind, lr, skip, at=np.uint64(0), table=None):
    """A two-phase family (LAMB): its moments kernel (new states; per chunk the float64 sums of p^2 and
    u^2), its trust kernel (per tensor, lr * trust ratio from its chunks' sums) and its apply kernel
    (the step), named from the family by cuda_source.two_phase_kernel_names. `at`: the device row of
    scalars (capturable), whose last slot is the lr (specs.LR_SLOT). Inside _on()."""
    cp = _cupy()
    table = _table(lists, device, stream) if table is None else table
    if not table.nchunks:
        return
    _, trust, apply = (_function(device, dtype, name) for name in cuda_source.two_phase_kernel_names(family))
    partials = _moments(family, table, dtype, device, scalars, gs_ptr, gs_kind, skip, at, stream)
    scaled_lr = table.scratch_array("scaled_lr", table.ntensors, cp.float64, stream)
    lr_at = np.uint64(0) if not at else np.uint64(int(at) + 8 * LR_SLOT)
    trust((table.ntensors,), (BLOCK,), (np.uint64(table.tensors), partials, np.float64(lr), scaled_lr, lr_at))
    apply((table.nchunks,), (BLOCK,), (np.uint64(table.tensors), np.uint64(table.chunks), scalars, scaled_lr, skip,
                                       at))


def _moments(family, table, dtype, device, scalars, gs_ptr, gs_kind, skip, at=np.uint64(0), stream=None):
    """Launch a two-phase family's moments kernel over a table; its per-chunk partials (float64, 2 per chunk:
    sum p^2, sum u^2; zeros while the skip flag is set), ordered on the current stream. Inside _on()."""
    cp = _cupy()
    moments = _function(device, dtype, cuda_source.two_phase_kernel_names(family)[0])
    if stream is None:  # run_phase1: the sums go to the host at once
        partials = cp.empty(2 * table.nchunks, dtype=cp.float64)  # from the pool, ordered on the current stream
    else:
        partials = table.scratch_array("partials", 2 * table.nchunks, cp.float64, stream)
    moments((table.nchunks,), (BLOCK,), (np.uint64(table.tensors), np.uint64(table.chunks), scalars, gs_ptr, gs_kind,
                                         partials, skip, at))
    return partials


def _two_phase_setup(prepared, spec, hp, step, grad_scale, found_inf, stochastic, entry):
    """(lists, dtype, device, stream, scalars, gs_ptr, gs_kind, skip) of a two-phase call, or None when it
    has no element; the checks run() makes plus the family's. The module is the params' rounding's (kahan=True:
    the compensation in the table's c column; stochastic_rounding=True: its key and index offset in the
    scalars), which only the apply kernel (run_phase2) uses."""
    if not spec.two_phase:
        raise ValueError(f"{entry}: {spec.function_name} is not a two-phase update (only spec.two_phase: LAMB)")
    rounding, key, index0 = rounding_of(prepared, stochastic)
    lists = prepared.lists
    if not any(a.size for a in lists[0]):
        _skip_flag(found_inf, None), _grad_scale(grad_scale, None)  # checked all the same
        return None
    first = first_nonempty(lists[0])
    device = _device_of(first)
    skip = _skip_flag(found_inf, device)
    stream = _stream_of(first, device)
    host_scale, gs_ptr, gs_kind = _grad_scale(grad_scale, device)
    return (lists, _module_of(lists, rounding), device, stream, _pack(spec.scalars(hp, step, host_scale), key, index0),
            gs_ptr, gs_kind, skip)


def run_phase1(prepared, spec, hp, step, grad_scale, found_inf=None, stochastic=None):
    """A two-phase update's first pass alone (the moments kernel: states written); a host float64 array
    (narrays, 2): sum p^2 and sum u^2 of each array, its chunks' partials added in chunk order on the host
    (one synchronisation; zeros while found_inf is set). See cython_backend.run_phase1."""
    out = np.zeros((len(prepared.lists[0]), 2), dtype=np.float64)
    setup = _two_phase_setup(prepared, spec, hp, step, grad_scale, found_inf, stochastic, "run_phase1")
    if setup is None:
        return out
    lists, dtype, device, stream, scalars, gs_ptr, gs_kind, skip = setup
    with _on(device, stream):
        table = _table(lists, device, stream)
        if not table.nchunks:
            return out
        partials = _moments(spec.kernel, table, dtype, device, scalars, gs_ptr, gs_kind, skip).get()
    np.add.at(out, _chunk_owners(lists[0]), partials.reshape(-1, 2))
    return out


def _chunk_owners(params):
    """The array each chunk of the multi-tensor table belongs to, in chunk order (table_layout's)."""
    counts = (np.array([a.size for a in params], dtype=np.int64) + CHUNK - 1) // CHUNK
    return np.repeat(np.arange(len(params), dtype=np.int64), counts)


def run_phase2(prepared, spec, hp, step, grad_scale, scaled_lr, found_inf=None, stochastic=None):
    """A two-phase update's second pass alone (the apply kernel) with scaled_lr[i] (host numbers: lr times the
    whole tensor's trust ratio) for array i; checked (validate.check_scaled_lr) before any launch."""
    lrs = check_scaled_lr(scaled_lr, len(prepared.lists[0]))
    setup = _two_phase_setup(prepared, spec, hp, step, grad_scale, found_inf, stochastic, "run_phase2")
    if setup is None:
        return
    lists, dtype, device, stream, scalars, _, _, skip = setup
    cp = _cupy()
    with _on(device, stream):
        table = _table(lists, device, stream)
        if not table.nchunks:
            return
        apply = _function(device, dtype, cuda_source.two_phase_kernel_names(spec.kernel)[2])
        lr_device = cp.asarray(lrs, dtype=cp.float64)  # copied on `stream`, before the launch that reads it
        apply((table.nchunks,), (BLOCK,), (np.uint64(table.tensors), np.uint64(table.chunks), scalars, lr_device,
                                           skip, np.uint64(0)))


def _grads_call(grads, written):
    """(lists, device, stream) of a call on gradients: raw arrays (checked here), a prepare_grads batch or
    a prepared update (its grads)."""
    lists, _ = checked_grads(grads, _describe, DTYPES, _WHERE, written, device=_device_of)
    first = first_nonempty(lists[0])
    device = _device_of(first)
    return lists, device, _stream_of(first, device)


def sumsq_per_tensor(grads, out=None):
    """Sum of squares of each array: a float64 device array of shape (len,), deterministic. `out`: a
    float64 device array of that shape to write instead (the optimizer gathers several buckets' sums
    into one buffer). Runs on the grads' stream, which the result remembers."""
    cp = _cupy()
    lists, device, stream = _grads_call(grads, False)
    dtype = lists[0][0].dtype
    if out is not None:
        check_sums_out(_describe(out, "out"), len(lists[0]), device, _device_of)
    with _on(device, stream):
        table = _memo_table(grads, "grads table", lists, device, stream)
        if out is None:
            out = cp.zeros(table.ntensors, dtype=cp.float64)
        elif not table.nchunks:
            out.fill(0)
        if table.nchunks:
            partials = table.scratch_array("partials", table.nchunks, cp.float64, stream)
            tensors = np.uint64(table.tensors)
            _function(device, dtype, "fo_sumsq_chunks")(
                (table.nchunks,), (BLOCK,), (tensors, np.uint64(table.chunks), partials))
            _function(device, dtype, "fo_sumsq_tensors")((table.ntensors,), (BLOCK,), (tensors, partials, out))
    base = getattr(out, "base", None)
    if base is not None:  # a slice of the optimizer's buffer: the guard reads the whole buffer
        _returned(base, stream)
    return _returned(out, stream)


def _global_norm(sq, max_norm=None):
    cp = _cupy()
    device, stream = sq.device.id, _stream_of_result(sq)
    with _on(device, stream):
        norm = cp.empty((), dtype=cp.float64)
        coef = cp.empty((), dtype=cp.float64) if max_norm is not None else None
        _reduction_function(device, "fo_global_norm")(
            (1,), (BLOCK,), (sq, np.int64(sq.size), norm, np.float64(max_norm or 0.0),
                             coef if coef is not None else np.uint64(0)))
    return _returned(norm, stream), coef if coef is None else _returned(coef, stream)


def device_ordinal(like) -> int:
    """The CUDA device ordinal of the array `like` (interface.DeviceBackend)."""
    return _device_of(_describe(like, "like"))


def device_zeros(n, dtype, like):
    """A device array of n zeros of `dtype` on the device of `like`, made on its stream (the optimizer's
    guard buffers)."""
    cp = _cupy()
    a = _describe(like, "like")
    device = _device_of(a)
    stream = _stream_of(a, device)
    with _on(device, stream):
        return _returned(cp.zeros(n, dtype=dtype), stream)


def device_full(shape, fill, dtype, like):
    """An array of `shape` filled with `fill` on the device of `like`, written on its producer stream, so
    the first update (on that stream) reads it filled: how optimizer state for device params should be
    made (a torch tensor on cuda:1 under torch.cuda.stream(s): on device 1, filled on s)."""
    cp = _cupy()
    a = _describe(like, "like")
    device = _device_of(a)
    stream = _stream_of(a, device)
    with _on(device, stream):
        return cp.full(shape, fill, dtype=dtype)


def step_guard(sq, max_norm=None, skip_nonfinite=False, skipped=None):
    """The optimizer's per-step guard in ONE launch, no host synchronisation (reduce.cu fo_step_guard):
    from the per-tensor sums of squares `sq`, the clip coefficient (0-d float64, or None without
    max_norm) and the skip flag (0-d bool, or None without skip_nonfinite); `skipped` (a 0-d int64
    device counter) is incremented when the step is skipped. Returns (coef, found_inf). Runs on the
    stream that wrote `sq`."""
    device, stream = sq.device.id, _stream_of_result(sq)
    null = np.uint64(0)
    with _on(device, stream):
        coef, flag = _guard_outputs(sq, stream)
        coef = coef if max_norm is not None else None
        flag = flag if skip_nonfinite else None
        _reduction_function(device, "fo_step_guard")(
            (1,), (BLOCK,), (sq, np.int64(sq.size), np.float64(max_norm or 0.0), null if coef is None else coef,
                             null if flag is None else flag, null if skipped is None else skipped, null))
    return (coef if coef is None else _returned(coef, stream)), (flag if flag is None else _returned(flag, stream))


_guard_buffers: collections.OrderedDict = collections.OrderedDict()  # (sq ptr, stream ptr) -> (coef, flag)
# the same for the pairs a CUDA graph captured: never evicted (the graph writes and reads them at every replay;
# evicted, they would go back to the pool and the replays would write into memory handed out again)
_pinned_guard_buffers: dict = {}


def _guard_outputs(sq, stream):
    """step_guard's outputs for these sums (the optimizer's buffer) on this stream: the same two device
    scalars every step (a CUDA graph of the step keeps their addresses), valid until the next step_guard on
    them, which the stream orders after the kernels reading them. The 256 most recent pairs are kept, and
    every pair used in a capture. Inside _on()."""
    cp = _cupy()
    key = (sq.data.ptr, stream.ptr)
    out = _pinned_guard_buffers.get(key)
    if out is not None:
        return out
    out = _guard_buffers.get(key)
    if out is None:
        out = _guard_buffers[key] = (cp.empty((), dtype=cp.float64), cp.empty((), dtype=cp.bool_))
        if len(_guard_buffers) > 256:
            _guard_buffers.popitem(last=False)
    else:
        _guard_buffers.move_to_end(key)
    if _capturing(stream):
        _pinned_guard_buffers[key] = _guard_buffers.pop(key)
    return out


def global_norm(sq):
    """sqrt(sum(sq)) as a 0-d float64 device array (no host synchronisation)."""
    return _global_norm(sq)[0]


def clip_coefficient(total_norm, max_norm):
    """min(1, max_norm / (total_norm + 1e-6)) of a norm on the device (NaN for a NaN norm), as a 0-d
    device array computed there without reading the norm back: pass it on as grad_scale=."""
    cp = _cupy()
    if isinstance(total_norm, cp.ndarray):
        device, stream = total_norm.device.id, _stream_of_result(total_norm)
    else:
        a = _describe(total_norm, "total_norm")
        device = _device_of(a)
        stream = _stream_of(a, device)
    with _on(device, stream):
        return _returned(cp.minimum(max_norm / (cp.asarray(total_norm) + 1e-6), 1.0), stream)


def _scale_launch(lists, device, stream, mode, host_coef, coef_ptr, max_norm):
    """fo_scale_multi over the checked gradients (inside _on(device, stream))."""
    table = _table(lists, device, stream)
    if table.nchunks:
        _function(device, lists[0][0].dtype, "fo_scale_multi")(
            (table.nchunks,), (BLOCK,), (np.uint64(table.tensors), np.uint64(table.chunks), np.int32(mode),
                                         np.float64(host_coef), coef_ptr, np.float64(max_norm)))


def clip_by_global_norm(grads, sq, max_norm):
    """Scale every array by min(1, max_norm / (total + 1e-6)) on the device; returns the 0-d total norm."""
    norm, coef = _global_norm(sq, max_norm)
    lists, device, stream = _grads_call(grads, True)
    with _on(device, stream):
        _scale_launch(lists, device, stream, 1, 1.0, np.uint64(coef.data.ptr), 0.0)
    return norm


def clip_by_norm(grads, sq, max_norm):
    """Per array: scale by min(1, max_norm / (||g|| + 1e-6)); returns the 0-d norms (a list for a list)."""
    cp = _cupy()
    lists, device, stream = _grads_call(grads, True)
    with _on(device, stream):  # the norms stay on the grads' device, made on their stream
        _scale_launch(lists, device, stream, 2, 1.0, np.uint64(sq.data.ptr), max_norm)
        norms = cp.sqrt(sq)
    out = [_returned(norms[i], stream) for i in range(norms.size)]
    return out if isinstance(grads, (list, tuple)) else out[0]


def scale_(grads, coef):
    """g *= coef in place; coef a float or a 0-d device array (read by the kernel)."""
    cp = _cupy()
    lists, device, stream = _grads_call(grads, True)
    with _on(device, stream):
        if isinstance(coef, numbers.Real) and not isinstance(coef, (bool, np.bool_)):
            _scale_launch(lists, device, stream, 0, float(coef), np.uint64(0), 0.0)
            return
        coef = cp.asarray(coef, dtype=cp.float64)  # the float64 copy on the grads' device: the kernel reads it
        if coef.shape != ():
            raise ValueError(f"coef must be a scalar or a 0-d array, got shape {coef.shape}")
        _scale_launch(lists, device, stream, 1, 1.0, np.uint64(coef.data.ptr), 0.0)


def clamp_(grads, clip_value):
    lists, device, stream = _grads_call(grads, True)
    with _on(device, stream):
        table = _table(lists, device, stream)
        if table.nchunks:
            _function(device, lists[0][0].dtype, "fo_clamp_multi")(
                (table.nchunks,), (BLOCK,), (np.uint64(table.tensors), np.uint64(table.chunks),
                                             np.float64(clip_value)))


def touch(arrays):
    """Bandwidth ceiling for the benchmark: one array each of p, g, states; the traffic of an update with
    trivial math (p and states read and written, g read)."""
    lists, _ = _validate(tuple(arrays), ("params", "grads", "state0", "state1", "state2")[:len(arrays)])
    slots = [lst[0] for lst in lists] + [None] * (5 - len(lists))
    n, device = slots[0].size, _device_of(slots[0])
    with _on(device, _stream_of(slots[0], device)):
        _function(device, _module_of(lists), "fo_touch")(
            (min(_blocks(n, 1), _max_blocks(device)),), (BLOCK,),
            (*(_ptr(a) for a in slots), np.int64(n), np.int32(len(lists) - 2)))


# ---------------------------------------------------------------------------------------------------
# Capturable steps (interface.CapturableBackend, fastopt/capture.py)
# ---------------------------------------------------------------------------------------------------

def _like_stream(like):
    a = _describe(like, "like")
    device = _device_of(a)
    return device, _stream_of(a, device)


def capturing(like) -> bool:
    """Whether the stream that updates arrays like `like` is being captured into a CUDA graph."""
    return _capturing(_like_stream(like)[1])


def select_scalars(rows, capacity, meta, counters, out, flag, own_flag, overflow, like):
    """reduce.cu fo_select_scalars, one block, on the stream of `like` (the params'): every group's step
    counter advanced and its row for that step copied into `out`; no host synchronisation."""
    device, stream = _like_stream(like)
    with _on(device, stream):
        _reduction_function(device, "fo_select_scalars")(
            (1,), (BLOCK,), (rows, np.int64(capacity), meta, np.int32(counters.size), counters, out, flag,
                             np.int32(bool(own_flag)), overflow))


def upload(dst, host, like):
    """dst[...] = host (NumPy) on the stream of `like`, ordered before the kernels launched there later. A
    copy from host memory cannot be captured into a graph: RuntimeError while that stream is captured."""
    device, stream = _like_stream(like)
    if _capturing(stream):
        raise RuntimeError("fastopt: capturable=True keeps the step's scalars on the device, and they must be "
                           "(re)computed outside a CUDA graph capture: run one step before capturing, and again "
                           "after changing a param group's values or loading a state dict")
    with _on(device, stream):
        dst.set(np.ascontiguousarray(host, dtype=dst.dtype).reshape(dst.shape), stream=stream)
