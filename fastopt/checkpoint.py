"""Optimizer state: state_dict / load_state_dict, torch.optim conversion, and .npz checkpoints.

The state dict has torch.optim's layout, with NumPy arrays and plain Python values:

    {"state": {0: {"step": 12, "exp_avg": ndarray, "exp_avg_sq": ndarray}, 1: {...}, ...},
     "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), ..., "params": [0, 1]}, ...],
     "fastopt": {"optimizer": "adam", "format": 1, "skipped_steps": 0,
                 "param_shapes": [[3, 4], [5]], "param_dtypes": ["float32", "float64"],
                 "lr_schedules": [None, {"repr": "cosine(...)", "state": None}]}}

Params are numbered in the optimizer's order (groups in order, params in order within a group), like
torch. Arrays are copies on the host (state_dict never aliases the live state, also for CuPy state).
`step` is the number of updates the param's group has applied. A group whose lr is a schedule
stores the lr of its next step; loading keeps the target optimizer's schedule when it has one
(schedules are functions of the step count, which is restored) and restores the schedule's own state
when it has one (ReduceLROnPlateau).

Loading is two phases. The first checks everything and writes nothing: the optimizer name, group
and param counts, every hyperparameter (the registry spec's validation; values become Python floats
and bools), step counts (whole numbers in 0..2**53-1), state names, array types, shapes and exact
dtypes (native byte order), the schedules' saved state (loaded into a copy of the schedule first)
and, for a file, the params. The second writes: it copies into the optimizer's own arrays, on the
params' device, and cannot fail on the data. Any problem is a CheckpointError (a ValueError) that
leaves the optimizer exactly as it was.

    fastopt.save(path, opt, params=True)   one file; params=False leaves the params out
    fastopt.load(path, opt, params=None)   restores the state, and the params when the file has them
                                           (params=True: they must be there; False: not restored)

The file is a zip of .npy members (np.load can read it, no pickle): meta.npy (JSON), state/<param>/<name>.npy,
params/<param>.npy. The zip comment ends with the SHA-256 of every byte before it, so any change to the
file (a flipped bit anywhere, a cut, appended bytes) is detected before anything is parsed; the parser
itself trusts nothing either (a checksum can be recomputed): members must be stored, uncompressed
.npy whose sizes match their headers, dtypes numeric and native, the member list exactly the one the
JSON describes. Format 1 files (fastopt 0.1: no params, no checksum) still load.

Writing is atomic: a temporary file in the target's directory, fsynced, then os.replace'd over the
target (a crash leaves the old file intact), with the permissions a plain open() would give (0666
minus the umask; an existing target keeps its permission bits). The temporary file is named
.fastopt-<hash of the target's name>-<pid>-<random>.npz.tmp and the saving process holds an flock on
it. A process killed mid-save leaves it behind; the next save to the same target removes it: a
temporary file of that target is stale when the process named in it no longer exists AND nobody
holds its lock (either alone can be wrong: pids are reused and are per namespace; a file exists for
a moment before its lock is taken). Saves in progress elsewhere, and temporary files of other
targets, are never touched. (Windows has no flock: there a temporary file still open by its writer
cannot be deleted, which is the same protection.)

    opt.torch_state_dict() / opt.load_torch_state_dict(sd): the same state as torch.optim.<Class>
    keeps it (Adagrad's "sum", NAdam's "mu_product", float32 "step" tensors), so a PyTorch user can
    switch in either direction without losing optimizer state. Loading converts everything first,
    then goes through the same checks.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import numbers
import os
import re
import secrets
import stat
import zipfile
from collections.abc import Mapping

import numpy as np

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["save", "load", "CheckpointError"]

FORMAT = 1         # layout of the state dict (sd["fastopt"]["format"])
FILE_FORMAT = 2    # layout of the file: 2 adds the params and the checksum; 1 is still read
MAX_COUNT = 2 ** 53 - 1  # largest step count / skip count: the next step number is exact in float64

_TRAILER = b"fastopt-checkpoint sha256:"
_DIGEST_LEN = 64
_CHUNK = 1 << 22
_MEMBER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_INDEX = re.compile(r"0|[1-9][0-9]{0,15}")
_TEMP_NAME = re.compile(r"\.fastopt-([0-9a-f]{16})-([0-9]{1,10})-[0-9a-f]{8}\.npz\.tmp")


class CheckpointError(ValueError):
    """A checkpoint or state dict that does not fit the optimizer, or a file that is not a checkpoint."""


def _fail(msg):
    raise CheckpointError(msg)


def _shown(value, limit=60) -> str:
    """A value for an error message, cut short."""
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not replace the real error
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def _to_host(a):
    """A NumPy copy of an array (CuPy and Numba device arrays come back from the device)."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    if hasattr(a, "copy_to_host"):  # Numba device array
        return a.copy_to_host()
    from fastopt.backends.dispatch import as_numpy
    return np.array(as_numpy(a, "state"), copy=True)


def _writable_view(p, what):
    """The array to copy into for a param: NumPy view of a host object, CuPy view of a device one."""
    from fastopt.backends.dispatch import array_device, as_numpy
    if array_device(p, what) == "device":
        if type(p).__module__.startswith(("cupy", "numba")):
            return p
        import cupy
        return cupy.asarray(p)
    return as_numpy(p, what)


