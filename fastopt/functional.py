"""The functional API: one `<name>_step` per registry entry, generated from fastopt/specs.py.

Each function validates the hyperparameters (spec.validate), picks the backend from the arrays' type
(backends/dispatch.py) and hands over; the backend validates the arrays and updates them in place.
Nothing is written before every check has passed.
"""
from __future__ import annotations

import numpy as np

from fastopt.array_types import Arrays, Scalar
from fastopt.arrays import array_device, as_numpy
from fastopt.backends.dispatch import backend_for, check_empty_call
from fastopt.backends.validate import check_tensor_coefs
from fastopt.specs import COMP_SLOT, REGISTRY, REQUIRED, OptimizerSpec, as_bool

__all__ = [spec.function_name for spec in REGISTRY.values()] + ["init_state", "apply_update"]

# The precision options every *_step takes (README "Precision"), appended to the registry's docstring.
PRECISION_DOC = """

Precision (16-bit params: float16, ml_dtypes.bfloat16; float32 math):
    The state arrays may be float32 or 16-bit (init_state's state_dtype=: bfloat16/float16 for float32
    params, the params' own dtype for 16-bit params); all states of one call share one dtype, stored
    rounded to nearest even. 8-bit state (state_dtype="int8", float32 and 16-bit params, on the CPU and CuPy):
    each state is a fastopt.precision.QuantizedState(codes, absmax, signed), dequantized to float32, updated
    and requantized in place (all states of the call, or none). The new 16-bit param is rounded to nearest even, unless:
    kahan_comp: the Kahan compensation buffer (params' dtype and shape; init_state(..., kahan=True)
        makes it as "kahan_comp"): c holds what rounding lost, added back at the next step:
        total = c + (p_new - p); p = round(p + total); c = round(total - (p - p_old)).
    stochastic_rounding=True: p = round_stochastic(p_new, random_bits(random_key(seed, step),
        index_offset + i)) for element i (C order) of each array: the same bits for any thread count
        or grouping of arrays. A shard of a larger (flat) buffer passes the index of its first element
        in the whole as index_offset. Functions without a `step` argument key by (seed, 0): pass a new
        seed each call. Not with kahan_comp.
"""


# COMP_SLOT (specs.py): where a kernel call carries the Kahan compensation, (params, grads, s0, s1, s2,
# kahan_comp[, s3])


def with_kahan(tail: tuple, names: tuple, comp) -> tuple[tuple, tuple]:
    """A kernel call's state arguments and names with the Kahan compensation `comp` in its slot (the
    unused state slots before it None; a fourth state after it, where plan_call left the slot None)."""
    if len(tail) > COMP_SLOT - 2:
        return tail[:COMP_SLOT - 2] + (comp,) + tail[COMP_SLOT - 1:], names
    pad = COMP_SLOT - 2 - len(tail)
    return tail + (None,) * pad + (comp,), names + tuple(f"state{k}" for k in range(len(tail), len(tail) + pad)) + (
        "kahan_comp",)


def rounding_options(step, stochastic_rounding=False, seed=0, index_offset=0, kahan=False):
    """A precision.StochasticRounding for stochastic_rounding=True (else None), after checking the options:
    bools, int seed and offset, and kahan and stochastic_rounding not both (ValueError naming them)."""
    from fastopt.precision import StochasticRounding
    stochastic_rounding = as_bool("stochastic_rounding", stochastic_rounding)
    kahan = as_bool("kahan", kahan)
    if stochastic_rounding and kahan:
        raise ValueError("kahan and stochastic_rounding are mutually exclusive (Kahan summation keeps what rounding "
                         "lost; stochastic rounding loses nothing on average): choose one")
    if not stochastic_rounding:  # seed and index_offset are checked either way; the key only made when used
        StochasticRounding.check(seed, index_offset)
        return None
    return StochasticRounding(seed, step, index_offset)


