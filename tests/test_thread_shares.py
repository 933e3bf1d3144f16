"""The CPU backend's parallel regions give each thread a contiguous run of chunks holding an even share of the
elements (not an even count of chunks, which left ResNet-50's list 10% heavier on one of two threads), and the
results do not depend on the split: every reduction keeps one partial per chunk."""
from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.kernels.cpu import _cpu_fast

CHUNK = _cpu_fast.CHUNK_ELEMENTS


def _sizes(rng, count):
    """A model-like mix: many small tensors (biases, norms), some of several chunks, a few empty."""
    kinds = rng.integers(0, 4, count)
    return [int(rng.integers(1, 3000)) if k == 0 else int(rng.integers(CHUNK, 9 * CHUNK)) if k == 1
            else 0 if k == 2 else int(rng.integers(1, CHUNK + 2)) for k in kinds]


def _batch(sizes):
    arrays = tuple([np.zeros(n, np.float32) for n in sizes] for _ in range(4))
    return _cpu_fast.prepare(arrays, ("params", "grads", "state0", "state1"))


@pytest.mark.parametrize("seed", range(6))
def test_shares_are_contiguous_cover_every_chunk_and_hold_even_elements(seed):
    rng = np.random.default_rng(seed)
    sizes = _sizes(rng, int(rng.integers(1, 120)))
    b = _batch(sizes)
    nchunks = sum(-(-n // CHUNK) for n in sizes)
    total = sum(sizes)
    for nshares in range(1, 7):
        got = _cpu_fast.shares(b, nshares)
        assert len(got) == nshares
        assert got[0][0] == 0 and got[-1][1] == nchunks
        assert all(got[k][1] == got[k + 1][0] for k in range(nshares - 1))
        assert sum(n for _, _, n in got) == total
        # each share is the even split to within one chunk
        assert all(abs(n - total / nshares) <= CHUNK for _, _, n in got), (nshares, got, total)


def test_a_list_bunched_at_one_end_splits_evenly_where_counting_chunks_did_not():
    # ResNet-50's shape of problem: the small tensors first, the big ones last
    sizes = [64] * 100 + [40 * CHUNK] * 2
    got = _cpu_fast.shares(_batch(sizes), 2)
    assert [n for _, _, n in got] == [100 * 64 + 40 * CHUNK, 40 * CHUNK]
    # (an even count of chunks, 90 each, gave the first thread 90 * 64 elements and the second all the rest)
    assert got[0][1] == 100 + 40


def test_empty_and_single_chunk_batches():
    assert _cpu_fast.shares(_batch([]), 3) == [(0, 0, 0)] * 3
    assert _cpu_fast.shares(_batch([0, 0]), 2) == [(0, 0, 0)] * 2
    assert _cpu_fast.shares(_batch([5]), 2) == [(0, 1, 5), (1, 1, 0)]  # a chunk goes to the share it starts in
    with pytest.raises(ValueError, match="nshares"):
        _cpu_fast.shares(_batch([5]), 0)


@pytest.mark.parametrize("optimizer", ["adam", "lamb", "sgd"])
def test_results_are_the_same_bits_on_1_2_3_and_4_threads(optimizer):
    rng = np.random.default_rng()
    sizes = list(_sizes(rng, 40)) + [3 * CHUNK + 7]
    ps = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    gs = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    opts = {"lr": 1e-2, "momentum": 0.9} if optimizer == "sgd" else {"lr": 1e-2, "weight_decay": 0.1}
    before = fastopt.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3, 4):
            fastopt.set_num_threads(threads)
            q = [p.copy() for p in ps]
            st = fastopt.init_state(optimizer, q, **({"momentum": 0.9} if optimizer == "sgd" else {}))
            fn = getattr(fastopt, f"{optimizer}_step")
            for step in range(1, 4):
                fn(q, [g * step for g in gs], **st, step=step, **opts)
            clipped = [g.copy() for g in gs]
            total = fastopt.clip_by_norm(clipped, 1.0)  # one scale per array
            fastopt.clip_by_global_norm(clipped, 0.5)  # one scale for all
            fastopt.clip_by_value(clipped, 0.01)
            runs.append((q, st, fastopt.global_norm(gs), clipped, total))
    finally:
        fastopt.set_num_threads(before)
    q0, st0, norm0, clipped0, total0 = runs[0]
    for q, st, norm, clipped, total in runs[1:]:
        for a, b in zip(q0, q):
            np.testing.assert_array_equal(a, b)
        for name in st0:
            for a, b in zip(st0[name], st[name]):
                np.testing.assert_array_equal(a, b)
        assert norm == norm0 and total == total0
        for a, b in zip(clipped0, clipped):
            np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(q0, ps) if a.size)  # the steps moved the params


def test_int8_state_is_the_same_bits_on_1_and_3_threads():
    rng = np.random.default_rng()
    sizes = [300, 5 * CHUNK + 256, 17, 2 * CHUNK]
    ps = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    gs = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    before = fastopt.get_num_threads()
    runs = []
    try:
        for threads in (1, 3):
            fastopt.set_num_threads(threads)
            opt = fastopt.Adam([p.copy() for p in ps], lr=1e-2, state_dtype="int8")
            for _ in range(3):
                opt.step(gs)
            runs.append(opt)
    finally:
        fastopt.set_num_threads(before)
    for a, b in zip(runs[0].params, runs[1].params):
        np.testing.assert_array_equal(a, b)
    sa, sb = runs[0].state_dict(), runs[1].state_dict()
    assert repr(sa["state"]) == repr(sb["state"])
