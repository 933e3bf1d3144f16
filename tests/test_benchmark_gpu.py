"""fastopt/benchmark_gpu.py without a GPU: the case plan, the transformer-like shapes, byte counts, buffer
rotation, the ceiling kernel's source (NVRTC), the targets and the table, and one whole run of main()
against a stand-in CuPy whose "device" arrays are host arrays, with the fastopt variants on the CPU
backend (the builders, the timing loop, capture, error rows, the incremental JSON and the report are the
code a GPU run executes)."""
from __future__ import annotations

import json
import math
import random
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest

from fastopt import benchmark_gpu as bg
from fastopt.specs import REGISTRY


# ---------------------------------------------------------------------------------------------------
# Plan, shapes, bytes
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("total", [1 << 22, 1 << 27, 3_000_017])
@pytest.mark.parametrize("n_tensors", [200, 20, 31])
def test_transformer_shapes_hit_the_count_and_the_total(total, n_tensors):
    shapes = bg.transformer_shapes(total, n_tensors)
    assert len(shapes) == n_tensors
    d = shapes[1][1]
    assert d % 32 == 0
    assert all(len(s) in (1, 2) and all(type(x) is int and x >= 1 for x in s) for s in shapes)
    elements = sum(math.prod(s) for s in shapes)
    assert 0 <= total - elements < d
    matrices = [s for s in shapes if len(s) == 2]
    vectors = [s for s in shapes if len(s) == 1]
    assert len(vectors) > len(matrices) > 1  # a real mix: many small norms/biases, fewer large matrices
    head = shapes[-((n_tensors - 8) % 12 + 2)]  # the head weight, before the left-over vectors
    assert len(head) == 2 and head[1] == d
    assert head[0] >= 8 * d  # the vocabulary is at least 8 d


def test_transformer_shapes_of_the_issue_sizes():
    small, big = bg.transformer_shapes(1 << 22), bg.transformer_shapes(1 << 27)
    assert small[1][1] == 128 and big[1][1] == 768  # widths like a small and a GPT-2-small model


@pytest.mark.parametrize("total,n", [(10_000, 200), (1 << 20, 19)])
def test_transformer_shapes_refuse_impossible_requests(total, n):
    with pytest.raises(ValueError, match="n_tensors|too small"):
        bg.transformer_shapes(total, n)


@pytest.mark.parametrize("spec", REGISTRY.values(), ids=lambda s: s.name)
def test_param_bytes_match_the_registry_byte_model(spec):
    hp = bg.bench_hyperparameters(spec)
    assert bg.param_bytes(spec, hp, "float32") == spec.bytes_per_element(hp, 4)
    assert bg.param_bytes(spec, hp, "float64") == spec.bytes_per_element(hp, 8)


def test_adam_bytes_per_parameter():
    spec = REGISTRY["adam"]
    hp = bg.bench_hyperparameters(spec)
    # fp32: p, g, m, v read, p, m, v written; fp16 params: 2-byte p and g, 4-byte m and v
    assert [bg.param_bytes(spec, hp, d) for d in ("float32", "float16", "float64")] == [28, 22, 56]
    assert bg.footprint(spec, hp, "float16", 10) == 10 * (2 + 2 + 4 + 4)
    # 8-bit state: each of m and v a code read and written and a float32 scale per 256 read and written
    assert bg.param_bytes(spec, hp, "float32", "int8") == 12 + 2 * (2 + 8 / 256)
    assert bg.param_bytes(spec, hp, "bfloat16", "int8") == 6 + 2 * (2 + 8 / 256)
    assert bg.footprint(spec, hp, "float32", 1024, "int8") == 1024 * 8 + 2 * (1024 + 16)


def test_buffer_sets_rotate_past_twice_the_l2():
    rng = random.Random()
    for _ in range(2000):
        l2 = rng.randint(1, 200) << 20
        set_bytes = rng.randint(1, 1 << 33)
        n = bg.buffer_sets(set_bytes, l2)
        assert n >= 2
        assert (n - 1) * set_bytes >= 2 * l2                  # enough other data between two uses of a set
        assert n == 2 or (n - 2) * set_bytes < 2 * l2          # and no more sets than that needs
    assert bg.buffer_sets(16 << 20, 50 << 20) == 8 and bg.buffer_sets(4 << 30, 50 << 20) == 2
    with pytest.raises(ValueError, match="set_bytes"):
        bg.buffer_sets(0, 1)


