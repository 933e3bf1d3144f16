"""state_dict / load_state_dict, fastopt.save / fastopt.load, and torch.optim state dict conversion."""
from __future__ import annotations

import os

import numpy as np
import pytest

import fastopt
from fastopt import schedules
from fastopt.checkpoint import CheckpointError
from fastopt.specs import REGISTRY

SPECS = list(REGISTRY.values())
TORCH_SPECS = [s for s in SPECS if s.torch_class]
LR = {"sgd": 0.05, "adagrad": 0.05, "rmsprop": 0.005, "lion": 1e-3}
OPTIONS = {"sgd": {"momentum": 0.9}, "rmsprop": {"centered": True, "momentum": 0.5}, "adam": {"amsgrad": True},
           "adamw": {"amsgrad": True}, "nadam": {"decoupled_weight_decay": True, "weight_decay": 0.01},
           "radam": {"weight_decay": 0.01}, "adagrad": {"lr_decay": 0.01}}


def make_params(rng):
    shapes = [(13,), (4, 6), (3, 2, 2), (50,)]
    dtypes = [np.float32, np.float64, np.float32, np.float64]
    return [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]


def make_opt(spec, params, **kw):
    cls = getattr(fastopt, spec.class_name)
    lr = LR.get(spec.name, 1e-2)
    groups = [{"params": params[:2], **OPTIONS.get(spec.name, {})},
              {"params": params[2:], "lr": schedules.warmup(schedules.cosine(lr, 30), 3)}]
    return cls(groups, lr=lr, **kw)


def all_arrays(opt):
    out = [p for p in opt.params]
    for i in range(len(opt.params)):
        st = opt.state_arrays(i)
        out += [st[k] for k in sorted(st)]
    return out


def snapshot(opt):
    return [a.copy() for a in all_arrays(opt)], [opt.steps(i) for i in range(len(opt.param_groups))]


def assert_same(opt, snap):
    arrays, steps = snap
    now = all_arrays(opt)
    assert len(now) == len(arrays)
    for a, b in zip(now, arrays):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert [opt.steps(i) for i in range(len(opt.param_groups))] == steps


def grad_stream(rng, params, n, bad_at=()):
    out = []
    for t in range(n):
        grads = [rng.standard_normal(p.shape).astype(p.dtype) for p in params]
        if t in bad_at:
            grads[1].flat[0] = np.nan
        out.append(grads)
    return out


@pytest.mark.parametrize("via", ["file", "state_dict"])
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_resume_is_bit_identical(spec, via, tmp_path, rng):
    params = make_params(rng)
    stream = grad_stream(rng, params, 14, bad_at=(3,))
    k = int(rng.integers(4, 10))
    whole = make_opt(spec, [p.copy() for p in params], clip_grad_norm=2.0, skip_nonfinite=True)
    for g in stream:
        whole.step(g)
    first = make_opt(spec, [p.copy() for p in params], clip_grad_norm=2.0, skip_nonfinite=True)
    for g in stream[:k]:
        first.step(g)
    if via == "file":
        fastopt.save(tmp_path / "opt.npz", first)
        saved = None
    else:
        saved = first.state_dict()
    # a state dict has no params: the caller keeps them; a file has them (load restores them)
    saved_params = [p.copy() for p in first.params] if via == "state_dict" else [
        rng.standard_normal(p.shape).astype(p.dtype) for p in params]
    for g in stream[k:k + 2]:  # the first run goes on: a state dict must not alias its state
        first.step(g)
    second = make_opt(spec, saved_params, clip_grad_norm=2.0, skip_nonfinite=True)
    if via == "file":
        fastopt.load(tmp_path / "opt.npz", second)
    else:
        second.load_state_dict(saved)
    for g in stream[k:]:
        second.step(g)
    assert_same(second, snapshot(whole))
    assert second.skipped_steps == whole.skipped_steps == 1


