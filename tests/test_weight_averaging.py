"""fastopt.ema_update / swa_update / ema_decay: torch.optim.swa_utils semantics (AveragedModel with its
default averaging functions), the reference bit for bit on the CPU, every backend's kernel (the Numba one
under the CUDA simulator), and the functional API's contract for bad input (named, nothing written)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastopt
from fastopt import reference
from conftest import snapshot

SHAPES = [(0,), (1,), (7,), (33, 5), (70001,)]  # 70001: past the parallel threshold (several chunks)
UPDATES = 50


def _pair(rng, dtype, shapes=SHAPES):
    return ([rng.standard_normal(s).astype(dtype) for s in shapes],
            [rng.standard_normal(s).astype(dtype) for s in shapes])


# ---- against torch.optim.swa_utils -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("decay", [0.999, 0.9, 0.5, 0.3, 0.0, 1.0])
def test_ema_matches_averaged_model_with_ema_multi_avg_fn(decay, dtype, rng):
    """AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay)): its first update copies (swa_update
    with n_averaged=0), then each is torch's lerp by 1 - decay (ema_update)."""
    torch = pytest.importorskip("torch")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
    model = torch.nn.Sequential(torch.nn.Linear(33, 5), torch.nn.Linear(5, 1)).to(torch_dtype)
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    ours = [p.detach().numpy().copy() for p in model.parameters()]
    for n in range(UPDATES):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        averaged.update_parameters(model)
        params = [p.detach().numpy() for p in model.parameters()]
        if n == 0:
            fastopt.swa_update(ours, params, 0)
        else:
            fastopt.ema_update(ours, params, decay)
    rtol = 1e-12 if dtype == np.float64 else 1e-5  # torch's vectorised lerp fuses a multiply-add
    for a, ta in zip(ours, averaged.module.parameters()):
        np.testing.assert_allclose(a, ta.detach().numpy(), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_swa_equals_averaged_model_default_bit_for_bit(dtype, rng):
    """AveragedModel(model) on the CPU: copy, then averaged + (param - averaged) / (n + 1): the same
    operations, so the same bits."""
    torch = pytest.importorskip("torch")
    from torch.optim.swa_utils import AveragedModel
    torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
    model = torch.nn.Sequential(torch.nn.Linear(33, 17), torch.nn.Linear(17, 1)).to(torch_dtype)
    averaged = AveragedModel(model)
    ours = [np.zeros(tuple(p.shape), dtype) for p in model.parameters()]
    for n in range(UPDATES):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9).add_(torch.randn_like(p))
        averaged.update_parameters(model)
        fastopt.swa_update(ours, [p.detach().numpy() for p in model.parameters()], n)
    assert int(averaged.n_averaged) == UPDATES
    for a, ta in zip(ours, averaged.module.parameters()):
        np.testing.assert_array_equal(a, ta.detach().numpy())


def test_swa_takes_averaged_models_count_tensor(rng):
    torch = pytest.importorskip("torch")
    a, p = rng.standard_normal(5), rng.standard_normal(5)
    want = a + (p - a) / 4.0
    fastopt.swa_update(a, p, torch.tensor(3))
    np.testing.assert_array_equal(a, want)


# ---- the compiled kernels against the reference, every mode --------------------------------------------

@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the reference's NumPy on the inf/NaN entries
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("call", ["ema-0.999", "ema-0.2", "ema-0", "ema-1", "swa-0", "swa-1", "swa-6"])
def test_cpu_kernel_equals_reference_bit_for_bit(call, dtype, rng):
    kind, arg = call.split("-")
    fn = fastopt.ema_update if kind == "ema" else fastopt.swa_update
    arg = float(arg) if kind == "ema" else int(arg)
    averages, params = _pair(rng, dtype)
    params[2][0] = np.inf  # non-finite values propagate the same way
    params[3][0, 0] = np.nan
    expected = [a.copy() for a in averages]
    fn(expected, params, arg, backend="numpy")
    for _ in range(2):  # one list call, then each array alone
        got = [a.copy() for a in averages]
        fn(got, params, arg)
        for g, e in zip(got, expected):
            assert g.tobytes() == e.tobytes()
        got = [a.copy() for a in averages]
        for g, p in zip(got, params):
            fn(g, p, arg)
        for g, e in zip(got, expected):
            assert g.tobytes() == e.tobytes()


