"""Every launch is ordered after the producer of its inputs (issue 11, "Streams"): each kernel launch and
each scratch allocation of both GPU backends runs on the arrays' device and on the stream that orders the
work producing them, for each kind of input:
    CuPy arrays                                  CuPy's current stream (a non-default one here)
    torch CUDA tensors (CAI v2, no stream)       torch.cuda.current_stream(tensor.device)
    other __cuda_array_interface__ v3 arrays     the exported stream
    Numba device arrays (numba backend)          the array's own stream
through the functional API (one array, a list, the two-phase LAMB), the optimizer classes (with
clip_grad_norm and skip_nonfinite: the sums of squares and the guard too) and the clip functions.
No GPU: CuPy is the recording stand-in of test_cupy_launch_abi.py, torch a stand-in module whose tensors
export __cuda_array_interface__ v2 like torch's, and numba.cuda a stand-in whose kernels record their
launch. The real thing is tests/gpu/test_gpu_execution.py (side stream, torch.cuda._sleep, fill_).
"""
from __future__ import annotations

import contextlib
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest

import fastopt
from fastopt.backends import cupy_backend
from fastopt.backends import numba_backend as nb

from test_cupy_launch_abi import ForeignArray, fake  # noqa: F401  (fake: the CuPy stand-in fixture)

DEVICE = 1
CUPY_STREAM, TORCH_STREAM, EXPORTED_STREAM = 0x5100, 0x7A00, 0x6B00
SHAPES = [(5,), (70_000,), (3, 4)]


class FakeTensor:
    """The stand-in torch.Tensor."""


def fake_torch(streams):
    """A torch module whose current stream on device d is streams[d] (torch.cuda.current_stream)."""
    torch = types.ModuleType("torch")
    torch.Tensor = FakeTensor
    torch.cuda = SimpleNamespace(current_stream=lambda device: SimpleNamespace(cuda_stream=streams[device.index]))
    return torch


class TorchTensor(ForeignArray, FakeTensor):
    """A torch CUDA tensor: __cuda_array_interface__ v2 (no stream), .device.index."""

    def __init__(self, backing):
        super().__init__(backing)
        self.__cuda_array_interface__ = dict(self.__cuda_array_interface__, version=2)
        del self.__cuda_array_interface__["strides"]
        self.device = SimpleNamespace(index=backing.device.id, type="cuda")
        self.shape, self.dtype, self.size = backing.shape, backing.dtype, backing.size


class ExportingArray(ForeignArray):
    """Any other array: __cuda_array_interface__ v3 with the stream its producer used."""

    def __init__(self, backing):
        super().__init__(backing)
        self.__cuda_array_interface__["stream"] = EXPORTED_STREAM
        self.shape, self.dtype, self.size = backing.shape, backing.dtype, backing.size


# ---------------------------------------------------------------------------------------------------
# The CuPy backend
# ---------------------------------------------------------------------------------------------------

KINDS = {"cupy": (lambda a: a, CUPY_STREAM), "torch": (TorchTensor, TORCH_STREAM),
         "exported": (ExportingArray, EXPORTED_STREAM)}


@pytest.fixture
def cupy_world(fake, monkeypatch):
    """The CuPy stand-in installed as `cupy` (init_state imports it), a stand-in torch, and inside
    the test a current CuPy stream of its own on DEVICE (which only CuPy arrays must use)."""
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "torch", fake_torch({0: TORCH_STREAM - 1, DEVICE: TORCH_STREAM}))
    stream = fake.cuda.Stream(CUPY_STREAM)
    with fake.cuda.Device(DEVICE), stream:
        with fake.cuda.Device(0):  # the current device is another one: the arrays' device must win
            yield fake


def _arrays(fake, kind, shapes, dtype=np.float32):
    wrap = KINDS[kind][0]
    return [wrap(fake.alloc(s, dtype, DEVICE)) for s in shapes]


