"""One rank of the DTensor tests: `python dtensor_worker.py SCENARIO,... RANK WORLD INIT_FILE OUT [DEVICE]`.
tests/distributed/test_torch_dtensor.py starts WORLD of these; each writes {scenario: "OK" or its traceback}
(JSON) to OUT.<rank>. Every rank draws the same global tensors (one seed), so each can check the whole result.
DEVICE "cpu" (the default: gloo) or "cuda" (NCCL, rank r on GPU r: the CuPy kernels on CUDA DTensors)."""
from __future__ import annotations

import copy
import datetime
import json
import math
import os
import sys
import traceback

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

import fastopt.torch as ft
from fastopt.specs import REGISTRY

DEVICE = "cpu"  # the mesh's device type (argv)
# odd sizes: a dim of 1 leaves one rank's local tensor empty; (0,) is empty everywhere
SHAPES = [(7, 3), (101,), (1,), (0,), (2, 33)]
# the registry optimizers whose update is elementwise (fastopt/torch/dtensor.py); torch's name where it has one
ELEMENTWISE = [spec.class_name for spec in REGISTRY.values() if not spec.norms_per_tensor]
# torch.optim.Rprop's step fails on DTensors (an in-place masked write, aten.index_put_, that DTensor refuses)
TORCH_HAS = [spec.class_name for spec in REGISTRY.values()
             if not spec.norms_per_tensor and spec.torch_class and spec.torch_class != "Rprop"]
# options that change the update, per class (torch's names; every class takes lr and weight_decay or has none)
OPTIONS = {"Adam": [dict(amsgrad=True, weight_decay=0.1), dict(maximize=True)], "AdamW": [dict(amsgrad=True)],
           "SGD": [dict(momentum=0.9, nesterov=True, weight_decay=0.01), dict(momentum=0.5, dampening=0.3)],
           "RMSprop": [dict(momentum=0.9, centered=True)],
           "NAdam": [dict(decoupled_weight_decay=True, weight_decay=0.1)],
           "RAdam": [dict(decoupled_weight_decay=True, weight_decay=0.1)], "Adagrad": [dict(lr_decay=0.01)]}
LR = {"Adadelta": 1.0, "Rprop": 0.01, "ASGD": 0.01}


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def placements_for(shape, world):
    """Shard(0), Shard(1) for 2-D shapes and Replicate: each a different split of the same elements."""
    out = [[Shard(0)], [Replicate()]]
    if len(shape) == 2:
        out.append([Shard(1)])
    return out


def draw(seed, shapes, dtype):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).to(DEVICE) for s in shapes]


def run_pair(klass, options, mesh, dtype, placements, steps=6, seed=0, grad_nan_at=None):
    """The same training with DTensor params (placements[i] for SHAPES[i]) and with plain tensors: (DTensor
    params as full tensors, plain params, DTensor optimizer, plain optimizer)."""
    start = draw(seed, SHAPES, dtype)
    sharded = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, pl)) for w, pl in zip(start, placements)]
    plain = [torch.nn.Parameter(w.clone()) for w in start]
    opts = [klass(sharded, **options), klass(plain, **options)]
    for t in range(steps):
        grads = draw(1000 * seed + t + 1, SHAPES, dtype)
        if grad_nan_at == t:
            grads[0][-1, -1] = math.nan  # the last row: on the last rank's piece under Shard(0)
        for p, q, g, pl in zip(sharded, plain, grads, placements):
            p.grad = distribute_tensor(g.clone(), mesh, pl)
            q.grad = g.clone()
        for o in opts:
            o.step()
    if hasattr(opts[0], "eval"):  # schedule-free: the params move to the averaged point (a lerp of DTensors)
        for o in opts:
            o.eval()
    return [p.full_tensor() for p in sharded], [q.detach() for q in plain], opts[0], opts[1]


