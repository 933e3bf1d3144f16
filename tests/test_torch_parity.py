"""fastopt against torch.optim itself (float64, 30 steps, every option torch has).

torch writes some updates differently (exp_avg.lerp_ for the first moment, addcdiv, NAdam's running
product of mu in a scalar tensor), which rounds differently in the last bits: we allow 1e-10 relative
(float64 has 1e-16; 30 steps of ~10 operations stay far below)."""
from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.specs import REGISTRY

from conftest import option_combinations

torch = pytest.importorskip("torch")



def _torch_kwargs(spec, hp):
    kw = dict(hp)
    for key, names in spec.torch_groups.items():  # betas, Rprop's etas and step_sizes: tuples in torch
        if all(n in kw for n in names):
            kw[key] = tuple(kw.pop(n) for n in names)
    if spec.name in ("adam", "adamw") or spec.torch_class in ("NAdam", "RAdam", "SGD", "Adagrad", "RMSprop"):
        kw["foreach"] = False
    return kw


def _cases():
    for spec in REGISTRY.values():
        if spec.torch_class is None:
            continue
        for hp in option_combinations(spec):
            yield pytest.param(spec, hp, id=f"{spec.name}-" + ",".join(f"{k}={v}" for k, v in hp.items()
                                                                       if spec.defaults.get(k) != v))


@pytest.mark.parametrize("spec,hp", list(_cases()))
def test_matches_torch_optim(spec, hp, rng):
    torch.set_default_dtype(torch.float64)  # torch keeps NAdam's mu product in the default dtype
    try:
        shapes = [(17,), (4, 5)]
        params = [rng.standard_normal(s) for s in shapes]
        tparams = [torch.nn.Parameter(torch.tensor(p)) for p in params]
        opt = getattr(torch.optim, spec.torch_class)(tparams, **_torch_kwargs(spec, hp))
        state = fastopt.init_state(spec.name, params, **{k: v for k, v in hp.items() if k != "lr"})
        fn = getattr(fastopt, spec.function_name)
        for t in range(1, 31):
            grads = [rng.standard_normal(s) for s in shapes]
            for tp, g in zip(tparams, grads):
                tp.grad = torch.tensor(g)
            opt.step()
            fn(params, grads, **state, **hp, **({"step": t} if spec.uses_step else {}))
        for p, tp in zip(params, tparams):
            np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-10, atol=1e-12)
        # state arrays carry torch's names and values
        for name, arrays in state.items():
            for a, tp in zip(arrays, tparams):
                np.testing.assert_allclose(a, opt.state[tp][spec.torch_state_names.get(name, name)].numpy(), rtol=1e-10, atol=1e-12, err_msg=name)
    finally:
        torch.set_default_dtype(torch.float32)


# ---- the torch options of issue 12, through the classes (torch's positional order), float32 and float64 ----

NEW_OPTION_CASES = [
    ("SGD", (), {}),                                           # lr defaults to torch's 1e-3
    ("SGD", (0.05, 0.9), {}),                                  # positional momentum
    ("SGD", (0.05, 0.9, 0.0, 0.01, True), {}),                 # the whole positional order
    ("Adagrad", (0.05,), {"initial_accumulator_value": 0.3}),
    ("Adagrad", (0.05, 0.01, 0.02, 1.5, 1e-8), {}),            # initial_accumulator_value positional
    ("Adam", (1e-2,), {"decoupled_weight_decay": True, "weight_decay": 0.1}),
    ("Adam", (1e-2, (0.8, 0.99), 1e-6, 0.05, True), {"decoupled_weight_decay": True}),
    ("Adam", (1e-2, (0.8, 0.99), 1e-6, 0.05, True), {"maximize": True}),
    ("RMSprop", (1e-2, 0.9, 1e-6, 0.01, 0.5, True), {}),
    ("NAdam", (1e-2, (0.85, 0.99), 1e-7, 0.01, 6e-3, True), {}),
    ("RAdam", (1e-2, (0.85, 0.99), 1e-7, 0.01, True), {}),
    ("Adamax", (1e-2, (0.85, 0.99), 1e-7, 0.01), {}),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,args,kwargs", NEW_OPTION_CASES,
                         ids=[f"{c}{a}{k}" for c, a, k in NEW_OPTION_CASES])