def apply_update(spec: OptimizerSpec, params, grads, states: tuple, hp: dict, step=1, grad_scale=None,
                 backend=None, kahan_comp=None, stochastic_rounding=False, seed=0, index_offset=0, key_step=None,
                 tensor_coefs=None):
    """Validate, dispatch and run one update. `states` holds one entry per spec.states slot; kahan_comp the
    Kahan compensation of 16-bit params (or None); stochastic_rounding (with seed, index_offset) rounds the
    new 16-bit params stochastically, keyed by (seed, key_step: the step, 0 for functions without one).
    tensor_coefs (spec.tensor_coefs families, LARS): one host number per array of params, used instead of the
    backend's norms pass (-1: a tensor LARS leaves unadapted); for callers holding pieces of tensors (the
    sharded optimizer), which pass the coefficients of the whole tensors."""
    hp, step = spec.validate(hp, step)
    stochastic = rounding_options(step if key_step is None else key_step, stochastic_rounding, seed, index_offset,
                                  kahan_comp is not None)
    tensor_coefs = check_tensor_coefs(spec, tensor_coefs, len(params) if isinstance(params, (list, tuple)) else 1)
    given = dict(zip(spec.states, states))

    def state_for(name):
        if given[name] is None:
            raise ValueError(f"{spec.function_name}: this configuration needs the state {name!r} "
                             f"(see fastopt.init_state({spec.name!r}, params, ...))")
        return given[name]

    tail, names = spec.plan_call(hp, state_for)
    if kahan_comp is not None:
        tail, names = with_kahan(tail, names, kahan_comp)
    arrays = (params, grads) + tail
    be = backend_for(params, backend)
    if be is None:  # empty list of params: nothing to update, but the call must still be well formed
        check_empty_call(arrays, names)
        return None
    # the keywords only when used: a backend without them (a test's stand-in) still runs the others
    extra = {} if tensor_coefs is None else {"tensor_coefs": tensor_coefs}
    if stochastic is not None:
        extra["stochastic"] = stochastic
    be.step(spec, arrays, names, hp, step, grad_scale, **extra)
    return None


def _annotations(spec: OptimizerSpec) -> dict:
    """The generated function's annotations (strings, as under `from __future__ import annotations`)."""
    out = {"params": "Arrays", "grads": "Arrays"}
    out.update({s: "Arrays | None" if s in spec.optional_states else "Arrays" for s in spec.states})
    if spec.uses_step:
        out["step"] = "int"
    out.update({h.name: "bool" if h.kind == "bool" else "float" for h in spec.hypers})
    out.update({"grad_scale": "Scalar | None", "kahan_comp": "Arrays | None", "stochastic_rounding": "bool",
                "seed": "int", "index_offset": "int", "backend": "str | None", "return": "None"})
    return out


def _generate(spec: OptimizerSpec):
    """Build `<name>_step` with its real signature (introspection and IDEs see every argument)."""
    array_args = ["params", "grads"] + [s if s not in spec.optional_states else f"{s}=None" for s in spec.states]
    # required keywords first (step, when the spec has no default for it), then the hyperparameters in order
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
    kw_args = required + optional + ["grad_scale=None", "kahan_comp=None", "stochastic_rounding=False", "seed=0",
                                     "index_offset=0", "backend=None"]
    hp = ", ".join(f"{h.name!r}: {h.name}" for h in spec.hypers)
    states = ", ".join(spec.states) + ","
    step = "step" if spec.uses_step else "1"
    key_step = "step" if spec.uses_step else "0"
    src = (f"def {spec.function_name}({', '.join(array_args)}, *, {', '.join(kw_args)}):\n"
           f"    return _apply(_spec, params, grads, ({states}), {{{hp}}}, {step}, grad_scale, backend, kahan_comp, "
           f"stochastic_rounding, seed, index_offset, {key_step})\n")
    namespace = {"_apply": apply_update, "_spec": spec, "Arrays": Arrays, "Scalar": Scalar, **defaults}
    exec(compile(src, f"<fastopt.functional.{spec.function_name}>", "exec"), namespace)
    fn = namespace[spec.function_name]
    fn.__annotations__ = _annotations(spec)
    fn.__doc__ = spec.docstring() + PRECISION_DOC
    fn.__module__ = __name__
    fn.__qualname__ = spec.function_name
    return fn


for _spec in REGISTRY.values():
    globals()[_spec.function_name] = _generate(_spec)
del _spec


