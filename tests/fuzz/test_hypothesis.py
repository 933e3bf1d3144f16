"""Hypothesis over the value space the tables sample at fixed points: any Python/NumPy value for any
hyperparameter of any registry optimizer (functional call, class constructor, param-group edit), any
clipping bound, any set of byte flips / truncation of a checkpoint. Each example is checked by the same
`run_case` as the tables. These run in-process: hyperparameters and files are validated in Python before
any kernel runs (huge steps, which once hung NAdam, stay in the tables' child processes).

Examples are random per run (no database, so CI does not depend on local state); a failure prints the
falsifying example and a blob to reproduce it (@reproduce_failure). FASTOPT_FUZZ_SEED pins the seed.
"""
from __future__ import annotations

import math
import numbers
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import fastopt

from .conftest import fuzz_seed
from .harness import Case, run_case
from .tables import (SPECS, Box, base_hp, class_groups, class_kwargs, class_params, full_hp, functional_call,
                     good_grads, good_problem, stepped_opt_arrs, step_call, F4)

# overflow in the update of valid-but-extreme values is not an input error
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

MAX_EXAMPLES = int(os.environ.get("FASTOPT_FUZZ_EXAMPLES", "150"))
SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Any value a user might pass: finite, huge, NaN and infinite floats; integers beyond float range;
# bools; NumPy scalars; strings, None, containers, complex numbers, arrays.
ANY_VALUE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10 ** 420), max_value=10 ** 420),
    st.booleans(),
    st.floats(width=32, allow_nan=True, allow_infinity=True).map(np.float32),
    st.floats(allow_nan=True, allow_infinity=True).map(np.float64),
    st.integers(min_value=-(2 ** 63), max_value=2 ** 63 - 1).map(np.int64),
    st.sampled_from([None, "0.1", "", [0.1], (0.1,), {}, 1j, np.array([0.1]), np.bool_(True), object()]),
)


def expectation(hyper, value):
    """'ok' or 'error' for a float hyperparameter (the registry's range, finite, a real number that is
    not a bool); bool hyperparameters take bools."""
    if hyper.kind == "bool":
        return "ok" if isinstance(value, (bool, np.bool_)) else "error"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return "error"
    try:
        f = float(value)
    except OverflowError:
        return "error"
    if not (math.isfinite(f) or (hyper.inf_ok and f == math.inf)) or (hyper.check is not None and not hyper.check(f)):
        return "error"
    return "ok"


def _valid(spec, hp):
    try:
        spec.validate(hp, 1)
        return True
    except (TypeError, ValueError):
        return False


def _check(case, stats):
    stats["bad"] += 1
    fail = run_case(case, fuzz_seed())
    assert fail is None, f"{case.desc}: {fail['kind']}: {fail['detail']}"


def _expect(spec, hp, hyper, value):
    """The combination may be invalid for another reason (SGD nesterov needs momentum): then 'any'."""
    e = expectation(hyper, value)
    if e == "ok" and not _valid(spec, dict(hp, **{hyper.name: float(value) if hyper.kind == "float" else value})):
        return "any"
    return "any" if e == "ok" else e  # an accepted value may still overflow the update: not an input error


@seed(fuzz_seed())
@SETTINGS
@given(spec=st.sampled_from(SPECS), data=st.data(), value=ANY_VALUE, form=st.sampled_from(["single", "list"]),
       backend=st.sampled_from(["cython", "numpy"]))
def test_functional_hyperparameter(spec, data, value, form, backend, fuzz_stats):
    hyper = data.draw(st.sampled_from(spec.hypers), label="hyper")
    hp = full_hp(spec)
    names = (hyper.name, hyper.label) if hyper.label else (hyper.name,)

    def build(rng, plain):
        arrs = good_problem(spec, hp, form, F4, rng)
        arrs["_kw"] = Box({hyper.name: value})
        return arrs
    _check(Case("hyp", f"fastopt.{spec.function_name}(..., {hyper.name}={value!r}, backend={backend!r}) [{form}]",
                build, [functional_call(spec, hp, backend)], expect=_expect(spec, hp, hyper, value), names=names),
           fuzz_stats)


@seed(fuzz_seed())
@SETTINGS
@given(spec=st.sampled_from(SPECS), data=st.data(), value=ANY_VALUE,
       where=st.sampled_from(["ctor", "group1", "edit0", "edit1", "add_group"]))
