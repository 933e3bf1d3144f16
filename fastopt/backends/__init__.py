"""The backends: one module per backend (cython, numpy, cupy, numba), each providing the interface
declared in fastopt.backends.interface; dispatch.backend_for() picks the module for a set of arrays.
See docs/design.md, "The backend interface"."""
from fastopt.backends.interface import Backend, DeviceBackend, HostBackend

__all__ = ["Backend", "HostBackend", "DeviceBackend"]
