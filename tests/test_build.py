"""The build matrix (issue 9): the CPU extension builds and runs its compiled kernels wherever users install it.

- default: gcc + OpenMP, the build `make test` makes and the rest of the suite runs on;
- `FASTOPT_OPENMP=0 pip install .` with the default compiler (serial);
- `CC=clang CXX=clang++ pip install .`: Debian's clang has no libomp, so this is also the "compiler without
  OpenMP" case (the probe in setup.py must notice and build serially);
- the C++ loops compile for aarch64 (cross g++) without any x86 attribute;
- the compiler/version/arch guards of kernels/cpu/platform.hpp, read through the preprocessor.

Each build is a real `pip install` of a copy of this tree into a temporary target (same flags as a user's
build), started concurrently; a fresh interpreter then imports that copy and checks, bit for bit, a few
optimizers against fastopt.reference, and that the compiled backend ran (no NumPy fallback).

`make test` installs clang and the cross compiler with apt-get where it can (Debian, root). Without them
these tests skip and say why, except under CI (environment variable CI set), where they fail.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_DIR = ROOT / "kernels" / "cpu"
CUDA_DIR = ROOT / "kernels" / "cuda"
IN_CI = bool(os.environ.get("CI"))
X86_64_LINUX = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")
CLONES = "x86-64-v4,x86-64-v3,default"

# name -> environment of `pip install .` (on top of the test's environment minus compiler variables)
CONFIGS = {
    "gcc-serial": {"FASTOPT_OPENMP": "0"},
    "clang": {"CC": "clang", "CXX": "clang++"},
}
REQUIRES = {"gcc-serial": None, "clang": "clang++"}


def _require(tool):
    """Path of `tool`, or skip (fail under CI) naming what is missing."""
    path = shutil.which(tool)
    if path is None:
        msg = f"{tool} not found (`make test` installs it with apt-get on Debian when run as root)"
        if IN_CI:
            pytest.fail(msg + "; CI must run the whole build matrix")
        pytest.skip(msg)
    return path


def _major_version(cxx):
    out = subprocess.run([cxx, "-dumpversion"], capture_output=True, text=True, check=True).stdout
    return int(out.strip().split(".")[0])


def _links_openmp(cxx, tmp):
    """Whether `cxx -fopenmp` builds and links an OpenMP program: what setup.py's probe should find."""
    src = tmp / "omp.cpp"
    src.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
    return subprocess.run([cxx, "-fopenmp", str(src), "-o", str(tmp / "omp")], capture_output=True).returncode == 0


def _copy_tree(dst):
    """The files `pip install .` needs, from the working tree (uncommitted edits included), without build
    outputs, so the copy builds from scratch."""
    dst.mkdir(parents=True)
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, dst / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", "_cpu_fast.cpp", "*.o")
    for name in ("fastopt", "kernels"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)


@pytest.fixture(scope="session")
def builds(tmp_path_factory):
    """Start every available build at once (each compiles one translation unit, so two cores run two
    builds), then wait. name -> (site directory, build log, returncode) or None when its compiler is missing."""
    base = tmp_path_factory.mktemp("builds")
    env0 = {k: v for k, v in os.environ.items()
            if k not in ("CC", "CXX", "CFLAGS", "CXXFLAGS", "LDFLAGS", "FASTOPT_OPENMP", "FASTOPT_NATIVE",
                         "PYTHONPATH")}
    running = {}
    for name, extra in CONFIGS.items():
        if REQUIRES[name] and shutil.which(REQUIRES[name]) is None:
            running[name] = None
            continue
        src, site = base / f"src-{name}", base / f"site-{name}"
        _copy_tree(src)
        log = open(base / f"{name}.log", "w")
        cmd = [sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "--no-index",
               "--target", str(site), str(src)]
        proc = subprocess.Popen(cmd, env={**env0, **extra}, stdout=log, stderr=subprocess.STDOUT, cwd=base)
        running[name] = (proc, site, log)
    out = {}
    for name, item in running.items():
        if item is None:
            out[name] = None
            continue
        proc, site, log = item
        rc = proc.wait(timeout=1200)
        log.close()
        out[name] = (site, Path(log.name).read_text(), rc)
    return out