def test_state_dict_layout_is_torch_like_with_plain_values(rng):
    params = make_params(rng)
    opt = make_opt(REGISTRY["adam"], params)
    opt.step([np.ones_like(p) for p in params])
    sd = opt.state_dict()
    assert sorted(sd["state"]) == [0, 1, 2, 3]
    assert sd["state"][0]["step"] == 1 and type(sd["state"][0]["step"]) is int
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert set(sd["state"][2]) == {"step", "exp_avg", "exp_avg_sq"}  # group 1 has no amsgrad
    assert isinstance(sd["state"][1]["exp_avg"], np.ndarray) and sd["state"][1]["exp_avg"].dtype == np.float64
    g0, g1 = sd["param_groups"]
    assert g0["params"] == [0, 1] and g1["params"] == [2, 3]
    assert g0["betas"] == (0.9, 0.999) and g0["amsgrad"] is True
    assert type(g1["lr"]) is float and g1["lr"] == pytest.approx(opt.param_groups[1]["lr"](1))
    assert sd["fastopt"]["optimizer"] == "adam"
    assert sd["fastopt"]["param_dtypes"] == ["float32", "float64", "float32", "float64"]


def test_loading_keeps_the_state_arrays_of_the_optimizer(tmp_path, rng):
    params = make_params(rng)
    opt = make_opt(REGISTRY["adamw"], [p.copy() for p in params])
    opt.step([np.ones_like(p) for p in params])
    fastopt.save(tmp_path / "c.npz", opt)
    fresh = make_opt(REGISTRY["adamw"], [p.copy() for p in params])
    ids = [id(a) for a in all_arrays(fresh)]
    fastopt.load(tmp_path / "c.npz", fresh)
    assert [id(a) for a in all_arrays(fresh)] == ids  # copied into, on the params' device
    np.testing.assert_array_equal(fresh.state_arrays(1)["exp_avg"], opt.state_arrays(1)["exp_avg"])


def test_save_is_atomic(tmp_path, rng, monkeypatch):
    params = make_params(rng)
    opt = make_opt(REGISTRY["adam"], [p.copy() for p in params])
    path = tmp_path / "ckpt.npz"
    fastopt.save(path, opt)
    good = path.read_bytes()
    opt.step([np.ones_like(p) for p in params])

    def crash(f, array, **kw):
        f.write(b"\x93NUMPY half an array")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(np.lib.format, "write_array", crash)
    with pytest.raises(KeyboardInterrupt):
        fastopt.save(path, opt)
    assert path.read_bytes() == good  # the old checkpoint is intact
    assert os.listdir(tmp_path) == ["ckpt.npz"]  # and no temporary file is left behind
    monkeypatch.undo()
    fastopt.save(path, opt)
    assert path.read_bytes() != good


def corrupt_truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def corrupt_flip(path):
    import zipfile
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("state/3/exp_avg.npy")  # 50 float64
    data = bytearray(path.read_bytes())
    name_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    at = info.header_offset + 30 + name_len + extra_len + 128 + 200  # inside the array's values
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def corrupt_garbage(path):
    path.write_bytes(os.urandom(300))


def corrupt_not_fastopt(path):
    with open(path, "wb") as f:
        np.savez(f, weights=np.zeros(3))


@pytest.mark.parametrize("corrupt, match", [
    (corrupt_truncate, "corrupted or not a fastopt checkpoint"),
    (corrupt_flip, "is damaged: its SHA-256 checksum does not match"),
    (corrupt_garbage, "corrupted or not a fastopt checkpoint"),
    (corrupt_not_fastopt, "not a fastopt checkpoint"),
])
def test_corrupted_checkpoints_raise_and_change_nothing(corrupt, match, tmp_path, rng):
    params = make_params(rng)
    opt = make_opt(REGISTRY["adam"], [p.copy() for p in params])
    for g in grad_stream(rng, params, 3):
        opt.step(g)
    path = tmp_path / "c.npz"
    fastopt.save(path, opt)
    corrupt(path)
    target = make_opt(REGISTRY["adam"], [p.copy() for p in params])
    target.step(grad_stream(rng, params, 1)[0])
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=match):
        fastopt.load(path, target)
    assert_same(target, before)


