"""Array checks for the backends written in Python (numpy, cupy, numba); the Cython backend runs the
same checks, with the same messages, in compiled code (kernels/cpu/_cpu_fast.pyx). Every check runs
before the first write, so an error leaves every array unchanged.

A kernel call is checked in one go (`check_arrays`), which also returns the memory spans of its
arrays: an optimizer with several calls per step (groups, dtypes) checks the spans of all of them
against each other (`check_disjoint`) before the first call writes anything.

An optimizer's params and states stay the same from step to step: `prepare_fixed` checks them once (all
calls, and against each other) and keeps a snapshot of what it checked; `bind_grads` re-checks the
snapshot and checks only the grads each step (see both for the contract).
"""
from __future__ import annotations

import bisect
import numbers
import operator

import numpy as np

from fastopt.arrays import as_numpy
from fastopt.precision import QuantizedState, is_16bit, is_bfloat16, quant_blocks, signed_state
from fastopt.specs import as_float

HOST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16))  # and ml_dtypes' bfloat16
F32 = np.dtype(np.float32)


class HostArrays:
    """How the checks look at host arrays: converted to NumPy (zero copy); the GPU backends pass their
    own class with the same members (fastopt/backends/device_arrays.py)."""

    dtypes = HOST_DTYPES
    dtypes_text = "float32, float64, float16 or bfloat16"  # as the compiled checks say it (_cpu_fast.DTYPES_TEXT)
    where = "on the CPU"

    @staticmethod
    def accepts(dtype):
        """A dtype the CPU kernels update (native byte order)."""
        return dtype in HOST_DTYPES or (is_bfloat16(dtype) and dtype.isnative)

    @staticmethod
    def convert(obj, name):
        return as_numpy(obj, name)  # (a masked array refused there: the kernels would ignore the mask)

    @staticmethod
    def pointer(a):
        return a.__array_interface__["data"][0]

    @staticmethod
    def c_contiguous(a):
        return a.flags.c_contiguous

    @staticmethod
    def writeable(a):
        return a.flags.writeable

    @staticmethod
    def state_dtype(param_dtype):
        """The dtype a state array of a `param_dtype` param must have: float32 for 16-bit params (their
        math is float32; 16-bit moments would underflow), the param's own otherwise."""
        return F32 if is_16bit(param_dtype) else param_dtype

    @staticmethod
    def state_ok(param_dtype, dtype):
        """A dtype a state array of a `param_dtype` param may have (state_dtype=, README "Precision"):
        float64 for float64 params; float32, bfloat16 or float16 for float32 params; float32 or their own
        dtype for 16-bit params. The states of one call share one (check_arrays)."""
        if param_dtype == np.float64:
            return dtype == param_dtype
        if dtype == F32:
            return True
        if param_dtype == F32:
            return is_16bit(dtype) and dtype.isnative
        return dtype == param_dtype

    @staticmethod
    def states_text(param_dtype):
        """The state dtypes of state_ok, in words (as _cpu_fast says them)."""
        if param_dtype == F32:
            return "float32, bfloat16 or float16"
        return f"float32 or {param_dtype}"

    @staticmethod
    def grad_dtypes(param_dtype):
        """The dtypes a grad of a `param_dtype` param may have: its own, and float32 for 16-bit params."""
        return (param_dtype, F32) if is_16bit(param_dtype) else (param_dtype,)


def dtype_text(dtype) -> str:
    """float32, or >f4 where the byte order is what is wrong."""
    return str(dtype) if dtype.isnative else dtype.str


def _check_grad_dtype(api, a, p, name, param_label, grad_label):
    """A grad's dtype against its param's: the same, or float32 for a 16-bit param (the host kernels;
    grad_dtypes of the api)."""
    allowed = api.grad_dtypes(p.dtype) if hasattr(api, "grad_dtypes") else (p.dtype,)
    if a.dtype not in allowed:
        if len(allowed) > 1:
            raise TypeError(f"{grad_label} has dtype {dtype_text(a.dtype)}, expected {p.dtype} or float32 "
                            f"(the dtype of {param_label}, or float32)")
        raise TypeError(f"{grad_label} has dtype {dtype_text(a.dtype)}, expected {p.dtype} "
                        f"(the dtype of {param_label})")


