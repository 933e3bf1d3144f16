"""The bandwidth-ceiling kernel (_cpu_fast.touch, what bench/ divides by) of every storage layout the updates
take: it must move an update's traffic, every element of every array it reads and writes, on every layout,
with the compensation (kahan_comp) and each state count, whatever path a layout's updates take (direct or
staged). Checked by what it writes: each written array changes in every element, each read-only one keeps
its bytes."""
from __future__ import annotations

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")
_cpu_fast = pytest.importorskip("fastopt.kernels.cpu._cpu_fast")

F32, F64, F16 = np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
# (params, grads, states) as the updates take them: float32/float64 alone, 16-bit states of float32 params,
# 16-bit params with their own or float32 grads and float32 or their own dtype's states
LAYOUTS = ([(F32, F32, F32), (F64, F64, F64), (F32, F32, BF16), (F32, F32, F16)]
           + [(p, g, s) for p in (BF16, F16) for g in (p, F32) for s in (F32, p)])
N = 2 * 32768 + 1001  # several chunks (CHUNK), split between the threads, and a ragged end


def _arrays(layout, nstates, comp, rng):
    p_dtype, g_dtype, s_dtype = layout
    # positive, in [0.5, 2]: no sum the kernel forms is zero (16-bit patterns are added as integers, and two
    # patterns of opposite signs can add up to 0x10000, which leaves a param unchanged)
    values = lambda dtype: rng.uniform(0.5, 2.0, N).astype(dtype)  # noqa: E731
    states = [values(s_dtype) for _ in range(nstates)]
    slots = states[:3] + [None] * (3 - min(nstates, 3))
    arrays = [values(p_dtype), values(g_dtype), *slots]
    if comp or nstates == 4:
        arrays.append(values(p_dtype) if comp else None)
    if nstates == 4:
        arrays.append(states[3])
    return tuple(arrays)


def _check(arrays, written, before):
    for k, (a, b) in enumerate(zip(arrays, before)):
        if a is None:
            continue
        same = a.view(np.uint8).reshape(N, -1) == b.view(np.uint8).reshape(N, -1)
        if k in written:
            assert not same.all(axis=1).any(), f"array {k}: elements the ceiling kernel did not write"
        else:
            assert same.all(), f"array {k} is only read, yet changed"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "-".join(d.name for d in t))
def test_touch_moves_every_element_of_every_layout(layout, threads, rng):
    before_threads = _cpu_fast.get_num_threads()
    _cpu_fast.set_num_threads(threads)
    try:
        comps = (False, True) if layout[0].itemsize == 2 else (False,)
        for comp in comps:
            for nstates in range(5):
                arrays = _arrays(layout, nstates, comp, rng)
                before = [None if a is None else a.copy() for a in arrays]
                _cpu_fast.touch(arrays)
                written = {0} | {k for k in (2, 3, 4, 6) if k < len(arrays)} | ({5} if comp else set())
                _check(arrays, written - {1}, before)
        # LAMB's two passes (two states, no compensation): phase 1 writes the states, phase 2 the params
        for phase, written in ((1, {2, 3}), (2, {0})):
            arrays = _arrays(layout, 2, False, rng)
            before = [None if a is None else a.copy() for a in arrays]
            _cpu_fast.touch(arrays, phase)
            _check(arrays, written, before)
    finally:
        _cpu_fast.set_num_threads(before_threads)
