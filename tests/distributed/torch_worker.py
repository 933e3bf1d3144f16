"""One rank of the torch.distributed (gloo, CPU) tests: `python torch_worker.py SCENARIO,... RANK WORLD INIT_FILE OUT`.
tests/distributed/test_torch.py starts WORLD of these; each writes {scenario: "OK" or its traceback} (JSON)
to OUT.<rank>."""
from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
import warnings

import numpy as np
import torch
import torch.distributed as dist

import fastopt
from fastopt.distributed import ShardedOptimizer, unsupported_reason
from fastopt.specs import REGISTRY

SHAPES = [(7, 3), (101,), (1,), (0,), (33, 5)]
SHORT_TIMEOUT = []  # the process group with a 3 s timeout (dead_rank)


def grads_for(seed, t, rank, params):
    g = torch.Generator().manual_seed(seed * 1000 + t * 10 + rank)
    return [(torch.randn(p.shape, generator=g, dtype=p.dtype) * 16).round() / 8 for p in params]


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def precision(rank, world):
    """Precision modes through gloo: bfloat16 torch params (float32 grads; Kahan, stochastic rounding, 8-bit
    state) and float32 params with 8-bit state, bit for bit the single-process class on the mean gradient."""
    import ml_dtypes
    modes = [(torch.bfloat16, dict(kahan=True)), (torch.bfloat16, dict(stochastic_rounding=True, seed=2)),
             (torch.float32, dict(state_dtype="int8")), (torch.bfloat16, dict(state_dtype="int8"))]
    for k, (dtype, options) in enumerate(modes):
        torch.manual_seed(100 + k)
        params = [torch.randn(s).to(dtype) for s in SHAPES + [(300,)]]

        def host(t):
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy() if t.dtype == torch.bfloat16 \
                else t.numpy().copy()
        ref = [host(p) for p in params]
        opt = ShardedOptimizer("adam", params, dist.group.WORLD, lr=0.01, **options)
        single = fastopt.Adam(ref, lr=0.01, **options)
        f32 = [torch.zeros(p.shape) for p in params]
        for t in range(1, 4):
            opt.step(grads_for(k, t, rank, f32))
            per_rank = [grads_for(k, t, r, f32) for r in range(world)]
            single.step([sum(g[i] for g in per_rank).numpy() * np.float32(1.0 / world) for i in range(len(params))])
        for i, (a, b) in enumerate(zip(params, ref)):
            check(host(a).tobytes() == b.tobytes(), f"{dtype} {options} param {i} differs")


def equal(rank, world):
    """Torch tensors through gloo: bit for bit the single-process class on the mean gradient (NumPy copies),
    for every elementwise optimizer, float32 and float64 (LARS, whose ratios sum squares per piece and then
    over ranks: within rtol 1e-6 / 1e-14, as tests/distributed/test_lars.py); the updates land in the user's
    tensors and opt.params are torch tensors sharing the flat buffer."""
    seed = 0
    for spec in REGISTRY.values():
        if unsupported_reason(spec) is not None:
            continue
        for dtype in (torch.float32, torch.float64):
            seed += 1
            torch.manual_seed(seed)
            params = [torch.randn(s, dtype=dtype) for s in SHAPES]
            ref = [p.numpy().copy() for p in params]
            hp = dict(lr=0.01) if spec.name != "lion" else dict(lr=1e-3, weight_decay=0.1)
            hp = hp if spec.name in ("lion", "sgd") else dict(hp, lr=spec.defaults["lr"])
            hp = dict(lr=1.0, weight_decay=0.01) if spec.name == "lars" else hp
            opt = ShardedOptimizer(spec.name, params, dist.group.WORLD, **hp)
            single = getattr(fastopt, spec.class_name)(ref, **hp)
            for t in range(1, 5):
                opt.step(grads_for(seed, t, rank, params))
                per_rank = [grads_for(seed, t, r, params) for r in range(world)]
                scale = np.dtype(ref[0].dtype).type(1.0 / world)
                single.step([sum(g[i] for g in per_rank).numpy() * scale for i in range(len(params))])
            for i, (a, b) in enumerate(zip(params, ref)):
                if spec.norms_per_tensor:
                    tol = 1e-6 if dtype == torch.float32 else 1e-14
                    scale = max(1.0, float(np.abs(b).max())) if b.size else 1.0
                    check(np.allclose(a.numpy(), b, rtol=tol, atol=tol * scale), f"{spec.name} {dtype} param {i}")
                else:
                    check(a.numpy().tobytes() == b.tobytes(), f"{spec.name} {dtype} param {i} differs")
            check(all(isinstance(v, torch.Tensor) and torch.equal(v, p) for v, p in zip(opt.params, params)),
                  "opt.params are not the updated tensors")


def torch_oracle(rank, world):
    """torch.optim.AdamW on the mean gradient (float64, 20 steps): within 1e-10 relative."""
    torch.manual_seed(5)
    params = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    ref = [p.clone().requires_grad_(True) for p in params]
    opt = ShardedOptimizer("adamw", params, dist.group.WORLD, lr=0.01, weight_decay=0.1, amsgrad=True)
    oracle = torch.optim.AdamW(ref, lr=0.01, weight_decay=0.1, amsgrad=True)
    for t in range(1, 21):
        opt.step(grads_for(5, t, rank, params))
        per_rank = [grads_for(5, t, r, params) for r in range(world)]
        for i, p in enumerate(ref):
            p.grad = sum(g[i] for g in per_rank) / world
        oracle.step()
    for a, b in zip(params, ref):
        check(torch.allclose(a, b.detach(), rtol=1e-10, atol=1e-12), "differs from torch.optim.AdamW")