def _check_grads_alike(a, first, grad_label, first_label):
    """The grads of one call share one dtype: first = (dtype of the first grad) or None. Returns it."""
    if first is not None and a.dtype != first:
        raise TypeError(f"{grad_label} has dtype {a.dtype} but {first_label} has {first}: "
                        f"the grads of one call have one dtype")
    return a.dtype if first is None else first


COMP = 5  # the slot of the Kahan compensation (kahan=True): arrays = (params, grads, s0, s1, s2, kahan_comp, s3)
S3 = 6  # the slot of a fourth state (Adan's), after the compensation


def state_slots(lists) -> list:
    """A call's states s0-s3 (its slots 2-4 and S3), None for each one it lacks: what every launcher carries
    in four state columns."""
    n = len(lists)
    return [lists[2] if n > 2 else None, lists[3] if n > 3 else None, lists[4] if n > 4 else None,
            lists[S3] if n > S3 else None]


def comp_slot(lists):
    """A call's Kahan compensations (slot COMP), or None."""
    return lists[COMP] if len(lists) > COMP else None


def _check_comp(a, p, comp_label, param_label):
    """The Kahan compensation of a 16-bit param: the param's dtype."""
    if not is_16bit(p.dtype):
        raise TypeError(f"{comp_label}: a Kahan compensation (kahan=True) is for float16 or bfloat16 params, but "
                        f"{param_label} has dtype {p.dtype}")
    if a.dtype != p.dtype:
        raise TypeError(f"{comp_label} has dtype {dtype_text(a.dtype)}, expected {p.dtype} (the Kahan compensation "
                        f"has the dtype of {param_label})")


def _check_state_dtype(api, a, p, state_label, param_label, first):
    """A state's dtype: one the params allow (api.state_ok; the device backends' api names one,
    state_dtype), and that of the call's first state `first` = (dtype, label) when there was one.
    Returns the call's first state."""
    if first is not None:
        if a.dtype != first[0]:
            raise TypeError(f"{state_label} has dtype {dtype_text(a.dtype)}, expected {first[0]} (the dtype of "
                            f"{first[1]}: the states of one call have one dtype)")
        return first
    if hasattr(api, "state_ok"):
        if not api.state_ok(p.dtype, a.dtype):
            if p.dtype == np.float64:
                raise TypeError(f"{state_label} has dtype {dtype_text(a.dtype)}, expected {p.dtype} "
                                f"(the dtype of {param_label})")
            text = api.states_text(p.dtype)
            raise TypeError(f"{state_label} has dtype {dtype_text(a.dtype)}, expected {text} (the state of "
                            f"{param_label}, a {p.dtype} param; see fastopt.init_state's state_dtype)")
    else:
        expected = api.state_dtype(p.dtype)
        if a.dtype != expected:
            why = (f"the dtype of {param_label}" if expected == p.dtype else
                   f"{p.dtype} params keep {expected} state; see fastopt.init_state")
            raise TypeError(f"{state_label} has dtype {dtype_text(a.dtype)}, expected {expected} ({why})")
    return a.dtype, state_label


U8 = np.dtype(np.uint8)
INT8 = "int8"  # what a quantized state's dtype reads as in the one-dtype-per-call check


