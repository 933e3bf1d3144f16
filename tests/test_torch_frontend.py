"""fastopt.torch against torch.optim: every registry optimizer for 50 steps over every option combination
(float32 and float64, two param groups, some params without a grad on some steps), constructor
arguments, errors, in-place updates for every dense layout, autograd version counters, hooks, param
group edits, closures, pickling and bad input (nothing written)."""
from __future__ import annotations

import copy
import inspect
import pickle
import threading
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastopt.torch as ft  # noqa: E402
from fastopt.specs import REGISTRY, REQUIRED  # noqa: E402
from fastopt.torch import arguments  # noqa: E402

from conftest import combo_id, option_combinations  # noqa: E402
from torch_support import (FunctionalOracle, default_dtype, one_torch_thread, random_groups,  # noqa: E402,F401
                           snapshot, torch_classes, torch_kwargs)


SPECS = list(REGISTRY.values())
TORCH_SPECS = [s for s in SPECS if s.torch_class]
STEPS = 50


def _cases():
    for spec in SPECS:
        for hp in option_combinations(spec):
            yield pytest.param(spec, hp, id=f"{spec.name}[{combo_id(hp, spec)}]")


def _grads(rng, groups, t):
    """Random grads; param 1 of group 0 has none on every third step, param 0 of group 1 on steps 5-9."""
    out = []
    for gi, (_, params) in enumerate(groups):
        grads = []
        for i, p in enumerate(params):
            skip = (gi == 0 and i == 1 and t % 3 == 0) or (gi == 1 and i == 0 and 5 <= t < 10)
            grads.append(None if skip else torch.tensor(rng.standard_normal(tuple(p.shape)), dtype=p.dtype))
        out.append(grads)
    return out


def _set_grads(params_per_group, grads_per_group):
    for params, grads in zip(params_per_group, grads_per_group):
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("spec,hp", list(_cases()))
def test_matches_oracle_50_steps(spec, hp, dtype):
    rng = np.random.default_rng(abs(hash((spec.name, combo_id(hp, spec), str(dtype)))) % 2**32)
    hp = dict(hp, lr=0.01 if spec.name not in ("sgd",) else 0.05)
    with default_dtype(dtype):
        groups = random_groups(rng, dtype, spec, hp)
        ours = [[p.detach().clone().requires_grad_() for p in params] for _, params in groups]
        opt = getattr(ft, spec.class_name)([{"params": ps, **torch_kwargs(spec, ghp)}
                                            for ps, (ghp, _) in zip(ours, groups)])
        if spec.torch_class:
            theirs = [[p.detach().clone().requires_grad_() for p in params] for _, params in groups]
            ref = getattr(torch.optim, spec.torch_class)([{"params": ps, **torch_kwargs(spec, ghp)}
                                                         for ps, (ghp, _) in zip(theirs, groups)])
        else:
            oracle = FunctionalOracle(spec, groups)
        for t in range(STEPS):
            grads = _grads(rng, groups, t)
            _set_grads(ours, grads)
            opt.step()
            if spec.torch_class:
                _set_grads(theirs, grads)
                ref.step()
            else:
                oracle.step(grads)
        got = [p.detach().numpy() for ps in ours for p in ps]
        want = [p.detach().numpy() for ps in theirs for p in ps] if spec.torch_class else oracle.params()
    rtol, atol = (1e-12, 1e-12) if dtype == torch.float64 else (2e-5, 2e-6)
    if spec.name == "lamb" and dtype == torch.float64:
        rtol = atol = 1e-11  # LAMB: a few ulp from the order of its norm sums
    for a, b in zip(got, want):
        scale = max(1.0, float(np.abs(b).max(initial=0.0)))
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale)
    if spec.torch_class:  # same state, same names, same per-param step counts
        sd, tsd = opt.state_dict(), ref.state_dict()
        assert sd["param_groups"] == tsd["param_groups"]
        assert sd["state"].keys() == tsd["state"].keys()
        for i, st in tsd["state"].items():
            assert sd["state"][i].keys() == st.keys(), i
            for name, value in st.items():
                mine = sd["state"][i][name]
                if value is None:
                    assert mine is None
                    continue
                assert mine.dtype == value.dtype and mine.shape == value.shape, (i, name)
                scale = max(1.0, float(value.abs().max()) if value.numel() else 1.0)
                np.testing.assert_allclose(mine.numpy(), value.numpy(), rtol=rtol, atol=atol * scale,
                                           err_msg=f"{i}.{name}")


# --- constructor ------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", TORCH_SPECS, ids=lambda s: s.name)
def test_signature_and_defaults_are_torchs(spec):
    klass, tklass = getattr(ft, spec.class_name), getattr(torch.optim, spec.torch_class)
    ours, theirs = inspect.signature(klass.__init__).parameters, inspect.signature(tklass.__init__).parameters
    for name, tp in theirs.items():
        assert name in ours, name
        assert ours[name].kind == tp.kind, name
        assert ours[name].default == tp.default, name
    positional = [n for n, p in theirs.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert [n for n, p in ours.items() if p.kind == p.POSITIONAL_OR_KEYWORD] == positional
    for extra in ("clip_grad_norm", "skip_nonfinite"):
        assert ours[extra].kind == inspect.Parameter.KEYWORD_ONLY
    # nothing else: a group key torch fixes for the class (AdamW's decoupled_weight_decay) is not an argument,
    # nor a torch flag torch's class lacks (RMSprop's fused=: a TypeError in torch)
    assert [n for n in ours if n not in theirs and n != "self" and n not in arguments.EXTRAS] == []
    for flag in set(arguments.IGNORED_FLAGS) | set(arguments.REJECTED_FLAGS):
        if flag not in theirs:
            with pytest.raises(TypeError, match=flag):
                tklass([torch.zeros(1, requires_grad=True)], **{flag: True})
            with pytest.raises(TypeError, match=flag):
                klass([torch.zeros(1, requires_grad=True)], **{flag: True})
    p = torch.zeros(3, requires_grad=True)
    assert klass([p]).defaults == tklass([p]).defaults


@pytest.mark.parametrize("spec", [s for s in TORCH_SPECS if "betas" in s.torch_groups], ids=lambda s: s.name)
def test_list_betas_are_stored_as_torchs_constructor_stores_them(spec):
    """torch.optim.Adam/AdamW store betas given as a list as a tuple (a 1-element tensor squeezed to 0-d);
    NAdam, RAdam, Adamax keep the list: param_groups and state dicts are torch's either way."""
    klass, tklass = getattr(ft, spec.class_name), getattr(torch.optim, spec.torch_class)
    p = torch.zeros(3, requires_grad=True)
    ours = klass([p], betas=[torch.tensor([0.8]), torch.tensor([0.9])]).param_groups[0]["betas"]
    theirs = tklass([p], betas=[torch.tensor([0.8]), torch.tensor([0.9])]).param_groups[0]["betas"]
    assert type(ours) is type(theirs)
    assert [type(v) for v in ours] == [type(v) for v in theirs]
    assert [getattr(v, "shape", None) for v in ours] == [getattr(v, "shape", None) for v in theirs]


@pytest.mark.parametrize("klass", [torch.optim.AdamW, ft.AdamW])
def test_adamw_loads_an_adam_state_dict_as_torch_does(klass):
    """torch.optim.AdamW's __setstate__ sets decoupled_weight_decay=True in every group it loads (an Adam state
    dict, or one saved with the flag off); fastopt.torch.AdamW kept False and refused the next step."""
    src = torch.optim.Adam([torch.ones(3, requires_grad=True)], lr=0.1, weight_decay=0.5)
    p = torch.ones(3, requires_grad=True)
    opt = klass([p], lr=0.1)
    opt.load_state_dict(src.state_dict())
    assert opt.param_groups[0]["decoupled_weight_decay"] is True
    p.grad = torch.ones(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.85), rtol=0, atol=1e-6)  # decay 0.1*0.5, then -0.1


