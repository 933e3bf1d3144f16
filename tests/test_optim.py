"""The optimizer classes: several param groups, mixed dtypes, schedules, 50 steps, against the functional
API (bit for bit) and the NumPy reference; constructor and step errors leave every array unchanged."""
from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest

import fastopt
from fastopt import reference, schedules
from fastopt.specs import REGISTRY

# Per optimizer: the hyperparameters of groups 1 and 2 (group 0 takes the constructor's defaults);
# together they exercise every optional state and most flags.
GROUP_OPTIONS = {
    "sgd": [{"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}, {"momentum": 0.5, "dampening": 0.1,
                                                                        "maximize": True}],
    "adagrad": [{"lr_decay": 0.01, "weight_decay": 0.01, "initial_accumulator_value": 0.1},
                {"eps": 1e-6, "maximize": True}],
    "rmsprop": [{"centered": True, "momentum": 0.9}, {"momentum": 0.5, "weight_decay": 0.01}],
    "adam": [{"amsgrad": True, "weight_decay": 0.01, "decoupled_weight_decay": True},
             {"betas": (0.8, 0.99), "maximize": True, "weight_decay": 0.02}],
    "adamw": [{"amsgrad": True}, {"betas": (0.85, 0.995), "weight_decay": 0.1}],
    "nadam": [{"decoupled_weight_decay": True, "weight_decay": 0.01}, {"momentum_decay": 1e-2}],
    "radam": [{"decoupled_weight_decay": True, "weight_decay": 0.01}, {"betas": (0.9, 0.9)}],
    "adabelief": [{"decoupled_weight_decay": False, "weight_decay": 0.01}, {"eps": 1e-12}],
    "lamb": [{"bias_correction": False, "weight_decay": 0.01}, {"maximize": True}],
    "lion": [{"weight_decay": 0.1}, {"betas": (0.95, 0.98)}],
}
BASE_LR = {"sgd": 0.02, "adagrad": 0.05, "rmsprop": 0.005, "lion": 1e-3}


def group_options(spec):
    """GROUP_OPTIONS for a spec, generated where the table has no row (a new optimizer): group 1 turns
    every flag on and adds weight decay, group 2 maximizes with other betas."""
    if spec.name in GROUP_OPTIONS:
        return GROUP_OPTIONS[spec.name]
    names = {h.name for h in spec.hypers}
    first = {h.name: not h.default for h in spec.hypers if h.kind == "bool" and h.name != "maximize"}
    if "weight_decay" in names:
        first["weight_decay"] = 0.01
    second = {"maximize": True} if "maximize" in names else {}
    if "beta1" in names:
        second["betas"] = (0.85, 0.99)
    return [first, second]

SPECS = list(REGISTRY.values())


def make_groups(rng, name):
    """Three groups: float32 arrays; a float64 + float32 mix (two kernel calls); float64 with a schedule."""
    shapes = [(7,), (33, 5), (2, 3, 4), (1,), (129,), (4, 4)]
    arrays = []
    for i, shape in enumerate(shapes):
        dtype = [np.float32, np.float32, np.float64, np.float32, np.float64, np.float64][i]
        arrays.append(rng.standard_normal(shape).astype(dtype))
    lr = BASE_LR.get(name, 1e-2)
    groups = [{"params": arrays[0:2]},
              {"params": arrays[2:4], "lr": lr / 2, **group_options(REGISTRY[name])[0]},
              {"params": arrays[4:6], "lr": schedules.warmup(schedules.cosine(lr, 40), 5), **group_options(REGISTRY[name])[1]}]
    return groups, lr


def functional_hp(spec, defaults, group, count):
    """Registry-named hyperparameters of a class group, for the functional API / the reference."""
    merged = dict(defaults, **{k: v for k, v in group.items() if k != "params"})
    hp = {}
    for h in spec.hypers:
        if h.name == "beta1":
            hp["beta1"] = merged["betas"][0] if "betas" in merged else h.default
        elif h.name == "beta2":
            hp["beta2"] = merged["betas"][1] if "betas" in merged else h.default
        else:
            hp[h.name] = merged.get(h.name, h.default)
    if callable(hp["lr"]):
        hp["lr"] = hp["lr"](count)
    return hp


