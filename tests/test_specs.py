"""The registry agrees with the kernels and with the public signatures of docs/design.md."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import fastopt
from fastopt.specs import COMPOSITE, REGISTRY, REQUIRED

CUDA_DIR = Path(__file__).resolve().parent.parent / "kernels" / "cuda"

# the public signatures of docs/design.md (the contract), keyword defaults included
CONTRACT = {
    "sgd": "params, grads, momentum_buffer=None, *, step=1, lr=0.001, momentum=0.0, dampening=0.0, nesterov=False, "
           "weight_decay=0.0, maximize=False, grad_scale=None",
    "adagrad": "params, grads, state_sum, *, step, lr=0.01, lr_decay=0.0, weight_decay=0.0, "
               "initial_accumulator_value=0.0, eps=1e-10, maximize=False, grad_scale=None",
    "rmsprop": "params, grads, square_avg, grad_avg=None, momentum_buffer=None, *, lr=0.01, alpha=0.99, eps=1e-08, "
               "weight_decay=0.0, momentum=0.0, centered=False, maximize=False, grad_scale=None",
    "adam": "params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, step, lr=0.001, beta1=0.9, beta2=0.999, "
            "eps=1e-08, weight_decay=0.0, amsgrad=False, decoupled_weight_decay=False, maximize=False, grad_scale=None",
    "adamw": "params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, step, lr=0.001, beta1=0.9, beta2=0.999, "
             "eps=1e-08, weight_decay=0.01, amsgrad=False, maximize=False, grad_scale=None",
    "nadam": "params, grads, exp_avg, exp_avg_sq, *, step, lr=0.002, beta1=0.9, beta2=0.999, eps=1e-08, "
             "weight_decay=0.0, momentum_decay=0.004, decoupled_weight_decay=False, maximize=False, grad_scale=None",
    "radam": "params, grads, exp_avg, exp_avg_sq, *, step, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-08, "
             "weight_decay=0.0, decoupled_weight_decay=False, maximize=False, grad_scale=None",
    "adabelief": "params, grads, exp_avg, exp_avg_var, *, step, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-16, "
                 "weight_decay=0.0, decoupled_weight_decay=True, maximize=False, grad_scale=None",
    "lamb": "params, grads, exp_avg, exp_avg_sq, *, step, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-06, "
            "weight_decay=0.0, bias_correction=True, maximize=False, grad_scale=None",
    "lion": "params, grads, exp_avg, *, lr=0.0001, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False, "
            "grad_scale=None",
}


@pytest.mark.parametrize("name", list(CONTRACT))
def test_signature_matches_design(name):
    sig = inspect.signature(getattr(fastopt, f"{name}_step"))
    # fastopt's additions after the contract's arguments: the precision modes (DESIGN.md, "Precision") and
    # backend=; annotations are compared separately (docs/design.md writes none)
    additions = ["kahan_comp", "stochastic_rounding", "seed", "index_offset", "backend"]
    names = list(sig.parameters)
    assert names[-len(additions):] == additions
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values() if p.name not in additions]
    assert str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))[1:-1] == CONTRACT[name]


@pytest.mark.parametrize("spec", list(fastopt.REGISTRY.values()), ids=lambda s: s.name)
def test_public_functions_and_classes_are_annotated(spec):
    import typing
    hints = typing.get_type_hints(getattr(fastopt, spec.function_name))
    assert hints["return"] is type(None) and hints["step" if spec.uses_step else "lr"] in (int, float)
    assert set(hints) == set(inspect.signature(getattr(fastopt, spec.function_name)).parameters) | {"return"}
    hints = typing.get_type_hints(getattr(fastopt, spec.class_name).__init__)
    assert set(hints) == set(inspect.signature(getattr(fastopt, spec.class_name).__init__).parameters) - {"self"}


def _struct_fields(family):
    src = (CUDA_DIR / f"{family}.cuh").read_text()
    match = re.search(r"struct \w+Params \{\s*M ([^;]+);", src)
    assert match, f"no Params struct in {family}.cuh"
    return tuple(f.strip() for f in match.group(1).replace("\n", " ").split(","))


@pytest.mark.parametrize("spec", list(REGISTRY.values()), ids=lambda s: s.name)
def test_scalar_order_matches_kernel_struct(spec):
    """specs.scalars() fills the kernel's *Params struct by position: names and count must agree."""
    assert _struct_fields(spec.kernel) == spec.scalar_names
    hp = {k: (0.1 if v is REQUIRED else v) for k, v in spec.defaults.items()}
    assert len(spec.scalars(hp, 3, 1.0)) == len(spec.scalar_names)
    assert all(isinstance(x, float) for x in spec.scalars(hp, 3, 1.0))