def device_param_dtype(p, label, option):
    """The NumPy dtype of a GPU param for the precision modes (state_dtype=, kahan=True, stochastic_rounding=True):
    a CuPy array's (bfloat16 too, which __cuda_array_interface__ cannot say) or a Numba device array's (both
    backends have every mode); NotImplementedError naming `option` for the others (torch tensors take
    fastopt.torch's options)."""
    if isinstance(getattr(p, "dtype", None), np.dtype):
        return p.dtype
    raise NotImplementedError(f"{option} on the GPU is implemented for CuPy arrays and Numba device arrays; "
                              f"{label} is a {type(p).__module__}.{type(p).__name__} (torch tensors: fastopt.torch)")


def _device_dtype(p, label) -> np.dtype:
    """A GPU param's NumPy dtype: a CuPy or Numba array's own, else its __cuda_array_interface__'s (a torch
    bfloat16 tensor's read as ml_dtypes' bfloat16, as the backends read it)."""
    if isinstance(getattr(p, "dtype", None), np.dtype):
        return p.dtype
    from fastopt.backends.device_arrays import from_interface
    return from_interface(p, label).dtype


def _float_param(dtype) -> bool:
    """A dtype optimizer state can be made for: native float16/32/64 or bfloat16."""
    from fastopt.precision import is_16bit
    return (dtype.kind == "f" and dtype.isnative and dtype.itemsize in (4, 8)) or is_16bit(dtype)


def _state_dtype_of(state_dtype, param_dtype, label):
    """The NumPy dtype of the state of a host param of `param_dtype` for state_dtype= (None: float32 for
    16-bit params, else the param's own); TypeError/ValueError naming state_dtype otherwise."""
    from fastopt.precision import STATE_DTYPES, is_16bit
    if isinstance(state_dtype, str) and state_dtype == "int8":  # 8-bit block-wise (precision.QuantizedState)
        if not (param_dtype == np.float32 or is_16bit(param_dtype)):
            raise ValueError(f"Invalid state_dtype: 'int8' for {label} of dtype {param_dtype} (8-bit state is for "
                             f"float32, float16 or bfloat16 params)")
        return "int8"
    if state_dtype is None:
        return np.dtype(np.float32) if is_16bit(param_dtype) else param_dtype.newbyteorder("=")
    if isinstance(state_dtype, str) and state_dtype == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise TypeError("state_dtype='bfloat16' needs the ml_dtypes package (pip install ml_dtypes)") from None
        wanted = np.dtype(ml_dtypes.bfloat16)
    else:
        try:
            wanted = np.dtype(state_dtype)
        except TypeError:
            raise TypeError(f"state_dtype must be one of {', '.join(STATE_DTYPES)}, int8 or the params' dtype, got "
                            f"{state_dtype!r}") from None
    own = param_dtype.newbyteorder("=")
    ok = wanted == own or (wanted == np.float32 and param_dtype != np.float64) or (
        param_dtype == np.float32 and is_16bit(wanted) and wanted.isnative)
    if not ok:
        allowed = {"float64": "float64", "float32": "float32, bfloat16 or float16"}.get(
            own.name, f"float32 or {own.name}")
        raise ValueError(f"Invalid state_dtype: {state_dtype!r} for {label} of dtype {param_dtype} (its state may be "
                         f"{allowed})")
    return wanted


def _composite_state(spec, params, state_dtype, kahan, options) -> dict:
    """init_state for the registry's composite optimizers: sparse_adam's state (exp_avg, exp_avg_sq in the params'
    own dtype: its only storage); the others have no functional step, their classes keep their state."""
    if spec.name != "sparse_adam":
        raise ValueError(f"init_state({spec.name!r}): {spec.name} has no functional step; fastopt.{spec.class_name} "
                         f"makes and keeps its state")
    unknown = set(options) - set(spec.defaults)
    if unknown:
        raise TypeError(f"init_state({spec.name!r}): unknown option(s) {', '.join(sorted(unknown))}")
    for h in spec.hypers:
        if h.name in options:
            h.validate(options[h.name])
    if state_dtype is not None:
        raise ValueError(f"Invalid state_dtype: {state_dtype!r} for 'sparse_adam', whose state is in the params' "
                         f"own dtype (state_dtype=None)")
    if kahan is not False:
        raise ValueError(f"Invalid kahan: {kahan!r} for 'sparse_adam' (no Kahan compensation)")
    # Adam's two moments, each param's in its own dtype (fastopt.sparse_adam imports the classes: not from here)
    is_list = isinstance(params, (list, tuple))
    if params is None:
        raise TypeError("params must be an array or a list of arrays, got None")
    out = {"exp_avg": [], "exp_avg_sq": []}
    for i, p in enumerate(params if is_list else [params]):
        label = f"params[{i}]" if is_list else "params"
        own = _device_dtype(p, label) if array_device(p, label) == "device" else as_numpy(p, label).dtype
        if not _float_param(own):
            raise TypeError(f"{label} must be a float16, bfloat16, float32 or float64 array, got dtype {own}")
        one = init_state("adam", p, state_dtype=own.newbyteorder("="))
        for name in out:
            out[name].append(one[name])
    return out if is_list else {name: arrays[0] for name, arrays in out.items()}


