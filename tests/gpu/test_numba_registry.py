"""The Numba kernels come from the registry: every kernel family of fastopt.specs.REGISTRY has its math
in kernels/numba/math.py (found by name), the per-family kernels are generated for exactly the registry's
families, and the math reads its scalars by name through constants built from spec.scalar_names (no
positions written by hand). No GPU needed: nothing here compiles a kernel."""
from __future__ import annotations

import inspect
import os
import re

import numpy as np
import pytest

pytest.importorskip("numba")

from fastopt import specs  # noqa: E402
from fastopt.kernels.numba import kernels as nk  # noqa: E402
from fastopt.kernels.numba import math as fmath  # noqa: E402

NUMBA_DIR = os.path.dirname(fmath.__file__)
ELEMENTWISE = ("p", "g", "a", "b", "c", "h", "s", "variant")
ELEMENTWISE4 = ("p", "g", "a", "b", "c", "d", "h", "s", "variant")  # a four-state family (Adan)


def _math_names(spec):
    if spec.two_phase:
        return (f"{spec.kernel}_moments_math", f"{spec.kernel}_direction_math")
    return (f"{spec.kernel}_math",)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(specs.REGISTRY))
def test_every_registry_family_has_numba_math(name, dtype):
    spec = specs.REGISTRY[name]
    m = fmath.build(np.dtype(dtype))
    for fn_name in _math_names(spec):
        assert fn_name in m, f"{name}: no {fn_name} in kernels/numba/math.py"
    if not spec.two_phase:
        four = len(spec.states) > 3
        assert (spec.kernel in nk.FOUR_STATE_FAMILIES) == four
        per_tensor = spec.tensor_coefs is not None  # LARS: its tensor's number last
        assert (spec.kernel in nk.PER_TENSOR_FAMILIES) == per_tensor
        assert tuple(inspect.signature(m[f"{spec.kernel}_math"].py_func).parameters) == (
            ELEMENTWISE4 if four else ELEMENTWISE + (("coef",) if per_tensor else ()))
    assert len(spec.states) <= nk.SLOTS


def test_generated_families_are_the_registry_families():
    kernels = {s.kernel for s in specs.kernel_specs() if not s.two_phase}  # weight averaging too
    two_phase = {s.kernel for s in specs.REGISTRY.values() if s.two_phase}
    assert set(nk.FAMILIES) == kernels and set(nk.TWO_PHASE_FAMILIES) == two_phase
    k = nk.build(np.dtype(np.float32), 32, 64)  # generation is lazy: nothing compiles here
    for family in nk.FAMILIES:
        assert k["update"][family] is k["update"][family]
    for family in nk.TWO_PHASE_FAMILIES:
        assert k["moments"][family] is not None and k["apply"][family] is not None
    with pytest.raises(KeyError):
        k["update"]["no-such-family"]


def test_int8_kernels_need_the_quantization_block():
    """The kernel layer takes QUANT_BLOCK from its caller (it imports no Python layer above it): without it, or
    with a thread block that does not divide it, asking for an 8-bit kernel says so."""
    from fastopt.precision import QUANT_BLOCK
    assert nk.build(np.dtype(np.float32), 32, 256, None, QUANT_BLOCK)["update_q8"]["adam"] is not None
    with pytest.raises(ValueError, match="quant_block=None"):
        nk.build(np.dtype(np.float32), 32, 64)["update_q8"]["adam"]
    with pytest.raises(ValueError, match="block size 512 dividing it, got quant_block=256"):
        nk.build(np.dtype(np.float32), 512, 512, None, QUANT_BLOCK)["update_q8"]["adam"]


def test_missing_math_is_a_clear_error():
    with pytest.raises(NotImplementedError, match="adamax_math.*kernels/numba/math.py"):
        nk.math_function({}, "adamax_math")


@pytest.mark.parametrize("name", list(specs.REGISTRY))
def test_scalar_constants_match_spec_scalar_names(name):
    spec = specs.REGISTRY[name]
    assert fmath.SCALAR_NAMES[spec.kernel] == tuple(spec.scalar_names)
    ns = getattr(fmath.H, spec.kernel)
    assert [getattr(ns, s) for s in spec.scalar_names] == list(range(len(spec.scalar_names)))
    # the scalars tuple the launcher builds has one value per name
    hp = {h.name: (0.1 if h.default is specs.REQUIRED else h.default) for h in spec.hypers}
    assert len(spec.scalars(hp, 1, 1.0)) == len(spec.scalar_names)


def _sources():
    for fn in sorted(os.listdir(NUMBA_DIR)):
        if fn.endswith(".py"):
            with open(os.path.join(NUMBA_DIR, fn)) as f:
                yield fn, f.read()


def test_math_reads_scalars_by_name_only():
    used = set()
    for fn, text in _sources():
        positional = re.findall(r"\bh\[\s*\d+\s*\]", text)
        assert not positional, f"kernels/numba/{fn}: scalars read by position: {positional}"
        for family, scalar in re.findall(r"\bH\.(\w+)\.(\w+)", text):
            assert family in fmath.SCALAR_NAMES, f"{fn}: H.{family}: no such kernel family"
            assert scalar in fmath.SCALAR_NAMES[family], f"{fn}: H.{family}.{scalar}: not in its scalar_names"
            used.add(family)
    missing = set(fmath.SCALAR_NAMES) - used
    assert not missing, f"families whose math reads no scalar by name: {missing}"


def test_each_family_math_reads_only_its_own_scalars():
    m = fmath.build(np.dtype(np.float64))
    for spec in specs.REGISTRY.values():
        for fn_name in _math_names(spec):
            text = inspect.getsource(m[fn_name].py_func)
            families = set(re.findall(r"\bH\.(\w+)\.", text))
            assert families <= {spec.kernel}, f"{fn_name} reads the scalars of {families - {spec.kernel}}"


def test_no_family_list_in_the_numba_kernels():
    """Adding a family touches only its math: no hand-written list of families in kernels/numba."""
    fams = set(fmath.SCALAR_NAMES)
    for fn, text in _sources():
        for line in text.splitlines():
            quoted = set(re.findall(r"[\"'](\w+)[\"']", line))
            assert len(quoted & fams) < 2, f"kernels/numba/{fn}: a list of families: {line.strip()}"
