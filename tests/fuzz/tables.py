"""The generated tables: one per public surface, each the product of the registry (fastopt.REGISTRY) and
the bad-input dimensions of values.py. `TABLES[name](backend)` returns the list of Cases; it must be
cheap and deterministic (the child process rebuilds it to run cases by index), so arrays are only made
inside `build(rng, plain)`.

Conventions: functional problems use 2-D arrays (single form: (3, 4); list form: (3, 4), (3, 4), (2, 5),
the first two of one shape so that cross-entry aliasing is not masked by a shape error); a bad element
goes first (index 0) or last (index 2) of a list, where a kernel that validates as it goes would already
have written the others. Optimizer classes get four params in two groups and two dtype buckets per group
(float32 a, float64 b | float32 c, float64 d, a/c and b/d of equal shapes), the float32 ones views of one
buffer so that overlapping and disjoint views can be made; they take one good step before the case. The
train_eval table covers the schedule-free switch, composite_step the steps of Muon, Adafactor and SparseAdam,
torch_class the fastopt.torch classes.
"""
from __future__ import annotations

import array
import atexit
import copy
import gzip
import importlib.util
import json
import math
import os
import shutil
import tempfile

import numpy as np

import fastopt
from fastopt.specs import REGISTRY, REQUIRED

from .harness import ALLOWED, Case, to_plain
from .values import (BAD_BACKENDS, BAD_BOOL_VALUES, BAD_GRAD_SCALE, BAD_STEP_VALUES, ELEMENT_DIMS, F4, F8,
                     HUGE_INT, OK_GRAD_SCALE, OK_STEP_VALUES, bad_real_values, ok_real_values)

SPECS = list(REGISTRY.values())
SINGLE_SHAPE = (3, 4)
LIST_SHAPES = [(3, 4), (3, 4), (2, 5)]


class Box:
    """A value the snapshot does not look into (keyword arguments, whose plain form may differ)."""

    def __init__(self, v):
        self.v = v


# torch CPU tensors must work wherever torch is installed; imported only by the cases that use it
# (importing torch costs seconds in every child process)
HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _torch_tensor(a):
    import torch
    return torch.from_numpy(a.copy()).detach()


# ---------------------------------------------------------------------------------------------------
# Configurations and problems, from the registry
# ---------------------------------------------------------------------------------------------------

def base_hp(spec):
    hp = dict(spec.defaults)
    if hp.get("lr") is REQUIRED:
        hp["lr"] = 0.05
    return hp


def full_hp(spec):
    """The defaults with every optional state switched on where a flag or momentum does it (so that
    every state slot is exercised), keeping only combinations spec.validate accepts."""
    hp = base_hp(spec)
    if "momentum" in hp:
        hp["momentum"] = 0.9
    for h in spec.hypers:
        if h.kind == "bool" and h.name != "maximize":
            trial = dict(hp, **{h.name: True})
            try:
                spec.validate(trial, 1)
                hp = trial
            except ValueError:
                pass
    return hp


def configs(spec):
    full = full_hp(spec)
    return [("defaults", base_hp(spec))] + ([("full", full)] if full != base_hp(spec) else [])


def active_states(spec, hp):
    return [s for s, used in zip(spec.states, spec.active_states(hp)) if used]


def _rand(rng, shape, dtype, positive=False):
    a = np.asarray(rng.standard_normal(shape))
    return np.asarray(np.abs(a) if positive else a).astype(dtype)  # 0-d stays an array


def good_problem(spec, hp, form, dtype, rng, shapes=None):
    """{'params', 'grads', state: ...}: one array each (form 'single') or lists."""
    shapes = shapes or ([SINGLE_SHAPE] if form == "single" else LIST_SHAPES)
    arrs = {"params": [_rand(rng, s, dtype) for s in shapes], "grads": [_rand(rng, s, dtype) for s in shapes]}
    for s in active_states(spec, hp):
        arrs[s] = [_rand(rng, sh, dtype, positive=True) for sh in shapes]
    if form == "single":
        arrs = {k: v[0] for k, v in arrs.items()}
    return arrs


def functional_call(spec, hp, backend, step=1, extra=None):
    """The call fastopt.<name>_step(params, grads, *states, **hp) reading its arrays from `arrs`, its
    keyword arguments from arrs['_kw'] when the case puts them there."""
    fn = getattr(fastopt, spec.function_name)

    def call(arrs):
        kw = dict(hp)
        if spec.uses_step:
            kw["step"] = step
        kw["backend"] = backend
        kw.update(extra or {})
        if "_kw" in arrs:
            kw.update(arrs["_kw"].v)
        return fn(arrs["params"], arrs["grads"], *[arrs.get(s) for s in spec.states], **kw)
    return call


def call_text(spec, hp, backend, step=1, extra=None):
    changed = {k: v for k, v in hp.items() if base_hp(spec).get(k) != v or k == "lr" and spec.name == "sgd"}
    kw = [f"{k}={v!r}" for k, v in changed.items()]
    if spec.uses_step:
        kw.append(f"step={step!r}")
    kw += [f"{k}={v}" for k, v in (extra or {}).items()]
    kw.append(f"backend={backend!r}")
    return f"fastopt.{spec.function_name}(params, grads, {', '.join(['<states>'] if spec.states else [])}, {', '.join(kw)})"


def _get(arrs, slot, idx):
    return arrs[slot] if idx is None else arrs[slot][idx]


def _set(arrs, slot, idx, value):
    if idx is None:
        arrs[slot] = value
    else:
        arrs[slot][idx] = value


def _overlapping_pair(a, offset_frac=0.5):
    """(x, y): x a copy of a and y a same-shape view overlapping x by half, both views of one buffer."""
    n = a.size
    buf = np.zeros(2 * n, a.dtype)
    x = buf[:n].reshape(a.shape)
    x[...] = a
    off = max(1, int(n * offset_frac))
    return x, buf[off:off + n].reshape(a.shape)


# ---------------------------------------------------------------------------------------------------
# 1. fastopt.<name>_step: every array slot x every bad element, single and list form
# ---------------------------------------------------------------------------------------------------

FORMS = [("single", None, F4), ("list@0", 0, F4), ("list@2", 2, F8)]


def _alias_dims(spec, hp, slot):
    """(name, expr, mutate(arrs, idx), expect): aliasing of the slot with other slots of the call."""
    states = active_states(spec, hp)
    out = []
    if slot != "params":
        def is_param(arrs, idx):
            _set(arrs, slot, idx, _get(arrs, "params", idx))

        def overlaps_param(arrs, idx):
            x, y = _overlapping_pair(_get(arrs, "params", idx))
            _set(arrs, "params", idx, x)
            _set(arrs, slot, idx, y)
        out += [("is_param", f"{slot} = params (the same array)", is_param, "error"),
                ("overlaps_param", f"{slot} and params overlapping views of one buffer", overlaps_param, "error")]
    if slot in states:
        def is_grads(arrs, idx):
            _set(arrs, slot, idx, _get(arrs, "grads", idx))

        def overlaps_grads(arrs, idx):
            x, y = _overlapping_pair(_get(arrs, "grads", idx))
            _set(arrs, "grads", idx, x)
            _set(arrs, slot, idx, y)
        out += [("is_grads", f"{slot} = grads", is_grads, "error"),
                ("overlaps_grads", f"{slot} overlaps grads", overlaps_grads, "error")]
        for other in states:
            if other != slot:
                def is_other(arrs, idx, other=other):
                    _set(arrs, slot, idx, _get(arrs, other, idx))
                out.append((f"is_{other}", f"{slot} = {other}", is_other, "error"))
    return out


def _cross_dims(slot, read, with_params=True):
    """List form only: entry 1 of the slot against entry 0 (same shape and dtype)."""
    def dup(arrs, idx):
        arrs[slot][1] = arrs[slot][0]

    def overlap(arrs, idx):
        arrs[slot][0], arrs[slot][1] = _overlapping_pair(arrs[slot][0])

    out = [("dup_in_list", f"{slot}[1] = {slot}[0]", dup, "ok" if read else "error"),
           ("overlap_in_list", f"{slot}[0], {slot}[1] overlapping views", overlap, "ok" if read else "error")]
    if slot != "params" and with_params:
        def cross_param(arrs, idx):
            arrs[slot][1] = arrs["params"][0]
        out.append(("is_params0", f"{slot}[1] = params[0]", cross_param, "error"))
    return out


def _list_dims(slot):
    """List form only: the slot's list itself is wrong."""
    return [
        ("list_short", f"{slot}[:-1]", lambda arrs: arrs.__setitem__(slot, arrs[slot][:-1]), "error"),
        ("list_long", f"{slot} + [{slot}[0].copy()]",
         lambda arrs: arrs.__setitem__(slot, arrs[slot] + [arrs[slot][0].copy()]), "error"),
        ("list_empty", "[]", lambda arrs: arrs.__setitem__(slot, []), "error"),
        ("list_single", f"{slot}[0] (one array in a list call)", lambda arrs: arrs.__setitem__(slot, arrs[slot][0]),
         "error"),
        ("list_nested", f"[{slot}]", lambda arrs: arrs.__setitem__(slot, [arrs[slot]]), "error"),
        ("list_generator", f"iter({slot})", lambda arrs: arrs.__setitem__(slot, iter(arrs[slot])), "error"),
        ("list_tuple", f"tuple({slot})", lambda arrs: arrs.__setitem__(slot, tuple(arrs[slot])), "any"),
    ]


def _mutated_builder(spec, hp, form, dtype, mutate):
    def build(rng, plain):
        arrs = good_problem(spec, hp, form, dtype, rng)
        mutate(arrs, rng)
        return to_plain(arrs) if plain else arrs
    return build


def table_functional_arrays(backend):
    cases = []
    for spec in SPECS:
        for cfg, hp in configs(spec):
            slots = ["params", "grads"] + active_states(spec, hp)
            call = functional_call(spec, hp, backend)
            text = call_text(spec, hp, backend)
            for form, idx, dtype in FORMS:
                for slot in slots:
                    read = slot == "grads"
                    names = (slot,) if slot != "params" else tuple(slots)
                    where = slot if idx is None else f"{slot}[{idx}]"
                    for d in ELEMENT_DIMS:
                        def mutate(arrs, rng, d=d, slot=slot, idx=idx):
                            _set(arrs, slot, idx, d.make(_get(arrs, slot, idx), rng))
                        # float16 params alone, with float32 grads and state: a valid 16-bit update (issue 13); a
                        # float16 state of float32 params when it is the call's only state: state_dtype= (issue 13)
                        half_ok = d.name == "float16" and idx is None and dtype == F4 and (
                            slot == "params" or (slot != "grads" and len(slots) == 3))
                        cases.append(Case(f"{spec.name}/{cfg}/{form}/{slot}/{d.name}",
                                          f"{text} with {where} = {d.expr} ({dtype.name})",
                                          _mutated_builder(spec, hp, "single" if idx is None else "list", dtype, mutate),
                                          [call], expect="ok" if half_ok else d.read if read else "error",
                                          names=names + ("params",)))
                    for name, expr, fn, expect in _alias_dims(spec, hp, slot):
                        def mutate(arrs, rng, fn=fn, idx=idx):
                            fn(arrs, idx)
                        cases.append(Case(f"{spec.name}/{cfg}/{form}/{slot}/{name}", f"{text} with {where}: {expr}",
                                          _mutated_builder(spec, hp, "single" if idx is None else "list", dtype, mutate),
                                          [call], expect=expect, names=names + ("params", "grads")))
            # list-level dimensions and cross-entry aliasing, once per slot
            for slot in slots:
                read = slot == "grads"
                for name, expr, fn, expect in _list_dims(slot) + [(n, e, (lambda f: lambda arrs: f(arrs, 1))(f), x)
                                                                  for n, e, f, x in _cross_dims(slot, read)]:
                    def mutate(arrs, rng, fn=fn):
                        fn(arrs)
                    cases.append(Case(f"{spec.name}/{cfg}/list/{slot}/{name}", f"{text} with {slot} = {expr}",
                                      _mutated_builder(spec, hp, "list", F4, mutate), [call], expect=expect,
                                      names=tuple(slots)))
                # a list in a single-array call
                def mutate(arrs, rng, slot=slot):
                    arrs[slot] = [arrs[slot]]
                cases.append(Case(f"{spec.name}/{cfg}/single/{slot}/in_list", f"{text} with {slot} = [{slot}] only",
                                  _mutated_builder(spec, hp, "single", F4, mutate), [call], names=tuple(slots)))
            # empty params with non-empty other lists (issue 9, item 6)
            def mutate(arrs, rng):
                arrs["params"] = []
            cases.append(Case(f"{spec.name}/{cfg}/list/params_empty_others_not",
                              f"{text} with params = [] and the other lists of 3",
                              _mutated_builder(spec, hp, "list", F4, mutate), [call], names=tuple(slots)))
    return cases