def test_plan_quick_full_and_options():
    full, quick = bg.plan(False), bg.plan(True)
    labels = [c.label for c in full]
    assert labels[:3] == ["1 x 2^28 fp32", "200 tensors 2^22 fp32", "200 tensors 2^27 fp32"]  # targets first
    bf16 = {bg.BF16_SINGLE, bg.BF16_LIST, bg.INT8_LIST} if bg.HAS_BF16 else set()
    bf16 |= {bg.INT8_SINGLE}
    assert set(labels) == {f"1 x 2^{e} fp32" for e in (20, 22, 24, 26, 28)} | {
        "200 tensors 2^22 fp32", "200 tensors 2^27 fp32", "1 x 2^24 fp16", "1 x 2^24 fp64"} | bf16
    assert {c.label for c in quick} == {"1 x 2^20 fp32", "1 x 2^24 fp32", "1 x 2^28 fp32", "200 tensors 2^22 fp32",
                                        "200 tensors 2^27 fp32", "1 x 2^24 fp16", "1 x 2^24 fp64"} | bf16
    for c in full:
        assert c.optimizer == "adam" and set(c.variants) <= set(bg.BUILDERS)
        if c.state == "int8":  # issue 13's 8-bit cases: against the 8-bit optimizers of bitsandbytes and torchao
            assert set(c.variants) == {bg.CUPY_FN, bg.CUPY_CLASS, bg.BNB8, bg.TORCHAO8}
            assert c.elements == (1 << 28) if c.tensors == 1 else c.tensors == 200 and c.dtype == "bfloat16"
            continue
        assert {bg.CUPY_FN, bg.TORCH_FUSED, bg.TORCH_FOREACH, bg.PATTERN} <= set(c.variants)
        if c.dtype == "bfloat16":  # issue 13's cases: Numba's functional step too, no bitsandbytes 32-bit
            assert c.elements == (1 << 26) if c.tensors == 1 else abs(c.elements - (1 << 27)) < 768  # within d
            assert bg.NUMBA_FN in c.variants and bg.BNB not in c.variants
            continue
        assert bg.NUMBA_FN in c.variants
        if c.tensors > 1:
            assert c.tensors == 200 and set(c.variants) == set(bg.BUILDERS) - {bg.BNB8, bg.TORCHAO8}
    custom = bg.plan(True, sizes=(1000, 4096), optimizers=["adam", "lion"])
    assert [c.label for c in custom if c.tensors == 1] == ["1 x 2^12 fp32", "1 x 1,000 fp32", "1 x 2^12 fp32",
                                                           "1 x 1,000 fp32"]
    assert all(not set(c.variants) & set(bg.FASTOPT_CLASS_VARIANTS) for c in custom if c.optimizer == "lion")
    lines = bg.describe_plan(quick)
    assert len(lines) == len(quick) and "4,096 MiB" in lines[0] and "2 sets" in lines[0]


def test_pattern_kernel_names_and_vectors():
    assert bg.pattern_kernel_name(2, "float32") == "fo_bench_pattern_s2_r1"
    assert bg.pattern_kernel_name(2, "float16") == "fo_bench_pattern_s2_r2"
    assert bg.pattern_kernel_name(0, "float64") == "fo_bench_pattern_s0_r1"
    with pytest.raises(ValueError):
        bg.pattern_kernel_name(4, "float32")
    assert bg.pattern_vectors(1027, "float32") == (256, 1024)
    assert bg.pattern_vectors(1027, "float16") == (128, 1024)
    assert bg.pattern_vectors(7, "float64") == (3, 6)


