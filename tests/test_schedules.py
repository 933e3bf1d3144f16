"""Schedules: values at their boundaries, agreement with torch.optim.lr_scheduler, argument errors,
and a schedule as an optimizer's lr."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

import fastopt
from fastopt import schedules as S


def test_constant():
    s = S.constant(0.3)
    assert [s(0), s(1), s(10 ** 9)] == [0.3, 0.3, 0.3]


def test_exponential_decay_smooth_and_staircase():
    s = S.exponential_decay(1.0, 0.5, transition_steps=10)
    assert s(0) == 1.0 and s(10) == 0.5 and s(20) == 0.25
    assert s(5) == pytest.approx(0.5 ** 0.5)
    st = S.exponential_decay(1.0, 0.5, transition_steps=10, staircase=True)
    assert [st(0), st(9), st(10), st(19), st(20)] == [1.0, 1.0, 0.5, 0.5, 0.25]


def test_step_decay_boundaries():
    s = S.step_decay(0.1, step_size=3, gamma=0.5)
    assert [s(0), s(2), s(3), s(5), s(6)] == [0.1, 0.1, 0.05, 0.05, 0.025]


def test_multi_step_boundaries():
    s = S.multi_step(1.0, milestones=[2, 5], gamma=0.1)
    assert [s(0), s(1), s(2), s(4)] == [1.0, 1.0, pytest.approx(0.1), pytest.approx(0.1)]
    assert s(5) == pytest.approx(0.01) and s(100) == pytest.approx(0.01)


def test_linear_and_polynomial_boundaries():
    s = S.linear(1.0, 0.0, 4)
    assert [s(0), s(1), s(2), s(4), s(5)] == [1.0, 0.75, 0.5, 0.0, 0.0]
    p = S.polynomial(1.0, 0.1, 10, power=2.0)
    assert p(0) == 1.0 and p(10) == 0.1 and p(11) == 0.1
    assert p(5) == pytest.approx(0.1 + 0.9 * 0.25)
    up = S.linear(0.0, 2.0, 4)  # increasing works too
    assert up(2) == 1.0 and up(4) == 2.0


def test_cosine_boundaries():
    s = S.cosine(1.0, 100, end_value=0.1)
    assert s(0) == 1.0
    assert s(50) == pytest.approx(0.55)
    assert s(100) == 0.1 and s(1000) == 0.1
    assert s(99) > 0.1


def test_warmup_wraps_any_schedule():
    w = S.warmup(S.cosine(1.0, 10), warmup_steps=4)
    assert [w(0), w(1), w(2), w(3)] == [0.0, 0.25, 0.5, 0.75]
    assert w(4) == 1.0 and w(9) == pytest.approx(S.cosine(1.0, 10)(5)) and w(14) == 0.0
    w2 = S.warmup(0.3, warmup_steps=2, init_value=0.1)  # a number is a constant schedule
    assert [w2(0), w2(1), w2(2), w2(50)] == [0.1, pytest.approx(0.2), 0.3, 0.3]
    w3 = S.warmup(S.step_decay(1.0, 2), warmup_steps=0)
    assert w3(0) == 1.0 and w3(2) == pytest.approx(0.1)


def test_reduce_on_plateau_follows_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng()
    metrics = list(np.cumsum(rng.choice([-1.0, 0.0, 0.5], size=60)) + 100)
    ours = S.ReduceLROnPlateau(0.1, factor=0.5, patience=2, cooldown=1, min_lr=1e-3)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2, cooldown=1, min_lr=1e-3)
    seen = set()
    for m in metrics:
        theirs.step(m)
        assert ours.update(m) == pytest.approx(opt.param_groups[0]["lr"])
        assert ours(123) == ours.lr
        seen.add(ours.lr)
    assert len(seen) > 1


def test_reduce_on_plateau_max_mode_and_state():
    r = S.ReduceLROnPlateau(1.0, mode="max", factor=0.1, patience=0, threshold=0.0, threshold_mode="abs")
    assert r.update(1.0) == 1.0
    assert r.update(1.0) == pytest.approx(0.1)  # no improvement, patience 0
    saved = r.state_dict()
    r2 = S.ReduceLROnPlateau(1.0, mode="max", factor=0.1, patience=0, threshold=0.0, threshold_mode="abs")
    r2.load_state_dict(saved)
    assert r2(0) == pytest.approx(0.1) and r2.best == 1.0


@pytest.mark.parametrize("torch_name, ours, kwargs", [
    ("StepLR", lambda: S.step_decay(0.1, 3, 0.5), {"step_size": 3, "gamma": 0.5}),
    ("MultiStepLR", lambda: S.multi_step(0.1, [2, 7], 0.3), {"milestones": [2, 7], "gamma": 0.3}),
    ("ExponentialLR", lambda: S.exponential_decay(0.1, 0.9), {"gamma": 0.9}),
    ("CosineAnnealingLR", lambda: S.cosine(0.1, 10, 0.01), {"T_max": 10, "eta_min": 0.01}),
    ("PolynomialLR", lambda: S.polynomial(0.1, 0.0, 8, 2.0), {"total_iters": 8, "power": 2.0}),
])
def test_matches_torch_schedulers(torch_name, ours, kwargs):
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = getattr(torch.optim.lr_scheduler, torch_name)(opt, **kwargs)
    s = ours()
    for count in range(11):  # torch's cosine restarts after T_max; ours stays at end_value (optax)
        assert s(count) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12), count
        opt.step()
        sched.step()


@pytest.mark.parametrize("make, error, match", [
    (lambda: S.constant(-1.0), ValueError, "Invalid value: -1.0"),
    (lambda: S.exponential_decay(1.0, 0.0), ValueError, "Invalid decay_rate: 0.0"),
    (lambda: S.exponential_decay(1.0, 0.5, transition_steps=0), ValueError, "Invalid transition_steps: 0"),
    (lambda: S.step_decay(1.0, 2.5), TypeError, "step_size must be an integer"),
    (lambda: S.multi_step(1.0, [5, 2]), ValueError, "Invalid milestones"),
    (lambda: S.cosine(float("nan"), 10), ValueError, "Invalid init_value: nan"),
    (lambda: S.warmup("fast", 10), TypeError, "schedule must be a schedule"),
    (lambda: S.ReduceLROnPlateau(1.0, factor=1.5), ValueError, "Invalid factor: 1.5"),
    (lambda: S.ReduceLROnPlateau(1.0, mode="up"), ValueError, "Invalid mode: 'up'"),
    (lambda: S.cosine(1.0, 10)(-1), ValueError, "Invalid count: -1"),
    # an int past float's range (OverflowError before), a non-bool flag (taken by its truth value before)
    (lambda: S.constant(10 ** 400), ValueError, r"Invalid value: 1000000000\d*\.\.\. \(too large for a float\)"),
    (lambda: S.step_decay(0.1, 2, gamma=10 ** 400), ValueError, "Invalid gamma: 1000.*too large for a float"),
    (lambda: S.exponential_decay(0.1, 0.5, staircase="no"), TypeError, "staircase must be a bool, got 'no' \\(str\\)"),
])
def test_argument_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_schedules_pickle_and_repr():
    s = S.warmup(S.cosine(0.1, 100), 10)
    assert pickle.loads(pickle.dumps(s))(37) == s(37)
    assert repr(s).startswith("warmup(schedule=cosine(init_value=0.1")


def test_optimizer_with_schedule_uses_count_of_applied_updates(rng):
    p = rng.standard_normal(9)
    grads = [rng.standard_normal(9) for _ in range(6)]
    sched = S.step_decay(0.1, 2, 0.5)
    opt = fastopt.SGD([p.copy()], lr=sched)
    want = p.copy()
    for t, g in enumerate(grads):
        opt.step(g)
        fastopt.sgd_step(want, g, lr=sched(t))
        assert opt.last_lr == [sched(t)]
    np.testing.assert_array_equal(opt.params[0], want)


def test_reduce_on_plateau_drives_an_optimizer(rng):
    p = rng.standard_normal(4)
    plateau = S.ReduceLROnPlateau(0.1, patience=0)
    opt = fastopt.SGD([p], lr=plateau)
    opt.step(np.ones(4))
    assert opt.last_lr == [0.1]
    plateau.update(1.0)
    plateau.update(1.0)  # no improvement: lr drops
    opt.step(np.ones(4))
    assert opt.last_lr == [pytest.approx(0.01)]
    assert math.isclose(opt.state_dict()["param_groups"][0]["lr"], 0.01)


@pytest.mark.parametrize("schedule, count", [(S.exponential_decay(0.1, 1.5), 100000),
                                             (S.exponential_decay(0.1, 2.0), 1024),
                                             (S.step_decay(0.1, 1, 10.0), 400),
                                             (S.multi_step(0.1, list(range(1, 400)), 10.0), 400)])
def test_a_growing_schedule_past_float_range_is_a_bad_lr(schedule, count):
    """decay_rate > 1 (or gamma > 1) overflowed with a bare OverflowError; now the usual ValueError,
    and an optimizer using it writes nothing."""
    with pytest.raises(ValueError, match=f"Invalid learning rate: .* at count {count} is too large for a float"):
        schedule(count)
    p = np.ones(3)
    opt = fastopt.SGD([p], lr=S.exponential_decay(0.1, 1e300))  # count 1: 1e299; count 2: 0.1 * 1e600
    opt.step([np.zeros(3)])
    opt.step([np.zeros(3)])
    with pytest.raises(ValueError, match="at count 2 is too large for a float"):
        opt.step([np.ones(3)])
    assert (p == 1).all()


def test_repr_evaluates_back_and_milestones_are_named():
    c = S.constant(0.25)
    assert repr(c) == "constant(value=0.25)" and eval(repr(c), vars(S))(7) == 0.25
    with pytest.raises(TypeError, match="milestones must be a list of step counts, got 5"):
        S.multi_step(0.1, 5)


@pytest.mark.parametrize("bad, error, words", [
    ({"lr": 0.5}, KeyError, "state has no 'best'"),
    ({"lr": 0.5, "best": 2.0, "num_bad": "x", "cooldown_counter": 0}, TypeError,
     r"state\['num_bad'\] must be an integer, got 'x'"),
    ({"lr": -1.0, "best": 0.0, "num_bad": 0, "cooldown_counter": 0}, ValueError, r"Invalid state\['lr'\]: -1.0"),
    ({"lr": 0.5, "best": 0.0, "num_bad": -5, "cooldown_counter": 0}, ValueError, r"Invalid state\['num_bad'\]: -5"),
    ({"lr": 0.5, "best": float("nan"), "num_bad": 0, "cooldown_counter": 0}, ValueError, r"Invalid state\['best'\]"),
    ({"lr": 0.5, "best": 1.0, "num_bad": 0, "cooldown_counter": 1.5}, TypeError, r"state\['cooldown_counter'\]"),
    ([0.5, 1.0, 0, 0], TypeError, "state must be a dict"),
    ({"lr": 0.5, "best": 10 ** 400, "num_bad": 0, "cooldown_counter": 0}, ValueError, r"Invalid state\['best'\]"),
])
def test_reduce_on_plateau_load_state_dict_checks_every_field_before_setting_one(bad, error, words):
    """load_state_dict used to set lr and then fail on a later field (a KeyError for a missing 'best', a bare
    int() message for num_bad='x'), and took lr=-1 (the schedule then returned -1)."""
    r = S.ReduceLROnPlateau(0.1, patience=0)
    r.update(1.0)
    r.update(2.0)
    before = r.state_dict()
    with pytest.raises(error, match=words):
        r.load_state_dict(bad)
    assert r.state_dict() == before
    wrapped = S.warmup(r, 3)
    with pytest.raises(error, match=words):
        wrapped.load_state_dict({"schedule": bad})
    assert r.state_dict() == before
    r.load_state_dict({"lr": np.float32(0.25), "best": -np.inf, "num_bad": np.int64(2), "cooldown_counter": 1})
    assert r.state_dict() == {"lr": 0.25, "best": -np.inf, "num_bad": 2, "cooldown_counter": 1}


@pytest.mark.parametrize("metric", ["abc", None, [1.0], object()])
def test_reduce_on_plateau_update_names_a_bad_metric(metric):
    r = S.ReduceLROnPlateau(0.1, patience=0)
    before = r.state_dict()
    with pytest.raises(TypeError, match="metric must be a real number, got"):
        r.update(metric)
    assert r.state_dict() == before
    assert r.update(np.array(3.0)) == 0.1 and r.best == 3.0  # a 0-d array, as torch's float(metrics)


def test_reduce_on_plateau_refuses_an_int_past_float_range_and_array_modes():
    """update(10**400) was a bare OverflowError, and an array mode NumPy's "truth value ... is ambiguous"."""
    r = S.ReduceLROnPlateau(0.1, patience=0)
    before = r.state_dict()
    with pytest.raises(ValueError, match="Invalid metric: 1000"):
        r.update(10 ** 400)
    assert r.state_dict() == before
    with pytest.raises(ValueError, match="Invalid threshold_mode"):
        S.ReduceLROnPlateau(0.1, threshold_mode=np.array(["rel", "abs"]))
    with pytest.raises(ValueError, match="Invalid mode"):
        S.ReduceLROnPlateau(0.1, mode=np.array(["min"]))


