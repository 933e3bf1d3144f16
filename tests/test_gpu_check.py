"""tests/gpu/gpu_check.py (`make gpu-check`) without a GPU: the parsers of compute-sanitizer's and pytest's
output, stages that fail or time out without stopping the later ones (process groups killed), the merged
summary, the benchmark JSON completed with the sanitizer and test targets, the whole command with stand-in
tools, its dry run and the Makefile target."""
from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
import time

import pytest

from fastopt import benchmark_gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "gpu", "gpu_check.py")
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gc = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("gpu_check", gc)  # dataclasses look their module up by name
_spec.loader.exec_module(gc)


# ---------------------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------------------

MEMCHECK_CLEAN = """========= COMPUTE-SANITIZER
launch_all: cupy: 816 calls, 0 failed
launch_all: 1350 calls on cupy, numba: OK
========= ERROR SUMMARY: 0 errors
"""

MEMCHECK_ERRORS = """========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 16 bytes
=========     at fo_adam_v0+0x4b0
=========     by thread (31,0,0) in block (3,0,0)
=========     Address 0x7f3a0000fff0 is out of bounds
=========
========= Program hit cudaErrorLaunchFailure (error 719) due to "unspecified launch failure" on CUDA API call to cuStreamSynchronize.
=========
========= Target application returned an error
========= ERROR SUMMARY: 2 errors
"""

INITCHECK = """========= COMPUTE-SANITIZER
========= Uninitialized __global__ memory read of size 8 bytes
=========     at fo_lamb_trust+0x120
========= ERROR SUMMARY: 1 error
"""

RACECHECK_CLEAN = """========= COMPUTE-SANITIZER
========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)
"""

RACECHECK_HAZARDS = """========= COMPUTE-SANITIZER
========= Error: Race reported between Write access at fo_sumsq_chunks+0x200
=========     and Read access at fo_sumsq_chunks+0x240 [64 hazards]
========= Warning: Race reported between Read access at fo_global_norm+0x100
========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)
"""

TWO_PROCESSES = "========= ERROR SUMMARY: 3 errors\n========= ERROR SUMMARY: 1 error\n"

CUT_SHORT = """========= COMPUTE-SANITIZER
========= Invalid __global__ write of size 4 bytes
========= Invalid __global__ write of size 4 bytes
========= Barrier error detected. Divergent thread(s) in block
"""


# as memcheck printed it on an H200 (cupy-cuda13x 14.2, cuda-bindings 13.3, driver 580): 34 such records, no other
PROBE = ('========= Program hit CUDA_ERROR_INVALID_VALUE (error 1) due to "invalid argument" on CUDA API call to '
         'cuGetProcAddress_v2.\n=========\n')
PROBES_ONLY = "========= COMPUTE-SANITIZER\n" + PROBE * 3 + "========= ERROR SUMMARY: 3 errors\n"
PROBES_AND_ERRORS = MEMCHECK_ERRORS.replace("========= ERROR SUMMARY: 2 errors", PROBE * 2 + "========= ERROR SUMMARY: 4 errors")


@pytest.mark.parametrize("text,errors,warnings,records,found,app_failed,probes", [
    (PROBES_ONLY, 0, 0, 0, True, False, 3),
    (PROBES_AND_ERRORS, 2, 0, 2, True, True, 2),
    (MEMCHECK_CLEAN, 0, 0, 0, True, False, 0),
    (MEMCHECK_ERRORS, 2, 0, 2, True, True, 0),
    (INITCHECK, 1, 0, 1, True, False, 0),
    (RACECHECK_CLEAN, 0, 0, 0, True, False, 0),
    (RACECHECK_HAZARDS, 1, 1, 2, True, False, 0),
    (RACECHECK_HAZARDS + "========= ERROR SUMMARY: 1 error\n", 1, 1, 2, True, False, 0),
    (TWO_PROCESSES, 4, 0, 0, True, False, 0),
    (CUT_SHORT, None, 0, 3, False, False, 0),
    ("", None, 0, 0, False, False, 0),
])
def test_parse_sanitizer(text, errors, warnings, records, found, app_failed, probes):
    assert gc.parse_sanitizer(text) == {"summary_found": found, "errors": errors, "warnings": warnings,
                                        "records": records, "api_probes": probes, "application_failed": app_failed}


