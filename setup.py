"""Build script: the Cython CPU extension (C++ mode, OpenMP when the compiler has it) and the kernel
sources shipped as the package fastopt.kernels (the CUDA backends compile kernels/cuda at run time).

Portable by default: no -march=native. On x86-64 with GCC >= 11 or clang >= 14 the hot loops carry
target_clones (AVX-512, AVX2, baseline) and pick the best at load time (kernels/cpu/platform.hpp).

Environment:
  FASTOPT_OPENMP  unset: OpenMP if the compiler can build and link an OpenMP program, else a serial build
                  (said on stderr); 1: OpenMP required (error without it); 0: serial build.
  FASTOPT_NATIVE  1 adds -march=native for a local build.
  FASTOPT_DEBUG   1 keeps the debug info that Python's CFLAGS ask for (-g); by default it is left out (-g0):
                  it is four fifths of the extension's size (17.8 MB with it, 3.5 MB without).
  CC / CXX        the compiler, as for any setuptools build; every probe below uses the same compiler
                  object and flags as the real build, so its answer holds for the extension.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError
from setuptools.extension import Extension

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_DIR = os.path.join(HERE, "kernels", "cpu")

# gcc and clang take the same flags. -ffp-contract=off matters for both: gcc defaults to "fast" and clang
# to "on" (fuse within an expression); either would round differently from the NumPy reference.
UNIX_ARGS = [
    "-O3",
    "-std=c++17",
    "-fno-math-errno",      # lets the compiler emit packed sqrt (sqrt never sets errno here)
    "-ffp-contract=off",    # no FMA contraction: the kernels round like the NumPy reference
    "-fno-trapping-math",
    "-Wno-unused-function",
]
# MSVC: /fp:precise does not contract (VS 2022 needs /fp:contract for that).
MSVC_ARGS = ["/O2", "/std:c++17", "/fp:precise"]

OMP_PROBE = """#include <omp.h>
int main() {
    int n = 0;
#pragma omp parallel reduction(+ : n)
    n += 1;
    return n > 0 && omp_get_max_threads() > 0 ? 0 : 1;
}
"""
# The exact attribute macros of the kernels: fails where the toolchain cannot build target_clones (no ifunc,
# e.g. musl), although the compiler checks in platform.hpp allow them.
CLONES_PROBE = """#include "platform.hpp"
FASTOPT_CLONES int twice(int x) { return 2 * x; }
int main() { return twice(1) == 2 ? 0 : 1; }
"""


def openmp_mode():
    value = os.environ.get("FASTOPT_OPENMP", "").strip()
    if value not in ("", "0", "1"):
        sys.exit(f"fastopt: FASTOPT_OPENMP must be 0, 1 or unset, not {value!r}")
    return {"": "auto", "0": "off", "1": "on"}[value]


def regenerate_family_table():
    """kernels/cuda/families.cuh (the kernel families and variants the CPU loops and the CUDA entry points
    compile) from the registry, fastopt/specs.py. In a child process: importing fastopt here would load the
    extension this build replaces. When the registry cannot be imported (a build environment without the
    runtime dependencies) the header in the source tree is used as it is."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, "-m", "fastopt.backends.cuda_source", "--write"], cwd=HERE, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print("fastopt: could not regenerate kernels/cuda/families.cuh from the registry; using the file as it is\n"
              + proc.stderr.strip()[-2000:], file=sys.stderr)


class BuildExt(build_ext):
    """Chooses the flags with the compiler setuptools actually uses (CC/CXX, sysconfig's CXX, MSVC)."""

    def _builds(self, source, compile_args, link_args):
        """True if `source` compiles and links into a program with this compiler and these flags."""
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.cpp")
            with open(src, "w") as f:
                f.write(source)
            try:
                objs = self.compiler.compile([src], output_dir=tmp, include_dirs=[CPU_DIR],
                                             extra_postargs=compile_args)
                # link a program, not a shared object: a shared object links with undefined omp_* symbols
                # and only fails at import, which is the bug this probe exists to prevent
                self.compiler.link_executable(objs, "probe", output_dir=tmp, extra_postargs=link_args,
                                              target_lang="c++")
            except CCompilerError:
                return False
        return True

    def build_extensions(self):
        regenerate_family_table()
        msvc = self.compiler.compiler_type == "msvc"
        args = list(MSVC_ARGS if msvc else UNIX_ARGS)
        if os.environ.get("FASTOPT_NATIVE") == "1" and not msvc:
            args.append("-march=native")
        if os.environ.get("FASTOPT_DEBUG") != "1" and not msvc:
            args.append("-g0")  # after sysconfig's -g on the command line, so it wins
        omp_flag = "/openmp" if msvc else "-fopenmp"  # clang: works only where libomp is installed
        mode = openmp_mode()
        openmp = mode != "off" and self._builds(OMP_PROBE, args + [omp_flag], [] if msvc else [omp_flag])
        if mode == "on" and not openmp:
            sys.exit("fastopt: FASTOPT_OPENMP=1 but the compiler cannot build an OpenMP program "
                     f"(tried {omp_flag}); install OpenMP (e.g. libomp for clang) or set FASTOPT_OPENMP=0")
        if mode == "auto" and not openmp:
            print(f"fastopt: the compiler cannot build an OpenMP program ({omp_flag}); building the CPU kernels "
                  "single-threaded", file=sys.stderr)
        macros = []
        if not msvc and not self._builds(CLONES_PROBE, args, []):
            print("fastopt: the toolchain cannot build target_clones (no ifunc support?); building the CPU "
                  "kernels without runtime ISA dispatch", file=sys.stderr)
            macros.append(("FASTOPT_NO_CLONES", "1"))
        cxx = getattr(self.compiler, "compiler_so_cxx", None) or getattr(self.compiler, "compiler_so", None)
        print(f"fastopt: compiler {' '.join(cxx[:1]) if cxx else self.compiler.compiler_type}, "
              f"OpenMP {'on' if openmp else 'off'}, runtime ISA dispatch {'off' if macros else 'per platform.hpp'}",
              file=sys.stderr)
        for ext in self.extensions:
            ext.extra_compile_args = args + ([omp_flag] if openmp else [])
            ext.extra_link_args = [omp_flag] if openmp and not msvc else []
            ext.define_macros = list(ext.define_macros) + macros
        super().build_extensions()


# Found, not listed: a listed set lost fastopt.distributed from the wheel and the sdist. kernels/ ships as
# fastopt.kernels (package_dir below). tests/test_packaging.py checks the built tree.
PACKAGES = find_packages(include=["fastopt", "fastopt.*"]) + [
    "fastopt." + name for name in find_packages(include=["kernels", "kernels.*"])]

extensions = [
    Extension(
        "fastopt.kernels.cpu._cpu_fast",
        sources=["kernels/cpu/_cpu_fast.pyx"],
        include_dirs=[np.get_include(), "kernels/cpu", "kernels/cuda"],
        depends=[os.path.join("kernels", d, f) for d in ("cpu", "cuda")
                 for f in os.listdir(os.path.join(HERE, "kernels", d)) if f.endswith((".hpp", ".cuh"))],
        language="c++",
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
]

setup(
    packages=PACKAGES,
    package_dir={"fastopt.kernels": "kernels"},
    package_data={
        "fastopt": ["py.typed", "*.pyi"],
        "fastopt.kernels.cuda": ["*.cuh", "*.cu"],
        "fastopt.kernels.cpu": ["*.pyx", "*.hpp"],
    },
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3"},
        compile_time_env={},
    ),
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
