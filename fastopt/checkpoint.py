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

The state-dict layout itself (state_dict, load_state_dict, the torch conversion) is fastopt/statedict.py,
built on the optimizer's public state API (export_state / check_state / apply_state); this module
only stores it in files, and uses nothing private of the optimizer.

    opt.torch_state_dict() / opt.load_torch_state_dict(sd): the same state as torch.optim.<Class>
    keeps it (Adagrad's "sum", NAdam's "mu_product", float32 "step" tensors), so a PyTorch user can
    switch in either direction without losing optimizer state. Loading converts everything first,
    then goes through the same checks.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import stat
import zipfile
from collections.abc import Callable
from typing import BinaryIO

import numpy as np

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from fastopt.arrays import to_host as _to_host, writable_view as _writable_view
from fastopt.optim import Optimizer, OptimizerState
from fastopt.specs import shown
from fastopt.statedict import (CheckpointError, fail, apply_load, from_torch_state_dict, load_state_dict, plan_load,
                               state_dict, to_torch_state_dict)

__all__ = ["save", "load", "write_atomic", "read", "CheckpointError", "OptimizerState", "state_dict", "load_state_dict",
           "to_torch_state_dict", "from_torch_state_dict"]

FILE_FORMAT = 2    # layout of the file: 2 adds the params and the checksum; 1 is still read

_TRAILER = b"fastopt-checkpoint sha256:"
_DIGEST_LEN = 64
_CHUNK = 1 << 22
_MEMBER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_INDEX = re.compile(r"0|[1-9][0-9]{0,15}")
_TEMP_NAME = re.compile(r"\.fastopt-([0-9a-f]{16})-([0-9]{1,10})-[0-9a-f]{8}\.npz\.tmp")


# ---------------------------------------------------------------------------------------------------
# Checkpoint files: writing
# ---------------------------------------------------------------------------------------------------

def _require_optimizer(opt):
    if not isinstance(opt, Optimizer):
        name = type(opt).__name__
        # the composite classes (Adafactor, Muon, SparseAdam, LBFGS) keep torch's state dict layout instead
        hint = (f"; {name} keeps its state in state_dict(): save that (pickle, torch.save) and restore it with "
                f"load_state_dict()" if callable(getattr(opt, "state_dict", None)) else "")
        raise TypeError(f"fastopt.save and fastopt.load take the registry optimizer classes (fastopt.Adam, ...), "
                        f"got {name}{hint}")


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
        raise TypeError(f"params must be True or False, got {shown(params)}")
    path = os.fspath(path)
    sd = opt.state_dict()
    members = []
    state_meta = {}
    for i, entry in sd["state"].items():
        names = [k for k in entry if k != "step"]
        state_meta[str(i)] = {"step": entry["step"], "arrays": names}
        bf16 = [name for name in names if _storable(entry[name]) is not entry[name]]
        if bf16:  # bfloat16 state (state_dtype="bfloat16", a Kahan compensation): stored as its bits
            state_meta[str(i)]["bfloat16"] = bf16
        members += [(f"state/{i}/{name}", _storable(entry[name])) for name in names]
    nparams = 0
    if params:
        host = [_to_host(_writable_view(p, f"param {i}")) for i, p in enumerate(opt.params)]
        members += [(f"params/{i}", _storable(a)) for i, a in enumerate(host)]
        nparams = len(host)
    meta = {"format": FILE_FORMAT, "param_groups": sd["param_groups"], "fastopt": sd["fastopt"],
            "state": state_meta, "params": nparams}
    members.insert(0, ("meta", np.array(json.dumps(meta, allow_nan=True))))

    write_atomic(path, lambda f: _write_file(f, members))


