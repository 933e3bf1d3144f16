"""SparseAdam (fastopt.SparseAdam on NumPy arrays, fastopt.torch.SparseAdam, fastopt.sparse_adam_step)
against torch.optim.SparseAdam on the same sparse gradients: float32/float64, repeated indices, empty
gradients, 1-row / 1-D / 3-D params, maximize, 50 steps with different rows, several groups, state_dict
interchange, and bad input that must raise naming the argument and change nothing."""
from __future__ import annotations

import copy

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastopt  # noqa: E402
import fastopt.sparse_adam as sparse_adam_module  # noqa: E402
import fastopt.torch  # noqa: E402
from fastopt.sparse_adam import prepare_step, sparse_adam_step  # noqa: E402

TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-9, atol=1e-12)}
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        yield
    torch.set_num_threads(before)


def sparse(idx, vals, shape):
    """The torch sparse COO gradient of (indices, values): 1-D row indices or (k, nnz) COO indices."""
    idx = torch.from_numpy(np.asarray(idx, dtype=np.int64))
    if idx.dim() == 1:
        idx = idx.reshape(1, -1)
    return torch.sparse_coo_tensor(idx, torch.from_numpy(np.ascontiguousarray(vals)), tuple(shape))


def random_grad(rng, shape, dtype, nnz=None):
    """Row indices with repeats (about half the rows touched once or more) and their values."""
    rows = shape[0]
    if nnz is None:
        nnz = int(rng.integers(1, 2 * rows + 2))
    idx = rng.integers(0, rows, nnz)
    vals = rng.standard_normal((nnz, *shape[1:])).astype(dtype)
    return idx, vals


def snapshot(arrays):
    return [np.array(a, copy=True) for a in arrays]


def assert_same_bytes(before, arrays):
    for b, a in zip(before, arrays):
        assert b.tobytes() == np.asarray(a).tobytes()


def compare_state(np_opt_state, torch_state, dtype):
    assert np_opt_state["step"] == torch_state["step"]
    for name in ("exp_avg", "exp_avg_sq"):
        np.testing.assert_allclose(np_opt_state[name], torch_state[name].detach().numpy(), **TOL[dtype])


# ---------------------------------------------------------------------------------------------------
# the update, 50 steps, against torch.optim.SparseAdam
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(37, 5), (1, 4), (23,), (11, 3, 2)])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("chunk", [None, 7], ids=["chunk-default", "chunk-7"])
def test_fifty_steps_match_torch(dtype, shape, maximize, chunk, monkeypatch):
    if chunk is not None:  # several chunks per call, with repeats crossing chunk boundaries
        monkeypatch.setattr(sparse_adam_module, "CHUNK_ELEMENTS", chunk)
    rng = np.random.default_rng([len(shape), shape[0], maximize, chunk or 0, np.dtype(dtype).itemsize])
    hp = dict(lr=0.03, betas=(0.8, 0.95), eps=1e-6, maximize=maximize)
    p0 = rng.standard_normal(shape).astype(dtype)
    p = p0.copy()
    opt = fastopt.SparseAdam([p], **hp)
    ref = torch.tensor(p0, requires_grad=True)
    ref_opt = torch.optim.SparseAdam([ref], **hp)
    mine = torch.tensor(p0, requires_grad=True)
    mine_opt = fastopt.torch.SparseAdam([mine], **hp)
    for step in range(50):
        if step == 3:
            grad = (np.zeros(0, np.int64), np.zeros((0, *shape[1:]), dtype))  # empty: counts, writes nothing
        elif step == 5:
            grad = None  # no gradient: skipped, not counted
        else:
            grad = random_grad(rng, shape, dtype)
        opt.step([grad])
        for t, o in ((ref, ref_opt), (mine, mine_opt)):
            t.grad = None if grad is None else sparse(grad[0], grad[1], shape)
            o.step()
    want = ref.detach().numpy()
    assert not np.array_equal(want, p0)
    np.testing.assert_allclose(p, want, **TOL[dtype])
    np.testing.assert_allclose(mine.detach().numpy(), want, **TOL[dtype])
    assert opt.state[0]["step"] == ref_opt.state[ref]["step"] == mine_opt.state[mine]["step"] == 49
    compare_state(opt.state[0], ref_opt.state[ref], dtype)
    compare_state({k: (v.numpy() if torch.is_tensor(v) else v) for k, v in mine_opt.state[mine].items()},
                  ref_opt.state[ref], dtype)