def equal(rank, world):
    """Every elementwise class, DTensor params bit for bit the plain-tensor run (float32, float64; odd sizes,
    empty local pieces), for each placement; the state as DTensors laid out as their params, the same values."""
    mesh = init_device_mesh(DEVICE, (world,))
    for name in ELEMENTWISE:
        klass = getattr(ft, name)
        for options in [{}] + OPTIONS.get(name, []):
            for dtype in (torch.float32, torch.float64):
                for k in range(3):  # Shard(0) everywhere, Replicate everywhere, Shard(1) where it applies
                    placements = [placements_for(s, world)[min(k, len(placements_for(s, world)) - 1)] for s in SHAPES]
                    kw = dict(lr=LR.get(name, 0.01), **options)
                    got, want, o_sharded, o_plain = run_pair(klass, kw, mesh, dtype, placements, seed=k)
                    for i, (a, b) in enumerate(zip(got, want)):
                        check(torch.equal(a, b), f"{name} {options} {dtype} {placements[i]} param {i}: {a} vs {b}")
                    sa, sb = o_sharded.state_dict()["state"], o_plain.state_dict()["state"]
                    check(sa.keys() == sb.keys(), f"{name}: state keys {sa.keys()} vs {sb.keys()}")
                    for i in sa:
                        for key, v in sa[i].items():
                            w = sb[i][key]
                            if key == "step" or not isinstance(v, torch.Tensor) or v.dim() == 0 and w.dim() == 0 \
                                    and not hasattr(v, "placements"):
                                check(torch.equal(torch.as_tensor(v), torch.as_tensor(w)), f"{name} {key}: {v} vs {w}")
                                continue
                            check(tuple(v.placements) == tuple(placements[i]), f"{name} {key}: {v.placements}")
                            check(torch.equal(v.full_tensor(), w), f"{name} {options} state {key} of param {i}")


def reload(rank, world):
    """A state dict loaded into the same optimizer mid-run, a state tensor replaced in its dict and one's memory
    swapped under it (torch.utils.swap_tensors: the cached plan of each param must see them all), a param group's lr changed and a param without a grad
    on one step: the plain-tensor run's params
    and state, bit for bit."""
    mesh = init_device_mesh(DEVICE, (world,))
    placements = [placements_for(s, world)[0] for s in SHAPES]
    start = draw(9, SHAPES, torch.float32)
    runs = []
    for sharded in (True, False):
        params = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, pl) if sharded else w.clone())
                  for w, pl in zip(start, placements)]
        opt = ft.Adam(params, lr=0.01)
        saved = None
        for t in range(8):
            for i, (p, g, pl) in enumerate(zip(params, draw(200 + t, SHAPES, torch.float32), placements)):
                p.grad = None if (t == 4 and i == 0) else distribute_tensor(g, mesh, pl) if sharded else g
            if t == 2:
                saved = copy.deepcopy(opt.state_dict())
            if t == 5:
                opt.load_state_dict(saved)
                opt.param_groups[0]["lr"] = 0.02
            if t == 6:  # one state tensor replaced in its dict (a "move the state" helper)
                opt.state[params[1]]["exp_avg_sq"] = opt.state[params[1]]["exp_avg_sq"] * 2
            if t == 7:  # another's memory swapped under the same tensor object
                kept = opt.state[params[4]]["exp_avg"]
                torch.utils.swap_tensors(kept, kept * 0.5)
            opt.step()
        runs.append(([p.full_tensor() if sharded else p.detach() for p in params],
                     [opt.state[p]["exp_avg"] for p in params]))
    for a, b in zip(runs[0][0], runs[1][0]):
        check(torch.equal(a, b), "reload: the DTensor run's params differ from the plain one's")
    for a, b in zip(runs[0][1], runs[1][1]):
        check(torch.equal(a.full_tensor(), b), "reload: the DTensor run's state differs from the plain one's")


def low_precision(rank, world):
    """bfloat16 DTensor params with float32 state and Kahan summation, and float32 params with bfloat16 state:
    bit for bit the plain-tensor run."""
    mesh = init_device_mesh(DEVICE, (world,))
    for name in ("AdamW", "SGD", "Lion"):
        for dtype, options in [(torch.bfloat16, dict(kahan=True)), (torch.bfloat16, {}),
                               (torch.float32, dict(state_dtype="bfloat16"))]:
            kw = dict(lr=0.01, **options, **(dict(momentum=0.9) if name == "SGD" else {}))
            placements = [placements_for(s, world)[0] for s in SHAPES]
            got, want, _, _ = run_pair(getattr(ft, name), kw, mesh, dtype, placements)
            for a, b in zip(got, want):
                check(torch.equal(a, b), f"{name} {dtype} {options}: the DTensor run differs from the plain one")