@pytest.mark.parametrize("betas", [np.array([0.8, 0.9]), torch.tensor([0.8, 0.9])])
def test_adam_betas_of_any_sequence_as_torch(betas):
    p = torch.zeros(3, requires_grad=True)
    ours, theirs = ft.Adam([p], betas=betas), torch.optim.Adam([p], betas=betas)
    assert type(ours.param_groups[0]["betas"]) is type(theirs.param_groups[0]["betas"]) is tuple
    assert [float(b) for b in ours.param_groups[0]["betas"]] == [float(b) for b in theirs.param_groups[0]["betas"]]


def test_adamw_refuses_the_flag_torch_fixes_for_it():
    """torch.optim.AdamW has no decoupled_weight_decay argument (TypeError) and an edit of the group key makes it
    Adam with L2 decay; fastopt.torch.AdamW took the argument, stored it and ran decoupled decay regardless.
    Now: TypeError as torch, and the edited key a ValueError naming it at the step, nothing written."""
    p = torch.ones(3, requires_grad=True)
    with pytest.raises(TypeError, match="decoupled_weight_decay"):
        torch.optim.AdamW([p], decoupled_weight_decay=False)
    with pytest.raises(TypeError, match="decoupled_weight_decay"):
        ft.AdamW([p], decoupled_weight_decay=False)
    opt = ft.AdamW([p], lr=0.1, weight_decay=0.5)
    assert opt.param_groups[0]["decoupled_weight_decay"] is True
    p.grad = torch.ones(3)
    opt.param_groups[0]["decoupled_weight_decay"] = False
    with pytest.raises(ValueError, match="decoupled_weight_decay=False .*fastopt.torch.Adam"):
        opt.step()
    assert torch.equal(p, torch.ones(3)) and not opt.state[p]
    opt.param_groups[0]["decoupled_weight_decay"] = True
    opt.step()
    assert not torch.equal(p, torch.ones(3))


@pytest.mark.parametrize("spec", TORCH_SPECS, ids=lambda s: s.name)
def test_a_state_dict_without_torchs_newer_flags_loads_as_in_torch(spec):
    """A state dict of an older torch lacks flags added since (foreach, fused, capturable, differentiable,
    decoupled_weight_decay, ...): torch's __setstate__ fills them with the defaults; ours left them out, so
    param_groups[0]['foreach'] raised KeyError."""
    klass, tklass = getattr(ft, spec.class_name), getattr(torch.optim, spec.torch_class)
    p, q = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    sd = tklass([p]).state_dict()
    for group in sd["param_groups"]:
        for key in [k for k, v in group.items() if v is None or isinstance(v, bool)]:
            del group[key]
    ours, theirs = klass([q]), tklass([p])
    ours.load_state_dict(copy.deepcopy(sd))
    theirs.load_state_dict(copy.deepcopy(sd))
    want = {k: v for k, v in theirs.param_groups[0].items() if k != "params"}
    got = {k: v for k, v in ours.param_groups[0].items() if k != "params"}
    assert got.keys() == want.keys()
    for key, value in want.items():  # torch's SGD fills fused=False where its defaults say None: both off
        assert got[key] == value or (got[key] in (None, False) and value in (None, False)), key


@pytest.mark.parametrize("spec", TORCH_SPECS, ids=lambda s: s.name)
def test_positional_arguments_mean_what_they_mean_in_torch(spec):
    names = arguments.positional_names(spec)
    defaults = arguments.group_defaults(spec)
    values = []
    for name in names:  # a changed, valid value for each positional hyperparameter
        d = defaults[name]
        if name == "betas":
            values.append((0.8, 0.99))
        elif name == "etas":
            values.append((0.4, 1.3))
        elif name == "step_sizes":
            values.append((1e-5, 20.0))
        elif isinstance(d, bool):
            values.append(d)
        elif d is None:
            values.append(None)
        else:
            values.append(float(d) * 0.5 + 0.01 if name != "lr" else 0.05)
    if spec.name == "sgd":  # nesterov needs momentum; keep the combination valid
        values[names.index("nesterov")] = False
    p = torch.zeros(2, requires_grad=True)
    ours = getattr(ft, spec.class_name)([p], *values)
    theirs = getattr(torch.optim, spec.torch_class)([p], *values)
    assert ours.param_groups[0].keys() == theirs.param_groups[0].keys()
    for k, v in theirs.param_groups[0].items():
        if k != "params":
            assert ours.param_groups[0][k] == v, k


BAD_VALUES = [("lr", -0.1), ("eps", -1.0), ("weight_decay", -0.5), ("momentum", -0.9), ("alpha", -0.1),
              ("lr_decay", -1.0), ("initial_accumulator_value", -1.0), ("momentum_decay", -0.1),
              ("betas", (1.0, 0.999)), ("betas", (0.9, -0.1)), ("etas", (1.5, 1.2)), ("etas", (0.5, 0.9)),
              # ints, echoed as given ("-1", not "-1.0")
              ("lr", -1), ("weight_decay", -2), ("eps", -1), ("betas", (1, 0.999)),
              ("nesterov", True)]  # SGD with momentum 0: torch's words only, no "(momentum=0.0, ...)"


@pytest.mark.parametrize("spec", TORCH_SPECS, ids=lambda s: s.name)
def test_invalid_values_raise_torchs_errors(spec):
    defaults = arguments.group_defaults(spec)
    checked = 0
    for name, value in BAD_VALUES:
        if name not in defaults:
            continue
        p = torch.zeros(2, requires_grad=True)
        try:
            getattr(torch.optim, spec.torch_class)([p], **{name: value})
        except ValueError as e:
            theirs = str(e)
        else:
            continue  # torch accepts it (ASGD checks few values); fastopt may refuse it, with its own message
        with pytest.raises(ValueError) as ours:
            getattr(ft, spec.class_name)([p], **{name: value})
        assert str(ours.value) == theirs
        checked += 1
    assert checked >= 1
    with pytest.raises(TypeError):
        getattr(ft, spec.class_name)([torch.zeros(1, requires_grad=True)], no_such_option=1)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_flags(spec):
    klass = getattr(ft, spec.class_name)
    p = torch.zeros(4, requires_grad=True)
    # torch's flags where torch's class takes them, every one where torch has no such class
    takes = inspect.signature(getattr(torch.optim, spec.torch_class)).parameters if spec.torch_class else None
    for flag, value in (("foreach", True), ("fused", True), ("capturable", True), ("differentiable", True)):
        if takes is not None and flag not in takes:
            with pytest.raises(TypeError, match=flag):
                klass([p], **{flag: value})
        elif flag in ("capturable", "differentiable"):
            with pytest.raises(ValueError, match=flag):
                klass([p], **{flag: value})
        else:
            klass([p], **{flag: value, **({"foreach": False} if flag == "fused" else {})})
    for bad in (0.0, -1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="clip_grad_norm"):
            klass([p], clip_grad_norm=bad)
    with pytest.raises(TypeError, match="skip_nonfinite"):
        klass([p], skip_nonfinite=1)
    with pytest.raises(TypeError):  # fastopt's extras are keyword-only
        klass([p], *([None] * 20))
    with pytest.raises(ValueError, match="empty parameter list"):
        klass([])


def test_sgd_positional_and_default_lr():
    p = torch.zeros(3, requires_grad=True)
    opt = ft.SGD([p], 0.1, 0.9)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["momentum"] == 0.9
    assert ft.SGD([p]).param_groups[0]["lr"] == 1e-3
    with pytest.raises(ValueError, match="Nesterov"):
        ft.SGD([p], 0.1, nesterov=True)


# --- the step ------------------------------------------------------------------------------------------

