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