def test_pattern_kernel_compiles_to_16_byte_accesses_and_no_local_memory():
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
    except Exception as e:
        pytest.skip(f"NVRTC not available ({type(e).__name__}: {e})")
    prog = nvrtc.createProgram(bg.PATTERN_SOURCE, "pattern.cu", [], [])
    try:
        nvrtc.compileProgram(prog, ["--gpu-architecture=sm_90", "-std=c++17"])
    except Exception:
        pytest.fail(nvrtc.getProgramLog(prog))
    ptx = nvrtc.getPTX(prog)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    for ns in range(4):
        for dtype, r in (("float32", 1), ("float16", 2)):
            name = bg.pattern_kernel_name(ns, dtype)
            body = ptx.split(f".entry {name}(")[1].split(".entry ")[0]
            accesses = re.findall(r"\b(ld|st)\.global(\.nc)?\.(\S+)", body)
            assert accesses and all(width == "v4.u32" for _, _, width in accesses), name  # 16 bytes each
            loads = sum(op == "ld" for op, _, _ in accesses)
            stores = len(accesses) - loads
            # every stream once per vector (the compiler unrolls the grid-stride loop: whole multiples)
            assert loads * (1 + ns * r) == stores * (2 + ns * r) and loads % (2 + ns * r) == 0, name
            assert "local" not in body, name


# ---------------------------------------------------------------------------------------------------
# Targets and table
# ---------------------------------------------------------------------------------------------------

def _row(case, variant, us, host_us=10.0, tensors=1, elements=1 << 28):
    return {"optimizer": "adam", "case": case, "variant": variant, "dtype": "float32", "elements": elements,
            "tensors": tensors, "bytes": 28 * elements, "us": us, "host_us": host_us, "status": "ok"}


def _issue_rows(fast=True):
    f = 1.0 if fast else 2.0
    n27, n22 = 1 << 27, 1 << 22
    return [
        _row(bg.BIG, bg.CUPY_FN, 2600.0 * f), _row(bg.BIG, bg.TORCH_FUSED, 2877.0), _row(bg.BIG, bg.PATTERN, 2550.0),
        _row(bg.BIG, bg.NUMBA_FN, 3000.0),
        _row("1 x 2^24 fp32", bg.CUPY_FN, 170.0, elements=1 << 24), _row("1 x 2^24 fp32", bg.NUMBA_FN, 200.0 * f,
                                                                         elements=1 << 24),
        _row("1 x 2^20 fp32", bg.CUPY_FN, 10.0, elements=1 << 20),
        _row("1 x 2^20 fp32", bg.NUMBA_FN, 100.0, elements=1 << 20),  # < 2^24: not in the numba target
        _row(bg.LIST_BIG, bg.CUPY_FN, 1500.0, tensors=200, elements=n27),
        _row(bg.LIST_BIG, bg.CUPY_CLASS, 1400.0 * f, tensors=200, elements=n27),
        _row(bg.LIST_BIG, bg.CUPY_CLIP, 1600.0, tensors=200, elements=n27),
        _row(bg.LIST_BIG, bg.TORCH_FUSED, 1618.0, tensors=200, elements=n27),
        _row(bg.LIST_BIG, bg.NUMBA_FN, 2000.0, tensors=200, elements=n27),
        _row(bg.LIST_SMALL, bg.CUPY_FN, 300.0, tensors=200, elements=n22),
        _row(bg.LIST_SMALL, bg.CUPY_CLASS, 320.0, host_us=35.0 * f, tensors=200, elements=n22),
        _row(bg.LIST_SMALL, bg.CUPY_GRAPH, 300.0 * f, host_us=8.0 * f, tensors=200, elements=n22),
        _row(bg.LIST_SMALL, bg.TORCH_FUSED, 667.0, tensors=200, elements=n22),
        _row(bg.LIST_SMALL, bg.NUMBA_FN, 500.0, tensors=200, elements=n22),
    ]


