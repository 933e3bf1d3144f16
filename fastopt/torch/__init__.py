"""fastopt.torch: torch.optim optimizers that run fastopt's fused kernels.

    from fastopt.torch import AdamW          # instead of: from torch.optim import AdamW
    opt = AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

One torch.optim.Optimizer subclass per registry optimizer (fastopt/specs.py), generated from its spec:
torch.optim's constructor arguments, positional order, defaults and errors where torch has the optimizer
(torch's own constructor checks the arguments first, on a stand-in param, so what it refuses is refused with
its exception; foreach/fused accepted where torch's class takes them, checked by torch's rules, ignored;
capturable/differentiable=True refused); fastopt's extras (clip_grad_norm=, skip_nonfinite=) keyword-only.
step(closure=None) reads p.grad;
state, state_dict(), param groups, hooks, lr schedulers and torch.amp.GradScaler work as with torch.optim.
Updates land in place in the params' own storage (any dense layout) and bump autograd's version counters.
Complex params are updated as torch.optim updates them, as pairs of independent reals (not by LAMB and LARS:
per-tensor norms). Sparse gradients as torch takes them (SGD and Adagrad; README, "fastopt.torch").

The composite optimizers (fastopt.specs.COMPOSITE: LBFGS, Muon, Adafactor, SparseAdam) are written by hand in
their own modules (fastopt/torch/<module>.py), drop-ins for their torch.optim namesakes in the same way.

Importing fastopt does not import torch; importing fastopt.torch does.
"""
from __future__ import annotations

import inspect

import torch

from fastopt.specs import COMPOSITE, REGISTRY, OptimizerSpec
from fastopt.torch import arguments
from fastopt.torch.optimizer import SharesStateMemory, TorchOptimizer
# the composite optimizers (specs.COMPOSITE), one module each
from fastopt.torch.lbfgs import LBFGS
from fastopt.torch.muon import Muon
from fastopt.torch.adafactor import Adafactor
from fastopt.torch.sparse_adam import SparseAdam
from fastopt.torch.train_eval import TorchTrainEval

__all__ = ["TorchOptimizer", "make_class", *(spec.class_name for spec in REGISTRY.values()),
           *(spec.class_name for spec in COMPOSITE.values())]


def _docstring(spec: OptimizerSpec, sig) -> str:
    like = f"a drop-in for torch.optim.{spec.torch_class}" if spec.torch_class else "torch.optim-style"
    return (f"{spec.summary}\n\nfastopt.torch.{spec.class_name}{sig}: {like}, running fastopt's fused "
            f"'{spec.kernel}' kernel in place on the params' storage.\n\nUpdate rule (per element):\n\n"
            + "\n".join("    " + line for line in spec.rule.strip("\n").splitlines()))


def make_class(spec: OptimizerSpec) -> type:
    """The fastopt.torch class of one registry optimizer."""
    sig = arguments.signature(spec)
    group_keys = tuple(arguments.group_defaults(spec))
    extras = tuple(arguments.EXTRAS)

    def __init__(self, *args, **kwargs):
        bound = sig.bind(*args, **kwargs)  # TypeError for a missing, unknown or repeated argument
        bound.apply_defaults()
        values = dict(bound.arguments)
        params = values.pop("params")
        options = {name: values.pop(name) for name in extras}
        arguments.check_flags(values)  # capturable/differentiable=True: refused (where torch's class takes them)
        arguments.check_as_torch(spec, values)  # torch's errors, where torch has the optimizer
        defaults = {key: values[key] if key in values else spec.torch_group_flags[key] for key in group_keys}
        for key in arguments.constructor_tuples(spec):
            defaults[key] = arguments.as_constructor_tuple(defaults[key])
        TorchOptimizer.__init__(self, params, defaults, **options)

    P = inspect.Parameter
    __init__.__signature__ = sig.replace(parameters=[P("self", P.POSITIONAL_OR_KEYWORD), *sig.parameters.values()])
    __init__.__qualname__ = f"{spec.class_name}.__init__"
    # spec.train_eval (schedule-free): train()/eval() and a step() that refuses eval mode (fastopt/train_eval.py)
    bases = (TorchTrainEval, TorchOptimizer) if spec.train_eval else (TorchOptimizer,)
    if hasattr(getattr(torch.optim, spec.torch_class or "", None), "share_memory"):  # torch's Adagrad: Hogwild
        bases = (SharesStateMemory,) + bases
    return type(spec.class_name, bases, {
        "__init__": __init__, "spec": spec, "__module__": __name__, "__qualname__": spec.class_name,
        "__doc__": _docstring(spec, sig)})


for _spec in REGISTRY.values():
    globals()[_spec.class_name] = make_class(_spec)
del _spec