# ---------------------------------------------------------------------------------------------------
# 2. hyperparameters, step, grad_scale, backend of fastopt.<name>_step
# ---------------------------------------------------------------------------------------------------

def _kw_case(spec, hp, backend, cid, label, kw, plain_kw, expect, names, form="single"):
    call = functional_call(spec, hp, backend)

    def build(rng, plain):
        arrs = good_problem(spec, hp, form, F4 if form == "single" else F8, rng)
        if plain:
            arrs = to_plain(arrs)
        arrs["_kw"] = Box(plain_kw if plain else kw)
        return arrs
    return Case(cid, f"{call_text(spec, hp, backend)} with {label}", build, [call], expect=expect, names=names)


def _valid(spec, hp):
    try:
        spec.validate(hp, 1)
        return True
    except ValueError:
        return False


def clip_grad_norm_values():
    """None is clip_grad_norm's 'no clipping', not a bad value."""
    return [(label, v, "any" if v is None else expect) for label, v, expect in bad_real_values(lambda x: x >= 0)]


def table_functional_hypers(backend):
    cases = []
    for spec in SPECS:
        hp = full_hp(spec)  # every state given, so that a value switching a state on is no error
        for h in spec.hypers:
            names = (h.name, h.label) if h.label else (h.name,)
            values = bad_real_values(h.check, h.inf_ok) if h.kind == "float" else BAD_BOOL_VALUES
            for label, v, expect in values:
                cases.append(_kw_case(spec, hp, backend, f"{spec.name}/{h.name}={label}", f"{h.name}={label}",
                                      {h.name: v}, None, expect, names))
            if h.kind == "float":
                good = hp[h.name] if hp[h.name] else 0.5
                for label, v, pv in ok_real_values(good):
                    if _valid(spec, dict(hp, **{h.name: pv})):
                        cases.append(_kw_case(spec, hp, backend, f"{spec.name}/{h.name}={label}",
                                              f"{h.name}={label} (same bits as {pv!r})", {h.name: v}, {h.name: pv},
                                              "ok", names))
        # the huge value in the list form too: validation must not depend on the form
        cases.append(_kw_case(spec, hp, backend, f"{spec.name}/list/lr=10**400", "lr=10**400, list form",
                              {"lr": HUGE_INT}, None, "error", ("lr", "learning rate"), form="list"))
        if spec.uses_step:
            for label, v, expect in BAD_STEP_VALUES:
                cases.append(_kw_case(spec, hp, backend, f"{spec.name}/step={label}", f"step={label}", {"step": v},
                                      None, expect, ("step",)))
            for label, v, pv in OK_STEP_VALUES:
                cases.append(_kw_case(spec, hp, backend, f"{spec.name}/step={label}", f"step={label}", {"step": v},
                                      {"step": pv}, "ok", ("step",)))
        for label, v, expect in BAD_GRAD_SCALE:
            cases.append(_kw_case(spec, hp, backend, f"{spec.name}/grad_scale={label}", f"grad_scale={label}",
                                  {"grad_scale": v}, None, expect, ("grad_scale",)))
        for label, v, pv in OK_GRAD_SCALE:
            cases.append(_kw_case(spec, hp, backend, f"{spec.name}/grad_scale={label}", f"grad_scale={label}",
                                  {"grad_scale": v}, {"grad_scale": pv}, "ok", ("grad_scale",)))
        for label, v in BAD_BACKENDS:
            cases.append(_kw_case(spec, hp, backend, f"{spec.name}/backend={label}", f"backend={label}",
                                  {"backend": v}, None, "error", ("backend",)))
            cases.append(_kw_case(spec, hp, backend, f"{spec.name}/list/backend={label}", f"backend={label}, list",
                                  {"backend": v}, None, "error", ("backend",), form="list"))
        # an empty call must still be well formed (issue 9, item 6)
        def build_empty(rng, plain, spec=spec):
            arrs = {"params": [], "grads": [], **{s: [] for s in spec.states}}
            arrs["_kw"] = Box({"backend": "tpu"})
            return arrs
        cases.append(Case(f"{spec.name}/empty/backend='tpu'", f"fastopt.{spec.function_name}([], [], [], ..., "
                          f"backend='tpu')", build_empty, [functional_call(spec, hp, backend)], names=("backend",)))
        for label, v in [("lr=nan", math.nan), ("lr=-1.0", -1.0)]:
            def build_empty_hp(rng, plain, spec=spec, v=v):
                return {"params": [], "grads": [], **{s: [] for s in spec.states}, "_kw": Box({"lr": v})}
            cases.append(Case(f"{spec.name}/empty/{label}", f"fastopt.{spec.function_name}([], [], ..., {label})",
                              build_empty_hp, [functional_call(spec, hp, backend)], names=("lr", "learning rate")))
    return cases


# ---------------------------------------------------------------------------------------------------
# 3. fastopt.init_state
# ---------------------------------------------------------------------------------------------------

def table_init_state(backend):
    cases = []
    for label, name, expect in [("'foo'", "foo", "error"), ("''", "", "error"), ("None", None, "error"),
                                ("123", 123, "error"), ("b'adam'", b"adam", "error"), ("'ADAM'", "ADAM", "any"),
                                ("['adam']", ["adam"], "error")]:
        def build(rng, plain, name=name):
            return {"params": _rand(rng, SINGLE_SHAPE, F4), "_name": Box(name)}
        cases.append(Case(f"name={label}", f"fastopt.init_state({label}, params)", build,
                          [lambda arrs: fastopt.init_state(arrs["_name"].v, arrs["params"])], expect=expect,
                          names=("optimizer", "name", label.strip("'"))))
    non_arrays = {"none", "float", "str", "dict"}
    for spec in SPECS:
        for form, idx in [("single", None), ("list@1", 1)]:
            for d in ELEMENT_DIMS:
                def build(rng, plain, d=d, idx=idx):
                    arrs = {"params": _rand(rng, SINGLE_SHAPE, F4) if idx is None else
                            [_rand(rng, s, F4) for s in LIST_SHAPES]}
                    _set(arrs, "params", idx, d.make(_get(arrs, "params", idx), rng))
                    return arrs
                cases.append(Case(f"{spec.name}/{form}/params/{d.name}",
                                  f"fastopt.init_state({spec.name!r}, params) with params{'' if idx is None else '[1]'}"
                                  f" = {d.expr}", build,
                                  [lambda arrs, spec=spec: fastopt.init_state(spec.name, arrs["params"], **full_opts(spec))],
                                  expect="error" if d.name in non_arrays else "any", names=("params",)))
        def build(rng, plain):
            return {"params": _rand(rng, SINGLE_SHAPE, F4)}
        cases.append(Case(f"{spec.name}/option=foo", f"fastopt.init_state({spec.name!r}, p, foo=1)", build,
                          [lambda arrs, spec=spec: fastopt.init_state(spec.name, arrs["params"], foo=1)],
                          names=("foo",)))
        for h in spec.hypers:
            names = (h.name, h.label) if h.label else (h.name,)
            bad = ([("nan", math.nan), ("10**400", HUGE_INT), ("'x'", "x"), ("None", None)] if h.kind == "float"
                   else [("'x'", "x"), ("None", None), ("2", 2)])
            for label, v in bad:
                cases.append(Case(f"{spec.name}/option/{h.name}={label}",
                                  f"fastopt.init_state({spec.name!r}, p, {h.name}={label})", build,
                                  [lambda arrs, spec=spec, h=h, v=v: fastopt.init_state(spec.name, arrs["params"],
                                                                                        **{h.name: v})],
                                  names=names))
    return cases


def full_opts(spec):
    """The init_state options that switch every optional state on."""
    full = full_hp(spec)
    return {k: v for k, v in full.items() if k in spec.state_options}


# ---------------------------------------------------------------------------------------------------
# 4. clip_by_value, clip_by_norm, global_norm, clip_by_global_norm
# ---------------------------------------------------------------------------------------------------

# the clip functions take grads of any shapes: these dimensions must work there (a float32 and a float64
# grad in one list may be refused: "one call, one dtype" is the library's choice, so that is "any")
CLIP_OK_DIMS = {"shape_grow", "shape_0d", "shape_flat", "other_float", "list_short", "list_long", "list_single"}

CLIP_FUNCTIONS = [  # (name, bound argument or None, writes the grads)
    ("clip_by_value", "clip_value", True), ("clip_by_norm", "max_norm", True),
    ("global_norm", None, False), ("clip_by_global_norm", "max_norm", True),
]


def clip_call(fname, bound, backend):
    fn = getattr(fastopt, fname)

    def call(arrs):
        kw = {"backend": backend}
        if "_kw" in arrs:
            kw.update(arrs["_kw"].v)
        if bound is None:
            return fn(arrs["grads"], **kw)
        value = kw.pop("_bound", 0.5)
        return fn(arrs["grads"], value, **kw)
    return call


def _clip_builder(form, dtype, mutate=None, kw=None, plain_kw=None):
    def build(rng, plain):
        # scaled by 10 so that clipping really scales (norms > the bound 0.5)
        shapes = [SINGLE_SHAPE] if form == "single" else LIST_SHAPES
        grads = [np.asarray(_rand(rng, s, dtype) * dtype.type(10)) for s in shapes]
        arrs = {"grads": grads[0] if form == "single" else grads}
        if mutate is not None:
            mutate(arrs, rng)
        if plain:
            arrs = to_plain(arrs)
        if kw is not None:
            arrs["_kw"] = Box(plain_kw if plain else kw)
        return arrs
    return build


