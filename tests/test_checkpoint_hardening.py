"""Checkpoints and state dicts under attack (issue 9: item 11, the load_state_dict part of item 9).

Every bad state dict, damaged file or foreign file must raise CheckpointError (a ValueError) and leave
the optimizer byte-for-byte unchanged: params, state arrays (and which exist), step counts, skipped
steps, hyperparameters, the schedules' state, last_lr. Generated from the registry, float32 and
float64, fresh seeds (conftest's rng fixture prints the seed).
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import fastopt
from fastopt import schedules
from fastopt.checkpoint import CheckpointError
from fastopt.specs import REGISTRY

from conftest import option_combinations

SPECS = list(REGISTRY.values())
TORCH_SPECS = [s for s in SPECS if s.torch_class]
DTYPES = [np.float32, np.float64]
SHAPES = [(5,), (2, 3), (4,)]
TRAILER = b"fastopt-checkpoint sha256:"
REPO = Path(__file__).resolve().parents[1]
COUNTS = {}  # variants tried per test, printed (pytest -s) for the record


def _count(name, n):
    COUNTS[name] = COUNTS.get(name, 0) + n
    print(f"{name}: {n} variants")


# ---- optimizers ------------------------------------------------------------------------------------

def richest_options(spec):
    """Class kwargs of the option combination that keeps the most state arrays."""
    best = max(option_combinations(spec), key=lambda hp: sum(spec.active_states(hp)))
    kw = {k: v for k, v in best.items() if k not in ("beta1", "beta2")}
    if "beta1" in best:
        kw["betas"] = (best["beta1"], best["beta2"])
    return kw


def make_opt(spec, dtype, rng, params=None, rich=True):
    """Two groups: rich options on group 0 (rich=False: the defaults), a warmup(ReduceLROnPlateau)
    schedule on group 1."""
    if params is None:
        params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    kw = richest_options(spec)
    lr = kw.pop("lr")
    if not rich:
        kw = {}
    plateau = schedules.ReduceLROnPlateau(lr, patience=0)
    groups = [{"params": params[:2], **kw}, {"params": params[2:], "lr": schedules.warmup(plateau, 2)}]
    opt = getattr(fastopt, spec.class_name)(groups, lr=lr)
    opt.plateau = plateau
    return opt


def grads(rng, opt):
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in opt.params]


def trained(spec, dtype, rng, steps=3):
    opt = make_opt(spec, dtype, rng)
    for _ in range(steps):
        opt.step(grads(rng, opt))
    opt.plateau.update(1.0)
    opt.plateau.update(2.0)  # the plateau schedule's lr drops: its state matters
    return opt


def snapshot(opt):
    """Everything a load could change, as comparable values (bytes for arrays)."""
    arrays = []
    for i, p in enumerate(opt.params):
        arrays.append(("param", i, p.dtype.str, p.shape, p.tobytes()))
        for name, a in sorted(opt.state_arrays(i).items()):
            arrays.append((name, i, a.dtype.str, a.shape, a.tobytes()))
    groups = []
    for g in opt.param_groups:
        out = {"params": [id(p) for p in g["params"]]}
        for k, v in g.items():
            if k == "params":
                continue
            if callable(v):
                out[k] = ("schedule", id(v), repr(v.state_dict() if hasattr(v, "state_dict") else None))
            else:
                out[k] = (type(v).__name__, repr(v))
        groups.append(out)
    sd = opt.state_dict()
    scalars = repr((sd["param_groups"], sd["fastopt"], [(i, e["step"]) for i, e in sd["state"].items()]))
    return {"arrays": arrays, "groups": groups, "steps": [opt.steps(g) for g in range(len(opt.param_groups))],
            "skipped": (type(opt.skipped_steps), opt.skipped_steps), "last_lr": repr(opt.last_lr),
            "scalars": scalars}


def state_bytes(opt):
    return [(i, name, a.tobytes()) for i in range(len(opt.params)) for name, a in sorted(opt.state_arrays(i).items())]


def param_bytes(opt):
    return [p.tobytes() for p in opt.params]


# ---- state dict mutations ----------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
BAD_FLOATS = [NAN, INF, -INF, "0.1", None, 10 ** 400, True, [0.1], np.float32("nan"), 1j, b"1"]
BAD_BOOLS = ["x", 1, 0, None, 0.0, "True", [True]]
BAD_COUNTS = ["x", -1, 2 ** 53, 10 ** 400, 1.5, True, None, np.float64(2.0), [1], NAN, "3"]
BAD_BETAS = [(0.9,), "x", (0.9, "x"), (NAN, 0.9), (2.0, 0.9), 5, (0.9, 0.99, 0.9), None, (True, 0.9), (0.9, INF)]


def bad_arrays(a, rng):
    """Arrays (and non-arrays) that must not load where `a` is expected."""
    other = np.float64 if a.dtype == np.float32 else np.float32
    shape_wrong = np.zeros(a.size + 1, a.dtype)
    return {
        "big-endian": a.astype(a.dtype.newbyteorder()),
        "other float dtype": a.astype(other),
        "float16": a.astype(np.float16),
        "int64": np.zeros(a.shape, np.int64),
        "complex": a.astype(np.complex128),
        "object": np.array([object()] * a.size, dtype=object).reshape(a.shape),
        "bool": np.zeros(a.shape, bool),
        "structured": np.zeros(a.shape, [("x", a.dtype)]),
        "longer": shape_wrong,
        "extra dim": a[None],
        "0-d": np.array(rng.standard_normal(), a.dtype),
        "transposed shape": np.zeros(a.shape[::-1] + (1,), a.dtype),
        "list": a.tolist(),
        "float": 0.0,
        "None": None,
        "masked": np.ma.masked_array(a, mask=np.zeros(a.shape, bool)),
        "string": "abc",
        "bytes": a.tobytes(),
    }


def _put(d, path, value):
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def _drop(d, path):
    for k in path[:-1]:
        d = d[k]
    del d[path[-1]]


def mutations(sd, spec, rng):
    """(label, mutated state dict) pairs; each must fail to load."""
    out = []

    def edit(label, fn):
        new = copy.deepcopy(sd)
        r = fn(new)
        out.append((label, new if r is None else r))

    def put(label, path, value):
        edit(label, lambda d: _put(d, path, value))

    def drop(label, path):
        edit(label, lambda d: _drop(d, path))

    n = len(sd["fastopt"]["param_shapes"])
    ng = len(sd["param_groups"])
    bools = {h.name for h in spec.hypers if h.kind == "bool"}
    inf_ok = {h.name for h in spec.hypers if h.inf_ok}  # an upper bound: inf is no bound (Rprop's step_size_max)
    other = next(s.name for s in SPECS if s.name != spec.name)
    for bad in [5, None, [], "x", {}, {"state": {}}, {"param_groups": []}, {"state": {}, "param_groups": 5}]:
        out.append((f"sd={bad!r}", bad))
    drop("no state", ("state",))
    drop("no param_groups", ("param_groups",))
    # the fastopt block
    for v in [5, "x", [], 1.5]:
        put(f"fastopt={v!r}", ("fastopt",), v)
    for v in [5, "nope", other, b"adam", ["adam"]]:
        put(f"optimizer={v!r}", ("fastopt", "optimizer"), v)
    for v in [2, "1", 1.0, None, True, 0]:
        put(f"format={v!r}", ("fastopt", "format"), v)
    for v in BAD_COUNTS:
        put(f"skipped_steps={v!r}", ("fastopt", "skipped_steps"), v)
    state_of_1 = sd["fastopt"]["lr_schedules"][1]["state"]
    plateau = state_of_1["schedule"]
    for v in [[5] * ng, 5, "x", [None] * (ng + 1), [], [None, 5], [None, "x"], [None, {"state": 5}],
              [None, {"state": {"schedule": {}}}], [None, {"state": {"schedule": dict(plateau, lr="x")}}],
              [None, {"state": {"schedule": dict(plateau, lr=NAN)}}],
              [None, {"state": {"schedule": dict(plateau, lr=-1.0)}}],
              [None, {"state": {"schedule": dict(plateau, num_bad=None)}}]]:
        put(f"lr_schedules={v!r}", ("fastopt", "lr_schedules"), v)
    shapes, dtypes = sd["fastopt"]["param_shapes"], sd["fastopt"]["param_dtypes"]
    for v in ["x", 5, [[-1]] * n, shapes[:-1], [[1.5]] * n, [[s[0] + 1] + s[1:] for s in shapes], [None] * n,
              [[True] * len(s) for s in shapes]]:
        put(f"param_shapes={v!r}", ("fastopt", "param_shapes"), v)
    for v in ["x", 5, [5] * n, ["float16"] * n, dtypes[:-1], [None] * n, [d + " " for d in dtypes]]:
        put(f"param_dtypes={v!r}", ("fastopt", "param_dtypes"), v)
    # groups
    for v in [5, None, {}, [], "x", sd["param_groups"][:-1], sd["param_groups"] + sd["param_groups"][:1]]:
        put(f"param_groups={v!r:.40}", ("param_groups",), v)
    for gi, group in enumerate(sd["param_groups"]):
        for v in [5, None, "x", [], (1, 2)]:
            put(f"group {gi}={v!r}", ("param_groups", gi), v)
        drop(f"group {gi} without params", ("param_groups", gi, "params"))
        idx = group["params"]
        for v in ["x", None, 5, [i + 0.5 for i in idx], [True] * len(idx), idx + [99], [i + 1 for i in idx],
                  [str(i) for i in idx]] + ([idx[::-1]] if len(idx) > 1 else []):
            put(f"group {gi} params={v!r}", ("param_groups", gi, "params"), v)
        put(f"group {gi} unknown key", ("param_groups", gi, "foo"), 1.0)
        put(f"group {gi} non-str key", ("param_groups", gi, 5), 1.0)
        for k in group:
            if k == "params":
                continue
            drop(f"group {gi} without {k}", ("param_groups", gi, k))
            values = BAD_BETAS if k == "betas" else BAD_BOOLS if k in bools else BAD_FLOATS
            values = [v for v in values if not (k in inf_ok and v is INF)]
            for v in values:
                put(f"group {gi} {k}={v!r:.30}", ("param_groups", gi, k), v)
    # state
    for v in [5, [], "x", None, [(0, {})]]:
        put(f"state={v!r}", ("state",), v)
    for key in [n, -1, "0", 2 ** 70, None]:
        edit(f"state key {key!r}", lambda d, key=key: d["state"].__setitem__(key, {}))
    for key in [True, 1.0, np.float64(1)]:
        # replace key 1 by something equal to 1 that is not a whole number of the right type
        edit(f"state key {key!r} for 1", lambda d, key=key: d.__setitem__(
            "state", {(key if k == 1 else k): v for k, v in d["state"].items()}))
    for i, entry in sd["state"].items():
        for v in [5, None, "x", [], ("step", 1)]:
            put(f"state {i}={v!r}", ("state", i), v)
        for v in BAD_COUNTS:
            put(f"state {i} step={v!r}", ("state", i, "step"), v)
        put(f"state {i} unknown name", ("state", i, "foo"), np.zeros(1))
        put(f"state {i} non-str name", ("state", i, 5), np.zeros(1))
        for name, a in entry.items():
            if name == "step":
                continue
            drop(f"state {i} without {name}", ("state", i, name))
            for label, bad in bad_arrays(a, rng).items():
                put(f"state {i} {name} {label}", ("state", i, name), bad)
    first = sd["param_groups"][0]["params"]
    put("different steps in a group", ("state", first[1], "step"), sd["state"][first[1]]["step"] + 1)
    return out


def _attempt(opt, fn):
    """None when fn raised CheckpointError and left opt unchanged; else what went wrong."""
    before = snapshot(opt)
    try:
        fn()
    except CheckpointError as e:
        if not str(e):
            return "empty message"
        after = snapshot(opt)
        if after != before:
            changed = [k for k in before if before[k] != after[k]]
            return f"CheckpointError ({e}) but changed {changed}"
        return None
    except Exception as e:  # noqa: BLE001 - the point: anything else is a bug
        return f"{type(e).__name__}: {e}"
    return "loaded without error"


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_bad_state_dicts_raise_checkpoint_error_and_change_nothing(spec, dtype, rng):
    source = trained(spec, dtype, rng, steps=int(rng.integers(1, 5)))
    sd = source.state_dict()
    target = trained(spec, dtype, rng, steps=2)
    cases = mutations(sd, spec, rng)
    failures = [f"{label}: {problem}" for label, bad in cases
                if (problem := _attempt(target, lambda bad=bad: target.load_state_dict(bad)))]
    assert not failures, f"{len(failures)} of {len(cases)} bad state dicts:\n" + "\n".join(failures[:30])
    _count(f"bad state dicts {spec.name}", len(cases))
    # the checks do not reject good data: the untouched state dict still loads, completely
    target.load_state_dict(sd)
    assert state_bytes(target) == state_bytes(source)
    assert [target.steps(g) for g in range(2)] == [source.steps(g) for g in range(2)]
    assert target.plateau.state_dict() == source.plateau.state_dict()
    # last_lr after a load: the lr of the next step (the state dict does not carry the last one)
    assert target.last_lr == [source.state_dict()["param_groups"][g]["lr"] for g in range(2)]


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_issue_reproductions_do_not_half_apply(spec, rng):
    """Issue 9 item 9: load_state_dict overwrote lr, step counters and state before failing."""
    dtype = DTYPES[int(rng.integers(2))]
    sd = trained(spec, dtype, rng).state_dict()
    target = trained(spec, dtype, rng, steps=1)
    last = max(i for i, e in sd["state"].items() if len(e) > 1)  # written last by a half-applying load
    name = next(k for k in sd["state"][last] if k != "step")
    cases = [
        ("big-endian state", lambda d: d["state"][last].__setitem__(name, d["state"][last][name].astype(
            d["state"][last][name].dtype.newbyteorder())), "non-native byte order"),
        ("skipped_steps='x'", lambda d: d["fastopt"].__setitem__("skipped_steps", "x"), "skipped_steps must be"),
        ("lr_schedules=[5]", lambda d: d["fastopt"].__setitem__("lr_schedules", [5]), "lr_schedules"),
        ("lr_schedules=[None, 5]", lambda d: d["fastopt"].__setitem__("lr_schedules", [None, 5]), "lr_schedules"),
    ]
    for label, edit, match in cases:
        bad = copy.deepcopy(sd)
        edit(bad)
        before = snapshot(target)
        with pytest.raises(CheckpointError, match=match):
            target.load_state_dict(bad)
        assert snapshot(target) == before, label


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_loaded_hyperparameters_become_python_floats_and_bools(spec, rng):
    dtype = DTYPES[int(rng.integers(2))]
    sd = trained(spec, dtype, rng).state_dict()
    target = trained(spec, dtype, rng, steps=1)
    bools = {h.name for h in spec.hypers if h.kind == "bool"}
    expected = []
    for g in sd["param_groups"]:
        for k, v in list(g.items()):
            if k == "params":
                continue
            if k == "betas":
                g[k] = [np.float32(v[0]), np.float64(v[1])]  # a list of NumPy scalars
                want = (float(np.float32(v[0])), float(v[1]))
            elif k in bools:
                g[k] = np.bool_(v)
                want = bool(v)
            elif v == 0:
                g[k] = np.int64(0)
                want = 0.0
            else:
                g[k] = np.float32(v)
                want = float(np.float32(v))
            expected.append((g, k, want))
    for entry in sd["state"].values():
        entry["step"] = np.int64(entry["step"])
    sd["fastopt"]["skipped_steps"] = np.int32(2)
    target.load_state_dict(sd)
    for gi, group in enumerate(target.param_groups):
        for k, v in group.items():
            if k == "params" or callable(v):
                continue
            if k == "betas":
                assert type(v) is tuple and all(type(b) is float for b in v), (k, v)
            elif k in bools:
                assert type(v) is bool, (k, v)
            else:
                assert type(v) is float, (k, v)
    for g, k, want in expected[:len(expected) // 2]:  # group 0's (group 1's lr stays a schedule)
        assert target.param_groups[0][k] == want, k
    assert all(type(target.steps(g)) is int for g in range(2))
    assert type(target.skipped_steps) is int and target.skipped_steps == 2
    assert all(type(lr) is float for lr in target.last_lr)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_huge_step_counts_load_at_once_and_absurd_ones_are_refused(spec, rng):
    dtype = DTYPES[int(rng.integers(2))]
    sd = trained(spec, dtype, rng).state_dict()
    target = trained(spec, dtype, rng, steps=1)
    for step in [2 ** 40, 2 ** 53 - 1]:
        for entry in sd["state"].values():
            entry["step"] = step
        start = time.perf_counter()
        target.load_state_dict(sd)
        assert time.perf_counter() - start < 2.0
        assert target.steps(0) == target.steps(1) == step
        assert target.state_dict()["state"][0]["step"] == step
    for step in [2 ** 53, 2 ** 64, 10 ** 30]:
        for entry in sd["state"].values():
            entry["step"] = step
        before = snapshot(target)
        with pytest.raises(CheckpointError, match="out of range"):
            target.load_state_dict(sd)
        assert snapshot(target) == before


# ---- files: helpers that write the format independently of fastopt.checkpoint ------------------------

def npy_bytes(array, allow_pickle=False):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def npy_header(descr, shape, fortran=False, version=(1, 0), data=b""):
    text = repr({"descr": descr, "fortran_order": fortran, "shape": shape})
    text += " " * ((64 - (10 + len(text) + 1) % 64) % 64) + "\n"
    return b"\x93NUMPY" + bytes(version) + len(text).to_bytes(2, "little") + text.encode("latin1") + data


def with_digest(data: bytes) -> bytes:
    """Give a zip (whose comment is the trailer placeholder) its checksum."""
    assert data[-64:] == b"0" * 64
    return data[:-64] + hashlib.sha256(data[:-64]).hexdigest().encode()


def pack(meta, members, *, digest=True, compress=False, encrypt_flag=False):
    """A checkpoint file's bytes from meta (dict or raw value) and {member name: bytes or array}."""
    buf = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        meta_member = meta if isinstance(meta, bytes) else npy_bytes(np.array(json.dumps(meta)))
        for name, data in [("meta.npy", meta_member)] + list(members.items()):
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = method
            zf.writestr(info, data if isinstance(data, bytes) else npy_bytes(data))
        if digest:
            zf.comment = TRAILER + b"0" * 64
    data = buf.getvalue()
    if encrypt_flag:  # zipfile clears flag bits when writing: set bit 0 in the first local and central headers
        data = bytearray(data)
        data[6] |= 0x1
        data[data.find(b"PK\x01\x02") + 8] |= 0x1
        data = bytes(data)
    return with_digest(data) if digest else data