def _check_quantized(api, q, p, name, state_label, param_label, read_only):
    """A QuantizedState (state_dtype="int8") of param p: arrays of the api's kind (host arrays; device arrays
    where the api takes 8-bit state: api.quantized_states, the CuPy backend); p float32, float16 or bfloat16;
    codes uint8 of p's shape, absmax float32, 1-D, ceil(p.size / 256) long; both C-contiguous and
    writeable; the map (signed) the state's name takes (precision.signed_state). Returns the state with
    its arrays as the api's views (the same object when they already are) and the spans of both."""
    if api is not HostArrays and not getattr(api, "quantized_states", False):
        raise TypeError(f"{state_label}: 8-bit state (a QuantizedState, state_dtype='int8') is implemented for "
                        f"host (CPU) arrays and CuPy arrays (the cupy backend); this backend's kernels do not "
                        f"take it")
    if not (p.dtype == F32 or is_16bit(p.dtype)):
        raise TypeError(f"{state_label}: 8-bit state (state_dtype='int8') is for float32, float16 or bfloat16 "
                        f"params, but {param_label} has dtype {dtype_text(p.dtype)}")
    codes = api.convert(q.codes, f"{state_label}.codes")
    absmax = api.convert(q.absmax, f"{state_label}.absmax")
    if codes.dtype != U8:
        raise TypeError(f"{state_label}.codes has dtype {dtype_text(codes.dtype)}, expected uint8")
    if tuple(codes.shape) != tuple(p.shape):
        raise ValueError(f"{state_label}.codes has shape {tuple(codes.shape)}, expected {tuple(p.shape)} (the shape "
                         f"of {param_label})")
    if absmax.dtype != F32:
        raise TypeError(f"{state_label}.absmax has dtype {dtype_text(absmax.dtype)}, expected float32")
    blocks = quant_blocks(p.size)
    if len(absmax.shape) != 1 or absmax.shape[0] != blocks:
        raise ValueError(f"{state_label}.absmax has shape {tuple(absmax.shape)}, expected ({blocks},) (one scale "
                         f"per block of 256 elements of {param_label}, {p.size} elements)")
    signed = signed_state(name)
    if q.signed != signed:
        raise ValueError(f"{state_label} is quantized with the {'signed' if q.signed else 'unsigned'} map, expected "
                         f"the {'signed' if signed else 'unsigned'} one ({name} "
                         f"{'may be negative' if signed else 'is never negative'})")
    spans = []
    for part, a in ((".codes", codes), (".absmax", absmax)):
        _check_device(api, a, p, state_label + part, param_label)
        if not api.c_contiguous(a):
            raise ValueError(f"{state_label}{part} is not C-contiguous")
        if not read_only and not api.writeable(a):
            raise ValueError(f"{state_label}{part} is read-only")
        if a.size:
            start = api.pointer(a)
            spans.append((start, start + a.nbytes, not read_only, name + part, None))
    if codes is not q.codes or absmax is not q.absmax:
        q = QuantizedState(codes, absmax, q.signed)
    return q, spans


def _check_device(api, a, p, array_label, param_label) -> None:
    """Device arrays (api.device, the GPU backends): `a` on p's device. One call launches on one device; a
    kernel there reading another GPU's memory faults or, with peer access, reads across the link. An empty
    array has no memory to be anywhere."""
    device = getattr(api, "device", None)
    if device is not None and a.size and p.size and device(a) != device(p):
        raise ValueError(f"{array_label} is on device {device(a)} but {param_label} is on device {device(p)}: one "
                         f"call runs on one GPU")


def is_quantized(a) -> bool:
    """A state entry stored in 8 bits (precision.QuantizedState)."""
    return isinstance(a, QuantizedState)


def label(name, index):
    """How an error message names one array: "grads[3]" in a list, "grads" alone."""
    return name if index is None else f"{name}[{index}]"