def torch_oracle(rank, world):
    """torch.optim's class on the same DTensor params (its foreach path dispatches to the local tensors):
    within float32 rounding (float64: 1e-12)."""
    mesh = init_device_mesh(DEVICE, (world,))
    for name in TORCH_HAS:
        spec = getattr(ft, name).spec
        theirs = getattr(torch.optim, spec.torch_class)
        for options in [{}] + OPTIONS.get(name, []):
            for dtype in (torch.float32, torch.float64):
                placements = [placements_for(s, world)[0] for s in SHAPES]
                start = draw(7, SHAPES, dtype)
                runs = []
                for klass in (getattr(ft, name), theirs):
                    params = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, pl))
                              for w, pl in zip(start, placements)]
                    opt = klass(params, lr=LR.get(name, 0.01), **options)
                    for t in range(8):
                        for p, g, pl in zip(params, draw(100 + t, SHAPES, dtype), placements):
                            p.grad = distribute_tensor(g, mesh, pl)
                        opt.step()
                    runs.append([p.full_tensor() for p in params])
                tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
                for a, b in zip(*runs):
                    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name} {options} {dtype}: {m}")


def clip_skip(rank, world):
    """clip_grad_norm= reads the global norm (the float64 sums of squares of every rank's pieces, summed over the
    ranks that shard), so the ranks clip alike and match the plain-tensor run to the rounding of the sum's order,
    for every dtype: float16 grads whose norm is past float16's range (95,000) are clipped, not zeroed, and are
    not taken for an overflow; params on several meshes (1-D, and 2-D meshes sharding along either dim or both,
    with FSDP2's _StridedShard) add up their norms; skip_nonfinite= skips on every rank when one rank's piece holds a NaN."""
    mesh = init_device_mesh(DEVICE, (world,))
    placements = [placements_for(s, world)[0] for s in SHAPES]
    for dtype, tol in [(torch.float64, dict(rtol=1e-12, atol=1e-14)), (torch.float32, dict(rtol=1e-6, atol=1e-7)),
                       (torch.bfloat16, dict(rtol=1e-2, atol=1e-2))]:
        got, want, _, _ = run_pair(ft.AdamW, dict(lr=0.01, clip_grad_norm=0.5), mesh, dtype, placements)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **tol)
    big = torch.full((100_000,), 300.0, dtype=torch.float16, device=DEVICE)  # norm 94,868 > 65,504
    for options in (dict(skip_nonfinite=True), dict(clip_grad_norm=1.0)):
        runs = []
        for sharded in (True, False):
            zero = torch.zeros_like(big)
            p = torch.nn.Parameter(distribute_tensor(zero, mesh, [Shard(0)]) if sharded else zero)
            opt = ft.SGD([p], lr=1.0, **options)
            p.grad = distribute_tensor(big.clone(), mesh, [Shard(0)]) if sharded else big.clone()
            opt.step()
            check(opt.skipped_steps == 0, f"float16 {options}: a finite step taken for an overflow")
            runs.append(p.full_tensor() if sharded else p.detach())
        check(bool((runs[0] != 0).all()), f"float16 {options}: not every element moved")
        torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    if world == 2:  # params on three meshes
        meshes = [mesh, init_device_mesh(DEVICE, (1, 2), mesh_dim_names=("a", "b")),
                  init_device_mesh(DEVICE, (2, 1), mesh_dim_names=("c", "d"))]
        # _StridedShard: what FSDP2 makes of a tensor-parallel param (its is_shard() is False, yet it shards)
        from torch.distributed.tensor.placement_types import _StridedShard
        per = [(meshes[0], [Shard(0)]), (meshes[1], [Replicate(), Shard(0)]), (meshes[2], [Shard(1), Replicate()]),
               (meshes[1], [Shard(0), Replicate()]), (meshes[2], [_StridedShard(0, split_factor=1), Shard(0)])]
        start = draw(11, [(6, 4)] * len(per), torch.float32)
        runs = []
        for sharded in (True, False):
            params = [torch.nn.Parameter(distribute_tensor(w.clone(), m, pl) if sharded else w.clone())
                      for w, (m, pl) in zip(start, per)]
            opt = ft.AdamW(params, lr=0.01, clip_grad_norm=0.2)
            for t in range(4):
                for p, g, (m, pl) in zip(params, draw(300 + t, [(6, 4)] * len(per), torch.float32), per):
                    p.grad = distribute_tensor(g, m, pl) if sharded else g
                opt.step()
            runs.append([p.full_tensor() if sharded else p.detach() for p in params])
        for a, b in zip(*runs):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    got, want, o_sharded, o_plain = run_pair(ft.Adam, dict(lr=0.01, skip_nonfinite=True), mesh, torch.float32,
                                             placements, grad_nan_at=2)
    check(o_sharded.skipped_steps == 1 == o_plain.skipped_steps, f"skipped {o_sharded.skipped_steps} on rank {rank}")
    for a, b in zip(got, want):
        check(torch.equal(a, b), "skip_nonfinite: the DTensor run differs from the plain one")