def test_a_numpy_float32_lr_computes_the_step_size_as_torch_with_a_tensor_lr():
    """torch.optim.SparseAdam computes lr * sqrt(1 - beta2^t) / (1 - beta1^t) in a float32 tensor lr's dtype: a
    NumPy float32 lr does the same here (a Python float lr: float64, 1e-10 apart after 30 steps), so float64
    params agree to their last bits (not all of them: torch's sqrt, Sleef's, is not correctly rounded on AVX2)."""
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2 ** 32))
    p = rng.standard_normal((13, 4))
    m, v = np.zeros_like(p), np.zeros_like(p)
    ref = torch.tensor(p, requires_grad=True)
    opt = torch.optim.SparseAdam([ref], lr=torch.tensor(0.0123))
    for t in range(1, 31):
        idx = rng.permutation(13)[:int(rng.integers(1, 14))]  # no repeats: their sums are torch's coalesce's
        vals = rng.standard_normal((idx.size, 4))
        sparse_adam_step(p, (idx, vals), m, v, step=t, lr=np.float32(0.0123))
        ref.grad = sparse(idx, vals, p.shape)
        opt.step()
    np.testing.assert_allclose(p, ref.detach().numpy(), rtol=1e-13, atol=0)


def test_lazy_rows_and_empty_gradient_write_nothing_else():
    rng = np.random.default_rng(7)
    p = rng.standard_normal((20, 3)).astype(np.float32)
    opt = fastopt.SparseAdam([p], lr=0.1)
    opt.step([(np.array([2, 5, 2]), rng.standard_normal((3, 3)).astype(np.float32))])
    before = snapshot([p, opt.state[0]["exp_avg"], opt.state[0]["exp_avg_sq"]])
    opt.step([(np.array([], np.int64), np.zeros((0, 3), np.float32))])
    assert opt.state[0]["step"] == 2
    assert_same_bytes(before, [p, opt.state[0]["exp_avg"], opt.state[0]["exp_avg_sq"]])
    untouched = np.setdiff1d(np.arange(20), [2, 5])
    opt.step([(np.array([5]), np.ones((1, 3), np.float32))])
    np.testing.assert_array_equal(p[untouched], before[0][untouched])
    assert not np.array_equal(p[5], before[0][5])
    np.testing.assert_array_equal(p[2], before[0][2])  # row 2 absent this step: unchanged (lazy)
    np.testing.assert_array_equal(opt.state[0]["exp_avg"][2], before[1][2])


# ---------------------------------------------------------------------------------------------------
# groups, COO indices, the functional API, 16-bit params
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_several_groups_match_torch(dtype):
    rng = np.random.default_rng(11)
    shapes = [(13, 4), (1,), (9,), (6, 2, 3)]
    p0 = [rng.standard_normal(s).astype(dtype) for s in shapes]
    groups_hp = [dict(lr=0.05, betas=(0.5, 0.9), eps=1e-3, maximize=True), dict(lr=0.01)]
    ps = [a.copy() for a in p0]
    opt = fastopt.SparseAdam([{"params": ps[:2], **groups_hp[0]}, {"params": ps[2:], **groups_hp[1]}],
                             betas=(0.7, 0.99))
    ts = [torch.tensor(a, requires_grad=True) for a in p0]
    tm = [torch.tensor(a, requires_grad=True) for a in p0]
    ref_opt = torch.optim.SparseAdam([{"params": ts[:2], **groups_hp[0]}, {"params": ts[2:], **groups_hp[1]}],
                                     betas=(0.7, 0.99))
    mine_opt = fastopt.torch.SparseAdam([{"params": tm[:2], **groups_hp[0]}, {"params": tm[2:], **groups_hp[1]}],
                                        betas=(0.7, 0.99))
    for step in range(50):
        # param 1 gets a gradient on even steps only: its own step count
        grads = [random_grad(rng, s, dtype) if (i != 1 or step % 2 == 0) else None for i, s in enumerate(shapes)]
        opt.step(grads)
        for t_list, o in ((ts, ref_opt), (tm, mine_opt)):
            for t, g, s in zip(t_list, grads, shapes):
                t.grad = None if g is None else sparse(g[0], g[1], s)
            o.step()
    for i in range(4):
        np.testing.assert_allclose(ps[i], ts[i].detach().numpy(), **TOL[dtype])
        np.testing.assert_allclose(tm[i].detach().numpy(), ts[i].detach().numpy(), **TOL[dtype])
        compare_state(opt.state[i], ref_opt.state[ts[i]], dtype)
    assert opt.state[1]["step"] == 25 and opt.state[0]["step"] == 50
    assert opt.param_groups[1]["betas"] == (0.7, 0.99) and opt.param_groups[0]["maximize"] is True


def test_coo_indices_over_leading_dims_equal_row_indices():
    """2-D (k, nnz) indices (torch's COO layout over the first k dims) give the update of the flattened rows."""
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal((4, 5, 3))
    coo = np.stack([rng.integers(0, 4, 12), rng.integers(0, 5, 12)])
    vals = rng.standard_normal((12, 3))
    a, b = p0.copy(), p0.copy().reshape(20, 3)
    ma, va = np.zeros_like(a), np.zeros_like(a)
    mb, vb = np.zeros_like(b), np.zeros_like(b)
    sparse_adam_step(a, (coo, vals), ma, va, step=1, lr=0.1)
    sparse_adam_step(b, (coo[0] * 5 + coo[1], vals), mb, vb, step=1, lr=0.1)
    np.testing.assert_array_equal(a.reshape(20, 3), b)
    ref = torch.tensor(p0, requires_grad=True)
    o = torch.optim.SparseAdam([ref], lr=0.1)
    ref.grad = torch.sparse_coo_tensor(torch.from_numpy(coo), torch.from_numpy(vals), (4, 5, 3))
    o.step()
    np.testing.assert_allclose(a, ref.detach().numpy(), **TOL[np.float64])