def test_classes_with_torch_arguments_match_torch(cls, args, kwargs, dtype, rng):
    """The same positional and keyword arguments to fastopt.<cls> and torch.optim.<cls>: 50 steps of
    random gradients on sizes 0, 1 and odd, in float32 and float64; the state dict converts to torch's."""
    # torch keeps NAdam's mu product in the default dtype
    torch.set_default_dtype(torch.float64 if dtype == np.float64 else torch.float32)
    try:
        _compare_class_with_torch(cls, args, kwargs, dtype, rng)
    finally:
        torch.set_default_dtype(torch.float32)


def _compare_class_with_torch(cls, args, kwargs, dtype, rng):
    shapes = [(0,), (1,), (7,), (33, 5)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    tparams = [torch.nn.Parameter(torch.tensor(p.copy())) for p in params]
    targs = tuple(args)
    topt = getattr(torch.optim, cls)(tparams, *targs, foreach=False, **kwargs)
    opt = getattr(fastopt, cls)(params, *args, **kwargs)
    for _ in range(50):
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
        for tp, g in zip(tparams, grads):
            tp.grad = torch.tensor(g)
        topt.step()
        opt.step(grads)
    rtol, atol = (1e-10, 1e-12) if dtype == np.float64 else (2e-5, 2e-6)
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=rtol, atol=atol)
    # groups carry the same values as torch's, and the state dict goes into a fresh torch optimizer
    tgroup = topt.param_groups[0]
    for key, value in opt.param_groups[0].items():
        if key != "params":
            assert tgroup[key] == value, key
    fresh = getattr(torch.optim, cls)([torch.nn.Parameter(torch.tensor(p.copy())) for p in params], *targs,
                                      foreach=False, **kwargs)
    fresh.load_state_dict(opt.torch_state_dict())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adagrad_initial_accumulator_value_before_any_step(dtype, rng):
    """torch creates Adagrad's state in its constructor: a fresh fastopt.Adagrad converts to a torch state
    dict with step 0 and sum = initial_accumulator_value, which torch then steps from, and back."""
    p = rng.standard_normal(9).astype(dtype)
    opt = fastopt.Adagrad([p], 0.1, initial_accumulator_value=0.7)
    sd = opt.torch_state_dict()
    assert float(sd["state"][0]["step"]) == 0.0
    np.testing.assert_array_equal(sd["state"][0]["sum"].numpy(), np.full(9, 0.7, dtype))
    ref = torch.optim.Adagrad([torch.nn.Parameter(torch.tensor(p.copy()))], 0.1, initial_accumulator_value=0.7)
    for key in ("step", "sum"):
        assert torch.equal(ref.state_dict()["state"][0][key], sd["state"][0][key].to(ref.state_dict()["state"][0][key].dtype))
    back = fastopt.Adagrad([p.copy()], 0.1)  # initial_accumulator_value comes from the torch dict
    back.load_torch_state_dict(ref.state_dict())
    assert back.param_groups[0]["initial_accumulator_value"] == 0.7
    np.testing.assert_array_equal(back.state_arrays(0)["state_sum"], np.full(9, 0.7, dtype))


def test_adam_torch_dict_with_decoupled_weight_decay_loads_into_adam_and_adamw_stays_adamw(rng):
    p = rng.standard_normal(6)
    tp = torch.nn.Parameter(torch.tensor(p.copy()))
    topt = torch.optim.Adam([tp], 0.01, weight_decay=0.1, decoupled_weight_decay=True)
    tp.grad = torch.tensor(rng.standard_normal(6))
    topt.step()
    opt = fastopt.Adam([p.copy()])
    opt.load_torch_state_dict(topt.state_dict())
    assert opt.param_groups[0]["decoupled_weight_decay"] is True
    assert opt.torch_state_dict()["param_groups"][0]["decoupled_weight_decay"] is True
    w = fastopt.AdamW([p.copy()])
    w.load_torch_state_dict(topt.state_dict())  # Adam(decoupled_weight_decay=True) is AdamW
    assert "decoupled_weight_decay" not in w.param_groups[0]
    assert w.torch_state_dict()["param_groups"][0]["decoupled_weight_decay"] is True
    plain = torch.optim.Adam([torch.nn.Parameter(torch.tensor(p.copy()))])
    before = [a.copy() for a in w.params]
    with pytest.raises(ValueError, match="decoupled_weight_decay=False does not fit fastopt.AdamW.*fastopt.Adam"):
        w.load_torch_state_dict(plain.state_dict())
    assert all(a.tobytes() == b.tobytes() for a, b in zip(w.params, before))