def unpack(path):
    with zipfile.ZipFile(path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    meta = json.loads(str(np.load(io.BytesIO(members.pop("meta.npy")))[()]))
    return meta, members


def load_fails(path, target, match=None):
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=match) as info:
        fastopt.load(path, target)
    assert snapshot(target) == before
    return str(info.value)


@pytest.fixture
def case(tmp_path, rng):
    """A saved checkpoint of a random registry optimizer and dtype, and a target that differs from it."""
    spec = SPECS[int(rng.integers(len(SPECS)))]
    dtype = DTYPES[int(rng.integers(2))]
    source = trained(spec, dtype, rng)
    path = tmp_path / "c.npz"
    fastopt.save(path, source)
    target = trained(spec, dtype, rng, steps=1)
    print(f"optimizer {spec.name}, {np.dtype(dtype).name}")
    return spec, dtype, source, path, target


def test_the_file_format_is_as_documented(case):
    spec, dtype, source, path, target = case
    data = path.read_bytes()
    assert data[-64 - len(TRAILER):-64] == TRAILER
    assert hashlib.sha256(data[:-64]).hexdigest().encode() == data[-64:]
    meta, members = unpack(path)
    assert meta["format"] == 2 and meta["params"] == len(source.params)
    for i, p in enumerate(source.params):
        np.testing.assert_array_equal(np.load(io.BytesIO(members[f"params/{i}.npy"])), p)
    with zipfile.ZipFile(path) as zf:
        assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())
    with np.load(path, allow_pickle=False) as npz:  # plain NumPy reads it
        assert "meta" in npz.files and "params/0" in npz.files
    # rebuilt independently from its parts, it loads into a fresh optimizer like the original
    rebuilt = path.with_name("rebuilt.npz")
    rebuilt.write_bytes(pack(meta, members))
    fastopt.load(rebuilt, target)
    assert state_bytes(target) == state_bytes(source) and param_bytes(target) == param_bytes(source)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_every_flipped_byte_is_detected(spec, tmp_path, rng):
    """A flip anywhere (zip structure, JSON, array data, the checksum itself) is a CheckpointError."""
    dtype = DTYPES[int(rng.integers(2))]
    path = tmp_path / "c.npz"
    fastopt.save(path, trained(spec, dtype, rng))
    good = path.read_bytes()
    target = trained(spec, dtype, rng, steps=1)
    before = snapshot(target)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(good)
    masks = rng.integers(1, 256, len(good))
    missed = []
    fd = os.open(bad, os.O_WRONLY)  # flipped in place: reopening with truncation is slow on some file systems
    try:
        for pos in range(len(good)):
            os.pwrite(fd, bytes([good[pos] ^ int(masks[pos])]), pos)
            try:
                fastopt.load(bad, target)
                missed.append(pos)
            except CheckpointError:
                pass
            os.pwrite(fd, good[pos:pos + 1], pos)
            if pos % 1000 == 0:
                assert snapshot(target) == before
    finally:
        os.close(fd)
    assert not missed, f"flips at {missed[:20]} loaded"
    assert snapshot(target) == before
    _count(f"byte flips {spec.name}", len(good))


