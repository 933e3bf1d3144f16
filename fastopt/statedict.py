"""The state-dict layout: Optimizer.state_dict / load_state_dict and the torch.optim conversion.

The state dict has torch.optim's layout, with NumPy arrays and plain Python values (the layout, the
checks and their order are described in fastopt/checkpoint.py, which stores it in files).

This module sits below the optimizer classes and the checkpoint files: it imports neither. It works
through the optimizer's public state API only:
    opt.export_state() -> OptimizerState      the state in registry terms (live arrays, no copies)
    opt.check_state(OptimizerState, params)   phase 1: checks what only the optimizer knows (its state
                                              arrays' dtypes, its params), writes nothing -> a plan
    opt.apply_state(plan)                     phase 2: writes; cannot fail on the data
and knows the optimizer only through its spec (names, hyperparameters, torch hooks).
"""
from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastopt.arrays import to_host
from fastopt.precision import QuantizedState, signed_state
from fastopt.schedules import is_schedule
from fastopt.specs import REGISTRY, class_taking, shown

__all__ = ["OptimizerState", "CheckpointError", "state_dict", "load_state_dict", "plan_load", "apply_load",
           "to_torch_state_dict", "from_torch_state_dict", "check_array"]

FORMAT = 1         # layout of the state dict (sd["fastopt"]["format"])
# 8-bit state (state_dtype="int8") in a state dict: "<name>" holds the uint8 codes and "<name>_absmax" the
# float32 scales (one per 256 elements); loading pairs them into a precision.QuantizedState
ABSMAX = "_absmax"
MAX_COUNT = 2 ** 53 - 1  # largest step count / skip count: the next step number is exact in float64


@dataclass
class OptimizerState:
    """An optimizer's state in registry terms: what state dicts and checkpoints are made of.

    hyperparameters: per group, registry names (beta1, beta2, not betas). Exported: the group's values as
        set (lr may be a schedule). To load: checked values (spec.validate), lr a float or the schedule
        to keep.
    steps: per group, the number of updates applied.
    lrs: per group, the lr of the group's next step (a schedule evaluated at the step count); to load,
        None where the schedule is to be evaluated at the restored step (by check_state, which checks it).
    states: per param (flat number, the order of opt.params): state name -> array. Exported: the live
        arrays (not copies). To load: the arrays to copy in; a slot not given is zero-filled.
    skipped_steps: steps skipped for a NaN/Inf gradient (None when loading: keep the current count).
    train_mode: schedule-free's mode (spec.train_eval), which says whether the params hold y (train) or the
        averaged x (eval); None for the other optimizers, and when loading a state that did not record it
        (keep the current mode).
    state_dtype, state_dtype_declared: when loading, the state_dtype= the state dict was saved with
        ("float32", "bfloat16", "float16", "int8", or None: the default) and whether it says so (a state dict
        of an older fastopt does not): the float state of a consistent state dict loads converted into
        another state_dtype's (Optimizer.check_state); other dtypes are refused.
    """
    optimizer: str
    hyperparameters: list[dict]
    steps: list[int]
    lrs: list = field(default_factory=list)
    states: dict[int, dict[str, Any]] = field(default_factory=dict)
    skipped_steps: int | None = None
    train_mode: bool | None = None
    state_dtype: str | None = None
    state_dtype_declared: bool = False


class CheckpointError(ValueError):
    """A checkpoint or state dict that does not fit the optimizer, or a file that is not a checkpoint."""


def fail(msg):
    """Raise the CheckpointError every load problem is."""
    raise CheckpointError(msg)


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
        fail(f"{what} must be a whole number, got {shown(value)} ({type(value).__name__})")
    value = int(value)
    if not 0 <= value <= MAX_COUNT:
        fail(f"{what} is {shown(value)}, out of range (0 to 2**53 - 1)")
    return value


# ---------------------------------------------------------------------------------------------------
# state_dict
# ---------------------------------------------------------------------------------------------------

def _group_keys(spec):
    """torch-style group keys: beta1 and beta2 appear as `betas`."""
    return tuple("betas" if h.name == "beta1" else h.name for h in spec.hypers if h.name != "beta2")