def check_arrays(arrays, names, api=HostArrays, read_only_slot=1, indices=None, grads_later=False):
    """arrays = (params, grads, state0, ...), each one array or a list; None only for an unused state
    slot (entries 2 and up; grads_later: the grads too, which bind_grads adds). indices: how messages
    number the arrays of a list (default 0, 1, ...; an optimizer passes each param's position in its own
    order).
    Returns (lists, spans): every entry as a list of backend arrays (None kept), and the memory span
    (start, end, written, name, index) of every non-empty array. Entry read_only_slot is only read
    (grads of an update: 1); -1 when every entry is written."""
    first = arrays[0]
    is_list = isinstance(first, (list, tuple))
    lists = []
    for k, entry in enumerate(arrays):
        if entry is None:
            if k == 0 or (k == 1 and not grads_later):  # params and grads are never optional
                raise TypeError(f"{names[k]} must be {'a list of arrays' if is_list else 'an array'}, got None")
            lists.append(None)
            continue
        if isinstance(entry, (list, tuple)) != is_list:
            raise TypeError(f"{names[k]} must be {'a list of arrays' if is_list else 'one array'}, like {names[0]}; "
                            f"got {type(entry).__name__}")
        if is_list:
            if len(entry) != len(first):
                raise ValueError(f"{names[k]} has {len(entry)} arrays but {names[0]} has {len(first)}")
            lists.append(list(entry))
        else:
            lists.append([entry])
    n = len(lists[0])
    if indices is None:
        indices = range(n) if is_list else (None,)
    ref_dtype = first_grad = first_state = ref_param = None
    spans = []
    for i in range(n):
        p = None
        index = indices[i]
        for k, lst in enumerate(lists):
            if lst is None:
                continue
            name = names[k]
            obj = lst[i]
            if obj is None:
                raise TypeError(f"{label(name, index)} must be an array, got None")
            if k >= 2 and k != COMP and (isinstance(obj, QuantizedState) or
                                         (first_state is not None and first_state[0] == INT8)):
                if not isinstance(obj, QuantizedState):
                    raise TypeError(f"{label(name, index)} is a {type(obj).__name__}, expected a QuantizedState (as "
                                    f"{first_state[1]}: the states of one call are all 8-bit or none)")
                if first_state is not None and first_state[0] != INT8:
                    raise TypeError(f"{label(name, index)} is a QuantizedState, expected an array of dtype "
                                    f"{first_state[0]} (as {first_state[1]}: the states of one call are all "
                                    f"8-bit or none)")
                q, q_spans = _check_quantized(api, obj, p, name, label(name, index), label(names[0], index),
                                              k == read_only_slot)
                lst[i] = q
                first_state = first_state or (INT8, label(name, index))
                spans.extend((s0, s1, w, nm, index) for s0, s1, w, nm, _ in q_spans)
                continue
            a = api.convert(obj, label(name, index))
            lst[i] = a
            if k == 0:
                p = a
                if ref_param is None and a.size:
                    ref_param = (a, label(name, index))  # the device of the call: its first non-empty param's
                elif ref_param is not None:
                    _check_device(api, a, ref_param[0], label(name, index), ref_param[1])
                if not (api.accepts(a.dtype) if hasattr(api, "accepts") else a.dtype in api.dtypes):
                    text = getattr(api, "dtypes_text", None) or " or ".join(str(d) for d in api.dtypes)
                    raise TypeError(f"{label(name, index)} has dtype {dtype_text(a.dtype)}; "
                                    f"fastopt updates {text} arrays (native byte order) {api.where}")
                if ref_dtype is None:
                    ref_dtype = a.dtype
                elif a.dtype != ref_dtype:
                    raise TypeError(f"{label(name, index)} has dtype {a.dtype} but {label(names[0], indices[0])} "
                                    f"has {ref_dtype}: one call updates one dtype (group the arrays by dtype)")
            else:
                _check_device(api, a, p, label(name, index), label(names[0], index))
                if k == 1:
                    _check_grad_dtype(api, a, p, name, label(names[0], index), label(name, index))
                elif k == COMP:
                    _check_comp(a, p, label(name, index), label(names[0], index))
                else:
                    first_state = _check_state_dtype(api, a, p, label(name, index), label(names[0], index),
                                                     first_state)
                if tuple(a.shape) != tuple(p.shape):
                    raise ValueError(f"{label(name, index)} has shape {tuple(a.shape)}, expected {tuple(p.shape)} "
                                     f"(the shape of {label(names[0], index)})")
                if k == 1:
                    first_grad = _check_grads_alike(a, first_grad, label(name, index), label(name, indices[0]))
            if not api.c_contiguous(a):
                raise ValueError(f"{label(name, index)} is not C-contiguous")
            written = k != read_only_slot
            if written and not api.writeable(a):
                raise ValueError(f"{label(name, index)} is read-only")
            if a.size:
                start = api.pointer(a)
                spans.append((start, start + a.nbytes, written, name, index))
    return tuple(lists), spans


class Checked:
    """The arrays of one call after check_arrays and the disjointness check: `lists` as check_arrays
    returns them, `spans` for comparing several calls (check_prepared_disjoint). Nothing is written
    before a call is checked; the backends' run()/scale_() take a Checked instead of raw arrays."""

    __slots__ = ("lists", "spans", "memo")

    def __init__(self, lists, spans):
        self.lists, self.spans = lists, spans
        self.memo = None  # the backend's launch set-up for these arrays, kept while bind_grads returns this object


def prepare(arrays, names, api=HostArrays, read_only_slot=1, indices=None) -> Checked:
    """check_arrays, then no array of the call may share memory with a written one."""
    lists, spans = check_arrays(arrays, names, api, read_only_slot, indices)
    check_disjoint(spans)
    return Checked(lists, spans)


def validate_arrays(arrays, names, api=HostArrays, read_only_slot=1, indices=None):
    """check_arrays, then no array may share memory with a written one. Returns the lists."""
    lists, spans = check_arrays(arrays, names, api, read_only_slot, indices)
    check_disjoint(spans)
    return lists


