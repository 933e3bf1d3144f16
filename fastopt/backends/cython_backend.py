"""The compiled CPU backend: a thin launcher over kernels/cpu/_cpu_fast.pyx, which validates the arrays
and runs one parallel region over all chunks of all arrays."""
from __future__ import annotations

import contextlib
import numbers
import os
import sys

import numpy as np

from fastopt.backends import host_clip, numpy_backend, validate
from fastopt.backends.validate import host_scale, is_quantized
from fastopt.precision import is_bfloat16, quantized_state_assignments, quantizer_arrays
from fastopt.specs import shown

NAME = "cython"

# Why the extension did not load (not built, built for another Python, a missing symbol...): dispatch falls
# back to the numpy backend and its one warning quotes this text.
IMPORT_ERROR: str | None = None
try:
    from fastopt.kernels.cpu import _cpu_fast
except ImportError as e:
    _cpu_fast = None
    IMPORT_ERROR = f"{type(e).__name__}: {e}"
AVAILABLE = _cpu_fast is not None
if AVAILABLE and hasattr(os, "register_at_fork") and hasattr(_cpu_fast, "after_fork_in_child"):
    # a forked child (a DataLoader worker, a fork-started multiprocessing worker) of a process whose kernels ran
    # on several threads runs its kernels on one: libgomp's threads do not survive fork (README, "Threads")
    os.register_at_fork(after_in_child=_cpu_fast.after_fork_in_child)


def _has_int8(arrays) -> bool:
    """Whether a call's states (arrays[2:]) hold 8-bit state (a precision.QuantizedState)."""
    for entry in arrays[2:]:
        for a in entry if isinstance(entry, (list, tuple)) else (entry,):
            if is_quantized(a):
                return True
    return False


class Int8Batch:
    """A prepared call with 8-bit states: checked by backends/validate.py (the NumPy backend's checks and
    messages; the compiled checks do not know QuantizedState), run by _cpu_fast.run_int8, or, bound by an
    optimizer's _cpu_fast.Int8Plan (`bound`), by _cpu_fast.run_int8_bound."""

    __slots__ = ("checked", "bound")

    def __init__(self, checked, bound=None):
        self.checked, self.bound = checked, bound

    def __len__(self):
        return len(self.checked.lists[0])


class Int8Fixed:
    """prepare_fixed's result for calls with 8-bit states: validate.prepare_fixed's, and the compiled step
    path over the same checked arrays (an _cpu_fast.Int8Plan; None where an array is not a plain NumPy
    array: every step then goes through the Python checks)."""

    __slots__ = ("fixed", "plan", "checked")

    def __init__(self, fixed):
        self.fixed = fixed
        self._plan()

    def _plan(self):
        fixed = self.fixed
        self.checked = fixed.checked  # what the plan was built from: validate re-checks into a new list
        self.plan = None
        for _, view, _ in fixed.snapshot:
            arrays = (view.codes, view.absmax) if is_quantized(view) else (view,)
            if not all(type(a) is np.ndarray for a in arrays):
                return
        if not all(src is view for src, view, _ in fixed.snapshot):
            return
        calls = []
        for (arrays, _, _), lists in zip(fixed.calls, fixed.checked):
            states = validate.state_slots(lists)
            if not all(lst is None or all(is_quantized(q) for q in lst) for lst in states):
                return
            calls.append((lists[0], states, validate.comp_slot(lists), isinstance(arrays[0], (list, tuple))))
        self.plan = _cpu_fast.Int8Plan(calls, quantized_state_assignments)

    def bind_grads(self, grads_per_call):
        """validate.bind_grads's result as Int8Batch: by the plan when it accepts the step (everything as
        checked, the grads valid), else by the Python checks (which raise, or accept a case the plan leaves
        to them), after which the plan follows a re-check. The plan has compared every grad with every array
        that any call of the step writes, so its calls' spans are the fixed arrays' only (the grads' would be
        read by nothing: check_disjoint is for calls prepared one by one)."""
        fixed = self.fixed
        if self.plan is not None:
            bound = self.plan.bind(grads_per_call)
            if bound is not None:
                return [Int8Batch(validate.Checked((lists[0], grads) + tuple(lists[2:]), spans), b)
                        for (grads, b), lists, spans in zip(bound, fixed.checked, fixed.spans)]
        calls = validate.bind_grads(fixed, grads_per_call)
        if fixed.checked is not self.checked:
            self._plan()
        return [Int8Batch(c) for c in calls]

    def __len__(self):
        return len(self.fixed)


