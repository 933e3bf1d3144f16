"""8-bit block-wise quantized optimizer state (state_dtype="int8", issue 13 item 2, DESIGN.md "Precision").

Each state is a fastopt.precision.QuantizedState: codes (uint8, the param's shape) and one float32 absmax
per block of 256 elements; a step dequantizes, runs the float32 update and requantizes. Checked here: the
representation init_state makes (shapes, dtypes, block counts, signed/unsigned maps), the numpy backend
against an independent composition (precision.dequantize_blockwise -> reference step in float32 ->
precision.quantize_blockwise) over every supported optimizer and size, bad input (named, nothing written),
the refusals (LAMB, ASGD, schedule-free; float64 params; fastopt.torch), the compiled CPU kernel against
the numpy backend bit for bit (every supported optimizer, float32/bf16/f16 params, Kahan, stochastic
rounding, 1 and 2 threads), state dicts and checkpoints (codes and scales; conversion to and from float32
state and torch.optim), memory, and training quality on the digits MLP against float32 state.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt import reference
from fastopt.functional import init_state
from fastopt.precision import (INT8_REFUSED, NONNEGATIVE_STATES, QuantizedState, dequantize_blockwise,
                               quantize_blockwise, quantized_state_assignments, signed_state)
from fastopt.specs import REGISTRY

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)

# every supported optimizer with an option set that uses each of its states
CASES = {
    "sgd": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adagrad": dict(lr=0.05, initial_accumulator_value=0.1, lr_decay=0.01),
    "rmsprop": dict(lr=0.01, momentum=0.5, centered=True),
    "adam": dict(lr=0.01, amsgrad=True, weight_decay=0.01),
    "adamw": dict(lr=0.01),
    "nadam": dict(lr=0.01),
    "radam": dict(lr=0.01),
    "adabelief": dict(lr=0.01),
    "lion": dict(lr=0.001, weight_decay=0.1),
    "adamax": dict(lr=0.01),
    "adadelta": dict(lr=0.5),
    "rprop": dict(lr=0.01),
    "yogi": dict(lr=0.01),
    "adan": dict(lr=0.01, weight_decay=0.02),  # four states: the fourth (exp_avg_sq) in the update's slot 6
    # LARS's norms are summed in another order by each backend; its ratio enters the float32 math rounded to
    # float32, which a last-bit difference of the float64 ratio almost never changes
    "lars": dict(lr=1.0, weight_decay=0.01, nesterov=True),
}
SUPPORTED = sorted(set(REGISTRY) - set(INT8_REFUSED))


def test_every_supported_optimizer_has_a_case():
    assert sorted(CASES) == SUPPORTED
    assert sorted(INT8_REFUSED) == ["asgd", "lamb", "schedule_free_adamw", "schedule_free_sgd"]


def _data(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(np.float32).astype(dtype)


@pytest.mark.parametrize("size", [0, 1, 255, 256, 257, 1000])
def test_init_state_layout(size):
    p = np.zeros(size, np.float32)
    st = init_state("adam", p, state_dtype="int8", amsgrad=True)
    assert set(st) == {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    for name, q in st.items():
        assert isinstance(q, QuantizedState)
        assert q.codes.dtype == np.uint8 and q.codes.shape == (size,)
        assert q.absmax.dtype == np.float32 and q.absmax.shape == (-(-size // 256),)
        assert q.signed == (name == "exp_avg")
        assert np.all(q.dequantize() == 0)
    # Adagrad's initial accumulator value is quantized exactly (a block of equal values is its absmax)
    q = init_state("adagrad", _data(np.random.default_rng(0), (3, 7)), state_dtype="int8",
                   initial_accumulator_value=0.25)["state_sum"]
    assert q.codes.shape == (3, 7) and np.all(q.dequantize() == np.float32(0.25))


def test_signed_map_per_state():
    """Unsigned (nonnegative) states are exactly those never negative in their optimizer's math."""
    for spec in REGISTRY.values():
        for name in spec.states:
            assert signed_state(name) == (name not in NONNEGATIVE_STATES)
    assert not signed_state("exp_avg_sq") and signed_state("exp_avg") and signed_state("momentum_buffer")


