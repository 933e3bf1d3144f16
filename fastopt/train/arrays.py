"""Array-module helpers: the trainer runs on NumPy or CuPy arrays, picked from the inputs' type."""
from __future__ import annotations

import numpy as np


def array_module(x):
    """numpy for NumPy arrays, cupy for CuPy arrays (without importing cupy when it is not in use)."""
    if type(x).__module__.startswith("cupy"):
        import cupy
        return cupy
    return np


def to_numpy(x):
    """A host copy (or the array itself when it already lives on the host)."""
    if type(x).__module__.startswith("cupy"):
        return x.get()
    return np.asarray(x)


class GPUUnavailableError(RuntimeError):
    """Raised for --device gpu on a machine without CuPy or without a CUDA device."""


def device_module(device: str):
    """The array module for 'cpu' or 'gpu'; a clear error when 'gpu' cannot be honoured."""
    if device == "cpu":
        return np
    if device != "gpu":
        raise ValueError(f"Unknown device {device!r}; use 'cpu' or 'gpu'")
    try:
        import cupy
    except ImportError as e:
        raise GPUUnavailableError(
            f"--device gpu: CuPy is not installed ({e}); it needs an NVIDIA GPU with a CUDA 12 driver and "
            "pip install 'fastopt[gpu]' (cupy-cuda12x), or use --device cpu") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, no device
        raise GPUUnavailableError(
            f"--device gpu: no CUDA device found ({str(e).splitlines()[0]}); CuPy is installed but needs an "
            "NVIDIA GPU and its driver (nvidia-smi must list the GPU; a driver for CUDA 12 with cupy-cuda12x), "
            "or use --device cpu") from None
    if count < 1:
        raise GPUUnavailableError("--device gpu: no CUDA device found (CuPy sees 0 devices); it needs an NVIDIA "
                                  "GPU and its driver, or use --device cpu")
    return cupy