@contextlib.contextmanager
def _expect(fake, kind, what):
    """Every launch and every allocation inside the block is on DEVICE and on the kind's stream."""
    expected = KINDS[kind][1]
    fake.launches.clear()
    first_allocation = len(fake.allocations)
    yield
    assert fake.launches, f"{what}: nothing launched"
    wrong = [(launch.name, hex(launch.stream), launch.device) for launch in fake.launches
             if launch.stream != expected or launch.device != DEVICE]
    assert not wrong, f"{what} ({kind} arrays): launched on {wrong}, expected stream {expected:#x} device {DEVICE}"
    wrong = [(hex(a.stream), a.device) for a in fake.allocations[first_allocation:]
             if a.stream != expected or a.device != DEVICE]
    assert not wrong, f"{what} ({kind} arrays): scratch allocated on {wrong}, expected stream {expected:#x}"


@pytest.mark.parametrize("kind", KINDS)
def test_cupy_functional_calls_launch_on_the_producer_stream(cupy_world, kind):
    fake = cupy_world
    p, g, buf = (_arrays(fake, kind, SHAPES[:1])[0] for _ in range(3))
    with _expect(fake, kind, "sgd_step, one array"):
        fastopt.sgd_step(p, g, buf, lr=1.0, momentum=0.9, step=2, backend="cupy")
    ps, gs, ms, vs = (_arrays(fake, kind, SHAPES) for _ in range(4))
    with _expect(fake, kind, "adam_step, a list"):
        fastopt.adam_step(ps, gs, ms, vs, step=1, backend="cupy")
    with _expect(fake, kind, "lamb_step (two phases, scratch partials)"):
        fastopt.lamb_step(ps, gs, ms, vs, step=1, backend="cupy")
    with _expect(fake, kind, "lamb_step, one array"):
        fastopt.lamb_step(ps[1], gs[1], ms[1], vs[1], step=1, backend="cupy")


@pytest.mark.parametrize("kind", KINDS)
def test_cupy_clip_functions_launch_on_the_producer_stream(cupy_world, kind):
    fake = cupy_world
    gs = _arrays(fake, kind, SHAPES)
    with _expect(fake, kind, "global_norm"):
        total = fastopt.global_norm(gs, backend="cupy")
    fake.launches.clear()
    with fake.cuda.Device(DEVICE), fake.cuda.Stream(0x9900):  # another stream current by now
        coef = fastopt.clip.clip_coefficient(total, 1.0)  # runs where the norm was made
    assert {launch.stream for launch in fake.launches} <= {KINDS[kind][1]}
    assert coef is not None
    with _expect(fake, kind, "clip_by_global_norm"):
        fastopt.clip_by_global_norm(gs, 1.0, backend="cupy")
    with _expect(fake, kind, "clip_by_norm"):
        fastopt.clip_by_norm(gs, 1.0, backend="cupy")
    with _expect(fake, kind, "clip_by_value"):
        fastopt.clip_by_value(gs, 0.5, backend="cupy")
    ps, ms, vs = (_arrays(fake, kind, SHAPES) for _ in range(3))
    with _expect(fake, kind, "adam_step with grad_scale=coef"):
        fastopt.adam_step(ps, gs, ms, vs, step=1, grad_scale=coef, backend="cupy")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["sgd", "lamb"])
def test_cupy_optimizer_class_launches_on_the_producer_stream(cupy_world, kind, name):
    fake = cupy_world
    cls = getattr(fastopt, fastopt.specs.get_spec(name).class_name)
    ps = _arrays(fake, kind, SHAPES)
    opt = cls(ps, lr=1.0, clip_grad_norm=1.0, skip_nonfinite=True, backend="cupy")
    with fake.cuda.Device(DEVICE):  # functional.init_state makes the state on the current device
        opt.step(_arrays(fake, kind, SHAPES))  # makes the state and the guard buffers
    grads = _arrays(fake, kind, SHAPES)
    with _expect(fake, kind, f"{cls.__name__}.step with clip_grad_norm and skip_nonfinite"):
        opt.step(grads)
    names = [launch.name for launch in fake.launches]
    assert "fo_step_guard" in names and "fo_sumsq_chunks" in names, names