def test_class_hyperparameter(spec, data, value, where, fuzz_stats):
    hyper = data.draw(st.sampled_from(spec.hypers), label="hyper")
    hp = base_hp(spec)
    key = "betas" if hyper.name in ("beta1", "beta2") else hyper.name
    if key == "betas":
        value = (value, hp["beta2"]) if hyper.name == "beta1" else (hp["beta1"], value)
    cls = getattr(fastopt, spec.class_name)
    names = (key, hyper.name) + ((hyper.label,) if hyper.label else ())
    v = value[0 if hyper.name == "beta1" else 1] if key == "betas" else value

    def build(rng, plain):
        if where.startswith("edit") or where == "add_group":
            return stepped_opt_arrs(spec, hp, "cython", rng)
        buf32, buf64, params = class_params(rng)
        return {"params": params, "grads": good_grads(rng, params)}

    def call(arrs):
        if where == "ctor":
            arrs["opt"] = cls(class_groups(spec, hp, arrs["params"]), **dict(class_kwargs(spec, hp), **{key: value}))
        elif where == "group1":
            groups = class_groups(spec, hp, arrs["params"])
            groups[1][key] = value
            arrs["opt"] = cls(groups, **class_kwargs(spec, hp))
        elif where == "add_group":
            arrs["opt"].add_param_group({"params": [np.ones((2, 2), F4)], key: value})
            arrs["grads"] = arrs["grads"] + [np.ones((2, 2), F4)]
        else:
            arrs["opt"].param_groups[int(where[-1])][key] = value

    _check(Case("hyp", f"fastopt.{spec.class_name}: {where} {key}={value!r}, then o.step(grads)", build,
                [call, step_call], expect=_expect(spec, hp, hyper, v), names=names), fuzz_stats)


CLIP = [("clip_by_value", "clip_value"), ("clip_by_norm", "max_norm"), ("clip_by_global_norm", "max_norm")]


@seed(fuzz_seed())
@SETTINGS
@given(fn=st.sampled_from(CLIP), value=ANY_VALUE, backend=st.sampled_from(["cython", "numpy"]))
def test_clip_bound(fn, value, backend, fuzz_stats):
    fname, bound = fn
    h = fastopt.specs.Hyper(bound, 0.0, "", check=lambda x: x >= 0)

    def build(rng, plain):
        return {"grads": [np.asarray(rng.standard_normal(s) * 10, F4) for s in [(3, 4), (5,)]]}

    def call(arrs):
        return getattr(fastopt, fname)(arrs["grads"], value, backend=backend)
    _check(Case("hyp", f"fastopt.{fname}(grads, {value!r}, backend={backend!r})", build, [call],
                expect="any" if expectation(h, value) == "ok" else "error", names=(bound,)), fuzz_stats)


_CKPT: dict = {}


def _checkpoint(tmp_dir, spec):
    if spec.name not in _CKPT:
        path = os.path.join(tmp_dir, f"{spec.name}.npz")
        fastopt.save(path, stepped_opt_arrs(spec, full_hp(spec), "cython", np.random.default_rng(0))["opt"])
        with open(path, "rb") as f:
            _CKPT[spec.name] = f.read()
    return _CKPT[spec.name]


@seed(fuzz_seed())
@SETTINGS
@given(spec=st.sampled_from(SPECS), data=st.data())
def test_damaged_checkpoint(spec, data, tmp_path_factory, fuzz_stats):
    """Any bytes flipped, any cut: fastopt.load raises CheckpointError and leaves the optimizer alone,
    or loads (a flip in a field nobody reads)."""
    tmp = str(tmp_path_factory.getbasetemp())
    good = _checkpoint(tmp, spec)
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(1, 255)), max_size=4),
                      label="flips")
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(good))), label="cut")
    damaged = bytearray(good)
    for pos, xor in flips:
        damaged[pos] ^= xor
    if cut is not None:
        damaged = damaged[:cut]
    path = os.path.join(tmp, f"{spec.name}-damaged.npz")
    with open(path, "wb") as f:
        f.write(bytes(damaged))
    expect = "any" if bytes(damaged) != good else "ok"

    def build(rng, plain):
        return stepped_opt_arrs(spec, full_hp(spec), "cython", rng)
    _check(Case("hyp", f"fastopt.load(<{spec.class_name} checkpoint, flips {flips}, cut {cut}>, o)", build,
                [lambda arrs: fastopt.load(path, arrs["opt"])], expect="any" if expect == "ok" else expect,
                exc=(fastopt.CheckpointError,)), fuzz_stats)