def test_functional_with_per_param_steps_equals_the_class():
    rng = np.random.default_rng(5)
    shapes = [(8, 2), (5,)]
    p0 = [rng.standard_normal(s) for s in shapes]
    ps = [a.copy() for a in p0]
    opt = fastopt.SparseAdam(ps, lr=0.02, betas=(0.85, 0.97), eps=1e-7)
    fs = [a.copy() for a in p0]
    ms = [np.zeros_like(a) for a in fs]
    vs = [np.zeros_like(a) for a in fs]
    counts = [0, 0]
    for step in range(6):
        grads = [random_grad(rng, shapes[0], np.float64), random_grad(rng, shapes[1], np.float64) if step % 3 else None]
        opt.step(grads)
        counts = [c + (g is not None) for c, g in zip(counts, grads)]
        sparse_adam_step(fs, grads, ms, vs, step=[max(c, 1) for c in counts], lr=0.02, beta1=0.85, beta2=0.97,
                         eps=1e-7)
    for i in range(2):
        np.testing.assert_array_equal(ps[i], fs[i])
        np.testing.assert_array_equal(opt.state[i]["exp_avg_sq"], vs[i])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_init_state_makes_the_functional_state(dtype):
    """init_state("sparse_adam", ...) raised "Unknown optimizer", although sparse_adam_step is public: now its
    zeros in each param's dtype, and a step from them equals the class's. The class-only composites say so."""
    rng = np.random.default_rng()
    shapes = [(9, 3), (1,), (4, 2, 2)]
    p0 = [rng.standard_normal(s).astype(dtype) for s in shapes]
    st = fastopt.init_state("sparse_adam", [a.copy() for a in p0])
    assert list(st) == ["exp_avg", "exp_avg_sq"]
    for arrays in st.values():
        assert [(a.shape, a.dtype) for a in arrays] == [(a.shape, a.dtype) for a in p0]
        assert not any(a.any() for a in arrays)
    one = fastopt.init_state("sparse_adam", p0[0])
    assert one["exp_avg"].shape == p0[0].shape
    fs, ps = [a.copy() for a in p0], [a.copy() for a in p0]
    opt = fastopt.SparseAdam(ps, lr=0.01)
    for step in range(1, 4):
        grads = [random_grad(rng, s, dtype) for s in shapes]
        opt.step(grads)
        sparse_adam_step(fs, grads, st["exp_avg"], st["exp_avg_sq"], step=step, lr=0.01)
    for a, b in zip(fs, ps):
        assert a.tobytes() == b.tobytes()
    p = np.ones(4)
    for kwargs, exc, words in [(dict(state_dtype="int8"), ValueError, "state_dtype"),
                               (dict(kahan=True), ValueError, "kahan"), (dict(lr=-1.0), ValueError, "learning rate"),
                               (dict(foo=1), TypeError, "foo")]:
        with pytest.raises(exc, match=words):
            fastopt.init_state("sparse_adam", p, **kwargs)
    with pytest.raises(TypeError, match=r"params\[1\] must be a float16, bfloat16, float32 or float64 array"):
        fastopt.init_state("sparse_adam", [p, np.ones(3, np.int32)])
    for name in ("adafactor", "muon", "lbfgs"):
        with pytest.raises(ValueError, match=f"{name} has no functional step"):
            fastopt.init_state(name, p)


@pytest.mark.parametrize("tdtype", ["float16", "bfloat16"])
def test_16_bit_params_follow_torch(tdtype):
    """16-bit params and state: each operation rounds to the dtype, like torch's; a few steps stay within
    a couple of 16-bit ulps of torch."""
    torch_dtype = getattr(torch, tdtype)
    rng = np.random.default_rng(9)
    p0 = torch.from_numpy(rng.standard_normal((10, 4)).astype(np.float32)).to(torch_dtype)
    ref, mine = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    ro, mo = torch.optim.SparseAdam([ref], lr=0.05), fastopt.torch.SparseAdam([mine], lr=0.05)
    for _ in range(5):
        idx, vals = random_grad(rng, (10, 4), np.float32)
        g = torch.sparse_coo_tensor(torch.from_numpy(idx)[None], torch.from_numpy(vals).to(torch_dtype), (10, 4))
        ref.grad, mine.grad = g.clone(), g.clone()
        ro.step(), mo.step()
    assert mo.state[mine]["exp_avg"].dtype == torch_dtype
    ulp = 2 ** -10 if tdtype == "float16" else 2 ** -7
    torch.testing.assert_close(mine.float(), ref.float(), rtol=2 * ulp, atol=2 * ulp)
    assert not torch.equal(mine, p0)