def table_clip(backend):
    cases = []
    for fname, bound, writes in CLIP_FUNCTIONS:
        call = clip_call(fname, bound, backend)
        text = f"fastopt.{fname}(grads{', 0.5' if bound else ''}, backend={backend!r})"
        for form, idx, dtype in FORMS:
            for d in ELEMENT_DIMS:
                def mutate(arrs, rng, d=d, idx=idx):
                    _set(arrs, "grads", idx, d.make(_get(arrs, "grads", idx), rng))
                cases.append(Case(f"{fname}/{form}/{d.name}",
                                  f"{text} with grads{'' if idx is None else f'[{idx}]'} = {d.expr} ({dtype.name})",
                                  _clip_builder("single" if idx is None else "list", dtype, mutate), [call],
                                  expect=("any" if d.name == "other_float" and idx is not None else
                                          "ok" if d.name in CLIP_OK_DIMS or (d.name == "float16" and idx is None)
                                          else "error" if writes else d.read),
                                  names=("grads",)))
        for name, expr, fn, expect in _cross_dims("grads", read=not writes, with_params=False) + [
                (n, e, (lambda f: lambda arrs, idx: f(arrs))(f), x) for n, e, f, x in _list_dims("grads")]:
            if name == "list_empty":
                expect = "any"  # nothing to clip: an empty list is a valid call
            elif name in CLIP_OK_DIMS:
                expect = "ok"

            def mutate(arrs, rng, fn=fn):
                fn(arrs, 1)
            cases.append(Case(f"{fname}/list/{name}", f"{text} with grads = {expr}", _clip_builder("list", F4, mutate),
                              [call], expect=expect, names=("grads",)))
        for label, value in [("None", None), ("'x'", "x"), ("1.0", 1.0), ("{'g': g}", {})]:
            def mutate(arrs, rng, value=value):
                arrs["grads"] = value
            cases.append(Case(f"{fname}/grads={label}", f"fastopt.{fname}({label}, ...)", _clip_builder("single", F4, mutate),
                              [call], names=("grads",)))
        if bound:
            for label, v, expect in bad_real_values(lambda x: x >= 0):
                cases.append(Case(f"{fname}/{bound}={label}", f"{text} with {bound}={label}",
                                  _clip_builder("list", F4, kw={"_bound": v}), [call], expect=expect,
                                  names=(bound,)))
            for label, v, pv in ok_real_values(0.5):
                cases.append(Case(f"{fname}/{bound}={label}", f"{text} with {bound}={label} (same as {pv!r})",
                                  _clip_builder("list", F4, kw={"_bound": v}, plain_kw={"_bound": pv}), [call],
                                  expect="ok", names=(bound,)))
        for label, v in BAD_BACKENDS:
            cases.append(Case(f"{fname}/backend={label}", f"{text} with backend={label}",
                              _clip_builder("list", F4, kw={"backend": v}), [call], names=("backend",)))
    return cases


# ---------------------------------------------------------------------------------------------------
# Optimizer classes: the standard two-group, two-dtype setup
# ---------------------------------------------------------------------------------------------------

def class_keys(spec):
    """[(constructor / group key, hyper names, message names)] in torch style (betas = (beta1, beta2))."""
    out = []
    for h in spec.hypers:
        if h.name == "beta2":
            continue
        if h.name == "beta1":
            out.append(("betas", ("beta1", "beta2"), ("betas", "beta1", "beta2")))
        else:
            out.append((h.name, (h.name,), (h.name, h.label) if h.label else (h.name,)))
    return out


def class_kwargs(spec, hp):
    kw = {}
    for key, hypers, _ in class_keys(spec):
        kw[key] = (hp["beta1"], hp["beta2"]) if key == "betas" else hp[key]
    return kw


def class_params(rng):
    """buf32, buf64 and the four params a, b, c, d (see the module docstring)."""
    buf32, buf64 = np.zeros(48, F4), np.zeros(40, F8)
    a, c = buf32[0:12].reshape(3, 4), buf32[24:36].reshape(3, 4)
    b, d = buf64[0:10].reshape(2, 5), buf64[12:22].reshape(2, 5)
    for x in (a, b, c, d):
        x[...] = rng.standard_normal(x.shape)
    return buf32, buf64, [a, b, c, d]


def class_groups(spec, hp, params):
    lr = hp["lr"]
    return [{"params": list(params[:2])}, {"params": list(params[2:]), "lr": lr * 0.5}]


def good_grads(rng, params):
    return [_rand(rng, np.shape(p), np.asarray(p).dtype if np.asarray(p).dtype.kind == "f" else F4) for p in params]


def make_opt(spec, hp, backend, params, *, clip=None, skip=False, groups=None):
    cls = getattr(fastopt, spec.class_name)
    return cls(groups if groups is not None else class_groups(spec, hp, params), **class_kwargs(spec, hp),
               clip_grad_norm=clip, skip_nonfinite=skip, backend=backend)


def stepped_opt_arrs(spec, hp, backend, rng, **opts):
    """{'opt', 'params', 'grads', 'buf32', 'buf64'}: an optimizer after one good step and good grads for
    the next one."""
    buf32, buf64, params = class_params(rng)
    opt = make_opt(spec, hp, backend, params, **opts)
    opt.step(good_grads(rng, params))
    return {"opt": opt, "params": params, "grads": good_grads(rng, params), "buf32": buf32, "buf64": buf64}


def step_call(arrs):
    return arrs["opt"].step(arrs["grads"])


def class_text(spec, backend, opts=""):
    return (f"o = fastopt.{spec.class_name}([{{'params': [a, b]}}, {{'params': [c, d], 'lr': lr / 2}}]{opts}, "
            f"backend={backend!r}); o.step(grads)")


# ---------------------------------------------------------------------------------------------------
# 5. Optimizer.step(grads)
# ---------------------------------------------------------------------------------------------------

def _class_alias_dims():
    """(name, expr, mutate(arrs, idx), expect) for idx 0 (group 0, float32) or 3 (group 1, float64)."""
    partner = {0: 2, 3: 1}  # a param of equal shape and dtype in the other group

    def is_param(arrs, idx):
        arrs["grads"][idx] = arrs["params"][idx]

    def other_group(arrs, idx):
        arrs["grads"][idx] = arrs["params"][partner[idx]]

    def overlaps(arrs, idx):
        arrs["grads"][idx] = arrs["buf32"][6:18].reshape(3, 4) if idx == 0 else arrs["buf64"][17:27].reshape(2, 5)

    def disjoint(arrs, idx):
        arrs["grads"][idx] = arrs["buf32"][12:24].reshape(3, 4) if idx == 0 else arrs["buf64"][24:34].reshape(2, 5)

    def is_state(arrs, idx):
        states = arrs["opt"].state_arrays(idx)
        arrs["grads"][idx] = states[sorted(states)[0]]

    def dtype_view(arrs, idx):  # a float64 grad viewing a float32 param's memory
        view = arrs["buf32"][0:20] if idx == 0 else arrs["buf32"][24:44]
        arrs["grads"][1 if idx == 0 else 3] = view.view(F8).reshape(2, 5)

    def same_grad(arrs, idx):
        arrs["grads"][partner[idx]] = arrs["grads"][idx]

    return [("is_param", "grads[i] = params[i]", is_param, "error"),
            ("is_param_of_other_group", "grads[i] = the param of equal shape in the other group", other_group, "error"),
            ("overlaps_param", "grads[i] a view overlapping params[i]", overlaps, "error"),
            ("disjoint_view_of_param_buffer", "grads[i] a view of the params' buffer, not overlapping",
             disjoint, "ok"),
            ("is_state", "grads[i] = o.state_arrays(i)[first state]", is_state, "error"),
            ("float64_view_of_float32_param", "a float64 grad viewing a float32 param's memory", dtype_view, "error"),
            ("same_grad_twice", "the same grad array for two params", same_grad, "ok")]


def _class_swap_dims():
    """(name, expr, mutate(arrs, rng), expect, message names): the optimizer's own arrays edited between two
    steps, the case the per-step re-check (Optimizer._prepare_step, backend bind_grads) must see: a param
    swapped in a group for a bad one, a param or state changed in place. a, b are group 0 (float32,
    float64), c, d group 1."""
    def group(arrs, gi):
        return arrs["opt"].param_groups[gi]["params"]

    def first_state(arrs, i):
        states = arrs["opt"].state_arrays(i)
        return states[sorted(states)[0]]

    def read_only(a):
        a.flags.writeable = False

    def reshape_in_place(a):
        a.shape = (a.size,)

    def retype_in_place(a):
        a.dtype = np.int32 if a.dtype == F4 else np.int64

    def read_only_copy(a):
        b = a.copy()
        b.flags.writeable = False
        return b

    return [
        ("param_made_read_only", "a.flags.writeable = False", lambda arrs, rng: read_only(arrs["params"][0]),
         "error", ("params[0]",)),
        ("state_made_read_only", "o.state_arrays(3)[first].flags.writeable = False",
         lambda arrs, rng: read_only(first_state(arrs, 3)), "error", ("[3]",)),
        ("param_reshaped_in_place", "a.shape = (a.size,)", lambda arrs, rng: reshape_in_place(arrs["params"][0]),
         "error", ("[0]",)),
        ("param_retyped_in_place", "a.dtype = int32 (same bytes)", lambda arrs, rng: retype_in_place(arrs["params"][0]),
         "error", ("params[0]",)),
        ("swap_read_only", "o.param_groups[0]['params'][0] = read-only copy of a",
         lambda arrs, rng: group(arrs, 0).__setitem__(0, read_only_copy(arrs["params"][0])), "error", ("params[0]",)),
        ("swap_other_shape", "o.param_groups[0]['params'][0] = np.ones((4, 3), float32)",
         lambda arrs, rng: group(arrs, 0).__setitem__(0, np.ones((4, 3), F4)), "error", ("params[0]",)),
        ("swap_other_dtype", "o.param_groups[1]['params'][1] = d.astype(float32)",
         lambda arrs, rng: group(arrs, 1).__setitem__(1, arrs["params"][3].astype(F4)), "error", ("params[3]",)),
        ("swap_aliasing_its_state", "o.param_groups[1]['params'][1] = o.state_arrays(3)[first]",
         lambda arrs, rng: group(arrs, 1).__setitem__(1, first_state(arrs, 3)), "error", ("shares memory",)),
        ("swap_aliasing_other_param", "o.param_groups[1]['params'][0] = a",
         lambda arrs, rng: group(arrs, 1).__setitem__(0, arrs["params"][0]), "error", ("shares memory",)),
        ("swap_aliasing_a_grad", "o.param_groups[0]['params'][0] = grads[0]",
         lambda arrs, rng: group(arrs, 0).__setitem__(0, arrs["grads"][0]), "error", ("shares memory",)),
        ("swap_non_array", "o.param_groups[0]['params'][1] = 'x'",
         lambda arrs, rng: group(arrs, 0).__setitem__(1, "x"), "error", ("params[1]",)),
        ("params_list_grown", "o.param_groups[0]['params'].append(np.ones(3))",
         lambda arrs, rng: group(arrs, 0).append(np.ones(3, F4)), "error", ("param group 0",)),
        ("params_not_a_list", "o.param_groups[0]['params'] = a",
         lambda arrs, rng: arrs["opt"].param_groups[0].__setitem__("params", arrs["params"][0]), "error",
         ("param group 0",)),
        ("swap_good_array", "o.param_groups[0]['params'][0] = a fresh array like a",
         lambda arrs, rng: group(arrs, 0).__setitem__(0, _rand(rng, (3, 4), F4)), "ok", ()),
        ("params_as_tuple", "o.param_groups[1]['params'] = tuple(...)",
         lambda arrs, rng: arrs["opt"].param_groups[1].__setitem__("params", tuple(group(arrs, 1))), "ok", ()),
    ]


