"""Issue 13's precision modes on the CPU, every registry optimizer: state_dtype= (16-bit optimizer state),
kahan=True (a 16-bit Kahan compensation buffer) and stochastic_rounding=True (DESIGN.md, "Precision").

The oracle is the NumPy reference run the way the kernels run it (the numpy backend: fastopt.precision's
step_rounded: every 16-bit array widened to float32, the float32 reference, states stored to nearest even,
the new param stored to nearest even, by precision.kahan_store or by to_bf16_sr/to_fp16_sr with
random_bits(random_key(seed, step), index)). The compiled kernels must equal it bit for bit: params, states
and the compensation, after many steps, on arrays over several chunks and staging blocks. LAMB's params are
the exception of tests/test_low_precision.py (its trust ratio's norms are summed in another order than
np.dot): within 2 ulp of the 16-bit type on at most 1% of the elements; its states bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt import precision
from fastopt.backends import dispatch
from fastopt.specs import REGISTRY

from conftest import all_cases, snapshot

ml_dtypes = pytest.importorskip("ml_dtypes")
pytestmark = pytest.mark.skipif(not dispatch.cython_available(), reason="compiled extension not built")

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
SPECS = list(REGISTRY.values())

# (params, grads, state) of every layout the modes add: 16-bit state of float32 params; 16-bit params with
# state in their own dtype (grads in that dtype or float32); 16-bit params with float32 state (for the modes)
STATE_LAYOUTS = [(F32, F32, BF16), (F32, F32, F16), (BF16, BF16, BF16), (BF16, F32, BF16), (F16, F16, F16),
                 (F16, F32, F16)]
PARAM_LAYOUTS = [(BF16, BF16, F32), (BF16, F32, F32), (F16, F16, F32), (BF16, BF16, BF16), (F16, F32, F16)]
SHAPES = [(1,), (0,), (3, 7), (1037,), (40000,)]  # 40000: two chunks, several staging blocks, a ragged tail
STEPS = 8


def name(d):
    return np.dtype(d).name


def layout_id(layout):
    return "-".join(name(d) for d in layout)


def bits(a):
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def problem(spec, hp, layout, rng, shapes=SHAPES, kahan=False):
    pd, gd, sd = layout
    params = [rng.standard_normal(s).astype(pd) for s in shapes]
    options = {k: v for k, v in hp.items() if k in spec.state_options}
    states = fastopt.init_state(spec.name, params, state_dtype=name(sd), kahan=kahan, **options)
    for k, arrays in states.items():
        want = pd if k == "kahan_comp" else sd
        assert all(a.dtype == want for a in arrays), k
        if k == "momentum_buffer" or (spec.name == "lion" and k == "exp_avg"):  # any start is consistent
            for a in arrays:
                a[...] = (0.1 * rng.standard_normal(a.shape)).astype(sd)
    grads = [[rng.standard_normal(s).astype(gd) for s in shapes] for _ in range(STEPS)]
    return params, states, grads


def clone(params, states):
    return [p.copy() for p in params], {k: [a.copy() for a in v] for k, v in states.items()}


def run(spec, hp, params, states, grads_per_step, backend, **mode):
    fn = getattr(fastopt, spec.function_name)
    for t, grads in enumerate(grads_per_step, start=1):
        kw = dict(hp, **mode)
        if spec.uses_step:
            kw["step"] = t
        elif mode.get("stochastic_rounding"):
            kw["seed"] = mode.get("seed", 0) * 1000 + t  # functions without a step: a new seed per call
        fn(params, grads, **states, **kw, backend=backend)


def assert_same(spec, got_p, got_s, want_p, want_s):
    for k in want_s:
        for i, (a, b) in enumerate(zip(got_s[k], want_s[k])):
            if spec.norms_per_tensor and k == "kahan_comp":  # follows the params (see the module docstring)
                continue
            np.testing.assert_array_equal(bits(a), bits(b), err_msg=f"{k}[{i}]")
    for i, (a, b) in enumerate(zip(got_p, want_p)):
        if spec.norms_per_tensor and a.dtype.itemsize == 2:
            ia, ib = bits(a).astype(np.int32), bits(b).astype(np.int32)
            oa, ob = np.where(ia & 0x8000, 0x8000 - ia, ia), np.where(ib & 0x8000, 0x8000 - ib, ib)
            diff = np.abs(oa - ob)
            assert diff.size == 0 or (diff.max() <= 2 and (diff > 0).mean() <= 0.01 + 1 / diff.size), f"params[{i}]"
        elif spec.norms_per_tensor:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"params[{i}]")
        else:
            np.testing.assert_array_equal(bits(a), bits(b), err_msg=f"params[{i}]")


def compare(spec, hp, layout, rng, shapes=SHAPES, **mode):
    params, states, grads = problem(spec, hp, layout, rng, shapes, kahan=mode.pop("kahan", False))
    kp, ks = clone(params, states)
    rp, rs = clone(params, states)
    run(spec, hp, kp, ks, grads, "cython", **mode)
    run(spec, hp, rp, rs, grads, "numpy", **mode)
    assert_same(spec, kp, ks, rp, rs)
    assert any(not np.array_equal(bits(a), bits(b)) for a, b in zip(kp, params) if a.size)  # it moved
    return kp, ks


# ---- state_dtype= ----

@pytest.mark.parametrize("layout", STATE_LAYOUTS, ids=layout_id)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_state_dtype_every_optimizer_matches_reference(spec, layout, rng):
    hp = dict(spec.defaults, lr=0.01)
    compare(spec, hp, layout, rng)


CASES = list(all_cases())


@pytest.mark.parametrize("case", range(len(CASES)), ids=[c.id for c in CASES])
def test_state_dtype_every_option(case, rng):
    """Every option combination of every optimizer, each on one of the 16-bit state layouts (in turn)."""
    spec, hp = CASES[case].values
    compare(spec, hp, STATE_LAYOUTS[case % len(STATE_LAYOUTS)], rng, shapes=[(5,), (1037,)])


def test_state_dtype_bytes_and_defaults(rng):
    p32 = rng.standard_normal(10).astype(F32)
    pb = p32.astype(BF16)
    assert fastopt.init_state("adam", pb)["exp_avg"].dtype == F32  # the default for 16-bit params
    assert fastopt.init_state("adam", p32)["exp_avg"].dtype == F32
    assert fastopt.init_state("adam", pb, state_dtype="bfloat16")["exp_avg_sq"].dtype == BF16
    assert fastopt.init_state("adam", pb, state_dtype=BF16)["exp_avg_sq"].dtype == BF16  # the params' own dtype
    assert fastopt.init_state("adam", p32, state_dtype="float16")["exp_avg"].dtype == F16
    # a state that starts as the param (schedule-free's z) or at a value (Rprop's step_size = lr): rounded
    z = fastopt.init_state("schedule_free_sgd", p32, state_dtype="bfloat16")["z"]
    np.testing.assert_array_equal(bits(z), precision.to_bf16(p32))
    st = fastopt.init_state("rprop", p32, state_dtype="float16", lr=0.1)["step_size"]
    assert np.all(st == np.float16(0.1))


@pytest.mark.parametrize("bad,param,exc,message", [
    ("float16", BF16, ValueError, r"Invalid state_dtype: 'float16' for params of dtype bfloat16 \(its state may be "
                                  r"float32 or bfloat16\)"),
    ("bfloat16", np.float64, ValueError, r"Invalid state_dtype: 'bfloat16' for params of dtype float64"),
    ("int8x", F32, TypeError, r"state_dtype must be one of float32, bfloat16, float16, int8 or the params' dtype, "
                              r"got 'int8x'"),
    (np.float64, F32, ValueError, r"Invalid state_dtype: <class 'numpy.float64'> for params of dtype float32 \(its "
                                  r"state may be float32, bfloat16 or float16\)"),
])
def test_init_state_refuses_bad_state_dtype(bad, param, exc, message):
    with pytest.raises(exc, match=message):
        fastopt.init_state("adam", np.zeros(3, param), state_dtype=bad)


# ---- kahan=True ----

@pytest.mark.parametrize("layout", PARAM_LAYOUTS, ids=layout_id)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_kahan_every_optimizer_matches_reference(spec, layout, rng):
    hp = dict(spec.defaults, lr=0.01)
    _, states = compare(spec, hp, layout, rng, kahan=True)
    if not spec.two_phase:
        assert any(np.any(c != 0) for c in states["kahan_comp"])  # the compensation is in use


# ---- stochastic_rounding=True ----

@pytest.mark.parametrize("layout", PARAM_LAYOUTS, ids=layout_id)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_stochastic_rounding_every_optimizer_matches_reference(spec, layout, rng):
    hp = dict(spec.defaults, lr=0.01)
    compare(spec, hp, layout, rng, stochastic_rounding=True, seed=int(rng.integers(2 ** 40)))


@pytest.mark.parametrize("dtype", [BF16, F16], ids=name)
def test_stochastic_rounding_bits_do_not_depend_on_threads_or_grouping(dtype, rng):
    """The same bits for one thread and two, and for a tensor updated whole or as two shards that pass
    their offset (index_offset); another seed or step gives other bits."""
    from fastopt.kernels.cpu import _cpu_fast
    n = 3 * (1 << 15) + 77  # above the parallel threshold: several chunks
    p0 = rng.standard_normal(n).astype(dtype)
    g = rng.standard_normal(n).astype(dtype)
    st0 = fastopt.init_state("adamw", p0)

    def step(threads, split=None, seed=5, t=3):
        p, st = p0.copy(), {k: v.copy() for k, v in st0.items()}
        before = _cpu_fast.get_num_threads()
        _cpu_fast.set_num_threads(threads)
        try:
            if split is None:
                fastopt.adamw_step(p, g, **st, step=t, lr=0.01, stochastic_rounding=True, seed=seed)
            else:
                for lo, hi in ((0, split), (split, n)):
                    fastopt.adamw_step(p[lo:hi], g[lo:hi], st["exp_avg"][lo:hi], st["exp_avg_sq"][lo:hi], step=t,
                                       lr=0.01, stochastic_rounding=True, seed=seed, index_offset=lo)
        finally:
            _cpu_fast.set_num_threads(before)
        return bits(p).copy()

    whole = step(2)
    np.testing.assert_array_equal(step(1), whole)
    np.testing.assert_array_equal(step(2, split=40001), whole)
    assert not np.array_equal(step(2, seed=6), whole)
    assert not np.array_equal(step(2, t=4), whole)


def test_stochastic_rounding_is_unbiased(rng):
    """Rounding 1 + x/4 ulp (bfloat16) stochastically gives 1 + ulp with probability x/4."""
    n = 200_000
    ulp = 2.0 ** -7
    p = np.ones(n, BF16)
    g = np.full(n, -0.25 * ulp / 0.5, np.float32)  # SGD step lr * g = 0.25 ulp up
    fastopt.sgd_step(p, g, lr=0.5, stochastic_rounding=True, seed=int(rng.integers(2 ** 32)))
    up = np.mean(p.astype(np.float32) > 1)
    assert abs(up - 0.25) < 0.01, up
    assert set(np.unique(p.astype(np.float32))) == {1.0, 1.0 + ulp}


# ---- bad input: a clear error naming the argument, nothing written ----

def _adam_problem(rng, pd=BF16, sd=F32, kahan=False):
    p = rng.standard_normal(9).astype(pd)
    g = rng.standard_normal(9).astype(pd)
    st = fastopt.init_state("adam", p, state_dtype=name(sd), kahan=kahan)
    return p, g, st


@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_bad_modes_raise_and_write_nothing(backend, rng):
    def expect(exc, message, p, g, st, **kw):
        before = snapshot(p, g, st)
        with pytest.raises(exc, match=message):
            fastopt.adam_step(p, g, **st, step=1, lr=0.1, backend=backend, **kw)
        assert snapshot(p, g, st) == before

    p, g, st = _adam_problem(rng, kahan=True)
    expect(ValueError, r"kahan and stochastic_rounding are mutually exclusive", p, g, st, stochastic_rounding=True)
    p, g, st = _adam_problem(rng, pd=F32)
    expect(ValueError, r"stochastic_rounding=True is for float16 or bfloat16 params; these are float32", p, g, st,
           stochastic_rounding=True)
    expect(TypeError, r"stochastic_rounding must be a bool, got 1", p, g, st, stochastic_rounding=1)
    p, g, st = _adam_problem(rng)
    expect(TypeError, r"seed must be an int, got 1.5", p, g, st, stochastic_rounding=True, seed=1.5)
    expect(ValueError, r"Invalid seed: -1", p, g, st, stochastic_rounding=True, seed=-1)
    expect(ValueError, r"Invalid index_offset: -3", p, g, st, stochastic_rounding=True, index_offset=-3)
    # a compensation for float32 params, of the wrong dtype, of the wrong shape
    p, g, st = _adam_problem(rng, pd=F32)
    expect(TypeError, r"kahan_comp: a Kahan compensation \(kahan=True\) is for float16 or bfloat16 params, but "
                      r"params has dtype float32", p, g, st, kahan_comp=np.zeros(9, F32))
    p, g, st = _adam_problem(rng)
    expect(TypeError, r"kahan_comp has dtype float32, expected bfloat16 \(the Kahan compensation has the dtype of "
                      r"params\)", p, g, st, kahan_comp=np.zeros(9, F32))
    expect(ValueError, r"kahan_comp has shape \(8,\), expected \(9,\)", p, g, st, kahan_comp=np.zeros(8, BF16))
    expect(ValueError, r"kahan_comp shares memory with params|params shares memory with kahan_comp", p, g, st,
           kahan_comp=p)
    # the states of one call share one dtype; a state dtype the params do not take
    p, g, st = _adam_problem(rng, sd=BF16)
    st["exp_avg_sq"] = st["exp_avg_sq"].astype(F32)
    expect(TypeError, r"exp_avg_sq has dtype float32, expected bfloat16 \(the dtype of exp_avg: the states of one "
                      r"call have one dtype\)", p, g, st)
    p, g, st = _adam_problem(rng, sd=F32)
    st = {k: v.astype(F16) for k, v in st.items()}
    expect(TypeError, r"exp_avg has dtype float16, expected float32 or bfloat16 \(the state of params, a bfloat16 "
                      r"param; see fastopt.init_state's state_dtype\)", p, g, st)


def test_init_state_kahan_refuses_float32():
    with pytest.raises(ValueError, match=r"kahan=True is for float16 or bfloat16 params .*params\[0\] has dtype float32"):
        fastopt.init_state("adam", [np.zeros(3, np.float32)], kahan=True)
    st = fastopt.init_state("adam", [np.zeros(3, BF16)], kahan=True)
    assert st["kahan_comp"][0].dtype == BF16 and not np.any(st["kahan_comp"][0].astype(np.float32))


# ---- the classes: the same options, the same bits as the functional calls ----

@pytest.mark.parametrize("mode", [dict(state_dtype="bfloat16"), dict(kahan=True), dict(stochastic_rounding=True, seed=7),
                                  dict(state_dtype="bfloat16", kahan=True)], ids=lambda m: ",".join(m))
@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_class_equals_functional_calls(mode, backend, rng):
    """Two groups (one of bf16 params, one of float16 and bfloat16 params with float32 grads), 6
    steps: the class's params, states and compensation equal one functional call per param with the
    group's step."""
    shapes = [(5, 3), (1037,), (2,)]
    dtypes = (BF16, BF16, BF16) if "state_dtype" in mode else (BF16, F16, BF16)  # bfloat16 state: bf16 params
    params = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]
    groups = [{"params": [params[0]]}, {"params": [params[1], params[2]], "lr": 0.02}]
    opt = fastopt.AdamW(groups, lr=0.01, backend=backend, **mode)
    ref = [p.copy() for p in params]
    options = {k: mode[k] for k in ("state_dtype", "kahan") if k in mode}
    states = [fastopt.init_state("adamw", [r], **options) for r in ref]
    for t in range(1, 7):
        grads = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, (dtypes[0], F32, F32))]
        opt.step(grads)
        for i, (r, g, st) in enumerate(zip(ref, grads, states)):
            rounding = {k: mode[k] for k in ("stochastic_rounding", "seed") if k in mode}
            fastopt.adamw_step([r], [g], **st, step=t,
                               lr=0.01 if i == 0 else 0.02, **rounding, backend=backend)
    for i, (p, r, st) in enumerate(zip(params, ref, states)):
        np.testing.assert_array_equal(bits(p), bits(r), err_msg=f"params[{i}]")
        live = opt.state_arrays(i)
        assert set(live) == set(st)
        for k in st:
            np.testing.assert_array_equal(bits(live[k]), bits(st[k][0]), err_msg=f"{k} of param {i}")


