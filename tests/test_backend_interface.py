"""Every backend module conforms to the declared interface (fastopt/backends/interface.py): the names,
and each function's parameters (names, order, kinds, defaults) through inspect. The GPU modules are
checked too: they import without a GPU. And clip.py goes through that interface only."""
from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastopt
from fastopt.backends import interface
from fastopt.backends.dispatch import BACKENDS, DEVICE_BACKENDS, HOST_BACKENDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _protocol_for(name):
    return interface.HostBackend if name in HOST_BACKENDS else interface.DeviceBackend


def _declared(protocol, fn_name):
    """The declared signature, without `self`."""
    for klass in protocol.__mro__:
        if fn_name in vars(klass):
            sig = inspect.signature(vars(klass)[fn_name])
            return sig.replace(parameters=list(sig.parameters.values())[1:])
    raise KeyError(fn_name)


def _conforms(declared, actual):
    """The declared parameters, in order, with the same kind and default; extra ones only after them
    and with a default (so every call written against the Protocol works)."""
    want, have = list(declared.parameters.values()), list(actual.parameters.values())
    if len(have) < len(want):
        return f"missing parameters {[p.name for p in want[len(have):]]}"
    for w, h in zip(want, have):
        if (w.name, w.kind, w.default) != (h.name, h.kind, h.default):
            return f"parameter {h.name!r} ({h.kind}, default {h.default!r}) where {w} is declared"
    for h in have[len(want):]:
        if h.default is inspect.Parameter.empty and h.kind not in (h.VAR_POSITIONAL, h.VAR_KEYWORD):
            return f"extra parameter {h.name!r} without a default"
    return None


@pytest.mark.parametrize("name", BACKENDS)
def test_backend_module_conforms(name):
    mod = importlib.import_module(f"fastopt.backends.{name}_backend")
    protocol = _protocol_for(name)
    assert isinstance(mod, protocol), f"{name}: not a {protocol.__name__}"
    assert mod.NAME == name and isinstance(mod.AVAILABLE, bool)
    functions = interface.HOST_FUNCTIONS if name in HOST_BACKENDS else interface.DEVICE_FUNCTIONS
    problems = []
    for fn_name in functions:
        fn = getattr(mod, fn_name, None)
        if not callable(fn):
            problems.append(f"{fn_name}: missing")
            continue
        why = _conforms(_declared(protocol, fn_name), inspect.signature(fn))
        if why:
            problems.append(f"{fn_name}: {why}")
    assert not problems, f"{name}_backend does not conform:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", BACKENDS)
def test_capturable_backends_have_all_of_it_or_none(name):
    """interface.CapturableBackend (capturable=True, fastopt/capture.py): the CuPy backend has every function
    with the declared parameters; the others none (the optimizer then refuses capturable=True)."""
    mod = importlib.import_module(f"fastopt.backends.{name}_backend")
    have = [fn for fn in interface.CAPTURE_FUNCTIONS if callable(getattr(mod, fn, None))]
    assert have == (list(interface.CAPTURE_FUNCTIONS) if name == "cupy" else []), (name, have)
    assert interface.capturable(mod) == (name == "cupy")
    for fn in have:
        assert _conforms(_declared(interface.CapturableBackend, fn), inspect.signature(getattr(mod, fn))) is None, fn


def test_interface_lists_the_shared_operations():
    for fn in ("prepare", "check_disjoint", "run", "step", "prepare_grads", "sumsq_per_tensor", "scale_",
               "clamp_", "global_norm", "clip_coefficient", "clip_by_norm", "clip_by_global_norm"):
        assert fn in interface.BACKEND_FUNCTIONS
    assert set(interface.HOST_FUNCTIONS) - set(interface.BACKEND_FUNCTIONS) == {"scale_each_"}
    assert set(interface.DEVICE_FUNCTIONS) - set(interface.BACKEND_FUNCTIONS) == {"step_guard", "device_zeros", "device_full",
                                                                                  "device_ordinal"}


def test_checker_reports_a_bad_module():
    import types

    bad = types.SimpleNamespace(NAME="x", AVAILABLE=True)
    bad.clip_by_norm = lambda grads, max_norm: None
    assert _conforms(_declared(interface.Backend, "clip_by_norm"), inspect.signature(bad.clip_by_norm))
    assert not isinstance(bad, interface.Backend)


def test_clip_module_does_not_probe_backends_nor_import_cupy():
    src = open(os.path.join(ROOT, "fastopt", "clip.py")).read()
    assert "hasattr" not in src and "import cupy" not in src


def test_host_clip_coefficient_one_formula():
    from fastopt.backends import cython_backend, host_clip, numpy_backend

    assert cython_backend.clip_coefficient is host_clip.clip_coefficient
    assert numpy_backend.clip_coefficient is host_clip.clip_coefficient
    assert fastopt.clip.clip_coefficient(0.5, 1.0) == 1.0
    assert fastopt.clip.clip_coefficient(np.float64(4.0), 1.0) == 1.0 / (4.0 + 1e-6)
    assert np.isnan(fastopt.clip.clip_coefficient(float("nan"), 1.0))