SCHEDULED = {  # torch schedulers that write keys of their own into the groups (initial_lr, max_lr, swa_lr...)
    "StepLR": ("Adam", {}, lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5)),
    "OneCycleLR-Adam": ("Adam", {}, lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.05, total_steps=20)),
    "OneCycleLR-SGD": ("SGD", {"momentum": 0.9},
                       lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.05, total_steps=20)),
    "CyclicLR": ("SGD", {"momentum": 0.9}, lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.001, 0.05, 3)),
    "SWALR": ("AdamW", {}, lambda o: torch.optim.swa_utils.SWALR(o, 0.02, anneal_epochs=3)),
}


@pytest.mark.parametrize("case", sorted(SCHEDULED))
def test_torch_state_dict_of_a_scheduled_run_loads_and_continues_as_torch(case, rng):
    """A torch.optim state dict saved mid-run under a torch lr scheduler (whose keys, such as initial_lr,
    stay in the groups) loads into the fastopt class with the group's scheduled values, and both continue
    alike."""
    name, kw, scheduler = SCHEDULED[case]
    shapes = [(7,), (3, 4)]
    tparams = [torch.nn.Parameter(torch.tensor(rng.standard_normal(s))) for s in shapes]
    topt = getattr(torch.optim, name)(tparams, lr=0.01, **kw)
    sched = scheduler(topt)
    for _ in range(int(rng.integers(3, 8))):
        for tp in tparams:
            tp.grad = torch.tensor(rng.standard_normal(tp.shape))
        topt.step()
        sched.step()
    sd = topt.state_dict()
    assert set(sd["param_groups"][0]) - set(torch.optim.Adam([torch.zeros(1)]).state_dict()["param_groups"][0]) - {
        "momentum", "dampening", "nesterov"}, "the scheduler wrote no key of its own"
    params = [tp.detach().numpy().copy() for tp in tparams]
    opt = getattr(fastopt, name)(params, lr=0.01, **kw)
    opt.load_torch_state_dict(sd)
    group = topt.param_groups[0]
    assert opt.param_groups[0]["lr"] == group["lr"]
    if "momentum" in kw:
        assert opt.param_groups[0]["momentum"] == group["momentum"]
    for _ in range(5):  # the scheduler stops; both go on with the values it left in the group
        grads = [rng.standard_normal(s) for s in shapes]
        for tp, g in zip(tparams, grads):
            tp.grad = torch.tensor(g)
        topt.step()
        opt.step(grads)
    for p, tp in zip(opt.params, tparams):
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-10, atol=1e-12)


BAD_NEW_OPTIONS = [
    ("Adagrad", {"initial_accumulator_value": -0.1}, ValueError),
    ("Adagrad", {"initial_accumulator_value": float("nan")}, ValueError),
    ("Adagrad", {"initial_accumulator_value": "1"}, TypeError),
    ("Adam", {"decoupled_weight_decay": 1}, TypeError),
    ("Adam", {"decoupled_weight_decay": None}, TypeError),
    ("SGD", {"lr": -1e-3}, ValueError),
]