# ---------------------------------------------------------------------------------------------------
# state dicts
# ---------------------------------------------------------------------------------------------------

def _to_torch_sd(sd):
    return {"state": {i: {k: (torch.from_numpy(v.copy()) if isinstance(v, np.ndarray) else v) for k, v in st.items()}
                      for i, st in sd["state"].items()},
            "param_groups": [dict(g) for g in sd["param_groups"]]}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_state_dict_interchange_with_torch(dtype):
    rng = np.random.default_rng(13)
    shapes = [(15, 3), (4,)]
    hp = dict(lr=0.02, betas=(0.8, 0.9))
    p0 = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [[random_grad(rng, s, dtype) if (i == 0 or k > 10) else None for i, s in enumerate(shapes)]
             for k in range(40)]

    def torch_grads(ts, gs):
        for t, g, s in zip(ts, gs, shapes):
            t.grad = None if g is None else sparse(g[0], g[1], s)

    # reference: torch all the way
    ts = [torch.tensor(a, requires_grad=True) for a in p0]
    ref = torch.optim.SparseAdam(ts, **hp)
    for gs in grads:
        torch_grads(ts, gs)
        ref.step()
    # torch for 20 steps, then the NumPy class, then torch again (and fastopt.torch for the middle part)
    ta = [torch.tensor(a, requires_grad=True) for a in p0]
    oa = torch.optim.SparseAdam(ta, **hp)
    for gs in grads[:5]:
        torch_grads(ta, gs)
        oa.step()
    sd = oa.state_dict()
    assert set(sd["state"]) == {0}  # param 1 had no gradient yet: no state, like torch
    ps = [t.detach().numpy().copy() for t in ta]
    np_opt = fastopt.SparseAdam(ps, lr=0.5)
    np_opt.load_state_dict(sd)
    assert np_opt.param_groups[0]["lr"] == 0.02 and np_opt.state[0]["step"] == 5
    for gs in grads[5:20]:
        np_opt.step(gs)
    tb = [torch.tensor(a, requires_grad=True) for a in ps]
    ob = fastopt.torch.SparseAdam(tb, lr=0.5)
    ob.load_state_dict(_to_torch_sd(np_opt.state_dict()))
    for gs in grads[20:30]:
        torch_grads(tb, gs)
        ob.step()
    tc = [t.detach().clone().requires_grad_() for t in tb]
    oc = torch.optim.SparseAdam(tc, **hp)
    oc.load_state_dict(ob.state_dict())
    for gs in grads[30:]:
        torch_grads(tc, gs)
        oc.step()
    for t_ref, t in zip(ts, tc):
        np.testing.assert_allclose(t.detach().numpy(), t_ref.detach().numpy(), **TOL[dtype])
    for i in range(2):
        compare_state({k: (v.numpy() if torch.is_tensor(v) else v) for k, v in oc.state_dict()["state"][i].items()},
                      ref.state_dict()["state"][i], dtype)
    # the NumPy class's own round trip: copies, not the live arrays
    sd2 = np_opt.state_dict()
    sd2["state"][0]["exp_avg"][...] = 123.0
    assert not np.any(np_opt.state[0]["exp_avg"] == 123.0)


def test_load_state_dict_checks_everything_first():
    p = np.zeros((5, 2), np.float32)
    opt = fastopt.SparseAdam([p])
    opt.step([(np.array([1]), np.ones((1, 2), np.float32))])
    good = opt.state_dict()
    before = snapshot([p, opt.state[0]["exp_avg"], opt.state[0]["exp_avg_sq"]])
    bad_shape = {"state": {0: {**good["state"][0], "exp_avg": np.zeros((4, 2), np.float32)}},
                 "param_groups": good["param_groups"]}
    with pytest.raises(ValueError, match=r"exp_avg'\] has shape \(4, 2\)"):
        opt.load_state_dict(bad_shape)
    bad_lr = {"state": good["state"], "param_groups": [{**good["param_groups"][0], "lr": -1.0}]}
    with pytest.raises(ValueError, match="Invalid learning rate: -1.0"):
        opt.load_state_dict(bad_lr)
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.state[0]["step"] == 1
    assert_same_bytes(before, [p, opt.state[0]["exp_avg"], opt.state[0]["exp_avg_sq"]])


# ---------------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, nothing written
# ---------------------------------------------------------------------------------------------------

