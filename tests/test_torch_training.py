"""fastopt.torch in real training: a conv (channels_last) + linear model trained with fastopt.torch and
with torch.optim, every lr scheduler, GradScaler with injected infs, torch.optim state dicts loaded
mid-training in both directions, a torch.compile'd model, a training script changed by one import line,
and the CUDA variants (skipped without a GPU)."""
from __future__ import annotations

import copy
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastopt.torch as ft  # noqa: E402
from fastopt.specs import REGISTRY  # noqa: E402

from torch_support import default_dtype, one_torch_thread  # noqa: E402,F401 (an autouse fixture)


TORCH_SPECS = [s for s in REGISTRY.values() if s.torch_class]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def _digits(n=256, seed=0):
    """sklearn's bundled 8x8 digits (random data when scikit-learn is missing)."""
    try:
        from sklearn.datasets import load_digits
        data = load_digits()
        x, y = data.images[:n] / 16.0, data.target[:n]
    except ImportError:
        rng = np.random.default_rng(seed)
        x, y = rng.random((n, 8, 8)), rng.integers(0, 10, n)
    return torch.tensor(x, dtype=torch.float32).unsqueeze(1), torch.tensor(y)


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def _model(seed=0):
    torch.manual_seed(seed)
    return ConvNet().to(memory_format=torch.channels_last)


def _train(model, opt, x, y, steps, batch=64, scheduler=None, after_step=None):
    losses = []
    for t in range(steps):
        i = (t * batch) % len(x)
        xb = x[i:i + batch].contiguous(memory_format=torch.channels_last)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xb), y[i:i + batch])
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step(loss.item()) if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) \
                else scheduler.step()
        if after_step is not None:
            after_step(t)
        losses.append(loss.item())
    return losses


def _assert_same_params(m1, m2, rtol=1e-4, atol=1e-5):
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


OPTIONS = {"sgd": {"lr": 0.05, "momentum": 0.9, "nesterov": True}, "adagrad": {"lr": 0.05},
           "rmsprop": {"lr": 1e-3, "centered": True, "momentum": 0.5}, "adam": {"lr": 3e-3, "amsgrad": True},
           "adamw": {"lr": 3e-3}, "nadam": {"lr": 3e-3}, "radam": {"lr": 3e-3}, "adamax": {"lr": 3e-3}}


def _options(spec):
    return OPTIONS.get(spec.name, {"lr": 1e-3})


@pytest.mark.parametrize("spec", TORCH_SPECS, ids=lambda s: s.name)
def test_conv_channels_last_model_trains_like_torch(spec):
    x, y = _digits()
    ours, theirs = _model(), _model()
    opt = getattr(ft, spec.class_name)(ours.parameters(), **_options(spec))
    topt = getattr(torch.optim, spec.torch_class)(theirs.parameters(), **_options(spec))
    a = _train(ours, opt, x, y, 30)
    b = _train(theirs, topt, x, y, 30)
    np.testing.assert_allclose(a, b, rtol=1e-4)
    assert a[-1] < a[0]
    _assert_same_params(ours, theirs)
    assert ours.conv.weight.is_contiguous(memory_format=torch.channels_last)


SCHEDULERS = {
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 0.9 ** t),
    "MultiplicativeLR": lambda o: torch.optim.lr_scheduler.MultiplicativeLR(o, lambda t: 0.95),
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [2, 5, 9], 0.3),
    "ConstantLR": lambda o: torch.optim.lr_scheduler.ConstantLR(o, 0.5, 4),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, 0.2, 1.0, 6),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9),
    "PolynomialLR": lambda o: torch.optim.lr_scheduler.PolynomialLR(o, 12, 2.0),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 7),
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, 4, 2),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, 1e-4, 1e-2, step_size_up=3),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 1e-2, total_steps=20),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, 0.1, 1.0, 4), torch.optim.lr_scheduler.ExponentialLR(o, 0.9)],
        milestones=[4]),
    "ChainedScheduler": lambda o: torch.optim.lr_scheduler.ChainedScheduler(
        [torch.optim.lr_scheduler.StepLR(o, 3, 0.5), torch.optim.lr_scheduler.ExponentialLR(o, 0.95)]),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0,
                                                                             threshold=0.5),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("spec", [REGISTRY[n] for n in ("sgd", "adam", "rmsprop", "nadam", "asgd")],
                         ids=lambda s: s.name)
