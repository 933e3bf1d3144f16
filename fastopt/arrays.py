"""Array helpers with no fastopt dependencies: which memory an array lives in, NumPy views of host
objects, host copies, copying / zeroing across devices, and the memory-overlap checks of the composite
optimizers (Adafactor, Muon, SparseAdam; the registry's are the backends').

A leaf module (it imports nothing from fastopt) so that every layer may use it, the compiled kernels
included. CuPy and Numba are imported lazily, only for their own arrays.
"""
from __future__ import annotations

import sys

import numpy as np

__all__ = ["array_device", "array_module", "as_numpy", "refuse_masked", "refuse_lazy_negation", "to_host",
           "writable_view", "copy_into", "zero_fill", "no_self_overlap", "byte_range", "check_disjoint"]


def refuse_masked(x, name="array") -> None:
    """TypeError for a NumPy masked array: the kernels would read and write the data under the mask."""
    if type(x) is not np.ndarray and isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array; pass its data (np.ma.getdata) or fill it")


def array_device(x, name="array") -> str:
    """'host' or 'device' for one array-like; TypeError naming it (`name`) for anything else (a masked array
    too)."""
    if isinstance(x, np.ndarray):
        refuse_masked(x, name)
        return "host"
    t = type(x)
    mod = t.__module__
    if mod.startswith(("cupy", "numba.cuda")) or hasattr(x, "__cuda_array_interface__"):
        # numba.cuda: also the CUDA simulator's arrays, which live in host memory but stand for the GPU
        refuse_lazy_negation(x, name)  # (a torch CUDA tensor: cupy.asarray of it drops the bit too)
        return "device"
    if hasattr(x, "__array_interface__") or hasattr(x, "__dlpack__"):
        return "host"
    try:
        memoryview(x)
    except TypeError:
        raise TypeError(f"{name} must be an array (NumPy, CuPy, Numba device array or an object exposing its "
                        f"memory), got {t.__name__}") from None
    return "host"


def array_module(a):
    """The module of a NumPy or CuPy array: numpy, else cupy (imported only then; the composite optimizers'
    arrays are one or the other once array_device / as_numpy have taken them)."""
    if isinstance(a, np.ndarray):
        return np
    import cupy
    return cupy


def as_numpy(obj, name="array"):
    """A NumPy view of `obj` sharing its memory (so in-place updates land in the caller's memory);
    TypeError when the object does not expose its memory (or is a masked array)."""
    if isinstance(obj, np.ndarray):
        refuse_masked(obj, name)
        return obj
    if type(obj).__module__.startswith(("cupy", "numba")) or hasattr(obj, "__cuda_array_interface__"):
        raise TypeError(f"{name} is a GPU array ({type(obj).__module__}.{type(obj).__name__}) but the arrays "
                        f"of this call are on the host: one call updates arrays of one kind")
    if hasattr(obj, "__array_interface__"):
        arr = np.asarray(obj)
        if arr.__array_interface__["data"][0] != obj.__array_interface__["data"][0]:
            raise TypeError(f"{name}: converting {type(obj).__name__} to NumPy made a copy")
        return arr
    if hasattr(obj, "__dlpack__") and not hasattr(obj, "__cuda_array_interface__"):
        refuse_lazy_negation(obj, name)
        if type(obj).__module__.startswith("torch") and obj.dtype is getattr(sys.modules.get("torch"), "bfloat16", 0):
            return _torch_bfloat16(obj, name)
        try:
            arr = np.from_dlpack(obj)
        except (BufferError, TypeError, RuntimeError) as e:
            raise TypeError(f"{name}: cannot view {type(obj).__name__} as a NumPy array: {e}") from None
        # torch CPU tensors come back writable; DLPack producers that mark memory read-only do not
        return arr
    try:
        return np.asarray(memoryview(obj))
    except TypeError:
        raise TypeError(f"{name} must be an array (NumPy, CuPy, or an object exposing its memory), "
                        f"got {type(obj).__name__}") from None


def refuse_lazy_negation(obj, name) -> None:
    """TypeError for a torch tensor with the negative bit set (a lazy negation: `z.conj().imag`,
    `torch._neg_view`): its memory holds the values' negatives, and DLPack and __cuda_array_interface__ export
    that memory without the bit, so an update through them would read and write the wrong sign."""
    if type(obj).__module__.startswith("torch") and callable(getattr(obj, "is_neg", None)) and obj.is_neg():
        raise TypeError(f"{name} has torch's negative bit set (a lazy negation, such as z.conj().imag): its "
                        f"memory holds the other sign; pass {name}.resolve_neg()")