BAD_GRADS = [
    ("out of range", lambda: (np.array([0, 6]), np.ones((2, 3), np.float32)), ValueError,
     r"grads\[1\] indices out of range: row index 6 .*\[0, 6\)"),
    ("negative", lambda: (np.array([-1, 2]), np.ones((2, 3), np.float32)), ValueError,
     r"grads\[1\] indices out of range: row index -1"),
    ("float indices", lambda: (np.array([0.0, 2.0]), np.ones((2, 3), np.float32)), TypeError,
     r"grads\[1\] indices must be an integer array, got dtype float64"),
    ("bool indices", lambda: (np.array([True, False]), np.ones((2, 3), np.float32)), TypeError,
     r"grads\[1\] indices must be an integer array, got dtype bool"),
    ("3-D indices", lambda: (np.zeros((1, 1, 2), np.int64), np.ones((2, 3), np.float32)), ValueError,
     r"grads\[1\] indices must be 1-D \(rows\) or 2-D"),
    ("values shape", lambda: (np.array([0, 2]), np.ones((2, 4), np.float32)), ValueError,
     r"grads\[1\] values have shape \(2, 4\), expected \(2, 3\)"),
    ("values count", lambda: (np.array([0, 2, 3]), np.ones((2, 3), np.float32)), ValueError,
     r"grads\[1\] values have shape \(2, 3\), expected \(3, 3\)"),
    ("values dtype", lambda: (np.array([0, 2]), np.ones((2, 3), np.float64)), TypeError,
     r"grads\[1\] values have dtype float64 but params\[1\] has dtype float32"),
    ("not a pair", lambda: np.ones((6, 3), np.float32), TypeError,
     r"grads\[1\] must be an \(indices, values\) pair or None"),
    ("ragged list", lambda: ([[0, 1], [0]], np.ones((2, 3), np.float32)), ValueError,
     r"grads\[1\] indices must be a rectangular list of integers"),
]


@pytest.mark.parametrize("case", BAD_GRADS, ids=[c[0] for c in BAD_GRADS])
def test_bad_gradient_raises_and_changes_nothing(case):
    _, make, exc, pattern = case
    rng = np.random.default_rng(17)
    p0, p1 = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32)
    opt = fastopt.SparseAdam([{"params": [p0]}, {"params": [p1], "lr": 0.1}])
    good = (np.array([1, 1, 3]), np.ones((3, 3), np.float32))
    opt.step([good, (np.array([5]), np.ones((1, 3), np.float32))])
    arrays = [p0, p1] + [opt.state[i][k] for i in (0, 1) for k in ("exp_avg", "exp_avg_sq")]
    before, steps = snapshot(arrays), [opt.state[i]["step"] for i in (0, 1)]
    with pytest.raises(exc, match=pattern):
        opt.step([good, make()])
    assert_same_bytes(before, arrays)
    assert [opt.state[i]["step"] for i in (0, 1)] == steps
    # the functional API: same checks, same names
    m, v = np.zeros_like(p0), np.zeros_like(p0)
    m1, v1 = np.zeros_like(p1), np.zeros_like(p1)
    before = snapshot([p0, p1, m, v, m1, v1])
    with pytest.raises(exc, match=pattern):
        sparse_adam_step([p0, p1], [good, make()], [m, m1], [v, v1], step=1)
    assert_same_bytes(before, [p0, p1, m, v, m1, v1])


def test_new_state_is_not_kept_when_the_step_fails():
    p0, p1 = np.zeros((3, 2)), np.zeros((3, 2))
    opt = fastopt.SparseAdam([p0, p1])
    with pytest.raises(ValueError, match=r"grads\[1\] indices out of range"):
        opt.step([(np.array([0]), np.ones((1, 2))), (np.array([3]), np.ones((1, 2)))])
    assert opt.state == {} and not p0.any()


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-0.1), "Invalid learning rate: -0.1"),
    (dict(lr=0.0), "Invalid learning rate: 0.0"),
    (dict(eps=0.0), "Invalid epsilon value: 0.0"),
    (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    (dict(betas=(0.9, -0.5)), "Invalid beta parameter at index 1: -0.5"),
])
def test_hyperparameter_errors_are_torchs(kwargs, message):
    for cls, param in ((torch.optim.SparseAdam, torch.zeros(2, requires_grad=True)),
                       (fastopt.torch.SparseAdam, torch.zeros(2, requires_grad=True)),
                       (fastopt.SparseAdam, np.zeros(2))):
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            cls([param], **kwargs)