@pytest.mark.parametrize("kind", KINDS)
def test_cupy_device_full_is_made_on_the_device_and_stream_of_like(cupy_world, kind):
    fake = cupy_world
    like = _arrays(fake, kind, SHAPES[:1])[0]
    first = len(fake.allocations)
    state = cupy_backend.device_full((33, 7), 0.5, np.float32, like)
    assert state.shape == (33, 7) and state.dtype == np.float32 and state.device.id == DEVICE
    assert fake.allocations[first:] == [fake.allocations[-1]] and fake.allocations[-1].stream == KINDS[kind][1]


def test_cupy_norms_compile_only_the_module_of_the_data(fake):
    """float32 data never compiles the float64 module (seconds on a first call): the dtype-independent
    reductions (global norm, guard) come from the float32 module."""
    gs = [fake.alloc(s, np.float32, 0) for s in SHAPES]
    sq = cupy_backend.sumsq_per_tensor(gs)
    cupy_backend.clip_by_global_norm(gs, sq, 1.0)
    cupy_backend.step_guard(sq, 1.0, True)
    compiled = {dtype for (_, dtype) in cupy_backend._modules}
    assert compiled == {np.dtype(np.float32)}, compiled


# ---------------------------------------------------------------------------------------------------
# The Numba backend
# ---------------------------------------------------------------------------------------------------

class FakeNumbaStream:
    def __init__(self, handle):
        self.handle = handle

    def __int__(self):
        return self.handle

    def __repr__(self):
        return f"FakeNumbaStream({self.handle:#x})"


class FakeDeviceArray:
    """What the numba backend uses of a Numba device array (and of the views it makes). Its module is
    numba's, as the dispatcher routes Numba arrays (a returned norm given to clip_coefficient) by module."""

    def __init__(self, fake, n, dtype, ptr, stream=0, device=0):
        self._fake, self.size, self.dtype, self.ptr = fake, n, np.dtype(dtype), ptr
        self.shape = (n,)
        self.stream = stream
        self.gpu_data = SimpleNamespace(context=SimpleNamespace(device=SimpleNamespace(id=device)))

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False), "strides": None,
                "version": 3, "stream": None if self.stream == 0 else int(self.stream)}

    def copy_to_host(self):
        raise AssertionError("a host copy")

    def copy_to_device(self, host, stream=0):
        assert stream != 0, "a synchronous copy to the device inside a call"
        self._fake.copies.append((int(stream), self._fake.device))

    def reshape(self, *shape):
        view = FakeDeviceArray(self._fake, self.size, self.dtype, self.ptr, self.stream)
        view.gpu_data, view.shape = self.gpu_data, tuple(shape[0] if len(shape) == 1 and isinstance(shape[0], tuple)
                                                         else shape)
        return view

    def __getitem__(self, key):
        start, stop, _ = key.indices(self.size)
        view = FakeDeviceArray(self._fake, stop - start, self.dtype, self.ptr + start * self.dtype.itemsize,
                               self.stream)
        view.gpu_data = self.gpu_data
        return view


FakeDeviceArray.__module__ = "numba.cuda.cudadrv.devicearray"


class FakeNumbaCuda:
    """numba.cuda as the numba backend uses it: kernels record (name, stream, device); allocations record
    their stream."""

    def __init__(self):
        self.launches, self.allocations, self.copies = [], [], []
        self._next = 1 << 40
        self.device = 0

    def _alloc(self, n, dtype, stream):
        self._next += 1 << 20
        self.allocations.append((int(stream), self.device))
        return FakeDeviceArray(self, n, dtype, self._next, stream, self.device)

    def device_array(self, n, dtype, stream=0):
        return self._alloc(n if isinstance(n, int) else int(np.prod(n)), dtype, stream)

    def to_device(self, host, stream=0):
        array = self._alloc(np.asarray(host).size, np.asarray(host).dtype, stream)
        if stream == 0:  # a synchronous copy (the per-device constants): complete before any stream uses it
            self.allocations[-1] = ("synchronous", self.device)
        return array

    def as_cuda_array(self, obj, sync=True):
        assert sync is False, "a foreign array imported with a host synchronisation"
        cai = obj.__cuda_array_interface__
        return FakeDeviceArray(self, int(np.prod(cai["shape"])), cai["typestr"], cai["data"][0])

    def from_cuda_array_interface(self, desc, owner=None, sync=True):
        assert sync is False
        return FakeDeviceArray(self, desc["shape"][0], desc["typestr"], desc["data"][0])

    def external_stream(self, ptr):
        return FakeNumbaStream(ptr)

    def legacy_default_stream(self):
        return FakeNumbaStream(1)

    def per_thread_default_stream(self):
        return FakeNumbaStream(2)

    def kernel(self, name):
        fake = self

        class Launcher:
            def __getitem__(self, config):
                grid, block, stream = config

                def launch(*args):
                    fake.launches.append((name, int(stream), fake.device))
                return launch
        return Launcher()


