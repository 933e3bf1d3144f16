"""Compiles every Numba kernel to PTX for sm_80 and sm_90 (numba.cuda.compile_ptx, NVVM from the
nvidia-cuda-nvcc wheel; no GPU needed) and checks that the float32 kernels whose math is float32 carry no
`.f64` instruction. Run as a script in its own process by test_gpu_compile.py, because without a driver it
has to give numba-cuda a stand-in for "the current device": numba-cuda asks the driver for the compute
capability when it compiles a device function called from a kernel, even inside compile_ptx.
Prints `PTX CHECKS: <n> passed, <m> failed`; exits 1 on a failure."""
from __future__ import annotations

import re
import sys

import numpy as np
from numba import cuda, float32, float64, int64, types, uint8

import numba.cuda.dispatcher as _dispatcher

if not cuda.is_available():
    class _StandIn:  # only the compute capability is read
        compute_capability = (8, 0)

    _dispatcher.get_current_device = lambda: _StandIn()

from fastopt.kernels.numba import kernels as nk  # noqa: E402
from fastopt.kernels.numba import math as fmath  # noqa: E402
from fastopt.precision import QUANT_BLOCK  # noqa: E402

BLOCK, CHUNK = 256, 4096  # the real launch configuration (numba_backend.launch_config)
F64_OP = re.compile(r"^\s*[a-z][a-z0-9.]*\.f64\b", re.M)

passed, failed = 0, []


def arr(t):
    return t[::1]


def nscalars(family):
    return len(fmath.SCALAR_NAMES[family])


def signatures(dt):
    """kernel name -> argument types, for math dtype dt (float32 / float64). Per-family kernels are
    named `update[family]`, `moments[family]`, `apply[family]`: every family of the registry. The array
    kernels take the multi-tensor table (int64 tensors (nt, 6) and chunks (nb, 2), C order)."""
    a = arr(dt)
    table = int64[:, ::1]
    sig = {}
    for family in nk.FAMILIES:
        h = types.UniTuple(dt, nscalars(family))
        states = (a,) * (4 if family in nk.FOUR_STATE_FAMILIES else 3)  # Adan's update4 takes a 4th state
        coefs = (a,) if family in nk.PER_TENSOR_FAMILIES else ()  # LARS: its tensors' numbers (math dtype)
        sig[f"update[{family}]"] = (a, a) + states + (table, table, h, a, int64, int64, arr(uint8)) + coefs
    for family in nk.TWO_PHASE_FAMILIES:
        h = types.UniTuple(dt, nscalars(family))
        sig[f"moments[{family}]"] = (a, a, a, a, a, table, table, h, a, int64, int64, arr(float64), arr(uint8))
        sig[f"apply[{family}]"] = (a, a, a, a, table, table, h, a, int64, int64, arr(uint8))
    sig["trust"] = (arr(float64), arr(int64), float64, a)
    sig["step_guard"] = (arr(float64), float64, arr(float64), arr(uint8), arr(int64), int64)
    sig["sumsq"] = (a, table, table, arr(float64))
    sig["sum_segments"] = (arr(float64), arr(int64), arr(float64))
    sig["global_norm"] = (arr(float64), arr(float64), float64, arr(float64), types.boolean)
    sig["scale"] = (a, table, table, int64, float64, arr(float64), float64)
    sig["clamp"] = (a, table, table, dt)
    sig["cast_scalar"] = (arr(float64), a)
    sig["sqrt_all"] = (arr(float64), arr(float64))
    return sig


# float32 kernels whose math is float32 end to end: the updates, the two-phase step (phase 2), clamp
F32_PURE = ({f"update[{f}]" for f in nk.FAMILIES} | {f"apply[{f}]" for f in nk.TWO_PHASE_FAMILIES}
            | {"clamp"})


def kernel_of(ks, name):
    if "[" in name:
        kind, family = name[:-1].split("[")
        return ks[kind][family]
    return ks[name]


for dt in (float32, float64):
    ks = nk.build(np.dtype(str(dt)), BLOCK, CHUNK)
    for name, argtypes in signatures(dt).items():
        kernel = kernel_of(ks, name)
        for cc in ((8, 0), (9, 0)):
            label = f"{name} {dt} sm_{cc[0]}{cc[1]}"
            try:
                ptx, _ = cuda.compile_ptx(kernel.py_func, argtypes, cc=cc)
                assert f".target sm_{cc[0]}{cc[1]}" in ptx, "wrong target"
                if dt == float32 and name in F32_PURE:
                    bad = F64_OP.findall(ptx)
                    assert not bad, f"float64 instructions in a float32 kernel: {sorted(set(bad))[:5]}"
                passed += 1
            except Exception as e:  # report every kernel, not just the first
                failed.append(label)
                print(f"FAIL {label}: {type(e).__name__}: {str(e)[:2000]}", flush=True)

