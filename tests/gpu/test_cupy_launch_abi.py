"""The CuPy launcher against the CUDA source, without a GPU: every RawKernel launch that
fastopt/backends/cupy_backend.py makes passes arguments that fit the C signature of the
`extern "C" __global__` entry point it launches.

CuPy passes each launch argument by its Python type and nothing checks it against the kernel: a
Python int goes in as 8 bytes and a Python float as a double whatever the parameter is, None is not a
null pointer in every CuPy version, and a missing argument is read from beyond the argument buffer. A
mismatch only shows on a GPU, as wrong numbers or an illegal address. Here `cupy_backend._cupy`
returns a fake CuPy module whose arrays are distinct address ranges without memory and whose kernels
record their launches; every launch site is driven (every optimizer and kernel variant, single array
and list, each grad_scale and found_inf form, the norms, clipping, step_guard and touch,
float32/float64/float16, on two devices) and each recorded launch is checked against the signatures
parsed from cuda_source.kernel_source() (the FO_UPDATE_ENTRIES macro is expanded from its own body,
no signature is copied here).

The rules are those of CuPy's RawKernel (cupy/cuda/function.pyx `_pointer`):
    any pointer                  numpy.uint64, or a cupy.ndarray (its device pointer)
    long long                    numpy.int64
    int                          numpy.int32
    double                       numpy.float64
    fastopt::dev::Scalars        a numpy.void of the struct's size (double v[16]: 128 bytes)
and a pointer must be null only where the kernel checks for null, point into a live allocation of the
pointee's dtype, on the device the kernel runs on; grid and block are tuples of positive ints, block
(cuda_source.BLOCK,).
"""
from __future__ import annotations

import bisect
import collections
import itertools
import re
from types import SimpleNamespace

import numpy as np
import pytest

from fastopt.backends import cuda_source, cupy_backend
from fastopt.backends.device_arrays import state_dtype
from fastopt.specs import LR_SLOT, REGISTRY, REQUIRED, WEIGHT_AVERAGE

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
I64, U8, BOOL = np.dtype(np.int64), np.dtype(np.uint8), np.dtype(np.bool_)
DTYPES = (F32, F64, F16)
CHUNK = cuda_source.CHUNK

# Entry points of kernel_names() that no cupy_backend call can launch, with the reason
# (test_every_entry_point_is_launched fails on a stale entry too).
UNREACHABLE: dict = {
    "fo_sgd_v0_q8": "SGD without momentum keeps no state: no 8-bit call reaches its variant",
    "fo_lars_v0_q8": "LARS without momentum keeps no state: no 8-bit call reaches its variant",
}

# Pointer parameters the kernels test against null (reduce.cu / update.cu / device.cuh); any other
# pointer must be non-null. "kernel.param" for a parameter nullable in that kernel only.
NULLABLE = {"s0", "s1", "s2", "s3", "gs", "skip", "coef", "tensor_coefs", "found_inf", "skipped", "coef_ptr", "fo_step_guard.norm", "at",
            "lr_at"}


# ---------------------------------------------------------------------------------------------------
# The C signatures, parsed from the assembled source
# ---------------------------------------------------------------------------------------------------

_ENTRY = re.compile(r'extern\s+"C"\s+__global__\s+void\s+__launch_bounds__\s*\(\s*\w+\s*\)\s*(\w+)\s*\(([^)]*)\)')
ENTRY_MACROS = ("FO_UPDATE_ENTRIES", "FO_PER_TENSOR_ENTRIES", "FO_TWO_PHASE_ENTRIES", "FO_INT8_ENTRIES")  # update.cu: entry points made per table row


def _macro(name):
    return re.compile(rf"^[ \t]*#[ \t]*define[ \t]+{name}\(([^)]*)\)((?:[^\n]*\\\n)*[^\n]*)", re.M)


def _macro_call(name):
    return re.compile(rf"^[ \t]*{name}\(([^)]*)\)", re.M)


def _strip_comments(src):
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", src, flags=re.S))


def expand_update_entries(src):
    """src with each entry macro (ENTRY_MACROS) expanded: its definition removed and each invocation
    replaced by its body, the formal parameters substituted as whole tokens, then `##` pasted."""
    for name in ENTRY_MACROS:
        src = _expand(src, name)
    return src


def _expand(src, name):
    m = _macro(name).search(src)
    assert m, f"{name} is not defined in the CUDA source"
    formals = [f.strip() for f in m.group(1).split(",")]
    body = m.group(2).replace("\\\n", "\n")
    rest = src[:m.start()] + src[m.end():]

    def expand(call):
        actuals = [a.strip() for a in call.group(1).split(",")]
        assert len(actuals) == len(formals), call.group(0)
        text = body
        for formal, actual in zip(formals, actuals):
            text = re.sub(rf"\b{formal}\b", actual, text)
        return re.sub(r"\s*##\s*", "", text)

    return _macro_call(name).sub(expand, rest)


def parse_signatures(src):
    """{entry point: ((C type, parameter name), ...)} of every extern "C" __global__ function."""
    out = {}
    for name, params in _ENTRY.findall(expand_update_entries(_strip_comments(src))):
        assert name not in out, f"{name} defined twice"
        decls = [" ".join(p.split()) for p in params.split(",") if p.strip()]
        parsed = []
        for d in decls:
            m = re.fullmatch(r"(.*?)\s*\b(\w+)", d)
            assert m and m.group(1), f"{name}: cannot parse parameter {d!r}"
            parsed.append((m.group(1), m.group(2)))
        out[name] = tuple(parsed)
    return out


SOURCE = cuda_source.kernel_source()
SIGNATURES = parse_signatures(SOURCE)
SCALARS_BYTES = 8 * int(re.search(r"struct\s+Scalars\s*\{\s*double\s+v\[(\d+)\];", SOURCE).group(1)) + 16  # + key, index0


def c_kind(ctype):
    """("pointer", pointee) or (scalar kind, None) of a C parameter type."""
    t = " ".join(re.sub(r"\b(const|__restrict__)\b", " ", ctype).split())
    if t.endswith("*"):
        return "pointer", t[:-1].strip()
    kind = {"long long": "int64", "int": "int32", "double": "float64", "fastopt::dev::Scalars": "scalars"}.get(t)
    assert kind, f"unknown C parameter type {ctype!r}: teach c_kind how CuPy must pass it"
    return kind, None