class Fixed:
    """The arrays of an optimizer's calls but the grads, checked once (prepare_fixed): `calls` as given,
    `checked` the lists check_arrays returned per call, `spans` per call, `snapshot` (object, checked
    view, what the checks read) per array, and the written spans sorted for bind_grads' overlap search."""

    __slots__ = ("calls", "api", "checked", "spans", "snapshot", "starts", "ends", "labels", "stable", "last")

    def __len__(self):
        return len(self.calls)


def _seen(api, a):
    """What the checks read of an array: memory, dtype, shape, layout, writability."""
    return api.pointer(a), a.dtype, tuple(a.shape), api.c_contiguous(a), api.writeable(a)


def prepare_fixed(calls, api=HostArrays) -> Fixed:
    """Check the arrays of an optimizer's kernel calls that stay the same from step to step, once.

    calls: [(arrays, names, indices), ...], one per kernel call, in prepare()'s layout with None for the
    grads: arrays = (params, None, *states). Every array gets prepare()'s checks (kind, dtype, byte order,
    shape, C-contiguous, writable: all are written) and no two may share memory, across all calls.
    Writes nothing. Returns the object bind_grads takes."""
    fixed = Fixed()
    fixed.api = api
    fixed.calls = [(tuple(list(a) if isinstance(a, (list, tuple)) else a for a in arrays), tuple(names),
                    None if indices is None else list(indices)) for arrays, names, indices in calls]
    _check_fixed(fixed)
    return fixed


def _check_fixed(fixed):
    """prepare()'s checks of every call and of all against each other, then the snapshot; on an error
    the previous state is kept (and fails again)."""
    api = fixed.api
    checked, spans, snapshot = [], [], []
    for arrays, names, indices in fixed.calls:
        if len(arrays) < 2 or arrays[1] is not None:
            raise ValueError("prepare_fixed: each call is (params, None, *states); bind_grads adds the grads")
        lists, call_spans = check_arrays(arrays, names, api, read_only_slot=-1, indices=indices, grads_later=True)
        check_disjoint(call_spans)  # each call on its own first, as prepare() does
        checked.append(lists)
        spans.append(call_spans)
        is_list = isinstance(arrays[0], (list, tuple))
        for i in range(len(lists[0])):
            for k, lst in enumerate(lists):
                if lst is not None:
                    src = arrays[k][i] if is_list else arrays[k]
                    snapshot.append((src, lst[i], _seen_any(api, lst[i])))
    every = sorted((span for call_spans in spans for span in call_spans), key=lambda s: s[0])
    check_disjoint(every)
    fixed.checked, fixed.spans, fixed.snapshot = checked, spans, snapshot
    # disjoint spans sorted by start have sorted ends: bisect finds the first one past a start
    fixed.starts = [s[0] for s in every]
    fixed.ends = [s[1] for s in every]
    fixed.labels = [label(s[3], s[4]) for s in every]
    stable = getattr(api, "stable", None)
    fixed.stable = stable is not None and all(stable(src) for src, _, _ in snapshot)
    fixed.last = None  # (grads per call, the calls bind_grads returned for them): stable grads only


def _seen_any(api, a):
    """_seen of an array, or of both arrays of a QuantizedState (and its map)."""
    if isinstance(a, QuantizedState):
        return _seen(api, a.codes), _seen(api, a.absmax), a.signed
    return _seen(api, a)


def _is_current(fixed) -> bool:
    """Every array still as the snapshot saw it; objects other than the checked view (torch tensors,
    memoryviews; on a GPU every object) are viewed again, since their storage may have moved. Arrays
    whose object pins everything a kernel reads (api.stable: a CuPy array's memory, dtype and size are
    fixed for its life, and a contiguous one stays contiguous under an in-place reshape) need no look."""
    if fixed.stable:
        return True
    api = fixed.api
    unchanged = getattr(api, "unchanged", None)
    for src, view, seen in fixed.snapshot:
        if unchanged is not None and unchanged(src, view):
            continue
        if isinstance(src, QuantizedState):
            if not isinstance(view, QuantizedState) or src.signed != view.signed:
                return False
            if src.codes is not view.codes or src.absmax is not view.absmax:
                return False  # arrays replaced or not NumPy: checked again
        elif src is not view:
            try:
                view = api.convert(src, "array")
            except (TypeError, ValueError, BufferError, RuntimeError):
                return False
        if _seen_any(api, view) != seen:
            return False
    return True