@pytest.mark.parametrize("cls,kwargs,error", BAD_NEW_OPTIONS, ids=[f"{c}-{k}" for c, k, _ in BAD_NEW_OPTIONS])
def test_bad_new_options_raise_like_torch_and_change_nothing(cls, kwargs, error, rng):
    p = rng.standard_normal(5)
    before = p.copy()
    (name, value), = kwargs.items()
    with pytest.raises(error, match=name if error is TypeError else None) as ours:
        getattr(fastopt, cls)([p], **kwargs)
    if error is ValueError and not (isinstance(value, float) and value != value):
        with pytest.raises(ValueError) as theirs:  # torch's message, word for word
            getattr(torch.optim, cls)([torch.nn.Parameter(torch.tensor(p))], **kwargs)
        assert str(ours.value) == str(theirs.value)
    assert p.tobytes() == before.tobytes()
    # the same value set on a live group between steps: refused at the step, nothing written
    opt = getattr(fastopt, cls)([p])
    opt.step([rng.standard_normal(5)])
    snap = [p.copy()] + [a.copy() for a in opt.state_arrays(0).values()]
    opt.param_groups[0].update(kwargs)
    with pytest.raises(error):
        opt.step([rng.standard_normal(5)])
    assert [p.tobytes()] + [a.tobytes() for a in opt.state_arrays(0).values()] == [a.tobytes() for a in snap]
    # and init_state / the functional API refuse it too
    spec = getattr(fastopt, cls).spec
    if name in spec.state_options:
        with pytest.raises(error):
            fastopt.init_state(spec.name, p, **kwargs)


def test_torch_positional_matches_torch_signatures():
    """spec.torch_positional is torch's own positional order (up to its `*`), read from torch."""
    import inspect
    for spec in REGISTRY.values():
        if spec.torch_class is None:
            continue
        sig = inspect.signature(getattr(torch.optim, spec.torch_class).__init__)
        positional = tuple(n for n, p in sig.parameters.items()
                           if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and n not in ("self", "params"))
        assert spec.torch_positional == positional, spec.name
        # and every torch argument that is a registry hyperparameter has torch's default
        for name, param in sig.parameters.items():
            if name == "betas":
                assert (spec.defaults["beta1"], spec.defaults["beta2"]) == param.default
            elif name in spec.defaults:
                assert spec.defaults[name] == param.default, (spec.name, name)


@pytest.mark.parametrize("lr_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reload", [False, True])
def test_asgd_tensor_lr_eta_as_torch_computes_it(lr_dtype, reload, rng):
    """torch stores ASGD's eta as torch.as_tensor(lr / (1 + lambd * lr * t) ** alpha): with a Tensor lr that is
    computed in the lr's dtype. After a state dict load of float64 params (eta a float64 tensor) fastopt stored
    the value rounded through float32 as for a Python lr: eta 3.7e-8 relative off, the params 5e-10 after 8 more
    steps; under an ExponentialLR driving the tensor lr."""
    import copy
    import fastopt.torch as ft
    start = rng.standard_normal(10)
    grads = [rng.standard_normal(10) for _ in range(12)]
    results = []
    for cls in (torch.optim.ASGD, ft.ASGD):
        p = torch.tensor(start, dtype=torch.float64, requires_grad=True)

        def make():
            opt = cls([p], lr=torch.tensor(0.01, dtype=lr_dtype), lambd=0.01, t0=3)
            return opt, torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)

        opt, sched = make()
        for k, g in enumerate(grads):
            p.grad = torch.tensor(g)
            opt.step()
            sched.step()
            if reload and k == 3:
                saved = copy.deepcopy((opt.state_dict(), sched.state_dict()))
                opt, sched = make()
                opt.load_state_dict(saved[0])
                sched.load_state_dict(saved[1])
        results.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}))
    (p_torch, s_torch), (p_ours, s_ours) = results
    assert s_ours["eta"].dtype == s_torch["eta"].dtype and s_ours["eta"].item() == s_torch["eta"].item()
    torch.testing.assert_close(p_ours, p_torch, rtol=1e-15, atol=1e-16)
    torch.testing.assert_close(s_ours["ax"], s_torch["ax"], rtol=1e-15, atol=1e-16)


