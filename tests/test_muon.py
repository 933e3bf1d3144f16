"""fastopt.Muon (NumPy) and fastopt.torch.Muon against torch.optim.Muon.

torch runs the Newton-Schulz iteration in bfloat16 (float32 sums) for every param dtype, and so does
fastopt.muon; the two libraries' float32 sums are in different orders, so a sum that lands within its
rounding error of a bfloat16 tie can round the other way (fastopt/muon.py, "Precision"). The comparisons
are therefore: the momentum buffers bit for bit (float32) or to 1e-12 (float64); each step's update equal to
torch's within a few bfloat16 ulps of the orthogonalized matrix (|entries| <= ~1) and bit for bit on most
steps (compared in lockstep: each step starts from torch's params); single steps on small matrices bit for
bit; unsynchronised trajectories (fastopt.torch, state-dict resumption) within the per-step tolerance summed.
"""
import copy
import math
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fastopt.muon import Muon, adjusted_lr  # noqa: E402
from fastopt.torch import muon as ftorch  # noqa: E402  (ftorch.Muon: fastopt.torch.Muon)

TORCH_DT = {np.float32: torch.float32, np.float64: torch.float64}
SHAPES = [(7, 13), (13, 7), (1, 1), (1, 9), (9, 1), (0, 5), (17, 17), (33, 5)]
UPDATE_TOL = 2.0 ** -5   # per step, in units of the adjusted lr: a few bfloat16 ulps of an entry <= ~1


def _torch_has_spectral_unclamped() -> bool:
    """torch.optim.Muon takes adjust_lr_fn="spectral_unclamped" from torch 2.15 on."""
    try:
        torch.optim.Muon([torch.zeros(2, 2, requires_grad=True)], adjust_lr_fn="spectral_unclamped")
    except ValueError:
        return False
    return True


TORCH_HAS_SPECTRAL = _torch_has_spectral_unclamped()
_NEEDS_SPECTRAL = pytest.mark.skipif(not TORCH_HAS_SPECTRAL, reason=f"torch {torch.__version__}'s Muon has no "
                                     "adjust_lr_fn='spectral_unclamped' (torch >= 2.15 has it)")
# adjust_lr_fn values compared with torch; "spectral_unclamped" only where torch has it
TORCH_FNS = [None, "original", "match_rms_adamw", pytest.param("spectral_unclamped", marks=_NEEDS_SPECTRAL)]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # torch's two OpenMP threads spin against NumPy's on the shared 2-core machine: 50 ms a step instead of 4
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _groups(dtype, nesterov, fn, rng):
    """Two groups of odd-shaped params: torch's defaults but nesterov/adjust_lr_fn, and a second with its
    own lr, no weight decay, another momentum, ns_steps and coefficients."""
    ps = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    g1 = {"params": ps[:4]}
    g2 = {"params": ps[4:], "lr": 0.05, "weight_decay": 0.0, "momentum": 0.6, "ns_steps": 3,
          "ns_coefficients": (2.0, -1.5, 0.5)}
    hp = {"lr": 0.02, "weight_decay": 0.1, "nesterov": nesterov, "adjust_lr_fn": fn}
    return ps, [g1, g2], hp


def _torch_groups(groups):
    out = []
    for g in groups:
        d = dict(g)
        d["params"] = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in g["params"]]
        out.append(d)
    return out


