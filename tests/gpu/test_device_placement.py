"""One call runs on one GPU: every array of a call (params, grads, states, 8-bit codes and scales, a device
grad_scale or skip flag) on the params' device, else a ValueError naming the array before anything is written.
An optimizer's groups may live on different devices (one call per group and dtype), but its fused
clip/skip guard reads every sum of squares in one launch, so that needs one device. Checked on the CuPy
backend over tests/gpu/cuda_emulator.py, whose arrays carry a device ordinal (kernels run on the CPU)."""
from __future__ import annotations

import platform
import shutil

import numpy as np
import pytest

import fastopt
from fastopt.precision import QuantizedState

from test_precision_emulation import cp, emu  # noqa: F401  (the emulated CuPy in the backend: fixtures)

pytestmark = pytest.mark.skipif(shutil.which("g++") is None or platform.machine() not in ("x86_64", "AMD64"),
                                reason="the emulated kernels are built with g++ for x86-64")


def _dev(cp, host, device=0):
    host = np.asarray(host)
    with cp.cuda.Device(device):
        d = cp.alloc(host.shape, host.dtype)
    if host.size:
        d.values[...] = host
    return d


def _rnd(cp, rng, shape, device=0, positive=False, dtype=np.float32):
    x = rng.standard_normal(shape)
    return _dev(cp, (np.abs(x) if positive else x).astype(dtype), device)


def _leaves(x):
    if isinstance(x, (list, tuple)):
        return [leaf for v in x for leaf in _leaves(v)]
    if isinstance(x, dict):
        return _leaves(list(x.values()))
    if isinstance(x, QuantizedState):
        return [x.codes, x.absmax]
    return [x] if hasattr(x, "values") else []


def _snapshot(*objs):
    return [a.values.tobytes() for a in _leaves(list(objs))]


def _adam_call(cp, rng, shapes, devices):
    """params, grads, exp_avg, exp_avg_sq: lists, array j of each list on devices[k][j] (k: the list)."""
    out = []
    for k in range(4):
        out.append([_rnd(cp, rng, s, devices[k][j], positive=k == 3) for j, s in enumerate(shapes)])
    return out


@pytest.mark.parametrize("where, slot, words", [
    ("last grad", 1, r"grads\[2\] is on device 1 but params\[2\] is on device 0"),
    ("last exp_avg_sq", 3, r"exp_avg_sq\[2\] is on device 1 but params\[2\] is on device 0"),
    ("last param", 0, r"params\[2\] is on device 1 but params\[0\] is on device 0"),
])
def test_an_array_on_another_device_is_refused_before_any_write(cp, where, slot, words):
    """It ran: one launch on device 0 reading and writing device 1's memory (a fault, or a silent read across
    the link with peer access)."""
    rng = np.random.default_rng()
    shapes = [(7,), (300,), (5,)]
    devices = [[0, 0, 0] for _ in range(4)]
    devices[slot][2] = 1
    p, g, m, v = _adam_call(cp, rng, shapes, devices)
    before = _snapshot(p, g, m, v)
    with pytest.raises(ValueError, match=words):
        fastopt.adam_step(p, g, m, v, step=1, lr=1e-3)
    assert _snapshot(p, g, m, v) == before and not cp.launches


def test_one_array_call_grad_scale_and_8bit_state_on_another_device(cp):
    rng = np.random.default_rng()
    p, g, m, v = (x[0] for x in _adam_call(cp, rng, [(33,)], [[1], [0], [0], [0]]))
    before = _snapshot(p, g, m, v)
    with pytest.raises(ValueError, match="grads is on device 0 but params is on device 1"):
        fastopt.adam_step(p, g, m, v, step=1, lr=1e-3)
    p, g, m, v = (x[0] for x in _adam_call(cp, rng, [(33,)], [[0], [0], [0], [0]]))
    before = _snapshot(p, g, m, v)
    scale = _dev(cp, np.array(0.5, np.float32), device=1)
    with pytest.raises(ValueError, match="grad_scale is on device 1 but the params are on device 0"):
        fastopt.adam_step(p, g, m, v, step=1, lr=1e-3, grad_scale=scale)
    with pytest.raises(ValueError, match=r"Invalid grad_scale: 1000.* \(too large for a float\)"):
        fastopt.adam_step(p, g, m, v, step=1, lr=1e-3, grad_scale=10 ** 400)  # a bare OverflowError before
    assert _snapshot(p, g, m, v) == before
    st = fastopt.init_state("adam", p, state_dtype="int8")
    st["exp_avg"] = QuantizedState(st["exp_avg"].codes, _dev(cp, st["exp_avg"].absmax.values, device=1),
                                   st["exp_avg"].signed)
    before = _snapshot(p, g, st)
    with pytest.raises(ValueError, match="exp_avg.absmax is on device 1 but params is on device 0"):
        fastopt.adam_step(p, g, **st, step=1, lr=1e-3)
    assert _snapshot(p, g, st) == before and not cp.launches