def test_every_lr_scheduler(spec, name):
    """Same lr trajectory, momentum/betas cycling (CyclicLR, OneCycleLR) and params as torch.optim; NAdam
    and ASGD also carry torch-only state from step to step (mu_product, eta and mu: spec.torch_carry)."""
    x, y = _digits(128)
    x = x.double()  # float64: the schedules' effect is checked to 1e-10, not through float32 rounding
    ours, theirs = _model(1).double(), _model(1).double()
    kw = {"lr": 0.01, "momentum": 0.9} if spec.name in ("sgd", "rmsprop") else {"lr": 0.01}
    if name == "CyclicLR" and spec.name in ("adam", "nadam"):
        kw["betas"] = (0.95, 0.999)
    opt = getattr(ft, spec.class_name)(ours.parameters(), **kw)
    topt = getattr(torch.optim, spec.torch_class)(theirs.parameters(), **kw)
    try:
        s2 = SCHEDULERS[name](topt)
    except ValueError as e:  # momentum cycling of an optimizer without momentum (ASGD): the same error
        with pytest.raises(ValueError, match=str(e)[:30]):
            SCHEDULERS[name](opt)
        return
    s1 = SCHEDULERS[name](opt)
    trail1, trail2 = [], []
    _train(ours, opt, x, y, 20, 32, s1, lambda t: trail1.append(dict(opt.param_groups[0])))
    _train(theirs, topt, x, y, 20, 32, s2, lambda t: trail2.append(dict(topt.param_groups[0])))
    for g1, g2 in zip(trail1, trail2):
        for key in ("lr", "momentum", "betas"):
            if key in g2:
                assert g1[key] == pytest.approx(g2[key], rel=1e-12), key
    _assert_same_params(ours, theirs, rtol=1e-10, atol=1e-10)
    assert s1.state_dict().keys() == s2.state_dict().keys()


@pytest.mark.parametrize("spec", [s for s in TORCH_SPECS if s.torch_extra_state], ids=lambda s: s.name)
def test_torch_only_state_follows_a_scheduler(spec):
    """State torch keeps besides the arrays (NAdam's mu_product, ASGD's eta and mu) has torch's values
    while StepLR changes lr, and the params follow torch's (float64)."""
    torch.manual_seed(2)
    with default_dtype(torch.float64):
        a = torch.randn(6, requires_grad=True)
        b = a.detach().clone().requires_grad_()
        opt = getattr(ft, spec.class_name)([a], 1e-2)
        topt = getattr(torch.optim, spec.torch_class)([b], 1e-2)
        s1, s2 = (torch.optim.lr_scheduler.StepLR(o, 3, 0.5) for o in (opt, topt))
        for _ in range(10):
            g = torch.randn(6)
            a.grad, b.grad = g.clone(), g.clone()
            opt.step()
            topt.step()
            s1.step()
            s2.step()
        for name in spec.torch_extra_state:
            assert opt.state[a][name].item() == pytest.approx(topt.state[b][name].item(), rel=1e-12), name
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_grad_scaler_with_injected_infs():
    """torch.amp.GradScaler hands its scale and inf flag to the fused step: a step with an inf is skipped
    (params, state and step counts unchanged), the scale backs off, and training equals torch.optim's."""
    x, y = _digits(128)
    ours, theirs = _model(3), _model(3)
    opt, topt = ft.AdamW(ours.parameters(), 3e-3), torch.optim.AdamW(theirs.parameters(), 3e-3)
    assert opt._step_supports_amp_scaling
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3) for _ in range(2)]
    for t in range(12):
        for model, o, scaler in ((ours, opt, scalers[0]), (theirs, topt, scalers[1])):
            o.zero_grad()
            xb = x[(t * 32) % 128:][:32].contiguous(memory_format=torch.channels_last)
            loss = torch.nn.functional.cross_entropy(model(xb), y[(t * 32) % 128:][:32])
            scaler.scale(loss).backward()
            if t in (2, 7):
                model.fc.weight.grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
            scaler.step(o)
            scaler.update()
            if t in (2, 7):
                assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        assert scalers[0].get_scale() == scalers[1].get_scale()
    _assert_same_params(ours, theirs)
    w = ours.fc.weight
    assert opt.state[w]["step"].item() == 10  # two steps skipped


def test_grad_scaler_after_explicit_unscale_and_clipping():
    x, y = _digits(64)
    ours, theirs = _model(4), _model(4)
    opt, topt = ft.Adam(ours.parameters(), 3e-3), torch.optim.Adam(theirs.parameters(), 3e-3)
    scalers = [torch.amp.GradScaler("cpu", init_scale=256.0) for _ in range(2)]
    for t in range(5):
        for model, o, scaler in ((ours, opt, scalers[0]), (theirs, topt, scalers[1])):
            o.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
            scaler.scale(loss).backward()
            scaler.unscale_(o)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(o)
            scaler.update()
    _assert_same_params(ours, theirs)


