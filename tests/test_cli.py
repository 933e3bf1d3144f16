"""fastopt/cli.py: `fastopt bench | info`, --version, `python -m fastopt`, option checking, strict JSON.
(train, compare and search: tests/train/test_train_cli.py)"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt import cli_args
from fastopt.cli import main


def strict_loads(text):
    """json.loads that fails on NaN / Infinity / -Infinity (not JSON, though Python writes them by default)."""
    def reject(constant):
        raise AssertionError(f"non-strict JSON: {constant}")
    return json.loads(text, parse_constant=reject)


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_usage_error(code, err, *fragments):
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err  # one line
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def python_m(*argv, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "fastopt", *argv], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def no_gpu():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() < 1
    except Exception:
        return True


# ---------------------------------------------------------------------------------------- version, -m

def test_version(capsys):
    code, out, err = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"fastopt {fastopt.__version__}"


def test_main_returns_exit_codes_instead_of_raising(capsys):
    assert run_cli(capsys, "--help")[0] == 0
    code, _, err = run_cli(capsys, )
    assert_usage_error(code, err, "command")
    code, _, err = run_cli(capsys, "frobnicate")
    assert_usage_error(code, err, "frobnicate")


@pytest.mark.parametrize("command", ["bench", "info", "train", "compare", "search"])
def test_an_unknown_option_is_named_by_its_command(capsys, command):
    """`fastopt compare -o adam` said "fastopt: error: unrecognized arguments: -o adam (see fastopt --help)"."""
    argv = ["-o", "adam"] if command in ("bench", "info", "compare") else ["--optimizers", "adam"]  # train's -o
    code, out, err = run_cli(capsys, command, *argv)
    assert code == 2 and not out
    assert err == f"fastopt {command}: error: unrecognized arguments: {' '.join(argv)} (see fastopt {command} --help)\n"


def test_an_unknown_option_before_the_command_is_the_top_levels(capsys):
    code, _, err = run_cli(capsys, "--bogus", "info")
    assert code == 2 and err == "fastopt: error: unrecognized arguments: --bogus (see fastopt --help)\n"


@pytest.mark.parametrize("command", ["bench", "info"])
def test_each_command_describes_itself(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0 and out.split("\n\n")[1].rstrip().endswith(".")
    assert "\noptions:" not in "\n" + out.split("\n\n")[1]  # a description before the options


def test_python_m_fastopt():
    version = python_m("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"fastopt {fastopt.__version__}"
    info = python_m("info", "--json")
    assert info.returncode == 0, info.stderr
    assert strict_loads(info.stdout)["fastopt"] == fastopt.__version__
    bare = python_m()
    assert bare.returncode == 2 and "Traceback" not in bare.stderr and "required: command" in bare.stderr


def test_python_m_bad_input_is_one_line_without_traceback():
    result = python_m("bench", "--optimizers", "foo")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--optimizers" in result.stderr and "'foo'" in result.stderr and "adam" in result.stderr


# ---------------------------------------------------------------------------------------- bench

@pytest.mark.parametrize("argv, fragments", [
    (["--optimizers", "foo"], ["--optimizers", "'foo'", "known: sgd"]),
    (["--optimizers", "adam,Foo,bar"], ["--optimizers", "'foo'", "'bar'"]),
    (["--optimizers", ","], ["--optimizers", "','"]),
    # the composite optimizers have benchmarks of their own (they crashed bench with a KeyError traceback)
    *[(["--optimizers", f"adam,{name}"], ["--optimizers", f"'{name}' ({name}: not a fused elementwise update",
                                          "bench/bench_<name>.py"]) for name in ("muon", "adafactor", "lbfgs", "sparse_adam")],
    (["--sizes", "0"], ["--sizes", "Invalid size: 0"]),
    (["--sizes", "99"], ["--sizes", "Invalid size: 99 (must be >= 100)"]),
    (["--sizes", "1e5,abc"], ["--sizes", "'abc'"]),
    (["--sizes", "1.5"], ["--sizes", "'1.5'"]),
    (["--sizes", "inf"], ["--sizes", "'inf'"]),
    (["--repeats", "0"], ["--repeats", "Invalid number of repeats: 0"]),
    (["--repeats", "-3"], ["--repeats", "-3"]),
    (["--threads", "0"], ["--threads", "Invalid number of threads: 0"]),
    (["--threads", "two"], ["--threads", "'two'"]),
    (["--threads", "100000"], ["--threads", "100000 (must be >= 1 and <= 1024)"]),  # was a traceback after parsing
    (["--device", "tpu"], ["--device", "'tpu'"]),
])
def test_bench_bad_options(capsys, argv, fragments):
    code, out, err = run_cli(capsys, "bench", *argv)
    assert_usage_error(code, err, *fragments)
    assert out == ""


@pytest.mark.skipif(not no_gpu(), reason="a GPU is present")
def test_bench_gpu_without_a_gpu_is_a_clear_error(capsys):
    code, out, err = run_cli(capsys, "bench", "--device", "gpu")
    assert_usage_error(code, err, "--device gpu")
    assert "CuPy" in err or "CUDA device" in err
    assert out == ""


def test_bench_gpu_without_cupy_says_what_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    code, out, err = run_cli(capsys, "bench", "--device", "gpu")
    assert_usage_error(code, err, "CuPy is not installed", "pip install 'fastopt[gpu]'")


def test_bench_out_in_a_missing_directory_fails_before_running(capsys, tmp_path):
    target = tmp_path / "missing" / "bench.json"
    code, out, err = run_cli(capsys, "bench", "--sizes", "100", "--optimizers", "sgd", "--out", str(target))
    assert_usage_error(code, err, "--out", str(tmp_path / "missing"), "does not exist")
    assert out == "" and not (tmp_path / "missing").exists()


def test_bench_tiny_run_writes_strict_json(capsys, tmp_path):
    target = tmp_path / "bench.json"
    code, out, err = run_cli(capsys, "bench", "--sizes", "1e3", "--optimizers", "sgd,adam", "--repeats", "2",
                             "--threads", "1", "--json", "--out", str(target))
    assert code == 0, err
    printed, written = strict_loads(out), strict_loads(target.read_text())
    assert printed == written
    assert [(r["optimizer"], r["n"]) for r in written["results"]] == [("sgd", 1000), ("adam", 1000)]
    assert not [p for p in os.listdir(tmp_path) if p != "bench.json"]  # no temporary files left


# ---------------------------------------------------------------------------------------- info

def test_info_json_is_strict(capsys):
    code, out, _ = run_cli(capsys, "info", "--json")
    info = strict_loads(out)
    assert code == 0 and info["fastopt"] == fastopt.__version__ and info["optimizers"] == list(fastopt.specs.all_optimizer_names())


# ---------------------------------------------------------------------------------------- helpers

def test_finite_json_turns_non_finite_numbers_into_null():
    payload = {"a": math.inf, "b": [1.0, math.nan, -math.inf], "c": np.float32(2.5), "d": np.array([1.0, np.nan]),
               "e": (np.int64(3), True, None, "x"), 4: np.float64(np.inf)}
    text = cli_args.dumps(payload)
    assert strict_loads(text) == {"a": None, "b": [1.0, None, None], "c": 2.5, "d": [1.0, None],
                                  "e": [3, True, None, "x"], "4": None}
    with pytest.raises(TypeError, match="cannot write"):
        cli_args.dumps({"x": object()})


def test_write_json_is_strict_and_atomic(tmp_path):
    target = tmp_path / "out.json"
    cli_args.write_json(str(target), {"loss": math.nan})
    assert strict_loads(target.read_text()) == {"loss": None}
    assert os.listdir(tmp_path) == ["out.json"]


def test_fmt_uses_sensible_precision():
    assert cli_args.fmt(0.123456) == "0.1235"
    assert cli_args.fmt(3012.5) == "3012.5000"
    assert cli_args.fmt(1.2345e30) == "1.234e+30" or cli_args.fmt(1.2345e30) == "1.235e+30"
    assert cli_args.fmt(-2e-7) == "-2.000e-07"
    assert cli_args.fmt(math.inf) == "inf" and cli_args.fmt(math.nan) == "nan" and cli_args.fmt(None) == "n/a"
    assert cli_args.fmt(0.0) == "0.0000"
    assert max(len(cli_args.fmt(v)) for v in (1e300, -1e300, 1e-300, 123456.7)) <= 12


def test_check_output_path(tmp_path):
    cli_args.check_output_path("--out", str(tmp_path / "new.json"))  # fine, and nothing is created
    assert os.listdir(tmp_path) == []
    existing = tmp_path / "old.json"
    existing.write_text("keep")
    cli_args.check_output_path("--out", str(existing))
    assert existing.read_text() == "keep"
    with pytest.raises(cli_args.UsageError, match="--plot .*does not exist"):
        cli_args.check_output_path("--plot", str(tmp_path / "a" / "b" / "x.png"))
    assert not (tmp_path / "a").exists()
    with pytest.raises(cli_args.UsageError, match="is a directory"):
        cli_args.check_output_path("--out", str(tmp_path))
    with pytest.raises(cli_args.UsageError, match="is not a directory"):
        cli_args.check_output_path("--out", str(existing / "x.json"))
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(cli_args.UsageError, match="cannot write"):
            cli_args.check_output_path("--out", str(locked / "x.json"))


@pytest.mark.parametrize("factory, text, message", [
    (lambda: cli_args.real("learning rate", low=0.0), "-0.1", "Invalid learning rate: -0.1 (must be >= 0)"),
    (lambda: cli_args.real("learning rate", low=0.0), "nan", "Invalid learning rate: nan (must be finite)"),
    (lambda: cli_args.real("learning rate", low=0.0), "1e400", "Invalid learning rate: 1e400 (must be finite)"),
    (lambda: cli_args.real("dropout", low=0.0, high=1.0, high_open=True), "1", "Invalid dropout: 1 (must be >= 0 and < 1)"),
    (lambda: cli_args.integer("number of epochs", low=1), "0", "Invalid number of epochs: 0 (must be >= 1)"),
    (lambda: cli_args.integer("number of epochs", low=1), "3.0", "Invalid number of epochs: '3.0' (expected an integer)"),
    (lambda: cli_args.listing(cli_args.real("beta"), "betas", length=2), "0.9", "expected 2 comma-separated values"),
])
def test_option_types_name_the_value(factory, text, message):
    import argparse
    with pytest.raises(argparse.ArgumentTypeError) as info:
        factory()(text)
    assert str(info.value) == message or message in str(info.value)


def test_option_types_accept_good_values():
    assert cli_args.integer("size", low=1, allow_exponent=True)("1e6") == 10**6
    assert cli_args.listing(cli_args.integer("size", low=1), "sizes")("1, 2,3") == (1, 2, 3)
    assert cli_args.real("lr", low=0.0)("0") == 0.0
    assert cli_args.optimizer_names("Adam, lion,adam") == ["adam", "lion"]