def bind_grads(fixed, grads_per_call) -> list:
    """The prepared calls (Checked, for run()) of one step: grads_per_call[c] is the grads of call c.

    First the fixed arrays are compared with prepare_fixed's snapshot and validated again when anything
    changed (prepare()'s errors). Then each grad gets prepare()'s checks against its param (None, kind,
    dtype, shape, C-contiguous; the count and form of the list) and no grad may share memory with any
    fixed array of any call (grads may share with each other). Writes nothing."""
    api = fixed.api
    device = getattr(api, "device", None)  # device arrays: each grad on its param's device
    if not _is_current(fixed):
        _check_fixed(fixed)
    last = fixed.last
    if last is not None and len(grads_per_call) == len(last[0]) and all(
            map(_same_grads, grads_per_call, last[0])):
        return last[1]  # the same stable grads as the last step: the same checked calls (and their memo)
    if len(grads_per_call) != len(fixed.calls):
        raise ValueError(f"bind_grads: {len(grads_per_call)} grads lists for {len(fixed.calls)} calls")
    out, grad_spans = [], []
    for (arrays, names, indices), lists, spans, grads in zip(fixed.calls, fixed.checked, fixed.spans,
                                                              grads_per_call):
        params = lists[0]
        is_list = isinstance(arrays[0], (list, tuple))
        if grads is None:
            raise TypeError(f"{names[1]} must be {'a list of arrays' if is_list else 'an array'}, got None")
        if isinstance(grads, (list, tuple)) != is_list:
            raise TypeError(f"{names[1]} must be {'a list of arrays' if is_list else 'one array'}, like {names[0]}; "
                            f"got {type(grads).__name__}")
        if is_list and len(grads) != len(params):
            raise ValueError(f"{names[1]} has {len(grads)} arrays but {names[0]} has {len(params)}")
        grads = list(grads) if is_list else [grads]
        numbers_ = indices if indices is not None else (range(len(params)) if is_list else (None,))
        call_spans = list(spans)
        first_grad = None
        for i, obj in enumerate(grads):
            name = label(names[1], numbers_[i])
            if obj is None:
                raise TypeError(f"{name} must be an array, got None")
            a = api.convert(obj, name)
            p = params[i]
            # the labels of the messages only on the error paths: this loop runs per grad per step
            if a.dtype != p.dtype:  # the param's own dtype is always allowed (grad_dtypes)
                _check_grad_dtype(api, a, p, names[1], label(names[0], numbers_[i]), name)
            if tuple(a.shape) != tuple(p.shape):
                raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {tuple(p.shape)} "
                                 f"(the shape of {label(names[0], numbers_[i])})")
            if device is not None and a.size and device(a) != device(p):
                _check_device(api, a, p, name, label(names[0], numbers_[i]))
            if first_grad is None:
                first_grad = a.dtype
            elif a.dtype != first_grad:
                _check_grads_alike(a, first_grad, name, label(names[1], numbers_[0]))
            if not api.c_contiguous(a):
                raise ValueError(f"{name} is not C-contiguous")
            grads[i] = a
            if a.size:
                start = api.pointer(a)
                span = (start, start + a.nbytes, False, names[1], numbers_[i])
                call_spans.append(span)
                grad_spans.append(span)
        out.append(Checked((params, grads) + tuple(lists[2:]), call_spans))
    for start, end, _, name, index in grad_spans:  # grads are read: they may share with each other only
        j = bisect.bisect_right(fixed.ends, start)
        if j < len(fixed.starts) and fixed.starts[j] < end:
            grad = label(name, index)  # named in the order of prepare(): the one starting later first
            if start >= fixed.starts[j]:
                raise ValueError(f"{grad} shares memory with {fixed.labels[j]}")
            raise ValueError(f"{fixed.labels[j]} shares memory with {grad}")
    stable = getattr(api, "stable", None)
    if fixed.stable and all(stable(g) for grads in grads_per_call
                            for g in (grads if isinstance(grads, (list, tuple)) else (grads,))):
        fixed.last = ([list(g) if isinstance(g, (list, tuple)) else g for g in grads_per_call], out)
    return out


def _same_grads(grads, last) -> bool:
    """The grads of a call are the objects bound last time (a list compared element by element: the caller
    may pass a new list of the same arrays, or change a list it passed before)."""
    if grads is last:
        return True
    if isinstance(grads, (list, tuple)) and isinstance(last, list):
        return len(grads) == len(last) and all(map(operator.is_, grads, last))
    return False


