"""GPU checks that run without a GPU (CI): the CUDA sources compile through NVRTC, the Numba kernels
compile to PTX and run on the CUDA simulator. Each heavy check runs in its own process (the simulator
must be switched on before numba is imported; the PTX check patches numba-cuda's device query)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from fastopt.backends import cuda_source

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _nvrtc():
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
        return nvrtc
    except Exception as e:  # no CuPy, or no NVRTC library
        pytest.skip(f"NVRTC not available ({type(e).__name__}: {e}); pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12")


def _side_by_side(fn, items):
    """[fn(item) for item in items], on as many threads as there are CPUs: each call runs a process or NVRTC
    (which releases the GIL), so the 2-core CI machine keeps both cores busy."""
    from concurrent.futures import ThreadPoolExecutor
    items = list(items)
    with ThreadPoolExecutor(max_workers=max(1, min(len(items), os.cpu_count() or 1))) as pool:
        return list(pool.map(fn, items))


@pytest.fixture(scope="module")
def ptx_by_target():
    """{(dtype or module name, arch): PTX} of the plain modules for sm_80 and sm_90 and of the precision modules
    for sm_90, compiled side by side on as many threads as there are CPUs (NVRTC releases the GIL; 21 modules,
    4.5 minutes in a row on the 2-core CI machine)."""
    nvrtc = _nvrtc()
    source = cuda_source.kernel_source()
    jobs = [((np.dtype(dtype).name, arch), arch, dtype)
            for dtype in (np.float32, np.float64, np.float16) for arch in ("sm_80", "sm_90")]
    # the precision modules (16-bit states, bfloat16 params, 8-bit state: cuda_source.module_key), for sm_90
    jobs += [((_key_name(key), "sm_90"), "sm_90", key) for key in PRECISION_MODULES]

    def compile_one(job):
        name, arch, key = job
        prog = nvrtc.createProgram(source, "fastopt.cu", [], [])
        try:
            nvrtc.compileProgram(prog, [f"--gpu-architecture={arch}", *cuda_source.compile_options(key)])
        except Exception:
            return name, None, nvrtc.getProgramLog(prog)
        ptx = nvrtc.getPTX(prog)
        return name, ptx.decode() if isinstance(ptx, bytes) else ptx, None

    results = _side_by_side(compile_one, jobs)
    failed = [f"NVRTC {name}:\n{log}" for name, _, log in results if log is not None]
    if failed:
        pytest.fail("\n".join(failed))
    return {name: ptx for name, ptx, _ in results}


F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
NEAREST, KAHAN, STOCHASTIC = cuda_source.ROUND_NEAREST, cuda_source.ROUND_KAHAN, cuda_source.ROUND_STOCHASTIC
PRECISION_MODULES = [cuda_source.module_key(F32, F16), cuda_source.module_key(F16, F16),
                     cuda_source.module_key(F16, None, KAHAN), cuda_source.module_key(F16, F16, STOCHASTIC)] + (
    [cuda_source.module_key(F32, cuda_source.BF16), cuda_source.module_key(cuda_source.BF16),
     cuda_source.module_key(cuda_source.BF16, cuda_source.BF16), cuda_source.module_key(cuda_source.BF16, None, STOCHASTIC),
     cuda_source.module_key(cuda_source.BF16, cuda_source.BF16, KAHAN)] if cuda_source.BF16 is not None else []) + [
    cuda_source.module_key(F32, cuda_source.INT8), cuda_source.module_key(F16, cuda_source.INT8, STOCHASTIC)] + (
    [cuda_source.module_key(cuda_source.BF16, cuda_source.INT8, KAHAN)] if cuda_source.BF16 is not None else []) + [
    # float32 grads of 16-bit params (FASTOPT_GRAD): plain, Kahan with 16-bit state, 8-bit state
    cuda_source.module_key(F16, None, NEAREST, F32), cuda_source.module_key(F16, F16, KAHAN, F32)] + (
    [cuda_source.module_key(cuda_source.BF16, cuda_source.INT8, STOCHASTIC, F32)] if cuda_source.BF16 is not None else [])


def _key_name(key):
    params, state, rounding, grads = cuda_source.module_dtypes(key)
    return f"{params.name} params, {grads.name} grads, {state.name} state, rounding {rounding}"


KEYS = {_key_name(key): key for key in PRECISION_MODULES}


def test_every_entry_point_compiles_for_sm80_sm90_and_every_dtype(ptx_by_target):
    assert len(ptx_by_target) == 6 + len(PRECISION_MODULES)
    for (dtype, arch), ptx in ptx_by_target.items():
        assert f".target {arch}" in ptx
        key = KEYS.get(dtype, np.dtype(dtype) if dtype in ("float32", "float64", "float16") else None)
        missing = [n for n in cuda_source.kernel_names(key) if f".entry {n}(" not in ptx]
        assert not missing, f"{dtype} {arch}: missing entry points {missing}"


def _entry(ptx, name):
    return ptx.split(f".entry {name}(")[1].split(".entry ")[0]


def test_float32_updates_do_float32_math(ptx_by_target):
    # float64 appears only where the hyperparameters (by value, or a capturable step's device row through the
    # read-only cache) and a device grad_scale are read and narrowed; never a local-memory copy of them
    allowed = {"cvt.rn.f32.f64", "ld.param.f64", "ld.global.f64", "ld.global.nc.f64"}
    int8 = _key_name(cuda_source.module_key(F32, cuda_source.INT8))
    for dtype in ("float32", "float16", int8):
        ptx = ptx_by_target[(dtype, "sm_90")]
        for name in cuda_source.kernel_names(KEYS.get(dtype, np.dtype(dtype) if dtype != int8 else None)):
            if not name.startswith(("fo_lamb", "fo_sumsq", "fo_global", "fo_step_guard", "fo_scale", "fo_clamp", "fo_touch",
                                    "fo_select")):
                ops = set(re.findall(r"\b([a-z]+(?:\.[a-z0-9]+)*\.f64)\b", _entry(ptx, name)))
                assert ops <= allowed, f"{dtype} {name}: {sorted(ops - allowed)}"
                assert "st.local" not in _entry(ptx, name), f"{dtype} {name}: local memory"


def test_single_array_kernels_use_16_byte_vector_loads(ptx_by_target):
    for (dtype, vec) in (("float32", "v4.f32"), ("float64", "v2.f64")):
        ptx = ptx_by_target[(dtype, "sm_90")]
        single, multi = _entry(ptx, "fo_adam_v0"), _entry(ptx, "fo_adam_v0_multi")
        assert f"ld.global.{vec}" in single and f"st.global.{vec}" in single, f"{dtype}: no 16-byte access"
        # table pointers are generic (not provably global): ld.v4 / st.v4 through generic addressing
        assert re.search(rf"\bld(\.global)?\.{vec}", multi) and re.search(rf"\bst(\.global)?\.{vec}", multi)


def _run(script, **env):
    proc = subprocess.run([sys.executable, os.path.join(HERE, script)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def test_numba_kernels_compile_to_ptx_without_f64_in_float32_math():
    pytest.importorskip("numba")
    rc, out = _run("ptx_checks.py")
    if "NVVM" in out and "PTX CHECKS" not in out:
        pytest.skip("libNVVM not found: pip install nvidia-cuda-nvcc-cu12")
    m = re.search(r"PTX CHECKS: (\d+) passed, (\d+) failed", out)
    assert m and rc == 0, out[-5000:]
    assert int(m.group(1)) >= 70 and int(m.group(2)) == 0


# the simulator runs every check in one Python thread per CUDA thread (16 minutes in a row on the 2-core Zen 1
# CI machine); six shards keep the side-by-side runs balanced (112-208 s each there)
SIM_SHARDS = 6


@pytest.fixture(scope="module")
def sim_shard_runs():
    """{shard: (status, output)} of every shard of sim_checks.py, run as processes side by side, as many at a
    time as there are CPUs (each keeps one core busy: on the 2-core CI machine 16 minutes in a row)."""
    pytest.importorskip("numba")

    def run(shard):  # one thread each: OpenMP or BLAS threads of processes side by side would wait on each other
        return _run("sim_checks.py", NUMBA_ENABLE_CUDASIM="1", SIM_CHECKS_SHARD=f"{shard}/{SIM_SHARDS}",
                    OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")

    return dict(zip(range(SIM_SHARDS), _side_by_side(run, range(SIM_SHARDS))))


@pytest.mark.parametrize("shard", range(SIM_SHARDS))
def test_numba_kernels_match_the_reference_on_the_simulator(sim_shard_runs, shard):
    rc, out = sim_shard_runs[shard]
    m = re.search(r"SIM CHECKS: (\d+) passed, (\d+) failed", out)
    assert m and rc == 0, out[-5000:]
    assert int(m.group(1)) >= 300 // SIM_SHARDS and int(m.group(2)) == 0  # 323 checks in all


def test_multi_tensor_table_layout():
    from fastopt.backends.cupy_backend import table_layout

    class A:
        def __init__(self, ptr, size):
            self.ptr, self.size = ptr, size

    chunk = cuda_source.CHUNK
    params = [A(256, chunk + 3), A(1024, 0), A(2048 + 4, 5)]
    grads = [A(4096, chunk + 3), A(0, 0), A(8192, 5)]
    host, nt, nc, offset = table_layout([params, grads, None])
    fields = host[:offset // 8].reshape(nt, cuda_source.TABLE_FIELDS)
    chunks = host[offset // 8:]
    assert (nt, nc) == (3, 3)
    assert fields[0].tolist() == [256, 4096, 0, 0, 0, chunk + 3, 1, 0, 0, 0, 0, 0, 0, 0]
    assert fields[2][5:9].tolist() == [5, 0, 2, 0]        # misaligned params: scalar loads
    # a fourth state (Adan's: the call's slot 6, after the Kahan compensation's) goes to column 8 (F_S3)
    s = [[A(16 * (k + 1) * 1024 + 16 * i, x.size) for i, x in enumerate(params)] for k in range(4)]
    host4, _, _, offset4 = table_layout([params, grads, s[0], s[1], s[2], None, s[3]])
    fields4 = host4[:offset4 // 8].reshape(nt, cuda_source.TABLE_FIELDS)
    assert fields4[0].tolist() == [256, 4096, 16384, 32768, 49152, chunk + 3, 1, 0, 65536, 0, 0, 0, 0, 0]
    # the Kahan compensation (the call's slot 5) goes to column 12 (F_C), beside a fourth state too
    comp = [A(1 << 20 | 16 * i, x.size) for i, x in enumerate(params)]
    hostc, _, _, offsetc = table_layout([params, grads, s[0], s[1], s[2], comp, s[3]])
    fieldsc = hostc[:offsetc // 8].reshape(nt, cuda_source.TABLE_FIELDS)
    assert fieldsc[0].tolist() == [256, 4096, 16384, 32768, 49152, chunk + 3, 1, 0, 65536, 0, 0, 0, 1 << 20, 0]
    assert [(int(c) >> 32, int(c) & 0xffffffff) for c in chunks] == [(0, 0), (0, 1), (2, 0)]
    # 8-bit states (QuantizedState): the codes in the state's column, the absmax in column 9 + the state's index
    from fastopt.precision import QuantizedState
    q = [[QuantizedState(A(65536 * (k + 1) + 256 * i, x.size), A(1 << 24 | 4096 * k + 64 * i, 1), True)
          for i, x in enumerate(params)] for k in range(2)]
    host8, _, _, offset8 = table_layout([params, grads, q[0], q[1], None])
    fields8 = host8[:offset8 // 8].reshape(nt, cuda_source.TABLE_FIELDS)
    assert fields8[2].tolist() == [2048 + 4, 8192, 65536 + 512, 131072 + 512, 0, 5, 0, 2, 0, (1 << 24) + 128,
                                   (1 << 24) + 4096 + 128, 0, 0, 0]
    # a fourth 8-bit state (Adan's, the call's slot 6): its codes in column 8 (F_S3), its absmax in 13 (F_A3)
    q4 = [[QuantizedState(A(65536 * (k + 1) + 256 * i, x.size), A(1 << 24 | 4096 * k + 64 * i, 1), True)
           for i, x in enumerate(params)] for k in range(4)]
    host4q, _, _, offset4q = table_layout([params, grads, q4[0], q4[1], q4[2], None, q4[3]])
    fields4q = host4q[:offset4q // 8].reshape(nt, cuda_source.TABLE_FIELDS)
    assert fields4q[2].tolist() == [2048 + 4, 8192, 65536 + 512, 131072 + 512, 196608 + 512, 5, 0, 2, 262144 + 512,
                                    (1 << 24) + 128, (1 << 24) + 4096 + 128, (1 << 24) + 8192 + 128, 0,
                                    (1 << 24) + 12288 + 128]