def run_functional(spec, groups, lr, grads_per_step, *, use_reference=False):
    """Apply the same steps with one functional (or reference) call per array."""
    params = [[p.copy() for p in g["params"]] for g in groups]
    options = [functional_hp(spec, {"lr": lr}, g, 0) for g in groups]
    states = [[fastopt.init_state(spec.name, p, **{k: hp[k] for k in spec.state_options}) for p in ps]
              for ps, hp in zip(params, options)]
    if use_reference:  # the reference's own starting values (Adagrad's initial_accumulator_value)
        for group_states, hp in zip(states, options):
            for st in group_states:
                for name, a in st.items():
                    fill = reference.initial_state(spec.name, name, **hp)
                    if fill != "param":  # "param": a copy of the param, as init_state made it
                        a[...] = fill
    fn = reference.STEPS[spec.name] if use_reference else getattr(fastopt, spec.function_name)
    for t, grads in enumerate(grads_per_step, start=1):
        k = 0
        for gi, group in enumerate(groups):
            hp = functional_hp(spec, {"lr": lr}, group, t - 1)
            if spec.uses_step:
                hp["step"] = t
            for p, st in zip(params[gi], states[gi]):
                fn(p, grads[k], **st, **hp)
                k += 1
    return [p for ps in params for p in ps], states


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_class_matches_functional_and_reference_over_50_steps(spec, rng):
    rng = rng
    groups, lr = make_groups(rng, spec.name)
    cls = getattr(fastopt, spec.class_name)
    opt = cls([dict(g, params=[p.copy() for p in g["params"]]) for g in groups], lr=lr)
    all_params = [p for g in groups for p in g["params"]]
    steps = [[rng.standard_normal(p.shape).astype(p.dtype) for p in all_params] for _ in range(50)]
    for grads in steps:
        assert opt.step(grads) is True
    expected, states = run_functional(spec, groups, lr, steps)
    for got, want in zip(opt.params, expected):
        np.testing.assert_array_equal(got, want)
    # the state arrays too (the class keeps them by flat param index)
    flat_states = [s for ss in states for s in ss]
    for i, want in enumerate(flat_states):
        got = opt.state_arrays(i)
        assert set(got) == set(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    # and the independent NumPy reference (LAMB float64 may differ in the last ulp per step)
    ref, _ = run_functional(spec, groups, lr, steps, use_reference=True)
    for got, want in zip(opt.params, ref):
        tol = 1e-5 if got.dtype == np.float32 else 1e-10
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    assert [opt.steps(i) for i in range(3)] == [50, 50, 50]
    assert opt.last_lr[2] == pytest.approx(groups[2]["lr"](49))


def test_signatures_follow_torch_names():
    sig = inspect.signature(fastopt.Adam)
    assert sig.parameters["betas"].default == (0.9, 0.999)
    assert sig.parameters["lr"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert sig.parameters["eps"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD  # torch's order
    assert sig.parameters["decoupled_weight_decay"].kind is inspect.Parameter.KEYWORD_ONLY  # after torch's *
    assert inspect.signature(fastopt.LAMB).parameters["eps"].kind is inspect.Parameter.KEYWORD_ONLY
    for spec in SPECS:
        params = inspect.signature(getattr(fastopt, spec.class_name)).parameters
        names = {h.name for h in spec.hypers}
        if "beta1" in names:
            assert "betas" in params and "beta1" not in params
        for opt_name in ("clip_grad_norm", "skip_nonfinite", "backend"):
            assert opt_name in params
        assert getattr(fastopt, spec.class_name).__doc__.startswith(spec.summary)
        positional = [n for n, p in params.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        assert positional == ["params", *spec.positional_hypers]
        assert spec.positional_hypers[0] == "lr"
        if spec.torch_positional is not None:  # a prefix of torch's order
            assert tuple(spec.torch_positional[:len(spec.positional_hypers)]) == spec.positional_hypers


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_positional_arguments_mean_what_they_mean_in_torch(spec, rng):
    """cls(p, a, b, c...) builds the same groups as cls(p, lr=a, <torch's second>=b, ...)."""
    values = {"lr": 0.03, "momentum": 0.7, "dampening": 0.0, "weight_decay": 0.02, "nesterov": True,
              "lr_decay": 0.01, "initial_accumulator_value": 0.2, "eps": 1e-5, "alpha": 0.9, "centered": True,
              "betas": (0.8, 0.95), "amsgrad": True, "momentum_decay": 5e-3, "decoupled_weight_decay": True}
    hypers = {h.name: h for h in spec.hypers}

    def value(name):  # the table's value, else one derived from the default (a registry-generic row)
        if name in values:
            return values[name]
        h = hypers[name]
        return (not h.default) if h.kind == "bool" else (h.default * 0.5 if h.default else 0.01)

    args = [value(name) for name in spec.positional_hypers]
    cls = getattr(fastopt, spec.class_name)
    by_position = cls([rng.standard_normal(3)], *args)
    by_name = cls([rng.standard_normal(3)], **dict(zip(spec.positional_hypers, args)))
    strip = lambda g: {k: v for k, v in g.items() if k != "params"}  # noqa: E731
    assert strip(by_position.param_groups[0]) == strip(by_name.param_groups[0])
    for name, value in zip(spec.positional_hypers, args):
        assert by_position.param_groups[0][name] == value
    with pytest.raises(TypeError):  # one more positional than torch's order allows is refused
        cls([rng.standard_normal(3)], *args, 0.5)


def test_sgd_positional_momentum_and_default_lr(rng):
    p = rng.standard_normal(4)
    opt = fastopt.SGD([p], 0.1, 0.9)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["momentum"] == 0.9
    assert fastopt.SGD([p.copy()]).param_groups[0]["lr"] == 1e-3  # torch.optim.SGD's default


def test_zero_grad_is_harmless_and_says_why(rng):
    p = rng.standard_normal(4)
    before = p.copy()
    opt = fastopt.Adam([p])
    assert opt.zero_grad() is None and opt.zero_grad(set_to_none=False) is None
    assert p.tobytes() == before.tobytes()
    doc = fastopt.Optimizer.zero_grad.__doc__
    assert "step(grads)" in doc and "fastopt.torch" in doc


def test_one_kernel_call_per_group_and_dtype(monkeypatch, rng):
    from fastopt.backends import dispatch
    calls = []
    real = dispatch.backend_for

    class Spy:
        def __init__(self, be):
            self.be = be

        def __getattr__(self, name):  # prepare, check_disjoint, ...: the real backend's
            return getattr(self.be, name)

        def run(self, prepared, spec, hp, step, grad_scale):
            calls.append(len(prepared.lists[0]) if hasattr(prepared, "lists") else len(prepared))
            return self.be.run(prepared, spec, hp, step, grad_scale)

    monkeypatch.setattr(fastopt.optim, "backend_for", lambda p, b=None: Spy(real(p, b)))
    groups, lr = make_groups(rng, "adam")
    opt = fastopt.Adam(groups, lr=lr)
    opt.step([np.ones_like(p) for p in opt.params])
    # group 0: 2 float32; group 1: 1 float64 + 1 float32; group 2: 2 float64
    assert sorted(calls) == sorted([2, 1, 1, 2])


def snapshot(opt):
    out = [p.copy() for p in opt.params]
    for i in range(len(opt.params)):
        out += [s.copy() for s in opt.state_arrays(i).values()]
    return out


def assert_unchanged(opt, before):
    after = snapshot(opt)
    assert len(after) == len(before)
    for a, b in zip(after, before):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("bad, error, match", [
    ("grad_count", ValueError, "grads has 5 arrays"),
    ("grad_shape", ValueError, r"grads\[4\] has shape"),
    ("grad_dtype", TypeError, r"grads\[5\] has dtype float32"),
    ("grad_noncontig", ValueError, r"grads\[4\] is not C-contiguous"),
    ("lr_group2", ValueError, "Invalid learning rate: -0.5"),
    ("beta_group1", ValueError, "Invalid beta2 value: 1.5"),
    ("schedule_nan", ValueError, "Invalid learning rate: nan"),
])
def test_step_errors_name_the_argument_and_change_nothing(bad, error, match, rng):
    groups, lr = make_groups(rng, "adam")
    opt = fastopt.Adam(groups, lr=lr)
    good = [rng.standard_normal(p.shape).astype(p.dtype) for p in opt.params]
    opt.step(good)  # state is non-zero from here on
    grads = list(good)
    if bad == "grad_count":
        grads = grads[:5]
    elif bad == "grad_shape":
        grads[4] = np.zeros(130, grads[4].dtype)
    elif bad == "grad_dtype":
        grads[5] = grads[5].astype(np.float32)
    elif bad == "grad_noncontig":
        grads[4] = np.zeros(258, grads[4].dtype)[::2]
    elif bad == "lr_group2":
        opt.param_groups[2]["lr"] = -0.5
    elif bad == "beta_group1":
        opt.param_groups[1]["betas"] = (0.9, 1.5)
    elif bad == "schedule_nan":
        opt.param_groups[2]["lr"] = lambda count: float("nan")
    before = snapshot(opt)
    with pytest.raises(error, match=match):
        opt.step(grads)
    assert_unchanged(opt, before)
    assert opt.steps(0) == 1


@pytest.mark.parametrize("kwargs, error, match", [
    ({"lr": -1.0}, ValueError, "Invalid learning rate: -1.0"),
    ({"betas": (0.9,)}, TypeError, "betas must be a pair"),
    ({"betas": (1.0, 0.999)}, ValueError, "Invalid beta1 value: 1.0"),
    ({"eps": float("inf")}, ValueError, "Invalid epsilon value: inf"),
    ({"amsgrad": 1}, TypeError, "amsgrad must be a bool"),
    ({"clip_grad_norm": -1.0}, ValueError, "Invalid clip_grad_norm: -1.0"),
    ({"skip_nonfinite": "yes"}, TypeError, "skip_nonfinite must be a bool"),
])
def test_constructor_errors(kwargs, error, match, rng):
    p = rng.standard_normal(10)
    before = p.copy()
    with pytest.raises(error, match=match):
        fastopt.Adam([p], **kwargs)
    assert p.tobytes() == before.tobytes()


def test_constructor_errors_misc(rng):
    p = rng.standard_normal(10).astype(np.float32)
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum"):
        fastopt.SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) beta1 in param group 0"):
        fastopt.Adam([{"params": [p], "beta1": 0.5}])
    with pytest.raises(TypeError, match="unexpected keyword argument 'momentum'"):
        fastopt.Adam([p], momentum=0.9)
    with pytest.raises(ValueError, match="appears in more than one place"):
        fastopt.Adam([{"params": [p]}, {"params": [p]}])
    with pytest.raises(ValueError, match="empty parameter list"):
        fastopt.Adam([])
    with pytest.raises(TypeError, match=r"params\[0\] must be an array"):
        fastopt.Adam(["not an array"])
    with pytest.raises(TypeError, match="base class"):
        fastopt.Optimizer([p], {})


def test_single_array_and_defaults_from_constructor(rng):
    p = rng.standard_normal((5, 3))
    g = rng.standard_normal((5, 3))
    q, m, v = p.copy(), np.zeros_like(p), np.zeros_like(p)
    opt = fastopt.AdamW(p, lr=0.01, betas=(0.8, 0.9), weight_decay=0.2)
    opt.step(g)
    fastopt.adamw_step(q, g, m, v, step=1, lr=0.01, beta1=0.8, beta2=0.9, weight_decay=0.2)
    np.testing.assert_array_equal(p, q)  # updated in the caller's memory
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.param_groups[0]["weight_decay"] == 0.2


def test_editing_a_group_between_steps_takes_effect(rng):
    """Hyperparameter validation is cached; an edit must invalidate it and allocate new state."""
    p = rng.standard_normal(20)
    g = rng.standard_normal(20)
    opt = fastopt.SGD([p.copy()], lr=0.1)
    opt.step(g)
    assert opt.state_arrays(0) == {}
    opt.param_groups[0]["momentum"] = 0.9
    opt.param_groups[0]["lr"] = 0.05
    opt.step(g)
    want = p.copy()
    buf = np.zeros_like(p)
    fastopt.sgd_step(want, g, lr=0.1)
    fastopt.sgd_step(want, g, buf, lr=0.05, momentum=0.9, step=2)
    np.testing.assert_array_equal(opt.params[0], want)
    np.testing.assert_array_equal(opt.state_arrays(0)["momentum_buffer"], buf)


@pytest.mark.parametrize("skip_first", [False, True])
def test_sgd_momentum_set_on_mid_run_starts_its_buffer_at_the_gradient_as_torch(skip_first, rng):
    """torch starts a momentum buffer it does not have yet at the gradient (buf = g, no dampening). fastopt made
    the buffer as zeros and took the first-step variant from the group's count only: with momentum set on
    after a step and dampening 0.5, the buffer was [0.95 -1.9 2.85] where torch has [1.4 -2.8 4.2]. A step
    skipped for a non-finite gradient (skip_nonfinite) right after the edit leaves the first update to come."""
    torch = pytest.importorskip("torch")
    p = rng.standard_normal(7)
    grads = [rng.standard_normal(7) for _ in range(6)]
    ours = fastopt.SGD([p.copy()], lr=0.1, skip_nonfinite=True)
    tp = torch.tensor(p, requires_grad=True)
    theirs = torch.optim.SGD([tp], lr=0.1)
    for k, g in enumerate(grads):
        if k == 1:  # momentum on, with dampening
            for group in (ours.param_groups[0], theirs.param_groups[0]):
                group.update(momentum=0.9, dampening=0.5)
            if skip_first:
                assert ours.step([np.full(7, np.nan)]) is False
        if k == 3:  # off and on again: the buffer torch kept is used as it is
            ours.param_groups[0]["momentum"] = theirs.param_groups[0]["momentum"] = 0.0
        if k == 4:
            ours.param_groups[0]["momentum"] = theirs.param_groups[0]["momentum"] = 0.8
        ours.step([g])
        tp.grad = torch.tensor(g)
        theirs.step()
        np.testing.assert_allclose(ours.params[0], tp.detach().numpy(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(ours.state_arrays(0)["momentum_buffer"], theirs.state[tp]["momentum_buffer"].numpy(),
                               rtol=1e-13)

@pytest.mark.parametrize("how", ["state_dict", "checkpoint", "torch_state_dict", "deepcopy"])
@pytest.mark.parametrize("skipped", [False, True])
def test_sgd_momentum_set_on_then_saved_before_its_first_update_resumes_as_torch(how, skipped, rng, tmp_path):
    """Between the edit that sets momentum on (and a step skipped there) and the buffer's first update, a saved
    and restored optimizer must still start the buffer at the gradient: no buffer is kept before that update
    (torch has none either), a state dict without it loads, and a loaded buffer is never taken for a new one."""
    torch = pytest.importorskip("torch")
    p = rng.standard_normal(6)
    grads = [rng.standard_normal(6) for _ in range(4)]
    tp = torch.tensor(p, requires_grad=True)
    theirs = torch.optim.SGD([tp], lr=0.1)
    for k, g in enumerate(grads):
        if k == 1:
            theirs.param_groups[0].update(momentum=0.9, dampening=0.5)
        tp.grad = torch.tensor(g)
        theirs.step()
    ours = fastopt.SGD([p.copy()], lr=0.1, skip_nonfinite=True)
    for k, g in enumerate(grads):
        if k == 1:
            ours.param_groups[0].update(momentum=0.9, dampening=0.5)
            if skipped:
                assert ours.step([np.full(6, np.nan)]) is False
            assert "momentum_buffer" not in ours.state_arrays(0)
            if how == "deepcopy":
                ours = copy.deepcopy(ours)
            else:
                fresh = fastopt.SGD([ours.params[0].copy()], lr=0.1, skip_nonfinite=True)
                if how == "checkpoint":
                    fastopt.save(tmp_path / "sgd.npz", ours)
                    fastopt.load(tmp_path / "sgd.npz", fresh)
                else:
                    fresh.load_state_dict(getattr(ours, how)())
                ours = fresh
        ours.step([g])
        if k == 2:  # a loaded buffer (mid-run) is a buffer to update, not a new one
            other = fastopt.SGD([ours.params[0].copy()], lr=0.1, momentum=0.9, dampening=0.5, skip_nonfinite=True)
            assert other.step([np.full(6, np.nan)]) is False
            other.load_state_dict(ours.state_dict())
            ours = other
    np.testing.assert_allclose(ours.params[0], tp.detach().numpy(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(ours.state_arrays(0)["momentum_buffer"], theirs.state[tp]["momentum_buffer"].numpy(),
                               rtol=1e-13)

def test_an_array_swapped_into_a_group_is_the_param_before_the_next_step(rng, tmp_path):
    """Only step() used to read a swapped array: eval()/train() moved the replaced array (the model then
    evaluated at y), fastopt.save wrote its values and fastopt.load wrote into it, opt.params returned it."""
    old = rng.standard_normal(4)
    sf = fastopt.ScheduleFreeSGD([old], lr=0.1)
    for _ in range(3):
        sf.step([rng.standard_normal(4)])
    new = old.copy()
    sf.param_groups[0]["params"][0] = new
    kept = old.copy()
    sf.eval()
    assert not np.array_equal(new, kept) and np.array_equal(old, kept)
    sf.train()
    np.testing.assert_allclose(new, kept, rtol=1e-14)
    a = fastopt.Adam([np.zeros(3), np.zeros(5)], lr=0.1)
    a.step([np.ones(3), np.ones(5)])
    swapped = np.full(3, 7.0)
    a.param_groups[0]["params"][0] = swapped
    assert a.params[0] is swapped
    fastopt.save(tmp_path / "a.npz", a)
    b = fastopt.Adam([np.zeros(3), np.zeros(5)], lr=0.1)
    target = np.zeros(3)
    b.param_groups[0]["params"][0] = target
    fastopt.load(tmp_path / "a.npz", b)
    assert target.tolist() == [7.0] * 3 and b.params[0] is target
    # a swap that does not fit is refused there too, with nothing adopted
    bad = np.zeros(4)
    a.param_groups[0]["params"][0] = bad
    with pytest.raises(ValueError, match=r"params\[0\] has shape \(4,\), expected \(3,\)"):
        a.params
    a.param_groups[0]["params"][0] = a.param_groups[0]["params"][1][2:]  # the other param's memory
    with pytest.raises(ValueError, match=r"params\[0\] shares memory with params\[1\]"):
        fastopt.save(tmp_path / "b.npz", a)
    assert not (tmp_path / "b.npz").exists()
    a.param_groups[0]["params"][0] = swapped
    assert a.params[0] is swapped
    # add_param_group sees the arrays in the groups now: the replaced array is free, the swapped one taken
    replaced = a.param_groups[0]["params"][1]
    again = np.zeros(5)
    a.param_groups[0]["params"][1] = again
    with pytest.raises(ValueError, match="appears in more than one place"):
        a.add_param_group({"params": [again]})
    a.add_param_group({"params": [replaced]})
    assert a.params[1] is again and a.params[2] is replaced
    a.step([np.ones(3), np.ones(5), np.ones(5)])


def test_a_bad_value_in_one_of_several_groups_names_the_group(rng):
    opt = fastopt.Adam([{"params": [rng.standard_normal(3)]}, {"params": [rng.standard_normal(2)]}], lr=0.1)
    grads = [np.ones(3), np.ones(2)]
    opt.step(grads)
    for key, value, error, words in [("lr", float("nan"), ValueError, "Invalid learning rate: nan"),
                                     ("weight_decay", -1.0, ValueError, "Invalid weight_decay value: -1.0"),
                                     ("betas", (0.9,), TypeError, r"betas must be a pair")]:
        good = opt.param_groups[1][key]
        opt.param_groups[1][key] = value
        with pytest.raises(error, match=f"^param group 1: {words}"):
            opt.step(grads)
        opt.param_groups[1][key] = good
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    front = ft.Adam([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
    front.param_groups[1]["lr"] = float("nan")
    for q in params:
        q.grad = torch.ones_like(q)
    with pytest.raises(ValueError, match="^param group 1: Invalid learning rate: nan"):  # the same in fastopt.torch
        front.step()
    single = fastopt.Adam([rng.standard_normal(3)], lr=0.1)
    single.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"^Invalid learning rate: -1.0$"):  # one group: torch's message as it is
        single.step([np.ones(3)])

def test_add_param_group_starts_its_own_count(rng):
    a = rng.standard_normal(8)
    b = rng.standard_normal(8)
    opt = fastopt.Adam([a.copy()], lr=0.1)
    opt.step([np.ones(8)])
    opt.add_param_group({"params": [b.copy()], "lr": 0.2})
    opt.step([np.ones(8), np.ones(8)])
    assert (opt.steps(0), opt.steps(1)) == (2, 1)
    want = b.copy()
    fastopt.adam_step(want, np.ones(8), np.zeros(8), np.zeros(8), step=1, lr=0.2)
    np.testing.assert_array_equal(opt.params[1], want)


def test_torch_cpu_tensors_update_in_place(rng):
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(rng.standard_normal(16).astype(np.float32))
    g = torch.from_numpy(rng.standard_normal(16).astype(np.float32))
    want = t.numpy().copy()
    opt = fastopt.Adam([t], lr=0.1)
    opt.step([g])
    fastopt.adam_step(want, g.numpy(), np.zeros(16, np.float32), np.zeros(16, np.float32), step=1, lr=0.1)
    np.testing.assert_array_equal(t.numpy(), want)


# ---- params and states checked once, re-checked when they change (issue 11, host cost) ----

@pytest.mark.parametrize("backend", ["cython", "numpy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_param_swapped_in_a_group_is_updated_with_its_state(backend, dtype, rng):
    """o.param_groups[g]['params'][j] = new (same shape and dtype): the next steps update `new` with the
    param's state, exactly like the functional API carrying that state over; the old array is left alone."""
    shapes = [(7,), (1,), (33, 5), (0,)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ref = [p.copy() for p in params]
    state = fastopt.init_state("adam", ref)
    opt = fastopt.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 0.01}], 0.02, backend=backend)
    for t in range(1, 8):
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
        if t == 4:
            new = rng.standard_normal(shapes[2]).astype(dtype)
            old = params[2]
            opt.param_groups[1]["params"][0] = new
            ref[2] = new.copy()
            old_bytes = old.tobytes()
        opt.step(grads)
        fastopt.adam_step(ref[:2], grads[:2], state["exp_avg"][:2], state["exp_avg_sq"][:2], step=t, lr=0.02)
        fastopt.adam_step(ref[2:], grads[2:], state["exp_avg"][2:], state["exp_avg_sq"][2:], step=t, lr=0.01)
    assert opt.params[2] is new and opt.param_groups[1]["params"][0] is new
    assert old.tobytes() == old_bytes
    for got, want in zip(opt.params, ref):
        np.testing.assert_array_equal(got, want)
    # the group's list stays the list the caller edits: a second swap through a held reference works too
    held = opt.param_groups[1]["params"]
    again = new.copy()
    held[0] = again
    opt.step([rng.standard_normal(s).astype(dtype) for s in shapes])
    assert opt.params[2] is again and opt.param_groups[1]["params"] is held and not np.array_equal(again, new)


def _bad_edits(rng):
    """(name, edit(opt, params), undo(opt, params) or None, error, message) between two steps."""
    def set_flag(a, value):
        a.flags.writeable = value

    def swap(gi, j, new):
        def edit(opt, params):
            opt.param_groups[gi]["params"][j] = new(opt, params)
        return edit

    def unswap(gi, j, flat):
        def undo(opt, params):
            opt.param_groups[gi]["params"][j] = params[flat]
        return undo

    def reshape(a, shape):
        a.shape = shape

    return [
        ("param_read_only", lambda o, p: set_flag(p[0], False), lambda o, p: set_flag(p[0], True), ValueError,
         r"params\[0\] is read-only"),
        ("state_read_only", lambda o, p: set_flag(o.state_arrays(2)["exp_avg_sq"], False),
         lambda o, p: set_flag(o.state_arrays(2)["exp_avg_sq"], True), ValueError, r"exp_avg_sq\[2\] is read-only"),
        ("reshaped_in_place", lambda o, p: reshape(p[2], (3, 11)), lambda o, p: reshape(p[2], (33,)), ValueError,
         r"\[2\] has shape"),
        ("swap_read_only", swap(0, 0, lambda o, p: np.frombuffer(bytes(p[0].nbytes), p[0].dtype)),  # read-only
         unswap(0, 0, 0), ValueError, r"params\[0\] is read-only"),
        ("swap_other_shape", swap(0, 1, lambda o, p: np.zeros(2, p[1].dtype)), unswap(0, 1, 1), ValueError,
         r"expected \(2,\) \(the shape of params\[1\]\)"),
        ("swap_other_dtype", swap(1, 0, lambda o, p: np.zeros(33, np.float64 if p[2].dtype == np.float32
                                                              else np.float32)), unswap(1, 0, 2), TypeError,
         r"params\[2\]|\[2\] has dtype"),
        ("swap_aliasing_state", swap(1, 0, lambda o, p: o.state_arrays(2)["exp_avg"]), unswap(1, 0, 2),
         ValueError, "shares memory"),
        ("swap_aliasing_param", swap(1, 1, lambda o, p: p[0]), unswap(1, 1, 3), ValueError, "shares memory"),
        ("swap_int_array", swap(0, 0, lambda o, p: np.zeros(7, np.int32)), unswap(0, 0, 0), TypeError,
         r"params\[0\] has dtype int32"),
        ("list_shortened", lambda o, p: o.param_groups[1]["params"].pop(),
         lambda o, p: o.param_groups[1]["params"].append(p[3]), ValueError, "param group 1"),
    ]


@pytest.mark.parametrize("backend", ["cython", "numpy"])
@pytest.mark.parametrize("case", range(10))
def test_bad_edits_between_steps_raise_and_change_nothing(backend, case, rng):
    """A param made read-only, reshaped in place or swapped for a bad array (or one aliasing a state or
    another param) is refused at the next step with nothing written; undone, the optimizer goes on exactly
    as if the failed step never happened."""
    name, edit, undo, error, match = _bad_edits(rng)[case]
    params = [rng.standard_normal(7).astype(np.float32), rng.standard_normal(1).astype(np.float32),
              rng.standard_normal(33).astype(np.float32), rng.standard_normal(7).astype(np.float32)]
    twin = [p.copy() for p in params]
    opt = fastopt.Adam([{"params": params[:2]}, {"params": params[2:]}], 0.01, backend=backend)
    ref = fastopt.Adam([{"params": twin[:2]}, {"params": twin[2:]}], 0.01, backend=backend)
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    opt.step(grads)
    ref.step(grads)
    edit(opt, params)
    before = [p.tobytes() for p in params] + [a.tobytes() for i in range(4) for a in opt.state_arrays(i).values()]
    with pytest.raises(error, match=match):
        opt.step(grads)
    assert [p.tobytes() for p in params] + [a.tobytes() for i in range(4)
                                            for a in opt.state_arrays(i).values()] == before
    assert opt.steps(0) == 1 and opt.steps(1) == 1
    with pytest.raises(error, match=match):  # still refused: the failed check is not cached away
        opt.step(grads)
    undo(opt, params)
    for _ in range(3):
        opt.step(grads)
        ref.step(grads)
    for a, b in zip(params, twin):
        np.testing.assert_array_equal(a, b)


def test_torch_cpu_tensor_param_whose_storage_moves_is_updated_in_its_new_storage(rng):
    torch = pytest.importorskip("torch")
    t = torch.tensor(rng.standard_normal(5))
    ref = t.numpy().copy()
    opt = fastopt.SGD([t], 0.5)
    g = rng.standard_normal(5)
    opt.step([g])
    ref -= 0.5 * g
    fresh = torch.tensor(rng.standard_normal(5))
    ref = fresh.numpy().copy()
    t.set_(fresh.clone())  # the same tensor object, another storage
    opt.step([g])
    np.testing.assert_array_equal(t.numpy(), ref - 0.5 * g)


def test_zero_d_arrays_as_hyperparameters_are_refused_with_a_hint(rng):
    """torch.optim takes a 0-d Tensor lr; the NumPy classes take real numbers (documented in fastopt.optim)."""
    p = rng.standard_normal(3)
    for kwargs in ({"lr": np.array(0.1)}, {"betas": (np.array(0.9), 0.99)}, {"eps": np.array(1e-8)}):
        with pytest.raises(TypeError, match=r"must be a real number, .*pass float\(x\)"):
            fastopt.Adam([p], **kwargs).step([p.copy()])
    assert fastopt.Adam([p], lr=np.float32(0.1)).param_groups[0]["lr"] == np.float32(0.1)  # NumPy scalars are fine


@pytest.mark.parametrize("name", [s.name for s in REGISTRY.values()])
def test_state_dict_of_a_group_missing_a_key_names_it(name):
    """state_dict() raised a bare KeyError; now the step's words."""
    spec = REGISTRY[name]
    opt = getattr(fastopt, spec.class_name)([np.ones(3, np.float32)], lr=0.1)
    key = opt.hyper_keys()[-1]
    del opt.param_groups[0][key]
    with pytest.raises(ValueError, match=f"param group 0 has no '{key}'"):
        opt.state_dict()


def _pickle_grads(name, ps, rng):
    if name == "SparseAdam":
        return [(np.array([0, 2]), rng.standard_normal((2,) + p.shape[1:]).astype(p.dtype)) for p in ps]
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in ps]


@pytest.mark.parametrize("name", [s.class_name for s in REGISTRY.values()] + ["Muon", "Adafactor", "SparseAdam"])
def test_deepcopy_and_pickle_after_steps_continue_identically(name):
    """The classes could be copied only before their first step (the backend modules cached in the kernel
    calls, Muon's scratch keyed by id): copy.deepcopy and pickle now work at any point, as torch.optim's."""
    import copy
    import pickle
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2 ** 32))
    ps = [rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((3, 5)).astype(np.float32)]
    kwargs = {"clip_grad_norm": 1.0, "skip_nonfinite": True} if name in [s.class_name for s in REGISTRY.values()] else {}
    opt = getattr(fastopt, name)(ps, lr=0.01, **kwargs)
    for _ in range(2):
        opt.step(_pickle_grads(name, ps, rng))
    copies = [opt, copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    params = [[p for g in o.param_groups for p in g["params"]] for o in copies]
    assert all(a is not b for a, b in zip(params[0], params[1]))
    for _ in range(3):
        grads = _pickle_grads(name, ps, rng)
        for o in copies:
            o.step(grads)
    for a, b, c in zip(*params):
        assert a.tobytes() == b.tobytes() == c.tobytes()


def test_lbfgs_deepcopy_and_pickle_after_steps_continue_identically():
    import copy
    import pickle
    rng = np.random.default_rng(3)
    ps = [rng.standard_normal(5), rng.standard_normal((2, 3))]
    opt = fastopt.LBFGS(ps, lr=0.5, history_size=3)

    def closure_of(params):
        return lambda: (float(sum(((p - 1) ** 2).sum() for p in params)), [2 * (p - 1) for p in params])
    opt.step(closure_of(ps))
    copies = [opt, copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    params = [o.param_groups[0]["params"] for o in copies]
    for o, p in zip(copies, params):
        for _ in range(2):
            o.step(closure_of(p))
    for a, b, c in zip(*params):
        assert a.tobytes() == b.tobytes() == c.tobytes()