def module(rank, world):
    """A torch.nn model's parameters and their .grad (each rank its own data) against torch.optim.Adam on the
    mean gradient, 10 steps (float32: 1e-6 relative); a fastopt.torch class names the optimizer when that
    module exists."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    twin = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    try:
        from fastopt.torch import Adam as name
    except ImportError:
        name = "adam"
    opt = ShardedOptimizer(name, model.parameters(), dist.group.WORLD, lr=0.01)
    oracle = torch.optim.Adam(twin, lr=0.01)
    for t in range(10):
        grads = []
        for r in range(world):
            g = torch.Generator().manual_seed(100 * t + r)
            x, y = torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)
            model.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        opt.step(grads[rank])
        for i, p in enumerate(twin):
            p.grad = sum(g[i] for g in grads) / world
        oracle.step()
    for a, b in zip(model.parameters(), twin):
        check(torch.allclose(a, b, rtol=1e-6, atol=1e-7), f"{(a - b).abs().max()}")


def fallback(rank, world):
    """An engine without reduce-scatter (older gloo): the adapter warns once and uses all_reduce + a slice;
    the results are the same as with the reduce-scatter, and opt.grads are not overwritten."""
    from fastopt.distributed.comm_torch import TorchCommunicator

    def unsupported(*args, **kwargs):
        raise RuntimeError("ProcessGroupGloo does not support reduce_scatter")

    torch.manual_seed(3)
    params = [torch.randn(s) for s in SHAPES]
    twin = [p.clone() for p in params]
    comm = TorchCommunicator()
    comm._rs = unsupported  # what an engine without the collective raises
    opt = ShardedOptimizer("adam", params, comm, lr=0.01)
    ref = ShardedOptimizer("adam", twin, dist.group.WORLD, lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(1, 4):
            g = grads_for(3, t, rank, params)
            for view, gi in zip(opt.grads, g):
                view.copy_(gi)
            opt.step(opt.grads)
            check(all(torch.equal(v, gi) for v, gi in zip(opt.grads, g)), "the fallback overwrote opt.grads")
            ref.step(g)
    check(sum("all_reduce" in str(w.message) for w in caught) == 1, [str(w.message) for w in caught])
    check(all(torch.equal(a, b) for a, b in zip(params, twin)), "the fallback's results differ")


def mismatch(rank, world):
    """Different params on one rank: every rank raises the same ValueError at construction."""
    params = [torch.ones(10) * (1 + (rank == world - 1))]
    try:
        ShardedOptimizer("adam", params, dist.group.WORLD, lr=1e-3)
    except ValueError as e:
        check("the values of the params" in str(e), str(e))
    else:
        raise AssertionError("mismatch not detected")


def bad_grad_one_rank(rank, world):
    """A gradient torch cannot hand to NumPy (a lazy negation, a nested tensor) on the last rank only: its
    conversion raised a RuntimeError there, which left that rank's step before the collectives, and the
    others waited for it (or paired with its next call). Every rank raises now, nothing written anywhere,
    and the next step goes on."""
    params = [torch.ones(4)]
    opt = ShardedOptimizer("sgd", params, dist.group.WORLD, lr=0.1)
    for bad, words in ((torch.randn(4, dtype=torch.complex64).conj().imag, "negative bit"),
                       (torch.nested.nested_tensor([torch.ones(2), torch.ones(2)]), "nested tensor")):
        try:
            opt.step([bad if rank == world - 1 else torch.ones(4)])
        except (TypeError, ValueError) as e:
            want = words if rank == world - 1 else "failed the checks there"
            check(want in str(e), f"{type(e).__name__}: {e}")
        else:
            raise AssertionError("a bad gradient on one rank was not refused")
        check(torch.equal(params[0], torch.ones(4)), "a refused step changed the params")
    check(opt.step([torch.ones(4)]) is True and torch.allclose(params[0], torch.full((4,), 0.9)), "the next step")

def dead_rank(rank, world):
    """The last rank exits without stepping: the others' step raises once the group's timeout passes
    (here 3 s) instead of waiting forever."""
    params = [torch.ones(1000)]
    opt = ShardedOptimizer("sgd", params, SHORT_TIMEOUT[0], lr=0.1)
    if rank == world - 1:
        return
    try:
        opt.step([torch.ones(1000)])
    except Exception as e:  # torch raises RuntimeError / DistBackendError on a timeout
        check("timed out" in str(e).lower() or "timeout" in str(e).lower() or "connection" in str(e).lower(),
              f"{type(e).__name__}: {e}")
    else:
        raise AssertionError("a step with a dead rank returned")


SCENARIOS = {"equal": equal, "torch_oracle": torch_oracle, "module": module, "fallback": fallback,
             "mismatch": mismatch, "bad_grad_one_rank": bad_grad_one_rank, "dead_rank": dead_rank,
             "precision": precision}

if __name__ == "__main__":
    # scenarios run one after another in the same pair of processes (importing torch takes seconds);
    # dead_rank, whose last rank leaves, must come last
    names, rank, world, init, out = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    results = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        for name in names:
            if name == "dead_rank":  # a group with a short timeout, so that the wait for the dead rank ends soon
                SHORT_TIMEOUT.append(dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=3)))
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", RuntimeWarning)  # an all_reduce fallback would warn: must not happen
                    SCENARIOS[name](rank, world)
                results[name] = "OK"
            except BaseException:
                results[name] = traceback.format_exc()
    except BaseException:
        results["setup"] = traceback.format_exc()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(results, f)
    os._exit(0)  # no destroy_process_group: the dead rank's peer would wait for it
