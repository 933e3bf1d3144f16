"""The array checks exist twice by design: in Python (fastopt/backends/validate.py, used by the numpy,
cupy and numba backends) and compiled (kernels/cpu/_cpu_fast.pyx, the fast path of the same rules).
On generated inputs (every bad-element dimension of the fuzz suite, in every array slot of every
registry optimizer, single and list form) both must raise the same exception type with the same message,
and accept the same calls."""
import numpy as np
import pytest

import fastopt
from fastopt.backends import dispatch

from fuzz.values import ELEMENT_DIMS

pytestmark = pytest.mark.skipif(not dispatch.cython_available(), reason="compiled extension not built")


def outcome(spec, slot, dim, as_list, backend, seed):
    """(exception type, message) of one generated call, or ("ok", ...) with the arrays' bytes."""
    rng = np.random.default_rng(seed)
    dtype = (np.float32, np.float64)[seed % 2]
    shape = (3, 4)
    p = rng.standard_normal(shape).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    options = {k: True if isinstance(v, bool) else 0.9 for k, v in spec.defaults.items() if k in spec.state_options}
    states = fastopt.init_state(spec.name, p, **options)
    arrays = {"params": p, "grads": g, **states}
    arrays[slot] = dim.make(arrays[slot], rng)
    if as_list:  # the bad element second, after a good pair
        good = {k: np.zeros(shape, dtype) for k in arrays}
        good["params"] = rng.standard_normal(shape).astype(dtype)
        arrays = {k: [good[k], v] for k, v in arrays.items()}
    kwargs = {k: v for k, v in arrays.items() if k not in ("params", "grads")}
    hp = dict(options, **({"lr": 0.01} if "lr" in spec.defaults else {}))
    if spec.uses_step:
        hp["step"] = 2
    try:
        getattr(fastopt, spec.function_name)(arrays["params"], arrays["grads"], **kwargs, **hp, backend=backend)
    except (TypeError, ValueError) as e:
        return type(e).__name__, str(e)
    return "ok", None


CASES = [(spec, slot, dim, as_list)
         for spec in fastopt.REGISTRY.values()
         for slot in ("params", "grads") + tuple(s for s in spec.states if s not in spec.optional_states)
         for dim in ELEMENT_DIMS
         for as_list in (False, True)]


@pytest.mark.parametrize("spec", list(fastopt.REGISTRY.values()), ids=lambda s: s.name)
def test_compiled_and_python_validators_agree(spec):
    seed = np.random.SeedSequence().entropy % 2 ** 32
    disagreements = []
    checked = 0
    for case_spec, slot, dim, as_list in CASES:
        if case_spec is not spec:
            continue
        compiled = outcome(spec, slot, dim, as_list, "cython", seed)
        python = outcome(spec, slot, dim, as_list, "numpy", seed)
        checked += 1
        if compiled != python:
            disagreements.append(f"{slot}/{dim.name}/{'list' if as_list else 'single'}: cython {compiled} "
                                 f"vs numpy {python}")
    assert checked >= 2 * 2 * len(ELEMENT_DIMS)
    assert not disagreements, f"seed {seed}:\n" + "\n".join(disagreements)


# ---- prepare once, bind the grads each step (interface.PrepareOnceBackend) ----

from fastopt.backends import cython_backend, numpy_backend  # noqa: E402

SHAPES = [(3, 4), (2, 5), (0,), (4, 2)]  # 2-D where a dim edits a grad (see fuzz.values)


def _optimizer_arrays(rng, dtype):
    """Two calls like an optimizer's two buckets: params and two states each, and good grads."""
    calls, grads = [], []
    for c in range(2):
        shapes = SHAPES[2 * c:2 * c + 2] if c else SHAPES[:2]
        params = [rng.standard_normal(s).astype(dtype) for s in shapes]
        m = [np.zeros(s, dtype) for s in shapes]
        v = [np.zeros(s, dtype) for s in shapes]
        calls.append([params, m, v])
        grads.append([rng.standard_normal(s).astype(dtype) for s in shapes])
    return calls, grads


NAMES = ("params", "grads", "exp_avg", "exp_avg_sq")


def _fixed_calls(calls):
    return [((p, None, m, v), NAMES, [2 * c, 2 * c + 1]) for c, (p, m, v) in enumerate(calls)]


def _bind_outcome(backend, seed, edit):
    """(exception type, message) of prepare_fixed + edit + bind_grads + run, or ("ok", bytes of every array)."""
    rng = np.random.default_rng(seed)
    dtype = (np.float32, np.float64)[seed % 2]
    calls, grads = _optimizer_arrays(rng, dtype)
    try:
        fixed = backend.prepare_fixed(_fixed_calls(calls))
        edit(calls, grads, rng)
        prepared = backend.bind_grads(fixed, grads)
        for call in prepared:
            backend.run(call, fastopt.REGISTRY["adam"], dict(fastopt.REGISTRY["adam"].defaults), 1, None)
    except (TypeError, ValueError) as e:
        return type(e).__name__, str(e)
    return "ok", [a.tobytes() for c in calls for lst in c for a in lst]


def _grad_dim(dim, c, i):
    def edit(calls, grads, rng):
        grads[c][i] = dim.make(grads[c][i], rng)
    return edit


def _set_flag(c, slot, i):
    def edit(calls, grads, rng):
        calls[c][slot][i].flags.writeable = False
    return edit