# what CuPy's RawKernel needs for each scalar parameter kind (exact types: np.float64 is a float
# subclass, np.int64 is not an int, and a Python int/float/bool must not pass)
SCALAR_OK = {
    "int64": lambda a: type(a) is np.int64,
    "int32": lambda a: type(a) is np.int32,
    "float64": lambda a: type(a) is np.float64,
    "scalars": lambda a: type(a) is np.void and a.dtype.itemsize == SCALARS_BYTES,
}


def pointee_dtypes(pointee, module_dtype):
    """The dtypes a pointer parameter may point to in the module compiled for module_dtype (a
    cuda_source.module_key; None: any)."""
    params, states, _, grads = cuda_source.module_dtypes(module_dtype)
    return {
        "fastopt::dev::T": {params},
        "fastopt::dev::G": {grads},
        "fastopt::dev::S": {states},
        "double": {F64},
        "float": {F32},
        "long long": {I64},
        "unsigned char": {BOOL, U8},
        "void": None,
    }[pointee]


# ---------------------------------------------------------------------------------------------------
# A fake CuPy: arrays are address ranges, kernels record their launches
# ---------------------------------------------------------------------------------------------------

Launch = collections.namedtuple("Launch", "name grid block args kwargs options code device stream")
Allocation = collections.namedtuple("Allocation", "start end dtype device stream")


class FakeArray:
    """What cupy_backend uses of a cupy.ndarray. No memory: data.ptr is a distinct fake address."""

    def __init__(self, fake, shape, dtype, ptr, device, host=None):
        self._fake, self.shape, self.dtype = fake, tuple(shape), np.dtype(dtype)
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.ndim, self.nbytes, self.itemsize = len(self.shape), self.size * self.dtype.itemsize, self.dtype.itemsize
        self.strides = tuple(int(np.prod(self.shape[k + 1:], dtype=np.int64)) * self.itemsize
                             for k in range(self.ndim))  # C-contiguous
        self.data = SimpleNamespace(ptr=ptr)
        self.device = SimpleNamespace(id=device)
        self.flags = SimpleNamespace(c_contiguous=True)
        self.host = host          # the values, for arrays made from host data (the multi-tensor table)
        self.filled = None

    @property
    def __cuda_array_interface__(self):  # as CuPy's: the dispatcher sends such arrays to the GPU backends
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.data.ptr, False), "strides": None,
                "version": 3, "stream": self._fake.current_stream(self.device.id).ptr}

    def _view(self, shape, first):
        return FakeArray(self._fake, shape, self.dtype, self.data.ptr + first * self.dtype.itemsize, self.device.id)

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        if -1 in shape:  # the one free axis takes what the others leave
            rest = int(np.prod([n for n in shape if n != -1], dtype=np.int64))
            shape = tuple(self.size // rest if n == -1 else n for n in shape)
        assert int(np.prod(shape, dtype=np.int64)) == self.size
        return self._view(shape, 0)

    def __getitem__(self, key):
        assert self.ndim == 1, "the fake indexes 1-d arrays only"
        if isinstance(key, slice):
            start, stop, step = key.indices(self.size)
            assert step == 1
            return self._view((max(0, stop - start),), start)
        return self._view((), range(self.size)[key])

    def fill(self, value):
        self.filled = value

    def set(self, host, stream=None):  # a host-to-device copy (on the current stream): kept as the values
        assert np.shape(host) == self.shape, (np.shape(host), self.shape)
        self.host = np.array(host, dtype=self.dtype)

    def get(self):  # a device-to-host copy: the values of an array made from host data, else zeros (no memory)
        if self.host is not None:
            return np.array(self.host, dtype=self.dtype).reshape(self.shape)
        return np.zeros(self.shape, self.dtype)

    def _elementwise(self, other):  # CuPy runs an elementwise kernel into a new array (current stream)
        return self._fake.alloc(self.shape, np.float64)

    __add__ = __radd__ = __truediv__ = __rtruediv__ = __mul__ = __rmul__ = _elementwise

    def __repr__(self):
        return f"FakeArray(shape={self.shape}, dtype={self.dtype}, ptr={self.data.ptr:#x}, device={self.device.id})"


class ForeignArray:
    """A device array that is not a CuPy array, seen through __cuda_array_interface__ only (a torch
    CUDA tensor): its memory is a FakeArray's."""

    def __init__(self, backing):
        self.backing = backing
        self.__cuda_array_interface__ = {"shape": backing.shape, "typestr": backing.dtype.str,
                                         "data": (backing.data.ptr, False), "strides": None, "version": 3}


class FakeKernel:
    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, grid, block, args, **kwargs):
        fake = self.module.fake
        fake.launches.append(Launch(self.name, grid, block, args, kwargs, self.module.options, self.module.code,
                                    fake.current_device, fake.current_stream(fake.current_device).ptr))


class FakeModule:
    def __init__(self, fake, code, options):
        self.fake, self.code, self.options = fake, code, tuple(options)

    def get_function(self, name):
        return FakeKernel(self, name)


class FakeStream:
    """A CuPy stream: `with stream:` makes it current on the current device (a stack per device)."""

    def __init__(self, fake, ptr, device_id=-1):
        self._fake, self.ptr, self.device_id = fake, ptr, device_id

    def __enter__(self):
        self._fake._streams.setdefault(self._fake.current_device, []).append(self)
        return self

    def __exit__(self, *exc):
        self._fake._streams[self._fake.current_device].pop()

    def __repr__(self):
        return f"FakeStream({self.ptr:#x})"

    def record(self):
        """An event after the work queued so far: done at once (nothing runs), unless the fake says not."""
        event = FakeEvent(self, done=not self._fake.events_pending)
        self._fake.events.append(event)
        return event

    def wait_event(self, event):
        self._fake.waits.append((self.ptr, event))

    def is_capturing(self):
        return self.ptr in self._fake.capturing


class FakeEvent:
    def __init__(self, stream, done):
        self.stream, self.done, self.host_waits = stream, done, 0

    def synchronize(self):
        self.host_waits += 1
        self.done = True