def test_nadam_mu_products_of_two_dtypes_advance_each_in_its_own(rng):
    """After a torch.optim state dict of float64 params loads (torch casts mu_product to float64), a param that
    had no state gets a float32 mu_product; stepping both in one step read them all as float64, and the new
    param's product was advanced in float64 (1 float32 ulp off torch's, the param 4e-11 relative)."""
    import fastopt.torch as ft
    starts = [rng.standard_normal(n) for n in (3, 4, 2)]
    grads = [[torch.tensor(rng.standard_normal(n)) for n in (3, 4)] for _ in range(8)]
    results = []
    for cls in (torch.optim.NAdam, ft.NAdam):
        ps = [torch.tensor(x, requires_grad=True) for x in starts]
        source = torch.optim.NAdam(ps, lr=0.01)
        ps[0].grad = torch.ones(3, dtype=torch.float64)
        for _ in range(5):
            source.step()
        opt = cls(ps, lr=0.01)
        opt.load_state_dict(source.state_dict())  # ps[1] and ps[2] never stepped
        for k in range(8):
            ps[0].grad, ps[1].grad = (g.clone() for g in grads[k])
            ps[2].grad = torch.ones(2, dtype=torch.float64) if k % 2 else None  # a new plan every step
            opt.step()
        results.append((opt.state[ps[1]]["mu_product"].clone(), [p.detach().clone() for p in ps]))
    (mu_torch, p_torch), (mu_ours, p_ours) = results
    assert mu_ours.dtype == mu_torch.dtype == torch.float32 and mu_ours.item() == mu_torch.item()
    for a, b in zip(p_ours, p_torch):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("name, built, loaded, extra", [("adam", {"amsgrad": True}, {"amsgrad": False}, "max_exp_avg_sq"),
                                                       ("rmsprop", {"centered": True}, {"centered": False}, "grad_avg")])
def test_a_state_the_loaded_options_do_not_use_is_dropped(name, built, loaded, extra, rng):
    """A NumPy class built with amsgrad=True (RMSprop: centered=True) that loads a state dict without it kept its
    max_exp_avg_sq (grad_avg) and exported it in state_dict() and torch_state_dict(), which torch's has not;
    now it is dropped, and the continued run is torch's."""
    spec = REGISTRY[name]
    cls = getattr(torch.optim, spec.torch_class)
    start, grads = rng.standard_normal(5), [rng.standard_normal(5) for _ in range(5)]
    p = torch.tensor(start, requires_grad=True)
    ref = cls([p], lr=0.01, **loaded)
    for g in grads[:2]:
        p.grad = torch.tensor(g)
        ref.step()
    ours = [p.detach().numpy().copy()]
    opt = getattr(fastopt, spec.class_name)(ours, lr=0.01, **built)
    opt.load_torch_state_dict(ref.state_dict())
    assert extra not in opt.state_dict()["state"][0] and extra not in opt.torch_state_dict()["state"][0]
    assert extra not in opt.state_arrays(0)
    for g in grads[2:]:
        p.grad = torch.tensor(g)
        ref.step()
        opt.step([g.copy()])
    np.testing.assert_allclose(ours[0], p.detach().numpy(), rtol=1e-12, atol=1e-15)


def test_nadam_equal_mu_products_of_two_dtypes_are_not_one_call(rng):
    """Params are grouped into one kernel call by their carried values: a float64 and a float32 mu_product of
    equal value (0.5 here) shared a call and advanced in the first one's dtype; torch advances each in its own."""
    import fastopt.torch as ft
    starts = [rng.standard_normal(3) for _ in range(2)]
    grads = [[torch.tensor(rng.standard_normal(3)) for _ in range(2)] for _ in range(3)]
    results = []
    for cls in (torch.optim.NAdam, ft.NAdam):
        ps = [torch.tensor(x, requires_grad=True) for x in starts]
        opt = cls(ps, lr=0.01)
        for p, g in zip(ps, grads[0]):
            p.grad = g.clone()
        opt.step()
        for p, dtype in zip(ps, (torch.float32, torch.float64)):
            opt.state[p]["mu_product"] = torch.tensor(0.5, dtype=dtype)
        for step_grads in grads[1:]:
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            opt.step()
        results.append([(p.detach().clone(), opt.state[p]["mu_product"].clone()) for p in ps])
    for (p_torch, mu_torch), (p_ours, mu_ours) in zip(*results):
        assert mu_ours.dtype == mu_torch.dtype and mu_ours.item() == mu_torch.item()
        torch.testing.assert_close(p_ours, p_torch, rtol=1e-14, atol=1e-16)