@pytest.mark.parametrize("kind", ["str", "bytes", "pathlib"])
def test_save_and_load_take_any_path_form(kind, tmp_path, rng):
    """fastopt.load took a bytes path, fastopt.save failed on one (TypeError matching its temporaries)."""
    path = {"str": str, "bytes": os.fsencode, "pathlib": lambda p: p}[kind](tmp_path / "c.npz")
    params = make_params(rng)
    opt = make_opt(REGISTRY["adam"], [p.copy() for p in params])
    opt.step([np.ones_like(p) for p in params])
    fastopt.save(path, opt)
    fastopt.save(path, opt)  # over the file it wrote
    fresh = make_opt(REGISTRY["adam"], [np.zeros_like(p) for p in params])
    fastopt.load(path, fresh)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(all_arrays(fresh), all_arrays(opt)))
    assert sorted(os.listdir(tmp_path)) == ["c.npz"]


@pytest.mark.parametrize("name", ["Adafactor", "Muon", "SparseAdam", "LBFGS"])
def test_a_composite_optimizer_is_pointed_to_its_state_dict(name, tmp_path):
    """fastopt.save(path, fastopt.Adafactor(...)) said "expected a fastopt optimizer (fastopt.Adam, ...)"."""
    import pickle
    opt = getattr(fastopt, name)([np.ones((3, 4))])
    for call in (lambda: fastopt.save(tmp_path / "c.npz", opt), lambda: fastopt.load(tmp_path / "c.npz", opt)):
        with pytest.raises(TypeError, match=f"got {name}; {name} keeps its state in state_dict"):
            call()
    assert not list(tmp_path.iterdir())
    opt.load_state_dict(pickle.loads(pickle.dumps(opt.state_dict())))  # the way the message names


def test_missing_file_is_file_not_found(tmp_path, rng):
    opt = make_opt(REGISTRY["adam"], make_params(rng))
    with pytest.raises(FileNotFoundError):
        fastopt.load(tmp_path / "nope.npz", opt)


def _mismatches(rng):
    p = make_params(rng)
    return [
        ("other optimizer", lambda: make_opt(REGISTRY["sgd"], [q.copy() for q in p]),
         "the state dict is for 'adam', this optimizer is 'sgd'"),
        ("fewer params", lambda: fastopt.Adam([q.copy() for q in p[:3]]), "has 4 params but the optimizer has 3"),
        ("other shape", lambda: make_opt(REGISTRY["adam"], [q.copy() for q in p[:3]] + [np.zeros(51)]),
         r"param 3 is float64\[50\] in the state dict but float64\[51\]"),
        ("other dtype", lambda: make_opt(REGISTRY["adam"], [p[0].astype(np.float64)] + [q.copy() for q in p[1:]]),
         r"param 0 is float32\[13\] in the state dict but float64\[13\]"),
        ("other groups", lambda: fastopt.Adam([q.copy() for q in p]), "has 2 param groups but the optimizer has 1"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_mismatched_checkpoints_name_the_mismatch_and_change_nothing(case, tmp_path, rng):
    params = make_params(rng)
    opt = make_opt(REGISTRY["adam"], [p.copy() for p in params])
    opt.step([np.ones_like(p) for p in params])
    fastopt.save(tmp_path / "c.npz", opt)
    _, make_target, match = _mismatches(rng)[case]
    target = make_target()
    target.step([np.full(p.shape, 0.5, p.dtype) for p in target.params])
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=match):
        fastopt.load(tmp_path / "c.npz", target)
    assert_same(target, before)


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd["state"][1].__setitem__("exp_avg", np.zeros(5)), r"exp_avg has shape \(5,\), expected \(4, 6\)"),
    (lambda sd: sd["state"][0].__setitem__("exp_avg", sd["state"][0]["exp_avg"].astype(np.float64)),
     "exp_avg has dtype float64, expected float32"),
    (lambda sd: sd["state"][2].pop("exp_avg_sq"), "state of param 2 is missing exp_avg_sq"),
    (lambda sd: sd["state"][2].__setitem__("momentum_buffer", np.zeros(12)), "momentum_buffer, which Adam does not"),
    (lambda sd: sd["state"][3].__setitem__("step", 7), "different step counts"),
    (lambda sd: sd["param_groups"][0].__setitem__("lr", -1.0), "param group 0: Invalid learning rate: -1.0"),
    (lambda sd: sd["param_groups"][1].pop("eps"), "param group 1 does not fit Adam: missing eps"),
    (lambda sd: sd["param_groups"][1].__setitem__("momentum", 0.9), "unknown momentum"),
    (lambda sd: sd["state"].__setitem__(9, {}), "state for param 9"),
    (lambda sd: sd.pop("state"), "not an optimizer state dict"),
])
def test_bad_state_dicts_name_the_problem_and_change_nothing(edit, match, rng):
    params = make_params(rng)
    opt = make_opt(REGISTRY["adam"], [p.copy() for p in params])
    opt.step([np.ones_like(p) for p in params])
    sd = opt.state_dict()
    edit(sd)
    target = make_opt(REGISTRY["adam"], [p.copy() for p in params])
    target.step([np.full(p.shape, 0.5, p.dtype) for p in params])
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=match):
        target.load_state_dict(sd)
    assert_same(target, before)


