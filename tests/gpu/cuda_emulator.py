"""The CUDA kernels of kernels/cuda, run on the CPU: a stand-in CuPy whose RawModule compiles the very source
the CuPy backend hands to NVRTC (cuda_source.kernel_source(), the same -D options) with g++, and whose
kernels execute every launch: each CUDA thread of a block a fiber (ucontext) on the calling thread, the
blocks one after another, __syncthreads a switch back to the runner until every live thread of the block
has reached it, __shared__ memory static (one block at a time). Arrays are host memory
(numpy buffers) whose addresses are the device pointers.

What it proves without a GPU: the launchers' arguments, grids, tables, chunking, vector paths, tails,
misaligned views, skip flags, grad_scale pointers and the reductions' indexing compute the right values,
and, compiled with -ffp-contract=off as NVRTC compiles with --fmad=false, the same bits as the CPU
reference. What it cannot: memory-model races between blocks, warp-level behaviour (a warp shuffle is emulated
with block-wide barriers, right only where the whole block shuffles alike), speed.

Built on the launch-checking fake of test_cupy_launch_abi (every launch is still checked against the
parsed C signatures before it runs).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
import threading

import numpy as np

from fastopt.backends import cuda_source
from test_cupy_launch_abi import SIGNATURES, FakeArray, FakeCupy, FakeKernel, FakeModule, c_kind, module_dtype

PRELUDE = r"""
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <immintrin.h>
#include <ucontext.h>
#include <vector>
using std::isfinite;
using std::sqrt;
struct fo_emu_dim3 { unsigned x, y, z; };
static fo_emu_dim3 threadIdx, blockIdx, blockDim, gridDim;  // set by the runner before it resumes a thread
// Each CUDA thread of a block is a fiber (ucontext) on the calling OS thread; __syncthreads suspends it
// until every live thread of the block has reached a barrier or returned (an exited thread no longer counts).
static ucontext_t fo_emu_main;
static std::vector<ucontext_t> fo_emu_ctx;
static std::vector<int> fo_emu_state;  // 0 runnable, 1 waiting at a barrier, 2 returned
static unsigned fo_emu_current;
static inline void __syncthreads() {
    fo_emu_state[fo_emu_current] = 1;
    swapcontext(&fo_emu_ctx[fo_emu_current], &fo_emu_main);
}
template <class X>
static inline X __ldg(const X* p) { return *p; }
// A warp shuffle as two block-wide barriers around an exchange through per-thread slots: exact wherever every
// thread of the block makes the same shuffles (the kernels call them outside divergent code).
static unsigned long long fo_emu_lanes[1024];
template <class X>
static inline X __shfl_xor_sync(unsigned, X value, int lane_mask) {
    static_assert(sizeof(X) <= sizeof(unsigned long long), "a shuffle moves at most 8 bytes");
    std::memcpy(&fo_emu_lanes[fo_emu_current], &value, sizeof(X));
    __syncthreads();
    X out;
    std::memcpy(&out, &fo_emu_lanes[fo_emu_current ^ unsigned(lane_mask)], sizeof(X));
    __syncthreads();
    return out;
}
// Fibers switch only at barriers: a read-modify-write is atomic here.
static inline int atomicExch(int* address, int value) {
    const int old = *address;
    *address = value;
    return old;
}
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __align__(n) alignas(n)
#define __shared__ static
#define FASTOPT_CPU_EMULATION 1
"""

RUNNER = r"""
static void (*fo_emu_call)(void**);
static void** fo_emu_args;
static std::vector<char*> fo_emu_stacks;
enum { FO_EMU_STACK = 1 << 16 };

static void fo_emu_thread(int t) {
    fo_emu_call(fo_emu_args);
    fo_emu_state[t] = 2;  // then back to fo_emu_main (uc_link)
}

