"""CuPy NCCL adapter: CuPy arrays on the GPU, NCCL collectives through cupy.cuda.nccl.NcclCommunicator.

NCCL collectives are asynchronous on a CUDA stream: reduce_scatter and all_gather are enqueued on the
current stream (the stream fastopt's CuPy kernels use), so ordering needs no host synchronisation and
the requests are complete as far as the host is concerned. The scalar all-reduce (clipping and the
non-finite check) copies its few numbers back to the host, one synchronisation per step, and only when
clip_grad_norm or skip_nonfinite is set.

Failures: NCCL has no timeout of its own here; a rank that dies leaves the others blocked in the kernel
of the next collective (run under a launcher that kills the job when a rank exits, or use torch.distributed
with the nccl backend, which has a timeout). Tested only on a GPU (tests skip without one).
"""
from __future__ import annotations

import numpy as np

from fastopt.distributed.comm_base import DONE, Communicator


class NcclCommunicator(Communicator):
    engine = "nccl"

    def __init__(self, comm):
        import cupy
        from cupy.cuda import nccl
        self._cupy, self._nccl, self.comm = cupy, nccl, comm
        self.rank = comm.rank_id()
        self.size = comm.size()
        self._types = {np.dtype(np.float16): nccl.NCCL_FLOAT16, np.dtype(np.float32): nccl.NCCL_FLOAT32,
                       np.dtype(np.float64): nccl.NCCL_FLOAT64}

    def _type(self, a):
        try:
            return self._types[np.dtype(a.dtype)]
        except KeyError:
            raise TypeError(f"NCCL adapter: no NCCL type for dtype {a.dtype}") from None

    def alloc(self, n, dtype):
        a = self._cupy.zeros(n, np.dtype(dtype))
        return a, a

    def as_array(self, x, name):
        cupy = self._cupy
        if isinstance(x, cupy.ndarray):
            return x
        if hasattr(x, "__cuda_array_interface__"):
            return cupy.asarray(x)
        raise TypeError(f"{name} must be a CuPy array (or expose __cuda_array_interface__), got {type(x).__name__}")

    def _stream(self):
        return self._cupy.cuda.get_current_stream().ptr

    def reduce_scatter(self, send, recv):
        self.comm.reduceScatter(send.data.ptr, recv.data.ptr, recv.size, self._type(recv), self._nccl.NCCL_SUM,
                                self._stream())
        return DONE

    def all_gather(self, flat, block):
        # in place: rank r's block is both the input and its slot in the output (NCCL allows it). The gather
        # only moves bytes: 16-bit bits (bfloat16 params, which the optimizer hands over as uint16) go as
        # NCCL_FLOAT16, whose copy keeps every bit pattern
        send = flat.data.ptr + self.rank * block * flat.itemsize
        kind = self._nccl.NCCL_FLOAT16 if np.dtype(flat.dtype) == np.uint16 else self._type(flat)
        self.comm.allGather(send, flat.data.ptr, block, kind, self._stream())
        return DONE

    def all_reduce_sum(self, values):
        buf = self._cupy.asarray(np.ascontiguousarray(values, np.float64))
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._nccl.NCCL_FLOAT64, self._nccl.NCCL_SUM,
                            self._stream())
        return self._cupy.asnumpy(buf)
