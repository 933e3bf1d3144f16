"""The functional API: one `<name>_step` per registry entry, generated from fastopt/specs.py.

Each function validates the hyperparameters (spec.validate), picks the backend from the arrays' type
(backends/dispatch.py) and hands over; the backend validates the arrays and updates them in place.
Nothing is written before every check has passed.
"""
from __future__ import annotations

from fastopt.array_types import Arrays, Scalar
from fastopt.backends.dispatch import backend_for, check_empty_call
from fastopt.specs import REGISTRY, REQUIRED, OptimizerSpec

__all__ = [spec.function_name for spec in REGISTRY.values()] + ["init_state", "apply_update"]


def apply_update(spec: OptimizerSpec, params, grads, states: tuple, hp: dict, step=1, grad_scale=None,
                 backend=None):
    """Validate, dispatch and run one update. `states` holds one entry per spec.states slot."""
    hp, step = spec.validate(hp, step)
    given = dict(zip(spec.states, states))

    def state_for(name):
        if given[name] is None:
            raise ValueError(f"{spec.function_name}: this configuration needs the state {name!r} "
                             f"(see fastopt.init_state({spec.name!r}, params, ...))")
        return given[name]

    tail, names = spec.plan_call(hp, state_for)
    arrays = (params, grads) + tail
    be = backend_for(params, backend)
    if be is None:  # empty list of params: nothing to update, but the call must still be well formed
        check_empty_call(arrays, names)
        return None
    be.step(spec, arrays, names, hp, step, grad_scale)
    return None


def _annotations(spec: OptimizerSpec) -> dict:
    """The generated function's annotations (strings, as under `from __future__ import annotations`)."""
    out = {"params": "Arrays", "grads": "Arrays"}
    out.update({s: "Arrays | None" if s in spec.optional_states else "Arrays" for s in spec.states})
    if spec.uses_step:
        out["step"] = "int"
    out.update({h.name: "bool" if h.kind == "bool" else "float" for h in spec.hypers})
    out.update({"grad_scale": "Scalar | None", "backend": "str | None", "return": "None"})
    return out


def _generate(spec: OptimizerSpec):
    """Build `<name>_step` with its real signature (introspection and IDEs see every argument)."""
    array_args = ["params", "grads"] + [s if s not in spec.optional_states else f"{s}=None" for s in spec.states]
    # required keywords first (docs/design.md, Public API: `*, lr, step=1, ...` but `*, step, lr=1e-2, ...`)
    required, optional, defaults = [], [], {}
    if spec.uses_step:
        (required if spec.step_default is None else optional).append(
            "step" if spec.step_default is None else f"step={spec.step_default}")
    for h in spec.hypers:
        if h.default is REQUIRED:
            required.append(h.name)
        else:
            optional.append(f"{h.name}=_d_{h.name}")
            defaults[f"_d_{h.name}"] = h.default
    kw_args = required + optional + ["grad_scale=None", "backend=None"]
    hp = ", ".join(f"{h.name!r}: {h.name}" for h in spec.hypers)
    states = ", ".join(spec.states) + ","
    step = "step" if spec.uses_step else "1"
    src = (f"def {spec.function_name}({', '.join(array_args)}, *, {', '.join(kw_args)}):\n"
           f"    return _apply(_spec, params, grads, ({states}), {{{hp}}}, {step}, grad_scale, backend)\n")
    namespace = {"_apply": apply_update, "_spec": spec, "Arrays": Arrays, "Scalar": Scalar, **defaults}
    exec(compile(src, f"<fastopt.functional.{spec.function_name}>", "exec"), namespace)
    fn = namespace[spec.function_name]
    fn.__annotations__ = _annotations(spec)
    fn.__doc__ = spec.docstring()
    fn.__module__ = __name__
    fn.__qualname__ = spec.function_name
    return fn


for _spec in REGISTRY.values():
    globals()[_spec.function_name] = _generate(_spec)
del _spec


def init_state(name: str, params: Arrays, **options) -> dict:
    """New state arrays for optimizer `name`, shaped like `params` (one array or a list), on the params'
    device, keyed by the state names of `<name>_step`. `options` are that optimizer's hyperparameters
    where they decide which states exist (amsgrad, momentum, centered) or what they start with
    (Adagrad's initial_accumulator_value: spec.state_init); defaults otherwise. Every state starts at
    zero except where the spec says otherwise (schedule-free's z: a copy of the params).
    Example: ``fastopt.adam_step(p, g, **fastopt.init_state("adam", p), step=1)``."""
    from fastopt.specs import PARAM, get_spec
    from fastopt.backends.dispatch import array_device, as_numpy
    from fastopt.precision import is_16bit
    import numpy as np

    spec = get_spec(name)
    unknown = set(options) - set(spec.defaults)
    if unknown:
        raise TypeError(f"init_state({name!r}): unknown option(s) {', '.join(sorted(unknown))}")
    hp = dict(spec.defaults, **options)
    if "lr" in hp and hp["lr"] is REQUIRED:
        hp["lr"] = 0.0
    for h in spec.hypers:
        if h.name in options:
            hp[h.name] = h.validate(hp[h.name])
    if spec.extra_check is not None:
        spec.extra_check(hp)

    fills = spec.state_init(hp)

    def new_state(p, label, fill):
        if fill is PARAM:  # a copy of the param (schedule-free's z), in the state dtype, on its device
            out = new_state(p, label, 0.0)
            if isinstance(out, np.ndarray):
                out[...] = as_numpy(p, label)
            else:
                from fastopt.arrays import copy_into
                copy_into(out, p)
            return out
        if array_device(p, label) == "device":
            # on the params' device, filled on their producer stream (a torch tensor on cuda:1 under
            # torch.cuda.stream(s): device 1, stream s), so the first update reads it filled; Numba
            # device arrays keep Numba state, everything else gets CuPy arrays
            if type(p).__module__.startswith("numba"):
                from fastopt.backends import numba_backend as device_backend
                dtype = np.dtype(p.dtype)  # the simulator's arrays export no __cuda_array_interface__
            else:
                from fastopt.backends import cupy_backend as device_backend
                dtype = np.dtype(p.__cuda_array_interface__["typestr"])  # CuPy, torch: one way for both
            # float16 params keep float32 state (float16 moments underflow; the kernels do float32 math)
            dtype = np.dtype(np.float32) if dtype == np.float16 else dtype
            return device_backend.device_full(tuple(p.shape), fill, dtype, like=p)
        p = as_numpy(p, label)
        if p.dtype.kind != "f" and not is_16bit(p.dtype):
            raise TypeError(f"{label} has dtype {p.dtype}; optimizer state is for floating-point params")
        # C order and native, as the kernels take it; 16-bit params (float16, bfloat16) keep float32
        # state (float32 math; 16-bit moments would underflow)
        return np.full(p.shape, fill, np.float32 if is_16bit(p.dtype) else p.dtype.newbyteorder("="))

    is_list = isinstance(params, (list, tuple))
    if params is None:
        raise TypeError("params must be an array or a list of arrays, got None")
    labelled = [(p, f"params[{i}]") for i, p in enumerate(params)] if is_list else [(params, "params")]
    out = {}
    for state, used in zip(spec.states, spec.active_states(hp)):
        if used:
            arrays = [new_state(p, label, fills[state]) for p, label in labelled]
            out[state] = arrays if is_list else arrays[0]
    return out
