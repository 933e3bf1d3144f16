"""train() / eval() of the optimizers whose params hold another point than the one to evaluate (spec.train_eval:
schedule-free SGD and AdamW, Defazio et al. 2024).

While training, a schedule-free optimizer's params hold y (where gradients are taken); the model to evaluate
(and to checkpoint) is x = lerp(y, z, 1 - 1/beta1). `opt.eval()` moves every param that has taken a step to x,
`opt.train()` moves it back (lerp(x, z, 1 - beta1)), as schedulefree.*ScheduleFree.eval()/train() do; a
second eval() (or train()) does nothing, and step() in eval mode raises. Unlike the package, which starts in
eval mode and needs a train() before its first step, the optimizers start in train mode (before the first
step y == z == x, so the package's first train() changes nothing either). The mode is the optimizer's, not
recorded in state_dict() (the package's advice stands: save in eval mode, resume after train()).

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


class TrainEval:
    """Mixin of the NumPy-style classes (fastopt.optim.Optimizer subclasses) with spec.train_eval."""

    _fastopt_train_mode = True  # the class default: an optimizer starts in train mode

    @property
    def train_mode(self) -> bool:
        """True between train() (or construction) and eval()."""
        return self._fastopt_train_mode

    def eval(self) -> None:
        """Move every param that has taken a step from y to the evaluation point x = lerp(y, z, 1 - 1/beta1)
        (one fused multi-tensor pass per group and dtype); nothing when already in eval mode."""
        self._switch(False)

    def train(self) -> None:
        """Move the params back from x to y = lerp(x, z, 1 - beta1); nothing when already in train mode."""
        self._switch(True)

    def _switch(self, train: bool) -> None:
        if self._fastopt_train_mode == train:
            return
        from fastopt.averaging import lerp_
        state, eval_weight, train_weight = self.spec.train_eval
        weight = train_weight if train else eval_weight
        # every group's hyperparameters are checked before the first param moves
        weights = [weight(self._hyperparameters(gi)[0]) for gi in range(len(self.param_groups))]
        for gi, buckets in enumerate(self._buckets):
            for bucket in buckets:
                zs = bucket.states.get(state)
                if zs is not None:  # none yet: no step taken, y == z == x (the package skips such params too)
                    lerp_(bucket.params, zs, weights[gi], backend=self.backend)
        self._fastopt_train_mode = train

    def step(self, grads):
        if not self._fastopt_train_mode:
            raise RuntimeError(_EVAL_STEP.format(cls=type(self).__name__))
        return super().step(grads)


class TorchTrainEval:
    """Mixin of the fastopt.torch classes (fastopt.torch.TorchOptimizer subclasses) with spec.train_eval."""

    _fastopt_train_mode = True

    @property
    def train_mode(self) -> bool:
        return self._fastopt_train_mode

    def eval(self) -> None:
        """p.lerp_(z, 1 - 1/beta1) for every param with a z, as the package's eval()."""
        self._switch(False)

    def train(self) -> None:
        """p.lerp_(z, 1 - beta1) for every param with a z, as the package's train()."""
        self._switch(True)

    def _switch(self, train: bool) -> None:
        if self._fastopt_train_mode == train:
            return
        import torch

        import fastopt.torch.arguments as arguments  # the module itself: no import of the fastopt.torch package
        state, eval_weight, train_weight = self.spec.train_eval
        weight = train_weight if train else eval_weight
        # every group's hyperparameters, from torch's group forms (betas), checked before the first param moves
        weights = [weight(arguments.registry_hp(self.spec, group)) for group in self.param_groups]
        with torch.no_grad():
            for group, w in zip(self.param_groups, weights):
                for p in group["params"]:
                    z = self.state[p].get(state) if p in self.state else None
                    if isinstance(z, torch.Tensor):
                        p.lerp_(z.to(device=p.device, dtype=p.dtype), w)
        self._fastopt_train_mode = train

    def step(self, closure=None):
        if not self._fastopt_train_mode:
            raise RuntimeError(_EVAL_STEP.format(cls=type(self).__name__))
        return super().step(closure)
