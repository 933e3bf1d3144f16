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

This module holds what the two families share (Modes: the switch and step()'s guard); each family's mixin sits
beside its classes (fastopt.optim for the NumPy classes, fastopt/torch/train_eval.py for fastopt.torch), and the
classes get it from the spec (fastopt.optim's class factory, fastopt.torch.make_class): nothing is written per
optimizer.
"""
from __future__ import annotations

__all__ = ["Modes"]

EVAL_STEP = ("{cls}.step() called in eval mode: call opt.train() before training steps (opt.eval() moved the "
              "params to the averaged point; the schedulefree package raises here too)")


class Modes:
    """What both mixins (TrainEval of fastopt.optim, TorchTrainEval of fastopt.torch) share: eval() / train(), the switch (every group's weight computed, and so its
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
            raise RuntimeError(EVAL_STEP.format(cls=type(self).__name__))
