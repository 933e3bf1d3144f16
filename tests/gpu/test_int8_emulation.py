"""8-bit optimizer state on the CuPy backend (state_dtype="int8", DESIGN.md "Precision", issue 13): the _q8 kernels
of an int8 module (cuda_source.module_key(..., INT8)), executed on the CPU by tests/gpu/cuda_emulator.py, against
the NumPy reference (fastopt.precision's quantizer, which the CPU loops equal bit for bit). Every optimizer that
takes 8-bit state, every option set, float32, float16 and bfloat16 params (16-bit ones with their own or with float32
grads), rounded to nearest, Kahan-compensated
and stochastically rounded, one array (several chunks and a partial last block; misaligned: the scalar path) and a
list (an empty tensor, one element, a multi-chunk tensor), a host and a device grad_scale: the params, the codes
and the absmax must equal the reference bit for bit. The optimizers whose state must stay exact, and the backends
without 8-bit kernels, are refused by name with nothing written."""
from __future__ import annotations

import platform
import shutil

import numpy as np
import pytest

from fastopt.backends import cupy_backend, cuda_source, numpy_backend
from fastopt.precision import INT8_REFUSED, QuantizedState, StochasticRounding, signed_state
from fastopt.specs import REGISTRY

from test_cuda_emulation import to_device
from test_cupy_launch_abi import assert_launches_fit, module_dtype, option_sets, use_cupy

pytestmark = pytest.mark.skipif(shutil.which("g++") is None or platform.machine() not in ("x86_64", "AMD64"),
                                reason="the emulated kernels are built with g++ for x86-64 (F16C for float16)")

CHUNK = cuda_source.CHUNK
F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
BF16 = cuda_source.BF16
DTYPES = [F32, F16] + ([BF16] if BF16 is not None else [])
# (params, grads) dtypes: each params dtype with its own grads, and float32 grads of 16-bit params (FASTOPT_GRAD)
GRADS = [(d, d) for d in DTYPES] + [(d, F32) for d in DTYPES if d.itemsize == 2]
# one array: two chunks and a partial last quantization block; misaligned params (the scalar path); a list
LAYOUTS = {"one array": [(CHUNK + 3 * 256 + 37,)], "misaligned": [(517,)],
           "list": [(7,), (0,), (1,), (33, 5), (CHUNK + 5,)]}
STEPS = (1, 10)
INT8_SPECS = [s.name for s in REGISTRY.values() if s.states and not s.two_phase and s.name not in INT8_REFUSED]
_modules: dict = {}


@pytest.fixture(scope="module")
def emu():
    import cuda_emulator
    return cuda_emulator.EmuCupy()


@pytest.fixture(params=[1, 4], ids=["in flight 1", "in flight 4"])
def cp(emu, monkeypatch, request):
    """The emulated CuPy; the _q8 kernels built with FASTOPT_IN_FLIGHT 1 (one row of a chunk at a time, the
    default) and 4 (every row's loads first: the variant the GPU benchmark also times)."""
    monkeypatch.setattr(cuda_source, "IN_FLIGHT", request.param)
    emu.launches.clear()
    return use_cupy(monkeypatch, emu, _modules.setdefault(request.param, {}))