def test_group_edited_to_a_bad_value_fails_the_step_and_changes_nothing():
    p = np.ones((3, 2), np.float32)
    opt = fastopt.SparseAdam([p])
    opt.param_groups[0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1: 1.5"):
        opt.step([(np.array([0]), np.ones((1, 2), np.float32))])
    assert opt.state == {} and np.all(p == 1)
    opt.param_groups[0]["betas"] = (0.9, 0.99)
    opt.step([(np.array([0]), np.ones((1, 2), np.float32))])
    assert opt.state[0]["step"] == 1 and p[0, 0] < 1 and p[1, 0] == 1


def test_params_must_be_float_contiguous_and_writable():
    with pytest.raises(TypeError, match=r"params\[0\] must be a float16, bfloat16, float32 or float64 array"):
        fastopt.SparseAdam([np.zeros(3, np.int32)])
    with pytest.raises(ValueError, match=r"params\[0\] must be C-contiguous"):
        fastopt.SparseAdam([np.zeros((4, 4))[:, ::2]])
    ro = np.zeros(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"params\[0\] is read-only"):
        fastopt.SparseAdam([ro])
    p = np.zeros(3)
    with pytest.raises(ValueError, match="shares memory with its param"):
        prepare_step(p, (np.array([0]), np.ones(1)), p, np.zeros(3), step=1)
    with pytest.raises(ValueError, match="Invalid step: 0"):
        sparse_adam_step(p, (np.array([0]), np.ones(1)), np.zeros(3), np.zeros(3), step=0)


def test_memory_shared_between_params_states_and_values_is_refused():
    """Two params overlapping in one buffer had their shared rows updated twice (only equal start pointers
    were refused); a grad's values inside a param were read after that param's rows were written."""
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2 ** 32))
    big = rng.standard_normal((6, 3)).astype(np.float32)
    idx = np.array([0, 1, 2, 3])
    vals = rng.standard_normal((4, 3)).astype(np.float32)
    raw = big.tobytes()
    for params, grads, words in [
            ([big[0:4], big[2:6]], [(idx, vals)] * 2, r"params\[0\] and params\[1\] share memory"),
            ([big[0:4], big[0:4]], [(idx, vals)] * 2, r"params\[0\] and params\[1\] share memory"),
            ([big[0:4], big[4:6]], [(idx, big[1:5]), None], r"params\[0\] and grads\[0\] values share memory"),
            ([big[:2], big[2:4]], [(np.array([0, 1]), big[3:5]), (np.array([1]), vals[:1])],
             r"params\[1\] and grads\[0\] values share memory")]:
        ms, vs = ([np.zeros(p.shape, np.float32) for p in params] for _ in range(2))
        with pytest.raises(ValueError, match=words):
            sparse_adam_step(params, grads, ms, vs, step=1, lr=0.1)
        assert big.tobytes() == raw and not any(a.any() for a in ms + vs)
    # the same values read for two params, and state arrays apart: fine
    ms, vs = ([np.zeros((2, 3), np.float32) for _ in range(2)] for _ in range(2))
    sparse_adam_step([big[0:2], big[2:4]], [(np.array([0, 1]), vals[:2])] * 2, ms, vs, step=1, lr=0.1)
    assert big.tobytes() != raw
    # the class: two groups of overlapping views, refused at the step
    p = np.zeros((5, 2), np.float32)
    opt = fastopt.SparseAdam([{"params": [p[0:3]]}, {"params": [p[2:5]], "lr": 0.1}])
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] share memory"):
        opt.step([(np.array([2]), np.ones((1, 2), np.float32))] * 2)
    assert not p.any() and opt.state == {}


def test_a_gradients_values_inside_another_groups_param_are_refused():
    """A gradient's values that are another group's param: within a group refused, across groups accepted and
    read after that param had been updated (silently another result)."""
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2 ** 32))
    p0, p1 = rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal((3, 3)).astype(np.float32)
    opt = fastopt.SparseAdam([{"params": [p0]}, {"params": [p1], "lr": 0.01}], lr=0.1)
    one = (np.array([0]), np.ones((1, 3), np.float32))
    opt.step([one, one])
    raw, state = (p0.tobytes(), p1.tobytes()), copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"params\[0\] and grads\[1\] values share memory"):
        opt.step([(np.array([0]), np.full((1, 3), 5.0, np.float32)), (np.array([0]), p0[:1])])
    assert (p0.tobytes(), p1.tobytes()) == raw
    after = opt.state_dict()
    assert all(after["state"][i][k].tobytes() == state["state"][i][k].tobytes() and
               after["state"][i]["step"] == state["state"][i]["step"] == 1
               for i in (0, 1) for k in ("exp_avg", "exp_avg_sq"))
    a = torch.zeros(4, 2, requires_grad=True)
    b = torch.zeros(4, 2, requires_grad=True)
    topt = fastopt.torch.SparseAdam([{"params": [a]}, {"params": [b], "lr": 0.1}])
    a.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 2), (4, 2))
    b.grad = torch.sparse_coo_tensor(torch.tensor([[0]]), a.detach()[1:2], (4, 2), is_coalesced=True)
    assert b.grad.coalesce().values().data_ptr() == a.detach()[1:2].data_ptr()  # the values are a's row 1
    with pytest.raises(ValueError, match="share memory"):
        topt.step()
    assert len(topt.state) == 0 and not a.detach().any() and not b.detach().any()