def _class_builder(spec, hp, backend, mutate, opts, plain_grads=True):
    def build(rng, plain):
        arrs = stepped_opt_arrs(spec, hp, backend, rng, **opts)
        if opts.get("skip"):  # a NaN gradient: skip_nonfinite must not hide a bad one
            arrs["grads"] = [np.full(np.shape(g), np.nan, g.dtype) for g in arrs["grads"]]
        mutate(arrs, rng)
        if plain and plain_grads:
            arrs["grads"] = to_plain(arrs["grads"])
        return arrs
    return build


def table_class_step(backend):
    cases = []
    for spec in SPECS:
        hp = full_hp(spec)
        for variant, opts, text_opts in [("plain", {}, ""),
                                         ("skip+clip", {"skip": True, "clip": 1.0},
                                          ", clip_grad_norm=1.0, skip_nonfinite=True")]:
            text = class_text(spec, backend, text_opts)
            for idx in (0, 3):
                for d in ELEMENT_DIMS:
                    def mutate(arrs, rng, d=d, idx=idx):
                        arrs["grads"][idx] = d.make(arrs["grads"][idx], rng)
                    cases.append(Case(f"{spec.name}/{variant}/grads[{idx}]/{d.name}",
                                      f"{text} with grads[{idx}] = {d.expr}",
                                      _class_builder(spec, hp, backend, mutate, opts), [step_call], expect=d.read,
                                      names=("grads", "param")))
                for name, expr, fn, expect in _class_alias_dims():
                    def mutate(arrs, rng, fn=fn, idx=idx):
                        fn(arrs, idx)
                    cases.append(Case(f"{spec.name}/{variant}/grads[{idx}]/{name}", f"{text} with i={idx}: {expr}",
                                      _class_builder(spec, hp, backend, mutate, opts), [step_call], expect=expect,
                                      names=("grads", "param")))
            for name, expr, fn, expect, names in _class_swap_dims():
                cases.append(Case(f"{spec.name}/{variant}/between_steps/{name}", f"{text}; {expr}; o.step(grads)",
                                  _class_builder(spec, hp, backend, fn, opts), [step_call, step_call]
                                  if expect == "ok" else [step_call], expect=expect, names=names))
            for name, expr, fn, expect in _list_dims("grads") + [
                    ("grads_none", "None", lambda arrs: arrs.__setitem__("grads", None), "error"),
                    ("grads_dict", "dict", lambda arrs: arrs.__setitem__("grads", dict(enumerate(arrs["grads"]))),
                     "error")]:
                if name in ("list_tuple", "list_generator"):
                    expect = "ok" if name == "list_tuple" else "any"
                def mutate(arrs, rng, fn=fn):
                    fn(arrs)
                cases.append(Case(f"{spec.name}/{variant}/grads/{name}", f"{text} with grads = {expr}",
                                  _class_builder(spec, hp, backend, mutate, opts, plain_grads=name != "list_generator"),
                                  [step_call], expect=expect, names=("grads", "param")))
    return cases


# ---------------------------------------------------------------------------------------------------
# 6. Constructors: params, param groups, options
# ---------------------------------------------------------------------------------------------------

def _ctor_case(spec, hp, backend, cid, desc, make_groups, expect="error", names=("param",), opts=None):
    """Construct from make_groups(arrs) and take one step with good grads for the original params."""
    def build(rng, plain):
        buf32, buf64, params = class_params(rng)
        arrs = {"params": params, "buf32": buf32, "buf64": buf64, "grads": good_grads(rng, params)}
        arrs["groups"] = make_groups(arrs, rng)
        return arrs

    def construct(arrs):
        cls = getattr(fastopt, spec.class_name)
        kw = dict(class_kwargs(spec, hp), backend=backend)
        kw.update(opts or {})
        arrs["opt"] = cls(arrs["groups"], **kw)

    def step(arrs):
        n = len(arrs["opt"].params)
        grads = arrs["grads"] + good_grads(np.random.default_rng(0), arrs["opt"].params[4:])
        return arrs["opt"].step(grads[:n])
    return Case(cid, desc, build, [construct, step], expect=expect, names=names)


def _groups(arrs, lr):
    p = arrs["params"]
    return [{"params": [p[0], p[1]]}, {"params": [p[2], p[3]], "lr": lr * 0.5}]


def table_class_ctor(backend):
    return [c for spec in SPECS for c in _class_ctor_cases(spec, backend)]


def _class_ctor_cases(spec, backend):
    """One spec: its closures bind this spec (not the loop variable)."""
    cases = []
    hp = base_hp(spec)
    lr = hp["lr"]
    head = f"fastopt.{spec.class_name}(groups, backend={backend!r}) + step"
    for idx in (0, 3):
        for d in ELEMENT_DIMS:
            def make(arrs, rng, d=d, idx=idx):
                g = _groups(arrs, lr)
                gi, j = divmod(idx, 2)
                g[gi]["params"][j] = d.make(g[gi]["params"][j], rng)
                return g
            cases.append(_ctor_case(spec, hp, backend, f"{spec.name}/params[{idx}]/{d.name}",
                                    f"{head} with params[{idx}] = {d.expr}", make,
                                    expect="any" if d.name == "float16" else "error"))  # a float16 bucket: valid
    p = lambda arrs, i: arrs["params"][i]  # noqa: E731
    structural = [
        ("same_param_twice_in_group", "[{'params': [a, a]}, ...]",
         lambda arrs, rng: [{"params": [p(arrs, 0), p(arrs, 0)]}, {"params": [p(arrs, 2), p(arrs, 3)]}], "error"),
        ("same_param_in_two_groups", "[{'params': [a, b]}, {'params': [a, d]}]",
         lambda arrs, rng: [{"params": [p(arrs, 0), p(arrs, 1)]}, {"params": [p(arrs, 0), p(arrs, 3)]}], "error"),
        ("overlapping_params_two_groups", "c a view overlapping a",
         lambda arrs, rng: [{"params": [p(arrs, 0), p(arrs, 1)]},
                            {"params": [arrs["buf32"][6:18].reshape(3, 4), p(arrs, 3)]}], "error"),
        ("float32_view_of_float64_param_other_group", "group 1 holds b.view(float32)",
         lambda arrs, rng: [{"params": [p(arrs, 0), p(arrs, 1)]}, {"params": [p(arrs, 1).view(F4), p(arrs, 3)]}],
         "error"),
        ("float32_view_of_float64_param_same_group", "group 0 holds b and b.view(float32)",
         lambda arrs, rng: [{"params": [p(arrs, 1).view(F4), p(arrs, 1)]}, {"params": [p(arrs, 2), p(arrs, 3)]}],
         "error"),
        ("empty_list", "[]", lambda arrs, rng: [], "error"),
        ("empty_group", "[{'params': []}]", lambda arrs, rng: [{"params": []}], "error"),
        ("none", "None", lambda arrs, rng: None, "error"),
        ("str", "'abc'", lambda arrs, rng: "abc", "error"),
        ("int", "5", lambda arrs, rng: 5, "error"),
        ("nested_list", "[[a, b, c, d]]", lambda arrs, rng: [list(arrs["params"])], "error"),
        ("mixed_arrays_and_groups", "[a, {'params': [b]}, c, d]",
         lambda arrs, rng: [p(arrs, 0), {"params": [p(arrs, 1)]}, p(arrs, 2), p(arrs, 3)], "error"),
        ("group_without_params", "[{'lr': 0.1}]", lambda arrs, rng: [{"lr": 0.1}], "error"),
        ("group_params_none", "[{'params': None}]", lambda arrs, rng: [{"params": None}], "error"),
        ("group_unknown_key", "[{'params': [...], 'foo': 1}]",
         lambda arrs, rng: [{"params": list(arrs["params"]), "foo": 1}], "error"),
        ("group_not_dict_among_dicts", "[{'params': [a, b]}, [c, d]]",
         lambda arrs, rng: [{"params": [p(arrs, 0), p(arrs, 1)]}, [p(arrs, 2), p(arrs, 3)]], "error"),
        ("one_group_dict", "{'params': [a, b, c, d]}", lambda arrs, rng: {"params": list(arrs["params"])}, "any"),
        ("generator", "(p for p in params)", lambda arrs, rng: (x for x in arrs["params"]), "any"),
        ("tuple", "tuple(params)", lambda arrs, rng: tuple(arrs["params"]), "any"),
    ]
    for name, expr, make, expect in structural:
        cases.append(_ctor_case(spec, hp, backend, f"{spec.name}/{name}", f"{head} with groups = {expr}", make,
                                expect=expect, names=("param",)))
    for label, v, expect in clip_grad_norm_values():
        cases.append(_ctor_case(spec, hp, backend, f"{spec.name}/clip_grad_norm={label}",
                                f"{head}, clip_grad_norm={label}", lambda arrs, rng: _groups(arrs, lr),
                                expect=expect, names=("clip_grad_norm",), opts={"clip_grad_norm": v}))
    for label, v in [("'x'", "x"), ("1", 1), ("None", None), ("1.0", 1.0)]:
        cases.append(_ctor_case(spec, hp, backend, f"{spec.name}/skip_nonfinite={label}",
                                f"{head}, skip_nonfinite={label}", lambda arrs, rng: _groups(arrs, lr),
                                names=("skip_nonfinite",), opts={"skip_nonfinite": v}))
    for label, v in BAD_BACKENDS:
        cases.append(_ctor_case(spec, hp, backend, f"{spec.name}/backend={label}", f"{head}, backend={label}",
                                lambda arrs, rng: _groups(arrs, lr), names=("backend",), opts={"backend": v}))
    return cases


# ---------------------------------------------------------------------------------------------------
# 7. Hyperparameters of the classes: constructor, a param group, and edits of param_groups
# ---------------------------------------------------------------------------------------------------

def bad_class_values(spec, key):
    if key == "betas":
        b1, b2 = base_hp(spec)["beta1"], base_hp(spec)["beta2"]
        return [("(nan, b2)", (math.nan, b2), "error"), ("(b1, nan)", (b1, math.nan), "error"),
                ("(10**400, b2)", (HUGE_INT, b2), "error"), ("(b1, inf)", (b1, math.inf), "error"),
                ("(-0.1, b2)", (-0.1, b2), "error"), ("(b1, 1.0)", (b1, 1.0), "error"),
                ("(b1,)", (b1,), "error"), ("(b1, b2, b2)", (b1, b2, b2), "error"), ("'ab'", "ab", "error"),
                ("None", None, "error"), ("0.9", 0.9, "error"), ("(True, b2)", (True, b2), "error"),
                ("('0.9', b2)", ("0.9", b2), "error"), ("[b1, b2]", [b1, b2], "any")]
    h = next(x for x in spec.hypers if x.name == key)
    return bad_real_values(h.check, h.inf_ok) if h.kind == "float" else BAD_BOOL_VALUES


def ok_class_values(spec, key):
    if key == "betas":
        b1, b2 = base_hp(spec)["beta1"], base_hp(spec)["beta2"]
        return [("(np.float32(b1), np.float32(b2))", (np.float32(b1), np.float32(b2)),
                 (float(np.float32(b1)), float(np.float32(b2))))]
    h = next(x for x in spec.hypers if x.name == key)
    if h.kind != "float":
        return []
    good = base_hp(spec)[key] or 0.5
    return [(label, v, pv) for label, v, pv in ok_real_values(good) if _valid(spec, dict(base_hp(spec), **{key: pv}))]