def test_closure_and_return_value():
    torch.manual_seed(1)
    model = torch.nn.Linear(5, 1).double()
    ref = copy.deepcopy(model)
    x, y = torch.randn(17, 5, dtype=torch.float64), torch.randn(17, 1, dtype=torch.float64)
    opt, topt = ft.Adam(model.parameters(), 0.01), torch.optim.Adam(ref.parameters(), 0.01)

    def closure_for(m, o):
        def closure():
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss
        return closure

    with torch.no_grad():  # the closure still gets gradients, as with torch.optim
        for _ in range(10):
            a, b = opt.step(closure_for(model, opt)), topt.step(closure_for(ref, topt))
            assert torch.equal(a, b) or abs(a.item() - b.item()) < 1e-12
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    assert opt.step() is None


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("spec", [REGISTRY["adamw"], REGISTRY["sgd"], REGISTRY["lamb"]], ids=lambda s: s.name)
def test_in_place_any_dense_layout(spec, memory_format):
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=memory_format)
    ref = copy.deepcopy(conv)
    w = conv.weight
    ptr, strides = w.data_ptr(), w.stride()
    kw = {"momentum": 0.9} if spec.name == "sgd" else {}
    opt = getattr(ft, spec.class_name)(conv.parameters(), lr=0.01, **kw)
    oracle_cls = getattr(torch.optim, spec.torch_class) if spec.torch_class else None
    x = torch.randn(4, 3, 9, 9).to(memory_format=memory_format)
    if oracle_cls:
        topt = oracle_cls(ref.parameters(), lr=0.01, **kw)
    for _ in range(5):
        for m in ([conv, ref] if oracle_cls else [conv]):
            m.zero_grad()
            m(x).square().mean().backward()
        assert conv.weight.grad.stride() == strides
        opt.step()
        if oracle_cls:
            topt.step()
    assert w.data_ptr() == ptr and w.stride() == strides  # updated in the param's own storage
    st = opt.state[w]
    for name, value in st.items():
        if isinstance(value, torch.Tensor) and value.dim():
            assert value.stride() == strides, name  # state keeps the param's layout
    if oracle_cls:
        torch.testing.assert_close(conv.weight, ref.weight, rtol=2e-5, atol=2e-6)


def test_grad_in_another_layout_is_correct_and_warns_once():
    torch.manual_seed(3)
    w = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last).requires_grad_()
    v = w.detach().clone().requires_grad_()  # contiguous copy, same values
    opt, topt = ft.Adam([w], 0.01), torch.optim.Adam([v], 0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            g = torch.randn(4, 3, 5, 5)  # contiguous grad for a channels_last param
            w.grad, v.grad = g.clone(), g.clone()
            opt.step()
            topt.step()
    layout_warnings = [c for c in caught if "layout" in str(c.message)]
    assert len(layout_warnings) == 1
    torch.testing.assert_close(w.detach().contiguous(), v.detach(), rtol=1e-6, atol=1e-7)


def test_version_counter_parity():
    """A graph that saved the param raises 'modified by an inplace operation' after the step, as with
    torch.optim, instead of giving a wrong gradient."""
    for make in (lambda ps: ft.SGD(ps, 0.1), lambda ps: torch.optim.SGD(ps, 0.1)):
        w = torch.ones(3, requires_grad=True)
        opt = make([w])
        loss = (w * w).sum()  # saves w for the backward pass
        w.grad = torch.ones(3)
        before = w._version
        opt.step()
        assert w._version > before
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_params_without_grads_keep_their_step_count():
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = ft.Adam([a, b], 0.1)
    a.grad = torch.ones(3)
    opt.step()
    opt.step()
    assert b not in opt.state
    b.grad = torch.ones(3)
    opt.step()
    assert opt.state[a]["step"].item() == 3 and opt.state[b]["step"].item() == 1
    a.grad = None
    before = a.detach().clone()
    opt.step()
    assert torch.equal(a, before) and opt.state[a]["step"].item() == 3


def test_zero_grad_hooks_add_param_group_and_group_edits():
    torch.manual_seed(4)
    a, b = torch.randn(5, requires_grad=True), torch.randn(6, requires_grad=True)
    ra, rb = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    opt, topt = ft.AdamW([a], lr=0.01), torch.optim.AdamW([ra], lr=0.01)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.add_param_group({"params": [b], "lr": 0.05, "betas": (0.8, 0.9)})
    topt.add_param_group({"params": [rb], "lr": 0.05, "betas": (0.8, 0.9)})
    for t in range(6):
        g1, g2 = torch.randn(5), torch.randn(6)
        a.grad, b.grad, ra.grad, rb.grad = g1.clone(), g2.clone(), g1.clone(), g2.clone()
        if t == 3:
            for o in (opt, topt):
                o.param_groups[0]["lr"] = 0.003
                o.param_groups[1]["weight_decay"] = 0.2
                o.param_groups[1]["betas"] = (0.85, 0.95)
        opt.step()
        topt.step()
        opt.zero_grad()
        assert a.grad is None and b.grad is None
    assert calls == ["pre", "post"] * 6
    torch.testing.assert_close(a, ra, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b, rb, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="learning rate"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lr": -1.0})
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_pickle_and_deepcopy_continue_identically(how):
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = ft.NAdam(model.parameters(), lr=0.01, clip_grad_norm=0.5)
    x = torch.randn(16, 4)

    def train(m, o, n):
        for _ in range(n):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()

    train(model, opt, 3)
    if how == "pickle":
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    else:
        model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.clip_grad_norm == 0.5 and type(opt2) is ft.NAdam
    train(model, opt, 4)
    train(model2, opt2, 4)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


# --- fused extras ----------------------------------------------------------------------------------------

def test_clip_grad_norm_matches_torch_clip_then_step():
    torch.manual_seed(6)
    ps = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(7,), (3, 4), (1,)]]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    opt = ft.Adam(ps, 0.01, clip_grad_norm=0.7)
    topt = torch.optim.Adam(qs, 0.01)
    for _ in range(20):
        for p, q in zip(ps, qs):
            g = torch.randn_like(p) * 3
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        torch.nn.utils.clip_grad_norm_(qs, 0.7)
        topt.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


def test_skip_nonfinite_leaves_everything_unchanged():
    a = torch.randn(5, requires_grad=True)
    opt = ft.Adam([a], 0.1, skip_nonfinite=True)
    a.grad = torch.ones(5)
    opt.step()
    before, state = a.detach().clone(), {k: v.clone() for k, v in opt.state[a].items()}
    a.grad = torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0])
    opt.step()
    assert torch.equal(a, before) and opt.skipped_steps == 1
    for k, v in opt.state[a].items():
        assert torch.equal(v, state[k]), k


# --- bad input: a clear error and nothing written ----------------------------------------------------------

def _bad_cases():
    def wrong_dtype(ps):
        ps[2].grad_dtype = None  # torch refuses the assignment otherwise
        ps[2].grad = ps[2].grad.double()

    def wrong_shape(ps):
        ps[2].grad.data = torch.ones(3)  # .data: torch checks the shape of an assigned .grad

    def sparse(ps):
        ps[2].grad = ps[2].grad.to_sparse()

    def bad_lr(opt):
        opt.param_groups[1]["lr"] = -1.0

    def bad_betas(opt):
        opt.param_groups[1]["betas"] = (0.9,)

    def capturable(opt):
        opt.param_groups[1]["capturable"] = True

    def aliased(ps):  # a grad that is its own param: the kernels would write what they read
        ps[2].grad = ps[2].data

    return [("dtype", wrong_dtype, TypeError, "dtype"), ("shape", wrong_shape, ValueError, "shape"),
            ("sparse", sparse, RuntimeError, "Adam does not support sparse gradients"),
            ("lr", bad_lr, ValueError, "learning rate"),
            ("betas", bad_betas, TypeError, "betas"), ("capturable", capturable, ValueError, "capturable"),
            ("aliased", aliased, ValueError, "shares memory")]


@pytest.mark.parametrize("name,damage,exc,match", _bad_cases(), ids=lambda c: c if isinstance(c, str) else "")
def test_bad_input_raises_and_writes_nothing(name, damage, exc, match):
    torch.manual_seed(7)
    ps = [torch.randn(s, requires_grad=True) for s in [(4,), (2, 3), (5,)]]
    opt = ft.Adam([{"params": ps[:2]}, {"params": ps[2:]}], 0.1)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in ps:
        p.grad = torch.randn_like(p)
    (damage(opt) if name in ("lr", "betas", "capturable") else damage(ps))
    params_before = snapshot(ps)
    state_before = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(ps)}
    versions = [p._version for p in ps]
    with pytest.raises(exc, match=match):
        opt.step()
    for p, q in zip(ps, params_before):
        assert torch.equal(p.detach(), q)
    assert [p._version for p in ps] == versions
    for i, p in enumerate(ps):
        for k, v in opt.state[p].items():
            assert torch.equal(v, state_before[i][k]), (i, k)


