"""`make gpu-check OUT=<dir>`: everything a GPU machine without network access can check, in one command.

    python3 tests/gpu/gpu_check.py --out DIR [--stages build,tests,sanitizer,bench]
                                   [--budgets build=480,tests=360,sanitizer=240,bench=240] [--python python3]
                                   [--jobs N] [--test-timeout S] [--serial] [--archive NAME] [--dry-run]

For a machine with CUDA, CuPy (cupy-cuda13x), numba-cuda, torch, pytest, Cython, nvcc and compute-sanitizer
already installed: nothing is installed or downloaded, no virtual environment is made; every command runs
with this checkout first on PYTHONPATH (and tests/gpu/pythonpath, whose sitecustomize makes kernels/ the
package fastopt.kernels, as an install would). The stages, each with its own time budget (seconds):

  build      python3 setup.py build_ext --inplace                                   (build.log)
  tests      pytest tests/gpu, then -m gpu on the files outside it that use the marker (tests-*.log, *.xml);
             on pytest-xdist workers and with pytest-timeout's per-test limit where those are installed
  sanitizer  compute-sanitizer memcheck, initcheck, racecheck, synccheck on tests/gpu/launch_all.py
             (every CUDA kernel, both backends; all but memcheck on its --quick sweep)
                                                                                    (sanitizer-<tool>.log)
  bench      fastopt bench --device gpu --quick                                     (bench.log, bench-gpu.json,
             then gpu-<device>.json with the sanitizer and test targets filled in,   gpu-<device>.json,
             and the Markdown tables)                                                bench-table.md)
             then the same with FASTOPT_CUDA_IN_FLIGHT=4 (a multi-tensor kernel      (bench-in-flight.log,
             variant): summary.json compares it with the record per case             bench-gpu-in-flight-4.json)

How they overlap (measured on an H200 machine, 16 cores: the tests took 135 s on 14 workers, the sanitizer
106 s, the quick benchmark 23 s; the build had not finished after 190 s beside them): the build needs no
GPU and runs beside everything from the start (the GPU backends do not need it); the tests and the
sanitizer run side by side (--serial: one after the other); the benchmark runs alone, last. All four
stages fit in one 10-minute command.

A failing or timed-out stage does not stop the others (a timed-out command's process group is killed).
DIR/summary.json holds per stage its status (ok, failed, timeout, error), seconds, commands with exit
codes and logs, test counts and the sanitizer's error counts; a summary already in DIR is merged (stages
run now replace theirs), so the stages can also be run in several calls with the same OUT. --archive
packs OUT into one .tar.gz. Exit status 0 when every stage run now is ok. Standard library only: it
reports even when fastopt does not import.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# its sitecustomize maps fastopt.kernels to ROOT/kernels: fastopt runs from this checkout, not installed
SOURCE_SHIM = os.path.join(ROOT, "tests", "gpu", "pythonpath")
STAGES = ("build", "tests", "sanitizer", "bench")
BUDGETS = {"build": 480, "tests": 360, "sanitizer": 240, "bench": 240}
# (tool, share of the sanitizer budget, launch_all --quick): time a tool leaves unused goes to the ones after
# it. memcheck gets the full sweep (misaligned views, every grad_scale form); the quick sweep still launches
# every kernel in every dtype, single and multi-tensor, with the skip flag set (initcheck's LAMB case)
TOOLS = (("memcheck", 4, False), ("initcheck", 2, True), ("racecheck", 2, True), ("synccheck", 2, True))
KILL_GRACE = 5
VARIANT_IN_FLIGHT = 4                       # the multi-tensor kernel variant the bench stage also times
VARIANT_JSON = "bench-gpu-in-flight-4.json"


# ---------------------------------------------------------------------------------------------------
# Parsing what the tools print
# ---------------------------------------------------------------------------------------------------

_ERROR_SUMMARY = re.compile(r"^=+ ERROR SUMMARY: (\d+) errors?", re.M)
_RACE_SUMMARY = re.compile(r"^=+ RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", re.M)
# the first line of each reported problem (used to count what a log cut short by a timeout already shows)
_RECORD = re.compile(r"^=+ (Invalid |Uninitialized |Error: Race|Warning: Race|Barrier error|Program hit |"
                     r"Malloc/Free error|Misaligned |Out-of-range |Leaked |Error: process didn't terminate)", re.M)


# A failed driver entry-point lookup: memcheck reports every CUDA API call that returns an error, and the
# CUDA Python bindings (cuda-bindings 13.3 on a 580 driver, seen on an H200) ask the driver for entry
# points newer than it has; each answer CUDA_ERROR_INVALID_VALUE is counted in the ERROR SUMMARY. Not a
# fault of the program: such records are counted apart (api_probes) and left out of `errors`.
_API_PROBE = re.compile(r"^=+ Program hit CUDA_ERROR_\w+ \(error \d+\) due to \"[^\"]*\" on CUDA API call to "
                        r"cuGetProcAddress(_v\d+)?\.$", re.M)


def parse_sanitizer(text: str) -> dict:
    """compute-sanitizer's verdict from its output: errors (the ERROR SUMMARY counts, summed over processes,
    and racecheck's hazard errors, less the entry-point probes), warnings (racecheck's), whether a summary
    was printed at all, the problem records seen (what a log cut short still tells) and api_probes."""
    summaries = [int(n) for n in _ERROR_SUMMARY.findall(text)]
    races = [(int(h), int(e), int(w)) for h, e, w in _RACE_SUMMARY.findall(text)]
    probes = len(_API_PROBE.findall(text))
    found = bool(summaries or races)
    errors = max(sum(summaries) - probes, 0) if summaries else None
    if races:  # racecheck may print both lines: its hazard errors are the ERROR SUMMARY's too
        race_errors = sum(e for _, e, _ in races)
        errors = max(errors or 0, race_errors)
    return {"summary_found": found, "errors": errors, "warnings": sum(w for _, _, w in races),
            "records": len(_RECORD.findall(text)) - probes, "api_probes": probes,
            "application_failed": "Target application returned an error" in text}


_PYTEST_COUNTS = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)")


def parse_junit(path: str) -> dict | None:
    """Test counts from a pytest --junitxml file, or None when it is missing or unreadable."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def parse_pytest_line(text: str) -> dict:
    """Counts from pytest's last summary line ("3 failed, 40 passed, 2 skipped in 5.0s"): the fallback when
    there is no junit file (pytest killed by the timeout)."""
    lines = [ln for ln in text.splitlines() if re.search(r"\b(passed|failed|error|no tests ran)\b", ln)]
    out: dict = {}
    if lines:
        for n, what in _PYTEST_COUNTS.findall(lines[-1]):
            out["errors" if what.startswith("error") else what] = int(n)
    return out