def _copy_into(dst, src):
    """dst[...] = src, across devices (dst keeps its identity and device). src is checked already."""
    if type(dst).__module__.startswith("cupy"):
        import cupy
        dst[...] = cupy.asarray(src)
        return
    if type(src).__module__.startswith("cupy"):
        src = src.get()
    elif hasattr(src, "copy_to_host"):
        src = src.copy_to_host()
    if hasattr(dst, "copy_to_device"):  # Numba device array
        dst.copy_to_device(np.ascontiguousarray(np.asarray(src), dtype=dst.dtype))
        return
    from fastopt.backends.dispatch import as_numpy
    np.copyto(as_numpy(dst, "state"), np.asarray(src), casting="no")


def _zero(dst):
    if hasattr(dst, "copy_to_device"):
        dst.copy_to_device(np.zeros(tuple(dst.shape), dst.dtype))
    elif type(dst).__module__.startswith("cupy"):
        dst.fill(0)
    else:
        from fastopt.backends.dispatch import as_numpy
        as_numpy(dst, "state")[...] = 0


def _dtype_name(dtype) -> str:
    try:
        return np.dtype(dtype).name
    except TypeError:  # a torch dtype: torch.float32 -> float32
        return str(dtype).rsplit(".", 1)[-1]


def _plain(value):
    """JSON-friendly plain Python value (tuples stay tuples in the state dict; json makes them lists)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return value


def _count(what, value):
    """A step or skip count: a whole number (not bool) in 0..MAX_COUNT, as a Python int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        _fail(f"{what} must be a whole number, got {_shown(value)} ({type(value).__name__})")
    value = int(value)
    if not 0 <= value <= MAX_COUNT:
        _fail(f"{what} is {_shown(value)}, out of range (0 to 2**53 - 1)")
    return value


# ---------------------------------------------------------------------------------------------------
# state_dict
# ---------------------------------------------------------------------------------------------------

def state_dict(opt) -> dict:
    from fastopt.optim import _is_callable_lr
    groups, schedules = [], []
    index = 0
    for gi, group in enumerate(opt.param_groups):
        out = {}
        for k in opt._hyper_keys():
            value = group[k]
            if k == "lr" and _is_callable_lr(value):
                value = value(opt._group_steps[gi])
            out[k] = _plain(value)
        out["params"] = list(range(index, index + len(group["params"])))
        index += len(group["params"])
        groups.append(out)
        lr = group["lr"]
        if _is_callable_lr(lr):
            inner = getattr(lr, "state_dict", None)
            schedules.append({"repr": repr(lr), "state": inner() if inner is not None else None})
        else:
            schedules.append(None)
    state = {}
    for gi, buckets in enumerate(opt._buckets):
        for bucket in buckets:
            for j, i in enumerate(bucket.indices):
                entry = {"step": opt._group_steps[gi]}
                for name in opt.spec.states:
                    if name in bucket.states:
                        entry[name] = _to_host(bucket.states[name][j])
                state[i] = entry
    state = dict(sorted(state.items()))
    return {
        "state": state,
        "param_groups": groups,
        "fastopt": {
            "optimizer": opt.spec.name,
            "format": FORMAT,
            "skipped_steps": opt.skipped_steps,
            "param_shapes": [list(map(int, p.shape)) for p in opt._params],
            "param_dtypes": [_dtype_name(p.dtype) for p in opt._params],
            "lr_schedules": schedules,
        },
    }


# ---------------------------------------------------------------------------------------------------
# load_state_dict, phase 1: check everything, write nothing
# ---------------------------------------------------------------------------------------------------