# OpenMP starts every thread of a region (a stack each): a count past the OS's thread limit kills the process
# (libgomp aborts, or a segfault), and no memory-bound loop gains from more threads than this
MAX_THREADS = 1024


def set_num_threads(n: int) -> None:
    """Threads of the compiled loops' parallel regions: an int in [1, MAX_THREADS], checked with or without
    the extension (nothing to set without it)."""
    if not isinstance(n, numbers.Integral) or isinstance(n, (bool, np.bool_)):
        raise TypeError(f"num_threads must be an integer, got {shown(n)} ({type(n).__name__})")
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"Invalid num_threads: {shown(n)} (an integer in [1, {MAX_THREADS}])")
    if AVAILABLE:
        _cpu_fast.set_num_threads(int(n))


def override_threads(n: int) -> int:
    """From now on the kernels this Python thread calls run on n threads (1 <= n <= MAX_THREADS; 0: the
    process-wide count again); fastopt.set_num_threads's count, and other threads' kernels, are left as they
    are. Returns the previous override, to put back (a forked child keeps one thread: README, "Threads")."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral) or not 0 <= n <= MAX_THREADS:
        raise ValueError(f"Invalid thread override: {shown(n)} (an integer in [0, {MAX_THREADS}])")
    return _cpu_fast.set_thread_override(int(n)) if AVAILABLE else 0


@contextlib.contextmanager
def thread_count(n: int):
    """Within the block, the kernels this Python thread calls run on n threads (override_threads)."""
    previous = override_threads(n)
    try:
        yield
    finally:
        override_threads(previous)


def threads_here() -> int:
    """The threads the kernels called from this Python thread run on: thread_count's, else get_num_threads()."""
    if not AVAILABLE:
        return 1
    return _cpu_fast.get_thread_override() or _cpu_fast.get_num_threads()


def get_num_threads() -> int:
    """Threads of the compiled loops' parallel regions (1 without the extension)."""
    return _cpu_fast.get_num_threads() if AVAILABLE else 1


def prepare(arrays, names, indices=None):
    """Check the arrays of one update (nothing is written); run() applies it."""
    if _has_int8(arrays):
        return Int8Batch(validate.prepare(arrays, names, indices=indices))
    return _cpu_fast.prepare(arrays, names, indices)


def prepare_fixed(calls):
    """Check an optimizer's params and states once (compiled twin of validate.prepare_fixed)."""
    if any(_has_int8(arrays) for arrays, _, _ in calls):
        return Int8Fixed(validate.prepare_fixed(calls))
    return _cpu_fast.prepare_fixed(calls)


def bind_grads(fixed, grads_per_call):
    """The prepared calls of one step (compiled twin of validate.bind_grads)."""
    if isinstance(fixed, Int8Fixed):
        return fixed.bind_grads(grads_per_call)
    return _cpu_fast.bind_grads(fixed, grads_per_call)


def check_disjoint(prepared):
    """ValueError when the prepared calls of one optimizer step share memory that one of them writes."""
    prepared = list(prepared)
    if any(isinstance(c, Int8Batch) for c in prepared):
        if not all(isinstance(c, Int8Batch) for c in prepared):  # one optimizer has one state_dtype
            raise ValueError("check_disjoint: calls with and without 8-bit state in one step")
        validate.check_prepared_disjoint([c.checked for c in prepared])
        return
    _cpu_fast.check_disjoint(prepared)


def check_rounding(prepared, stochastic) -> None:
    """ValueError unless stochastic rounding (a precision.StochasticRounding, or None) fits the call:
    16-bit params, no Kahan compensation."""
    if isinstance(prepared, Int8Batch):
        numpy_backend.check_rounding(prepared.checked, stochastic)
        return
    _cpu_fast.check_rounding(prepared, stochastic is not None)


def _dtype_code(dtype) -> int:
    """cpu_loops.hpp DTYPE_* of a validated param or grad dtype (not by dtype.name: 2 us a read)."""
    return 2 if is_bfloat16(dtype) else {"f": 0, "d": 1, "e": 3}[dtype.char]