def test_reference_is_torchs_lerp_and_mean(rng):
    a, p = rng.standard_normal(1000), rng.standard_normal(1000)
    for decay in (0.9, 0.3):
        got = a.copy()
        reference.weight_average_step(got, p, mode=0, weight=1 - decay, divisor=1.0)
        np.testing.assert_allclose(got, decay * a + (1 - decay) * p, rtol=1e-14, atol=1e-15)
    got = a.copy()
    reference.weight_average_step(got, p, mode=1, weight=0.0, divisor=5.0)
    np.testing.assert_allclose(got, (4 * a + p) / 5, rtol=1e-14, atol=1e-15)


def test_ema_of_a_constant_model_converges_to_it(rng):
    avg, p = np.zeros(100, np.float32), rng.standard_normal(100).astype(np.float32)
    for step in range(1, 2001):
        fastopt.ema_update(avg, p, fastopt.ema_decay(step, 0.99))
    np.testing.assert_allclose(avg, p, rtol=1e-5, atol=1e-5)


def test_ema_decay_warmup():
    assert fastopt.ema_decay(1, 0.9999) == 2 / 11
    assert fastopt.ema_decay(10 ** 6, 0.9999) == 0.9999
    assert fastopt.ema_decay(5, 0.5) == 6 / 15 and fastopt.ema_decay(100, 0.5) == 0.5
    assert fastopt.ema_decay(3, 0.9999, warmup=False) == 0.9999
    for bad, exc in [(0, ValueError), (1.5, TypeError), (True, TypeError), (2 ** 60, ValueError)]:
        with pytest.raises(exc, match="step"):
            fastopt.ema_decay(bad)
    with pytest.raises(ValueError, match="decay"):
        fastopt.ema_decay(3, 1.5)
    for bad in ("no", 0, None):  # "no" was taken as warm-up on
        with pytest.raises(TypeError, match="warmup must be a bool"):
            fastopt.ema_decay(3, 0.9, warmup=bad)


# ---- bad input: named, and nothing written -------------------------------------------------------------

def _bad_calls(rng):
    a32, p32 = rng.standard_normal(6).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    a64, p64 = rng.standard_normal(6), rng.standard_normal(6)
    ro = rng.standard_normal(6)
    ro.flags.writeable = False
    big = rng.standard_normal(12)
    yield "decay<0", lambda: fastopt.ema_update(a64, p64, -0.1), ValueError, "decay"
    yield "decay>1", lambda: fastopt.ema_update(a64, p64, 1.5), ValueError, "decay"
    yield "decay nan", lambda: fastopt.ema_update(a64, p64, float("nan")), ValueError, "decay"
    yield "decay huge", lambda: fastopt.ema_update(a64, p64, 10 ** 400), ValueError, "decay"
    yield "decay str", lambda: fastopt.ema_update(a64, p64, "0.9"), TypeError, "decay"
    yield "decay bool", lambda: fastopt.ema_update(a64, p64, True), TypeError, "decay"
    yield "decay None", lambda: fastopt.ema_update(a64, p64, None), TypeError, "decay"
    yield "n<0", lambda: fastopt.swa_update(a64, p64, -1), ValueError, "n_averaged"
    yield "n float", lambda: fastopt.swa_update(a64, p64, 1.0), TypeError, "n_averaged"
    yield "n bool", lambda: fastopt.swa_update(a64, p64, False), TypeError, "n_averaged"
    yield "n huge", lambda: fastopt.swa_update(a64, p64, 2 ** 53), ValueError, "n_averaged"
    yield "n array", lambda: fastopt.swa_update(a64, p64, np.array([1, 2])), TypeError, "n_averaged"
    yield "n 0-d float", lambda: fastopt.swa_update(a64, p64, np.array(3.0)), TypeError, \
        "so far), got 3.0 (ndarray of dtype float64)"
    yield "dtypes", lambda: fastopt.ema_update(a64, p32, 0.9), TypeError, "params"
    yield "shapes", lambda: fastopt.ema_update(a64, big, 0.9), ValueError, "params"
    yield "read-only averages", lambda: fastopt.ema_update(ro, p64, 0.9), ValueError, "averages"
    yield "same array", lambda: fastopt.ema_update(a64, a64, 0.9), ValueError, "averages"
    yield "overlap", lambda: fastopt.swa_update(big[:6], big[3:9], 2), ValueError, "averages"
    yield "int dtype", lambda: fastopt.ema_update(np.zeros(6, np.int64), np.zeros(6, np.int64), 0.9), TypeError, "averages"
    yield "None params", lambda: fastopt.ema_update(a64, None, 0.9), TypeError, "params"
    yield "None averages", lambda: fastopt.ema_update(None, p64, 0.9), TypeError, "averages"
    yield "list lengths", lambda: fastopt.ema_update([a64, a32], [p64], 0.9), ValueError, "params"
    yield "list and array", lambda: fastopt.swa_update([a64], p64, 1), TypeError, "params"
    yield "empty and one", lambda: fastopt.ema_update([], [p64], 0.9), ValueError, "params"
    b64 = rng.standard_normal(6)
    yield "late bad entry", lambda: fastopt.ema_update([a64, b64], [p64, p64[:3]], 0.9), ValueError, "params[1]"
    yield "backend", lambda: fastopt.ema_update(a64, p64, 0.9, backend="nope"), ValueError, "nope"


