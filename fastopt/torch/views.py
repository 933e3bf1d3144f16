"""Zero-copy views of torch tensors for the kernels, cached per param, and autograd's version counter.

The kernels see one array per tensor over the tensor's own storage. A contiguous tensor is viewed as it
is; any other dense layout (channels_last, a transposed weight) is viewed through the permutation of its
dims that makes it contiguous, as one flat span: param, grad and state then run element for element
over the same positions, provided they share the layout (same strides). CPU tensors become NumPy arrays
(the Cython kernels), CUDA tensors stay torch tensors (the CuPy backend views them zero-copy).
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

__all__ = ["layout", "dense_span", "check_own_memory", "kernel_view", "state_view", "flat_tensors",
           "numpy_bfloat16", "ParamEntry", "bump_versions", "scalar_view", "ABSMAX"]

# 8-bit state (state_dtype="int8") in a torch state dict: "<name>" holds the uint8 codes (the param's shape
# and layout) and "<name>_absmax" the float32 scales, one per 256 elements in the param's memory order (the
# NumPy classes' state dict keys, fastopt.statedict.ABSMAX)
ABSMAX = "_absmax"


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


def check_own_memory(t: torch.Tensor) -> None:
    """TypeError for a tensor subclass that keeps its elements in inner tensors, not in memory of its own
    (DTensor, from FSDP2's fully_shard or tensor parallelism; quantized tensor subclasses): the kernels
    write a tensor's own memory, which such a tensor does not have (its .numpy() and data_ptr() fail)."""
    if type(t) is not torch.nn.Parameter and type(t) is not torch.Tensor and is_traceable_wrapper_subclass(t):
        kind = type(t).__name__
        where, instead = "", "use torch.optim for such params"
        if kind == "DTensor":  # fastopt.torch.TorchOptimizer unwraps them (fastopt/torch/dtensor.py); not this caller
            where = " (FSDP2's fully_shard, tensor parallelism)"
            instead = ("the elementwise fastopt.torch optimizers (Adam, AdamW, SGD... not LAMB or LARS) update DTensor "
                       "params, this one needs whole tensors: use torch.optim for such params")
        raise TypeError(f"fastopt.torch updates tensors in their own memory; got a {kind}{where}, a tensor subclass "
                        f"whose elements live in inner tensors: {instead}")


def kernel_view(t: torch.Tensor, flat: bool):
    """The array a kernel reads and writes for t (same memory). flat: view the dense span as one run of
    elements (for a non-contiguous dense layout) shaped (1, ..., 1, n) with t's number of dims, which the
    optimizers that treat tensors by ndim read (LARS's exclude_1d); the caller checked that t is dense. A
    bfloat16 CPU tensor (NumPy has no bfloat16) is viewed through its bits as ml_dtypes' bfloat16, the dtype
    the CPU kernels take; a complex tensor as its pairs of reals (torch.view_as_real: one more dim, of 2)."""
    check_own_memory(t)
    t = t.detach()
    if flat:
        t = dense_span(t).reshape((1,) * (t.dim() - 1) + (-1,))
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.device.type == "cpu":
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(numpy_bfloat16())
        return t.numpy()
    return t


def state_view(s, flat: bool, signed: bool):
    """The kernel's state argument for one state: kernel_view of a tensor, or for 8-bit state (a pair of
    tensors (codes uint8, absmax float32)) the fastopt.precision.QuantizedState over their memory: codes
    viewed like the param (flat for a non-contiguous layout), so block k covers elements 256k..256k+255
    of the param in memory order."""
    if isinstance(s, tuple):
        from fastopt.precision import QuantizedState
        codes, absmax = s
        return QuantizedState(kernel_view(codes, flat), kernel_view(absmax, False), signed)
    return kernel_view(s, flat)


def flat_tensors(tensors) -> list:
    """The tensors of a state list, the pairs of 8-bit state unpacked (codes, absmax)."""
    out = []
    for s in tensors:
        if isinstance(s, tuple):
            out += s
        else:
            out.append(s)
    return out


def numpy_bfloat16():
    """ml_dtypes' bfloat16 NumPy dtype; TypeError naming the package when it is not installed."""
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError("bfloat16 params on the CPU need the ml_dtypes package (pip install ml_dtypes): "
                        "it gives NumPy, and so fastopt's CPU kernels, the bfloat16 dtype") from None
    return ml_dtypes.bfloat16


class ParamEntry:
    """What a step needs of one param, derived once and reused while the param keeps its storage and
    its state the same tensors (load_state_dict, `param.data = ...` or a new state tensor make a new
    entry): the kernel views of the param and its state, its step count, and the view of its grad while
    the grad is the same tensor from step to step (gradients accumulated into, zero_grad(set_to_none=False)).
    The checks here are the cheap ones; the backend's prepare() checks shapes and dtypes on every step,
    and a step that fails with cached entries is planned again from scratch before the error counts."""

    __slots__ = ("param", "ptr", "flat", "layout", "kind", "view", "state", "names", "used", "tensors",
                 "state_views", "check_names", "check_tensors", "check_ptrs", "step_tensor", "step_ptr",
                 "step_version", "step_view", "count",
                 "grad", "grad_ptr", "grad_view", "grad_seen")

    def __init__(self, p: torch.Tensor, state, names: tuple, used: tuple, tensors: tuple, signed: tuple = ()):
        self.param = p
        self.ptr = p.data_ptr()
        self.flat = not p.is_contiguous()
        self.layout = layout(p)
        self.kind = (p.dtype, p.device)
        self.view = kernel_view(p, self.flat)
        self.state = state          # the param's state dict (the object itself)
        self.names = names          # torch's names of the states this configuration uses
        self.used = used            # the same states' registry names
        self.tensors = tensors      # and their tensors (8-bit state: a pair (codes, absmax))
        signed = signed or (True,) * len(tensors)  # which map each 8-bit state takes (precision.signed_state)
        self.state_views = tuple(state_view(s, self.flat, sg) for s, sg in zip(tensors, signed))
        # the state dict entries that must stay these tensors (the scales of 8-bit state beside their codes)
        self.check_names, self.check_tensors = [], []
        for name, s in zip(names, tensors):
            if isinstance(s, tuple):
                self.check_names += [name, name + ABSMAX]
                self.check_tensors += s
            else:
                self.check_names.append(name)
                self.check_tensors.append(s)
        # and their memory: `state[name].data = ...` (moving state to another device, pinning) or set_() keeps
        # the tensor and replaces its storage under the cached views
        self.check_ptrs = [s.data_ptr() for s in self.check_tensors]
        self.step_tensor, self.step_ptr, self.step_version, self.step_view, self.count = None, 0, None, None, 0
        self.grad = self.grad_view = None
        self.grad_ptr = 0
        self.grad_seen = None       # weak reference to the last grad (kept without keeping it alive)

    def holds(self, p: torch.Tensor, state, names: tuple) -> bool:
        """p's memory and layout, the state dict and the names in use are those the entry was made for (its state
        tensors are the caller's to check: valid() here, dtensor.ShardEntry for a DTensor's local tensors)."""
        if state is not self.state or names != self.names or p.data_ptr() != self.ptr:
            return False
        # the same memory in another layout (`p.data = p.data.t()`): the views were made for the old one
        return not (p.is_contiguous() == self.flat or (self.flat and layout(p) != self.layout))

    def valid(self, p: torch.Tensor, state, names: tuple) -> bool:
        return self.holds(p, state, names) and all(
            state.get(name) is s and s.data_ptr() == ptr
            for name, s, ptr in zip(self.check_names, self.check_tensors, self.check_ptrs))

    def cached_grad_view(self, g: torch.Tensor):
        """The grad's kernel view when g is the grad of the last step, same storage; else None."""
        if g is self.grad and g.data_ptr() == self.grad_ptr:
            return self.grad_view
        self.grad = self.grad_view = None  # a new grad tensor (zero_grad(set_to_none=True)): let the old go
        return None

    def remember_grad(self, g: torch.Tensor, view) -> None:
        """Keep g's view once g shows up on two steps in a row (then it is long-lived anyway)."""
        seen = self.grad_seen() if self.grad_seen is not None else None
        if seen is g:
            self.grad, self.grad_ptr, self.grad_view = g, g.data_ptr(), view
        else:
            self.grad_seen = weakref.ref(g)

    def known_count(self, step_tensor):
        """The step count, when the step tensor is the one this entry advanced last and still holds that count;
        else None: read the tensor. A CPU count is compared through its NumPy view (so a write through .data,
        which autograd's version counter misses, is seen too); a GPU count by its autograd version (reading it
        would synchronise)."""
        if step_tensor is not self.step_tensor or step_tensor.data_ptr() != self.step_ptr:
            return None
        view = self.step_view
        if view is not None:
            return self.count if view[()] == self.count else None
        if self.step_version is not None and step_tensor._version == self.step_version:
            return self.count
        return None

    def counted(self, step_tensor, count: int) -> None:
        """Remember the count the step tensor holds now (after this step)."""
        ptr = step_tensor.data_ptr()
        if step_tensor is not self.step_tensor or ptr != self.step_ptr:
            # a NumPy view of a CPU step tensor: the next step writes its new count there (3 us less per
            # param than a torch op on a 0-d tensor)
            self.step_view = scalar_view(step_tensor)
        self.step_tensor, self.step_ptr, self.count = step_tensor, ptr, count
        # an inference tensor (made under torch.inference_mode) has no version: its count is read each step
        self.step_version = None if self.step_view is not None or step_tensor.is_inference() else step_tensor._version

    def write_count(self, step_tensor, count: int) -> bool:
        """Store the new count through the cached view when step_tensor is the remembered one (the caller
        bumps its version); False when the caller must update the tensor itself."""
        if step_tensor is self.step_tensor and self.step_view is not None and step_tensor.data_ptr() == self.step_ptr:
            self.step_view[()] = count  # float32 like torch's step tensor: exact up to 2**24 steps
            return True
        return False


def scalar_view(t: torch.Tensor):
    """A 0-d NumPy view of a one-element CPU tensor (a step count, torch-only state), None where there is
    none (a GPU tensor, one that requires grad)."""
    if t.device.type != "cpu" or t.numel() != 1 or t.requires_grad:
        return None
    try:
        return t.numpy().reshape(())
    except (RuntimeError, TypeError):  # a dtype NumPy lacks
        return None


def bump_versions(tensors) -> None:
    """Autograd's version counter of every tensor the step wrote, bumped once, as an in-place torch op
    does: a graph that saved the old value then raises 'modified by an inplace operation'. Inference
    tensors (made under torch.inference_mode) have no counter and are left out."""
    if tensors:
        try:
            torch.autograd.graph.increment_version(tensors)
        except RuntimeError:  # "Inference tensors do not track version counter": bump the others in one call
            torch.autograd.graph.increment_version([t for t in tensors if not t.is_inference()])