_ROUND_KAHAN, _ROUND_STOCHASTIC = 1, 2


def _run_int8(batch, spec, hp, step, grad_scale, stochastic, given_coefs=None):
    """8-bit states: every check before the first write (validate's, the rounding's, the optimizer's
    support), then one parallel region of _cpu_fast.run_int8 over all chunks of all tensors."""
    checked = batch.checked
    check_rounding(batch, stochastic)
    numpy_backend.check_int8(checked, spec)
    if spec.two_phase:
        raise ValueError(f"{spec.function_name}: 8-bit state (state_dtype='int8') is not supported: "
                         f"a two-phase update")
    scalars = spec.scalars(hp, step, host_scale(grad_scale))
    coefs = validate.check_tensor_coefs(spec, given_coefs, len(checked.lists[0]))
    if spec.tensor_coefs is not None and coefs is None:  # the norms pass (reads p and g), before any write
        coefs = _tensor_coefs(spec, hp, grad_scale, _cpu_fast.sumsq_per_tensor(checked.lists[0]),
                              _cpu_fast.sumsq_per_tensor(checked.lists[1]), [p.ndim for p in checked.lists[0]])
    params, grads = checked.lists[:2]
    comps = validate.comp_slot(checked.lists)
    if not params:
        return
    layout = _dtype_code(params[0].dtype) | (_dtype_code(grads[0].dtype) << 2)
    if comps is not None:
        layout |= _ROUND_KAHAN << 6
    elif stochastic is not None:
        layout |= _ROUND_STOCHASTIC << 6
    key, offset = (0, 0) if stochastic is None else (stochastic.key, stochastic.index_offset)
    maps, mids, buckets = quantizer_arrays()
    if batch.bound is not None:  # an optimizer's step: the tables built once (Int8Plan), no per-tensor Python
        _cpu_fast.run_int8_bound(batch.bound, spec.kernel, spec.variant(hp, step), layout, scalars, maps, mids,
                                 buckets, key, offset, tensor_coefs=coefs)
        return
    states = validate.state_slots(checked.lists)
    for lst in states:
        if lst is not None and not all(is_quantized(q) for q in lst):
            raise ValueError("8-bit state: all states of a call are QuantizedState or none")  # validate ensures it
    tensors = []  # _cpu_fast.run_int8's (p, g, codes0-2, comp, codes3, absmax0-3, signed0-3)
    for i in range(len(params)):
        qs = [None if lst is None else lst[i] for lst in states]
        codes = tuple(None if q is None else q.codes for q in qs)
        tensors.append((params[i], grads[i]) + codes[:3] + (None if comps is None else comps[i],) + codes[3:] +
                       tuple(None if q is None else q.absmax for q in qs) +
                       tuple(bool(q is not None and q.signed) for q in qs))
    _cpu_fast.run_int8(spec.kernel, spec.variant(hp, step), layout, tensors, scalars, maps, mids, buckets, key, offset,
                       tensor_coefs=coefs)


def _tensor_coefs(spec, hp, grad_scale, param_sumsq, grad_sumsq, ndims):
    """spec.tensor_coefs of one call (LARS's trust ratios) from its per-tensor sums of squares."""
    return spec.tensor_coefs(hp, host_scale(grad_scale), param_sumsq, grad_sumsq, ndims)


def run(prepared, spec, hp, step, grad_scale, stochastic=None, tensor_coefs=None):
    """The update in place; the new 16-bit params stored to nearest even, with the call's Kahan
    compensation (arrays[5]), or stochastically (`stochastic`: a precision.StochasticRounding).
    tensor_coefs: given per-tensor coefficients (validate.check_tensor_coefs) instead of the norms pass."""
    if isinstance(prepared, Int8Batch):
        _run_int8(prepared, spec, hp, step, grad_scale, stochastic, tensor_coefs)
        return
    scalars = spec.scalars(hp, step, host_scale(grad_scale))
    coefs = validate.check_tensor_coefs(spec, tensor_coefs, len(prepared))
    if spec.tensor_coefs is not None and coefs is None:  # the norms pass (reads p and g; run checks first)
        coefs = _tensor_coefs(spec, hp, grad_scale, _cpu_fast.sumsq_per_tensor(prepared, params=True),
                              _cpu_fast.sumsq_per_tensor(prepared), _cpu_fast.param_ndims(prepared))
    if stochastic is None:
        _cpu_fast.run(prepared, spec.kernel, spec.variant(hp, step), scalars, hp["lr"], tensor_coefs=coefs)
    else:
        _cpu_fast.run(prepared, spec.kernel, spec.variant(hp, step), scalars, hp["lr"], True, stochastic.key,
                      stochastic.index_offset, tensor_coefs=coefs)


