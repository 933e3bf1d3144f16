"""Zero-copy views of torch tensors for the kernels, cached per param, and autograd's version counter.

The kernels see one array per tensor over the tensor's own storage. A contiguous tensor is viewed as it
is; any other dense layout (channels_last, a transposed weight) is viewed through the permutation of its
dims that makes it contiguous, as one flat span: param, grad and state then run element for element
over the same positions, provided they share the layout (same strides). CPU tensors become NumPy arrays
(the Cython kernels), CUDA tensors stay torch tensors (the CuPy backend views them zero-copy).
"""
from __future__ import annotations

import torch

__all__ = ["layout", "dense_span", "kernel_view", "ViewCache", "bump_versions"]


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


class ViewCache:
    """Per param: its kernel view and its state tensors' views, re-derived only when a tensor is
    replaced or its storage, shape or strides change (param.data = ..., load_state_dict, .set_())."""

    __slots__ = ("_entries",)

    def __init__(self):
        self._entries: dict = {}

    def clear(self):
        self._entries.clear()

    def param(self, p: torch.Tensor, flat: bool):
        key = (p.data_ptr(), p.shape, p.stride(), p.dtype, p.device)
        entry = self._entries.get(id(p))
        if entry is None or entry[0] != key:
            entry = (key, kernel_view(p, flat), {}, p)  # p kept alive: its id stays its own
            self._entries[id(p)] = entry
        return entry[1]

    def state(self, p: torch.Tensor, name: str, s: torch.Tensor, flat: bool):
        states = self._entries[id(p)][2]
        cached = states.get(name)
        ptr = s.data_ptr()
        if cached is None or cached[0] is not s or cached[1] != ptr:
            cached = (s, ptr, kernel_view(s, flat))
            states[name] = cached
        return cached[2]

    def forget(self, keep_ids) -> None:
        """Drop the entries of params no longer in the optimizer (a param group removed by hand)."""
        for key in [k for k in self._entries if k not in keep_ids]:
            del self._entries[key]


def bump_versions(tensors) -> None:
    """Autograd's version counter of every tensor the step wrote, bumped once, as an in-place torch op
    does: a graph that saved the old value then raises 'modified by an inplace operation'."""
    if tensors:
        torch.autograd.graph.increment_version(tensors)
