"""8-bit optimizer state in fastopt.torch (state_dtype="int8", issue 13; DESIGN.md "Precision").

Each state of a param is two tensors in the optimizer state: "<name>" the uint8 codes (the param's shape
and layout) and "<name>_absmax" the float32 scales (one per 256 elements in the param's memory order), the
keys of the NumPy classes' state dicts. Checked here: every registry optimizer that allows 8-bit state
(the list comes from the registry and precision.INT8_REFUSED) equals fastopt's functional API on NumPy
copies with precision.QuantizedState states bit for bit (params, codes, scales, Kahan compensation) for
float32 and bfloat16 params, plain, Kahan and stochastic rounding, two groups, a param without a grad on
some steps, 20 steps; state_dict() round trips mid-training; torch.optim's float32 state dicts load
(quantized) and 8-bit state dicts load into float-state optimizers (dequantized); the same refusals as
the NumPy classes; bad input leaves params and state unchanged; the digits MLP trains as in float32."""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

import fastopt  # noqa: E402
import fastopt.torch as ft  # noqa: E402
from fastopt.precision import INT8_REFUSED, QuantizedState, quant_blocks, signed_state  # noqa: E402
from fastopt.specs import REGISTRY  # noqa: E402
from tests.torch_support import carried_start, functional_step, moving_hp, one_torch_thread, to_numpy_16, torch_kwargs  # noqa: E402,F401  (autouse fixture)

INT8_SPECS = [s for s in REGISTRY.values() if s.name not in INT8_REFUSED]
REFUSED_SPECS = [s for s in REGISTRY.values() if s.name in INT8_REFUSED]
SHAPES = [(0,), (1,), (300,), (5, 3), (2, 260)]  # sizes 0, 1, odd, and several 256-blocks with a partial one
MODES = {"float32": (torch.float32, {}), "bf16": (torch.bfloat16, {}), "bf16-kahan": (torch.bfloat16, dict(kahan=True)),
         "bf16-stochastic": (torch.bfloat16, dict(stochastic_rounding=True, seed=7))}


def _assert_state_equal(st, ref_states, spec, i, p):
    for name, a in ref_states.items():
        tname = spec.torch_state_names.get(name, name)
        assert tname in st, (i, name)
        if isinstance(a, QuantizedState):
            assert st[tname].dtype == torch.uint8 and st[tname].shape == p.shape, (i, name)
            assert st[tname + "_absmax"].dtype == torch.float32, (i, name)
            assert st[tname].numpy().tobytes() == a.codes.tobytes(), (i, name, "codes")
            assert st[tname + "_absmax"].numpy().tobytes() == a.absmax.tobytes(), (i, name, "absmax")
        else:  # the Kahan compensation (the param's dtype)
            assert to_numpy_16(st[tname]).tobytes() == a.tobytes(), (i, name)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("spec", INT8_SPECS, ids=lambda s: s.name)
def test_equals_the_numpy_reference_bit_for_bit(spec, mode, rng):
    """20 steps, two groups, param 2 without a grad on some steps (its own count, which keys the stochastic
    bits): params, codes, scales and the compensation equal the functional API with QuantizedState state."""
    dtype, options = MODES[mode]
    hp = moving_hp(spec)
    torch.manual_seed(int(rng.integers(1 << 30)))
    ps = [torch.randn(s).to(dtype).requires_grad_() for s in SHAPES]
    ours = getattr(ft, spec.class_name)([{"params": ps[:3]}, {"params": ps[3:]}], **torch_kwargs(spec, hp),
                                        state_dtype="int8", **options)
    ref = [to_numpy_16(p) for p in ps]
    states = [fastopt.init_state(spec.name, r, state_dtype="int8", kahan=options.get("kahan", False),
                                 **{k: hp[k] for k in spec.state_options}) for r in ref]
    counts = [0] * len(ps)
    # torch's accumulated state (NAdam's mu_product, spec.torch_carry), per param, in float32 as torch keeps it
    carried = [carried_start(spec, hp) for _ in ps]
    for t in range(20):
        for i, p in enumerate(ps):
            p.grad = None if (i == 2 and t % 4 == 1) else (torch.randn(p.shape) * 0.3).to(dtype)
        ours.step()
        for i, p in enumerate(ps):
            if p.grad is None:
                continue
            counts[i] += 1
            functional_step(spec, ref[i], to_numpy_16(p.grad), states[i], hp, counts[i], carried[i], options,
                            counts[i] if spec.torch_step else t + 1)
    for i, p in enumerate(ps):
        assert to_numpy_16(p).tobytes() == ref[i].tobytes(), i
        _assert_state_equal(ours.state[p], states[i], spec, i, p)