def test_every_family_has_one_header_and_every_header_compiles_standalone(tmp_path):
    import shutil
    import subprocess
    kernels = {s.kernel for s in REGISTRY.values()}
    assert kernels <= {p.stem for p in CUDA_DIR.glob("*.cuh")}
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    for family in sorted(kernels) + ["clip"]:
        src = tmp_path / f"{family}.cpp"
        src.write_text(f'#include "{family}.cuh"\nint main() {{ return 0; }}\n')
        out = subprocess.run([cxx, "-std=c++17", "-Wall", "-Werror", "-I", str(CUDA_DIR), "-c", str(src), "-o",
                              str(tmp_path / f"{family}.o")], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


def test_bytes_per_element():
    hp = dict(REGISTRY["adam"].defaults)
    assert REGISTRY["adam"].bytes_per_element(hp) == 28
    assert REGISTRY["adam"].bytes_per_element(dict(hp, amsgrad=True)) == 36
    assert REGISTRY["sgd"].bytes_per_element(dict(REGISTRY["sgd"].defaults, lr=1.0)) == 12
    assert REGISTRY["lamb"].bytes_per_element(REGISTRY["lamb"].defaults) == 40


def test_nadam_mu_product_cache_matches_direct_product():
    from fastopt.specs import _nadam_mu, nadam_mu_product
    for t in (1, 2, 17, 300, 5):
        direct = 1.0
        for i in range(1, t + 1):
            direct *= _nadam_mu(0.9, 4e-3, i)
        assert nadam_mu_product(0.9, 4e-3, t) == direct


def test_radam_rectification_threshold():
    from fastopt.specs import radam_rectification
    assert radam_rectification(0.999, 1) == (False, 0.0)
    assert radam_rectification(0.999, 5)[0] is False
    rectified, rect = radam_rectification(0.999, 6)
    assert rectified and 0 < rect < 1
    assert radam_rectification(0.0, 100) == (False, 0.0)


def test_readme_table_lists_every_optimizer():
    readme = (CUDA_DIR.parent.parent / "README.md").read_text()
    for spec in REGISTRY.values():
        assert f"`{spec.function_name}`" in readme, spec.name
    for spec in COMPOSITE.values():
        assert f"`fastopt.{spec.class_name}`" in readme, spec.name
    # the list of the generated classes, in registry order (LARS was missing from it)
    listed = ", ".join(spec.class_name for spec in REGISTRY.values())
    assert f"`{listed}` (one per registry entry)" in " ".join(readme.split()), listed
    assert "make test" in readme and "make test" in (CUDA_DIR.parent.parent / ".ci" / "run").read_text()


@pytest.mark.parametrize("spec", list(COMPOSITE.values()), ids=lambda s: s.name)
def test_composite_spec_is_its_classes(spec):
    """Each composite optimizer's spec names its module, whose class (torch's name) fastopt exports, and
    whose hyperparameters and defaults are the class's constructor arguments (and torch's, where torch has it)."""
    import importlib
    from fastopt.specs import all_optimizer_names
    assert spec.name in all_optimizer_names() and spec.name not in REGISTRY
    cls = getattr(fastopt, spec.class_name)
    assert cls is getattr(importlib.import_module(f"fastopt.{spec.module}"), spec.class_name)
    assert spec.class_name in fastopt.__all__
    sig = inspect.signature(cls)
    names = [n for n in sig.parameters if n != "params"]
    defaults = spec.defaults
    for name, default in defaults.items():
        if name in sig.parameters:  # torch's tuples (betas) group two registry hyperparameters
            assert sig.parameters[name].default == default, (spec.name, name)
    torch = pytest.importorskip("torch")
    import fastopt.torch as fot
    tcls = getattr(fot, spec.class_name)
    assert spec.class_name in fot.__all__ and issubclass(tcls, torch.optim.Optimizer)
    if spec.torch_class:
        theirs = inspect.signature(getattr(torch.optim, spec.torch_class))
        ours = inspect.signature(tcls)
        for name, p in theirs.parameters.items():
            assert name in ours.parameters, (spec.name, name)
            if p.default is not inspect.Parameter.empty:
                assert ours.parameters[name].default == p.default, (spec.name, name)
    assert names  # every composite optimizer takes hyperparameters


@pytest.mark.parametrize("spec", list(REGISTRY.values()), ids=lambda s: s.name)
def test_state_init_matches_the_reference(spec):
    """spec.state_init (init_state, the classes) and reference.initial_state (the oracle) agree on
    every state's starting value, and init_state fills the arrays with it."""
    import numpy as np
    from fastopt import reference
    from conftest import option_combinations
    for hp in option_combinations(spec):
        fills = spec.state_init(hp)
        assert set(fills) == set(spec.states)
        for name in spec.states:
            assert fills[name] == reference.initial_state(spec.name, name, **hp)
        state = fastopt.init_state(spec.name, [np.ones(3), np.ones((2, 2), np.float32)],
                                   **{k: hp[k] for k in spec.state_options})
        for name, arrays in state.items():
            for a in arrays:
                want = 1.0 if fills[name] == "param" else fills[name]  # specs.PARAM: a copy of the (ones) params
                assert a.dtype in (np.float32, np.float64) and (a == np.asarray(want, a.dtype)).all()


def test_torch_positional_names_are_registry_arguments():
    """torch_positional names registry hyperparameters (or torch's tuples of them) or torch-only execution
    options; lr comes first; specs without a torch class have none."""
    torch_only = {"foreach", "capturable", "differentiable", "fused"}
    for spec in REGISTRY.values():
        if spec.torch_class is None:
            assert spec.torch_positional is None and spec.positional_hypers == ("lr",)
            continue
        names = set(spec.defaults) | set(spec.torch_groups)  # tuples: betas, Rprop's etas and step_sizes
        assert spec.torch_positional[0] == "lr"
        assert set(spec.torch_positional) <= names | torch_only, spec.name