def _reshape_in_place(calls, grads, rng):
    calls[0][0][0].shape = (12,)  # the same object, another shape: the states no longer fit


def _retype_in_place(calls, grads, rng):
    calls[0][0][1].dtype = np.int32 if calls[0][0][1].dtype == np.float32 else np.int64


EDITS = ([(f"grads[{c}][{i}]/{d.name}", _grad_dim(d, c, i)) for d in ELEMENT_DIMS for c, i in ((0, 1), (1, 1))]
         + [("param_read_only", _set_flag(0, 0, 1)), ("state_read_only", _set_flag(1, 2, 1)),
            ("empty_param_read_only", _set_flag(1, 0, 0)),
            ("param_reshaped_in_place", _reshape_in_place), ("param_retyped_in_place", _retype_in_place),
            ("grad_is_param", lambda calls, grads, rng: grads[0].__setitem__(0, calls[0][0][0])),
            ("grad_is_param_of_other_call", lambda calls, grads, rng: grads[1].__setitem__(1, calls[0][0][0][:1, :1].reshape(1))),
            ("grad_is_state", lambda calls, grads, rng: grads[0].__setitem__(1, calls[0][1][1])),
            ("grad_is_state_of_other_call", lambda calls, grads, rng: grads[1].__setitem__(1, calls[0][2][0][:2].reshape(4, 2))),
            ("same_grad_twice", lambda calls, grads, rng: grads[1].__setitem__(0, grads[1][0])),
            ("grads_short", lambda calls, grads, rng: grads.__setitem__(0, grads[0][:1])),
            ("grads_none", lambda calls, grads, rng: grads.__setitem__(1, None)),
            ("grads_one_array", lambda calls, grads, rng: grads.__setitem__(0, grads[0][0])),
            ("nothing", lambda calls, grads, rng: None)])


@pytest.mark.parametrize("name,edit", EDITS, ids=[n for n, _ in EDITS])
def test_compiled_and_python_bind_grads_agree(name, edit):
    """prepare_fixed, an edit (a bad grad, an aliasing grad, a fixed array changed in place), bind_grads and
    run: the compiled and the Python twins raise the same exception with the same message, or both
    accept and write the same bytes; and a bad call writes nothing."""
    seed = int(np.random.SeedSequence().entropy % 2 ** 32)
    compiled = _bind_outcome(cython_backend, seed, edit)
    python = _bind_outcome(numpy_backend, seed, edit)
    assert compiled == python, f"seed {seed}: cython {compiled[:2]} vs numpy {python[:2]}"
    ok = {"nothing", "same_grad_twice"} | {f"grads[{c}][1]/{d.name}" for d in ELEMENT_DIMS if d.read == "ok"
                                            for c in (0, 1)}
    assert (compiled[0] == "ok") == (name in ok), compiled[:2]


@pytest.mark.parametrize("backend", [cython_backend, numpy_backend], ids=["cython", "numpy"])
def test_bind_grads_matches_prepare(backend):
    """The prepared calls of bind_grads run exactly as prepare()'s do."""
    rng = np.random.default_rng(7)
    calls, grads = _optimizer_arrays(rng, np.float64)
    twin = [[[a.copy() for a in lst] for lst in c] for c in calls]
    spec = fastopt.REGISTRY["adam"]
    hp = dict(spec.defaults)
    fixed = backend.prepare_fixed(_fixed_calls(calls))
    for t in range(1, 4):
        for call in backend.bind_grads(fixed, grads):
            backend.run(call, spec, hp, t, 0.5)
        for c, (p, m, v) in enumerate(twin):
            backend.run(backend.prepare((p, grads[c], m, v), NAMES), spec, hp, t, 0.5)
    for a, b in zip([x for c in calls for lst in c for x in lst], [x for c in twin for lst in c for x in lst]):
        assert a.tobytes() == b.tobytes()
    # and the sums of squares read the grads of a prepared call
    bound = backend.bind_grads(fixed, grads)
    for call, g in zip(bound, grads):
        np.testing.assert_array_equal(backend.sumsq_per_tensor(call), backend.sumsq_per_tensor(g))
    with pytest.raises(ValueError, match="prepare_grads"):
        backend.scale_(bound[0], 2.0)  # a prepared update is not a grads batch to write


@pytest.mark.parametrize("backend", [cython_backend, numpy_backend], ids=["cython", "numpy"])
def test_prepare_fixed_checks_everything_and_writes_nothing(backend):
    rng = np.random.default_rng(3)
    calls, grads = _optimizer_arrays(rng, np.float32)
    calls[1][2][1] = calls[0][0][0].reshape(-1)[:8].reshape(4, 2)  # a state of call 1 aliasing a param of call 0
    before = [a.tobytes() for c in calls for lst in c for a in lst]
    with pytest.raises(ValueError, match=r"exp_avg_sq\[3\] shares memory with params\[0\]|params\[0\] shares "
                                         r"memory with exp_avg_sq\[3\]"):
        backend.prepare_fixed(_fixed_calls(calls))
    assert [a.tobytes() for c in calls for lst in c for a in lst] == before
    calls, grads = _optimizer_arrays(rng, np.float32)
    with pytest.raises(ValueError, match="grads must be None|bind_grads adds the grads"):
        backend.prepare_fixed([((calls[0][0], grads[0], calls[0][1], calls[0][2]), NAMES, None)])
