"""The C++ compiler the tests that build shims of kernel headers use: $CXX, else g++, c++ or clang++. Without
one such a test skips, and under CI (CI set) it fails, as the build-matrix tests do."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parent.parent / "kernels"


def cxx_compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    if os.environ.get("CI"):
        pytest.fail("no C++ compiler found (CI requires one)")
    pytest.skip("no C++ compiler found")


def build_shim(tmp_dir, source: str) -> ctypes.CDLL:
    """A shared library of C++ `source` (which includes kernel headers from kernels/), compiled with the
    kernels' own flags (setup.py: no FMA contraction, no -march, the SIMD paths chosen at run time); the test
    fails with the compiler's message when it does not build."""
    src, out = Path(tmp_dir) / "shim.cpp", Path(tmp_dir) / "shim.so"
    src.write_text(source)
    cmd = [cxx_compiler(), "-O3", "-fno-math-errno", "-ffp-contract=off", "-fno-trapping-math", "-shared", "-fPIC",
           "-std=c++17", "-Wall", "-Werror", "-Wno-unused-function", f"-I{KERNELS}", str(src), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"{' '.join(cmd)}\n{done.stderr}")
    return ctypes.CDLL(str(out))


def cpu_flags() -> set:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def narrow_range_source(convert_block: str, convert_element: str) -> str:
    """C++ of `long narrow_range(first, last, block, bad_bits)` (for a shim's extern "C" block): the float32 bit
    patterns [first, last) through the block conversion `convert_block(const float*, fo_u16*, n)` in blocks of
    `block` elements (odd: tails), against the element conversion `convert_element(float)`; the number that
    differ, the first in *bad_bits."""
    return f"""
long narrow_range(unsigned long long first, unsigned long long last, int block, unsigned* bad_bits) {{
    float x[4096];
    fo_u16 got[4096];
    long bad = 0;
    for (unsigned long long b = first; b < last;) {{
        int n = 0;
        for (; n < block && b < last; ++n, ++b) x[n] = fo_bits_float(static_cast<fo_u32>(b));
        {convert_block}(x, got, n);
        for (int k = 0; k < n; ++k)
            if (got[k] != {convert_element}(x[k])) {{
                if (bad++ == 0) *bad_bits = fo_float_bits(x[k]);
            }}
    }}
    return bad;
}}
"""