def _check_step(ps, tps, lrs, fn, stats):
    """This step's result equals torch's within UPDATE_TOL (in units of each param's adjusted lr); the params
    were equal before it (lockstep), so each step is compared on its own."""
    for i, (p, tp) in enumerate(zip(ps, tps)):
        theirs = tp.detach().numpy()
        if p.size:
            e = np.abs(p.astype(np.float64) - theirs).max() / adjusted_lr(lrs[i], fn, p.shape)
            assert e <= UPDATE_TOL, (i, p.shape, e)
            stats.append(e)
        p[...] = theirs  # lockstep: the next step starts from torch's params


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("fn", TORCH_FNS)
def test_numpy_class_matches_torch_over_50_steps(dtype, nesterov, fn):
    rng = np.random.default_rng(zlib.crc32(repr((dtype.__name__, nesterov, fn)).encode()))
    ps, groups, hp = _groups(dtype, nesterov, fn, rng)
    tgroups = _torch_groups(groups)
    opt = Muon(groups, **hp)
    topt = torch.optim.Muon(tgroups, **hp)
    tps = [p for g in tgroups for p in g["params"]]
    lrs = [0.02] * 4 + [0.05] * 4
    stats = []
    for step in range(50):
        grads = [rng.standard_normal(p.shape).astype(dtype) for p in ps]
        if step % 7 == 3:
            grads[1] = None  # no gradient: skipped by both, its buffer kept
        for tp, g in zip(tps, grads):
            tp.grad = None if g is None else torch.from_numpy(g.copy())
        topt.step()
        opt.step(grads)
        _check_step(ps, tps, lrs, fn, stats)
        for i, tp in enumerate(tps):
            mine, theirs = opt.state[i]["momentum_buffer"], topt.state[tp]["momentum_buffer"].numpy()
            if dtype == np.float32:
                np.testing.assert_array_equal(mine, theirs)  # torch's FMA lerp, bit for bit
            else:
                np.testing.assert_allclose(mine, theirs, rtol=1e-12, atol=1e-15)
    # most steps bit for bit (float32) / to 1e-9 of the lr (float64): the tie-rounding case is the exception
    inexact = np.mean(np.array(stats) > (0 if dtype == np.float32 else 1e-9))
    assert inexact < 0.05, inexact  # ~1 % seen
    assert all(p.dtype == dtype for p in ps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7, 13), (13, 7), (31, 31), (1, 1), (2, 20), (20, 2)])
@pytest.mark.parametrize("ns_steps,coefficients", [(5, (3.4445, -4.7750, 2.0315)), (1, (3.4445, -4.7750, 2.0315)),
                                                   (0, (3.4445, -4.7750, 2.0315)), (8, (1.5, -0.5, 0.0))])
def test_one_step_bit_for_bit(dtype, shape, ns_steps, coefficients):
    """One step from zero params with momentum 0: p = -lr' * NS(g), torch's bfloat16 iteration exactly, on
    matrices small enough that no float32 sum lands near a bfloat16 tie (with these seeds; larger ones: below)."""
    rng = np.random.default_rng(sum(shape) * 100 + ns_steps)
    g = (rng.standard_normal(shape) * 3).astype(dtype)
    hp = dict(lr=0.3, weight_decay=0.0, momentum=0.0, nesterov=False, ns_steps=ns_steps,
              ns_coefficients=coefficients)
    p = np.zeros(shape, dtype)
    Muon([p], **hp).step([g])
    tp = torch.nn.Parameter(torch.zeros(shape, dtype=TORCH_DT[dtype]))
    tp.grad = torch.from_numpy(g.copy())
    torch.optim.Muon([tp], **hp).step()
    np.testing.assert_array_equal(p, tp.detach().numpy())
    assert np.any(p != 0)


@pytest.mark.parametrize("shape", [(48, 160), (160, 48)])
def test_one_step_larger_matrix(shape):
    """Inner dimensions of ~100: torch's and BLAS's float32 sums round a few bfloat16 ties apart."""
    rng = np.random.default_rng(shape[0])
    g = rng.standard_normal(shape).astype(np.float32)
    p = np.zeros(shape, np.float32)
    Muon([p], lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0).step([g])
    tp = torch.nn.Parameter(torch.zeros(shape))
    tp.grad = torch.from_numpy(g.copy())
    torch.optim.Muon([tp], lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0).step()
    theirs = tp.detach().numpy()
    assert np.mean(p == theirs) > 0.5
    assert np.abs(p - theirs).max() <= UPDATE_TOL * adjusted_lr(1.0, None, shape)
    assert np.linalg.norm(p - theirs) <= 0.02 * np.linalg.norm(theirs)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_nan_zero_and_huge_gradients_like_torch():
    for g in (np.full((4, 6), np.nan, np.float32), np.zeros((4, 6), np.float32),
              np.where(np.arange(24).reshape(4, 6) == 5, np.inf, 1.0).astype(np.float32),
              np.full((3, 5), 3e38, np.float32)):
        p = np.ones(g.shape, np.float32)
        Muon([p], lr=0.1).step([g.copy()])
        tp = torch.nn.Parameter(torch.ones(g.shape))
        tp.grad = torch.from_numpy(g.copy())
        torch.optim.Muon([tp], lr=0.1).step()
        np.testing.assert_array_equal(p, tp.detach().numpy())  # NaN where torch has NaN