def _hyper_value(where, hyper, value):
    """A saved hyperparameter as the Python type the optimizer keeps (float or bool)."""
    if hyper.kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            _fail(f"{where}: {hyper.name} must be a bool, got {_shown(value)} ({type(value).__name__})")
        return bool(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        _fail(f"{where}: {hyper.name} must be a real number, got {_shown(value)} ({type(value).__name__})")
    try:
        return float(value)
    except (OverflowError, ValueError, TypeError):
        _fail(f"{where}: Invalid {hyper.label or hyper.name}: {_shown(value)} (not a float)")


def _check_meta(opt, meta):
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        _fail(f"state dict: 'fastopt' must be a dict, got {type(meta).__name__}")
    name = meta.get("optimizer")
    if name is not None:
        if not isinstance(name, str):
            _fail(f"state dict: 'optimizer' must be a name, got {_shown(name)}")
        if name != opt.spec.name:
            _fail(f"the state dict is for {name!r}, this optimizer is {opt.spec.name!r}")
    if "format" in meta:
        fmt = meta["format"]
        if type(fmt) is not int or fmt != FORMAT:
            _fail(f"state dict: unsupported format {_shown(fmt)} (this fastopt reads {FORMAT})")
    n = len(opt._params)
    shapes, dtypes = meta.get("param_shapes"), meta.get("param_dtypes")
    for key, value in (("param_shapes", shapes), ("param_dtypes", dtypes)):
        if value is not None and not isinstance(value, (list, tuple)):
            _fail(f"state dict: '{key}' must be a list, got {type(value).__name__}")
        if value is not None and len(value) != n:
            _fail(f"the state dict has {len(value)} params but the optimizer has {n}")
    for i, p in enumerate(opt._params):
        shape = shapes[i] if shapes is not None else None
        dtype = dtypes[i] if dtypes is not None else None
        if shapes is not None:
            if not isinstance(shape, (list, tuple)) or any(
                    isinstance(d, (bool, np.bool_)) or not isinstance(d, numbers.Integral) for d in shape):
                _fail(f"state dict: param_shapes[{i}] is not a shape: {_shown(shape)}")
            shape = [int(d) for d in shape]
        if dtypes is not None and not isinstance(dtype, str):
            _fail(f"state dict: param_dtypes[{i}] is not a dtype name: {_shown(dtype)}")
        live_shape, live_dtype = [int(d) for d in p.shape], _dtype_name(p.dtype)
        if (shape is not None and shape != live_shape) or (dtype is not None and dtype != live_dtype):
            _fail(f"param {i} is {dtype if dtype is not None else '?'}{shape if shape is not None else ''} in the "
                  f"state dict but {live_dtype}{live_shape} in the optimizer")
    skipped = None
    if "skipped_steps" in meta:
        skipped = _count("state dict: skipped_steps", meta["skipped_steps"])
    schedules = meta.get("lr_schedules")
    ngroups = len(opt.param_groups)
    if schedules is None:
        schedules = [None] * ngroups
    if not isinstance(schedules, (list, tuple)):
        _fail(f"state dict: 'lr_schedules' must be a list (one entry per group), got {_shown(schedules)}")
    if len(schedules) != ngroups:  # checked after the groups themselves (a clearer message first)
        return skipped, len(schedules)
    for gi, entry in enumerate(schedules):
        if entry is not None and not isinstance(entry, Mapping):
            _fail(f"state dict: lr_schedules[{gi}] must be a dict or None, got {_shown(entry)}")
    return skipped, [(entry or {}).get("state") for entry in schedules]


def _check_groups(opt, groups):
    """Each saved group's hyperparameters, checked with the registry spec and converted: a list of
    (group dict without params, registry-named hp dict)."""
    from fastopt.specs import get_spec
    spec = get_spec(opt.spec.name)
    if not isinstance(groups, (list, tuple)):
        _fail(f"state dict: 'param_groups' must be a list, got {type(groups).__name__}")
    if len(groups) != len(opt.param_groups):
        _fail(f"state dict has {len(groups)} param groups but the optimizer has {len(opt.param_groups)}")
    keys = opt._hyper_keys()
    hypers = {h.name: h for h in spec.hypers}
    out = []
    index = 0
    for gi, (saved, live) in enumerate(zip(groups, opt.param_groups)):
        where = f"param group {gi}"
        if not isinstance(saved, Mapping) or "params" not in saved:
            _fail(f"state dict: {where} is not a dict with 'params'")
        numbers_ = saved["params"]
        n = len(live["params"])
        if not isinstance(numbers_, (list, tuple)):
            _fail(f"{where}: 'params' must be a list of param numbers, got {_shown(numbers_)}")
        if len(numbers_) != n:
            _fail(f"{where} has {len(numbers_)} params in the state dict but {n} in the optimizer")
        if any(isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral) or int(k) != index + j
               for j, k in enumerate(numbers_)):
            _fail(f"{where}: params must be numbered {index}..{index + n - 1} in order, got {_shown(list(numbers_))}")
        index += n
        missing = [k for k in keys if k not in saved]
        unknown = [_shown(k) if not isinstance(k, str) else k for k in saved if k not in keys and k != "params"]
        if missing or unknown:
            _fail(f"{where} does not fit {opt.spec.class_name}: "
                  + (f"missing {', '.join(missing)}" if missing else "")
                  + ("; " if missing and unknown else "") + (f"unknown {', '.join(unknown)}" if unknown else ""))
        hp = {}
        for k in keys:
            value = saved[k]
            if k == "betas":
                if not isinstance(value, (list, tuple)) or len(value) != 2:
                    _fail(f"{where}: betas must be a pair (beta1, beta2), got {_shown(value)}")
                hp["beta1"] = _hyper_value(where, hypers["beta1"], value[0])
                hp["beta2"] = _hyper_value(where, hypers["beta2"], value[1])
            else:
                hp[k] = _hyper_value(where, hypers[k], value)
        try:
            spec.validate(hp, 1)
        except (TypeError, ValueError, ArithmeticError) as e:
            raise CheckpointError(f"{where}: {e}") from None
        new = {k: ((hp["beta1"], hp["beta2"]) if k == "betas" else hp[k]) for k in keys}
        out.append((new, hp))
    return out


def _check_array(what, a, shape, dtype):
    """A saved array that must become `dtype`[shape] without conversion (dtype None: an array that is
    not loaded, checked for its kind, byte order and shape only)."""
    if isinstance(a, np.ma.MaskedArray):
        _fail(f"{what} is a masked array; save plain arrays")
    if not (isinstance(a, np.ndarray) or type(a).__module__.startswith("cupy") or hasattr(a, "copy_to_host")):
        _fail(f"{what} is not an array ({type(a).__name__})")
    try:
        got = np.dtype(a.dtype)
    except TypeError:
        _fail(f"{what} has an unknown dtype {_shown(a.dtype)}")
    if not got.isnative:
        _fail(f"{what} has non-native byte order ({got.str}); arrays are loaded without conversion")
    if dtype is not None and got != dtype:
        _fail(f"{what} has dtype {got.name if not got.fields else got}, expected {np.dtype(dtype).name}")
    if tuple(int(d) for d in a.shape) != tuple(int(d) for d in shape):
        _fail(f"{what} has shape {tuple(a.shape)}, expected {tuple(shape)} (the shape of the param)")
    return a


