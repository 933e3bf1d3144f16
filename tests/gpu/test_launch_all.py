"""tests/gpu/launch_all.py (the program compute-sanitizer runs in `make gpu-check`) without a GPU: its
configurations select every compiled variant of every registry optimizer, and its backend-interface sweep,
run against the stand-in CuPy of test_cupy_launch_abi.py, launches every entry point of
cuda_source.kernel_names() in every dtype, each launch fitting its kernel's C signature."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import launch_all
from fastopt.backends import cuda_source, cupy_backend
from fastopt.specs import REGISTRY
from test_cupy_launch_abi import UNREACHABLE, assert_launches_fit, fake  # noqa: F401  (fake: the stand-in CuPy fixture)

HERE = os.path.dirname(os.path.abspath(__file__))


class FakeArrays:
    """launch_all's array factory on the stand-in CuPy: shapes and dtypes without memory."""

    def __init__(self, stand_in):
        self.fake = stand_in

    def array(self, host):
        return self.fake.alloc(np.shape(host), np.asarray(host).dtype)

    def misaligned(self, host):
        host = np.asarray(host)
        return self.fake.alloc((host.size + 1,), host.dtype)[1:]


@pytest.mark.parametrize("spec", REGISTRY.values(), ids=lambda s: s.name)
def test_configurations_select_every_compiled_variant(spec):
    configs = launch_all.update_configs(spec)
    assert sorted(spec.variant(hp, step) for hp, step in configs) == sorted(set(spec.variants))
    for hp, step in configs:
        assert spec.validate(hp, step) == (hp, step)  # valid, already converted


def test_a_variant_no_configuration_reaches_is_an_error(monkeypatch):
    spec = REGISTRY["adam"]
    monkeypatch.setattr(type(spec), "variants", property(lambda self: (0, 1, 7)), raising=False)
    with pytest.raises(RuntimeError, match=r"adam: no configuration selects variant\(s\) \[7\]"):
        launch_all.update_configs(spec)


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_the_sweep_launches_every_cuda_entry_point_in_every_dtype(fake, quick):  # noqa: F811
    launched = {}
    make = FakeArrays(fake)
    for dtype in cupy_backend.DTYPES:
        fake.launches.clear()
        calls = launch_all.sweep_backend("cupy", make, dtypes=(dtype,), log=lambda *a: None, quick=quick)
        # clip_coefficient is CuPy elementwise arithmetic (no fastopt kernel): the stand-in has no arithmetic
        failed = [what for what, _ in calls.failures]
        assert all("clip_coefficient" in w for w in failed), calls.failures[:1]
        assert_launches_fit(fake, f"launch_all {dtype}")
        launched[dtype] = {launch.name for launch in fake.launches}
        modules = {option for launch in fake.launches for option in launch.options if "FASTOPT_DTYPE" in option}
        assert cuda_source.compile_options(dtype)[1] in modules  # the updates ran in the dtype's own module
    for dtype, names in launched.items():
        # 8-bit state is for float32 and 16-bit params: a float64 sweep launches no _q8 kernel
        expected = set(cuda_source.kernel_names())
        if np.dtype(dtype) == np.float64:
            expected -= set(cuda_source.kernel_names(cuda_source.module_key(np.float32, cuda_source.INT8)))
            expected |= set(cuda_source.REDUCTION_KERNELS)
        missing = expected - set(UNREACHABLE) - names
        assert not missing, f"{dtype}: never launched {sorted(missing)}"
        assert names <= expected


def test_list_mode_needs_no_gpu():
    out = subprocess.run([sys.executable, launch_all.__file__, "--list"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == sum(len(set(s.variants)) for s in REGISTRY.values())
    bad = subprocess.run([sys.executable, launch_all.__file__, "--backends", "opencl"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "--backends: unknown ['opencl']" in bad.stderr


def test_a_backend_that_cannot_start_is_a_failure_not_a_crash(monkeypatch, capsys):
    def broken():
        raise AttributeError("module 'numpy' has no attribute 'row_stack'")

    monkeypatch.setitem(launch_all.FACTORIES, "numba", broken)
    assert launch_all.main(["--backends", "numba"]) == 1
    out = capsys.readouterr().out
    assert "launch_all: numba: cannot create device arrays" in out and "row_stack" in out
    assert out.rstrip().endswith("launch_all: 0 calls on numba: 1 FAILED")


SIMULATED = """
import sys
import numpy as np
import launch_all
launch_all.SINGLE, launch_all.LIST_SHAPES = 37, ((5,), (0,), (3, 7), (70,))  # the simulator: one Python thread each
make = launch_all.NumbaArrays()
try:  # 16-bit params and states too (their bits through kernels/numba/precision.py)
    import ml_dtypes
    dtypes = (np.float32, np.float16, np.dtype(ml_dtypes.bfloat16))
except ImportError:
    dtypes = (np.float32, np.float16)
calls = launch_all.sweep_backend("numba", make, dtypes=dtypes, quick=True, log=lambda *a: None)
launch_all.public_api("numba", make, calls, np.random.default_rng(), dtypes=dtypes)
for what, tb in calls.failures[:3]:
    print(what, tb, file=sys.stderr)
print(calls.count, len(calls.failures))
"""


def _gpu_present():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver
        return False


@pytest.mark.skipif(_gpu_present(), reason="a GPU is here: make gpu-check runs launch_all on it for real")
def test_the_numba_sweep_and_public_calls_run_in_the_cuda_simulator():
    """launch_all's Numba half (device arrays, every backend-interface call, the classes with clip+skip and a
    NaN step, the clip functions) against the Numba backend, on tiny arrays in the CUDA simulator, for float32,
    float16 and bfloat16."""
    pytest.importorskip("numba", reason="the CUDA simulator is Numba's (the [gpu] extra)")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1",
               PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
    res = subprocess.run([sys.executable, "-c", SIMULATED], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    count, failed = map(int, res.stdout.split())
    assert failed == 0, res.stderr[-3000:]
    assert count > 400