# ---- 16-bit params ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,nesterov", [(torch.bfloat16, True), (torch.float16, True), (torch.float16, False)])
def test_16bit_params_like_torch(dtype, nesterov):
    """bfloat16 / float16 params (buffer in the param's dtype, as torch): torch's float32 math rounded to 16
    bits. Buffers bit for bit; params within one 16-bit ulp per step (torch's bfloat16 add(alpha=) rounds a
    few elements of its loop's scalar tail differently) plus the iteration's tie flips."""
    torch.manual_seed(7)
    shapes = [(7, 13), (13, 7), (6, 6)]
    mine = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in mine]
    a = ftorch.Muon(mine, lr=0.05, nesterov=nesterov)
    b = torch.optim.Muon(ref, lr=0.05, nesterov=nesterov)
    exact = 0
    for step in range(30):
        for x, y in zip(mine, ref):
            g = torch.randn(x.shape).to(dtype)
            x.grad, y.grad = g.clone(), g.clone()
        a.step()
        b.step()
        for x, y in zip(mine, ref):
            assert x.dtype == dtype
            # one 16-bit ulp of the result, plus the bfloat16 iteration's tie flips (as for float32)
            tol = torch.finfo(dtype).eps * y.detach().abs().float() + UPDATE_TOL * adjusted_lr(0.05, None, x.shape)
            assert torch.all((x.detach().float() - y.detach().float()).abs() <= tol), step
            exact += torch.equal(x, y)
            x.data.copy_(y.data)  # lockstep
            assert torch.equal(a.state[x]["momentum_buffer"], b.state[y]["momentum_buffer"])
    assert exact >= 10


def test_bfloat16_buffer_is_not_normalised():
    """torch 2.13's bfloat16 Muon without nesterov divides the momentum buffer itself by its norm (.bfloat16()
    of a bfloat16 tensor is the tensor; fixed upstream in pytorch/pytorch#194664): fastopt keeps the lerp."""
    g = torch.randn(5, 8).bfloat16()
    p = torch.nn.Parameter(torch.zeros(5, 8, dtype=torch.bfloat16))
    p.grad = g.clone()
    opt = ftorch.Muon([p], lr=0.0, momentum=0.9, nesterov=False)
    opt.step()
    assert torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(g).lerp_(g, 1 - 0.9))
    # and the NumPy class on ml_dtypes' bfloat16 arrays gives fastopt.torch's result
    ml_dtypes = pytest.importorskip("ml_dtypes")
    q = torch.randn(5, 8).bfloat16()
    tp = torch.nn.Parameter(q.clone())
    tp.grad = g.clone()
    ftorch.Muon([tp], lr=0.1, nesterov=False).step()
    arr = q.view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
    Muon([arr], lr=0.1, nesterov=False).step([g.view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)])
    np.testing.assert_array_equal(arr.view(np.int16), tp.detach().view(torch.int16).numpy())


