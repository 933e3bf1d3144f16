"""The backend interface: what every module fastopt/backends/<name>_backend.py provides.

A backend is a module (not a class): dispatch.backend_for() returns the module, and the layers above it
(functional.py, clip.py, optim.py) call only the names declared here. `Backend` is what every backend
provides; `HostBackend` and `DeviceBackend` add what only one side has. tests/test_backend_interface.py
checks every backend module against these Protocols (names and parameters, through inspect), the GPU
modules included (they import without a GPU).

Conventions shared by every backend (docs/design.md, "The backend interface"):
- prepare() checks everything and writes nothing; run() writes. An optimizer prepares all its calls,
  checks them against each other with check_disjoint(), then runs them.
- grad_scale is None, a real number, or a 0-d float array (on the device of the arrays for a GPU
  backend: the kernels read it, no host synchronisation). Device backends also take found_inf, a
  one-element bool/uint8 device flag: when set, the kernels return without writing.
- Norms and clipping work on the per-tensor sums of squares `sq` that sumsq_per_tensor() returns (a
  float64 NumPy array on the host, a float64 device array on a GPU): the caller reduces once and passes
  `sq` on, so one reduction serves clipping and the non-finite check. Norms come back as np.float64 on
  the host and as 0-d float64 device arrays on a GPU (never read back).
- The clip coefficient is min(1, max_norm / (norm + 1e-6)), NaN for a NaN norm: on the host in
  host_clip.clip_coefficient (the one Python copy), on a GPU inside the kernels.
- run() and step() also take tensor_coefs=None (after the parameters declared here): for a family whose
  functor reads one number per tensor (spec.tensor_coefs, LARS), host numbers given instead of the norms
  pass (a caller holding pieces of tensors, the sharded optimizer, passes the whole tensors' numbers),
  checked by validate.check_tensor_coefs before anything is written.
A Protocol can declare a parameter a backend's function has in addition (with a default); the test
accepts extra trailing parameters with defaults (e.g. `out=` of a device sumsq_per_tensor).
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

Prepared = Any  # what prepare()/prepare_grads() return (validate.Checked); opaque to the callers
Arrays = Any    # one array or a list of arrays of this backend's kind
Scalar = Any    # np.float64 on the host, a 0-d float64 device array on a GPU

Fixed = Any    # what prepare_fixed() returns; opaque to the callers

__all__ = ["Backend", "HostBackend", "DeviceBackend", "PrepareOnceBackend", "prepares_once", "BACKEND_FUNCTIONS",
           "HOST_FUNCTIONS", "DEVICE_FUNCTIONS", "PREPARE_ONCE_FUNCTIONS", "CapturableBackend", "CAPTURE_FUNCTIONS", "capturable"]


@runtime_checkable
class Backend(Protocol):
    """What every backend module provides."""

    NAME: str
    AVAILABLE: bool

    # --- updates ----------------------------------------------------------------------------------
    def prepare(self, arrays: Sequence[Any], names: Sequence[str], indices: Any = None) -> Prepared:
        """Check the arrays (params, grads, states...) of one update; nothing is written."""

    def check_disjoint(self, prepared: Sequence[Prepared]) -> None:
        """ValueError when prepared calls of one optimizer step share memory one of them writes."""

    def run(self, prepared: Prepared, spec: Any, hp: dict, step: int, grad_scale: Any) -> None:
        """Apply the update of `spec` with hyperparameters `hp` at step `step` to prepared arrays."""

    def step(self, spec: Any, arrays: Sequence[Any], names: Sequence[str], hp: dict, step: int,
             grad_scale: Any) -> None:
        """prepare() then run()."""

    def run_phase1(self, prepared: Prepared, spec: Any, hp: dict, step: int, grad_scale: Any) -> Any:
        """A two-phase update's (spec.two_phase: LAMB) first pass alone: the moments written; a host float64
        array (narrays, 2) of each array's sum p^2 and sum u^2 (u: the update direction). For a caller holding
        pieces of tensors (the sharded optimizer), which adds the sums up per tensor; also takes stochastic=."""

    def run_phase2(self, prepared: Prepared, spec: Any, hp: dict, step: int, grad_scale: Any,
                   scaled_lr: Any) -> None:
        """The second pass alone: p -= scaled_lr[i] * u for array i (host float64: lr times the whole tensor's
        trust ratio, validate.check_scaled_lr before anything is written); also takes stochastic=."""

    # --- in-place operations on gradients ---------------------------------------------------------
    def prepare_grads(self, grads: Arrays, name: str = "grads", indices: Any = None) -> Prepared:
        """Check arrays for an in-place operation (every one writable); nothing written."""

    def sumsq_per_tensor(self, grads: Arrays) -> Any:
        """Per-array sums of squares, float64, in a fixed order (deterministic). grads: arrays, what
        prepare_grads() returned, or (a PrepareOnceBackend) a prepared update from bind_grads(): its grads."""

    def scale_(self, grads: Arrays, coef: Any) -> None:
        """g *= coef in place (coef a float; on a GPU also a 0-d device array)."""

    def clamp_(self, grads: Arrays, clip_value: float) -> None:
        """g = clip(g, -clip_value, clip_value) in place (clip_by_value)."""

    # --- norms and clipping, from the sums of squares ---------------------------------------------
    def global_norm(self, sq: Any) -> Scalar:
        """sqrt(sum(sq))."""

    def clip_coefficient(self, total_norm: Scalar, max_norm: float) -> Scalar:
        """min(1, max_norm / (total_norm + 1e-6)) where the norm lives."""

    def clip_by_norm(self, grads: Arrays, sq: Any, max_norm: float) -> Any:
        """Per array, scale by its clip coefficient, in place; the norms (a list for a list)."""

    def clip_by_global_norm(self, grads: Arrays, sq: Any, max_norm: float) -> Scalar:
        """Scale every array by the clip coefficient of the total norm, in place; the total norm."""


@runtime_checkable
class HostBackend(Backend, Protocol):
    """CPU backends (cython, numpy)."""

    def scale_each_(self, grads: Arrays, coefs: Sequence[float]) -> None:
        """grads[i] *= coefs[i] in place."""


@runtime_checkable
class DeviceBackend(Backend, Protocol):
    """GPU backends (cupy, numba): a device skip flag for updates, and the optimizer's guard."""

    def run(self, prepared: Prepared, spec: Any, hp: dict, step: int, grad_scale: Any,
            found_inf: Any = None) -> None:
        """As Backend.run; the kernels return without writing while the device flag found_inf is set."""

    def step(self, spec: Any, arrays: Sequence[Any], names: Sequence[str], hp: dict, step: int,
             grad_scale: Any, found_inf: Any = None) -> None:
        """prepare() then run()."""

    def run_phase1(self, prepared: Prepared, spec: Any, hp: dict, step: int, grad_scale: Any,
                   found_inf: Any = None) -> Any:
        """As Backend.run_phase1 (the sums come back to the host: one synchronisation)."""

    def run_phase2(self, prepared: Prepared, spec: Any, hp: dict, step: int, grad_scale: Any, scaled_lr: Any,
                   found_inf: Any = None) -> None:
        """As Backend.run_phase2."""

    def sumsq_per_tensor(self, grads: Arrays, out: Any = None) -> Any:
        """As Backend.sumsq_per_tensor, written into `out` (a float64 device array) when given."""

    def device_zeros(self, n: int, dtype: Any, like: Any) -> Any:
        """n zeros of `dtype` on the device (and stream) of `like`."""

    def device_ordinal(self, like: Any) -> int:
        """The CUDA device ordinal of the array `like`."""

    def device_full(self, shape: tuple, fill: float, dtype: Any, like: Any) -> Any:
        """An array of `shape` filled with `fill` on the device of `like`, written on its producer stream
        (how optimizer state for device params is made: fastopt.init_state)."""

    def step_guard(self, sq: Any, max_norm: float | None = None, skip_nonfinite: bool = False,
                   skipped: Any = None) -> tuple:
        """(clip coefficient or None, skip flag or None) in one launch; `skipped` counts skipped steps."""