def init_state(name: str, params: Arrays, *, state_dtype=None, kahan: bool = False, **options) -> dict:
    """New state arrays for optimizer `name`, shaped like `params` (one array or a list), on the params'
    device, keyed by the state names of `<name>_step`. `options` are that optimizer's hyperparameters
    where they decide which states exist (amsgrad, momentum, centered) or what they start with
    (Adagrad's initial_accumulator_value: spec.state_init); defaults otherwise. Every state starts at
    zero except where the spec says otherwise (schedule-free's z: a copy of the params).

    state_dtype: the states' storage (README "Precision"): None (float32 for float16/bfloat16 params,
    the params' own dtype otherwise), "float32", "bfloat16", "float16" (for float32 params), or the params'
    own dtype; a 16-bit state is filled (and later stored) rounded to nearest even. "int8" (float32 and
    16-bit params): each state is a fastopt.precision.QuantizedState (codes uint8 of the param's shape,
    absmax float32 of ceil(size / 256) blocks; the signed map, or the unsigned one for states that are never
    negative: precision.NONNEGATIVE_STATES); not for LAMB, ASGD and schedule-free (precision.INT8_REFUSED),
    whose state must stay exact. Host (CPU), CuPy and Numba params (its arrays on the params' device).
    kahan=True (16-bit params only): also a "kahan_comp" entry, zeros of the params' dtype: the Kahan
    compensation that `<name>_step(..., kahan_comp=...)` takes.
    "sparse_adam": sparse_adam_step's exp_avg and exp_avg_sq in the params' own dtype (no state_dtype, no kahan);
    "adafactor", "muon" and "lbfgs" have no functional step (ValueError: their classes keep their state).
    Example: ``fastopt.adam_step(p, g, **fastopt.init_state("adam", p), step=1)``."""
    from fastopt.specs import COMPOSITE, PARAM, get_spec
    from fastopt.precision import INT8_REFUSED, QuantizedState, is_16bit, quant_blocks, signed_state

    composite = COMPOSITE.get(name.lower()) if isinstance(name, str) else None
    if composite is not None:
        return _composite_state(composite, params, state_dtype, kahan, options)
    spec = get_spec(name)
    if isinstance(state_dtype, str) and state_dtype == "int8" and spec.name in INT8_REFUSED:
        raise ValueError(f"Invalid state_dtype: 'int8' for {spec.name!r}: {INT8_REFUSED[spec.name]}")
    unknown = set(options) - set(spec.defaults)
    if unknown:
        raise TypeError(f"init_state({name!r}): unknown option(s) {', '.join(sorted(unknown))}")
    as_bool("kahan", kahan)
    hp = dict(spec.defaults, **options)
    if "lr" in hp and hp["lr"] is REQUIRED:
        hp["lr"] = 0.0
    for h in spec.hypers:
        if h.name in options:
            hp[h.name] = h.validate(hp[h.name])
    if spec.extra_check is not None:
        spec.extra_check(hp)

    fills = spec.state_init(hp)

    def new_state(p, label, fill, dtype, state=None):
        if fill is PARAM:  # a copy of the param (schedule-free's z), in the state dtype, on its device
            out = new_state(p, label, 0.0, dtype)
            if isinstance(out, np.ndarray):
                out[...] = as_numpy(p, label)  # a 16-bit state: rounded to nearest even (ml_dtypes' cast)
            else:
                from fastopt.arrays import copy_into
                copy_into(out, p)
            return out
        if dtype is None or (not isinstance(dtype, (str, Exception)) and array_device(p, label) == "device"):
            return device_state(p, fill, dtype)  # on its device, filled on its producer stream
        if isinstance(dtype, Exception):
            raise dtype
        if isinstance(dtype, str):  # "int8": the fill quantized (codes and one absmax per 256 elements)
            if array_device(p, label) == "device":  # device params: every code the fill's, every scale |fill|
                one = QuantizedState.from_float(np.full(1, fill, np.float32), signed_state(state))
                return QuantizedState(device_state(p, int(one.codes[0]), np.dtype(np.uint8)),
                                      device_state(p, float(one.absmax[0]), np.dtype(np.float32),
                                                   (quant_blocks(int(np.prod(p.shape, dtype=np.int64))),)),
                                      one.signed)
            return QuantizedState.from_float(np.full(p.shape, fill, np.float32), signed_state(state))
        return np.full(p.shape, fill, dtype)

    def device_state(p, fill, dtype=None, shape=None):
        # on the params' device, filled on their producer stream (a torch tensor on cuda:1 under
        # torch.cuda.stream(s): device 1, stream s), so the first update reads it filled; Numba
        # device arrays keep Numba state, everything else gets CuPy arrays. dtype: state_dtype='s
        # (CuPy and Numba params: checked below)
        if type(p).__module__.startswith("numba"):
            from fastopt.backends import numba_backend as device_backend
            own = np.dtype(p.dtype)  # the simulator's arrays export no __cuda_array_interface__
        else:
            from fastopt.backends import cupy_backend as device_backend
            # a CuPy array's own dtype (bfloat16 too, which __cuda_array_interface__ cannot say), else torch's
            own = p.dtype if isinstance(getattr(p, "dtype", None), np.dtype) else \
                np.dtype(p.__cuda_array_interface__["typestr"])
        # 16-bit params keep float32 state (16-bit moments underflow; the kernels do float32 math)
        if dtype is None:
            dtype = np.dtype(np.float32) if is_16bit(own) else own
        return device_backend.device_full(tuple(p.shape) if shape is None else shape, fill, dtype, like=p)

    is_list = isinstance(params, (list, tuple))
    if params is None:
        raise TypeError("params must be an array or a list of arrays, got None")
    labelled = []
    for i, p in enumerate(params if is_list else [params]):
        label = f"params[{i}]" if is_list else "params"
        if array_device(p, label) == "device":
            dtype, own = None, None
            if not _float_param(_device_dtype(p, label)):  # an error once a state is made for it, as on the host
                labelled.append((p, label, TypeError(f"{label} has dtype {_device_dtype(p, label)}; optimizer state "
                                                     f"is for floating-point params"), None))
                continue
            if state_dtype is not None or kahan:
                own = device_param_dtype(p, label, "state_dtype=" if state_dtype is not None else "kahan=True")
            if kahan and not is_16bit(own):
                raise ValueError(f"kahan=True is for float16 or bfloat16 params (a Kahan compensation of 16-bit "
                                 f"rounding); {label} has dtype {own}")
            if state_dtype is not None:
                dtype = _state_dtype_of(state_dtype, own, label)  # "int8" too: 8-bit state on the device
            labelled.append((p, label, dtype, own))
            continue
        p = as_numpy(p, label)
        if p.dtype.kind != "f" and not is_16bit(p.dtype):  # an error once a state is made for it
            labelled.append((p, label, TypeError(f"{label} has dtype {p.dtype}; optimizer state is for "
                                                 f"floating-point params"), None))
            continue
        if kahan and not is_16bit(p.dtype):
            raise ValueError(f"kahan=True is for float16 or bfloat16 params (a Kahan compensation of 16-bit "
                             f"rounding); {label} has dtype {p.dtype}")
        # C order and native, as the kernels take it
        labelled.append((p, label, _state_dtype_of(state_dtype, p.dtype, label), p.dtype.newbyteorder("=")))
    out = {}
    for state, used in zip(spec.states, spec.active_states(hp)):
        if used:
            arrays = [new_state(p, label, fills[state], dtype, state) for p, label, dtype, _ in labelled]
            out[state] = arrays if is_list else arrays[0]
    if kahan:
        for _, _, dtype, _ in labelled:
            if isinstance(dtype, Exception):
                raise dtype
        arrays = [np.zeros(p.shape, own) if isinstance(p, np.ndarray) else device_state(p, 0.0, own)
                  for p, _, _, own in labelled]
        out["kahan_comp"] = arrays if is_list else arrays[0]
    return out
