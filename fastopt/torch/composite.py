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

GuardedComposite adds fastopt's clip_grad_norm= and skip_nonfinite= (fastopt/grad_guard.py) to such a class
(Muon, Adafactor, SparseAdam), which says where its plan's gradients are (_plan_grads, or their sum of squares:
_plan_sum_sq) and how to run with scaled ones (_scaled_plan): a step to skip writes nothing and bumps no version.
"""
from __future__ import annotations

import torch

from fastopt.grad_guard import GuardedSteps, sum_of_squares
from fastopt.torch.arguments import check_extras, check_listed_once, check_saved_state
from fastopt.torch.arrays import on_torch_stream
from fastopt.torch.loading import load_between_hooks
from fastopt.torch.views import bump_versions

__all__ = ["CompositeOptimizer", "GuardedComposite", "CPU"]

CPU = torch.device("cpu")


class CompositeOptimizer(torch.optim.Optimizer):
    """A torch.optim.Optimizer whose step is plan (checks only), then apply (writes); see the module docstring."""

    def _plan(self):
        raise NotImplementedError(f"{type(self).__name__} must define _plan()")

    def _plan_device(self, plan) -> torch.device:
        raise NotImplementedError(f"{type(self).__name__} must define _plan_device(plan)")

    def _apply(self, plan) -> list:
        raise NotImplementedError(f"{type(self).__name__} must define _apply(plan)")

    def _guarded(self, plan):
        """The plan to apply, or None to skip the step (GuardedComposite); as it is here."""
        return plan

    def load_state_dict(self, state_dict) -> None:
        """torch.optim's, after every param's entry is checked (a dict of tensors and a count): torch swaps
        the state in before it converts the counts, and a damaged entry failed there or at the next step.
        The check is of the dict torch loads, after the load_state_dict pre-hooks (fastopt.torch.loading)."""
        load_between_hooks(self, lambda: super(CompositeOptimizer, self).load_state_dict(state_dict),
                           lambda loaded: check_saved_state(loaded, tensors_only=True))

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every param whose grad is not None (the class's rule); returns the closure's loss.
        Everything is checked before anything is written."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._fastopt_update()
        return loss

    @torch.compiler.disable  # as TorchOptimizer._fastopt_update: torch.compile runs it as it is
    def _fastopt_update(self) -> None:
        check_listed_once(self.param_groups)
        plan = self._plan()
        with on_torch_stream(self._plan_device(plan)):
            plan = self._guarded(plan)
            if plan is None:
                return
            written = self._apply(plan)
        bump_versions(written)


class GuardedComposite(GuardedSteps, CompositeOptimizer):
    """A CompositeOptimizer with clip_grad_norm= and skip_nonfinite=; the options and skipped_steps travel
    with pickling and deepcopy (torch's load_state_dict keeps the optimizer's own)."""

    @staticmethod
    def _checked_options(clip_grad_norm, skip_nonfinite) -> tuple[float | None, bool]:
        return check_extras(clip_grad_norm, skip_nonfinite)  # fastopt.torch's rule (clip_grad_norm > 0)

    def _plan_grads(self, plan) -> list:
        raise NotImplementedError(f"{type(self).__name__} must define _plan_grads(plan) or _plan_sum_sq(plan)")

    def _plan_sum_sq(self, plan) -> float:
        """The sum of squares of the plan's gradients (float64)."""
        return sum_of_squares(self._plan_grads(plan))

    def _scaled_plan(self, plan, coef: float):
        raise NotImplementedError(f"{type(self).__name__} must define _scaled_plan(plan, coef)")

    def _guarded(self, plan):
        coef = self.guard_sum(lambda: self._plan_sum_sq(plan))
        if coef is None:
            return None
        return plan if coef == 1.0 else self._scaled_plan(plan, coef)

    def __getstate__(self):
        state = super().__getstate__()
        state["fastopt"] = {"clip_grad_norm": self.clip_grad_norm, "skip_nonfinite": self.skip_nonfinite,
                            "skipped_steps": self.skipped_steps}
        return state

    def __setstate__(self, state):
        extras = state.pop("fastopt", None)
        if extras is None:  # torch's load_state_dict: the optimizer keeps its own
            extras = {"clip_grad_norm": self.__dict__.get("_clip_grad_norm"),
                      "skip_nonfinite": self.__dict__.get("_skip_nonfinite", False),
                      "skipped_steps": self.__dict__.get("skipped_steps", 0)}
        super().__setstate__(state)
        self._init_guard(extras["clip_grad_norm"], extras["skip_nonfinite"])
        self.skipped_steps = extras["skipped_steps"]