def _host_call(rng, spec, hp, dtype, shapes, as_list, mode, gdtype=None):
    """(host arrays, names, stochastic) of one call: params of `dtype` and grads of `gdtype` (else `dtype`), each
    state a QuantizedState of random values (the signed map's may be negative), the Kahan compensation (mode
    "kahan") in slot 5."""
    def state(name, shape):
        x = rng.standard_normal(shape).astype(np.float32) * np.float32(rng.choice([1e-3, 1.0, 30.0]))
        if shape and np.prod(shape) > 3:
            x.reshape(-1)[rng.integers(np.prod(shape))] = 0.0
        if np.prod(shape) >= 512:  # a block of zero state under zero grads stays zero: the all-zero block's codes
            x.reshape(-1)[:256] = 0.0
        return QuantizedState.from_float(x if signed_state(name) else np.abs(x), signed_state(name))

    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [(rng.standard_normal(s) * 0.5).astype(dtype if gdtype is None else gdtype) for s in shapes]
    for g in grads:
        if g.size >= 512:
            g.reshape(-1)[:256] = 0
    tail, names = spec.plan_call(hp, lambda name: [state(name, s) for s in shapes])
    stochastic = None
    if mode == "kahan":
        from fastopt.functional import with_kahan
        comp = [(rng.standard_normal(s) * 1e-3).astype(dtype) for s in shapes]
        tail, names = with_kahan(tuple(tail), names, comp)
    elif mode == "stochastic":
        stochastic = StochasticRounding(int(rng.integers(2 ** 63)), 3, int(rng.integers(2 ** 40)))
    arrays = (params, grads) + tuple(tail)
    if not as_list:
        arrays = tuple(None if a is None else a[0] for a in arrays)
    return arrays, names, stochastic


def _bytes(arrays):
    """Every array of a call as bytes (a QuantizedState: its codes and absmax), device arrays read back."""
    out = []
    for entry in arrays:
        for a in (entry if isinstance(entry, list) else [entry]):
            for x in ((a.codes, a.absmax) if isinstance(a, QuantizedState) else (a,)):
                if x is not None:
                    out.append((x.get() if hasattr(x, "get") else x).tobytes())
    return out


def _modes(dtype):
    return ("nearest",) if dtype == F32 else ("nearest", "kahan", "stochastic")


@pytest.mark.parametrize("dtypes", GRADS, ids=lambda d: f"{d[0]} params, {d[1]} grads")
@pytest.mark.parametrize("name", INT8_SPECS)
def test_emulated_int8_kernels_equal_the_reference(cp, name, dtypes):
    dtype, gdtype = dtypes
    spec = REGISTRY[name]
    rng = np.random.default_rng([53, list(REGISTRY).index(name), dtype.num, gdtype.num])
    ran = 0
    for hp in option_sets(spec):
        for step in STEPS:
            for layout, shapes in LAYOUTS.items():
                for mode in _modes(dtype):
                    as_list = layout == "list"
                    host, names, stochastic = _host_call(rng, spec, hp, dtype, shapes, as_list, mode, gdtype)
                    device = to_device(cp, host)
                    if layout == "misaligned":  # params and grads off 16 bytes: the scalar path
                        device = to_device(cp, host[:2], 4) + device[2:]
                    scale = ("device" if as_list and ran % 2 else 0.5)
                    grad_scale = cp.from_host(np.array(0.5, np.float32)) if scale == "device" else scale
                    numpy_backend.step(spec, tuple(host), names, hp, step, 0.5, stochastic=stochastic)
                    context = f"{name} {dtype}/{gdtype} grads {mode} hp={hp} step={step} {layout} grad_scale={scale}"
                    cp.launches.clear()
                    cupy_backend.step(spec, device, names, hp, step, grad_scale, stochastic=stochastic)
                    assert_launches_fit(cp, context)
                    updates = [launch for launch in cp.launches if launch.name.startswith(f"fo_{spec.kernel}_")]
                    rounding = {"nearest": 0, "kahan": 1, "stochastic": 2}[mode]
                    if any(a is not None for a in host[2:5]):  # SGD without momentum has no state to quantize
                        assert updates and all(launch.name.endswith("_q8") for launch in updates), context
                        key = cuda_source.module_key(dtype, cuda_source.INT8, rounding, gdtype)
                        assert all(module_dtype(launch.options) == key for launch in updates), context
                    got, want = _bytes(device), _bytes(host)
                    for i, (g, w) in enumerate(zip(got, want)):
                        assert g == w, f"{context}: array {i} of the call differs"
                    ran += 1
    assert ran