def table_class_hypers(backend):
    return [c for spec in SPECS for c in _class_hyper_cases(spec, backend)]


def _class_hyper_cases(spec, backend):
    """One spec: its closures bind this spec (not the loop variable)."""
    cases = []
    hp = base_hp(spec)
    cls = getattr(fastopt, spec.class_name)
    for key, _, names in class_keys(spec):
        values = [(label, v, None, expect) for label, v, expect in bad_class_values(spec, key)]
        values += [(label, v, pv, "ok") for label, v, pv in ok_class_values(spec, key)]
        for label, v, pv, expect in values:
            # constructor argument and a param group's value: construct, then one step
            def build_ctor(rng, plain, v=v, pv=pv):
                buf32, buf64, params = class_params(rng)
                return {"params": params, "grads": good_grads(rng, params), "_v": Box(pv if plain else v)}

            def ctor(arrs, key=key):
                kw = dict(class_kwargs(spec, hp), backend=backend)
                kw[key] = arrs["_v"].v
                arrs["opt"] = cls(class_groups(spec, hp, arrs["params"]), **kw)

            def group(arrs, key=key):
                groups = class_groups(spec, hp, arrs["params"])
                groups[1][key] = arrs["_v"].v
                arrs["opt"] = cls(groups, **class_kwargs(spec, hp), backend=backend)

            def step(arrs):
                return arrs["opt"].step(arrs["grads"])
            cases.append(Case(f"{spec.name}/ctor/{key}={label}",
                              f"fastopt.{spec.class_name}(groups, {key}={label}, backend={backend!r}) + step",
                              build_ctor, [ctor, step], expect=expect, names=names))
            cases.append(Case(f"{spec.name}/group1/{key}={label}",
                              f"fastopt.{spec.class_name}([{{...}}, {{..., {key!r}: {label}}}], "
                              f"backend={backend!r}) + step", build_ctor, [group, step], expect=expect, names=names))

            # an edit of param_groups[1] after a step, then a step: group 0 must not be updated
            def build_edit(rng, plain, v=v, pv=pv):
                arrs = stepped_opt_arrs(spec, hp, backend, rng)
                arrs["_v"] = Box(pv if plain else v)
                return arrs

            def edit(arrs, key=key):
                arrs["opt"].param_groups[1][key] = arrs["_v"].v
            cases.append(Case(f"{spec.name}/edit1/{key}={label}",
                              f"{class_text(spec, backend)}; o.param_groups[1][{key!r}] = {label}; o.step(grads)",
                              build_edit, [edit, step_call], expect=expect, names=names, raise_by=1))
    # attribute edits of the optimizer itself, then a step
    edits = [(f"clip_grad_norm={label}", "clip_grad_norm", v, expect, ("clip_grad_norm",))
             for label, v, expect in clip_grad_norm_values()]
    edits += [(f"backend={label}", "backend", v, "error", ("backend",)) for label, v in BAD_BACKENDS]
    edits += [(f"skip_nonfinite={label}", "skip_nonfinite", v, "any", ("skip_nonfinite",))
              for label, v in [("'x'", "x"), ("None", None)]]
    for label, attr, v, expect, names in edits:
        def build(rng, plain):
            return stepped_opt_arrs(spec, hp, backend, rng)

        def edit(arrs, attr=attr, v=v):
            setattr(arrs["opt"], attr, v)
        cases.append(Case(f"{spec.name}/attr/{label}", f"{class_text(spec, backend)}; o.{attr} = {v!r}; o.step(grads)",
                          build, [edit, step_call], expect=expect, names=names))
    # a schedule that returns a bad learning rate
    for label, sched in [("nan", lambda t: math.nan), ("10**400", lambda t: HUGE_INT), ("'x'", lambda t: "x"),
                         ("-1.0", lambda t: -1.0), ("None", lambda t: None)]:
        def build(rng, plain):
            return stepped_opt_arrs(spec, hp, backend, rng)

        def edit(arrs, sched=sched):
            arrs["opt"].param_groups[1]["lr"] = sched
        cases.append(Case(f"{spec.name}/schedule_returns_{label}",
                          f"{class_text(spec, backend)}; o.param_groups[1]['lr'] = lambda t: {label}; o.step(grads)",
                          build, [edit, step_call], names=("lr", "learning rate")))
    return cases


# ---------------------------------------------------------------------------------------------------
# 8. add_param_group
# ---------------------------------------------------------------------------------------------------

def table_add_param_group(backend):
    return [c for spec in SPECS for c in _add_param_group_cases(spec, backend)]


def _add_param_group_cases(spec, backend):
    """One spec: its closures bind this spec."""
    cases = []
    hp = base_hp(spec)
    text = f"{class_text(spec, backend)}; o.add_param_group(group); o.step(grads + new grads)"

    def add_then_step(spec=spec):
        def add(arrs):
            arrs["opt"].add_param_group(arrs["_group"].v)

        def step(arrs):
            new = arrs["opt"].params[4:]
            return arrs["opt"].step(arrs["grads"] + good_grads(np.random.default_rng(1), new))
        return [add, step]

    def case(name, expr, make_group, expect="error", names=("param",)):
        def build(rng, plain):
            arrs = stepped_opt_arrs(spec, hp, backend, rng)
            arrs["_group"] = Box(make_group(arrs, rng))
            return arrs
        cases.append(Case(f"{spec.name}/{name}", f"{text} with group = {expr}", build, add_then_step(),
                          expect=expect, names=names))

    for d in ELEMENT_DIMS:
        # a new param of another shape or float dtype is a valid param (its grad is made to fit)
        case(f"new_param/{d.name}", f"{{'params': [{d.expr}]}}",
             lambda arrs, rng, d=d: {"params": [d.make(_rand(rng, (3, 4), F4), rng)]},
             expect="any" if d.name in CLIP_OK_DIMS or d.name == "float16" else "error")
    p = lambda arrs, i: arrs["params"][i]  # noqa: E731
    case("existing_param", "{'params': [a]}", lambda arrs, rng: {"params": [p(arrs, 0)]})
    case("view_of_existing_param", "{'params': [a[...]]}", lambda arrs, rng: {"params": [p(arrs, 0)[...]]})
    case("overlaps_existing_param", "{'params': [buf32[6:18]]}",
         lambda arrs, rng: {"params": [arrs["buf32"][6:18].reshape(3, 4)]})
    case("float32_view_of_float64_param", "{'params': [b.view(np.float32)]}",
         lambda arrs, rng: {"params": [p(arrs, 1).view(F4)]})
    case("disjoint_view_of_param_buffer", "{'params': [buf32[12:24]]}",
         lambda arrs, rng: {"params": [arrs["buf32"][12:24].reshape(3, 4)]}, expect="any")
    case("same_new_array_twice", "{'params': [x, x]}",
         lambda arrs, rng: (lambda x: {"params": [x, x]})(_rand(rng, (3, 4), F4)))
    case("empty", "{'params': []}", lambda arrs, rng: {"params": []})
    case("not_a_dict", "[x]", lambda arrs, rng: [_rand(rng, (3, 4), F4)])
    case("no_params_key", "{'lr': 0.1}", lambda arrs, rng: {"lr": 0.1})
    case("params_none", "{'params': None}", lambda arrs, rng: {"params": None})
    case("unknown_key", "{'params': [x], 'foo': 1}", lambda arrs, rng: {"params": [_rand(rng, (3, 4), F4)], "foo": 1})
    for key, _, names in class_keys(spec):
        for label, v, expect in bad_class_values(spec, key):
            case(f"{key}={label}", f"{{'params': [x], {key!r}: {label}}}",
                 lambda arrs, rng, key=key, v=v: {"params": [_rand(rng, (3, 4), F4)], key: v}, expect=expect,
                 names=names)
    return cases


# ---------------------------------------------------------------------------------------------------
# 9. load_state_dict with mutated state dicts
# ---------------------------------------------------------------------------------------------------

def _state_dict_mutations(spec, hp):
    """(name, mutate(sd) -> sd, expect). sd is the state dict of the standard optimizer after 2 steps."""
    out = []

    def m(name, fn, expect="error"):
        out.append((name, fn, expect))

    def setter(path, value):
        def fn(sd):
            o = sd
            for k in path[:-1]:
                o = o[k]
            o[path[-1]] = value
            return sd
        return fn

    def deleter(path):
        def fn(sd):
            o = sd
            for k in path[:-1]:
                o = o[k]
            del o[path[-1]]
            return sd
        return fn

    for label, v in [("None", None), ("[]", []), ("'x'", "x"), ("{}", {})]:
        m(f"sd={label}", lambda sd, v=v: v)
    m("no_state", deleter(["state"]))
    m("no_param_groups", deleter(["param_groups"]))
    for label, v in [("[]", []), ("None", None), ("'x'", "x"), ("5", 5)]:
        m(f"state={label}", setter(["state"], v))
        m(f"param_groups={label}", setter(["param_groups"], v))
    m("one_group_missing", lambda sd: dict(sd, param_groups=sd["param_groups"][:1]))
    m("extra_group", lambda sd: dict(sd, param_groups=sd["param_groups"] + sd["param_groups"][:1]))
    for gi in (0, 1):
        for label, v in [("'x'", "x"), ("None", None), ("5", 5)]:
            m(f"group{gi}={label}", setter(["param_groups", gi], v))
        m(f"group{gi}/no_params", deleter(["param_groups", gi, "params"]))
        for label, v in [("[0]", [0]), ("'x'", "x"), ("None", None), ("reversed", "reversed"), ("[7, 8]", [7, 8])]:
            if v == "reversed":
                m(f"group{gi}/params=reversed", lambda sd, gi=gi: setter(["param_groups", gi, "params"],
                                                                         sd["param_groups"][gi]["params"][::-1])(sd))
            else:
                m(f"group{gi}/params={label}", setter(["param_groups", gi, "params"], v))
        m(f"group{gi}/foo=1", setter(["param_groups", gi, "foo"], 1))
        for key, _, _ in class_keys(spec):
            m(f"group{gi}/no_{key}", deleter(["param_groups", gi, key]))
            for label, v, expect in bad_class_values(spec, key):
                m(f"group{gi}/{key}={label}", setter(["param_groups", gi, key], v), expect)
    states = active_states(spec, hp)
    for i in (0, 3):
        for label, v in [("'x'", "x"), ("None", None), ("5", 5), ("[]", [])]:
            m(f"state[{i}]={label}", setter(["state", i], v))
        for label, v, expect in [("-1", -1, "error"), ("1.5", 1.5, "error"), ("'x'", "x", "error"),
                                 ("None", None, "error"), ("True", True, "error"), ("10**400", HUGE_INT, "error"),
                                 ("np.float64(2)", np.float64(2.0), "error"), ("2**40", 2 ** 40, "any"),
                                 ("np.int64(2)", np.int64(2), "any"), ("7", 7, "error")]:
            # one param's step differs from its group's other param (7) or is invalid
            m(f"state[{i}]/step={label}", setter(["state", i, "step"], v), expect)
        m(f"state[{i}]/no_step", deleter(["state", i, "step"]))
        m(f"state[{i}]/foo", setter(["state", i, "foo"], np.zeros(1)))
        for s in states:
            m(f"state[{i}]/no_{s}", deleter(["state", i, s]))
            for d in ELEMENT_DIMS if i == 3 else []:  # the last param: a loader that writes as it goes has written the rest
                expect = {"fortran": "any", "reversed": "any", "strided": "any", "readonly": "any",
                          "masked": "any", "byteswapped": "any"}.get(d.name, "error")

                def fn(sd, i=i, s=s, d=d):
                    sd["state"][i][s] = d.make(sd["state"][i][s], np.random.default_rng(0))
                    return sd
                m(f"state[{i}]/{s}={d.name}", fn, expect)
        # the same step huge for the whole group: loading may work, the next step must not hang
        m(f"group_of_{i}/step=2**40", lambda sd, i=i: _set_group_steps(sd, i, 2 ** 40), "any")
        m(f"group_of_{i}/step=2**62", lambda sd, i=i: _set_group_steps(sd, i, 2 ** 62), "any")
    for label, v in [("'x'", "x"), ("-1", -1), ("None", None), ("1.5", 1.5), ("10**400", HUGE_INT), ("True", True)]:
        m(f"skipped_steps={label}", setter(["fastopt", "skipped_steps"], v))
    other = "adam" if spec.name != "adam" else "sgd"
    for label, v in [(repr(other), other), ("5", 5)]:
        m(f"optimizer={label}", setter(["fastopt", "optimizer"], v))
    for label, v in [("'x'", "x"), ("5", 5)]:
        m(f"fastopt={label}", setter(["fastopt"], v))
    for label, v in [("'x'", "x"), ("[[1]]", [[1]]), ("[]", []), ("5", 5)]:
        m(f"param_shapes={label}", setter(["fastopt", "param_shapes"], v))
    for label, v, expect in [("['int64'] * 4", ["int64"] * 4, "error"), ("'x'", "x", "error"), ("None", None, "any"),
                             ("5", 5, "error")]:
        m(f"param_dtypes={label}", setter(["fastopt", "param_dtypes"], v), expect)
    for label, v in [("[5, 5]", [5, 5]), ("'x'", "x"), ("5", 5), ("[{'state': 5}, None]", [{"state": 5}, None])]:
        m(f"lr_schedules={label}", setter(["fastopt", "lr_schedules"], v), "error" if v != [{"state": 5}, None] else "any")
    return out