# 16-bit storage (kernels.build's kinds: uint16 bits, float32 math; the Kahan and stochastic stores of 16-bit
# params): every update kernel, LAMB's two passes and the one-array kernels, for sm_90. Their float32 kernels must
# carry no float64 instruction, and the bit casts (a one-element local array viewed as the other type) must be
# register moves: no local memory.
LOCAL = re.compile(r"\b(ld|st)\.local\b")


def precision_signatures(kinds):
    bits, f32 = arr(types.uint16), arr(float32)
    p, g, st = (bits if kind else f32 for kind in kinds)
    table = int64[:, ::1]
    sig = {}
    for family in nk.FAMILIES:
        h = types.UniTuple(float32, nscalars(family))
        four = family in nk.FOUR_STATE_FAMILIES
        coefs = (f32,) if family in nk.PER_TENSOR_FAMILIES else ()
        sig[f"update[{family}]"] = (p, g) + (st,) * (4 if four else 3) + (table, table, h, f32, int64, int64,
                                                                        arr(uint8)) + coefs
        if kinds[0]:  # the rounded stores: one signature for every family
            for rounded in ("update_kahan", "update_sr"):
                sig[f"{rounded}[{family}]"] = (p, g, st, st, st, st, p, table, table, h, f32, int64, int64,
                                               arr(uint8), f32, int64, int64)
    for family in nk.TWO_PHASE_FAMILIES:
        h = types.UniTuple(float32, nscalars(family))
        sig[f"moments[{family}]"] = (p, g, st, st, st, table, table, h, f32, int64, int64, arr(float64), arr(uint8))
        sig[f"apply[{family}]"] = (p, st, st, st, table, table, h, f32, int64, int64, arr(uint8))
        if kinds[0]:
            for rounded in ("apply_kahan", "apply_sr"):
                sig[f"{rounded}[{family}]"] = (p, st, st, st, p, table, table, h, f32, int64, int64, arr(uint8),
                                               int64, int64)
    sig["sumsq"] = (p, table, table, arr(float64))
    sig["scale"] = (p, table, table, int64, float64, arr(float64), float64)
    sig["clamp"] = (p, table, table, float32)
    return sig


def check_sm90(label, kernel, argtypes, float32_math):
    """Compile one kernel for sm_90: no local memory (bit casts and per-thread arrays in registers) and, where its
    math is float32, no float64 instruction; a failure is reported and counted, not raised."""
    global passed
    try:
        ptx, _ = cuda.compile_ptx(kernel.py_func, argtypes, cc=(9, 0))
        if float32_math:
            bad = F64_OP.findall(ptx)
            assert not bad, f"float64 instructions in a float32 kernel: {sorted(set(bad))[:5]}"
        assert not LOCAL.search(ptx), "local memory (a bit cast or a per-thread array not in registers)"
        passed += 1
    except Exception as e:
        failed.append(label)
        print(f"FAIL {label}: {type(e).__name__}: {str(e)[:2000]}", flush=True)


for kinds in (("bfloat16", "bfloat16", None), ("float16", None, "float16"), (None, None, "bfloat16")):
    ks = nk.build(np.dtype(np.float32), BLOCK, CHUNK, kinds, QUANT_BLOCK)
    for name, argtypes in precision_signatures(kinds).items():
        check_sm90(f"{name} {kinds} sm_90", kernel_of(ks, name), argtypes, name.startswith(("update", "apply", "clamp")))

# 8-bit states (update_q8: codes uint8, float32 absmax, the quantizer tables): every family that takes them with
# float32 params, and Adam and LARS with bfloat16 params and each rounding, for sm_90; float32 math only, and the
# per-thread element arrays (QUANT_BLOCK / BLOCK of them) in registers, not local memory.
from fastopt.precision import INT8_REFUSED  # noqa: E402
from fastopt.specs import kernel_specs  # noqa: E402

INT8_FAMILIES = sorted({s.kernel for s in kernel_specs() if s.name not in INT8_REFUSED and not s.two_phase})


def int8_signature(family, p, g):
    codes, scales, table = arr(uint8), arr(float32), int64[:, ::1]
    h = types.UniTuple(float32, nscalars(family))
    return (p, g, codes, codes, codes, codes, scales, scales, scales, scales, p, table, table, h, arr(float32), int64,
            int64, arr(uint8), arr(float32), int64, int64, float32[:, ::1], float32[:, ::1], uint8[:, ::1], int64)


int8_cases = [(None, "update_q8", f) for f in INT8_FAMILIES] + [
    (("bfloat16", "bfloat16", None), name, f) for name in ("update_q8", "update_q8_kahan", "update_q8_sr")
    for f in ("adam", "lars", "adan")]
for kinds, name, family in int8_cases:
    p = arr(types.uint16) if kinds else arr(float32)
    ks = nk.build(np.dtype(np.float32), BLOCK, CHUNK, kinds, QUANT_BLOCK)
    check_sm90(f"{name}[{family}] {kinds} sm_90", ks[name][family], int8_signature(family, p, p), True)

print(f"PTX CHECKS: {passed} passed, {len(failed)} failed", flush=True)
sys.exit(1 if failed else 0)