# ---- fastopt.torch.Muon ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", ["match_rms_adamw", pytest.param("spectral_unclamped", marks=_NEEDS_SPECTRAL)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_class_matches_torch(dtype, fn):
    torch.manual_seed(3)
    shapes = [(9, 14), (14, 9), (1, 7), (5, 12)]
    base = [torch.randn(s, dtype=dtype) for s in shapes]
    # a non-contiguous param (a transposed weight): updated in place through its own strides
    mine = [torch.nn.Parameter(b.clone()) for b in base[:3]] + [torch.nn.Parameter(base[3].T.contiguous().T)]
    ref = [torch.nn.Parameter(b.clone()) for b in base]
    kw = dict(lr=0.03, momentum=0.9, weight_decay=0.05, adjust_lr_fn=fn)
    a = ftorch.Muon([{"params": mine[:2]}, {"params": mine[2:], "nesterov": False, "lr": 0.01}], **kw)
    b = torch.optim.Muon([{"params": ref[:2]}, {"params": ref[2:], "nesterov": False, "lr": 0.01}], **kw)
    ptr = mine[3].data_ptr()
    for step in range(30):
        for x, y in zip(mine, ref):
            g = torch.randn_like(y)
            x.grad, y.grad = g.clone(), g.clone()
        if step == 5:
            mine[0].grad = ref[0].grad = None
        a.step()
        b.step()
    assert mine[3].data_ptr() == ptr and not mine[3].is_contiguous()
    for x, y in zip(mine, ref):
        assert x.dtype == dtype
        alr = adjusted_lr(0.03, fn, x.shape)
        assert (x - y).abs().max().item() <= 30 * UPDATE_TOL * alr
        torch.testing.assert_close(a.state[x]["momentum_buffer"], b.state[y]["momentum_buffer"],
                                   rtol=1e-12 if dtype == torch.float64 else 0, atol=1e-15 if dtype == torch.float64 else 0)
    assert a.state_dict()["param_groups"] == b.state_dict()["param_groups"]


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_tensor_lr_is_torchs_tensor_arithmetic(dtype, lr_dtype):
    """torch with a 0-d Tensor lr forms 1 - lr * weight_decay and lr * ratio in the lr's dtype (float32 by
    default): fastopt.torch.Muon read lr.item() and computed them in float64, 6.5e-6 of the movement off torch's
    float64 run after 30 steps. With zero gradients the update is the decay alone: equal to torch's, bit for bit;
    with gradients within the class's tolerance (Newton-Schulz's bfloat16 ties round apart now and then)."""
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(2 ** 31)))
    shapes = [(6, 9), (5, 5), (9, 4)]
    base = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    lr = float(np.random.default_rng().uniform(0.005, 0.05))
    for zero in (True, False):
        mine, ref = ([torch.nn.Parameter(b.clone()) for b in base] for _ in range(2))
        kw = dict(lr=torch.tensor(lr, dtype=lr_dtype), weight_decay=0.1)
        a, b = ftorch.Muon(mine, **kw), torch.optim.Muon(ref, **kw)
        for _ in range(30):
            for x, y in zip(mine, ref):
                x.grad = torch.zeros_like(x) if zero else torch.randn(x.shape, generator=gen, dtype=dtype)
                y.grad = x.grad.clone()
            a.step()
            b.step()
        for x, y in zip(mine, ref):
            if zero:
                assert torch.equal(x, y)
            else:
                assert (x - y).abs().max().item() <= 30 * UPDATE_TOL * adjusted_lr(lr, None, x.shape)


def test_torch_class_training_closure_scheduler_and_versions():
    torch.manual_seed(0)
    x, y = torch.randn(64, 10), torch.randn(64, 3)

    def run(cls):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(10, 16, bias=False), torch.nn.Tanh(),
                                    torch.nn.Linear(16, 3, bias=False))
        opt = cls(model.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
        losses = []
        for _ in range(20):
            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss
            losses.append(opt.step(closure).item())
            sched.step()
        return losses, opt

    mine, opt = run(ftorch.Muon)
    theirs, _ = run(torch.optim.Muon)
    assert mine[-1] < 0.8 * mine[0]
    np.testing.assert_allclose(mine, theirs, rtol=2e-3)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5 ** 4)
    # the version counter is bumped: a graph that saved the old value raises
    p = next(iter(opt.param_groups[0]["params"]))
    out = (p * p).sum()
    p.grad = torch.ones_like(p)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_state_dict_interchange_mid_training():
    rng = np.random.default_rng(11)
    shapes = [(6, 11), (11, 6)]
    ps = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    tps = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in ps]
    t_opt = torch.optim.Muon(tps, lr=0.04, adjust_lr_fn="original")
    np_opt = Muon(ps, lr=0.04, adjust_lr_fn="original")
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(20)]
    for gs in grads[:10]:
        for tp, g in zip(tps, gs):
            tp.grad = torch.from_numpy(g.copy())
        t_opt.step()
    # torch -> fastopt (NumPy): params and state copied over, then both continue identically
    for p, tp in zip(ps, tps):
        p[...] = tp.detach().numpy()
    np_opt.load_state_dict(t_opt.state_dict())
    # torch -> fastopt.torch, and fastopt.torch -> torch (a fresh torch optimizer)
    fps = [torch.nn.Parameter(tp.detach().clone()) for tp in tps]
    f_opt = ftorch.Muon(fps, lr=0.5)
    f_opt.load_state_dict(copy.deepcopy(t_opt.state_dict()))  # torch's state_dict() holds the live buffers
    assert f_opt.param_groups[0]["lr"] == 0.04
    sd = np_opt.state_dict()
    assert set(sd) == {"state", "param_groups"} and sd["param_groups"][0]["params"] == [0, 1]
    assert isinstance(sd["state"][0]["momentum_buffer"], np.ndarray)
    t2ps = [torch.nn.Parameter(tp.detach().clone()) for tp in tps]
    t2 = torch.optim.Muon(t2ps)
    t2.load_state_dict({"state": {k: {"momentum_buffer": torch.from_numpy(v["momentum_buffer"])}
                                  for k, v in sd["state"].items()}, "param_groups": sd["param_groups"]})
    for gs in grads[10:]:
        for tp, fp, t2p, g in zip(tps, fps, t2ps, gs):
            tp.grad, fp.grad, t2p.grad = (torch.from_numpy(g.copy()) for _ in range(3))
        t_opt.step()
        f_opt.step()
        t2.step()
        np_opt.step(gs)
    for p, tp, fp, t2p in zip(ps, tps, fps, t2ps):
        torch.testing.assert_close(t2p, tp, rtol=0, atol=0)  # fastopt's state dict resumes torch exactly
        tol = 10 * UPDATE_TOL * adjusted_lr(0.04, "original", p.shape)
        assert np.abs(p - tp.detach().numpy()).max() <= tol
        assert (fp - tp).abs().max().item() <= tol


