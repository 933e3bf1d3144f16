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
when it has one (ReduceLROnPlateau). Loading checks everything (optimizer, group and param counts,
hyperparameters, state names, shapes, dtypes) before it changes anything, and copies into the
optimizer's own state arrays, on the params' device.

    fastopt.save(path, opt)      .npz, written to a temporary file in the same directory, fsynced, then
                                 os.replace'd over `path`: a crash mid-write leaves the old file intact
    fastopt.load(path, opt)      reads it back (no pickle) and load_state_dict's it

    opt.torch_state_dict() / opt.load_torch_state_dict(sd): the same state as torch.optim.<Class>
    keeps it (Adagrad's "sum", NAdam's "mu_product", float32 "step" tensors), so a PyTorch user can
    switch in either direction without losing optimizer state.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
import zipfile

import numpy as np

__all__ = ["save", "load", "CheckpointError"]

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint or state dict that does not fit the optimizer, or a file that is not a checkpoint."""


def _to_host(a):
    """A NumPy copy of a state array (CuPy and Numba device arrays come back from the device)."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    if hasattr(a, "copy_to_host"):  # Numba device array
        return a.copy_to_host()
    from fastopt.backends.dispatch import as_numpy
    return np.array(as_numpy(a, "state"), copy=True)


def _copy_into(dst, src):
    """dst[...] = src, across devices (dst keeps its identity and device)."""
    if type(dst).__module__.startswith("cupy"):
        import cupy
        dst[...] = cupy.asarray(src)
        return
    if type(src).__module__.startswith("cupy"):
        src = src.get()
    if hasattr(dst, "copy_to_device"):  # Numba device array
        dst.copy_to_device(np.ascontiguousarray(np.asarray(src), dtype=dst.dtype))
        return
    from fastopt.backends.dispatch import as_numpy
    np.copyto(as_numpy(dst, "state"), np.asarray(src), casting="no")


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
# load_state_dict: check everything, then write
# ---------------------------------------------------------------------------------------------------

def _fail(msg):
    raise CheckpointError(msg)


def _check_groups(opt, groups):
    """The hyperparameters of each saved group, validated; returns new group dicts (without params)."""
    from fastopt.optim import _is_callable_lr
    if not isinstance(groups, (list, tuple)):
        _fail("state dict: 'param_groups' must be a list")
    if len(groups) != len(opt.param_groups):
        _fail(f"state dict has {len(groups)} param groups but the optimizer has {len(opt.param_groups)}")
    keys = opt._hyper_keys()
    out = []
    index = 0
    for gi, (saved, live) in enumerate(zip(groups, opt.param_groups)):
        if not isinstance(saved, dict) or "params" not in saved:
            _fail(f"state dict: param group {gi} is not a dict with 'params'")
        n = len(live["params"])
        if len(saved["params"]) != n:
            _fail(f"param group {gi} has {len(saved['params'])} params in the state dict but {n} in the optimizer")
        if list(saved["params"]) != list(range(index, index + n)):
            _fail(f"param group {gi}: params must be numbered {index}..{index + n - 1} in order, got "
                  f"{list(saved['params'])}")
        index += n
        missing = [k for k in keys if k not in saved]
        unknown = [k for k in saved if k not in keys and k != "params"]
        if missing or unknown:
            _fail(f"param group {gi} does not fit {opt.spec.class_name}: "
                  + (f"missing {', '.join(missing)}" if missing else "")
                  + ("; " if missing and unknown else "") + (f"unknown {', '.join(unknown)}" if unknown else ""))
        new = {k: (tuple(saved[k]) if k == "betas" else saved[k]) for k in keys}
        try:
            opt._normalise_group(new, f"param group {gi}")
            hp = opt._resolve_hp(new, 0)
            opt.spec.validate(hp, 1)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"param group {gi}: {e}") from None
        if _is_callable_lr(live["lr"]):
            new["lr"] = live["lr"]  # keep the schedule: it is a function of the restored step count
        out.append(new)
    return out


