"""The generated tables (tables.py), each run in a child process for both host backends, so that a
segfault or a hang is a failure naming the case instead of a dead pytest. Every case asserts the
contract of README "Bad input" (see harness.py); a failure lists each broken case with a one-line
reproduction and the command that reruns it alone."""
from __future__ import annotations

import time

import pytest

from .conftest import MIN_BAD_CALLS, fuzz_seed
from .harness import format_failures, run_table
from .tables import HOST_ONLY, TABLES

BACKENDS = ["cython", "numpy"]
RUNS = [(t, b) for t in TABLES for b in BACKENDS if not (t in HOST_ONLY and b != "cython")]
_ran = set()


@pytest.mark.parametrize("table,backend", RUNS, ids=[f"{t}-{b}" for t, b in RUNS])
def test_table(table, backend, fuzz_stats):
    seed = fuzz_seed()
    t0 = time.perf_counter()
    if table == "torch_class":
        pytest.importorskip("torch")  # the table is empty without it
    res = run_table(table, backend, seed)
    print(f"{table} [{backend}]: {res.ran}/{res.total} cases in {time.perf_counter() - t0:.1f} s, seed {seed}, "
          f"{len(res.failures)} failing")
    fuzz_stats["bad"] += res.expected_errors
    fuzz_stats["ok"] += res.ran - res.expected_errors
    _ran.add((table, backend))
    assert res.total > 0 and res.ran == res.total, f"ran {res.ran} of {res.total} cases"
    assert not res.failures, format_failures(table, backend, seed, res.failures)


def test_generated_bad_calls_per_run():
    """The tables alone hold at least MIN_BAD_CALLS bad calls (the Hypothesis tests add more)."""
    bad = sum(sum(c.expect != "ok" for c in TABLES[t](b)) for t, b in RUNS)
    print(f"{bad} generated bad calls in the tables")
    assert bad >= MIN_BAD_CALLS


def test_bad_calls_ran_this_session(fuzz_stats):
    """When the whole table set ran in this session, it ran at least MIN_BAD_CALLS bad calls."""
    if _ran != set(RUNS):
        pytest.skip("only part of the fuzz tables ran in this session")
    assert fuzz_stats["bad"] >= MIN_BAD_CALLS