CHECK = textwrap.dedent(r'''
    import json, sys, warnings
    import numpy as np
    warnings.simplefilter("error")          # the NumPy-fallback warning fails the check
    site = sys.argv[1]
    import fastopt
    from fastopt import reference
    from fastopt.backends import cython_backend, dispatch
    from fastopt.specs import REGISTRY
    assert cython_backend.AVAILABLE, cython_backend.IMPORT_ERROR
    from fastopt.kernels.cpu import _cpu_fast
    assert fastopt.__file__.startswith(site) and _cpu_fast.__file__.startswith(site), (fastopt.__file__,
                                                                                     _cpu_fast.__file__)
    assert dispatch.backend_for(np.zeros(3)).NAME == "cython"

    CASES = [
        ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
        ("adagrad", dict(lr=0.1, lr_decay=0.01)),
        ("rmsprop", dict(lr=0.01, centered=True, momentum=0.9)),
        ("adam", dict(lr=0.01, amsgrad=True, weight_decay=0.01)),
        ("adamw", dict(lr=0.01)),
        ("nadam", dict(lr=0.01)),
        ("radam", dict(lr=0.01)),
        ("adabelief", dict(lr=0.01)),
        ("lion", dict(lr=1e-3, weight_decay=0.1)),
    ]
    rng = np.random.default_rng(0)
    checked = 0
    for name, hp in CASES:
        spec = REGISTRY[name]
        fn = getattr(fastopt, spec.function_name)
        for dtype in (np.float32, np.float64):
            # 70_001 elements: above the parallel threshold, several chunks and a ragged tail
            params = [rng.standard_normal(n).astype(dtype) for n in (70_001, 33, 1)]
            state = fastopt.init_state(name, params, **{k: v for k, v in hp.items() if k in spec.state_options})
            ref_p = [p.copy() for p in params]
            ref_s = {k: [a.copy() for a in v] for k, v in state.items()}
            for t in range(1, 4):
                grads = [rng.standard_normal(p.size).astype(dtype) for p in params]
                kw = dict(hp, step=t) if spec.uses_step else dict(hp)
                fn(params, grads, **state, **kw, backend="cython")
                for i in range(len(params)):
                    reference.STEPS[name](ref_p[i], grads[i], **{k: v[i] for k, v in ref_s.items()}, **kw)
            for i in range(len(params)):
                np.testing.assert_array_equal(params[i], ref_p[i], err_msg=f"{name} {dtype.__name__} params[{i}]")
                for k in state:
                    np.testing.assert_array_equal(state[k][i], ref_s[k][i], err_msg=f"{name} {k}[{i}]")
            checked += 1

    g = [rng.standard_normal(n).astype(np.float32) for n in (70_001, 5)]
    assert abs(fastopt.global_norm(g, backend="cython") / reference.global_norm(g) - 1) < 1e-12
    h = [a.copy() for a in g]
    fastopt.clip_by_value(g, 0.5, backend="cython")
    for a in h:
        reference.clamp_(a, 0.5)
    for a, b in zip(g, h):
        np.testing.assert_array_equal(a, b)

    fastopt.set_num_threads(4)
    threads = fastopt.get_num_threads()
    print(json.dumps({"openmp": _cpu_fast.OPENMP, "isa": _cpu_fast.ISA_DISPATCH, "threads": threads,
                      "checked": checked}))
''')


def _check_build(builds, name):
    result = builds[name]
    if result is None:
        _require(REQUIRES[name])
    site, log, rc = result
    assert rc == 0, f"pip install for {name} failed:\n{log[-6000:]}"
    env = {k: v for k, v in os.environ.items() if k != "FASTOPT_BACKEND"}
    env["PYTHONPATH"] = str(site)
    out = subprocess.run([sys.executable, "-c", CHECK, str(site)], capture_output=True, text=True, env=env,
                         cwd=site.parent, timeout=600)
    assert out.returncode == 0, f"{name}: the check failed:\n{out.stdout}\n{out.stderr}\n--- build log ---\n{log[-3000:]}"
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["checked"] == 18
    if sys.platform.startswith("linux"):
        assert _debug_sections(site) == [], f"{name}: built with debug info (setup.py adds -g0 unless FASTOPT_DEBUG=1)"
    return info, log


def _debug_sections(site):
    """The DWARF sections of the built extension, read with readelf (binutils, beside every gcc)."""
    (so,) = (site / "fastopt" / "kernels" / "cpu").glob("_cpu_fast*.so")
    out = subprocess.run([_require("readelf"), "-S", "-W", str(so)], capture_output=True, text=True, check=True)
    return [w for w in out.stdout.split() if w.startswith(".debug_")]


def test_serial_gcc_build(builds):
    """`FASTOPT_OPENMP=0 pip install .`: imports (no omp_* symbol left), runs the compiled kernels."""
    info, log = _check_build(builds, "gcc-serial")
    assert info["openmp"] is False and info["threads"] == 1
    cxx = sysconfig.get_config_var("CXX").split()[0]
    if X86_64_LINUX and "g++" in cxx and _major_version(cxx) >= 11:
        assert info["isa"] == CLONES


def test_clang_build(builds, tmp_path):
    """`CC=clang CXX=clang++ pip install .`: OpenMP exactly when clang can link it (Debian's clang without
    libomp: a serial build), clang's own target_clones on x86-64 (clang >= 14)."""
    info, log = _check_build(builds, "clang")
    has_omp = _links_openmp("clang++", tmp_path)
    assert info["openmp"] is has_omp
    assert info["threads"] == (4 if has_omp else 1)
    if not has_omp:
        assert "building the CPU kernels single-threaded" in log
    if X86_64_LINUX and _major_version("clang++") >= 14:
        assert info["isa"] == CLONES