def _independent_step(name, p, g, states, hp, step):
    """dequantize -> reference step on float32 (widened 16-bit params, rounded back) -> quantize."""
    wide = {k: dequantize_blockwise(q.codes, q.absmax, q.signed).reshape(p.shape) for k, q in states.items()}
    p32 = p.astype(np.float32)
    fn = reference.STEPS[name]
    spec = REGISTRY[name]
    kwargs = dict(hp)
    if spec.uses_step:
        kwargs["step"] = step
    args = [wide.get(s) for s in spec.states]
    while args and args[-1] is None:
        args.pop()
    fn(p32, g.astype(np.float32), *args, **kwargs)
    out = {}
    for k, q in states.items():
        codes, absmax = quantize_blockwise(wide[k], q.signed)
        out[k] = (codes.reshape(p.shape), absmax)
    return p32.astype(p.dtype), out


@pytest.mark.parametrize("name", SUPPORTED)
@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_numpy_backend_is_dequantize_update_requantize(name, dtype):
    rng = np.random.default_rng()
    hp = CASES[name]
    shapes = [(0,), (1,), (255,), (256,), (257,), (1000,), (7, 37)]
    params = [_data(rng, s, dtype) for s in shapes]
    st = init_state(name, params, state_dtype="int8", **hp)
    for step in range(1, 6):
        grads = [_data(rng, s, dtype) for s in shapes]
        expected = [_independent_step(name, p, g, {k: st[k][i] for k in st}, hp, step)
                    for i, (p, g) in enumerate(zip(params, grads))]
        getattr(fastopt, f"{name}_step")(params, grads, **st, **({"step": step} if REGISTRY[name].uses_step else {}),
                                         **hp, backend="numpy")
        for i, (p_new, states) in enumerate(expected):
            assert params[i].tobytes() == p_new.tobytes(), (name, i, step)
            for k, (codes, absmax) in states.items():
                assert st[k][i].codes.tobytes() == codes.tobytes(), (name, k, i, step)
                assert st[k][i].absmax.tobytes() == absmax.tobytes(), (name, k, i, step)


def test_adam_int8_tracks_float32():
    """50 Adam steps: 8-bit state moves the params as float32 state does, to a few percent of the travel
    on average (the largest gap, where v is small and quantized coarsely, ~10%)."""
    rng = np.random.default_rng()
    p0 = _data(rng, 3000)
    runs = {}
    for mode in ("float32", "int8"):
        p = p0.copy()
        st = init_state("adam", p, state_dtype=mode)
        grng = np.random.default_rng(7)
        for t in range(1, 51):
            g = (p - 0.5) + 0.1 * grng.standard_normal(p.size).astype(np.float32)
            fastopt.adam_step(p, g, **st, step=t, lr=0.01, backend="numpy")
        runs[mode] = p
    travel = np.abs(runs["float32"] - p0)
    assert np.median(travel) > 0.3
    diff = np.abs(runs["int8"] - runs["float32"])
    print(diff.mean() / travel.mean(), diff.max() / travel.max())
    assert diff.mean() < 0.03 * travel.mean() and diff.max() < 0.15 * travel.max()


def _snapshot(arrays):
    out = []
    for a in arrays:
        if isinstance(a, QuantizedState):
            out += [a.codes.tobytes(), a.absmax.tobytes()]
        elif a is not None:
            out.append(a.tobytes())
    return out


def _adam_call(size=300):
    rng = np.random.default_rng(1)
    p = [_data(rng, size), _data(rng, 5)]
    g = [_data(rng, size), _data(rng, 5)]
    st = init_state("adam", p, state_dtype="int8")
    fastopt.adam_step(p, g, **st, step=1, backend="numpy")  # nonzero state
    return p, g, st


@pytest.mark.parametrize("bad, error, words", [
    (lambda q: QuantizedState(q.codes.astype(np.int8), q.absmax, q.signed), TypeError, "exp_avg_sq[1].codes has dtype int8"),
    (lambda q: QuantizedState(q.codes[:4], q.absmax, q.signed), ValueError, "exp_avg_sq[1].codes has shape (4,)"),
    (lambda q: QuantizedState(q.codes, np.zeros(2, np.float32), q.signed), ValueError,
     "exp_avg_sq[1].absmax has shape (2,), expected (1,)"),
    (lambda q: QuantizedState(q.codes, q.absmax.astype(np.float64), q.signed), TypeError,
     "exp_avg_sq[1].absmax has dtype float64"),
    (lambda q: QuantizedState(q.codes, q.absmax, True), ValueError, "exp_avg_sq[1] is quantized with the signed map"),
    (lambda q: q.dequantize(), TypeError, "exp_avg_sq[1] is a ndarray, expected a QuantizedState"),
])
def test_bad_state_raises_and_writes_nothing(bad, error, words):
    p, g, st = _adam_call()
    st["exp_avg_sq"][1] = bad(st["exp_avg_sq"][1])
    before = _snapshot(p + st["exp_avg"] + st["exp_avg_sq"])
    with pytest.raises(error) as e:
        fastopt.adam_step(p, g, **st, step=2, backend="numpy")
    assert words in str(e.value)
    assert _snapshot(p + st["exp_avg"] + st["exp_avg_sq"]) == before