@runtime_checkable
class PrepareOnceBackend(Protocol):
    """Optional, on top of Backend: check an optimizer's params and states once, and per step only the
    grads (issue 11, host cost). A backend module has both functions or neither; the optimizer asks
    prepares_once(module) once, when it resolves a bucket's backend, and otherwise prepares every call
    every step (prepare + check_disjoint), which stays valid for every backend.

    Contract (backends/validate.py has the reference implementation, the Cython one the compiled twin):
    - prepare_fixed(calls): calls = [(arrays, names, indices), ...], one per kernel call of a step, in
      prepare()'s layout with None for the grads: arrays = (params, None, *states), each a list (or one
      array), None for an unused state slot; names = prepare()'s names, grads included
      (("params", "grads", "exp_avg", ...)); indices = the numbering of the lists in messages. Runs every
      check prepare() runs on those arrays (all of them are written: writable too) and check_disjoint()
      across all calls; writes nothing; raises what prepare() raises. It keeps copies of the lists and a
      snapshot of what it checked, per array: memory (pointer), dtype, shape, contiguity, writability.
    - bind_grads(fixed, grads_per_call) -> [prepared, ...]: one prepared call per entry of calls, each
      what run() takes and what sumsq_per_tensor() accepts (its grads). First the snapshot: every
      array compared with what prepare_fixed saw (objects that are not the backend's own array type, e.g.
      torch tensors, are viewed again since their storage can move), and on any difference the whole
      of prepare_fixed's checks run again (its errors, or a new snapshot). Then the grads: the form and
      count of each list, None, kind, dtype and shape of its param, contiguity, with prepare()'s messages;
      and no grad may share memory with any array of `fixed` (grads may share with each other; the
      message names the grad and the array, the one starting later first, like check_disjoint).
      Writes nothing. The caller re-makes `fixed` when its lists change (a param swapped in a group, a
      state slot added, another backend); identity of the arrays is the caller's business, the state of
      the arrays the backend's.
    """

    def prepare_fixed(self, calls: Sequence[tuple]) -> Fixed:
        """Check the params and states of an optimizer's kernel calls once; nothing written."""

    def bind_grads(self, fixed: Fixed, grads_per_call: Sequence[Any]) -> list:
        """The prepared calls of one step: the snapshot re-checked, the grads checked; nothing written."""


