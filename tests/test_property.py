"""Property-based: random bad (and good) inputs thrown at the API raise only TypeError / ValueError,
and an error never modifies an array."""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastopt
from fastopt.specs import REGISTRY

from conftest import snapshot

DTYPES = [np.float32, np.float64, np.float16, np.int32, np.int64, np.complex64, np.bool_, np.uint8]
SPECS = list(REGISTRY.values())


@st.composite
def arrays(draw, shape):
    dtype = draw(st.sampled_from(DTYPES[:2] * 4 + DTYPES))  # mostly valid dtypes
    if draw(st.integers(0, 9)) == 0:
        shape = draw(st.sampled_from([(0,), (1,), (3, 2), (5,), (2, 3)]))
    kind = draw(st.integers(0, 11))
    a = np.arange(int(np.prod(shape)) * 2, dtype=np.float64).astype(dtype)
    if kind == 0:
        return a[::2].reshape(shape) if len(shape) == 1 else a[: int(np.prod(shape))].reshape(shape)
    if kind == 1:
        a = a[: int(np.prod(shape))].reshape(shape).copy()
        a.flags.writeable = False
        return a
    if kind == 2:
        return draw(st.sampled_from([None, 1.0, "x", [1.0, 2.0], object()]))
    if kind == 3 and len(shape) == 2:
        return a[: int(np.prod(shape))].reshape(shape).T
    return a[: int(np.prod(shape))].reshape(shape).copy()


HYPER_VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.booleans(),
                         st.none(), st.text(max_size=2), st.just(np.float32(0.5)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_inputs_raise_only_type_or_value_errors(data):
    spec = data.draw(st.sampled_from(SPECS))
    shape = data.draw(st.sampled_from([(0,), (1,), (4,), (3, 2)]))
    as_list = data.draw(st.booleans())
    n = data.draw(st.integers(0, 3)) if as_list else 1

    def one():
        return [data.draw(arrays(shape)) for _ in range(n)] if as_list else data.draw(arrays(shape))

    params, grads = one(), one()
    states = {s: one() for s in spec.states if data.draw(st.integers(0, 5)) > 0}
    if data.draw(st.integers(0, 6)) == 0 and states:  # aliasing
        states[next(iter(states))] = params
    hp = {}
    for h in spec.hypers:
        if data.draw(st.integers(0, 3)) == 0:
            hp[h.name] = data.draw(HYPER_VALUES)
    if spec.name == "sgd" and "lr" not in hp:
        hp["lr"] = 0.1
    kwargs = dict(hp)
    if spec.uses_step:
        kwargs["step"] = data.draw(st.one_of(st.integers(-2, 5), st.floats(0, 3), st.just(True)))
    if data.draw(st.booleans()):
        kwargs["grad_scale"] = data.draw(st.one_of(st.floats(), st.just(np.ones(2)), st.just(np.array(0.5)),
                                                   st.just("s")))
    backend = data.draw(st.sampled_from(["cython", "numpy"]))
    before = snapshot(params, grads, states)
    try:
        getattr(fastopt, spec.function_name)(params, grads, **states, **kwargs, backend=backend)
    except (TypeError, ValueError):
        assert snapshot(params, grads, states) == before, "an error modified an array"


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_clip_random_inputs(data):
    shape = data.draw(st.sampled_from([(0,), (1,), (4,), (3, 2)]))
    grads = [data.draw(arrays(shape)) for _ in range(data.draw(st.integers(0, 3)))]
    bound = data.draw(st.one_of(st.floats(), st.integers(-2, 2), st.none(), st.text(max_size=1)))
    op = data.draw(st.sampled_from([fastopt.clip_by_value, fastopt.clip_by_norm, fastopt.clip_by_global_norm]))
    before = snapshot(grads)
    try:
        op(grads, bound)
    except (TypeError, ValueError):
        assert snapshot(grads) == before