def _check_state(opt, state, new_hps):
    """Per bucket: the state slots to allocate and, per param, the saved array of each slot; and the
    group step counts."""
    from fastopt.functional import init_state
    if not isinstance(state, Mapping):
        _fail(f"state dict: 'state' must be a dict, got {type(state).__name__}")
    n = len(opt._params)
    for key in state:
        if isinstance(key, (bool, np.bool_)) or not isinstance(key, numbers.Integral) or not 0 <= int(key) < n:
            _fail(f"state dict has state for param {_shown(key)} but the optimizer has params 0..{n - 1}")
    known = opt.spec.states
    steps, plans = [], []
    for gi, buckets in enumerate(opt._buckets):
        hp = new_hps[gi]
        active = [name for name, used in zip(known, opt.spec.active_states(hp)) if used]
        group_step = None
        group_plans = []
        for bucket in buckets:
            # slots these hyperparameters need that the optimizer has not allocated (momentum set later)
            needed = [name for name in active if name not in bucket.states]
            new_slots = {}
            if needed:
                fresh = init_state(opt.spec.name, bucket.params, **opt._state_options(hp))
                new_slots = {name: fresh[name] for name in needed}
            slots = dict(bucket.states, **new_slots)
            sources = []
            for j, (i, p) in enumerate(zip(bucket.indices, bucket.params)):
                entry = state.get(i, {})
                if not isinstance(entry, Mapping):
                    _fail(f"state of param {i} must be a dict, got {_shown(entry)}")
                step = _count(f"state of param {i}: step", entry.get("step", 0))
                if group_step is None:
                    group_step = step
                elif step != group_step:
                    _fail(f"param group {gi}: params have different step counts ({group_step} and {step} at "
                          f"param {i}); fastopt keeps one count per group")
                names = [k for k in entry if k != "step"]
                unknown = [k if isinstance(k, str) else _shown(k) for k in names if k not in known]
                if unknown:
                    _fail(f"state of param {i} has {', '.join(unknown)}, which {opt.spec.class_name} does not keep "
                          f"(it keeps {', '.join(known)})")
                if step > 0:
                    missing = [k for k in active if k not in entry]
                    if missing:
                        _fail(f"state of param {i} is missing {', '.join(missing)} (needed with these "
                              f"hyperparameters)")
                arrays = {}
                for name in names:
                    # the dtype of the optimizer's own state array (float16 device params keep float32
                    # state); a slot the optimizer does not have is not loaded: checked against the param
                    target = slots.get(name)
                    dtype = np.dtype(target[j].dtype) if target is not None else None
                    a = _check_array(f"state of param {i}: {name}", entry[name], p.shape, dtype)
                    if target is not None:
                        arrays[name] = a
                sources.append(arrays)
            group_plans.append((bucket, new_slots, sources))
        steps.append(group_step or 0)
        plans.append(group_plans)
    return plans, steps


def _check_schedules(opt, new_groups, saved_states, steps):
    """Per group: (schedule to load into, its saved state) or None, and the lr of the group's next step.
    A schedule's saved state is loaded into a copy first, so a state that does not fit fails here."""
    from fastopt.optim import _is_callable_lr
    from fastopt.specs import get_spec
    lr_hyper = get_spec(opt.spec.name).hypers[0]
    loads, lrs = [], []
    for gi, ((new, hp), live, saved, step) in enumerate(zip(new_groups, opt.param_groups, saved_states, steps)):
        schedule = live["lr"]
        if not _is_callable_lr(schedule):
            loads.append(None)
            lrs.append(hp["lr"])
            continue
        new["lr"] = schedule  # keep the schedule: it is a function of the restored step count
        trial, load = schedule, None
        loader = getattr(schedule, "load_state_dict", None)
        if saved is not None and loader is not None:
            load = (schedule, saved)
            try:
                trial = copy.deepcopy(schedule)
            except Exception:  # a schedule that cannot be copied is loaded unchecked
                trial = None
            if trial is not None:
                try:
                    trial.load_state_dict(copy.deepcopy(saved))
                except Exception as e:
                    _fail(f"param group {gi}: the saved state of its lr schedule does not fit "
                          f"{_shown(schedule)}: {type(e).__name__}: {e}")
        lr = None
        if trial is not None:
            try:
                value = trial(step)
                checked = lr_hyper.validate(value)  # the converted float (None from older specs)
                lr = float(value) if checked is None else checked
            except Exception as e:
                _fail(f"param group {gi}: its lr schedule gives no valid learning rate at the restored step "
                      f"{step}: {type(e).__name__}: {e}")
        loads.append(load)
        lrs.append(lr)
    return loads, lrs


def _check_params(opt, params):
    """The saved params, checked against the optimizer's: (writable target, saved array) pairs."""
    if not isinstance(params, (list, tuple)):
        _fail(f"params must be a list of arrays, got {type(params).__name__}")
    if len(params) != len(opt._params):
        _fail(f"the checkpoint has {len(params)} params but the optimizer has {len(opt._params)}")
    pairs = []
    for i, (a, p) in enumerate(zip(params, opt._params)):
        target = _writable_view(p, f"param {i}")
        _check_array(f"param {i}", a, p.shape, target.dtype)
        if isinstance(target, np.ndarray) and not target.flags.writeable:
            raise ValueError(f"param {i} is read-only: cannot restore it from the checkpoint")
        pairs.append((target, a))
    return pairs