# ---- rejected params and hyperparameters ------------------------------------------------------------------

def _torch_error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return info.type, str(info.value)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), ()])
def test_rejects_non_2d_params_like_torch(shape):
    etype, msg = _torch_error(lambda: torch.optim.Muon([torch.nn.Parameter(torch.zeros(shape))]))
    with pytest.raises(etype) as info:
        ftorch.Muon([torch.nn.Parameter(torch.zeros(shape))])
    assert str(info.value) == msg
    with pytest.raises(ValueError, match=r"Muon only supports 2D parameters .*" + str(tuple(shape)).replace("(", r"\(")
                       .replace(")", r"\)")):
        Muon([np.zeros((3, 3)), np.zeros(shape)])


@pytest.mark.parametrize("kw", [{"lr": -0.1}, {"momentum": -0.5}, {"weight_decay": -1e-3},
                                {"adjust_lr_fn": "adamw"}, {"lr": float("nan")}])
def test_hyperparameter_errors_are_torchs(kw):
    p = torch.nn.Parameter(torch.zeros(3, 4))
    etype, msg = _torch_error(lambda: torch.optim.Muon([p], **kw))
    for make in (lambda: ftorch.Muon([p], **kw), lambda: Muon([np.zeros((3, 4))], **kw)):
        with pytest.raises(etype) as info:
            make()
        assert str(info.value) == msg


@pytest.mark.parametrize("kw,etype,words", [
    ({"ns_steps": 100}, ValueError, "Number of steps must be less than 100"),
    ({"ns_steps": -1}, ValueError, "ns_steps: -1"),
    ({"ns_steps": 5.0}, TypeError, "ns_steps must be an int"),
    ({"ns_coefficients": (1.0, 2.0)}, ValueError, "Coefficients must be a tuple of exactly 3 values"),
    ({"ns_coefficients": (1.0, float("inf"), 2.0)}, ValueError, r"ns_coefficients\[1\]: inf"),
    ({"nesterov": "yes"}, TypeError, "nesterov must be a bool, got 'yes'"),
    ({"eps": float("inf")}, ValueError, "eps: inf"),
    ({"lr": float("inf")}, ValueError, "lr: inf"),
    ({"lr": "0.1"}, TypeError, "lr must be a real number"),
])
def test_fastopt_checks_at_construction(kw, etype, words):
    for make in (lambda: ftorch.Muon([torch.nn.Parameter(torch.zeros(3, 4))], **kw),
                 lambda: Muon([np.zeros((3, 4))], **kw)):
        with pytest.raises(etype, match=words):
            make()