class FakeCupy:
    """The members of the cupy module that cupy_backend uses."""

    float16, float32, float64, int64, bool_ = np.float16, np.float32, np.float64, np.int64, np.bool_
    ndarray = FakeArray
    SM_COUNT = 132

    def __init__(self):
        self.launches: list = []
        self.allocations: list = []
        self.events: list = []          # recorded by FakeStream.record
        self.waits: list = []           # (stream ptr, event) of FakeStream.wait_event
        self.events_pending = False     # True: new events are not done yet (work still queued)
        self.capturing: set = set()     # ptrs of streams being captured
        self._starts: list = []
        self._next = 1 << 40
        self._devices = [0]
        self._streams: dict = {}   # device -> stack of current streams (none: the null stream)
        fake = self

        class Device:
            def __init__(self, device):
                assert type(device) is int and device >= 0, f"cupy.cuda.Device({device!r})"
                self.id = device
                self.attributes = {"MultiProcessorCount": fake.SM_COUNT}

            def __enter__(self):
                fake._devices.append(self.id)
                return self

            def __exit__(self, *exc):
                fake._devices.pop()

        runtime = SimpleNamespace(getDevice=lambda: self.current_device,
                                  pointerGetAttributes=lambda ptr: SimpleNamespace(device=self.allocation(ptr).device))

        class Stream(FakeStream):
            null = FakeStream(self, 0)
            ptds = FakeStream(self, 2)

            def __init__(self, ptr=None):
                fake._next_stream += 0x100
                super().__init__(fake, fake._next_stream if ptr is None else ptr)

            @staticmethod
            def from_external(obj):
                return FakeStream(fake, obj.__cuda_stream__()[1])

        self._next_stream = 0x5000
        self.cuda = SimpleNamespace(Device=Device, runtime=runtime, Stream=Stream,
                                    get_current_stream=self.current_stream)

    @property
    def current_device(self):
        return self._devices[-1]

    def current_stream(self, device_id=-1):
        stack = self._streams.get(self.current_device if device_id == -1 else device_id)
        return stack[-1] if stack else self.cuda.Stream.null

    # memory
    def alloc(self, shape, dtype, device=None, misalign=0, host=None):
        """A new array: a 256-byte aligned address range (plus `misalign` bytes) of its own."""
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        dtype = np.dtype(dtype)
        device = self.current_device if device is None else device
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        ptr, memory = 0, None
        if nbytes:  # CuPy: an empty array has a null pointer
            ptr, memory = self._address(nbytes, misalign)
            i = bisect.bisect(self._starts, ptr)  # kept sorted by address (allocation() bisects)
            self._starts.insert(i, ptr)
            self.allocations.insert(i, Allocation(ptr, ptr + nbytes, dtype, device, self.current_stream(device).ptr))
        return self._array(shape, dtype, ptr, device, host, memory)

    def _address(self, nbytes, misalign):
        """(address, memory) of a new allocation: here a fresh fake address range and no memory."""
        ptr = self._next + misalign
        self._next += -(-(nbytes + misalign) // 256) * 256 + 256
        return ptr, None

    def _array(self, shape, dtype, ptr, device, host, memory):
        return FakeArray(self, shape, dtype, ptr, device, host)

    def allocation(self, ptr):
        """The allocation holding address ptr, or None (allocations are made at increasing addresses)."""
        i = bisect.bisect_right(self._starts, ptr) - 1
        return self.allocations[i] if i >= 0 and ptr < self.allocations[i].end else None

    def empty(self, shape, dtype):
        return self.alloc(shape, dtype)

    zeros = empty

    def full(self, shape, value, dtype):
        return self.alloc(shape, dtype)

    def asarray(self, obj, dtype=None):
        """Like CuPy: the same array when it is on the current device with that dtype, else a copy on
        the current device."""
        if isinstance(obj, ForeignArray):  # a view of its memory, as CuPy makes of a __cuda_array_interface__
            obj = obj.backing
        if isinstance(obj, FakeArray):
            if (dtype is None or np.dtype(dtype) == obj.dtype) and obj.device.id == self.current_device:
                return obj
            return self.alloc(obj.shape, obj.dtype if dtype is None else dtype)
        host = np.array(obj, dtype=dtype)
        return self.alloc(host.shape, host.dtype, host=host)

    def sqrt(self, x):
        return self.alloc(x.shape, x.dtype)

    def minimum(self, x, y):
        return self.alloc(x.shape, np.float64)

    def RawModule(self, code, options):
        return FakeModule(self, code, options)


def use_cupy(monkeypatch, cp, modules=None):
    """`cp` (a stand-in CuPy) in place of the real one in the backend, every cache of the backend empty (restored
    afterwards); `modules`: the compiled modules to keep across tests (a dict the caller holds), else empty."""
    monkeypatch.setattr(cupy_backend, "_cupy", lambda: cp)
    monkeypatch.setattr(cupy_backend, "_modules", {} if modules is None else modules)
    for cache in ("_functions", "_sm_counts", "_external_streams", "_quantizers"):
        monkeypatch.setattr(cupy_backend, cache, {})
    monkeypatch.setattr(cupy_backend, "_tables", collections.OrderedDict())
    monkeypatch.setattr(cupy_backend, "_pinned_tables", [])
    monkeypatch.setattr(cupy_backend, "_guard_buffers", collections.OrderedDict())
    monkeypatch.setattr(cupy_backend, "_pinned_guard_buffers", {})
    monkeypatch.setattr(cupy_backend, "_result_streams", cupy_backend.StreamMemo())
    return cp


@pytest.fixture
def fake(monkeypatch):
    """The fake CuPy in place of the real one, with empty module caches (restored afterwards)."""
    return use_cupy(monkeypatch, FakeCupy())


# ---------------------------------------------------------------------------------------------------
# The check of one launch
# ---------------------------------------------------------------------------------------------------

_DTYPE_OF_CODE = {code: dtype for dtype, (code, _) in cuda_source.DTYPES.items()}


_STATE_OF_CODE = {code: dtype for dtype, code in cuda_source.STATE_CODES.items()}


def module_dtype(options):
    """The cuda_source.module_key a module was compiled for, from its options."""
    codes = [int(o.split("=")[1]) for o in options if o.startswith("-DFASTOPT_DTYPE=")]
    assert len(codes) == 1, options
    states = [int(o.split("=")[1]) for o in options if o.startswith("-DFASTOPT_STATE=")]
    rounding = [int(o.split("=")[1]) for o in options if o.startswith("-DFASTOPT_ROUND=")]
    grads = [int(o.split("=")[1]) for o in options if o.startswith("-DFASTOPT_GRAD=")]
    assert len(states) <= 1 and len(rounding) <= 1 and grads in ([], [0]), options
    return cuda_source.module_key(_DTYPE_OF_CODE[codes[0]], _STATE_OF_CODE[states[0]] if states else None,
                                  rounding[0] if rounding else cuda_source.ROUND_NEAREST, F32 if grads else None)


def _pointer_problem(fake, launch, label, pname, pointee, arg):
    if isinstance(arg, FakeArray):
        ptr = arg.data.ptr
    elif type(arg) is np.uint64:
        ptr = int(arg)
    else:
        return f"{label}: a pointer must be numpy.uint64 or a cupy.ndarray, got {type(arg).__name__} {arg!r}"
    if ptr == 0:
        if pname in NULLABLE or f"{launch.name}.{pname}" in NULLABLE:
            return None
        return f"{label}: null, and {launch.name} does not check it"
    where = fake.allocation(ptr)
    if where is None:
        return f"{label}: {ptr:#x} is not in any allocation"
    allowed = pointee_dtypes(pointee, module_dtype(launch.options))
    if allowed is not None and where.dtype not in allowed:
        return f"{label}: points to {where.dtype} memory, expected {' or '.join(map(str, allowed))}"
    if where.device != launch.device:
        return f"{label}: memory of device {where.device}, launched on device {launch.device}"
    return None


def launch_problems(fake, launch):
    """Everything wrong with one recorded launch (an empty list when it fits the C signature)."""
    name = launch.name
    if name not in cuda_source.kernel_names():
        return [f"{name}: not an entry point of cuda_source.kernel_names()"]
    params = SIGNATURES[name]
    problems = []
    if launch.code != SOURCE or launch.options != cuda_source.compile_options(module_dtype(launch.options)):
        problems.append(f"{name}: module not built from kernel_source() with compile_options()")
    for what, dims in (("grid", launch.grid), ("block", launch.block)):
        if not (type(dims) is tuple and 1 <= len(dims) <= 3
                and all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and 0 < d < 2 ** 31
                        for d in dims)):
            problems.append(f"{name}: {what} {dims!r} is not a tuple of 1 to 3 positive ints")
    if launch.block != (cuda_source.BLOCK,):
        problems.append(f"{name}: block {launch.block!r}, the kernels are built for ({cuda_source.BLOCK},)")
    if set(launch.kwargs) - {"shared_mem", "stream"}:
        problems.append(f"{name}: unknown launch options {sorted(launch.kwargs)}")
    args = launch.args
    if type(args) is not tuple:
        return problems + [f"{name}: the arguments must be a tuple, got {type(args).__name__}"]
    if len(args) != len(params):
        return problems + [f"{name}: {len(args)} arguments for the {len(params)} parameters "
                           f"({', '.join(f'{t} {n}' for t, n in params)})"]
    for i, ((ctype, pname), arg) in enumerate(zip(params, args)):
        label = f"{name} argument {i} `{ctype} {pname}`"
        kind, pointee = c_kind(ctype)
        if kind == "pointer":
            problem = _pointer_problem(fake, launch, label, pname, pointee, arg)
        elif not SCALAR_OK[kind](arg):
            problem = f"{label}: got {type(arg).__name__} {arg!r}"
        else:
            problem = None
        if problem:
            problems.append(problem)
    return problems


