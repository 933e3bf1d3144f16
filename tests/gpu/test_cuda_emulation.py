"""The CuPy backend's kernels, executed on the CPU by tests/gpu/cuda_emulator.py (the source NVRTC compiles,
built with g++), against the NumPy reference: every registry optimizer with every option set, float32,
float64 and float16 params, one array (odd size, aligned and misaligned) and a list (an empty tensor, a
multi-chunk one), a host and a device grad_scale, the skip flag set and clear. Elementwise families must
equal the reference bit for bit (the GPU build has --fmad=false, the emulation -ffp-contract=off, the CPU
reference rounds every operation); LARS and LAMB sum their norms in another order (a tolerance)."""
from __future__ import annotations

import platform
import shutil

import numpy as np
import pytest

from fastopt.backends import cupy_backend, cuda_source, numpy_backend
from fastopt.backends.device_arrays import state_dtype
from fastopt.precision import QuantizedState
from fastopt.specs import REGISTRY

from test_cupy_launch_abi import assert_launches_fit, module_dtype, option_sets, use_cupy

pytestmark = pytest.mark.skipif(shutil.which("g++") is None or platform.machine() not in ("x86_64", "AMD64"),
                                reason="the emulated kernels are built with g++ for x86-64 (F16C for float16)")

CHUNK = cuda_source.CHUNK
F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
BF16 = cuda_source.BF16  # None without ml_dtypes
LAYOUTS = {"one array": [(3 * 256 * 4 + 5,)], "misaligned": [(1031,)],
           "list": [(7,), (0,), (33, 5), (CHUNK + 5,), (1,)]}
STEPS = (1, 10)


@pytest.fixture(scope="module")
def emu():
    import cuda_emulator
    return cuda_emulator.EmuCupy()


@pytest.fixture(params=[1, 4], ids=["in flight 1", "in flight 4"])
def cp(emu, monkeypatch, request):
    """The emulated CuPy in the backend; the multi-tensor kernels built with FASTOPT_IN_FLIGHT 1 (the
    default) and 4 (cuda_source.IN_FLIGHT: the variant the GPU benchmark is to measure)."""
    monkeypatch.setattr(cuda_source, "IN_FLIGHT", request.param)
    emu.launches.clear()
    return use_cupy(monkeypatch, emu, _modules.setdefault(request.param, {}))  # compiled once per dtype and variant


_modules: dict = {}  # IN_FLIGHT -> the backend's module cache


def _host_arrays(rng, spec, hp, dtype, shapes, as_list, sdtype=None, gdtype=None):
    """(host arrays, names) as the backend takes them: params, grads (of dtype `gdtype`, else the params'),
    then the states (non-negative values: valid for every family's states; of dtype `sdtype`, else the
    default), None for unused slots."""
    def make(shape, dt, positive=False):
        x = rng.standard_normal(shape).astype(np.float64)
        return (np.abs(x) if positive else x).astype(dt)

    params = [make(s, dtype) for s in shapes]
    grads = [make(s, dtype) * dtype.type(0.5) for s in shapes]
    if gdtype is not None:  # float32 grads of 16-bit params: values a 16-bit grad could not hold
        grads = [(g.astype(gdtype) * gdtype.type(1 + 2 ** -12)) for g in grads]
    sdtype = state_dtype(dtype) if sdtype is None else sdtype
    tail, names = spec.plan_call(hp, lambda _: [make(s, sdtype, True) for s in shapes])
    arrays = (params, grads) + tuple(tail)
    if not as_list:
        arrays = tuple(None if a is None else a[0] for a in arrays)
    return arrays, names


def to_device(cp, arrays, misalign=0):
    """Device copies of a call's host arrays (lists kept, None kept; an 8-bit state's codes and scales)."""
    def one(a):
        if isinstance(a, QuantizedState):
            return QuantizedState(one(a.codes), one(a.absmax), a.signed)
        d = cp.alloc(a.shape, a.dtype, misalign=misalign if a.size else 0)
        if a.size:
            d.values[...] = a
        return d
    return tuple(None if a is None else ([one(x) for x in a] if isinstance(a, list) else one(a)) for a in arrays)