extern "C" int fo_emu_launch(void (*call)(void**), unsigned grid, unsigned block, void** args) {
    fo_emu_call = call;
    fo_emu_args = args;
    blockDim = {block, 1, 1};
    gridDim = {grid, 1, 1};
    fo_emu_ctx.resize(block);
    fo_emu_state.assign(block, 0);
    while (fo_emu_stacks.size() < block) fo_emu_stacks.push_back(static_cast<char*>(std::malloc(FO_EMU_STACK)));
    for (unsigned b = 0; b < grid; ++b) {
        blockIdx = {b, 0, 0};
        for (unsigned t = 0; t < block; ++t) {
            getcontext(&fo_emu_ctx[t]);
            fo_emu_ctx[t].uc_stack.ss_sp = fo_emu_stacks[t];
            fo_emu_ctx[t].uc_stack.ss_size = FO_EMU_STACK;
            fo_emu_ctx[t].uc_link = &fo_emu_main;
            makecontext(&fo_emu_ctx[t], reinterpret_cast<void (*)()>(fo_emu_thread), 1, int(t));
            fo_emu_state[t] = 0;
        }
        for (;;) {  // one sweep runs every runnable thread to its next barrier or its end
            bool live = false;
            for (unsigned t = 0; t < block; ++t) {
                if (fo_emu_state[t] != 0) continue;
                fo_emu_current = t;
                threadIdx = {t, 0, 0};
                swapcontext(&fo_emu_main, &fo_emu_ctx[t]);
            }
            for (unsigned t = 0; t < block; ++t)
                if (fo_emu_state[t] == 1) { fo_emu_state[t] = 0; live = true; }  // the barrier opens
            if (!live) break;
        }
    }
    return 0;
}
"""

_CACHE = os.path.join(tempfile.gettempdir(), f"fastopt-cuda-emulator-{os.getuid()}")


def _c_type(ctype):
    return " ".join(re.sub(r"\b__restrict__\b", " ", ctype).split())


def wrappers(signatures) -> str:
    """extern "C" fo_emu_call_<entry>(void** args): the entry point called with its arguments read from args."""
    out = []
    for name, params in sorted(signatures.items()):
        args = ", ".join(f"*({_c_type(t)}*)a[{i}]" for i, (t, _) in enumerate(params))
        out.append(f'extern "C" void fo_emu_call_{name}(void** a) {{ {name}({args}); }}')
    return "\n".join(out) + "\n"


def build(code, options) -> ctypes.CDLL:
    """The shared library of one module: PRELUDE + the source + wrappers of the module's entry points + RUNNER,
    built with g++ (the -D options as given; -ffp-contract=off as --fmad=false), cached on disk by content."""
    defines = [o for o in options if o.startswith("-D")]
    exported = {name: SIGNATURES[name] for name in cuda_source.kernel_names(module_dtype(options))}
    text = PRELUDE + code + "\n" + wrappers(exported) + RUNNER
    key = hashlib.sha256((text + "\0".join(defines)).encode()).hexdigest()[:20]
    os.makedirs(_CACHE, exist_ok=True)
    lib = os.path.join(_CACHE, f"module-{key}.so")
    if not os.path.exists(lib):
        src = os.path.join(_CACHE, f"module-{key}.cpp")
        with open(src, "w") as f:
            f.write(text)
        tmp = f"{lib}.{os.getpid()}.tmp"
        cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-mf16c", "-ffp-contract=off",
               "-fno-math-errno", "-w", *defines, "-o", tmp, src]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"g++ could not build the emulated module:\n{proc.stderr[-4000:]}")
        os.replace(tmp, lib)
    return ctypes.CDLL(lib)


class EmuArray(FakeArray):
    """A FakeArray with memory: `buffer` (uint8, kept alive) holds the values at data.ptr."""

    def __init__(self, fake, shape, dtype, ptr, device, buffer):
        super().__init__(fake, shape, dtype, ptr, device)
        self.buffer = buffer

    @property
    def values(self) -> np.ndarray:
        """A numpy view of the array's memory (writable)."""
        if self.size == 0:
            return np.zeros(self.shape, self.dtype)
        base = self.buffer.ctypes.data
        offset = self.data.ptr - base
        return np.frombuffer(self.buffer, self.dtype, self.size, offset).reshape(self.shape)

    def _view(self, shape, first):
        return EmuArray(self._fake, shape, self.dtype, self.data.ptr + first * self.dtype.itemsize, self.device.id,
                        self.buffer)

    def fill(self, value):
        self.filled = value
        self.values[...] = value

    def set(self, host, stream=None):
        assert np.shape(host) == self.shape, (np.shape(host), self.shape)
        self.values[...] = host

    def get(self):
        return self.values.copy()

    def __setitem__(self, key, value):  # a copy on the device (CuPy casts; NumPy's casting stands in)
        self.values[key] = value.values if isinstance(value, EmuArray) else value

    def view(self, dtype):  # the same memory as another dtype of the same width
        dtype = np.dtype(dtype)
        assert dtype.itemsize == self.dtype.itemsize, "the emulation views dtypes of one width only"
        return EmuArray(self._fake, self.shape, dtype, self.data.ptr, self.device.id, self.buffer)

    def __int__(self):  # a device-to-host read of a one-element array
        return int(self.values.reshape(-1)[0])

    def __float__(self):
        return float(self.values.reshape(-1)[0])

    def _binary(self, other, op):
        b = other.values if isinstance(other, EmuArray) else other
        return self._fake.from_host(np.asarray(op(self.values, b)))

    __add__ = __radd__ = lambda self, o: self._binary(o, np.add)
    __mul__ = __rmul__ = lambda self, o: self._binary(o, np.multiply)
    __truediv__ = lambda self, o: self._binary(o, np.true_divide)
    __rtruediv__ = lambda self, o: self._binary(o, lambda a, b: np.true_divide(b, a))