def assert_launches_fit(fake, context="", device=None):
    assert fake.launches, f"no kernel launched {context}"
    problems = [p for launch in fake.launches for p in launch_problems(fake, launch)]
    if device is not None:
        problems += [f"{launch.name}: launched on device {launch.device}, the arrays are on device {device}"
                     for launch in fake.launches if launch.device != device]
    assert not problems, f"{context}:\n  " + "\n  ".join(problems)


def args_by_name(launch):
    return {pname: arg for (_, pname), arg in zip(SIGNATURES[launch.name], launch.args)}


def ptr(arg):
    return arg.data.ptr if isinstance(arg, FakeArray) else int(arg)


# ---------------------------------------------------------------------------------------------------
# Driving every launch site
# ---------------------------------------------------------------------------------------------------

SINGLE_SHAPE = (1 << 22,)                          # many blocks, many chunks
LIST_SHAPES = [(7,), (0,), (33, 5), (3 * CHUNK + 5,)]  # an empty tensor, a multi-chunk one
STEPS = (1, 10)   # SGD's first-step variant, RAdam unrectified (step 1) and rectified (step 10)


def option_sets(spec):
    """hp for every combination of the options that select a kernel variant or a state slot: the bool
    flags (but maximize, a sign in the scalars) and momentum off / on; the invalid ones left out."""
    axes = [(h.name, (False, True)) for h in spec.hypers if h.kind == "bool" and h.name != "maximize"]
    if "momentum" in spec.defaults:
        axes.append(("momentum", (0.0, 0.9)))
    out = []
    for values in itertools.product(*(v for _, v in axes)):
        hp = dict(spec.defaults, **dict(zip((n for n, _ in axes), values)))
        if hp["lr"] is REQUIRED:
            hp["lr"] = 0.1
        try:
            spec.validate(hp, 1)
        except ValueError:
            continue
        out.append(hp)
    return out


def new_arrays(fake, shapes, dtype, device, as_list, wrap=lambda a: a):
    arrays = [wrap(fake.alloc(s, dtype, device)) for s in shapes]
    return arrays if as_list else arrays[0]


def update_arrays(fake, spec, hp, dtype, device, as_list, wrap=lambda a: a):
    """(arrays, names) as fastopt.functional.apply_update hands them to the backend (spec.plan_call): None
    for an unused state slot, trailing ones dropped, a fourth state after the Kahan compensation's slot."""
    shapes = LIST_SHAPES if as_list else [SINGLE_SHAPE]
    arrays = tuple(new_arrays(fake, shapes, dtype, device, as_list, wrap) for _ in range(2))
    tail, names = spec.plan_call(hp, lambda _: new_arrays(fake, shapes, state_dtype(dtype), device, as_list, wrap))
    return arrays + tail, names


def grad_scales(fake, dtype, device, wrap=lambda a: a):
    """Every form of grad_scale: none, a float, a host 0-d array, a device 0-d array (of the params'
    dtype: gs_kind 1, 2, 3 over the dtypes)."""
    return [None, 0.5, np.array(0.25, np.float32), wrap(fake.alloc((), dtype, device))]