@pytest.mark.parametrize("direction", ["torch->fastopt", "fastopt->torch"])
@pytest.mark.parametrize("spec", TORCH_SPECS, ids=lambda s: s.name)
def test_state_dict_interchange_mid_training(spec, direction):
    x, y = _digits(128)
    first, second = (torch.optim, ft) if direction == "torch->fastopt" else (ft, torch.optim)
    name = spec.torch_class
    kw = _options(spec)
    model = _model(5)
    opt = getattr(first, name)(model.parameters(), **kw)
    _train(model, opt, x, y, 4, 32)
    sd = copy.deepcopy(opt.state_dict())
    # continue in the same library, and in the other one from the state dict
    model_b = copy.deepcopy(model)
    opt_b = getattr(second, name)(model_b.parameters(), **kw)
    opt_b.load_state_dict(sd)
    assert opt_b.state_dict()["param_groups"] == sd["param_groups"]
    a = _train(model, opt, x, y, 5, 32)
    b = _train(model_b, opt_b, x, y, 5, 32)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    _assert_same_params(model, model_b, rtol=1e-5, atol=1e-6)
    s1, s2 = opt.state_dict()["state"], opt_b.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for i in s1:
        assert s1[i].keys() == s2[i].keys()
        if "step" in s1[i]:
            assert s1[i]["step"].item() == s2[i]["step"].item() == 9


def test_torch_compile_model_with_optimizer_outside():
    model = _model(6)
    x, y = _digits(64)
    try:
        compiled = torch.compile(model)
        compiled(x[:2].contiguous(memory_format=torch.channels_last))
    except Exception as e:  # no compiler toolchain, unsupported platform...
        pytest.skip(f"torch.compile does not work on this machine: {type(e).__name__}: {str(e)[:200]}")
    reference = _model(6)
    opt, topt = ft.Adam(model.parameters(), 3e-3), torch.optim.Adam(reference.parameters(), 3e-3)
    a = _train(compiled, opt, x, y, 8, 32)
    b = _train(reference, topt, x, y, 8, 32)
    np.testing.assert_allclose(a, b, rtol=1e-4)
    _assert_same_params(model, reference)


TRAINING_SCRIPT = """
import torch
from torch.optim import AdamW
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.GELU(), torch.nn.Linear(64, 3))
opt = AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
x, y = torch.randn(512, 20), torch.randint(0, 3, (512,))
for epoch in range(40):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
print(repr(loss.item()), repr(sum(p.double().sum().item() for p in model.parameters())))
"""


def test_one_import_line_swap_of_a_training_script(tmp_path):
    swapped = TRAINING_SCRIPT.replace("from torch.optim import AdamW", "from fastopt.torch import AdamW")
    assert swapped.count("\n") == TRAINING_SCRIPT.count("\n") and swapped != TRAINING_SCRIPT
    out = []
    for text in (TRAINING_SCRIPT, swapped):
        script = tmp_path / "train.py"
        script.write_text(textwrap.dedent(text))
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True,
                             cwd=pathlib.Path(__file__).resolve().parents[1])
        out.append([float(v) for v in run.stdout.split()])
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5)


@pytest.mark.gpu  # make gpu-check runs the files with this marker
@CUDA
@pytest.mark.parametrize("spec", TORCH_SPECS, ids=lambda s: s.name)
def test_cuda_matches_torch(spec):
    torch.manual_seed(7)
    ps = [torch.randn(s, device="cuda", requires_grad=True) for s in [(1,), (1037,), (33, 5), (70001,)]]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    opt = getattr(ft, spec.class_name)(ps, **_options(spec))
    topt = getattr(torch.optim, spec.torch_class)(qs, **_options(spec))
    for _ in range(20):
        for p, q in zip(ps, qs):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        topt.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)


@pytest.mark.gpu  # make gpu-check runs the files with this marker
@CUDA
def test_cuda_channels_last_training_and_grad_scaler():
    x, y = _digits(128)
    x, y = x.cuda(), y.cuda()
    ours, theirs = _model(8).cuda(), _model(8).cuda()
    opt, topt = ft.AdamW(ours.parameters(), 3e-3), torch.optim.AdamW(theirs.parameters(), 3e-3)
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0 ** 10) for _ in range(2)]
    for t in range(10):
        for model, o, scaler in ((ours, opt, scalers[0]), (theirs, topt, scalers[1])):
            o.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
            scaler.scale(loss).backward()
            if t == 4:
                model.fc.weight.grad[0, 0] = float("inf")
            scaler.step(o)
            scaler.update()
    _assert_same_params(ours, theirs)