def grad_scaler(rank, world):
    """torch.amp.GradScaler (its unscale fused into the update): a step with an inf in one rank's piece is skipped
    on every rank (DTensor reduces GradScaler's found_inf over the mesh), the others equal the unscaled run."""
    mesh = init_device_mesh(DEVICE, (world,))
    start = draw(5, SHAPES, torch.float32)
    runs = []
    for scaled in (True, False):
        params = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w in start]
        opt = ft.Adam(params, lr=0.01)
        scaler = torch.amp.GradScaler(DEVICE, init_scale=1024.0, growth_interval=1000)
        scaler.scale(torch.ones((), device=DEVICE))  # makes the scale tensor, as scaling a loss does
        for t in range(5):
            grads = draw(50 + t, SHAPES, torch.float32)
            for p, g in zip(params, grads):
                if t == 2 and g.numel() > 1:
                    g[-1] = math.inf  # the last rank's piece
                p.grad = distribute_tensor(g * 1024.0 if scaled else g, mesh, [Shard(0)])
            if scaled:
                scaler.step(opt)
                scaler.update(1024.0)
            elif t != 2:
                opt.step()
        runs.append([p.full_tensor() for p in params])
        check(not scaled or opt.state_dict()["state"][0]["step"].item() == 4, f"steps taken on rank {rank}")
    for a, b in zip(*runs):
        check(torch.equal(a, b), "GradScaler: the scaled run differs from the unscaled one that skipped step 2")
    # an inf that only one rank's GradScaler sees (a plain param's grad: not reduced over the ranks) with clipping:
    # that rank skips, the other steps, and both have taken part in the norm's all-reduce (a collective left out
    # on one rank would meet the next one below, of another size, and fail or hang)
    mesh_param = torch.nn.Parameter(distribute_tensor(torch.ones(4, 3, device=DEVICE), mesh, [Shard(0)]))
    plain = torch.nn.Parameter(torch.ones(3, device=DEVICE, dtype=torch.float64))
    opt = ft.Adam([mesh_param, plain], lr=0.01, clip_grad_norm=1.0)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0)
    scaler.scale(torch.ones((), device=DEVICE))
    mesh_param.grad = distribute_tensor(torch.ones(4, 3, device=DEVICE), mesh, [Shard(0)])
    plain.grad = torch.full((3,), math.inf if rank == world - 1 else 1.0, device=DEVICE, dtype=torch.float64)
    scaler.step(opt)
    probe = torch.ones(5, device=DEVICE)
    dist.all_reduce(probe)
    check(torch.equal(probe, torch.full((5,), float(world), device=DEVICE)), "the ranks' collectives went out of step")