def test_each_variant_is_counted_in_its_own_layout():
    """torch.optim's 16-bit Adam keeps 16-bit state (14 bytes per param) and optimi adds a Kahan buffer (18):
    counted with fastopt's 22 (float32 state), torch fused at 2^24 fp16 read 5105 GB/s, 1.2x the device copy
    (bench/results/gpu-nvidia-h200.json). Their "of pattern" (a time ratio against fastopt's streams) is
    left out; LARS has no same-pattern kernel (its norms pass is counted in its bytes)."""
    spec = REGISTRY["adam"]
    hp = bg.bench_hyperparameters(spec)
    assert [bg.variant_bytes(v, spec, hp, "float16") for v in (bg.CUPY_FN, bg.TORCH_FUSED, bg.TORCH_FOREACH,
                                                              bg.OPTIMI, bg.BNB, bg.PATTERN)] == [22, 14, 14, 18, 22, 22]
    assert [bg.variant_bytes(v, spec, hp, "float32") for v in (bg.TORCH_FUSED, bg.OPTIMI)] == [28, 28]
    assert bg.variant_bytes(bg.BNB8, spec, hp, "float32", "int8") == bg.param_bytes(spec, hp, "float32", "int8")
    label = "1 x 2^24 fp16"
    rows = [dict(_row(label, v, us, elements=1 << 24), bytes=bg.variant_bytes(v, spec, hp, "float16") * (1 << 24))
            for v, us in ((bg.CUPY_FN, 120.0), (bg.TORCH_FUSED, 100.0), (bg.PATTERN, 110.0))]
    fused, ours = (next(r for r in bg.finish_rows(rows, 3000.0) if r["variant"] == v)
                   for v in (bg.TORCH_FUSED, bg.CUPY_FN))
    assert fused["GBps"] == pytest.approx(14 * 2 ** 24 / 100e-6 / 1e9) and fused["of_pattern"] is None
    assert ours["of_pattern"] == pytest.approx(110.0 / 120.0)
    with pytest.raises(bg.NotRun, match="LARS"):
        bg.BUILDERS[bg.PATTERN](None, None, REGISTRY["lars"], bg.bench_hyperparameters(REGISTRY["lars"]), 2)

def test_rows_and_targets_arithmetic():
    rows = bg.finish_rows(_issue_rows(), copy_gbps=3000.0)
    big = next(r for r in rows if r["case"] == bg.BIG and r["variant"] == bg.CUPY_FN)
    assert big["GBps"] == pytest.approx(28 * 2 ** 28 / 2600e-6 / 1e9)
    assert big["of_copy"] == pytest.approx(big["GBps"] / 3000.0)
    assert big["of_pattern"] == pytest.approx(2550.0 / 2600.0)
    assert big["vs_torch_fused"] == pytest.approx(2877.0 / 2600.0)
    t = bg.targets(rows, 3000.0)
    assert set(t) == {"adam_fp32_2^28_fraction_of_copy", "adam_fp32_2^28_speedup_vs_torch_fused",
                      "list200_2^27_class_speedup_vs_torch_fused", "list200_2^22_class_graph_speedup_vs_torch_fused",
                      "list200_2^22_host_us_class_graph", "list200_2^22_host_us_class",
                      "list200_2^27_clip_skip_over_plain", "numba_over_cupy_single_2^24_and_up",
                      "numba_over_cupy_list200", bg.SANITIZER_TARGET, bg.GPU_TESTS_TARGET,
                      "adam_bf16_2^26_fraction_of_copy", "adam_bf16_2^26_speedup_vs_torch_fused",
                      "list200_2^27_bf16_fraction_of_copy", "list200_2^27_bf16_speedup_vs_torch_fused"} | {
                      f"{key}_{what}" for key in ("adam_int8_fp32_2^28", "list200_2^27_bf16_int8")
                      for what in ("fraction_of_copy", "speedup_vs_bitsandbytes", "speedup_vs_torchao")}
    assert all(set(v) >= {"value", "target", "met"} for v in t.values())
    assert t["adam_fp32_2^28_fraction_of_copy"]["value"] == pytest.approx(big["GBps"] / 3000.0)
    assert t["adam_fp32_2^28_fraction_of_copy"]["met"] is (big["GBps"] / 3000.0 >= 0.95)
    assert t["adam_fp32_2^28_speedup_vs_torch_fused"] == pytest.approx(
        {"value": 2877 / 2600, "target": 1.05, "met": True, "rule": ">=",
         "note": t["adam_fp32_2^28_speedup_vs_torch_fused"]["note"]})
    assert t["list200_2^27_clip_skip_over_plain"]["value"] == pytest.approx(1600 / 1400)
    assert t["list200_2^27_clip_skip_over_plain"]["met"] is True
    assert t["list200_2^22_class_graph_speedup_vs_torch_fused"]["value"] == pytest.approx(667 / 300)
    assert t["list200_2^22_host_us_class_graph"]["value"] == 8.0 and t["list200_2^22_host_us_class"]["met"] is True
    assert t["numba_over_cupy_single_2^24_and_up"]["value"] == pytest.approx(max(3000 / 2600, 200 / 170))
    assert t["numba_over_cupy_list200"]["value"] == pytest.approx(max(2000 / 1500, 500 / 300))
    assert t[bg.SANITIZER_TARGET]["value"] is None and t[bg.SANITIZER_TARGET]["met"] is None
    # issue 13's bfloat16 targets: 22 bytes per param (2 + 2 + 2 for p, g, p; 16 for float32 m and v)
    if not bg.HAS_BF16:
        return
    per_param = bg.param_bytes(REGISTRY["adam"], bg.bench_hyperparameters(REGISTRY["adam"]), "bfloat16")
    assert per_param == 22
    bf16 = bg.finish_rows([dict(_row(bg.BF16_SINGLE, v, us, elements=1 << 26), dtype="bfloat16", bytes=22 << 26)
                           for v, us in ((bg.CUPY_FN, 500.0), (bg.TORCH_FUSED, 450.0))], 3000.0)
    tb = bg.targets(bf16, 3000.0)
    assert tb["adam_bf16_2^26_fraction_of_copy"]["value"] == pytest.approx(22 * 2 ** 26 / 500e-6 / 1e9 / 3000.0)
    assert tb["adam_bf16_2^26_speedup_vs_torch_fused"]["value"] == pytest.approx(0.9)
    assert tb["adam_bf16_2^26_speedup_vs_torch_fused"]["met"] is False
    assert tb["list200_2^27_bf16_fraction_of_copy"]["met"] is None
    # issue 13's 8-bit targets: of the copy ceiling, and 3x bitsandbytes' and torchao's 8-bit Adam
    per8 = bg.param_bytes(REGISTRY["adam"], bg.bench_hyperparameters(REGISTRY["adam"]), "float32", "int8")
    int8 = bg.finish_rows([dict(_row(bg.INT8_SINGLE, v, us, elements=1 << 28), bytes=per8 * 2 ** 28)
                           for v, us in ((bg.CUPY_FN, 1500.0), (bg.BNB8, 7581.0), (bg.TORCHAO8, 4000.0))], 3000.0)
    t8 = bg.targets(int8, 3000.0)
    assert t8["adam_int8_fp32_2^28_fraction_of_copy"]["value"] == pytest.approx(per8 * 2 ** 28 / 1500e-6 / 1e9 / 3000)
    assert t8["adam_int8_fp32_2^28_speedup_vs_bitsandbytes"]["value"] == pytest.approx(7581 / 1500)
    assert t8["adam_int8_fp32_2^28_speedup_vs_bitsandbytes"]["met"] is True
    assert t8["adam_int8_fp32_2^28_speedup_vs_torchao"]["met"] is False
    assert t8["list200_2^27_bf16_int8_speedup_vs_torchao"]["met"] is None
    slow = bg.targets(bg.finish_rows(_issue_rows(fast=False), 3000.0), 3000.0)
    assert not any(slow[k]["met"] for k in ("adam_fp32_2^28_speedup_vs_torch_fused", "list200_2^22_host_us_class",
                                             "list200_2^22_host_us_class_graph", "numba_over_cupy_single_2^24_and_up",
                                             "list200_2^27_class_speedup_vs_torch_fused"))


