"""fastopt's low-precision AdamW on the CPU next to the libraries users pick for low precision (issue 13):
torch.optim (fused, foreach), optimi (PyPI torch-optimi), torchao and bitsandbytes, whichever are installed.

    .venv/bin/pip install -r bench/requirements-compare.txt      (torch-optimi, torchao, bitsandbytes)
    .venv/bin/python bench/bench_libraries.py [--n 1e7] [--tensors 200] [--threads 2] [--reps 15] [--out FILE]

AdamW (lr 1e-3, betas 0.9/0.999, eps 1e-8, weight decay 0.01) on two layouts of the same total: one tensor
and a list of `--tensors` tensors. The total is --n rounded up to a multiple of 256 (1e7 -> 10,000,128) and
every tensor of the list holds a whole number of 256-element blocks (two sizes, 195 and 196 blocks at the
defaults): torchao keeps a tensor whose size is not a multiple of its block size in the params' dtype
(silently, no 8-bit state), and one or two distinct shapes keep torchao's torch.compile to a few compiles.
Cases (groups), each timed on its own:
- "bf16": bfloat16 params and grads. fastopt keeps float32 state by default (fastopt.adamw_step on NumPy
  ml_dtypes.bfloat16 arrays, and fastopt.torch.AdamW on torch bfloat16 tensors), and bfloat16 state with
  state_dtype="bfloat16"; torch.optim.AdamW (fused=True, foreach=True) and optimi's AdamW keep their state
  in the params' dtype, bfloat16. Kahan summation: optimi kahan_sum=True vs fastopt kahan=True (both
  with bfloat16 state too).
- "bf16 + stochastic rounding": torchao's _AdamW(bf16_stochastic_round=True) (bfloat16 state, its
  compiled step) vs fastopt stochastic_rounding=True.
- "8-bit state" of bfloat16 and of float32 params: torchao AdamW8bit and bitsandbytes AdamW8bit (both
  block-wise with blocks of 256 and dynamic maps) vs fastopt state_dtype="int8".
A library that is not installed is left out (named in the JSON); one that raises on the CPU is recorded
as "unsupported: <exception>" rather than hidden.

Threads: torch.set_num_threads(threads) and fastopt.set_num_threads(threads) (torchao's compiled steps and
bitsandbytes' CPU ops run in torch's pool). Every implementation gets its own params (the same initial
values) and reads the same grad tensors. First 5 steps with fresh grads each step (the same for all): every
implementation must have changed its params, and each library must agree with the fastopt run of the same
mode and state width within the stated tolerance (asserted: the benchmark compares like with like). Then
`warmup` steps and `reps` interleaved rounds: in each round every implementation steps once and the
byte-count ceilings (fastopt.kernels.cpu._cpu_fast.touch: the same reads and writes with trivial math, on
NumPy arrays of the same layout) run once, so load from other processes hits all alike. Reported per row:
min and median ms per step, bytes per param moved and kept as state (the state the optimizer object
actually holds, bitsandbytes' per-tensor quantization maps included), the fraction of its own ceiling
(ceiling time / step time; for 8-bit state touch() takes float arrays only, so the ceiling is the 16-bit
touch of the same params scaled by the byte counts, as bench_low_precision does), and the time ratio of
each fastopt row of the group to it (fastopt / this: below 1 means fastopt is faster); both also "paired"
(the median over rounds of the ratio of the two times of one round: the robust one on a loaded machine).
The 8-bit groups also run fastopt with float32 state on the same params: the JSON's agreement section
gives each 8-bit run's distance to it (the quantization error, outliers counted), reported, not asserted.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01
CHECK_STEPS = 5
BLOCK = 256
LIBRARIES = {"optimi": "optimi", "torchao": "torchao.optim", "bitsandbytes": "bitsandbytes"}

# Tolerances of the agreement check after CHECK_STEPS steps, in units of the distance Adam can move a param
# in those steps (CHECK_STEPS * lr) and in ulps (params' dtype, at the larger of the two values):
# - 16-bit params and state (torch fused/foreach, optimi vs fastopt with bfloat16 state): both round a
#   float32 update to bfloat16; they differ by an ulp or two where their math (torch foreach and optimi
#   compute in bfloat16, fused and fastopt in float32) puts a value across a rounding boundary, a few times
#   over 5 steps. Elementwise |diff| <= 4 ulp + 0.02 x 5 lr (the second term: results near zero, where an
#   ulp is tiny), and mean |diff| <= 0.02 x 5 lr.
# - stochastic rounding: two independent random streams, each less than an ulp off per step: elementwise
#   |diff| <= 2 x 5 + 2 ulp + 0.02 x 5 lr, mean |diff| <= 0.05 x 5 lr.
# - 8-bit state: the libraries' dynamic maps and fastopt's quantize m and v to different codes; where a
#   block's absmax is far above an element's v, v dequantizes to 0 and that element's update is m / eps
#   (all three implementations have such outliers: their count and size are reported, not bounded).
#   mean |diff| <= 0.03 x 5 lr and the 99.9th percentile <= 0.25 x 5 lr.
TOLERANCE = {"bf16": {"ulps": 4, "frac": 0.02, "mean_frac": 0.02},
             "sr": {"ulps": 2 * CHECK_STEPS + 2, "frac": 0.02, "mean_frac": 0.05},
             "int8": {"mean_frac": 0.03, "q999_frac": 0.25}}


def _bf16():
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


def layout_sizes(n, tensors):
    """(total, sizes of the one-tensor layout, sizes of the list): n rounded up to whole 256-blocks and
    split into `tensors` tensors of whole blocks (base or base + 1 blocks each)."""
    blocks = -(-int(n) // BLOCK)
    if blocks < tensors:
        raise ValueError(f"n={n} is fewer than {tensors} blocks of {BLOCK}: no list of {tensors} tensors")
    base, extra = divmod(blocks, tensors)
    sizes = [(base + 1) * BLOCK] * extra + [base * BLOCK] * (tensors - extra)
    return blocks * BLOCK, [blocks * BLOCK], sizes


def _as_numpy(t):
    """A NumPy view (no copy) of a contiguous CPU tensor; bfloat16 through int16 and ml_dtypes."""
    import torch
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_bf16())
    return t.numpy()


def _tensor_bytes(x):
    import torch
    if not isinstance(x, torch.Tensor):
        return 0
    if hasattr(x, "codes") and hasattr(x, "scale"):  # torchao's OptimState8bit (its qmap is shared)
        return x.codes.nbytes + x.scale.nbytes
    return x.nbytes


class Impl:
    """One implementation in one group: its own params (torch tensors; NumPy views for fastopt's NumPy
    API), a step(t) and what it keeps and moves per param."""

    def __init__(self, label, library, params, step, ceiling, mode, ref=None, kind="bf16", state=None):
        self.label, self.library, self.params, self._step = label, library, params, step
        self.exact = None  # label of the float32-state run to report the distance to
        self.ceiling, self.mode, self.ref, self.kind = ceiling, mode, ref, kind
        self.state = state  # a function returning the state tensors/arrays (for the bytes kept)
        self.times = []

    def step(self, t):
        self._step(t)


def _torch_impl(label, library, make, params, ceiling, mode, ref, kind):
    opt = make(params)

    def state():
        return [v for st in opt.state.values() for k, v in st.items() if k != "step"]
    return Impl(label, library, params, lambda t: opt.step(), ceiling, mode, ref, kind, state), opt


def _numpy_fastopt(label, params, grads, ceiling, mode, kind, **options):
    import fastopt
    ps, gs = [_as_numpy(p) for p in params], [_as_numpy(g) for g in grads]
    st = fastopt.init_state("adamw", ps, **options)
    extra = {"kahan_comp": st["kahan_comp"]} if "kahan_comp" in st else {}
    sr = bool(mode.get("stochastic_rounding"))

    def step(t):
        fastopt.adamw_step(ps, gs, st["exp_avg"], st["exp_avg_sq"], step=t, lr=LR, beta1=BETAS[0],
                           beta2=BETAS[1], eps=EPS, weight_decay=WD, stochastic_rounding=sr, **extra)

    def state():
        return [a for v in st.values() for a in v]
    return Impl(label, "fastopt", params, step, ceiling, mode, None, kind, state)


def _state_bytes(impl):
    total = 0
    for x in impl.state():
        if isinstance(x, np.ndarray) or hasattr(x, "codes") and hasattr(x, "absmax"):
            total += x.nbytes  # NumPy arrays and fastopt's QuantizedState (codes + absmax)
        else:
            total += _tensor_bytes(x)
    return total


def _full_width_state(impl):
    """Whether a state tensor/array holds one float per param element (no 8-bit codes)."""
    import torch
    sizes = {p.numel() for p in impl.params}
    for x in impl.state():
        if hasattr(x, "codes"):  # torchao's OptimState8bit, fastopt's QuantizedState
            continue
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() in sizes:
            return True
        if isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.size in sizes:
            return True
    return False


def build_group(group, sizes, grads, installed, unsupported):
    """The implementations of one group on params of `sizes` (a fresh copy each), reading `grads`, each
    after its first step; and the initial params, flattened to float32."""
    import torch

    import fastopt.torch as ft
    pdtype = {"bf16": torch.bfloat16, "sr": torch.bfloat16, "int8-bf16": torch.bfloat16,
              "int8-fp32": torch.float32}[group]
    gen = torch.Generator().manual_seed(1)
    init = [(0.02 * torch.randn(s, generator=gen)).to(pdtype) for s in sizes]  # a typical weight init scale

    def fresh():
        ps = [x.clone() for x in init]
        for p, g in zip(ps, grads):
            p.grad = g
        return ps

    kw = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    impls = []

    def add(label, library, make, ceiling, mode, ref=None, kind="bf16"):
        try:
            impl, _ = _torch_impl(label, library, make, fresh(), ceiling, mode, ref, kind)
            impl.step(1)  # first step here: an exception on the CPU is recorded, not raised
            impl.first_step_done = True
            impls.append(impl)
            return impl
        except Exception as e:  # noqa: BLE001 - whatever the library raises is the finding
            unsupported[f"{group}: {label}"] = f"unsupported: {type(e).__name__}: {e}"

    if group == "bf16":
        impls.append(_numpy_fastopt("fastopt adamw_step (NumPy), fp32 state", fresh(), grads, "bf16/f32",
                                    {}, "bf16"))
        add("fastopt.torch AdamW, fp32 state", "fastopt", lambda ps: ft.AdamW(ps, **kw), "bf16/f32", {})
        add("fastopt.torch AdamW, bf16 state", "fastopt",
            lambda ps: ft.AdamW(ps, **kw, state_dtype="bfloat16"), "bf16/bf16", {})
        add("torch AdamW fused (bf16 state)", "torch", lambda ps: torch.optim.AdamW(ps, **kw, fused=True),
            "bf16/bf16", {}, ref="fastopt.torch AdamW, bf16 state")
        add("torch AdamW foreach (bf16 state)", "torch",
            lambda ps: torch.optim.AdamW(ps, **kw, foreach=True), "bf16/bf16", {},
            ref="fastopt.torch AdamW, bf16 state")
        if "optimi" in installed:
            optimi = installed["optimi"]
            add("optimi AdamW (bf16 state)", "optimi", lambda ps: optimi.AdamW(ps, **kw, kahan_sum=False),
                "bf16/bf16", {}, ref="fastopt.torch AdamW, bf16 state")
        add("fastopt.torch AdamW + kahan, fp32 state", "fastopt", lambda ps: ft.AdamW(ps, **kw, kahan=True),
            "bf16/f32+comp", {"kahan": True})
        add("fastopt.torch AdamW + kahan, bf16 state", "fastopt",
            lambda ps: ft.AdamW(ps, **kw, kahan=True, state_dtype="bfloat16"), "bf16/bf16+comp", {"kahan": True})
        if "optimi" in installed:
            add("optimi AdamW kahan_sum (bf16 state)", "optimi",
                lambda ps: optimi.AdamW(ps, **kw, kahan_sum=True), "bf16/bf16+comp", {"kahan": True},
                ref="fastopt.torch AdamW + kahan, bf16 state")
    elif group == "sr":
        sr = {"stochastic_rounding": True}
        impls.append(_numpy_fastopt("fastopt adamw_step (NumPy) + SR, fp32 state", fresh(), grads, "bf16/f32",
                                    sr, "sr"))
        add("fastopt.torch AdamW + SR, fp32 state", "fastopt",
            lambda ps: ft.AdamW(ps, **kw, stochastic_rounding=True), "bf16/f32", sr, kind="sr")
        add("fastopt.torch AdamW + SR, bf16 state", "fastopt",
            lambda ps: ft.AdamW(ps, **kw, stochastic_rounding=True, state_dtype="bfloat16"), "bf16/bf16", sr,
            kind="sr")
        if "torchao" in installed:
            tao = installed["torchao"]
            add("torchao _AdamW bf16_stochastic_round (bf16 state)", "torchao",
                lambda ps: tao._AdamW(ps, **kw, bf16_stochastic_round=True), "bf16/bf16", sr,
                ref="fastopt.torch AdamW + SR, bf16 state", kind="sr")
    else:
        q = {"state_dtype": "int8"}
        ceil = "bf16/int8" if group == "int8-bf16" else "f32/int8"
        impls.append(_numpy_fastopt("fastopt adamw_step (NumPy), int8 state", fresh(), grads, ceil, q, "int8",
                                    state_dtype="int8"))
        add("fastopt.torch AdamW, int8 state", "fastopt", lambda ps: ft.AdamW(ps, **kw, state_dtype="int8"),
            ceil, q, kind="int8")
        if "torchao" in installed:
            tao = installed["torchao"]
            add("torchao AdamW8bit", "torchao", lambda ps: tao.AdamW8bit(ps, **kw), ceil, q,
                ref="fastopt.torch AdamW, int8 state", kind="int8")
        if "bitsandbytes" in installed:
            bnb = installed["bitsandbytes"]
            add("bitsandbytes AdamW8bit", "bitsandbytes", lambda ps: bnb.optim.AdamW8bit(ps, **kw), ceil, q,
                ref="fastopt.torch AdamW, int8 state", kind="int8")
        # the float32-state run on the same params: the distance of each 8-bit run to it is reported
        exact = add("fastopt.torch AdamW, fp32 state", "fastopt", lambda ps: ft.AdamW(ps, **kw),
                    ceil.replace("int8", "f32"), {})
        for impl in impls:
            if impl.kind == "int8" and exact is not None:
                impl.exact = exact.label
    # the NumPy fastopt impl has taken no step yet: all start step 2 after this
    for impl in impls:
        if not getattr(impl, "first_step_done", False):
            impl.step(1)
    return impls, torch.cat([x.reshape(-1).float() for x in init])


def _ceiling_arrays(layout, sizes):
    """(touch tuple, bytes per param of this layout, bytes per param of the implementations it stands for)."""
    bf16, f32 = _bf16(), np.dtype(np.float32)
    pd_name, st_name = layout.split("/")
    pd = bf16 if pd_name == "bf16" else f32
    comp = st_name.endswith("+comp")
    st_name = st_name.replace("+comp", "")
    int8 = st_name == "int8"
    # 8-bit state: touch() takes float arrays only; the 16-bit (params' dtype) state traffic is timed and
    # scaled to the 8-bit bytes (codes 1 byte, a float32 scale per 256-element block, read and written)
    sd = pd if int8 else (bf16 if st_name == "bf16" else f32)
    arrays = [[np.ones(s, d) for s in sizes] for d in (pd, pd, sd, sd)]
    touched = tuple(arrays) if not comp else (*arrays, None, [np.zeros(s, pd) for s in sizes])
    touched_bytes = 3 * pd.itemsize + 4 * sd.itemsize + (2 * pd.itemsize if comp else 0)
    impl_bytes = 3 * pd.itemsize + 2 * 2 * (1 + 4 / BLOCK) if int8 else touched_bytes
    return touched, touched_bytes, impl_bytes


def _ulp(x, dtype):
    """The spacing of `dtype` at |x| (float32 tensor in, float32 out)."""
    import torch
    mant = {torch.bfloat16: 7, torch.float32: 23}[dtype]
    tiny = {torch.bfloat16: 2.0 ** -133, torch.float32: 2.0 ** -149}[dtype]
    e = torch.floor(torch.log2(x.abs().clamp_min(torch.finfo(dtype).tiny)))
    return torch.clamp_min(torch.exp2(e - mant), tiny)


def _describe(tol):
    parts = []
    if "ulps" in tol:
        parts.append(f"|diff| <= {tol['ulps']} ulp + {tol['frac']} x {CHECK_STEPS} lr elementwise")
    parts.append(f"mean |diff| <= {tol['mean_frac']} x {CHECK_STEPS} lr")
    if "q999_frac" in tol:
        parts.append(f"99.9th percentile <= {tol['q999_frac']} x {CHECK_STEPS} lr")
    return ", ".join(parts)


def _compare(flat, ref, dtype):
    import torch
    diff = (flat - ref).abs()
    ulp = _ulp(torch.maximum(flat.abs(), ref.abs()), dtype)
    k = max(1, int(0.999 * diff.numel()))
    return diff, ulp, {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                       "q999_abs_diff": float(diff.kthvalue(k).values),
                       "max_diff_ulps": float((diff / ulp).max()),
                       "fraction_differing": float((diff > 0).float().mean()),
                       "count_beyond_check_steps_x_lr": int((diff > CHECK_STEPS * LR).sum())}


def check_agreement(impls, initial):
    """After CHECK_STEPS steps: every implementation changed most of its params; each library agrees with
    its fastopt reference (the same mode and state width) within TOLERANCE[kind]. An implementation with
    `exact` set is also compared (reported, not asserted) with that float32-state run. Returns {label:
    {...}}; raises AssertionError on a disagreement."""
    import torch
    by_label = {i.label: i for i in impls}
    span = CHECK_STEPS * LR
    report = {}
    for impl in impls:
        flat = torch.cat([p.detach().reshape(-1).float() for p in impl.params])
        changed = float((flat != initial).float().mean())
        assert changed > 0.5, f"{impl.label}: only {changed:.3f} of the params changed in {CHECK_STEPS} steps"
        entry = {"fraction_of_params_changed": changed}
        dtype = impl.params[0].dtype
        if impl.exact is not None and impl.exact in by_label:
            ref = torch.cat([p.detach().reshape(-1).float() for p in by_label[impl.exact].params])
            entry["vs_float32_state"] = {"compared_with": impl.exact, **_compare(flat, ref, dtype)[2]}
        if impl.ref is not None:
            ref = torch.cat([p.detach().reshape(-1).float() for p in by_label[impl.ref].params])
            tol = TOLERANCE[impl.kind]
            diff, ulp, stats = _compare(flat, ref, dtype)
            entry.update({"compared_with": impl.ref, **stats, "tolerance": _describe(tol)})
            if "ulps" in tol:
                bound = tol["ulps"] * ulp + tol["frac"] * span
                worst = int(torch.argmax(diff - bound))
                assert bool((diff <= bound).all()), (
                    f"{impl.label} vs {impl.ref}: element {worst}: {float(flat[worst])} vs {float(ref[worst])} "
                    f"(initial {float(initial[worst])}), beyond {entry['tolerance']}")
            assert stats["mean_abs_diff"] <= tol["mean_frac"] * span, (
                f"{impl.label} vs {impl.ref}: mean |diff| {stats['mean_abs_diff']:.3g} > {_describe(tol)}")
            if "q999_frac" in tol:
                assert stats["q999_abs_diff"] <= tol["q999_frac"] * span, (
                    f"{impl.label} vs {impl.ref}: 99.9th percentile {stats['q999_abs_diff']:.3g} > {_describe(tol)}")
        report[impl.label] = entry
    return report


def measure(n=1e7, tensors=200, threads=2, reps=15, warmup=2, groups=("bf16", "sr", "int8-bf16", "int8-fp32"),
            layouts=("one tensor", "list"), libraries=tuple(LIBRARIES), progress=True):
    """The benchmark's rows and agreement report (see the module docstring); asserts the agreement.
    `libraries`: which of LIBRARIES to use where installed (torch.optim and fastopt always run)."""
    # one inductor compile thread: no pool of compile workers left busy beside the timed steps
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    import torch

    import fastopt
    from fastopt.kernels.cpu import _cpu_fast

    installed, missing = {}, {}
    for name, module in LIBRARIES.items():
        if name not in libraries:
            continue
        try:
            installed[name] = importlib.import_module(module)
        except ImportError as e:
            missing[name] = f"not installed: {e}"
    if "torchao" in installed:
        # torchao compiles one step per (shape, dtype, state type); the default recompile limit (8) would
        # silently fall back to eager mode over these cases
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch_threads, fo_threads = torch.get_num_threads(), fastopt.get_num_threads()
    torch.set_num_threads(threads)
    fastopt.set_num_threads(threads)
    total, one, many = layout_sizes(n, tensors)
    rows, agreement, unsupported = [], {}, {}
    try:
        for layout in layouts:
            sizes = one if layout == "one tensor" else many
            for group in groups:
                gdtype = torch.float32 if group == "int8-fp32" else torch.bfloat16
                gen = torch.Generator().manual_seed(2)
                grads = [torch.empty(s, dtype=gdtype) for s in sizes]

                def fill(seed):
                    gen.manual_seed(seed)
                    for g in grads:  # log-normal magnitudes: blocks of very different scale for the 8-bit maps
                        base = torch.randn(g.shape, generator=gen)
                        g.copy_(1e-2 * base * torch.exp(torch.randn(g.shape, generator=gen)))
                fill(100)
                t_build = time.perf_counter()
                impls, initial = build_group(group, sizes, grads, installed, unsupported)
                for t in range(2, CHECK_STEPS + 1):
                    fill(100 + t)
                    for impl in impls:
                        impl.step(t)
                key = f"{group}, {layout}"
                for impl in impls:  # an 8-bit optimizer that kept wider state would compare unlike things
                    assert impl.kind != "int8" or not _full_width_state(impl), f"{impl.label} keeps 16/32-bit state"
                agreement[key] = check_agreement(impls, initial)
                first_steps_s = time.perf_counter() - t_build
                ceilings = {}
                for impl in impls:
                    if impl.ceiling not in ceilings:
                        ceilings[impl.ceiling] = (*_ceiling_arrays(impl.ceiling, sizes), [])
                for t in range(CHECK_STEPS + 1, CHECK_STEPS + 1 + warmup + reps):
                    for impl in impls:
                        t0 = time.perf_counter()
                        impl.step(t)
                        dt = time.perf_counter() - t0
                        if t > CHECK_STEPS + warmup:
                            impl.times.append(dt)
                    for touched, _, _, times in ceilings.values():
                        t0 = time.perf_counter()
                        _cpu_fast.touch(touched)
                        dt = time.perf_counter() - t0
                        if t > CHECK_STEPS + warmup:
                            times.append(dt)
                load = os.getloadavg()
                fo_rows = [i for i in impls if i.library == "fastopt"]
                for impl in impls:
                    _, touched_bytes, impl_bytes, ctimes = ceilings[impl.ceiling]
                    scale = impl_bytes / touched_bytes
                    c_min, c_med = min(ctimes) * scale, statistics.median(ctimes) * scale
                    t_min, t_med = min(impl.times), statistics.median(impl.times)
                    row = {"group": group, "layout": layout, "tensors": len(sizes), "n": total,
                           "implementation": impl.label, "library": impl.library, "mode": impl.mode,
                           "params_dtype": str(impl.params[0].dtype).replace("torch.", ""),
                           "state_bytes_per_param": round(_state_bytes(impl) / total, 4),
                           "bytes_per_param": round(impl_bytes, 4),
                           "ms_min": 1e3 * t_min, "ms_median": 1e3 * t_med,
                           "ceiling_ms_min": 1e3 * c_min, "ceiling_ms_median": 1e3 * c_med,
                           "fraction_of_ceiling_min": c_min / t_min,
                           "fraction_of_ceiling_median": c_med / t_med,
                           # per round, back to back: robust to load that comes and goes on a shared machine
                           "fraction_of_ceiling_paired": statistics.median(
                               c * scale / t for c, t in zip(ctimes, impl.times)),
                           "ratio_fastopt_over_this_median": {
                               f.label: statistics.median(f.times) / t_med for f in fo_rows if f is not impl},
                           "ratio_fastopt_over_this_paired": {
                               f.label: statistics.median(a / b for a, b in zip(f.times, impl.times))
                               for f in fo_rows if f is not impl},
                           "load_average_1min_after_group": load[0]}
                    if impl.ceiling.endswith("int8"):
                        row["ceiling_note"] = "16-bit-state touch time scaled by bytes (touch takes float arrays only)"
                    rows.append(row)
                    if progress:
                        print(f"  {key}: {impl.label}: {row['ms_min']:.2f}/{row['ms_median']:.2f} ms, "
                              f"fraction {row['fraction_of_ceiling_median']:.2f}", flush=True)
                if progress:
                    print(f"  {key}: first {CHECK_STEPS} steps (compiles included) {first_steps_s:.1f} s", flush=True)
                del impls, ceilings
                gc.collect()
    finally:
        torch.set_num_threads(torch_threads)
        fastopt.set_num_threads(fo_threads)
    versions = {name: getattr(mod, "__version__", None) for name, mod in installed.items()}
    if "torchao" in installed:
        versions["torchao"] = importlib.import_module("torchao").__version__
    return {"rows": rows, "agreement": agreement, "unsupported": unsupported, "missing": missing,
            "library_versions": versions}


def markdown_table(result):
    """The README table of a result: per implementation (fastopt.torch and the libraries; the NumPy rows
    and the 8-bit groups' float32-state runs stay in the JSON), the state it keeps, the median ms per step
    and the paired fraction of its ceiling on both layouts, and how many times its step takes fastopt.torch's
    of the same mode and state width (paired medians; 'same mode' is the row its agreement was checked with)."""
    rows = [r for r in result["rows"] if not r["implementation"].startswith("fastopt adamw_step")
            and not (r["group"].startswith("int8") and r["mode"] == {})]
    names = {"bf16": "bf16 params", "sr": "bf16 + stochastic rounding", "int8-bf16": "8-bit state, bf16 params",
             "int8-fp32": "8-bit state, fp32 params"}
    layouts = sorted({r["layout"] for r in rows}, key=lambda x: x != "one tensor")
    tensors = {r["layout"]: r["tensors"] for r in rows}
    n = rows[0]["n"] if rows else 0
    head = " | ".join(f"{tensors[lay]} tensor{'s' if tensors[lay] > 1 else ''}: ms, fraction" for lay in layouts)
    out = [f"| case | implementation | state B/param | {head} | x fastopt's time |",
           "|---|---|---|" + "---|" * len(layouts) + "---|"]
    agreement = result["agreement"]
    keys = []
    for r in rows:
        if (r["group"], r["implementation"]) not in keys:
            keys.append((r["group"], r["implementation"]))
    for group, label in keys:
        cells, factors = [], []
        state = None
        for lay in layouts:
            match = [r for r in rows if r["group"] == group and r["implementation"] == label and r["layout"] == lay]
            if not match:
                cells.append("-")
                continue
            r = match[0]
            state = r["state_bytes_per_param"]
            cells.append(f"{r['ms_median']:.1f} ({r['fraction_of_ceiling_paired']:.2f})")
            ref = agreement.get(f"{group}, {lay}", {}).get(label, {}).get("compared_with")
            if ref:
                factors.append(f"{1 / r['ratio_fastopt_over_this_paired'][ref]:.1f}")
        out.append(f"| {names.get(group, group)} | {label} | {state:.2f} | " + " | ".join(cells) + " | "
                   + (" / ".join(factors) if factors else "-") + " |")
    for k, v in {**result.get("unsupported", {}), **result.get("missing", {})}.items():
        out.append(f"\n{k}: {v}")
    out.append(f"\nAdamW, n = {n:,} params in total, {result.get('threads')} threads (torch and fastopt), CPU "
               f"{result['machine'].get('cpu')}, load average {result['load_average_before'][0]:.1f} before and "
               f"{result['load_average_after'][0]:.1f} after; `{result.get('command')}`.")
    return "\n".join(out)


def _git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=float, default=1e7)
    ap.add_argument("--tensors", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "libraries-cpu.json"))
    ap.add_argument("--table", metavar="JSON", default=None,
                    help="print the markdown table of a recorded result and exit (runs nothing)")
    args = ap.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(markdown_table(json.load(f)))
        return 0
    import fastopt
    from fastopt.benchmark import machine_info
    load_before, t0 = os.getloadavg(), time.perf_counter()
    result = measure(args.n, args.tensors, args.threads, args.reps, args.warmup)
    result = {"benchmark": "fastopt vs torch / optimi / torchao / bitsandbytes, low-precision AdamW, CPU "
                           "(issue 13)",
              "command": " ".join(["python bench/bench_libraries.py", *(argv if argv is not None else sys.argv[1:])]),
              "threads": args.threads, "reps": args.reps, "warmup": args.warmup, "check_steps": CHECK_STEPS,
              "hyperparameters": {"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WD},
              "machine": machine_info(), "fastopt_file": fastopt.__file__, "git_commit": _git_commit(),
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "wall_s": round(time.perf_counter() - t0, 1),
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result}
    print(f"{'case':24s} {'implementation':52s} {'B/p':>6s} {'state':>6s} {'ms min/med':>15s} {'frac med/paired':>15s}")
    for r in result["rows"]:
        print(f"{r['group'] + ', ' + r['layout']:24s} {r['implementation']:52s} {r['bytes_per_param']:6.2f} "
              f"{r['state_bytes_per_param']:6.2f} {r['ms_min']:7.2f}/{r['ms_median']:7.2f} "
              f"{r['fraction_of_ceiling_median']:7.2f}/{r['fraction_of_ceiling_paired']:5.2f}")
    for k, v in {**result["unsupported"], **result["missing"]}.items():
        print(f"{k}: {v}")
    print(f"load average before {load_before}, after {result['load_average_after']}; {result['wall_s']} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
