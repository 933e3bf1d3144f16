"""The CPU benchmark (fastopt.benchmark, `fastopt bench`): every optimizer of the registry is in it, with
the byte count of its own states and a ceiling kernel of the same access pattern; the target report. Tiny
sizes: this checks the harness, not the speed (bench/results holds recorded runs)."""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

import fastopt
from fastopt import benchmark
from fastopt.specs import REGISTRY
from tests.script_support import run_script

pytest.importorskip("fastopt.kernels.cpu._cpu_fast")


def _expected_bytes(spec, itemsize=4):
    """Counted here from the states init_state makes for the benchmark's hyperparameters: one pass reads
    p, g and every state and writes p and every state; a two-phase family (LAMB) reads p, g and the states
    and writes the states, then reads p and the states and writes p."""
    hp = benchmark.bench_hyperparameters(spec)
    ns = len(fastopt.init_state(spec.name, [np.zeros(3, np.float32)],
                                **{k: v for k, v in hp.items() if k != "lr"}))
    if spec.two_phase:
        return itemsize * ((2 + 2 * ns) + (2 + ns))
    if spec.tensor_coefs is not None:  # LARS: a norms pass reading p and g, then the update
        return itemsize * (2 + 3 + 2 * ns)
    return itemsize * (3 + 2 * ns)


@pytest.fixture(scope="module")
def report():
    threads = fastopt.get_num_threads()
    try:
        return benchmark.run(sizes=(1000,), repeats=2, with_torch=False, progress=False)
    finally:
        fastopt.set_num_threads(threads)


def test_every_registry_optimizer_is_benchmarked_with_its_ceiling(report):
    assert [r["optimizer"] for r in report["results"]] == list(REGISTRY)
    for row in report["results"]:
        spec = REGISTRY[row["optimizer"]]
        assert row["bytes_per_element"] == _expected_bytes(spec), spec.name
        v = row["variants"]
        assert {"fastopt", "fastopt-list100", "fastopt-list100-views", "numpy", "ceiling"} <= set(v)
        for timing in v.values():
            assert timing["ms"] > 0 and timing["min_ms"] <= timing["ms"] and timing["of_ceiling_min"] > 0
        assert v["ceiling"]["of_ceiling_paired"] == 1.0


def test_new_optimizers_of_issue_14_are_in_the_benchmark(report):
    names = {r["optimizer"] for r in report["results"]}
    assert {"asgd", "adadelta", "adamax", "rprop", "yogi"} <= names


def test_targets_at_1e7_from_the_rows():
    rows = [{"optimizer": name, "n": n, "bytes_per_element": 20,
             "variants": {"fastopt": {"of_ceiling": 1.0, "of_ceiling_min": frac + 0.01, "of_ceiling_paired": frac}}}
            for name, n, frac in [("sgd", 10**7, 0.9), ("adam", 10**7, 0.8), ("lion", 10**6, 0.1)]]
    report = {"results": rows}
    t = benchmark.targets(report)
    assert set(t) == {"sgd", "adam"} and t["sgd"]["met"] and not t["adam"]["met"]
    assert t["adam"]["of_ceiling_min"] == pytest.approx(0.81)


def test_markdown_table_states_the_target(report):
    doc = dict(report, targets={"n": 10**7, "of_ceiling": 0.85, "optimizers": {"sgd": {"met": True},
                                                                                "adam": {"met": False}}})
    text = benchmark.markdown_table(doc)
    assert "missed by adam." in text and "| bytes/elem |" in text
    assert "missed" not in benchmark.markdown_table(dict(doc, targets=dict(doc["targets"], optimizers={})))


@pytest.mark.parametrize("spec", [s for s in REGISTRY.values() if s.torch_class], ids=lambda s: s.name)
def test_torch_variants_are_built_for_every_optimizer_torch_has(spec, rng):
    # the registry's hyperparameters become torch's arguments (betas, Rprop's etas and step_sizes)
    pytest.importorskip("torch")
    case = benchmark.Case(spec, 1000, rng, with_torch=True)
    assert "torch-foreach" in case.variants
    case.variants["torch-foreach"]()


def test_machine_info_names_the_extensions_the_kernels_dispatch_on(report, tmp_path, monkeypatch):
    info = report["machine"]
    _, flags = benchmark.cpuinfo()
    if flags is None:
        assert info["cpu_features"] is None
    else:  # exactly this CPU's flags among the ones the kernels choose loops by, in the table's order
        assert info["cpu_features"] == [f for f in benchmark.KERNEL_CPU_FEATURES if f in flags]
    from fastopt.kernels.cpu import _cpu_fast
    assert info["isa_dispatch"] == _cpu_fast.ISA_DISPATCH
    # another machine's /proc/cpuinfo: the features come from the file (the first CPU's), not from this one
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 fma\n\n"
                    "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(fake if path == "/proc/cpuinfo" else path, *a, **k))
    info = benchmark.machine_info()
    assert info["cpu"] == "Test CPU"
    assert info["cpu_features"] == ["avx2", "fma", "avx512f", "avx512_bf16"]


# ------------------------------------------------------------------------ bench/bench_cpu.py, bench_cpu_target.py

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def _load_cpu_target(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    path = BENCH / "bench_cpu_target.py"
    spec = importlib.util.spec_from_file_location("bench_cpu_target", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


def test_bench_cpu_target_parses_its_arguments(tmp_path, monkeypatch, capsys):
    """bench/bench_cpu_target.py read sys.argv[1] and float(sys.argv[2]): --help ended in an IndexError, and
    `--help 60` started the hours-long run, to write a file named --help."""
    path, module = _load_cpu_target(monkeypatch)
    runs = []
    monkeypatch.setattr(module, "run", lambda *args: runs.append(args))
    out = str(tmp_path / "out.json")
    assert module.main([out, "60", "adam", "lion"]) == 0
    assert module.main([out, "0"]) == 0
    assert runs == [(out, 60.0, ["adam", "lion"]), (out, 0.0, list(REGISTRY))]

    def ran(*args, **kwargs):
        raise AssertionError("the benchmark ran")
    monkeypatch.setattr(benchmark, "run", ran)
    monkeypatch.chdir(tmp_path)
    assert run_script(path, ["--help", "60"], monkeypatch) == 0
    assert "OUT DEADLINE_S [OPTIMIZER ...]" in capsys.readouterr().out and not (tmp_path / "--help").exists()
    for argv, words in (([], "required: OUT, DEADLINE_S"), ([out, "soon"], "DEADLINE_S: invalid float value: 'soon'"),
                        ([out, "-1"], "DEADLINE_S: invalid number of seconds -1.0"),
                        ([out, "60", "adam", "foo"], "unknown optimizer(s) 'foo'"),
                        ([str(tmp_path / "missing" / "out.json"), "60"], "does not exist")):
        assert run_script(path, argv, monkeypatch) == 2, argv
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("bench_cpu_target.py: error: ") and words in last, last
