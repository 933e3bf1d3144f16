"""fastopt.torch with DTensor params (FSDP2's fully_shard, tensor parallelism), 2 processes over gloo on the CPU.

Scenarios in tests/distributed/dtensor_worker.py: every elementwise class (float32, float64, options that
change the update, Shard(0) / Shard(1) / Replicate, sizes that leave a rank's local tensor empty) bit for bit
the same run on plain tensors, its state DTensors laid out as the params (bfloat16 params, Kahan
summation and bfloat16 state too); torch.optim's class on the same
DTensors within float32 rounding; clipping and NaN skipping on the global norm; the refusals (LAMB, LARS,
8-bit state, Muon, Adafactor, a grad laid out otherwise or not a DTensor) with nothing written; and a model
under FSDP2's fully_shard against torch.optim.AdamW, resumed through torch.distributed.checkpoint's
get/set_optimizer_state_dict bit for bit."""
from __future__ import annotations

import pytest

from tests.distributed.launch import run_gloo

torch = pytest.importorskip("torch", reason="torch (CPU) is not installed")

SCENARIOS = ["equal", "low_precision", "torch_oracle", "clip_skip", "refused", "fsdp2"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch without torch.distributed")
    return run_gloo(tmp_path_factory.mktemp("dtensor"), "dtensor_worker.py", SCENARIOS, timeout=600)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_dtensor_two_processes(results, scenario):
    for rank, per in results.items():
        assert per.get(scenario) == "OK", f"{scenario} rank {rank}:\n{per.get(scenario, 'not run')}"
