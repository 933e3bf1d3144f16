"""The fastopt.torch benchmark (fastopt bench --torch): the real models' parameter lists have the
published sizes, a run on a tiny list gives every variant's time, and the command line refuses what it
cannot do before running anything."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from fastopt import benchmark_torch, cli  # noqa: E402
from tests.script_support import check_quick_is_not_for_the_record, copy_script  # noqa: E402


def test_param_lists_have_the_models_sizes():
    sizes = {k: (len(f()), sum(benchmark_torch._numel(s) for s in f())) for k, f in benchmark_torch.PARAM_LISTS.items()}
    assert sizes["gpt2-small"] == (148, 124_439_808)
    assert sizes["resnet50"] == (161, 25_557_032)
    assert sizes["100x10000"] == (100, 1_000_000)


def test_run_on_a_tiny_list_times_every_variant():
    report = benchmark_torch.run(threads=(1,), repeats=2, devices=["cpu"], progress=False,
                                 param_lists={"tiny": lambda: [(3, 5), (7,), (1,)]}, training_iterations=2)
    assert len(report["runs"]) == len(benchmark_torch.OPTIMIZERS)
    for row in report["runs"]:
        assert set(row["ms"]) == set(benchmark_torch.VARIANTS)
        assert row["ms"]["fastopt"] > 0
        for variant, t in row["ms"].items():
            assert isinstance(t, float) or t.startswith("unavailable"), variant
    assert "machine" in report and report["params"]["tiny"] == {"tensors": 3, "params": 23}
    assert benchmark_torch.markdown_table(report).count("\n") == 1 + len(report["runs"])
    loop, = report["training_loop"]
    assert loop["threads"] == 1 and set(loop["ms_per_iteration"]) == {"fastopt", "torch fused"}


@pytest.mark.parametrize("argv", [["bench", "--torch", "--sizes", "1000"], ["bench", "--torch", "--optimizers", "adam"],
                                  ["bench", "--torch", "--dry-run"]])
def test_cli_refuses_options_that_do_not_apply(argv, capsys):
    assert cli.main(argv) == 2
    assert "--torch" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cli_gpu_without_a_gpu(capsys):
    assert cli.main(["bench", "--torch", "--device", "gpu"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_bench_torch_quick_is_not_for_the_record(tmp_path, monkeypatch, capsys):
    """bench/bench_torch.py writes bench/results/torch-cpu.json on a full run; --quick (what the README tells users
    to try) is a smoke run and writes an explicit --out only (the wrapper added --out bench/results/torch-cpu.json
    to every run, and the report was written). Run from a copy of the script, so that its record is in tmp_path."""
    script = copy_script("bench_torch.py", tmp_path)
    record = tmp_path / "bench" / "results" / "torch-cpu.json"
    runs = []
    monkeypatch.setattr(benchmark_torch, "run",
                        lambda *args, **kwargs: runs.append(args) or {"runs": [], "quick": args[2]})
    smoke, full = check_quick_is_not_for_the_record(script, record, monkeypatch, capsys)
    assert smoke["quick"] is True and full["quick"] is False and len(runs) == 3
