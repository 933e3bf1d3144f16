"""Constructor arguments and param-group hyperparameters of the fastopt.torch classes.

Everything comes from the registry (fastopt/specs.py) and, where torch has the optimizer, from
torch.optim's own class: the group keys and the defaults of torch's own flags (foreach, fused,
capturable, differentiable, ...) are read from an instance of the torch class, so param_groups and
state dicts have exactly torch's layout. `betas` stands for the registry's beta1/beta2.
"""
from __future__ import annotations

import inspect
import math
import numbers

import torch

from fastopt.specs import REQUIRED, OptimizerSpec, as_bool, class_taking, saved_count, shown

# torch flags the fastopt kernels have no use for (accepted, stored, ignored) or cannot honour (rejected)
IGNORED_FLAGS = {"foreach": None, "fused": None}
REJECTED_FLAGS = {"capturable": "CUDA-graph capture", "differentiable": "autograd through the optimizer step"}
# fastopt's own options, keyword-only, per optimizer (not per group)
EXTRAS = {"clip_grad_norm": None, "skip_nonfinite": False, "state_dtype": None, "kahan": False,
          "stochastic_rounding": False, "seed": 0}


def _tuple_of(spec: OptimizerSpec) -> dict:
    """registry hyperparameter -> the torch tuple key holding it (betas, Rprop's etas and step_sizes)."""
    return {name: key for key, names in spec.torch_groups.items() for name in names}


def torch_class(spec: OptimizerSpec):
    return None if spec.torch_class is None else getattr(torch.optim, spec.torch_class)


def group_defaults(spec: OptimizerSpec) -> dict:
    """The keys of a param group (without "params") and their defaults, in torch's order where torch has
    the optimizer: registry hyperparameters (tuples such as betas where torch has them), then torch's
    own flags."""
    ours: dict = {}
    tuple_of = _tuple_of(spec)
    defaults = {h.name: h.default for h in spec.hypers}
    for h in spec.hypers:
        key = tuple_of.get(h.name)
        if key is None:
            ours[h.name] = h.default
        elif key not in ours:
            ours[key] = tuple(defaults[n] for n in spec.torch_groups[key])
    klass = torch_class(spec)
    if klass is None:
        return ours
    probe = _torch_instance(klass)  # torch's defaults: its exact group layout
    out = {}
    for key, value in probe.defaults.items():
        mine = ours.pop(key, value)
        # torch's own default where it is the same value: torch writes weight_decay=0 (an int), so the groups
        # equal torch's, types included
        same = mine is not REQUIRED and isinstance(mine, bool) == isinstance(value, bool) and mine == value
        out[key] = value if same else mine
    out.update(ours)  # registry options torch lacks (none today)
    return out


def positional_names(spec: OptimizerSpec) -> tuple[str, ...]:
    """Torch's positional arguments after params (`betas` for beta1/beta2); only lr where torch has no
    such class."""
    return tuple(spec.torch_positional) if spec.torch_positional is not None else ("lr",)


def signature(spec: OptimizerSpec) -> inspect.Signature:
    """The constructor's signature: params, torch's positional arguments in torch's order, then every
    other group key, torch's flags and fastopt's extras, keyword-only."""
    defaults = group_defaults(spec)
    klass = torch_class(spec)
    # torch's flags where torch's class takes them (torch.optim.RMSprop has no fused=: a TypeError there and
    # here); every one where torch has no such class
    takes = inspect.signature(klass).parameters if klass is not None else None
    for flag, value in {**IGNORED_FLAGS, **{k: False for k in REJECTED_FLAGS}}.items():
        if takes is None or flag in takes:
            defaults.setdefault(flag, value)
    P = inspect.Parameter
    params = [P("params", P.POSITIONAL_OR_KEYWORD)]
    positional = positional_names(spec)
    for name in positional:
        value = defaults[name]
        params.append(P(name, P.POSITIONAL_OR_KEYWORD, default=P.empty if value is REQUIRED else value))
    for name, value in defaults.items():
        if name not in positional and name not in spec.torch_group_flags:  # (fixed: not torch's argument)
            params.append(P(name, P.KEYWORD_ONLY, default=P.empty if value is REQUIRED else value))
    params += [P(name, P.KEYWORD_ONLY, default=value) for name, value in EXTRAS.items()]
    return inspect.Signature(params)


_TUPLE_KEYS: dict = {}


def constructor_tuples(spec: OptimizerSpec) -> tuple[str, ...]:
    """The tuple keys (betas, etas, ...) that the constructor stores as tuples when given lists: those torch's
    own constructor converts (Adam's betas; NAdam keeps a list), read from an instance of torch's class; all of
    them where torch has no such class, as the NumPy classes do."""
    known = _TUPLE_KEYS.get(spec.name)
    if known is None:
        klass = torch_class(spec)
        defaults = group_defaults(spec)
        known = tuple(key for key in spec.torch_groups if klass is None or isinstance(
            _torch_instance(klass, **{key: list(defaults[key])}).defaults[key], tuple))
        _TUPLE_KEYS[spec.name] = known
    return known