class _Kernels(dict):
    def __init__(self, fake):
        super().__init__()
        self._fake = fake

    def __missing__(self, name):
        fake = self._fake

        class Family(dict):
            def __missing__(self, family):
                return fake.kernel(f"{name}[{family}]")
        value = Family() if name in ("update", "moments", "apply") else fake.kernel(name)
        self[name] = value
        return value


NUMBA_STREAM = 0x3C00


@pytest.fixture
def numba_world(monkeypatch):
    cuda = FakeNumbaCuda()

    @contextlib.contextmanager
    def on(device):
        previous, cuda.device = cuda.device, device
        try:
            yield
        finally:
            cuda.device = previous

    monkeypatch.setattr(nb, "_cuda", lambda: cuda)
    monkeypatch.setattr(nb, "simulating", lambda: False)
    monkeypatch.setattr(nb, "_on", on)
    monkeypatch.setattr(nb, "_pointer_device", lambda ptr: DEVICE)  # the driver's answer for foreign arrays
    kernels = _Kernels(cuda)
    monkeypatch.setattr(nb, "_kernels", lambda dtype, kinds=None, chunk=None: kernels)
    monkeypatch.setattr(nb, "_coefficient_kernel", lambda: cuda.kernel("clip_coefficient"))
    for cache in ("_tables", "_scratch", "_spare_buffers"):
        monkeypatch.setattr(nb, cache, type(getattr(nb, cache))())
    monkeypatch.setattr(nb, "_result_streams", nb.StreamMemo())
    for cached in (nb._external_stream, nb._ones, nb._never):
        cached.cache_clear()
    monkeypatch.setitem(sys.modules, "torch", fake_torch({0: TORCH_STREAM - 1, DEVICE: TORCH_STREAM}))
    yield cuda
    for cached in (nb._external_stream, nb._ones, nb._never):
        cached.cache_clear()


class NumbaTorch(FakeTensor):
    """A torch CUDA tensor for the numba backend."""

    def __init__(self, cuda, n):
        cuda._next += 1 << 20
        self.__cuda_array_interface__ = {"shape": (n,), "typestr": "<f4", "data": (cuda._next, False), "version": 2}
        self.device = SimpleNamespace(index=DEVICE, type="cuda")
        self.shape, self.dtype, self.size = (n,), np.dtype(np.float32), n


class NumbaExported:
    def __init__(self, cuda, n):
        cuda._next += 1 << 20
        self.__cuda_array_interface__ = {"shape": (n,), "typestr": "<f4", "data": (cuda._next, False), "version": 3,
                                         "stream": EXPORTED_STREAM}
        self.shape, self.dtype, self.size = (n,), np.dtype(np.float32), n


def _numba_array(cuda, n):
    cuda._next += 1 << 20
    return FakeDeviceArray(cuda, n, np.float32, cuda._next, FakeNumbaStream(NUMBA_STREAM), DEVICE)


NUMBA_KINDS = {"numba": (_numba_array, NUMBA_STREAM), "torch": (NumbaTorch, TORCH_STREAM),
               "exported": (NumbaExported, EXPORTED_STREAM)}
