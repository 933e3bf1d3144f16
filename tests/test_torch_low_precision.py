"""16-bit params in fastopt.torch (issue 13): bfloat16 and float16 CPU tensors run on the CPU kernels with
float32 math and float32 state, bit for bit what fastopt's functional API computes on the same NumPy
arrays (ml_dtypes' bfloat16), and close to torch.optim on float32 copies; grads in the param's dtype or
float32; torch.optim state dicts of 16-bit params (16-bit state) load, and ours load into torch.optim."""
from __future__ import annotations

import builtins
import io
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

import fastopt  # noqa: E402
import fastopt.torch as ft  # noqa: E402
from fastopt.specs import REGISTRY  # noqa: E402
from tests.torch_support import carried_start, functional_step, moving_hp, one_torch_thread, to_numpy_16, torch_kwargs  # noqa: E402,F401  (autouse fixture)

DTYPES = {torch.bfloat16: ml_dtypes.bfloat16, torch.float16: np.float16}
SHAPES = [(0,), (1,), (7,), (5, 3), (2, 3, 2, 2)]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=["bfloat16", "float16"])
@pytest.mark.parametrize("spec", list(REGISTRY.values()), ids=lambda s: s.name)
def test_equals_the_functional_api_bit_for_bit(spec, dtype, rng):
    """12 steps, two groups, one param without a grad on some steps (its own step count), grads in the
    param's dtype and in float32: params and state equal the functional API's on NumPy copies."""
    hp = moving_hp(spec)
    torch.manual_seed(int(rng.integers(1 << 30)))
    ps = [torch.randn(s).to(dtype).requires_grad_() for s in SHAPES]
    for p in ps:
        p.grad_dtype = None  # float32 grads for 16-bit params (torch checks a grad's dtype unless told so)
    ours = getattr(ft, spec.class_name)([{"params": ps[:3]}, {"params": ps[3:]}], **torch_kwargs(spec, hp))
    ref = [to_numpy_16(p) for p in ps]
    states = [fastopt.init_state(spec.name, r, **{k: hp[k] for k in spec.state_options}) for r in ref]
    counts = [0] * len(ps)
    fn = getattr(fastopt, spec.function_name)
    carried = [carried_start(spec, hp) for _ in ps]
    for t in range(12):
        for i, p in enumerate(ps):
            if i == 2 and t % 4 == 1:
                p.grad = None
                continue
            g = torch.randn(p.shape) * 0.3
            p.grad = g if (t + i) % 3 == 0 else g.to(dtype)  # float32 grads too
        ours.step()
        for i, p in enumerate(ps):
            if p.grad is None:
                continue
            counts[i] += 1
            g = p.grad.float().numpy() if p.grad.dtype == torch.float32 else to_numpy_16(p.grad)
            if carried[i]:  # torch's carried scalars (NAdam's mu_product, schedule-free's weight_sum)
                functional_step(spec, ref[i], g, states[i], hp, counts[i], carried[i], {}, counts[i])
                continue
            kw = {k: v for k, v in hp.items()}
            if spec.uses_step:
                kw["step"] = counts[i]
            fn(ref[i], g, **states[i], **kw)
    for i, p in enumerate(ps):
        assert to_numpy_16(p).tobytes() == ref[i].tobytes(), i
        st = ours.state.get(p, {})
        for name, a in states[i].items():
            tname = spec.torch_state_names.get(name, name)
            if tname in st:
                assert st[tname].dtype == torch.float32
                assert st[tname].numpy().tobytes() == a.tobytes(), (i, name)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD", "RMSprop", "NAdam", "Adagrad"])
def test_close_to_torch_optim_in_float32(name, dtype):
    """float32 math on float32 state: after 30 steps a 16-bit param is torch.optim's float32 result rounded
    (within a few ulps of the 16-bit format, the params being rounded after every step)."""
    torch.manual_seed(3)
    shapes = [(64,), (16, 8)]
    ours = [(torch.randn(s) * 0.5).to(dtype).requires_grad_() for s in shapes]
    theirs = [p.detach().float().requires_grad_() for p in ours]
    kw = {"lr": 1e-2} if name != "SGD" else {"lr": 1e-2, "momentum": 0.9}
    opt, topt = getattr(ft, name)(ours, **kw), getattr(torch.optim, name)(theirs, **kw)
    for t in range(30):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape)
            a.grad, b.grad = g.to(dtype), g.to(dtype).float()
        opt.step()
        topt.step()
    eps = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.float(), b.detach(), rtol=30 * eps, atol=30 * eps * 0.5)


