"""fastopt.distributed over torch.distributed with gloo on the CPU, 2 processes (torch tensors).

Scenarios in tests/distributed/torch_worker.py: every elementwise optimizer bit for bit against the
single-process class on the mean gradient (float32, float64; LARS and LAMB within rtol 1e-6 / 1e-14; the precision modes on bfloat16 tensors; torch 2.13's gloo has reduce_scatter_single
and all_gather_single on the CPU, and the test fails if the all_reduce fallback warns), AdamW against
torch.optim.AdamW (1e-10 relative, float64), a torch.nn model's parameters and .grad against torch.optim.Adam
(named by fastopt.torch.Adam when that module exists), the all_reduce fallback for an engine without
reduce-scatter (one warning, same results), mismatched params raising on both ranks, and a dead rank
turning into a timeout error on the other (group timeout 3 s) instead of a hang."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="torch (CPU) is not installed")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


SCENARIOS = ["equal", "precision", "torch_oracle", "module", "fallback", "mismatch", "bad_grad_one_rank", "dead_rank"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every scenario, in one pair of processes (importing torch takes seconds): {rank: {scenario: result}}."""
    tmp = tmp_path_factory.mktemp("gloo")
    init, out, world, timeout = tmp / "init", tmp / "result", 2, 240
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, str(HERE / "torch_worker.py"), ",".join(SCENARIOS), str(r), str(world),
                               str(init), str(out)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a rank did not finish in {timeout} s")
    found = {}
    for r in range(world):
        path = tmp / f"result.{r}"
        assert path.exists(), f"rank {r} wrote no result:\n{logs[r][-3000:]}"
        found[r] = json.loads(path.read_text())
        assert "setup" not in found[r], found[r]["setup"]
    return found


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_gloo_two_processes(results, scenario):
    for rank, per in results.items():
        assert per.get(scenario) == "OK", f"{scenario} rank {rank}:\n{per.get(scenario, 'not run')}"