@pytest.mark.parametrize("name, change", [("adam", {"amsgrad": True}), ("adamw", {"amsgrad": True}),
                                          ("rmsprop", {"centered": True}), ("rmsprop", {"momentum": 0.5}),
                                          ("sgd", {"momentum": 0.9}), ("lion", {"weight_decay": 0.1})])
@pytest.mark.parametrize("via", ["file", "state_dict"])
def test_a_state_switched_on_between_steps_is_saved_and_loaded(name, change, via, tmp_path, rng):
    """amsgrad (or RMSprop's centered/momentum) set in param_groups between steps: the next step makes the new
    state. A checkpoint saved before that step lacked it for the whole group and did not load ("missing
    max_exp_avg_sq"), even into the optimizer that saved it. It is saved at the value the next step starts
    from, loads, and the run goes on bit for bit (SGD's buffer, made from the gradient, stays absent)."""
    spec = REGISTRY[name]
    params = make_params(rng)
    grads = grad_stream(rng, params, 7)
    whole, part = (make_opt(spec, [p.copy() for p in params]) for _ in range(2))
    for g in grads[:3]:
        whole.step(g)
        part.step(g)
    for opt in (whole, part):
        opt.param_groups[1].update(change)  # (group 0 starts with OPTIONS)
    # a state dict has no params (torch's layout): the fresh optimizer's are the saved run's; a file has them
    fresh = make_opt(spec, [np.zeros_like(p) if via == "file" else p.copy() for p in part.params])
    if via == "file":
        fastopt.save(tmp_path / "c.npz", part)
        fastopt.load(tmp_path / "c.npz", fresh)
    else:
        fresh.load_state_dict(part.state_dict())
    part.load_state_dict(part.state_dict())  # into the optimizer that saved it, too
    for g in grads[3:]:
        for opt in (whole, part, fresh):
            opt.step([a.copy() for a in g])
    for a, b, c in zip(all_arrays(whole), all_arrays(part), all_arrays(fresh)):
        assert a.tobytes() == b.tobytes() == c.tobytes()


