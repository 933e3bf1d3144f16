"""Finding and running the MPI launcher for the distributed tests.

mpi4py and MPI come from PyPI (`pip install .[distributed]`: mpi4py and the mpich wheel, whose mpiexec sits
next to the venv's python). Without them the MPI tests skip and say why, except under CI (environment
variable CI set), where they fail: CI must run them."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
IN_CI = bool(os.environ.get("CI"))


def _missing(msg):
    if IN_CI:
        pytest.fail(msg + "; CI must run the distributed tests (`make test` installs .[distributed])")
    pytest.skip(msg)


def mpiexec() -> list[str]:
    """The launcher command with the option that lets it start more ranks than cores (oversubscribed)."""
    if importlib.util.find_spec("mpi4py") is None:
        _missing("mpi4py is not installed (pip install .[distributed])")
    exe = Path(sys.executable).parent / "mpiexec"
    exe = str(exe) if exe.exists() else shutil.which("mpiexec")
    if exe is None:
        _missing("no mpiexec found (the mpich wheel installs one next to python; pip install .[distributed])")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    if "HYDRA" in version or "mpich" in version.lower():
        return [exe, "-launcher", "fork"]
    if "Open MPI" in version or "OpenRTE" in version:
        return [exe, "--oversubscribe"]
    return [exe]


def run_mpi(n: int, *args, timeout=180, script="mpi_worker.py", check=True):
    """Run `python -m mpi4py <script> args...` on n ranks; fail with its output unless it succeeded
    (check=False: return the CompletedProcess whatever its exit status)."""
    # `script`: a file here, or an absolute path (HERE / an absolute path is that path)
    cmd = mpiexec() + ["-n", str(n), sys.executable, "-m", "mpi4py", str(HERE / script), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s:\n{e.stdout}\n{e.stderr}")
    if not check:
        return r
    if r.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited with {r.returncode}:\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}")
    return r.stdout


def run_torch_ranks(tmp: Path, script: str, scenarios: list[str], world: int = 2, timeout: int = 240,
                    extra: tuple = ()) -> dict:
    """Start `world` processes of `python <script> SCENARIO,... RANK WORLD INIT_FILE OUT *extra` (a
    torch.distributed worker here, file:// rendezvous in tmp) and return {rank: {scenario: "OK" or its
    traceback}}, read from the OUT.<rank> each wrote; fail with a rank's output when one hangs or writes nothing."""
    init, out = tmp / "init", tmp / "result"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, str(HERE / script), ",".join(scenarios), str(r), str(world),
                               str(init), str(out), *extra], env=env, cwd=ROOT, stdout=subprocess.PIPE,
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
