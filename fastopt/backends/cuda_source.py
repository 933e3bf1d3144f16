"""The CUDA sources of the CuPy backend, assembled for NVRTC: kernels/cuda/{update,reduce}.cu with their
local headers inlined, and the compile options of one (dtype, architecture).

Inlining the headers (instead of passing -I) makes the source string the whole input, so CuPy's
on-disk kernel cache, which hashes the source and options only, is invalidated by a header edit too.
Needs neither CuPy nor a GPU: the NVRTC compile check of CI (tests/gpu/test_gpu_compile.py) uses the
same functions as the launcher.
"""
from __future__ import annotations

import functools
import os
import re

import numpy as np

KERNEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "kernels", "cuda")
SOURCES = ("update.cu", "reduce.cu")

BLOCK = 256          # threads per block of every kernel (device.cuh FASTOPT_BLOCK)
CHUNK = 1 << 16      # elements per block of a multi-tensor launch (device.cuh FASTOPT_CHUNK)

# dtype of the params -> (FASTOPT_DTYPE code, dtype of the optimizer state)
DTYPES = {
    np.dtype(np.float32): (0, np.dtype(np.float32)),
    np.dtype(np.float64): (1, np.dtype(np.float64)),
    np.dtype(np.float16): (2, np.dtype(np.float32)),
}

# update entry points: family (OptimizerSpec.kernel) -> the variants compiled (fastopt/specs.py `variant`)
UPDATE_VARIANTS = {
    "sgd": (0, 1, 3, 5, 7), "adagrad": (0,), "rmsprop": (0, 1, 2, 3), "adam": (0, 1), "nadam": (0,),
    "radam": (0, 1), "adabelief": (0,), "lion": (0,),
}
OTHER_KERNELS = ("fo_lamb_moments_multi", "fo_lamb_trust", "fo_lamb_apply_multi", "fo_sumsq_chunks",
                 "fo_sumsq_tensors", "fo_global_norm", "fo_step_guard", "fo_scale_multi", "fo_clamp_multi", "fo_touch")


def _kernel_dir():
    """kernels/cuda in a source checkout, else the installed package data fastopt/kernels/cuda."""
    if os.path.isdir(KERNEL_DIR):
        return KERNEL_DIR
    from fastopt import kernels
    return os.path.join(os.path.dirname(kernels.__file__), "cuda")


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


def _inline(name, directory, seen):
    """The text of `name` with its local includes inlined once each (they all use #pragma once)."""
    if name in seen:
        return ""
    seen.add(name)
    with open(os.path.join(directory, name)) as f:
        text = f.read().replace("#pragma once", "")
    return _INCLUDE.sub(lambda m: _inline(m.group(1), directory, seen), text)


@functools.lru_cache(maxsize=None)
def kernel_source() -> str:
    directory = _kernel_dir()
    seen: set = set()
    return "\n".join(f"// ---- {name} ----\n" + _inline(name, directory, seen) for name in SOURCES)


def compile_options(dtype) -> tuple:
    code, _ = DTYPES[np.dtype(dtype)]
    return ("-std=c++17", f"-DFASTOPT_DTYPE={code}", f"-DFASTOPT_BLOCK={BLOCK}", f"-DFASTOPT_CHUNK={CHUNK}")


def update_kernel_name(family, variant, multi):
    return f"fo_{family}_v{variant}" + ("_multi" if multi else "")


def kernel_names() -> list:
    """Every entry point a compiled module must export."""
    names = [update_kernel_name(f, v, m) for f, vs in UPDATE_VARIANTS.items() for v in vs for m in (False, True)]
    return names + list(OTHER_KERNELS)