def test_parse_sanitizer_counts_the_h200_memcheck_log_as_clean_but_an_other_api_error_not():
    assert gc.parse_sanitizer(PROBE * 34 + "========= ERROR SUMMARY: 34 errors\n")["errors"] == 0
    other = PROBE.replace("cuGetProcAddress_v2", "cuMemAlloc_v2")
    assert gc.parse_sanitizer(PROBE + other + "========= ERROR SUMMARY: 2 errors\n")["errors"] == 1


@pytest.mark.parametrize("log,status,errors", [
    (PROBES_ONLY, "ok", 0),                 # exit 99 from the driver entry-point probes alone: nothing found
    (PROBES_AND_ERRORS, "failed", 2),       # real errors beside them
    (PROBE * 3, "failed", 0),               # cut short (no summary): failed, though no error record yet
])
def test_memcheck_status_follows_its_errors_not_the_probes(tmp_path, log, status, errors):
    finished = "launch_all: 1350 calls on cupy, numba: OK\n" if "SUMMARY" in log else ""
    (tmp_path / "memcheck.log").write_text(log.replace("========= ERROR SUMMARY", finished + "========= ERROR SUMMARY"))
    result = {"commands": [{"log": "memcheck.log", "status": "failed", "rc": 99, "tool": "memcheck"}]}
    gc.finish_sanitizer(result, str(tmp_path))
    assert (result["status"], result["errors"]) == (status, errors)


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="2"
skipped="5" tests="40" time="3.0"><testcase classname="a" name="b"/></testsuite></testsuites>"""


def test_parse_junit(tmp_path):
    path = tmp_path / "t.xml"
    path.write_text(JUNIT)
    assert gc.parse_junit(str(path)) == {"tests": 40, "failures": 2, "errors": 1, "skipped": 5, "passed": 32}
    path.write_text(JUNIT.replace("<testsuites>", "").replace("</testsuites>", ""))  # older pytest: one suite
    assert gc.parse_junit(str(path))["passed"] == 32
    path.write_text("<testsuites><testsuite")
    assert gc.parse_junit(str(path)) is None
    assert gc.parse_junit(str(tmp_path / "missing.xml")) is None


@pytest.mark.parametrize("text,counts", [
    ("....\n3 failed, 40 passed, 2 skipped, 1 error in 5.02s\n", {"failed": 3, "passed": 40, "skipped": 2, "errors": 1}),
    ("collected 0 items\n\nno tests ran in 0.01s\n", {}),
    ("=== 12 passed, 93 skipped in 40.1s ===\n", {"passed": 12, "skipped": 93}),
    ("killed\n", {}),
])
def test_parse_pytest_line(text, counts):
    assert gc.parse_pytest_line(text) == counts


@pytest.mark.parametrize("name", ["NVIDIA H200", "NVIDIA H100 80GB HBM3", "Tesla V100-SXM2-16GB", "", "GPU (x)"])
def test_device_slug_agrees_with_the_benchmark(name):
    assert gc.device_slug(name) == benchmark_gpu.device_slug(name)


# ---------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------

def _py(code):
    return [sys.executable, "-c", code]


def test_a_failing_and_a_timed_out_stage_do_not_stop_the_others(tmp_path):
    marker = tmp_path / "grandchild-alive"
    # the timed-out command leaves a grandchild that would touch a file after the kill: its group must die
    child = f"import time, pathlib; time.sleep(3); pathlib.Path({str(marker)!r}).touch()"
    sleeper = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"
    stages = [
        gc.Stage("build", [gc.Command("fails", _py("import sys; print('boom'); sys.exit(3)"), "a.log")], 30),
        gc.Stage("tests", [gc.Command("hangs", _py(sleeper), "b.log", weight=1),
                           gc.Command("after", _py("print('still ran')"), "c.log", weight=1)], 3),
        gc.Stage("bench", [gc.Command("ok", _py("print('fine')"), "d.log")], 30),
    ]
    t0 = time.monotonic()
    summary = gc.run(stages, str(tmp_path), log=lambda *a: None)
    assert time.monotonic() - t0 < 20
    s = summary["stages"]
    assert s["build"]["status"] == "failed" and s["build"]["commands"][0]["rc"] == 3
    hangs, after = s["tests"]["commands"]
    assert hangs["status"] == "timeout" and 1.0 <= hangs["seconds"] < 10 and hangs["timeout_s"] == pytest.approx(1.5, abs=0.2)
    assert after["status"] in ("ok", "timeout")  # what the budget had left
    assert s["tests"]["status"] == "timeout"
    assert s["bench"]["status"] == "ok" and s["bench"]["json"] is None  # no bench-gpu.json from this stand-in
    assert "boom" in (tmp_path / "a.log").read_text() and "killed after" in (tmp_path / "b.log").read_text()
    time.sleep(3.5)
    assert not marker.exists(), "the timed-out command's child survived"
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["stages"].keys() == {"build", "tests", "bench"}


def test_summary_is_merged_across_calls(tmp_path):
    gc.run([gc.Stage("build", [gc.Command("ok", _py("pass"), "a.log")], 30)], str(tmp_path), log=lambda *a: None)
    gc.run([gc.Stage("bench", [gc.Command("ok", _py("import sys; sys.exit(1)"), "d.log")], 30)], str(tmp_path),
           log=lambda *a: None)
    s = json.loads((tmp_path / "summary.json").read_text())["stages"]
    assert s["build"]["status"] == "ok" and s["bench"]["status"] == "failed"


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _stand_in_tools(tmp_path, monkeypatch, sanitizer_outputs, bench_doc):
    """A compute-sanitizer that prints a canned report per tool and a 'python3' that plays pytest, setup.py and
    fastopt bench (writing bench_doc where --out says), both on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, text in sanitizer_outputs.items():
        (bin_dir / f"{tool}.txt").write_text(text)
    cases = "\n".join(f"  {tool}) cat {bin_dir / (tool + '.txt')}; exit {99 if gc.parse_sanitizer(text)['errors'] else 0};;"
                      for tool, text in sanitizer_outputs.items())
    _executable(bin_dir / "compute-sanitizer", f"#!/bin/sh\ncase \"$2\" in\n{cases}\nesac\nexit 1\n")
    doc = json.dumps(bench_doc)
    fake_python = f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