def _train(opt, ps, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=g) * 0.5).to(p.dtype)
        opt.step()


@pytest.mark.parametrize("name,dtype,options", [("AdamW", torch.float32, {}), ("SGD", torch.float32, {}),
                                                ("Adam", torch.bfloat16, dict(kahan=True)),
                                                ("RMSprop", torch.bfloat16, dict(stochastic_rounding=True, seed=3))])
def test_state_dict_round_trip_continues_bit_for_bit(name, dtype, options):
    """state_dict() mid-training (codes uint8, scales float32 under <name>_absmax), loaded into a fresh
    optimizer on copies of the params: both go on identically, and the loaded tensors keep their dtypes
    (torch.optim's loader would cast them to the param's)."""
    kw = dict(lr=1e-2, momentum=0.9) if name == "SGD" else dict(lr=1e-2)
    torch.manual_seed(4)
    a = [torch.randn(s).to(dtype).requires_grad_() for s in [(300,), (7, 3)]]
    opt = getattr(ft, name)(a, **kw, state_dtype="int8", **options)
    _train(opt, a, 5, seed=1)
    sd = copy.deepcopy(opt.state_dict())
    assert all(v.dtype == torch.uint8 for e in sd["state"].values() for k, v in e.items()
               if k + "_absmax" in e)
    b = [p.detach().clone().requires_grad_() for p in a]
    again = getattr(ft, name)(b, **kw, state_dtype="int8", **options)
    again.load_state_dict(sd)
    for k, v in again.state[b[0]].items():
        assert v.dtype == opt.state[a[0]][k].dtype and torch.equal(v, opt.state[a[0]][k]), k
    _train(opt, a, 6, seed=2)
    _train(again, b, 6, seed=2)
    for p, q in zip(a, b):
        assert to_numpy_16(p).tobytes() == to_numpy_16(q).tobytes()
        for k, v in opt.state[p].items():
            assert torch.equal(v, again.state[q][k]), k


def test_torch_optim_state_dict_is_quantized_and_ours_dequantized():
    """A torch.optim float32 state dict loads into an 8-bit optimizer (each state quantized in the param's
    memory order: the next step equals the functional API from QuantizedState.from_float of torch's state),
    and an 8-bit state dict loads into an optimizer with float32 state (dequantized, the scales dropped)."""
    torch.manual_seed(6)
    a = torch.randn(300, 2).requires_grad_()
    b = a.detach().clone().requires_grad_()
    topt = torch.optim.Adam([b], lr=1e-2)
    for _ in range(3):
        b.grad = torch.randn(300, 2)
        topt.step()
    opt = ft.Adam([a], lr=1e-2, state_dtype="int8")
    a.data.copy_(b.detach())
    opt.load_state_dict(copy.deepcopy(topt.state_dict()))
    ref = to_numpy_16(b)
    st = {k: QuantizedState.from_float(topt.state[b][k].numpy(), signed_state(k)) for k in ("exp_avg", "exp_avg_sq")}
    g = torch.randn(300, 2)
    a.grad = g
    opt.step()
    fastopt.adam_step(ref, g.numpy(), **st, lr=1e-2, step=4)
    assert to_numpy_16(a).tobytes() == ref.tobytes()
    assert opt.state[a]["exp_avg"].numpy().tobytes() == st["exp_avg"].codes.tobytes()
    assert opt.state[a]["exp_avg_sq_absmax"].numpy().tobytes() == st["exp_avg_sq"].absmax.tobytes()
    assert float(opt.state[a]["step"]) == 4.0
    # and back: 8-bit state into float32 state
    c = a.detach().clone().requires_grad_()
    plain = ft.Adam([c], lr=1e-2)
    plain.load_state_dict(copy.deepcopy(opt.state_dict()))
    c.grad = torch.zeros(300, 2)
    plain.step()
    assert set(plain.state[c]) == {"step", "exp_avg", "exp_avg_sq"}
    m = st["exp_avg"].dequantize() * np.float32(0.9)  # one step with a zero grad: exp_avg *= beta1
    assert plain.state[c]["exp_avg"].dtype == torch.float32
    assert plain.state[c]["exp_avg"].numpy().tobytes() == m.tobytes()