def test_unsupported_params_are_refused_at_construction():
    # (an integer param, which can have no gradient, is taken as torch takes it: test_integer_params_...)
    for dtype in (torch.complex32, torch.float8_e4m3fn):
        with pytest.raises(TypeError, match=f"float32, float64, float16, bfloat16, complex64, complex128 params on "
                                            f"CPU, got a {dtype}"):
            ft.Adam([torch.zeros(3, dtype=dtype)])
    with pytest.raises(ValueError, match="dense"):
        ft.Adam([torch.zeros(4, 4)[:, :2].requires_grad_()])


ALL_CLASSES = torch_classes()


def _lazy_outcome(klass, name, seed, lazy):
    """Three steps on a LazyLinear model whose optimizer is made before (lazy) or after its first forward:
    the params, or the exception."""
    torch.manual_seed(seed)
    model = torch.nn.LazyLinear(3, bias=name != "Muon")
    data = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 5, generator=data), torch.randn(16, 3, generator=data)  # a unique least-squares minimum
    try:
        if not lazy:
            model(x)
        opt = klass(model.parameters(), lr=0.1)
        if hasattr(opt, "train"):
            opt.train()

        def closure():
            opt.zero_grad()
            loss = (model(x) - y).square().mean()
            loss.backward()
            return loss
        for _ in range(3):
            if name == "LBFGS":
                opt.step(closure)
            else:
                closure()
                opt.step()
    except Exception as e:  # compared with torch's outcome below
        return e
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ALL_CLASSES)
def test_a_lazy_modules_params_are_taken_as_torch_takes_them(name):
    """An optimizer made before a LazyModule's first forward (its params UninitializedParameters) trains as
    one made after it, bit for bit; where torch refuses such params (Adagrad's state made in the
    constructor, Muon's 2-D rule) fastopt refuses them with the same exception class."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    lazy = _lazy_outcome(getattr(ft, name), name, seed, lazy=True)
    theirs = getattr(torch.optim, name, None)
    if theirs is not None:
        theirs = _lazy_outcome(theirs, name, seed, lazy=True)
        if isinstance(theirs, Exception):
            assert type(lazy) is type(theirs), (lazy, theirs)
            return
        assert not isinstance(lazy, Exception), lazy
        # (LBFGS: its dot products are BLAS sums, in another order than torch's, and 60 iterations amplify the
        # difference, as without a lazy module: at most 3.5e-4 over 300 seeds)
        tol = {"rtol": 1e-3, "atol": 1e-3} if name == "LBFGS" else {"rtol": 1e-5, "atol": 1e-6}
        for a, b in zip(lazy, theirs):
            torch.testing.assert_close(a, b, **tol, msg=f"seed {seed}")
    assert not isinstance(lazy, Exception), lazy
    for a, b in zip(lazy, _lazy_outcome(getattr(ft, name), name, seed, lazy=False)):
        assert torch.equal(a, b), f"seed {seed}"


@pytest.mark.parametrize("name", ALL_CLASSES)
def test_a_tensor_subclass_without_memory_of_its_own_is_refused_and_nothing_changes(name):
    """A wrapper subclass (DTensor's kind: elements in inner tensors) is refused with a TypeError naming it, at
    construction or at the step, before anything is written (torch's error was ".numpy() is not supported")."""
    from torch.testing._internal.two_tensor import TwoTensor
    rng = np.random.default_rng()
    plain = torch.nn.Parameter(torch.tensor(rng.standard_normal((3, 4)), dtype=torch.float32))
    wrapped = torch.nn.Parameter(TwoTensor(torch.ones(3, 4), torch.ones(3, 4)))
    klass = getattr(ft, name)
    if name == "SparseAdam":  # (refuses the dense grads first, as torch)
        pytest.skip("SparseAdam takes only sparse grads")
    try:
        opt = klass([plain, wrapped], lr=0.1)
    except TypeError as e:
        assert "got a TwoTensor, a tensor subclass" in str(e)
        return
    plain.grad = torch.ones(3, 4)
    wrapped.grad = TwoTensor(torch.ones(3, 4), torch.ones(3, 4))
    before, state = plain.detach().clone(), copy.deepcopy(opt.state_dict())
    with pytest.raises(TypeError, match="got a TwoTensor, a tensor subclass"):
        opt.step((lambda: torch.tensor(1.0)) if name == "LBFGS" else None)
    assert torch.equal(plain, before) and repr(opt.state_dict()) == repr(state)


@pytest.mark.parametrize("name", [n for n in ALL_CLASSES if n not in ("LBFGS", "SparseAdam")])
def test_a_frozen_wrapper_param_is_taken_as_torch_takes_it(name):
    """A frozen param held in a wrapper subclass (a quantized base weight beside trainable adapters, passed in
    as model.parameters()) gets no grad: taken as torch.optim takes it and never read; the adapter's update
    is the one without it, bit for bit. (LBFGS views every param, as torch's flattens every param.)"""
    from torch.testing._internal.two_tensor import TwoTensor
    rng = np.random.default_rng()
    start, grad = (torch.tensor(rng.standard_normal((3, 4)), dtype=torch.float32) for _ in range(2))
    frozen = torch.nn.Parameter(TwoTensor(torch.ones(3, 4), torch.ones(3, 4)), requires_grad=False)
    updated = []
    for params in ([frozen], []):
        adapter = torch.nn.Parameter(start.clone())
        opt = getattr(ft, name)(params + [adapter], lr=0.1)
        for _ in range(3):
            adapter.grad = grad.clone()
            opt.step()
        updated.append(adapter.detach())
    assert torch.equal(updated[0], updated[1]) and not torch.equal(updated[0], start)
    assert torch.equal(frozen.a, torch.ones(3, 4)) and torch.equal(frozen.b, torch.ones(3, 4))


@pytest.mark.parametrize("where", ["one group", "two groups"])
@pytest.mark.parametrize("name", [n for n in ALL_CLASSES if n != "LBFGS"])
def test_a_param_listed_twice_is_refused_at_the_step_naming_both_places(name, where):
    """A param with a grad listed twice (torch.optim warns when the group is added and updates it twice a step;
    an edit of param_groups can put it in two groups) is refused at the step, before anything is written, in
    the words of both places; after steps on the steady path too. Without a grad it is skipped, as by torch."""
    rng = np.random.default_rng()
    ps = [torch.nn.Parameter(torch.tensor(rng.standard_normal((3, 4)), dtype=torch.float32)) for _ in range(3)]
    opt = getattr(ft, name)([{"params": ps[:2]}, {"params": ps[2:]}], lr=0.1)

    def set_grads():
        for p in ps:
            g = torch.tensor(rng.standard_normal((3, 4)), dtype=torch.float32)
            p.grad = g.to_sparse() if name == "SparseAdam" else g
    for _ in range(2):
        set_grads()
        opt.step()
    if where == "one group":
        opt.param_groups[0]["params"].append(ps[0])
        seen, again = "param_groups[0]['params'][0]", "param_groups[0]['params'][2]"
    else:
        opt.param_groups[1]["params"].append(ps[1])
        seen, again = "param_groups[0]['params'][1]", "param_groups[1]['params'][1]"
    set_grads()
    before, state = snapshot(ps), copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError) as raised:
        opt.step()
    assert str(raised.value).startswith(f"{again} is the param already listed as {seen}: list each param once")
    assert all(torch.equal(p, q) for p, q in zip(ps, before)) and repr(opt.state_dict()) == repr(state)
    twice = 0 if where == "one group" else 1
    ps[twice].grad = None
    opt.step()  # a param without a grad is skipped wherever it is listed
    assert torch.equal(ps[twice], before[twice])
    assert not any(torch.equal(ps[i], before[i]) for i in range(3) if i != twice)


def test_lbfgs_with_a_param_listed_twice_steps_as_torchs():
    """torch's LBFGS flattens the listed params, a duplicate included, and so does fastopt's: the same result."""
    x0 = torch.tensor(np.random.default_rng().standard_normal(5))
    out = []
    for klass in (torch.optim.LBFGS, ft.LBFGS):
        p = torch.nn.Parameter(x0.clone())
        with pytest.warns(UserWarning, match="duplicate parameters"):
            opt = klass([p, p], lr=0.5)

        def closure():
            opt.zero_grad()
            loss = ((p - 1) ** 4).sum() + p.square().sum()
            loss.backward()
            return loss
        for _ in range(3):
            opt.step(closure)
        out.append(p.detach().clone())
    torch.testing.assert_close(out[1], out[0], rtol=1e-12, atol=1e-12)
    assert not torch.equal(out[1], x0)


def test_importing_fastopt_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, fastopt; assert 'torch' not in sys.modules; import fastopt.torch; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_float32_cpu_steps_do_not_import_ml_dtypes_or_the_cuda_sources():
    """ml_dtypes (about 1 s to import) and the CUDA sources (which import it) load on use only: not for
    float32 CPU params; a bfloat16 param brings ml_dtypes in."""
    import subprocess
    import sys
    code = ("import sys, torch, fastopt.torch as ft\n"
            "p = torch.nn.Parameter(torch.zeros(3)); opt = ft.AdamW([p]); p.grad = torch.ones(3); opt.step()\n"
            "assert 'ml_dtypes' not in sys.modules and 'fastopt.backends.cuda_source' not in sys.modules\n"
            "q = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16)); ft.AdamW([q])\n"
            "assert 'ml_dtypes' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- cached views follow every change -------------------------------------------------------------------

def _swap_param_data(opt, ps, t):
    ps[1].data = ps[1].data.clone() * 0.5  # a new storage for the param


def _edit_step_in_place(opt, ps, t):
    opt.state[ps[0]]["step"].fill_(2.0)  # torch reads the count from the tensor


def _replace_state_tensor(opt, ps, t):
    opt.state[ps[2]]["exp_avg"] = torch.ones_like(ps[2]) * 0.1


def _edit_state_in_place(opt, ps, t):
    opt.state[ps[2]]["exp_avg_sq"].mul_(2.0)


def _reload_older_state(opt, ps, t):
    opt.load_state_dict(opt._test_saved)


def _keep_grads(opt, ps, t):
    pass  # grads accumulate into the same tensors (set_to_none=False), the cached grad views are used


EVENTS = [_swap_param_data, _edit_step_in_place, _replace_state_tensor, _edit_state_in_place,
          _reload_older_state, _keep_grads]


@pytest.mark.parametrize("event", EVENTS, ids=lambda f: f.__name__.strip("_"))
def test_cached_views_follow_changes(event):
    """Whatever is changed between steps (param storage, step counts, state tensors, a loaded state dict,
    grads kept or replaced), fastopt.torch computes what torch.optim computes."""
    torch.manual_seed(8)
    with default_dtype(torch.float64):
        ours = [torch.randn(s, requires_grad=True) for s in [(5,), (3, 4), (7,)]]
        theirs = [p.detach().clone().requires_grad_() for p in ours]
        opt, topt = ft.Adam(ours, 0.01), torch.optim.Adam(theirs, 0.01)
        keep = event is _keep_grads
        for t in range(12):
            for o, ps in ((opt, ours), (topt, theirs)):
                if t == 2:
                    o._test_saved = copy.deepcopy(o.state_dict())
                if t in (5, 8):
                    event(o, ps, t)
            for o, ps in ((opt, ours), (topt, theirs)):
                o.zero_grad(set_to_none=not keep)
                g = [torch.randn(p.shape, generator=torch.Generator().manual_seed(t * 10 + i)) for i, p in enumerate(ps)]
                for p, gi in zip(ps, g):
                    if keep and p.grad is not None:
                        p.grad.add_(gi)
                    else:
                        p.grad = gi
                o.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


def test_swapped_in_grad_of_another_shape_is_refused_after_caching():
    ps = [torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)]
    opt = ft.Adam(ps, 0.1)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    before = snapshot(ps)
    ps[1].grad.data = torch.ones(5)
    with pytest.raises(ValueError, match="shape"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, before))