def test_targets_of_missing_rows_are_not_measured():
    rows = bg.finish_rows([_row(bg.BIG, bg.CUPY_FN, 2600.0), dict(_row(bg.BIG, bg.TORCH_FUSED, None),
                                                                  status="not run: torch not installed")], None)
    t = bg.targets(rows, None)
    assert all(v["value"] is None and v["met"] is None for v in t.values())
    assert rows[0]["of_copy"] is None and rows[0]["vs_torch_fused"] is None


def test_markdown_table_has_every_row_and_target():
    rows = bg.finish_rows(_issue_rows(), 3000.0) + [dict(_row("1 x 2^24 fp16", bg.NUMBA_FN, None),
                                                         us=None, status="error: TypeError: float16")]
    doc = {"rows": rows, "targets": bg.targets(rows, 3000.0), "ceilings": {"copy": {"GBps": 3000.0}},
           "device": {"name": "NVIDIA H200"}, "settings": {"note": "K=20"}}
    text = bg.markdown(doc)
    lines = text.splitlines()
    assert lines[0].startswith("| case | variant | µs / step |")
    assert sum(1 for line in lines if line.startswith("| 1 x") or line.startswith("| 200")) == len(rows)
    assert "error: TypeError: float16" in text and "3000 GB/s" in text and "NVIDIA H200" in text
    for name in doc["targets"]:
        assert f"| {name} |" in text
    assert "not measured" in text and "| yes |" in text