def _flat(arrays):
    out = []
    for a in arrays:
        if a is not None:
            out.extend(a if isinstance(a, list) else [a])
    return out


def _compare(spec, dtype, got, want, context):
    exact = not (spec.two_phase or spec.tensor_coefs is not None)
    for i, (g, w) in enumerate(zip(got, want)):
        g = g.get()
        if exact:
            assert g.tobytes() == w.tobytes(), \
                f"{context}: array {i} differs: {np.abs(g.astype(np.float64) - w.astype(np.float64)).max()}"
        else:
            tol = {F64: 1e-12, F32: 2e-6, F16: 2e-3, BF16: 1.6e-2}[dtype]
            np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=tol, atol=tol, err_msg=context)


SPECS = [s for s in REGISTRY.values()]


@pytest.mark.parametrize("dtype", [F32, F64, F16], ids=str)
@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_emulated_kernels_equal_the_reference(cp, name, dtype):
    spec = REGISTRY[name]
    rng = np.random.default_rng([17, list(REGISTRY).index(name), dtype.num])
    ran = 0
    for hp in option_sets(spec):
        for step in STEPS:
            for layout, shapes in LAYOUTS.items():
                as_list = layout == "list"
                for scale in ((None, 0.5, "device") if as_list else (None,)):
                    host, names = _host_arrays(rng, spec, hp, dtype, shapes, as_list)
                    device = to_device(cp, host, misalign=4 if layout == "misaligned" else 0)
                    if layout == "misaligned":  # the params and grads misaligned, the states aligned
                        device = (to_device(cp, host[:2], 4) + to_device(cp, host[2:]))
                    grad_scale = cp.from_host(np.array(0.25, dtype)) if scale == "device" else scale
                    want = [a.copy() for a in _flat(host)]
                    numpy_backend.step(spec, tuple(host), names, hp, step,
                                       0.25 if scale == "device" else scale)
                    context = f"{name} {dtype} hp={hp} step={step} {layout} grad_scale={scale}"
                    cp.launches.clear()
                    try:
                        cupy_backend.step(spec, device, names, hp, step, grad_scale)
                    except TypeError as e:
                        if "float16" in str(e) or "dtype" in str(e):
                            pytest.skip(f"{name} has no {dtype} kernels on the GPU: {e}")
                        raise
                    assert_launches_fit(cp, context)
                    _compare(spec, dtype, _flat(device)[:len(want)], _flat(host), context)
                    del want
                    ran += 1
    assert ran


# (params, state[, grads]) dtypes other than the defaults above: state_dtype= (DESIGN.md "Precision"), bfloat16
# params, and float32 grads of 16-bit params (their modules' FASTOPT_GRAD)
PRECISIONS = [(F32, F16), (F16, F16), (F16, F32, F32)] + (
    [(F32, BF16), (BF16, F32), (BF16, BF16), (BF16, BF16, F32)] if BF16 is not None else [])


def _dtypes_id(d):
    return f"{d[0]} params, {d[1]} state" + (f", {d[2]} grads" if len(d) > 2 else "")


