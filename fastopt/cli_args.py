"""Option parsing and output helpers shared by fastopt's command lines (fastopt/cli.py and the
trainer's fastopt/train/cli.py) and the benchmarks: typed option values that name the option and the value
in their errors, output-path checks, strict JSON, number formatting. A leaf below both command lines, so
neither imports the other for them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile


# ------------------------------------------------------------------------------------------ errors

class UsageError(Exception):
    """Bad user input found after parsing (a combination of options, an unwritable output path):
    reported argparse-style by main() with exit code 2."""


class RunError(Exception):
    """A run that could not complete (e.g. training diverged): one line on stderr, exit code 1."""


# ------------------------------------------------------------------------------------------ option types
# argparse calls these on the raw text; an ArgumentTypeError becomes
#     fastopt train: error: argument --lr: Invalid learning rate: -0.1
# and exit code 2, without a traceback.

def _range_text(low, high, low_open, high_open):
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts)


def _check_range(value, text, label, low, high, low_open, high_open):
    bad = (low is not None and (value <= low if low_open else value < low)) or \
          (high is not None and (value >= high if high_open else value > high))
    if bad:
        limits = _range_text(low, high, low_open, high_open)
        raise argparse.ArgumentTypeError(f"Invalid {label}: {text} (must be {limits})")


def _parse_float(text, label):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"Invalid {label}: {text!r} (expected a number)") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"Invalid {label}: {text} (must be finite)")
    return value


def _parse_int(text, label, allow_exponent=False):
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    if allow_exponent:  # element counts such as 1e6
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is not None and math.isfinite(value) and value.is_integer():
            return int(value)
    raise argparse.ArgumentTypeError(f"Invalid {label}: {text!r} (expected an integer)")


def real(label, *, low=None, high=None, low_open=False, high_open=False):
    """An option type: a finite float in the given range; `label` names it in errors."""
    def parse(text):
        value = _parse_float(text, label)
        _check_range(value, text.strip(), label, low, high, low_open, high_open)
        return value
    parse.__name__ = label
    return parse


def integer(label, *, low=None, high=None, allow_exponent=False):
    """An option type: an integer in [low, high]."""
    def parse(text):
        value = _parse_int(text, label, allow_exponent)
        _check_range(value, str(value), label, low, high, False, False)
        return value
    parse.__name__ = label
    return parse


def thread_count(label="number of threads"):
    """An option type: a thread count fastopt.set_num_threads takes (an integer in [1, MAX_THREADS]: a count
    past it was a traceback from set_num_threads after parsing)."""
    from fastopt.backends.cython_backend import MAX_THREADS
    return integer(label, low=1, high=MAX_THREADS)


def listing(item, label, *, length=None, min_length=1):
    """An option type: comma-separated values, each parsed by the option type `item`."""
    def parse(text):
        parts = [p.strip() for p in text.split(",")]
        if len(parts) > 1 and not parts[-1]:
            parts.pop()  # one trailing comma ("1e5,") is harmless
        if any(not p for p in parts) and text.strip():
            raise argparse.ArgumentTypeError(f"Invalid {label}: {text!r} (an empty value between commas)")
        parts = [p for p in parts if p]
        if length is not None and len(parts) != length:
            raise argparse.ArgumentTypeError(f"Invalid {label}: {text!r} (expected {length} comma-separated values)")
        if len(parts) < min_length:
            raise argparse.ArgumentTypeError(f"Invalid {label}: {text!r} (expected at least {min_length} "
                                             "comma-separated value(s))")
        return tuple(item(p) for p in parts)
    parse.__name__ = label
    return parse


def optimizer_names(text, known=None, others=""):
    """An option type: comma-separated optimizer names (at least one, each in `known`, by default
    fastopt.specs.all_optimizer_names(): the registry's and the composite ones). `others`: what the
    message says of known names outside `known`."""
    from fastopt.specs import all_optimizer_names
    known = all_optimizer_names() if known is None else known
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated optimizer names, got {text!r}")
    unknown = [n for n in names if n not in known]
    if unknown:
        elsewhere = [n for n in unknown if n in all_optimizer_names()]
        why = f" ({', '.join(elsewhere)}: {others})" if elsewhere and others else ""
        raise argparse.ArgumentTypeError(f"unknown optimizer(s) {', '.join(repr(n) for n in unknown)}{why}; "
                                         f"known: {', '.join(known)}")
    return list(dict.fromkeys(names))  # in order, without repeats


def fused_optimizer_names(text):
    """optimizer_names among the registry's: the fused elementwise updates `fastopt bench` times."""
    from fastopt.specs import REGISTRY
    return optimizer_names(text, list(REGISTRY), "not a fused elementwise update; its own benchmark is "
                                                 "bench/bench_<name>.py in fastopt's source repository")


# ------------------------------------------------------------------------------------------ output files

def check_output_path(option, path):
    """Raise UsageError unless `path` can be written: its directory must exist (nothing is created) and be
    writable, and `path` must not be a directory. Called before any long work."""
    if not path:
        raise UsageError(f"{option}: empty path")
    full = os.path.abspath(os.path.expanduser(path))
    directory = os.path.dirname(full)
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise UsageError(f"{option} {path}: the directory {directory} {what} (fastopt does not create directories)")
    if os.path.isdir(full):
        raise UsageError(f"{option} {path}: is a directory; give a file name")
    # try it: permission bits do not tell everything (root, read-only mounts, /proc)
    try:
        if os.path.exists(full):
            with open(full, "a"):  # appending nothing leaves the file as it is
                pass
        else:
            fd, probe = tempfile.mkstemp(prefix=".fastopt-probe-", dir=directory)
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot write there ({e.strerror or e})") from None


def finite_json(value):
    """`value` with every non-finite float (NaN, +-Infinity) replaced by None, NumPy scalars and arrays turned
    into Python numbers and lists, tuples into lists: what strict JSON can hold."""
    if isinstance(value, dict):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    tolist = getattr(value, "tolist", None)  # NumPy / CuPy scalars and arrays
    if tolist is not None:
        return finite_json(tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")


def dumps(payload, indent=2) -> str:
    """Strict JSON text: non-finite numbers become null (see finite_json); NaN/Infinity never appear."""
    return json.dumps(finite_json(payload), indent=indent, allow_nan=False)


def write_json(path, payload, indent=2) -> None:
    """Write strict JSON to `path` atomically (a temporary file in the same directory, then rename)."""
    text = dumps(payload, indent) + "\n"
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:  # checked up front, but the disk may fill or the directory go away meanwhile
        raise RunError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fmt(value, digits=4) -> str:
    """A number for a table: fixed point with `digits` decimals for ordinary magnitudes, scientific
    notation for very large or small ones, 'nan'/'inf' as such (never 60-digit fixed-point numbers)."""
    if value is None:
        return "n/a"
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 10.0 ** -digits):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}"