def test_read_only_and_shared_absmax_raise():
    p, g, st = _adam_call()
    q = st["exp_avg"][1]
    q.absmax.flags.writeable = False
    before = _snapshot(p + st["exp_avg"] + st["exp_avg_sq"])
    with pytest.raises(ValueError, match=r"exp_avg\[1\]\.absmax is read-only"):
        fastopt.adam_step(p, g, **st, step=2, backend="numpy")
    q.absmax.flags.writeable = True
    st["exp_avg_sq"][1] = QuantizedState(st["exp_avg_sq"][1].codes, q.absmax, False)  # shares exp_avg[1]'s
    before = _snapshot(p + st["exp_avg"] + st["exp_avg_sq"])
    with pytest.raises(ValueError, match="shares memory"):
        fastopt.adam_step(p, g, **st, step=2, backend="numpy")
    assert _snapshot(p + st["exp_avg"] + st["exp_avg_sq"]) == before


def test_refusals():
    p = np.zeros(10, np.float32)
    for name in INT8_REFUSED:
        with pytest.raises(ValueError, match="int8"):
            init_state(name, p, state_dtype="int8")
    with pytest.raises(ValueError, match="float64"):
        init_state("adam", np.zeros(3), state_dtype="int8")
    with pytest.raises(ValueError, match="float64"):
        fastopt.Adam([np.zeros(3)], state_dtype="int8", backend="numpy").step([np.ones(3)])
    # a QuantizedState handed to LAMB: refused before any write
    st = init_state("adam", p, state_dtype="int8")
    with pytest.raises(ValueError, match="LAMB"):
        fastopt.lamb_step(p, np.ones(10, np.float32), st["exp_avg"], st["exp_avg_sq"], step=1, backend="numpy")
    assert np.all(p == 0)


def _copy_call(params, grads, st, comp):
    cp = lambda xs: [x.copy() for x in xs]
    return cp(params), cp(grads), {k: [q.copy() for q in v] for k, v in st.items()}, None if comp is None else cp(comp)


PRECISIONS = {  # (param dtype, grad dtype, options)
    "float32": (np.float32, np.float32, {}),
    "bf16": (BF16, BF16, {}),
    "bf16+f32 grads+kahan": (BF16, np.float32, dict(kahan=True)),
    "f16+stochastic": (np.float16, np.float16, dict(stochastic_rounding=True, seed=5, index_offset=3)),
}


@pytest.fixture
def compiled():
    from fastopt.backends import dispatch
    if not dispatch.cython_available():
        pytest.skip("compiled extension not built")
    before = fastopt.get_num_threads()
    yield
    fastopt.set_num_threads(before)


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("name", SUPPORTED)
def test_compiled_kernel_equals_reference_bit_for_bit(compiled, name, precision):
    """The CPU kernel (staged: dequantize, float32 loop, requantize per 256-block) against the numpy backend:
    params, codes and absmax equal bit for bit, every size (a 70000-element tensor spans three chunks:
    several threads), 1 and 2 threads."""
    rng = np.random.default_rng()
    pdt, gdt, options = PRECISIONS[precision]
    hp = CASES[name]
    kahan = options.get("kahan", False)
    call_options = {k: v for k, v in options.items() if k != "kahan"}
    shapes = [(0,), (1,), (255,), (256,), (257,), (1000,), (7, 37), (70000,)]
    params = [_data(rng, s, pdt) for s in shapes]
    st = init_state(name, params, state_dtype="int8", kahan=kahan, **hp)
    comp = st.pop("kahan_comp", None)
    uses_step = REGISTRY[name].uses_step
    fn = getattr(fastopt, f"{name}_step")
    for step, threads in ((1, 1), (2, 2), (3, 1), (4, 2)):
        fastopt.set_num_threads(threads)
        grads = [_data(rng, s, gdt) for s in shapes]
        ref = _copy_call(params, grads, st, comp)
        kw = dict(hp, **call_options, **({"step": step} if uses_step else {}))
        fn(params, grads, **st, kahan_comp=comp, **kw)
        fn(ref[0], ref[1], **ref[2], kahan_comp=ref[3], **kw, backend="numpy")
        for i in range(len(shapes)):
            assert params[i].tobytes() == ref[0][i].tobytes(), (name, precision, step, i)
            if comp is not None:
                assert comp[i].tobytes() == ref[3][i].tobytes()
            for k in st:
                assert st[k][i].codes.tobytes() == ref[2][k][i].codes.tobytes(), (name, k, step, i)
                assert st[k][i].absmax.tobytes() == ref[2][k][i].absmax.tobytes(), (name, k, step, i)
        assert any(np.any(st[k][-1].codes != 0) for k in st)  # the states moved


