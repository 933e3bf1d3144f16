"""Flat parameters: many arrays packed into one contiguous buffer, so a step is one single-array kernel.

    flat = fastopt.flatten([W1, b1, W2, b2])
    W1, b1, W2, b2 = flat.views               # use these from now on: views into flat.params
    gW1, gb1, gW2, gb2 = flat.grad_views      # write gradients here (out=..., [...] = ...)
    opt = fastopt.Adam([flat.params], lr=1e-3)
    opt.step([flat.grad])

With many small arrays this removes the per-array work of a multi-tensor call (validation, pointer
table, chunking). The arrays are copied into the buffer once; the views then share its memory, so
updating flat.params updates every view. NumPy or CuPy, chosen from the arrays' type.

The registry's element-wise optimizers, in float32, float64 or 16-bit params (Kahan and 16-bit state
included), give the same result either way, bit for bit. Where the step reads more than one element, or an
element's place in its array, a flat buffer is one array and the result differs from the list path:
- LAMB and LARS compute their trust ratios per array: one ratio for the whole buffer ("LAMB with a single
  layer"; LARS's exclude_1d, which reads each param's ndim, sees one 1-D buffer: pass exclude_1d=False there,
  or use the list path);
- state_dtype="int8" keeps one scale per block of 256 elements, and on the buffer a block spans arrays;
- stochastic_rounding=True draws by each element's index in its array, which the buffer renumbers;
- Adafactor factors only params of two or more dims (the buffer is 1-D: unfactored); Muon refuses it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastopt.arrays import byte_range
from fastopt.precision import is_16bit

__all__ = ["flatten", "FlatParams"]


@dataclass(frozen=True)
class FlatParams:
    """params: 1-D buffer holding every array; views: arrays shaped like the inputs, sharing its memory.
    grad / grad_views: a zero-filled gradient buffer and its views, laid out the same way."""

    params: object
    views: list
    grad: object
    grad_views: list
    offsets: tuple   # start of each array in the buffer (elements)

    def set_grads(self, grads) -> None:
        """Copy a list of gradient arrays into the flat gradient buffer (when they were not written
        into grad_views directly). Every grad is checked before the first copy, and grads that share the
        buffer's memory are read before it is written (as if every grad were copied at once)."""
        if not isinstance(grads, (list, tuple)):
            raise TypeError(f"grads must be a list of arrays, one per param, got {type(grads).__name__}")
        if len(grads) != len(self.grad_views):
            raise ValueError(f"grads has {len(grads)} arrays but the flat buffer holds {len(self.grad_views)}")
        for i, (dst, g) in enumerate(zip(self.grad_views, grads)):  # every grad checked before the first copy
            same_kind = isinstance(g, np.ndarray) if isinstance(dst, np.ndarray) else type(g) is type(dst)
            if not same_kind:
                raise TypeError(f"grads[{i}] must be a {_module(dst).__name__} array like the flat buffer, got "
                                f"{type(g).__module__}.{type(g).__name__}")
            if tuple(g.shape) != tuple(dst.shape):
                raise ValueError(f"grads[{i}] has shape {tuple(g.shape)}, expected {tuple(dst.shape)}")
            # (bfloat16, ml_dtypes' kind "V", casts to float32 and float64 exactly: taken like float16)
            if g.dtype != dst.dtype and not (is_16bit(g.dtype) and (is_16bit(dst.dtype) or dst.dtype.kind == "f")) and (
                    g.dtype.kind not in "fiu" or not np.can_cast(g.dtype, dst.dtype, "same_kind")):
                raise TypeError(f"grads[{i}] has dtype {g.dtype}, which does not cast to the buffer's {dst.dtype}")
        # a grad in the buffer's own memory (grad_views in another order, a slice of grad) is read before
        # the first copy writes over it; a grad that is its own view needs no copy at all
        buffer = byte_range(self.grad)
        sources = []
        for dst, g in zip(self.grad_views, grads):
            if g is dst:
                continue
            span = byte_range(g)  # the same kind of array as the buffer: checked above
            overlaps = buffer is not None and span is not None and span[0] < buffer[1] and buffer[0] < span[1]
            sources.append((dst, g.copy() if overlaps else g))
        for dst, g in sources:
            dst[...] = g


def _module(x, label="arrays"):
    if type(x).__module__.startswith("cupy"):
        import cupy
        return cupy
    if isinstance(x, np.ndarray):
        return np
    raise TypeError(f"{label}: flatten takes NumPy or CuPy arrays, got {type(x).__module__}.{type(x).__name__}")


# what the kernels take as params: native float16/32/64 and ml_dtypes' bfloat16
_PARAM_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def flatten(arrays) -> FlatParams:
    """Pack `arrays` (a non-empty list of arrays of one dtype: float16, bfloat16, float32 or float64; NumPy or
    CuPy) into one buffer;
    returns FlatParams with the buffer, views shaped like the inputs, and a matching gradient buffer.
    The input arrays are copied, not modified."""
    if not isinstance(arrays, (list, tuple)) or len(arrays) == 0:
        raise ValueError("flatten needs a non-empty list of arrays")
    xp = _module(arrays[0], "arrays[0]")
    dtype = arrays[0].dtype
    for i, a in enumerate(arrays):
        if _module(a, f"arrays[{i}]") is not xp:
            raise TypeError(f"arrays[{i}] is a {type(a).__module__} array but arrays[0] is a {xp.__name__} array")
        if a.dtype != dtype:
            raise TypeError(f"arrays[{i}] has dtype {a.dtype} but arrays[0] has {dtype}: flatten one dtype at a "
                            f"time")
    if np.dtype(dtype) not in _PARAM_DTYPES and not is_16bit(dtype):
        raise TypeError(f"arrays[0] has dtype {dtype}; flatten packs float16, bfloat16, float32 or float64 "
                        f"parameters in native byte order")
    sizes = [int(a.size) for a in arrays]
    offsets, total = [], 0
    for s in sizes:
        offsets.append(total)
        total += s
    params = xp.empty(total, dtype=dtype)
    grad = xp.zeros(total, dtype=dtype)
    views, grad_views = [], []
    for a, start, size in zip(arrays, offsets, sizes):
        view = params[start:start + size].reshape(a.shape)
        view[...] = a
        views.append(view)
        grad_views.append(grad[start:start + size].reshape(a.shape))
    return FlatParams(params, views, grad, grad_views, tuple(offsets))
