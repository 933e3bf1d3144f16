"""The fuzz harness: a case, how one is checked, and the crash-safe subprocess runner.

A `Case` is a description that can be rebuilt anywhere from (table, backend, seed): `build(rng, plain)`
makes fresh inputs (a dict `arrs` of arrays, lists, optimizers), `calls` are the calls under test, each
a function of `arrs`. `run_case` checks the contract of DESIGN.md / README "Bad input":

- expect "error": some call raises; only the exception types in `case.exc` (TypeError/ValueError, or
  CheckpointError for files), a non-empty message naming the argument (`case.names`, any of them), and
  every array and optimizer in `arrs` byte-for-byte as before the call that raised;
- expect "ok": no error, and the result (every array, every optimizer's state, the return values) equal
  bit for bit to the same calls on plain C-contiguous NumPy copies (`build(rng, plain=True)`);
- expect "any": either outcome, but an error must still be an allowed type and leave nothing modified.

The compiled kernels can segfault or hang on bad input, so tables run in a child process
(`python -m fuzz.harness TABLE BACKEND SEED START`) that reports one JSON line per case; the parent
(`run_table`) names the case that was running when the child died or stopped answering, and restarts
the child after it. Reproduce one case with `--case ID` (prints the traceback):

    cd tests && python -m fuzz.harness TABLE BACKEND SEED --case 'ID'
"""
from __future__ import annotations

import json
import numbers
import os
import select
import signal
import subprocess
import sys
import tempfile
import traceback
import zlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

ALLOWED = (TypeError, ValueError)
TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE_TIMEOUT_S = float(os.environ.get("FASTOPT_FUZZ_CASE_TIMEOUT", "20"))  # a hang is reported, not waited out
START_TIMEOUT_S = 120.0  # the child's imports (torch is slow on a cold cache)


@dataclass
class Case:
    id: str
    desc: str                                   # one-line reproduction (what the call looks like)
    build: Callable                             # (rng, plain) -> arrs
    calls: Sequence[Callable]                   # each f(arrs) -> return value
    expect: str = "error"                       # "error" | "ok" | "any"
    exc: tuple = ALLOWED
    names: tuple = ()                           # the error message must contain one of these
    raise_by: int | None = None                 # an expected error must come from calls[0..raise_by]


def case_rng(seed: int, case_id: str):
    return np.random.default_rng([seed, zlib.crc32(case_id.encode())])


# ---------------------------------------------------------------------------------------------------
# Snapshots: a canonical, comparable picture of everything reachable from `arrs`
# ---------------------------------------------------------------------------------------------------

def as_host_array(x):
    """A NumPy view of an array-like (None when x is not one): ndarray subclasses, torch tensors,
    buffer-protocol objects (array.array, memoryview, bytearray)."""
    if isinstance(x, np.ma.MaskedArray):
        return np.ma.getdata(x)
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("torch"):
        return x.detach().numpy()
    if isinstance(x, (str, bytes, int, float, complex, np.generic)) or x is None:
        return None  # NumPy scalars expose a buffer too, but are values, not arrays
    try:
        return np.asarray(memoryview(x))
    except TypeError:
        return None


def _is_optimizer(x):
    """A registry class or a composite one (Muon, Adafactor, SparseAdam: no spec)."""
    return hasattr(x, "state_dict") and hasattr(x, "param_groups") and not isinstance(x, type)


