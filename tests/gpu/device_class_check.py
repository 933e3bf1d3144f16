"""The optimizer classes on device arrays, shared by the CUDA-simulator checks (sim_checks.py, Numba
arrays, run in CI) and the GPU execution tests (CuPy arrays, both backends, run with a GPU).

Two param groups (the second mixing two dtypes, so three buckets), a schedule, clip_grad_norm and
skip_nonfinite, a NaN and an Inf gradient on two of the steps. Checked:
  - no device-to-host read inside step() (`forbid_sync` makes any such read fail);
  - a step with a NaN/Inf gradient leaves params and state byte-for-byte unchanged;
  - the others equal the functional NumPy reference with the clip coefficient of the float64 norm,
    steps counted as attempted (the documented GPU semantics: the host cannot know a step was
    skipped without waiting), the schedule evaluated at the attempted count;
  - skipped_steps counts on the device; state_dict / load_state_dict resume bit-identically.
"""
from __future__ import annotations

import numpy as np

import fastopt
from fastopt import reference, specs
from fastopt.clip import clip_coefficient

OPTIMIZERS = ("adam", "sgd", "lamb", "radam")
SHAPES = [(5,), (1,), (3, 4), (0,), (9,)]
BAD_STEPS = {3: (4, np.nan), 6: (2, np.inf)}  # step -> (gradient index, value): float64 and float32 buckets
STEPS = 8
LR = 0.05


def make_optimizer(cls, params, schedule, backend):
    return cls([{"params": params[:2]}, {"params": params[2:], "lr": LR / 2}], lr=schedule, clip_grad_norm=1.0,
               skip_nonfinite=True, backend=backend)


def run(name, to_device, to_host, forbid_sync, dtype2, tolerances, backend=None):
    spec = specs.get_spec(name)
    cls = getattr(fastopt, spec.class_name)
    rng = np.random.default_rng(11)
    dtypes = [np.float32, np.float32, dtype2, np.float32, dtype2]
    params = [rng.standard_normal(s).astype(d) for s, d in zip(SHAPES, dtypes)]
    d_params = [to_device(p) for p in params]
    schedule = fastopt.schedules.exponential_decay(LR, 0.9)
    opt = make_optimizer(cls, d_params, schedule, backend)
    n = len(SHAPES)

    def live():
        return [to_host(p) for p in d_params] + [to_host(x) for i in range(n) for x in opt.state_arrays(i).values()]

    defaults = dict(spec.defaults)
    active = spec.active_states(dict(defaults, lr=LR))
    ref_p = [p.astype(np.float64) for p in params]
    ref_s = [[np.zeros(s) for s in SHAPES] for _ in spec.states]
    skipped = 0
    for t in range(1, STEPS + 1):
        grads = [rng.standard_normal(s).astype(d) for s, d in zip(SHAPES, dtypes)]
        if t in BAD_STEPS:
            i, value = BAD_STEPS[t]
            grads[i].flat[0] = value
        before = live()
        d_grads = [to_device(g) for g in grads]
        with forbid_sync(f"step {t} read device memory on the host (a synchronisation)"):
            opt.step(d_grads)
        if t in BAD_STEPS:
            skipped += 1
            assert all(a.tobytes() == b.tobytes() for a, b in zip(live(), before)), f"step {t} skipped but wrote"
            continue
        coef = clip_coefficient(float(np.sqrt(sum(reference.sumsq(g) for g in grads))), 1.0)
        for i in range(n):
            hp = dict(defaults, lr=schedule(t - 1) if i < 2 else LR / 2)
            kw = {h.name: hp[h.name] for h in spec.hypers}
            kw["grad_scale"] = coef
            if spec.uses_step:
                kw["step"] = t  # attempted steps
            states = [ref_s[k][i] for k, used in enumerate(active) if used]
            reference.STEPS[name](ref_p[i], grads[i].astype(np.float64), *states, **kw)
    assert opt.skipped_steps == skipped == len(BAD_STEPS), opt.skipped_steps
    assert opt.steps(0) == opt.steps(1) == STEPS
    for i in range(n):
        np.testing.assert_allclose(to_host(d_params[i]), ref_p[i], **tolerances[dtypes[i]], err_msg=f"params[{i}]")
    # stop, save, load into a fresh optimizer, continue: bit-identical
    state = opt.state_dict()
    fresh_params = [to_device(to_host(p)) for p in d_params]
    fresh = make_optimizer(cls, fresh_params, schedule, backend)
    fresh.load_state_dict(state)
    assert fresh.skipped_steps == skipped and fresh.steps(1) == STEPS
    for _ in range(2):
        grads = [to_device(rng.standard_normal(s).astype(d)) for s, d in zip(SHAPES, dtypes)]
        opt.step(grads)
        fresh.step(grads)
    for a, b in zip(d_params, fresh_params):
        assert to_host(a).tobytes() == to_host(b).tobytes(), "the resumed run differs"
    # a group added after steps: the guard's per-param buffer grows with it (a stale buffer would be
    # written past its end), and the new params are clipped with the norm of every gradient
    extra = to_device(np.ones(3, np.float32))
    opt.add_param_group({"params": [extra], "lr": LR})
    grads = [rng.standard_normal(s).astype(d) for s, d in zip(SHAPES, dtypes)] + [np.full(3, 1e3, np.float32)]
    opt.step([to_device(g) for g in grads])
    coef = clip_coefficient(float(np.sqrt(sum(reference.sumsq(g) for g in grads))), 1.0)
    expected = np.ones(3)
    states = [np.zeros(3) for k, used in enumerate(active) if used]
    kw = {h.name: dict(defaults, lr=LR)[h.name] for h in spec.hypers}
    kw["grad_scale"] = coef
    if spec.uses_step:
        kw["step"] = 1
    reference.STEPS[name](expected, grads[-1].astype(np.float64), *states, **kw)
    np.testing.assert_allclose(to_host(extra), expected, **tolerances[np.float32], err_msg="added group")