def _check_state(opt, state, new_groups):
    """{flat index: (step, {name: array})} after checking names, shapes and dtypes; and the group steps."""
    if not isinstance(state, dict):
        _fail("state dict: 'state' must be a dict")
    n = len(opt._params)
    for key in state:
        if not isinstance(key, numbers.Integral) or not 0 <= int(key) < n:
            _fail(f"state dict has state for param {key!r} but the optimizer has params 0..{n - 1}")
    steps = []
    checked = {}
    for gi, buckets in enumerate(opt._buckets):
        hp = opt._resolve_hp(new_groups[gi], 0)
        active = [name for name, used in zip(opt.spec.states, opt.spec.active_states(hp)) if used]
        group_step = None
        for bucket in buckets:
            for j, (i, p) in enumerate(zip(bucket.indices, bucket.params)):
                entry = state.get(i, {})
                step = entry.get("step", 0)
                if not isinstance(step, numbers.Integral) or isinstance(step, (bool, np.bool_)) or step < 0:
                    _fail(f"state of param {i}: invalid step {step!r}")
                step = int(step)
                if group_step is None:
                    group_step = step
                elif step != group_step:
                    _fail(f"param group {gi}: params have different step counts ({group_step} and {step} at "
                          f"param {i}); fastopt keeps one count per group")
                names = [k for k in entry if k != "step"]
                unknown = [k for k in names if k not in opt.spec.states]
                if unknown:
                    _fail(f"state of param {i} has {', '.join(unknown)}, which {opt.spec.class_name} does not keep "
                          f"(it keeps {', '.join(opt.spec.states)})")
                if step > 0:
                    missing = [k for k in active if k not in entry]
                    if missing:
                        _fail(f"state of param {i} is missing {', '.join(missing)} (needed with these "
                              f"hyperparameters)")
                arrays = {}
                for name in names:
                    a = entry[name]
                    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
                        _fail(f"state of param {i}: {name} is not an array ({type(a).__name__})")
                    if tuple(a.shape) != tuple(p.shape):
                        _fail(f"state of param {i}: {name} has shape {tuple(a.shape)}, expected {tuple(p.shape)} "
                              f"(the shape of the param)")
                    # the dtype of the optimizer's own state array (float16 device params keep float32
                    # state), else the param's
                    live = bucket.states.get(name)
                    want = _dtype_name(live[j].dtype if live is not None else p.dtype)
                    if _dtype_name(a.dtype) != want:
                        _fail(f"state of param {i}: {name} has dtype {_dtype_name(a.dtype)}, expected {want}")
                    arrays[name] = a
                checked[i] = arrays
        steps.append(group_step or 0)
    return checked, steps


def load_state_dict(opt, sd: dict) -> None:
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        _fail("not an optimizer state dict (expected the keys 'state' and 'param_groups')")
    meta = sd.get("fastopt") or {}
    if meta.get("optimizer") not in (None, opt.spec.name):
        _fail(f"the state dict is for {meta['optimizer']!r}, this optimizer is {opt.spec.name!r}")
    shapes, dtypes = meta.get("param_shapes"), meta.get("param_dtypes")
    if shapes is not None:
        if len(shapes) != len(opt._params):
            _fail(f"the state dict has {len(shapes)} params but the optimizer has {len(opt._params)}")
        for i, (shape, dtype, p) in enumerate(zip(shapes, dtypes, opt._params)):
            if tuple(shape) != tuple(p.shape) or dtype != _dtype_name(p.dtype):
                _fail(f"param {i} is {dtype}{list(shape)} in the state dict but {_dtype_name(p.dtype)}"
                      f"{list(p.shape)} in the optimizer")
    new_groups = _check_groups(opt, sd["param_groups"])
    arrays, steps = _check_state(opt, sd["state"], new_groups)
    schedules = meta.get("lr_schedules") or [None] * len(new_groups)
    skipped = meta.get("skipped_steps", opt.skipped_steps)
    # everything checked: write
    for gi, (live, new) in enumerate(zip(opt.param_groups, new_groups)):
        live.update(new)
        saved_schedule = schedules[gi] if gi < len(schedules) else None
        loader = getattr(live["lr"], "load_state_dict", None)
        if saved_schedule and saved_schedule.get("state") is not None and loader is not None:
            loader(saved_schedule["state"])
        opt._hp_cache[gi] = None
        opt._group_steps[gi] = steps[gi]
        hp = opt._resolve_hp(live, steps[gi])
        opt._last_lr[gi] = hp["lr"]
        for bucket in opt._buckets[gi]:
            opt._ensure_states(bucket, hp)
            for j, i in enumerate(bucket.indices):
                for name, target in bucket.states.items():
                    if name in arrays[i]:
                        _copy_into(target[j], arrays[i][name])
                    else:  # not saved (step 0, or a state this configuration does not use): zeros
                        _copy_into(target[j], np.zeros(tuple(target[j].shape), _dtype_name(target[j].dtype)))
    opt._skipped_host = int(skipped)
    opt._skipped_device = None


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


