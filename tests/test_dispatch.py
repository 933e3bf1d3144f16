"""Backend choice and in-place updates through other array types."""
from __future__ import annotations

import array
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import fastopt
from fastopt.backends import dispatch


def _sgd(p, **kw):
    fastopt.sgd_step(p, np.ones(p.shape, p.dtype), lr=0.5, **kw)


def test_default_backend_is_cython():
    assert dispatch.backend_for(np.zeros(3)).NAME == "cython"
    assert dispatch.backend_for([]) is None


def test_backend_overrides(monkeypatch):
    assert dispatch.backend_for(np.zeros(3), "numpy").NAME == "numpy"
    with fastopt.use_backend("numpy"):
        assert dispatch.backend_for(np.zeros(3)).NAME == "numpy"
        assert dispatch.backend_for(np.zeros(3), "cython").NAME == "cython"  # per call wins
        with fastopt.use_backend("cython"):
            assert dispatch.backend_for(np.zeros(3)).NAME == "cython"
        assert dispatch.backend_for(np.zeros(3)).NAME == "numpy"
        # a GPU backend chosen for a block leaves host arrays on the host default
        with fastopt.use_backend("numba"):
            assert dispatch.backend_for(np.zeros(3)).NAME == "cython"
    monkeypatch.setenv("FASTOPT_BACKEND", "numpy")
    assert dispatch.backend_for(np.zeros(3)).NAME == "numpy"
    monkeypatch.setenv("FASTOPT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="Invalid backend: 'bogus'"):
        _sgd(np.zeros(3))


def test_numpy_fallback_warns_once(monkeypatch):
    from fastopt.backends import cython_backend
    monkeypatch.setattr(cython_backend, "AVAILABLE", False)
    monkeypatch.setattr(dispatch, "_warned_fallback", False)
    p = np.zeros(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _sgd(p)
        _sgd(p)
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == [
        "fastopt: the compiled CPU extension is not available (build it with `pip install .`); "
        "using the much slower NumPy reference"]
    np.testing.assert_array_equal(p, -np.ones(4))


def test_extension_missing_in_a_fresh_process():
    """Without the compiled module, import works and updates run on the reference (with the warning)."""
    code = (
        "import sys, warnings; sys.modules['fastopt.kernels.cpu._cpu_fast'] = None\n"
        "import numpy as np, fastopt\n"
        "p = np.zeros(3)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    fastopt.sgd_step(p, np.ones(3), lr=2.0)\n"
        "assert p.tolist() == [-2.0] * 3, p\n"
        "assert any('NumPy reference' in str(x.message) for x in w)\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert out.stdout.strip() == "ok", out.stderr


def test_torch_cpu_tensor_updated_in_place():
    torch = pytest.importorskip("torch")
    p = torch.randn(1000)
    g = torch.randn(1000)
    m, v = torch.zeros(1000), torch.zeros(1000)
    expect = p.numpy().copy()
    em, ev = np.zeros(1000, np.float32), np.zeros(1000, np.float32)
    fastopt.adam_step(expect, g.numpy(), em, ev, step=1, lr=0.1)
    ptr = p.data_ptr()
    fastopt.adam_step(p, g, m, v, step=1, lr=0.1)
    assert p.data_ptr() == ptr
    np.testing.assert_array_equal(p.numpy(), expect)
    np.testing.assert_array_equal(v.numpy(), ev)
    # lists of tensors in one call
    ps = [torch.ones(3), torch.ones(5, 2)]
    fastopt.sgd_step(ps, [torch.ones(3), torch.ones(5, 2)], lr=0.25)
    assert all(bool((t == 0.75).all()) for t in ps)


def test_buffer_protocol_objects_updated_in_place():
    p = array.array("d", [1.0, 2.0, 3.0])
    fastopt.sgd_step(p, np.ones(3), lr=0.5)
    assert list(p) == [0.5, 1.5, 2.5]
    raw = bytearray(np.ones(4, np.float32).tobytes())
    view = memoryview(raw).cast("f")
    fastopt.sgd_step(view, np.ones(4, np.float32), lr=1.0)
    assert np.frombuffer(raw, np.float32).tolist() == [0.0] * 4


def test_read_only_buffer_rejected():
    p = memoryview(np.ones(3).tobytes()).cast("d")  # bytes: read-only
    with pytest.raises(ValueError, match="params is read-only"):
        fastopt.sgd_step(p, np.ones(3), lr=0.5)


def test_threads_setting():
    n = fastopt.get_num_threads()
    fastopt.set_num_threads(1)
    assert fastopt.get_num_threads() == 1
    fastopt.set_num_threads(n)
    with pytest.raises(ValueError, match="Invalid num_threads: 0"):
        fastopt.set_num_threads(0)


@pytest.mark.parametrize("bad, error, message", [
    (1025, ValueError, r"Invalid num_threads: 1025 \(an integer in \[1, 1024\]\)"),  # 10**5 threads crashed the process
    (10 ** 9, ValueError, "Invalid num_threads: 1000000000"),
    (2 ** 31, ValueError, "Invalid num_threads: 2147483648"),
    (-1, ValueError, "Invalid num_threads: -1"),
    (1.5, TypeError, r"num_threads must be an integer, got 1.5 \(float\)"),  # was truncated to 1
    # repr: np.float64(3.0) under NumPy 2, 3.0 under NumPy 1
    (np.float64(3.0), TypeError, r"num_threads must be an integer, got (np\.float64\()?3\.0\)? \(float64\)"),
    (True, TypeError, r"got True \(bool\)"),
    (None, TypeError, "got None"),
    ("2", TypeError, "got '2'"),
])
def test_threads_setting_refuses_bad_counts(bad, error, message):
    before = fastopt.get_num_threads()
    with pytest.raises(error, match=message):
        fastopt.set_num_threads(bad)
    assert fastopt.get_num_threads() == before


def test_threads_setting_takes_integers_up_to_the_cap():
    before = fastopt.get_num_threads()
    try:
        fastopt.set_num_threads(np.int64(1))
        assert fastopt.get_num_threads() == 1 and type(fastopt.get_num_threads()) is int
        fastopt.set_num_threads(1024)
        p = np.ones(1000, np.float32)  # a region this wide runs (and exits) without trouble
        fastopt.sgd_step(p, np.ones_like(p), lr=0.5)
        assert (p == 0.5).all()
    finally:
        fastopt.set_num_threads(before)