def test_optimizer_groups_on_two_devices_and_the_guard_that_needs_one(cp):
    """Each group runs on its own device and equals an optimizer of that group alone; with clip_grad_norm
    (or skip_nonfinite) the sums of squares were written on device 0 and read by launches on device 1."""
    rng = np.random.default_rng()
    host = [rng.standard_normal(s).astype(np.float32) for s in ((7,), (300,), (5,))]
    grads = [rng.standard_normal(h.shape).astype(np.float32) for h in host]
    devices = [0, 0, 1]
    both = [_dev(cp, h, d) for h, d in zip(host, devices)]
    alone = [_dev(cp, h, d) for h, d in zip(host, devices)]
    opt = fastopt.Adam([{"params": both[:2]}, {"params": both[2:]}], lr=1e-2)
    first, second = fastopt.Adam(alone[:2], lr=1e-2), fastopt.Adam(alone[2:], lr=1e-2)
    for _ in range(3):
        opt.step([_dev(cp, gr, d) for gr, d in zip(grads, devices)])
        first.step([_dev(cp, gr, d) for gr, d in zip(grads[:2], devices[:2])])
        second.step([_dev(cp, grads[2], 1)])
    assert _snapshot(both) == _snapshot(alone)
    for option in ({"clip_grad_norm": 1.0}, {"skip_nonfinite": True}):
        params = [_dev(cp, h, d) for h, d in zip(host, devices)]
        guarded = fastopt.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2, **option)
        before = _snapshot(params)
        with pytest.raises(ValueError, match=r"need every param on one device .*params\[2\] is on device 1, "
                                             r"params\[0\] on device 0"):
            guarded.step([_dev(cp, gr, d) for gr, d in zip(grads, devices)])
        assert _snapshot(params) == before
    lone = [_dev(cp, h, 0) for h in host]
    opt = fastopt.Adam(lone, lr=1e-2)
    opt.step([_dev(cp, gr, 0) for gr in grads])
    before = _snapshot(lone, [opt.state_arrays(i) for i in range(3)])
    with pytest.raises(ValueError, match=r"grads\[2\] is on device 1 but params\[2\] is on device 0"):
        opt.step([_dev(cp, grads[0], 0), _dev(cp, grads[1], 0), _dev(cp, grads[2], 1)])
    assert _snapshot(lone, [opt.state_arrays(i) for i in range(3)]) == before


def test_init_state_refuses_integer_device_params(cp):
    """On the host an integer param's state is a TypeError; on the GPU it was made in the param's dtype."""
    p = _dev(cp, np.arange(6, dtype=np.int32))
    with pytest.raises(TypeError, match="params has dtype int32; optimizer state is for floating-point params"):
        fastopt.init_state("adam", p)
    with pytest.raises(TypeError, match=r"params\[1\] has dtype >f4"):
        fastopt.init_state("adam", [_dev(cp, np.ones(3, np.float32)), _dev(cp, np.ones(3, ">f4"))])


def test_an_empty_first_param_does_not_decide_the_device(cp):
    """The checks take a call's device from its first non-empty param, and so must the launch: with an empty
    params[0] the kernels were launched on the current device, with another GPU's pointers."""
    rng = np.random.default_rng()
    p = [_dev(cp, np.zeros(0, np.float32), 0), _rnd(cp, rng, (300,), 1)]
    g = [_dev(cp, np.zeros(0, np.float32), 0), _rnd(cp, rng, (300,), 1)]
    m, v = ([_dev(cp, np.zeros(0, np.float32), 0), _dev(cp, np.zeros(300, np.float32), 1)] for _ in range(2))
    want = p[1].values.copy()
    fastopt.adam_step(p, g, m, v, step=1, lr=1e-2)
    assert cp.launches and all(launch.device == 1 for launch in cp.launches)
    assert not np.array_equal(p[1].values, want)
    opt = fastopt.Adam([_dev(cp, np.zeros(0, np.float32), 0), _rnd(cp, rng, (300,), 1)], lr=1e-2,
                       clip_grad_norm=1.0)
    cp.launches.clear()
    opt.step([_dev(cp, np.zeros(0, np.float32), 0), _rnd(cp, rng, (300,), 1)])
    assert cp.launches and all(launch.device == 1 for launch in cp.launches)