def test_class_refuses_modes_that_do_not_fit(rng):
    p32 = [rng.standard_normal(3).astype(F32)]
    with pytest.raises(ValueError, match=r"kahan=True is for float16 or bfloat16 params .*params\[0\] has dtype float32"):
        fastopt.Adam(p32, kahan=True)
    with pytest.raises(ValueError, match=r"stochastic_rounding=True is for float16 or bfloat16 params; params\[0\] has "
                                         r"dtype float32"):
        fastopt.Adam(p32, stochastic_rounding=True)
    with pytest.raises(ValueError, match=r"kahan and stochastic_rounding are mutually exclusive"):
        fastopt.Adam([p32[0].astype(BF16)], kahan=True, stochastic_rounding=True)
    with pytest.raises(ValueError, match=r"Invalid state_dtype: 'float16' for params\[0\] of dtype bfloat16"):
        fastopt.Adam([p32[0].astype(BF16)], state_dtype="float16")
    with pytest.raises(TypeError, match=r"seed must be an int, got 'x'"):
        fastopt.Adam([p32[0].astype(BF16)], stochastic_rounding=True, seed="x")
    opt = fastopt.Adam([p32[0].astype(BF16)], kahan=True)  # a float32 group added later: refused, nothing kept
    with pytest.raises(ValueError, match=r"kahan=True is for float16 or bfloat16 params .*; params\[1\] has dtype float32"):
        opt.add_param_group({"params": [np.zeros(2, F32)]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("mode", [dict(state_dtype="bfloat16", kahan=True), dict(stochastic_rounding=True, seed=3)],
                         ids=lambda m: ",".join(m))
def test_state_dict_and_checkpoint_round_trip(mode, tmp_path, rng):
    """state_dict() / load_state_dict() and fastopt.save / load carry 16-bit state and the compensation:
    a resumed run equals the uninterrupted one bit for bit; the torch state dict has no kahan_comp."""
    shapes = [(4, 3), (300,)]
    start = [rng.standard_normal(s).astype(BF16) for s in shapes]
    grads = [[rng.standard_normal(s).astype(BF16) for s in shapes] for _ in range(6)]

    def fresh():
        return [p.copy() for p in start]
    a_params = fresh()
    a = fastopt.Adam(a_params, lr=0.01, **mode)
    for g in grads:
        a.step(g)
    b_params = fresh()
    b = fastopt.Adam(b_params, lr=0.01, **mode)
    for g in grads[:3]:
        b.step(g)
    sd = b.state_dict()
    if mode.get("kahan"):
        assert sd["state"][0]["kahan_comp"].dtype == BF16 and sd["state"][1]["exp_avg"].dtype == BF16
    fastopt.save(tmp_path / "ck.npz", b)
    c_params = fresh()
    c = fastopt.Adam(c_params, lr=0.01, **mode)
    c.load_state_dict(sd)
    for target, saved in zip(c_params, b_params):
        target[...] = saved
    d_params = fresh()
    d = fastopt.Adam(d_params, lr=0.01, **mode)
    fastopt.load(tmp_path / "ck.npz", d)
    for g in grads[3:]:
        c.step(g)
        d.step(g)
    for x, y, z in zip(a_params, c_params, d_params):
        np.testing.assert_array_equal(bits(x), bits(y))
        np.testing.assert_array_equal(bits(x), bits(z))
    for i in range(2):
        for k, v in a.state_arrays(i).items():
            np.testing.assert_array_equal(bits(v), bits(d.state_arrays(i)[k]), err_msg=k)
    pytest.importorskip("torch")
    tsd = a.torch_state_dict()
    assert "kahan_comp" not in tsd["state"][0] and str(tsd["state"][0]["exp_avg"].dtype) == "torch.float32"


@pytest.mark.parametrize("param_dtype, saved, loaded", [(BF16, "float32", "bfloat16"), (BF16, "bfloat16", "float32"),
                                                        (F16, "float32", "float16"), (F16, "float16", "float32")])
def test_state_of_another_state_dtype_loads_converted(param_dtype, saved, loaded, tmp_path, rng):
    """A state dict or checkpoint saved with float32 state loads into an optimizer with 16-bit state and the
    other way round, rounded to nearest even as torch's cast (fastopt.torch and torch state dicts did; the NumPy
    classes refused it while converting to and from 8-bit state). float64 state stays refused."""
    shapes = [(4, 3), (301,)]
    start = [rng.standard_normal(s).astype(param_dtype) for s in shapes]
    grads = [[rng.standard_normal(s).astype(param_dtype) for s in shapes] for _ in range(4)]
    source = fastopt.Adam([p.copy() for p in start], lr=0.01, state_dtype=saved, weight_decay=0.1)
    for g in grads[:2]:
        source.step(g)
    sd = source.state_dict()
    fastopt.save(tmp_path / "ck.npz", source)
    results = []
    older = dict(sd, fastopt={k: v for k, v in sd["fastopt"].items() if k != "state_dtype"})  # no declaration
    for load in (lambda opt: opt.load_state_dict(sd), lambda opt: fastopt.load(tmp_path / "ck.npz", opt),
                 lambda opt: opt.load_state_dict(older)):
        params = [p.copy() for p in source.params]
        opt = fastopt.Adam(params, lr=0.5, state_dtype=loaded)
        load(opt)
        for i in range(2):
            for k, v in opt.state_arrays(i).items():
                assert v.dtype == np.dtype(loaded)
                np.testing.assert_array_equal(bits(v), bits(sd["state"][i][k].astype(loaded)), err_msg=k)
        for g in grads[2:]:
            opt.step(g)
        results.append([bits(p) for p in params])
    # the same as the converted state given by hand
    by_hand = fastopt.Adam([p.copy() for p in source.params], lr=0.5, state_dtype=loaded)
    by_hand.load_state_dict(dict(sd, state={i: {k: v.astype(loaded) if k != "step" else v for k, v in st.items()}
                                            for i, st in sd["state"].items()}))
    for g in grads[2:]:
        by_hand.step(g)
    for result in results:
        for x, y in zip(result, by_hand.params):
            np.testing.assert_array_equal(x, bits(y))
    wide = dict(sd, state={i: {k: v.astype(np.float64) if k != "step" else v for k, v in st.items()}
                           for i, st in sd["state"].items()})
    with pytest.raises(fastopt.CheckpointError, match="has dtype float64, expected"):
        fastopt.Adam([p.copy() for p in start], lr=0.01, state_dtype=loaded).load_state_dict(wide)
    # arrays that are not of the dtype the state dict declares are damaged, not another state_dtype's; so are
    # arrays of two dtypes in one state dict, declared or not
    mixed = dict(sd, state={i: dict(st, exp_avg=st["exp_avg"].astype(loaded)) for i, st in sd["state"].items()})
    for meta in (sd["fastopt"], older["fastopt"]):
        with pytest.raises(fastopt.CheckpointError, match=f"exp_avg_sq has dtype {saved}, expected {loaded}"):
            fastopt.Adam([p.copy() for p in start], lr=0.01, state_dtype=loaded).load_state_dict(
                dict(mixed, fastopt=meta))
    assert sd["fastopt"]["state_dtype"] == saved
    for bad in ("float8", np.array(["float32", "bfloat16"]), 3):  # (an array was NumPy's ambiguous truth value)
        with pytest.raises(fastopt.CheckpointError, match="'state_dtype' must be None or a state dtype's name"):
            fastopt.Adam([p.copy() for p in start], lr=0.01, state_dtype=loaded).load_state_dict(
                dict(sd, fastopt=dict(sd["fastopt"], state_dtype=bad)))
    with pytest.raises(fastopt.CheckpointError, match=f"has dtype {saved}, expected {loaded}"):
        fastopt.Adam([p.copy() for p in start], lr=0.01, state_dtype=loaded).load_state_dict(
            dict(sd, fastopt=dict(sd["fastopt"], state_dtype=loaded)))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the reference's p - lr * g
@pytest.mark.parametrize("dtype", [BF16, F16], ids=name)
def test_kahan_keeps_an_overflowed_param_as_the_store_to_nearest_does(dtype, rng):
    """A param that overflows is stored inf (or NaN for a NaN update) with no compensation: Kahan's
    compensation was inf - inf = NaN there, and the next step made the param NaN where the store to nearest
    keeps it inf. Compiled kernels and reference alike; the other elements are untouched by the rule."""
    big = float(np.finfo(np.float16).max) if dtype == F16 else 3.3e38
    start = rng.standard_normal(1037).astype(dtype)
    start[:4] = [big, -big, 1.0, 2.0]
    grads = [rng.standard_normal(1037).astype(dtype) for _ in range(4)]
    grads[0][:4] = [-big, big, np.nan, 0.5]  # p - g: +inf, -inf, NaN, a finite step
    results = {}
    for kahan in (False, True):
        for backend in ("cython", "numpy"):
            p = start.copy()
            comp = np.zeros_like(p) if kahan else None
            for g in grads:
                fastopt.sgd_step([p], [g], lr=1.0, **({"kahan_comp": [comp]} if kahan else {}), backend=backend)
            results[kahan, backend] = p, comp
    for backend in ("cython", "numpy"):
        p, comp = results[True, backend]
        nearest, _ = results[False, backend]
        assert p[0] == np.inf and p[1] == -np.inf and np.isnan(p[2])
        np.testing.assert_array_equal(bits(p[:2]), bits(nearest[:2]))
        assert not bits(comp[:3]).any()  # +0: no compensation kept for a non-finite param
        assert np.isfinite(p[3:].astype(np.float32)).all() and np.isfinite(comp[3:].astype(np.float32)).all()
    (kp, kc), (rp, rc) = results[True, "cython"], results[True, "numpy"]
    np.testing.assert_array_equal(bits(np.delete(kp, 2)), bits(np.delete(rp, 2)))
    np.testing.assert_array_equal(bits(kc), bits(rc))
