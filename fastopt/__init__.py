"""fastopt: fused, in-place optimizer-update kernels for NumPy and CuPy arrays.

    fastopt.adam_step(p, g, m, v, step=t, lr=1e-3)

updates p, m and v in place in one pass over memory, on the CPU (compiled Cython kernels) or the GPU
(CuPy RawKernels, Numba CUDA), chosen by the arrays' type. Every optimizer is described once in
fastopt.specs.REGISTRY (and the composite ones, lbfgs, muon, adafactor and
sparse_adam, in fastopt.specs.COMPOSITE); see README.md.
"""
from fastopt import functional as _functional, optim as _optim
from fastopt.backends.dispatch import use_backend
from fastopt.clip import clip_by_global_norm, clip_by_norm, clip_by_value, global_norm
from fastopt.averaging import ema_decay, ema_update, swa_update
from fastopt.functional import init_state
from fastopt.specs import COMPOSITE, REGISTRY
from fastopt.optim import Optimizer
# the composite optimizers (specs.COMPOSITE: a step that is not one elementwise pass), one module each
from fastopt.lbfgs import LBFGS
from fastopt.muon import Muon
from fastopt.adafactor import Adafactor
from fastopt.sparse_adam import SparseAdam, sparse_adam_step
from fastopt import schedules
from fastopt.flat import FlatParams, flatten
from fastopt.checkpoint import CheckpointError, load, save

from fastopt._version import __version__


def set_num_threads(n: int) -> None:
    """Threads of the CPU kernels (default: OMP_NUM_THREADS, else all cores): an int in [1, 1024]."""
    from fastopt.backends import cython_backend
    cython_backend.set_num_threads(n)


def get_num_threads() -> int:
    """Threads of the CPU kernels (set_num_threads; 1 without the compiled extension)."""
    from fastopt.backends import cython_backend
    return cython_backend.get_num_threads()


# one <name>_step function and one class per registry entry (fastopt/__init__.pyi shows them to type checkers)
for _spec in REGISTRY.values():
    globals()[_spec.function_name] = getattr(_functional, _spec.function_name)
    globals()[_spec.class_name] = getattr(_optim, _spec.class_name)
del _spec

__all__ = [
    *(spec.function_name for spec in REGISTRY.values()), "init_state",
    "clip_by_value", "clip_by_norm", "global_norm", "clip_by_global_norm",
    "ema_update", "swa_update", "ema_decay",
    "use_backend", "set_num_threads", "get_num_threads", "REGISTRY",
    *(spec.class_name for spec in REGISTRY.values()), "Optimizer",
    *(spec.class_name for spec in COMPOSITE.values()), "sparse_adam_step",
    "schedules", "flatten", "FlatParams", "save", "load", "CheckpointError", "__version__",
]
