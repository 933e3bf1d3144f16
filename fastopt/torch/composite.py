"""The step(closure) of fastopt.torch's composite optimizers (Adafactor, Muon, SparseAdam), written once.

    class Adafactor(CompositeOptimizer):
        def _plan(self): ...             # every check of the step, nothing written; returns the plan
        def _plan_device(self, plan): ...# the device of the plan's tensors (CPU when there are none)
        def _apply(self, plan): ...      # the writes; returns the tensors written

step(closure=None), as torch.optim's: the closure (if any) runs with gradients enabled and its loss is
returned; then, with autograd off, _plan() checks everything (a bad step raises before the first write),
_apply(plan) runs on torch's current stream of the plan's device (CuPy work ordered with torch's kernels;
nothing for the CPU), and the autograd version counter of every tensor written is bumped once, as torch's
in-place ops do. LBFGS is not one of them: its step requires the closure and evaluates it many times.
"""
from __future__ import annotations

import torch

from fastopt.torch.arguments import check_saved_state
from fastopt.torch.arrays import on_torch_stream
from fastopt.torch.views import bump_versions

__all__ = ["CompositeOptimizer", "CPU"]

CPU = torch.device("cpu")


class CompositeOptimizer(torch.optim.Optimizer):
    """A torch.optim.Optimizer whose step is plan (checks only), then apply (writes); see the module docstring."""

    def _plan(self):
        raise NotImplementedError(f"{type(self).__name__} must define _plan()")

    def _plan_device(self, plan) -> torch.device:
        raise NotImplementedError(f"{type(self).__name__} must define _plan_device(plan)")

    def _apply(self, plan) -> list:
        raise NotImplementedError(f"{type(self).__name__} must define _apply(plan)")

    def load_state_dict(self, state_dict) -> None:
        """torch.optim's, after every param's entry is checked (a dict of tensors and a count): torch swaps
        the state in before it converts the counts, and a damaged entry failed there or at the next step."""
        check_saved_state(state_dict, tensors_only=True)
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every param whose grad is not None (the class's rule); returns the closure's loss.
        Everything is checked before anything is written."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = self._plan()
        with on_torch_stream(self._plan_device(plan)):
            written = self._apply(plan)
        bump_versions(written)
        return loss
