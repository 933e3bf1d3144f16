"""Nothing is written when any part of a step fails, also when the failure comes after validation: a
spec's kernel scalars are computed for every call before the first call writes (the NumPy classes and
fastopt.torch), and the compiled batches stay sound when the garbage collector clears them (a bound
batch in a reference cycle must not free the memory it shares with its fixed batch)."""
from __future__ import annotations

import gc

import numpy as np
import pytest

import fastopt
from fastopt.backends import dispatch
from fastopt.specs import REGISTRY


class _ScalarsRaiseFor:
    """Make a spec's scalars raise for one lr value (restored on exit): a later group's failure."""

    def __init__(self, spec, lr):
        self.spec, self.lr, self.real = spec, lr, spec.scalars

    def __enter__(self):
        real, bad = self.real, self.lr

        def scalars(hp, step, grad_scale):
            if hp["lr"] == bad:
                raise OverflowError("scalars failed for this group")
            return real(hp, step, grad_scale)
        object.__setattr__(self.spec, "scalars", scalars)

    def __exit__(self, *exc):
        object.__setattr__(self.spec, "scalars", self.real)


@pytest.mark.parametrize("backend", ["numpy", "cython"])
def test_numpy_class_scalars_failing_for_a_later_group_write_nothing(backend):
    if backend == "cython" and not dispatch.cython_available():
        pytest.skip("compiled extension not built")
    rng = np.random.default_rng(4)
    ps = [rng.standard_normal(5).astype(np.float32) for _ in range(3)]
    opt = fastopt.Adam([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.125}], lr=0.01, backend=backend)
    grads = [rng.standard_normal(5).astype(np.float32) for _ in ps]
    opt.step(grads)
    before, sd = [p.copy() for p in ps], opt.state_dict()
    with _ScalarsRaiseFor(REGISTRY["adam"], 0.125), pytest.raises(OverflowError):
        opt.step(grads)
    assert all(p.tobytes() == q.tobytes() for p, q in zip(ps, before))
    after = opt.state_dict()
    for i, entry in sd["state"].items():
        assert after["state"][i]["step"] == entry["step"]
        assert all(np.array_equal(after["state"][i][k], v) for k, v in entry.items() if k != "step")


def test_torch_class_scalars_failing_for_a_later_group_write_nothing():
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft
    ps = [torch.randn(5, requires_grad=True) for _ in range(3)]
    opt = ft.Adam([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.125}], lr=0.01)
    for _ in range(3):  # into the steady state
        for p in ps:
            p.grad = torch.randn(5)
        opt.step()
    before = [p.detach().clone() for p in ps]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]
    with _ScalarsRaiseFor(REGISTRY["adam"], 0.125), pytest.raises(OverflowError):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, before))
    for p, st in zip(ps, states):
        assert all(torch.equal(opt.state[p][k], v) for k, v in st.items())


def test_bound_batches_collected_in_a_cycle_leave_their_fixed_batch_intact():
    """A bound batch kept alive by an exception's traceback (a reference cycle) is freed by the garbage
    collector, which may clear its Python attributes first; the fixed batch it shares memory with must
    stay usable and be freed once (this aborted with "double free detected" when the bound batch decided
    by its `owner` attribute whether to free)."""
    if not dispatch.cython_available():
        pytest.skip("compiled extension not built")
    from fastopt.kernels.cpu import _cpu_fast
    rng = np.random.default_rng(0)
    ps = [rng.standard_normal(n).astype(np.float32) for n in (1, 1000, 70001)]
    bufs = [np.zeros_like(p) for p in ps]
    names = ("params", "grads", "momentum_buffer")
    fixed = _cpu_fast.prepare_fixed([((ps, None, bufs), names, None)])
    grads = [np.ones_like(p) for p in ps]

    def fail_with_a_bound_batch():
        bound = _cpu_fast.bind_grads(fixed, [grads])  # noqa: F841 (kept alive by the traceback's frame)
        try:
            raise ValueError("mid-step")
        except ValueError as e:
            return e  # e -> traceback -> this frame -> e: a cycle holding `bound`

    for _ in range(40):
        fail_with_a_bound_batch()
        gc.collect()
    expected = [p - 0.5 * g for p, g in zip(ps, grads)]
    for bound in _cpu_fast.bind_grads(fixed, [grads]):
        _cpu_fast.run(bound, "sgd", 0, REGISTRY["sgd"].scalars({**REGISTRY["sgd"].defaults, "lr": 0.5}, 1, 1.0), 0.5)
    for p, e in zip(ps, expected):
        np.testing.assert_allclose(p, e, rtol=1e-6)
    fixed = None  # its memory freed once (the bound batches above shared it)
    gc.collect()
    junk = [np.ones(1000) for _ in range(100)]  # allocations after the frees: a double free aborts here
    assert len(junk) == 100