def test_grad_of_another_dtype_is_refused_and_nothing_written():
    p = torch.randn(6).to(torch.bfloat16).requires_grad_()
    opt = ft.Adam([p], lr=0.1)
    p.grad = torch.randn(6).to(torch.bfloat16)
    opt.step()
    before, state = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    p.grad_dtype = None  # torch refuses a grad of another dtype unless told so
    p.grad = torch.randn(6, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64.*bfloat16.*float32"):
        opt.step()
    assert torch.equal(p, before)
    assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())


def test_torch_state_dicts_of_16_bit_params_in_both_directions():
    """torch.optim keeps 16-bit state for 16-bit params: loaded here it becomes float32 state (exact);
    ours loads into torch.optim (which casts it to the params' dtype); training goes on."""
    torch.manual_seed(5)
    a = torch.randn(10).to(torch.bfloat16).requires_grad_()
    b = a.detach().clone().requires_grad_()
    topt = torch.optim.Adam([b], lr=1e-2)
    for _ in range(3):
        b.grad = torch.randn(10).to(torch.bfloat16)
        topt.step()
    opt = ft.Adam([a], lr=1e-2)
    a.data.copy_(b.detach())
    opt.load_state_dict(copy.deepcopy(topt.state_dict()))
    a.grad = torch.randn(10).to(torch.bfloat16)
    opt.step()
    assert opt.state[a]["exp_avg"].dtype == torch.float32
    assert float(opt.state[a]["step"]) == 4.0
    back = torch.optim.Adam([b], lr=1e-2)
    back.load_state_dict(opt.state_dict())
    assert back.state[b]["exp_avg"].dtype == torch.bfloat16
    torch.testing.assert_close(back.state[b]["exp_avg"].float(), opt.state[a]["exp_avg"], rtol=2 ** -8, atol=0)


def test_channels_last_bfloat16_conv_weight_in_place():
    torch.manual_seed(1)
    w = torch.randn(4, 3, 3, 3).to(torch.bfloat16).to(memory_format=torch.channels_last).requires_grad_()
    ref = to_numpy_16(w.contiguous())
    opt = ft.SGD([w], lr=0.1, momentum=0.9)
    state = fastopt.init_state("sgd", ref, momentum=0.9)
    ptr = w.data_ptr()
    for t in range(4):
        g = torch.randn(4, 3, 3, 3).to(torch.bfloat16)
        w.grad = g.contiguous(memory_format=torch.channels_last)
        opt.step()
        fastopt.sgd_step(ref, to_numpy_16(g), **state, lr=0.1, momentum=0.9, step=t + 1)
    assert w.data_ptr() == ptr and w.is_contiguous(memory_format=torch.channels_last)
    assert to_numpy_16(w.contiguous()).tobytes() == ref.tobytes()


def test_bfloat16_without_ml_dtypes_is_refused_clearly(monkeypatch):
    real_import = builtins.__import__

    def no_ml_dtypes(name, *args, **kwargs):
        if name == "ml_dtypes":
            raise ImportError("No module named 'ml_dtypes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ml_dtypes)
    with pytest.raises(TypeError, match="ml_dtypes"):
        ft.Adam([torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)])
    ft.Adam([torch.zeros(3, dtype=torch.float16, requires_grad=True)])  # float16: NumPy has it


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_float16_params_equal_the_cpu():
    """float16 CUDA params (the CuPy kernels, float32 state) equal the same steps on the CPU (float32 math
    on both; within one float16 ulp where the GPU contracts a multiply-add). bfloat16 CUDA params and the
    precision options on CUDA: tests/test_torch_cuda_precision.py."""
    torch.manual_seed(9)
    cpu = [(torch.randn(s) * 0.5).half().requires_grad_() for s in [(1,), (1037,), (33, 5)]]
    gpu = [p.detach().cuda().requires_grad_() for p in cpu]
    a, b = ft.AdamW(cpu, lr=1e-2), ft.AdamW(gpu, lr=1e-2)
    for _ in range(10):
        for p, q in zip(cpu, gpu):
            g = torch.randn(p.shape).half()
            p.grad, q.grad = g, g.cuda()
        a.step()
        b.step()
    assert b.state[gpu[0]]["exp_avg"].dtype == torch.float32
    for p, q in zip(cpu, gpu):
        torch.testing.assert_close(q.cpu().float(), p.float(), rtol=2 ** -10, atol=2 ** -14)