def _set_group_steps(sd, i, step):
    gi = 0 if i < 2 else 1
    for j in sd["param_groups"][gi]["params"]:
        sd["state"][j]["step"] = step
    return sd


def table_load_state_dict(backend):
    return [c for spec in SPECS for c in _load_state_dict_cases(spec, backend)]


def _load_state_dict_cases(spec, backend):
    """One spec: its closures bind this spec."""
    cases = []
    hp = full_hp(spec)
    for name, mutate, expect in _state_dict_mutations(spec, hp):
        def build(rng, plain, mutate=mutate):
            src = stepped_opt_arrs(spec, hp, backend, rng)
            src["opt"].step(src["grads"])
            sd = mutate(copy.deepcopy(src["opt"].state_dict()))
            arrs = stepped_opt_arrs(spec, hp, backend, rng)  # the target: other values, one step
            arrs["_sd"] = Box(sd)
            return arrs

        def load(arrs):
            arrs["opt"].load_state_dict(arrs["_sd"].v)
        cases.append(Case(f"{spec.name}/{name}", f"{class_text(spec, backend)}; sd = o2.state_dict() after 2 steps, "
                          f"mutated: {name}; o.load_state_dict(sd); o.step(grads)", build, [load, step_call],
                          expect=expect, raise_by=0))
    return cases


# ---------------------------------------------------------------------------------------------------
# 10. fastopt.save / fastopt.load with damaged and foreign files
# ---------------------------------------------------------------------------------------------------

_TMP = []


def tmpdir():
    if not _TMP:
        _TMP.append(tempfile.mkdtemp(prefix="fastopt-fuzz-"))
        atexit.register(shutil.rmtree, _TMP[0], True)
    return _TMP[0]


def _zip_layout(data: bytes):
    """(central directory offset, size) from the end-of-central-directory record."""
    eocd = data.rfind(b"PK\x05\x06")
    size = int.from_bytes(data[eocd + 12:eocd + 16], "little")
    off = int.from_bytes(data[eocd + 16:eocd + 20], "little")
    return eocd, off, size


