"""Shared helpers: random problems generated from the registry, snapshots for 'nothing changed'."""
from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from fastopt.specs import REGISTRY

# size 0 and 1, odd lengths, multi-dimensional, and one above the kernels' parallel threshold (65536
# elements) so the multi-chunk, multi-thread path runs too.
SHAPES = [(0,), (1,), (7,), (33, 5), (2, 3, 4), (1037,), (70001,)]
DTYPES = [np.float32, np.float64]

# Values tried for each hyperparameter that selects a code path; the product over a spec's axes,
# minus the invalid combinations (spec.validate), is its option matrix.
OPTION_VALUES = {
    "momentum": [0.0, 0.9],
    "dampening": [0.0, 0.1],
    "weight_decay": [0.0, 0.05],
    "lr_decay": [0.0, 0.01],
    "initial_accumulator_value": [0.0, 0.1],
}


def option_combinations(spec):
    axes = []
    for h in spec.hypers:
        if h.kind == "bool":
            axes.append((h.name, [False, True]))
        elif h.name in OPTION_VALUES:
            axes.append((h.name, OPTION_VALUES[h.name]))
    combos = []
    for values in itertools.product(*[v for _, v in axes]):
        hp = dict(spec.defaults)
        if spec.name == "sgd":
            hp["lr"] = 0.05
        elif spec.name == "lars":  # its step is lr * trust_coefficient (1e-3) * ||p|| / ||g||: a 16-bit param moves
            hp["lr"] = 1.0
        hp.update(zip([n for n, _ in axes], values))
        try:
            spec.validate(hp, 1)
        except ValueError:
            continue
        combos.append(hp)
    return combos


def combo_id(hp, spec):
    changed = [f"{k}={v}" for k, v in hp.items() if spec.defaults.get(k) != v and k != "lr"]
    return ",".join(changed) or "defaults"


def all_cases():
    for spec in REGISTRY.values():
        for hp in option_combinations(spec):
            yield pytest.param(spec, hp, id=f"{spec.name}[{combo_id(hp, spec)}]")


def make_problem(spec, hp, shapes, dtype, rng):
    """Random params; states as after init_state (zeros), except the momentum buffers (and Lion's
    momentum), which start random: any value is a consistent state for them. (A random first moment
    with a zero second moment is not: Adam's m / sqrt(v) is then ill-conditioned.)"""
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    states = {}
    for name, used in zip(spec.states, spec.active_states(hp)):
        if not used:
            continue
        if name == "momentum_buffer" or spec.name == "lion":
            states[name] = [(0.1 * rng.standard_normal(s)).astype(dtype) for s in shapes]
        else:
            states[name] = [np.zeros(s, dtype) for s in shapes]
    return params, states


def snapshot(*objs):
    """Bytes of every array reachable from objs (arrays, lists, dicts)."""
    out = []

    def walk(o):
        if isinstance(o, np.ndarray):
            out.append(o.tobytes())
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
    for o in objs:
        walk(o)
    return out


@pytest.fixture
def rng():
    """A fresh seed for every test and run (FASTOPT_TEST_SEED pins it); printed, so pytest shows it with
    any failure."""
    seed = int(os.environ.get("FASTOPT_TEST_SEED", np.random.SeedSequence().entropy % (2 ** 32)))
    print(f"random seed: {seed} (rerun with FASTOPT_TEST_SEED={seed})")
    return np.random.default_rng(seed)


# The GPU tests' fixture (tests/gpu): here, not in a tests/gpu/conftest.py, whose module name would shadow this
# one for the `from conftest import ...` of the tests above.
@pytest.fixture
def cp():
    """The cupy module when CuPy is installed and sees a CUDA device; else the test is skipped (without CuPy:
    importorskip's reason; without a device: "no CUDA GPU (<the error CuPy raised>)")."""
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no device")
    except Exception as e:
        pytest.skip(f"no CUDA GPU ({type(e).__name__})")
    return cupy