def test_device_slug():
    assert bg.device_slug("NVIDIA H200") == "nvidia-h200"
    assert bg.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert bg.device_slug("  ") == "unknown"


# ---------------------------------------------------------------------------------------------------
# A whole run against a stand-in CuPy
# ---------------------------------------------------------------------------------------------------

class HostDeviceArray(np.ndarray):
    """A host array that looks like a CuPy array where the benchmark looks (data.ptr)."""

    @property
    def data(self):
        return SimpleNamespace(ptr=self.ctypes.data)


class FakeCupy:
    """The members of cupy the benchmark uses; kernels and copies record what they were given."""

    __version__ = "fake"
    float16, float32, float64, uint8 = np.float16, np.float32, np.float64, np.uint8

    def __init__(self):
        self.kernel_calls, self.copies, self.captures = [], [], []
        fake = self

        class Event:
            def record(self, stream=None):
                self.t = time.perf_counter()

            def synchronize(self):
                pass

        class Stream:
            def __init__(self, non_blocking=False):
                self.ptr, self.capturing = 0 if not non_blocking else 1234, False

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def begin_capture(self):
                self.capturing = True

            def end_capture(self):
                assert self.capturing
                self.capturing = False
                fake.captures.append(self)
                return SimpleNamespace(launch=lambda stream=None: None)

        class Device:
            def __init__(self, id=0):
                self.id = id
                self.attributes = {"L2CacheSize": 1 << 20}

            def synchronize(self):
                pass

        Stream.null = Stream()
        runtime = SimpleNamespace(
            getDeviceProperties=lambda i: {"name": b"Fake GPU", "multiProcessorCount": 4, "l2CacheSize": 1 << 20,
                                           "major": 9, "minor": 0, "totalGlobalMem": 1 << 34},
            memGetInfo=lambda: (1 << 33, 1 << 34), memcpyDeviceToDevice=3,
            memcpyAsync=lambda dst, src, n, kind, stream: fake.copies.append((dst, src, n, kind, stream)),
            runtimeGetVersion=lambda: 13000, driverGetVersion=lambda: 13000)
        driver = SimpleNamespace(occupancyMaxActiveBlocksPerMultiprocessor=lambda ptr, block, smem: 8)
        self.cuda = SimpleNamespace(Device=Device, Event=Event, Stream=Stream, runtime=runtime, driver=driver,
                                    get_current_stream=lambda: Stream.null,
                                    get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3)
        self.random = SimpleNamespace(standard_normal=lambda shape, dtype: np.random.standard_normal(shape)
                                      .astype(dtype).view(HostDeviceArray))
        self.code = None

    def RawModule(self, code, options):
        self.code = code
        return SimpleNamespace(get_function=lambda name: FakeKernel(self, name))

    def empty(self, n, dtype):
        return np.empty(n, dtype).view(HostDeviceArray)

    def get_default_memory_pool(self):
        return SimpleNamespace(free_all_blocks=lambda: None)


class FakeKernel:
    def __init__(self, fake, name):
        self.fake, self.name, self.kernel = fake, name, SimpleNamespace(ptr=99)

    def __call__(self, grid, block, args):
        self.fake.kernel_calls.append((self.name, grid, block, args))


def _fake_cupy():
    return FakeCupy()


def _stand_in_gpu(monkeypatch):
    """The fake CuPy in cupy's place, small sizes, and the fastopt variants' builders on the CPU backend (host
    arrays); torch has no CUDA here."""
    try:  # imported before the stand-in takes cupy's name: torch's own import looks for cupy
        import torch  # noqa: F401
    except ImportError:
        pass
    cp = _fake_cupy()
    monkeypatch.setitem(__import__("sys").modules, "cupy", cp)
    monkeypatch.setattr(bg, "COPY_BYTES", 1 << 16)
    monkeypatch.setattr(bg, "N_TENSORS", 20)
    monkeypatch.setattr(bg, "LIST_TOTALS", (16,))
    for variant, build in ((bg.CUPY_FN, bg._functional("cython")), (bg.CUPY_CLASS, bg._class("cython")),
                           (bg.CUPY_CLIP, bg._class("cython", clip_skip=True)), (bg.CUPY_GRAPH, bg._graph("cython")),
                           (bg.CUPY_CLIP_GRAPH, bg._graph("cython", clip_skip=True)),
                           (bg.NUMBA_FN, bg._functional("numpy")), (bg.NUMBA_CLASS, bg._class("numpy"))):
        monkeypatch.setitem(bg.BUILDERS, variant, build)
    return cp


