"""Arrays over torch tensors for the composite optimizers (fastopt/torch/<module>.py), which run their
NumPy/CuPy implementation on the tensors' own memory: a NumPy view of a CPU tensor, a CuPy view of a CUDA
one, and the CuPy context that runs on the tensors' device and torch's current stream there."""
from __future__ import annotations

import contextlib

import torch

from fastopt.torch.views import check_own_memory, kernel_view


def array_view(t: torch.Tensor, owner: str):
    """t's memory in t's logical shape and strides: NumPy for a CPU tensor (bfloat16 as ml_dtypes'
    bfloat16), CuPy for a CUDA one; TypeError naming `owner` (the optimizer) when CuPy is missing."""
    if t.device.type == "cpu":
        return kernel_view(t, False)
    check_own_memory(t)
    try:
        import cupy
    except ImportError:
        raise TypeError(f"{owner} on {t.device} tensors needs CuPy (pip install cupy-cuda12x or cupy-cuda13x)") from None
    return cupy.asarray(t.detach())


def resolved_grad(g: torch.Tensor) -> torch.Tensor:
    """A grad with its lazy negation or conjugation applied (a copy then; the update only reads grads): the
    memory of z.conj().imag or torch._neg_view(x) holds the other sign, which a view of it would read."""
    if g.is_conj():
        g = g.resolve_conj()
    return g.resolve_neg() if g.is_neg() else g


def on_torch_stream(device: torch.device):
    """Context for CuPy work on tensors of `device`: that device current, and torch's current stream there
    as CuPy's (so the work is ordered with torch's own kernels); nothing for the CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    import cupy
    index = device.index if device.index is not None else torch.cuda.current_device()
    stack = contextlib.ExitStack()
    stack.enter_context(cupy.cuda.Device(index))
    stack.enter_context(cupy.cuda.ExternalStream(torch.cuda.current_stream(index).cuda_stream))
    return stack