def test_one_kernel_call_per_group_dtype_and_step_count(monkeypatch):
    """Group 0 holds float32 and float64 params, one of which has missed a step; group 1 one dtype: four
    calls in all, and the OpenMP threads follow torch.get_num_threads() during the step only."""
    from fastopt.backends import cython_backend
    import fastopt
    calls = []
    real_run = cython_backend.run

    def counting_run(prepared, spec, hp, step, grad_scale):
        calls.append((step, cython_backend.threads_here()))
        return real_run(prepared, spec, hp, step, grad_scale)

    a32, b32 = torch.randn(4, requires_grad=True), torch.randn(5, requires_grad=True)
    c64 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    d32, e32 = torch.randn(6, requires_grad=True), torch.randn(2, requires_grad=True)
    opt = ft.Adam([{"params": [a32, b32, c64]}, {"params": [d32, e32]}], 0.01)
    for p in (a32, c64, d32, e32):
        p.grad = torch.randn_like(p)
    opt.step()  # b32 has no grad: it stays at count 0
    b32.grad = torch.randn_like(b32)
    threads_before = fastopt.get_num_threads()
    monkeypatch.setattr(cython_backend, "run", counting_run)
    torch.set_num_threads(1)
    opt.step()
    # group 0: float32 at count 1 (a32), float32 at count 0 (b32), float64 (c64); group 1: one call
    assert sorted(step for step, _ in calls) == [1, 2, 2, 2]
    assert all(threads == 1 for _, threads in calls)
    assert fastopt.get_num_threads() == threads_before


def test_threads_past_fastopts_cap_run_at_the_cap(monkeypatch):
    """torch takes any thread count (torch.set_num_threads(100000) is accepted); the step runs on
    fastopt's largest, 1024, rather than refusing or starting 100000 OpenMP threads."""
    from fastopt.backends import cython_backend
    import fastopt
    seen = []
    real_run = cython_backend.run

    def recording_run(*args, **kwargs):
        seen.append(cython_backend.threads_here())
        return real_run(*args, **kwargs)

    p = torch.ones(10, requires_grad=True)
    p.grad = torch.ones(10)
    opt = ft.SGD([p], lr=0.5)
    before = fastopt.get_num_threads()
    monkeypatch.setattr(cython_backend, "run", recording_run)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 100000)
    opt.step()
    assert seen == [cython_backend.MAX_THREADS] == [1024]
    assert fastopt.get_num_threads() == before
    assert torch.equal(p.detach(), torch.full((10,), 0.5))


@pytest.mark.parametrize("skip", [False, True])
def test_norms_and_update_share_one_thread_override(monkeypatch, skip):
    """With clipping and skipping, the grads' norms and the update run on torch's thread count under one
    override per step (set once, put back once), also when the step is skipped or its kernel raises."""
    from fastopt.backends import cython_backend
    real_override, real_sumsq, real_run = (cython_backend.override_threads, cython_backend.sumsq_per_tensor,
                                           cython_backend.run)
    overrides, seen = [], []

    def counting_override(n):
        overrides.append(n)
        return real_override(n)

    def sumsq(*args, **kwargs):
        seen.append(("norm", cython_backend.threads_here()))
        return real_sumsq(*args, **kwargs)

    def run(*args, **kwargs):
        seen.append(("update", cython_backend.threads_here()))
        return real_run(*args, **kwargs)

    p = torch.randn(37, requires_grad=True)
    q = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    opt = ft.AdamW([p, q], lr=0.01, clip_grad_norm=0.5, skip_nonfinite=True)
    for step in range(3):
        p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
        if skip and step == 2:
            q.grad[1, 2] = float("inf")
        before = cython_backend.threads_here()
        monkeypatch.setattr(cython_backend, "override_threads", counting_override)
        monkeypatch.setattr(cython_backend, "sumsq_per_tensor", sumsq)
        monkeypatch.setattr(cython_backend, "run", run)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
        overrides.clear()
        seen.clear()
        opt.step()
        monkeypatch.undo()
        assert overrides[0] == 3 and len(overrides) == 2, overrides
        assert cython_backend.threads_here() == before
        kinds = [k for k, _ in seen]
        assert kinds == ["norm", "norm"] + ([] if skip and step == 2 else ["update", "update"]), kinds
        assert all(n == 3 for _, n in seen), seen
    assert opt.skipped_steps == (1 if skip else 0)

    def failing(*args, **kwargs):
        raise RuntimeError("kernel failed")
    p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
    before = cython_backend.threads_here()
    monkeypatch.setattr(cython_backend, "run", failing)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    with pytest.raises(RuntimeError, match="kernel failed"):
        opt.step()
    monkeypatch.undo()
    assert cython_backend.threads_here() == before