def from_torch_state_dict(opt, sd: dict, step=None) -> None:
    """Load a torch.optim state dict. `step` sets the group counts for SGD, whose torch state has no
    step (default: 1 when momentum buffers exist, else 0); the other optimizers take torch's."""
    _torch()
    _require_torch_class(opt)
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        _fail("not a torch.optim state dict (expected the keys 'state' and 'param_groups')")
    keys = set(opt._hyper_keys())
    groups = []
    for gi, g in enumerate(sd["param_groups"]):
        new = {}
        for k, v in g.items():
            if k in keys or k == "params":
                new[k] = _plain(v) if k != "params" else list(v)
            elif k == "decoupled_weight_decay" and opt.spec.name in ("adam", "adamw"):
                if bool(v) != (opt.spec.name == "adamw"):
                    _fail(f"param group {gi}: torch decoupled_weight_decay={v} is "
                          f"{'AdamW' if v else 'Adam'}; load it into fastopt.{'AdamW' if v else 'Adam'}")
            elif k in _TORCH_ONLY_KEYS:
                continue
            else:
                _fail(f"param group {gi}: torch key {k!r}={v!r} has no fastopt.{opt.spec.class_name} equivalent")
        groups.append(new)
    state = {}
    for i, entry in sd["state"].items():
        out = {}
        for name, value in entry.items():
            if name == "mu_product":
                continue  # recomputed from the step count (specs.nadam_mu_product)
            if name == "step":
                t = float(value)
                if not t.is_integer():
                    _fail(f"state of param {i}: torch step {t} is not a whole number")
                out["step"] = int(t)
                continue
            if value is None:
                continue
            out[_FROM_TORCH_STATE_NAMES.get(name, name)] = value.detach().cpu().numpy()
        state[int(i)] = out
    if opt.spec.name == "sgd":
        for gi, g in enumerate(groups):
            has_buffers = any("momentum_buffer" in state.get(i, {}) for i in g["params"])
            t = step if step is not None else (1 if has_buffers else 0)
            for i in g["params"]:
                state.setdefault(int(i), {})["step"] = t
    load_state_dict(opt, {"state": state, "param_groups": groups, "fastopt": {"optimizer": opt.spec.name}})


# ---------------------------------------------------------------------------------------------------
# .npz checkpoints
# ---------------------------------------------------------------------------------------------------

def save(path, opt) -> None:
    """Write opt.state_dict() to `path` (.npz) atomically: temporary file in the same directory, fsync,
    os.replace. Arrays are stored as state/<param>/<name>; everything else as JSON in 'meta'."""
    sd = opt.state_dict()
    arrays = {}
    state_meta = {}
    for i, entry in sd["state"].items():
        state_meta[str(i)] = {"step": entry["step"], "arrays": [k for k in entry if k != "step"]}
        for name, a in entry.items():
            if name != "step":
                arrays[f"state/{i}/{name}"] = a
    meta = {"format": FORMAT, "param_groups": sd["param_groups"], "fastopt": sd["fastopt"], "state": state_meta}
    arrays["meta"] = np.array(json.dumps(meta, allow_nan=True))
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fastopt-", suffix=".npz.tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
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


def read(path) -> dict:
    """The state dict stored in a checkpoint file (NumPy arrays on the host)."""
    path = os.fspath(path)
    try:
        # every member's CRC-32 first: np.load alone does not always read a member to its end, where
        # zipfile checks it, so a flipped bit inside an array could otherwise load silently
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
        if bad is not None:
            raise zipfile.BadZipFile(f"bad CRC-32 for {bad}")
        with np.load(path, allow_pickle=False) as npz:
            if "meta" not in npz.files:
                _fail(f"{path} is not a fastopt checkpoint (no 'meta' entry)")
            meta = json.loads(str(npz["meta"][()]))
            if meta.get("format") != FORMAT:
                _fail(f"{path}: unsupported checkpoint format {meta.get('format')!r} (this fastopt reads {FORMAT})")
            state = {}
            for key, entry in meta["state"].items():
                out = {"step": entry["step"]}
                for name in entry["arrays"]:
                    name_in_file = f"state/{key}/{name}"
                    if name_in_file not in npz.files:
                        _fail(f"{path}: missing array {name_in_file}")
                    out[name] = npz[name_in_file]
                state[int(key)] = out
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is corrupted or not a fastopt checkpoint: {type(e).__name__}: {e}") from None
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups, "fastopt": meta["fastopt"]}


def load(path, opt) -> None:
    """Restore `opt` from a checkpoint written by fastopt.save: checks the optimizer, names, shapes and
    dtypes (CheckpointError, a ValueError, naming what does not fit; nothing is changed then) and
    copies the state onto the params' device."""
    opt.load_state_dict(read(path))