def as_constructor_tuple(value):
    """A tuple key's value as torch's constructor stores it (Adam: tuple(map(_to_scalar, betas)) of any sequence,
    a NumPy array or a 2-element tensor included; a 1-element tensor squeezed to 0-d); a string or a number is
    left for registry_hp's TypeError."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        return value
    return tuple(v.squeeze() if isinstance(v, torch.Tensor) and v.dim() != 0 else v for v in value)


def _plain(name, value):
    """A hyperparameter value as given, with a one-element tensor read as a number (torch allows a
    tensor lr and tensor betas); torch's words for any other tensor ("Tensor lr must be 1-element")."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        return value.item()
    return value


_TORCH_ARGUMENTS: dict = {}  # spec name -> the names torch's constructor takes


def check_as_torch(spec: OptimizerSpec, arguments: dict) -> None:
    """torch.optim's own constructor, on a stand-in param, with the constructor arguments torch takes, as given:
    whatever torch refuses is refused here with torch's exception, word for word, its rules between arguments
    included (Adam: a tensor lr with foreach=True, betas of a float and a tensor). Nothing where torch has no
    such class; fastopt's own (stricter) checks follow in registry_hp. The stand-in is float64, so a value that
    only the params' own dtype could refuse is not refused here (Adagrad's initial_accumulator_value=1e300, which
    torch fills into float64 params' state and refuses for float32 ones when it makes the state)."""
    klass = torch_class(spec)
    if klass is None:
        return
    taken = _TORCH_ARGUMENTS.get(spec.name)
    if taken is None:
        taken = _TORCH_ARGUMENTS[spec.name] = frozenset(inspect.signature(klass).parameters)
    given = {k: v for k, v in arguments.items() if k in taken and k != "params"}
    # (no warnings.catch_warnings: it resets the registry of warnings already shown, and torch's constructors
    # warn about nothing a single stand-in param could trigger)
    _torch_instance(klass, **given)


def _torch_instance(klass, **arguments):
    """torch's class on one stand-in param, a CPU float64 tensor (not the default device or dtype): its
    defaults, the conversions and the checks of its constructor, independent of the user's torch settings."""
    return klass([torch.zeros(1, dtype=torch.float64, device="cpu", requires_grad=True)], **arguments)


def check_flags(group: dict) -> None:
    """ValueError for a torch flag set that fastopt cannot honour."""
    for flag, what in REJECTED_FLAGS.items():
        if group.get(flag):
            raise ValueError(f"{flag}=True is not supported by fastopt.torch ({what}); use torch.optim for it")


def check_listed_once(param_groups) -> None:
    """ValueError for a param with a grad listed twice: in one group (torch.optim warns when the group is added,
    then updates it twice a step) or in two (torch refuses it there; an edit of param_groups can still do it). A
    fused step would read it after writing it: refused at the step, before anything is written, naming both
    places. (Without a grad it is skipped, as by torch.)"""
    params = [p for group in param_groups for p in group["params"]]
    if len(set(map(id, params))) == len(params):
        return
    first = {}
    for gi, group in enumerate(param_groups):
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            where = f"param_groups[{gi}]['params'][{i}]"
            seen = first.setdefault(id(p), where)
            if seen is not where:
                raise ValueError(f"{where} is the param already listed as {seen}: list each param once "
                                 "(torch.optim warns of duplicate parameters and updates such a param twice a step; "
                                 "a fused step cannot)")


