"""The Numba CUDA backend: kernels/numba (math as @cuda.jit(device=True) functions, compiled lazily on
first use per dtype), on Numba device arrays and on anything exposing __cuda_array_interface__ (CuPy
arrays, torch CUDA tensors), zero-copy and in place. float32 and float64.

Numba kernels cannot take a list of arrays (nor walk a table of raw pointers), so a list is updated by
one asynchronous launch per array from an already-compiled kernel, with no synchronisation and no
per-array allocation; the CuPy backend is the one-launch-per-list path. Norms and clipping are the same
deterministic two-stage float64 reductions as on CuPy and stay on the device; a 0-d device grad_scale is
read by the kernels. Under NUMBA_ENABLE_CUDASIM=1 the same code runs on the CPU simulator (tiny blocks).
"""
from __future__ import annotations

import functools
import importlib.util
import numbers

import numpy as np

from fastopt.backends.device_arrays import (F32, F64, DeviceArray, check_skip_flag, from_interface,
                                             prepare_device, validate_device_arrays)
from fastopt.backends.validate import check_prepared_disjoint

NAME = "numba"
AVAILABLE = importlib.util.find_spec("numba") is not None
DTYPES = (F32, F64)


def _cuda():
    from numba import cuda
    return cuda


def simulating() -> bool:
    from numba import config
    return bool(config.ENABLE_CUDASIM)


@functools.lru_cache(maxsize=None)
def launch_config():
    """(threads per block, most blocks per array). The simulator runs each thread as a Python thread:
    keep it tiny there. The block cap is a constant so that reductions sum in the same order on any GPU."""
    return (32, 4) if simulating() else (256, 1024)


def _kernels(dtype):
    from fastopt.kernels.numba import kernels
    return kernels.build(np.dtype(dtype), launch_config()[0])