def _torch_bfloat16(t, name):
    """A torch CPU bfloat16 tensor as a NumPy ml_dtypes.bfloat16 array on the same memory: DLPack has no
    bfloat16 that NumPy reads, so the tensor is viewed as int16 (the same bits) and NumPy's view is
    reinterpreted."""
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError(f"{name} is a bfloat16 tensor: viewing it from NumPy needs ml_dtypes "
                        f"(pip install ml_dtypes)") from None
    import torch
    try:
        raw = np.from_dlpack(t.view(torch.int16))
    except (BufferError, TypeError, RuntimeError) as e:
        raise TypeError(f"{name}: cannot view {type(t).__name__} as a NumPy array: {e}") from None
    return raw.view(ml_dtypes.bfloat16)


def to_host(a):
    """A NumPy copy of an array (CuPy and Numba device arrays come back from the device; a torch tensor from
    any device, its lazy conjugation and negation resolved, bfloat16 as ml_dtypes' bfloat16)."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    if type(a).__module__.startswith("torch") and hasattr(a, "resolve_neg"):
        a = a.detach().cpu().resolve_conj().resolve_neg()
    if hasattr(a, "copy_to_host"):  # Numba device array
        return a.copy_to_host()
    return np.array(as_numpy(a, "state"), copy=True)


def writable_view(p, what):
    """The array to copy into for a param: NumPy view of a host object, CuPy view of a device one."""
    if array_device(p, what) == "device":
        if type(p).__module__.startswith(("cupy", "numba")):
            return p
        import cupy
        return cupy.asarray(p)
    return as_numpy(p, what)


def copy_into(dst, src):
    """dst[...] = src, across devices (dst keeps its identity and device). src is checked already."""
    if type(dst).__module__.startswith("cupy"):
        import cupy
        dst[...] = cupy.asarray(src)
        return
    if type(src).__module__.startswith("cupy"):
        src = src.get()
    elif hasattr(src, "copy_to_host"):
        src = src.copy_to_host()
    if hasattr(dst, "copy_to_device"):  # Numba device array
        dst.copy_to_device(np.ascontiguousarray(np.asarray(src), dtype=dst.dtype))
        return
    np.copyto(as_numpy(dst, "state"), np.asarray(src), casting="no")


def copy_param(dst, p) -> None:
    """dst[...] = p, widened to dst's dtype (16-bit params keep float32 state), on dst's own device."""
    if isinstance(dst, np.ndarray):
        dst[...] = as_numpy(p, "params")
    else:
        copy_into(dst, p)


def zero_fill(dst):
    """dst[...] = 0 on its own device."""
    if hasattr(dst, "copy_to_device"):
        dst.copy_to_device(np.zeros(tuple(dst.shape), dst.dtype))
    elif type(dst).__module__.startswith("cupy"):
        dst.fill(0)
    else:
        as_numpy(dst, "state")[...] = 0


def no_self_overlap(a) -> bool:
    """Sufficient test that no two elements share memory: the dims longer than 1, by stride, nest."""
    dims = sorted((abs(s), n) for n, s in zip(a.shape, a.strides) if n > 1)
    if any(n == 0 for n in a.shape):
        return True
    span = a.itemsize
    for stride, n in dims:
        if stride < span:
            return False
        span = stride * n
    return True


def byte_range(a):
    """[lo, hi) byte range of a NumPy or CuPy array's elements (None for an empty array)."""
    if a.size == 0:
        return None
    ptr = a.__array_interface__["data"][0] if isinstance(a, np.ndarray) else a.data.ptr
    lo = hi = ptr
    for n, s in zip(a.shape, a.strides):
        if s < 0:
            lo += s * (n - 1)
        else:
            hi += s * (n - 1)
    return lo, hi + a.itemsize


def check_disjoint(written, read, cache=None) -> dict:
    """ValueError when an array that a step writes (params, state: (name, array) pairs, NumPy or CuPy) shares
    memory with another written one or with an array it reads (grads): the step reads each after writing
    the other.
    One sort of the byte ranges (O(N log N)); NumPy's exact test only for ranges that overlap. `cache`:
    the dict this returned last time, the written arrays' ranges by identity (an array's memory does not
    move; the same params and state come back every step)."""
    items = []
    new_cache = {}
    for k, (name, a) in enumerate(written):
        hit = cache.get(id(a)) if cache else None
        b = hit[1] if hit is not None and hit[0] is a else byte_range(a)
        new_cache[id(a)] = (a, b)
        if b is not None:
            items.append((b[0], b[1], k, True, name, a))
    for k, (name, a) in enumerate(read):
        b = byte_range(a)
        if b is not None:
            items.append((b[0], b[1], len(written) + k, False, name, a))
    items.sort(key=lambda it: it[0])
    active = []  # items whose range may still overlap the next start
    for it in items:
        active = [o for o in active if o[1] > it[0]]
        for o in active:
            if not (o[3] or it[3]):
                continue  # two read-only arrays may share memory
            if isinstance(o[5], np.ndarray) and isinstance(it[5], np.ndarray) and not np.shares_memory(o[5], it[5]):
                continue
            raise ValueError(f"{o[4]} and {it[4]} share memory: a step reads one after writing the other")
        active.append(it)
    return new_cache