def test_set_num_threads_during_a_step_is_kept(monkeypatch):
    """The step ran on torch's thread count by setting the process-wide count and putting the old one back
    afterwards: a set_num_threads from another thread during the step was undone (41 of 50 trials). The count
    is now this thread's alone (cython_backend.thread_count)."""
    from fastopt.backends import cython_backend
    import fastopt
    if not cython_backend.AVAILABLE:
        pytest.skip("the compiled extension is not built")
    real_run = cython_backend.run
    before = fastopt.get_num_threads()
    changed = 2 if before != 2 else 3
    seen = []

    def run_while_another_thread_sets(*args, **kwargs):
        worker = threading.Thread(target=fastopt.set_num_threads, args=(changed,))
        worker.start()
        worker.join()
        seen.append((cython_backend.threads_here(), fastopt.get_num_threads()))
        return real_run(*args, **kwargs)

    p = torch.ones(10, requires_grad=True)
    p.grad = torch.ones(10)
    opt = ft.SGD([p], lr=0.5)
    monkeypatch.setattr(cython_backend, "run", run_while_another_thread_sets)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    try:
        opt.step()
        assert seen == [(1, changed)]  # this step on torch's 1, the process-wide count the other thread's
        assert fastopt.get_num_threads() == changed and cython_backend.threads_here() == changed
    finally:
        fastopt.set_num_threads(before)


@pytest.mark.parametrize("edit,exc,match", [
    ({"lr": "0.1"}, TypeError, "lr"), ({"eps": float("nan")}, ValueError, "epsilon"),
    ({"weight_decay": -1.0}, ValueError, "weight_decay"), ({"betas": (0.9, None)}, TypeError, "beta2"),
    ({"amsgrad": "yes"}, TypeError, "amsgrad"), ({"lr": torch.ones(2)}, ValueError, "Tensor lr must be 1-element")])
def test_bad_group_edits_raise_and_write_nothing(edit, exc, match):
    ps = [torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)]
    opt = ft.Adam([{"params": ps[:1]}, {"params": ps[1:]}], 0.01)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    before = snapshot(ps)
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]
    opt.param_groups[1].update(edit)
    with pytest.raises(exc, match=match):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, before))
    for p, st in zip(ps, states):
        assert all(torch.equal(opt.state[p][k], v) for k, v in st.items())


def test_state_dict_with_plain_number_steps_and_a_bad_step():
    """Old torch state dicts keep `step` as a number: it is read and becomes torch's tensor (as torch.optim
    does); a step that is no number is a TypeError before anything is written."""
    torch.manual_seed(9)
    with default_dtype(torch.float64):
        a = torch.randn(4, requires_grad=True)
        b = a.detach().clone().requires_grad_()
        opt, topt = ft.Adam([a], 0.01), torch.optim.Adam([b], 0.01)
        for o, p in ((opt, a), (topt, b)):
            p.grad = torch.ones(4)
            o.step()
            sd = copy.deepcopy(o.state_dict())
            sd["state"][0]["step"] = 1  # a plain number
            o.load_state_dict(sd)
            p.grad = torch.full((4,), 0.5)
            o.step()
        assert isinstance(opt.state[a]["step"], torch.Tensor) and opt.state[a]["step"].item() == 2
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
        opt.state[a]["step"] = "two"
        before = a.detach().clone()
        with pytest.raises(TypeError, match="step count"):
            opt.step()
        assert torch.equal(a, before)


@pytest.mark.parametrize("spec", TORCH_SPECS, ids=lambda s: s.name)
def test_a_state_dict_without_flags_loads_as_in_torch(spec):
    """A saved group without the bool flags (an older torch, another library's state dict): torch.optim's
    __setstate__ fills them with their defaults, and so does fastopt.torch; both then step alike."""
    hp = {h.name: 0.01 for h in spec.hypers if h.default is REQUIRED}
    flags = [h.name for h in spec.hypers if h.kind == "bool"]
    torch.manual_seed(13)
    with default_dtype(torch.float64):
        a = torch.randn(5, requires_grad=True)
        b = a.detach().clone().requires_grad_()
        ours = getattr(ft, spec.class_name)([a], **torch_kwargs(spec, dict(spec.defaults, **hp)))
        theirs = getattr(torch.optim, spec.torch_class)([b], **torch_kwargs(spec, dict(spec.defaults, **hp)))
        for o, p in ((ours, a), (theirs, b)):
            p.grad = torch.ones(5)
            o.step()
            sd = copy.deepcopy(o.state_dict())
            for k in flags:
                sd["param_groups"][0].pop(k, None)
            o.load_state_dict(sd)
            assert all(o.param_groups[0].get(k) == spec.defaults[k] for k in flags if k in theirs.param_groups[0])
            p.grad = torch.full((5,), 0.5)
            o.step()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_params_removed_from_the_groups_are_let_go():
    import gc
    import weakref
    kept, dropped = torch.randn(5, requires_grad=True), torch.randn(1000, requires_grad=True)
    opt = ft.Adam([kept, dropped], 0.01)
    for _ in range(3):
        kept.grad, dropped.grad = torch.randn(5), torch.randn(1000)
        opt.step()
    ref = weakref.ref(dropped)
    opt.param_groups[0]["params"] = [kept]
    del opt.state[dropped]
    dropped = None
    kept.grad = torch.randn(5)
    opt.step()
    gc.collect()
    assert ref() is None  # no cached view keeps the removed param (or its storage) alive


def test_a_removed_param_group_is_let_go():
    import gc
    import weakref
    kept, dropped = torch.randn(5, requires_grad=True), torch.randn(1000, requires_grad=True)
    opt = ft.SGD([{"params": [kept]}, {"params": [dropped]}], 0.01, momentum=0.9)
    for _ in range(3):
        kept.grad, dropped.grad = torch.randn(5), torch.randn(1000)
        opt.step()
    ref = weakref.ref(dropped)
    del opt.param_groups[1]
    del opt.state[dropped]
    dropped = None
    kept.grad = torch.randn(5)
    opt.step()
    gc.collect()
    assert ref() is None


def test_load_state_dict_keeps_fastopt_options():
    a = torch.randn(4, requires_grad=True)
    opt = ft.Adam([a], 0.01, clip_grad_norm=0.25, skip_nonfinite=True)
    a.grad = torch.tensor([1.0, float("inf"), 0.0, 0.0])
    opt.step()
    a.grad = torch.ones(4)
    opt.step()
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert (opt.clip_grad_norm, opt.skip_nonfinite, opt.skipped_steps) == (0.25, True, 1)


