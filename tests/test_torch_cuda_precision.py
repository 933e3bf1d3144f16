"""fastopt.torch's precision options on CUDA tensors (issue 13; DESIGN.md "Precision"): bfloat16 CUDA params (torch
exports them through __cuda_array_interface__ as "<V2", read as ml_dtypes' bfloat16), state_dtype= (16-bit and
"int8"), kahan=True and stochastic_rounding=True run the CuPy backend's precision modules, and must equal the same
class on CPU tensors bit for bit (params and every state tensor) step after step, 16-bit params with their own or
float32 grads (LAMB and Adan with Kahan and stochastic rounding too); 8-bit state of an optimizer whose state must
stay exact is refused by name at construction, as on the CPU. Skipped without a CUDA GPU
(and without CuPy or ml_dtypes)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ml_dtypes")
pytest.importorskip("cupy")

import fastopt.torch as ft  # noqa: E402
from fastopt.precision import INT8_REFUSED  # noqa: E402
from fastopt.specs import REGISTRY  # noqa: E402
from tests.torch_support import moving_hp, step_alike, torch_kwargs  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]

SHAPES = [(0,), (1,), (300,), (5, 3), (2, 2100)]
MODES = {
    "bf16": (torch.bfloat16, {}),
    "bf16 bf16-state": (torch.bfloat16, dict(state_dtype="bfloat16")),
    "fp32 bf16-state": (torch.float32, dict(state_dtype="bfloat16")),
    "fp32 fp16-state": (torch.float32, dict(state_dtype="float16")),
    "bf16 kahan": (torch.bfloat16, dict(kahan=True)),
    "bf16 stochastic": (torch.bfloat16, dict(stochastic_rounding=True, seed=5)),
    "fp32 int8": (torch.float32, dict(state_dtype="int8")),
    "bf16 int8": (torch.bfloat16, dict(state_dtype="int8")),
    "bf16 int8 kahan": (torch.bfloat16, dict(state_dtype="int8", kahan=True)),
    # float32 grads of 16-bit params (the CuPy modules' FASTOPT_GRAD)
    "bf16 fp32-grads": (torch.bfloat16, dict(grads=torch.float32)),
    "fp16 fp32-grads": (torch.float16, dict(grads=torch.float32)),
    "bf16 kahan fp32-grads": (torch.bfloat16, dict(kahan=True, grads=torch.float32)),
    "bf16 int8 stochastic fp32-grads": (torch.bfloat16, dict(state_dtype="int8", stochastic_rounding=True, seed=3,
                                                             grads=torch.float32)),
}


def _refused(spec, options) -> str | None:
    """Why this combination is refused (by name, before anything is written), or None."""
    if options.get("state_dtype") == "int8" and spec.name in INT8_REFUSED:
        return "construction"  # the CPU class refuses it too (precision.INT8_REFUSED)
    return None


def _bits(t):
    t = t.detach().cpu()
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("spec", list(REGISTRY.values()), ids=lambda s: s.name)
def test_cuda_class_equals_the_cpu_class_bit_for_bit(spec, mode):
    dtype, options = MODES[mode]
    options = dict(options)
    grad_dtype = options.pop("grads", dtype)
    hp = moving_hp(spec)
    cls = getattr(ft, spec.class_name)
    why = _refused(spec, options)
    torch.manual_seed(17)
    cpu = [(torch.randn(s) * 0.5).to(dtype).requires_grad_() for s in SHAPES]
    gpu = [p.detach().cuda().requires_grad_() for p in cpu]
    if grad_dtype != dtype:
        for p in cpu + gpu:
            p.grad_dtype = None  # float32 grads for a 16-bit param (torch checks a grad's dtype unless told so)
    if why == "construction":
        with pytest.raises(ValueError, match="Invalid state_dtype: 'int8'"):
            cls(gpu, **torch_kwargs(spec, hp), **options)
        return
    a = cls([{"params": cpu[:3]}, {"params": cpu[3:]}], **torch_kwargs(spec, hp), **options)
    b = cls([{"params": gpu[:3]}, {"params": gpu[3:]}], **torch_kwargs(spec, hp), **options)
    exact = not (spec.two_phase or spec.tensor_coefs is not None)  # norms: another summation order on the GPU
    for t in range(6):
        for i, (p, q) in enumerate(zip(cpu, gpu)):
            g = None if (i == 2 and t % 3 == 1) else (torch.randn(p.shape) * 0.3).to(grad_dtype)
            p.grad, q.grad = g, None if g is None else g.cuda()
        a.step()
        b.step()
        for i, (p, q) in enumerate(zip(cpu, gpu)):
            context = f"{spec.name} {mode} step {t + 1} param {i}"
            if exact:
                assert torch.equal(_bits(q), _bits(p)), context
            else:
                torch.testing.assert_close(q.detach().cpu().float(), p.detach().float(), rtol=2e-2, atol=1e-6,
                                           msg=context)
            sa, sb = a.state.get(p, {}), b.state.get(q, {})
            assert set(sa) == set(sb), context
            for k, v in sa.items():
                if not isinstance(v, torch.Tensor):
                    assert v == sb[k], (context, k)
                    continue
                w = sb[k]
                assert w.dtype == v.dtype and w.shape == v.shape, (context, k)
                if k == "step" or v.numel() == 0:
                    continue
                assert w.device.type == "cuda", (context, k)
                if exact:
                    assert torch.equal(_bits(w), _bits(v)), (context, k)


def test_cuda_8bit_state_dict_round_trips_with_the_cpu():
    """The state dict of an 8-bit CUDA optimizer (codes and scales as tensors) loads into a CPU one and back;
    a torch.optim state dict (float32 state) loads into the CUDA 8-bit optimizer quantized, as on the CPU."""
    torch.manual_seed(23)
    cpu = [torch.randn(s).requires_grad_() for s in SHAPES]
    gpu = [p.detach().cuda().requires_grad_() for p in cpu]
    a, b = ft.AdamW(cpu, lr=1e-2, state_dtype="int8"), ft.AdamW(gpu, lr=1e-2, state_dtype="int8")
    step_alike(a, b, 3, move=lambda g: g.cuda())
    c = ft.AdamW([p.detach().clone().requires_grad_() for p in cpu], lr=1e-2, state_dtype="int8")
    c.load_state_dict(b.state_dict())
    for p, q in zip(c.param_groups[0]["params"], cpu):
        for k, v in a.state[q].items():
            assert torch.equal(c.state[p][k].cpu(), v.cpu()), k
    reference = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in cpu], lr=1e-2)
    for p, q in zip(reference.param_groups[0]["params"], cpu):
        p.grad = torch.randn(q.shape)
    reference.step()
    d_gpu = [p.detach().cuda().requires_grad_() for p in reference.param_groups[0]["params"]]
    d_cpu = [p.detach().clone().requires_grad_() for p in reference.param_groups[0]["params"]]
    d, e = ft.AdamW(d_gpu, lr=1e-2, state_dtype="int8"), ft.AdamW(d_cpu, lr=1e-2, state_dtype="int8")
    d.load_state_dict(reference.state_dict())
    e.load_state_dict(reference.state_dict())
    for p, q in zip(d_gpu, d_cpu):
        g = torch.randn(q.shape)
        p.grad, q.grad = g.cuda(), g
    d.step()
    e.step()
    for p, q in zip(d_gpu, d_cpu):
        assert torch.equal(p.detach().cpu(), q.detach())
        for k, v in e.state[q].items():
            assert torch.equal(d.state[p][k].cpu(), v.cpu()), k