def _structure_positions(good, path):
    """Byte positions of the zip structure and the .npy headers (where parsers break)."""
    out = set()
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            start = info.header_offset
            out.update(range(start, start + 30 + len(info.filename) + 20 + 128))  # local header, npy header
    end = len(good) - 64 - len(TRAILER)
    out.update(range(good.find(b"PK\x01\x02"), end))  # central directory and end records
    return sorted(p for p in out if p < end)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_flipped_bytes_with_a_recomputed_checksum(spec, tmp_path, rng):
    """An attacker recomputes the checksum: the parser still gives CheckpointError (nothing changed) or
    loads a consistent optimizer (the flip hit a timestamp, a schedule's repr, a JSON digit...), never
    another exception."""
    dtype = DTYPES[int(rng.integers(2))]
    path = tmp_path / "c.npz"
    fastopt.save(path, trained(spec, dtype, rng))
    good = path.read_bytes()
    structure = _structure_positions(good, path)
    body = np.arange(len(good) - 64 - len(TRAILER))
    positions = sorted(set(rng.choice(structure, min(250, len(structure)), replace=False).tolist())
                       | set(rng.choice(body, 150, replace=False).tolist()))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(good)
    target = trained(spec, dtype, rng, steps=1)
    problems, loaded = [], 0
    fd = os.open(bad, os.O_WRONLY)
    for pos in positions:
        data = bytearray(good)
        data[pos] ^= int(rng.integers(1, 256))
        data = with_digest(bytes(data[:-64]) + b"0" * 64)
        os.pwrite(fd, data[pos:pos + 1], pos)
        os.pwrite(fd, data[-64:], len(good) - 64)
        problem = _attempt(target, lambda: fastopt.load(bad, target))
        os.pwrite(fd, good[pos:pos + 1], pos)
        if problem == "loaded without error":
            loaded += 1
            try:
                target.step(grads(rng, target))  # a consistent optimizer
            except Exception as e:  # noqa: BLE001
                problems.append(f"{pos}: loaded, then step() raised {type(e).__name__}: {e}")
            target = trained(spec, dtype, rng, steps=1)
        elif problem:
            problems.append(f"{pos}: {problem}")
    os.close(fd)
    assert not problems, "\n".join(problems[:20])
    assert loaded < len(positions) // 2
    _count(f"crafted flips {spec.name}", len(positions))