def test_compiled_bad_input_writes_nothing(compiled):
    p, g, st = _adam_call(70000)
    st["exp_avg_sq"][1] = QuantizedState(st["exp_avg_sq"][1].codes, np.zeros(3, np.float32), False)
    before = _snapshot(p + st["exp_avg"] + st["exp_avg_sq"])
    with pytest.raises(ValueError, match=r"exp_avg_sq\[1\]\.absmax has shape \(3,\), expected \(1,\)"):
        fastopt.adam_step(p, g, **st, step=2)
    opt = fastopt.Adam(p, state_dtype="int8")
    opt.step(g)  # fine on its own states
    with pytest.raises(ValueError, match="LAMB"):
        st2 = init_state("adam", p, state_dtype="int8")
        fastopt.lamb_step(p, g, st2["exp_avg"], st2["exp_avg_sq"], step=1)
    assert _snapshot(st["exp_avg"] + st["exp_avg_sq"]) == before[2:]


def test_class_equals_functional_and_memory():
    from fastopt.clip import clip_coefficient
    rng = np.random.default_rng()
    shapes = [(513,), (16, 33)]
    p1 = [_data(rng, s) for s in shapes]
    p2 = [a.copy() for a in p1]
    opt = fastopt.AdamW(p1, lr=0.01, state_dtype="int8", clip_grad_norm=5.0)
    st = init_state("adamw", p2, state_dtype="int8")
    for t in range(1, 6):
        g = [_data(rng, s) for s in shapes]
        opt.step(g)
        scale = clip_coefficient(float(fastopt.global_norm(g)), 5.0)  # what the class's clip_grad_norm applies
        fastopt.adamw_step(p2, g, **st, step=t, lr=0.01, grad_scale=scale, backend="numpy")
    for i in range(2):
        assert p1[i].tobytes() == p2[i].tobytes()
        for k in ("exp_avg", "exp_avg_sq"):
            assert _snapshot([opt.state_arrays(i)[k]]) == _snapshot([st[k][i]])
    # memory: 1 byte per element per state, 4 bytes per 256-block: 2 + 8/256 bytes per param for Adam
    n = 1 << 20
    big = init_state("adam", np.zeros(n, np.float32), state_dtype="int8")
    assert sum(q.nbytes for q in big.values()) == 2 * n + 8 * n // 256


def test_digits_mlp_int8_adam_matches_float32():
    """Quality: the digits MLP (tests/test_precision_quality.py's setup) with 8-bit Adam state ends within
    1% of float32 state's final objective and at the same test accuracy to 1 point."""
    pytest.importorskip("sklearn")
    from fastopt.train.data import load_dataset
    from fastopt.train.models import DenseNetwork
    ds = load_dataset("digits", seed=0).astype(np.float32)
    results = {}
    for mode in ("float32", "int8"):
        net = DenseNetwork([64, 16, 10], task="multiclass", seed=0, dtype=np.float32, l2=0.03)
        opt = fastopt.AdamW([net.params], lr=0.02, weight_decay=0.0, state_dtype=mode)
        for _ in range(150):
            net.loss_and_grad(ds.X_train, ds.y_train)
            opt.step([net.grads])
        results[mode] = (float(net.loss(ds.X_train, ds.y_train)),
                         float(np.mean(net.predict(ds.X_test) == ds.y_test)))
    (loss32, acc32), (loss8, acc8) = results["float32"], results["int8"]
    assert acc32 > 0.9
    assert abs(loss8 / loss32 - 1) < 0.01, (loss8, loss32)
    assert abs(acc8 - acc32) <= 0.01 + 1e-9, (acc8, acc32)


def _trained(state_dtype="int8", steps=3, seed=0):
    rng = np.random.default_rng(seed)
    params = [_data(rng, 300), _data(rng, (4, 5))]
    opt = fastopt.Adam(params, lr=0.01, state_dtype=state_dtype, backend="numpy")
    for _ in range(steps):
        opt.step([_data(rng, p.shape) for p in params])
    return params, opt