def test_a_whole_run_on_a_stand_in_gpu(monkeypatch, tmp_path, capsys):
    cp = _stand_in_gpu(monkeypatch)
    out = tmp_path / "gpu.json"
    args = SimpleNamespace(quick=True, sizes=(4099,), optimizers=["adam", "sgd"], repeats=2, out=str(out),
                           json=False, dry_run=False)
    assert bg.main(args) == 0
    doc = json.loads(out.read_text())
    assert doc["complete"] is True and doc["device"]["name"] == "Fake GPU" and doc["device"]["l2_bytes"] == 1 << 20
    assert doc["settings"]["k"] == bg.QUICK.k and doc["settings"]["repeats"] == 2
    assert doc["ceilings"]["copy"]["bytes"] == 2 << 16 and doc["ceilings"]["copy"]["GBps"] > 0
    assert cp.copies and all(n == 1 << 16 and kind == 3 for _, _, n, kind, _ in cp.copies)
    cases = bg.plan(True, (4099,), ["adam", "sgd"])
    assert len(doc["rows"]) == sum(len(c.variants) for c in cases)
    status = {(r["optimizer"], r["case"], r["variant"]): r["status"] for r in doc["rows"]}
    list_case = "20 tensors 2^16 fp32"
    for key in [("adam", "1 x 4,099 fp32", bg.CUPY_FN), ("adam", "1 x 4,099 fp32", bg.CUPY_CLASS),
                ("adam", "1 x 4,099 fp32", bg.CUPY_GRAPH), ("adam", list_case, bg.CUPY_CLIP_GRAPH),
                ("adam", list_case, bg.NUMBA_CLASS), ("adam", list_case, bg.PATTERN), ("sgd", list_case, bg.CUPY_FN),
                ("sgd", "1 x 4,099 fp32", bg.PATTERN)]:
        assert status[key] == "ok", (key, status[key])
    assert status[("adam", list_case, bg.TORCH_FUSED)] in ("not run: torch has no CUDA (a CPU-only build?)",) or \
        status[("adam", list_case, bg.TORCH_FUSED)].startswith("not run: torch not installed")
    assert status[("adam", list_case, bg.OPTIMI)].startswith("not run: ")
    for r in doc["rows"]:
        if r["status"] == "ok":
            assert r["us"] > 0 and r["host_us"] > 0 and r["GBps"] > 0 and r["sets"] >= 2
    graph_rows = [r for r in doc["rows"] if r["variant"] in (bg.CUPY_GRAPH, bg.CUPY_CLIP_GRAPH)]
    assert len(graph_rows) == 3 and all(r["capturable_mode"] is False for r in graph_rows)  # a host backend here
    assert len(cp.captures) == sum(r["sets"] for r in graph_rows)  # one graph per buffer set
    # the same-pattern kernel: 16-byte vectors of the covered elements, the grid from the occupancy API
    names = {c[0] for c in cp.kernel_calls}
    assert names == {"fo_bench_pattern_s2_r1", "fo_bench_pattern_s1_r1"}
    for name, grid, block, args in cp.kernel_calls:
        assert block == (bg.BLOCK,) and grid[0] <= 8 * 4 and type(args[-1]) is np.int64
    assert cp.code == bg.PATTERN_SOURCE
    assert set(doc["targets"]) >= {bg.SANITIZER_TARGET, "adam_fp32_2^28_fraction_of_copy"}
    text = capsys.readouterr().out
    assert text.rstrip().endswith(f"| {bg.GPU_TESTS_TARGET} | – | <= 0 | not measured |")
    assert "| 1 x 4,099 fp32 | fastopt-cupy functional |" in text