def test_cut_and_extended_files(case, tmp_path, rng):
    spec, dtype, source, path, target = case
    good = path.read_bytes()
    bad = tmp_path / "bad.npz"
    lengths = sorted(set(rng.integers(0, len(good), 150).tolist()) | {0, 1, 4, 22, len(good) - 1, len(good) - 64,
                                                                    len(good) - 64 - len(TRAILER)})
    for n in lengths:
        bad.write_bytes(good[:n])
        load_fails(bad, target)
    for extra in [b"\0", b"x" * 100, good[-90:], good]:
        bad.write_bytes(good + extra)
        load_fails(bad, target)
    # cut inside the zip, then given a valid-looking checksum trailer
    for n in rng.integers(30, len(good) - 100, 40):
        bad.write_bytes(with_digest(good[:n] + TRAILER + b"0" * 64))
        load_fails(bad, target)
    _count("cut/extended files", len(lengths) + 4 + 40)


def _foreign_files(tmp_path, good_path, rng):
    """(label, path, match) for files that are not intact fastopt checkpoints."""
    meta, members = unpack(good_path)
    out = []

    def file(label, data, match=None):
        p = tmp_path / f"foreign{len(out)}.npz"
        p.write_bytes(data)
        out.append((label, p, match))

    def savez(label, match=None, **arrays):
        p = tmp_path / f"foreign{len(out)}.npz"
        with open(p, "wb") as f:
            np.savez(f, **arrays)
        out.append((label, p, match))

    def variant(label, match=None, meta_=None, members_=None, **kw):
        file(label, pack(meta if meta_ is None else meta_, members if members_ is None else members_, **kw), match)

    def meta_edit(label, fn, match=None):
        m = copy.deepcopy(meta)
        fn(m)
        variant(label, match, meta_=m)

    def member_edit(label, name, data, match=None):
        m = dict(members)
        m[name] = data
        variant(label, match, members_=m)

    file("empty", b"", "empty")
    file("text", b"hello, world\n")
    file("random bytes", rng.bytes(300))
    file("random bytes with a valid checksum", with_digest(rng.bytes(500) + TRAILER + b"0" * 64))
    file("a pickle of the state dict", pickle.dumps({"meta": meta}))
    file("one .npy", npy_bytes(np.zeros(3)))
    file("zip header only", b"PK\x05\x06" + b"\0" * 18)
    savez("npz without meta", "no 'meta' entry", weights=np.zeros(3))
    savez("meta is a number", "dtype", meta=np.array(5))
    savez("meta is a JSON list", "not a JSON object", meta=np.array("[1, 2]"))
    savez("meta is not JSON", None, meta=np.array("{not json"))
    savez("meta is deeply nested JSON", None, meta=np.array("[" * 100000 + "]" * 100000))
    savez("meta is a 1-d string array", "single string", meta=np.array(["{}", "{}"]))
    savez("format 2 without checksum", "must end with its checksum", meta=np.array('{"format": 2}'))
    savez("format 1 without state", "must have 'state'", meta=np.array('{"format": 1}'))
    savez("format 7", "unsupported checkpoint format", meta=np.array('{"format": 7}'))
    variant("compressed members", "compressed", compress=True)
    variant("encrypted flag", "encrypted", encrypt_flag=True)
    variant("an extra member", "unexpected", members_=dict(members, **{"extra.npy": np.zeros(2)}))
    m = dict(members)
    del m[next(k for k in m if k.startswith("state/"))]
    variant("a missing member", "missing", members_=m)
    file("a member twice", with_digest(pack(meta, members).replace(b"params/0.npy", b"params/1.npy")[:-64]
                                       + b"0" * 64), "twice")
    for k in list(members):
        arr = np.load(io.BytesIO(members[k]))
        shape = list(arr.shape)
        member_edit(f"{k} big-endian", k, arr.astype(arr.dtype.newbyteorder()), "non-native")
        member_edit(f"{k} pickled object array", k, npy_bytes(arr.astype(object), allow_pickle=True), "object")
        member_edit(f"{k} structured", k, np.zeros(arr.shape, [("a", arr.dtype)]), "does not hold")
        member_edit(f"{k} header claims 10**12 elements", k, npy_header(arr.dtype.str, (10 ** 12,), data=arr.tobytes()),
                    "header describes")
        member_edit(f"{k} negative shape", k, npy_header(arr.dtype.str, (-1,), data=arr.tobytes()))
        member_edit(f"{k} .npy version 3", k, npy_header(arr.dtype.str, tuple(shape), version=(3, 0),
                                                         data=arr.tobytes()), "version")
        member_edit(f"{k} data cut", k, members[k][:-3], "bytes but")
        member_edit(f"{k} data extended", k, members[k] + b"\0" * 8, "bytes but")
        member_edit(f"{k} wrong shape", k, np.zeros(arr.size + 1, arr.dtype))
        member_edit(f"{k} other dtype", k, arr.astype(np.float16))
        member_edit(f"{k} not npy", k, b"not an npy file at all")
        if k.startswith("params/"):
            member_edit(f"{k} 0-d", k, np.array(1.0, arr.dtype), "shape")
    # the JSON, field by field
    for v in [[], "x", None, 5]:
        meta_edit(f"meta state={v!r}", lambda m, v=v: m.__setitem__("state", v), "must have 'state'")
    for v in [{}, "x", None]:
        meta_edit(f"meta param_groups={v!r}", lambda m, v=v: m.__setitem__("param_groups", v))
    for v in [[], "x", None]:
        meta_edit(f"meta fastopt={v!r}", lambda m, v=v: m.__setitem__("fastopt", v))
    for v in [-1, "x", 99, 1.5, None, True, 0]:
        meta_edit(f"meta params={v!r}", lambda m, v=v: m.__setitem__("params", v))
    for v in [3, "2", 2.0, None, True]:
        meta_edit(f"meta format={v!r}", lambda m, v=v: m.__setitem__("format", v), "format")
    for key in ["01", "-1", "x", " 0", "0x0", "1e0"]:
        meta_edit(f"state key {key!r}", lambda m, key=key: m["state"].__setitem__(key, m["state"].pop("0")))
    for v in [["../x"], ["exp_avg", "exp_avg"], "x", [5], None, ["step"], ["a" * 100]]:
        meta_edit(f"state arrays={v!r}", lambda m, v=v: m["state"]["0"].__setitem__("arrays", v))
    meta_edit("state without step", lambda m: m["state"]["0"].pop("step"))
    for v in ["x", -1, 2 ** 60, 1.5, None, True, [1]]:
        meta_edit(f"step={v!r}", lambda m, v=v: [e.__setitem__("step", v) for e in m["state"].values()])
    for v in [NAN, INF, 1e400, -1.0, "x", None, True]:
        meta_edit(f"lr={v!r}", lambda m, v=v: m["param_groups"][0].__setitem__("lr", v))
    for v in ["x", -1, 2 ** 60, NAN, None]:
        meta_edit(f"skipped_steps={v!r}", lambda m, v=v: m["fastopt"].__setitem__("skipped_steps", v))
    for v in [[5], 5, [None], [None, None, None]]:
        meta_edit(f"lr_schedules={v!r}", lambda m, v=v: m["fastopt"].__setitem__("lr_schedules", v))
    for v in ["sgd" if meta["fastopt"]["optimizer"] != "sgd" else "adam", "nope", 5]:
        meta_edit(f"optimizer={v!r}", lambda m, v=v: m["fastopt"].__setitem__("optimizer", v))
    meta_edit("param_shapes off by one", lambda m: m["fastopt"]["param_shapes"][0].__setitem__(0, 99))
    return out