def test_state_dict_and_checkpoint_round_trip(tmp_path):
    from fastopt import checkpoint
    params, opt = _trained()
    sd = opt.state_dict()
    entry = sd["state"][0]
    assert entry["exp_avg"].dtype == np.uint8 and entry["exp_avg_absmax"].dtype == np.float32
    assert entry["exp_avg_absmax"].shape == (2,) and entry["exp_avg_sq"].shape == (300,)
    assert entry["exp_avg"] is not opt.state_arrays(0)["exp_avg"].codes  # a copy
    path = tmp_path / "int8.npz"
    checkpoint.save(path, opt)
    for source in ("state_dict", "file"):
        p2 = [p.copy() for p in params]
        opt2 = fastopt.Adam(p2, lr=0.01, state_dtype="int8", backend="numpy")
        if source == "state_dict":
            opt2.load_state_dict(sd)
        else:
            checkpoint.load(path, opt2)
        for i in range(2):
            assert _snapshot(list(opt2.state_arrays(i).values())) == _snapshot(list(opt.state_arrays(i).values()))
        g = [np.full(p.shape, 0.5, np.float32) for p in params]
        opt2.step(g)
        ref = [p.copy() for p in params]
        opt3 = fastopt.Adam(ref, lr=0.01, state_dtype="int8", backend="numpy")
        opt3.load_state_dict(sd)
        opt3.step(g)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(p2, ref))


def test_state_dict_bad_scales_rejected_and_nothing_written():
    from fastopt.statedict import CheckpointError
    params, opt = _trained()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg_absmax"] = np.zeros(5, np.float32)
    _, opt2 = _trained(seed=1)
    before = [_snapshot(list(opt2.state_arrays(i).values())) for i in range(2)]
    with pytest.raises(CheckpointError, match="exp_avg_absmax has shape"):
        opt2.load_state_dict(sd)
    del sd["state"][0]["exp_avg"]
    with pytest.raises(CheckpointError, match="missing exp_avg"):
        opt2.load_state_dict(sd)
    assert [_snapshot(list(opt2.state_arrays(i).values())) for i in range(2)] == before


def test_conversion_to_and_from_float32_state():
    torch = pytest.importorskip("torch")
    params, opt = _trained()
    # to torch.optim: dequantized float32 state
    tsd = opt.torch_state_dict()
    for i in range(2):
        for k in ("exp_avg", "exp_avg_sq"):
            assert tsd["state"][i][k].dtype == torch.float32
            np.testing.assert_array_equal(tsd["state"][i][k].numpy(), opt.state_arrays(i)[k].dequantize())
    tparams = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    torch.optim.Adam(tparams, lr=0.01).load_state_dict(tsd)  # torch takes it
    # from float32 state (a float32 fastopt state dict, and torch's): quantized on load
    _, opt32 = _trained("float32")
    _, opt8 = _trained(seed=2)
    opt8.load_state_dict(opt32.state_dict())
    for i in range(2):
        for k in ("exp_avg", "exp_avg_sq"):
            want = QuantizedState.from_float(opt32.state_arrays(i)[k], signed_state(k))
            assert _snapshot([opt8.state_arrays(i)[k]]) == _snapshot([want])
    opt8.load_torch_state_dict(opt32.torch_state_dict())
    assert _snapshot([opt8.state_arrays(0)["exp_avg"]]) == _snapshot(
        [QuantizedState.from_float(opt32.state_arrays(0)["exp_avg"], True)])
    # and an 8-bit state dict into a float32 optimizer: dequantized
    opt32.load_state_dict(opt.state_dict())
    np.testing.assert_array_equal(opt32.state_arrays(1)["exp_avg_sq"], opt.state_arrays(1)["exp_avg_sq"].dequantize())


def test_quantized_state_assignments_count_every_reassignment_and_no_construction():
    """The count the compiled step plan relies on (cython_backend.Int8Fixed): every assignment to a
    QuantizedState's attributes moves it, from any number of threads at once (none lost), and making a new
    QuantizedState does not (a view made per step)."""
    import threading

    codes, absmax = np.zeros(300, np.uint8), np.zeros(2, np.float32)
    before = quantized_state_assignments()
    q = QuantizedState(codes, absmax, True)
    assert quantized_state_assignments() == before
    q.codes = codes.copy()
    q.signed = False
    assert quantized_state_assignments() == before + 2

    def reassign():
        for _ in range(2000):
            q.absmax = absmax

    threads = [threading.Thread(target=reassign) for _ in range(4)]
    start = quantized_state_assignments()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert quantized_state_assignments() == start + 8000