@pytest.mark.parametrize("cp", [1], indirect=True, ids=["in flight 1"])
@pytest.mark.parametrize("dtypes", PRECISIONS, ids=_dtypes_id)
@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_emulated_16bit_params_and_states_equal_the_reference(cp, name, dtypes):
    """16-bit states (of float32 and 16-bit params) and bfloat16 params: the module of the (params, state)
    dtypes (cuda_source.module_key), widened exactly and stored rounded to nearest even as the CPU loops and the
    NumPy reference do: equal to the reference bit for bit over every option set, one array (aligned and
    misaligned) and a list, with a host and a device grad_scale."""
    dtype, sdtype, gdtype = (*dtypes, None)[:3]
    spec = REGISTRY[name]
    rng = np.random.default_rng([29, list(REGISTRY).index(name), dtype.num, sdtype.num, gdtype is not None])
    ran = 0
    for hp in option_sets(spec):
        for step in STEPS:
            for layout, shapes in LAYOUTS.items():
                as_list = layout == "list"
                for scale in ((None, "device") if as_list else (0.5,)):
                    host, names = _host_arrays(rng, spec, hp, dtype, shapes, as_list, sdtype, gdtype)
                    device = to_device(cp, host, misalign=4 if layout == "misaligned" else 0)
                    if layout == "misaligned":
                        device = (to_device(cp, host[:2], 4) + to_device(cp, host[2:]))
                    grad_scale = cp.from_host(np.array(0.25, np.float32)) if scale == "device" else scale
                    numpy_backend.step(spec, tuple(host), names, hp, step, 0.25 if scale == "device" else scale)
                    context = f"{name} {dtype}/{sdtype} hp={hp} step={step} {layout} grad_scale={scale}"
                    cp.launches.clear()
                    cupy_backend.step(spec, device, names, hp, step, grad_scale)
                    assert_launches_fit(cp, context)
                    # the update ran in the module of its dtypes (a call without a state: the params')
                    stateful = any(a is not None for a in host[2:])
                    key = cuda_source.module_key(dtype, sdtype if stateful else None, grad_dtype=gdtype)
                    assert all(module_dtype(launch.options) == key
                               for launch in cp.launches if launch.name.startswith(f"fo_{spec.kernel}_")), context
                    _compare(spec, sdtype if sdtype.itemsize < dtype.itemsize else dtype, _flat(device), _flat(host),
                             context)
                    ran += 1
    assert ran


ROUNDINGS = [(F16, F32), (F16, F16)] + ([(BF16, F32), (BF16, BF16), (BF16, F32, F32)] if BF16 is not None else [])


@pytest.mark.parametrize("cp", [1], indirect=True, ids=["in flight 1"])
@pytest.mark.parametrize("mode", ["kahan", "stochastic"])
@pytest.mark.parametrize("dtypes", ROUNDINGS, ids=_dtypes_id)
@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_emulated_kahan_and_stochastic_rounding_equal_the_reference(cp, name, dtypes, mode):
    """kahan=True (the compensation in the table's c column) and stochastic rounding (the key and each tensor's
    index offset in the Scalars: element i gets random_bits(key, index_offset + i)) of 16-bit params: the
    module of the mode (FASTOPT_ROUND) equals the NumPy reference bit for bit, params, states and compensation,
    over every option set, one array (aligned and misaligned: the vector and scalar paths) and a list; Adan's
    fourth state beside the compensation, and LAMB's apply pass (to _compare's tolerance: its norms sum in
    another order)."""
    from fastopt.functional import with_kahan
    from fastopt.precision import StochasticRounding
    dtype, sdtype, gdtype = (*dtypes, None)[:3]
    spec = REGISTRY[name]
    rng = np.random.default_rng([37, list(REGISTRY).index(name), dtype.num, sdtype.num, mode == "kahan",
                                 gdtype is not None])
    ran = 0
    for hp in option_sets(spec):
        for step in STEPS:
            for layout, shapes in LAYOUTS.items():
                as_list = layout == "list"
                host, names = _host_arrays(rng, spec, hp, dtype, shapes, as_list, sdtype, gdtype)
                stochastic = None
                if mode == "kahan":
                    comp = [(rng.standard_normal(s) * 1e-3).astype(dtype) for s in shapes]
                    tail, names = with_kahan(host[2:], names, comp if as_list else comp[0])
                    host = host[:2] + tail
                else:
                    stochastic = StochasticRounding(int(rng.integers(2 ** 63)), step, int(rng.integers(2 ** 40)))
                device = to_device(cp, host, misalign=4 if layout == "misaligned" else 0)
                context = f"{name} {dtype}/{sdtype} {mode} hp={hp} step={step} {layout}"
                numpy_backend.step(spec, tuple(host), names, hp, step, 0.5, stochastic=stochastic)
                cp.launches.clear()
                cupy_backend.step(spec, device, names, hp, step, 0.5, stochastic=stochastic)
                assert_launches_fit(cp, context)
                assert any(f"-DFASTOPT_ROUND={1 if mode == 'kahan' else 2}" in launch.options for launch in cp.launches)
                assert gdtype is None or all("-DFASTOPT_GRAD=0" in launch.options for launch in cp.launches
                                             if launch.name.startswith(f"fo_{spec.kernel}_")), context
                _compare(spec, dtype, _flat(device), _flat(host), context)
                ran += 1
    assert ran


