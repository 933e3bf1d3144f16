"""Stateful optimizers in the style of torch.optim, generated from the registry (fastopt/specs.py).

    opt = fastopt.Adam(params, lr=fastopt.schedules.cosine(1e-3, 10_000), clip_grad_norm=1.0,
                       skip_nonfinite=True)
    for batch in data:
        grads = compute_grads(params, batch)     # a list of arrays, in the order of the params
        opt.step(grads)

One generic class, `Optimizer`, holds the machinery; `SGD`, `Adam`, ... are generated subclasses that
only differ in their spec and in their constructor's signature (torch.optim's argument names, with
`betas=(beta1, beta2)`). Validation lives in the registry (spec.validate), shared with the functional
API.

Constructor arguments follow torch.optim: params, then torch's positional arguments in torch's order
(`fastopt.SGD(p, 0.1, 0.9)` is momentum 0.9; spec.torch_positional), the rest keyword-only, fastopt's
options (clip_grad_norm, skip_nonfinite, backend) last. Hyperparameters are real numbers (Python or NumPy
scalars, converted to Python floats when checked); lr may also be a schedule. A 0-d array or tensor (which
torch.optim accepts for lr and betas, for its capturable/fused paths) is refused with a TypeError: it would
be read once and then frozen. fastopt.torch, the torch.optim front end, takes torch's forms.

Param groups. `params` is a list of arrays (one group) or a list of dicts {"params": [...], "lr": ...}
with per-group hyperparameters (torch semantics: missing keys take the constructor's values).
`opt.param_groups` is a list of dicts that may be edited between steps (like torch), including an array
of a group's "params" swapped for another of the same shape and dtype (it keeps the param's state; the
number of params of a group is fixed: add_param_group adds params). SGD's momentum set on in a group starts
its buffer at the gradient of the first update, as torch does (the buffer is made then; a step skipped by
skip_nonfinite on the host makes none); on GPU arrays a step skipped on the device, and a capturable=True
optimizer once it has stepped, leave a zero buffer that the next step updates with dampening.

Validation cost. Every step checks everything before the first write, but on the CPU the params and states
are checked in full only once (and again when a group's arrays or state slots change): each step compares
each array with what was checked (memory, dtype, shape, contiguity, writability: identity plus those
fields, so a param made read-only or reshaped in place is caught and re-checked with the full messages)
and checks the grads, including against the memory of every written array. See _prepare_step.

One call per group and dtype. At construction each group's arrays are split by dtype into buckets;
`step(grads)` makes one multi-tensor kernel call per bucket, never one per array.

Steps and schedules. Each group counts the updates it has applied (`opt.steps(i)`); the update
being taken is step t = count + 1, which feeds the bias corrections. A group's `lr` may be a
schedule, i.e. any callable count -> lr; it is called with the number of updates already applied to
the group (0 for the first step), like optax. Skipped steps do not count.

Fused clipping and non-finite skipping. `clip_grad_norm=max_norm` computes the global L2 norm of all
gradients once (one read of the gradients) and hands min(1, max_norm / (norm + 1e-6)) to the update
kernels as `grad_scale`: the gradients are never rewritten. `skip_nonfinite=True` reuses the same norm
(any NaN/Inf gradient makes the sum of squares non-finite): the whole step is skipped, params and
state byte-for-byte unchanged, the step counters do not advance, and `opt.skipped_steps` counts.
Both options together still read the gradients once before the update.
A float64 gradient whose squares overflow (|g| > ~1e154) also counts as non-finite: its update would
overflow the second moments anyway.

On the GPU (CuPy arrays, Numba device arrays, torch CUDA tensors) `step` never synchronises with the
host. The per-tensor sums of squares go into one device buffer and ONE guard kernel (backend
`step_guard`) turns them into the clip coefficient and a device skip flag (`found_inf`), and counts
skipped steps in a device counter; the update kernels read the coefficient as `grad_scale` and return
without writing when the flag is set. As the host cannot know whether a GPU step was skipped without
waiting for it, there (and only there) the group step counters, and with them bias corrections and
schedules, count attempted steps: a skipped step advances them (like torch's LR schedulers under a
GradScaler). Reading `skipped_steps` synchronises, which is the caller's choice.

Errors. A bad hyperparameter, a wrong number of gradients, or a gradient whose shape, dtype or kind
does not match its parameter raises before any array is written (every group is checked before the
first update).
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Iterable

import numpy as np

from fastopt import statedict
from fastopt.array_types import Arrays, Schedule
from fastopt.arrays import array_device, as_numpy, copy_into, copy_param, to_host, writable_view, zero_fill
from fastopt.backends import dispatch
from fastopt.backends.dispatch import backend_for
from fastopt.backends.interface import capturable as capturable_backend
from fastopt.backends.interface import prepares_once
from fastopt.capture import OUTSIDE_CAPTURE, CapturedScalars
from fastopt.clip import check_bound, clip_coefficient
from fastopt.functional import device_param_dtype, init_state, rounding_options, with_kahan
from fastopt.precision import QuantizedState, StochasticRounding, is_16bit, quant_blocks, quantize_blockwise
from fastopt.schedules import is_schedule
from fastopt.specs import PARAM, REGISTRY, REQUIRED, OptimizerSpec, as_bool, groups_repr, naming_group
from fastopt.statedict import OptimizerState, check_array
from fastopt.train_eval import Modes

__all__ = ["Optimizer", "OptimizerState", "StatePlan", "as_param_groups"] + [spec.class_name for spec in REGISTRY.values()]

_UNSET = object()


_is_callable_lr = is_schedule  # the rule lives with the schedules


def _same(a, b) -> bool:
    """Cached hyperparameters still apply: equal values of the same types, also inside betas (NumPy 2
    has np.float32(0.9) == 0.9, and 1 == 1.0 == True: a change of type that validation must see)."""
    if type(a) is not type(b):
        return False
    if type(a) is tuple or type(a) is list:  # a loop, not all(genexpr): this runs every step
        if len(a) != len(b):
            return False
        for x, y in zip(a, b):
            if type(x) is not type(y) or not (_same(x, y) if type(x) is tuple or type(x) is list else x == y):
                return False
        return True
    return a == b


class _Bucket:
    """The arrays of one group with one dtype: one multi-tensor kernel call per step."""

    __slots__ = ("params", "indices", "local", "states", "dtype", "is_device", "contiguous_range", "tail", "names",
                 "backend", "backend_key", "prepares_once", "capturable", "device")

    def __init__(self, params, indices, local, states, dtype, is_device):
        self.params = params            # list of arrays
        self.indices = indices          # positions of these params in the optimizer's flat order
        self.local = local              # ... and in their group's params list
        self.states = states            # state name -> list of arrays (missing: not allocated yet)
        self.dtype = dtype
        self.is_device = is_device
        # when the bucket is a contiguous slice of the flat order, grads are sliced, not gathered
        self.contiguous_range = (indices[0], indices[-1] + 1) if indices == list(
            range(indices[0], indices[-1] + 1)) else None
        self.tail = None        # the state lists of the kernel call (set when the group's hp change)
        self.names = None       # ("params", "grads", state names...) for the kernel's error messages
        self.backend = None     # the backend module, resolved once per use_backend context
        self.backend_key = _UNSET
        self.prepares_once = False  # the backend checks params and states once (PrepareOnceBackend)
        self.capturable = False     # the backend can run a step captured into a CUDA graph (CapturableBackend)
        self.device = None          # GPU arrays: (the array that decides the call's device, its device ordinal)

    def __getstate__(self):
        """Pickling and deepcopy: the arrays and lists; the backend (a module) is resolved again."""
        state = {name: getattr(self, name) for name in self.__slots__}
        state.update(backend=None, backend_key=None, prepares_once=False, capturable=False, device=None)
        return state

    def __setstate__(self, state):
        for name, value in state.items():
            setattr(self, name, value)
        self.backend_key = _UNSET  # resolved at the next step


def as_param_groups(params) -> list:
    """An optimizer's `params` argument as a list of param-group dicts (torch.optim's forms): one dict, one
    array, or an iterable of arrays (one group) or of dicts. The dicts are the caller's (not copied; each
    class fills in its defaults). TypeError for a non-iterable or a mix of arrays and dicts, ValueError for
    an empty list. Shared by Optimizer and the composite classes (fastopt.muon, fastopt.sparse_adam,
    fastopt.adafactor)."""
    if isinstance(params, dict):
        return [params]
    if not isinstance(params, (list, tuple)):
        if hasattr(params, "shape"):
            return [{"params": [params]}]
        try:
            params = list(params)
        except TypeError:
            raise TypeError(f"params must be a list of arrays or of param-group dicts, got "
                            f"{type(params).__name__}") from None
    if len(params) == 0:
        raise ValueError("optimizer got an empty parameter list")
    if all(isinstance(p, dict) for p in params):
        return list(params)
    if any(isinstance(p, dict) for p in params):
        raise TypeError("params must be a list of arrays or a list of param-group dicts, not a mix")
    return [{"params": list(params)}]


class Optimizer:
    """Base class: `spec` (an OptimizerSpec) is set by each generated subclass.

    Attributes: param_groups (list of dicts, editable between steps), skipped_steps (int),
    clip_grad_norm, skip_nonfinite, backend (None: chosen from the arrays' type).
    """

    spec: OptimizerSpec = None  # set by the generated subclasses

    # ---- construction -------------------------------------------------------------------------

    def __init__(self, params: Iterable, defaults: dict, *, clip_grad_norm: float | None = None,
                 skip_nonfinite: bool = False, backend: str | None = None, state_dtype=None, kahan: bool = False,
                 stochastic_rounding: bool = False, seed: int = 0, capturable: bool = False):
        spec = self.spec
        if spec is None:
            raise TypeError("Optimizer is the base class; use fastopt.SGD, fastopt.Adam, ...")
        # precision (README "Precision"): the states' storage, and how new 16-bit params are rounded; fixed
        # for the optimizer's life (checked here, and per param group when its params arrive)
        rounding_options(0, stochastic_rounding, seed, 0, kahan)
        self._state_dtype = state_dtype
        self._kahan = bool(kahan)
        self._stochastic = bool(stochastic_rounding)
        self._seed = int(seed)
        capturable = as_bool("capturable", capturable)
        if capturable and spec.tensor_coefs is not None:
            raise ValueError(f"capturable=True: {spec.class_name} computes its per-tensor ratios on the host (one "
                             f"synchronisation per step), which a CUDA graph cannot hold")
        if capturable and stochastic_rounding:
            raise ValueError("capturable=True with stochastic_rounding=True: the rounding key changes every step, "
                             "and a captured step would replay one (kahan=True can be captured)")
        self._capturable = bool(capturable)
        self._capture = None     # capture.CapturedScalars, made at the first step
        self._capture_retired = []  # those of fewer groups (add_param_group): captured graphs may still read them
        self.clip_grad_norm = clip_grad_norm
        self.skip_nonfinite = skip_nonfinite
        self._backend_name = None
        self.backend = backend
        self.defaults = self._normalise_group(dict(defaults), "defaults", require_all=True)
        self._skipped_host = 0
        self._skipped_device = None  # a 0-d device counter when skipping runs on the GPU without sync
        self._sq_buffer = None       # device: the per-tensor sums of squares of every gradient
        self.param_groups: list[dict] = []
        self._group_steps: list[int] = []
        self._buckets: list[list[_Bucket]] = []
        self._params: list = []          # every param, in group order: the order of step(grads)
        self._group_params: list = []    # per group, the arrays its buckets hold (a swap in a group is seen)
        self._fixed = None               # (backend, per call (params, tail), prepare_fixed's result)
        self._hp_cache: list = []
        self._last_lr: list = []
        groups = as_param_groups(params)
        for group in groups:
            self.add_param_group(group)

    @property
    def state_dtype(self):
        """The state_dtype= the optimizer was built with (None: float32 for 16-bit params, else theirs)."""
        return self._state_dtype

    @property
    def kahan(self) -> bool:
        """Whether 16-bit params keep a Kahan compensation (the state "kahan_comp")."""
        return self._kahan

    @property
    def stochastic_rounding(self) -> bool:
        """Whether new 16-bit params are rounded stochastically (keyed by `seed`, the step, the index)."""
        return self._stochastic

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def clip_grad_norm(self) -> float | None:
        """Max global L2 norm of the gradients (None: no clipping); checked when set."""
        return self._clip_grad_norm

    @clip_grad_norm.setter
    def clip_grad_norm(self, value):
        self._clip_grad_norm = None if value is None else check_bound("clip_grad_norm", value)

    @property
    def backend(self) -> str | None:
        """The backend forced for every call (None: chosen from the arrays' type); checked when set."""
        return self._backend_name

    @backend.setter
    def backend(self, value):
        if value is not None:
            dispatch.check_backend_name(value)
        self._backend_name = value
        for buckets in getattr(self, "_buckets", ()):
            for bucket in buckets:
                bucket.backend_key = _UNSET  # resolved again at the next step

    @property
    def skip_nonfinite(self) -> bool:
        """Skip (and count) steps with a NaN/Inf gradient; checked when set."""
        return self._skip_nonfinite

    @skip_nonfinite.setter
    def skip_nonfinite(self, value):
        self._skip_nonfinite = as_bool("skip_nonfinite", value)

    @classmethod
    def _hyper_keys(cls) -> tuple:
        """Constructor / group keys in torch style: beta1 and beta2 appear as `betas`."""
        keys = cls.__dict__.get("_keys")
        if keys is None:
            keys = tuple("betas" if h.name == "beta1" else h.name for h in cls.spec.hypers if h.name != "beta2")
            cls._keys = keys
            cls._keys_but_lr = tuple(k for k in keys if k != "lr")
        return keys

    def _normalise_group(self, group: dict, where: str, require_all=False) -> dict:
        """Check the keys of a group (or of the defaults); turn betas into a tuple of two."""
        keys = set(self._hyper_keys())
        unknown = set(group) - keys - {"params"}
        if unknown:
            raise TypeError(f"{self.spec.class_name}: unknown hyperparameter(s) {', '.join(sorted(unknown))} "
                            f"in {where} (valid: {', '.join(self._hyper_keys())})")
        if "betas" in group:
            betas = group["betas"]
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
            group["betas"] = (betas[0], betas[1])
        if require_all:
            for k in self._hyper_keys():
                if group.get(k, None) is REQUIRED:
                    raise TypeError(f"{self.spec.class_name}: missing required argument {k!r}")
        return group

    def add_param_group(self, group: dict) -> None:
        """Add a group {"params": [...], hyperparameter: value, ...}; missing keys take the defaults.
        Its state is allocated now, on the params' device; its step counter starts at 0."""
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError("a param group must be a dict with a 'params' key")
        if self._buckets:
            self._adopt_swaps()  # the arrays in param_groups now are the ones a new param must not repeat
        group = self._normalise_group(dict(group), f"param group {len(self.param_groups)}")
        params = group["params"]
        if hasattr(params, "shape"):
            params = [params]
        elif not isinstance(params, (list, tuple)):
            try:
                params = list(params)
            except TypeError:
                raise TypeError(f"param group {len(self.param_groups)}: params must be a list of arrays, got "
                                f"{type(params).__name__}") from None
        params = list(params)
        if not params:
            raise ValueError(f"param group {len(self.param_groups)} has no params")
        start = len(self._params)
        devices = {array_device(p, f"params[{start + i}]") for i, p in enumerate(params)}
        # buffer objects without a dtype (memoryview, array.array) are kept as NumPy views of their memory
        params = [p if hasattr(p, "dtype") else as_numpy(p, f"params[{start + i}]") for i, p in enumerate(params)]
        if self._buckets:
            devices.add("device" if self._buckets[0][0].is_device else "host")
        if len(devices) > 1:
            raise TypeError("params: one optimizer updates arrays of one kind, all on the host or all on the GPU "
                            f"(got {', '.join(sorted(devices))} arrays)")
        known = {id(p) for p in self._params}
        for i, p in enumerate(params):
            if id(p) in known:
                raise ValueError(f"param group {len(self.param_groups)}: params[{start + i}] appears in more than "
                                 f"one place (each array may be optimised once)")
            known.add(id(p))
        full = dict(self.defaults)
        full.update(group)
        full["params"] = params
        hp = self._resolve_hp(full, 0)  # validates (a schedule is evaluated at count 0)
        hp, _ = self.spec.validate(hp, 1)
        # bucket by dtype, in order of first appearance
        by_dtype: dict = {}
        for i, p in enumerate(params):
            by_dtype.setdefault(p.dtype, []).append(i)  # numpy, cupy or torch dtype
        new_params = [([params[i] for i in local], [start + i for i in local]) for local in by_dtype.values()]
        self._check_params([(b.params, b.indices) for bs in self._buckets for b in bs] + new_params)
        buckets = []
        for (bucket_params, indices), (dtype, local) in zip(new_params, by_dtype.items()):
            states = self._new_states(bucket_params, hp, indices)
            is_device = array_device(bucket_params[0]) == "device"
            buckets.append(_Bucket(bucket_params, indices, local, states, dtype, is_device))
        self.param_groups.append(full)
        self._group_params.append(tuple(params))
        self._group_steps.append(0)
        self._buckets.append(buckets)
        self._params.extend(params)
        self._hp_cache.append(None)
        self._last_lr.append(hp["lr"])
        self._sq_buffer = None  # one slot per param: reallocated for the new count at the next step
        if self._capturable:
            if not buckets[0].is_device:
                raise ValueError("capturable=True is for GPU arrays (a step captured into a CUDA graph); these "
                                 "params are on the host")
            if self._capture is not None:  # one more group: a new set of device buffers at the next step
                self._group_steps[:-1] = self._capture.read_counts()
                self._capture_retired.append(self._capture)
                self._capture = None

    def _check_params(self, buckets):
        """Every param updatable in place (dtype, byte order, layout, writable) and no two sharing
        memory, across all buckets: buckets = [(params, indices), ...]."""
        checked = []
        for params, indices in buckets:
            be = backend_for(params, self.backend)
            checked.append(be.prepare_grads(params, "params", indices))
        if len(checked) > 1:
            be.check_disjoint(checked)

    def _state_options(self, hp):
        """The hyperparameters that decide which states exist or what they start with (the spec knows)."""
        return {name: hp[name] for name in self.spec.state_options}

    def _new_states(self, params, hp, indices=None) -> dict:
        """init_state for params of one dtype with this optimizer's precision options (state_dtype, kahan:
        a "kahan_comp" entry); ValueError naming the option when the params cannot take it (kahan and
        stochastic_rounding are for 16-bit params), before anything is kept."""
        label = f"params[{indices[0]}]" if indices else "params"
        if self._stochastic:
            p = params[0]
            dtype = device_param_dtype(p, label, "stochastic_rounding=True") if array_device(p, label) == "device" \
                else np.dtype(p.dtype)
            if not (dtype == np.float16 or dtype.name == "bfloat16"):
                raise ValueError(f"stochastic_rounding=True is for float16 or bfloat16 params; {label} has dtype "
                                 f"{dtype}")
        try:
            return init_state(self.spec.name, params, state_dtype=self._state_dtype, kahan=self._kahan,
                              **self._state_options(hp))
        except ValueError as e:  # init_state numbers the bucket's params from 0: name the optimizer's
            if indices:
                raise ValueError(str(e).replace("params[0]", label)) from None
            raise

    # ---- hyperparameters ----------------------------------------------------------------------

    def _resolve_hp(self, group: dict, count: int) -> dict:
        """The registry-named hyperparameters of a group for the update after `count` updates."""
        hp = {}
        for h in self.spec.hypers:
            if h.name == "beta1":
                hp["beta1"] = group["betas"][0]
            elif h.name == "beta2":
                hp["beta2"] = group["betas"][1]
            else:
                hp[h.name] = group[h.name]
        lr = hp["lr"]
        if _is_callable_lr(lr):
            hp["lr"] = lr(count)
        return hp

    def _hyperparameters(self, gi: int):
        """(hp, changed): validated hyperparameters of group gi for its next step, as Python floats.
        Validation of everything but the learning rate is cached while the group's values do not
        change (the per-step cost is a tuple comparison); the learning rate, which schedules change
        every step, is checked every step. `changed`: (key, hp) to commit with _commit_hp once the
        whole step is known to be valid (the group's kernel arguments are then rebuilt), else None."""
        group = self.param_groups[gi]
        spec = self.spec
        self._hyper_keys()
        try:
            key = tuple([group[k] for k in self._keys_but_lr])
            lr = group["lr"]
        except KeyError as e:
            raise ValueError(f"param group {gi} has no {e.args[0]!r}") from None
        with naming_group(gi, len(self.param_groups)):
            if _is_callable_lr(lr):
                lr = lr(self._group_steps[gi])
            cached = self._hp_cache[gi]
            if cached is not None and _same(cached[0], key):
                hp = dict(cached[1])
                hp["lr"] = spec.hypers[0].validate(lr)  # hypers[0] is lr for every optimizer
                return hp, None
            self._normalise_group(dict(group), f"param group {gi}")
            hp = self._resolve_hp(group, self._group_steps[gi])
            hp["lr"] = lr
            hp, _ = spec.validate(hp, self._group_steps[gi] + 1)
        return hp, (key, hp)

    def _commit_hp(self, gi, changed):
        """Adopt a group's changed hyperparameters (the step that checked them goes ahead)."""
        group = self.param_groups[gi]
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        self._hp_cache[gi] = changed

    @staticmethod
    def _adopt_call(bucket, tail, names):
        """Keep a kernel call planned for changed hyperparameters, with any state it allocated."""
        for name, arrays in zip(names[2:], tail):
            if arrays is not None:
                bucket.states.setdefault(name, arrays)
        bucket.tail, bucket.names = tail, names

    # ---- the step -----------------------------------------------------------------------------

    @property
    def capturable(self) -> bool:
        """Whether a step can be captured into a CUDA graph (the step's scalars chosen on the device)."""
        return self._capturable

    def refresh_capture(self) -> None:
        """capturable=True: re-base every group's precomputed scalars at its current step (outside a capture;
        a synchronisation), after steps ran past them (fastopt/capture.py); graphs keep working."""
        cap = self._capture
        if cap is None:
            return
        hps = [self._hp_cache[gi][1] if self._hp_cache[gi] else self._hyperparameters(gi)[0]
               for gi in range(len(self.param_groups))]
        cap.refresh(self.spec, hps, [group["lr"] for group in self.param_groups])
        self._group_steps[:] = cap.host_counts

    def _sync_capture(self):
        """capturable=True: the host's step counts from the device counters (steps replayed in graphs are
        counted there); RuntimeError when steps went past the precomputed scalars. A synchronisation."""
        if self._capture is not None:
            self._capture.check()
            self._group_steps[:] = self._capture.read_counts()

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient was NaN/Inf (reading it synchronises when counted on the GPU)."""
        self._sync_capture()
        if self._skipped_device is not None:
            counted = self._skipped_device
            if hasattr(counted, "copy_to_host"):  # Numba device array
                counted = counted.copy_to_host()
            return self._skipped_host + int(counted)
        return self._skipped_host

    def steps(self, group: int = 0) -> int:
        """Number of updates applied to param group `group` (capturable=True: read from the device)."""
        self._sync_capture()
        return self._group_steps[group]

    @property
    def params(self) -> list:
        """Every parameter, in the order `step(grads)` expects the gradients: the arrays in param_groups now
        (an array swapped into a group since the last step is checked and adopted here, as a step would)."""
        self._adopt_swaps()
        return list(self._params)

    def _grad_list(self, grads):
        if not isinstance(grads, (list, tuple)):
            if grads is None or isinstance(grads, (str, bytes, dict, numbers.Number)) or len(self._params) != 1:
                raise TypeError(f"grads must be a list of arrays (one per param, in the order of opt.params), "
                                f"got {type(grads).__name__}")
            grads = [grads]
        if len(grads) != len(self._params):
            raise ValueError(f"grads has {len(grads)} arrays but the optimizer has {len(self._params)} params")
        return grads

    @staticmethod
    def _bucket_grads(bucket, grads):
        r = bucket.contiguous_range
        if r is not None:
            if r[0] == 0 and r[1] == len(grads):
                return grads
            return grads[r[0]:r[1]]
        return [grads[i] for i in bucket.indices]

    def _gradient_scale(self, grads, plans, prepared):
        """(grad_scale, found_inf, skip_now) from one sum-of-squares pass over the gradients, which
        serves both clipping and the non-finite check. A backend that prepares once reads the grads of
        the prepared calls (checked already); the others get the grads again."""
        buckets = [b for bs in self._buckets for b in bs]
        if not any(b.is_device for b in buckets):
            # host: the per-array sums of squares, added in order like clip_by_global_norm does
            sq = []
            for (_, b, _, _, _), call in zip(plans, prepared):
                source = call if b.prepares_once else self._bucket_grads(b, grads)
                sq += b.backend.sumsq_per_tensor(source).tolist()
            total = math.sqrt(sum(sq))
            if self.skip_nonfinite and not math.isfinite(total):
                return None, None, True
            scale = clip_coefficient(total, self.clip_grad_norm) if self.clip_grad_norm is not None else None
            return scale, None, False
        # device: one guard launch on the per-tensor sums of squares, no host round trip; so every sum on one
        # device (each update call is on its own params' device: validate.check_arrays)
        be = self._backend(buckets[0])
        devices = [self._call_device(b, params) for _, b, params, _, _ in plans]
        other = next((i for i, d in enumerate(devices) if d[1] != devices[0][1]), None)
        if other is not None:
            raise ValueError(f"clip_grad_norm and skip_nonfinite on GPU arrays need every param on one device (one "
                             f"guard launch reads every gradient's sum of squares): params[{devices[other][0]}] "
                             f"is on device {devices[other][1]}, params[{devices[0][0]}] on device {devices[0][1]}")
        like = plans[0][1].device[0]  # on the calls' device (their first non-empty param's)
        sq = self._sq_buffer
        if sq is None:
            sq = self._sq_buffer = be.device_zeros(len(self._params), np.float64, like)
        start = 0
        for (_, b, _, _, _), call in zip(plans, prepared):
            n = len(b.params)
            source = call if b.prepares_once else self._bucket_grads(b, grads)
            b.backend.sumsq_per_tensor(source, out=sq[start:start + n])
            start += n
        counter = None
        if self.skip_nonfinite:
            if self._skipped_device is None:
                self._skipped_device = be.device_zeros(1, np.int64, like).reshape(())
            counter = self._skipped_device
        scale, found_inf = be.step_guard(sq, self.clip_grad_norm, self.skip_nonfinite, counter)
        return scale, found_inf, False

    def _call_device(self, bucket, params) -> tuple:
        """(flat index, device ordinal) of the param that decides a call's device: its first non-empty one (as
        validate.check_arrays takes it), asked of the backend once while it is the same array."""
        j = next((j for j, p in enumerate(params) if getattr(p, "size", 1)), 0)
        cached = bucket.device
        if cached is None or cached[0] is not params[j]:
            cached = bucket.device = (params[j], self._backend(bucket).device_ordinal(params[j]))
        return bucket.indices[j], cached[1]

    def _backend(self, bucket):
        """The bucket's backend module, resolved again only when a use_backend block changes it (the
        FASTOPT_BACKEND variable is read when it is resolved)."""
        key = dispatch.forced_backend()
        if bucket.backend_key is not key:
            bucket.backend = backend_for(bucket.params, self.backend)
            bucket.prepares_once = prepares_once(bucket.backend)  # asked once per resolution, not per step
            bucket.capturable = capturable_backend(bucket.backend)
            bucket.backend_key = key
        return bucket.backend

    def step(self, grads: Arrays) -> bool | None:
        """Apply one update with `grads` (a list of arrays in the order of `opt.params`; one array when
        there is a single param). Returns False when the step was skipped (skip_nonfinite and a
        NaN/Inf gradient), else True; on GPU arrays, where the skip is decided on the device without a
        host synchronisation, it returns None (read `skipped_steps`, which synchronises, to know).

        One validation phase comes first: every group's hyperparameters, every kernel call's arrays
        (params, grads, states: kind, dtype, byte order, shape, layout, writable) and the memory of all
        calls against each other; only then is anything written. On the CPU the params and states are
        checked once and then only re-checked cheaply (_prepare_step); the grads every step."""
        grads = self._grad_list(grads)
        buckets = self._buckets
        ngroups = len(buckets)
        swaps = self._swapped_params()
        hps, changes = zip(*[self._hyperparameters(gi) for gi in range(ngroups)])
        plans = []  # (group, bucket, its params, its state lists, argument names) of each kernel call
        for gi in range(ngroups):
            for bucket in buckets[gi]:
                params = bucket.params if swaps is None or swaps[gi] is None else [swaps[gi][j] for j in bucket.local]
                if changes[gi] is None:
                    tail, names = bucket.tail, bucket.names
                else:
                    tail, names = self._call_states(bucket, changes[gi][1])
                plans.append((gi, bucket, params, tail, names))
        if self._capturable:  # before the arrays' checks: a backend that cannot capture is the first thing to say
            for _, bucket, _, _, _ in plans:
                self._backend(bucket)  # resolves bucket.capturable
            capture_keys, capturing = self._check_capture(hps, changes)
        prepared, fixed = self._prepare_step(plans, grads)
        if len(plans) > 1:
            # the kernels' scalars of every call, once before the first call writes (each backend computes
            # them again in run(): a spec whose scalars raised for a later group would leave the earlier
            # groups written)
            for gi in {gi for gi, *_ in plans}:
                self.spec.scalars(hps[gi], self._group_steps[gi] + 1, 1.0)
        # valid: from here on the step goes ahead (or is skipped as a whole)
        # an optimizer without torch's per-param count (SGD) updates a state it creates mid-run (momentum set on
        # in a group) as at its first step (the buffer is the gradient), as torch does: {id: (group, bucket, names)}
        first = {}
        for gi, bucket, params, tail, names in plans:
            if changes[gi] is not None:
                created = [name for name, arrays in zip(names[2:], tail)
                           if arrays is not None and name not in bucket.states]
                if created and not self.spec.torch_step:
                    first[id(bucket)] = (gi, bucket, created)
                self._adopt_call(bucket, tail, names)
            bucket.params = params
        if swaps is not None:
            self._adopt_params(swaps)
        self._fixed = fixed
        for gi in range(ngroups):
            if changes[gi] is not None:
                self._commit_hp(gi, changes[gi])
        grad_scale = found_inf = None
        if self.clip_grad_norm is not None or self.skip_nonfinite:
            grad_scale, found_inf, skip = self._gradient_scale(grads, plans, prepared)
            if skip:
                for gi, bucket, created in first.values():  # made again (zero) by the step that runs, as torch
                    for name in created:                     # makes its buffer at the step that updates
                        del bucket.states[name]
                    self._hp_cache[gi] = None  # the next step plans the group's call again
                self._skipped_host += 1
                return False
        spec = self.spec
        rows = None
        if self._capturable:
            rows, found_inf = self._capture_rows(hps, found_inf, capture_keys)
        for (gi, bucket, _, _, _), call in zip(plans, prepared):
            hp, t = hps[gi], self._group_steps[gi] + 1
            run_t = 1 if id(bucket) in first else t  # the step the kernels see (SGD: its first-step variant)
            if rows is not None:  # the kernels read the step's scalars from the device; t picks the variant
                bucket.backend.run(call, spec, hp, rows.variant_step(gi, run_t, capturing), grad_scale,
                                   found_inf=found_inf, scalars_at=rows.row(gi))
            elif self._stochastic:  # keyed by (seed, the group's step): element i of a param gets its own bits
                skip = {} if found_inf is None else {"found_inf": found_inf}  # the GPU's device skip flag
                bucket.backend.run(call, spec, hp, run_t, grad_scale, stochastic=StochasticRounding(self._seed, t),
                                   **skip)
            elif found_inf is None:
                bucket.backend.run(call, spec, hp, run_t, grad_scale)
            else:  # the kernels read the device flag and return at once on a skipped step
                bucket.backend.run(call, spec, hp, run_t, grad_scale, found_inf=found_inf)
        for gi in range(ngroups):
            self._group_steps[gi] += 1
            self._last_lr[gi] = hps[gi]["lr"]
        return None if found_inf is not None else True

    def _check_capture(self, hps, changes):
        """capturable=True, in the validation phase: (each group's key of its rows, whether this step is
        being captured). Raises, before anything is written, when a bucket's backend cannot be captured
        (Numba: the arrays decide the backend at each step) or when a step inside a capture would need
        what a capture cannot do (capture.CapturedScalars.check_step)."""
        buckets = [b for bs in self._buckets for b in bs]
        for b in buckets:
            if not b.capturable:  # resolved by the caller
                raise TypeError(f"capturable=True needs a backend that CUDA graphs can capture (cupy); this "
                                f"step's arrays go to {b.backend.NAME!r}")
        keys = []
        for gi, group in enumerate(self.param_groups):
            lr = group["lr"]  # the group's other values: the key of its validated hyperparameters (_hp_cache)
            hp_key = (changes[gi] if changes[gi] is not None else self._hp_cache[gi])[0]
            keys.append((hp_key, lr if _is_callable_lr(lr) else hps[gi]["lr"]))
        cap = self._capture
        if cap is None:
            if buckets[0].backend.capturing(buckets[0].params[0]):
                raise RuntimeError(OUTSIDE_CAPTURE)
            return keys, False
        return keys, cap.check_step(keys, [self._group_steps[gi] + 1 for gi in range(len(keys))])

    def _capture_rows(self, hps, found_inf, keys):
        """capturable=True: (capture.CapturedScalars, the skip flag for the update kernels) after the launch
        that advances the device step counters and selects each group's row of scalars. The rows are made
        (host) when a group's values change, outside a capture (_check_capture made sure)."""
        cap = self._capture
        if cap is None:
            bucket = self._buckets[0][0]
            cap = self._capture = CapturedScalars(bucket.backend, bucket.params[0], len(self.param_groups),
                                                  self._group_steps)
        for gi, group in enumerate(self.param_groups):
            cap.ensure(gi, keys[gi], self.spec, hps[gi], group["lr"])
        return cap, cap.select(found_inf)

    def _prepare_step(self, plans, grads):
        """(prepared calls, fixed) for the planned kernel calls of a step; writes nothing.

        Where the backend prepares once (interface.PrepareOnceBackend: the host backends), the params
        and states of all calls are checked once by prepare_fixed and kept while each call's params list
        and state lists are the same objects (a swap in a group, a new state slot or another backend
        makes a new one); each step bind_grads then compares the arrays with what was checked (same
        memory, dtype, shape, contiguity, writability: a param made read-only or reshaped in place is
        seen, and re-checked in full) and checks the grads, including against the memory of every
        written array. Elsewhere every call is prepared every step and checked against the others."""
        bes = [self._backend(bucket) for _, bucket, _, _, _ in plans]
        grads_per_call = [self._bucket_grads(bucket, grads) for _, bucket, _, _, _ in plans]
        be = bes[0]
        if plans[0][1].prepares_once and all(b is be for b in bes):
            cached = self._fixed
            if not (cached is not None and cached[0] is be and len(cached[1]) == len(plans) and all(
                    params is p and len(tail) == len(t) and all(map(operator.is_, tail, t))
                    for (_, _, params, tail, _), (p, t) in zip(plans, cached[1]))):
                cached = (be, [(params, tail) for _, _, params, tail, _ in plans], be.prepare_fixed(
                    [((params, None) + tail, names, bucket.indices) for _, bucket, params, tail, names in plans]))
            return be.bind_grads(cached[2], grads_per_call), cached
        prepared = [b.prepare((params, g) + tail, names, bucket.indices)
                    for b, (_, bucket, params, tail, names), g in zip(bes, plans, grads_per_call)]
        if len(prepared) > 1:
            be.check_disjoint(prepared)
        return prepared, None

    def _swapped_params(self):
        """None while every group's params list holds the arrays its buckets hold (an identity check, a
        C-level loop per group), else per group None or its new arrays, checked for form and kind;
        adopted (_adopt_params) only when the step goes ahead. The new arrays themselves are checked
        like every param of a step (dtype, shape against the state, layout, writable, memory)."""
        swaps = None
        for gi, group in enumerate(self.param_groups):
            current, known = group.get("params"), self._group_params[gi]
            if type(current) is list and len(current) == len(known) and all(map(operator.is_, current, known)):
                continue
            if swaps is None:
                swaps = [None] * len(self.param_groups)
            swaps[gi] = self._swapped_group(gi, current, known)
        return swaps

    def _swapped_group(self, gi, current, known):
        if hasattr(current, "shape") or not isinstance(current, (list, tuple)):
            raise TypeError(f"param group {gi}: 'params' must be a list of arrays, got {type(current).__name__}")
        if len(current) != len(known):
            raise ValueError(f"param group {gi}: 'params' has {len(current)} arrays but the group has "
                             f"{len(known)} (the optimizer keeps state per param; add_param_group adds params)")
        start = sum(len(g) for g in self._group_params[:gi])
        kind = "device" if self._buckets[gi][0].is_device else "host"
        new = []
        for j, p in enumerate(current):
            if p is not known[j]:
                name = f"params[{start + j}]"
                if array_device(p, name) != kind:
                    raise TypeError(f"{name}: one optimizer updates arrays of one kind; this one's are on the {kind}")
                if not hasattr(p, "dtype"):  # buffer objects are kept as NumPy views, as add_param_group does
                    p = as_numpy(p, name)
            new.append(p)
        return new

    def _adopt_swaps(self) -> None:
        """Arrays swapped into param_groups since the last step, checked as a step checks params (the shape
        and dtype of the array each replaces, which its state has; updatable in place; no two sharing
        memory) and adopted: for what reads or writes the params outside a step (opt.params, and through
        it fastopt.save / load and state imports; train() / eval()). Nothing adopted when a check fails."""
        swaps = self._swapped_params()
        if swaps is None:
            return
        checked = []
        for gi, buckets in enumerate(self._buckets):
            for bucket in buckets:
                params = bucket.params if swaps[gi] is None else [swaps[gi][j] for j in bucket.local]
                for i, new, old in zip(bucket.indices, params, bucket.params):
                    if new is old:
                        continue
                    if tuple(new.shape) != tuple(old.shape):
                        raise ValueError(f"params[{i}] has shape {tuple(new.shape)}, expected {tuple(old.shape)} "
                                         f"(an array swapped into a param group replaces one of its shape and dtype)")
                    if new.dtype != old.dtype:
                        raise TypeError(f"params[{i}] has dtype {new.dtype}, expected {old.dtype} (an array "
                                        f"swapped into a param group replaces one of its shape and dtype)")
                checked.append((bucket, params))
        self._check_params([(params, bucket.indices) for bucket, params in checked])
        for bucket, params in checked:
            bucket.params = params
        self._adopt_params(swaps)

    def _adopt_params(self, swaps):
        """Keep the arrays swapped into the groups (their step went ahead)."""
        start = 0
        for gi, new in enumerate(swaps):
            n = len(self._group_params[gi])
            if new is not None:
                self._params[start:start + n] = new
                self._group_params[gi] = tuple(new)
                group = self.param_groups[gi]
                if type(group["params"]) is list:  # the same list object: a reference the caller holds stays live
                    group["params"][:] = new       # (buffer objects replaced by their NumPy views)
                else:
                    group["params"] = list(new)
            start += n

    def _call_states(self, bucket, hp):
        """(state lists, argument names) of the bucket's kernel call for these hyperparameters; a state
        not allocated yet is a new zero array here (kept by _adopt_call when the step goes ahead)."""
        def state_for(name):
            if name in bucket.states:
                return bucket.states[name]
            return self._new_states(bucket.params, hp)[name]

        tail, names = self.spec.plan_call(hp, state_for)
        if self._kahan:
            return with_kahan(tail, names, bucket.states["kahan_comp"])
        return tail, names

    def _plan(self, bucket, hp):
        """Fix the state lists and argument names of the bucket's kernel call for these hyperparameters."""
        bucket.tail, bucket.names = self._call_states(bucket, hp)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Does nothing, on purpose: this class keeps no gradients. Gradients are arguments of
        step(grads), computed by the caller for each step, so there is nothing to zero or accumulate.
        (It exists so that a loop written for torch.optim does not fail here; for torch's semantics,
        where step() reads p.grad and zero_grad() clears it, use fastopt.torch with torch tensors.)"""

    # ---- introspection ------------------------------------------------------------------------

    @property
    def last_lr(self) -> list:
        """The learning rate each group used in its last step (its initial value before any step)."""
        return list(self._last_lr)

    def state_arrays(self, index: int) -> dict:
        """State arrays of the param at flat position `index` (name -> the live array, not a copy)."""
        for buckets in self._buckets:
            for bucket in buckets:
                if index in bucket.indices:
                    j = bucket.indices.index(index)
                    return {name: arrays[j] for name, arrays in bucket.states.items()}
        raise IndexError(f"no param at index {index}")

    def __repr__(self):
        return groups_repr(self.spec.class_name, self.param_groups, self._hyper_keys())

    # ---- state: the public export / import that state dicts and checkpoints are built on ---------

    @classmethod
    def hyper_keys(cls) -> tuple:
        """The group / constructor keys, torch style (beta1 and beta2 appear as `betas`)."""
        return cls._hyper_keys()

    def export_state(self) -> OptimizerState:
        """The optimizer's state in registry terms (see OptimizerState): the live state arrays, not
        copies (state_dict() copies them to the host)."""
        spec = self.spec
        hps, lrs = [], []
        for gi, group in enumerate(self.param_groups):
            missing = [k for k in self._hyper_keys() if k not in group]
            if missing:  # the same words as a step's check
                raise ValueError(f"param group {gi} has no {missing[0]!r}")
            hp = {}
            for h in spec.hypers:
                if h.name in ("beta1", "beta2"):
                    hp[h.name] = group["betas"][h.name == "beta2"]
                else:
                    hp[h.name] = group[h.name]
            hps.append(hp)
            lr = group["lr"]
            lrs.append(lr(self._group_steps[gi]) if is_schedule(lr) else lr)
        states = {}
        for buckets in self._buckets:
            for bucket in buckets:
                for j, i in enumerate(bucket.indices):
                    states[i] = {name: bucket.states[name][j] for name in (*spec.states, "kahan_comp")
                                 if name in bucket.states}
        self._export_unmade(hps, states)
        self._sync_capture()
        return OptimizerState(optimizer=spec.name, hyperparameters=hps, steps=list(self._group_steps), lrs=lrs,
                              states=dict(sorted(states.items())), skipped_steps=self.skipped_steps)

    def _export_unmade(self, hps, states) -> None:
        """A state switched on between steps (amsgrad=True, RMSprop's centered or momentum set in param_groups)
        that the next step makes at its initial value, exported at that value (new arrays): the load refuses a
        group whose params lack a state its hyperparameters use, and the run resumes bit for bit. SGD's
        buffer, made from the next gradient (spec.unmade_states), stays absent."""
        spec = self.spec
        for gi, group_buckets in enumerate(self._buckets):
            if not self._group_steps[gi]:
                continue
            try:
                used = spec.active_states(hps[gi])
            except (TypeError, ValueError, KeyError):  # a bad value in the group: the next step names it
                continue
            for bucket in group_buckets:
                needed = [n for n, u in zip(spec.states, used) if u and n not in bucket.states]
                needed = [n for n in needed if n not in spec.unmade_states(needed, ())]
                if needed:
                    fresh = self._new_states(bucket.params, hps[gi])
                    for j, i in enumerate(bucket.indices):
                        states[i].update({n: fresh[n][j] for n in needed})

    def check_state(self, state: OptimizerState, params=None) -> "StatePlan":
        """Phase 1 of an import: check `state` (hyperparameters already validated by the spec, one step
        count per group, arrays per param) against this optimizer's arrays, and `params` (a list of arrays
        to restore, or None) against its params; allocate the state slots the new hyperparameters need.
        Writes nothing; CheckpointError (a ValueError) for arrays that do not fit. Returns the plan that
        apply_state writes."""
        spec = self.spec
        self._adopt_swaps()  # the arrays in param_groups now are the ones restored and checked
        if state.optimizer != spec.name:
            raise statedict.CheckpointError(f"the state is for {state.optimizer!r}, this optimizer is {spec.name!r}")
        if len(state.hyperparameters) != len(self.param_groups) or len(state.steps) != len(self.param_groups):
            raise statedict.CheckpointError(f"the state has {len(state.hyperparameters)} param groups but the "
                                            f"optimizer has {len(self.param_groups)}")
        buckets = []
        saved_dtypes = _saved_state_dtypes(state, self.params)
        for gi, group_buckets in enumerate(self._buckets):
            hp = state.hyperparameters[gi]
            active = [name for name, used in zip(spec.states, spec.active_states(hp)) if used]
            group_plans = []
            for bucket in group_buckets:
                # slots these hyperparameters need that the optimizer has not allocated (momentum set later)
                needed = [name for name in active if name not in bucket.states]
                saved = {name for i in bucket.indices for name in state.states.get(i, {})}
                dropped = []
                if self._capture is None:  # (a captured graph keeps its arrays)
                    # a state no param of the bucket has saved (SGD's momentum buffer set on but not yet
                    # updated) is made by the next step: dropped if allocated, not allocated if needed
                    dropped = spec.unmade_states([n for n in bucket.states if n in spec.states], saved)
                    # and a state the loaded hyperparameters do not use (amsgrad=False loaded into an optimizer
                    # built with amsgrad=True): not kept, exported or loaded, as torch's state has none
                    dropped += [n for n in bucket.states if n in spec.states and n not in active and n not in dropped]
                    unmade = spec.unmade_states(needed, saved)
                    needed = [name for name in needed if name not in unmade]
                new_slots = {}
                if needed:
                    fresh = self._new_states(bucket.params, hp)
                    new_slots = {name: fresh[name] for name in needed}
                slots = dict(bucket.states, **new_slots)
                sources = []
                for j, (i, p) in enumerate(zip(bucket.indices, bucket.params)):
                    arrays = {}
                    for name, a in state.states.get(i, {}).items():
                        # the dtype of the optimizer's own state array (float16 device params keep float32
                        # state); a slot the optimizer does not have is not loaded: checked against the param
                        target = slots.get(name)
                        live = target[j] if target is not None else None
                        if isinstance(a, QuantizedState) or isinstance(live, QuantizedState):
                            _check_int8_load(f"state of param {i}: {name}", a, p.shape)
                        else:
                            dtype = np.dtype(live.dtype) if live is not None else None
                            if dtype is not None and saved_dtypes is not None and _converts(
                                    getattr(a, "dtype", None), dtype, saved_dtypes.get(i)):
                                dtype = np.dtype(a.dtype)  # another state_dtype's state: converted by _load_into
                            check_array(f"state of param {i}: {name}", a, p.shape, dtype)
                        if target is not None:
                            arrays[name] = a
                    sources.append(arrays)
                group_plans.append((bucket, new_slots, sources, dropped))
            buckets.append(group_plans)
        pairs = []
        if params is not None:
            if not isinstance(params, (list, tuple)):
                raise statedict.CheckpointError(f"params must be a list of arrays, got {type(params).__name__}")
            if len(params) != len(self._params):
                raise statedict.CheckpointError(f"the checkpoint has {len(params)} params but the optimizer has "
                                                f"{len(self._params)}")
            for i, (a, p) in enumerate(zip(params, self._params)):
                target = writable_view(p, f"param {i}")
                check_array(f"param {i}", a, p.shape, target.dtype)
                if isinstance(target, np.ndarray) and not target.flags.writeable:
                    raise ValueError(f"param {i} is read-only: cannot restore it from the checkpoint")
                pairs.append((target, a))
        return StatePlan(self, state, buckets, pairs, self._next_lrs(state))

    def _next_lrs(self, state: OptimizerState) -> list[float]:
        """The lr of each group's next step: state.lrs's, or where that is None (or missing) the group's
        schedule at the restored step count, checked as any lr (CheckpointError)."""
        lrs = []
        for gi, hp in enumerate(state.hyperparameters):
            lr = state.lrs[gi] if gi < len(state.lrs) else None
            lrs.append(statedict.next_lr(gi, hp["lr"], state.steps[gi], self.spec.hypers[0]) if lr is None else lr)
        return lrs

    def apply_state(self, plan: "StatePlan") -> None:
        """Phase 2 of an import: write a plan made by check_state (copies into the optimizer's own arrays,
        on the params' device). Cannot fail on the data."""
        if not isinstance(plan, StatePlan) or plan.optimizer is not self:
            raise ValueError("apply_state takes the plan this optimizer's check_state returned")
        state = plan.state
        keys = self._hyper_keys()
        copies = []  # (state, param): states that start as a copy of their param (specs.PARAM), not saved
        for gi, live in enumerate(self.param_groups):
            hp = state.hyperparameters[gi]
            live.update({k: ((hp["beta1"], hp["beta2"]) if k == "betas" else hp[k]) for k in keys})
            self._hp_cache[gi] = None  # re-validated and re-planned at the next step
            self._group_steps[gi] = state.steps[gi]
            lr = plan.lrs[gi]
            self._last_lr[gi] = lr
            fills = self.spec.state_init(dict(hp, lr=lr))  # a fill may read lr (Rprop): the value, not a schedule
            fills["kahan_comp"] = 0.0  # a compensation not saved (a state dict without kahan=True) starts at zero
            for bucket, new_slots, sources, dropped in plan.buckets[gi]:
                for name in dropped:
                    del bucket.states[name]
                bucket.states.update(new_slots)
                for name, targets in bucket.states.items():
                    for j, arrays in enumerate(sources):
                        if name in arrays:
                            _load_into(targets[j], arrays[name])
                        elif fills[name] is PARAM:  # copied from the param once the params are restored
                            copies.append((targets[j], bucket.params[j]))
                        elif name not in new_slots:  # not saved (step 0, or unused): a new state's value
                            _fill(targets[j], fills[name])
        for target, a in plan.params:
            copy_into(target, a)
        for target, p in copies:
            copy_param(target, p)
        if state.skipped_steps is not None:
            self._skipped_host = state.skipped_steps
            self._skipped_device = None
        if self._capture is not None:
            self._capture.set_counts(self._group_steps)

    # state_dict / load_state_dict / torch conversion: the layout lives in fastopt/statedict.py
    def __getstate__(self):
        """Pickling and copy.deepcopy (as torch.optim's optimizers allow): everything but the backends' cached
        preparation of the kernel calls, which the next step makes again (it holds modules)."""
        state = dict(self.__dict__)
        state["_fixed"] = None
        return state

    def state_dict(self) -> dict:
        return statedict.state_dict(self)

    def load_state_dict(self, state_dict: dict) -> None:
        statedict.load_state_dict(self, state_dict)

    def torch_state_dict(self) -> dict:
        """This optimizer's state as a torch.optim state dict (tensors on the CPU), ready for
        `torch.optim.<Class>(params).load_state_dict(...)`."""
        return statedict.to_torch_state_dict(self)

    def load_torch_state_dict(self, state_dict: dict, step=None) -> None:
        """Load the state dict of the matching torch.optim optimizer (same params in the same order).
        `step`: the update count of SGD, whose torch state has none (default: 1 with momentum buffers,
        else 0); the other optimizers take torch's."""
        statedict.from_torch_state_dict(self, state_dict, step)


def _check_int8_load(what, a, shape) -> None:
    """A saved state loaded into or from 8-bit state (state_dtype="int8"): a QuantizedState with codes
    uint8[shape] and ceil(size / 256) float32 scales, or a float array of the param's shape (quantized
    when applied); CheckpointError otherwise. Writes nothing."""
    if isinstance(a, QuantizedState):
        check_array(f"{what} (8-bit codes)", a.codes, shape, np.dtype(np.uint8))
        blocks = quant_blocks(int(np.prod(shape, dtype=np.int64)))
        if tuple(np.shape(a.absmax)) != (blocks,):
            raise statedict.CheckpointError(f"{what}_absmax has shape {tuple(np.shape(a.absmax))}, expected "
                                            f"({blocks},) (one scale per 256 elements)")
        return
    check_array(what, a, shape, None)
    if np.dtype(a.dtype).kind != "f" and np.dtype(a.dtype).name != "bfloat16":
        raise statedict.CheckpointError(f"{what} has dtype {np.dtype(a.dtype).name}, expected a float array to "
                                        f"quantize into 8-bit state")


def _load_into(dst, src) -> None:
    """A saved state copied into a live one (on the live one's device): as it is, or converted between 8-bit and
    float state (quantized as precision.QuantizedState.store does; dequantized to float32, then the live dtype)."""
    if isinstance(dst, QuantizedState):
        if isinstance(src, QuantizedState):
            copy_into(dst.codes, np.asarray(to_host(src.codes), dtype=np.uint8))
            copy_into(dst.absmax, np.asarray(to_host(src.absmax), dtype=np.float32))
        else:
            _store_quantized(dst, np.asarray(as_numpy(src, "state"), dtype=np.float32).reshape(dst.shape))
    elif isinstance(src, QuantizedState):
        host = QuantizedState(to_host(src.codes), to_host(src.absmax), src.signed)
        copy_into(dst, host.dequantize().astype(np.dtype(dst.dtype)))
    elif np.dtype(src.dtype) != np.dtype(dst.dtype):  # float32 / bfloat16 / float16 state of another state_dtype
        copy_into(dst, np.asarray(to_host(src)).astype(np.dtype(dst.dtype)))  # rounded to nearest even, as torch
    else:
        copy_into(dst, src)


_CONVERTIBLE = ("float32", "bfloat16", "float16")  # state_dtype='s float dtypes


def _saved_state_dtypes(state: OptimizerState, params) -> dict | None:
    """Per param number, the dtype its float state was saved in, when the state dict is consistent: every float
    state array (not 8-bit state, not kahan_comp, which is the param's dtype) of the dtype its state_dtype gives
    (the dict's declared state_dtype, None: float32 for 16-bit params, else theirs; a state dict of an older
    fastopt, which does not declare one: the one dtype all its float state arrays share). None otherwise: a
    damaged state dict (exp_avg in bfloat16 beside exp_avg_sq in float32), whose arrays load only as they are."""
    names = {}
    for i, arrays in state.states.items():
        for name, a in arrays.items():
            if name != "kahan_comp" and not isinstance(a, QuantizedState):
                try:
                    names.setdefault(i, set()).add(np.dtype(a.dtype).name)
                except (AttributeError, TypeError):
                    return None  # (not an array: check_array names it)
    if state.state_dtype_declared:
        def want(i):
            if state.state_dtype is not None:
                return state.state_dtype
            dtype = params[i].dtype if 0 <= i < len(params) else None
            return "float32" if dtype is not None and is_16bit(dtype) else getattr(np.dtype(dtype), "name", None)
        out = {i: want(i) for i in names}
    else:
        shared = set().union(*names.values()) if names else set()
        if len(shared) != 1:
            return None
        out = dict.fromkeys(names, shared.pop())
    return out if all(found == {out[i]} for i, found in names.items()) else None


def _converts(saved, live, declared) -> bool:
    """Whether a saved float state of dtype `saved` loads converted into a live one of dtype `live`: it is of
    the dtype its consistent state dict saved it in (`declared`, _saved_state_dtypes), and both are among
    state_dtype='s float dtypes (float32, bfloat16, float16), as fastopt.torch and torch state dicts load."""
    try:
        saved = np.dtype(saved)
    except TypeError:
        return False
    return saved != live and saved.name == declared and {saved.name, np.dtype(live).name} <= set(_CONVERTIBLE)


def _store_quantized(dst: QuantizedState, values) -> None:
    """Quantize float32 host `values` into the 8-bit state dst, whose arrays may be on a device."""
    codes, absmax = quantize_blockwise(values, dst.signed)
    copy_into(dst.codes, codes.reshape(dst.shape))
    copy_into(dst.absmax, absmax)


def _fill(dst, value: float) -> None:
    """dst[...] = value on dst's own device (a state array restored to its starting value)."""
    if isinstance(dst, QuantizedState):  # 8-bit state: the value quantized
        _store_quantized(dst, np.full(dst.shape, value, np.float32))
        return
    if value == 0.0:
        zero_fill(dst)
    else:
        copy_into(dst, np.full(tuple(dst.shape), value, np.dtype(dst.dtype)))


class StatePlan:
    """What Optimizer.apply_state will write (made by Optimizer.check_state; opaque to callers)."""

    __slots__ = ("optimizer", "state", "buckets", "params", "lrs")

    def __init__(self, optimizer, state, buckets, params, lrs):
        self.optimizer, self.state, self.buckets, self.params, self.lrs = optimizer, state, buckets, params, lrs


# ---------------------------------------------------------------------------------------------------
# The generated classes
# ---------------------------------------------------------------------------------------------------

class TrainEval(Modes):
    """Mixin of the Optimizer subclasses with spec.train_eval (schedule-free; fastopt/train_eval.py): one mode for
    the optimizer (export_state / apply_state carry it); each switch is one fused multi-tensor lerp per group
    and dtype."""

    _fastopt_train_mode = True  # the class default: an optimizer starts in train mode

    @property
    def train_mode(self) -> bool:
        """True between train() (or construction) and eval()."""
        return self._fastopt_train_mode

    def _groups_in_mode(self, train: bool) -> list:
        return list(range(len(self.param_groups))) if self._fastopt_train_mode == train else []

    def _set_mode(self, groups, train: bool) -> None:
        self._fastopt_train_mode = train

    def _group_weights(self, weight) -> list:
        return [weight(self._hyperparameters(gi)[0]) for gi in range(len(self.param_groups))]

    def _move(self, state, weights) -> None:
        from fastopt.averaging import lerp_all_
        self._adopt_swaps()  # the arrays in param_groups now are the ones moved
        # every group's and dtype's call checked before the first param moves (a read-only param of a later
        # group left the earlier groups at x and the mode at train)
        lerp_all_([(bucket.params, zs, weights[gi], bucket.indices)
                   for gi, buckets in enumerate(self._buckets) for bucket in buckets
                   # no z yet: no step taken, y == z == x (the package skips such params too)
                   for zs in [bucket.states.get(state)] if zs is not None],
                  ("params", state), backend=self.backend)

    def step(self, grads):
        self._check_train_mode()
        return super().step(grads)

    def export_state(self):
        state = super().export_state()
        state.train_mode = self._fastopt_train_mode
        return state

    def apply_state(self, plan) -> None:
        super().apply_state(plan)
        if plan.state.train_mode is not None:  # the saved params are at the saved mode's point
            self._fastopt_train_mode = plan.state.train_mode


def _make_class(spec: OptimizerSpec):
    """A subclass of Optimizer with torch.optim's constructor signature for this optimizer: params, then
    torch's positional arguments in torch's order (spec.positional_hypers: fastopt.SGD(p, 0.1, 0.9) means
    momentum=0.9, as in torch; only lr where torch has no such class), everything else keyword-only
    (torch's keyword-only arguments, and fastopt's clip_grad_norm=, skip_nonfinite=, backend=)."""
    if spec.hypers[0].name != "lr":  # Optimizer._hyperparameters checks the lr as hypers[0]
        raise TypeError(f"{spec.name}: the first hyperparameter of a spec must be lr")
    args, defaults, pairs = {}, {}, []
    for h in spec.hypers:
        if h.name == "beta2":
            continue
        if h.name == "beta1":
            beta2 = next(x for x in spec.hypers if x.name == "beta2")
            defaults["_d_betas"] = (h.default, beta2.default)
            args["betas"] = "betas=_d_betas"
            pairs.append("'betas': betas")
            continue
        if h.default is REQUIRED:
            args[h.name] = f"{h.name}=_REQUIRED"
        else:
            defaults[f"_d_{h.name}"] = h.default
            args[h.name] = f"{h.name}=_d_{h.name}"
        pairs.append(f"{h.name!r}: {h.name}")
    positional = [args[name] for name in spec.positional_hypers]
    keyword = [arg for name, arg in args.items() if name not in spec.positional_hypers]
    src = (f"def __init__(self, params, {', '.join(positional)}, *, {', '.join(keyword + [''])}clip_grad_norm=None, "
           f"skip_nonfinite=False, backend=None, state_dtype=None, kahan=False, stochastic_rounding=False, seed=0, "
           f"capturable=False):\n"
           f"    _Optimizer.__init__(self, params, {{{', '.join(pairs)}}}, clip_grad_norm=clip_grad_norm, "
           f"skip_nonfinite=skip_nonfinite, backend=backend, state_dtype=state_dtype, kahan=kahan, "
           f"stochastic_rounding=stochastic_rounding, seed=seed, capturable=capturable)\n")
    namespace = {"_Optimizer": Optimizer, "_REQUIRED": REQUIRED, "Iterable": Iterable, "Schedule": Schedule, **defaults}
    exec(compile(src, f"<fastopt.optim.{spec.class_name}>", "exec"), namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{spec.class_name}.__init__"
    init.__annotations__ = {"params": "Iterable", "lr": "float | Schedule",
                            **{h.name: "bool" if h.kind == "bool" else "float" for h in spec.hypers[1:]},
                            "clip_grad_norm": "float | None", "skip_nonfinite": "bool", "backend": "str | None",
                            "state_dtype": "str | None", "kahan": "bool", "stochastic_rounding": "bool", "seed": "int",
                            "capturable": "bool"}
    if "beta1" in init.__annotations__:
        del init.__annotations__["beta1"], init.__annotations__["beta2"]
        init.__annotations__["betas"] = "tuple[float, float]"
    doc = [spec.summary, "",
           f"Stateful form of fastopt.{spec.function_name}; see fastopt.optim for param groups, schedules,",
           "clip_grad_norm=, skip_nonfinite=, state_dict().", "", "Hyperparameters (per group):"]
    for h in spec.hypers:
        default = "required" if h.default is REQUIRED else f"default {h.default!r}"
        name = {"beta1": "betas[0]", "beta2": "betas[1]"}.get(h.name, h.name)
        doc.append(f"    {name}: {h.doc} ({default}).")
    doc += ["    lr may be a schedule: a callable (number of updates applied so far) -> lr.",
            "Options: clip_grad_norm (max global L2 norm, fused into the update), skip_nonfinite (skip",
            "    steps with a NaN/Inf gradient, counted in skipped_steps), backend (force one).",
            "Precision (README \"Precision\"; see fastopt.init_state and the *_step docstrings): state_dtype",
            "    (\"float32\", \"bfloat16\", \"float16\" or the params' dtype), kahan=True (16-bit params: a",
            "    Kahan compensation, the state \"kahan_comp\"), stochastic_rounding=True with seed= (16-bit params:",
            "    the bits of (seed, the group's step, the element's index in its param)).",
            "capturable=True (GPU, CuPy): the step's scalars chosen on the device, so that a CUDA graph of step()",
            "    replays every step with its own bias corrections and schedule (fastopt/capture.py)."]
    if spec.torch_class:
        doc.append(f"Matches torch.optim.{spec.torch_class}.")
    doc += ["", "Update rule (per element):", ""] + ["    " + line for line in spec.rule.strip("\n").splitlines()]
    # spec.train_eval (schedule-free): train()/eval() and a step() that refuses eval mode (fastopt/train_eval.py)
    bases = (TrainEval, Optimizer) if spec.train_eval else (Optimizer,)
    cls = type(spec.class_name, bases, {"spec": spec, "__init__": init, "__doc__": "\n".join(doc),
                                                "__module__": __name__})
    return cls


for _spec in REGISTRY.values():
    globals()[_spec.class_name] = _make_class(_spec)
del _spec
