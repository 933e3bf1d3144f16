"""Zero-copy views of torch tensors for the kernels, cached per param, and autograd's version counter.

The kernels see one array per tensor over the tensor's own storage. A contiguous tensor is viewed as it
is; any other dense layout (channels_last, a transposed weight) is viewed through the permutation of its
dims that makes it contiguous, as one flat span: param, grad and state then run element for element
over the same positions, provided they share the layout (same strides). CPU tensors become NumPy arrays
(the Cython kernels), CUDA tensors stay torch tensors (the CuPy backend views them zero-copy).
"""
from __future__ import annotations

import torch

__all__ = ["layout", "dense_span", "kernel_view", "ParamEntry", "bump_versions"]


def layout(t: torch.Tensor) -> tuple:
    """What decides which element sits where in memory: the strides of the dims longer than 1."""
    return tuple(s if n > 1 else 0 for n, s in zip(t.shape, t.stride()))


def dense_span(t: torch.Tensor):
    """A tensor over t's memory in storage order (t itself when contiguous, else a flat 1-D view), or
    None when t is not dense (gaps or overlaps between its elements)."""
    if t.is_contiguous():
        return t
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    permuted = t.permute(order)
    if not permuted.is_contiguous():
        return None
    return permuted.view(-1)


def kernel_view(t: torch.Tensor, flat: bool):
    """The array a kernel reads and writes for t (same memory). flat: view the dense span as 1-D (for a
    non-contiguous dense layout); the caller checked that t is dense."""
    t = t.detach()
    if flat:
        t = dense_span(t).reshape(-1)
    if t.device.type == "cpu":
        return t.numpy()
    return t


class ParamEntry:
    """What a step needs of one param, derived once and reused while the param keeps its storage and
    shape and its state keeps the same tensors (load_state_dict, `param.data = ...` or a new state
    tensor make a new entry): the kernel views of the param and its state, and its step count."""

    __slots__ = ("param", "ptr", "shape", "flat", "layout", "view", "state", "names", "tensors",
                 "state_views", "step_tensor", "step_version", "count")

    def __init__(self, p: torch.Tensor, state, names: tuple, tensors: tuple):
        self.param = p
        self.ptr, self.shape = p.data_ptr(), p.shape
        self.flat = not p.is_contiguous()
        self.layout = layout(p)
        self.view = kernel_view(p, self.flat)
        self.state = state          # the param's state dict (the object itself)
        self.names = names          # torch's names of the states this configuration uses
        self.tensors = tensors      # and their tensors
        self.state_views = tuple(kernel_view(s, self.flat) for s in tensors)
        self.step_tensor, self.step_version, self.count = None, -1, 0

    def valid(self, p: torch.Tensor, state, names: tuple) -> bool:
        if state is not self.state or names != self.names or p.data_ptr() != self.ptr or p.shape != self.shape:
            return False
        for name, s in zip(names, self.tensors):
            if state.get(name) is not s:
                return False
        return True

    def known_count(self, step_tensor):
        """The step count, when the step tensor is the one this entry advanced last and nobody changed it
        since (its autograd version counts in-place writes); else None: read the tensor."""
        if step_tensor is self.step_tensor and step_tensor._version == self.step_version:
            return self.count
        return None

    def counted(self, step_tensor, count: int) -> None:
        self.step_tensor, self.step_version, self.count = step_tensor, step_tensor._version, count


def bump_versions(tensors) -> None:
    """Autograd's version counter of every tensor the step wrote, bumped once, as an in-place torch op
    does: a graph that saved the old value then raises 'modified by an inplace operation'."""
    if tensors:
        torch.autograd.graph.increment_version(tensors)