@pytest.mark.parametrize("lost", [[1], [0, 1]])
def test_an_optional_state_a_checkpoint_lost_is_refused(lost, rng):
    """A state the group's hyperparameters use that params of it lack (one param, or all of them: a conversion
    that dropped the key) is a damaged checkpoint: refused, not made at its initial value."""
    params = make_params(rng)
    opt = make_opt(REGISTRY["adam"], [p.copy() for p in params])  # group 0: amsgrad (OPTIONS)
    for _ in range(3):
        opt.step([rng.standard_normal(p.shape).astype(p.dtype) for p in params])
    sd = opt.state_dict()
    for i in lost:
        del sd["state"][i]["max_exp_avg_sq"]
    target = make_opt(REGISTRY["adam"], [p.copy() for p in params])
    target.step([np.full(p.shape, 0.5, p.dtype) for p in params])
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=f"state of param {lost[0]} is missing max_exp_avg_sq"):
        target.load_state_dict(sd)
    assert_same(target, before)


def test_schedule_state_is_checkpointed(tmp_path, rng):
    p = rng.standard_normal(5)
    plateau = schedules.ReduceLROnPlateau(0.1, patience=0)
    opt = fastopt.Adam([p.copy()], lr=schedules.warmup(plateau, 2))
    opt.step(np.ones(5))
    plateau.update(1.0)
    plateau.update(2.0)  # lr drops to 0.01
    fastopt.save(tmp_path / "c.npz", opt)
    fresh_plateau = schedules.ReduceLROnPlateau(0.1, patience=0)
    fresh = fastopt.Adam([p.copy()], lr=schedules.warmup(fresh_plateau, 2))
    fastopt.load(tmp_path / "c.npz", fresh)
    assert fresh_plateau.lr == pytest.approx(0.01) and fresh_plateau.best == 1.0
    assert fresh.steps() == 1


# ---- torch.optim conversion ----------------------------------------------------------------------

def torch_kwargs(spec):
    kw = dict(OPTIONS.get(spec.name, {}))
    kw["lr"] = LR.get(spec.name, 1e-2)
    return kw


@pytest.mark.parametrize("spec", TORCH_SPECS, ids=[s.name for s in TORCH_SPECS])
def test_a_torch_state_dict_of_bfloat16_params_loads(spec, rng):
    """torch.optim keeps bfloat16 state for bfloat16 params; load_torch_state_dict failed on every one ("Got
    unsupported ScalarType BFloat16"). The loaded state holds torch's values (exact in fastopt's float32)."""
    torch = pytest.importorskip("torch")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    shapes = [(13,), (4, 6), (1,)]
    tparams = [torch.from_numpy(rng.standard_normal(s)).to(torch.bfloat16) for s in shapes]
    theirs = getattr(torch.optim, spec.torch_class)(tparams, **torch_kwargs(spec))
    for _ in range(3):
        for p in tparams:
            p.grad = torch.from_numpy(rng.standard_normal(p.shape)).to(torch.bfloat16)
        theirs.step()
    params = [p.float().numpy().astype(ml_dtypes.bfloat16) for p in tparams]
    ours = getattr(fastopt, spec.class_name)(params, **torch_kwargs(spec))
    ours.load_torch_state_dict(theirs.state_dict(), **({"step": 3} if spec.name == "sgd" else {}))
    assert ours.steps(0) == 3
    for i, p in enumerate(tparams):
        saved = {k: v for k, v in theirs.state[p].items() if torch.is_tensor(v) and v.dtype == torch.bfloat16}
        assert saved
        mine = ours.state_arrays(i)
        for name, value in saved.items():
            name = {theirs_: ours_ for ours_, theirs_ in spec.torch_state_names.items()}.get(name, name)
            assert np.array_equal(np.asarray(mine[name], np.float32), value.float().numpy()), name