def _grid(n):
    block, most = launch_config()
    return max(1, min(-(-n // block), most))


# ---------------------------------------------------------------------------------------------------
# Arrays
# ---------------------------------------------------------------------------------------------------

def _describe(obj, name):
    if simulating() and type(obj).__name__ == "FakeCUDAArray":  # the simulator's device array
        ai = obj.__array_interface__
        return DeviceArray(obj, ai["data"][0], obj.shape, obj.dtype, obj.flags.c_contiguous, obj.flags.writeable)
    return from_interface(obj, name)


def _flat(a: DeviceArray):
    """1-d Numba view of a validated array (zero copy). A foreign array (CuPy, torch) is imported with
    sync=False: Numba would otherwise synchronise the producer's stream with the host on every import;
    the kernels are launched on that stream instead (`_stream`), which orders them after its work."""
    obj = a.obj
    if not simulating() and not hasattr(obj, "copy_to_host"):  # CuPy / torch: view through the interface
        obj = _cuda().as_cuda_array(obj, sync=False)
    return obj.reshape(a.size)


_LEGACY, _PER_THREAD = 1, 2  # __cuda_array_interface__ v3 names of the default streams


def _stream(a: DeviceArray):
    """The stream to launch on: the one a foreign array's producer exported in __cuda_array_interface__
    (CuPy's current stream, torch's current stream), so the update runs after the work that made the
    gradients, with no host synchronisation; Numba's default stream for Numba arrays."""
    obj = a.obj
    if simulating() or hasattr(obj, "copy_to_host"):
        return 0
    ptr = getattr(obj, "__cuda_array_interface__", {}).get("stream")
    if ptr is None or ptr == _LEGACY:
        return _cuda().legacy_default_stream()
    if ptr == _PER_THREAD:
        return _cuda().per_thread_default_stream()
    return _external_stream(ptr)


@functools.lru_cache(maxsize=64)
def _external_stream(ptr):
    return _cuda().external_stream(ptr)


_WHERE = "on the GPU with the numba backend"


def _validate(arrays, names, read_only_slot=1):
    return validate_device_arrays(arrays, names, _describe, DTYPES, _WHERE, read_only_slot)


@functools.lru_cache(maxsize=None)
def _ones(dtype):
    return _cuda().to_device(np.ones(1, dtype=dtype))


def _device_scale(grad_scale, dtype, stream=0):
    """(host factor, 1-element device array of the math dtype the kernels read)."""
    if grad_scale is None:
        return 1.0, _ones(dtype)
    if isinstance(grad_scale, numbers.Real) and not isinstance(grad_scale, (bool, np.bool_)):
        return float(grad_scale), _ones(dtype)
    if isinstance(grad_scale, np.ndarray):
        from fastopt.backends.validate import host_scale
        return host_scale(grad_scale), _ones(dtype)
    a = _describe(grad_scale, "grad_scale")
    if a.dtype.kind != "f":
        raise TypeError(f"grad_scale must be a real number or a 0-d float array, got dtype {a.dtype}")
    if a.shape != ():
        raise ValueError(f"grad_scale must be a scalar or a 0-d array, got shape {a.shape}")
    src = _flat(a)
    if a.dtype == dtype:
        return 1.0, src
    dst = _cuda().device_array(1, dtype=dtype)
    _kernels(dtype)["cast_scalar"][1, 1, stream](src, dst)
    return 1.0, dst


@functools.lru_cache(maxsize=None)
def _never():
    return _cuda().to_device(np.zeros(1, dtype=np.uint8))



def _skip_flag(found_inf):
    """One-element device array the kernels read: when set they return without writing."""
    if found_inf is None:
        return _never()
    a = check_skip_flag(_describe(found_inf, "found_inf"))
    return _flat(a)


@functools.lru_cache(maxsize=256)
def _offsets(sizes):
    """Device int64 offsets of each tensor's blocks in a partials buffer (cached per set of sizes)."""
    counts = [_grid(n) if n else 0 for n in sizes]
    host = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    return _cuda().to_device(host), int(host[-1])


# ---------------------------------------------------------------------------------------------------
# Backend interface
# ---------------------------------------------------------------------------------------------------

def prepare(arrays, names, indices=None):
    """Check the arrays of one update (nothing is written or launched); run() launches it."""
    return prepare_device(arrays, names, _describe, DTYPES, _WHERE, 1, indices)


def prepare_grads(grads, name="grads", indices=None):
    """Check arrays for an in-place operation (nothing written): how an optimizer checks its params."""
    return prepare_device((grads,), (name,), _describe, DTYPES, _WHERE, -1, indices)


check_disjoint = check_prepared_disjoint  # across the prepared calls of one optimizer step


def step(spec, arrays, names, hp, step, grad_scale, found_inf=None):
    run(prepare(arrays, names), spec, hp, step, grad_scale, found_inf)


def run(prepared, spec, hp, step, grad_scale, found_inf=None):
    lists = prepared.lists
    skip = _skip_flag(found_inf)
    if not any(a.size for a in lists[0]):
        return
    dtype = lists[0][0].dtype
    stream = _stream(lists[0][0])
    host_scale, gs = _device_scale(grad_scale, dtype, stream)
    h = tuple(dtype.type(x) for x in spec.scalars(hp, step, host_scale))
    variant = spec.variant(hp, step)
    used = sum(1 << j for j, lst in enumerate(lists[2:]) if lst is not None)  # live state slots
    block = launch_config()[0]
    k = _kernels(dtype)
    sizes = tuple(a.size for a in lists[0])
    params = [_flat(p) if n else None for p, n in zip(lists[0], sizes)]
    grads = [_flat(g) if n else None for g, n in zip(lists[1], sizes)]
    # the state slots of each tensor; a dead slot gets the param (never read nor written: `used`)
    slots = [[(_flat(lst[i]) if lst is not None else params[i]) for lst in lists[2:]] +
             [params[i]] * (_SLOTS - len(lists) + 2) if n else None for i, n in enumerate(sizes)]
    if not spec.two_phase:
        kernel = k["update"][spec.kernel]
        for i, n in enumerate(sizes):
            if n:
                kernel[_grid(n), block, stream](params[i], grads[i], *slots[i], h, gs, used, variant, skip)
        return
    # two phases (LAMB): the states and the per-block norms of p and u; lr * trust ratio per tensor from
    # them (on the device: no host round trip); the step
    cuda = _cuda()
    offsets, total = _offsets(sizes)
    host_offsets = _host_offsets(sizes)
    partials = cuda.device_array(2 * total, dtype=np.float64)
    scaled_lr = cuda.device_array(len(sizes), dtype=dtype)
    moments, apply = k["moments"][spec.kernel], k["apply"][spec.kernel]
    for i, n in enumerate(sizes):
        if n:
            moments[_grid(n), block, stream](params[i], grads[i], *slots[i], h, gs, used, variant, partials,
                                             host_offsets[i], skip)
    k["trust"][len(sizes), block, stream](partials, offsets, np.float64(hp["lr"]), scaled_lr)
    for i, n in enumerate(sizes):
        if n:
            apply[_grid(n), block, stream](params[i], *slots[i], h, scaled_lr, i, used, variant, skip)


_SLOTS = 3  # state slots of every kernel (kernels/numba/kernels.py SLOTS)


@functools.lru_cache(maxsize=256)
def _host_offsets(sizes):
    counts = [_grid(n) if n else 0 for n in sizes]
    return tuple(int(x) for x in np.concatenate(([0], np.cumsum(counts))))


def sumsq_per_tensor(grads, out=None):
    """Sum of squares of each array: float64 device array of shape (len,), deterministic. `out`: a
    float64 device array of that shape to write instead."""
    cuda = _cuda()
    lists, _ = _validate((grads,), ("grads",), 0)
    arrays = lists[0]
    block = launch_config()[0]
    sizes = tuple(a.size for a in arrays)
    offsets, total = _offsets(sizes)
    host_offsets = _host_offsets(sizes)
    k = _kernels(arrays[0].dtype)
    stream = _stream(arrays[0])
    partials = cuda.device_array(max(total, 1), dtype=np.float64)
    for i, a in enumerate(arrays):
        if a.size:
            k["sumsq_partials"][_grid(a.size), block, stream](_flat(a), partials, host_offsets[i])
    if out is None:  # created on the stream of the grads: the norm kernels that read it launch there too
        out = cuda.device_array(len(arrays), dtype=np.float64, stream=stream)
    k["sum_segments"][len(arrays), block, stream](partials, offsets, out)
    return out


def _sq_stream(sq):
    """The stream sums of squares were made on (sumsq_per_tensor and device_zeros tag their arrays)."""
    return getattr(sq, "stream", 0)


def _global_norm(sq, max_norm=None):
    cuda = _cuda()
    stream = _sq_stream(sq)
    norm = cuda.device_array(1, dtype=np.float64, stream=stream)
    coef = cuda.device_array(1, dtype=np.float64, stream=stream)
    _kernels(F64)["global_norm"][1, launch_config()[0], stream](sq, norm, np.float64(max_norm or 0.0), coef,
                                                        max_norm is not None)
    return norm, coef


def device_zeros(n, dtype, like):
    """A device array of n zeros of `dtype` (the optimizer's guard buffers), tagged with the stream of
    `like` so that the kernels reading it launch there."""
    return _cuda().to_device(np.zeros(n, dtype=dtype), stream=_stream(_describe(like, "like")))


def step_guard(sq, max_norm=None, skip_nonfinite=False, skipped=None):
    """The optimizer's per-step guard in ONE launch, no host synchronisation: from the per-tensor sums of
    squares `sq`, the clip coefficient (0-d float64, None without max_norm) and the skip flag (0-d
    uint8, None without skip_nonfinite); `skipped` (a 0-d int64 device counter) is incremented when
    the step is skipped. Returns (coef, found_inf)."""
    cuda = _cuda()
    stream = _sq_stream(sq)
    coef = cuda.device_array(1, dtype=np.float64, stream=stream)
    flag = cuda.device_array(1, dtype=np.uint8, stream=stream)
    counter = _flat(_describe(skipped, "skipped")) if skipped is not None else \
        cuda.device_array(1, dtype=np.int64, stream=stream)
    mode = (1 if max_norm is not None else 0) | (2 if skip_nonfinite else 0)
    _kernels(F64)["step_guard"][1, launch_config()[0], stream](sq, np.float64(max_norm or 0.0), coef, flag, counter, mode)
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
    stream = _stream(a)
    norm = _flat(a)
    if a.dtype != F64:
        norm64 = cuda.device_array(1, dtype=np.float64, stream=stream)
        _kernels(F64)["cast_scalar"][1, 1, stream](norm, norm64)
        norm = norm64
    out = cuda.device_array(1, dtype=np.float64, stream=stream)
    _coefficient_kernel()[1, 1, stream](norm, np.float64(max_norm), out)
    return out.reshape(())


def _scale_each(grads, mode, host_coef, coef, max_norm):
    lists, _ = _validate((grads,), ("grads",), -1)
    block = launch_config()[0]
    k = _kernels(lists[0][0].dtype)
    stream = _stream(lists[0][0])
    for t, a in enumerate(lists[0]):
        if a.size:
            k["scale"][_grid(a.size), block, stream](_flat(a), mode, np.float64(host_coef), coef, t, np.float64(max_norm))


def clip_by_global_norm(grads, sq, max_norm):
    norm, coef = _global_norm(sq, max_norm)
    _scale_each(grads, 1, 1.0, coef, 0.0)
    return norm.reshape(())


def clip_by_norm(grads, sq, max_norm):
    _scale_each(grads, 2, 1.0, sq, max_norm)
    stream = _sq_stream(sq)
    norms = _cuda().device_array(sq.size, dtype=np.float64, stream=stream)
    _kernels(F64)["sqrt_all"][_grid(sq.size), launch_config()[0], stream](sq, norms)
    out = [norms[i:i + 1].reshape(()) for i in range(sq.size)]
    return out if isinstance(grads, (list, tuple)) else out[0]


def scale_(grads, coef):
    if isinstance(coef, numbers.Real) and not isinstance(coef, (bool, np.bool_)):
        _scale_each(grads, 0, float(coef), _ones(F64), 0.0)
        return
    lists, _ = _validate((grads,), ("grads",), -1)
    _, dev = _device_scale(coef, F64, _stream(lists[0][0]))
    _scale_each(grads, 1, 1.0, dev, 0.0)


def clamp_(grads, clip_value):
    lists, _ = _validate((grads,), ("grads",), -1)
    dtype = lists[0][0].dtype
    block = launch_config()[0]
    k = _kernels(dtype)
    stream = _stream(lists[0][0])
    for a in lists[0]:
        if a.size:
            k["clamp"][_grid(a.size), block, stream](_flat(a), dtype.type(clip_value))
