"""The command lines of bench/*.py and fastopt.benchmark_*: every --help works and describes the script in whole
sentences, bench/bench_train.py writes its record on full runs only (not --quick, a smoke run), and the study
scripts refuse values they cannot run with on one line (exit 2) instead of a traceback. Nothing is measured:
scripts run in-process with --help or bad values, or with their measurement functions replaced."""
from __future__ import annotations

import importlib
import pathlib
import types

import pytest

from tests.script_support import check_quick_is_not_for_the_record, copy_script, run_script

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*.py"))
# the fastopt.benchmark_* modules with a command line of their own (benchmark and benchmark_gpu are `fastopt bench`)
MODULES = sorted(p.stem for p in (ROOT / "fastopt").glob("benchmark_*.py") if "__main__" in p.read_text())


def description(help_text):
    """The description argparse prints between the usage block and the first list of arguments, on one line."""
    parts = help_text.split("\n\n")
    assert len(parts) > 1 and parts[0].startswith("usage: "), help_text
    text = parts[1]
    assert not text.startswith(("options:", "positional arguments:")), f"no description:\n{help_text}"
    return " ".join(text.split())


def test_every_script_and_module_has_a_help_of_whole_sentences(monkeypatch, capsys):
    """--help exits 0 and its description ends a sentence: several cut the docstring's first line mid-sentence
    ("... against torch.optim on the"), bench_cpu.py and bench_gpu.py had none, bench_cpu_target.py crashed."""
    assert "bench_cpu_target.py" in SCRIPTS and {"benchmark_torch", "benchmark_train"} <= set(MODULES)
    descriptions = {}
    for name in SCRIPTS:
        code = run_script(ROOT / "bench" / name, ["--help"], monkeypatch)
        out = capsys.readouterr().out
        assert code == 0, name
        descriptions[name] = description(out)
    for name in MODULES:
        module = importlib.import_module(f"fastopt.{name}")
        with pytest.raises(SystemExit) as e:
            module.main(["--help"])
        assert e.value.code == 0, name
        descriptions[name] = description(capsys.readouterr().out)
    cut = {k: v[-40:] for k, v in descriptions.items() if v[-1] not in ".)"}
    assert not cut, cut


@pytest.mark.parametrize("script, argv, words", [
    # each ended in a traceback: ValueError: min() arg is an empty sequence (after a run), Muon's ValueError
    ("bench_low_precision.py", ["--reps", "0", "--n", "1000"], ["argument --reps", " 0 "]),
    ("bench_low_precision.py", ["--n", "0"], ["argument --n", " 0 "]),
    ("bench_low_precision.py", ["--threads", "0", "--n", "1000", "--reps", "1"], ["argument --threads", " 0 "]),
    ("bench_adafactor.py", ["--repeat", "0", "--threads", "1"], ["argument --repeat", " 0 "]),
    ("bench_adafactor.py", ["--threads", "two"], ["argument --threads", "'two'"]),
    ("bench_muon.py", ["--shapes", "8", "--no-torch"], ["argument --shapes", "'8'"]),
    ("bench_muon.py", ["--shapes", "8x8,64", "--no-torch"], ["argument --shapes", "'8x8,64'"]),
    ("bench_muon.py", ["--shapes", "8xa", "--no-torch"], ["argument --shapes", "'8xa'"]),
    ("bench_muon.py", ["--shapes", "8x8", "--repeat", "0", "--no-torch"], ["argument --repeat", " 0 "]),
])
def test_study_scripts_refuse_bad_values_on_one_line(script, argv, words, monkeypatch, capsys):
    assert run_script(ROOT / "bench" / script, argv, monkeypatch) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith(f"{script}: error: "), err
    assert all(w in last for w in words), last


@pytest.mark.parametrize("module", ["benchmark_optim", "benchmark_torch", "benchmark_distributed", "benchmark_train"])
@pytest.mark.parametrize("value", ["abc", "0", "100000"])
def test_thread_counts_are_checked_when_parsed(module, value, monkeypatch, capsys):
    """--threads of every benchmark takes what fastopt.set_num_threads takes: benchmark_optim ended in a
    traceback (int('abc'), or set_num_threads(0)), benchmark_train ran with OMP_NUM_THREADS=abc, and counts
    past 1024 reached set_num_threads (or the children's environment) unchecked."""
    code = run_script(ROOT / "fastopt" / f"{module}.py", ["--quick", "--threads", value], monkeypatch)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err and "argument --threads" in last, err
    assert repr(value) in last or f" {value} (must be >= 1 and <= 1024)" in last, last


def test_bench_train_quick_is_not_for_the_record(tmp_path, monkeypatch, capsys):
    """bench/bench_train.py writes bench/results/train-cpu.json on a full run; --quick is a smoke run and writes
    an explicit --out only (the wrapper added --out bench/results/train-cpu.json to every run, --quick too, and
    its --help showed --out as required). Run from a copy of the script, so that its record is in tmp_path."""
    from fastopt import benchmark_train
    script = copy_script("bench_train.py", tmp_path)
    record = tmp_path / "bench" / "results" / "train-cpu.json"
    data = types.SimpleNamespace(n_features=4, n_classes=3, y_train=[0, 1, 2])
    monkeypatch.setattr(benchmark_train, "load_dataset", lambda *a, **k: data)
    monkeypatch.setattr(benchmark_train, "synthetic", lambda: data)
    monkeypatch.setattr(benchmark_train, "time_fastopt", lambda *a, **k: (0.01, 0.9))
    monkeypatch.setattr(benchmark_train, "time_sklearn", lambda *a, **k: (0.02, 0.9))
    monkeypatch.setattr(benchmark_train, "machine", lambda: {"stub": True})

    # --threads default: measured in this process (no child processes)
    smoke, full = check_quick_is_not_for_the_record(script, record, monkeypatch, capsys, ["--threads", "default"])
    assert [r["case"] for r in smoke["results"]] == ["digits"]
    assert len(full["results"]) == 2