SIZES = [5, 70_000, 12]


@contextlib.contextmanager
def _expect_numba(cuda, kind, what):
    expected = NUMBA_KINDS[kind][1]
    cuda.launches.clear()
    cuda.copies.clear()
    first = len(cuda.allocations)
    yield
    wrong = [c for c in cuda.copies if c != (expected, DEVICE)]
    assert not wrong, f"{what} ({kind}): copies to the device on {wrong}"
    assert cuda.launches, f"{what}: nothing launched"
    wrong = [launch for launch in cuda.launches if launch[1:] != (expected, DEVICE)]
    assert not wrong, f"{what} ({kind}): launched as {wrong}, expected stream {expected:#x} on device {DEVICE}"
    wrong = [a for a in cuda.allocations[first:] if a not in ((expected, DEVICE), ("synchronous", DEVICE))]
    assert not wrong, f"{what} ({kind}): allocated on {wrong}"


def _numba_arrays(cuda, kind):
    return [NUMBA_KINDS[kind][0](cuda, n) for n in SIZES]


@pytest.mark.parametrize("kind", NUMBA_KINDS)
def test_numba_calls_launch_on_the_producer_stream_once_per_list(numba_world, kind):
    cuda = numba_world
    spec = fastopt.specs.get_spec("adam")
    ps, gs, ms, vs = (_numba_arrays(cuda, kind) for _ in range(4))
    names = ("params", "grads", "exp_avg", "exp_avg_sq")
    with _expect_numba(cuda, kind, "adam, a list"):
        nb.step(spec, (ps, gs, ms, vs), names, dict(spec.defaults), 1, None)
    assert [launch[0] for launch in cuda.launches] == ["update[adam]"], "one launch for the whole list"
    cuda.allocations.clear()
    with _expect_numba(cuda, kind, "adam, the same list again"):
        nb.step(spec, (ps, gs, ms, vs), names, dict(spec.defaults), 2, None)
    assert cuda.allocations == [], "the second call allocated (the table and scratch are cached)"
    lamb = fastopt.specs.get_spec("lamb")
    with _expect_numba(cuda, kind, "lamb, a list"):
        nb.step(lamb, (ps, gs, ms, vs), names, dict(lamb.defaults), 1, None)
    assert [launch[0] for launch in cuda.launches] == ["moments[lamb]", "trust", "apply[lamb]"]
    with _expect_numba(cuda, kind, "sumsq"):
        sq = nb.sumsq_per_tensor(gs)
    with _expect_numba(cuda, kind, "guard (reads sq where it was made)"):
        coef, flag = nb.step_guard(sq, 1.0, True)
    with _expect_numba(cuda, kind, "update with the guard's outputs"):
        nb.step(spec, (ps, gs, ms, vs), names, dict(spec.defaults), 3, coef, found_inf=flag)
    with _expect_numba(cuda, kind, "clip_by_global_norm"):
        nb.clip_by_global_norm(gs, sq, 1.0)
    with _expect_numba(cuda, kind, "clip_by_norm"):
        nb.clip_by_norm(gs, sq, 1.0)
    with _expect_numba(cuda, kind, "clamp_"):
        nb.clamp_(gs, 0.5)
    with _expect_numba(cuda, kind, "scale_"):
        nb.scale_(gs, 0.5)
    with _expect_numba(cuda, kind, "device_zeros"):
        buffer = nb.device_zeros(len(SIZES), np.float64, ps[0])
        cuda.launches.append(("none", NUMBA_KINDS[kind][1], DEVICE))  # device_zeros launches nothing
    with _expect_numba(cuda, kind, "sumsq into the optimizer's buffer"):
        nb.sumsq_per_tensor(gs, out=buffer)
    norm = nb.global_norm(sq)
    with _expect_numba(cuda, kind, "clip_coefficient of that norm"):
        nb.clip_coefficient(norm, 1.0)
    with _expect_numba(cuda, kind, "device_full (optimizer state)"):
        cuda.copies.clear()
        first = len(cuda.allocations)
        nb.device_full((3, 4), 0.5, np.float32, ps[0])
        assert cuda.allocations[first:] == [(NUMBA_KINDS[kind][1], DEVICE)]
        cuda.launches.append(("none", NUMBA_KINDS[kind][1], DEVICE))  # device_full launches nothing


