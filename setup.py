"""Build script: the Cython CPU extension (C++ mode, OpenMP when the compiler has it) and the kernel
sources shipped as the package fastopt.kernels (the CUDA backends compile kernels/cuda at run time).

Portable by default: no -march=native. The hot loops carry gcc target_clones (AVX-512, AVX2, baseline)
and pick the best at load time. FASTOPT_NATIVE=1 adds -march=native for a local build.
"""
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import setup
from setuptools.extension import Extension

HERE = os.path.dirname(os.path.abspath(__file__))


def compiler_supports(flag):
    """True if the C++ compiler accepts `flag` (compile and link a tiny OpenMP-free program)."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        cmd = [*cxx.split(), flag, src, "-o", os.path.join(tmp, "probe")]
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


openmp = os.environ.get("FASTOPT_OPENMP", "1") != "0" and compiler_supports("-fopenmp")
if not openmp:
    print("fastopt: the compiler has no OpenMP; building the CPU kernels single-threaded", file=sys.stderr)

compile_args = [
    "-O3",
    "-std=c++17",
    "-fno-math-errno",      # lets gcc emit packed sqrt (sqrt never sets errno here)
    "-ffp-contract=off",    # no FMA contraction: the kernels round like the NumPy reference
    "-fno-trapping-math",
    "-Wno-unused-function",
]
link_args = []
if openmp:
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")
if os.environ.get("FASTOPT_NATIVE") == "1":
    compile_args.append("-march=native")

extensions = [
    Extension(
        "fastopt.kernels.cpu._cpu_fast",
        sources=["kernels/cpu/_cpu_fast.pyx"],
        include_dirs=[np.get_include(), "kernels/cpu", "kernels/cuda"],
        depends=[os.path.join("kernels", d, f) for d in ("cpu", "cuda")
                 for f in os.listdir(os.path.join(HERE, "kernels", d)) if f.endswith((".hpp", ".cuh"))],
        language="c++",
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
]

setup(
    packages=[
        "fastopt", "fastopt.backends", "fastopt.train",
        "fastopt.kernels", "fastopt.kernels.cpu", "fastopt.kernels.cuda", "fastopt.kernels.numba",
    ],
    package_dir={"fastopt.kernels": "kernels"},
    package_data={
        "fastopt.kernels.cuda": ["*.cuh", "*.cu"],
        "fastopt.kernels.cpu": ["*.pyx", "*.hpp"],
    },
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3"},
        compile_time_env={},
    ),
    zip_safe=False,
)