@pytest.mark.parametrize("default", ["float32", "float64"])
@pytest.mark.parametrize("spec", TORCH_SPECS, ids=[s.name for s in TORCH_SPECS])
def test_torch_state_dict_scalars_are_in_torchs_scalar_dtype(spec, default, rng):
    """torch keeps its scalar state (step, NAdam's mu_product, ASGD's eta and mu) in float64 under a float64
    default dtype; torch_state_dict wrote float32 always, and torch's run continued from it drifted (NAdam 5.6e-12,
    ASGD 7.6e-11 in float64). The dtypes are now torch's own, and the continuation is torch's uninterrupted run."""
    torch = pytest.importorskip("torch")
    import contextlib
    from torch_support import default_dtype
    params = [rng.standard_normal(s) for s in [(13,), (4, 6)]]
    stream = grad_stream(rng, params, 10)
    with default_dtype(getattr(torch, default)) if default == "float64" else contextlib.nullcontext():
        tparams = [torch.from_numpy(p.copy()) for p in params]
        uninterrupted = getattr(torch.optim, spec.torch_class)(tparams, **torch_kwargs(spec))
        for g in stream:
            for p, a in zip(tparams, g):
                p.grad = torch.from_numpy(a.copy())
            uninterrupted.step()
        ours = getattr(fastopt, spec.class_name)([p.copy() for p in params], **torch_kwargs(spec))
        for g in stream[:4]:
            ours.step([a.copy() for a in g])
        sd = ours.torch_state_dict()
        mine = {k: v.dtype for k, v in sd["state"][0].items() if v.ndim == 0}
        theirs = {k: v.dtype for k, v in uninterrupted.state_dict()["state"][0].items() if v.ndim == 0}
        assert mine == theirs
        resumed = [torch.from_numpy(p.copy()) for p in ours.params]
        again = getattr(torch.optim, spec.torch_class)(resumed, **torch_kwargs(spec))
        again.load_state_dict(sd)
        for g in stream[4:]:
            for p, a in zip(resumed, g):
                p.grad = torch.from_numpy(a.copy())
            again.step()
    # under a float32 default, torch's running product and fastopt's closed form round apart in float32
    tol = {"rtol": 1e-13, "atol": 1e-15} if default == "float64" else {"rtol": 1e-6, "atol": 1e-7}
    for p, q in zip(resumed, tparams):
        torch.testing.assert_close(p, q, **tol)


@pytest.mark.parametrize("spec", TORCH_SPECS, ids=[s.name for s in TORCH_SPECS])
def test_torch_state_dict_round_trip(spec, rng):
    torch = pytest.importorskip("torch")
    params = [rng.standard_normal(s) for s in [(13,), (4, 6), (3, 2, 2)]]
    cls = getattr(fastopt, spec.class_name)
    ours = cls([p.copy() for p in params], **torch_kwargs(spec))
    stream = grad_stream(rng, params, 8)
    for g in stream[:5]:
        ours.step(g)
    # fastopt -> torch -> fastopt: the state comes back bit for bit
    tparams = [torch.from_numpy(p.copy()) for p in ours.params]
    theirs = getattr(torch.optim, spec.torch_class)(tparams, **torch_kwargs(spec))
    theirs.load_state_dict(ours.torch_state_dict())
    back = cls([p.copy() for p in ours.params], **torch_kwargs(spec))
    back.load_torch_state_dict(theirs.state_dict(), **({"step": 5} if spec.name == "sgd" else {}))
    assert_same(back, snapshot(ours))
    # and torch continues from the converted state like fastopt does (float64: close to rounding)
    _continue_both(ours, theirs, tparams, stream[5:])


def _torch_step(theirs, tparams, grads):
    import torch
    for tp, g in zip(tparams, grads):
        tp.grad = torch.from_numpy(g.copy())
    theirs.step()


def _continue_both(ours, theirs, tparams, stream):
    """Step fastopt and torch on the same gradients; they must stay together (float64: near rounding). ASGD:
    torch keeps eta and mu as float32 tensors (its scalar dtype under the default float32 dtype), so its lr
    is rounded to float32 each step: measured over 300 seeds, params up to 5.7e-10 apart after 3 steps (rtol
    is no help for a param near zero)."""
    for g in stream:
        ours.step(g)
        _torch_step(theirs, tparams, g)
    atol = 2e-9 if ours.spec.name == "asgd" else 1e-10
    for a, t in zip(ours.params, tparams):
        np.testing.assert_allclose(a, t.numpy(), rtol=1e-7, atol=atol)