def _plan(opt, sd, params=None):
    """Phase 1: everything load_state_dict (and load) will write, checked; nothing written."""
    if not isinstance(sd, Mapping) or "state" not in sd or "param_groups" not in sd:
        _fail("not an optimizer state dict (expected a dict with the keys 'state' and 'param_groups')")
    skipped, saved_schedules = _check_meta(opt, sd.get("fastopt"))
    new_groups = _check_groups(opt, sd["param_groups"])
    if isinstance(saved_schedules, int):
        _fail(f"state dict: 'lr_schedules' has {saved_schedules} entries for {len(new_groups)} param groups")
    buckets, steps = _check_state(opt, sd["state"], [hp for _, hp in new_groups])
    loads, lrs = _check_schedules(opt, new_groups, saved_schedules, steps)
    pairs = _check_params(opt, params) if params is not None else []
    return {"groups": [g for g, _ in new_groups], "buckets": buckets, "steps": steps, "loads": loads,
            "lrs": lrs, "skipped": skipped, "params": pairs}


# ---------------------------------------------------------------------------------------------------
# load_state_dict, phase 2: write
# ---------------------------------------------------------------------------------------------------

def _apply(opt, plan) -> None:
    for gi, live in enumerate(opt.param_groups):
        load = plan["loads"][gi]
        if load is not None:
            load[0].load_state_dict(load[1])
        live.update(plan["groups"][gi])
        opt._hp_cache[gi] = None  # re-validated and re-planned at the next step
        opt._group_steps[gi] = plan["steps"][gi]
        lr = plan["lrs"][gi]
        if lr is None:  # a schedule that could not be tried on a copy
            lr = float(live["lr"](plan["steps"][gi]))
        opt._last_lr[gi] = lr
        for bucket, new_slots, sources in plan["buckets"][gi]:
            bucket.states.update(new_slots)
            for name, targets in bucket.states.items():
                for j, arrays in enumerate(sources):
                    if name in arrays:
                        _copy_into(targets[j], arrays[name])
                    elif name not in new_slots:  # not saved (step 0, or unused): zeros
                        _zero(targets[j])
    for target, a in plan["params"]:
        _copy_into(target, a)
    if plan["skipped"] is not None:
        opt._skipped_host = plan["skipped"]
        opt._skipped_device = None


def load_state_dict(opt, sd: dict) -> None:
    _apply(opt, _plan(opt, sd))


# ---------------------------------------------------------------------------------------------------
# torch.optim conversion
# ---------------------------------------------------------------------------------------------------

_TORCH_STATE_NAMES = {"state_sum": "sum"}                        # fastopt name -> torch name
_FROM_TORCH_STATE_NAMES = {v: k for k, v in _TORCH_STATE_NAMES.items()}
# torch group keys with no fastopt meaning for the update itself (execution options, initial values
# that the saved state already carries); decoupled_weight_decay is torch's AdamW flag on Adam
_TORCH_ONLY_KEYS = {"foreach", "fused", "capturable", "differentiable", "initial_accumulator_value", "param_names"}


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError("converting to or from a torch.optim state dict needs torch installed") from None
    return torch


def _require_torch_class(opt):
    if opt.spec.torch_class is None:
        raise ValueError(f"torch.optim has no {opt.spec.class_name}: no torch state dict to convert to or from")