def test_channels_last_param_blocks_run_in_memory_order():
    """A channels_last weight: codes in the param's layout, blocks over its memory order, equal to the
    reference on the same memory viewed flat."""
    torch.manual_seed(8)
    w = torch.randn(4, 3, 9, 9).to(memory_format=torch.channels_last).requires_grad_()
    flat = w.detach().permute(0, 2, 3, 1).reshape(-1).numpy().copy()
    opt = ft.Adam([w], lr=1e-2, state_dtype="int8")
    st = fastopt.init_state("adam", flat, state_dtype="int8")
    for t in range(3):
        g = torch.randn(4, 3, 9, 9).contiguous(memory_format=torch.channels_last)
        w.grad = g
        opt.step()
        fastopt.adam_step(flat, g.permute(0, 2, 3, 1).reshape(-1).numpy(), **st, lr=1e-2, step=t + 1)
    assert w.is_contiguous(memory_format=torch.channels_last)
    assert w.detach().permute(0, 2, 3, 1).reshape(-1).numpy().tobytes() == flat.tobytes()
    codes = opt.state[w]["exp_avg"]
    assert codes.is_contiguous(memory_format=torch.channels_last)
    assert codes.permute(0, 2, 3, 1).reshape(-1).numpy().tobytes() == st["exp_avg"].codes.tobytes()


def test_memory_is_two_bytes_per_param_for_adam():
    p = torch.zeros(1 << 16, requires_grad=True)
    opt = ft.Adam([p], lr=1e-3, state_dtype="int8")
    p.grad = torch.ones_like(p)
    opt.step()
    nbytes = sum(v.numel() * v.element_size() for k, v in opt.state[p].items() if k != "step")
    assert nbytes == 2 * p.numel() + 2 * 4 * quant_blocks(p.numel())


@pytest.mark.parametrize("spec", REFUSED_SPECS, ids=lambda s: s.name)
def test_refused_optimizers_same_message_as_numpy(spec):
    with pytest.raises(ValueError) as numpy_error:
        fastopt.init_state(spec.name, np.zeros(3, np.float32), state_dtype="int8")
    hp = {k: v for k, v in moving_hp(spec).items()}
    with pytest.raises(ValueError) as torch_error:
        getattr(ft, spec.class_name)([torch.zeros(3, requires_grad=True)], **torch_kwargs(spec, hp), state_dtype="int8")
    assert str(torch_error.value) == str(numpy_error.value)


def test_float64_params_and_bad_state_dtypes_refused_clearly():
    with pytest.raises(ValueError, match=r"Invalid state_dtype: 'int8' for a float64 param \(8-bit state is for "
                                         r"float32, float16 or bfloat16 params\)"):
        ft.Adam([torch.zeros(3, dtype=torch.float64, requires_grad=True)], state_dtype="int8")
    for bad, exc in [("int4", TypeError), ("INT8", TypeError), (8, TypeError), (torch.int8, ValueError),
                     (torch.uint8, ValueError)]:
        with pytest.raises(exc, match=r"state_dtype") as info:
            ft.Adam([torch.zeros(3, requires_grad=True)], state_dtype=bad)
        assert str(bad).replace("torch.", "") in str(info.value)


