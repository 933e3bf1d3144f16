"""fastopt.torch with DTensor params (FSDP2's fully_shard, tensor parallelism), 2 processes over gloo on the CPU.

Scenarios in tests/distributed/dtensor_worker.py: every elementwise class (float32, float64, options that
change the update, Shard(0) / Shard(1) / Replicate, sizes that leave a rank's local tensor empty) bit for bit
the same run on plain tensors, its state DTensors laid out as the params (bfloat16 params, Kahan
summation and bfloat16 state too), and so after a state dict is loaded into the optimizer mid-run; torch.optim's class on the same
DTensors within float32 rounding; clipping and NaN skipping on the global norm; torch.amp.GradScaler skipping a step
with an inf in one rank's piece on every rank; the refusals (LAMB, LARS,
8-bit state, Muon, Adafactor, a grad laid out otherwise or not a DTensor) with nothing written; and a model
under FSDP2's fully_shard against torch.optim.AdamW, resumed through torch.distributed.checkpoint's
get/set_optimizer_state_dict bit for bit. The same on CUDA DTensors, one rank over NCCL, where a GPU is (marked gpu:
`make gpu-check` runs it)."""
from __future__ import annotations

import pytest

from tests.distributed.launch import run_torch_ranks

torch = pytest.importorskip("torch", reason="torch (CPU) is not installed")

SCENARIOS = ["equal", "reload", "low_precision", "torch_oracle", "clip_skip", "grad_scaler", "refused", "fsdp2"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch without torch.distributed")
    return run_torch_ranks(tmp_path_factory.mktemp("dtensor"), "dtensor_worker.py", SCENARIOS, timeout=600)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_dtensor_two_processes(results, scenario):
    for rank, per in results.items():
        assert per.get(scenario) == "OK", f"{scenario} rank {rank}:\n{per.get(scenario, 'not run')}"


CUDA_SCENARIOS = [name for name in SCENARIOS if name != "low_precision"]  # (kahan: CPU only in fastopt.torch)


@pytest.mark.gpu
def test_cuda_dtensors_on_one_rank_over_nccl(tmp_path):
    """The scenarios on CUDA DTensors (one rank, NCCL; the CuPy kernels on the local tensors), where a GPU is."""
    if not (torch.cuda.is_available() and torch.distributed.is_available() and torch.distributed.is_nccl_available()):
        pytest.skip("no CUDA GPU with NCCL")
    pytest.importorskip("cupy")
    results = run_torch_ranks(tmp_path, "dtensor_worker.py", CUDA_SCENARIOS, world=1, timeout=600, extra=("cuda",))
    failed = {name: result for name, result in results[0].items() if result != "OK"}
    assert not failed and len(results[0]) == len(CUDA_SCENARIOS), "\n".join(f"{k}:\n{v}" for k, v in failed.items())


def test_the_dtensor_benchmark_runs():
    """bench/bench_dtensor.py --quick (2 gloo ranks, 100 x 10,000): every variant and the ceiling are timed."""
    import subprocess
    import sys
    from tests.distributed.launch import ROOT
    if not torch.distributed.is_available():
        pytest.skip("torch without torch.distributed")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_dtensor.py"), "--quick"], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    for variant in ("fastopt", "torch foreach", "torch for-loop", "fastopt local", "torch fused local", "ceiling"):
        assert f"  {variant} " in r.stdout, r.stdout
