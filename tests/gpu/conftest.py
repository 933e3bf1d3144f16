"""Fixtures of the GPU tests (tests/gpu): each test that needs a CUDA device through CuPy takes `cp`."""
from __future__ import annotations

import pytest


@pytest.fixture
def cp():
    """The cupy module when CuPy is installed and sees a CUDA device; else the test is skipped (without CuPy:
    importorskip's reason; without a device: "no CUDA GPU (<the error CuPy raised>)")."""
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no device")
    except Exception as e:
        pytest.skip(f"no CUDA GPU ({type(e).__name__})")
    return cupy
