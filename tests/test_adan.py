"""Adan (Xie et al. 2022) against pytorch_optimizer.Adan 4.1.0 (a test extra): the functional adan_step, the
NumPy class fastopt.Adan and fastopt.torch.Adan; float32 and float64, 50 steps, two param groups, sizes 0, 1
and odd; every option (weight_decay 0 / not, weight_decouple, maximize, other betas and eps). The compiled
CPU kernel (four state slots: the fourth after the Kahan compensation's) equals the NumPy reference bit for
bit, in every precision mode; bad input leaves every byte unchanged.

Documented differences from pytorch_optimizer.Adan:
- maximize: pytorch_optimizer starts previous_grad from the gradient before negating it, so its first
  difference is -2 g instead of 0; here the first difference is always 0, which is pytorch_optimizer run
  on the negated gradient (maximize=False, grads -g): that is the oracle of the maximize cases.
- betas: the registry splits them (beta1, beta2, beta3); fastopt.torch.Adan takes pytorch_optimizer's
  betas=(beta1, beta2, beta3), the NumPy class betas=(beta1, beta2) and beta3 (as its other classes).
- max_grad_norm is the classes' clip_grad_norm; use_gc and adanorm (per-tensor reductions) are not offered.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import fastopt

torch = pytest.importorskip("torch")
PAdan = pytest.importorskip("pytorch_optimizer").Adan
import fastopt.torch as fastopt_torch  # noqa: E402

SHAPES = [(0,), (1,), (7,), (33, 5)]
STEPS = 50
STATES = ("exp_avg", "exp_avg_diff", "exp_avg_sq", "previous_grad")

OPTIONS = [dict(weight_decay=wd, weight_decouple=dec, maximize=mx)
           for wd, dec, mx in itertools.product((0.0, 0.05), (False, True), (False, True))
           if not (wd == 0.0 and dec)] + [dict(beta1=0.9, beta2=0.8, beta3=0.999, eps=1e-6, weight_decay=0.02)]
BY_ID = {"default": OPTIONS[0], "max": OPTIONS[1], "l2": OPTIONS[2], "l2-max": OPTIONS[3], "decoupled": OPTIONS[4],
         "decoupled-max": OPTIONS[5], "betas": OPTIONS[6]}


def _tol(dtype):
    return (1e-10, 1e-12) if dtype == np.float64 else (3e-5, 3e-6)


def _theirs_kw(options):
    kw = {k: v for k, v in options.items() if k not in ("beta1", "beta2", "beta3", "maximize")}
    kw["betas"] = (options.get("beta1", 0.98), options.get("beta2", 0.92), options.get("beta3", 0.99))
    return kw


def _ours_kw(options):
    kw = {k: v for k, v in options.items() if k not in ("beta1", "beta2")}
    if "beta1" in options:
        kw["betas"] = (options["beta1"], options["beta2"])
    return kw


def _groups(rng, dtype, lrs=(0.01, 0.003)):
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    tparams = [torch.nn.Parameter(torch.tensor(p.copy())) for p in params]
    ours = [{"params": params[:2], "lr": lrs[0]}, {"params": params[2:], "lr": lrs[1]}]
    theirs = [{"params": tparams[:2], "lr": lrs[0]}, {"params": tparams[2:], "lr": lrs[1]}]
    return params, tparams, ours, theirs


def _grads(rng, params, dtype):
    return [rng.standard_normal(np.shape(p)).astype(dtype) for p in params]


def _their_grad(g, options):
    # maximize: the oracle runs on -g with maximize=False (see the module docstring)
    return torch.tensor(-g if options.get("maximize") else g.copy())


def _compare(ours_p, ours_state, tparams, topt, dtype):
    rtol, atol = _tol(dtype)
    for i, tp in enumerate(tparams):
        np.testing.assert_allclose(np.asarray(ours_p[i]), tp.detach().numpy(), rtol=rtol, atol=atol)
        for name in STATES:
            np.testing.assert_allclose(np.asarray(ours_state(i)[name]), topt.state[tp][name].numpy(), rtol=rtol,
                                       atol=atol, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", OPTIONS, ids=[str(o) for o in OPTIONS])
def test_class_matches_pytorch_optimizer(options, dtype, rng):
    params, tparams, ours, theirs = _groups(rng, dtype)
    topt = PAdan(theirs, foreach=False, **_theirs_kw(options))
    opt = fastopt.Adan(ours, **_ours_kw(options))
    for _ in range(STEPS):
        grads = _grads(rng, params, dtype)
        for tp, g in zip(tparams, grads):
            tp.grad = _their_grad(g, options)
        topt.step()
        opt.step(grads)
    _compare(params, opt.state_arrays, tparams, topt, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", [BY_ID[k] for k in ("default", "l2-max", "betas")], ids=["default", "l2-max", "betas"])
def test_functional_matches_pytorch_optimizer(options, dtype, rng):
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    tparams = [torch.nn.Parameter(torch.tensor(p.copy())) for p in params]
    topt = PAdan(tparams, lr=0.02, foreach=False, **_theirs_kw(options))
    states = {name: [np.zeros_like(p) for p in params] for name in STATES}
    for t in range(1, STEPS + 1):
        grads = _grads(rng, params, dtype)
        for tp, g in zip(tparams, grads):
            tp.grad = _their_grad(g, options)
        topt.step()
        fastopt.adan_step(params, grads, *(states[n] for n in STATES), step=t, lr=0.02, **options)
    _compare(params, lambda i: {n: states[n][i] for n in STATES}, tparams, topt, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [BY_ID[k] for k in ("l2", "decoupled-max", "betas")],
                         ids=["l2", "decoupled-max", "betas"])
def test_torch_frontend_matches_pytorch_optimizer(options, dtype, rng):
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in SHAPES]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = _theirs_kw(options)  # fastopt.torch.Adan takes pytorch_optimizer's betas triple
    if options.get("maximize"):
        kw["maximize"] = True
    opt = fastopt_torch.Adan([{"params": ours[:2]}, {"params": ours[2:], "lr": 0.004}], lr=0.01, **kw)
    topt = PAdan([{"params": theirs[:2]}, {"params": theirs[2:], "lr": 0.004}], lr=0.01, foreach=False,
                 **_theirs_kw(options))
    for _ in range(STEPS):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen, dtype=dtype)
            a.grad = g.clone()
            b.grad = -g if options.get("maximize") else g.clone()
        opt.step()
        topt.step()
    rtol, atol = _tol(np.float64 if dtype == torch.float64 else np.float32)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol)
        for name in STATES:
            torch.testing.assert_close(opt.state[a][name], topt.state[b][name], rtol=rtol, atol=atol)


def test_first_difference_is_zero_and_previous_grad_is_minus_g(rng):
    p = rng.standard_normal(9)
    g = rng.standard_normal(9)
    st = [np.zeros(9) for _ in STATES]
    fastopt.adan_step(p, g, *st, step=1, grad_scale=2.0)
    assert (st[1] == 0).all()                       # exp_avg_diff: (1 - beta2) * 0
    np.testing.assert_array_equal(st[3], -2.0 * g)  # previous_grad: -(grad_scale * g)


def _arrays(rng, pdtype, sdtype, n):
    p = rng.standard_normal(n).astype(pdtype)
    g = rng.standard_normal(n).astype(pdtype)
    st = [(rng.standard_normal(n) * (k != 2) + (k == 2) * rng.random(n)).astype(sdtype) for k in range(4)]
    return p, g, st


def _bf16():
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("mode", ["f32", "f64", "f32-bf16state", "bf16", "bf16-bf16state", "f16-kahan",
                                  "bf16-stochastic"])
@pytest.mark.parametrize("n", [0, 1, 4097, 40001])
def test_cpu_kernel_equals_reference_bit_for_bit(mode, n, rng):
    bf16 = _bf16()
    pd, sd = {"f32": (np.float32, np.float32), "f64": (np.float64, np.float64),
              "f32-bf16state": (np.float32, bf16), "bf16": (bf16, np.float32), "bf16-bf16state": (bf16, bf16),
              "f16-kahan": (np.float16, np.float32), "bf16-stochastic": (bf16, np.float32)}[mode]
    p, g, st = _arrays(rng, pd, sd, n)
    extra = {}
    comp = None
    if mode == "f16-kahan":
        comp = (rng.standard_normal(n) * 1e-3).astype(np.float16)
        extra["kahan_comp"] = comp
    if mode == "bf16-stochastic":
        extra.update(stochastic_rounding=True, seed=7, index_offset=3)
    runs = []
    for backend in ("cython", "numpy"):
        pp, ss = p.copy(), [s.copy() for s in st]
        kw = dict(extra)
        if comp is not None:
            kw["kahan_comp"] = comp.copy()
        for t in (1, 2, 3):
            fastopt.adan_step(pp, g, *ss, step=t, lr=0.01, weight_decay=0.1, weight_decouple=(t == 2), backend=backend,
                              **kw)
        runs.append([pp] + ss + ([kw["kahan_comp"]] if comp is not None else []))
    for a, b in zip(*runs):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_cpu_multi_tensor_list_equals_reference(rng):
    params = [rng.standard_normal(s).astype(np.float32) for s in [(0,), (1,), (33, 5), (70000,)]]
    grads = _grads(rng, params, np.float32)
    runs = []
    for backend in ("cython", "numpy"):
        ps = [p.copy() for p in params]
        st = [[np.zeros_like(p) for p in params] for _ in STATES]
        for t in range(1, 4):
            fastopt.adan_step(ps, grads, *st, step=t, maximize=True, grad_scale=0.5, backend=backend)
        runs.append(ps + [a for s in st for a in s])
    for a, b in zip(*runs):
        assert a.tobytes() == b.tobytes()


def _snapshot(arrays):
    return [a.tobytes() for a in arrays]


@pytest.mark.parametrize("backend", ["cython", "numpy"])
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(beta3=1.0), ValueError, "beta3.*1.0"),
    (dict(beta2=-0.1), ValueError, "beta2.*-0.1"),
    (dict(eps=-1.0), ValueError, "eps.*-1.0"),
    (dict(weight_decay=-0.5), ValueError, "weight_decay.*-0.5"),
    (dict(lr=float("nan")), ValueError, "nan"),
    (dict(step=0), ValueError, "step"),
    (dict(bad_state_shape=True), ValueError, "previous_grad.*shape"),
    (dict(bad_state_dtype=True), TypeError, "previous_grad.*float64"),
    (dict(read_only=True), ValueError, "previous_grad.*read-only"),
])
def test_bad_input_writes_nothing(backend, kwargs, exc, match, rng):
    params = [rng.standard_normal(5).astype(np.float32), rng.standard_normal(3).astype(np.float32)]
    grads = _grads(rng, params, np.float32)
    st = [[rng.standard_normal(np.shape(p)).astype(np.float32) for p in params] for _ in STATES]
    kwargs = dict(kwargs)
    step = kwargs.pop("step", 2)
    if kwargs.pop("bad_state_shape", False):
        st[3][1] = np.zeros(4, np.float32)
    if kwargs.pop("bad_state_dtype", False):
        st[3][1] = np.zeros(3, np.float64)
    if kwargs.pop("read_only", False):
        st[3][1].flags.writeable = False
    everything = params + grads + [a for s in st for a in s]
    before = _snapshot(everything)
    with pytest.raises(exc, match=match):
        fastopt.adan_step(params, grads, *st, step=step, backend=backend, **kwargs)
    assert _snapshot(everything) == before


def test_options_that_are_not_elementwise_are_refused(rng):
    p = [rng.standard_normal(4).astype(np.float32)]
    for key in ("adanorm", "use_gc", "max_grad_norm"):
        with pytest.raises(TypeError, match=key):
            fastopt.Adan(p, **{key: True})
        with pytest.raises(TypeError, match=key):
            fastopt_torch.Adan([torch.nn.Parameter(torch.zeros(3))], **{key: True})


def test_int8_state_takes_all_four_states(rng):
    """state_dtype="int8": all four states quantized (exp_avg_sq with the unsigned map, the others signed; the
    fourth, previous_grad, in the update's slot after the compensation); the compiled CPU loop equals the NumPy
    backend bit for bit over steps, 1000 elements in 256-blocks and a tail, and a state quantized with the wrong
    map is refused by name with nothing written."""
    from fastopt.precision import QuantizedState
    shapes = [(1000,), (7,), (3, 300)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    runs = {backend: fastopt.Adan([p.copy() for p in params], lr=0.01, weight_decay=0.02, state_dtype="int8",
                                  backend=backend) for backend in ("cython", "numpy")}
    for name in STATES:
        q = runs["cython"].state_dict()["state"][0]
        assert q[name].dtype == np.uint8 and q[name + "_absmax"].shape == (4,), name
    for _ in range(5):
        grads = _grads(rng, params, np.float32)
        for opt in runs.values():
            opt.step(grads)
    got, want = runs["cython"].state_dict()["state"], runs["numpy"].state_dict()["state"]
    for i in want:
        for key in want[i]:
            assert np.asarray(got[i][key]).tobytes() == np.asarray(want[i][key]).tobytes(), (i, key)
    p = [rng.standard_normal(300).astype(np.float32)]
    st = fastopt.init_state("adan", p, state_dtype="int8")
    assert [st[n][0].signed for n in STATES] == [True, True, False, True]
    wrong = dict(st, exp_avg_sq=[QuantizedState(st["exp_avg_sq"][0].codes, st["exp_avg_sq"][0].absmax, True)])
    g = [rng.standard_normal(300).astype(np.float32)]
    everything = p + g + [a for n in STATES for a in (st[n][0].codes, st[n][0].absmax)]
    before = _snapshot(everything)
    with pytest.raises(ValueError, match="exp_avg_sq.*signed map"):
        fastopt.adan_step(p, g, *(wrong[n] for n in STATES), step=1)
    assert _snapshot(everything) == before


def test_class_state_dict_round_trip_continues_identically(rng):
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    twin = [p.copy() for p in params]
    a = fastopt.Adan(params, lr=0.01, weight_decay=0.01)
    for _ in range(3):
        a.step(_grads(rng, params, np.float32))
    b = fastopt.Adan(twin, lr=0.01, weight_decay=0.01)
    for x, y in zip(twin, params):
        x[...] = y
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        grads = _grads(rng, params, np.float32)
        a.step(grads)
        b.step(grads)
    for x, y in zip(params, twin):
        assert x.tobytes() == y.tobytes()
    for i in range(len(params)):
        for name in STATES:
            assert a.state_arrays(i)[name].tobytes() == b.state_arrays(i)[name].tobytes()