@runtime_checkable
class CapturableBackend(Protocol):
    """Optional, on top of DeviceBackend: an optimizer step that a CUDA graph can capture and replay
    (capturable=True, fastopt/capture.py). The step's scalars (bias corrections, the schedule's lr) are
    precomputed on the host for a range of steps and chosen on the device by a step counter that the step
    itself advances; run() then reads them from the device (scalars_at=, a row of 16 float64) instead of
    taking them by value. The CuPy backend has it (CuPy captures graphs); the Numba one does not."""

    def select_scalars(self, rows: Any, capacity: int, meta: Any, counters: Any, out: Any, flag: Any,
                       own_flag: bool, overflow: Any, like: Any) -> None:
        """One launch (reduce.cu fo_select_scalars) on the stream of `like`: per group, counters += 1 and
        out[group] = its row for that step; past the rows, the flag is set and overflow counted."""

    def upload(self, dst: Any, host: Any, like: Any) -> None:
        """dst[...] = host (a NumPy array) on the stream of `like`; RuntimeError while it is captured."""

    def capturing(self, like: Any) -> bool:
        """Whether the stream the arrays like `like` are updated on is being captured into a graph."""


def prepares_once(backend) -> bool:
    """Whether a backend module implements PrepareOnceBackend (ask once per module: not per step)."""
    return isinstance(backend, PrepareOnceBackend)


def _members(protocol) -> tuple:
    names = []
    for klass in reversed(protocol.__mro__):
        if klass not in (Backend, HostBackend, DeviceBackend, PrepareOnceBackend, CapturableBackend):
            continue
        for name, value in vars(klass).items():
            if callable(value) and not name.startswith("_") and name not in names:
                names.append(name)
    return tuple(names)


BACKEND_FUNCTIONS = _members(Backend)
HOST_FUNCTIONS = _members(HostBackend)
DEVICE_FUNCTIONS = _members(DeviceBackend)
PREPARE_ONCE_FUNCTIONS = _members(PrepareOnceBackend)
CAPTURE_FUNCTIONS = _members(CapturableBackend)


def capturable(backend) -> bool:
    """Whether a backend module implements CapturableBackend."""
    return isinstance(backend, CapturableBackend)
