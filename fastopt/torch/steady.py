"""The steady state of a fastopt.torch optimizer: the same params, state tensors and options as on the
last step, only new grads.

A training loop spends most steps there, and a step planned in full costs microseconds of Python per
param (optimizer.py: every param's entry, count, layout and bucket). After a step planned in full has
run, `Steady.build` keeps its kernel calls and the backend's `prepare_fixed` of the params and states
(interface.PrepareOnceBackend). The next step then checks, list by list with C-level loops, that nothing
but the grads changed: the groups and their params (identity), the params' storage, every state dict and
state tensor (identity), the step counts' and carried scalars' values (those the last step wrote, read
through NumPy views: a write through .data, which autograd's version counter misses, is seen too), and the
grads' form (a grad for exactly the same params as before). Groups whose options changed (an lr scheduler) are
validated again, and must keep the same states in use. Then the grads are viewed and the backend's
`bind_grads` checks them against their params (dtype, shape, memory). Any difference: `plan` returns
None and the optimizer plans the step in full, with its checks and messages; nothing was written.
"""
from __future__ import annotations

import copy
import math
import weakref
from itertools import compress, repeat
from operator import attrgetter, is_, is_not

import numpy as np
import torch

from fastopt.backends.interface import prepares_once
import fastopt.torch.arguments as arguments
from fastopt.torch.plan import Plan
from fastopt.torch.views import bump_versions, kernel_view, scalar_view

__all__ = ["Steady", "group_key"]

_grad_of = attrgetter("grad")
_data_ptr = torch.Tensor.data_ptr
_is_contiguous = torch.Tensor.is_contiguous
_to_numpy = torch.Tensor.numpy
_call = weakref.ref.__call__
# what viewing a grad or re-validating a changed group can raise: the full plan then runs and reports it
_FALL_BACK = (TypeError, ValueError, RuntimeError, AttributeError, KeyError)
# the smallest magnitude that rounds to inf in float32 (halfway from its largest finite to 2**128)
_F32_ROUNDS_TO_INF = 2.0 ** 128 - 2.0 ** 103


def group_key(group: dict):
    """A group's options as a comparable snapshot (lists copied as tuples: they can change in place), or
    None when one is a tensor (a tensor lr can change in place: such a group is validated every step)."""
    out = []
    for key, value in group.items():
        if key == "params":
            continue
        if isinstance(value, (list, tuple)):
            if any(isinstance(v, torch.Tensor) for v in value):
                return None
            value = tuple(value)
        elif isinstance(value, torch.Tensor):
            return None
        out.append((key, value))
    return tuple(out)


def _immutable(value) -> bool:
    """A group value that cannot change without being replaced (so an identity check sees any change)."""
    return value is None or type(value) in (float, int, bool, str) or (
        type(value) is tuple and all(type(v) in (float, int, bool) for v in value))


class _Group:
    __slots__ = ("group", "params_list", "params", "key", "values", "hp", "active", "buckets")

    def __init__(self, group, hp, active, buckets):
        self.group = group
        self.params_list = group["params"]
        self.params = tuple(group["params"])
        self.key = group_key(group)
        self.remember_values()
        self.hp = hp            # registry hyperparameters (None: the group has no param with a grad)
        self.active = active    # spec.active_states(hp): the states in use
        self.buckets = buckets  # indices of the group's kernel calls

    def remember_values(self) -> None:
        """The group's values themselves when every option is immutable (floats, bools, tuples of numbers): then
        the same objects in the same order mean the same options, a C-level identity check per step; None
        (compare group_key snapshots) when one could change in place (a list, a tensor)."""
        values = list(self.group.values())  # the params list too: its identity (contents: checked apart)
        fixed = all(_immutable(v) or k == "params" for k, v in self.group.items())
        self.values = values if fixed else None

    def unchanged(self) -> bool:
        """True when the group's options are those of the last step (identity fast path, else snapshot)."""
        values = self.values
        group = self.group
        if values is not None and len(group) == len(values) and all(map(is_, group.values(), values)):
            return True
        key = group_key(group)
        return key is not None and key == self.key