def test_the_skip_flag_leaves_8bit_state_unchanged(cp):
    spec = REGISTRY["adamw"]
    hp = dict(spec.defaults, lr=0.1)
    rng = np.random.default_rng(57)
    host, names, _ = _host_call(rng, spec, hp, F32, LAYOUTS["list"], True, "nearest")
    device = to_device(cp, host)
    before = _bytes(device)
    cupy_backend.step(spec, device, names, hp, 1, None, found_inf=cp.from_host(np.array(True)))
    assert _bytes(device) == before
    cupy_backend.step(spec, device, names, hp, 1, None, found_inf=cp.from_host(np.array(False)))
    numpy_backend.step(spec, tuple(host), names, hp, 1, None)
    assert _bytes(device) == _bytes(host) != before


@pytest.mark.parametrize("name", sorted(n for n in INT8_REFUSED if REGISTRY[n].states))
def test_optimizers_whose_state_stays_exact_are_refused_with_nothing_written(cp, name):
    spec = REGISTRY[name]
    hp = dict(spec.defaults, lr=0.1)
    rng = np.random.default_rng([59, len(name)])
    host, names, _ = _host_call(rng, spec, hp, F32, LAYOUTS["list"], True, "nearest")
    device = to_device(cp, host)
    before = _bytes(device)
    with pytest.raises(ValueError, match="8-bit state \\(state_dtype='int8'\\) is not supported"):
        cupy_backend.step(spec, device, names, hp, 1, None)
    assert _bytes(device) == before and not cp.launches


def test_other_backends_and_mixed_states_are_refused(cp):
    """A QuantizedState for a backend API without 8-bit kernels (state_dtypes=False), and 8-bit beside float states
    in one call: TypeErrors naming the state, before anything runs (the Numba backend's 8-bit kernels:
    tests/gpu/sim_checks.py)."""
    from fastopt.backends import device_arrays, validate
    spec = REGISTRY["adam"]
    hp = dict(spec.defaults, lr=0.1)
    host, names, _ = _host_call(np.random.default_rng(61), spec, hp, F32, [(300,)], True, "nearest")
    device = to_device(cp, host)
    api = device_arrays._DeviceApi(cupy_backend._describe, cupy_backend.DTYPES, "on the GPU")  # no 8-bit kernels
    with pytest.raises(TypeError, match=r"exp_avg\[0\]: 8-bit state .* this backend's kernels do not take it"):
        validate.validate_arrays(device, names, api, 1)
    mixed = device[:3] + ([cp.from_host(np.zeros(300, np.float32))],) + device[4:]
    with pytest.raises(TypeError, match=r"exp_avg_sq\[0\] is a .*expected a QuantizedState"):
        cupy_backend.step(spec, mixed, names, hp, 1, None)
    assert not cp.launches


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_init_state_makes_device_8bit_state_of_the_fill(cp, dtype):
    """init_state(..., state_dtype="int8") on CuPy params: QuantizedState of device arrays whose codes and scales
    equal the host ones (Adagrad's initial_accumulator_value: a nonzero fill)."""
    import fastopt
    shapes = [(0,), (1,), (300,), (3, 257)]
    host = [np.ones(s, dtype) for s in shapes]
    device = [cp.from_host(h) for h in host]
    for name, options in (("adam", {}), ("adagrad", {"initial_accumulator_value": 0.3}), ("rprop", {"lr": 0.01})):
        want = fastopt.init_state(name, host, state_dtype="int8", **options)
        got = fastopt.init_state(name, device, state_dtype="int8", **options)
        assert set(got) == set(want)
        for key in want:
            for g, w in zip(got[key], want[key]):
                assert isinstance(g, QuantizedState) and g.signed == w.signed
                assert isinstance(g.codes, type(device[0])) and isinstance(g.absmax, type(device[0]))
                assert g.codes.get().tobytes() == w.codes.tobytes() and g.codes.shape == w.codes.shape
                assert g.absmax.get().tobytes() == w.absmax.tobytes()