if args[:2] == ["-m", "pytest"]:
    xml = args[args.index("--junitxml") + 1]
    if "-m" in args[2:]:
        print("no tests ran in 0.01s"); sys.exit(5)
    open(xml, "w").write('<testsuites><testsuite tests="10" failures="1" errors="0" skipped="2"/></testsuites>')
    print("1 failed, 7 passed, 2 skipped in 1.0s"); sys.exit(1)
if args[:1] == ["setup.py"]:
    print("building"); sys.exit(0)
if args[:2] == ["-m", "fastopt"]:
    out = args[args.index("--out") + 1]
    doc = json.loads({doc!r})
    if os.environ.get("FASTOPT_CUDA_IN_FLIGHT") == "4":  # the kernel variant's run: twice as fast here
        for row in doc["rows"]:
            row["us"] /= 2
    open(out, "w").write(json.dumps(doc))
    print("| case | variant |"); print("|---|---|"); print("Device copy: 4000 GB/s"); sys.exit(0)
sys.exit(7)
"""
    python = _executable(bin_dir / "python3", fake_python)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return python


def test_the_whole_command_with_stand_in_tools(tmp_path, monkeypatch, capsys):
    outputs = {"memcheck": MEMCHECK_CLEAN, "initcheck": INITCHECK, "racecheck": RACECHECK_CLEAN,
               "synccheck": MEMCHECK_CLEAN}
    rows = [{"optimizer": "adam", "case": benchmark_gpu.BIG, "variant": benchmark_gpu.CUPY_FN, "us": 1.0}]
    bench_doc = {"device": {"name": "NVIDIA H200"}, "complete": True, "rows": rows,
                 "targets": benchmark_gpu.targets([], None)}
    python = _stand_in_tools(tmp_path, monkeypatch, outputs, bench_doc)
    out = tmp_path / "out"
    code = gc.main(["--out", str(out), "--python", python, "--budgets", "build=20,tests=20,sanitizer=40,bench=20"])
    assert code == 1  # a failed test and an initcheck error
    summary = json.loads((out / "summary.json").read_text())
    s = summary["stages"]
    assert s["build"]["status"] == "ok"
    assert s["tests"]["status"] == "failed" and s["tests"]["failed"] == 1
    assert s["tests"]["counts"] == {"tests": 10, "passed": 7, "failures": 1, "errors": 0, "skipped": 2}
    assert all(c["status"] == "ok" for c in s["tests"]["commands"][1:])  # exit 5 (none selected) is fine
    tools = {r["tool"]: r for r in s["sanitizer"]["commands"]}
    assert [r["tool"] for r in s["sanitizer"]["commands"]] == ["memcheck", "initcheck", "racecheck", "synccheck"]
    assert tools["memcheck"]["status"] == "ok" and tools["memcheck"]["errors"] == 0
    assert tools["memcheck"]["launch_all"] == "OK" and tools["initcheck"]["launch_all"] == "did not finish"
    assert tools["initcheck"]["status"] == "failed" and tools["initcheck"]["errors"] == 1 and tools["initcheck"]["rc"] == 99
    assert s["sanitizer"]["errors"] == 1 and s["sanitizer"]["status"] == "failed"
    assert s["bench"]["status"] == "ok" and s["bench"]["json"] == "gpu-nvidia-h200.json"
    assert [c["status"] for c in s["bench"]["commands"]] == ["ok", "ok"]
    assert s["bench"]["in_flight_variant"] == {
        benchmark_gpu.BIG: {benchmark_gpu.CUPY_FN: {"us": 1.0, "variant_us": 0.5, "speedup": 2.0}}}
    doc = json.loads((out / "gpu-nvidia-h200.json").read_text())
    assert doc["targets"]["compute_sanitizer_errors"]["value"] == 1
    assert doc["targets"]["compute_sanitizer_errors"]["met"] is False
    assert doc["targets"]["gpu_tests_failed"] == dict(bench_doc["targets"]["gpu_tests_failed"], value=1, met=False)
    assert (out / "bench-table.md").read_text().splitlines() == ["| case | variant |", "|---|---|",
                                                                 "Device copy: 4000 GB/s"]
    text = capsys.readouterr().out
    assert "| sanitizer | failed |" in text and "| tests | failed |" in text and "gpu-nvidia-h200.json" in text


def test_a_missing_sanitizer_is_an_error_stage(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "find_sanitizer", lambda: None)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing called compute-sanitizer here
    code = gc.main(["--out", str(tmp_path / "o"), "--stages", "sanitizer", "--budgets", "sanitizer=10"])
    s = json.loads((tmp_path / "o" / "summary.json").read_text())["stages"]["sanitizer"]
    assert code == 1 and s["status"] == "error" and all(r["status"] == "error" for r in s["commands"])
    assert "FileNotFoundError" in s["commands"][0]["error"]


def test_dry_run_lists_every_stage_and_creates_nothing(tmp_path):
    out = tmp_path / "never"
    res = subprocess.run([sys.executable, SCRIPT, "--out", str(out), "--dry-run"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    for fragment in (f"PYTHONPATH={gc.SOURCE_SHIM}{os.pathsep}{ROOT}", "stage build (budget 480 s)", "setup.py build_ext --inplace", "stage tests (budget 360 s)",
                     "-m pytest", "tests/gpu --junitxml",
                     "stage sanitizer (budget 240 s)", "--tool memcheck", "--tool initcheck", "--tool racecheck",
                     "--tool synccheck", "tests/gpu/launch_all.py", "stage bench (budget 240 s)",
                     "-m fastopt bench --device gpu --quick --out"):
        assert fragment in text, fragment
    budgets = gc.BUDGETS  # the build runs beside the rest; the tests beside the sanitizer; the bench last
    assert max(budgets["build"], max(budgets["tests"], budgets["sanitizer"]) + budgets["bench"]) <= 10 * 60
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["--stages", "build,deploy"], "unknown stage(s) ['deploy']"),
    (["--budgets", "tests=abc"], "budget of tests must be seconds"),
    (["--budgets", "bench=0"], "budget of bench must be > 0"),
    (["--budgets", "lint=3"], "unknown stage 'lint'"),
])
def test_bad_options(tmp_path, argv, message):
    res = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path), "--dry-run", *argv], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and message in res.stderr


def test_stages_run_in_pipeline_order_whatever_the_option_order(tmp_path):
    res = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path), "--dry-run", "--stages", "bench,build"],
                         capture_output=True, text=True, timeout=60)
    stages = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("stage ")]
    assert stages == ["build", "bench"]


def test_makefile_target():
    make = subprocess.run(["make", "-n", "gpu-check", "OUT=/tmp/fo-gpu", "STAGES=sanitizer,bench",
                           "BUDGETS=bench=100"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    if make.returncode == 127 or "not found" in make.stderr:
        pytest.skip("make is not installed")
    assert make.returncode == 0, make.stderr
    assert 'python3 tests/gpu/gpu_check.py --out "/tmp/fo-gpu" --stages "sanitizer,bench" --python "python3"' \
        in make.stdout and '--budgets "bench=100"' in make.stdout
    usage = subprocess.run(["make", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert usage.returncode != 0 and "usage: make gpu-check OUT=<dir>" in usage.stderr


# ---------------------------------------------------------------------------------------------------
# Running from the source checkout (nothing installed on the GPU machine)
# ---------------------------------------------------------------------------------------------------

NO_INSTALL = """
import sys
# what a machine without fastopt installed has: no editable-install finder mapping fastopt.kernels
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]  # (a class, or an instance)
for name in [m for m in sys.modules if m == "fastopt" or m.startswith("fastopt.")]:
    del sys.modules[name]
