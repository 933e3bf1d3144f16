"""state_dtype= and bfloat16 params on the CuPy backend (DESIGN.md "Precision", issue 13), through the optimizer
classes, on the CPU: the kernels run by the CUDA emulation (tests/gpu/cuda_emulator.py). A class on device
arrays with 16-bit state (float32 or 16-bit params) or bfloat16 params must equal the same class on host arrays
(the CPU kernels) bit for bit, step after step, for every registry optimizer the classes run, with Kahan and
stochastic rounding of 16-bit params too (LAMB's two phases and Adan's fourth state included); what the CPU refuses
and a backend API that keeps the default state are refused before anything is made or written. 8-bit state (state_dtype="int8") the same
way: codes and scales equal the CPU class's (and through a state dict round trip, on a GPU)."""
from __future__ import annotations

import platform
import shutil

import numpy as np
import pytest

import fastopt
from fastopt import specs
from fastopt.backends import cuda_source, cupy_backend
from test_cupy_launch_abi import use_cupy
from fastopt.precision import INT8_REFUSED, QuantizedState

pytestmark = pytest.mark.skipif(shutil.which("g++") is None or platform.machine() not in ("x86_64", "AMD64"),
                                reason="the emulated kernels are built with g++ for x86-64")

BF16 = cuda_source.BF16
SHAPES = [(5,), (300,), (3, 4), (0,), (4097,)]
_modules: dict = {}  # the backend's compiled modules, kept for the whole run


@pytest.fixture(scope="module")
def emu():
    import cuda_emulator
    return cuda_emulator.EmuCupy()


@pytest.fixture
def cp(emu, monkeypatch):
    emu.launches.clear()
    monkeypatch.setattr(cuda_source, "IN_FLIGHT", 1)
    return use_cupy(monkeypatch, emu, _modules)


# the class optimizers whose state starts as zeros or a fill (schedule-free's copy of the params needs CuPy's
# own casting copy: GPU only), LARS included (its norms pass reads the params' module)
NAMES = [name for name, spec in specs.REGISTRY.items() if not spec.train_eval]
CASES = [("float32", None), ("float32", "float16"), ("float16", "float16")] + (
    [("float32", "bfloat16"), ("bfloat16", None), ("bfloat16", "bfloat16")] if BF16 is not None else [])
OPTIONS = {"sgd": dict(momentum=0.9), "adagrad": dict(lr_decay=0.01)}
# Kahan and stochastic rounding of 16-bit params: every optimizer (LAMB's apply pass, Adan's fourth state included)
ROUNDED = NAMES
ROUNDINGS = [("float16", None), ("float16", "float16")] + (
    [("bfloat16", None), ("bfloat16", "bfloat16")] if BF16 is not None else [])


def _dtype(name):
    return BF16 if name == "bfloat16" else np.dtype(name)


def _kind(a):
    """A state's dtype, or ("int8", signed) for an 8-bit state."""
    return ("int8", a.signed) if isinstance(a, QuantizedState) else a.dtype


def _bytes(a):
    """A state's bytes (an 8-bit state's codes and absmax), read back from the device."""
    parts = (a.codes, a.absmax) if isinstance(a, QuantizedState) else (a,)
    return tuple((x.get() if hasattr(x, "get") else x).tobytes() for x in parts)


