"""The kernel calls of one fastopt.torch step: what the planner (optimizer.py) and the steady-state path
(steady.py) hand to the backends."""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Bucket", "Plan"]


@dataclass
class Bucket:
    """One kernel call: params of one group, dtype, device and step count."""
    group: dict
    step: int                                       # the 1-based number of the step being taken
    numbers: list = field(default_factory=list)     # the params' numbers in the optimizer (messages)
    params: list = field(default_factory=list)      # the param tensors
    entries: list = field(default_factory=list)     # their cached ParamEntry (None on a first step)
    param_views: list = field(default_factory=list)
    grad_views: list = field(default_factory=list)
    state_views: dict = field(default_factory=dict)  # registry state name -> views
    written: list = field(default_factory=list)      # tensors the kernel writes (version counters)
    carried: dict = field(default_factory=dict)  # torch state carried from the last step (spec.torch_carry)
    hp: dict | None = None
    backend: object = None
    prepared: object = None


@dataclass
class Plan:
    buckets: list
    new_state: list        # (param, {torch name: tensor}) to store once the step runs
    steady: object = None  # the steady.Steady this plan came from (None: planned in full)
    sharded: bool = False  # a DTensor param is in it (the steady path is for plain tensors)