@pytest.mark.parametrize("case", [c[0] for c in _bad_calls(np.random.default_rng(0))])
def test_bad_input_is_named_and_writes_nothing(case, rng):
    label, call, exc, name = next(c for c in _bad_calls(rng) if c[0] == case)
    arrays = call.__closure__ and [c.cell_contents for c in call.__closure__]
    before = snapshot(arrays)
    with pytest.raises(exc) as info:
        call()
    assert name in str(info.value), (label, str(info.value))
    assert snapshot(arrays) == before, label


def test_empty_lists_are_a_no_op():
    fastopt.ema_update([], [], 0.9)
    fastopt.swa_update([], [], 3)


def test_params_may_be_read_only_and_torch_cpu_tensors_update_in_place(rng):
    torch = pytest.importorskip("torch")
    p = rng.standard_normal(8)
    p.flags.writeable = False
    avg = torch.zeros(8, dtype=torch.float64)
    fastopt.swa_update(avg, p, 0)  # a copy into the tensor's own memory
    np.testing.assert_array_equal(avg.numpy(), p)


# ---- the Numba kernel, under the CUDA simulator (a child process: the variable must precede numba) -----

SIM = textwrap.dedent("""
    import os
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    import numpy as np
    from numba import cuda
    import fastopt
    rng = np.random.default_rng(5)
    for dtype in (np.float32, np.float64):
        shapes = [(5,), (0,), (70,), (2, 3)]
        avgs = [rng.standard_normal(s).astype(dtype) for s in shapes]
        params = [rng.standard_normal(s).astype(dtype) for s in shapes]
        for fn, arg in ((fastopt.ema_update, 0.9), (fastopt.ema_update, 0.3), (fastopt.swa_update, 0),
                        (fastopt.swa_update, 3)):
            want = [a.copy() for a in avgs]
            fn(want, params, arg, backend="numpy")
            d_avgs = [cuda.to_device(a) for a in avgs]
            fn(d_avgs, [cuda.to_device(p) for p in params], arg, backend="numba")
            for d, w in zip(d_avgs, want):
                got = d.copy_to_host()
                tol = 1e-6 if dtype == np.float32 else 1e-15
                assert np.allclose(got, w, rtol=tol, atol=tol), (fn.__name__, arg, dtype, got, w)
    print("SIM OK")
""")


def test_numba_kernel_under_the_simulator():
    pytest.importorskip("numba")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    out = subprocess.run([sys.executable, "-c", SIM], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and "SIM OK" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("weight", [-0.25, -1.5, 0.3, 0.75, 2.0])
def test_lerp_any_finite_weight_equals_torch_lerp(weight):
    """averaging.lerp_ (schedule-free's eval()/train() switch) is torch.lerp for weights outside [0, 1]
    too: torch's branch by |weight| < 0.5, equal up to torch's fused multiply-add on the CPU (a rounding of
    the product); a bad weight raises naming it and writes nothing."""
    torch = pytest.importorskip("torch")
    from fastopt.averaging import lerp_
    rng = np.random.default_rng(13)
    a = [rng.standard_normal(n).astype(np.float32) for n in (0, 1, 1037)]
    b = [rng.standard_normal(n).astype(np.float32) for n in (0, 1, 1037)]
    expected = [torch.lerp(torch.from_numpy(x), torch.from_numpy(y), weight).numpy() for x, y in zip(a, b)]
    lerp_(a, b, weight)
    for x, e in zip(a, expected):
        np.testing.assert_allclose(x, e, rtol=0, atol=4e-7 * (1 + abs(weight)))
    before = [x.copy() for x in a]
    for bad, exc in ((float("nan"), ValueError), (float("inf"), ValueError), ("0.5", TypeError), (True, TypeError),
                     (10 ** 400, ValueError)):  # an int past float's range: a bare OverflowError before
        with pytest.raises(exc, match="weight"):
            lerp_(a, b, bad)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, before))