MODES = {"bf16-state": dict(state_dtype="bfloat16"), "kahan": dict(kahan=True),
         "stochastic": dict(stochastic_rounding=True, seed=11), "bf16-state-kahan": dict(state_dtype="bfloat16", kahan=True)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("spec", list(REGISTRY.values()), ids=lambda s: s.name)
def test_precision_modes_equal_the_functional_api_bit_for_bit(spec, mode, rng):
    """state_dtype=, kahan=True, stochastic_rounding=True on bfloat16 params (DESIGN.md "Precision"): 6
    steps, one param skipped on some steps (its own count: the stochastic bits are keyed by it): params,
    states and the compensation (state "kahan_comp") equal fastopt's functional API on NumPy copies."""
    options = MODES[mode]
    hp = moving_hp(spec)
    torch.manual_seed(int(rng.integers(1 << 30)))
    ps = [torch.randn(s).to(torch.bfloat16).requires_grad_() for s in SHAPES]
    ours = getattr(ft, spec.class_name)([{"params": ps[:3]}, {"params": ps[3:]}], **torch_kwargs(spec, hp), **options)
    ref = [to_numpy_16(p) for p in ps]
    init = {k: v for k, v in options.items() if k in ("state_dtype", "kahan")}
    states = [fastopt.init_state(spec.name, r, **{k: hp[k] for k in spec.state_options}, **init) for r in ref]
    counts = [0] * len(ps)
    carried = [carried_start(spec, hp) for _ in ps]  # NAdam's mu_product, schedule-free's lr_max / weight_sum
    for t in range(6):
        for i, p in enumerate(ps):
            p.grad = None if (i == 2 and t % 3 == 1) else (torch.randn(p.shape) * 0.3).to(torch.bfloat16)
        ours.step()
        for i, p in enumerate(ps):
            if p.grad is None:
                continue
            counts[i] += 1
            functional_step(spec, ref[i], to_numpy_16(p.grad), states[i], hp, counts[i], carried[i], options,
                            counts[i] if spec.torch_step else t + 1)
    for i, p in enumerate(ps):
        assert to_numpy_16(p).tobytes() == ref[i].tobytes(), i
        st = ours.state.get(p, {})
        for name, a in states[i].items():
            tname = spec.torch_state_names.get(name, name)
            assert tname in st or p.numel() == 0 or counts[i] == 0, (i, name)
            if tname in st:
                want = torch.bfloat16 if (name == "kahan_comp" or "state_dtype" in options) else torch.float32
                assert st[tname].dtype == want, (i, name)
                assert to_numpy_16(st[tname]).tobytes() == a.tobytes(), (i, name)


def test_precision_options_refused_clearly():
    p32 = torch.zeros(3, requires_grad=True)
    pb = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match=r"kahan=True is for float16 or bfloat16 params; got a float32 param"):
        ft.Adam([p32], kahan=True)
    with pytest.raises(ValueError, match=r"stochastic_rounding=True is for float16 or bfloat16 params"):
        ft.Adam([p32], stochastic_rounding=True)
    with pytest.raises(ValueError, match=r"kahan and stochastic_rounding are mutually exclusive"):
        ft.Adam([pb], kahan=True, stochastic_rounding=True)
    with pytest.raises(ValueError, match=r"Invalid state_dtype: 'float16' for a bfloat16 param \(its state may be "
                                         r"float32 or bfloat16\)"):
        ft.Adam([pb], state_dtype="float16")
    with pytest.raises(TypeError, match=r"state_dtype must be one of float32, bfloat16, float16, float64"):
        ft.Adam([pb], state_dtype="half-ish")