def _classes_step_alike(cp, name, pdtype, options, rng, context, gdtype=None):
    """The class of optimizer `name` (two groups) on CuPy arrays and on host arrays of `pdtype`, with `options`,
    stepped 4 times on the same grads (of `gdtype`, else `pdtype`): params, states (the same keys and dtypes)
    and the Kahan compensation must stay equal bit for bit. Returns the device optimizer."""
    spec = specs.get_spec(name)
    cls = getattr(fastopt, spec.class_name)
    host = [rng.standard_normal(s).astype(_dtype(pdtype)) for s in SHAPES]
    hp = {h.name: 0.01 for h in spec.hypers if h.default is specs.REQUIRED}
    hp.update(OPTIONS.get(name, {}))
    device = [cp.asarray(h) for h in host]
    gpu = cls([{"params": device[:2]}, {"params": device[2:], "lr": 0.003}], **hp, **options)
    cpu = cls([{"params": host[:2]}, {"params": host[2:], "lr": 0.003}], **hp, **options)
    for step in range(4):
        grads = [rng.standard_normal(s).astype(_dtype(gdtype or pdtype)) for s in SHAPES]
        gpu.step([cp.asarray(g) for g in grads])
        cpu.step(grads)
        for i, (d, h) in enumerate(zip(device, host)):
            assert d.get().tobytes() == h.tobytes(), f"{context}: params[{i}] differs after step {step + 1}"
            states = cpu.state_arrays(i)
            assert {k: _kind(a) for k, a in gpu.state_arrays(i).items()} == {k: _kind(a) for k, a in states.items()}
            for k, a in gpu.state_arrays(i).items():
                assert _bytes(a) == _bytes(states[k]), f"{context}: {k} of params[{i}], step {step + 1}"
    # (a skipped step is not compared: on the GPU it still advances the step counts, README "skip_nonfinite")
    assert gpu.skipped_steps == cpu.skipped_steps == 0
    return gpu


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]} params, {c[1] or 'default'} state")
@pytest.mark.parametrize("name", NAMES)
def test_device_class_equals_the_cpu_class_bit_for_bit(cp, name, case):
    pdtype, state = case
    rng = np.random.default_rng([31, NAMES.index(name), CASES.index(case)])
    # skip_nonfinite: the update kernels read the device skip flag (clear here)
    options = dict(skip_nonfinite=True, **({} if state is None else {"state_dtype": state}))
    _classes_step_alike(cp, name, pdtype, options, rng, f"{name} {case}")


@pytest.mark.parametrize("mode", ["kahan", "stochastic_rounding"])
@pytest.mark.parametrize("case", ROUNDINGS, ids=lambda c: f"{c[0]} params, {c[1] or 'default'} state")
@pytest.mark.parametrize("name", ROUNDED)
def test_device_class_rounds_as_the_cpu_class(cp, name, case, mode):
    """kahan=True (a CuPy compensation from init_state) and stochastic_rounding=True (keyed by seed and the
    group's step) through the classes: bit for bit the CPU classes, params, states and compensation, with
    skip_nonfinite's device flag read by the rounding kernels."""
    pdtype, state = case
    rng = np.random.default_rng([41, ROUNDED.index(name), ROUNDINGS.index(case), mode == "kahan"])
    options = dict(skip_nonfinite=True, **{mode: True}, **({} if state is None else {"state_dtype": state}))
    if mode == "stochastic_rounding":
        options["seed"] = int(rng.integers(2 ** 40))
    gpu = _classes_step_alike(cp, name, pdtype, options, rng, f"{name} {case} {mode}")
    assert mode != "kahan" or "kahan_comp" in gpu.state_arrays(0)


# 8-bit state: the optimizers that take it (not those whose state must stay exact), with each rounding of the params
INT8_NAMES = [name for name in NAMES if name not in INT8_REFUSED and specs.get_spec(name).states]
INT8_CASES = [("float32", None), ("float16", None), ("float16", "kahan")] + (
    [("bfloat16", None), ("bfloat16", "stochastic_rounding")] if BF16 is not None else [])


@pytest.mark.parametrize("case", INT8_CASES, ids=lambda c: f"{c[0]} params{', ' + c[1] if c[1] else ''}")
@pytest.mark.parametrize("name", INT8_NAMES)
def test_device_class_with_8bit_state_equals_the_cpu_class(cp, name, case):
    """state_dtype="int8" through the classes on CuPy arrays (QuantizedState of device arrays from init_state):
    params, codes and scales bit for bit the CPU class's, step after step, with skip_nonfinite's device flag."""
    pdtype, mode = case
    rng = np.random.default_rng([47, INT8_NAMES.index(name), INT8_CASES.index(case)])
    options = dict(skip_nonfinite=True, state_dtype="int8", **({mode: True} if mode else {}))
    if mode == "stochastic_rounding":
        options["seed"] = int(rng.integers(2 ** 40))
    gpu = _classes_step_alike(cp, name, pdtype, options, rng, f"{name} int8 {case}")
    assert all(isinstance(a, QuantizedState) for k, a in gpu.state_arrays(0).items() if k != "kahan_comp")


# float32 grads of 16-bit params (the modules' FASTOPT_GRAD), with the default, a 16-bit and an 8-bit state and Kahan
GRAD_CASES = [("float16", {}), ("float16", dict(state_dtype="float16"))] + (
    [("bfloat16", {}), ("bfloat16", dict(state_dtype="int8")), ("bfloat16", dict(kahan=True))] if BF16 is not None
    else [])