def to_torch_state_dict(opt) -> dict:
    """Reads the optimizer only (nothing to half-apply)."""
    torch = _torch()
    _require_torch_class(opt)
    from fastopt.specs import nadam_mu_product
    sd = state_dict(opt)
    state = {}
    for gi, group in enumerate(sd["param_groups"]):
        t = opt._group_steps[gi]
        for i in group["params"]:
            entry = sd["state"][i]
            if t == 0:
                continue  # torch has no state for a param before its first step
            out = {}
            if opt.spec.name != "sgd":  # torch's SGD keeps no step
                out["step"] = torch.tensor(float(t), dtype=torch.float32)
            for name, a in entry.items():
                if name != "step":
                    out[_TORCH_STATE_NAMES.get(name, name)] = torch.from_numpy(a)
            if opt.spec.name == "nadam":
                b1, md = group["betas"][0], group["momentum_decay"]
                out["mu_product"] = torch.tensor(nadam_mu_product(b1, md, t), dtype=torch.float32)
            state[i] = out
    groups = []
    for group in sd["param_groups"]:
        g = dict(group)
        if opt.spec.name == "adamw":
            g["decoupled_weight_decay"] = True
        elif opt.spec.name == "adam":
            g["decoupled_weight_decay"] = False
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _torch_value(torch, where, value):
    """A torch group value as a plain Python value (torch allows 0-d tensors for lr and betas)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            _fail(f"{where} is a tensor of {value.numel()} elements, expected a number")
        return value.item()
    if isinstance(value, (tuple, list)):
        return tuple(_torch_value(torch, where, v) for v in value)
    return _plain(value)


def from_torch_state_dict(opt, sd: dict, step=None) -> None:
    """Load a torch.optim state dict. `step` sets the group counts for SGD, whose torch state has no
    step (default: 1 when momentum buffers exist, else 0); the other optimizers take torch's.
    Everything is converted and checked before anything is written."""
    torch = _torch()
    _require_torch_class(opt)
    if step is not None:
        if isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral):
            raise TypeError(f"step must be a whole number or None, got {_shown(step)}")
        if not 0 <= int(step) <= MAX_COUNT:
            raise ValueError(f"Invalid step: {_shown(step)} (0 to 2**53 - 1)")
        step = int(step)
    if not isinstance(sd, Mapping) or "state" not in sd or "param_groups" not in sd:
        _fail("not a torch.optim state dict (expected a dict with the keys 'state' and 'param_groups')")
    if not isinstance(sd["param_groups"], (list, tuple)):
        _fail(f"torch state dict: 'param_groups' must be a list, got {type(sd['param_groups']).__name__}")
    if not isinstance(sd["state"], Mapping):
        _fail(f"torch state dict: 'state' must be a dict, got {type(sd['state']).__name__}")
    keys = set(opt._hyper_keys())
    groups = []
    for gi, g in enumerate(sd["param_groups"]):
        if not isinstance(g, Mapping) or "params" not in g:
            _fail(f"torch state dict: param group {gi} is not a dict with 'params'")
        new = {}
        for k, v in g.items():
            if k == "params":
                if not isinstance(v, (list, tuple)) or any(
                        isinstance(i, (bool, np.bool_)) or not isinstance(i, numbers.Integral) for i in v):
                    _fail(f"torch state dict: param group {gi}: 'params' must be a list of param numbers, "
                          f"got {_shown(v)}")
                new[k] = [int(i) for i in v]
            elif k in keys:
                new[k] = _torch_value(torch, f"param group {gi}: {k}", v)
            elif k == "decoupled_weight_decay" and opt.spec.name in ("adam", "adamw"):
                if bool(v) != (opt.spec.name == "adamw"):
                    _fail(f"param group {gi}: torch decoupled_weight_decay={v} is "
                          f"{'AdamW' if v else 'Adam'}; load it into fastopt.{'AdamW' if v else 'Adam'}")
            elif k in _TORCH_ONLY_KEYS:
                continue
            else:
                _fail(f"param group {gi}: torch key {_shown(k)}={_shown(v)} has no fastopt.{opt.spec.class_name} "
                      f"equivalent")
        groups.append(new)
    state = {}
    for i, entry in sd["state"].items():
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, numbers.Integral):
            _fail(f"torch state dict has state for param {_shown(i)}; expected param numbers")
        if not isinstance(entry, Mapping):
            _fail(f"torch state of param {i} must be a dict, got {_shown(entry)}")
        out = {}
        for name, value in entry.items():
            if name == "mu_product":
                continue  # recomputed from the step count (specs.nadam_mu_product)
            if name == "step":
                try:
                    t = float(value.item() if isinstance(value, torch.Tensor) else value)
                except (TypeError, ValueError, RuntimeError, OverflowError):
                    _fail(f"torch state of param {i}: step {_shown(value)} is not a number")
                if not math.isfinite(t) or not t.is_integer():
                    _fail(f"torch state of param {i}: step {t} is not a whole number")
                out["step"] = int(t)
                continue
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                _fail(f"torch state of param {i}: {_shown(name)} is not a tensor ({type(value).__name__})")
            try:
                array = value.detach().cpu().resolve_conj().resolve_neg().numpy()
            except (TypeError, RuntimeError) as e:
                _fail(f"torch state of param {i}: {_shown(name)} ({value.dtype}) cannot be read as a NumPy "
                      f"array: {e}")
            out[_FROM_TORCH_STATE_NAMES.get(name, name)] = array
        state[int(i)] = out
    if opt.spec.name == "sgd":
        for gi, g in enumerate(groups):
            has_buffers = any("momentum_buffer" in state.get(i, {}) for i in g["params"])
            t = step if step is not None else (1 if has_buffers else 0)
            for i in g["params"]:
                state.setdefault(int(i), {})["step"] = t
    load_state_dict(opt, {"state": state, "param_groups": groups, "fastopt": {"optimizer": opt.spec.name}})


# ---------------------------------------------------------------------------------------------------
# Checkpoint files: writing
# ---------------------------------------------------------------------------------------------------

def _require_optimizer(opt):
    from fastopt.optim import Optimizer
    if not isinstance(opt, Optimizer):
        raise TypeError(f"expected a fastopt optimizer (fastopt.Adam, ...), got {type(opt).__name__}")


def _temp_stem(target_name: str) -> str:
    return ".fastopt-" + hashlib.sha256(os.fsencode(target_name)).hexdigest()[:16] + "-"


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (conservative: True when unsure). POSIX only."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):  # PermissionError: it exists, as another user
        return True
    return True


def _remove_stale_temps(directory: str, stem: str) -> None:
    """Delete the temporary files of earlier saves of the same target whose writer is gone."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    me = os.getpid()
    for name in names:
        if not name.startswith(stem) or not _TEMP_NAME.fullmatch(name):
            continue
        pid = int(_TEMP_NAME.fullmatch(name).group(2))
        if pid == me:  # another thread of this process may be writing it
            continue
        full = os.path.join(directory, name)
        if fcntl is None:  # Windows: a file its writer still has open cannot be deleted
            try:
                os.unlink(full)
            except OSError:
                pass
            continue
        if _pid_alive(pid):
            continue
        try:
            fd = os.open(full, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # locked: a save in progress (in another pid namespace)
            except OSError:
                pass  # no flock on this file system: the pid alone decides
            try:
                os.unlink(full)
            except OSError:
                pass
        finally:
            os.close(fd)


def _create_temp(directory: str, stem: str):
    flags = (os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
             | getattr(os, "O_NOINHERIT", 0))
    for _ in range(100):
        path = os.path.join(directory, f"{stem}{os.getpid()}-{secrets.token_hex(4)}.npz.tmp")
        try:
            fd = os.open(path, flags, 0o666)  # like open(): the umask applies
        except FileExistsError:
            continue
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                pass  # no flock on this file system
        return fd, path
    raise FileExistsError(f"could not create a temporary file in {directory}")


def _digest(f, length: int) -> bytes:
    h = hashlib.sha256()
    f.seek(0)
    left = length
    while left:
        chunk = f.read(min(_CHUNK, left))
        if not chunk:
            raise EOFError("file ended early")
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest().encode("ascii")


def _write_file(f, members) -> None:
    """The zip of .npy members, then the checksum of everything before it at the very end."""
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in members:
            with zf.open(name + ".npy", "w", force_zip64=True) as m:
                np.lib.format.write_array(m, array, allow_pickle=False)
        zf.comment = _TRAILER + b"0" * _DIGEST_LEN
    end = f.seek(0, os.SEEK_END)
    digest = _digest(f, end - _DIGEST_LEN)
    f.seek(end - _DIGEST_LEN)
    f.write(digest)


def save(path, opt, *, params=True) -> None:
    """Write the optimizer's state (and, unless params=False, its params) to `path` atomically.

    A .npz (zip of .npy, no pickle) ending with a SHA-256 of its contents; written to a temporary file
    in the same directory, fsynced, os.replace'd over `path`. Stale temporary files of earlier saves of
    the same target (a process killed mid-save) are removed first. The new file gets the permissions
    of a plain open() (0666 minus the umask), or the existing target's permission bits."""
    _require_optimizer(opt)
    if not isinstance(params, (bool, np.bool_)):
        raise TypeError(f"params must be True or False, got {_shown(params)}")
    path = os.fspath(path)
    sd = opt.state_dict()
    members = []
    state_meta = {}
    for i, entry in sd["state"].items():
        names = [k for k in entry if k != "step"]
        state_meta[str(i)] = {"step": entry["step"], "arrays": names}
        members += [(f"state/{i}/{name}", entry[name]) for name in names]
    nparams = 0
    if params:
        host = [_to_host(_writable_view(p, f"param {i}")) for i, p in enumerate(opt.params)]
        members += [(f"params/{i}", a) for i, a in enumerate(host)]
        nparams = len(host)
    meta = {"format": FILE_FORMAT, "param_groups": sd["param_groups"], "fastopt": sd["fastopt"],
            "state": state_meta, "params": nparams}
    members.insert(0, ("meta", np.array(json.dumps(meta, allow_nan=True))))

    directory = os.path.dirname(os.path.abspath(path))
    stem = _temp_stem(os.path.basename(path))
    _remove_stale_temps(directory, stem)
    try:
        st = os.stat(path)
        mode = stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else None
    except OSError:
        mode = None
    fd, tmp = _create_temp(directory, stem)
    try:
        with os.fdopen(fd, "w+b") as f:
            if mode is not None and hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            _write_file(f, members)
            f.flush()
            os.fsync(f.fileno())
            if fcntl is not None:  # POSIX: renamed while still locked (Windows cannot rename an open file)
                os.replace(tmp, path)
        if fcntl is None:
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable (POSIX); not possible everywhere
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------------
# Checkpoint files: reading (nothing in the file is trusted)
# ---------------------------------------------------------------------------------------------------

def _read_member(zf, info, what, kinds="iufc"):
    """One .npy member as an array, allocating only what the member's stored bytes hold."""
    with zf.open(info) as m:
        version = np.lib.format.read_magic(m)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(m)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(m)
        else:
            _fail(f"{what}: unsupported .npy version {version}")
        if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in kinds:
            _fail(f"{what} has dtype {dtype}, which a checkpoint does not hold")
        if not dtype.isnative:
            _fail(f"{what} has non-native byte order ({dtype.str})")
        if dtype.itemsize == 0 or not isinstance(shape, tuple) or any(
                type(d) is not int or d < 0 for d in shape):
            _fail(f"{what} has an invalid header (shape {_shown(shape)}, dtype {dtype})")
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        stored = info.file_size - m.tell()
        if nbytes != stored:
            _fail(f"{what}: its header describes {nbytes} bytes but {stored} are stored")
        flat = np.empty(count, dtype)
        view = memoryview(flat.view(np.uint8))
        done = 0
        while done < nbytes:  # the last read reaches the member's end, where zipfile checks its CRC-32
            got = m.readinto(view[done:done + _CHUNK])
            if not got:
                raise EOFError(f"{what} ended early")
            done += got
        if m.read(1):
            _fail(f"{what} has bytes after its data")
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


def _parse(f, path):
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        _fail(f"{path} is empty (0 bytes), not a fastopt checkpoint")
    tail = len(_TRAILER) + _DIGEST_LEN
    checked = False
    if size > tail:
        f.seek(size - tail)
        end = f.read(tail)
        if end.startswith(_TRAILER):
            if _digest(f, size - _DIGEST_LEN) != end[len(_TRAILER):]:
                _fail(f"{path} is damaged: its SHA-256 checksum does not match its contents (changed or cut "
                      f"short after it was written)")
            checked = True
    f.seek(0)
    zf = zipfile.ZipFile(f)
    infos = zf.infolist()
    names = [info.filename for info in infos]
    if "meta.npy" not in names:
        _fail(f"{path} is not a fastopt checkpoint (no 'meta' entry)")
    if len(set(names)) != len(names):
        _fail(f"{path} is corrupted: a member appears twice")
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            _fail(f"{path}: member {info.filename!r} is compressed or encrypted (fastopt.save writes neither)")
        if info.file_size != info.compress_size or info.file_size > size:
            _fail(f"{path} is corrupted: member {info.filename!r} has inconsistent sizes")
    by_name = {info.filename: info for info in infos}
    text = _read_member(zf, by_name["meta.npy"], f"{path}: meta", kinds="U")
    if text.shape != ():
        _fail(f"{path}: meta is not a single string")
    meta = json.loads(str(text[()]))
    if not isinstance(meta, dict):
        _fail(f"{path}: meta is not a JSON object")
    fmt = meta.get("format")
    if type(fmt) is not int or fmt not in (1, FILE_FORMAT):
        _fail(f"{path}: unsupported checkpoint format {_shown(fmt)} (this fastopt reads 1 and {FILE_FORMAT})")
    if fmt >= 2 and not checked:
        _fail(f"{path} is damaged: a format {fmt} checkpoint must end with its checksum")
    state_meta, groups, extra = meta.get("state"), meta.get("param_groups"), meta.get("fastopt")
    if not isinstance(state_meta, dict) or not isinstance(groups, list) or not isinstance(extra, dict):
        _fail(f"{path}: meta must have 'state' (object), 'param_groups' (list) and 'fastopt' (object)")
    nparams = meta.get("params", 0) if fmt >= 2 else 0
    if type(nparams) is not int or not 0 <= nparams <= len(names):
        _fail(f"{path}: meta 'params' must be a count of params, got {_shown(nparams)}")
    expected = {"meta.npy": None}
    layout = {}
    for key, entry in state_meta.items():
        if not _INDEX.fullmatch(key):
            _fail(f"{path}: state key {key!r} is not a param number")
        if not isinstance(entry, dict) or "step" not in entry or not isinstance(entry.get("arrays"), list):
            _fail(f"{path}: state of param {key} must be an object with 'step' and 'arrays'")
        arrays = entry["arrays"]
        if any(not isinstance(a, str) or not _MEMBER_NAME.fullmatch(a) or a == "step" for a in arrays) or len(
                set(arrays)) != len(arrays):
            _fail(f"{path}: state of param {key} lists invalid array names {_shown(arrays)}")
        layout[int(key)] = (entry["step"], arrays)
        for a in arrays:
            expected[f"state/{key}/{a}.npy"] = (int(key), a)
    for i in range(nparams):
        expected[f"params/{i}.npy"] = ("param", i)
    if set(names) != set(expected):
        missing = sorted(set(expected) - set(names))
        unexpected = sorted(set(names) - set(expected))
        _fail(f"{path}: the members do not match its meta"
              + (f"; missing {', '.join(missing[:5])}" if missing else "")
              + (f"; unexpected {', '.join(map(repr, unexpected[:5]))}" if unexpected else ""))
    state = {i: {"step": step} for i, (step, _) in sorted(layout.items())}
    params = [None] * nparams if fmt >= 2 and nparams else None
    for name, where in expected.items():
        if where is None:
            continue
        array = _read_member(zf, by_name[name], f"{path}: {name[:-4]}")
        if where[0] == "param":
            params[where[1]] = array
        else:
            state[where[0]][where[1]] = array
    groups = [dict(g, betas=tuple(g["betas"])) if isinstance(g, dict) and isinstance(g.get("betas"), list) else g
              for g in groups]
    return {"state": state, "param_groups": groups, "fastopt": extra}, params


def _read(path):
    path = os.fspath(path)
    st = os.stat(path)  # FileNotFoundError / PermissionError: the caller's to handle
    if not stat.S_ISREG(st.st_mode):
        _fail(f"{path} is not a regular file ({'a directory' if stat.S_ISDIR(st.st_mode) else 'a special file'})")
    with open(path, "rb") as f:
        try:
            return _parse(f, path)
        except CheckpointError:
            raise
        except Exception as e:  # whatever a damaged zip, .npy header or JSON text raises
            raise CheckpointError(f"{path} is corrupted or not a fastopt checkpoint: {type(e).__name__}: "
                                  f"{_shown(str(e), 200)}") from None


def read(path) -> dict:
    """The state dict stored in a checkpoint file (NumPy arrays on the host; the params are not in it).
    CheckpointError for anything that is not an intact fastopt checkpoint."""
    return _read(path)[0]


def load(path, opt, *, params=None) -> None:
    """Restore `opt` from a checkpoint written by fastopt.save, and its params (in place, into the
    optimizer's own arrays, on their device) when the file has them. params=True requires them,
    params=False leaves the params alone. Everything is checked before anything is written:
    CheckpointError (a ValueError) naming what is wrong, and the optimizer and params unchanged."""
    _require_optimizer(opt)
    if params is not None and not isinstance(params, (bool, np.bool_)):
        raise TypeError(f"params must be None, True or False, got {_shown(params)}")
    sd, saved = _read(path)
    if params and saved is None:
        _fail(f"{os.fspath(path)} holds no params (saved with params=False, or by fastopt 0.1)")
    _apply(opt, _plan(opt, sd, saved if params is not False else None))