def check_disjoint(spans):
    """No array may share memory with an array that is written (read-only arrays may share with each
    other). spans: (start, end, written, name, index) of every array, in any order."""
    spans = sorted(spans, key=lambda s: s[0])
    max_end_any = max_end_written = 0
    for j, (start, end, written, name, index) in enumerate(spans):
        if start < max_end_written or (written and start < max_end_any):
            for (s2, e2, w2, name2, index2) in spans[:j]:
                if e2 > start and (w2 or written):
                    raise ValueError(f"{label(name, index)} shares memory with {label(name2, index2)}")
        max_end_any = max(max_end_any, end)
        if written:
            max_end_written = max(max_end_written, end)


def check_prepared_disjoint(prepared):
    """check_disjoint over several Checked calls: how the backends written in Python compare the calls
    of one optimizer step."""
    check_disjoint([span for checked in prepared for span in checked.spans])


def host_scale(grad_scale) -> float:
    """grad_scale as a Python float for the host backends (a 0-d array is read; on the CPU that is no
    synchronisation). NaN and Inf pass: a non-finite clip coefficient propagates, like torch."""
    if grad_scale is None:
        return 1.0
    if isinstance(grad_scale, numbers.Real) and not isinstance(grad_scale, (bool, np.bool_)):
        value = as_float("grad_scale", grad_scale)
    else:
        if getattr(grad_scale, "shape", None) is None:
            raise TypeError(f"grad_scale must be a real number or a 0-d float array, got {grad_scale!r}")
        # any host array the params could be (a torch CPU tensor, a bfloat16 array), read through its memory
        scale = np.asarray(grad_scale) if isinstance(grad_scale, np.generic) else as_numpy(grad_scale, "grad_scale")
        if not (scale.dtype.kind == "f" or is_16bit(scale.dtype)):
            raise TypeError(f"grad_scale must be a real number or a 0-d float array, got {grad_scale!r}")
        if scale.shape != ():
            raise ValueError(f"grad_scale must be a scalar or a 0-d array, got shape {scale.shape}")
        value = float(scale)
    return value


def check_tensor_coefs(spec, tensor_coefs, ntensors: int):
    """Precomputed per-tensor coefficients of a call (None: the backend computes them) as a contiguous float64
    host array, one per array of the call; TypeError / ValueError naming tensor_coefs otherwise, before
    anything is written. Only for a family whose functor reads one number per tensor (spec.tensor_coefs:
    LARS's trust ratio, -1 for a tensor it leaves unadapted): a caller that holds pieces of tensors (a
    shard of ShardedOptimizer) passes the ratios of the whole tensors, which the pieces cannot compute."""
    if tensor_coefs is None:
        return None
    if spec.tensor_coefs is None:
        raise ValueError(f"tensor_coefs: {spec.function_name} reads no per-tensor coefficients (only an optimizer "
                         f"with spec.tensor_coefs does, e.g. lars_step), got {tensor_coefs!r}")
    return _per_tensor_numbers("tensor_coefs", tensor_coefs, ntensors, "coefficient")


def _per_tensor_numbers(name: str, value, ntensors: int, what: str) -> np.ndarray:
    """`value` as a contiguous float64 host vector of one real number per array of the call; TypeError /
    ValueError naming `name` otherwise."""
    try:
        a = np.asarray(value)
    except (TypeError, ValueError) as e:  # ragged lists, a device array
        raise TypeError(f"{name} must be a host array or list of real numbers, got "
                        f"{type(value).__name__} ({e})") from None
    if a.dtype.kind not in "fiu":  # not bool, complex or objects
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}: {value!r}")
    if a.ndim > 1 or a.size != ntensors:
        raise ValueError(f"{name} has shape {a.shape}: one {what} per array of the call ({ntensors}) was expected")
    return np.ascontiguousarray(a, dtype=np.float64).reshape(-1)


def check_scaled_lr(scaled_lr, ntensors: int):
    """The per-tensor learning rates of a two-phase update's second pass (run_phase2: lr times the whole
    tensor's trust ratio) as a contiguous float64 host array, one finite number per array of the call;
    TypeError / ValueError naming scaled_lr otherwise, before anything is written."""
    a = _per_tensor_numbers("scaled_lr", scaled_lr, ntensors, "lr")
    if not np.isfinite(a).all():
        raise ValueError(f"scaled_lr must be finite, got {scaled_lr!r}")
    return a