@pytest.mark.parametrize("spec", TORCH_SPECS, ids=lambda s: s.name)
def test_integer_params_are_taken_as_torch_takes_them(spec):
    """An integer counter registered as an nn.Parameter (requires_grad=False) sits in model.parameters():
    torch.optim takes it and never updates it; the constructor refused it. The float params train as with
    torch, and the state dicts go both ways."""
    def model():
        torch.manual_seed(5)
        m = torch.nn.Linear(3, 2, dtype=torch.float64)
        m.register_parameter("counter", torch.nn.Parameter(torch.zeros((), dtype=torch.long), requires_grad=False))
        return m
    ours, theirs = model(), model()
    kwargs = {"lr": 0.01}
    opt, topt = getattr(ft, spec.class_name)(ours.parameters(), **kwargs), getattr(torch.optim, spec.torch_class)(
        theirs.parameters(), **kwargs)
    x = torch.randn(4, 3, dtype=torch.float64)
    for _ in range(3):
        for m, o in ((ours, opt), (theirs, topt)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=0)
    assert int(ours.counter) == 0
    getattr(torch.optim, spec.torch_class)(theirs.parameters(), **kwargs).load_state_dict(opt.state_dict())
    ft_loaded = getattr(ft, spec.class_name)(ours.parameters(), **kwargs)
    ft_loaded.load_state_dict(topt.state_dict())
    ours.counter.grad = torch.ones((), dtype=torch.long)  # a grad set by hand: refused at the step
    with pytest.raises(TypeError, match="got a torch.int64 param"):
        opt.step()


@pytest.mark.parametrize("make_grad", [lambda: torch.randn(1, 3, dtype=torch.float64).expand(4, 3),
                                       lambda: torch.randn(4, 6, dtype=torch.float64)[:, ::2],
                                       lambda: torch.randn(3, 4, dtype=torch.float64).t()],
                         ids=["expanded", "strided", "transposed"])
def test_grads_not_in_the_params_layout_are_copied_in(make_grad):
    """A grad set by hand or by a hook need not be dense (an expanded or a sliced tensor): torch.optim takes
    it; it was refused ("not dense"). Now copied into the param's layout, with one warning, as a grad in
    another dense layout."""
    torch.manual_seed(7)
    p = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt, topt = ft.Adam([p], lr=0.01), torch.optim.Adam([q], lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            g = make_grad()
            p.grad, q.grad = g, g.clone()
            opt.step()
            topt.step()
    torch.testing.assert_close(p, q, rtol=1e-12, atol=0)
    assert sum("copied into the param's layout" in str(w.message) for w in caught) == 1


def test_adagrad_fills_new_state_from_the_constructors_value_as_torch():
    """torch fills Adagrad's sum from the constructor's initial_accumulator_value (optimizer.defaults), for
    the constructor's params and for state made later (a group added, a param's state deleted), whatever a
    group says; the group's own value filled it here."""
    def run(module):
        torch.manual_seed(3)
        w, b = (torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in range(2))
        opt = module.Adagrad([{"params": [w], "initial_accumulator_value": 2.0}], lr=0.1, initial_accumulator_value=0.5)
        opt.add_param_group({"params": [b], "initial_accumulator_value": 3.0})
        for t in range(4):
            if t == 2:
                del opt.state[w]
                opt.param_groups[0]["initial_accumulator_value"] = 9.0
            for p in (w, b):
                p.grad = torch.full_like(p, t + 1.0)
            opt.step()
        return w, b, opt
    if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13):
        # torch 2.11's Adagrad makes its state in __init__ only: a param added later has no "sum" (KeyError)
        pytest.skip(f"torch {torch.__version__}'s Adagrad fills its state at construction only (2.13 fills it lazily)")
    ours, theirs = run(ft), run(torch.optim)
    for p, q in zip(ours[:2], theirs[:2]):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=0)
        torch.testing.assert_close(ours[2].state[p]["sum"], theirs[2].state[q]["sum"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("spec", [s for s in TORCH_SPECS if any(h.kind == "bool" for h in s.hypers)],
                         ids=lambda s: s.name)
def test_zero_and_one_are_taken_for_flags_as_torch_takes_them(spec):
    """nesterov=1, amsgrad=0 (a config file's flags) are refused by nothing in torch.optim; the same
    updates as the bools here. Other values stay refused (torch would take any truthy object)."""
    flags = [h.name for h in spec.hypers if h.kind == "bool"]
    extra = {"momentum": 0.9} if spec.torch_class == "SGD" else {}
    for value in (0, 1):
        with default_dtype(torch.float64):
            torch.manual_seed(9)
            p = torch.randn(5, requires_grad=True)
            q = p.detach().clone().requires_grad_()
            opt = getattr(ft, spec.class_name)([p], lr=0.01, **extra, **{f: value for f in flags})
            topt = getattr(torch.optim, spec.torch_class)([q], lr=0.01, **extra, **{f: bool(value) for f in flags})
            for t in range(3):
                p.grad = q.grad = torch.full((5,), t + 1.0)
                opt.step()
                topt.step()
            torch.testing.assert_close(p, q, rtol=1e-12, atol=0)
    with pytest.raises(TypeError, match=f"{flags[0]} must be a bool, got 2"):
        getattr(ft, spec.class_name)([p], lr=0.01, **extra, **{flags[0]: 2})  # torch's own checks pass


@pytest.mark.parametrize("source", ["torch", "fastopt"])
def test_asgd_continues_as_torch_after_a_state_dict_load(source):
    """torch's load casts ASGD's eta and mu to float64 for float64 params, then keeps storing
    torch.as_tensor(a Python float) in them: float32 values. fastopt stored exact float64 ones, 2e-8 apart
    after a few steps; now the same values (spec.torch_as_tensor)."""
    with default_dtype(torch.float32):  # torch.as_tensor's dtype: the default one
        torch.manual_seed(2)
        p = torch.randn(6, dtype=torch.float64, requires_grad=True)
        q = p.detach().clone().requires_grad_()
        kw = {"lr": 0.1, "lambd": 1e-2, "t0": 3.0}
        first = (torch.optim if source == "torch" else ft).ASGD([q if source == "torch" else p], **kw)
        for t in range(4):
            (q if source == "torch" else p).grad = torch.full((6,), t + 1.0, dtype=torch.float64)
            first.step()
        if source == "torch":
            p.data.copy_(q.detach())
        else:
            q.data.copy_(p.detach())
        sd = copy.deepcopy(first.state_dict())
        opt, topt = ft.ASGD([p], **kw), torch.optim.ASGD([q], **kw)
        opt.load_state_dict(copy.deepcopy(sd))
        topt.load_state_dict(copy.deepcopy(sd))
        for t in range(6):
            p.grad = q.grad = torch.linspace(-1, 1, 6, dtype=torch.float64) * (t + 1)
            opt.step()
            topt.step()
        torch.testing.assert_close(p, q, rtol=1e-12, atol=0)
        for key in ("eta", "mu", "ax"):
            assert opt.state[p][key].dtype == topt.state[q][key].dtype
            torch.testing.assert_close(opt.state[p][key], topt.state[q][key], rtol=0, atol=0)


def _stepped(cls, n=3, **kw):
    p = torch.randn(3, requires_grad=True)
    opt = cls([p], lr=0.1, **kw)
    for _ in range(n):
        p.grad = torch.ones(3)
        opt.step()
    return p, opt


@pytest.mark.parametrize("damage", ["list", "None", "missing"])
@pytest.mark.parametrize("name,key", [("Adam", "exp_avg"), ("Adagrad", "sum"), ("NAdam", "mu_product"),
                                      ("ASGD", "ax"), ("ScheduleFreeAdamW", "z")])
def test_a_stepped_params_missing_state_is_refused_not_restarted(name, key, damage):
    """A loaded state dict without one of a stepped param's state tensors (or with a list or None there) made a
    fresh zero tensor at the next step while the count went on: another trajectory, silently (torch.optim
    raises there). SGD's momentum_buffer of None restarts, as torch's."""
    import copy
    p, opt = _stepped(getattr(ft, name))
    sd = copy.deepcopy(opt.state_dict())
    if damage == "missing":
        del sd["state"][0][key]
    else:
        sd["state"][0][key] = None if damage == "None" else [1.0, 2.0]
    opt.load_state_dict(sd)
    before, state = p.detach().clone(), copy.deepcopy(opt.state_dict())
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=f"state '{key}' of params\\[0\\] is .* but the param has taken steps"):
        opt.step()
    assert torch.equal(p.detach(), before)
    assert repr(opt.state_dict()) == repr(state)


@pytest.mark.parametrize("name", ["Adam", "NAdam", "ASGD", "Adagrad", "RAdam"])
def test_a_stepped_params_state_without_its_step_is_refused(name):
    """A state dict whose 'step' of a param was lost (its moments still there) loaded and stepped from count 1:
    the bias correction restarted over moments of 3 steps, silently (torch.optim raises KeyError)."""
    import copy
    p, opt = _stepped(getattr(ft, name))
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][0]["step"]
    opt.load_state_dict(sd)
    before, state = p.detach().clone(), copy.deepcopy(opt.state_dict())
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"state 'step' of params\[0\] is missing but the param has taken steps"):
        opt.step()
    assert torch.equal(p.detach(), before) and repr(opt.state_dict()) == repr(state)


