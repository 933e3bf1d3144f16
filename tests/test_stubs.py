"""fastopt/__init__.pyi is generated from the registry (python -m fastopt._stubs --write) and stays in
sync with it: regenerated here and compared with the committed file."""
from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys

import fastopt
from fastopt import _stubs
from fastopt.specs import REGISTRY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUB = os.path.join(ROOT, "fastopt", "__init__.pyi")


def _committed():
    with open(STUB, encoding="utf-8") as f:
        return f.read()


def test_stub_matches_the_generated_text():
    assert _committed() == _stubs.init_stub(), \
        "fastopt/__init__.pyi is out of date: run `python -m fastopt._stubs --write`"
    assert _stubs.check() == []


def test_stub_is_python_and_lists_the_registry():
    tree = ast.parse(_committed())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    step_functions = {name for name in functions if name.endswith("_step")}
    assert step_functions == {spec.function_name for spec in REGISTRY.values()}
    assert set(classes) == {spec.class_name for spec in REGISTRY.values()}
    declared = set(functions) | set(classes)
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            declared |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.AnnAssign):
            declared.add(node.target.id)
    assert set(fastopt.__all__) <= declared
    all_node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "__all__")
    assert ast.literal_eval(all_node.value) == list(fastopt.__all__)


def test_stub_classes_have_the_runtime_bases():
    """A type checker sees each class's methods through its bases: the schedule-free classes' eval() and train()
    come from TrainEval, which the stub must name and import."""
    tree = ast.parse(_committed())
    imported = {a.asname or a.name: node.module for node in tree.body if isinstance(node, ast.ImportFrom)
                for a in node.names}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            runtime = getattr(fastopt, node.name).__bases__
            assert [b.id for b in node.bases] == [b.__name__ for b in runtime], node.name
            assert all(imported.get(b.__name__) == b.__module__ for b in runtime), node.name
    assert any("TrainEval" in (b.id for b in node.bases) for node in tree.body if isinstance(node, ast.ClassDef))


def test_stub_signatures_are_the_runtime_ones():
    tree = ast.parse(_committed())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    for spec in REGISTRY.values():
        node = functions[spec.function_name]
        runtime = inspect.signature(getattr(fastopt, spec.function_name))
        names = [a.arg for a in node.args.args] + [a.arg for a in node.args.kwonlyargs]
        assert names == list(runtime.parameters), spec.name
        kwonly = [p.name for p in runtime.parameters.values() if p.kind is p.KEYWORD_ONLY]
        assert [a.arg for a in node.args.kwonlyargs] == kwonly
        for arg in node.args.args + node.args.kwonlyargs:
            assert ast.unparse(arg.annotation) == runtime.parameters[arg.arg].annotation, (spec.name, arg.arg)
        init = next(n for n in next(c for c in tree.body if isinstance(c, ast.ClassDef)
                                    and c.name == spec.class_name).body if isinstance(n, ast.FunctionDef))
        cls_sig = inspect.signature(getattr(fastopt, spec.class_name).__init__)
        assert [a.arg for a in init.args.args + init.args.kwonlyargs] == list(cls_sig.parameters)


def test_generator_command_line():
    proc = subprocess.run([sys.executable, "-m", "fastopt._stubs", "--check"], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "fastopt._stubs"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0 and proc.stdout.strip() == _committed().strip()
