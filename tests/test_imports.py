"""The import structure of fastopt: every module imports alone, the static import graph (module-level
and function-level imports) has no cycles, the kernel layer never imports the Python layers above it,
and no module outside optim.py touches the private members of an Optimizer."""
from __future__ import annotations

import ast
import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "fastopt"
# what the kernel layer may use: the leaf modules below it (they import nothing from fastopt): the array
# helpers, and the registry (the bottom of the stack: the Numba kernels read scalar names from the specs)
KERNEL_MAY_IMPORT = {"fastopt.arrays", "fastopt.specs"}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources():
    """fastopt's own modules, and the kernels (installed as fastopt.kernels)."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        out[_module_name(path)] = path
    for path in sorted((ROOT / "kernels").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.pyx")):
        rel = path.relative_to(ROOT / "kernels").with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out[".".join(["fastopt", "kernels"] + parts)] = path
    return out


SOURCES = _sources()


def _package(name: str, path: pathlib.Path) -> str:
    """The package a module's relative imports start from."""
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _from_module(node: ast.ImportFrom, package: str) -> str:
    """The absolute module name of a `from ... import` (relative ones resolved against `package`)."""
    base = node.module or ""
    if node.level:
        anchor = package.split(".")
        base = ".".join(anchor[:len(anchor) - node.level + 1] + ([base] if base else []))
    return base


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """Every fastopt module that `path` imports, anywhere in the file (module level and inside functions)."""
    text = path.read_text()
    found = set()
    if path.suffix == ".pyx":  # Cython: the Python import statements, line by line
        for line in text.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] in ("import", "from") and words[1].startswith("fastopt"):
                found.add(words[1].rstrip(","))
                if words[0] == "from" and len(words) >= 4:
                    found |= {f"{words[1]}.{w.strip(',()')}" for w in words[3:] if w.strip(",()")}
        return {m for m in found if m in SOURCES or m.startswith("fastopt.kernels")}
    tree = ast.parse(text)
    package = _package(name, path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = _from_module(node, package)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from fastopt import functional`
    return {m for m in found if m in SOURCES}


GRAPH = {name: _imports(name, path) - {name} for name, path in SOURCES.items()}


def _with_package_inits(graph):
    """The graph with the package __init__ edges an import runs: `import a.b.c` from outside package a.b first
    runs a/b/__init__.py (from inside a.b it is already running). fastopt/__init__.py, which imports everything
    by design, stays out."""
    out = {}
    for name, deps in graph.items():
        edges = set(deps)
        for dep in deps:
            package = dep.rpartition(".")[0]
            while package not in ("", "fastopt") and not name.startswith(package + ".") and name != package:
                if package in SOURCES:
                    edges.add(package)
                package = package.rpartition(".")[0]
        out[name] = edges - {name}
    return out


@pytest.mark.parametrize("name", sorted(n for n, p in SOURCES.items() if p.suffix == ".py"
                                        and not n.startswith("fastopt.kernels")))
def test_module_imports_alone(name):
    if name.startswith("fastopt.torch") and importlib.util.find_spec("torch") is None:
        pytest.skip("fastopt.torch needs torch")
    r = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, f"import {name} failed alone:\n{r.stderr[-2000:]}"


# imported only where they are used: ml_dtypes takes about 1 s to import (its dtypes' casts registered with
# NumPy), and the CUDA sources import it for their bfloat16 table
HEAVY_ON_USE = ("ml_dtypes", "fastopt.backends.cuda_source", "torch")


def test_float32_cpu_work_imports_nothing_heavy():
    """import fastopt, the CLI's modules, and float32 steps (functional, class, 8-bit state) on NumPy arrays
    load none of HEAVY_ON_USE."""
    code = f"""
import sys
import numpy as np
import fastopt, fastopt.cli, fastopt.checkpoint
p, g = np.zeros(5, np.float32), np.ones(5, np.float32)
fastopt.adam_step(p, g, np.zeros(5, np.float32), np.zeros(5, np.float32), step=1)
fastopt.Adam([p], lr=1e-3).step([g])
fastopt.Adam([p.copy()], lr=1e-3, state_dtype="int8").step([g])
loaded = [m for m in {HEAVY_ON_USE!r} if m in sys.modules]
assert not loaded, loaded
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def _cycles(graph):
    graph = {n: {m for m in deps if m != "fastopt"} for n, deps in graph.items() if n != "fastopt"}
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return "; ".join(" -> ".join(c) for c in cycles)


def test_import_graph_is_acyclic():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles: " + cycles


def test_import_graph_with_package_inits_is_acyclic():
    """A module outside fastopt.torch that imports fastopt.torch.arguments runs fastopt/torch/__init__.py,
    which imports every fastopt.torch class: a cycle when one of them imports that module back."""
    cycles = _cycles(_with_package_inits(GRAPH))
    assert not cycles, "import cycles through package __init__ files: " + cycles


def test_package_init_is_only_imported_by_nothing_inside():
    """No fastopt module imports the package's own __init__ for names (it would make every module
    depend on every other); `from fastopt import x` of a submodule is fine."""
    offenders = []
    for name, path in SOURCES.items():
        if path.suffix != ".py" or name == "fastopt":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "fastopt" and not node.level:
                bad = [a.name for a in node.names if f"fastopt.{a.name}" not in SOURCES]
                if bad:
                    offenders.append(f"{name}: from fastopt import {', '.join(bad)}")
    # existing uses in the top layers (cli, train, benchmarks) read the flat public API
    offenders = [o for o in offenders if not o.startswith(("fastopt.cli", "fastopt.train", "fastopt.benchmark",
                                                            "fastopt.demo", "fastopt.__main__"))]
    assert not offenders, offenders


def test_kernels_do_not_import_upward():
    bad = {n: sorted(m for m in deps if not m.startswith("fastopt.kernels") and m not in KERNEL_MAY_IMPORT)
           for n, deps in GRAPH.items() if n.startswith("fastopt.kernels")}
    bad = {n: d for n, d in bad.items() if d}
    assert not bad, f"the kernel layer imports Python layers above it: {bad}"


def test_leaf_modules_import_nothing_from_fastopt():
    for leaf in KERNEL_MAY_IMPORT:
        assert GRAPH[leaf] == set(), (leaf, GRAPH[leaf])


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_names_of_other_modules():
    """Neither `from fastopt.x import _name` nor `x._name` on an imported fastopt module, except where _name is
    itself a module (the compiled `_cpu_fast`): a helper that two modules share is public where it lives."""
    offenders = []
    for name, path in SOURCES.items():
        if path.suffix != ".py":
            continue
        package = _package(name, path)
        tree = ast.parse(path.read_text())
        modules = {}  # local name -> the fastopt module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                # `import fastopt.x` binds fastopt; `import fastopt.x as y` binds y to fastopt.x
                modules.update({(a.asname or "fastopt"): (a.name if a.asname else "fastopt") for a in node.names
                                if a.name.split(".")[0] == "fastopt"})
            elif isinstance(node, ast.ImportFrom):
                base = _from_module(node, package)
                if not base.startswith("fastopt"):
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    if full in SOURCES:
                        modules[alias.asname or alias.name] = full
                    elif _private(alias.name):
                        offenders.append(f"{name}:{node.lineno}: from {base} import {alias.name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                    and _private(node.attr) and f"{modules[node.value.id]}.{node.attr}" not in SOURCES:
                offenders.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not offenders, "private names of another module used: " + ", ".join(offenders)


def test_no_private_optimizer_access_outside_optim():
    """Outside optim.py, no `<optimizer>._name` access (attribute names that only Optimizer defines)."""
    tree = ast.parse((PKG / "optim.py").read_text())
    private = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name in ("Optimizer", "_Bucket"):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id in (
                        "self", "cls") and _private(sub.attr):
                    private.add(sub.attr)
                if isinstance(sub, (ast.FunctionDef,)) and _private(sub.name):
                    private.add(sub.name)
            for sub in node.body:
                if isinstance(sub, ast.Assign):
                    for t in sub.targets:
                        if isinstance(t, ast.Name) and t.id == "__slots__":
                            pass
    private |= {"states", "indices"}  # bucket internals are private to optim.py too (reached as .states)
    assert {"_buckets", "_group_steps", "_params", "_hp_cache", "_state_options"} <= private
    offenders = []
    for name, path in SOURCES.items():
        if path.suffix != ".py" or name == "fastopt.optim" or name.startswith("fastopt.kernels"):
            continue
        tree = ast.parse(path.read_text())
        # a class of this module may have members of the same names (TorchOptimizer's own _params): `self._x`
        # is an offender only where the module neither assigns nor defines _x (a mixin reaching into Optimizer)
        own = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and isinstance(
            node.ctx, ast.Store)} | {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr in private - {"states", "indices"}):
                continue
            on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if not on_self or node.attr not in own:
                offenders.append(f"{name}:{node.lineno}: .{node.attr}")
    assert not offenders, "private Optimizer members used outside optim.py: " + ", ".join(offenders)
    for mod in ("checkpoint.py", "statedict.py"):
        tree = ast.parse((PKG / mod).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "opt":
                assert not node.attr.startswith("_"), f"{mod}:{node.lineno}: opt.{node.attr}"


# docs/design.md "Layers": each module's layer (the first prefix that matches); imports go to the same layer or
# below. fastopt/__init__.py (the flat public API, above everything) is left out.
LAYERS = [
    ("leaves", ("fastopt._version", "fastopt.arrays", "fastopt.array_types", "fastopt.precision", "fastopt.blas",
                "fastopt.distributed.layout", "fastopt.distributed.comm_base", "fastopt.torch.plan")),
    ("registry", ("fastopt.specs", "fastopt.reference", "fastopt.capture", "fastopt.schedules")),
    ("kernels", ("fastopt.kernels",)),
    ("backends", ("fastopt.backends",)),
    ("API", ("fastopt.functional", "fastopt.clip", "fastopt.flat", "fastopt.averaging", "fastopt.statedict",
             "fastopt.lbfgs", "fastopt.grad_guard")),
    ("classes", ("fastopt.optim", "fastopt.train_eval", "fastopt.adafactor", "fastopt.muon", "fastopt.sparse_adam")),
    ("checkpoints", ("fastopt.checkpoint",)),
    ("front ends", ("fastopt.torch", "fastopt.distributed")),
    ("tools", ("fastopt.cli", "fastopt.train", "fastopt.benchmark", "fastopt.demo", "fastopt.__main__",
               "fastopt._stubs")),
]


def _layer(name: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") or (p.endswith(("cli", "benchmark")) and name.startswith(p))
               for p in prefixes):
            return rank
    raise AssertionError(f"{name} is in no layer of docs/design.md's table (tests/test_imports.py LAYERS)")


def test_layers_import_downward():
    """Every module sits in one row of docs/design.md's layer table and imports only its own row and those
    below it (the kernels may read the leaves and the registry, which sit below them here)."""
    upward = []
    for name, deps in GRAPH.items():
        if name == "fastopt":
            continue
        for dep in deps - {"fastopt"}:
            if _layer(dep) > _layer(name):
                upward.append(f"{name} ({LAYERS[_layer(name)][0]}) -> {dep} ({LAYERS[_layer(dep)][0]})")
    assert not upward, "imports that go up a layer: " + "; ".join(sorted(upward))


def test_design_doc_lists_every_layer():
    text = (ROOT / "docs" / "design.md").read_text()
    for layer, _ in LAYERS:
        assert f"| {layer} |" in text, layer