def test_foreign_and_crafted_files(case, tmp_path, rng):
    spec, dtype, source, path, target = case
    files = _foreign_files(tmp_path, path, rng)
    failures = []
    for label, p, match in files:
        before = snapshot(target)
        try:
            fastopt.load(p, target)
            failures.append(f"{label}: loaded")
        except CheckpointError as e:
            if match is not None and match not in str(e):
                failures.append(f"{label}: message {str(e)!r} does not say {match!r}")
            if snapshot(target) != before:
                failures.append(f"{label}: changed the optimizer")
        except Exception as e:  # noqa: BLE001
            failures.append(f"{label}: {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)
    _count("foreign/crafted files", len(files))


def test_fortran_order_members_are_read_correctly(case, tmp_path):
    spec, dtype, source, path, target = case
    meta, members = unpack(path)
    for k, data in members.items():
        arr = np.load(io.BytesIO(data))
        if arr.ndim == 2:
            members[k] = npy_bytes(np.asfortranarray(arr))
            assert members[k] != data
    p = tmp_path / "f.npz"
    p.write_bytes(pack(meta, members))
    fastopt.load(p, target)
    assert state_bytes(target) == state_bytes(source) and param_bytes(target) == param_bytes(source)


def test_special_paths(case, tmp_path):
    spec, dtype, source, path, target = case
    load_fails(tmp_path, target, "a directory")
    link = tmp_path / "link.npz"
    link.symlink_to(tmp_path, target_is_directory=True)
    load_fails(link, target, "a directory")
    if os.path.exists("/dev/null"):
        load_fails("/dev/null", target, "special file")
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "fifo.npz"
        os.mkfifo(fifo)
        load_fails(fifo, target, "special file")  # and does not block reading it
    with pytest.raises(FileNotFoundError):
        fastopt.load(tmp_path / "missing.npz", target)
    with pytest.raises(TypeError):
        fastopt.load(5.5, target)
    with pytest.raises(TypeError, match="take the registry optimizer classes"):
        fastopt.load(path, target.state_dict())
    with pytest.raises(TypeError, match="take the registry optimizer classes"):
        fastopt.save(tmp_path / "x.npz", [np.zeros(3)])
    assert not (tmp_path / "x.npz").exists()


# ---- params in the file ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_resume_from_the_file_alone_is_bit_identical(spec, dtype, tmp_path, rng):
    """Train N steps, save, train M more; vs. fresh arrays + load + the same M steps: identical bytes."""
    n, m = int(rng.integers(1, 6)), int(rng.integers(1, 6))
    stream = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(n + m)]
    first = make_opt(spec, dtype, rng)
    for g in stream[:n]:
        first.step(g)
    fastopt.save(tmp_path / "c.npz", first)
    for g in stream[n:]:
        first.step(g)
    fresh = make_opt(spec, dtype, rng)  # other random params: the file must bring them back
    ids = [id(p) for p in fresh.params]
    fastopt.load(tmp_path / "c.npz", fresh)
    assert [id(p) for p in fresh.params] == ids  # in place, into the optimizer's own arrays
    for g in stream[n:]:
        fresh.step(g)
    assert param_bytes(fresh) == param_bytes(first)
    assert state_bytes(fresh) == state_bytes(first)
    assert [fresh.steps(g) for g in range(2)] == [first.steps(g) for g in range(2)]


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_loading_options_that_need_more_state(spec, tmp_path, rng):
    """The file's options need state slots the target has not allocated (momentum, amsgrad, centered):
    they are allocated during the checks and the run continues exactly like the saved one."""
    dtype = DTYPES[int(rng.integers(2))]
    source = trained(spec, dtype, rng)
    fastopt.save(tmp_path / "c.npz", source)
    target = make_opt(spec, dtype, rng, rich=False)
    target.step(grads(rng, target))
    fastopt.load(tmp_path / "c.npz", target)
    assert state_bytes(target) == state_bytes(source)
    for _ in range(3):
        g = grads(rng, source)
        source.step(g)
        target.step(g)
    assert param_bytes(target) == param_bytes(source) and state_bytes(target) == state_bytes(source)