def _takes(name, options) -> bool:
    return not ((options.get("state_dtype") == "int8" and name not in INT8_NAMES) or
                (options.get("kahan") and name not in ROUNDED))


@pytest.mark.parametrize("name,case", [(n, c) for c in GRAD_CASES for n in NAMES if _takes(n, c[1])],
                         ids=lambda x: x if isinstance(x, str) else f"{x[0]} params {x[1]}")
def test_device_class_takes_float32_grads_of_16bit_params(cp, name, case):
    """float32 grads of 16-bit CuPy params, as on the CPU: bit for bit the CPU class (its float32 grads are used
    unrounded, so a kernel that read them as 16-bit values or rounded them first would differ)."""
    pdtype, options = case
    rng = np.random.default_rng([43, NAMES.index(name), GRAD_CASES.index(case)])
    _classes_step_alike(cp, name, pdtype, dict(skip_nonfinite=True, **options), rng, f"{name} {case} float32 grads",
                        gdtype="float32")


def check_8bit_device_state_dict_round_trip(cp):
    """A state dict of a CuPy optimizer with 8-bit state (codes and scales on the host) loads into a CPU one and
    back, and into a float32-state one (dequantized); training then goes on alike. Real CuPy arrays only (the
    state dict's host copies read CuPy's own array type): test_precision_gpu.py runs it."""
    rng = np.random.default_rng(49)
    host = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    device = [cp.asarray(h) for h in host]
    gpu = fastopt.AdamW(device, lr=0.01, state_dtype="int8")
    cpu = fastopt.AdamW(host, lr=0.01, state_dtype="int8")
    for _ in range(2):
        grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
        gpu.step([cp.asarray(g) for g in grads])
        cpu.step(grads)
    saved = gpu.state_dict()
    host2 = [h.copy() for h in host]
    restored = fastopt.AdamW(host2, lr=0.01, state_dtype="int8")
    restored.load_state_dict(saved)
    device2 = [cp.asarray(h) for h in host]
    back = fastopt.AdamW(device2, lr=0.01, state_dtype="int8")
    back.load_state_dict(cpu.state_dict())
    grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    for opt, params in ((gpu, device), (cpu, host), (restored, host2), (back, device2)):
        opt.step([cp.asarray(g) for g in grads] if params is device or params is device2 else grads)
    for i in range(len(SHAPES)):
        want = (host[i].tobytes(), _bytes(cpu.state_arrays(i)["exp_avg"]))
        for opt, params in ((gpu, device), (restored, host2), (back, device2)):
            p = params[i].get() if hasattr(params[i], "get") else params[i]
            assert (p.tobytes(), _bytes(opt.state_arrays(i)["exp_avg"])) == want, i
    dense = fastopt.AdamW([cp.asarray(h) for h in host], lr=0.01)
    dense.load_state_dict(saved)
    for i in range(len(SHAPES)):
        np.testing.assert_array_equal(dense.state_arrays(i)["exp_avg_sq"].get(),
                                      QuantizedState(saved_codes(saved, i, "exp_avg_sq"),
                                                     saved_codes(saved, i, "exp_avg_sq_absmax"), False).dequantize())


def saved_codes(state_dict, i, key):
    return np.asarray(state_dict["state"][i][key])


def test_refusals(cp):
    p = [cp.asarray(np.ones(3, np.float32))]
    with pytest.raises(ValueError, match="Invalid state_dtype: 'int8' for 'lamb'"):
        fastopt.LAMB(p, lr=0.1, state_dtype="int8")
    with pytest.raises(ValueError, match=r"Invalid state_dtype: 'int8' for params\[0\] of dtype float64"):
        fastopt.Adam([cp.asarray(np.ones(3, np.float64))], state_dtype="int8")
    with pytest.raises(ValueError, match="kahan=True is for float16 or bfloat16 params"):
        fastopt.Adam(p, kahan=True)
    with pytest.raises(ValueError, match="Invalid state_dtype: 'float16' .*float64"):
        fastopt.Adam([cp.asarray(np.ones(3, np.float64))], state_dtype="float16")
    # a float16 state checked by a backend API that keeps the default state (state_dtypes=False): named, nothing
    # written
    params, grads = [cp.asarray(np.ones(3, np.float32))], [cp.asarray(np.ones(3, np.float32))]
    m, v = (cp.asarray(np.zeros(3, np.float16)) for _ in range(2))
    before = [a.get().tobytes() for a in params + [m, v]]
    from fastopt.backends import device_arrays, validate
    api = device_arrays._DeviceApi(cupy_backend._describe, cupy_backend.DTYPES, "on the GPU")
    with pytest.raises(TypeError, match=r"exp_avg\[0\] has dtype float16, expected float32"):
        validate.validate_arrays((params, grads, [m], [v]), ("params", "grads", "exp_avg", "exp_avg_sq"), api, 1)
    assert [a.get().tobytes() for a in params + [m, v]] == before


