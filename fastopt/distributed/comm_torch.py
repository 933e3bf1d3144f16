"""torch.distributed adapter: torch tensors, any process group (gloo on the CPU, nccl on the GPU).

The flat buffers are torch tensors on the group's device; fastopt's kernels update them through a view
of the same memory (NumPy for CPU tensors, CuPy for CUDA tensors). reduce_scatter is
`reduce_scatter_single` (torch >= 2.13; `reduce_scatter_tensor` before) and all_gather is
`all_gather_single` (`all_gather_into_tensor`), in place, both with async_op=True: non-blocking, one
Work per bucket. gloo has no reduce-scatter on the CPU in some torch versions: when the engine says it
does not support it, the adapter warns once and uses all_reduce of the whole buffer followed by a slice
(twice the traffic). torch 2.13's gloo supports both collectives on the CPU (tests/distributed checks it).

Failures: every collective runs under the process group's timeout (`init_process_group(timeout=...)`,
default 30 minutes for gloo; set a short one in tests): a dead or stuck rank makes the others raise
instead of waiting forever.
"""
from __future__ import annotations

import warnings

import numpy as np

from fastopt.arrays import refuse_lazy_negation
from fastopt.distributed.comm_base import DONE, Communicator


class _Result:
    __slots__ = ("work", "tensor")

    def __init__(self, work, tensor):
        self.work, self.tensor = work, tensor

    def wait(self):
        self.work.wait()
        return self.tensor.cpu().numpy()


class TorchCommunicator(Communicator):
    engine = "torch.distributed"
    timeout = None  # the process group's own (torch applies it to every collective)

    def __init__(self, group=None):
        import torch
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("comm: torch.distributed is not initialised (call torch.distributed.init_process_group)")
        self._torch, self._dist, self.group = torch, dist, group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        if self.rank < 0:
            raise ValueError("comm: this process is not a member of the process group")
        backend = str(dist.get_backend(group))
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self._rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        self._ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._rs_by_all_reduce = False

    def alloc(self, n, dtype):
        torch = self._torch
        dtype = np.dtype(dtype)
        if dtype.name == "bfloat16" and dtype.kind == "V":  # ml_dtypes' bfloat16: torch.from_numpy has no such dtype
            tdtype = torch.bfloat16
        else:
            tdtype = torch.from_numpy(np.zeros(0, dtype)).dtype
        native = torch.zeros(n, dtype=tdtype, device=self.device)
        return native, self._view(native)

    def _view(self, t):
        if t.device.type == "cpu":
            if t.dtype == self._torch.bfloat16:  # NumPy has no bfloat16: its bits viewed as ml_dtypes' (the kernels')
                import ml_dtypes
                return t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
            return t.numpy()
        import cupy
        if t.dtype == self._torch.bfloat16:  # CuPy reads no bfloat16 from torch: the bits, viewed as ml_dtypes'
            import ml_dtypes
            return cupy.asarray(t.view(self._torch.int16)).view(ml_dtypes.bfloat16)
        return cupy.asarray(t)

    def as_array(self, x, name):
        torch = self._torch
        if isinstance(x, torch.Tensor):
            if x.device.type != self.device.type:
                raise TypeError(f"{name} is a {x.device.type} tensor but the process group's tensors are on "
                                f"{self.device.type}")
            if x.is_nested or x.is_sparse or x.layout != torch.strided:
                raise TypeError(f"{name} must be a dense (strided) tensor, got {'a nested tensor' if x.is_nested else f'layout {x.layout}'}")
            refuse_lazy_negation(x, name)
            if x.is_complex() or not x.is_floating_point():
                raise TypeError(f"{name} has dtype {x.dtype}; the optimizer updates floating-point tensors")
            return self._view(x.detach())
        if isinstance(x, np.ndarray) and self.device.type == "cpu":
            return x
        raise TypeError(f"{name} must be a torch tensor, got {type(x).__name__}")

    def native_view(self, native, lo, hi, shape):
        return native[lo:hi].view(tuple(shape))

    def reduce_scatter(self, send, recv):
        if not self._rs_by_all_reduce:
            try:
                return self._rs(recv, send, group=self.group, async_op=True)
            except RuntimeError as e:
                if "support" not in str(e).lower():
                    raise
                warnings.warn(f"torch.distributed {self._dist.get_backend(self.group)}: no reduce-scatter here "
                              f"({str(e)[:120]}); using all_reduce and a slice (twice the traffic)", RuntimeWarning,
                              stacklevel=3)
                self._rs_by_all_reduce = True
        total = send.clone()  # the send buffer holds the caller's gradients (opt.grads): not overwritten
        self._dist.all_reduce(total, group=self.group)  # blocking: the slice below needs the result
        block = recv.numel()
        recv.copy_(total[self.rank * block:(self.rank + 1) * block])
        return DONE

    def all_gather(self, flat, block):
        return self._ag(flat, flat[self.rank * block:(self.rank + 1) * block], group=self.group, async_op=True)

    def start_all_reduce_sum(self, values):
        t = self._torch.tensor(np.ascontiguousarray(values, np.float64), device=self.device)
        work = self._dist.all_reduce(t, group=self.group, async_op=True)
        return _Result(work, t)

    def all_reduce_sum(self, values):
        t = self._torch.tensor(np.ascontiguousarray(values, np.float64), device=self.device)
        self._dist.all_reduce(t, group=self.group)
        return t.cpu().numpy()
