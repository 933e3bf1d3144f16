"""fastopt.distributed over torch.distributed with gloo on the CPU, 2 processes (torch tensors).

Scenarios in tests/distributed/torch_worker.py: every elementwise optimizer bit for bit against the
single-process class on the mean gradient (float32, float64; LARS and LAMB within rtol 1e-6 / 1e-14; the precision modes on bfloat16 tensors; torch 2.13's gloo has reduce_scatter_single
and all_gather_single on the CPU, and the test fails if the all_reduce fallback warns), AdamW against
torch.optim.AdamW (1e-10 relative, float64), a torch.nn model's parameters and .grad against torch.optim.Adam
(named by fastopt.torch.Adam when that module exists), the all_reduce fallback for an engine without
reduce-scatter (one warning, same results), mismatched params raising on both ranks, and a dead rank
turning into a timeout error on the other (group timeout 3 s) instead of a hang."""
from __future__ import annotations

import pytest

from tests.distributed.launch import run_torch_ranks

pytest.importorskip("torch", reason="torch (CPU) is not installed")

SCENARIOS = ["equal", "precision", "torch_oracle", "module", "fallback", "mismatch", "bad_grad_one_rank", "dead_rank"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every scenario, in one pair of processes (importing torch takes seconds): {rank: {scenario: result}}."""
    return run_torch_ranks(tmp_path_factory.mktemp("gloo"), "torch_worker.py", SCENARIOS)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_gloo_two_processes(results, scenario):
    for rank, per in results.items():
        assert per.get(scenario) == "OK", f"{scenario} rank {rank}:\n{per.get(scenario, 'not run')}"