def write_atomic(path, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace the file `path` with what `write(f)` writes, atomically: through a locked
    temporary file in the same directory (temporaries of earlier writers that died are removed), the
    target's permission bits kept, fsync, rename over the target, fsync of the directory. A crash at any
    point leaves the old file (or none), never a partial one. Used by save() and by the sharded
    checkpoints of fastopt.distributed."""
    path = os.fsdecode(os.fspath(path))  # a bytes path too: the temporaries are named and matched as str
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
            write(f)
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
            fail(f"{what}: unsupported .npy version {version}")
        if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in kinds:
            fail(f"{what} has dtype {dtype}, which a checkpoint does not hold")
        if not dtype.isnative:
            fail(f"{what} has non-native byte order ({dtype.str})")
        if dtype.itemsize == 0 or not isinstance(shape, tuple) or any(
                type(d) is not int or d < 0 for d in shape):
            fail(f"{what} has an invalid header (shape {shown(shape)}, dtype {dtype})")
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        stored = info.file_size - m.tell()
        if nbytes != stored:
            fail(f"{what}: its header describes {nbytes} bytes but {stored} are stored")
        flat = np.empty(count, dtype)
        view = memoryview(flat.view(np.uint8))
        done = 0
        while done < nbytes:  # the last read reaches the member's end, where zipfile checks its CRC-32
            got = m.readinto(view[done:done + _CHUNK])
            if not got:
                raise EOFError(f"{what} ended early")
            done += got
        if m.read(1):
            fail(f"{what} has bytes after its data")
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


def _parse(f, path):
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        fail(f"{path} is empty (0 bytes), not a fastopt checkpoint")
    tail = len(_TRAILER) + _DIGEST_LEN
    checked = False
    if size > tail:
        f.seek(size - tail)
        end = f.read(tail)
        if end.startswith(_TRAILER):
            if _digest(f, size - _DIGEST_LEN) != end[len(_TRAILER):]:
                fail(f"{path} is damaged: its SHA-256 checksum does not match its contents (changed or cut "
                      f"short after it was written)")
            checked = True
    f.seek(0)
    zf = zipfile.ZipFile(f)
    infos = zf.infolist()
    names = [info.filename for info in infos]
    if "meta.npy" not in names:
        fail(f"{path} is not a fastopt checkpoint (no 'meta' entry)")
    if len(set(names)) != len(names):
        fail(f"{path} is corrupted: a member appears twice")
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            fail(f"{path}: member {info.filename!r} is compressed or encrypted (fastopt.save writes neither)")
        if info.file_size != info.compress_size or info.file_size > size:
            fail(f"{path} is corrupted: member {info.filename!r} has inconsistent sizes")
    by_name = {info.filename: info for info in infos}
    text = _read_member(zf, by_name["meta.npy"], f"{path}: meta", kinds="U")
    if text.shape != ():
        fail(f"{path}: meta is not a single string")
    meta = json.loads(str(text[()]))
    if not isinstance(meta, dict):
        fail(f"{path}: meta is not a JSON object")
    fmt = meta.get("format")
    if type(fmt) is not int or fmt not in (1, FILE_FORMAT):
        fail(f"{path}: unsupported checkpoint format {shown(fmt)} (this fastopt reads 1 and {FILE_FORMAT})")
    if fmt >= 2 and not checked:
        fail(f"{path} is damaged: a format {fmt} checkpoint must end with its checksum")
    state_meta, groups, extra = meta.get("state"), meta.get("param_groups"), meta.get("fastopt")
    if not isinstance(state_meta, dict) or not isinstance(groups, list) or not isinstance(extra, dict):
        fail(f"{path}: meta must have 'state' (object), 'param_groups' (list) and 'fastopt' (object)")
    nparams = meta.get("params", 0) if fmt >= 2 else 0
    if type(nparams) is not int or not 0 <= nparams <= len(names):
        fail(f"{path}: meta 'params' must be a count of params, got {shown(nparams)}")
    expected = {"meta.npy": None}
    layout = {}
    bf16_members = set()  # (param, state name) stored as bfloat16 bits
    for key, entry in state_meta.items():
        if not _INDEX.fullmatch(key):
            fail(f"{path}: state key {key!r} is not a param number")
        if not isinstance(entry, dict) or "step" not in entry or not isinstance(entry.get("arrays"), list):
            fail(f"{path}: state of param {key} must be an object with 'step' and 'arrays'")
        arrays = entry["arrays"]
        if any(not isinstance(a, str) or not _MEMBER_NAME.fullmatch(a) or a == "step" for a in arrays) or len(
                set(arrays)) != len(arrays):
            fail(f"{path}: state of param {key} lists invalid array names {shown(arrays)}")
        bf16 = entry.get("bfloat16", [])
        if not isinstance(bf16, list) or any(a not in arrays for a in bf16):
            fail(f"{path}: state of param {key} lists invalid bfloat16 arrays {shown(bf16)}")
        layout[int(key)] = (entry["step"], arrays)
        for a in bf16:
            bf16_members.add((int(key), a))
        for a in arrays:
            expected[f"state/{key}/{a}.npy"] = (int(key), a)
    for i in range(nparams):
        expected[f"params/{i}.npy"] = ("param", i)
    if set(names) != set(expected):
        missing = sorted(set(expected) - set(names))
        unexpected = sorted(set(names) - set(expected))
        fail(f"{path}: the members do not match its meta"
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
        elif where in bf16_members:
            state[where[0]][where[1]] = _as_bfloat16(path, name[:-4], array, " state")
        else:
            state[where[0]][where[1]] = array
    groups = [dict(g, betas=tuple(g["betas"])) if isinstance(g, dict) and isinstance(g.get("betas"), list) else g
              for g in groups]
    if params is not None:
        params = [_restored(path, i, a, extra.get("param_dtypes")) for i, a in enumerate(params)]
    return {"state": state, "param_groups": groups, "fastopt": extra}, params


def _storable(a):
    """An array as a .npy member holds it: bfloat16 (ml_dtypes; .npy has no such type) as its uint16
    bits. The meta's param_dtypes says which members to read back as bfloat16."""
    if a.dtype.name == "bfloat16" and a.dtype.kind == "V" and a.dtype.itemsize == 2:
        return a.view(np.uint16)
    return a


def _restored(path, i, a, dtypes):
    """A params member as the param's dtype: the uint16 bits of a bfloat16 param viewed as bfloat16."""
    if isinstance(dtypes, list) and i < len(dtypes) and dtypes[i] == "bfloat16":
        return _as_bfloat16(path, f"params/{i}", a, " param")
    return a


def _as_bfloat16(path, member, a, what):
    """The uint16 bits of a bfloat16 member (a param, or state saved with state_dtype="bfloat16"), viewed
    as ml_dtypes' bfloat16."""
    if a.dtype != np.uint16:
        fail(f"{path}: {member} of a bfloat16{what} has dtype {a.dtype}, expected its uint16 bits")
    try:
        import ml_dtypes
    except ImportError:
        fail(f"{path} holds bfloat16 arrays: reading them needs the ml_dtypes package (pip install ml_dtypes)")
    return a.view(ml_dtypes.bfloat16)


def _read(path):
    path = os.fspath(path)
    st = os.stat(path)  # FileNotFoundError / PermissionError: the caller's to handle
    if not stat.S_ISREG(st.st_mode):
        fail(f"{path} is not a regular file ({'a directory' if stat.S_ISDIR(st.st_mode) else 'a special file'})")
    with open(path, "rb") as f:
        try:
            return _parse(f, path)
        except CheckpointError:
            raise
        except Exception as e:  # whatever a damaged zip, .npy header or JSON text raises
            raise CheckpointError(f"{path} is corrupted or not a fastopt checkpoint: {type(e).__name__}: "
                                  f"{shown(str(e), 200)}") from None


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
        raise TypeError(f"params must be None, True or False, got {shown(params)}")
    sd, saved = _read(path)
    if params and saved is None:
        fail(f"{os.fspath(path)} holds no params (saved with params=False, or by fastopt 0.1)")
    apply_load(plan_load(opt, sd, saved if params is not False else None))
