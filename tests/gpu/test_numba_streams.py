"""The Numba backend launches on the stream a foreign array's producer exported (__cuda_array_interface__
v3 `stream`), a Numba array's own stream, and imports foreign arrays with sync=False: no host
synchronisation per imported array, and the kernels still run after the work that produced the arrays.
Checked with a stand-in for numba.cuda (no GPU needed); test_launch_streams.py checks every launch."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

from fastopt.backends import numba_backend as nb  # noqa: E402
from fastopt.backends.device_arrays import DeviceArray  # noqa: E402


class _FakeCuda:
    def __init__(self):
        self.imports = []

    def legacy_default_stream(self):
        return "legacy"

    def per_thread_default_stream(self):
        return "per-thread"

    def external_stream(self, ptr):
        return ("external", ptr)

    def as_cuda_array(self, obj, sync=True):
        self.imports.append(sync)
        return np.zeros(obj.size)


class _Foreign:
    """A CuPy/torch-like array: only __cuda_array_interface__."""

    def __init__(self, stream):
        self.size = 4
        self.__cuda_array_interface__ = {"shape": (4,), "typestr": "<f4", "data": (1 << 20, False), "version": 3,
                                         "stream": stream}


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = _FakeCuda()
    monkeypatch.setattr(nb, "_cuda", lambda: fake)
    monkeypatch.setattr(nb, "simulating", lambda: False)
    nb._external_stream.cache_clear()
    yield fake
    nb._external_stream.cache_clear()


def _described(obj):
    return DeviceArray(obj, 1 << 20, (4,), np.dtype(np.float32), True, True)


@pytest.mark.parametrize("exported,expected", [(None, 0), (1, "legacy"), (2, "per-thread"),
                                               (0x7F00DEAD, ("external", 0x7F00DEAD))])
def test_kernels_launch_on_the_exported_stream(fake_cuda, exported, expected):
    # None: the producer asks for no ordering (CAI v3): Numba's default stream
    assert nb._stream(_described(_Foreign(exported)), 0) == expected


def test_foreign_arrays_are_imported_without_synchronising(fake_cuda):
    nb._flat(_described(_Foreign(1)))
    assert fake_cuda.imports == [False]


class _NumbaArray:  # a Numba DeviceNDArray: has copy_to_host and its own stream (0: Numba's default)
    def __init__(self, stream):
        self.stream = stream

    def copy_to_host(self):
        raise AssertionError("not read")


@pytest.mark.parametrize("stream", [0, "a stream object"])
def test_numba_arrays_use_their_own_stream(fake_cuda, stream):
    assert nb._stream(DeviceArray(_NumbaArray(stream), 1 << 20, (4,), np.dtype(np.float32), True, True), 0) == stream