def test_dtype_kind_and_group_errors():
    with pytest.raises(TypeError, match=r"params\[1\] must be float32, float64, float16 or bfloat16, got int64"):
        Muon([np.zeros((2, 2)), np.zeros((2, 2), np.int64)])
    with pytest.raises(TypeError, match="complex"):
        Muon([np.zeros((2, 2), np.complex64)])
    with pytest.raises(ValueError, match="read-only"):
        a = np.zeros((2, 2))
        a.flags.writeable = False
        Muon([a])
    with pytest.raises(TypeError, match="unknown hyperparameter.*betas"):
        Muon([{"params": [np.zeros((2, 2))], "betas": (0.9, 0.99)}])
    with pytest.raises(ValueError, match="more than one place"):
        a = np.zeros((2, 2))
        Muon([a, a])
    for cls in (torch.optim.Muon, ftorch.Muon):
        p = torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.complex64))
        p.grad = torch.ones_like(p)
        with pytest.raises(RuntimeError, match="Muon does not support complex parameters"):
            cls([p]).step()
        assert torch.all(p == 0)


# ---- bad input leaves everything unchanged -----------------------------------------------------------------

def _snapshot(opt, ps):
    return ([p.tobytes() for p in ps], {i: s["momentum_buffer"].tobytes() for i, s in opt.state.items()},
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])


def test_bad_step_changes_nothing():
    rng = np.random.default_rng(4)
    ps = [rng.standard_normal(s).astype(np.float32) for s in [(4, 6), (6, 4), (3, 3)]]
    opt = Muon([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.1}])
    good = [rng.standard_normal(p.shape).astype(np.float32) for p in ps]
    opt.step(good)
    before = _snapshot(opt, ps)
    bad_calls = [
        (ValueError, "shape", good[:2] + [np.zeros((3, 4), np.float32)]),
        (TypeError, "dtype float64", good[:2] + [np.zeros((3, 3))]),
        (ValueError, "grads has 2 entries", good[:2]),
        (TypeError, "grads must be a list", "grads"),
        (ValueError, "shares memory", [good[0], good[1], ps[2]]),
    ]
    for etype, words, grads in bad_calls:
        with pytest.raises(etype, match=words):
            opt.step(grads)
        assert _snapshot(opt, ps) == before
    for key, value in [("lr", -1.0), ("ns_steps", 100), ("ns_coefficients", (1, 2)), ("adjust_lr_fn", "x"),
                       ("momentum", float("nan"))]:
        old = opt.param_groups[1][key]
        opt.param_groups[1][key] = value
        with pytest.raises(ValueError):
            opt.step(good)
        opt.param_groups[1][key] = old
        assert _snapshot(opt, ps) == before
    opt.param_groups[1]["params"][0] = np.zeros((3, 3, 1), np.float32)   # a swapped param: not 2-D
    with pytest.raises(ValueError, match="2D"):
        opt.step(good)
    opt.param_groups[1]["params"][0] = ps[2]
    assert _snapshot(opt, ps) == before
    opt.step(good)  # and still works
    assert _snapshot(opt, ps)[0] != before[0]


def test_bad_state_dict_changes_nothing():
    rng = np.random.default_rng(8)
    ps = [rng.standard_normal(s).astype(np.float64) for s in [(4, 6), (5, 5)]]
    opt = Muon(ps, lr=0.07)
    opt.step([rng.standard_normal(p.shape) for p in ps])
    good = opt.state_dict()
    before = _snapshot(opt, ps)
    bads = []
    sd = opt.state_dict(); sd["state"][1]["momentum_buffer"] = np.zeros((5, 4)); bads.append((ValueError, "shape", sd))
    sd = opt.state_dict(); sd["state"][7] = sd["state"][0]; bads.append((ValueError, "param 7", sd))
    sd = opt.state_dict(); sd["param_groups"][0]["lr"] = -2.0; bads.append((ValueError, "Learning rate", sd))
    sd = opt.state_dict(); sd["param_groups"][0]["params"] = [0]; bads.append((ValueError, "1 params", sd))
    sd = opt.state_dict(); sd["state"][0] = {"exp_avg": np.zeros((4, 6))}; bads.append((ValueError, "momentum_buffer", sd))
    sd = opt.state_dict(); sd["state"][0]["momentum_buffer"] = np.zeros((4, 6), np.int32)
    bads.append((TypeError, "int32", sd))
    for etype, words, sd in bads:
        with pytest.raises(etype, match=words):
            opt.load_state_dict(sd)
        assert _snapshot(opt, ps) == before
    opt.load_state_dict(good)
    assert _snapshot(opt, ps) == before


