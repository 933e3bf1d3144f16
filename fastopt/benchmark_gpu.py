"""GPU benchmark (`fastopt bench --device gpu`, bench/bench_gpu.py; issue 11, Deliver 6).

What a user sees per optimizer step, measured side by side in one run on one GPU:

- Time: K steps (or K CUDA-graph replays) between two CUDA events on the stream they run on, median
  over the repeats. The buffers rotate over enough independent sets (params, grads, state: one
  optimizer each) that the data touched between two uses of a set exceeds twice the L2 cache (its size
  read from the device), so every step starts from device memory as in training.
- Host time: the wall time of one Python call with the GPU idle (synchronised before each call): what
  the step costs the host thread, separately from the device time.
- Ceilings, measured in the same run: the device-to-device copy (cudaMemcpyAsync, counting bytes read
  plus bytes written) and a same-pattern kernel (fo_bench_pattern_*: 16-byte loads and stores of exactly
  the streams the optimizer reads and writes, trivial integer math, a grid-stride loop over a grid sized
  by the occupancy API). "of copy" = achieved GB/s / copy GB/s; "of pattern" = pattern time / time.
- GB/s counts the bytes the update must move: every array read once, every written array written once
  (Adam fp32: 28 bytes per parameter; fp16 params with fp32 state: 22; fp64: 56; 8-bit state: 3 per param
  element plus 2 + 8/256 per state), in each implementation's own layout (variant_bytes: torch.optim's
  16-bit Adam keeps 16-bit state, 14 bytes; optimi's adds its Kahan buffer, 18).

Cases (Adam; `--optimizers` adds other optimizers' functional rows): one tensor of 2^20 .. 2^28 fp32
(fp16 and fp64 at 2^24), 200 transformer-like tensors (GPT-2-like shapes) of 2^22 and 2^27 elements in
total; issue 13's bfloat16 cases and 8-bit state cases (one fp32 tensor of 2^28, 200 bf16 tensors of 2^27, against
bitsandbytes' Adam8bit and torchao's AdamW8bit). Variants: fastopt-cupy (functional, class, class with clip_grad_norm + skip_nonfinite, each class
also replayed as a CUDA graph when the step can be captured), fastopt-numba (functional, class),
torch.optim fused and foreach, and optimi and bitsandbytes when they are installed. The JSON has the
machine, the software, every row and a "targets" object: one entry per target of issue 11, each
{"value", "target", "met"} ("met" is null when the value could not be measured).

Everything that needs no GPU (the case plan, shapes, byte counts, buffer rotation, target and table
arithmetic, the kernel source) is plain functions here, tested in tests/test_benchmark_gpu.py.
"""
from __future__ import annotations

import math
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from fastopt._version import git_revision
from fastopt.backends.device_arrays import state_dtype as _device_state_dtype
from fastopt.specs import REGISTRY

try:  # names "bfloat16" for NumPy (and CuPy), which the bfloat16 cases need
    import ml_dtypes  # noqa: F401
    HAS_BF16 = True
except ImportError:
    HAS_BF16 = False

BLOCK = 256
LR = 1e-3
FLUSH_FACTOR = 2            # the data touched between two uses of a buffer set exceeds this many L2s
ASSUMED_L2 = 50 * 2 ** 20   # H100 / H200 (for --dry-run only; a run reads the device's)
COPY_BYTES = 2 ** 30        # each of the copy ceiling's two buffers
N_TENSORS = 200
LIST_TOTALS = (22, 27)      # log2 of the list cases' total element counts
SINGLE_SIZES = (20, 22, 24, 26, 28)
QUICK_SINGLE_SIZES = (20, 24, 28)
OTHER_DTYPES_AT = 24        # fp16 and fp64 single-tensor cases at 2^24
BF16_SINGLE_AT = 26         # the bfloat16 cases of issue 13: one tensor of 2^26 and the 2^27 list

# Variant names (rows and targets refer to them)
CUPY_FN = "fastopt-cupy functional"
CUPY_CLASS = "fastopt-cupy class"
CUPY_GRAPH = "fastopt-cupy class+graph"
CUPY_CLIP = "fastopt-cupy class clip+skip"
CUPY_CLIP_GRAPH = "fastopt-cupy class clip+skip+graph"
NUMBA_FN = "fastopt-numba functional"
NUMBA_CLASS = "fastopt-numba class"
TORCH_FUSED = "torch fused"
TORCH_FOREACH = "torch foreach"
OPTIMI = "optimi"
BNB = "bitsandbytes"
BNB8 = "bitsandbytes Adam8bit"
TORCHAO8 = "torchao AdamW8bit"
PATTERN = "ceiling same-pattern"
FASTOPT_CLASS_VARIANTS = (CUPY_CLASS, CUPY_GRAPH, CUPY_CLIP, CUPY_CLIP_GRAPH, NUMBA_CLASS)


@dataclass(frozen=True)
class Settings:
    k: int              # steps between the two events of one timing
    repeats: int        # timings per variant (the median is reported)
    host_repeats: int   # host-time samples per variant
    warmup: int         # untimed rounds over every buffer set first


QUICK = Settings(k=20, repeats=5, host_repeats=10, warmup=1)
FULL = Settings(k=50, repeats=15, host_repeats=30, warmup=2)


