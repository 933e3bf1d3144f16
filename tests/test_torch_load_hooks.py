"""fastopt.torch's load_state_dict with torch's load_state_dict hooks: what a pre-hook returns is what is checked
and loaded, and what a post-hook writes stays (16-bit params' float32 state, 8-bit state, Adafactor's and the
composite classes' checks), as in torch.optim."""
import copy

import pytest

torch = pytest.importorskip("torch")
import fastopt.torch as ft  # noqa: E402


def _trained(cls, dtype, **options):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    p = torch.randn(7, 5, generator=gen).to(dtype).requires_grad_()
    opt = cls([p], lr=0.01, **options)
    for _ in range(3):
        p.grad = torch.randn(7, 5, generator=gen).to(dtype)
        opt.step()
    return p, opt


CASES = [(ft.Adam, torch.bfloat16, {}, "exp_avg"), (ft.Adam, torch.float16, {}, "exp_avg_sq"),
         (ft.AdamW, torch.float32, {"state_dtype": "int8"}, "exp_avg"), (ft.SGD, torch.bfloat16, {"momentum": 0.9},
                                                                          "momentum_buffer"),
         (ft.Adafactor, torch.bfloat16, {}, "row_var"), (ft.Adafactor, torch.float32, {}, "row_var")]


@pytest.mark.parametrize("cls, dtype, options, key", CASES, ids=lambda c: getattr(c, "__name__", str(c)))
@pytest.mark.parametrize("hook", ["pre returns a new dict", "pre edits in place", "post"])
def test_what_a_hook_writes_is_what_is_loaded(cls, dtype, options, key, hook):
    p, opt = _trained(cls, dtype, **options)
    saved = copy.deepcopy(opt.state_dict())
    before = saved["state"][0][key].clone()  # an in-place pre-hook edits the caller's entry (torch copies shallowly)
    fresh = cls([p], lr=0.01, **options)
    zeroed = {}

    def zero(entry):
        codes = entry[key]
        entry[key] = torch.zeros_like(codes)  # 8-bit codes too: code 0 is not value 0, so compare to the tensor
        zeroed["value"] = entry[key]

    if hook == "pre returns a new dict":
        def pre(_, sd):
            sd = copy.deepcopy(sd)
            zero(sd["state"][0])
            return sd
        fresh.register_load_state_dict_pre_hook(pre)
    elif hook == "pre edits in place":
        fresh.register_load_state_dict_pre_hook(lambda _, sd: zero(sd["state"][0]))
    else:
        fresh.register_load_state_dict_post_hook(lambda o: zero(o.state[p]))
    fresh.load_state_dict(saved)
    loaded = fresh.state[p][key]
    assert torch.equal(loaded, zeroed["value"].to(loaded.dtype)) and not torch.equal(loaded, before)
    if dtype in (torch.bfloat16, torch.float16) and options.get("state_dtype") is None:
        assert loaded.dtype == torch.float32  # this optimizer's state dtype, kept through the hook


@pytest.mark.parametrize("cls", [ft.Adam, ft.Adafactor])
def test_the_checks_see_the_dict_the_pre_hooks_leave(cls):
    """A damaged entry that a pre-hook repairs loads; a sound one a pre-hook damages is refused, nothing changed."""
    p, opt = _trained(cls, torch.float32)
    saved = copy.deepcopy(opt.state_dict())
    damaged = copy.deepcopy(saved)
    damaged["state"][0]["step"] = "three"
    fresh = cls([p], lr=0.01)
    handle = fresh.register_load_state_dict_pre_hook(lambda _, sd: saved)
    fresh.load_state_dict(damaged)
    assert float(fresh.state[p]["step"]) == 3
    handle.remove()
    other = cls([p], lr=0.01)
    other.register_load_state_dict_pre_hook(lambda _, sd: damaged)
    with pytest.raises((TypeError, ValueError), match=r"state_dict\['state'\]\[0\]"):
        other.load_state_dict(saved)
    assert not other.state and other.param_groups[0]["lr"] == 0.01
    # the hooks fastopt adds for one load are gone after it, raised or not
    assert len(other._optimizer_load_state_dict_pre_hooks) == 1 and not other._optimizer_load_state_dict_post_hooks


@pytest.mark.parametrize("cls, key, bad, good", [(ft.ScheduleFreeAdamW, "train_mode", "yes", False),
                                                 (ft.LBFGS, "max_iter", 0, 7)], ids=["ScheduleFreeAdamW", "LBFGS"])
def test_the_group_checks_see_the_dict_the_pre_hooks_leave(cls, key, bad, good):
    """schedule-free's "train_mode" and LBFGS's hyperparameters are checked on the dict torch loads: a bad value
    a pre-hook repairs loads, a good one a pre-hook spoils is refused with nothing changed (both were checked on
    the dict given, before torch's pre-hooks)."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    p = torch.randn(4, 3, generator=gen, dtype=torch.float64).requires_grad_()
    opt = cls([p], lr=0.01)
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0][key] = good
    damaged = copy.deepcopy(saved)
    damaged["param_groups"][0][key] = bad
    fresh = cls([p], lr=0.5)
    fresh.register_load_state_dict_pre_hook(lambda _, sd: saved)
    fresh.load_state_dict(damaged)
    assert fresh.param_groups[0][key] == good and fresh.param_groups[0]["lr"] == 0.01
    other = cls([p], lr=0.5)
    before = copy.deepcopy(other.param_groups[0])
    other.register_load_state_dict_pre_hook(lambda _, sd: damaged)
    with pytest.raises(ValueError, match=key):
        other.load_state_dict(saved)
    assert {k: v for k, v in other.param_groups[0].items() if k != "params"} == \
        {k: v for k, v in before.items() if k != "params"}
    assert len(other._optimizer_load_state_dict_pre_hooks) == 1 and not other._optimizer_load_state_dict_post_hooks
