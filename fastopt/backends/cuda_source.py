"""The CUDA sources of the CuPy backend, assembled for NVRTC: kernels/cuda/{update,reduce}.cu with their
local headers inlined, and the compile options of one (dtype, architecture).

Inlining the headers (instead of passing -I) makes the source string the whole input, so CuPy's
on-disk kernel cache, which hashes the source and options only, is invalidated by a header edit too.
Needs neither CuPy nor a GPU: the NVRTC compile check of CI (tests/gpu/test_gpu_compile.py) uses the
same functions as the launcher.

The family table: which elementwise kernel families exist and which variants each compiles is the
registry (fastopt/specs.py: `kernel`, `variants`). family_header() writes it as C++ (kernels/cuda/
families.cuh, included by update.cu and by the CPU loops in kernels/cpu/cpu_loops.hpp); the NVRTC
source always carries the header generated from the live registry, and setup.py regenerates the file
on every build (`python -m fastopt.backends.cuda_source --write`; `--check` exits 1 when it is stale).
"""
from __future__ import annotations

import functools
import os
import re

import numpy as np

from fastopt._version import source_checkout

SOURCES = ("update.cu", "reduce.cu")

BLOCK = 256          # threads per block of every kernel (device.cuh FASTOPT_BLOCK)
# elements per block of a multi-tensor launch (device.cuh FASTOPT_CHUNK): small enough that a list of
# 2**22 elements in all is ~1000 blocks (>= 4 per SM on an H100/H200) and a large one ends in a fine-grained
# tail; 16 elements per thread (4 vectors of float32). Reductions sum per chunk: results depend on it.
CHUNK = 1 << 12
# int64 fields per tensor of a multi-tensor table (device.cuh TENSOR_FIELDS)
TABLE_FIELDS = 14


def _in_flight(text):
    """FASTOPT_CUDA_IN_FLIGHT: vectors a multi-tensor kernel's thread loads before it computes (update.cu
    FASTOPT_IN_FLIGHT), a variant for the GPU benchmark to measure; 1 (the default), 2, 4 or 8."""
    if text in (None, ""):
        return 1
    if text not in ("1", "2", "4", "8"):
        raise ValueError(f"FASTOPT_CUDA_IN_FLIGHT must be 1, 2, 4 or 8, got {text!r}")
    return int(text)


IN_FLIGHT = _in_flight(os.environ.get("FASTOPT_CUDA_IN_FLIGHT"))

