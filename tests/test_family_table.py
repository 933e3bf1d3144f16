"""The kernel family table is the registry: the C++ table (kernels/cuda/families.cuh, included by update.cu
and the CPU loops), the kinds of the compiled CPU module and the CUDA entry names all come from
OptimizerSpec.kernel / .variants, and no hand-written family list is left in the kernel sources."""
from __future__ import annotations

import itertools
import os
import re

import numpy as np
import pytest

from fastopt.backends import cuda_source
from fastopt.specs import REGISTRY, REQUIRED, kernel_specs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = os.path.join(ROOT, "kernels", "cuda")
CPU = os.path.join(ROOT, "kernels", "cpu")


def registry_families():
    out = {}
    for spec in kernel_specs():  # the optimizers, then the other elementwise ops (weight averaging)
        if not spec.two_phase:
            out.setdefault(spec.kernel, tuple(sorted(set(spec.variants))))
    return out


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def _code(text):
    """C/C++/Cython/Python text without comments and docstrings (a mention in prose is not a table)."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'""".*?"""', "", text, flags=re.S)
    return "\n".join(re.sub(r"(//|#(?!\s*(include|define|if|endif|undef|pragma))).*", "", line)
                     for line in text.splitlines())


def test_table_is_the_registry():
    table = cuda_source.family_table()
    assert {f: vs for f, _, vs in table} == registry_families()
    assert [f for f, _, _ in table] == list(registry_families())  # kind = position, in registry order
    assert all(op == f.capitalize() + "Op" for f, op, _ in table)
    assert cuda_source.UPDATE_VARIANTS == registry_families()


def test_generated_header_is_current():
    # setup.py regenerates it on every build; after editing a spec: python -m fastopt.backends.cuda_source --write
    assert _read("kernels", "cuda", cuda_source.FAMILY_HEADER) == cuda_source.family_header(), (
        "kernels/cuda/families.cuh is stale: run python -m fastopt.backends.cuda_source --write")


def test_header_rows_match_the_registry():
    text = cuda_source.family_header()
    rows = re.findall(r"^\s*X\((\d+), (\w+), (\w+), (\d+)\) \\$", text, re.M)
    # a family reading a number per tensor (LARS) has its own entry macro (the multi-tensor entry only)
    entries = re.findall(r"^FO_(?:UPDATE|PER_TENSOR)_ENTRIES\((\d+), (\w+), (\w+), (\d+)\)$", text, re.M)
    assert rows == entries
    per_tensor = re.findall(r"^FO_PER_TENSOR_ENTRIES\(\d+, (\w+), \w+, \d+\)$", text, re.M)
    assert set(per_tensor) == set(cuda_source.per_tensor_families())
    fams = list(registry_families())
    expected = [(str(k), f, f.capitalize() + "Op", str(v)) for k, f in enumerate(fams) for v in registry_families()[f]]
    assert rows == expected
    assert f"#define FASTOPT_FAMILY_COUNT {len(fams)}" in text
    for f in fams:
        assert f'#include "{f}.cuh"' in text
        assert re.search(rf"struct\s+{f.capitalize()}Op\b", _read("kernels", "cuda", f"{f}.cuh")), (
            f"kernels/cuda/{f}.cuh must define the functor {f.capitalize()}Op (see ops.cuh)")


def test_cpu_module_kinds_come_from_the_table():
    _cpu_fast = pytest.importorskip("fastopt.kernels.cpu._cpu_fast")
    fams = registry_families()
    assert _cpu_fast.FAMILY_VARIANTS_BUILT == fams, "rebuild the extension after a registry change"
    assert {k: _cpu_fast.KINDS[k] for k in fams} == {f: i for i, f in enumerate(fams)}
    special = {k: v for k, v in _cpu_fast.KINDS.items() if k not in fams}
    assert set(special) == {"lamb", "touch", "touch_apply"}
    assert min(special.values()) >= len(fams)
    assert len(set(_cpu_fast.KINDS.values())) == len(_cpu_fast.KINDS)


def test_cuda_entry_names_come_from_the_table():
    names = cuda_source.kernel_names()
    per_tensor = cuda_source.per_tensor_families()
    expected = [f"fo_{f}_v{v}" + m for f, vs in registry_families().items() for v in vs
                for m in (("_multi",) if f in per_tensor else ("", "_multi"))]
    assert names[:len(expected)] == expected
    # the 8-bit state entries (state_dtype="int8"): every variant of each family an optimizer runs with int8 state
    from fastopt.precision import INT8_REFUSED
    int8 = {s.kernel for s in REGISTRY.values() if s.states and not s.two_phase and s.name not in INT8_REFUSED}
    assert int8 and not int8 & {"lamb", "asgd", "sfsgd", "sfadamw"} and "adan" in int8  # Adan: four 8-bit states
    q8 = [f"fo_{f}_v{v}_q8" for f, vs in registry_families().items() if f in int8 for v in vs]
    assert set(names[len(expected):]) == set(cuda_source.OTHER_KERNELS) | set(q8)
    int8_key = cuda_source.module_key(np.float32, cuda_source.INT8)
    assert cuda_source.kernel_names(int8_key) == q8 + list(cuda_source.REDUCTION_KERNELS)
    assert cuda_source.kernel_names(np.dtype(np.float32)) == expected + list(cuda_source.OTHER_KERNELS)
    # the NVRTC source carries the table generated from the live registry
    src = cuda_source.kernel_source()
    rows = [line for line in cuda_source.family_header().splitlines()
            if line.startswith(("FO_UPDATE_ENTRIES", "FO_PER_TENSOR_ENTRIES", "FO_INT8_ENTRIES", "    X("))]
    assert rows and all(f"\n{row}\n" in src for row in rows)


def test_no_hand_written_family_list_left():
    sources = {
        "kernels/cuda/update.cu": _code(_read("kernels", "cuda", "update.cu")),
        "kernels/cpu/cpu_loops.hpp": _code(_read("kernels", "cpu", "cpu_loops.hpp")),
        "kernels/cpu/_cpu_fast.pyx": _code(_read("kernels", "cpu", "_cpu_fast.pyx")),
        "fastopt/backends/cuda_source.py": _code(_read("fastopt", "backends", "cuda_source.py")),
    }
    for family in registry_families():
        op = family.capitalize() + "Op"
        for path, text in sources.items():
            for token in (op, f"KIND_{family.upper()}", f'"{family}"', f"{family}_loop", f"{family}.cuh"):
                assert token not in text, f"{path} names the family {family!r} ({token}): derive it from the registry"
            if path.endswith((".cu", ".hpp")):
                assert not re.search(rf"\b{family}\b", text), f"{path} names the family {family!r}"


def _option_sets(spec):
    """Configurations that exercise every flag of a spec (bools toggled, momentum on and off)."""
    base = {h.name: (0.1 if h.default is REQUIRED else h.default) for h in spec.hypers}
    choices = []
    for h in spec.hypers:
        if h.kind == "bool":
            choices.append([(h.name, False), (h.name, True)])
        elif h.name == "momentum":
            choices.append([(h.name, 0.0), (h.name, 0.9)])
    for combo in itertools.product(*choices):
        yield {**base, **dict(combo)}


@pytest.mark.parametrize("spec", REGISTRY.values(), ids=lambda s: s.name)
def test_every_selected_variant_is_compiled(spec):
    seen = {spec.variant(hp, step) for hp in _option_sets(spec) for step in (1, 2, 3, 5, 6, 10, 1000)}
    assert seen <= set(spec.variants), f"{spec.name}: variant() returns {sorted(seen - set(spec.variants))} " \
                                       f"outside spec.variants {spec.variants}"
    if not spec.two_phase:
        assert seen == set(spec.variants), f"{spec.name}: spec.variants lists variants never selected"