def _npz_members(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _write_npz(path, members):
    with open(path, "wb") as f:
        np.savez(f, **members)


def _meta_edit(fn):
    def damage(path, data, rng):
        members = _npz_members(path)
        meta = json.loads(str(members["meta"][()]))
        out = fn(meta, members)
        if isinstance(out, str):  # the edit replaced the whole meta entry
            meta = out
        members["meta"] = np.array(meta if isinstance(meta, str) else json.dumps(meta))
        _write_npz(path, members)
    return damage


def _bytes_damage(fn):
    def damage(path, data, rng):
        with open(path, "wb") as f:
            f.write(fn(data, rng))
    return damage


def _flip(data, pos):
    b = bytearray(data)
    b[pos % len(b)] ^= 0xFF
    return bytes(b)


def _damages():
    """(name, damage(path, data, rng), expect)."""
    out = []
    for label, cut in [("0", lambda n: 0), ("1", lambda n: 1), ("10", lambda n: 10), ("30", lambda n: 30),
                       ("n/4", lambda n: n // 4), ("n/2", lambda n: n // 2), ("3n/4", lambda n: 3 * n // 4),
                       ("n-1", lambda n: n - 1), ("n-10", lambda n: n - 10), ("n-22", lambda n: n - 22),
                       ("n-23", lambda n: n - 23), ("n-50", lambda n: n - 50)]:
        out.append((f"truncate_to_{label}", _bytes_damage(lambda d, r, cut=cut: d[:cut(len(d))]), "error"))
    for k in range(40):  # anywhere (the seed picks the byte)
        out.append((f"flip_random_{k}", _bytes_damage(lambda d, r: _flip(d, int(r.integers(len(d))))), "any"))
    for k in range(30):  # inside the central directory
        def cd(d, r):
            _, off, size = _zip_layout(d)
            return _flip(d, off + int(r.integers(size)))
        out.append((f"flip_central_directory_{k}", _bytes_damage(cd), "any"))
    for j in range(22):  # every byte of the end-of-central-directory record
        out.append((f"flip_eocd_byte_{j}", _bytes_damage(lambda d, r, j=j: _flip(d, _zip_layout(d)[0] + j)), "any"))
    for j in range(30):  # every byte of the first local header
        out.append((f"flip_local_header_byte_{j}", _bytes_damage(lambda d, r, j=j: _flip(d, j)), "any"))
    out.append(("append_garbage", _bytes_damage(lambda d, r: d + b"garbage" * 10), "any"))
    out.append(("prepend_garbage", _bytes_damage(lambda d, r: b"garbage" * 10 + d), "any"))
    out.append(("text_file", _bytes_damage(lambda d, r: b"not a checkpoint\n"), "error"))
    out.append(("gzip_file", _bytes_damage(lambda d, r: gzip.compress(d)), "error"))
    out.append(("npy_file", lambda path, d, r: np.save(path + ".npy", np.ones(3)) or os.replace(path + ".npy", path),
                 "error"))

    def foreign(members):
        return lambda path, d, r: _write_npz(path, members)
    out.append(("npz_without_meta", foreign({"a": np.ones(3)}), "error"))
    out.append(("npz_meta_int", foreign({"meta": np.array(5)}), "error"))
    out.append(("npz_meta_not_json", foreign({"meta": np.array("x")}), "error"))
    out.append(("npz_meta_json_list", foreign({"meta": np.array("[]")}), "error"))
    out.append(("npz_meta_json_empty", foreign({"meta": np.array("{}")}), "error"))
    out.append(("npz_meta_format_only", foreign({"meta": np.array('{"format": 1}')}), "error"))
    out.append(("npz_meta_array", foreign({"meta": np.ones(3)}), "error"))

    def pickled(path, d, r):
        members = _npz_members(path)
        members["meta"] = np.array([{"x": 1}], dtype=object)
        with open(path, "wb") as f:
            np.savez(f, **members)
    out.append(("meta_pickled_object", pickled, "error"))
    edits = [
        ("format_2", lambda meta, m: meta.__setitem__("format", 2)),
        ("state_not_dict", lambda meta, m: meta.__setitem__("state", 5)),
        ("state_entry_not_dict", lambda meta, m: meta["state"].__setitem__("0", 5)),
        ("state_step_str", lambda meta, m: meta["state"]["0"].__setitem__("step", "x")),
        ("state_key_not_int", lambda meta, m: meta["state"].__setitem__("x", meta["state"]["0"])),
        ("state_arrays_not_list", lambda meta, m: meta["state"]["0"].__setitem__("arrays", 5)),
        ("state_array_missing", lambda meta, m: meta["state"]["0"]["arrays"].append("foo")),
        ("param_groups_int", lambda meta, m: meta.__setitem__("param_groups", 5)),
        ("param_groups_str", lambda meta, m: meta.__setitem__("param_groups", "x")),
        ("group_not_dict", lambda meta, m: meta["param_groups"].__setitem__(0, 5)),
        ("group_lr_str", lambda meta, m: meta["param_groups"][0].__setitem__("lr", "x")),
        ("group_lr_nan", lambda meta, m: meta["param_groups"][0].__setitem__("lr", math.nan)),
        ("fastopt_str", lambda meta, m: meta.__setitem__("fastopt", "x")),
        ("fastopt_missing", lambda meta, m: meta.pop("fastopt")),
        ("skipped_steps_str", lambda meta, m: meta["fastopt"].__setitem__("skipped_steps", "x")),
        ("meta_json_string", lambda meta, m: json.dumps("x")),
        ("no_param_groups", lambda meta, m: meta.pop("param_groups")),
        ("no_state", lambda meta, m: meta.pop("state")),
    ]
    for name, fn in edits:
        out.append((f"meta_{name}", _meta_edit(fn), "error"))

    def array_edit(make, name):
        def damage(path, d, r):
            members = _npz_members(path)
            key = sorted(k for k in members if k.startswith("state/"))[0]
            members[key] = make(members[key])
            _write_npz(path, members)
        return damage
    for label, make, expect in [("wrong_shape", lambda a: np.zeros(a.size + 1, a.dtype), "error"),
                                ("int64", lambda a: a.astype(np.int64), "error"),
                                ("big_endian", lambda a: a.astype(a.dtype.newbyteorder()), "any"),
                                ("structured", lambda a: np.zeros(a.shape, [("x", a.dtype)]), "error"),
                                ("0d", lambda a: np.array(1.0, a.dtype), "error")]:
        out.append((f"state_array_{label}", array_edit(make, label), expect))
    return out


def table_checkpoint(backend):
    return [c for spec in SPECS for c in _checkpoint_cases(spec, backend)]


_SAVED: dict = {}


def _checkpoint_cases(spec, backend):
    """One spec: its closures bind this spec."""
    cases = []
    hp = full_hp(spec)
    others = [s for s in SPECS if s.name != spec.name]

    def base(rng, spec=spec):
        return stepped_opt_arrs(spec, hp, backend, rng)

    def saved_bytes():
        """One good checkpoint per spec and child process (saving fsyncs: too slow to repeat per case)."""
        if spec.name not in _SAVED:
            path = os.path.join(tmpdir(), f"{spec.name}-good.npz")
            fastopt.save(path, base(np.random.default_rng(len(spec.name)))["opt"])
            with open(path, "rb") as f:
                _SAVED[spec.name] = f.read()
        return _SAVED[spec.name]

    for name, damage, expect in _damages():
        def build(rng, plain, damage=damage):
            data = saved_bytes()
            path = os.path.join(tmpdir(), f"{spec.name}-{rng.integers(1 << 60)}.npz")
            with open(path, "wb") as f:
                f.write(data)
            damage(path, data, rng)
            arrs = base(rng)
            arrs["_path"] = Box(path)
            return arrs
        cases.append(Case(f"{spec.name}/{name}", f"fastopt.save(path, o2); damage the file: {name}; "
                          f"fastopt.load(path, o)  (o = {spec.class_name}, 2 groups)", build,
                          [lambda arrs: fastopt.load(arrs["_path"].v, arrs["opt"]), step_call], expect=expect,
                          exc=(fastopt.CheckpointError,), raise_by=0))
    other = others[SPECS.index(spec) % len(others)]

    def build_other(rng, plain, other=other):
        src = stepped_opt_arrs(other, full_hp(other), backend, rng)
        path = os.path.join(tmpdir(), f"other-{rng.integers(1 << 60)}.npz")
        fastopt.save(path, src["opt"])
        arrs = base(rng)
        arrs["_path"] = Box(path)
        return arrs
    cases.append(Case(f"{spec.name}/checkpoint_of_{other.name}", f"fastopt.load(<{other.class_name} checkpoint>, "
                      f"<{spec.class_name}>)", build_other,
                      [lambda arrs: fastopt.load(arrs["_path"].v, arrs["opt"])], exc=(fastopt.CheckpointError,)))

    def build_shapes(rng, plain):
        src = make_opt(spec, hp, backend, [], groups=[{"params": [_rand(rng, (7,), F4)]}])
        src.step([_rand(rng, (7,), F4)])
        path = os.path.join(tmpdir(), f"shapes-{rng.integers(1 << 60)}.npz")
        fastopt.save(path, src)
        arrs = base(rng)
        arrs["_path"] = Box(path)
        return arrs
    cases.append(Case(f"{spec.name}/checkpoint_of_other_params", f"fastopt.load(<{spec.class_name} of one (7,) "
                      f"param>, <{spec.class_name} of 4 params>)", build_shapes,
                      [lambda arrs: fastopt.load(arrs["_path"].v, arrs["opt"])], exc=(fastopt.CheckpointError,)))

    def build_dir(rng, plain):
        arrs = base(rng)
        arrs["_path"] = Box(tempfile.mkdtemp(dir=tmpdir()))
        return arrs
    cases.append(Case(f"{spec.name}/directory", "fastopt.load(<a directory>, o)", build_dir,
                      [lambda arrs: fastopt.load(arrs["_path"].v, arrs["opt"])], exc=(fastopt.CheckpointError,)))
    return cases


# ---------------------------------------------------------------------------------------------------
# 10b. train() / eval() of the optimizers with a train/eval switch (spec.train_eval: schedule-free)
# ---------------------------------------------------------------------------------------------------

def table_train_eval(backend):
    return [c for spec in SPECS if spec.train_eval is not None for c in _train_eval_cases(spec, backend)]


def _train_eval_cases(spec, backend):
    """One spec: every switch checks every group and dtype bucket before the first param moves (a read-only
    param, a group's hyperparameter edited to a bad value), and the good switches equal plain copies'."""
    cases = []
    hp = base_hp(spec)
    text = class_text(spec, backend)

    def switch(to_eval):
        return lambda arrs: arrs["opt"].eval() if to_eval else arrs["opt"].train()

    for to_eval in (True, False):
        verb = "eval" if to_eval else "train"

        def build(rng, plain, to_eval=to_eval):
            arrs = stepped_opt_arrs(spec, hp, backend, rng)
            if not to_eval:
                arrs["opt"].eval()
            return arrs
        cases.append(Case(f"{spec.name}/{verb}/ok", f"{text}; o.{verb}() twice", build,
                          [switch(to_eval), switch(to_eval)], expect="ok"))
        cases.append(Case(f"{spec.name}/{verb}/and_back", f"{text}; o.{verb}(); the other switch", build,
                          [switch(to_eval), switch(not to_eval)], expect="ok"))
        for idx in range(4):  # group 0's float32 and float64 buckets, then group 1's
            def build_readonly(rng, plain, idx=idx, build=build):
                arrs = build(rng, plain)
                if not plain:
                    arrs["params"][idx].setflags(write=False)
                return arrs
            cases.append(Case(f"{spec.name}/{verb}/params[{idx}]_read_only",
                              f"{text}; params[{idx}].setflags(write=False); o.{verb}()", build_readonly,
                              [switch(to_eval)], names=("params",)))
        for key, _, names in class_keys(spec):
            for label, v, expect in bad_class_values(spec, key)[:4]:
                def edit(arrs, key=key, v=v):
                    arrs["opt"].param_groups[1][key] = v
                cases.append(Case(f"{spec.name}/{verb}/edit1/{key}={label}",
                                  f"{text}; o.param_groups[1][{key!r}] = {label}; o.{verb}()", build,
                                  [edit, switch(to_eval)], expect=expect, names=names, raise_by=1))
    return cases

# ---------------------------------------------------------------------------------------------------
# 10c. The composite classes' steps (Muon, Adafactor: dense grads; SparseAdam: (indices, values) pairs)
# ---------------------------------------------------------------------------------------------------

COMPOSITES = ("Muon", "Adafactor")
# each also with fastopt's clipping and skipping (fastopt/grad_guard.py), whose norm reads every grad first
GUARDS = (("", {}), ("+guard", {"clip_grad_norm": 1.0, "skip_nonfinite": True}))


def _composite_arrs(cls_name, rng, opts=None):
    """The four params of the registry classes' cases (two groups, float32 and float64 buckets, the float32
    ones views of one buffer) after one good step, and good grads for the next."""
    buf32, buf64, params = class_params(rng)
    cls = getattr(fastopt, cls_name)
    opt = cls([{"params": params[:2]}, {"params": params[2:], "lr": 0.01}], lr=0.02, **(opts or {}))
    opt.step(good_grads(rng, params))
    return {"opt": opt, "params": params, "grads": good_grads(rng, params), "buf32": buf32, "buf64": buf64}


def _sparse_arrs(rng, opts=None):
    buf32, buf64, params = class_params(rng)
    opt = fastopt.SparseAdam([{"params": params[:2]}, {"params": params[2:], "lr": 0.01}], lr=0.02, **(opts or {}))
    opt.step([(np.array([0, 1]), _rand(rng, (2,) + p.shape[1:], p.dtype)) for p in params])
    grads = [(np.array([1, 0, 1]), _rand(rng, (3,) + p.shape[1:], p.dtype)) for p in params]
    return {"opt": opt, "params": params, "grads": grads, "buf32": buf32, "buf64": buf64}


def table_composite_step(backend):
    """(Backend-independent: these classes pick their arrays' own kernels.) A bad gradient at the first or the last
    param (every element dimension), a gradient that is a param of its own or of the other group, and a bad grads
    list: an allowed error naming the grads with nothing written (params, state, step counts), or a step that goes
    through ("any": the classes take some dtypes the registry classes refuse; their values are checked against torch
    elsewhere)."""
    cases = []
    partner = {0: 2, 3: 1}
    for cls_name, (suffix, opts) in [(c, g) for c in COMPOSITES for g in GUARDS]:
        extra = "".join(f", {k}={v!r}" for k, v in opts.items())
        text = (f"o = fastopt.{cls_name}([{{'params': [a, b]}}, {{'params': [c, d], 'lr': 0.01}}], lr=0.02{extra}); "
                "o.step(grads)")
        label = cls_name + suffix
        for idx in (0, 3):
            for d in ELEMENT_DIMS:
                def build(rng, plain, d=d, idx=idx, cls_name=cls_name, opts=opts):
                    arrs = _composite_arrs(cls_name, rng, opts)
                    arrs["grads"][idx] = d.make(arrs["grads"][idx], rng)
                    return arrs
                cases.append(Case(f"{label}/grads[{idx}]/{d.name}", f"{text} with grads[{idx}] = {d.expr}", build,
                                  [step_call], expect="any", names=("grads", "param")))
            for name, other in (("is_its_param", idx), ("is_other_groups_param", partner[idx])):
                def build(rng, plain, idx=idx, other=other, cls_name=cls_name, opts=opts):
                    arrs = _composite_arrs(cls_name, rng, opts)
                    arrs["grads"][idx] = arrs["params"][other]
                    return arrs
                cases.append(Case(f"{label}/grads[{idx}]/{name}", f"{text} with grads[{idx}] = params[{other}]",
                                  build, [step_call], names=("grads", "param", "share")))
        for name, expr, fn, expect in _list_dims("grads") + [
                ("grads_none", "None", lambda arrs: arrs.__setitem__("grads", None), "error")]:
            def build(rng, plain, fn=fn, cls_name=cls_name, opts=opts):
                arrs = _composite_arrs(cls_name, rng, opts)
                fn(arrs)
                return arrs
            cases.append(Case(f"{label}/grads/{name}", f"{text} with grads = {expr}", build, [step_call],
                              expect="any" if expect != "error" else "error", names=("grads", "param")))
    for suffix, opts in GUARDS:
        extra = "".join(f", {k}={v!r}" for k, v in opts.items())
        text = (f"o = fastopt.SparseAdam([{{'params': [a, b]}}, {{'params': [c, d], 'lr': 0.01}}], lr=0.02{extra}); "
                "o.step(grads)")
        for idx in (0, 3):
            for part in ("indices", "values"):
                for d in ELEMENT_DIMS:
                    def build(rng, plain, d=d, idx=idx, part=part, opts=opts):
                        arrs = _sparse_arrs(rng, opts)
                        i, v = arrs["grads"][idx]
                        arrs["grads"][idx] = (d.make(i, rng), v) if part == "indices" else (i, d.make(v, rng))
                        return arrs
                    cases.append(Case(f"SparseAdam{suffix}/grads[{idx}]/{part}/{d.name}",
                                      f"{text} with grads[{idx}]'s {part} = {d.expr}", build, [step_call],
                                      expect="any", names=("grads", "param", "indices", "values")))
    text = "o = fastopt.SparseAdam([{'params': [a, b]}, {'params': [c, d], 'lr': 0.01}], lr=0.02); o.step(grads)"
    for idx in (0, 3):
        for name, other in (("values_in_its_param", idx), ("values_in_other_groups_param", partner[idx])):
            def build(rng, plain, idx=idx, other=other):
                arrs = _sparse_arrs(rng)
                p = arrs["params"][other]
                arrs["grads"][idx] = (np.array([0]), p[:1])
                return arrs
            cases.append(Case(f"SparseAdam/grads[{idx}]/{name}",
                              f"{text} with grads[{idx}] = ([0], params[{other}][:1])", build, [step_call],
                              names=("share",)))
    return cases

# ---------------------------------------------------------------------------------------------------
# 10d. fastopt.torch classes: a group edited to a bad value, bad gradients (torch checks p.grad's dtype and
# shape on assignment, so the bad ones are other layouts and memory)
# ---------------------------------------------------------------------------------------------------

def _torch_opt_arrs(spec, hp, rng):
    """{'opt', 'params'}: the fastopt.torch class (torch's arguments: lr, the rest its defaults) over torch twins
    of the four class params (two groups, float32 and float64), after one good step, with good grads set."""
    import torch
    import fastopt.torch as ft
    params = [torch.tensor(np.asarray(p), requires_grad=True) for p in class_params(rng)[2]]
    opt = getattr(ft, spec.class_name)(class_groups(spec, hp, params), lr=hp["lr"])
    for _ in range(2):
        for p in params:
            p.grad = torch.tensor(_rand(rng, tuple(p.shape), np.float32)).to(p.dtype)
        if _ == 0:
            opt.step()
    return {"opt": opt, "params": params}


def _torch_grad_dims():
    """(name, expr, make(params, idx) -> the grad for params[idx], expect)."""
    partner = {0: 2, 3: 1}
    return [("sparse", "p.grad.to_sparse()", lambda ps, i: ps[i].grad.to_sparse(), "error"),
            ("other_groups_param", "params[partner].detach()", lambda ps, i: ps[partner[i]].detach(), "error"),
            ("own_param", "p.detach()", lambda ps, i: ps[i].detach(), "any"),
            ("transposed", "p.grad.t().contiguous().t()", lambda ps, i: ps[i].grad.t().contiguous().t(), "any")]


def _torch_group_keys(spec):
    """[(key, default)] of the fastopt.torch class's options (its signature: torch's names)."""
    import inspect
    import fastopt.torch as ft
    skip = {"self", "params", "lr", "foreach", "fused", "capturable", "differentiable"}
    sig = inspect.signature(getattr(ft, spec.class_name).__init__)
    return [(k, v.default) for k, v in sig.parameters.items()
            if k not in skip and v.default is not inspect.Parameter.empty and v.kind == v.POSITIONAL_OR_KEYWORD]


def _torch_bad_values(default):
    if isinstance(default, tuple):
        return [("(nan, ...)", (math.nan,) + default[1:]), ("one_short", default[:-1]), ("'x'", "x")]
    if isinstance(default, bool):
        return [("'yes'", "yes"), ("None", None)]
    # 1e308: valid, but torch-only state derived from it (ASGD's eta, schedule-free's lr_max) overflows float32
    return [("nan", math.nan), ("-1.0", -1.0), ("1e308", 1e308), ("10**400", HUGE_INT), ("'x'", "x"), ("None", None)]


def table_torch_class(backend):
    """(fastopt.torch runs the compiled backend: run once.) Bad gradients at a param of group 0 or 1 (torch
    checks p.grad's dtype and shape on assignment, so these are layouts and memory) and group 1's options edited
    to bad values: an allowed error with nothing written (params, grads, state), or a step ("any" where torch's
    semantics decide)."""
    if not HAVE_TORCH:
        return []
    return [c for spec in SPECS for c in _torch_class_cases(spec)]


def _torch_class_cases(spec):
    cases = []
    hp = base_hp(spec)
    text = (f"o = fastopt.torch.{spec.class_name}([{{'params': [a, b]}}, {{'params': [c, d], 'lr': lr / 2}}], "
            "lr=lr); o.step()")

    def step(arrs):
        return arrs["opt"].step()
    for idx in (0, 3):
        for name, expr, make, expect in _torch_grad_dims():
            def build(rng, plain, idx=idx, make=make):
                arrs = _torch_opt_arrs(spec, hp, rng)
                arrs["params"][idx].grad = make(arrs["params"], idx)
                return arrs
            sparse = name == "sparse"
            # sparse grads: torch's RuntimeError where torch refuses them; SGD and Adagrad take them (spec.torch_sparse)
            cases.append(Case(f"{spec.name}/grad[{idx}]/{name}", f"{text} with params[{idx}].grad = {expr}", build,
                              [step], expect="any" if sparse and spec.torch_sparse is not None else expect,
                              exc=(RuntimeError,) if sparse else ALLOWED,
                              names=("grad", "param", "share", "sparse")))
    for key, default in [("lr", 0.1)] + _torch_group_keys(spec):
        for label, v in _torch_bad_values(default):
            def build(rng, plain):
                return _torch_opt_arrs(spec, hp, rng)

            def edit(arrs, key=key, v=v):
                arrs["opt"].param_groups[1][key] = v
            cases.append(Case(f"{spec.name}/edit1/{key}={label}", f"{text}; o.param_groups[1][{key!r}] = {label}; "
                              "o.step()", build, [edit, step], expect="any",
                              names=(key, key.rstrip("s"), "Invalid", "learning rate"), raise_by=1))
    return cases

# ---------------------------------------------------------------------------------------------------
# 11. Must work: other array types and edge sizes give the plain-NumPy result
# ---------------------------------------------------------------------------------------------------

def _memmap(a):
    path = os.path.join(tmpdir(), f"mm-{id(a)}-{np.random.default_rng().integers(1 << 60)}.dat")
    m = np.memmap(path, dtype=a.dtype, mode="w+", shape=a.shape)
    m[...] = a
    return m


def _array_array(a):
    return array.array("f" if a.dtype == F4 else "d", a.ravel().tolist())


def _frombuffer(a):
    return np.frombuffer(bytearray(a.tobytes()), a.dtype).reshape(a.shape)


KINDS = [  # (name, shapes, convert(a) applied to the slots given, slots: 'all' | 'grads' | 'params')
    ("size0", [(0,)], None, None),
    ("size1", [(1,)], None, None),
    ("0d", [()], None, None),
    ("size0_and_size1_mixed", [(0,), (1,), (5,)], None, None),
    ("fortran_order_1col", [(12, 1)], np.asfortranarray, "all"),
    ("reversed_size1", [(1,)], lambda a: a[::-1], "all"),
    ("memmap", [(12,)], _memmap, "all"),
    ("memmap_grads", [(12,)], _memmap, "grads"),
    ("array_array_grads", [(12,)], _array_array, "grads"),
    ("memoryview_grads", [(12,)], memoryview, "grads"),
    ("memoryview_all", [(12,)], memoryview, "all"),
    ("readonly_memoryview_grads", [(12,)], lambda a: memoryview(a).toreadonly(), "grads"),
    ("frombuffer_bytearray", [(3, 4)], _frombuffer, "all"),
] + ([("torch_all", [(3, 4)], _torch_tensor, "all"), ("torch_grads", [(3, 4)], _torch_tensor, "grads")]
      if HAVE_TORCH else [])


def _convert(arrs, fn, which, form):
    if fn is None:
        return
    for slot in list(arrs):
        if which == "all" or slot == which:
            arrs[slot] = fn(arrs[slot]) if form == "single" else [fn(x) for x in arrs[slot]]


def table_must_work(backend):
    return ([c for spec in SPECS for c in _must_work_functional(spec, backend)]
            + [c for f in CLIP_FUNCTIONS for c in _must_work_clip(*f, backend)]
            + [c for spec in SPECS for c in _must_work_class(spec, backend)])


def _must_work_functional(spec, backend):
    cases = []
    hp = full_hp(spec)
    call = functional_call(spec, hp, backend)
    for name, shapes, fn, which in KINDS:
        for form in ("single", "list"):
            if form == "single" and len(shapes) > 1:
                continue
            for dtype in (F4, F8):
                def build(rng, plain, shapes=shapes, fn=fn, which=which, form=form, dtype=dtype):
                    arrs = good_problem(spec, hp, form, dtype, rng,
                                        shapes=shapes * (3 if form == "list" and len(shapes) == 1 else 1))
                    if not plain:
                        _convert(arrs, fn, which, form)
                    return arrs
                cases.append(Case(f"{spec.name}/{name}/{form}/{dtype.name}",
                                  f"{call_text(spec, hp, backend)} with {name} arrays {shapes} ({dtype.name}, {form})",
                                  build, [call], expect="ok"))

    # disjoint views of one buffer for every slot: sharing a buffer is fine when memory does not overlap
    def build_views(rng, plain):
        arrs = good_problem(spec, hp, "list", F4, rng)
        if plain:
            return arrs
        flat = [x for slot in arrs for x in arrs[slot]]
        buf = np.zeros(sum(x.size for x in flat) + len(flat), F4)
        off = 0
        for slot in arrs:
            for j, x in enumerate(arrs[slot]):
                v = buf[off:off + x.size].reshape(x.shape)
                v[...] = x
                arrs[slot][j] = v
                off += x.size + 1
        return arrs
    cases.append(Case(f"{spec.name}/disjoint_views_of_one_buffer", f"{call_text(spec, hp, backend)} with every "
                      f"array a disjoint view of one buffer", build_views, [call], expect="ok"))

    def build_empty(rng, plain):
        return {"params": [], "grads": [], **{s: [] for s in active_states(spec, hp)}}
    cases.append(Case(f"{spec.name}/all_empty_lists", f"fastopt.{spec.function_name}([], [], [], ...)", build_empty,
                      [call], expect="ok"))
    return cases


def _must_work_clip(fname, bound, writes, backend):
    cases = []
    call = clip_call(fname, bound, backend)
    for name, shapes, fn, which in KINDS:
        if which == "params":
            continue
        for form in ("single", "list"):
            if form == "single" and len(shapes) > 1:
                continue

            def build(rng, plain, shapes=shapes, fn=fn, form=form):
                grads = [np.asarray(_rand(rng, s, F4) * np.float32(10))
                         for s in shapes * (3 if form == "list" and len(shapes) == 1 else 1)]
                arrs = {"grads": grads[0] if form == "single" else grads}
                if not plain:
                    _convert(arrs, fn, "all", form)
                return arrs
            # a read-only grad is fine for global_norm only
            expect = "error" if writes and name.startswith("readonly") else "ok"
            cases.append(Case(f"{fname}/{name}/{form}", f"fastopt.{fname}(grads, ...) with {name} {shapes} ({form})",
                              build, [call], expect=expect, names=("grads",)))
    return cases


def _must_work_class(spec, backend):
    """The classes on the same kinds (1-D shapes, so that array.array and memoryviews fit)."""
    cases = []
    hp = full_hp(spec)
    for name, shapes, fn, which in KINDS:
        if which == "params":
            continue
        shape = shapes[-1] if shapes[-1] != (12, 1) else (12,)

        def build(rng, plain, shape=shape, fn=fn, which=which):
            params = [_rand(rng, shape, F4), _rand(rng, shape, F8), _rand(rng, shape, F4), _rand(rng, shape, F8)]
            grads = good_grads(rng, params)
            if not plain and fn is not None:
                if which == "all":
                    params = [fn(p) for p in params]
                grads = [fn(g) for g in grads]
            return {"params": params, "grads": grads}

        def construct(arrs):
            arrs["opt"] = make_opt(spec, hp, backend, arrs["params"])
        cases.append(Case(f"{spec.name}/class/{name}", f"{class_text(spec, backend)} with {name} ({shape})",
                          build, [construct, step_call, step_call], expect="ok"))
    return cases


TABLES = {
    "functional_arrays": table_functional_arrays,
    "functional_hypers": table_functional_hypers,
    "init_state": table_init_state,
    "clip": table_clip,
    "class_step": table_class_step,
    "class_ctor": table_class_ctor,
    "class_hypers": table_class_hypers,
    "add_param_group": table_add_param_group,
    "load_state_dict": table_load_state_dict,
    "train_eval": table_train_eval,
    "composite_step": table_composite_step,
    "torch_class": table_torch_class,
    "checkpoint": table_checkpoint,
    "must_work": table_must_work,
}
# backend-independent tables run once (under the compiled backend)
# backend-independent tables (validation in Python before any kernel) run once, under the compiled
# backend; the array tables run under both host backends
HOST_ONLY = {"checkpoint", "load_state_dict", "class_hypers", "add_param_group", "composite_step", "torch_class"}