def test_kahan_state_dict_loads_into_torch_optim_and_back():
    """torch.optim ignores the extra "kahan_comp" entry of our state dict; a torch.optim state dict (no
    compensation) loads here and the compensation starts at zero."""
    torch.manual_seed(2)
    a = torch.randn(10).to(torch.bfloat16).requires_grad_()
    opt = ft.Adam([a], lr=1e-2, kahan=True)
    for _ in range(3):
        a.grad = torch.randn(10).to(torch.bfloat16)
        opt.step()
    assert opt.state[a]["kahan_comp"].dtype == torch.bfloat16 and bool(opt.state[a]["kahan_comp"].any())
    b = a.detach().clone().requires_grad_()
    topt = torch.optim.Adam([b], lr=1e-2)
    topt.load_state_dict(copy.deepcopy(opt.state_dict()))
    b.grad = torch.randn(10).to(torch.bfloat16)
    topt.step()
    again = ft.Adam([a], lr=1e-2, kahan=True)
    again.load_state_dict(copy.deepcopy(topt.state_dict()))
    a.grad = torch.randn(10).to(torch.bfloat16)
    again.step()
    assert again.state[a]["kahan_comp"].dtype == torch.bfloat16 and float(again.state[a]["step"]) == 5.0


@pytest.mark.parametrize("options", [{}, dict(kahan=True)], ids=["float32-state", "kahan"])
def test_state_dict_round_trip_of_16_bit_params_keeps_float32_state(options):
    """The float32 state of bfloat16 params survives state_dict() -> load_state_dict() exactly (torch.optim's
    loader would round it to the params' dtype): the loaded optimizer goes on bit for bit."""
    torch.manual_seed(21)
    a = [torch.randn(s).to(torch.bfloat16).requires_grad_() for s in [(50,), (4, 3)]]
    opt = ft.Adam(a, lr=1e-2, **options)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in a:
            p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
        opt.step()
    b = [p.detach().clone().requires_grad_() for p in a]
    again = ft.Adam(b, lr=1e-2, **options)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert again.state[b[0]]["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(again.state[b[0]]["exp_avg_sq"], opt.state[a[0]]["exp_avg_sq"])
    for _ in range(3):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
            q.grad = p.grad.clone()
        opt.step()
        again.step()
    for p, q in zip(a, b):
        assert to_numpy_16(p).tobytes() == to_numpy_16(q).tobytes()
        assert all(torch.equal(v, again.state[q][k]) for k, v in opt.state[p].items())


@pytest.mark.parametrize("dtype", list(DTYPES), ids=["bfloat16", "float16"])
@pytest.mark.parametrize("state_dtype", [None, "int8"])
def test_sgd_stochastic_rounding_resumes_from_its_state_dict_bit_for_bit(dtype, state_dtype):
    """torch's SGD keeps no step count, so the rounding of fastopt.torch.SGD is keyed by the optimizer's own
    count of steps, which state_dict() did not carry: a resumed run started the count again and reused the
    rounding bits of its first steps (252 of 1000 elements differed after 3 more steps)."""
    seed = int(np.random.default_rng().integers(1 << 30))
    g = torch.Generator().manual_seed(seed)
    start = (torch.randn(1000, generator=g) * 3).to(dtype)
    grads = [(torch.randn(1000, generator=g) * 1e-3).to(dtype) for _ in range(6)]
    kw = dict(lr=0.1, momentum=0.9, stochastic_rounding=True, seed=seed, state_dtype=state_dtype)
    whole = torch.nn.Parameter(start.clone())
    first = torch.nn.Parameter(start.clone())
    straight, before = ft.SGD([whole], **kw), ft.SGD([first], **kw)
    for k, grad in enumerate(grads):
        whole.grad = grad.clone()
        straight.step()
        if k < 3:
            first.grad = grad.clone()
            before.step()
    saved = before.state_dict()
    assert saved["fastopt_rounding_steps"] == 3
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    resumed = torch.nn.Parameter(first.detach().clone())
    after = ft.SGD([resumed], **kw)
    after.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    for grad in grads[3:]:
        resumed.grad = grad.clone()
        after.step()
    assert to_numpy_16(resumed).tobytes() == to_numpy_16(whole).tobytes()
    # torch.optim.SGD ignores the key; a torch.optim state dict (no key) leaves the count as it is
    torch.optim.SGD([torch.nn.Parameter(start.float())], lr=0.1, momentum=0.9).load_state_dict(after.torch_state_dict())
    after.load_state_dict({k: v for k, v in saved.items() if k != "fastopt_rounding_steps"})
    assert after.rounding_steps == 6
    with pytest.raises(ValueError, match=r"state_dict\['fastopt_rounding_steps'\] must be a whole number >= 0"):
        after.load_state_dict(dict(saved, fastopt_rounding_steps=-1))
    assert after.rounding_steps == 6
    assert "fastopt_rounding_steps" not in ft.SGD([torch.nn.Parameter(start.clone())], lr=0.1).state_dict()
