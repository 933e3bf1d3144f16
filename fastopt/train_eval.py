"""train() / eval() of the optimizers whose params hold another point than the one to evaluate (spec.train_eval:
schedule-free SGD and AdamW, Defazio et al. 2024).

While training, a schedule-free optimizer's params hold y (where gradients are taken); the model to evaluate
(and to checkpoint) is x = lerp(y, z, 1 - 1/beta1). `opt.eval()` moves every param that has taken a step to x,
`opt.train()` moves it back (lerp(x, z, 1 - beta1)), as schedulefree.*ScheduleFree.eval()/train() do; a
second eval() (or train()) does nothing, and step() in eval mode raises. Unlike the package, which starts in
eval mode and needs a train() before its first step, the optimizers start in train mode (before the first
step y == z == x, so the package's first train() changes nothing either). The mode is saved with the state and
restored with it (the NumPy classes: state_dict()'s "fastopt" entry and checkpoints; fastopt.torch: each param
group's "train_mode", as the package keeps it), so the package's advice works: save in eval mode (the params
then hold x), load, and train() moves them back to y.

The classes get these methods from the spec (fastopt.optim._make_class, fastopt.torch.make_class): nothing is
written per optimizer.
"""
from __future__ import annotations

import numpy as np

__all__ = ["TrainEval", "TorchTrainEval", "copy_param"]

_EVAL_STEP = ("{cls}.step() called in eval mode: call opt.train() before training steps (opt.eval() moved the "
              "params to the averaged point; the schedulefree package raises here too)")


def copy_param(dst, p) -> None:
    """dst[...] = p, widened to dst's dtype (16-bit params keep float32 state), on dst's own device."""
    from fastopt.backends.dispatch import as_numpy
    if isinstance(dst, np.ndarray):
        dst[...] = as_numpy(p, "params")
    else:
        from fastopt.arrays import copy_into
        copy_into(dst, p)


class _Modes:
    """What both mixins share: eval() / train(), the switch (every group's weight computed, and so its
    hyperparameters checked, before the first param moves) and step()'s guard. A subclass gives train_mode,
    _groups_in_mode(train) (the groups a switch away from that mode moves), _set_mode(groups, train),
    _group_weights(weight) (one weight per group) and _move(state, weights) (each param with that state moved;
    weights: group index -> weight)."""

    def eval(self) -> None:
        """Move every param that has taken a step from y to the evaluation point x = lerp(y, z, 1 - 1/beta1)
        (as the package's eval()); nothing when already in eval mode."""
        self._switch(False)

    def train(self) -> None:
        """Move the params back from x to y = lerp(x, z, 1 - beta1) (as the package's train()); nothing when
        already in train mode."""
        self._switch(True)

    def _switch(self, train: bool) -> None:
        groups = self._groups_in_mode(not train)
        if not groups:
            return
        state, eval_weight, train_weight = self.spec.train_eval
        weights = self._group_weights(train_weight if train else eval_weight)
        self._move(state, {gi: weights[gi] for gi in groups})
        self._set_mode(groups, train)

    def _check_train_mode(self) -> None:
        if not self.train_mode:
            raise RuntimeError(_EVAL_STEP.format(cls=type(self).__name__))


class TrainEval(_Modes):
    """Mixin of the NumPy-style classes (fastopt.optim.Optimizer subclasses) with spec.train_eval: one mode for
    the optimizer (export_state / apply_state carry it); each switch is one fused multi-tensor lerp per group
    and dtype."""

    _fastopt_train_mode = True  # the class default: an optimizer starts in train mode

    @property
    def train_mode(self) -> bool:
        """True between train() (or construction) and eval()."""
        return self._fastopt_train_mode

    def _groups_in_mode(self, train: bool) -> list:
        return list(range(len(self.param_groups))) if self._fastopt_train_mode == train else []

    def _set_mode(self, groups, train: bool) -> None:
        self._fastopt_train_mode = train

    def _group_weights(self, weight) -> list:
        return [weight(self._hyperparameters(gi)[0]) for gi in range(len(self.param_groups))]

    def _move(self, state, weights) -> None:
        from fastopt.averaging import lerp_all_
        # every group's and dtype's call checked before the first param moves (a read-only param of a later
        # group left the earlier groups at x and the mode at train)
        lerp_all_([(bucket.params, zs, weights[gi], bucket.indices)
                   for gi, buckets in enumerate(self._buckets) for bucket in buckets
                   # no z yet: no step taken, y == z == x (the package skips such params too)
                   for zs in [bucket.states.get(state)] if zs is not None],
                  ("params", state), backend=self.backend)

    def step(self, grads):
        self._check_train_mode()
        return super().step(grads)

    def export_state(self):
        state = super().export_state()
        state.train_mode = self._fastopt_train_mode
        return state

    def apply_state(self, plan) -> None:
        super().apply_state(plan)
        if plan.state.train_mode is not None:  # the saved params are at the saved mode's point
            self._fastopt_train_mode = plan.state.train_mode


class TorchTrainEval(_Modes):
    """Mixin of the fastopt.torch classes (fastopt.torch.TorchOptimizer subclasses) with spec.train_eval: the mode
    is each param group's "train_mode" (True in a new group), as the package keeps it, so that state_dict() saves
    it and load_state_dict() restores it; each switch is p.lerp_(z, weight) for every param with a z, as the
    package's."""

    @property
    def train_mode(self) -> bool:
        """True when every param group is in train mode: between train() (or construction) and eval()."""
        return all(group.get("train_mode", True) for group in self.param_groups)

    def _groups_in_mode(self, train: bool) -> list:
        return [gi for gi, group in enumerate(self.param_groups) if group.get("train_mode", True) == train]

    def _set_mode(self, groups, train: bool) -> None:
        for gi in groups:
            self.param_groups[gi]["train_mode"] = train

    def add_param_group(self, param_group) -> None:
        if isinstance(param_group, dict):
            param_group.setdefault("train_mode", True)
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict) -> None:
        """torch's, with each saved group's "train_mode" checked first (a bool); a group saved without one
        (a state dict of an older fastopt) keeps the mode of the group it replaces."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        for gi, group in enumerate(groups if isinstance(groups, (list, tuple)) else []):
            mode = group.get("train_mode", True) if isinstance(group, dict) else True
            if not isinstance(mode, bool):
                raise ValueError(f"param group {gi}: 'train_mode' must be a bool, got {mode!r}")
        before = [group.get("train_mode", True) for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, mode in zip(self.param_groups, before):
            group.setdefault("train_mode", mode)

    def _group_weights(self, weight) -> list:
        import fastopt.torch.arguments as arguments  # the module itself: no import of the fastopt.torch package
        # torch's group forms (betas)
        return [weight(arguments.registry_hp(self.spec, group)) for group in self.param_groups]

    def _move(self, state, weights) -> None:
        import torch
        with torch.no_grad():
            for gi, w in weights.items():
                for p in self.param_groups[gi]["params"]:
                    z = self.state[p].get(state) if p in self.state else None
                    if isinstance(z, torch.Tensor):
                        p.lerp_(z.to(device=p.device, dtype=p.dtype), w)

    def step(self, closure=None):
        self._check_train_mode()
        return super().step(closure)