def test_numba_tables_of_new_gradients_recycle_device_buffers(numba_world):
    """Gradients in new arrays every step make a new table every step: once the cache is full, the
    evicted tables' device buffers are reused (Numba frees memory in batches that synchronise the device)."""
    cuda = numba_world
    spec = fastopt.specs.get_spec("sgd")
    ps = _numba_arrays(cuda, "numba")
    counts = []
    for _ in range(nb._CACHE_SIZE + 20):
        gs = _numba_arrays(cuda, "numba")
        before = len(cuda.allocations)
        nb.step(spec, (ps, gs), ("params", "grads"), dict(spec.defaults, lr=0.1), 1, None)
        counts.append(len(cuda.allocations) - before)
    assert all(c == 0 for c in counts[nb._CACHE_SIZE + 1:]), counts
    assert len(nb._tables) == nb._CACHE_SIZE


@pytest.mark.parametrize("kind", NUMBA_KINDS)
def test_numba_public_api_launches_on_the_producer_stream(numba_world, kind):
    """The functional API, an optimizer class with clip_grad_norm and skip_nonfinite (SGD: no state to
    make) and the clip functions, on the numba backend."""
    cuda = numba_world
    p, g, buf = (_numba_arrays(cuda, kind)[1] for _ in range(3))
    with _expect_numba(cuda, kind, "sgd_step, one array"):
        fastopt.sgd_step(p, g, buf, lr=1.0, momentum=0.9, step=2, backend="numba")
    ps, gs, ms, vs = (_numba_arrays(cuda, kind) for _ in range(4))
    with _expect_numba(cuda, kind, "adam_step, a list"):
        fastopt.adam_step(ps, gs, ms, vs, step=1, backend="numba")
    assert [launch[0] for launch in cuda.launches] == ["update[adam]"]
    with _expect_numba(cuda, kind, "clip_by_global_norm"):
        total = fastopt.clip_by_global_norm(gs, 1.0, backend="numba")
    with _expect_numba(cuda, kind, "clip_coefficient of the returned norm"):
        fastopt.clip.clip_coefficient(total, 1.0)
    with _expect_numba(cuda, kind, "clip_by_norm"):
        fastopt.clip_by_norm(gs, 1.0, backend="numba")
    with _expect_numba(cuda, kind, "clip_by_value"):
        fastopt.clip_by_value(gs, 0.5, backend="numba")
    opt = fastopt.SGD(ps, lr=1.0, clip_grad_norm=1.0, skip_nonfinite=True, backend="numba")
    opt.step(_numba_arrays(cuda, kind))  # makes the guard buffers
    grads = _numba_arrays(cuda, kind)
    with _expect_numba(cuda, kind, "SGD.step with clip_grad_norm and skip_nonfinite"):
        opt.step(grads)
    names = [launch[0] for launch in cuda.launches]
    assert "step_guard" in names and "sumsq" in names and "update[sgd]" in names, names