def registry_hp(spec: OptimizerSpec, group: dict, step: int = 1) -> dict:
    """The group's hyperparameters in registry terms, checked (Python floats and bools); ValueError /
    TypeError with torch's message and nothing changed otherwise."""
    check_flags(group)
    for key, fixed in spec.torch_group_flags.items():
        if key in group and _plain(key, group[key]) != fixed:
            other = class_taking(spec, key)
            raise ValueError(f"{key}={shown(group[key])} does not fit fastopt.torch.{spec.class_name}, where it "
                             f"is always {fixed}" + (f"; use fastopt.torch.{other}" if other else ""))
    tuple_of = _tuple_of(spec)
    raw = {}
    for h in spec.hypers:
        if h.name in tuple_of:
            continue
        if h.name not in group:
            raise ValueError(f"param group has no {h.name!r}")
        raw[h.name] = _plain(h.name, group[h.name])
        if h.kind == "bool" and type(raw[h.name]) is int and raw[h.name] in (0, 1):
            raw[h.name] = bool(raw[h.name])  # torch takes nesterov=1 (a config file's 0/1) as a flag
        if raw[h.name] is REQUIRED:
            raise TypeError(f"{h.name} is required")
    hypers = {h.name: h for h in spec.hypers}
    for key, names in spec.torch_groups.items():
        given = group.get(key)
        if not isinstance(given, (tuple, list)) or len(given) != len(names):
            raise TypeError(f"{key} must be a tuple of {len(names)} floats {tuple(names)}, got {shown(given)}")
        for i, (name, value) in enumerate(zip(names, given)):
            value = _plain(f"{key}[{i}]", value)
            if key != "betas":
                raw[name] = value  # checked below with the spec's own check (torch's words for Rprop's etas)
                continue
            try:
                raw[name] = hypers[name].validate(value)
            except ValueError:
                raise ValueError(f"Invalid beta parameter at index {i}: {value}") from None
    try:
        hp, _ = spec.validate(raw, step)
    except ValueError as e:
        # the registry's message for a torch tuple's members or a rule between values is torch's words, then
        # the names or values in parentheses (Rprop: "Invalid eta values: 1.0, 1.2 (etaminus must be ...)";
        # SGD: "Nesterov momentum requires ... (momentum=0.0, dampening=0.0)"); torch's class says torch's words
        text = str(e)
        head, _, tail = text.partition(" (")
        members = [n for key, names in spec.torch_groups.items() if key != "betas" for n in names]
        if tail and (any(n in tail for n in members) or any(tail.startswith(f"{h.name}=") for h in spec.hypers)):
            raise ValueError(head) from None
        raise
    return hp


def check_extras(clip_grad_norm, skip_nonfinite):
    """fastopt.torch's clip_grad_norm (a finite number > 0, or None) and skip_nonfinite (a bool), checked."""
    if clip_grad_norm is not None:
        if not is_real(clip_grad_norm) or not math.isfinite(clip_grad_norm) or clip_grad_norm <= 0:
            raise ValueError(f"Invalid clip_grad_norm: {shown(clip_grad_norm)} (a finite number > 0, or None)")
        clip_grad_norm = float(clip_grad_norm)
    return clip_grad_norm, as_bool("skip_nonfinite", skip_nonfinite)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def extra_state_value(spec: OptimizerSpec, name: str, bucket) -> float:
    """The value torch stores for torch_extra_state `name` after a bucket's step (fastopt.torch.plan.Bucket:
    its group, hp, step and carried values): spec.torch_carry's or torch_extra_state's, stored as torch does
    (stored_value); for the names in spec.torch_as_tensor with a Tensor lr, computed from the tensor (in its
    dtype, as torch's expression of it)."""
    hp, lr = bucket.hp, bucket.group.get("lr")
    if name in spec.torch_as_tensor and isinstance(lr, torch.Tensor):
        hp = dict(hp, lr=lr.detach())
    carry = spec.torch_carry.get(name)
    value = carry(hp, bucket.step, bucket.carried[name]) if carry else spec.torch_extra_state[name](hp, bucket.step)
    return stored_value(spec, name, value)


def stored_value(spec: OptimizerSpec, name: str, value):
    """A torch_extra_state value as torch stores it: through torch.as_tensor for the names in
    spec.torch_as_tensor (a Python float in the default dtype; a tensor, computed from a Tensor lr, in its own),
    else as it is (the state tensor's dtype rounds it)."""
    if isinstance(value, torch.Tensor):
        return value.item()
    return torch.tensor(float(value)).item() if name in spec.torch_as_tensor else value


def check_saved_state(state_dict, tensors_only: bool = False) -> None:
    """The per-param entries of a state dict about to be loaded, before torch replaces anything: each a dict, its
    "step" a count (a 1-element real tensor or a number within float range: torch converts it after the state
    was swapped in, so None, a string or 10**400 failed there or at the next step, with the state replaced);
    with tensors_only, every other value a tensor (the composite classes' state). Anything not a state dict at
    all is left to torch's own errors."""
    saved = state_dict.get("state") if isinstance(state_dict, dict) else None
    if not isinstance(saved, dict):
        return
    for pid, entry in saved.items():
        where = f"state_dict['state'][{pid!r}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a dict of the param's state, got {type(entry).__name__}")
        if "step" in entry:
            step = entry["step"]
            if hasattr(step, "shape") and not isinstance(step, (torch.Tensor, numbers.Real)):
                # a NumPy/CuPy array: torch's load iterates over it (TypeError deep inside torch)
                raise TypeError(f"{where}['step'] must be a count (a number or a 1-element real tensor), got a "
                                f"{type(step).__name__}")
            saved_count(step, f"{where}['step']")
        if tensors_only:
            for key, value in entry.items():
                if key != "step" and not isinstance(value, torch.Tensor):
                    raise TypeError(f"{where}[{key!r}] must be a tensor, got {shown(value)} ({type(value).__name__})")