def test_params_false(case, tmp_path, rng):
    spec, dtype, source, path, target = case
    nop = tmp_path / "noparams.npz"
    fastopt.save(nop, source, params=False)
    meta, members = unpack(nop)
    assert meta["params"] == 0 and not any(k.startswith("params/") for k in members)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="holds no params"):  # params=True: they must be there
        fastopt.load(nop, target, params=True)
    assert snapshot(target) == before
    before = param_bytes(target)
    fastopt.load(nop, target)  # default: restore what the file has
    assert param_bytes(target) == before and state_bytes(target) == state_bytes(source)
    other = trained(spec, dtype, rng, steps=1)
    before = param_bytes(other)
    fastopt.load(path, other, params=False)  # a file with params, not restored
    assert param_bytes(other) == before and state_bytes(other) == state_bytes(source)
    with pytest.raises(TypeError):
        fastopt.save(nop, source, params="yes")
    with pytest.raises(TypeError):
        fastopt.load(nop, source, params=1)


def test_params_are_checked_before_anything_is_written(case, tmp_path, rng):
    spec, dtype, source, path, target = case
    meta, members = unpack(path)
    last = f"params/{len(source.params) - 1}.npy"
    arr = np.load(io.BytesIO(members[last]))
    for label, bad, match in [("shape", np.zeros(arr.size + 2, arr.dtype), "shape"),
                              ("dtype", arr.astype(np.float64 if arr.dtype == np.float32 else np.float32), "dtype"),
                              ("byte order", arr.astype(arr.dtype.newbyteorder()), "byte order")]:
        p = tmp_path / f"{label}.npz"
        p.write_bytes(pack(meta, dict(members, **{last: bad})))
        load_fails(p, target, match)
    # a read-only param: ValueError, nothing written
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    ro = make_opt(spec, dtype, rng, params=params)
    params[-1].flags.writeable = False
    before = snapshot(ro)
    with pytest.raises(ValueError, match="read-only"):
        fastopt.load(path, ro)
    assert snapshot(ro) == before


def test_format_1_files_still_load(case, tmp_path):
    """Files of fastopt 0.1: np.savez, no params, no checksum."""
    spec, dtype, source, path, target = case
    meta, members = unpack(path)
    meta["format"] = 1
    del meta["params"]
    old = tmp_path / "old.npz"
    with open(old, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)),
                 **{k[:-4]: np.load(io.BytesIO(v)) for k, v in members.items() if k.startswith("state/")})
    before = param_bytes(target)
    fastopt.load(old, target)
    assert state_bytes(target) == state_bytes(source) and param_bytes(target) == before
    with pytest.raises(CheckpointError, match="holds no params"):
        fastopt.load(old, target, params=True)


# ---- writing: permissions, stale temporary files, kills ----------------------------------------------

def _small_opt(rng, n=7):
    return fastopt.Adam([rng.standard_normal(n).astype(np.float32)], lr=1e-3)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002, 0o027, 0o000])
def test_files_honour_the_umask(umask, tmp_path, rng):
    opt = _small_opt(rng)
    old = os.umask(umask)
    try:
        fastopt.save(tmp_path / "new.npz", opt)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new.npz").st_mode) == 0o666 & ~umask
    # an existing target keeps its permission bits, as when open() overwrites a file
    os.chmod(tmp_path / "new.npz", 0o640)
    fastopt.save(tmp_path / "new.npz", opt)
    assert stat.S_IMODE(os.stat(tmp_path / "new.npz").st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["new.npz"]


def _temps(directory):
    return sorted(p.name for p in Path(directory).iterdir() if p.name.endswith(".npz.tmp"))


CHILD = textwrap.dedent("""
    import sys, numpy as np, fastopt
    target, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(seed)
    opt = fastopt.Adam([rng.standard_normal(n).astype(np.float32) for _ in range(3)], lr=1e-3)
    opt.step([np.ones(n, np.float32)] * 3)
    write = np.lib.format.write_array
    def announce(*a, **k):  # tells the parent a save is in progress
        sys.stdout.write("w\\n")
        sys.stdout.flush()
        return write(*a, **k)
    np.lib.format.write_array = announce
    while True:
        fastopt.save(target, opt)
""")


def _child_opt(seed, n):
    rng = np.random.default_rng(seed)
    opt = fastopt.Adam([rng.standard_normal(n).astype(np.float32) for _ in range(3)], lr=1e-3)
    opt.step([np.ones(n, np.float32)] * 3)
    return opt


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_save_leaves_the_target_valid_and_the_next_save_removes_stale_temps(tmp_path, rng):
    n = 400_000  # 3 params x 3 arrays x 1.6 MB: a save takes a while
    seed = int(rng.integers(2 ** 31))
    target = tmp_path / "ckpt.npz"
    expected = _child_opt(seed, n)
    fastopt.save(target, expected)
    reader = _child_opt(seed + 1, n)
    # temporary files that the next save must not touch: another target's, an old-style mkstemp name
    other = tmp_path / ".fastopt-0123456789abcdef-999999-deadbeef.npz.tmp"
    other.write_bytes(b"x")
    old_style = tmp_path / ".fastopt-k2j3h4.npz.tmp"
    old_style.write_bytes(b"x")
    stale_seen = 0
    kills = 6
    for k in range(kills):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(target), str(seed), str(n)],
                                 stdout=subprocess.PIPE, env=_env(), cwd=tmp_path)
        try:
            for _ in range(int(rng.integers(1, 14))):  # into the first save or a later one, at some member
                assert child.stdout.readline() == b"w\n"
            time.sleep(float(rng.uniform(0, 0.01)) if k % 2 else 0.0)
        finally:
            child.kill()
            child.wait()
            child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        stale = [t for t in _temps(tmp_path) if t not in (other.name, old_style.name)]
        stale_seen = max(stale_seen, len(stale))
        fastopt.load(target, reader)  # the target is a valid checkpoint after every kill
        assert param_bytes(reader) == param_bytes(expected) and state_bytes(reader) == state_bytes(expected)
    assert stale_seen >= 1, "no kill landed inside a save: the test did not test anything"
    fastopt.save(target, expected)
    assert _temps(tmp_path) == sorted([other.name, old_style.name])
    fastopt.load(target, reader)
    assert param_bytes(reader) == param_bytes(expected)


HOLDER = textwrap.dedent("""
    import os, sys, time
    from fastopt import checkpoint
    directory, name = sys.argv[1], sys.argv[2]
    fd, path = checkpoint._create_temp(directory, checkpoint._temp_stem(name))  # created and locked
    os.write(fd, b"a save in progress")
    print(path, flush=True)
    time.sleep(60)
""")