@pytest.mark.parametrize("schedule, count, named", [(S.exponential_decay(1e300, 10.0), 10, 10),
                                                    (S.step_decay(1e300, 1, 10.0), 10, 10),
                                                    (S.multi_step(1e300, [1, 2], 1e10), 2, 2),
                                                    (S.warmup(S.exponential_decay(1e300, 10.0), 2), 12, 10)])
def test_a_product_past_float_range_is_a_bad_lr_too(schedule, count, named):
    """init_value * decay_rate ** n overflowing in the product (no OverflowError: inf) is the same ValueError
    (a warmup's message names its inner schedule at the inner count)."""
    with pytest.raises(ValueError, match=f"Invalid learning rate: .* at count {named} is too large for a float"):
        schedule(count)


@pytest.mark.parametrize("make", [lambda a, b: S.cosine(a, 100, b), lambda a, b: S.linear(a, b, 7),
                                  lambda a, b: S.polynomial(a, b, 9, 2.5), lambda a, b: S.polynomial(a, b, 3, 0.5)])
def test_decays_start_at_init_value_and_end_at_end_value_exactly(make):
    """At count 0 the lr is init_value itself, as torch's schedulers start at the base lr (the old
    end + (init - end) * 1 was 1 ulp off for about 7% of the pairs), and end_value at the end; monotone between."""
    rng = np.random.default_rng()
    for _ in range(500):
        a, b = sorted(10.0 ** rng.uniform(-8, 0, 2), reverse=True)
        s = make(a, b)
        values = [s(t) for t in range(120)]
        assert values[0] == a and values[-1] == b, (a, b)
        assert all(x >= y for x, y in zip(values, values[1:])), (a, b)