@pytest.mark.parametrize("layout", ["two groups", "one group", "values"])
def test_torch_strided_params_sharing_memory_are_refused(layout):
    """A strided param is stepped through a contiguous copy, which shares memory with nothing: the check sees
    the params' own memory too (an update of one of two overlapping params was lost before, silently)."""
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2 ** 32))
    base = torch.tensor(rng.standard_normal((5, 4)), dtype=torch.float32)
    a = base.t().detach().requires_grad_()  # (4, 5), strided: its column 0 is b
    b = base[:, 0].detach().requires_grad_() if layout != "values" else torch.zeros(5, requires_grad=True)
    groups = [{"params": [a, b]}] if layout == "one group" else [{"params": [a]}, {"params": [b], "lr": 0.01}]
    opt = fastopt.torch.SparseAdam(groups, lr=0.1)
    a.grad = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.ones(2, 5), (4, 5))
    values = base.t()[0:1, 0:1].reshape(1) if layout == "values" else torch.ones(1)  # a's element (0, 0)
    b.grad = torch.sparse_coo_tensor(torch.tensor([[3]]), values, (5,), is_coalesced=True)
    before = base.clone()
    with pytest.raises(ValueError, match=r"params\[0\] and (params\[1\]|grad values of params\[1\]) share"):
        opt.step()
    assert torch.equal(base, before) and len(opt.state) == 0
    b2 = torch.zeros(5, requires_grad=True)  # the same strided a beside a param of its own: steps as torch's
    a2 = a.detach().clone().t().contiguous().t().requires_grad_()
    opt, ref = fastopt.torch.SparseAdam([a, b2], lr=0.1), torch.optim.SparseAdam([a2, b2.detach().clone().requires_grad_()], lr=0.1)
    a.grad = a2.grad = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.ones(2, 5), (4, 5))
    b2.grad = ref.param_groups[0]["params"][1].grad = torch.sparse_coo_tensor(torch.tensor([[3]]), torch.ones(1), (5,))
    opt.step()
    ref.step()
    assert torch.equal(a.detach(), a2.detach()) and not a.is_contiguous()


# ---------------------------------------------------------------------------------------------------
# fastopt.torch specifics
# ---------------------------------------------------------------------------------------------------

def test_torch_front_end_errors_and_nothing_written():
    a = torch.zeros(4, 2, requires_grad=True)
    b = torch.zeros(4, 2, requires_grad=True)
    opt = fastopt.torch.SparseAdam([{"params": [a]}, {"params": [b], "lr": 0.1}])
    a.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 2), (4, 2))
    b.grad = torch.ones(4, 2)
    with pytest.raises(RuntimeError, match="SparseAdam does not support dense gradients, please consider Adam"):
        opt.step()
    assert len(opt.state) == 0 and not a.detach().any()  # torch would have updated a already
    # an index out of range in a tensor built without invariant checks: caught before any write
    b.grad = torch.sparse_coo_tensor(torch.tensor([[9]]), torch.ones(1, 2), (4, 2), check_invariants=False)
    with pytest.raises(ValueError, match=r"grads\[1\] indices out of range: index in dim 0 9 for params\[1\]"):
        opt.step()
    assert len(opt.state) == 0 and not a.detach().any()
    with pytest.raises(ValueError, match=r"Sparse params at indices \[\[0, 0\]\]"):
        fastopt.torch.SparseAdam([torch.zeros(3).to_sparse()])
    with pytest.raises(ValueError, match=r"Complex params at indices \[\[0, 0\]\]"):
        fastopt.torch.SparseAdam([torch.zeros(3, dtype=torch.complex64)])
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        fastopt.torch.SparseAdam([a], lr=torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_torch_embedding_training_scheduler_and_versions(tensor_lr):
    """nn.Embedding(sparse=True) trained with a closure and a StepLR schedule: fastopt.torch.SparseAdam and
    torch.optim.SparseAdam end on the same weights; in-place updates bump autograd's version counter.
    A tensor lr (float32 here): the step size is computed in float32, as torch computes it (it was computed in
    float64 from the tensor's value, 1e-7 apart)."""
    rel = 1e-9
    torch.manual_seed(0)
    models = [torch.nn.Embedding(50, 6, sparse=True, dtype=torch.float64) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.SparseAdam(models[0].parameters(), lr=torch.tensor(0.05) if tensor_lr else 0.05),
            fastopt.torch.SparseAdam(models[1].parameters(), lr=torch.tensor(0.05) if tensor_lr else 0.05)]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=10, gamma=0.5) for o in opts]
    gen = torch.Generator().manual_seed(1)
    for step in range(30):
        tokens = torch.randint(0, 50, (16,), generator=gen)
        target = torch.randn(16, 6, generator=gen, dtype=torch.float64)
        losses = []
        for model, opt, sched in zip(models, opts, scheds):
            def closure(model=model, opt=opt):
                opt.zero_grad()
                loss = ((model(tokens) - target) ** 2).sum()
                loss.backward()
                return loss
            losses.append(opt.step(closure).item())
            sched.step()
        assert losses[0] == pytest.approx(losses[1], rel=rel)
    torch.testing.assert_close(models[1].weight, models[0].weight, rtol=rel, atol=rel * 1e-3)
    assert float(opts[1].param_groups[0]["lr"]) == pytest.approx(0.05 * 0.5 ** 3)
    w = models[1].weight
    out = (w * w).sum()  # saves w for backward
    version = w._version
    w.grad = torch.sparse_coo_tensor(torch.tensor([[3]]), torch.ones(1, 6, dtype=torch.float64), (50, 6))
    opts[1].step()
    assert w._version == version + 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