def snapshot(obj) -> list:
    """[(path, value)] with value ('a', dtype, shape, bytes) for arrays and a repr for scalars."""
    out = []

    def arr(path, a):
        a = np.asarray(a)
        out.append((path, ("a", a.dtype.str, tuple(a.shape), a.tobytes())))

    def walk(path, o, depth=0):
        if depth > 8:
            out.append((path, "<deep>"))
            return
        if isinstance(o, np.ma.MaskedArray):
            arr(path + ".data", np.ma.getdata(o))
            arr(path + ".mask", np.ma.getmaskarray(o))
            return
        if _is_optimizer(o):
            walk_optimizer(path, o, depth)
            return
        if isinstance(o, dict):
            for k in sorted(o, key=repr):
                walk(f"{path}[{k!r}]", o[k], depth + 1)
            return
        if isinstance(o, (list, tuple)):
            out.append((path + ".len", len(o)))
            for i, v in enumerate(o):
                walk(f"{path}[{i}]", v, depth + 1)
            return
        h = as_host_array(o)
        if h is not None:
            arr(path, h)
            return
        if isinstance(o, numbers.Real) and not isinstance(o, (bool, np.bool_)):
            # by value: a hyperparameter stored as np.float32(0.5) or 0.5 is the same setting
            try:
                out.append((path, f"real:{float(o)!r}"))
            except OverflowError:
                out.append((path, f"real:{o!r}"))
            return
        if isinstance(o, (bool, int, float, complex, str, bytes, np.generic)) or o is None:
            out.append((path, f"{type(o).__name__}:{o!r}"))
            return
        out.append((path, f"<{type(o).__name__}>"))

    def walk_optimizer(path, opt, depth):
        def safe(name, fn):
            try:
                walk(f"{path}.{name}", fn(), depth + 1)
            except Exception as e:  # noqa: BLE001 - a broken optimizer is part of the picture
                out.append((f"{path}.{name}", f"raised {type(e).__name__}: {e}"))
        safe("params", lambda: opt.params)
        safe("state_dict", opt.state_dict)
        safe("steps", lambda: [opt.steps(i) for i in range(len(opt.param_groups))])
        safe("skipped_steps", lambda: opt.skipped_steps)
        safe("clip_grad_norm", lambda: opt.clip_grad_norm)
        safe("skip_nonfinite", lambda: opt.skip_nonfinite)
        safe("param_groups", lambda: [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
        safe("group_sizes", lambda: [len(g["params"]) for g in opt.param_groups])

    walk("arrs", obj)
    return out


def diff(before, after, limit=3) -> str:
    if before == after:
        return ""
    b, a = dict(before), dict(after)
    changed = [k for k in b if b.get(k) != a.get(k)] + [k for k in a if k not in b]
    return ", ".join(changed[:limit]) + (f" (+{len(changed) - limit} more)" if len(changed) > limit else "")


def to_plain(o):
    """Plain C-contiguous NumPy copies of every array in `o` (lists, tuples and dicts rebuilt)."""
    if isinstance(o, dict):
        return {k: to_plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return type(o)(to_plain(v) for v in o)
    h = as_host_array(o)
    if h is not None:
        return np.array(h, copy=True, order="C")
    return o


# ---------------------------------------------------------------------------------------------------
# Checking one case
# ---------------------------------------------------------------------------------------------------

def _where(e):
    tb = traceback.extract_tb(e.__traceback__)
    if not tb:
        return ""
    f = tb[-1]
    return f" at {os.path.basename(f.filename)}:{f.lineno}"


def _fail(kind, detail):
    return {"kind": kind, "detail": detail[:600]}


def run_case(case: Case, seed: int):
    """None when the case keeps the contract, else {'kind', 'detail'}."""
    rng = case_rng(seed, case.id)
    try:
        arrs = case.build(rng, False)
    except Exception as e:  # noqa: BLE001
        return _fail("setup", f"building the case raised {type(e).__name__}: {e}{_where(e)}")
    rets, err, at = [], None, None
    before = None
    for k, call in enumerate(case.calls):
        before = snapshot(arrs)
        try:
            rets.append(call(arrs))
        except BaseException as e:  # noqa: BLE001 - anything but the allowed types is a finding
            err, at = e, k
            break
    if err is not None:
        name = f"{type(err).__name__}: {err}"
        if not isinstance(err, case.exc):
            return _fail("exception-type", f"raised {name}{_where(err)}")
        if case.expect == "ok":
            return _fail("unexpected-error", f"raised {name}{_where(err)}")
        changed = diff(before, snapshot(arrs))
        if changed:
            return _fail("partial-write", f"raised {name} after modifying {changed}")
        if case.expect == "error" and case.raise_by is not None and at > case.raise_by:
            return _fail("late-error", f"call {case.raise_by} was accepted; call {at} raised {name}")
        msg = str(err).strip()
        if not msg:
            return _fail("message", f"empty message ({type(err).__name__})")
        if case.names and not any(n.lower() in msg.lower() for n in case.names):
            return _fail("message", f"message does not name {' / '.join(case.names)}: {name}")
        return None
    if case.expect == "error":
        return _fail("no-error", f"accepted; returned {rets[-1]!r:.120}")
    if case.expect == "ok":
        try:
            plain = case.build(case_rng(seed, case.id), True)
            prets = [call(plain) for call in case.calls]
        except Exception as e:  # noqa: BLE001
            return _fail("setup", f"the plain-NumPy run raised {type(e).__name__}: {e}{_where(e)}")
        changed = diff(snapshot(plain), snapshot(arrs)) or diff(snapshot(prets), snapshot(rets))
        if changed:
            return _fail("wrong-result", f"differs from the plain-NumPy run in {changed}")
    return None


# ---------------------------------------------------------------------------------------------------
# The child process
# ---------------------------------------------------------------------------------------------------

def _child(argv):
    import faulthandler
    import warnings

    table, backend, seed = argv[0], argv[1], int(argv[2])
    one = argv[4] if len(argv) > 4 and argv[3] == "--case" else None
    start = int(argv[3]) if one is None and len(argv) > 3 else 0
    warnings.simplefilter("ignore")  # overflow warnings of valid-but-extreme values are not findings
    from fuzz import tables
    cases = tables.TABLES[table](backend)
    if one is not None:
        matches = [c for c in cases if c.id == one]
        if not matches:
            sys.exit(f"no case {one!r} in table {table}")
        c = matches[0]
        print(c.desc)
        rng = case_rng(seed, c.id)
        arrs = c.build(rng, False)
        for call in c.calls:
            call(arrs)  # let the traceback show
        print("no error;", run_case(c, seed))
        return
    # protocol on a private copy of stdout; whatever the library prints goes to stderr
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    faulthandler.enable()
    out.write(json.dumps({"total": len(cases)}) + "\n")
    for i in range(start, len(cases)):
        c = cases[i]
        out.write(json.dumps({"start": i, "id": c.id, "desc": c.desc, "expect": c.expect}) + "\n")
        res = run_case(c, seed)
        out.write(json.dumps({"done": i, "fail": res}) + "\n")
    out.write(json.dumps({"end": True}) + "\n")


# ---------------------------------------------------------------------------------------------------
# The parent: run a table, survive crashes and hangs
# ---------------------------------------------------------------------------------------------------

@dataclass
class TableResult:
    total: int = 0
    ran: int = 0
    expected_errors: int = 0
    failures: list = field(default_factory=list)


def run_table(table: str, backend: str, seed: int) -> TableResult:
    res = TableResult()
    start = 0
    retried = set()
    env = dict(os.environ)
    env["PYTHONPATH"] = TESTS_DIR + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("FASTOPT_BACKEND", None)  # the backend is passed per call
    while True:
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen([sys.executable, "-m", "fuzz.harness", table, backend, str(seed), str(start)],
                                    stdout=subprocess.PIPE, stderr=err, env=env, cwd=TESTS_DIR)
            fd = proc.stdout.fileno()
            buf, current, finished, timeout = b"", None, False, START_TIMEOUT_S
            while True:
                if b"\n" not in buf:
                    ready, _, _ = select.select([fd], [], [], timeout)
                    if not ready:  # hang: report the running case, restart after it
                        proc.kill()
                        proc.wait()
                        break
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        proc.wait()
                        break
                    buf += chunk
                    continue
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                timeout = CASE_TIMEOUT_S
                if "total" in msg:
                    res.total = msg["total"]
                elif "start" in msg:
                    current = msg
                elif "done" in msg:
                    res.ran += 1
                    res.expected_errors += current["expect"] != "ok"
                    if msg["fail"]:
                        res.failures.append(dict(id=current["id"], desc=current["desc"], **msg["fail"]))
                    current = None
                elif "end" in msg:
                    finished = True
            proc.stdout.close()
            if finished:
                return res
            err.seek(0)
            tail = err.read().decode(errors="replace").strip().splitlines()[-6:]
            if current is None:  # died outside a case (import error, or no start within START_TIMEOUT_S)
                res.failures.append(dict(id="<child>", desc=f"{table} {backend} from case {start}", kind="child-died",
                                         detail=f"exit {proc.returncode} before running a case: " + " | ".join(tail)))
                return res
            if proc.returncode == -signal.SIGKILL and current["start"] not in retried:
                # a hang is retried once in a fresh child: on a loaded machine a slow case is not a hang
                retried.add(current["start"])
                start = current["start"]
                continue
            res.ran += 1
            res.expected_errors += current["expect"] != "ok"
            if proc.returncode is not None and proc.returncode < 0 and proc.returncode != -signal.SIGKILL:
                kind, detail = "crash", f"killed by {signal.Signals(-proc.returncode).name}"
            elif proc.returncode == -signal.SIGKILL:
                kind, detail = "hang", f"no answer within {CASE_TIMEOUT_S:g} s (killed)"
            else:
                kind, detail = "crash", f"exit {proc.returncode}"
            stack = [t for t in tail if "File" in t][-2:]
            res.failures.append(dict(id=current["id"], desc=current["desc"], kind=kind,
                                     detail=detail + ("; " + " | ".join(stack) if stack else "")))
            start = current["start"] + 1
            if start >= res.total:
                return res


def format_failures(table, backend, seed, failures, limit=60) -> str:
    lines = [f"{len(failures)} case(s) of table {table!r} (backend {backend!r}) break the contract; "
             f"reproduce one with: cd tests && python -m fuzz.harness {table} {backend} {seed} --case 'ID'"]
    by_kind: dict = {}
    for f in failures:
        by_kind.setdefault(f["kind"], []).append(f)
    shown = 0
    for kind, fs in sorted(by_kind.items()):
        lines.append(f"== {kind}: {len(fs)}")
        for f in fs:
            if shown >= limit:
                break
            shown += 1
            lines.append(f"  [{f['id']}] {f['desc']}\n      -> {f['detail']}")
    if shown < len(failures):
        lines.append(f"  ... {len(failures) - shown} more")
    return "\n".join(lines)


if __name__ == "__main__":
    _child(sys.argv[1:])