class Steady:
    """The kernel calls of the last step, reused while only the grads change (module docstring)."""

    def __init__(self, optimizer, plan: Plan, backend, fixed):
        spec = optimizer.spec
        self.spec = spec
        self.state_map = optimizer.state
        self.backend, self.fixed = backend, fixed
        self.templates = [copy.copy(b) for b in plan.buckets]
        for t in self.templates:
            t.grad_views, t.prepared = [], None
        by_group: dict = {}
        for i, b in enumerate(plan.buckets):
            by_group.setdefault(id(b.group), []).append(i)
        self.groups = []
        for group in optimizer.param_groups:
            calls = by_group.get(id(group), [])
            hp = plan.buckets[calls[0]].hp if calls else None
            active = spec.active_states(hp) if hp is not None else None
            self.groups.append(_Group(group, hp, active, calls))
        self.params = [p for g in self.groups for p in g.params]
        in_calls = {id(p) for b in plan.buckets for p in b.params}
        self.mask = [id(p) in in_calls for p in self.params]
        self.every = all(self.mask)
        self.active = list(compress(self.params, self.mask))
        position = {id(p): i for i, p in enumerate(self.active)}
        self.positions = [[position[id(p)] for p in b.params] for b in plan.buckets]
        self.identity = len(plan.buckets) == 1 and self.positions[0] == list(range(len(self.active)))
        entry_of = {id(p): e for b in plan.buckets for p, e in zip(b.params, b.entries)}
        entries = [entry_of[id(p)] for p in self.active]
        self.ptrs = [e.ptr for e in entries]
        # the state map's keys and values in order: the same objects means every param has the same state
        # dict (checked with two C-level loops, no hashing of tensors)
        self.state_keys = list(optimizer.state.keys())
        self.state_values = list(optimizer.state.values())
        state_of = {id(k): v for k, v in zip(self.state_keys, self.state_values)}
        if not all(state_of.get(id(p)) is e.state for p, e in zip(self.active, entries)):
            raise ValueError("the entries' state dicts are not the optimizer's")
        self.flat = [i for i, e in enumerate(entries) if e.flat]
        # NumPy has no bfloat16, and the kernels see a complex tensor as its reals: both through views.kernel_view
        self.viewed = any(p.dtype == torch.bfloat16 or p.is_complex() for p in self.active)
        # a complex param's grad must be complex too (bind_grads sees the real views: a real grad shaped like
        # them would pass there)
        self.complex = [(i, p.dtype) for i, p in enumerate(self.active) if p.is_complex()]
        self.strides = {i: self.active[i].stride() for i in self.flat}
        # `p.data = p.data.t()` keeps the memory (and data_ptr) and changes the layout the views were made for:
        # a contiguous param must stay contiguous (one layout per shape; a new shape fails the grads' shape
        # check), a non-contiguous one keep its strides
        flat = set(self.flat)
        self.contiguous = [p for i, p in enumerate(self.active) if i not in flat]
        dicts, names, tensors = [], [], []
        for e in entries:
            for name, t in zip(e.check_names, e.check_tensors):  # 8-bit state: codes and scales
                dicts.append(e.state)
                names.append(name)
                tensors.append(t)
        written = [t for b in plan.buckets for t in b.written]
        # step counts and torch-only scalars: written through NumPy views of the 0-d CPU tensors, per call
        scalar_names = (("step",) if spec.torch_step else ()) + tuple(spec.torch_extra_state)
        self.step_tensors = []
        self.scalar_views = []   # per call: {name: [views]}
        for b in plan.buckets:
            views = {}
            for name in scalar_names:
                ts = [entry_of[id(p)].state[name] for p in b.params]
                views[name] = [scalar_view(t) for t in ts]
                if any(v is None for v in views[name]):
                    raise TypeError("a count not in a CPU tensor")  # no steady state
                if len({v.dtype for v in views[name]}) > 1:
                    raise TypeError("one call's scalar state tensors differ in dtype")  # each read its own way
                for p, t in zip(b.params, ts):
                    dicts.append(entry_of[id(p)].state)
                    names.append(name)
                    tensors.append(t)
                written += ts
            self.scalar_views.append(views)
        for t, views in zip(self.templates, self.scalar_views):  # the carried values after the last step
            t.carried = {name: views[name][0][()] for name in spec.torch_carry}
        self.check_dicts, self.check_names, self.check_tensors = dicts, names, tensors
        # their memory too: `.data = ...` and set_() replace a tensor's storage under the cached views
        self.check_ptrs = list(map(_data_ptr, tensors))
        self.written = written
        # the counts and the carried state, watched by value (a write through .data bumps no version)
        self.scalars = [v for views in self.scalar_views for vs in views.values() for v in vs]
        self.scalar_values = np.array(self.scalars) if self.scalars else None
        self.pending = None
        # grads kept only once the same grad tensors show up on two steps in a row (accumulated grads,
        # zero_grad(set_to_none=False)): otherwise a kept view would keep a freed grad's memory alive
        self.grad_refs = None
        self.grads = self.grad_ptrs = self.grad_views = None

    @classmethod
    def build(cls, optimizer, plan: Plan):
        """The steady state after `plan` (planned in full) ran and was committed; None when the next step
        cannot take the short path (first steps, another backend, counts not in CPU tensors...)."""
        buckets = plan.buckets
        if not buckets or plan.new_state or any(e is None for b in buckets for e in b.entries):
            return None
        backend = buckets[0].backend
        if any(b.backend is not backend for b in buckets) or not prepares_once(backend):
            return None
        if any(p.device.type != "cpu" for b in buckets for p in b.params[:1]):
            # CUDA params plan in full each step: their grads' views, device and stream checks on this
            # short path have not run on a GPU yet (issue 11's host-cost work)
            return None
        calls = []
        for b in buckets:
            state_lists, names = optimizer.kernel_states(b)
            numbers = None if b.numbers[-1] == len(b.numbers) - 1 else b.numbers
            calls.append(((b.param_views, None, *state_lists), names, numbers))
        try:
            fixed = backend.prepare_fixed(calls)
            return cls(optimizer, plan, backend, fixed)
        except _FALL_BACK:
            return None

    # --- a step -------------------------------------------------------------------------------------
    def plan(self, optimizer):
        """This step's Plan when only the grads changed since the last step, else None (nothing written)."""
        try:
            return self._plan(optimizer)
        except _FALL_BACK:
            return None

    def _plan(self, optimizer):
        if optimizer.state is not self.state_map:
            return None
        groups = optimizer.param_groups
        if len(groups) != len(self.groups):
            return None
        spec = self.spec
        pending = None
        for i, (group, known) in enumerate(zip(groups, self.groups)):
            current = group["params"]
            if (group is not known.group or current is not known.params_list or len(current) != len(known.params)
                    or not all(map(is_, current, known.params))):
                return None
            if not known.unchanged():  # options changed (a scheduler): validate them again
                key = group_key(group)
                hp = arguments.registry_hp(spec, group)
                if known.hp is not None and spec.active_states(hp) != known.active:
                    return None
                if pending is None:
                    pending = {}
                pending[i] = (key, hp)
        grads = list(map(_grad_of, self.params))
        if list(map(is_not, grads, repeat(None))) != self.mask:
            return None
        if not self.every:
            grads = list(compress(grads, self.mask))
        active = self.active
        if list(map(_data_ptr, active)) != self.ptrs:
            return None
        if not all(map(_is_contiguous, self.contiguous)) or any(active[i].stride() != self.strides[i]
                                                                  for i in self.flat):
            return None
        state = optimizer.state
        if (len(state) != len(self.state_keys) or not all(map(is_, state.values(), self.state_values))
                or not all(map(is_, state.keys(), self.state_keys))):
            return None
        # each state entry at the memory the views were made over: one pass reading the dicts' current tensors
        # finds a replaced tensor (another address; a missing entry raises: _FALL_BACK) and memory replaced under
        # a kept one (`.data = ...`, set_()). A new tensor over the same memory (a view of it) reads the same.
        if list(map(_data_ptr, map(dict.get, self.check_dicts, self.check_names))) != self.check_ptrs:
            return None
        if self.scalars and not np.array_equal(np.array(self.scalars), self.scalar_values):
            return None  # a count or carried value written since the last step
        views = self._grad_views(grads)
        if views is None:
            return None
        if self.identity:
            per_call = [views]
        else:
            per_call = [[views[i] for i in pos] for pos in self.positions]
        prepared = self.backend.bind_grads(self.fixed, per_call)
        buckets = []
        for t, gv, prep in zip(self.templates, per_call, prepared):
            b = copy.copy(t)
            if spec.torch_step:
                b.step = t.step + 1
            b.grad_views, b.prepared = gv, prep
            buckets.append(b)
        if pending is not None:
            for i, (key, hp) in pending.items():
                for c in self.groups[i].buckets:
                    buckets[c].hp = hp
        if spec.torch_carry:  # the carried state's values before this step, for the scalars
            for b in buckets:
                b.hp = {**b.hp, **b.carried}
        self.pending = pending
        return Plan(buckets, [], steady=self)

    def _grad_views(self, grads):
        """The grads' kernel views (None: a grad the full plan must look at: one that needs autograd, is
        on a GPU, sparse, or in another layout than its non-contiguous param)."""
        if self.grads is not None and all(map(is_, grads, self.grads)) and list(map(_data_ptr, grads)) == self.grad_ptrs:
            return self.grad_views
        if self.viewed:
            if any(grads[i].dtype != dtype for i, dtype in self.complex):
                return None
            views = [kernel_view(g, False) for g in grads]
        else:
            views = list(map(_to_numpy, grads))
        for i in self.flat:
            g = grads[i]
            if g.stride() != self.strides[i]:
                return None
            views[i] = kernel_view(g, True)
        refs = self.grad_refs
        if refs is not None and len(refs) == len(grads) and all(map(is_, grads, map(_call, refs))):
            self.grads, self.grad_ptrs, self.grad_views = grads, list(map(_data_ptr, grads)), views
        else:
            self.grads = self.grad_ptrs = self.grad_views = None
            self.grad_refs = list(map(weakref.ref, grads))
        return views

    def commit(self, plan: Plan) -> None:
        """After the kernels ran: the step counts and torch-only scalars, autograd's versions, the new
        options of changed groups."""
        self._store_scalars(plan)
        bump_versions(self.written)
        if self.scalars:
            self.scalar_values = np.array(self.scalars)
        if self.pending is not None:
            for i, (key, hp) in self.pending.items():
                self.groups[i].key, self.groups[i].hp = key, hp
                self.groups[i].remember_values()
            self.pending = None

    def _store_scalars(self, plan: Plan) -> None:
        """The step counts and torch-only scalars after this step, through the kept NumPy views."""
        carry = self.spec.torch_carry
        for t, b, views in zip(self.templates, plan.buckets, self.scalar_views):
            t.step, t.hp = b.step, b.hp
            carried = {}
            for name, vs in views.items():
                value = b.step if name == "step" else arguments.extra_state_value(self.spec, name, b)
                # a value past a float32 state's range is stored as inf (as torch stores it), without NumPy's
                # overflow warning (an errstate block costs ~3 us a step): the kernels have written the params
                big = abs(float(value)) >= _F32_ROUNDS_TO_INF  # False for NaN
                for v in vs:
                    v[()] = math.copysign(math.inf, value) if big and v.itemsize == 4 else value
                if name in carry and vs:
                    carried[name] = vs[0][()]  # as stored: a NumPy scalar of the tensor's dtype (float32, like torch)
            if carry:
                t.carried = carried