def test_a_failing_variant_is_a_row_not_a_crash(monkeypatch):
    cp = _fake_cupy()
    monkeypatch.setitem(__import__("sys").modules, "cupy", cp)

    def broken(bench, case, spec, hp, nsets):
        raise RuntimeError("cudaErrorIllegalAddress")

    monkeypatch.setitem(bg.BUILDERS, bg.CUPY_FN, broken)
    monkeypatch.setitem(bg.BUILDERS, bg.CUPY_GRAPH, lambda *a: (_ for _ in ()).throw(bg.NotRun("not capturable: x")))
    bench = bg.Bench(cp, bg.QUICK, log=lambda *a: None)
    case = bg.Case("adam", "1 x 1,000 fp32", "float32", ((1000,),), (bg.CUPY_FN, bg.CUPY_GRAPH, bg.PATTERN))
    rows = bg.measure_case(bench, case, log=lambda *a: None)
    assert [r["status"] for r in rows] == ["error: RuntimeError: cudaErrorIllegalAddress", "not capturable: x", "ok"]
    assert rows[2]["us"] > 0 and "us" not in rows[0]


def test_capture_failure_says_why_and_ends_the_capture():
    cp = _fake_cupy()
    stream = cp.cuda.Stream(non_blocking=True)

    def step():
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(bg.NotRun, match="not capturable: RuntimeError: operation not permitted"):
        bg.capture(cp, step, stream)
    assert not stream.capturing


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------

def test_json_prints_the_document_alone(monkeypatch, capsys):
    """--json: stdout is one JSON document (the header, the copy ceiling and each row's progress go to stderr)."""
    _stand_in_gpu(monkeypatch)
    args = SimpleNamespace(quick=True, sizes=(1031,), optimizers=["sgd"], repeats=2, out=None, json=True,
                           dry_run=False)
    assert bg.main(args) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["complete"] is True and {r["optimizer"] for r in doc["rows"]} == {"sgd"}
    assert "Fake GPU" in captured.err and "device copy" in captured.err and "sgd | 1 x 1,031 fp32" in captured.err


def test_dry_run_json_and_out_hold_the_plan(tmp_path, capsys):
    from fastopt.cli import main
    out = tmp_path / "plan.json"
    assert main(["bench", "--device", "gpu", "--dry-run", "--quick", "--json", "--out", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads(out.read_text())
    cases = bg.plan(True)
    assert doc["dry_run"] is True and doc["quick"] is True and len(doc["cases"]) == len(cases)
    for record, case, line in zip(doc["cases"], cases, bg.describe_plan(cases)):
        assert (record["optimizer"], record["case"], record["elements"]) == (case.optimizer, case.label, case.elements)
        assert record["variants"] == list(case.variants) and record["buffer_sets"] >= 2
        assert f"{record['elements']:,} elements" in line and f"{record['bytes_per_step'] / 1e6:.1f} MB/step" in line
    assert main(["bench", "--device", "gpu", "--dry-run", "--sizes", "4099", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"{len(bg.plan(False, (4099,)))} cases (full")
    assert [r["elements"] for r in json.loads(out.read_text())["cases"]][0] == 4099


def test_cli_dry_run_needs_no_gpu(capsys):
    from fastopt.cli import main
    assert main(["bench", "--device", "gpu", "--dry-run", "--quick"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{11 if bg.HAS_BF16 else 8} cases (quick") and "200 tensors 2^27 fp32" in out
    assert "1 x 2^24 fp16" in out and (not bg.HAS_BF16 or "200 tensors 2^27 bf16" in out) and bg.INT8_SINGLE in out
    assert main(["bench", "--dry-run"]) == 2
    assert "--dry-run: only with --device gpu" in capsys.readouterr().err


def test_a_dtype_a_backend_lacks_is_not_run_not_an_error(monkeypatch):
    from fastopt.backends import numba_backend
    cp = _fake_cupy()
    monkeypatch.setitem(__import__("sys").modules, "cupy", cp)
    monkeypatch.setattr(numba_backend, "DTYPES", (np.dtype(np.float32), np.dtype(np.float64)))  # as before float16
    bench = bg.Bench(cp, bg.QUICK, log=lambda *a: None)
    case = bg.Case("adam", "1 x 2^10 fp16", "float16", ((1024,),), (bg.NUMBA_FN, bg.NUMBA_CLASS))
    rows = bg.measure_case(bench, case, log=lambda *a: None)
    assert [r["status"] for r in rows] == ["not run: the numba backend has no float16 kernels"] * 2