@pytest.mark.parametrize("pdtype", ["float16"] + (["bfloat16"] if BF16 is not None else []))
def test_kahan_steps_read_capturable_scalars_as_eager_ones(cp, pdtype, monkeypatch):
    """kahan=True with capturable=True (the step's scalars from the device row; stochastic rounding is refused
    there): bit for bit the eager kahan steps, params, states and compensation."""
    _capturable_alike(cp, pdtype, dict(kahan=True), monkeypatch)


@pytest.mark.parametrize("pdtype", ["float32"] + (["bfloat16"] if BF16 is not None else []))
def test_8bit_steps_read_capturable_scalars_as_eager_ones(cp, pdtype, monkeypatch):
    """state_dtype="int8" with capturable=True: the _q8 kernels read the device row of scalars; bit for bit the
    eager 8-bit steps (params, codes, scales)."""
    _capturable_alike(cp, pdtype, dict(state_dtype="int8"), monkeypatch)


def _capturable_alike(cp, pdtype, options, monkeypatch):
    """AdamW with `options`, capturable=True and not (two groups, a schedule in one), stepped alike: equal bit for
    bit after every step."""
    from fastopt import capture
    monkeypatch.setattr(capture, "MAX_ROWS", 64)
    monkeypatch.setattr(capture, "STEADY", 4)
    rng = np.random.default_rng([43, len(pdtype)])
    host = [rng.standard_normal(s).astype(_dtype(pdtype)) for s in SHAPES]
    pairs = []
    for capturable in (True, False):
        params = [cp.asarray(h) for h in host]
        schedule = fastopt.schedules.exponential_decay(0.01, 0.9)
        opt = fastopt.AdamW([{"params": params[:2], "lr": schedule}, {"params": params[2:]}], lr=0.003, **options,
                            capturable=capturable, skip_nonfinite=True)
        pairs.append((opt, params))
    (cap, cap_params), (eager, eager_params) = pairs
    for step in range(6):
        grads = [rng.standard_normal(s).astype(_dtype(pdtype)) for s in SHAPES]
        cap.step([cp.asarray(g) for g in grads])
        eager.step([cp.asarray(g) for g in grads])
        for i, (a, b) in enumerate(zip(cap_params, eager_params)):
            assert a.get().tobytes() == b.get().tobytes(), f"params[{i}] differs after step {step + 1}"
            for k, x in cap.state_arrays(i).items():
                assert _bytes(x) == _bytes(eager.state_arrays(i)[k]), (k, i, step)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the host reference's p - lr * g
@pytest.mark.parametrize("pdtype", ["float16"] + (["bfloat16"] if BF16 is not None else []))
def test_kahan_keeps_an_overflowed_param_as_the_cpu(cp, pdtype):
    """fo_kahan_store (the CUDA kernels' Kahan store): a param whose update overflows is stored inf with no
    compensation, as on the CPU; its compensation was inf - inf = NaN, and the next step made it NaN."""
    dtype = _dtype(pdtype)
    rng = np.random.default_rng([43, dtype.num])
    big = float(np.finfo(np.float16).max) if pdtype == "float16" else 3.3e38
    host = rng.standard_normal(300).astype(dtype)
    host[:3] = [big, -big, 1.0]
    comp = np.zeros_like(host)
    device, device_comp = cp.asarray(host), cp.asarray(comp)
    for step in range(3):
        g = rng.standard_normal(300).astype(dtype)
        if step == 0:
            g[:3] = [-big, big, 0.5]
        fastopt.sgd_step([device], [cp.asarray(g)], lr=1.0, kahan_comp=[device_comp])
        fastopt.sgd_step([host], [g], lr=1.0, kahan_comp=[comp])
    assert np.isinf(host[:2].astype(np.float32)).all() and not comp[:2].view(np.uint16).any()
    assert device.get().tobytes() == host.tobytes() and device_comp.get().tobytes() == comp.tobytes()
