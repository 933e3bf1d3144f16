"""train() / eval() of the fastopt.torch classes with spec.train_eval (schedule-free SGD and AdamW): the mode and
the switch are described in fastopt/train_eval.py, which holds what this mixin shares with the NumPy classes'."""
from __future__ import annotations

import torch

import fastopt.torch.arguments as arguments
from fastopt.torch.loading import load_between_hooks
from fastopt.train_eval import Modes

__all__ = ["TorchTrainEval"]


class TorchTrainEval(Modes):
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
        """torch's, with each loaded group's "train_mode" checked first (a bool; on the dict torch loads, after
        the user's load pre-hooks); a group saved without one (a state dict of an older fastopt) keeps the mode
        of the group it replaces."""
        def check(loaded):
            groups = loaded.get("param_groups") if isinstance(loaded, dict) else None
            for gi, group in enumerate(groups if isinstance(groups, (list, tuple)) else []):
                mode = group.get("train_mode", True) if isinstance(group, dict) else True
                if not isinstance(mode, bool):
                    raise ValueError(f"param group {gi}: 'train_mode' must be a bool, got {mode!r}")
            return [group.get("train_mode", True) for group in self.param_groups]

        def keep_modes(before):
            for group, mode in zip(self.param_groups, before):
                group.setdefault("train_mode", mode)

        load_between_hooks(self, lambda: super(TorchTrainEval, self).load_state_dict(state_dict), check, keep_modes)

    def _group_weights(self, weight) -> list:
        # torch's group forms (betas)
        return [weight(arguments.registry_hp(self.spec, group)) for group in self.param_groups]

    def _move(self, state, weights) -> None:
        with torch.no_grad():
            for gi, w in weights.items():
                for p in self.param_groups[gi]["params"]:
                    z = self.state[p].get(state) if p in self.state else None
                    if isinstance(z, torch.Tensor):
                        p.lerp_(z.to(device=p.device, dtype=p.dtype), w)

    def step(self, closure=None):
        self._check_train_mode()
        return super().step(closure)

    @torch.compiler.disable  # read on the host, as TorchOptimizer._fastopt_update: torch.compile runs it as it is
    def _check_train_mode(self) -> None:
        super()._check_train_mode()