@pytest.mark.parametrize("as_list", [False, True], ids=["one array", "list"])
def test_the_skip_flag_leaves_every_byte_and_a_clear_flag_changes_nothing(cp, as_list):
    spec = REGISTRY["adamw"]
    hp = dict(spec.defaults, lr=0.1)
    rng = np.random.default_rng(5)
    host, names = _host_arrays(rng, spec, hp, F32, LAYOUTS["list" if as_list else "one array"], as_list)
    before = [a.copy() for a in _flat(host)]
    device = to_device(cp, host)
    cupy_backend.step(spec, device, names, hp, 1, None, found_inf=cp.from_host(np.array(True)))
    assert all(d.get().tobytes() == b.tobytes() for d, b in zip(_flat(device), before))
    cupy_backend.step(spec, device, names, hp, 1, None, found_inf=cp.from_host(np.array(False)))
    numpy_backend.step(spec, tuple(host), names, hp, 1, None)
    assert all(d.get().tobytes() == h.tobytes() for d, h in zip(_flat(device), _flat(host)))
    assert any(d.get().tobytes() != b.tobytes() for d, b in zip(_flat(device), before))


@pytest.mark.parametrize("dtype", [F32, F64, F16], ids=str)
def test_emulated_norms_clipping_and_the_step_guard(cp, dtype):
    """The reductions (two-stage, float64), the global norm, the guard's clip coefficient, skip flag and skip
    counter, and clip_by_global_norm / clamp_ in place, against NumPy in float64."""
    rng = np.random.default_rng([23, dtype.num])
    shapes = [(5,), (0,), (3 * CHUNK + 7,), (1,), (40, 3)]
    host = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [cp.from_host(h) for h in host]
    sq = cupy_backend.sumsq_per_tensor(grads)
    want = np.array([np.sum(h.astype(np.float64) ** 2) for h in host])
    np.testing.assert_allclose(sq.get(), want, rtol=1e-13)
    total = float(np.sqrt(want.sum()))
    assert float(cupy_backend.global_norm(sq).get()) == pytest.approx(total, rel=1e-13)
    skipped = cp.from_host(np.array(3, np.int64))
    coef, flag = cupy_backend.step_guard(sq, max_norm=1.0, skip_nonfinite=True, skipped=skipped)
    assert float(coef.get()) == pytest.approx(min(1.0, 1.0 / (total + 1e-6)), rel=1e-13)
    assert int(flag.get()) == 0 and int(skipped.get()) == 3
    bad = cp.from_host(np.array([1.0, np.inf]))
    _, flag = cupy_backend.step_guard(bad, max_norm=1.0, skip_nonfinite=True, skipped=skipped)
    assert int(flag.get()) == 1 and int(skipped.get()) == 4
    cupy_backend.clip_by_global_norm(grads, sq, 1.0)
    c = np.float64(min(1.0, 1.0 / (total + 1e-6))).astype(np.float32 if dtype == F16 else dtype)
    for g, h in zip(grads, host):
        expected = (h.astype(np.float32) * c).astype(dtype) if dtype == F16 else h * c
        np.testing.assert_array_equal(g.get(), expected)
    cupy_backend.clamp_(grads, 0.01)
    for g, h in zip(grads, host):
        assert np.all(np.abs(g.get()) <= dtype.type(0.01))