def test_default_build_is_openmp():
    """The extension the rest of the suite runs on (`make test`'s build: the default compiler with OpenMP)."""
    from fastopt.backends import cython_backend
    assert cython_backend.AVAILABLE, cython_backend.IMPORT_ERROR
    ext = cython_backend._cpu_fast
    cxx = sysconfig.get_config_var("CXX") or ""
    if (sys.platform.startswith("linux") and "g++" in cxx and not os.environ.get("CXX")
            and os.environ.get("FASTOPT_OPENMP") != "0"):
        assert ext.OPENMP, "gcc on Linux has OpenMP: the default build should use it"
    if X86_64_LINUX and "g++" in cxx and _major_version(cxx.split()[0]) >= 11:
        assert ext.ISA_DISPATCH == CLONES


def test_fallback_warning_gives_the_reason():
    """A broken or missing extension: one warning, quoting the ImportError."""
    code = textwrap.dedent('''
        import sys, warnings
        sys.modules["fastopt.kernels.cpu._cpu_fast"] = None   # what a failed import looks like
        import numpy as np, fastopt
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            fastopt.sgd_step(np.zeros(3), np.ones(3), lr=1.0)
            fastopt.sgd_step(np.zeros(3), np.ones(3), lr=1.0)
        print("\\n".join(str(x.message) for x in w if issubclass(x.category, RuntimeWarning)))
    ''')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, lines
    assert "failed to load (ModuleNotFoundError: import of fastopt.kernels.cpu._cpu_fast halted; None in " \
        "sys.modules)" in lines[0], lines[0]
    assert "NumPy reference" in lines[0]


# ---- platform.hpp, through the preprocessor ----

PROBE = """#include "platform.hpp"
#define FO_STR2(x) #x
#define FO_STR(x) FO_STR2(x)
fo_isa=FASTOPT_ISA_DISPATCH
fo_inline=FO_STR(FASTOPT_INLINE)
fo_openmp=FASTOPT_OPENMP
"""


def _preprocess(cxx, args, tmp):
    src = tmp / "probe.cpp"
    src.write_text(PROBE)
    out = subprocess.run([cxx, "-std=c++17", "-E", "-P", *args, f"-I{CPU_DIR}", str(src)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    vals = dict(line.split("=", 1) for line in out.stdout.splitlines() if line.startswith("fo_"))
    return {k[3:]: v.strip().strip('"') for k, v in vals.items()}


GUARDS = [
    # compiler, extra flags, expected ISA dispatch (None: clones where the host is x86-64 Linux), inline
    ("g++", [], None, "static inline __attribute__((always_inline))"),
    # GCC 9/10 (manylinux2014) do not know arch=x86-64-v4: no clones
    ("g++", ["-U__GNUC__", "-D__GNUC__=10"], "none", "static inline __attribute__((always_inline))"),
    ("g++", ["-DFASTOPT_NO_CLONES"], "none", "static inline __attribute__((always_inline))"),
    # MSVC: __forceinline, no GNU attribute, no clones
    ("g++", ["-U__GNUC__", "-U__clang__", "-D_MSC_VER=1930"], "none", "static __forceinline"),
    ("clang++", [], None, "static inline __attribute__((always_inline))"),
    # clang 13 has no target_clones
    ("clang++", ["-U__clang_major__", "-D__clang_major__=13"], "none", "static inline __attribute__((always_inline))"),
    ("aarch64-linux-gnu-g++", [], "none", "static inline __attribute__((always_inline))"),
]


@pytest.mark.parametrize("cxx, args, isa, inline", GUARDS, ids=[f"{c} {' '.join(a)}".strip() for c, a, _, _ in GUARDS])
def test_platform_guards(cxx, args, isa, inline, tmp_path):
    path = _require(cxx)
    if cxx == "g++" and _major_version(path) < 11 and isa is None:
        isa = "none"
    if cxx == "clang++" and _major_version(path) < 14 and isa is None:
        isa = "none"
    if isa is None:
        isa = CLONES if X86_64_LINUX else "none"
    got = _preprocess(path, args, tmp_path)
    assert got["isa"] == isa and got["inline"] == inline and got["openmp"] == "0", got
    if cxx != "clang++" or _links_openmp(path, tmp_path):  # Debian's clang has no omp.h without libomp
        assert _preprocess(path, args + ["-fopenmp"], tmp_path)["openmp"] == "1"


@pytest.mark.parametrize("openmp", [False, True], ids=["serial", "openmp"])
def test_cpu_loops_compile_for_aarch64(openmp, tmp_path):
    """The C++ loops (and the .cuh math they include) compile for aarch64 with the build's flags, and no
    attribute is ignored there (-Werror=attributes: an x86-only attribute would be)."""
    cxx = _require("aarch64-linux-gnu-g++")
    src = tmp_path / "loops.cpp"
    src.write_text('#include "cpu_loops.hpp"\n')
    obj = tmp_path / "loops.o"
    cmd = [cxx, "-std=c++17", "-O3", "-fno-math-errno", "-ffp-contract=off", "-fno-trapping-math", "-Wall",
           "-Wno-unused-function", "-Werror=attributes", f"-I{CPU_DIR}", f"-I{CUDA_DIR}", "-c", str(src),
           "-o", str(obj)] + (["-fopenmp"] if openmp else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    header = obj.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    assert out.stderr == "", out.stderr