def test_torch_class_bad_step_changes_nothing():
    ps = [torch.nn.Parameter(torch.randn(4, 5)), torch.nn.Parameter(torch.randn(5, 4))]
    opt = ftorch.Muon([{"params": ps[:1]}, {"params": ps[1:]}])
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in ps] + [opt.state[p]["momentum_buffer"].clone() for p in ps]
    versions = [p._version for p in ps]
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match="Learning rate should be >= 0 but is: -1.0"):
        opt.step()
    opt.param_groups[1]["lr"] = 1e-3
    opt.state[ps[1]]["momentum_buffer"] = torch.zeros(4, 5)  # a buffer of the wrong shape (loaded, or set)
    with pytest.raises(ValueError, match="momentum_buffer .* does not match its param"):
        opt.step()
    after = [p.detach().clone() for p in ps] + [opt.state[ps[0]]["momentum_buffer"].clone()]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert torch.equal(opt.state[ps[1]]["momentum_buffer"], torch.zeros(4, 5))
    assert [p._version for p in ps] == versions


def test_memory_shared_across_params_grads_and_buffers_is_refused():
    """Each param is written before the next one's arrays are read: a grad that is another param (or a view
    of another param's momentum buffer), and params that are views of one buffer, gave silently wrong
    results; refused before anything is written, as the registry classes and Adafactor do."""
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2 ** 32))
    buf = rng.standard_normal(80).astype(np.float32)
    p0, p1 = buf[:36].reshape(6, 6), rng.standard_normal((6, 6)).astype(np.float32)
    opt = Muon([p0, p1], lr=0.1)
    opt.step([rng.standard_normal((6, 6)).astype(np.float32) for _ in range(2)])
    before = _snapshot(opt, [buf, p1])
    g = rng.standard_normal((6, 6)).astype(np.float32)
    momentum0 = opt.state[0]["momentum_buffer"]
    for grads, words in [([g, p0], r"params\[0\] and grads\[1\] share memory"),
                         ([g, p0[::-1]], r"params\[0\] and grads\[1\] share memory"),
                         ([g, momentum0], r"state\[0\]\['momentum_buffer'\] and grads\[1\] share memory")]:
        with pytest.raises(ValueError, match=words):
            opt.step(grads)
        assert _snapshot(opt, [buf, p1]) == before
    opt.step([g, g])  # one grad read for two params: fine
    both = Muon([buf[:36].reshape(6, 6), buf[18:54].reshape(6, 6)])  # overlapping views of one buffer
    raw = buf.tobytes()
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] share memory"):
        both.step([g, g])
    assert buf.tobytes() == raw and both.state == {}
    both.step([g, None])  # the overlap only matters when both are written
    with pytest.raises(ValueError, match=r"params\[0\] has overlapping elements"):
        Muon([np.lib.stride_tricks.as_strided(np.ones(4, np.float32), shape=(3, 3), strides=(4, 4))])


def test_torch_class_refuses_a_grad_that_is_another_param():
    ps = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))]
    opt = ftorch.Muon(ps)
    ps[0].grad = torch.randn(4, 4)
    ps[1].grad = ps[0].detach()
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match="a param and a grad share memory"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before)) and len(opt.state) == 0
    ps[1].grad = ps[0].grad.clone()
    opt.step()
    assert not torch.equal(ps[1], before[1])


def test_adjusted_lr_and_class():
    assert issubclass(ftorch.Muon, torch.optim.Optimizer)
    assert math.isclose(adjusted_lr(1.0, None, (8, 2)), 2.0)
    assert math.isclose(adjusted_lr(1.0, "match_rms_adamw", (8, 2)), 0.2 * math.sqrt(8))