import fastopt.kernels.cpu, fastopt.kernels.numba, fastopt.kernels.cuda
from fastopt.backends import dispatch
print(fastopt.__file__, fastopt.kernels.__file__, fastopt.kernels.numba.__file__, dispatch.cython_available())
print(type(sys.meta_path[0]).__name__)
"""


def test_the_stages_import_this_checkouts_kernels_without_an_install():
    env = gc.environment()
    assert env["PYTHONPATH"].split(os.pathsep)[:2] == [gc.SOURCE_SHIM, ROOT]
    res = subprocess.run([sys.executable, "-c", NO_INSTALL], env=env, capture_output=True, text=True, timeout=120,
                         cwd="/")
    assert res.returncode == 0, res.stderr
    files, first = res.stdout.splitlines()
    fastopt_file, kernels_file, numba_file, cython = files.split()
    assert fastopt_file == os.path.join(ROOT, "fastopt", "__init__.py")
    assert kernels_file == os.path.join(ROOT, "kernels", "__init__.py")
    assert numba_file == os.path.join(ROOT, "kernels", "numba", "__init__.py")
    assert cython == str(bool(list((__import__("pathlib").Path(ROOT) / "kernels" / "cpu").glob("_cpu_fast*.so"))))
    assert first == "SourceKernelsFinder"
    # without the shim, the same interpreter cannot import fastopt.kernels from the checkout
    bare = dict(env, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", NO_INSTALL], env=bare, capture_output=True, text=True, timeout=120,
                         cwd="/")
    assert res.returncode != 0 and "No module named 'fastopt.kernels'" in res.stderr


def test_the_shim_runs_the_sitecustomize_it_shadows(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import os\nos.environ['SHADOWED_SITECUSTOMIZE_RAN'] = '1'\n")
    env = dict(gc.environment())
    env["PYTHONPATH"] = os.pathsep.join([gc.SOURCE_SHIM, str(tmp_path)])
    res = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('SHADOWED_SITECUSTOMIZE_RAN'))"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "1", res.stderr


def test_marked_gpu_files_outside_tests_gpu(tmp_path):
    for rel, text in {"tests/test_a.py": "@pytest.mark.gpu\ndef test_x(): pass\n",
                      "tests/test_b.py": "def test_y(): pass  # mark.gpux is another marker\n",
                      "tests/sub/test_c.py": "pytestmark = pytest.mark.gpu\n",
                      "tests/sub/helper.py": "@pytest.mark.gpu\n",
                      "tests/test_e.py": "x = '@pytest.mark.gpu'\n",
                      "tests/gpu/test_d.py": "@pytest.mark.gpu\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert gc.marked_gpu_files(str(tmp_path)) == ["tests/sub/test_c.py", "tests/test_a.py"]
    stages = gc.plan_stages(["tests"], gc.BUDGETS, "python3", None)
    marked = gc.marked_gpu_files()
    assert len(stages[0].commands) == 1 + bool(marked)
    if marked:
        assert stages[0].commands[1].argv[-2 - len(marked):-2] == marked


def test_the_real_bench_command_line_parses_and_fails_clearly_without_a_gpu(tmp_path):
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a GPU is present: this checks the run without one")
    except Exception:
        pass
    stages = gc._with_out(gc.plan_stages(["bench"], {"bench": 120}, sys.executable, None), str(tmp_path))
    summary = gc.run(stages, str(tmp_path), log=lambda *a: None)
    bench = summary["stages"]["bench"]
    log = (tmp_path / "bench.log").read_text()
    assert bench["status"] == "failed" and bench["commands"][0]["rc"] == 2, log  # a usage error: no GPU
    assert "fastopt bench: error: bench --device gpu:" in log and "unrecognized arguments" not in log
    assert bench["json"] is None


def test_a_command_with_no_time_left_is_recorded_and_its_old_log_replaced(tmp_path):
    (tmp_path / "second.log").write_text("========= ERROR SUMMARY: 0 errors\n")  # an earlier call's log
    stage = gc.Stage("sanitizer", [gc.Command("first", _py("import time; time.sleep(30)"), "first.log", weight=100),
                                   gc.Command("second", _py("pass"), "second.log", weight=1, meta={"tool": "x"})], 1.5)
    result = gc.run_stage(stage, str(tmp_path), log=lambda *a: None)
    first, second = result["commands"]
    assert first["status"] == "timeout" and second["status"] == "timeout" and second["tool"] == "x"
    assert second["error"] == "no time left in the stage's budget"
    assert (tmp_path / "second.log").read_text() == "not run: no time left in the stage's budget\n"
    gc.finish_sanitizer(result, str(tmp_path))
    assert second["summary_found"] is False and result["status"] == "timeout"


def _timed(path):
    """A command that writes its start and end times (monotonic-free: wall clock) into path."""
    return _py(f"import time, pathlib; t = time.time(); time.sleep(1.0); pathlib.Path({str(path)!r}).write_text(f'{{t}} {{time.time()}}')")


def _span(path):
    start, end = map(float, path.read_text().split())
    return start, end


def test_the_build_runs_beside_everything_the_tests_beside_the_sanitizer_and_the_bench_alone(tmp_path):
    names = ("build", "tests", "sanitizer", "bench")
    stages = [gc.Stage(n, [gc.Command(n, _timed(tmp_path / f"{n}.t"), f"{n}.log")], 30) for n in names]
    summary = gc.run(stages, str(tmp_path), log=lambda *a: None, concurrent=True)
    build, tests, sanitizer, bench = (_span(tmp_path / f"{n}.t") for n in names)
    assert tests[0] < sanitizer[1] and sanitizer[0] < tests[1]  # side by side
    assert bench[0] >= max(tests[1], sanitizer[1])  # alone, after both
    assert build[0] < tests[1]  # from the start, beside them
    assert summary["concurrent"] is True
    assert [summary["stages"][n]["status"] for n in names] == ["ok", "ok", "failed", "ok"]  # no sanitizer report
    # --serial: the tests, then the sanitizer
    gc.run(stages, str(tmp_path), log=lambda *a: None, concurrent=False)
    tests, sanitizer = _span(tmp_path / "tests.t"), _span(tmp_path / "sanitizer.t")
    assert sanitizer[0] >= tests[1]


def test_pytest_gets_workers_and_a_timeout_where_the_plugins_are_there(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    python = _executable(tmp_path / "py", f"#!/bin/sh\nPYTHONPATH={plugins} exec {sys.executable} \"$@\"\n")
    assert gc.pytest_options(python, None, 300) == []  # neither plugin importable
    (plugins / "xdist.py").write_text("")
    (plugins / "pytest_timeout.py").write_text("")
    assert gc.pytest_options(python, None, 300) == ["-n", "8", "--timeout", "300"]
    assert gc.pytest_options(python, 3, 0) == ["-n", "3"]
    assert gc.pytest_options(python, 0, 60) == ["--timeout", "60"]
    stage = gc.plan_stages(["tests"], gc.BUDGETS, python, None, ["-n", "3"])[0]
    assert all(cmd.argv[cmd.argv.index("-n") + 1] == "3" for cmd in stage.commands)


def test_archive_packs_every_file_of_out(tmp_path):
    import tarfile
    (tmp_path / "a.log").write_text("a")
    (tmp_path / "summary.json").write_text("{}")
    path = gc.archive(str(tmp_path), "all.tar.gz")
    gc.archive(str(tmp_path), "all.tar.gz")  # again: the archive does not hold itself
    with tarfile.open(path) as tar:
        assert sorted(tar.getnames()) == ["a.log", "summary.json"]
