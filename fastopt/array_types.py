"""Type aliases of the public API (for annotations; fastopt ships py.typed).

fastopt takes any array that exposes its memory: NumPy and CuPy arrays, Numba device arrays, torch
tensors, memoryviews, array.array. There is no common static type for all of them, so `Array` is
`Any` with a name that documents the intent.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence, Union

Array = Any                                  # one array-like (see above)
Arrays = Union[Array, Sequence[Array]]       # one array, or a list for one multi-tensor call
Scalar = Union[float, Array]                 # a Python float, or a 0-d array on the params' device
Schedule = Callable[[int], float]            # number of updates applied so far -> learning rate

__all__ = ["Array", "Arrays", "Scalar", "Schedule"]