def _bfloat16():
    """ml_dtypes' bfloat16 (how NumPy and CuPy name bfloat16 arrays), or None without ml_dtypes."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


BF16 = _bfloat16()
# dtype of the params -> (FASTOPT_DTYPE code, dtype of the optimizer state by default)
DTYPES = {
    np.dtype(np.float32): (0, np.dtype(np.float32)),
    np.dtype(np.float64): (1, np.dtype(np.float64)),
    np.dtype(np.float16): (2, np.dtype(np.float32)),
}
if BF16 is not None:
    DTYPES[BF16] = (3, np.dtype(np.float32))
# dtype of the optimizer state -> FASTOPT_STATE code (device.cuh), for a state other than the default
STATE_CODES = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.float16): 2}
if BF16 is not None:
    STATE_CODES[BF16] = 3
# 8-bit block-wise state (state_dtype="int8", precision.QuantizedState: uint8 codes and float32 scales) is keyed
# by numpy's int8 dtype, which np.dtype("int8") gives for the option's name: its module compiles the _q8 entries
INT8 = np.dtype(np.int8)
STATE_CODES[INT8] = 4
F32 = np.dtype(np.float32)  # the grads' dtype a 16-bit params' module may take instead of its own (FASTOPT_GRAD)


# how a module stores the new params (device.cuh FASTOPT_ROUND): to nearest, Kahan-compensated, stochastically
ROUND_NEAREST, ROUND_KAHAN, ROUND_STOCHASTIC = 0, 1, 2


def module_key(param_dtype, state_dtype=None, rounding=ROUND_NEAREST, grad_dtype=None):
    """What selects a compiled module: the params' dtype alone when the state has its default dtype (None
    too), the params are rounded to nearest and the grads have the params' dtype (None too), else (params'
    dtype, state dtype, rounding) (state_dtype=, kahan=True, stochastic_rounding=True: device.cuh
    FASTOPT_STATE, FASTOPT_ROUND; INT8 for 8-bit state), and with float32 grads of 16-bit params (device.cuh
    FASTOPT_GRAD) (params' dtype, state dtype, rounding, float32)."""
    param_dtype = np.dtype(param_dtype)
    default = DTYPES[param_dtype][1]
    state_dtype = default if state_dtype is None else np.dtype(state_dtype)
    grad_dtype = param_dtype if grad_dtype is None else np.dtype(grad_dtype)
    if grad_dtype != param_dtype:
        if grad_dtype != F32 or param_dtype.itemsize != 2:
            raise ValueError(f"module_key: {grad_dtype} grads of {param_dtype} params (only 16-bit params take "
                             f"grads of another dtype: float32)")
        return param_dtype, state_dtype, int(rounding), grad_dtype
    if state_dtype == default and rounding == ROUND_NEAREST:
        return param_dtype
    return param_dtype, state_dtype, int(rounding)


def module_dtypes(key):
    """(params' dtype, state dtype, rounding, grads' dtype) of a module_key."""
    if isinstance(key, tuple):
        return key if len(key) == 4 else (*key, key[0])
    dtype = np.dtype(key)
    return dtype, DTYPES[dtype][1], ROUND_NEAREST, dtype



# the entry points of reduce.cu (norms, clipping, the optimizer's guard, the benchmark's ceiling)
REDUCTION_KERNELS = ("fo_sumsq_chunks", "fo_sumsq_tensors", "fo_global_norm", "fo_step_guard", "fo_scale_multi",
                     "fo_clamp_multi", "fo_touch", "fo_select_scalars")
# a two-phase family's entry points (update.cu FO_TWO_PHASE_ENTRIES), in launch order
TWO_PHASE_SUFFIXES = ("moments_multi", "trust", "apply_multi")


FAMILY_HEADER = "families.cuh"
MAX_VARIANT = 255  # the CPU dispatch packs kind * 256 + variant (cpu_loops.hpp)


def _checked_family(spec):
    if not re.fullmatch(r"[a-z][a-z0-9_]*", spec.kernel):
        raise ValueError(f"{spec.name}: kernel {spec.kernel!r} is not a C identifier in lower case")
    return spec.kernel


def two_phase_families() -> tuple:
    """The two-phase kernel families of the registry (spec.two_phase: LAMB), in registry order. Each has
    its math in kernels/cuda/<family>.cuh: <Family>Params<M>, <family>_moments_math, <family>_apply_math
    and <family>_trust_ratio, which update.cu's FO_TWO_PHASE_ENTRIES wraps into the three kernels."""
    from fastopt.specs import REGISTRY
    return tuple(dict.fromkeys(_checked_family(s) for s in REGISTRY.values() if s.two_phase))


def family_table() -> tuple:
    """((family, functor, variants), ...) of the elementwise kernels, in registry order: the family is
    the specs' `kernel` (shared by e.g. adam and adamw), its math and functor live in
    kernels/cuda/<family>.cuh as <Family>Op (ops.cuh), and a family's position here is its CPU kind.
    Two-phase families (LAMB) are not in it: see two_phase_families()."""
    from fastopt.specs import kernel_specs  # on use: the table follows specs registered after this import
    table: dict = {}
    for spec in kernel_specs():  # the optimizers, then the other elementwise ops (weight averaging)
        if spec.two_phase:
            continue
        variants = tuple(sorted(set(spec.variants)))
        _checked_family(spec)
        if not variants or not all(isinstance(v, int) and 0 <= v <= MAX_VARIANT for v in variants):
            raise ValueError(f"{spec.name}: variants {spec.variants!r} must be ints in [0, {MAX_VARIANT}]")
        if table.setdefault(spec.kernel, variants) != variants:
            raise ValueError(f"{spec.name}: kernel {spec.kernel!r} is shared with different variants "
                             f"({table[spec.kernel]} vs {variants})")
    return tuple((family, family.capitalize() + "Op", variants) for family, variants in table.items())


def per_tensor_families() -> frozenset:
    """The elementwise families whose functor reads a number per tensor (spec.tensor_coefs: LARS). Their CUDA
    entry point is the multi-tensor one only, with the numbers as its last argument (update.cu
    FO_PER_TENSOR_ENTRIES)."""
    from fastopt.specs import kernel_specs
    return frozenset(s.kernel for s in kernel_specs() if s.tensor_coefs is not None)


def int8_families() -> tuple:
    """The elementwise families some optimizer runs with 8-bit state (state_dtype="int8": one with states, not
    refused by precision.INT8_REFUSED), in family_table() order. An int8 module (module_key(..., INT8)) compiles
    one multi-tensor entry per variant of each, fo_<family>_v<variant>_q8 (update.cu FO_INT8_ENTRIES)."""
    from fastopt.precision import INT8_REFUSED
    from fastopt.specs import kernel_specs
    allowed = {s.kernel for s in kernel_specs() if s.states and not s.two_phase and s.name not in INT8_REFUSED}
    return tuple(family for family, _, _ in family_table() if family in allowed)


def _update_variants() -> dict:
    return {family: variants for family, _, variants in family_table()}


def __getattr__(name):
    # computed on use from the registry (no import cycle): UPDATE_VARIANTS, family -> its compiled
    # variants; OTHER_KERNELS, the entry points outside the elementwise table (two-phase, reductions)
    if name == "UPDATE_VARIANTS":
        return _update_variants()
    if name == "OTHER_KERNELS":
        return tuple(n for f in two_phase_families() for n in two_phase_kernel_names(f)) + REDUCTION_KERNELS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def family_header() -> str:
    """The text of kernels/cuda/families.cuh, generated from the registry."""
    table = family_table()
    two_phase = two_phase_families()
    rows = [(kind, family, op, v) for kind, (family, op, variants) in enumerate(table) for v in variants]
    per_tensor = per_tensor_families()
    int8 = int8_families()
    lines = [
        "// GENERATED from the registry (fastopt/specs.py: `kernel`, `variants`) by",
        "// fastopt/backends/cuda_source.py family_header(); do not edit. setup.py regenerates it on every build",
        "// (python -m fastopt.backends.cuda_source --write); tests/test_family_table.py checks it is current.",
        "//",
        "// The elementwise kernel families: each has its math and its functor <Family>Op<M, V> (ops.cuh) in",
        "// <family>.cuh. A family's kind (the CPU kernel index) is its position in this table.",
        "#pragma once",
        *[f'#include "{family}.cuh"' for family, _, _ in table],
        "",
        f"#define FASTOPT_FAMILY_COUNT {len(table)}",
        "",
        "// X(kind, family, functor, variant): one row per compiled variant (kernels/cpu/cpu_loops.hpp)",
        "#define FASTOPT_UPDATE_VARIANTS(X) \\",
        *[f"    X({k}, {f}, {op}, {v}) \\" for k, f, op, v in rows],
        "",
        "",
        "// The CUDA entry points fo_<family>_v<variant>[_multi]: update.cu defines FO_UPDATE_ENTRIES and",
        "// FO_PER_TENSOR_ENTRIES (a family reading a number per tensor: the multi entry only) and then includes",
        "// this file (the same rows as above).",
        "#ifdef FO_UPDATE_ENTRIES",
        *[f"{'FO_PER_TENSOR_ENTRIES' if f in per_tensor else 'FO_UPDATE_ENTRIES'}({k}, {f}, {op}, {v})"
          for k, f, op, v in rows],
        "#endif",
        "",
        "// The 8-bit state entry points fo_<family>_v<variant>_q8 of the families an optimizer runs with",
        "// state_dtype=\"int8\" (the last argument: 1 when the functor reads a number per tensor): update.cu defines",
        "// FO_INT8_ENTRIES in the int8 modules (FASTOPT_STATE 4) only.",
        "#ifdef FO_INT8_ENTRIES",
        *[f"FO_INT8_ENTRIES({k}, {f}, {op}, {v}, {int(f in per_tensor)})" for k, f, op, v in rows if f in int8],
        "#endif",
        "",
        "// The two-phase families (spec.two_phase): a per-tensor reduction between phase 1 (the states, and",
        "// the norms of p and of the update: <family>_moments_math) and phase 2 (the step scaled by",
        "// <family>_trust_ratio: <family>_apply_math), all in <family>.cuh. X(index, family, params struct):",
        "// the CPU loops (kernels/cpu/cpu_loops.hpp) give each two kinds after the elementwise families.",
        *[f'#include "{f}.cuh"' for f in two_phase],
        f"#define FASTOPT_TWO_PHASE_COUNT {len(two_phase)}",
        "#define FASTOPT_TWO_PHASE_FAMILIES(X) \\",
        *[f"    X({i}, {f}, {f.capitalize()}Params) \\" for i, f in enumerate(two_phase)],
        "",
        "",
        "// Their CUDA entry points fo_<family>_moments_multi, _trust, _apply_multi: update.cu defines",
        "// FO_TWO_PHASE_ENTRIES(family, params struct) and includes this.",
        "#ifdef FO_TWO_PHASE_ENTRIES",
        *[f"FO_TWO_PHASE_ENTRIES({f}, {f.capitalize()}Params)" for f in two_phase],
        "#endif",
        "",
    ]
    return "\n".join(lines)


def write_family_header(check_only=False) -> bool:
    """Write kernels/cuda/families.cuh when it differs from the registry (in a source checkout: an installed
    package is not rewritten); True when it was current."""
    if not check_only and source_checkout() is None:
        raise RuntimeError(f"{FAMILY_HEADER} is written in a source checkout of fastopt (the build regenerates it); "
                           "this fastopt is installed")
    path = os.path.join(_kernel_dir(), FAMILY_HEADER)
    text = family_header()
    try:
        with open(path) as f:
            current = f.read() == text
    except FileNotFoundError:
        current = False
    if not current and not check_only:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return current


def _kernel_dir():
    """kernels/cuda in a source checkout, else the installed package data fastopt/kernels/cuda."""
    root = source_checkout()
    if root is not None:
        return os.path.join(root, "kernels", "cuda")
    from fastopt import kernels
    return os.path.join(os.path.dirname(kernels.__file__), "cuda")


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


def _inline(name, directory, seen):
    """The text of `name` with its local includes inlined once each (they all use #pragma once). The
    family table is generated from the live registry, not read from disk."""
    if name in seen:
        return ""
    seen.add(name)
    if name == FAMILY_HEADER:
        text = family_header()
    else:
        with open(os.path.join(directory, name)) as f:
            text = f.read()
    text = text.replace("#pragma once", "")
    return _INCLUDE.sub(lambda m: _inline(m.group(1), directory, seen), text)


@functools.lru_cache(maxsize=None)
def kernel_source() -> str:
    directory = _kernel_dir()
    seen: set = set()
    return "\n".join(f"// ---- {name} ----\n" + _inline(name, directory, seen) for name in SOURCES)


def compile_options(key) -> tuple:
    """NVRTC options of a module (module_key: a params' dtype, or (params' dtype, state dtype, rounding[, grads'
    dtype]): FASTOPT_STATE, FASTOPT_ROUND and FASTOPT_GRAD only where they differ from the defaults). --fmad=false: no multiply-add
    contraction (NVRTC contracts by default), as the CPU build's -ffp-contract=off, so that every kernel rounds as the reference does and
    two kernels inlining the same math (one array or a list, with or without a grad_scale multiply) agree
    bit for bit. Without it, on an H200, the one-rank sharded step over NCCL (clipping on, coefficient 1)
    differed from the class step in the last bit (tests/distributed/test_nccl.py)."""
    dtype, state, rounding, grads = module_dtypes(key)
    code, default = DTYPES[dtype]
    options = ("-std=c++17", f"-DFASTOPT_DTYPE={code}", f"-DFASTOPT_BLOCK={BLOCK}", f"-DFASTOPT_CHUNK={CHUNK}",
               f"-DFASTOPT_IN_FLIGHT={IN_FLIGHT}", "--fmad=false")
    if state != default:
        options += (f"-DFASTOPT_STATE={STATE_CODES[state]}",)
    if rounding != ROUND_NEAREST:
        options += (f"-DFASTOPT_ROUND={rounding}",)
    if grads != dtype:  # float32 grads of 16-bit params (module_key checked it)
        options += ("-DFASTOPT_GRAD=0",)
    return options


def entry_name(family, suffix):
    """The CUDA entry point of a kernel family: fo_<family>_<suffix> (update.cu pastes the same)."""
    return f"fo_{family}_{suffix}"


def update_kernel_name(family, variant, multi):
    return entry_name(family, f"v{variant}" + ("_multi" if multi else ""))


def int8_kernel_name(family, variant):
    """The multi-tensor entry point of a family's variant with 8-bit state (the int8 modules only)."""
    return entry_name(family, f"v{variant}_q8")


def two_phase_kernel_names(family) -> tuple:
    """(moments, trust, apply) entry points of a two-phase family, in launch order."""
    return tuple(entry_name(family, suffix) for suffix in TWO_PHASE_SUFFIXES)


def kernel_names(key=None) -> list:
    """The entry points the module of `key` (a module_key) exports: an int8 module's are the _q8 updates and the
    reductions, every other module's the rest. None: every entry point of the source."""
    per_tensor = per_tensor_families()
    names = [update_kernel_name(f, v, m) for f, _, vs in family_table() for v in vs
             for m in ((True,) if f in per_tensor else (False, True))]
    int8 = [int8_kernel_name(f, v) for f in int8_families() for v in _update_variants()[f]]
    if key is None:
        return names + list(__getattr__("OTHER_KERNELS")) + int8
    if module_dtypes(key)[1] == INT8:
        return int8 + list(REDUCTION_KERNELS)
    return names + list(__getattr__("OTHER_KERNELS"))


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write"]:
        try:
            current = write_family_header()
        except RuntimeError as exc:
            sys.exit(str(exc))
        print(f"{FAMILY_HEADER}: {'up to date' if current else 'regenerated from the registry'}")
    elif sys.argv[1:] == ["--check"]:
        sys.exit(0 if write_family_header(check_only=True) else f"{FAMILY_HEADER} is stale: run "
                 "python -m fastopt.backends.cuda_source --write")
    else:
        sys.exit("usage: python -m fastopt.backends.cuda_source --write | --check")