def test_cupy_steady_steps_describe_only_the_grads(cupy_world, monkeypatch):
    """A class step on the same CuPy params and states describes only the grads (the host cost that made a
    200-tensor step 1.5 ms on an H200 machine), and nothing at all given the same CuPy grads as the last
    step; params of another kind (torch-like, whose storage can move under the same object) are described
    every step. A CuPy param reshaped in place (same size: all CuPy allows) is not looked at again: the
    kernels read the same memory, and the grads keep the shape checked first."""
    fake = cupy_world
    described = []
    real = cupy_backend._describe
    monkeypatch.setattr(cupy_backend, "_describe", lambda obj, name: described.append(name) or real(obj, name))
    # torch-like params: they and the grads (their states are CuPy arrays made by init_state)
    for kind, per_step in (("cupy", len(SHAPES)), ("torch", 2 * len(SHAPES))):
        ps = _arrays(fake, kind, SHAPES)
        opt = fastopt.Adam(ps, lr=0.1, backend="cupy")
        with fake.cuda.Device(DEVICE):
            opt.step(_arrays(fake, kind, SHAPES))
        described.clear()
        grads = _arrays(fake, kind, SHAPES)
        opt.step(grads)
        assert len(described) == per_step, (kind, described)
        described.clear()
        fake.launches.clear()
        opt.step(list(grads))  # the same arrays (a new list): CuPy ones are not described again
        assert len(described) == (0 if kind == "cupy" else per_step), (kind, described)
        assert [launch.name for launch in fake.launches] == ["fo_adam_v0_multi"]
    ps = _arrays(fake, "cupy", SHAPES)
    opt = fastopt.Adam(ps, lr=0.1, backend="cupy")
    with fake.cuda.Device(DEVICE):
        opt.step(_arrays(fake, "cupy", SHAPES))
    ps[2].shape = (12,)  # (3, 4) reshaped in place: the same memory; the grads keep the checked shape
    opt.step(_arrays(fake, "cupy", SHAPES))
    with pytest.raises(ValueError, match=r"grads\[2\] has shape \(12,\), expected \(3, 4\)"):
        opt.step(_arrays(fake, "cupy", [SHAPES[0], SHAPES[1], (12,)]))


def test_gpu_backends_prepare_once_and_check_grads_every_step(cupy_world):
    """Both GPU backends implement interface.PrepareOnceBackend: the optimizer checks params and states
    once, the grads every step (a grad that is a state array is refused before anything launches)."""
    from fastopt.backends import interface
    fake = cupy_world
    assert interface.prepares_once(cupy_backend) and interface.prepares_once(nb)
    ps = _arrays(fake, "cupy", SHAPES)
    opt = fastopt.Adam(ps, lr=0.1, clip_grad_norm=1.0, backend="cupy")
    with fake.cuda.Device(DEVICE):  # functional.init_state makes the state on the current device
        opt.step(_arrays(fake, "cupy", SHAPES))
    opt.step(_arrays(fake, "cupy", SHAPES))
    bad = _arrays(fake, "cupy", SHAPES)
    bad[0] = opt.state_arrays(0)["exp_avg"]
    fake.launches.clear()
    with pytest.raises(ValueError, match="shares memory"):
        opt.step(bad)
    assert fake.launches == []
    with pytest.raises(ValueError, match=r"grads\[1\] has shape"):
        opt.step(_arrays(fake, "cupy", [SHAPES[0], (3,), SHAPES[2]]))
    assert fake.launches == []
    # the same grads as the last step skip the checks: a list changed in place, or one new array, does not
    grads = _arrays(fake, "cupy", SHAPES)
    opt.step(grads)
    fake.launches.clear()
    grads[1] = opt.state_arrays(1)["exp_avg_sq"]
    with pytest.raises(ValueError, match="shares memory"):
        opt.step(grads)
    grads[1] = _arrays(fake, "cupy", [(7,)])[0]
    with pytest.raises(ValueError, match=r"grads\[1\] has shape"):
        opt.step(grads)
    assert fake.launches == []


def test_stream_memo_entries_hold_their_arrays():
    """A result's entry keeps the array alive, so its address cannot be recycled for another array while the
    entry maps it to the result's stream (by address alone, an array made later at a freed result's address
    was read on that old stream, unordered after its own producer); the oldest entry goes past the bound."""
    import gc
    import weakref

    class Result:  # any object that takes weak references
        pass
    memo = cupy_backend.StreamMemo(size=3)
    results = [Result() for _ in range(4)]
    refs = [weakref.ref(r) for r in results]
    for ptr, r in enumerate(results):
        memo.note(0x1000 + ptr, f"stream {ptr}", r)
    del results, r
    gc.collect()
    assert [ref() is None for ref in refs] == [True, False, False, False]
    assert memo.get(0x1000) is None and memo.get(0x1003) == "stream 3" and memo.get(0x1000, "current") == "current"