@pytest.mark.skipif(os.name == "nt", reason="POSIX pids and flock")
def test_a_save_in_progress_elsewhere_is_not_disturbed(tmp_path, rng):
    target = tmp_path / "ckpt.npz"
    opt = _small_opt(rng)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), target.name], stdout=subprocess.PIPE,
                              env=_env(), text=True)
    try:
        live = Path(holder.stdout.readline().strip())
        assert live.exists()
        fastopt.save(target, opt)
        assert live.exists()  # its writer is alive and holds the lock
        # a dead writer's file with the same target and a live pid (reused) stays too: only dead pids
        # whose lock is free are removed
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    fastopt.save(target, opt)
    assert not live.exists() and _temps(tmp_path) == []


CONCURRENT = textwrap.dedent("""
    import sys, numpy as np, fastopt
    target, seed, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    opt = fastopt.Adam([np.random.default_rng(seed).standard_normal(50_000).astype(np.float32)], lr=1e-3)
    for _ in range(rounds):
        fastopt.save(target, opt)
        fastopt.load(target, opt)
""")


def test_concurrent_saves_to_one_target(tmp_path, rng):
    """Each save cleans up stale files first: it must never take a live save's temporary file."""
    target = tmp_path / "ckpt.npz"
    seed = int(rng.integers(2 ** 31))
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(target), str(seed), "25"],
                              stderr=subprocess.PIPE, env=_env(), text=True) for _ in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(errors)
    assert _temps(tmp_path) == []
    opt = fastopt.Adam([np.zeros(50_000, np.float32)], lr=1e-3)
    fastopt.load(target, opt)
    np.testing.assert_array_equal(opt.params[0], np.random.default_rng(seed).standard_normal(50_000).astype(
        np.float32))


# ---- torch.optim state dicts -------------------------------------------------------------------------

def _torch_kwargs(spec):
    kw = richest_options(spec)
    for key, names in spec.torch_groups.items():  # Rprop's etas and step_sizes are tuples in torch too
        if key != "betas" and all(n in kw for n in names):
            kw[key] = tuple(kw.pop(n) for n in names)
    return kw


@pytest.mark.parametrize("spec", TORCH_SPECS, ids=[s.name for s in TORCH_SPECS])
def test_bad_torch_state_dicts_change_nothing(spec, rng):
    torch = pytest.importorskip("torch")
    params = [rng.standard_normal(s) for s in SHAPES]
    tparams = [torch.from_numpy(p.copy()) for p in params]
    theirs = getattr(torch.optim, spec.torch_class)(tparams, **_torch_kwargs(spec))
    for _ in range(3):
        for tp in tparams:
            tp.grad = torch.randn_like(tp)
        theirs.step()
    sd = theirs.state_dict()
    ours = getattr(fastopt, spec.class_name)([p.copy() for p in params], **richest_options(spec))
    ours.step([rng.standard_normal(s) for s in SHAPES])
    # a state array: not the count nor torch-only scalars recomputed on loading (spec.torch_extra_state)
    some = next(k for k in sd["state"][0] if k != "step" and k not in spec.torch_extra_state)
    cases = []

    def edit(label, fn):
        new = copy.deepcopy(sd)
        fn(new)
        cases.append((label, new))

    for v in [5, None, "x", {"state": {}}, {"state": 5, "param_groups": []}, {"state": {}, "param_groups": 5}]:
        cases.append((f"sd={v!r}", v))
    edit("group not a dict", lambda d: d["param_groups"].__setitem__(0, 5))
    edit("group params not a list", lambda d: d["param_groups"][0].__setitem__("params", "x"))
    edit("group params floats", lambda d: d["param_groups"][0].__setitem__("params", [0.5, 1.5, 2.5]))
    edit("lr nan tensor", lambda d: d["param_groups"][0].__setitem__("lr", torch.tensor(float("nan"))))
    edit("lr 2-element tensor", lambda d: d["param_groups"][0].__setitem__("lr", torch.tensor([0.1, 0.2])))
    edit("lr string", lambda d: d["param_groups"][0].__setitem__("lr", "x"))
    edit("unknown key", lambda d: d["param_groups"][0].__setitem__("lookahead", 5))
    edit("state not a dict", lambda d: d.__setitem__("state", [1]))
    edit("state key string", lambda d: d["state"].__setitem__("a", {}))
    edit("state entry not a dict", lambda d: d["state"].__setitem__(0, 5))
    edit("state array is a string", lambda d: d["state"][0].__setitem__(some, "x"))
    edit("state array is a list", lambda d: d["state"][0].__setitem__(some, [0.0] * 5))
    edit("state array bfloat16", lambda d: d["state"][0].__setitem__(some, d["state"][0][some].bfloat16()))
    edit("state array float32", lambda d: d["state"][0].__setitem__(some, d["state"][0][some].float()))
    edit("state array wrong shape", lambda d: d["state"][0].__setitem__(some, torch.zeros(99, dtype=torch.float64)))
    edit("state unknown name", lambda d: d["state"][0].__setitem__("foo", torch.zeros(5, dtype=torch.float64)))
    if spec.name != "sgd":
        for v in ["x", torch.tensor(1.5), torch.tensor([1.0, 2.0]), float("nan"), -1, 2.0 ** 60, None]:
            edit(f"step={v!r}", lambda d, v=v: d["state"][0].__setitem__("step", v))
    failures = [f"{label}: {problem}" for label, bad in cases
                if (problem := _attempt(ours, lambda bad=bad: ours.load_torch_state_dict(bad)))]
    assert not failures, "\n".join(failures)
    for bad_step, exc in [("x", TypeError), (-1, ValueError), (2 ** 60, ValueError), (True, TypeError)]:
        before = snapshot(ours)
        with pytest.raises(exc):
            ours.load_torch_state_dict(sd, step=bad_step)
        assert snapshot(ours) == before
    # a 0-d tensor lr (torch allows it) becomes a Python float
    good = copy.deepcopy(sd)
    good["param_groups"][0]["lr"] = torch.tensor(0.0125, dtype=torch.float64)
    ours.load_torch_state_dict(good, **({"step": 3} if spec.name == "sgd" else {}))
    assert type(ours.param_groups[0]["lr"]) is float and ours.param_groups[0]["lr"] == 0.0125
    _count(f"bad torch state dicts {spec.name}", len(cases) + 4)


# ---- device params (Numba device arrays, under the CUDA simulator: runs without a GPU) ---------------

SIM_CHECK = textwrap.dedent("""
import os, sys, tempfile
import numpy as np
from numba import cuda
import fastopt
rng = np.random.default_rng(int(sys.argv[1]))
host = [rng.standard_normal(s).astype(np.float32) for s in [(5,), (7,)]]
def make(ps):
    return fastopt.Adam([cuda.to_device(p) for p in ps], lr=1e-2, amsgrad=True)
a = make(host)
g = [cuda.to_device(rng.standard_normal(p.shape).astype(np.float32)) for p in host]
a.step(g); a.step(g)
path = os.path.join(tempfile.mkdtemp(), "c.npz")
fastopt.save(path, a)
b = make([rng.standard_normal(p.shape).astype(np.float32) for p in host])
ids = [id(p) for p in b.params]
fastopt.load(path, b)
assert [id(p) for p in b.params] == ids
for x, y in zip(a.params, b.params):
    assert x.copy_to_host().tobytes() == y.copy_to_host().tobytes()
a.step(g); b.step(g)
for x, y in zip(a.params, b.params):
    assert x.copy_to_host().tobytes() == y.copy_to_host().tobytes()
# a bad file changes nothing on the device either
data = bytearray(open(path, "rb").read()); data[100] ^= 1
open(path, "wb").write(bytes(data))
before = [p.copy_to_host().tobytes() for p in b.params]
try:
    fastopt.load(path, b); raise SystemExit("loaded")
except fastopt.CheckpointError:
    pass
assert [p.copy_to_host().tobytes() for p in b.params] == before
print("ok")
""")