def _snapshot(opt, ps):
    return [to_numpy_16(p).tobytes() for p in ps], {(i, k): v.clone() for i, p in enumerate(ps)
                                            for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("damage", ["absmax-length", "absmax-dtype", "codes-shape", "no-absmax"])
def test_bad_loaded_state_raises_and_writes_nothing(damage):
    """A damaged 8-bit state (scales of the wrong length or dtype, codes of another shape, codes without
    scales) raises at the next step naming the state, and nothing is written: params, every state tensor
    of every param, the step counts."""
    torch.manual_seed(10)
    ps = [torch.randn(300).requires_grad_(), torch.randn(5).requires_grad_()]
    opt = ft.Adam(ps, lr=1e-2, state_dtype="int8")
    _train(opt, ps, 2, seed=3)
    sd = copy.deepcopy(opt.state_dict())
    e = sd["state"][1]
    if damage == "absmax-length":
        e["exp_avg_absmax"] = torch.zeros(2)
    elif damage == "absmax-dtype":
        e["exp_avg_absmax"] = e["exp_avg_absmax"].double()
    elif damage == "codes-shape":
        e["exp_avg"] = torch.zeros(6, dtype=torch.uint8)
    else:
        del e["exp_avg_absmax"]
    opt.load_state_dict(sd)
    for p in ps:
        p.grad = torch.ones_like(p)
    before = _snapshot(opt, ps)
    with pytest.raises((TypeError, ValueError), match="exp_avg"):
        opt.step()
    after = _snapshot(opt, ps)
    assert before[0] == after[0]
    assert before[1].keys() == after[1].keys() and all(torch.equal(before[1][k], after[1][k]) for k in before[1])


def test_digits_mlp_int8_state_matches_float32():
    """Quality (tests/test_precision_quality.py's recipe): the digits MLP, full-batch AdamW 150 steps through
    fastopt.torch on the model's own memory: 8-bit state ends within 1% of float32 state's final objective
    and at the same test accuracy to 1 point."""
    pytest.importorskip("sklearn")
    from fastopt.train.data import load_dataset
    from fastopt.train.models import DenseNetwork
    ds = load_dataset("digits", seed=0).astype(np.float32)
    results = {}
    for mode in (None, "int8"):
        net = DenseNetwork([64, 16, 10], task="multiclass", seed=0, dtype=np.float32, l2=0.03)
        p = torch.from_numpy(net.params)
        opt = ft.AdamW([p], lr=0.02, weight_decay=0.0, state_dtype=mode)
        p.grad = torch.from_numpy(net.grads)
        for _ in range(150):
            net.loss_and_grad(ds.X_train, ds.y_train)
            opt.step()
        results[mode] = (float(net.loss(ds.X_train, ds.y_train)), float(np.mean(net.predict(ds.X_test) == ds.y_test)))
    (loss32, acc32), (loss8, acc8) = results[None], results["int8"]
    assert acc32 > 0.9
    assert abs(loss8 / loss32 - 1) < 0.01, (loss8, loss32)
    assert abs(acc8 - acc32) <= 0.01 + 1e-9, (acc8, acc32)


def test_torch_state_dict_loads_into_torch_optim():
    """torch_state_dict(): 8-bit state dequantized to float32 (scales and the compensation dropped) loads into
    torch.optim.Adam, which then steps from exactly those moments."""
    torch.manual_seed(12)
    a = [torch.randn(300, 2).requires_grad_(), torch.randn(5).requires_grad_()]
    opt = ft.Adam(a, lr=1e-2, state_dtype="int8")
    _train(opt, a, 3, seed=4)
    sd = opt.torch_state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    want = QuantizedState(opt.state[a[0]]["exp_avg"].numpy(), opt.state[a[0]]["exp_avg_absmax"].numpy(), True)
    assert sd["state"][0]["exp_avg"].dtype == torch.float32
    assert sd["state"][0]["exp_avg"].numpy().tobytes() == want.dequantize().tobytes()
    b = [p.detach().clone().requires_grad_() for p in a]
    topt = torch.optim.Adam(b, lr=1e-2)
    topt.load_state_dict(copy.deepcopy(sd))
    assert torch.equal(topt.state[b[0]]["exp_avg"], sd["state"][0]["exp_avg"])
    _train(topt, b, 1, seed=5)
    assert float(topt.state[b[0]]["step"]) == 4.0


def test_float64_param_group_refused_and_nothing_changed():
    """add_param_group with a float64 param on an 8-bit optimizer: the NumPy classes' ValueError, the group is
    not added, the other params and their state are untouched."""
    torch.manual_seed(13)
    ps = [torch.randn(300).requires_grad_()]
    opt = ft.Adam(ps, lr=1e-2, state_dtype="int8")
    _train(opt, ps, 2, seed=6)
    before = _snapshot(opt, ps)
    with pytest.raises(ValueError, match=r"Invalid state_dtype: 'int8' for a float64 param"):
        opt.add_param_group({"params": [torch.zeros(3, dtype=torch.float64, requires_grad=True)]})
    assert len(opt.param_groups) == 1
    after = _snapshot(opt, ps)
    assert before[0] == after[0] and all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    _train(opt, ps, 1, seed=7)  # and it still steps