def device_slug(name: str) -> str:
    """As fastopt.benchmark_gpu.device_slug (tests/test_gpu_check.py checks they agree)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


# ---------------------------------------------------------------------------------------------------
# Running commands
# ---------------------------------------------------------------------------------------------------

@dataclass
class Command:
    name: str
    argv: list
    log: str                       # file name inside OUT
    weight: float = 1.0            # share of the stage's budget (unused time rolls over)
    ok_codes: tuple = (0,)
    meta: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)  # added to environment()


@dataclass
class Stage:
    name: str
    commands: list
    budget: float


def environment():
    """The stages' environment: this checkout importable as fastopt (SOURCE_SHIM first, then ROOT), inherited
    by every Python process a stage starts."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SOURCE_SHIM, ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_command(cmd: Command, out_dir: str, timeout: float) -> dict:
    """Run one command in ROOT with its output in out_dir/cmd.log; kill its process group at the timeout."""
    path = os.path.join(out_dir, cmd.log)
    t0 = time.monotonic()
    record = {"name": cmd.name, "argv": cmd.argv, "log": cmd.log, "timeout_s": round(timeout, 1)}
    with open(path, "wb") as log:  # a rerun into the same OUT replaces the log
        log.write(f"$ {' '.join(cmd.argv)}   (timeout {timeout:.0f} s)\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(cmd.argv, cwd=ROOT, env={**environment(), **cmd.env}, stdout=log,
                                    stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            record.update(status="error", rc=None, seconds=0.0, error=f"{type(e).__name__}: {e}")
            log.write(f"could not start: {e}\n".encode())
            return record
        try:
            rc = proc.wait(timeout=max(timeout, 1))
            status = "ok" if rc in cmd.ok_codes else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, status = None, "timeout"
            log.write(f"\n*** killed after {timeout:.0f} s (gpu_check timeout)\n".encode())
    record.update(status=status, rc=rc, seconds=round(time.monotonic() - t0, 1))
    return record


def _kill_group(proc):
    """End the command and everything it started (its own process group, made by start_new_session): TERM,
    a grace period, then KILL for whatever is left. The leader is reaped last, so that the group's id cannot
    be reused by an unrelated process meanwhile."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + KILL_GRACE
    while time.monotonic() < deadline:  # has the leader exited? (WNOWAIT: without reaping it)
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            break
        time.sleep(0.1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_stage(stage: Stage, out_dir: str, log=print) -> dict:
    """Run a stage's commands in order within its budget; each gets its weight's share of what is left."""
    t0 = time.monotonic()
    records = []
    for i, cmd in enumerate(stage.commands):
        left = stage.budget - (time.monotonic() - t0)
        weights = sum(c.weight for c in stage.commands[i:])
        if left < 1:
            with open(os.path.join(out_dir, cmd.log), "w") as f:  # not an earlier call's log
                f.write("not run: no time left in the stage's budget\n")
            records.append({"name": cmd.name, "argv": cmd.argv, "log": cmd.log, "status": "timeout", "rc": None,
                            "seconds": 0.0, "error": "no time left in the stage's budget", **cmd.meta})
            log(f"gpu_check: {stage.name}/{cmd.name}: not run, no time left")
            continue
        record = run_command(cmd, out_dir, left * cmd.weight / weights)
        record.update(cmd.meta)
        records.append(record)
        log(f"gpu_check: {stage.name}/{cmd.name}: {record['status']} ({record['seconds']} s, log {cmd.log})")
    statuses = [r["status"] for r in records]
    status = next((s for s in ("error", "timeout", "failed") if s in statuses), "ok")
    return {"status": status, "seconds": round(time.monotonic() - t0, 1), "budget_s": stage.budget,
            "commands": records}


# ---------------------------------------------------------------------------------------------------
# The stages
# ---------------------------------------------------------------------------------------------------

def find_sanitizer():
    """compute-sanitizer on PATH, else in the usual CUDA install places, else None."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            path = os.path.join(home, "bin", "compute-sanitizer")
            if os.access(path, os.X_OK):
                return path
    return None


# a decorator or a module-level pytestmark using the marker (not the words inside a string)
_GPU_MARK = re.compile(r"^[ \t]*(@pytest\.mark\.gpu\b|pytestmark\s*=.*\bpytest\.mark\.gpu\b)", re.M)


def marked_gpu_files(root=ROOT) -> list:
    """Test files outside tests/gpu that use the `gpu` marker ("needs a CUDA GPU"), relative to root, sorted."""
    found = []
    tests = os.path.join(root, "tests")
    for directory, subdirs, files in os.walk(tests):
        subdirs[:] = sorted(d for d in subdirs if d != "__pycache__" and
                            os.path.relpath(os.path.join(directory, d), tests) != "gpu")
        for name in sorted(files):
            if name.startswith("test_") and name.endswith(".py"):
                path = os.path.join(directory, name)
                with open(path, errors="replace") as f:
                    if _GPU_MARK.search(f.read()):
                        found.append(os.path.relpath(path, root))
    return sorted(found)


def has_modules(python, *modules) -> bool:
    """Whether the GPU machine's interpreter imports these (pytest plugins it may or may not have)."""
    try:
        return subprocess.run([python, "-c", "import " + ", ".join(modules)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pytest_options(python, jobs, test_timeout) -> list:
    """-n JOBS when pytest-xdist is there (tests/gpu took over 140 s serially on an H200 machine, 135 s on 14
    workers with the slowest test alone 100 s), --timeout when pytest-timeout is (a hung test is reported
    with its stack instead of eating the stage). jobs: None = 8 when xdist is there, 0 = serial."""
    options = []
    if jobs != 0 and has_modules(python, "xdist"):
        options += ["-n", str(jobs or 8)]
    if test_timeout and has_modules(python, "pytest_timeout"):
        options += ["--timeout", str(int(test_timeout))]
    return options


def plan_stages(names, budgets, python, sanitizer, pytest_extra=()) -> list:
    stages = []
    for name in names:
        if name == "build":
            cmds = [Command("build_ext", [python, "setup.py", "build_ext", "--inplace"], "build.log")]
        elif name == "tests":
            # -v: each test's outcome on its own line as it finishes, so that a run the budget kills still names
            # its failures (-q prints them only in the final summary)
            cmds = [Command("tests/gpu", [python, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", *pytest_extra,
                                          "tests/gpu", "--junitxml", "{out}/tests-gpu.xml"], "tests-gpu.log", weight=3,
                            meta={"junit": "tests-gpu.xml"})]
            marked = marked_gpu_files()
            if marked:  # only these files: the rest of the suite may need packages a GPU machine lacks
                cmds.append(Command("marked gpu", [python, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider",
                                                   *pytest_extra, "-m", "gpu", *marked,
                                                   "--junitxml", "{out}/tests-marked-gpu.xml"],
                                    "tests-marked-gpu.log", ok_codes=(0, 5), meta={"junit": "tests-marked-gpu.xml"}))
        elif name == "sanitizer":
            tool_path = sanitizer or "compute-sanitizer"
            cmds = [Command(tool, [tool_path, "--tool", tool, "--error-exitcode", "99", "--print-limit", "100",
                                   python, "tests/gpu/launch_all.py", *(["--quick"] if quick else [])],
                            f"sanitizer-{tool}.log", weight=weight, meta={"tool": tool})
                    for tool, weight, quick in TOOLS]
        elif name == "bench":
            bench = [python, "-m", "fastopt", "bench", "--device", "gpu", "--quick", "--out"]
            # then the kernel variant to measure (update.cu FASTOPT_IN_FLIGHT): its own JSON, beside the record
            cmds = [Command("fastopt bench --device gpu --quick", bench + ["{out}/bench-gpu.json"], "bench.log"),
                    Command(f"the same with FASTOPT_CUDA_IN_FLIGHT={VARIANT_IN_FLIGHT}",
                            bench + [f"{{out}}/{VARIANT_JSON}"], "bench-in-flight.log",
                            env={"FASTOPT_CUDA_IN_FLIGHT": str(VARIANT_IN_FLIGHT)})]
        else:
            raise ValueError(f"unknown stage {name!r}; choose from {', '.join(STAGES)}")
        stages.append(Stage(name, cmds, budgets[name]))
    return stages


def _with_out(stages, out_dir):
    for stage in stages:
        for cmd in stage.commands:
            cmd.argv = [a.replace("{out}", out_dir) for a in cmd.argv]
    return stages


def finish_tests(result, out_dir):
    counts = {"tests": 0, "passed": 0, "failures": 0, "errors": 0, "skipped": 0}
    for record in result["commands"]:
        c = parse_junit(os.path.join(out_dir, record.get("junit", ""))) if record.get("junit") else None
        if c is None:
            try:
                with open(os.path.join(out_dir, record["log"]), errors="replace") as f:
                    line = parse_pytest_line(f.read())
            except OSError:
                line = {}
            c = {"passed": line.get("passed", 0), "failures": line.get("failed", 0), "errors": line.get("errors", 0),
                 "skipped": line.get("skipped", 0)}
            c["tests"] = sum(c.values())
            record["counts_from"] = "pytest summary line" if line else "none (no junit file, no summary line)"
        record["counts"] = c
        for key in counts:
            counts[key] += c.get(key, 0)
    result["counts"] = counts
    result["failed"] = counts["failures"] + counts["errors"]


def finish_sanitizer(result, out_dir):
    total = 0
    for record in result["commands"]:
        try:
            with open(os.path.join(out_dir, record["log"]), errors="replace") as f:
                text = f.read()
        except OSError:
            text = ""
        verdict = parse_sanitizer(text)
        record.update(verdict)
        launch = re.findall(r"^launch_all: (\d+) calls on .*: (OK|\d+ FAILED)$", text, re.M)
        record["launch_all"] = launch[-1][1] if launch else "did not finish"
        # no summary (killed, or not started): the records seen so far, and the stage is not ok
        total += verdict["errors"] if verdict["errors"] is not None else verdict["records"]
        if record["status"] == "ok" and not verdict["summary_found"]:
            record["status"] = "failed"
        elif (record["status"] == "failed" and record.get("rc") == 99 and verdict["summary_found"]
              and verdict["errors"] == 0 and verdict["api_probes"] and not verdict["application_failed"]
              and record["launch_all"] == "OK"):
            # --error-exitcode fired on the driver entry-point probes alone (counted apart): no error found
            record["status"] = "ok"
            record["note"] = "exit code 99 from api_probes only"
    result["errors"] = total
    statuses = [r["status"] for r in result["commands"]]
    result["status"] = next((s for s in ("error", "timeout", "failed") if s in statuses), "ok")


def compare_variant(doc, variant_path) -> dict | None:
    """Per case and fastopt-cupy variant: microseconds per step of the record and of the kernel variant's
    run (VARIANT_JSON), and their ratio (> 1: the variant is faster); None without the variant's JSON."""
    try:
        with open(variant_path) as f:
            other = json.load(f)
    except (OSError, ValueError):
        return None
    times = {(r.get("case"), r.get("variant")): r.get("us") for r in other.get("rows", [])}
    out = {}
    for r in doc.get("rows", []):
        key = (r.get("case"), r.get("variant"))
        if not str(key[1]).startswith("fastopt-cupy") or r.get("us") is None or times.get(key) is None:
            continue
        out.setdefault(key[0], {})[key[1]] = {"us": r["us"], "variant_us": times[key],
                                              "speedup": r["us"] / times[key] if times[key] else None}
    return out


def finish_bench(result, out_dir, summary):
    """Copy bench-gpu.json to gpu-<device>.json with the sanitizer and test targets of this summary filled
    in, and extract the Markdown tables from the log."""
    src = os.path.join(out_dir, "bench-gpu.json")
    try:
        with open(src) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        result["json"] = None
        result["json_error"] = f"{type(e).__name__}: {e}"
        return
    targets = doc.setdefault("targets", {})
    sanitizer = summary["stages"].get("sanitizer")
    tests = summary["stages"].get("tests")
    fill = {"compute_sanitizer_errors": sanitizer.get("errors") if sanitizer and sanitizer["status"] != "error"
            else None,
            "gpu_tests_failed": tests.get("failed") if tests and tests["status"] in ("ok", "failed") else None}
    for name, value in fill.items():
        t = targets.setdefault(name, {"target": 0, "rule": "<="})
        t["value"] = value
        t["met"] = None if value is None else value <= t.get("target", 0)
    name = doc.get("device", {}).get("name") or "unknown"
    dst = os.path.join(out_dir, f"gpu-{device_slug(name)}.json")
    tmp = dst + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(tmp, dst)
    result["json"] = os.path.basename(dst)
    result["complete"] = doc.get("complete")
    result["in_flight_variant"] = compare_variant(doc, os.path.join(out_dir, VARIANT_JSON))
    result["targets_met"] = f"{sum(t.get('met') is True for t in targets.values())} of {len(targets)}"
    try:
        with open(os.path.join(out_dir, "bench.log"), errors="replace") as f:
            table = [ln.rstrip("\n") for ln in f if ln.startswith("|") or ln.startswith("Device copy:")]
    except OSError:
        table = []
    if table:
        with open(os.path.join(out_dir, "bench-table.md"), "w") as f:
            f.write("\n".join(table) + "\n")


def archive(out_dir, name) -> str:
    """Every file of out_dir (not the archive itself) in out_dir/name, a gzipped tar; its path."""
    import tarfile

    path = os.path.join(out_dir, name)
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for entry in sorted(os.listdir(out_dir)):
            if entry not in (name, os.path.basename(tmp)):
                tar.add(os.path.join(out_dir, entry), arcname=entry)
    os.replace(tmp, path)
    return path


def load_summary(out_dir):
    try:
        with open(os.path.join(out_dir, "summary.json")) as f:
            summary = json.load(f)
        if isinstance(summary.get("stages"), dict):
            return summary
    except (OSError, ValueError):
        pass
    return {"stages": {}}


def write_summary(out_dir, summary):
    tmp = os.path.join(out_dir, "summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(out_dir, "summary.json"))


def _waves(stages, concurrent):
    """The stages as waves run one after the other, the stages of a wave side by side. The build needs
    no GPU: it runs beside everything (its budget counts from the start). With `concurrent`, the tests
    and the sanitizer share a wave (neither is timed); the benchmark always runs alone, last."""
    gpu = [s for s in stages if s.name != "build"]
    if concurrent:
        waves = [[s for s in gpu if s.name in ("tests", "sanitizer")], [s for s in gpu if s.name == "bench"]]
    else:
        waves = [[s] for s in gpu]
    waves = [w for w in waves if w]
    return [s for s in stages if s.name == "build"], waves


def _finish(stage, result, out_dir, summary):
    if stage.name == "tests":
        finish_tests(result, out_dir)
    elif stage.name == "sanitizer":
        finish_sanitizer(result, out_dir)
    summary["stages"][stage.name] = result
    if stage.name == "bench":
        finish_bench(result, out_dir, summary)
    write_summary(out_dir, summary)  # after every stage: a killed run keeps what it finished


def run(stages, out_dir, log=print, concurrent=False) -> dict:
    """Run the stages, each to its end whatever the others did; the merged summary. The build runs in a
    thread beside the others; with `concurrent` the tests and the sanitizer too (see _waves)."""
    import threading

    summary = load_summary(out_dir)
    summary.update(root=ROOT, python=sys.version.split()[0], started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   concurrent=concurrent)
    t0 = time.monotonic()
    for stage in stages:
        for cmd in stage.commands:  # a file of an earlier call must not pass for this call's
            for stale in filter(None, (cmd.meta.get("junit"), "bench-gpu.json" if stage.name == "bench" else None)):
                if os.path.exists(os.path.join(out_dir, stale)):
                    os.unlink(os.path.join(out_dir, stale))
    results: dict = {}

    def start(stage):
        log(f"gpu_check: stage {stage.name} (budget {stage.budget:.0f} s)")
        thread = threading.Thread(target=lambda: results.__setitem__(stage.name, run_stage(stage, out_dir, log)),
                                  name=f"gpu_check-{stage.name}")
        thread.start()
        return thread

    background, waves = _waves(stages, concurrent)
    behind = [(stage, start(stage)) for stage in background]
    for wave in waves:
        threads = [(stage, start(stage)) for stage in wave]
        for stage, thread in threads:
            thread.join()
            _finish(stage, results[stage.name], out_dir, summary)
    for stage, thread in behind:
        thread.join()
        _finish(stage, results[stage.name], out_dir, summary)
    summary["seconds_this_call"] = round(time.monotonic() - t0, 1)
    write_summary(out_dir, summary)
    return summary


def report(summary, names) -> str:
    lines = ["| stage | status | seconds | details |", "|---|---|---|---|"]
    for name in names:
        s = summary["stages"].get(name)
        if s is None:
            continue
        if name == "tests":
            c = s.get("counts", {})
            detail = f"{c.get('passed', 0)} passed, {c.get('failures', 0)} failed, {c.get('errors', 0)} errors, " \
                     f"{c.get('skipped', 0)} skipped"
        elif name == "sanitizer":
            detail = f"{s.get('errors')} errors: " + ", ".join(
                f"{r.get('tool', r['name'])} {r['status']} {r.get('errors')} ({r.get('launch_all')})"
                for r in s["commands"])
        elif name == "bench":
            detail = f"{s.get('json')}; targets met {s.get('targets_met')}"
        else:
            detail = ", ".join(f"{r['name']} rc={r['rc']}" for r in s["commands"])
        lines.append(f"| {name} | {s['status']} | {s['seconds']} | {detail} |")
    return "\n".join(lines)


def _budgets(text):
    budgets = dict(BUDGETS)
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, _, value = part.partition("=")
        if name not in BUDGETS:
            raise argparse.ArgumentTypeError(f"unknown stage {name!r} in {text!r}; stages: {', '.join(STAGES)}")
        try:
            budgets[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"budget of {name} must be seconds, got {value!r}") from None
        if not budgets[name] > 0:
            raise argparse.ArgumentTypeError(f"budget of {name} must be > 0, got {value!r}")
    return budgets


def _stage_names(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {unknown or text!r}; choose from {', '.join(STAGES)}")
    return [n for n in STAGES if n in names]  # always in pipeline order


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for logs, JSON and summary.json (created)")
    parser.add_argument("--stages", type=_stage_names, default=list(STAGES), help="comma-separated, default all")
    parser.add_argument("--budgets", type=_budgets, default=dict(BUDGETS),
                        help="seconds per stage, e.g. build=480,tests=360 (default build 480, beside the others; "
                             "tests 360, sanitizer 240, bench 240)")
    parser.add_argument("--python", default="python3", help="the interpreter with the GPU packages (default python3)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="pytest-xdist workers for the tests (default 8 when pytest-xdist is installed; 0: serial)")
    parser.add_argument("--test-timeout", type=float, default=300,
                        help="seconds per test with pytest-timeout installed (default 300; 0: none)")
    parser.add_argument("--serial", action="store_true",
                        help="the tests, then the sanitizer (default: side by side; the benchmark always alone)")
    parser.add_argument("--archive", metavar="NAME",
                        help="also pack every file of OUT into OUT/NAME (.tar.gz), for a runner that returns few files")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and their budgets, run nothing")
    args = parser.parse_args(argv)
    out_dir = os.path.abspath(args.out)
    sanitizer = find_sanitizer()
    extra = pytest_options(args.python, args.jobs, args.test_timeout) if "tests" in args.stages else []
    stages = _with_out(plan_stages(args.stages, args.budgets, args.python, sanitizer, extra), out_dir)
    if args.dry_run:
        print(f"in {ROOT} with PYTHONPATH={environment()['PYTHONPATH']}")
        for stage in stages:
            print(f"stage {stage.name} (budget {stage.budget:.0f} s):")
            for cmd in stage.commands:
                print(f"  {' '.join(cmd.argv)}   > {os.path.join(out_dir, cmd.log)}")
        if "sanitizer" in args.stages and sanitizer is None:
            print("note: compute-sanitizer is not on PATH nor in CUDA_HOME/bin or /usr/local/cuda/bin here")
        return 0
    os.makedirs(out_dir, exist_ok=True)
    summary = run(stages, out_dir, concurrent=not args.serial)
    print(report(summary, args.stages))
    print(f"gpu_check: summary in {os.path.join(out_dir, 'summary.json')}")
    if args.archive:
        print(f"gpu_check: archive {archive(out_dir, args.archive)}")
    return 0 if all(summary["stages"][s]["status"] == "ok" for s in args.stages) else 1


if __name__ == "__main__":
    sys.exit(main())