def check_update_values(spec, hp, step, arrays, grad_scale, found_inf, launch):
    """The update launch passes the right arrays in the right slots (pointer types alone would not
    catch a swapped pair)."""
    a = args_by_name(launch)
    device_gs = grad_scale is not None and not isinstance(grad_scale, (float, np.ndarray))
    host_scale = 1.0 if grad_scale is None or device_gs else float(grad_scale)
    sc = a["sc"]["v"]
    expected = spec.scalars(hp, step, host_scale)
    assert sc[:len(expected)].tolist() == list(expected) and not sc[len(expected):].any(), launch.name
    if "gs" not in a:
        pass  # a two-phase apply kernel: grad_scale was applied in phase 1
    elif device_gs:
        gs = getattr(grad_scale, "backing", grad_scale)
        assert ptr(a["gs"]) == gs.data.ptr and int(a["gs_kind"]) == {F16: 1, F32: 2, F64: 3}[gs.dtype], launch.name
    else:
        assert ptr(a["gs"]) == 0 and int(a["gs_kind"]) == 0, launch.name
    flag = getattr(found_inf, "backing", found_inf)
    assert ptr(a["skip"]) == (0 if flag is None else flag.data.ptr), launch.name
    if "p" in a:  # the single-array kernel: its arrays slot by slot
        unwrap = [getattr(x, "backing", x) for x in arrays] + [None] * (7 - len(arrays))
        unwrap = unwrap[:5] + unwrap[6:]  # slot 5 (the Kahan compensation) never reaches the GPU; 6 is s3
        for slot, x in zip(("p", "g", "s0", "s1", "s2", "s3"), unwrap):
            assert ptr(a[slot]) == (0 if x is None else x.data.ptr), f"{launch.name} {slot}"
        assert int(a["n"]) == unwrap[0].size and int(a["vec"]) == 1, launch.name
        # one 16-byte vector per thread: the grid is not capped (the loop is grid-stride all the same)
        assert launch.grid[0] * cuda_source.BLOCK * (16 // unwrap[0].dtype.itemsize) >= unwrap[0].size, launch.grid


def run_updates(fake, spec, dtype, device, wrap=lambda a: a, hp_sets=None):
    """cupy_backend.step over every option set (hp_sets: these instead), step, single array / list,
    grad_scale and found_inf form, each call's launches checked; returns the names launched."""
    launched = set()
    for hp, step, as_list in itertools.product(hp_sets or option_sets(spec), STEPS, (False, True)):
        arrays, names = update_arrays(fake, spec, hp, dtype, device, as_list, wrap)
        for grad_scale, found_inf in itertools.product(grad_scales(fake, dtype, device, wrap),
                                                       (None, wrap(fake.alloc((), np.bool_, device)))):
            fake.launches.clear()
            cupy_backend.step(spec, arrays, names, hp, step, grad_scale, found_inf)
            context = (f"{spec.name} {dtype} device {device} hp={hp} step={step} list={as_list} "
                       f"grad_scale={grad_scale!r} found_inf={found_inf!r}")
            assert_launches_fit(fake, context, device)
            kernels = [launch.name for launch in fake.launches]
            if spec.two_phase:
                assert kernels == list(cuda_source.two_phase_kernel_names(spec.kernel)), context
            elif spec.tensor_coefs is not None:  # LARS: the sums of squares of p, then g; the multi entry
                variant = spec.variant(hp, step)
                assert kernels == ["fo_sumsq_chunks", "fo_sumsq_tensors"] * 2 + [
                    cuda_source.update_kernel_name(spec.kernel, variant, True)], context
            else:
                variant = spec.variant(hp, step)
                assert kernels == [cuda_source.update_kernel_name(spec.kernel, variant, as_list)], context
            for launch in fake.launches:
                assert module_dtype(launch.options) == dtype, context
                if launch.name.startswith("fo_sumsq"):  # the norms pass: reductions, checked by their own test
                    continue
                if not launch.name.endswith("_trust"):  # the two-phase trust kernel reads no update args
                    check_update_values(spec, hp, step, arrays, grad_scale, found_inf, launch)
                    assert ptr(args_by_name(launch)["at"]) == 0, context
            launched.update(kernels)
        if spec.tensor_coefs is None:  # capturable=True: every kernel reads the device row of scalars instead
            row = fake.alloc(16, np.float64, device)
            fake.launches.clear()
            cupy_backend.run(cupy_backend.prepare(arrays, names), spec, hp, step, None, scalars_at=row)
            assert_launches_fit(fake, f"{spec.name} scalars_at", device)
            for launch in fake.launches:
                a = args_by_name(launch)
                if launch.name.endswith("_trust"):  # LAMB's lr: the row's last slot
                    assert ptr(a["lr_at"]) == row.data.ptr + 8 * LR_SLOT
                else:
                    assert ptr(a["at"]) == row.data.ptr and not np.any(a["sc"]["v"]), launch.name
    return launched


def run_reductions(fake, dtype, device):
    """The norms, clipping, step_guard, scale_, clamp_ and touch in each form, each call's launches
    checked; returns the names launched."""
    launched = set()

    def check(what, call):
        fake.launches.clear()
        result = call()
        assert_launches_fit(fake, f"{what} {dtype} device {device}", device)
        launched.update(launch.name for launch in fake.launches)
        return result

    for as_list in (False, True):
        shapes = LIST_SHAPES if as_list else [SINGLE_SHAPE]
        grads = new_arrays(fake, shapes, dtype, device, as_list)
        sq = check("sumsq_per_tensor", lambda: cupy_backend.sumsq_per_tensor(grads))
        assert sq.shape == (len(shapes),) and sq.dtype == F64
        buffer = fake.alloc(len(shapes) + 3, np.float64, device)
        check("sumsq_per_tensor(out=)", lambda: cupy_backend.sumsq_per_tensor(grads, out=buffer[2:2 + len(shapes)]))
        assert ptr(args_by_name(fake.launches[-1])["out"]) == buffer.data.ptr + 16
        check("global_norm", lambda: cupy_backend.global_norm(sq))
        check("clip_by_global_norm", lambda: cupy_backend.clip_by_global_norm(grads, sq, 1.0))
        check("clip_by_norm", lambda: cupy_backend.clip_by_norm(grads, sq, 1.0))
        check("scale_(float)", lambda: cupy_backend.scale_(grads, 0.5))
        check("scale_(host 0-d)", lambda: cupy_backend.scale_(grads, np.array(0.5)))
        for coef_dtype in (np.float32, np.float64):
            coef = fake.alloc((), coef_dtype, device)
            check(f"scale_({np.dtype(coef_dtype)} device 0-d)", lambda: cupy_backend.scale_(grads, coef))
        check("clamp_", lambda: cupy_backend.clamp_(grads, 0.1))
    for max_norm, skip_nonfinite, counted in itertools.product((None, 1.0), (False, True), (False, True)):
        sq = fake.alloc(4, np.float64, device)
        skipped = fake.alloc(1, np.int64, device).reshape(()) if counted else None
        coef, flag = check(f"step_guard({max_norm}, {skip_nonfinite}, {counted})",
                           lambda: cupy_backend.step_guard(sq, max_norm, skip_nonfinite, skipped))
        assert (coef is None) == (max_norm is None) and (flag is None) == (not skip_nonfinite)
        a = args_by_name(fake.launches[0])
        assert ptr(a["skipped"]) == (skipped.data.ptr if counted else 0)
        assert ptr(a["coef"]) == (0 if coef is None else coef.data.ptr)
        assert ptr(a["found_inf"]) == (0 if flag is None else flag.data.ptr)
    like = fake.alloc(3, dtype, device)
    rows, meta, out = fake.alloc(2 * 4 * 16, np.float64, device), fake.alloc(4, np.int64, device), \
        fake.alloc(32, np.float64, device)
    counters, overflow = fake.alloc(2, np.int64, device), fake.alloc(1, np.int64, device)
    for own in (True, False):
        flag = fake.alloc((), np.uint8, device)
        check(f"select_scalars(own flag {own})", lambda: cupy_backend.select_scalars(rows, 4, meta, counters, out,
                                                                                     flag, own, overflow, like))
        a = args_by_name(fake.launches[0])
        assert int(a["capacity"]) == 4 and int(a["ngroups"]) == 2 and int(a["own_flag"]) == own
        assert ptr(a["flag"]) == flag.data.ptr and ptr(a["out"]) == out.data.ptr
    for n in range(2, 6):
        arrays = [fake.alloc(SINGLE_SHAPE, dtype if k < 2 else state_dtype(dtype), device) for k in range(n)]
        check(f"touch({n} arrays)", lambda: cupy_backend.touch(arrays))
        assert int(args_by_name(fake.launches[0])["ns"]) == n - 2
    return launched


# ---------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------

def test_signatures_parsed_for_exactly_the_entry_points():
    assert set(SIGNATURES) == set(cuda_source.kernel_names())
    macro_made = [cuda_source.update_kernel_name(f, v, m) for f, vs in cuda_source.UPDATE_VARIANTS.items()
                  if f not in cuda_source.per_tensor_families() for v in vs for m in (False, True)]
    assert all(tuple(SIGNATURES[n][-2:]) == (("const unsigned char*", "skip"), ("const double*", "at")) for n in macro_made)
    assert [p for _, p in SIGNATURES["fo_adam_v1"]] == ["p", "g", "s0", "s1", "s2", "s3", "n", "sc", "gs",
                                                         "gs_kind", "vec", "skip", "at"]
    assert SCALARS_BYTES == 144 == cupy_backend._SCALARS.itemsize  # 16 doubles, the rounding key and index0
    for name, params in SIGNATURES.items():
        for ctype, _ in params:
            c_kind(ctype)  # every parameter type has a CuPy rule


@pytest.mark.parametrize("device", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", REGISTRY.values(), ids=lambda s: s.name)
def test_update_launches_fit_the_kernels(fake, spec, dtype, device):
    launched = run_updates(fake, spec, dtype, device)
    variants = {spec.variant(hp, step) for hp in option_sets(spec) for step in STEPS}
    if not spec.two_phase:
        assert variants == set(cuda_source.UPDATE_VARIANTS[spec.kernel])
        multi_only = spec.kernel in cuda_source.per_tensor_families()  # LARS: coefs per tensor, multi entry only
        norms = {"fo_sumsq_chunks", "fo_sumsq_tensors"} if multi_only else set()  # LARS's norms pass
        assert launched == norms | {cuda_source.update_kernel_name(spec.kernel, v, m) for v in variants
                                    for m in ((True,) if multi_only else (False, True))}


@pytest.mark.parametrize("spec", REGISTRY.values(), ids=lambda s: s.name)
def test_update_launches_fit_with_foreign_device_arrays(fake, spec):
    # torch-like arrays (only __cuda_array_interface__), device from cudaPointerGetAttributes
    assert run_updates(fake, spec, F32, 1, wrap=ForeignArray)


@pytest.mark.parametrize("device", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reduction_clip_and_touch_launches_fit_the_kernels(fake, dtype, device):
    launched = run_reductions(fake, dtype, device)
    assert launched == set(cuda_source.REDUCTION_KERNELS)


def test_vector_flag_follows_alignment(fake):
    spec = REGISTRY["adam"]
    hp = dict(spec.defaults)
    for misalign, vec in ((0, 1), (4, 0)):
        p, m, v = (fake.alloc((1000,), np.float32) for _ in range(3))
        g = fake.alloc((1000,), np.float32, misalign=misalign)
        fake.launches.clear()
        cupy_backend.step(spec, (p, g, m, v), ("params", "grads", "exp_avg", "exp_avg_sq"), hp, 1, None)
        assert_launches_fit(fake, f"misalign {misalign}")
        assert type(args_by_name(fake.launches[0])["vec"]) is np.int32
        assert int(args_by_name(fake.launches[0])["vec"]) == vec
    # a list: the flag is per tensor, in the device table
    ps, ms, vs = ([fake.alloc((100,), np.float32) for _ in range(2)] for _ in range(3))
    gs = [fake.alloc((100,), np.float32), fake.alloc((100,), np.float32, misalign=8)]
    fake.launches.clear()
    cupy_backend.step(spec, (ps, gs, ms, vs), ("params", "grads", "exp_avg", "exp_avg_sq"), hp, 1, None)
    assert_launches_fit(fake, "misaligned list")
    tensors = ptr(args_by_name(fake.launches[0])["tensors"])
    table = next(t for t in cupy_backend._tables.values() if t.tensors == tensors)
    assert table.buffer.host[:2 * cuda_source.TABLE_FIELDS].reshape(2, cuda_source.TABLE_FIELDS)[:, 6].tolist() == [1, 0]


def test_no_launch_for_empty_arrays(fake):
    spec = REGISTRY["adam"]
    empty = [fake.alloc((0,), np.float32) for _ in range(4)]
    cupy_backend.step(spec, tuple(empty), ("params", "grads", "exp_avg", "exp_avg_sq"), spec.defaults, 1, None)
    out = fake.alloc(2, np.float64)
    cupy_backend.sumsq_per_tensor(empty[:2], out=out)
    assert fake.launches == [] and out.filled == 0


@pytest.mark.parametrize("shape, dtype, device", [((3,), np.float64, 0), ((2, 1), np.float64, 0),
                                                   ((2,), np.float32, 0), ((2,), np.float64, 1)])
def test_sumsq_out_is_checked(fake, shape, dtype, device):
    """out= of sumsq_per_tensor (the optimizer's buffer slice) of another length, dtype or device is refused
    before any launch: the kernel writes n float64 values to out's address."""
    grads = [fake.alloc(s, np.float32, 0) for s in [(3,), (5,)]]
    out = fake.alloc(shape, dtype, device)
    with pytest.raises(ValueError, match="out"):
        cupy_backend.sumsq_per_tensor(grads, out=out)
    assert fake.launches == []
    cupy_backend.sumsq_per_tensor(grads, out=fake.alloc(2, np.float64, 0))
    assert fake.launches


def run_int8_updates(fake, spec, dtype, device):
    """cupy_backend.step with 8-bit states (QuantizedState: uint8 codes, float32 absmax) over every option set,
    step, single array / list and grad_scale form: the family's _q8 kernel of the int8 module (after the norms
    pass of LARS), its tables and the signed map's bits; returns the names launched."""
    from fastopt.precision import QuantizedState, quant_blocks, signed_state
    launched = set()
    for hp, step, as_list in itertools.product(option_sets(spec), STEPS, (False, True)):
        shapes = LIST_SHAPES if as_list else [SINGLE_SHAPE]

        def quantized(name):
            out = [QuantizedState(fake.alloc(s, U8, device), fake.alloc((quant_blocks(int(np.prod(s))),), F32, device),
                                  signed_state(name)) for s in shapes]
            return out if as_list else out[0]
        arrays = tuple(new_arrays(fake, shapes, dtype, device, as_list) for _ in range(2))
        tail, names = spec.plan_call(hp, quantized)
        if not any(t is not None for t in tail):
            continue  # no state to quantize (SGD without momentum): the plain kernels
        for grad_scale in grad_scales(fake, dtype, device):
            fake.launches.clear()
            cupy_backend.step(spec, arrays + tail, names, hp, step, grad_scale, fake.alloc((), np.bool_, device))
            context = f"{spec.name} int8 {dtype} hp={hp} step={step} list={as_list} grad_scale={grad_scale!r}"
            assert_launches_fit(fake, context, device)
            kernels = [launch.name for launch in fake.launches]
            name = cuda_source.int8_kernel_name(spec.kernel, spec.variant(hp, step))
            norms = ["fo_sumsq_chunks", "fo_sumsq_tensors"] * 2 if spec.tensor_coefs is not None else []
            assert kernels == norms + [name], context
            a = args_by_name(fake.launches[-1])
            assert module_dtype(fake.launches[-1].options) == cuda_source.module_key(dtype, cuda_source.INT8), context
            # s0-s2 and a fourth state (Adan's: the call's slot 6, after the compensation): bit 3
            slots = [t for t in tail[:3]] + [None] * (3 - len(tail[:3])) + [tail[4] if len(tail) > 4 else None]
            want = sum(1 << k for k, t in enumerate(slots) if t is not None and
                       (t[0] if isinstance(t, list) else t).signed)
            assert int(a["signed_mask"]) == want, context
            assert (ptr(a["tensor_coefs"]) != 0) == (spec.tensor_coefs is not None), context
            launched.update(kernels)
    return launched


def test_every_entry_point_is_launched(fake):
    assert set(UNREACHABLE) <= set(cuda_source.kernel_names())
    launched = set()
    from fastopt.precision import INT8_REFUSED
    for dtype in DTYPES:
        for spec in REGISTRY.values():
            launched.update(run_updates(fake, spec, dtype, 0))
            if dtype != F64 and spec.states and not spec.two_phase and spec.name not in INT8_REFUSED:
                launched.update(run_int8_updates(fake, spec, dtype, 0))
        # weight averaging (fastopt.ema_update / swa_update): a kernel family that is not an optimizer
        averaging = [{"mode": m, "weight": 0.25, "divisor": 3.0, "lr": 0.0} for m in WEIGHT_AVERAGE.variants]
        launched.update(run_updates(fake, WEIGHT_AVERAGE, dtype, 0, hp_sets=averaging))
        launched.update(run_reductions(fake, dtype, 0))
    assert launched <= set(cuda_source.kernel_names())
    assert not launched & set(UNREACHABLE), "listed as unreachable but launched"
    missing = set(cuda_source.kernel_names()) - set(UNREACHABLE) - launched
    assert not missing, f"never launched: {sorted(missing)}"


# The checker itself: each defect of a launch is reported (so a passing run means something).

def _good_launch(fake):
    spec = REGISTRY["adam"]
    arrays, names = update_arrays(fake, spec, dict(spec.defaults), F32, 0, False)
    cupy_backend.step(spec, arrays, names, dict(spec.defaults), 1, fake.alloc((), np.float32),
                      fake.alloc((), np.bool_))
    (launch,) = fake.launches
    assert launch_problems(fake, launch) == []
    return launch


def _arg(launch, name):
    return args_by_name(launch)[name]


def _with_arg(launch, name, value):
    names = [p for _, p in SIGNATURES[launch.name]]
    args = list(launch.args)
    args[names.index(name)] = value
    return launch._replace(args=tuple(args))


BAD_LAUNCHES = {
    "dropped skip": lambda fake, lc: lc._replace(args=lc.args[:-1]),
    "extra argument": lambda fake, lc: lc._replace(args=lc.args + (np.uint64(0),)),
    "args as a list": lambda fake, lc: lc._replace(args=list(lc.args)),
    "python int for long long": lambda fake, lc: _with_arg(lc, "n", int(_arg(lc, "n"))),
    "int32 for long long": lambda fake, lc: _with_arg(lc, "n", np.int32(_arg(lc, "n"))),
    "python int for int": lambda fake, lc: _with_arg(lc, "gs_kind", 2),
    "python bool for int": lambda fake, lc: _with_arg(lc, "vec", True),
    "int64 for int": lambda fake, lc: _with_arg(lc, "vec", np.int64(1)),
    "None for a pointer": lambda fake, lc: _with_arg(lc, "s2", None),
    "python int for a pointer": lambda fake, lc: _with_arg(lc, "gs", ptr(_arg(lc, "gs"))),
    "int64 for a pointer": lambda fake, lc: _with_arg(lc, "gs", np.int64(ptr(_arg(lc, "gs")))),
    "null for a required pointer": lambda fake, lc: _with_arg(lc, "p", np.uint64(0)),
    "wild pointer": lambda fake, lc: _with_arg(lc, "p", np.uint64(12345)),
    "state pointer for params": lambda fake, lc: _with_arg(lc, "p", np.uint64(fake.alloc(8, np.float64).data.ptr)),
    "pointer on another device": lambda fake, lc: _with_arg(lc, "g", np.uint64(fake.alloc(8, np.float32, 1).data.ptr)),
    "short Scalars": lambda fake, lc: _with_arg(lc, "sc", np.zeros((), [("v", np.float64, (8,))])[()]),
    "tuple for Scalars": lambda fake, lc: _with_arg(lc, "sc", tuple(_arg(lc, "sc")["v"])),
    "float32 array for Scalars": lambda fake, lc: _with_arg(lc, "sc", np.zeros(32, np.float32)),
    "python float for int": lambda fake, lc: _with_arg(lc, "vec", 1.0),
    "unknown kernel": lambda fake, lc: lc._replace(name="fo_adam_v2"),
    "block of 128": lambda fake, lc: lc._replace(block=(128,)),
    "block as int": lambda fake, lc: lc._replace(block=cuda_source.BLOCK),
    "empty grid": lambda fake, lc: lc._replace(grid=(0,)),
    "grid as list": lambda fake, lc: lc._replace(grid=[1]),
    "other dtype's options": lambda fake, lc: lc._replace(options=cuda_source.compile_options(F64)),
}


@pytest.mark.parametrize("defect", BAD_LAUNCHES)
def test_checker_reports(fake, defect):
    launch = BAD_LAUNCHES[defect](fake, _good_launch(fake))
    assert launch_problems(fake, launch), f"{defect} not reported"


def test_checker_reports_python_float_for_double(fake):
    cupy_backend.global_norm(fake.alloc(3, np.float64))
    (launch,) = fake.launches
    assert launch_problems(fake, launch) == []
    assert launch_problems(fake, _with_arg(launch, "max_norm", 1.0))
    assert launch_problems(fake, _with_arg(launch, "n", np.uint64(3)))


def _list_step(fake, ps, gs, ms, vs):
    spec = REGISTRY["adam"]
    cupy_backend.step(spec, (ps, gs, ms, vs), ("params", "grads", "exp_avg", "exp_avg_sq"), dict(spec.defaults), 1,
                      None)
    return ptr(args_by_name(fake.launches[-1])["tensors"])


def test_a_table_is_shared_across_streams_after_its_upload(fake):
    """The same tensors on another stream (a CUDA graph captured on its own stream after eager steps) reuse
    the table: no new upload; the other stream waits for the upload on the device while it may still be
    queued, on the host (once) when that stream is being captured, and not at all once it is done. A first
    step inside a capture says what to do instead of failing in CuPy's H2D copy."""
    ps, gs, ms, vs = ([fake.alloc((300,), np.float32) for _ in range(3)] for _ in range(4))
    fake.events_pending = True
    first = _list_step(fake, ps, gs, ms, vs)
    (table,) = cupy_backend._tables.values()
    assert fake.events == [table.ready] and not table.pinned
    assert _list_step(fake, ps, gs, ms, vs) == first and fake.waits == []  # same stream: ordered already
    side = fake.cuda.Stream()
    with side:
        assert _list_step(fake, ps, gs, ms, vs) == first
    assert fake.waits == [(side.ptr, table.ready)] and table.pinned and table.ready.host_waits == 0
    captured = fake.cuda.Stream()
    fake.capturing.add(captured.ptr)
    with captured:
        assert _list_step(fake, ps, gs, ms, vs) == first
    assert table.ready is None and len(fake.waits) == 1  # waited on the host, once
    assert len(cupy_backend._tables) == 1 and table in cupy_backend._pinned_tables
    with captured:
        others = [fake.alloc((300,), np.float32) for _ in range(3)]
        with pytest.raises(RuntimeError, match="run one step before capturing"):
            _list_step(fake, others, gs, ms, vs)
    assert len(cupy_backend._tables) == 1


def test_step_guard_outputs_used_in_a_capture_are_never_evicted(fake):
    """step_guard keeps the coef/flag pair of the 256 most recent (sums, stream) pairs. A pair captured into a
    CUDA graph was evicted like the others once 256 more were used (an optimizer per trial of a search): its
    memory went back to the pool while the graph kept writing it at every replay."""
    captured = fake.cuda.Stream()
    fake.capturing.add(captured.ptr)
    sq = fake.alloc((4,), np.float64)
    with captured:
        coef, flag = cupy_backend.step_guard(sq, 1.0, True)
    for _ in range(300):  # other optimizers' sums, eager, on the default stream
        cupy_backend.step_guard(fake.alloc((4,), np.float64), 1.0, True)
    assert len(cupy_backend._guard_buffers) == 256
    with captured:
        again = cupy_backend.step_guard(sq, 1.0, True)
    assert ptr(again[0]) == ptr(coef) and ptr(again[1]) == ptr(flag)
    pinned = cupy_backend._pinned_guard_buffers[(sq.data.ptr, captured.ptr)]
    assert ptr(pinned[0]) == ptr(coef)


def test_a_done_upload_needs_no_wait(fake):
    ps, gs, ms, vs = ([fake.alloc((5000,), np.float32) for _ in range(2)] for _ in range(4))
    first = _list_step(fake, ps, gs, ms, vs)
    with fake.cuda.Stream():
        assert _list_step(fake, ps, gs, ms, vs) == first
    assert fake.waits == [] and next(iter(cupy_backend._tables.values())).ready is None