def test_sgd_momentum_buffer_that_is_no_tensor_is_refused():
    """SGD's momentum_buffer set to a list was dropped and the momentum restarted from the gradient (None
    restarts it, as in torch; torch fails on a list)."""
    p, opt = _stepped(ft.SGD, momentum=0.9)
    opt.state[p]["momentum_buffer"] = [5.0, 5.0, 5.0]
    before = p.detach().clone()
    p.grad = torch.ones(3)
    with pytest.raises(TypeError, match=r"state 'momentum_buffer' of params\[0\] is a list, not a tensor"):
        opt.step()
    assert torch.equal(p.detach(), before) and opt.state[p]["momentum_buffer"] == [5.0, 5.0, 5.0]
    opt.state[p]["momentum_buffer"] = None
    opt.step()
    assert torch.equal(opt.state[p]["momentum_buffer"], torch.ones(3))


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
def test_a_stepped_params_missing_8bit_state_is_refused(key):
    import copy
    p, opt = _stepped(ft.Adam, state_dtype="int8")
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][0][key], sd["state"][0][key + "_absmax"]
    opt.load_state_dict(sd)
    before = p.detach().clone()
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=f"state '{key}' of params\\[0\\] is missing but the param has taken"):
        opt.step()
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("name,key", [("ASGD", "eta"), ("NAdam", "mu_product")])
def test_a_torch_only_scalar_deleted_after_steps_is_refused_before_any_write(name, key):
    """A cached param skips _plan's state checks; the carried scalar deleted from its state then raised KeyError
    (before this, after the params were written)."""
    p, opt = _stepped(getattr(ft, name), n=4)
    del opt.state[p][key]
    before = p.detach().clone()
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=f"state '{key}' of params\\[0\\] is missing"):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_momentum_buffers_are_made_when_momentum_comes_later():
    """SGD's momentum_buffer of None restarts, as torch's; LARS (fastopt's) makes its buffer when momentum is
    switched on after steps (a momentum warm-up), as before the missing-state refusal."""
    import copy
    q, sgd = _stepped(ft.SGD, momentum=0.9)
    sd = copy.deepcopy(sgd.state_dict())
    sd["state"][0]["momentum_buffer"] = None
    sgd.load_state_dict(sd)
    q.grad = torch.ones(3)
    sgd.step()
    assert torch.equal(sgd.state[q]["momentum_buffer"], torch.ones(3))
    w = torch.randn(4, 3, requires_grad=True)
    lars = ft.LARS([w], lr=0.1, momentum=0.0)
    for _ in range(3):
        w.grad = torch.randn(4, 3)
        lars.step()
    lars.param_groups[0]["momentum"] = 0.9
    w.grad = torch.randn(4, 3)
    lars.step()
    assert isinstance(lars.state[w]["momentum_buffer"], torch.Tensor)


@pytest.mark.parametrize("bad,error,words", [
    (None, TypeError, "got None"), ("3", TypeError, "got '3' \\(str\\)"),
    (10 ** 400, ValueError, "too large for a float"), (torch.ones(3), TypeError, "shape \\(3,\\)"),
    (np.array(2.0), TypeError, "got a ndarray"), (np.array([2.0]), TypeError, "got a ndarray"),
    (True, TypeError, "got True"), (float("nan"), ValueError, "whole number >= 0, got nan"),
    (2.5, ValueError, "whole number >= 0, got 2.5"), (torch.tensor(-3.0), ValueError, "whole number >= 0, got -3.0")])
@pytest.mark.parametrize("name", ["Adam", "Adafactor", "SparseAdam", "Muon"])
def test_a_bad_saved_step_is_refused_at_load_with_nothing_replaced(name, bad, error, words):
    """torch converts the counts after swapping the state in: Adafactor kept a damaged state (every later
    step failed), the registry classes failed at the next step with an AttributeError/OverflowError."""
    import copy
    p = torch.randn(4, 3, requires_grad=True)
    opt = getattr(ft, name)([p], lr=0.01)
    for _ in range(2):
        p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.ones(2, 3), (4, 3)) if name == "SparseAdam" \
            else torch.randn(4, 3)
        opt.step()
    good = copy.deepcopy(opt.state_dict())
    sd = copy.deepcopy(good)
    sd["state"][0]["step"] = bad
    with pytest.raises(error, match=r"state_dict\['state'\]\[0\]\['step'\] .*" + words):
        opt.load_state_dict(sd)
    assert repr(opt.state_dict()) == repr(good)
    sd = copy.deepcopy(good)
    sd["state"][0] = torch.ones(3)
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[0\] must be a dict of the param's state"):
        opt.load_state_dict(sd)
    assert repr(opt.state_dict()) == repr(good)


@pytest.mark.parametrize("name,key", [("Muon", "momentum_buffer"), ("SparseAdam", "exp_avg"),
                                      ("Adafactor", "row_var")])
def test_composite_state_that_is_not_a_tensor_is_refused_at_load(name, key):
    import copy
    p = torch.randn(4, 3, requires_grad=True)
    opt = getattr(ft, name)([p], lr=0.01)
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 3), (4, 3)) if name == "SparseAdam" \
        else torch.randn(4, 3)
    opt.step()
    good = copy.deepcopy(opt.state_dict())
    for bad in ([1.0], None):
        sd = copy.deepcopy(good)
        sd["state"][0][key] = bad
        with pytest.raises(TypeError, match=rf"state_dict\['state'\]\[0\]\['{key}'\] must be a tensor"):
            opt.load_state_dict(sd)
        assert repr(opt.state_dict()) == repr(good)
    if name == "SparseAdam":  # a missing moment: named at the step, before any write (KeyError before)
        sd = copy.deepcopy(good)
        del sd["state"][0][key]
        opt.load_state_dict(sd)
        before = p.detach().clone()
        p.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 3), (4, 3))
        with pytest.raises(ValueError, match="has no 'exp_avg'"):
            opt.step()
        assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("spec", list(REGISTRY.values()), ids=lambda s: s.name)
def test_share_memory_where_torch_has_it(spec):
    """torch.optim.Adagrad.share_memory() (Hogwild training) puts the state in shared memory; the steps after it
    update the shared tensors and go on as torch's. The other classes lack it, as torch's do."""
    torch_class = getattr(torch.optim, spec.torch_class or "", None)
    klass = getattr(ft, spec.class_name)
    if not hasattr(torch_class, "share_memory"):
        assert not hasattr(klass, "share_memory")
        return
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(2 ** 31)))
    ours = [torch.randn(n, generator=gen, dtype=torch.float64, requires_grad=True) for n in (1, 17)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    a, b = klass(ours, lr=0.1), torch_class(theirs, lr=0.1)
    for i in range(5):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            q.grad = p.grad.clone()
        a.step()
        b.step()
        if i == 1:
            a.share_memory()
            b.share_memory()
            shared = [a.state[p][name] for p in ours for name in a.state[p] if name != "step"]
            assert shared and all(t.is_shared() for t in shared)
            before = [t.clone() for t in shared]
    assert all(not torch.equal(t, old) and t.is_shared() for t, old in zip(shared, before))
    now = [a.state[p][name] for p in ours for name in a.state[p] if name != "step"]
    assert len(now) == len(shared) and all(x is y for x, y in zip(now, shared))  # the same tensors, updated
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)
        for name in a.state[p]:
            torch.testing.assert_close(a.state[p][name], b.state[q][name], rtol=1e-12, atol=1e-15)
