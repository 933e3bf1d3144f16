"""tests/run_suite.py, the runner of `make test`: two pytest processes side by side, every report printed, and
the exit status a failure of either."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run_suite  # noqa: E402


def test_the_halves_cover_the_suite_once():
    first, second = run_suite.commands(["-q", "-x"])
    assert first[:3] == [sys.executable, "-m", "pytest"] and second[:3] == first[:3]
    assert "-q" in first and "-x" in first and "-q" in second and "-x" in second
    assert f"--ignore={run_suite.BESIDE}" in first and second[-1] == run_suite.BESIDE
    assert os.path.isdir(os.path.join(run_suite.ROOT, run_suite.BESIDE))
    assert any(n.startswith("test_") for n in os.listdir(os.path.join(run_suite.ROOT, run_suite.BESIDE)))


@pytest.mark.parametrize("value, expected", [("", False), ("0", False), ("1", True)])
def test_serial_when_asked(monkeypatch, value, expected):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setenv("FASTOPT_TEST_SERIAL", value)
    assert run_suite.serial() is expected
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert run_suite.serial() is True


@pytest.mark.parametrize("fail_first, fail_second", [(False, False), (True, False), (False, True)])
def test_both_halves_run_and_either_failure_fails_the_run(tmp_path, fail_first, fail_second):
    """Two real pytest runs on generated tests: both reports are printed, the second's after the first's, and
    the status is nonzero when either half fails."""
    for half, fail in (("one", fail_first), ("two", fail_second)):
        (tmp_path / half).mkdir()
        (tmp_path / half / f"test_{half}.py").write_text(f"def test_{half}():\n    assert {not fail}\n")
    script = (f"import sys; sys.path.insert(0, {HERE!r}); import run_suite\n"
              f"run_suite.ROOT = {str(tmp_path)!r}; run_suite.BESIDE = 'two'\n"
              "first, second = run_suite.commands(sys.argv[1:])\n"
              "run_suite.commands = lambda argv: (first[:-1] + ['one'], second)\n"
              "sys.exit(run_suite.main(sys.argv[1:]))\n")
    env = {**os.environ, "FASTOPT_TEST_SERIAL": ""}
    proc = subprocess.run([sys.executable, "-c", script, "-q", "-p", "no:cacheprovider"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout
    assert (proc.returncode != 0) == (fail_first or fail_second), out + proc.stderr
    first_report, _, second_report = out.partition("======== two (run beside the rest) ========")
    assert second_report, out
    assert ("1 failed" if fail_first else "1 passed") in first_report, out
    assert ("1 failed" if fail_second else "1 passed") in second_report, out