def refused(rank, world):
    """What fastopt.torch cannot do with DTensors raises a TypeError/ValueError naming it; nothing is written."""
    mesh = init_device_mesh(DEVICE, (world,))
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(3)).to(DEVICE)  # the same on every rank

    def param():
        return torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)]))
    for klass, options, words in [(ft.LAMB, {}, "per-tensor norms"), (ft.LARS, dict(lr=0.1), "per-tensor norms"),
                                  (ft.Adam, dict(state_dtype="int8"), "state_dtype='int8'"),
                                  (ft.Muon, {}, "this one needs whole tensors"),
                                  (ft.Adafactor, {}, "this one needs whole tensors")]:
        p = param()
        try:  # refused at construction, or at the first step before anything is written
            opt = klass([p], **options)
            p.grad = distribute_tensor(torch.ones(6, 4, device=DEVICE), mesh, [Shard(0)])
            opt.step()
        except TypeError as e:
            check(words in str(e) and "DTensor" in str(e), str(e))
        else:
            raise AssertionError(f"{klass.__name__} accepted: {words}")
        check(torch.equal(p.full_tensor(), w), f"{klass.__name__}: a refused step wrote")
    from torch.distributed.tensor import DTensor, Partial
    partial = torch.nn.Parameter(DTensor.from_local(torch.ones(6, 4, device=DEVICE), mesh, [Partial()], run_check=False))
    try:
        ft.AdamW([partial])
    except ValueError as e:
        check("Partial placement" in str(e), str(e))
    else:
        raise AssertionError("a Partial DTensor param was taken")
    ones = torch.ones(6, 4, device=DEVICE)
    for grad, words in [(lambda: distribute_tensor(ones.clone(), mesh, [Replicate()]), "placements"),
                        (lambda: ones.clone(), "is a Tensor but its param a DTensor")]:
        p, q = param(), param()
        opt = ft.AdamW([q, p], lr=0.1)
        q.grad = distribute_tensor(torch.ones(6, 4, device=DEVICE), mesh, [Shard(0)])
        p.grad = grad()
        before = [q.full_tensor(), p.full_tensor()]
        try:
            opt.step()
        except (TypeError, ValueError) as e:
            check(words in str(e) and "grads[1]" in str(e), str(e))
        else:
            raise AssertionError(f"stepped with a bad grad ({words})")
        check(torch.equal(q.full_tensor(), before[0]) and torch.equal(p.full_tensor(), before[1]) and not opt.state,
              "a refused step wrote")


def fsdp2(rank, world):
    """A model under FSDP2's fully_shard, each rank its own batch: fastopt.torch.AdamW and torch.optim.AdamW from
    the same start within float32 rounding; the optimizer state through torch.distributed.checkpoint's
    get/set_optimizer_state_dict into a new optimizer continues bit for bit as the uninterrupted one."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    def model():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).to(DEVICE)
        for layer in (m[0], m[2]):
            fully_shard(layer)
        return fully_shard(m)

    def train(m, opt, steps, first=0):
        for t in range(first, first + steps):
            g = torch.Generator().manual_seed(10 * t + rank)
            x, y = torch.randn(16, 6, generator=g).to(DEVICE), torch.randn(16, 3, generator=g).to(DEVICE)
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()

    runs = {}
    for klass in (ft.AdamW, torch.optim.AdamW):
        m = model()
        opt = klass(m.parameters(), lr=0.01, weight_decay=0.1)
        train(m, opt, 6)
        runs[klass] = [p.full_tensor() for p in m.parameters()]
    for a, b in zip(runs[ft.AdamW], runs[torch.optim.AdamW]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    m = model()
    opt = ft.AdamW(m.parameters(), lr=0.01, weight_decay=0.1)
    train(m, opt, 3)
    saved = copy.deepcopy(get_optimizer_state_dict(m, opt))
    model_state = {k: v.clone() for k, v in m.state_dict().items()}
    train(m, opt, 3, first=3)
    m2 = model()
    m2.load_state_dict(model_state)
    opt2 = ft.AdamW(m2.parameters(), lr=0.01, weight_decay=0.1)
    set_optimizer_state_dict(m2, opt2, saved)
    train(m2, opt2, 3, first=3)
    for a, b in zip(m.parameters(), m2.parameters()):
        check(torch.equal(a.full_tensor(), b.full_tensor()), "resumed through DCP's optimizer state dict: differs")


SCENARIOS = {"equal": equal, "reload": reload, "low_precision": low_precision, "torch_oracle": torch_oracle,
             "clip_skip": clip_skip, "grad_scaler": grad_scaler, "refused": refused, "fsdp2": fsdp2}

if __name__ == "__main__":
    names, rank, world, init, out = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    DEVICE = sys.argv[6] if len(sys.argv) > 6 else "cpu"
    results = {}
    try:
        if DEVICE == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", init_method=f"file://{init}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=120))
        np.seterr(all="ignore")
        for name in names:
            try:
                SCENARIOS[name](rank, world)
                results[name] = "OK"
            except BaseException:
                results[name] = traceback.format_exc()
        dist.destroy_process_group()
    except BaseException:
        results["setup"] = traceback.format_exc()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(results, f)
    os._exit(0)