def test_device_params_are_saved_and_restored_in_place_under_the_cuda_simulator(tmp_path, rng):
    pytest.importorskip("numba")
    env = dict(_env(), NUMBA_ENABLE_CUDASIM="1")
    script = tmp_path / "sim_check.py"
    script.write_text(SIM_CHECK)
    out = subprocess.run([sys.executable, str(script), str(int(rng.integers(2 ** 31)))], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


class _LockedSchedule:
    """An lr schedule with state that deepcopy cannot copy (it holds a lock), as a user's might."""

    def __init__(self, scale=1.0, with_state_dict=True):
        import threading
        self.scale, self._lock = scale, threading.Lock()
        if not with_state_dict:
            self.state_dict = None

    def __call__(self, step):
        if self.scale == "raise":
            raise RuntimeError("no lr")
        return 1e-3 * self.scale

    def state_dict(self):
        return {"scale": self.scale}

    def load_state_dict(self, sd):
        self.scale = sd["scale"]


def _two_group_adam(rng, schedule):
    ps = [rng.standard_normal(n).astype(np.float32) for n in (5, 3)]
    opt = fastopt.Adam([{"params": ps[:1], "lr": 1e-3}, {"params": ps[1:], "lr": schedule}])
    opt.step([rng.standard_normal(p.shape).astype(np.float32) for p in ps])
    return opt, ps


@pytest.mark.parametrize("saved_scale, message", [
    (float("nan"), "Invalid learning rate: nan"), (-2.0, "Invalid learning rate"), ("raise", "RuntimeError: no lr"),
    ("x", "TypeError")])
def test_a_schedule_deepcopy_cannot_copy_is_checked_in_place_and_put_back(rng, saved_scale, message):
    """A bad saved state for such a schedule used to be loaded unchecked: the optimizer's state half written
    (another group's lr and a param's moments), or a NaN lr accepted until the next step raised."""
    schedule = _LockedSchedule()
    opt, ps = _two_group_adam(rng, schedule)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 0.5  # valid edits before the bad part
    sd["state"][0]["exp_avg"][:] = 7.0
    sd["fastopt"]["lr_schedules"][1]["state"] = {"scale": saved_scale}
    before = pickle.dumps(opt.state_dict()), [p.tobytes() for p in ps], opt.last_lr
    with pytest.raises(CheckpointError, match=f"param group 1: its lr schedule gives no valid learning rate at the "
                                              f"restored step 1: .*{message}"):
        opt.load_state_dict(sd)
    assert schedule.scale == 1.0  # put back
    assert (pickle.dumps(opt.state_dict()), [p.tobytes() for p in ps], opt.last_lr) == before


def test_a_schedule_deepcopy_cannot_copy_loads_its_saved_state(rng):
    schedule = _LockedSchedule()
    opt, ps = _two_group_adam(rng, schedule)
    sd = opt.state_dict()
    sd["fastopt"]["lr_schedules"][1]["state"] = {"scale": 3.0}
    opt.load_state_dict(sd)
    assert schedule.scale == 3.0 and opt.last_lr == [1e-3, 3e-3]
    assert opt.param_groups[1]["lr"] is schedule


def test_a_schedule_that_can_be_neither_copied_nor_saved_is_refused(rng):
    schedule = _LockedSchedule(with_state_dict=False)
    opt, ps = _two_group_adam(rng, schedule)
    sd = opt.state_dict()
    sd["fastopt"]["lr_schedules"][1] = {"state": {"scale": 2.0}}
    before = pickle.dumps(opt.state_dict()), [p.tobytes() for p in ps]
    with pytest.raises(CheckpointError, match="param group 1: its lr schedule .* can be neither copied nor saved "
                                              "with state_dict\\(\\) \\(TypeError: .*\\), so its saved state cannot "
                                              "be checked before it is loaded"):
        opt.load_state_dict(sd)
    assert schedule.scale == 1.0
    assert (pickle.dumps(opt.state_dict()), [p.tobytes() for p in ps]) == before


@pytest.mark.parametrize("bad", [lambda step: float("nan"), lambda step: 1 / 0, lambda step: "0.1"])
def test_check_state_evaluates_and_checks_a_schedule_left_to_it(rng, bad):
    """OptimizerState.lrs None: check_state evaluates the group's schedule at the restored step and refuses
    a bad lr; apply_state then cannot fail."""
    from fastopt.statedict import OptimizerState
    opt, ps = _two_group_adam(rng, 1e-3)
    hps = [dict(h) for h in opt.export_state().hyperparameters]
    good = OptimizerState(optimizer="adam", hyperparameters=[dict(hps[0]), dict(hps[1], lr=lambda step: 0.01 * step)],
                          steps=[4, 6], lrs=[None, None])
    opt.apply_state(opt.check_state(good))
    assert opt.last_lr == [hps[0]["lr"], 0.06]
    before = pickle.dumps(opt.state_dict()), [p.tobytes() for p in ps], opt.last_lr
    state = OptimizerState(optimizer="adam", hyperparameters=[dict(hps[0]), dict(hps[1], lr=bad)], steps=[1, 1],
                           lrs=[None, None])
    with pytest.raises(CheckpointError, match="param group 1: its lr schedule gives no valid learning rate"):
        opt.check_state(state)
    assert (pickle.dumps(opt.state_dict()), [p.tobytes() for p in ps], opt.last_lr) == before


@pytest.mark.parametrize("name", ["Muon", "Adafactor", "SparseAdam"])
def test_composite_state_dict_listing_a_param_twice_is_refused(name, rng):
    """A saved group [0, 0] sent param 0's state to param 1 and dropped param 0's (Muon also shifted every
    later param's index); refused, with everything unchanged, as the registry classes refuse it."""
    ps = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(3)]
    opt = getattr(fastopt, name)([{"params": ps[:2]}, {"params": ps[2:]}], lr=0.01)
    if name == "SparseAdam":
        grads = [(np.array([0, 2]), rng.standard_normal((2, 4)).astype(np.float32)) for _ in ps]
    else:
        grads = [rng.standard_normal(p.shape).astype(np.float32) for p in ps]
    opt.step(grads)
    sd = opt.state_dict()
    before = pickle.dumps(sd), [p.tobytes() for p in ps]
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["params"] = [0, 0]
    with pytest.raises(ValueError, match="param 0 a second time"):
        opt.load_state_dict(bad)
    assert (pickle.dumps(opt.state_dict()), [p.tobytes() for p in ps]) == before
    opt.load_state_dict(sd)  # the real one still loads
