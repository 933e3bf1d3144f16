"""The steady-state path of fastopt.torch (fastopt/torch/steady.py): after two steps planned in full, a
step whose only change is new grads reuses the last step's kernel calls. Every change that is not only
new grads must be seen: the results equal torch.optim's whatever happens between steps, bad grads are
refused with the full plan's messages and nothing written, and the short path really is taken."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastopt.torch as ft  # noqa: E402
from fastopt.torch.optimizer import TorchOptimizer  # noqa: E402
from tests.torch_support import default_dtype, one_torch_thread  # noqa: E402,F401  (autouse fixture)

SHAPES = [(5,), (3, 4), (2, 3, 2, 2), (1,), (7,)]


def _make(seed, shapes=SHAPES, channels_last=False):
    torch.manual_seed(seed)
    ours = [torch.randn(s, requires_grad=True) for s in shapes]
    if channels_last:
        ours = [p.detach().to(memory_format=torch.channels_last).requires_grad_() if p.dim() == 4 else p for p in ours]
    theirs = [p.detach().clone(memory_format=torch.preserve_format).requires_grad_() for p in ours]
    return ours, theirs


def _grads(ps, t, skip=()):
    out = []
    for i, p in enumerate(ps):
        if i in skip:
            out.append(None)
            continue
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * t + i), dtype=p.dtype)
        out.append(g.to(memory_format=torch.channels_last) if p.dim() == 4 and not p.is_contiguous() else g)
    return out


# events applied to both optimizers (ours and torch's) at chosen steps ----------------------------------
def _lr_scheduler(o, ps, t, sched={}):
    for g in o.param_groups:
        g["lr"] = 0.01 * (0.9 ** t)


def _betas_list_in_place(o, ps, t):
    g = o.param_groups[0]
    if not isinstance(g["betas"], list):
        g["betas"] = list(g["betas"])
    g["betas"][0] = 0.8 if t % 2 else 0.85


def _maximize_toggles(o, ps, t):
    o.param_groups[1]["maximize"] = not o.param_groups[1]["maximize"]


def _weight_decay_changes(o, ps, t):
    o.param_groups[0]["weight_decay"] = 0.01 * t


def _append_param(o, ps, t):
    if len(o.param_groups[1]["params"]) == 2:  # the last param joins group 1 in place
        o.param_groups[1]["params"].append(o._test_extra)


def _add_group(o, ps, t):
    if len(o.param_groups) == 2:
        o.add_param_group({"params": [o._test_extra], "lr": 0.02})


def _replace_params_list(o, ps, t):
    o.param_groups[0]["params"] = list(reversed(o.param_groups[0]["params"]))


def _new_state_dict(o, ps, t):
    o.state[ps[0]] = {k: v.clone() for k, v in o.state[ps[0]].items()}


def _step_tensor_replaced(o, ps, t):
    o.state[ps[1]]["step"] = torch.tensor(20.0, dtype=o.state[ps[1]]["step"].dtype)


def _step_count_written_through_data(o, ps, t):
    o.state[ps[1]]["step"].data.fill_(2.0)  # autograd's version counter does not see it


def _step_count_as_int64(o, ps, t):
    o.state[ps[2]]["step"] = torch.tensor(int(o.state[ps[2]]["step"]))  # a converted checkpoint's; torch counts on


def _grad_dtype_cast(o, ps, t):
    pass  # see the grads below: handled in the test


EVENTS = [_lr_scheduler, _betas_list_in_place, _maximize_toggles, _weight_decay_changes, _append_param,
          _add_group, _replace_params_list, _new_state_dict, _step_tensor_replaced, _step_count_written_through_data,
          _step_count_as_int64]


@pytest.mark.parametrize("event", EVENTS, ids=lambda f: f.__name__.strip("_"))
def test_changes_between_steps_match_torch(event):
    with default_dtype(torch.float64):
        ours, theirs = _make(3)
        extra_ours, extra_theirs = torch.randn(4, requires_grad=True), None
        extra_theirs = extra_ours.detach().clone().requires_grad_()
        opts = []
        for klass, ps, extra in ((ft.Adam, ours, extra_ours), (torch.optim.Adam, theirs, extra_theirs)):
            o = klass([{"params": ps[:3]}, {"params": ps[3:]}], lr=0.01)
            o._test_extra = extra
            opts.append((o, ps + [extra]))
        for t in range(1, 14):
            for o, ps in opts:
                if t in (4, 5, 9):
                    event(o, ps, t)
                grads = _grads(ps, t)
                for p, g in zip(ps, grads):
                    p.grad = g
                o.step()
        for p, q in zip(opts[0][1], opts[1][1]):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
        for p, q in zip(opts[0][1], opts[1][1]):
            for k, v in opts[1][0].state[q].items():
                torch.testing.assert_close(opts[0][0].state[p][k], v, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name,kwargs", [("SGD", {"momentum": 0.9, "nesterov": True}), ("Adam", {}),
                                         ("AdamW", {"amsgrad": True}), ("NAdam", {}), ("ASGD", {}),
                                         ("RMSprop", {"momentum": 0.5, "centered": True}), ("Adagrad", {})])
@pytest.mark.parametrize("pattern", ["new grads", "kept grads", "grads come and go", "channels_last"])
def test_many_steps_match_torch(name, kwargs, pattern):
    """50 steps, float64: new grad tensors each step (zero_grad's default), grads accumulated into the
    same tensors, params whose grad is None on some steps, and channels_last conv weights."""
    with default_dtype(torch.float64):
        ours, theirs = _make(11, channels_last=pattern == "channels_last")
        opt, topt = getattr(ft, name)(ours, lr=0.01, **kwargs), getattr(torch.optim, name)(theirs, lr=0.01, **kwargs)
        rng = np.random.default_rng(5)
        for t in range(1, 51):
            skip = set(rng.choice(len(ours), size=2, replace=False).tolist()) if (
                pattern == "grads come and go" and t % 7 == 3) else set()
            for o, ps in ((opt, ours), (topt, theirs)):
                keep = pattern == "kept grads"
                o.zero_grad(set_to_none=not keep)
                for i, (p, g) in enumerate(zip(ps, _grads(ps, t, skip))):
                    if g is None:
                        p.grad = None
                    elif keep and p.grad is not None:
                        p.grad.copy_(g)
                    else:
                        p.grad = g
                o.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


def test_momentum_switched_on_and_off_matches_torch():
    """A change of options that changes which states are in use (SGD's momentum buffer) plans in full."""
    with default_dtype(torch.float64):
        ours, theirs = _make(4)
        opt, topt = ft.SGD(ours, lr=0.05), torch.optim.SGD(theirs, lr=0.05)
        for t in range(1, 16):
            for o, ps in ((opt, ours), (topt, theirs)):
                if t in (5, 11):
                    o.param_groups[0]["momentum"] = 0.9 if t == 5 else 0.0
                for p, g in zip(ps, _grads(ps, t)):
                    p.grad = g
                o.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


def test_short_path_is_taken_and_left_on_any_change(monkeypatch):
    """Steps 1 and 2 are planned in full (the state is made, then the entries cached); from step 3 on
    only changes that are not new grads plan in full again."""
    calls = []
    real = TorchOptimizer._plan

    def counting(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(TorchOptimizer, "_plan", counting)
    ps = [torch.randn(4, requires_grad=True), torch.randn(2, 3, requires_grad=True)]
    opt = ft.AdamW(ps, lr=0.01)

    def step():
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()

    for _ in range(10):
        step()
    assert len(calls) == 2
    opt.param_groups[0]["lr"] = 0.005  # a scheduler's change: still the short path
    step()
    assert len(calls) == 2
    opt.state[ps[0]]["exp_avg"] = opt.state[ps[0]]["exp_avg"].clone()  # a new state tensor: planned in full
    step()
    assert len(calls) == 3
    step()
    step()
    assert len(calls) == 3  # the full plan cached the new tensor's entry: short again
    ps[1].grad = None
    opt.step()
    assert len(calls) == 4
    step()
    step()
    assert len(calls) == 5  # the grad is back: one full plan (its count lags: a second call), then short
    ps[1].data = ps[1].data.clone()  # new storage for a param
    step()
    assert len(calls) == 6


def _other_dtype(p):
    p.grad_dtype = None  # torch refuses a grad of another dtype unless told so
    p.grad = p.grad.to(torch.float64)


def _other_shape(p):
    p.grad.data = torch.zeros(p.numel() + 1)  # .data skips torch's shape check


def _other_layout(p):
    p.grad = p.grad.t().contiguous().t()  # transposed strides: copied into the param's layout, correct


def _sparse(p):
    p.grad = p.grad.to_sparse()


def _needs_autograd(p):
    p.grad = p.grad.clone().requires_grad_()  # as after backward(create_graph=True): fine


@pytest.mark.parametrize("damage,exc,match", [
    (_other_dtype, TypeError, "dtype"), (_other_shape, ValueError, "shape"), (_other_layout, None, None),
    (_sparse, RuntimeError, "Adam does not support sparse gradients"), (_needs_autograd, None, None)],
    ids=lambda c: getattr(c, "__name__", ""))
def test_bad_grads_in_the_steady_state_raise_and_write_nothing(damage, exc, match):
    ours, theirs = _make(21, shapes=[(3,), (4, 5)])
    opt, topt = ft.Adam(ours, lr=0.01), torch.optim.Adam(theirs, lr=0.01)
    for t in range(1, 6):
        for o, ps in ((opt, ours), (topt, theirs)):
            for p, g in zip(ps, _grads(ps, t)):
                p.grad = g
            if t == 4:
                damage(ps[1])
            if t == 4 and exc is not None:
                if o is opt:
                    before = [p.detach().clone() for p in ps]
                    state = {k: v.clone() for k, v in opt.state[ps[1]].items()}
                    with pytest.raises(exc, match=match):
                        o.step()
                    assert all(torch.equal(p, q) for p, q in zip(ps, before))
                    assert all(torch.equal(opt.state[ps[1]][k], v) for k, v in state.items())
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # the layout copy's warning
                o.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_grad_shares_memory_with_a_param_in_the_steady_state():
    ps = [torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)]
    opt = ft.SGD(ps, lr=0.1, momentum=0.9)
    for _ in range(4):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    before = [p.detach().clone() for p in ps]
    ps[1].grad = ps[0].detach()  # the grad of one param is another param's storage
    with pytest.raises(ValueError, match="shares memory"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, before))


@pytest.mark.parametrize("name, key", [("NAdam", "mu_product"), ("ASGD", "eta"), ("ASGD", "mu"), ("Adam", "step")])
def test_scalar_state_written_through_data_is_seen(name, key):
    """A count or carried value written through .data (no version bump) was overwritten with the cached
    one on the short path: silently another trajectory than torch's."""
    with default_dtype(torch.float64):
        ours, theirs = _make(17)
        opt, topt = getattr(ft, name)(ours, lr=0.01), getattr(torch.optim, name)(theirs, lr=0.01)
        for t in range(1, 12):
            for o, ps in ((opt, ours), (topt, theirs)):
                if t in (5, 8):
                    data = o.state[ps[0]][key].data
                    data.fill_(2.0) if key == "step" else data.mul_(0.5)
                for p, g in zip(ps, _grads(ps, t)):
                    p.grad = g
                o.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
            torch.testing.assert_close(opt.state[p][key], topt.state[q][key], rtol=1e-12, atol=0)


def _changed(v):  # new values in new memory: a step count stays a whole number
    return v.detach() + 100 if v.numel() == 1 and v.dim() == 0 else v.detach() * 0.5


_SWAPS = {  # a state tensor kept, its memory replaced (a "move the optimizer state" helper, pinning, offload)
    "data_clone": lambda v: setattr(v, "data", v.data.clone()),
    "data_changed": lambda v: setattr(v, "data", _changed(v)),
    "set_changed": lambda v: v.set_(_changed(v)),
}


@pytest.mark.parametrize("swap", list(_SWAPS))
@pytest.mark.parametrize("path", ["steady", "full_plan"])
@pytest.mark.parametrize("name, key", [("Adam", "exp_avg"), ("Adam", "step"), ("AdamW", "exp_avg_sq"),
                                       ("NAdam", "mu_product"), ("ASGD", "ax"), ("Rprop", "step_size"),
                                       ("SGD", "momentum_buffer")])
def test_state_memory_replaced_under_a_kept_tensor_is_followed(name, key, path, swap):
    """`state[key].data = ...` or set_() keeps the tensor and replaces its memory. The cached kernel views
    kept reading and writing the old memory: opt.state and state_dict() froze (a saved step count of 3 after 8
    steps) and the params left torch's trajectory (by 0.1). Both paths: the short one (only the grads change)
    and the full plan (here forced by a param without a grad on the step of the swap)."""
    with default_dtype(torch.float64):
        seed = int(np.random.SeedSequence().entropy % 2**31)
        ours, theirs = _make(seed)
        kw = {"momentum": 0.9} if name == "SGD" else {}
        opt, topt = getattr(ft, name)(ours, lr=0.01, **kw), getattr(torch.optim, name)(theirs, lr=0.01, **kw)
        for t in range(1, 10):
            for o, ps in ((opt, ours), (topt, theirs)):
                if t in (4, 7):
                    _SWAPS[swap](o.state[ps[0]][key])
                skip = (2,) if path == "full_plan" and t in (4, 7) else ()
                for p, g in zip(ps, _grads(ps, t, skip)):
                    p.grad = g
                o.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
            for k in topt.state[q]:
                torch.testing.assert_close(opt.state[p][k], topt.state[q][k], rtol=1e-12, atol=1e-15)
        saved = opt.state_dict()["state"][0]
        torch.testing.assert_close(saved[key], topt.state_dict()["state"][0][key], rtol=1e-12, atol=1e-15)


@pytest.mark.filterwarnings("ignore:fastopt.torch. the gradient of param")  # contiguous grads of permuted params
@pytest.mark.parametrize("path", ["steady", "full_plan"])
@pytest.mark.parametrize("change", ["transpose", "transpose_back", "permute_4d"])
def test_same_memory_in_another_layout_is_followed(change, path):
    """`p.data = p.data.t()` keeps the memory and its address and swaps the strides: the cached views paired
    a contiguous grad with the old memory order (0.4 from torch after two more steps)."""
    with default_dtype(torch.float64):
        seed = int(np.random.SeedSequence().entropy % 2**31)
        shapes = [(4, 4), (3,), (2, 3, 3, 3), (5, 5)]
        ours, theirs = _make(seed, shapes)
        opt, topt = ft.Adam(ours, lr=0.1), torch.optim.Adam(theirs, lr=0.1)
        for t in range(1, 9):
            for o, ps in ((opt, ours), (topt, theirs)):
                if t == 4:
                    if change == "permute_4d":
                        ps[2].data = ps[2].data.permute(0, 2, 3, 1)  # the same memory, another order
                    else:
                        ps[0].data = ps[0].data.t()
                        ps[3].data = ps[3].data.t()
                if t == 6 and change == "transpose_back":
                    ps[0].data = ps[0].data.t()
                skip = (1,) if path == "full_plan" and t in (4, 6) else ()
                for i, p in enumerate(ps):  # contiguous grads, whatever the param's layout
                    p.grad = None if i in skip else torch.randn(
                        p.shape, generator=torch.Generator().manual_seed(1000 * t + i), dtype=p.dtype)
                o.step()
        for p, q in zip(ours, theirs):
            assert p.stride() == q.stride()
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", ["Adam", "NAdam", "SGD"])
def test_steps_under_inference_mode_match_torch(name):
    """State made under torch.inference_mode has no version counter: the second step raised after the
    params were written."""
    with default_dtype(torch.float64):
        ours, theirs = _make(19)
        kwargs = {"momentum": 0.9} if name == "SGD" else {}
        opt, topt = getattr(ft, name)(ours, lr=0.01, **kwargs), getattr(torch.optim, name)(theirs, lr=0.01, **kwargs)
        for t in range(1, 6):
            for o, ps in ((opt, ours), (topt, theirs)):
                for p, g in zip(ps, _grads(ps, t)):
                    p.grad = g
                with torch.inference_mode():
                    o.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("bad", [torch.tensor(True), torch.tensor(1 + 0j)])
def test_a_step_count_that_cannot_count_is_refused_before_any_write(bad):
    p = torch.ones(3, requires_grad=True)
    opt = ft.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    opt.state[p]["step"] = bad
    before = p.detach().clone(), opt.state[p]["exp_avg"].clone()
    with pytest.raises(TypeError, match=f"a step count in the optimizer state has dtype {bad.dtype}"):
        opt.step()
    assert torch.equal(p.detach(), before[0]) and torch.equal(opt.state[p]["exp_avg"], before[1])


@pytest.mark.parametrize("name", ["ScheduleFreeAdamW", "ScheduleFreeSGD", "ASGD"])
def test_torch_only_state_past_float32_range_is_inf_on_both_paths(name):
    """A valid lr of 1e308 makes schedule-free's carried lr_max and weight_sum (ASGD's eta) overflow the float32
    state: the full path's fill_ raised after the kernels had written the params, the steady path's NumPy store
    warned. Both now store inf (as torch.as_tensor does) without a warning, and agree."""
    cls = getattr(ft, name)
    states = []
    for warm in (1, 2):  # the step under test on the full path, then on the steady one
        torch.manual_seed(0)
        ps = [torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)]
        opt = cls([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.01)
        for _ in range(warm):
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
        opt.param_groups[1]["lr"] = 1e308
        for p in ps:
            p.grad = torch.ones_like(p)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step()
        scalars = {k: v for k, v in opt.state[ps[1]].items() if k != "step" and v.dim() == 0}
        assert any(torch.isinf(v) for v in scalars.values()), scalars
        states.append({k: float(v) for k, v in scalars.items()})
    assert states[0] == states[1]