@pytest.mark.parametrize("name", HOST_BACKENDS)
def test_host_backends_clip_through_the_interface(name, rng=np.random.default_rng(0)):
    if name == "cython" and not importlib.import_module("fastopt.backends.cython_backend").AVAILABLE:
        pytest.skip("extension not built")
    g = [rng.standard_normal(n) for n in (3, 100, 7)]
    want = [x.copy() for x in g]
    total = fastopt.clip_by_global_norm(g, 1.0, backend=name)
    ref = np.sqrt(sum(float(np.sum(x * x)) for x in want))
    np.testing.assert_allclose(total, ref, rtol=1e-12)
    coef = min(1.0, 1.0 / (ref + 1e-6))
    for a, b in zip(g, want):
        np.testing.assert_allclose(a, b * coef, rtol=1e-12)


SIM_SCRIPT = textwrap.dedent("""
    import numpy as np
    from numba import cuda
    import fastopt
    from fastopt.backends import numba_backend as nb
    from fastopt.clip import clip_coefficient
    g = [np.arange(1, 5, dtype=np.float64), np.full(3, 2.0)]
    total = np.sqrt(sum(float(np.sum(x * x)) for x in g))
    d = [cuda.to_device(x) for x in g]
    norm = fastopt.global_norm(d)
    assert abs(float(norm.copy_to_host()) - total) < 1e-12 * total
    coef = clip_coefficient(norm, 1.0)
    assert coef.shape == (), coef.shape
    assert float(coef.copy_to_host()) == min(1.0, 1.0 / (float(norm.copy_to_host()) + 1e-6))
    assert float(clip_coefficient(norm, 1e9).copy_to_host()) == 1.0
    nan = cuda.to_device(np.array([np.nan])).reshape(())
    assert np.isnan(float(clip_coefficient(nan, 1.0).copy_to_host()))
    f32 = cuda.to_device(np.array([3.0], dtype=np.float32)).reshape(())
    assert float(clip_coefficient(f32, 1.0).copy_to_host()) == 1.0 / (3.0 + 1e-6)
    total_clip = fastopt.clip_by_global_norm(d, 1.0)
    assert abs(float(total_clip.copy_to_host()) - total) < 1e-12 * total
    fastopt.adam_step(d[0], cuda.to_device(g[0]), cuda.to_device(np.zeros(4)), cuda.to_device(np.zeros(4)),
                      step=1, grad_scale=coef)
    print("INTERFACE SIM OK")
""")


def test_numba_clip_coefficient_on_the_simulator():
    """A Numba norm's clip coefficient is computed by the Numba backend (no CuPy), on the device."""
    pytest.importorskip("numba")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", SIM_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0 and "INTERFACE SIM OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("name", BACKENDS)
def test_prepare_once_is_all_or_nothing_and_conforms(name):
    """PrepareOnceBackend is optional: a module has both of its functions (with the declared
    parameters) or neither; the host backends have it, and prepares_once() says so."""
    mod = importlib.import_module(f"fastopt.backends.{name}_backend")
    have = [fn for fn in interface.PREPARE_ONCE_FUNCTIONS if callable(getattr(mod, fn, None))]
    assert have in ([], list(interface.PREPARE_ONCE_FUNCTIONS)), f"{name}: only {have}"
    assert interface.prepares_once(mod) == bool(have)
    if name in HOST_BACKENDS:
        assert have, f"{name}: the host backends prepare once"
    for fn in have:
        why = _conforms(_declared(interface.PrepareOnceBackend, fn), inspect.signature(getattr(mod, fn)))
        assert not why, f"{name}.{fn}: {why}"


def test_optimizer_asks_prepares_once_not_hasattr():
    """optim.py decides through interface.prepares_once (once per backend resolution), never hasattr."""
    src = open(os.path.join(ROOT, "fastopt", "optim.py")).read()
    assert "prepares_once(" in src and "hasattr(bucket.backend" not in src and 'hasattr(be, "bind' not in src


SR_OFFSET_SCRIPT = textwrap.dedent("""
    import ml_dtypes
    import numpy as np
    from numba import cuda
    import fastopt
    rng = np.random.default_rng()
    p = rng.standard_normal(300).astype(ml_dtypes.bfloat16)
    g = (rng.standard_normal(300) * 1e-3).astype(ml_dtypes.bfloat16)
    for offset in (2 ** 63 - 5, 2 ** 63 + 5, 2 ** 64 - 3):
        host = p.copy()
        fastopt.sgd_step(host, g, lr=0.1, stochastic_rounding=True, seed=7, index_offset=offset)
        d = cuda.to_device(p)
        fastopt.sgd_step(d, cuda.to_device(g), lr=0.1, stochastic_rounding=True, seed=7, index_offset=offset)
        assert d.copy_to_host().view(np.uint16).tolist() == host.view(np.uint16).tolist(), offset
    print("SR OFFSET SIM OK")
""")


def test_numba_stochastic_rounding_takes_every_64_bit_index_offset():
    """index_offset is any count in [0, 2^64): the Numba kernels were given np.int64(offset), an OverflowError from
    2^63 on (the CPU and CuPy take it). The same bits as the CPU's, on the simulator."""
    pytest.importorskip("numba")
    pytest.importorskip("ml_dtypes")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", SR_OFFSET_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0 and "SR OFFSET SIM OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