def _torch_style(spec, hp: Mapping) -> dict:
    return {k: ((hp["beta1"], hp["beta2"]) if k == "betas" else hp[k]) for k in _group_keys(spec)}


def state_dict(opt) -> dict:
    """The optimizer's state dict: copies on the host, never aliasing the live state."""
    st = opt.export_state()
    spec = opt.spec
    groups, schedules = [], []
    index = 0
    for gi, (live, hp) in enumerate(zip(opt.param_groups, st.hyperparameters)):
        out = {}
        for k, value in _torch_style(spec, hp).items():
            out[k] = _plain(st.lrs[gi] if k == "lr" else value)
        out["params"] = list(range(index, index + len(live["params"])))
        index += len(live["params"])
        groups.append(out)
        lr = hp["lr"]
        if is_schedule(lr):
            inner = getattr(lr, "state_dict", None)
            schedules.append({"repr": repr(lr), "state": inner() if inner is not None else None})
        else:
            schedules.append(None)
    state = {}
    group_of = [gi for gi, g in enumerate(opt.param_groups) for _ in g["params"]]
    for i, arrays in st.states.items():
        entry = {"step": st.steps[group_of[i]]}
        for name in (*spec.states, KAHAN):
            if name in arrays:
                a = arrays[name]
                if isinstance(a, QuantizedState):  # 8-bit state: the codes under its name, the scales beside
                    entry[name] = to_host(a.codes)
                    entry[name + ABSMAX] = to_host(a.absmax)
                else:
                    entry[name] = to_host(a)
        state[i] = entry
    state = dict(sorted(state.items()))
    params = opt.params
    return {
        "state": state,
        "param_groups": groups,
        "fastopt": {
            "optimizer": spec.name,
            "format": FORMAT,
            "skipped_steps": st.skipped_steps,
            **({} if st.train_mode is None else {"train_mode": st.train_mode}),
            "state_dtype": state_dtype_name(opt.state_dtype),
            "param_shapes": [list(map(int, p.shape)) for p in params],
            "param_dtypes": [_dtype_name(p.dtype) for p in params],
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
            fail(f"{where}: {hyper.name} must be a bool, got {shown(value)} ({type(value).__name__})")
        return bool(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        fail(f"{where}: {hyper.name} must be a real number, got {shown(value)} ({type(value).__name__})")
    try:
        return float(value)
    except (OverflowError, ValueError, TypeError):
        fail(f"{where}: Invalid {hyper.label or hyper.name}: {shown(value)} (not a float)")


def state_dtype_name(state_dtype) -> str | None:
    """An optimizer's state_dtype= as saved: None (the default), "int8", or the dtype's name."""
    if state_dtype is None or isinstance(state_dtype, str) and state_dtype == "int8":
        return state_dtype
    return np.dtype(state_dtype).name


def _saved_state_dtype(meta) -> tuple[str | None, bool]:
    """(the state_dtype a state dict declares, None for the default; whether it declares one at all)."""
    if not isinstance(meta, Mapping) or "state_dtype" not in meta:
        return None, False
    value = meta["state_dtype"]
    if value is not None and (not isinstance(value, str) or value not in ("float32", "float64", "bfloat16",
                                                                           "float16", "int8")):
        fail(f"state dict: 'state_dtype' must be None or a state dtype's name, got {shown(value)}")
    return value, True


def _check_meta(opt, meta):
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        fail(f"state dict: 'fastopt' must be a dict, got {type(meta).__name__}")
    name = meta.get("optimizer")
    if name is not None:
        if not isinstance(name, str):
            fail(f"state dict: 'optimizer' must be a name, got {shown(name)}")
        if name != opt.spec.name:
            fail(f"the state dict is for {name!r}, this optimizer is {opt.spec.name!r}")
    if "format" in meta:
        fmt = meta["format"]
        if type(fmt) is not int or fmt != FORMAT:
            fail(f"state dict: unsupported format {shown(fmt)} (this fastopt reads {FORMAT})")
    live_params = opt.params
    n = len(live_params)
    shapes, dtypes = meta.get("param_shapes"), meta.get("param_dtypes")
    for key, value in (("param_shapes", shapes), ("param_dtypes", dtypes)):
        if value is not None and not isinstance(value, (list, tuple)):
            fail(f"state dict: '{key}' must be a list, got {type(value).__name__}")
        if value is not None and len(value) != n:
            fail(f"the state dict has {len(value)} params but the optimizer has {n}")
    for i, p in enumerate(live_params):
        shape = shapes[i] if shapes is not None else None
        dtype = dtypes[i] if dtypes is not None else None
        if shapes is not None:
            if not isinstance(shape, (list, tuple)) or any(
                    isinstance(d, (bool, np.bool_)) or not isinstance(d, numbers.Integral) for d in shape):
                fail(f"state dict: param_shapes[{i}] is not a shape: {shown(shape)}")
            shape = [int(d) for d in shape]
        if dtypes is not None and not isinstance(dtype, str):
            fail(f"state dict: param_dtypes[{i}] is not a dtype name: {shown(dtype)}")
        live_shape, live_dtype = [int(d) for d in p.shape], _dtype_name(p.dtype)
        if (shape is not None and shape != live_shape) or (dtype is not None and dtype != live_dtype):
            fail(f"param {i} is {dtype if dtype is not None else '?'}{shape if shape is not None else ''} in the "
                  f"state dict but {live_dtype}{live_shape} in the optimizer")
    skipped = None
    if "skipped_steps" in meta:
        skipped = _count("state dict: skipped_steps", meta["skipped_steps"])
    train_mode = meta.get("train_mode")
    if train_mode is not None:
        if not opt.spec.train_eval:
            fail(f"state dict: 'train_mode' is for schedule-free optimizers, this optimizer is {opt.spec.name!r}")
        if not isinstance(train_mode, (bool, np.bool_)):
            fail(f"state dict: 'train_mode' must be a bool, got {shown(train_mode)}")
        train_mode = bool(train_mode)
    schedules = meta.get("lr_schedules")
    ngroups = len(opt.param_groups)
    if schedules is None:
        schedules = [None] * ngroups
    if not isinstance(schedules, (list, tuple)):
        fail(f"state dict: 'lr_schedules' must be a list (one entry per group), got {shown(schedules)}")
    if len(schedules) != ngroups:  # checked after the groups themselves (a clearer message first)
        return skipped, train_mode, len(schedules)
    for gi, entry in enumerate(schedules):
        if entry is not None and not isinstance(entry, Mapping):
            fail(f"state dict: lr_schedules[{gi}] must be a dict or None, got {shown(entry)}")
    return skipped, train_mode, [(entry or {}).get("state") for entry in schedules]


def _check_groups(opt, groups):
    """Each saved group's hyperparameters, checked with the registry spec and converted: a list of
    (group dict without params, registry-named hp dict)."""
    spec = REGISTRY[opt.spec.name]
    if not isinstance(groups, (list, tuple)):
        fail(f"state dict: 'param_groups' must be a list, got {type(groups).__name__}")
    if len(groups) != len(opt.param_groups):
        fail(f"state dict has {len(groups)} param groups but the optimizer has {len(opt.param_groups)}")
    keys = _group_keys(spec)
    hypers = {h.name: h for h in spec.hypers}
    out = []
    index = 0
    for gi, (saved, live) in enumerate(zip(groups, opt.param_groups)):
        where = f"param group {gi}"
        if not isinstance(saved, Mapping) or "params" not in saved:
            fail(f"state dict: {where} is not a dict with 'params'")
        numbers_ = saved["params"]
        n = len(live["params"])
        if not isinstance(numbers_, (list, tuple)):
            fail(f"{where}: 'params' must be a list of param numbers, got {shown(numbers_)}")
        if len(numbers_) != n:
            fail(f"{where} has {len(numbers_)} params in the state dict but {n} in the optimizer")
        if any(isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral) or int(k) != index + j
               for j, k in enumerate(numbers_)):
            fail(f"{where}: params must be numbered {index}..{index + n - 1} in order, got {shown(list(numbers_))}")
        index += n
        missing = [k for k in keys if k not in saved]
        unknown = [shown(k) if not isinstance(k, str) else k for k in saved if k not in keys and k != "params"]
        if missing or unknown:
            fail(f"{where} does not fit {opt.spec.class_name}: "
                  + (f"missing {', '.join(missing)}" if missing else "")
                  + ("; " if missing and unknown else "") + (f"unknown {', '.join(unknown)}" if unknown else ""))
        hp = {}
        for k in keys:
            value = saved[k]
            if k == "betas":
                if not isinstance(value, (list, tuple)) or len(value) != 2:
                    fail(f"{where}: betas must be a pair (beta1, beta2), got {shown(value)}")
                hp["beta1"] = _hyper_value(where, hypers["beta1"], value[0])
                hp["beta2"] = _hyper_value(where, hypers["beta2"], value[1])
            else:
                hp[k] = _hyper_value(where, hypers[k], value)
        try:
            spec.validate(hp, 1)
        except (TypeError, ValueError, ArithmeticError) as e:
            raise CheckpointError(f"{where}: {e}") from None
        out.append(hp)
    return out


def check_array(what, a, shape, dtype):
    """A saved array that must become `dtype`[shape] without conversion (dtype None: an array that is
    not loaded, checked for its kind, byte order and shape only)."""
    if isinstance(a, np.ma.MaskedArray):
        fail(f"{what} is a masked array; save plain arrays")
    if not (isinstance(a, np.ndarray) or type(a).__module__.startswith("cupy") or hasattr(a, "copy_to_host")):
        fail(f"{what} is not an array ({type(a).__name__})")
    try:
        got = np.dtype(a.dtype)
    except TypeError:
        fail(f"{what} has an unknown dtype {shown(a.dtype)}")
    if not got.isnative:
        fail(f"{what} has non-native byte order ({got.str}); arrays are loaded without conversion")
    if dtype is not None and got != dtype:
        fail(f"{what} has dtype {got.name if not got.fields else got}, expected {np.dtype(dtype).name}")
    if tuple(int(d) for d in a.shape) != tuple(int(d) for d in shape):
        fail(f"{what} has shape {tuple(a.shape)}, expected {tuple(shape)} (the shape of the param)")
    return a


def _check_state(opt, state, new_hps):
    """The group step counts, and per param the saved arrays (name -> array), checked against the spec:
    one step count per group, known state names, the states these hyperparameters need."""
    if not isinstance(state, Mapping):
        fail(f"state dict: 'state' must be a dict, got {type(state).__name__}")
    n = len(opt.params)
    for key in state:
        if isinstance(key, (bool, np.bool_)) or not isinstance(key, numbers.Integral) or not 0 <= int(key) < n:
            fail(f"state dict has state for param {shown(key)} but the optimizer has params 0..{n - 1}")
    known = opt.spec.states + ((KAHAN,) if getattr(opt, "kahan", False) else ())
    steps, arrays_of = [], {}
    index = 0
    for gi, live in enumerate(opt.param_groups):
        hp = new_hps[gi]
        active = [name for name, used in zip(known, opt.spec.active_states(hp)) if used]
        group_step = None
        # states no param of the group has saved that the next step makes (SGD's buffer): all or none
        in_group = {k for i in range(index, index + len(live["params"])) if isinstance(state.get(i), Mapping)
                    for k in state[i]}
        unmade = opt.spec.unmade_states(active, in_group)
        for i in range(index, index + len(live["params"])):
            entry = state.get(i, {})
            if not isinstance(entry, Mapping):
                fail(f"state of param {i} must be a dict, got {shown(entry)}")
            step = _count(f"state of param {i}: step", entry.get("step", 0))
            if group_step is None:
                group_step = step
            elif step != group_step:
                fail(f"param group {gi}: params have different step counts ({group_step} and {step} at "
                      f"param {i}); fastopt keeps one count per group")
            names = [k for k in entry if k != "step" and not (isinstance(k, str) and k.endswith(ABSMAX) and
                                                           k[:-len(ABSMAX)] in known)]
            unknown = [k if isinstance(k, str) else shown(k) for k in names if k not in known]
            if unknown:
                fail(f"state of param {i} has {', '.join(unknown)}, which {opt.spec.class_name} does not keep "
                      f"(it keeps {', '.join(known)})")
            if step > 0:
                missing = [k for k in active if k not in entry and k not in unmade]
                if missing:
                    fail(f"state of param {i} is missing {', '.join(missing)} (needed with these "
                          f"hyperparameters)")
            arrays_of[i] = {name: _paired(i, name, entry) for name in names}
            orphans = [k for k in entry if isinstance(k, str) and k.endswith(ABSMAX) and k[:-len(ABSMAX)] in known
                       and k[:-len(ABSMAX)] not in entry]
            if orphans:
                fail(f"state of param {i} has {orphans[0]} without {orphans[0][:-len(ABSMAX)]} (the codes of "
                      f"8-bit state)")
        index += len(live["params"])
        steps.append(group_step or 0)
    return arrays_of, steps


def _paired(i, name, entry):
    """entry[name], or with entry[name + "_absmax"] beside it, the 8-bit state they make (codes uint8,
    scales float32 1-D; their shapes are checked against the param by the optimizer's check_state)."""
    a = entry[name]
    scales = entry.get(name + ABSMAX)
    if scales is None:
        return a
    for what, arr, dtype in ((name, a, np.uint8), (name + ABSMAX, scales, np.float32)):
        if not isinstance(arr, np.ndarray):
            fail(f"state of param {i}: {what} is not an array ({type(arr).__name__})")
        if arr.dtype != dtype:
            fail(f"state of param {i}: {what} has dtype {arr.dtype}, expected {np.dtype(dtype).name} (8-bit state)")
    if scales.ndim != 1:
        fail(f"state of param {i}: {name + ABSMAX} has shape {scales.shape}, expected one dimension")
    return QuantizedState(a, scales, signed_state(name))


def _check_schedules(opt, new_groups, saved_states, steps):
    """Per group: (schedule to load into, its saved state) or None, and the lr of the group's next step.
    A schedule's saved state is loaded into a copy first, so a state that does not fit, or gives no valid lr
    at the restored step, fails here. A schedule that deepcopy cannot copy (it holds a lock, say) is tried in
    place and put back from its own state_dict(); one with neither is refused: it could not be checked."""
    lr_hyper = REGISTRY[opt.spec.name].hypers[0]
    loads, lrs = [], []
    for gi, (hp, live, saved, step) in enumerate(zip(new_groups, opt.param_groups, saved_states, steps)):
        schedule = live["lr"]
        if not is_schedule(schedule):
            loads.append(None)
            lrs.append(hp["lr"])
            continue
        hp["lr"] = schedule  # keep the schedule: it is a function of the restored step count
        load, lr = check_schedule_state(gi, schedule, saved, step, lr_hyper)
        loads.append(load)
        lrs.append(lr)
    return loads, lrs


def check_schedule_state(gi, schedule, saved, step, lr_hyper):
    """(load, lr): the saved state of group gi's lr schedule tried on a copy of `schedule` (CheckpointError if
    it does not fit, or gives no valid lr at the restored `step`), nothing changed; `load` is (schedule,
    saved) to apply once every check has passed (`schedule.load_state_dict(saved)`), None when there is no
    state to load; lr is the lr of the group's next step."""
    trial, load, restore = schedule, None, None
    if saved is not None and getattr(schedule, "load_state_dict", None) is not None:
        load = (schedule, saved)
        trial, restore = _trial_schedule(gi, schedule)
    try:
        if load is not None:
            try:
                trial.load_state_dict(copy.deepcopy(saved))
            except Exception as e:
                fail(f"param group {gi}: the saved state of its lr schedule does not fit "
                     f"{shown(schedule)}: {type(e).__name__}: {e}")
        return load, next_lr(gi, trial, step, lr_hyper)
    finally:
        if restore is not None:
            schedule.load_state_dict(restore)


def next_lr(gi, rate, step, lr_hyper):
    """The lr of group gi's next step: `rate` (a number, or a schedule evaluated at the restored step count)
    checked as any lr (lr_hyper: the spec's); CheckpointError otherwise."""
    try:
        return lr_hyper.validate(rate(step) if is_schedule(rate) else rate)
    except Exception as e:
        fail(f"param group {gi}: its lr schedule gives no valid learning rate at the restored step "
             f"{step}: {type(e).__name__}: {e}")


def _trial_schedule(gi, schedule):
    """(a schedule to try a saved state on, the state to put back into `schedule` afterwards or None)."""
    try:
        return copy.deepcopy(schedule), None
    except Exception as e:
        copy_error = f"{type(e).__name__}: {e}"
    saver = getattr(schedule, "state_dict", None)
    try:
        own = copy.deepcopy(saver()) if saver is not None else None
    except Exception as e:
        own, copy_error = None, f"{copy_error}; state_dict(): {type(e).__name__}: {e}"
    if own is None:
        fail(f"param group {gi}: its lr schedule {shown(schedule)} can be neither copied nor saved with "
             f"state_dict() ({copy_error}), so its saved state cannot be checked before it is loaded")
    return schedule, own


def plan_load(opt, sd, params=None):
    """Phase 1: everything load_state_dict (and checkpoint.load, with `params`) will write, checked;
    nothing written. The plan is applied by apply_load."""
    if not isinstance(sd, Mapping) or "state" not in sd or "param_groups" not in sd:
        fail("not an optimizer state dict (expected a dict with the keys 'state' and 'param_groups')")
    skipped, train_mode, saved_schedules = _check_meta(opt, sd.get("fastopt"))
    state_dtype, declared = _saved_state_dtype(sd.get("fastopt"))
    new_hps = _check_groups(opt, sd["param_groups"])
    if isinstance(saved_schedules, int):
        fail(f"state dict: 'lr_schedules' has {saved_schedules} entries for {len(new_hps)} param groups")
    arrays, steps = _check_state(opt, sd["state"], new_hps)
    loads, lrs = _check_schedules(opt, new_hps, saved_schedules, steps)
    new = OptimizerState(optimizer=opt.spec.name, hyperparameters=new_hps, steps=steps, lrs=lrs, states=arrays,
                         skipped_steps=skipped, train_mode=train_mode, state_dtype=state_dtype,
                         state_dtype_declared=declared)
    return opt, loads, opt.check_state(new, params)


# ---------------------------------------------------------------------------------------------------
# load_state_dict, phase 2: write
# ---------------------------------------------------------------------------------------------------

def apply_load(plan) -> None:
    """Phase 2: the schedules' saved state first, then the optimizer's own state."""
    opt, loads, state_plan = plan
    for load in loads:
        if load is not None:
            load[0].load_state_dict(load[1])
    opt.apply_state(state_plan)


def load_state_dict(opt, sd: dict) -> None:
    apply_load(plan_load(opt, sd))


# ---------------------------------------------------------------------------------------------------
# torch.optim conversion
# ---------------------------------------------------------------------------------------------------

# torch group keys with no fastopt meaning for the update itself (execution options). Adam's
# decoupled_weight_decay and Adagrad's initial_accumulator_value are registry hyperparameters (group keys);
# AdamW's fixed decoupled_weight_decay=True is its spec's torch_group_flags.
_TORCH_ONLY_KEYS = {"foreach", "fused", "capturable", "differentiable", "param_names"}
# what torch's lr schedulers write into the groups they drive (every LRScheduler: initial_lr; OneCycleLR and
# CyclicLR: the cycle's bounds; swa_utils.SWALR: swa_lr): the scheduler's, not the optimizer's (the group's lr
# is the scheduled value of the step reached), so a state dict of a scheduled run loads without them
_TORCH_SCHEDULER_KEYS = {"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "swa_lr"}


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError("converting to or from a torch.optim state dict needs torch installed") from None
    return torch


def _require_torch_class(opt):
    if opt.spec.torch_class is None:
        raise ValueError(f"torch.optim has no {opt.spec.class_name}: no torch state dict to convert to or from")


KAHAN = "kahan_comp"  # the state entry of the Kahan compensation (kahan=True)


def _to_state_dtypes(opt, state) -> None:
    """A torch state's float arrays converted to the optimizer's state dtypes (torch keeps the state of
    bfloat16 params in bfloat16; fastopt in float32 or its state_dtype): widened exactly, or rounded to
    nearest even (ml_dtypes' and NumPy's casts). Only between the 32- and 16-bit float types of 32- and
    16-bit params; anything else (float64 params or state) is left to the checks."""
    narrow = ("float32", "bfloat16", "float16")
    params = opt.params
    for i, entry in state.items():
        if not isinstance(i, int) or not 0 <= i < len(params) or _dtype_name(params[i].dtype) not in narrow:
            continue
        live = opt.state_arrays(i)
        for name, a in list(entry.items()):
            target = live.get(name)
            if isinstance(target, QuantizedState):  # 8-bit state: quantized when the plan is applied
                continue
            if target is None or not isinstance(a, np.ndarray) or a.dtype == target.dtype:
                continue
            if a.dtype.name in narrow and _dtype_name(target.dtype) in narrow:
                entry[name] = a.astype(np.dtype(target.dtype))


def to_torch_state_dict(opt) -> dict:
    """Reads the optimizer only (nothing to half-apply)."""
    torch = _torch()
    _require_torch_class(opt)
    spec = opt.spec
    names = spec.torch_state_names  # the spec's hooks say where torch keeps its state differently
    sd = state_dict(opt)
    steps = opt.export_state().steps
    # torch's scalar state (step counts, NAdam's mu_product, ASGD's eta and mu) is in its _get_scalar_dtype():
    # float64 under a float64 default dtype, else float32
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    state = {}
    for gi, group in enumerate(sd["param_groups"]):
        t = steps[gi]
        hp = None
        for i in group["params"]:
            entry = sd["state"][i]
            if t == 0 and not spec.torch_state_at_init:
                continue  # torch has no state for a param before its first step (Adagrad: it has)
            out = {}
            if spec.torch_step:
                out["step"] = torch.tensor(float(t), dtype=scalar)
            for name, a in entry.items():
                if name == KAHAN or name.endswith(ABSMAX):  # no compensation in torch; scales: used below
                    continue
                if name + ABSMAX in entry:  # 8-bit state: torch takes it dequantized to float32
                    a = QuantizedState(a, entry[name + ABSMAX], signed_state(name)).dequantize()
                if name != "step":
                    if a.dtype.itemsize == 2:  # 16-bit state: torch takes it widened (exactly) to float32
                        a = a.astype(np.float32)
                    out[names.get(name, name)] = torch.from_numpy(a)
            if spec.torch_extra_state:
                if hp is None:
                    hp = {h.name: (group["betas"][h.name == "beta2"] if h.name in ("beta1", "beta2")
                                   else group[h.name]) for h in spec.hypers}
                for name, value in spec.torch_extra_state.items():
                    out[name] = torch.tensor(value(hp, t), dtype=scalar)
            state[i] = out
    groups = [_torch_tuples(spec, dict(group, **spec.torch_group_flags)) for group in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def _torch_tuples(spec, group: dict) -> dict:
    """A group with the hyperparameters torch keeps as tuples folded as torch has them (Rprop's etas and
    step_sizes; betas are a tuple in fastopt's groups already), in place of their first member."""
    tuple_of = {names[0]: (key, names) for key, names in spec.torch_groups.items() if key != "betas"}
    if not tuple_of:
        return group
    members = {n for _, names in tuple_of.values() for n in names}
    out = {}
    for k, v in group.items():
        if k in tuple_of:
            key, names = tuple_of[k]
            out[key] = tuple(group[n] for n in names)
        elif k not in members:
            out[k] = v
    return out


def _torch_value(torch, where, value):
    """A torch group value as a plain Python value (torch allows 0-d tensors for lr and betas)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            fail(f"{where} is a tensor of {value.numel()} elements, expected a number")
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
            raise TypeError(f"step must be a whole number or None, got {shown(step)}")
        if not 0 <= int(step) <= MAX_COUNT:
            raise ValueError(f"Invalid step: {shown(step)} (0 to 2**53 - 1)")
        step = int(step)
    if not isinstance(sd, Mapping) or "state" not in sd or "param_groups" not in sd:
        fail("not a torch.optim state dict (expected a dict with the keys 'state' and 'param_groups')")
    if not isinstance(sd["param_groups"], (list, tuple)):
        fail(f"torch state dict: 'param_groups' must be a list, got {type(sd['param_groups']).__name__}")
    if not isinstance(sd["state"], Mapping):
        fail(f"torch state dict: 'state' must be a dict, got {type(sd['state']).__name__}")
    spec = opt.spec
    keys = set(_group_keys(spec))
    from_torch = {v: k for k, v in spec.torch_state_names.items()}
    groups = []
    for gi, g in enumerate(sd["param_groups"]):
        if not isinstance(g, Mapping) or "params" not in g:
            fail(f"torch state dict: param group {gi} is not a dict with 'params'")
        new = {}
        for k, v in g.items():
            if k == "params":
                if not isinstance(v, (list, tuple)) or any(
                        isinstance(i, (bool, np.bool_)) or not isinstance(i, numbers.Integral) for i in v):
                    fail(f"torch state dict: param group {gi}: 'params' must be a list of param numbers, "
                          f"got {shown(v)}")
                new[k] = [int(i) for i in v]
            elif k in keys:
                new[k] = _torch_value(torch, f"param group {gi}: {k}", v)
            elif k in spec.torch_groups:  # a torch tuple of fastopt hyperparameters (Rprop's etas)
                names = spec.torch_groups[k]
                value = _torch_value(torch, f"param group {gi}: {k}", v)
                if not isinstance(value, tuple) or len(value) != len(names):
                    fail(f"param group {gi}: {k} must be a tuple of {len(names)} numbers {names}, got {shown(v)}")
                new.update(zip(names, value))
            elif k in spec.torch_group_flags:
                if _plain(v) != spec.torch_group_flags[k]:
                    # the classes of the same kernel where this key is a hyperparameter take any value
                    other = class_taking(spec, k)
                    fail(f"param group {gi}: torch {k}={shown(v)} does not fit fastopt.{spec.class_name}, where it "
                          f"is always {spec.torch_group_flags[k]}"
                          + (f"; load it into fastopt.{other}" if other else ""))
            elif k in _TORCH_ONLY_KEYS or k in _TORCH_SCHEDULER_KEYS:
                continue
            else:
                fail(f"param group {gi}: torch key {shown(k)}={shown(v)} has no fastopt.{opt.spec.class_name} "
                      f"equivalent")
        groups.append(new)
    state = {}
    for i, entry in sd["state"].items():
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, numbers.Integral):
            fail(f"torch state dict has state for param {shown(i)}; expected param numbers")
        if not isinstance(entry, Mapping):
            fail(f"torch state of param {i} must be a dict, got {shown(entry)}")
        out = {}
        for name, value in entry.items():
            if name in spec.torch_extra_state:
                continue  # recomputed from the step count (the spec's torch_extra_state)
            if name == "step":
                try:
                    t = float(value.item() if isinstance(value, torch.Tensor) else value)
                except (TypeError, ValueError, RuntimeError, OverflowError):
                    fail(f"torch state of param {i}: step {shown(value)} is not a number")
                if not math.isfinite(t) or not t.is_integer():
                    fail(f"torch state of param {i}: step {t} is not a whole number")
                out["step"] = int(t)
                continue
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                fail(f"torch state of param {i}: {shown(name)} is not a tensor ({type(value).__name__})")
            try:
                array = to_host(value)  # any device; bfloat16 (torch's state for bfloat16 params) too
            except (TypeError, RuntimeError) as e:
                fail(f"torch state of param {i}: {shown(name)} ({value.dtype}) cannot be read as a NumPy "
                      f"array: {e}")
            out[from_torch.get(name, name)] = array
        state[int(i)] = out
    _to_state_dtypes(opt, state)
    if not spec.torch_step:  # torch keeps no step count (SGD): 1 when the group has state arrays, else 0
        for gi, g in enumerate(groups):
            has_buffers = any(any(k != "step" for k in state.get(i, {})) for i in g["params"])
            t = step if step is not None else (1 if has_buffers else 0)
            for i in g["params"]:
                state.setdefault(int(i), {})["step"] = t
    load_state_dict(opt, {"state": state, "param_groups": groups, "fastopt": {"optimizer": opt.spec.name}})