@pytest.mark.parametrize("layout", ["transposed", "0-d"])
def test_torch_other_layouts_match_torch(layout):
    """A transposed (non-contiguous) weight is updated through contiguous copies and written back in place; a
    0-d param takes (0, nnz) COO indices. Both match torch, and the version counter moves once per step."""
    gen = torch.Generator().manual_seed(2)
    if layout == "transposed":
        shape = (5, 3)
        base = torch.randn(3, 5, generator=gen, dtype=torch.float64)
        ref, mine = base.clone().t().requires_grad_(), base.clone().t().requires_grad_()
    else:
        shape = ()
        base = torch.randn((), generator=gen, dtype=torch.float64)
        ref, mine = base.clone().requires_grad_(), base.clone().requires_grad_()
    assert mine.is_contiguous() == (not shape)
    ro, mo = torch.optim.SparseAdam([ref], lr=0.1), fastopt.torch.SparseAdam([mine], lr=0.1)
    ptr = mine.data_ptr()
    for _ in range(6):
        k = 2 if shape else 0
        nnz = 4
        idx = torch.stack([torch.randint(0, n, (nnz,), generator=gen) for n in shape]) if shape else \
            torch.zeros(0, nnz, dtype=torch.long)
        g = torch.sparse_coo_tensor(idx, torch.randn((nnz, *shape[k:]), generator=gen, dtype=torch.float64), shape)
        ref.grad, mine.grad = g.clone(), g.clone()
        version = mine._version
        ro.step(), mo.step()
        assert mine._version == version + 1
    assert mine.data_ptr() == ptr and mine.is_contiguous() == (not shape)
    torch.testing.assert_close(mine, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mo.state[mine]["exp_avg_sq"], ro.state[ref]["exp_avg_sq"], rtol=1e-9, atol=1e-12)


def test_spec_signature_and_exports():
    import inspect

    spec = fastopt.specs.COMPOSITE["sparse_adam"]
    assert spec.class_name == spec.torch_class == "SparseAdam" and spec.module == "sparse_adam"
    torch_sig = inspect.signature(torch.optim.SparseAdam.__init__)
    extras = ["clip_grad_norm", "skip_nonfinite"]  # fastopt's, keyword-only (tests/test_composite_guard.py)
    assert list(inspect.signature(fastopt.torch.SparseAdam.__init__).parameters) == list(torch_sig.parameters) + extras
    assert list(inspect.signature(fastopt.SparseAdam.__init__).parameters) == list(torch_sig.parameters) + extras
    defaults = {k: p.default for k, p in torch_sig.parameters.items() if p.default is not p.empty}
    assert spec.defaults == {"lr": defaults["lr"], "beta1": defaults["betas"][0], "beta2": defaults["betas"][1],
                               "eps": defaults["eps"], "maximize": defaults["maximize"]}
    assert fastopt.SparseAdam is sparse_adam_module.SparseAdam and fastopt.sparse_adam_step is sparse_adam_step
    assert issubclass(fastopt.torch.SparseAdam, torch.optim.Optimizer)
    assert "SparseAdam" in fastopt.__all__ and "SparseAdam" in fastopt.torch.__all__
    opt = fastopt.SparseAdam([np.zeros(2)], lr=0.1)
    assert opt.zero_grad() is None and "lr: 0.1" in repr(opt)
    assert opt.state_dict() == {"state": {}, "param_groups": [
        {"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "maximize": False, "params": [0]}]}
    assert torch.optim.SparseAdam([torch.zeros(2)], lr=0.1).state_dict() == opt.state_dict()


def test_torch_step_hooks_and_add_param_group():
    a, b = torch.zeros(3, 2, requires_grad=True), torch.zeros(4, requires_grad=True)
    opt = fastopt.torch.SparseAdam([a], lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.add_param_group({"params": [b], "betas": (0.5, 0.6)})
    assert opt.param_groups[1]["lr"] == 0.1 and opt.param_groups[1]["betas"] == (0.5, 0.6)
    a.grad = torch.sparse_coo_tensor(torch.tensor([[2]]), torch.ones(1, 2), (3, 2))
    b.grad = torch.sparse_coo_tensor(torch.tensor([[0, 0]]), torch.ones(2), (4,))
    opt.step()
    assert calls == ["pre", "post"]
    # b's first row: g = 2 (the repeat summed), m = 0.5 * 2, v = 0.4 * 4; step 1: p -= lr * m/sqrt(v) * sqrt(0.4)/0.5
    expected = -0.1 * (1.0 / (1.6 ** 0.5 + 1e-8)) * 0.4 ** 0.5 / 0.5
    assert b.detach()[0].item() == pytest.approx(expected, rel=1e-6) and not b.detach()[1:].any()
    assert a.detach()[2].tolist() == pytest.approx([-0.1, -0.1], rel=1e-6) and not a.detach()[:2].any()