def test_spectral_unclamped_formula_on_any_torch():
    """torch 2.15's adjust_lr_fn="spectral_unclamped": lr * sqrt(A / B), A, B = shape[:2] (rows: fan-out,
    cols: fan-in), without "original"'s clamp max(1, .): a wide matrix gets a factor below 1."""
    from fastopt.muon import ADJUST_LR_FNS
    assert "spectral_unclamped" in ADJUST_LR_FNS
    for shape in [(8, 2), (2, 8), (3, 7), (7, 3), (5, 5), (1, 9), (768, 3072)]:
        a, b = shape
        assert adjusted_lr(0.02, "spectral_unclamped", shape) == 0.02 * math.sqrt(a / b)
        if a >= b:  # tall or square: the clamp does not bite, the two agree
            assert adjusted_lr(0.02, "spectral_unclamped", shape) == adjusted_lr(0.02, "original", shape)
    assert adjusted_lr(1.0, "spectral_unclamped", (2, 8)) == 0.5
    assert adjusted_lr(1.0, "original", (2, 8)) == 1.0
    # both classes take it on every torch version (torch < 2.15's Muon refuses it) and apply that lr: on a
    # wide (2 x 8) matrix lr 0.1 unclamped is lr 0.05 "original" exactly (sqrt(2/8) = 0.5), on a tall one the same
    rng = np.random.default_rng(11)
    for shape, lr_original in [((2, 8), 0.05), ((8, 2), 0.1)]:
        grads = [rng.standard_normal(shape) for _ in range(3)]
        p0 = rng.standard_normal(shape)
        runs = []
        for fn, lr in [("spectral_unclamped", 0.1), ("original", lr_original)]:
            p = p0.copy()
            opt = Muon([p], lr=lr, weight_decay=0.0, adjust_lr_fn=fn)
            tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
            topt = ftorch.Muon([tp], lr=lr, weight_decay=0.0, adjust_lr_fn=fn)
            assert opt.param_groups[0]["adjust_lr_fn"] == topt.param_groups[0]["adjust_lr_fn"] == fn
            for g in grads:
                opt.step([g.copy()])
                tp.grad = torch.from_numpy(g.copy())
                topt.step()
            runs.append((p, tp.detach().numpy().copy()))
        (p_s, tp_s), (p_o, tp_o) = runs
        np.testing.assert_array_equal(p_s, p_o)
        np.testing.assert_array_equal(tp_s, tp_o)
        assert not np.array_equal(p_s, p0)
    with pytest.raises(ValueError, match="Adjust learning rate function spectral is not supported"):
        Muon([np.zeros((2, 2))], adjust_lr_fn="spectral")


@pytest.mark.parametrize("shape", [(64, 128), (150, 90)])
def test_small_matrices_one_blas_thread_same_bits(shape, monkeypatch):
    """Below SINGLE_THREAD_MACS the iteration runs with one BLAS thread (the trainer's small matrices: OpenBLAS's
    thread hand-off cost more than the matmuls): the same bits as one BLAS thread set from outside, the same
    result as BLAS's own thread count to its summation order, and the previous count is restored after the step."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import fastopt.muon as muon_mod
    from fastopt.blas import blas_controllers
    assert blas_controllers()  # NumPy's BLAS is found
    rng = np.random.default_rng(7)
    init = rng.standard_normal(shape).astype(np.float32)
    grads = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    seen = []
    inner = muon_mod._newton_schulz

    def recording(*args):
        seen.append([lib.get_num_threads() for lib in blas_controllers()])
        return inner(*args)
    monkeypatch.setattr(muon_mod, "_newton_schulz", recording)
    results = []
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        for macs in (0, 1 << 62):  # never / always one thread
            monkeypatch.setattr(muon_mod, "SINGLE_THREAD_MACS", macs)
            p = init.copy()
            opt = Muon([p], lr=0.05)
            for g in grads:
                opt.step([g])
            results.append(p)
            assert all(lib.get_num_threads() == 2 for lib in blas_controllers())
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):  # one thread set from outside, not by Muon
        monkeypatch.setattr(muon_mod, "SINGLE_THREAD_MACS", 0)
        p = init.copy()
        opt = Muon([p], lr=0.05)
        for g in grads:
            opt.step([g])
    np.testing.assert_array_equal(results[1], p)
    # two BLAS threads against one: OpenBLAS keeps its summation order on some CPUs (the same bits on the AVX-512
    # VMs) and not on others (an AVX2 Zen 1 VM, 2026-12-06: up to 2e-4 apart after three steps that move p by
    # 0.014 on average, 0.08 at most)
    np.testing.assert_allclose(results[0], results[1], rtol=0, atol=1e-3)
    assert not np.array_equal(results[0], init)
    one, two = [[1] * len(seen[0])] * 3, [[2] * len(seen[0])] * 3
    assert seen[:3] == two and seen[3:6] == one and seen[6:] == one