@pytest.mark.parametrize("spec", TORCH_SPECS, ids=[s.name for s in TORCH_SPECS])
def test_switching_from_torch_keeps_the_state(spec, rng):
    torch = pytest.importorskip("torch")
    params = [rng.standard_normal(s) for s in [(9,), (5, 3)]]
    tparams = [torch.from_numpy(p.copy()) for p in params]
    theirs = getattr(torch.optim, spec.torch_class)(tparams, **torch_kwargs(spec))
    stream = grad_stream(rng, params, 7)
    for g in stream[:4]:
        _torch_step(theirs, tparams, g)
    ours = getattr(fastopt, spec.class_name)([tp.numpy().copy() for tp in tparams], **torch_kwargs(spec))
    ours.load_torch_state_dict(theirs.state_dict(), **({"step": 4} if spec.name == "sgd" else {}))
    assert ours.steps() == 4
    _continue_both(ours, theirs, tparams, stream[4:])


def test_torch_conversion_errors(rng):
    torch = pytest.importorskip("torch")
    p = rng.standard_normal(4)
    with pytest.raises(ValueError, match="torch.optim has no Lion"):
        fastopt.Lion([p]).torch_state_dict()
    tp = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    adamw = torch.optim.AdamW([tp])
    # torch's AdamW is Adam(decoupled_weight_decay=True): it loads into fastopt.Adam with the flag set
    adam = fastopt.Adam([p])
    adam.load_torch_state_dict(adamw.state_dict())
    assert adam.param_groups[0]["decoupled_weight_decay"] is True
    # and a plain Adam dict does not fit AdamW, whose decoupling is fixed
    before = p.copy()
    with pytest.raises(CheckpointError, match="load it into fastopt.Adam$"):
        fastopt.AdamW([p]).load_torch_state_dict(torch.optim.Adam([tp]).state_dict())
    assert p.tobytes() == before.tobytes()
    sgd = torch.optim.SGD([tp], lr=0.1, momentum=0.9)
    sd = sgd.state_dict()
    sd["param_groups"][0]["lookahead"] = 5
    with pytest.raises(CheckpointError, match="torch key 'lookahead'"):
        fastopt.SGD([p], lr=0.1, momentum=0.9).load_torch_state_dict(sd)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_16_bit_params_round_trip_and_training_continues(dtype_name, tmp_path):
    """bfloat16 params (ml_dtypes; a .npy member holds their uint16 bits) and float16 params save and load
    bit for bit with their float32 state, and the next steps equal the uninterrupted run's; a file of
    16-bit params does not load into float32 params (nothing changed)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dtype = ml_dtypes.bfloat16 if dtype_name == "bfloat16" else np.float16
    rng = np.random.default_rng(21)
    ps = [rng.standard_normal(s).astype(dtype) for s in [(3, 4), (5,), (1,)]]
    opt = fastopt.AdamW(ps, lr=1e-2, weight_decay=0.1)
    grads = [[rng.standard_normal(p.shape).astype(dtype) for p in ps] for _ in range(6)]
    for g in grads[:3]:
        opt.step(g)
    path = tmp_path / "c.npz"
    fastopt.save(path, opt)
    qs = [np.zeros_like(p) for p in ps]
    other = fastopt.AdamW(qs, lr=1e-2, weight_decay=0.1)
    fastopt.load(path, other)
    assert all(p.dtype == q.dtype and p.tobytes() == q.tobytes() for p, q in zip(ps, qs))
    for g in grads[3:]:
        opt.step(g)
        other.step(g)
    assert all(p.tobytes() == q.tobytes() for p, q in zip(ps, qs))
    f32 = [np.zeros(p.shape, np.float32) for p in ps]
    wrong = fastopt.AdamW(f32, lr=1e-2)
    with pytest.raises(fastopt.CheckpointError, match=f"{dtype_name}.*float32"):
        fastopt.load(path, wrong)
    assert all(not a.any() for a in f32)