def _two_phase(prepared, spec, entry):
    if isinstance(prepared, Int8Batch):  # refused for every two-phase family (8-bit state), before any write
        numpy_backend.check_int8(prepared.checked, spec)
        raise ValueError(f"{spec.function_name}: 8-bit state (state_dtype='int8') is not supported: "
                         f"a two-phase update")
    if not spec.two_phase:
        raise ValueError(f"{entry}: {spec.function_name} is not a two-phase update (only spec.two_phase: LAMB)")


def run_phase1(prepared, spec, hp, step, grad_scale, stochastic=None):
    """A two-phase update's first pass (_cpu_fast.run_phase1: the moments written); float64 (narrays, 2): sum
    p^2 and sum u^2 of each array, summed as run() sums them. A caller holding pieces of tensors adds them up
    per tensor, computes lr x trust ratio per tensor and calls run_phase2."""
    _two_phase(prepared, spec, "run_phase1")
    scalars = spec.scalars(hp, step, host_scale(grad_scale))
    return _cpu_fast.run_phase1(prepared, spec.kernel, spec.variant(hp, step), scalars, stochastic is not None)


def run_phase2(prepared, spec, hp, step, grad_scale, scaled_lr, stochastic=None):
    """A two-phase update's second pass (_cpu_fast.run_phase2) with scaled_lr[i] (lr times the whole tensor's
    trust ratio) for array i; rounding as run(). scaled_lr checked before anything is written."""
    _two_phase(prepared, spec, "run_phase2")
    scalars = spec.scalars(hp, step, host_scale(grad_scale))
    lrs = validate.check_scaled_lr(scaled_lr, len(prepared))
    if stochastic is None:
        _cpu_fast.run_phase2(prepared, spec.kernel, scalars, lrs)
    else:
        _cpu_fast.run_phase2(prepared, spec.kernel, scalars, lrs, True, stochastic.key, stochastic.index_offset)


def step(spec, arrays, names, hp, step, grad_scale, stochastic=None, tensor_coefs=None):
    if _has_int8(arrays) or spec.tensor_coefs is not None:  # prepared first: the norms read the checked arrays
        run(prepare(arrays, names), spec, hp, step, grad_scale, stochastic, tensor_coefs)
        return
    validate.check_tensor_coefs(spec, tensor_coefs, 0)  # given for a family that reads none: the error
    scalars = spec.scalars(hp, step, host_scale(grad_scale))
    if stochastic is None:
        _cpu_fast.update(spec.kernel, spec.variant(hp, step), arrays, names, scalars, hp["lr"])
    else:
        _cpu_fast.update(spec.kernel, spec.variant(hp, step), arrays, names, scalars, hp["lr"], True,
                         stochastic.key, stochastic.index_offset)


def sumsq_per_tensor(grads):
    if isinstance(grads, Int8Batch):  # a prepared call's grads (checked already)
        grads = grads.checked.lists[1]
    return _cpu_fast.sumsq_per_tensor(grads)


def prepare_grads(grads, name="grads", indices=None):
    """Check arrays for an in-place operation (nothing written); the functions below take the result."""
    return _cpu_fast.prepare_grads(grads, name, indices)


def scale_(grads, coef):
    _cpu_fast.scale_(grads, coef)


def scale_each_(grads, coefs):
    _cpu_fast.scale_each_(grads, coefs)


def clamp_(grads, clip_value):
    _cpu_fast.clamp_(grads, clip_value)


# Norms and clipping from the sums of squares: written once for both host backends (host_clip.py)
global_norm, clip_coefficient = host_clip.global_norm, host_clip.clip_coefficient
clip_by_norm, clip_by_global_norm = host_clip.clip_functions(sys.modules[__name__])
