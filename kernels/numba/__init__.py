"""Numba CUDA kernels. math.py: the per-element math of each kernel family, found by name
(`<spec.kernel>_math`) and reading its scalars by name; kernels.py: the launch kernels, generated per family
from the registry (fastopt.specs.REGISTRY). Imported only when the numba backend is first used."""