# The runner's state (the fibers, __shared__ memory) is static: one launch at a time in the process, so that
# threads may stand in for ranks or streams (tests/gpu/test_sharded_emulation.py).
_LAUNCH = threading.RLock()


class EmuKernel(FakeKernel):
    def __call__(self, grid, block, args, **kwargs):
        with _LAUNCH:
            self._run(grid, block, args, **kwargs)

    def _run(self, grid, block, args, **kwargs):
        super().__call__(grid, block, args, **kwargs)  # recorded, as the launch checks expect
        (g,), (b,) = tuple(grid), tuple(block)
        params = SIGNATURES[self.name]
        assert len(params) == len(args), f"{self.name}: {len(args)} arguments for {len(params)} parameters"
        keep, slots = [], (ctypes.c_void_p * max(len(args), 1))()
        for i, ((ctype, _), arg) in enumerate(zip(params, args)):
            kind, _ = c_kind(ctype)
            if kind == "pointer":
                value = ctypes.c_uint64(arg.data.ptr if isinstance(arg, FakeArray) else int(arg))
            elif kind == "int64":
                value = ctypes.c_int64(int(arg))
            elif kind == "int32":
                value = ctypes.c_int32(int(arg))
            elif kind == "float64":
                value = ctypes.c_double(float(arg))
            else:  # the Scalars struct, by value: its bytes
                value = ctypes.create_string_buffer(bytes(np.asarray(arg).tobytes()))
            keep.append(value)
            slots[i] = ctypes.cast(ctypes.pointer(value), ctypes.c_void_p)
        lib = self.module.library
        call = getattr(lib, f"fo_emu_call_{self.name}")
        lib.fo_emu_launch.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p]
        if g and b:
            lib.fo_emu_launch(ctypes.cast(call, ctypes.c_void_p), g, b, slots)


class EmuModule(FakeModule):
    def __init__(self, fake, code, options):
        super().__init__(fake, code, options)
        with _LAUNCH:  # one g++ build of a module at a time
            self.library = build(code, options)

    def get_function(self, name):
        return EmuKernel(self, name)


class EmuCupy(FakeCupy):
    """FakeCupy with memory and running kernels (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.buffers: list = []

    def _address(self, nbytes, misalign):
        """Host memory: a buffer never freed (an address is never reused, so the allocation records stay
        true), the array 256-byte aligned in it plus `misalign` bytes."""
        buffer = np.zeros(nbytes + misalign + 512, np.uint8)
        self.buffers.append(buffer)
        return (buffer.ctypes.data + 255) // 256 * 256 + misalign, buffer

    def _array(self, shape, dtype, ptr, device, host, memory):
        a = EmuArray(self, shape, dtype, ptr, device, memory)
        if host is not None and a.size:
            a.values[...] = np.asarray(host, dtype).reshape(shape)
        return a

    def from_host(self, values, dtype=None):
        values = np.asarray(values, dtype)
        return self.alloc(values.shape, values.dtype, host=values)

    def asarray(self, obj, dtype=None):
        if isinstance(obj, EmuArray):
            if dtype is None or np.dtype(dtype) == obj.dtype:
                return obj
            return self.from_host(obj.values, dtype)
        return self.from_host(np.array(obj, dtype=dtype))

    def empty(self, shape, dtype):
        """Garbage bytes (0xA5), as cupy.empty may hold: a kernel that reads what nobody wrote shows."""
        a = self.alloc(shape, dtype)
        if a.size:
            offset = a.data.ptr - a.buffer.ctypes.data
            a.buffer[offset:offset + a.nbytes] = 0xA5
        return a

    def zeros(self, shape, dtype):
        return self.alloc(shape, dtype)

    def full(self, shape, value, dtype):
        a = self.alloc(shape, dtype)
        a.fill(value)
        return a

    def sqrt(self, x):
        return self.from_host(np.sqrt(x.values))

    def minimum(self, x, y):
        return self.from_host(np.minimum(x.values, y.values if isinstance(y, EmuArray) else y))

    def RawModule(self, code, options):
        return EmuModule(self, code, options)

