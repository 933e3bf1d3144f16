"""Sharded checkpoints: one file per rank, written atomically, plus a manifest; loadable at any world size.

A checkpoint is a directory:

    manifest.json                      written last (the commit point), atomically, by rank 0
    shard-<rank>-of-<world>-<id>.npz   one per rank: for each bucket b, b<b>_params (this rank's shard of
                                       the params) and b<b>_<state> (its optimizer state), padding included

Every file is written to a temporary name in the directory, fsynced and renamed (os.replace); the manifest
names the files of one save (a fresh <id> per save) with their SHA-256, so a crash mid-save leaves the
previous checkpoint (its manifest and files) intact; files no manifest names any more are removed after
the commit. The manifest holds the format, the optimizer, the world size, the bucket size and the
buckets, each param's shape and dtype, the hyperparameters (the lr as a number, plus the schedule's repr
and its own state_dict() when it was one), the step and skip counts and the state names.

    ShardedOptimizer.save(path) / save(opt, path)   collective: every rank writes its file; one all-reduce
                                                    collects the checksums and the success of every rank
    ShardedOptimizer.load(path) / load(opt, path)   collective: re-shards onto this world size; each rank
                                                    reads only the files overlapping its shard, checks
                                                    everything (manifest, checksums, shapes, dtypes,
                                                    optimizer, hyperparameters, counts) and writes nothing
                                                    until every rank has (one all-reduce of a flag); a
                                                    problem is a CheckpointError on every rank
    gather(path, file)                              one process: the sharded checkpoint as an ordinary
                                                    fastopt checkpoint (fastopt.save's format, params
                                                    included), loadable by the single-process class
    scatter(file, path, world_size)                 one process: an ordinary checkpoint (one param group)
                                                    as a sharded one for `world_size` ranks

Precision modes (ShardedOptimizer(..., state_dtype=, kahan=, stochastic_rounding=, seed=)): the manifest
records them ("precision") and the layout's segment ("segment": 256 with 8-bit state, layout.py); 16-bit
arrays (bfloat16/float16 params, 16-bit state, the Kahan compensation "kahan_comp") are stored as their
uint16 bits; 8-bit state as b<b>_<state> (uint8 codes, one per element) and b<b>_<state>_absmax (float32,
one per 256 elements of the shard). Re-sharding copies whole 256-blocks (both layouts start every param and
every shard at a multiple of 256, so a block never spans two files). A checkpoint loads into an optimizer
with the same state_dtype and kahan (else CheckpointError naming both); stochastic_rounding and seed are the
loading optimizer's.

Loading keeps the loading optimizer's lr schedule when it has one (the step count is restored) and restores
the schedule's own state into it (ReduceLROnPlateau's reduced lr, best metric and counters), checked on a copy
first, like fastopt.load; else it takes the saved lr. gather() and scatter() carry the schedule's entry over
to the ordinary checkpoint and back. The hyperparameters that decide which state arrays exist
(amsgrad, momentum, centered) must give the same state arrays.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import re
import secrets

import numpy as np

from fastopt import optim
from fastopt.checkpoint import CheckpointError, load as load_file, read as read_file, save as save_file, write_atomic
from fastopt.optim import OptimizerState
from fastopt.distributed.layout import DEFAULT_BUCKET_BYTES, ShardLayout
from fastopt.functional import init_state
from fastopt.precision import QUANT_BLOCK, QuantizedState, is_16bit, quant_blocks
from fastopt.schedules import Schedule, is_schedule
from fastopt.specs import REGISTRY, get_spec
from fastopt.statedict import check_schedule_state

__all__ = ["save", "load", "gather", "scatter", "read_manifest", "CheckpointError"]

FORMAT = "fastopt-sharded-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
_SHARD_NAME = re.compile(r"shard-[0-9]{5}-of-[0-9]{5}-[0-9a-f]{16}\.npz")
MAX_COUNT = 2 ** 53 - 1


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------

def _write_bytes(path: str, data: bytes) -> None:
    """`data` into `path`, atomically (fastopt.checkpoint.write_atomic: a crash leaves the old file)."""
    write_atomic(path, lambda f: f.write(data))


def _shard_bytes(members: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **members)  # a zip of .npy members: np.load reads it, no pickle
    return buf.getvalue()


def _shard_name(rank: int, world: int, token: str) -> str:
    return f"shard-{rank:05d}-of-{world:05d}-{token}.npz"


ABSMAX = "_absmax"  # the scales of 8-bit state beside its codes (the state dicts' key)


def _stored(a) -> np.ndarray:
    """An array as written to a shard file: 16-bit floats as their uint16 bits (np.save cannot describe
    ml_dtypes' bfloat16)."""
    a = np.ascontiguousarray(a)
    return a.view(np.uint16) if a.dtype.itemsize == 2 and a.dtype.kind in "fV" else a


def _members(layout: ShardLayout, shard_params: list, shard_states: list) -> dict:
    out = {}
    for b in layout.buckets:
        out[f"b{b.index}_params"] = _stored(shard_params[b.index])
        for name, a in shard_states[b.index].items():
            if isinstance(a, QuantizedState):
                out[f"b{b.index}_{name}"] = np.ascontiguousarray(a.codes)
                out[f"b{b.index}_{name}{ABSMAX}"] = np.ascontiguousarray(a.absmax)
            else:
                out[f"b{b.index}_{name}"] = _stored(a)
    return out


DEFAULT_PRECISION = {"state_dtype": None, "kahan": False, "stochastic_rounding": False, "seed": 0}


def _precision_for_file(precision: dict) -> dict:
    """The precision options as JSON (state_dtype as a name)."""
    sd = precision.get("state_dtype")
    if sd is not None and not isinstance(sd, str):
        sd = np.dtype(sd).name
    return {"state_dtype": sd, "kahan": bool(precision.get("kahan")),
            "stochastic_rounding": bool(precision.get("stochastic_rounding")), "seed": int(precision.get("seed", 0))}


def state_templates(spec, layout: ShardLayout, hp: dict, precision: dict) -> list:
    """Per bucket, name -> a one-element array (or QuantizedState) of the dtype the state of that bucket's
    params has with these options: what the shard files must hold (the single-process rule, init_state)."""
    options = {k: hp[k] for k in spec.state_options}
    out = []
    for b in layout.buckets:
        out.append(init_state(spec.name, np.zeros(1, b.dtype), state_dtype=precision.get("state_dtype"),
                              kahan=bool(precision.get("kahan")), **options))
    return out


def _empty_like_template(t, n: int):
    if isinstance(t, QuantizedState):
        return QuantizedState(np.zeros(n, np.uint8), np.zeros(quant_blocks(n), np.float32), t.signed)
    return np.zeros(n, t.dtype)


def _manifest(spec, layout: ShardLayout, hp: dict, lr_schedule, steps, skipped, states, files,
              precision=None, lr_schedule_state=None) -> dict:
    extra = {}
    if precision is not None and _precision_for_file(precision) != DEFAULT_PRECISION:
        extra = {"precision": _precision_for_file(precision), "segment": layout.segment}
    return {"format": FORMAT, "version": VERSION, "optimizer": spec.name, "world_size": layout.world,
            "bucket_bytes": layout.bucket_bytes, **extra,
            "params": [{"shape": list(s), "dtype": d.name} for s, d in zip(layout.shapes, layout.dtypes)],
            "buckets": layout.describe(), "hyperparameters": hp, "lr_schedule": lr_schedule,
            "lr_schedule_state": lr_schedule_state,
            "steps": int(steps), "skipped_steps": int(skipped), "states": list(states), "files": files}


def _commit(path: str, manifest: dict) -> None:
    """Write the manifest (the commit point), then remove shard files it does not name."""
    _write_bytes(os.path.join(path, MANIFEST), json.dumps(manifest, indent=1).encode())
    keep = {f["name"] for f in manifest["files"]}
    for name in os.listdir(path):
        if _SHARD_NAME.fullmatch(name) and name not in keep:
            try:
                os.unlink(os.path.join(path, name))
            except OSError:
                pass


def _make_dir(path: str) -> None:
    """The checkpoint directory itself, not its parents (a mistyped parent is an error, not a new tree)."""
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise NotADirectoryError(f"{path} exists and is not a directory") from None


def _host(a):
    if isinstance(a, QuantizedState):  # 8-bit state: its codes and scales
        return QuantizedState(_host(a.codes), _host(a.absmax), a.signed)
    return a if isinstance(a, np.ndarray) else a.get()


# ---------------------------------------------------------------------------------------------------
# Saving (collective)
# ---------------------------------------------------------------------------------------------------

def save(opt, path) -> None:
    """Write `opt`'s sharded checkpoint into directory `path` (created if missing, not its parents).
    Collective: every rank of the optimizer's communicator must call it."""
    path = os.fspath(path)
    comm, layout, world = opt.comm, opt.layout, opt.world_size
    # a fresh id per save, agreed by every rank: rank 0's random number, summed (exact below 2**53)
    token = int(comm.all_reduce_sum(np.array([float(secrets.randbits(52)) if opt.rank == 0 else 0.0]))[0])
    token = f"{token:016x}"
    row = np.zeros(1 + 32)
    error = None
    try:
        _make_dir(path)
        data = _shard_bytes(_members(layout, [_host(p) for p in opt.shard_params()],
                                     [{k: _host(v) for k, v in s.items()} for s in opt.shard_states()]))
        _write_bytes(os.path.join(path, _shard_name(opt.rank, world, token)), data)
        row[0] = 1.0
        row[1:] = np.frombuffer(hashlib.sha256(data).digest(), np.uint8)
    except OSError as e:
        error = e
    table = np.zeros((world, row.size))
    table[opt.rank] = row
    table = comm.all_reduce_sum(table.reshape(-1)).reshape(world, row.size)
    if error is not None:
        raise error
    failed = [r for r in range(world) if table[r, 0] != 1.0]
    if failed:
        raise OSError(f"sharded checkpoint {path}: rank(s) {failed} could not write their shard; the previous "
                      f"checkpoint (if any) is intact")
    files = [{"name": _shard_name(r, world, token), "sha256": bytes(table[r, 1:].astype(np.uint8)).hex()}
             for r in range(world)]
    ok = 1.0
    if opt.rank == 0:  # (the schedule's state is read here only: anything it raises fails the save on every rank)
        try:
            hp, schedule, schedule_state = _hp_for_file(opt.hyperparameters, opt.steps)
            _commit(path, _manifest(opt.spec, layout, hp, schedule, opt.steps, opt.skipped_steps,
                                    list(opt.shard_states()[0]), files, opt.precision, schedule_state))
        except Exception as e:  # noqa: BLE001 (a schedule's state_dict() or a state JSON cannot hold, an OSError)
            error, ok = e, 0.0
    # the manifest exists before any rank returns (a load right after a save sees it)
    committed = comm.all_reduce_sum(np.array([ok if opt.rank == 0 else 0.0]))[0]
    if error is not None:
        raise error
    if committed != 1.0:
        raise OSError(f"sharded checkpoint {path}: rank 0 could not write the manifest; the previous checkpoint "
                      f"(if any) is intact")


def _hp_for_file(hp: dict, steps: int) -> tuple[dict, str | None, object]:
    """(the hyperparameters with the lr of the next step as a number, the schedule's repr, its state_dict())."""
    lr = hp["lr"]
    schedule = state = None
    if is_schedule(lr):
        saver = getattr(lr, "state_dict", None)
        schedule, state, lr = repr(lr), (saver() if saver is not None else None), float(lr(steps))
    return dict(hp, lr=float(lr)), schedule, state


class RecordedSchedule(Schedule):
    """An lr schedule as a checkpoint records it: its repr, its lr at the saved step and its own state_dict()
    (None: a schedule without one). gather() makes the single-process optimizer it writes out with one, so that
    the ordinary checkpoint holds the schedule's entry as fastopt.save writes it for the schedule itself."""

    def __init__(self, text: str, lr: float, state):
        self.text, self.lr, self.state = text, lr, state

    def value(self, count: int) -> float:
        return self.lr

    def state_dict(self):
        return copy.deepcopy(self.state)

    def __repr__(self):
        return self.text


# ---------------------------------------------------------------------------------------------------
# Reading (nothing in the files is trusted)
# ---------------------------------------------------------------------------------------------------

def _fail(msg):
    raise CheckpointError(msg)


def _count(what, value):
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        _fail(f"{what} must be a whole number in [0, 2**53 - 1], got {value!r}")
    return value


def _param_dtype(name) -> np.dtype:
    """A param dtype by its manifest name ("bfloat16": ml_dtypes', which NumPy knows once it is imported)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            _fail("this checkpoint has bfloat16 params: reading it needs the ml_dtypes package")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def read_manifest(path) -> tuple[dict, ShardLayout, object]:
    """(manifest, layout, spec) of a sharded checkpoint directory, checked for consistency."""
    path = os.fspath(path)
    try:
        with open(os.path.join(path, MANIFEST), "rb") as f:
            m = json.loads(f.read().decode())
    except FileNotFoundError:
        _fail(f"{path} is not a sharded fastopt checkpoint (no {MANIFEST})")
    except (ValueError, UnicodeDecodeError) as e:
        _fail(f"{os.path.join(path, MANIFEST)} is corrupted: {e}")
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        _fail(f"{path}: not a {FORMAT} version {VERSION} manifest")
    try:
        spec = get_spec(m["optimizer"])
        world = m["world_size"]
        if type(world) is not int or world < 1:
            _fail(f"{path}: invalid world_size {world!r}")
        shapes = [tuple(p["shape"]) for p in m["params"]]
        dtypes = [_param_dtype(p["dtype"]) for p in m["params"]]
        if any(d.kind != "f" and not is_16bit(d) for d in dtypes) or any(
                type(n) is not int or n < 0 for s in shapes for n in s) or any(math.prod(s) >= 2 ** 62 for s in shapes):
            _fail(f"{path}: invalid param shapes or dtypes")  # (sizes past int64's range: no such arrays)
        precision = m.get("precision", DEFAULT_PRECISION)
        if not isinstance(precision, dict) or set(precision) != set(DEFAULT_PRECISION):
            _fail(f"{path}: invalid precision options {precision!r}")
        m["precision"] = precision
        segment = m.get("segment", 1)
        if segment not in (1, QUANT_BLOCK) or (segment == QUANT_BLOCK) != (precision["state_dtype"] == "int8"):
            _fail(f"{path}: invalid segment {segment!r} for state_dtype={precision['state_dtype']!r}")
        layout = ShardLayout.build(shapes, dtypes, world, m["bucket_bytes"], segment)
        if layout.describe() != m["buckets"]:
            _fail(f"{path}: the buckets in the manifest do not follow from its params and bucket size")
        if not isinstance(m["files"], list) or len(m["files"]) != world or any(
                not isinstance(f, dict) or not _SHARD_NAME.fullmatch(str(f.get("name")))
                or f["name"] != _shard_name(r, world, f["name"][-20:-4])  # rank r's file, of this world size
                or not re.fullmatch(r"[0-9a-f]{64}", str(f.get("sha256"))) for r, f in enumerate(m["files"])):
            _fail(f"{path}: the manifest's file list is invalid")
        _count("steps", m["steps"])
        _count("skipped_steps", m["skipped_steps"])
        if m.get("lr_schedule") is not None and not isinstance(m["lr_schedule"], str):
            _fail(f"{path}: lr_schedule must be the schedule's repr or null, got {m['lr_schedule']!r}")
        if m.setdefault("lr_schedule_state", None) is not None and m.get("lr_schedule") is None:
            _fail(f"{path}: an lr_schedule_state without its lr_schedule")
        hp = m["hyperparameters"]
        if not isinstance(hp, dict) or set(hp) != set(spec.defaults):
            _fail(f"{path}: the hyperparameters do not match {spec.name}'s")
        hp, _ = spec.validate(hp, 1)
        m["hyperparameters"] = hp
        expected = [s for s, used in zip(spec.states, spec.active_states(hp)) if used]
        if precision["kahan"]:
            expected.append("kahan_comp")
        if list(m["states"]) != expected:
            _fail(f"{path}: the state names {m['states']} do not match {spec.name} with these hyperparameters")
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        _fail(f"{path}: invalid manifest ({type(e).__name__}: {e})")
    return m, layout, spec


def _read_shard(path: str, entry: dict, layout: ShardLayout, states, templates=None) -> dict:
    """The arrays of one shard file, after checking its checksum, members, shapes and dtypes (`templates`:
    per bucket, the state dtypes, state_templates; None: the params' dtype). 16-bit arrays come back in
    their dtype, 8-bit state as b<b>_<state> codes and b<b>_<state>_absmax scales."""
    name = os.path.join(path, entry["name"])
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as e:
        _fail(f"{name}: cannot be read ({e.strerror or e})")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        _fail(f"{name}: checksum mismatch (the file changed after it was saved, or belongs to another save)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # whatever a damaged zip or .npy header raises (the checksum matched a bad save)
        _fail(f"{name}: not a readable shard file ({type(e).__name__}: {e})")
    for b in layout.buckets:
        expected = [("params", b.shard, b.dtype)]
        for n in states:
            t = templates[b.index][n] if templates is not None else np.zeros(0, b.dtype)
            if isinstance(t, QuantizedState):
                expected += [(n, b.shard, np.dtype(np.uint8)), (n + ABSMAX, b.shard // QUANT_BLOCK, np.dtype(np.float32))]
            else:
                expected.append((n, b.shard, t.dtype))
        for what, size, dtype in expected:
            key = f"b{b.index}_{what}"
            a = arrays.get(key)
            disk = _stored(np.zeros(0, dtype)).dtype
            if a is None or a.shape != (size,) or a.dtype != disk:
                _fail(f"{name}: {key} is missing or has the wrong shape or dtype")
            if disk != dtype:
                arrays[key] = a.view(dtype)
    return arrays


def _fill(target_layout: ShardLayout, rank: int, source_layout: ShardLayout, read, names,
          templates=None) -> tuple[list, list]:
    """This rank's shard of every bucket of `target_layout` (params and states, host arrays) from a
    checkpoint laid out as `source_layout`: `read(old_rank)` gives the arrays of one old shard file; only
    the files overlapping this rank's shards are read, each once. 8-bit state (QuantizedState templates)
    is copied in whole 256-blocks: codes and scales."""
    params = [np.zeros(b.shard, b.dtype) for b in target_layout.buckets]
    if templates is None:
        templates = [{n: np.zeros(0, b.dtype) for n in names} for b in target_layout.buckets]
    states = [{n: _empty_like_template(templates[b.index][n], b.shard) for n in names} for b in target_layout.buckets]
    tasks: dict = {}
    for b in target_layout.buckets:
        lo, hi = b.shard_range(rank)
        for i, e0, e1, pos in b.pieces(lo, hi):
            ob, ooff, _ = source_layout.locate(i)
            start, end = ooff + e0, ooff + e1
            while start < end:  # split where an old shard ends
                old_rank, within = divmod(start, ob.shard)
                take = min(end - start, ob.shard - within)
                tasks.setdefault(old_rank, []).append((ob.index, within, take, b.index, pos - lo + (start - ooff - e0)))
                start += take
    for old_rank in sorted(tasks):
        arrays = read(old_rank)
        for ob, within, take, nb, at in tasks[old_rank]:
            params[nb][at:at + take] = arrays[f"b{ob}_params"][within:within + take]
            for n in names:
                target = states[nb][n]
                if isinstance(target, QuantizedState):
                    if within % QUANT_BLOCK or at % QUANT_BLOCK:  # both layouts have segment 256: never
                        _fail(f"8-bit state: a piece at element {within} of an old shard does not start a "
                              f"256-block of the new one ({at}); the layouts do not allow re-sharding")
                    target.codes[at:at + take] = arrays[f"b{ob}_{n}"][within:within + take]
                    k0, k1 = within // QUANT_BLOCK, -(-(within + take) // QUANT_BLOCK)
                    target.absmax[at // QUANT_BLOCK:at // QUANT_BLOCK + k1 - k0] = arrays[f"b{ob}_{n}{ABSMAX}"][k0:k1]
                else:
                    target[at:at + take] = arrays[f"b{ob}_{n}"][within:within + take]
    return params, states


# ---------------------------------------------------------------------------------------------------
# Loading (collective)
# ---------------------------------------------------------------------------------------------------

def _plan_load(opt, path):
    m, old, spec = read_manifest(path)
    if spec.name != opt.spec.name:
        _fail(f"{path} holds a {spec.name} checkpoint; this optimizer is {opt.spec.name}")
    if old.shapes != opt.layout.shapes or old.dtypes != opt.layout.dtypes:
        _fail(f"{path}: its params (shapes {list(old.shapes)}, dtypes {[d.name for d in old.dtypes]}) are not this "
              f"optimizer's (shapes {list(opt.layout.shapes)}, dtypes {[d.name for d in opt.layout.dtypes]})")
    names = list(m["states"])
    saved, mine = m["precision"], _precision_for_file(opt.precision)
    for option in ("state_dtype", "kahan"):
        if saved[option] != mine[option]:
            _fail(f"{path} was saved with {option}={saved[option]!r}; this optimizer has {option}={mine[option]!r}")
    if names != list(opt.shard_states()[0]):
        _fail(f"{path}: state names {names} differ from this optimizer's {list(opt.shard_states()[0])}")
    templates = state_templates(spec, old, m["hyperparameters"], saved)
    params, states = _fill(opt.layout, opt.rank, old,
                           lambda r: _read_shard(path, m["files"][r], old, names, templates), names,
                           state_templates(spec, opt.layout, m["hyperparameters"], saved))
    schedule, load_schedule = opt.hyperparameters["lr"], None
    if is_schedule(schedule):  # kept; its saved state tried on a copy (loaded once every rank has agreed)
        load_schedule, _ = check_schedule_state(0, schedule, m["lr_schedule_state"], m["steps"],
                                                REGISTRY[spec.name].hypers[0])
    return m, params, states, load_schedule


def load(opt, path) -> None:
    """Restore `opt` (and its params) from the sharded checkpoint in `path`, saved at any world size.
    Collective. Every rank checks everything first; if any rank finds a problem, every rank raises
    CheckpointError and nothing is changed anywhere."""
    path = os.fspath(path)
    error = plan = None
    try:
        plan = _plan_load(opt, path)
    except (CheckpointError, OSError) as e:
        error = e
    failed = opt.comm.all_reduce_sum(np.array([0.0 if error is None else 1.0]))[0]
    if error is not None:
        raise error if isinstance(error, CheckpointError) else CheckpointError(f"{path}: {error}")
    if failed:
        _fail(f"{path}: {int(failed)} other rank(s) could not load it (see their error); nothing was changed")
    m, params, states, load_schedule = plan
    if load_schedule is not None:
        schedule, saved = load_schedule
        schedule.load_state_dict(saved)
    opt.restore(m["steps"], m["skipped_steps"], m["hyperparameters"], params, states)


# ---------------------------------------------------------------------------------------------------
# Converting to and from an ordinary fastopt checkpoint (one process, no communicator)
# ---------------------------------------------------------------------------------------------------

def gather(path, file) -> None:
    """Write the sharded checkpoint in directory `path` as one ordinary fastopt checkpoint `file`
    (fastopt.save's format, params included): `fastopt.load(file, fastopt.<Class>(params, ...))` resumes
    it in a single process."""
    path = os.fspath(path)
    m, layout, spec = read_manifest(path)
    names = list(m["states"])
    precision = m["precision"]
    full = ShardLayout.build(layout.shapes, layout.dtypes, 1, layout.bucket_bytes, layout.segment)
    hp = m["hyperparameters"]
    params, states = _fill(full, 0, layout,
                           lambda r: _read_shard(path, m["files"][r], layout, names,
                                                 state_templates(spec, layout, hp, precision)),
                           names, state_templates(spec, full, hp, precision))
    arrays, per_param = [None] * len(layout.shapes), {}
    for b in full.buckets:
        for i, off, n in zip(b.params, b.offsets, b.sizes):
            shape = layout.shapes[i]
            arrays[i] = params[b.index][off:off + n].reshape(shape).copy()
            per_param[i] = {}
            for name in names:
                a = states[b.index][name]
                if isinstance(a, QuantizedState):  # off is a multiple of 256: the param's own blocks
                    k = off // QUANT_BLOCK
                    a = QuantizedState(a.codes[off:off + n].reshape(shape), a.absmax[k:k + quant_blocks(n)], a.signed)
                else:
                    a = a[off:off + n].reshape(shape)
                per_param[i][name] = a
    options = {} if precision == DEFAULT_PRECISION else {k: v for k, v in precision.items() if v not in (None,)}
    if m["lr_schedule"] is not None:  # the file records the schedule as fastopt.save records one
        hp = dict(hp, lr=RecordedSchedule(m["lr_schedule"], hp["lr"], m["lr_schedule_state"]))
    opt = getattr(optim, spec.class_name)(arrays, **spec.class_keywords(hp), **options)
    state = OptimizerState(optimizer=spec.name, hyperparameters=[hp], steps=[m["steps"]],
                           lrs=[m["hyperparameters"]["lr"]], states=per_param, skipped_steps=m["skipped_steps"])
    opt.apply_state(opt.check_state(state))
    save_file(file, opt)


def scatter(file, path, world_size: int, *, bucket_bytes: int | None = None, state_dtype=None,
            kahan: bool = False) -> None:
    """Write the ordinary fastopt checkpoint `file` (one param group, params included) as a sharded
    checkpoint for `world_size` ranks in directory `path` (created if missing), for a ShardedOptimizer with
    `state_dtype` and `kahan` (the file's state converted as the single-process class loads it: quantized
    into 8-bit state, rounded into 16-bit state; a compensation the file lacks starts at zero)."""
    if type(world_size) is not int or world_size < 1:
        raise ValueError(f"Invalid world_size: {world_size!r} (a positive int)")
    bucket_bytes = DEFAULT_BUCKET_BYTES if bucket_bytes is None else bucket_bytes
    if type(bucket_bytes) is not int or bucket_bytes < 1:
        raise ValueError(f"Invalid bucket_bytes: {bucket_bytes!r}")
    sd = read_file(file)
    meta = sd["fastopt"]
    if len(sd["param_groups"]) != 1:
        _fail(f"{file} has {len(sd['param_groups'])} param groups; a sharded checkpoint has one")
    schedule = (meta.get("lr_schedules") or [None])[0] or {}  # the file's record of its schedule, if any
    if not isinstance(schedule, dict) or not isinstance(schedule.get("repr", ""), str) or (
            schedule.get("state") is not None and schedule.get("repr") is None):
        _fail(f"{file}: lr_schedules[0] must be null or hold the schedule's repr (a string) and its state, got "
              f"{schedule!r}")
    spec = get_spec(meta["optimizer"])
    shapes = [tuple(s) for s in meta["param_shapes"]]
    dtypes = [_param_dtype(d) for d in meta["param_dtypes"]]
    arrays = [np.zeros(s, d) for s, d in zip(shapes, dtypes)]
    group = {k: v for k, v in sd["param_groups"][0].items() if k != "params"}
    precision = dict(DEFAULT_PRECISION, state_dtype=state_dtype, kahan=kahan)
    opt = getattr(optim, spec.class_name)(arrays, **group, state_dtype=state_dtype, kahan=kahan)
    load_file(file, opt, params=True)
    exported = opt.export_state()
    hp, _ = spec.validate(dict(exported.hyperparameters[0], lr=exported.lrs[0]), 1)
    names = [s for s, used in zip(spec.states, spec.active_states(hp)) if used] + (["kahan_comp"] if kahan else [])
    int8 = isinstance(state_dtype, str) and state_dtype == "int8"
    layout = ShardLayout.build(shapes, dtypes, world_size, bucket_bytes, QUANT_BLOCK if int8 else 1)
    templates = state_templates(spec, layout, hp, precision)
    token = secrets.token_hex(8)
    path = os.fspath(path)
    _make_dir(path)
    files = []
    for rank in range(world_size):
        shard_params, shard_states = [], []
        for b in layout.buckets:
            lo, hi = b.shard_range(rank)
            p = np.zeros(b.shard, b.dtype)
            s = {n: _empty_like_template(templates[b.index][n], b.shard) for n in names}
            for i, e0, e1, pos in b.pieces(lo, hi):
                at = pos - lo
                p[at:at + e1 - e0] = arrays[i].reshape(-1)[e0:e1]
                for n in names:
                    src = exported.states.get(i, {}).get(n)
                    if isinstance(src, QuantizedState):  # e0 and at are multiples of 256 (segment 256)
                        s[n].codes[at:at + e1 - e0] = src.codes.reshape(-1)[e0:e1]
                        k0, k1 = e0 // QUANT_BLOCK, -(-e1 // QUANT_BLOCK)
                        s[n].absmax[at // QUANT_BLOCK:at // QUANT_BLOCK + k1 - k0] = src.absmax[k0:k1]
                    elif src is not None:
                        s[n][at:at + e1 - e0] = np.asarray(src).reshape(-1)[e0:e1]
            shard_params.append(p)
            shard_states.append(s)
        data = _shard_bytes(_members(layout, shard_params, shard_states))
        name = _shard_name(rank, world_size, token)
        _write_bytes(os.path.join(path, name), data)
        files.append({"name": name, "sha256": hashlib.sha256(data).hexdigest()})
    _commit(path, _manifest(spec, layout, hp, schedule.get("repr"), exported.steps[0], exported.skipped_steps or 0,
                            names, files, precision, schedule.get("state")))