# ---------------------------------------------------------------------------------------------------
# The plan (no GPU needed)
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    optimizer: str
    label: str
    dtype: str
    shapes: tuple
    variants: tuple = field(default=())
    state: str = ""      # "int8": 8-bit block-wise state (state_dtype="int8"), else the params' default state

    @property
    def elements(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def tensors(self) -> int:
        return len(self.shapes)


def transformer_shapes(total: int, n_tensors: int = N_TENSORS) -> list:
    """n_tensors GPT-2-like parameter shapes with `total` elements (within the width d): token and position
    embeddings, an embedding LayerNorm (w, b), L blocks of 12 tensors (ln_1 w/b, attention qkv w/b and
    projection w/b, ln_2 w/b, MLP up w/b and down w/b), the final LayerNorm (w, b) and an untied head
    (w, b); tensors left over are LayerNorm-sized vectors. d is the largest multiple of 32 that leaves a
    vocabulary of at least 8 d; the vocabulary, then the token embedding's rows, absorb the rest."""
    if n_tensors < 20:
        raise ValueError(f"n_tensors must be >= 20 (8 fixed tensors and one block of 12), got {n_tensors}")
    blocks, extra = divmod(n_tensors - 8, 12)
    best = None
    for d in range(32, 1 << 16, 32):
        positions = 2 * d
        fixed = blocks * (12 * d * d + 13 * d) + positions * d + 4 * d + extra * d
        vocab = (total - fixed) // (2 * d + 1)  # token embedding (vocab, d), head (vocab, d) and (vocab,)
        if vocab < 8 * d:  # vocab only shrinks as d grows
            break
        best = (d, positions, vocab)
    if best is None:
        raise ValueError(f"total {total} is too small for {n_tensors} transformer-like tensors")
    d, positions, vocab = best
    shapes = [(vocab, d), (positions, d), (d,), (d,)]
    for _ in range(blocks):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,), (vocab, d), (vocab,)] + [(d,)] * extra
    rest = total - sum(math.prod(s) for s in shapes)
    shapes[0] = (vocab + rest // d, d)  # the token embedding takes what is left, to within d elements
    return shapes


def state_dtype(dtype: str) -> np.dtype:
    """The optimizer state's dtype on the GPU for params of `dtype` (float16 params keep float32 state)."""
    return _device_state_dtype(np.dtype(dtype))


def param_bytes(spec, hp, dtype: str, state: str = ""):
    """Bytes one update of one parameter must move: params read and written and grads read in the params'
    dtype, each state the configuration uses read and written in the state dtype; two passes for a
    two-phase optimizer (LAMB), as spec.bytes_per_element counts them. 8-bit state (state="int8"): each
    state's code read and written, and its float32 scale per 256 elements (a float)."""
    p = np.dtype(dtype).itemsize
    nstates = sum(spec.active_states(hp))
    if state == "int8":
        return 3 * p + nstates * (2 + 8 / 256)
    s = state_dtype(dtype).itemsize
    if spec.two_phase:  # pass 1: p, g, states read, states written; pass 2: p and states read, p written
        return 2 * p + 2 * nstates * s + 2 * p + nstates * s
    if spec.tensor_coefs is not None:  # the norms pass reads p and g (LARS), then the update
        return 2 * p + 3 * p + 2 * nstates * s
    return 3 * p + 2 * nstates * s


def variant_bytes(variant: str, spec, hp, dtype: str, state: str = ""):
    """Bytes per parameter one step of `variant` moves in its own layout: fastopt's (param_bytes) for fastopt,
    the same-pattern kernel and bitsandbytes (float32 state of 16-bit params, or its 8-bit state); torch.optim
    keeps the state in the params' dtype, and optimi too, plus a Kahan buffer (read and written) for 16-bit
    params. A 16-bit row counted with fastopt's 22 bytes where torch moves 14 read as faster than the copy."""
    if variant not in (TORCH_FUSED, TORCH_FOREACH, OPTIMI) or state == "int8":
        return param_bytes(spec, hp, dtype, state)
    p = np.dtype(dtype).itemsize
    kahan = 2 * p if variant == OPTIMI and p == 2 else 0
    return 3 * p + 2 * sum(spec.active_states(hp)) * p + kahan


def bench_hyperparameters(spec) -> dict:
    from fastopt.benchmark import bench_hyperparameters as cpu_hp
    hp = cpu_hp(spec)
    if "lr" in hp:
        hp["lr"] = LR
    return hp


def buffer_sets(set_bytes: int, l2_bytes: int, factor: int = FLUSH_FACTOR) -> int:
    """How many independent buffer sets to rotate over: the fewest n with (n - 1) * set_bytes >=
    factor * l2_bytes, so that between two uses of a set more than `factor` L2 sizes of other data were
    touched (at least 2: a set never follows itself)."""
    if set_bytes <= 0:
        raise ValueError(f"set_bytes must be positive, got {set_bytes}")
    return max(2, 1 + -(-factor * l2_bytes // set_bytes))


def footprint(spec, hp, dtype: str, elements: int, state: str = "") -> int:
    """Bytes one buffer set allocates (params, grads, states; 8-bit state: codes and scales)."""
    p = np.dtype(dtype).itemsize
    s = 1 + 4 / 256 if state == "int8" else state_dtype(dtype).itemsize
    return int(math.ceil(elements * (2 * p + sum(spec.active_states(hp)) * s)))


def _log2_label(n):
    e = int(math.log2(n)) if n > 0 else 0
    return f"2^{e}" if n == 1 << e else f"{n:,}"


def plan(quick=False, sizes=None, optimizers=None, n_tensors=None) -> list:
    """The cases of one run in the order they are measured: per optimizer the largest single tensor and the
    lists first (the targets' cases, so that a run cut short still has them), then the other sizes and
    dtypes. sizes: single-tensor element counts (default 2^20..2^28, quick: 2^20, 2^24, 2^28);
    optimizers: registry names (default adam; the issue's targets are Adam's)."""
    names = list(optimizers) if optimizers else ["adam"]
    n_tensors = n_tensors or N_TENSORS
    single = list(sizes) if sizes else [1 << e for e in (QUICK_SINGLE_SIZES if quick else SINGLE_SIZES)]
    cases = []
    for name in names:
        adam = name == "adam"
        one = (CUPY_FN, CUPY_CLASS, CUPY_GRAPH, NUMBA_FN, TORCH_FUSED, TORCH_FOREACH, OPTIMI, BNB, PATTERN) if adam \
            else (CUPY_FN, NUMBA_FN, TORCH_FUSED, TORCH_FOREACH, PATTERN)
        many = (CUPY_FN, CUPY_CLASS, CUPY_GRAPH, CUPY_CLIP, CUPY_CLIP_GRAPH, NUMBA_FN, NUMBA_CLASS, TORCH_FUSED,
                TORCH_FOREACH, OPTIMI, BNB, PATTERN) if adam else one
        singles = [Case(name, f"1 x {_log2_label(n)} fp32", "float32", ((n,),), one) for n in sorted(single)]
        lists = [Case(name, f"{n_tensors} tensors 2^{e} fp32", "float32", tuple(transformer_shapes(1 << e, n_tensors)),
                      many) for e in LIST_TOTALS]
        others = []
        if adam and not sizes:
            for dtype, short in (("float16", "fp16"), ("float64", "fp64")):
                n = 1 << OTHER_DTYPES_AT
                others.append(Case(name, f"1 x 2^{OTHER_DTYPES_AT} {short}", dtype, ((n,),),
                                   tuple(v for v in one if v not in (OPTIMI, BNB))))
            if HAS_BF16:  # issue 13: bfloat16 params, float32 state (torch fused: bfloat16 state, its default)
                bf16 = (CUPY_FN, CUPY_CLASS, CUPY_GRAPH, NUMBA_FN, TORCH_FUSED, TORCH_FOREACH, OPTIMI, PATTERN)
                others.append(Case(name, BF16_SINGLE, "bfloat16", ((1 << BF16_SINGLE_AT,),), bf16))
                others.append(Case(name, BF16_LIST, "bfloat16",
                                   tuple(transformer_shapes(1 << LIST_TOTALS[-1], n_tensors)), bf16))
            # issue 13: 8-bit state, against bitsandbytes' and torchao's 8-bit optimizers
            int8 = (CUPY_FN, CUPY_CLASS, BNB8, TORCHAO8)
            others.append(Case(name, INT8_SINGLE, "float32", ((1 << 28,),), int8, "int8"))
            if HAS_BF16:
                others.append(Case(name, INT8_LIST, "bfloat16", tuple(transformer_shapes(1 << LIST_TOTALS[-1], n_tensors)),
                                   int8, "int8"))
        cases += singles[-1:] + lists + singles[:-1] + others
    return cases


def plan_records(cases, l2_bytes=ASSUMED_L2) -> list:
    """One dict per case for --dry-run (its --json and --out): elements, tensors, bytes per step, buffer sets
    and memory per set, variants."""
    records = []
    for c in cases:
        spec = REGISTRY[c.optimizer]
        hp = bench_hyperparameters(spec)
        per_set = footprint(spec, hp, c.dtype, c.elements, c.state)
        records.append({"optimizer": c.optimizer, "case": c.label, "dtype": c.dtype, "state": c.state or None,
                        "elements": c.elements, "tensors": c.tensors,
                        "bytes_per_step": param_bytes(spec, hp, c.dtype, c.state) * c.elements,
                        "buffer_sets": buffer_sets(per_set, l2_bytes), "bytes_per_set": per_set,
                        "variants": list(c.variants)})
    return records


def describe_plan(cases, l2_bytes=ASSUMED_L2) -> list:
    """One line per case for --dry-run: elements, tensors, bytes per step, buffer sets, memory per set."""
    return [f"{r['optimizer']:>9} {r['case']:<24} {r['elements']:>11,} elements {r['tensors']:>3} tensors "
            f"{r['bytes_per_step'] / 1e6:>9.1f} MB/step  {r['buffer_sets']:>3} sets x "
            f"{r['bytes_per_set'] / 2 ** 20:,.0f} MiB  variants: {', '.join(r['variants'])}"
            for r in plan_records(cases, l2_bytes)]


# ---------------------------------------------------------------------------------------------------
# Arithmetic on the measurements (no GPU needed)
# ---------------------------------------------------------------------------------------------------

def gbps(nbytes, seconds):
    return nbytes / seconds / 1e9 if seconds and seconds > 0 else None


def finish_rows(rows, copy_gbps):
    """Fill in GB/s, fraction of the copy and of the same-pattern kernel and the speed-up over torch fused
    for every measured row (in place; returns rows)."""
    by_case: dict = {}
    for r in rows:
        by_case.setdefault((r["optimizer"], r["case"]), {})[r["variant"]] = r
    for r in rows:
        us = r.get("us")
        if us is None:
            continue
        r["GBps"] = gbps(r["bytes"], us * 1e-6)
        r["of_copy"] = r["GBps"] / copy_gbps if copy_gbps and r["GBps"] else None
        peers = by_case[(r["optimizer"], r["case"])]
        pattern = peers.get(PATTERN, {})
        # a time ratio, so only for rows that move the pattern's bytes (torch's 16-bit layout moves fewer)
        r["of_pattern"] = pattern["us"] / us if pattern.get("us") and r["variant"] != PATTERN and \
            r["bytes"] == pattern.get("bytes") else None
        fused = peers.get(TORCH_FUSED, {}).get("us")
        r["vs_torch_fused"] = fused / us if fused and r["variant"] != TORCH_FUSED else None
    return rows


def _row(rows, case, variant, optimizer="adam"):
    for r in rows:
        if r["optimizer"] == optimizer and r["case"] == case and r["variant"] == variant:
            return r
    return None


def _get(rows, case, variant, key="us"):
    r = _row(rows, case, variant)
    return None if r is None else r.get(key)


def _ratio(a, b):
    return a / b if a is not None and b else None


def _target(value, target, rule, note):
    met = None if value is None else (value >= target if rule == ">=" else value <= target)
    return {"value": value, "target": target, "met": met, "rule": rule, "note": note}


BIG = "1 x 2^28 fp32"
LIST_SMALL = f"{N_TENSORS} tensors 2^22 fp32"
LIST_BIG = f"{N_TENSORS} tensors 2^27 fp32"
BF16_SINGLE = f"1 x 2^{BF16_SINGLE_AT} bf16"
BF16_LIST = f"{N_TENSORS} tensors 2^{LIST_TOTALS[-1]} bf16"
INT8_SINGLE = "1 x 2^28 fp32 int8"
INT8_LIST = f"{N_TENSORS} tensors 2^{LIST_TOTALS[-1]} bf16 int8"
SANITIZER_TARGET = "compute_sanitizer_errors"
GPU_TESTS_TARGET = "gpu_tests_failed"


def targets(rows, copy_gbps) -> dict:
    """One entry per target of issue 11 ("Targets"), from the finished rows. A target whose inputs were
    not measured has value null and met null. The sanitizer and GPU-test targets are filled in by
    `make gpu-check` (tests/gpu/gpu_check.py), which runs those stages."""
    out = {}
    of_copy = _get(rows, BIG, CUPY_FN, "of_copy")
    out["adam_fp32_2^28_fraction_of_copy"] = _target(
        of_copy, 0.95, ">=", "fastopt-cupy functional GB/s over the device copy's (read + write)")
    out["adam_fp32_2^28_speedup_vs_torch_fused"] = _target(
        _ratio(_get(rows, BIG, TORCH_FUSED), _get(rows, BIG, CUPY_FN)), 1.05, ">=",
        "torch fused step time / fastopt-cupy functional step time")
    out["list200_2^27_class_speedup_vs_torch_fused"] = _target(
        _ratio(_get(rows, LIST_BIG, TORCH_FUSED), _get(rows, LIST_BIG, CUPY_CLASS)), 1.1, ">=",
        "torch fused / fastopt-cupy class step, 200 tensors of 2^27 elements in total")
    out["list200_2^22_class_graph_speedup_vs_torch_fused"] = _target(
        _ratio(_get(rows, LIST_SMALL, TORCH_FUSED), _get(rows, LIST_SMALL, CUPY_GRAPH)), 2.0, ">=",
        "torch fused / fastopt-cupy class step replayed as a CUDA graph, 200 tensors of 2^22 in total")
    out["list200_2^22_host_us_class_graph"] = _target(
        _get(rows, LIST_SMALL, CUPY_GRAPH, "host_us"), 15.0, "<=",
        "host microseconds per step (one graph launch), GPU idle")
    out["list200_2^22_host_us_class"] = _target(
        _get(rows, LIST_SMALL, CUPY_CLASS, "host_us"), 40.0, "<=",
        "host microseconds per class step without graphs, GPU idle")
    out["list200_2^27_clip_skip_over_plain"] = _target(
        _ratio(_get(rows, LIST_BIG, CUPY_CLIP), _get(rows, LIST_BIG, CUPY_CLASS)), 1.18, "<=",
        "class step with clip_grad_norm + skip_nonfinite / plain class step (fastopt-cupy)")
    singles = [c for c in dict.fromkeys(r["case"] for r in rows if r["optimizer"] == "adam")
               if re.fullmatch(r"1 x 2\^(\d+) fp32", c) and int(c.split("^")[1].split()[0]) >= 24]
    ratios = [_ratio(_get(rows, c, NUMBA_FN), _get(rows, c, CUPY_FN)) for c in singles]
    out["numba_over_cupy_single_2^24_and_up"] = _target(
        None if not ratios or None in ratios else max(ratios), 1.25, "<=",
        "worst numba / cupy functional step time over the fp32 single-tensor cases >= 2^24")
    lists = [_ratio(_get(rows, c, NUMBA_FN), _get(rows, c, CUPY_FN)) for c in (LIST_SMALL, LIST_BIG)]
    out["numba_over_cupy_list200"] = _target(
        None if None in lists else max(lists), 2.0, "<=",
        "worst numba / cupy functional step time over the two 200-tensor cases")
    # issue 13: bfloat16 params with float32 state at 0.9 of the copy ceiling and faster than torch fused
    for case, variant, key in ((BF16_SINGLE, CUPY_FN, "adam_bf16_2^26"), (BF16_LIST, CUPY_CLASS, "list200_2^27_bf16")):
        out[f"{key}_fraction_of_copy"] = _target(
            _get(rows, case, variant, "of_copy"), 0.9, ">=",
            f"{variant} GB/s over the device copy's, bfloat16 params and grads, float32 state (22 bytes per param)")
        out[f"{key}_speedup_vs_torch_fused"] = _target(
            _ratio(_get(rows, case, TORCH_FUSED), _get(rows, case, variant)), 1.0, ">=",
            f"torch fused (bfloat16 state) / {variant} step time (issue 13: faster than torch fused)")
    # issue 13: 8-bit state at 0.85 of the copy ceiling and 3x faster than bitsandbytes' and torchao's 8-bit Adam
    for case, variant, key in ((INT8_SINGLE, CUPY_FN, "adam_int8_fp32_2^28"), (INT8_LIST, CUPY_CLASS,
                                                                              "list200_2^27_bf16_int8")):
        out[f"{key}_fraction_of_copy"] = _target(
            _get(rows, case, variant, "of_copy"), 0.85, ">=",
            f"{variant} GB/s over the device copy's, 8-bit state (codes and a float32 scale per 256)")
        for other in (BNB8, TORCHAO8):
            out[f"{key}_speedup_vs_{other.split()[0]}"] = _target(
                _ratio(_get(rows, case, other), _get(rows, case, variant)), 3.0, ">=",
                f"{other} / {variant} step time (issue 13: 3x faster)")
    by_check = "filled in by make gpu-check, tests/gpu/gpu_check.py of the source repository"
    out[SANITIZER_TARGET] = _target(None, 0, "<=",
                                    f"errors over memcheck, racecheck, initcheck, synccheck ({by_check})")
    out[GPU_TESTS_TARGET] = _target(None, 0, "<=", "failed or erroring tests on the device: tests/gpu and the tests "
                                    f"marked gpu ({by_check})")
    return out


def _cell(value, fmt="{:.1f}"):
    return "–" if value is None else fmt.format(value)


def markdown(result) -> str:
    """The README's tables: every timed row, then the targets."""
    lines = ["| case | variant | µs / step | GB/s | of copy | of same-pattern | vs torch fused | host µs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        case = r["case"] if r["optimizer"] == "adam" else f"{r['optimizer']} {r['case']}"
        if r.get("us") is None:
            lines.append(f"| {case} | {r['variant']} | {r.get('status', 'not measured')} | | | | | |")
            continue
        lines.append(f"| {case} | {r['variant']} | {_cell(r['us'])} | {_cell(r.get('GBps'), '{:.0f}')} | "
                     f"{_cell(r.get('of_copy'), '{:.2f}')} | {_cell(r.get('of_pattern'), '{:.2f}')} | "
                     f"{_cell(r.get('vs_torch_fused'), '{:.2f}x')} | {_cell(r.get('host_us'))} |")
    copy = result.get("ceilings", {}).get("copy", {})
    lines += ["", f"Device copy: {_cell(copy.get('GBps'), '{:.0f}')} GB/s (read + write). "
              f"{result.get('device', {}).get('name', '')}; {result.get('settings', {}).get('note', '')}", "",
              "| target | value | goal | met |", "|---|---|---|---|"]
    for name, t in result["targets"].items():
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        value = "–" if t["value"] is None else f"{t['value']:.3g}"
        lines.append(f"| {name} | {value} | {t['rule']} {t['target']:g} | {met} |")
    return "\n".join(lines)


def device_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (the results file is bench/results/gpu-<slug>.json)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


# ---------------------------------------------------------------------------------------------------
# The same-pattern ceiling kernel
# ---------------------------------------------------------------------------------------------------

# Reads p, g and NS state arrays, writes p and the states, as an update does, 16 bytes per access; every
# store depends on every load (integer mixing, so no value can make it faster or NaN-slow). R: the state
# element size over the params' (1, or 2 for fp16 params with fp32 state): one 16-byte vector of params
# goes with R vectors of each state. Grid-stride loop; the grid comes from the occupancy API.
PATTERN_SOURCE = r"""
__device__ __forceinline__ uint4 fo_mix(uint4 a, uint4 b) {
    return make_uint4(a.x ^ b.x, a.y + b.y, a.z ^ b.z, a.w + b.w);
}

template <int NS, int R>
__device__ __forceinline__ void fo_pattern(uint4* __restrict__ p, const uint4* __restrict__ g,
                                           uint4* __restrict__ s0, uint4* __restrict__ s1,
                                           uint4* __restrict__ s2, long long nvec) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < nvec; i += stride) {
        uint4 pv = p[i];
        const uint4 gv = g[i];
        uint4 a[R], b[R], c[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {  // every load issued before the first store
            if (NS > 0) a[r] = s0[i * R + r];
            if (NS > 1) b[r] = s1[i * R + r];
            if (NS > 2) c[r] = s2[i * R + r];
        }
        pv = fo_mix(pv, gv);
#pragma unroll
        for (int r = 0; r < R; ++r) {
            if (NS > 0) { a[r] = fo_mix(a[r], gv); pv = fo_mix(pv, a[r]); s0[i * R + r] = a[r]; }
            if (NS > 1) { b[r] = fo_mix(b[r], gv); pv = fo_mix(pv, b[r]); s1[i * R + r] = b[r]; }
            if (NS > 2) { c[r] = fo_mix(c[r], gv); pv = fo_mix(pv, c[r]); s2[i * R + r] = c[r]; }
        }
        p[i] = pv;
    }
}

#define FO_PATTERN_ENTRY(NS, R)                                                                        \
    extern "C" __global__ void __launch_bounds__(256) fo_bench_pattern_s##NS##_r##R(                   \
        uint4* p, const uint4* g, uint4* s0, uint4* s1, uint4* s2, long long nvec) {                   \
        fo_pattern<NS, R>(p, g, s0, s1, s2, nvec);                                                     \
    }
FO_PATTERN_ENTRY(0, 1)
FO_PATTERN_ENTRY(1, 1)
FO_PATTERN_ENTRY(2, 1)
FO_PATTERN_ENTRY(3, 1)
FO_PATTERN_ENTRY(0, 2)
FO_PATTERN_ENTRY(1, 2)
FO_PATTERN_ENTRY(2, 2)
FO_PATTERN_ENTRY(3, 2)
"""


def pattern_kernel_name(nstates: int, dtype: str) -> str:
    ratio = state_dtype(dtype).itemsize // np.dtype(dtype).itemsize
    if nstates not in (0, 1, 2, 3) or ratio not in (1, 2):
        raise ValueError(f"no same-pattern kernel for {nstates} states and {dtype} params")
    return f"fo_bench_pattern_s{nstates}_r{ratio}"


def pattern_vectors(elements: int, dtype: str) -> tuple:
    """(16-byte vectors of params, elements covered): the kernel covers whole vectors only."""
    per_vec = 16 // np.dtype(dtype).itemsize
    nvec = elements // per_vec
    return nvec, nvec * per_vec


# ---------------------------------------------------------------------------------------------------
# Measuring (GPU)
# ---------------------------------------------------------------------------------------------------

class Bench:
    """One run: the CuPy module, the device's numbers, the timing rules."""

    def __init__(self, cp, settings: Settings, log=print):
        self.cp, self.s, self.log = cp, settings, log
        dev = cp.cuda.Device()
        self.device_id = dev.id
        props = cp.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"]
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        self.sm_count = int(props["multiProcessorCount"])
        self.l2_bytes = int(props.get("l2CacheSize") or dev.attributes["L2CacheSize"])
        self.cc = f"{props['major']}.{props['minor']}"
        self.total_memory = int(props["totalGlobalMem"])
        # CuPy's current stream (the legacy default stream unless changed): fastopt's CuPy launches, the
        # ceiling kernels and torch's default stream all run there, so events on it bracket their work
        self.stream = cp.cuda.get_current_stream()
        self._pattern = cp.RawModule(code=PATTERN_SOURCE, options=("-std=c++17",))

    # -- timing
    def time_steps(self, steps, stream=None):
        """Median seconds per step of K calls cycling over `steps` (one per buffer set) between two events."""
        cp, s = self.cp, self.s
        stream = stream or self.stream
        for _ in range(s.warmup):
            for fn in steps:
                fn()
        k = max(s.k, len(steps))
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        times = []
        for r in range(s.repeats):
            start.record(stream)
            for i in range(k):
                steps[(r * k + i) % len(steps)]()
            stop.record(stream)
            stop.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, stop) * 1e-3 / k)
        return statistics.median(times)

    def host_us(self, fn):
        """Median wall microseconds of one call with the GPU idle before it."""
        dev = self.cp.cuda.Device(self.device_id)
        samples = []
        for _ in range(self.s.host_repeats):
            dev.synchronize()
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        dev.synchronize()
        return statistics.median(samples) * 1e6

    def sets(self, set_bytes):
        return buffer_sets(set_bytes, self.l2_bytes)

    def free_memory(self):
        cp = self.cp
        cp.get_default_memory_pool().free_all_blocks()
        try:
            import torch
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()
        except ImportError:
            pass
        return cp.cuda.runtime.memGetInfo()[0]

    # -- ceilings
    def copy_ceiling(self, nbytes=None):
        cp = self.cp
        nbytes = nbytes or COPY_BYTES
        rt = cp.cuda.runtime
        nsets = self.sets(2 * nbytes)
        bufs = [(cp.empty(nbytes, dtype=cp.uint8), cp.empty(nbytes, dtype=cp.uint8)) for _ in range(nsets)]
        for a, b in bufs:
            a.fill(1)
            b.fill(2)
        steps = [lambda a=a, b=b: rt.memcpyAsync(b.data.ptr, a.data.ptr, nbytes, rt.memcpyDeviceToDevice,
                                                 self.stream.ptr) for a, b in bufs]
        t = self.time_steps(steps)
        del bufs
        return {"bytes": 2 * nbytes, "us": t * 1e6, "GBps": gbps(2 * nbytes, t), "sets": nsets}

    def pattern_grid(self, kernel, nvec):
        per_sm = self.cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.kernel.ptr, BLOCK, 0)
        return max(1, min(per_sm * self.sm_count, -(-nvec // BLOCK)))

    def pattern_steps(self, nstates, dtype, elements, nsets):
        """Step callables of the same-pattern kernel over nsets flat buffer sets (p, g, states)."""
        cp = self.cp
        kernel = self._pattern.get_function(pattern_kernel_name(nstates, dtype))
        nvec, covered = pattern_vectors(elements, dtype)
        grid = self.pattern_grid(kernel, nvec)
        sets = []
        for _ in range(nsets):
            p, g = (cp.random.standard_normal(covered, dtype=cp.float32).astype(dtype) for _ in range(2))
            states = [cp.random.standard_normal(covered, dtype=cp.float32).astype(state_dtype(dtype))
                      for _ in range(nstates)]
            sets.append((p, g, states))

        def step(p, g, states):
            ptrs = [np.uint64(a.data.ptr) for a in states] + [np.uint64(0)] * (3 - len(states))
            kernel((grid,), (BLOCK,), (p, g, *ptrs, np.int64(nvec)))  # on the current stream, self.stream

        return [lambda st=st: step(*st) for st in sets], covered, grid, sets


def _software():
    import numpy
    info = {"python": platform.python_version(), "numpy": numpy.__version__}
    for mod in ("fastopt", "cupy", "torch", "numba", "numba_cuda", "optimi", "bitsandbytes"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "installed")
        except Exception as e:  # not installed, or broken: say which
            info[mod] = None if isinstance(e, ImportError) else f"import failed: {type(e).__name__}: {e}"
    try:
        import cupy
        info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        info["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
    except Exception as e:
        info["cuda_runtime"] = f"unknown ({type(e).__name__})"
    return info


# ---------------------------------------------------------------------------------------------------
# The variants (GPU)
# ---------------------------------------------------------------------------------------------------

class NotRun(Exception):
    """A variant that cannot run here (package missing, dtype unsupported, not capturable): its row says why."""


@dataclass
class Measurable:
    steps: list                  # one callable per buffer set
    host: object                 # the callable whose host time is measured
    stream: object = None        # where steps run (None: the null stream)
    notes: dict = field(default_factory=dict)
    keep: object = None          # arrays, optimizers, graphs: alive until measured


def _randn(cp, shape, dtype):
    if dtype == "float64":
        return cp.random.standard_normal(shape, dtype=cp.float64)
    return cp.random.standard_normal(shape, dtype=cp.float32).astype(np.dtype(dtype))


def _pick(case, arrays):
    return arrays[0] if case.tensors == 1 else arrays


def _check_dtype(backend, dtype):
    """NotRun when a GPU backend has no kernels for the dtype (bfloat16 without ml_dtypes)."""
    if backend in ("cupy", "numba"):
        import importlib
        module = importlib.import_module(f"fastopt.backends.{backend}_backend")
        if np.dtype(dtype) not in module.DTYPES:
            raise NotRun(f"the {backend} backend has no {dtype} kernels")


def _functional(backend):
    def build(bench, case, spec, hp, nsets):
        import fastopt
        _check_dtype(backend, case.dtype)
        cp = bench.cp
        fn = getattr(fastopt, spec.function_name)
        options = {k: hp[k] for k in spec.state_options}
        if case.state:
            options["state_dtype"] = case.state
        sets = []
        for _ in range(nsets):
            ps = [_randn(cp, s, case.dtype) for s in case.shapes]
            gs = [_randn(cp, s, case.dtype) for s in case.shapes]
            state = fastopt.init_state(spec.name, _pick(case, ps), **options)
            sets.append((_pick(case, ps), _pick(case, gs), state, [0]))

        def step(p, g, state, count):
            count[0] += 1
            kw = dict(hp, step=count[0]) if spec.uses_step else dict(hp)
            fn(p, g, **state, **kw, backend=backend)

        steps = [lambda st=st: step(*st) for st in sets]
        return Measurable(steps, steps[0], keep=sets)
    return build


def _class_optimizers(bench, case, backend, clip_skip, capturable, nsets):
    import fastopt
    _check_dtype(backend, case.dtype)
    cp = bench.cp
    options = dict(clip_grad_norm=1.0, skip_nonfinite=True) if clip_skip else {}
    if case.state:
        options["state_dtype"] = case.state
    if capturable:
        options["capturable"] = True
    out = []
    for _ in range(nsets):
        ps = [_randn(cp, s, case.dtype) for s in case.shapes]
        gs = [_randn(cp, s, case.dtype) for s in case.shapes]
        out.append((fastopt.Adam(ps, lr=LR, backend=backend, **options), gs))
    return out


def class_supports_capturable() -> bool:
    """Whether fastopt.Adam takes capturable= (issue 11, Deliver 4: step counters and lr on the device)."""
    import inspect

    import fastopt
    return "capturable" in inspect.signature(fastopt.Adam).parameters


def _class(backend, clip_skip=False):
    def build(bench, case, spec, hp, nsets):
        opts = _class_optimizers(bench, case, backend, clip_skip, False, nsets)
        steps = [lambda o=o, g=g: o.step(g) for o, g in opts]
        return Measurable(steps, steps[0], keep=opts)
    return build


def capture(cp, fn, stream):
    """A cupy.cuda.Graph of what fn launches on `stream` (CuPy's current stream inside), or NotRun saying
    why the capture failed. The device is synchronised first: captured work must not wait on earlier work."""
    cp.cuda.Device().synchronize()
    with stream:
        stream.begin_capture()
        try:
            fn()
        except Exception as e:
            try:
                stream.end_capture()
            except Exception:  # an invalidated capture: the original error is the one to report
                pass
            raise NotRun(f"not capturable: {type(e).__name__}: {e}") from None
        try:
            return stream.end_capture()
        except Exception as e:
            raise NotRun(f"not capturable: {type(e).__name__}: {e}") from None


def _graph(backend="cupy", clip_skip=False):
    """The class step captured once per buffer set (after eager warm-up steps, so that modules, tables and
    scratch exist) and replayed, with capturable=True on the CuPy backend (each replay a new step: its
    scalars chosen on the device). Elsewhere (the CPU stand-in of the tests) the replays repeat the
    captured step's host scalars: the same kernels and bytes, so the same time."""
    def build(bench, case, spec, hp, nsets):
        cp = bench.cp
        capturable = class_supports_capturable() and backend == "cupy"  # the backend graphs can hold
        opts = _class_optimizers(bench, case, backend, clip_skip, capturable, nsets)
        for _ in range(2):
            for o, g in opts:
                o.step(g)
        stream = cp.cuda.Stream(non_blocking=True)
        graphs = [capture(cp, lambda o=o, g=g: o.step(g), stream) for o, g in opts]
        steps = [lambda gr=gr: gr.launch(stream) for gr in graphs]
        return Measurable(steps, steps[0], stream=stream, notes={"capturable_mode": capturable},
                          keep=(opts, graphs, stream))
    return build


def _torch_make(kind):
    def build(bench, case, spec, hp, nsets):
        try:
            import torch
        except ImportError as e:
            raise NotRun(f"torch not installed ({e})") from None
        if not torch.cuda.is_available():
            raise NotRun("torch has no CUDA (a CPU-only build?)")
        device = torch.device("cuda", bench.device_id)
        dtype = getattr(torch, case.dtype)
        kwargs = {"lr": LR}
        if spec.name == "sgd":
            kwargs["momentum"] = hp["momentum"]
        if kind in ("fused", "foreach"):
            if spec.torch_class is None:
                raise NotRun(f"torch.optim has no {spec.class_name}")
            cls = getattr(torch.optim, spec.torch_class)
            kwargs[kind] = True
        elif kind in ("bnb8", "torchao8"):  # their 8-bit Adam (block-wise, 256 per block as fastopt's)
            if spec.name != "adam":
                raise NotRun("measured for Adam only")
            try:
                if kind == "bnb8":
                    import bitsandbytes as bnb
                    cls = bnb.optim.Adam8bit
                else:
                    from torchao.optim import AdamW8bit as cls
                    kwargs["weight_decay"] = 0.0  # Adam's update
            except ImportError as e:
                raise NotRun(f"{'bitsandbytes' if kind == 'bnb8' else 'torchao'} not installed ({e})") from None
        elif kind == "optimi":
            try:
                import optimi
            except ImportError as e:
                raise NotRun(f"optimi not installed ({e})") from None
            if spec.name != "adam":
                raise NotRun("measured for Adam only")
            cls = optimi.Adam
        else:
            try:
                import bitsandbytes as bnb
            except ImportError as e:
                raise NotRun(f"bitsandbytes not installed ({e})") from None
            if spec.name != "adam":
                raise NotRun("measured for Adam only")
            cls = bnb.optim.Adam
            kwargs["optim_bits"] = 32
        opts = []
        for _ in range(nsets):
            params = [torch.randn(s, device=device, dtype=dtype) for s in case.shapes]
            for p in params:
                p.grad = torch.randn_like(p)
            opts.append(cls(params, **kwargs))
        steps = [o.step for o in opts]
        return Measurable(steps, steps[0], keep=opts)
    return build


def _pattern(bench, case, spec, hp, nsets):
    if spec.two_phase:
        raise NotRun("no same-pattern kernel for a two-pass update")
    if spec.tensor_coefs is not None:  # param_bytes counts its norms pass (p and g read) too
        raise NotRun("no same-pattern kernel for a norms pass plus the update (LARS)")
    steps, covered, grid, sets = bench.pattern_steps(sum(spec.active_states(hp)), case.dtype, case.elements, nsets)
    return Measurable(steps, steps[0], notes={"elements_covered": covered, "grid": grid}, keep=sets)


BUILDERS = {
    CUPY_FN: _functional("cupy"),
    CUPY_CLASS: _class("cupy"),
    CUPY_GRAPH: _graph(),
    CUPY_CLIP: _class("cupy", clip_skip=True),
    CUPY_CLIP_GRAPH: _graph("cupy", clip_skip=True),
    NUMBA_FN: _functional("numba"),
    NUMBA_CLASS: _class("numba"),
    TORCH_FUSED: _torch_make("fused"),
    TORCH_FOREACH: _torch_make("foreach"),
    OPTIMI: _torch_make("optimi"),
    BNB: _torch_make("bnb"),
    BNB8: _torch_make("bnb8"),
    TORCHAO8: _torch_make("torchao8"),
    PATTERN: _pattern,
}


def measure_case(bench, case, log=print) -> list:
    """The rows of one case: every variant measured in turn, a failure recorded in its row (a scarce GPU
    run must not lose the rest)."""
    spec = REGISTRY[case.optimizer]
    hp = bench_hyperparameters(spec)
    set_bytes = footprint(spec, hp, case.dtype, case.elements, case.state)
    nsets = bench.sets(set_bytes)
    rows = []
    for variant in case.variants:
        row = {"optimizer": case.optimizer, "case": case.label, "variant": variant, "dtype": case.dtype,
               "elements": case.elements, "tensors": case.tensors,
               "bytes": variant_bytes(variant, spec, hp, case.dtype, case.state) * case.elements, "sets": nsets,
               "state": case.state or "default"}
        t0 = time.perf_counter()
        m = None
        try:
            free = bench.free_memory()
            need = nsets * set_bytes
            if need > 0.85 * free:
                raise NotRun(f"needs {need / 2 ** 30:.1f} GiB, {free / 2 ** 30:.1f} GiB free")
            m = BUILDERS[variant](bench, case, spec, hp, nsets)
            row["us"] = bench.time_steps(m.steps, m.stream) * 1e6
            row["host_us"] = bench.host_us(m.host)
            row.update(m.notes)
            row["status"] = "ok"
        except NotRun as e:
            row["status"] = str(e) if str(e).startswith("not capturable") else f"not run: {e}"
        except Exception as e:  # recorded, and the run goes on
            row["status"] = f"error: {type(e).__name__}: {e}"[:600]
        finally:
            del m
            try:
                bench.cp.cuda.Device(bench.device_id).synchronize()
            except Exception as e:  # a sticky CUDA error: every later row will say so too
                row.setdefault("status", f"error: {type(e).__name__}: {e}"[:600])
        row["wall_s"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        shown = f"{row['us']:10.1f} us  host {row['host_us']:8.1f} us" if "us" in row else row["status"]
        log(f"  {case.optimizer} | {case.label:<22} | {variant:<34} | {shown}")
    return rows


def _sort_key(row, order):
    return (order.get(row["optimizer"], 0), row["tensors"] > 1, row["dtype"] != "float32", row["elements"])


def result_document(bench_info, settings, copy, rows, cases, complete) -> dict:
    rows = finish_rows([dict(r) for r in rows], copy.get("GBps") if copy else None)
    order = {name: i for i, name in enumerate(dict.fromkeys(c.optimizer for c in cases))}
    rows.sort(key=lambda r: _sort_key(r, order))  # stable: variants keep their order within a case
    return {"benchmark": "fastopt GPU benchmark (issue 11)", "complete": complete, **bench_info,
            "settings": settings, "ceilings": {"copy": copy}, "rows": rows,
            "targets": targets(rows, copy.get("GBps") if copy else None)}


def main(args):
    """`fastopt bench --device gpu` with the options fastopt.cli parsed (the GPU was checked there, except
    for --dry-run, which needs none)."""
    from fastopt.cli_args import dumps, write_json
    quick = bool(args.quick)
    cases = plan(quick, args.sizes, args.optimizers)
    if getattr(args, "dry_run", False):
        doc = {"dry_run": True, "quick": quick, "assumed_l2_bytes": ASSUMED_L2, "cases": plan_records(cases)}
        if args.out:
            write_json(args.out, doc)
        if args.json:
            print(dumps(doc))
            return 0
        print(f"{len(cases)} cases ({'quick' if quick else 'full'}; buffer sets for an L2 of "
              f"{ASSUMED_L2 / 2 ** 20:.0f} MiB, the run reads the device's):")
        for line in describe_plan(cases):
            print(line)
        return 0
    import cupy as cp
    base = QUICK if quick else FULL
    settings = Settings(base.k, args.repeats or base.repeats, base.host_repeats, base.warmup)
    bench = Bench(cp, settings)
    from fastopt.benchmark import machine_info
    info = {"device": {"name": bench.name, "compute_capability": bench.cc, "sm_count": bench.sm_count,
                       "l2_bytes": bench.l2_bytes, "memory_bytes": bench.total_memory},
            "software": _software(), "machine": machine_info(), "revision": git_revision()}
    note = (f"K={settings.k} steps between CUDA events, median of {settings.repeats}; buffer sets rotated past "
            f"{FLUSH_FACTOR}x the L2 ({bench.l2_bytes / 2 ** 20:.0f} MiB); host µs: median of "
            f"{settings.host_repeats} calls with the GPU idle")
    run_settings = {"quick": quick, "k": settings.k, "repeats": settings.repeats, "host_repeats": settings.host_repeats,
                    "warmup_rounds": settings.warmup, "flush_factor": FLUSH_FACTOR, "lr": LR,
                    "class_capturable": class_supports_capturable(), "note": note}
    t0 = time.perf_counter()
    progress = sys.stderr if args.json else sys.stdout  # with --json, stdout is the JSON document alone
    print(f"{bench.name}: {len(cases)} cases; {note}", file=progress)
    try:
        copy = bench.copy_ceiling()
    except Exception as e:
        copy = {"status": f"error: {type(e).__name__}: {e}"}
    print(f"  device copy: {copy.get('GBps') or 0:.0f} GB/s (read + write)", file=progress)
    rows: list = []
    for case in cases:
        rows += measure_case(bench, case, log=lambda line: print(line, file=progress))
        if args.out:  # after every case: a run cut short still leaves its rows and targets
            write_json(args.out, result_document(info, run_settings, copy, rows, cases, False))
    doc = result_document(info, run_settings, copy, rows, cases, True)
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.out:
        write_json(args.out, doc)
    if args.json:
        print(dumps(doc))
    else:
        print()
        print(markdown(doc))
    return 0