def test_a_decay_between_equal_values_is_constant():
    for s in (S.cosine(0.1, 100, 0.1), S.linear(0.3, 0.3, 7), S.polynomial(1e-3, 1e-3, 9, 2.5)):
        assert len({s(t) for t in range(120)}) == 1, s


def test_warmup_round_trips_a_wrapped_schedule_that_loads_but_saves_nothing():
    """A wrapped schedule with load_state_dict but no state_dict: warmup saves {} for it and takes {} back (the
    key check must ask what state_dict() writes)."""
    class Cut(S.constant):
        def load_state_dict(self, state):
            raise AssertionError("nothing was saved, nothing to load")
    w = S.warmup(Cut(0.1), 2)
    assert w.state_dict() == {}
    w.load_state_dict(w.state_dict())
    opt = fastopt.SGD([np.ones(3)], lr=w)
    opt.step([np.ones(3)])
    again = fastopt.SGD([np.ones(3)], lr=S.warmup(Cut(0.1), 2))
    again.load_state_dict(opt.state_dict())
    assert again.steps() == 1


def test_warmup_load_state_dict_checks_the_keys():
    """A warmup around a stateful schedule needs its "schedule" entry; unknown keys are refused; nothing set."""
    inner = S.ReduceLROnPlateau(0.1, patience=0)
    w = S.warmup(inner, 3)
    before = inner.state_dict()
    with pytest.raises(KeyError, match="state has no 'schedule'"):
        w.load_state_dict({})
    with pytest.raises(ValueError, match="state has the key.* 'best'.* expected only schedule"):
        w.load_state_dict(inner.state_dict())  # the bare inner state, not the warmup's
    with pytest.raises(ValueError, match="state has the key.* 'bogus'"):
        w.load_state_dict({"schedule": dict(before, lr=0.5), "bogus": 1})
    assert inner.state_dict() == before
    w.load_state_dict({"schedule": dict(before, lr=0.5)})
    assert inner.lr == 0.5 and w(3) == 0.5
    plain = S.warmup(S.cosine(0.1, 10), 3)
    plain.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match="expected none"):
        plain.load_state_dict({"schedule": {}})
