"""Outlier updates of 8-bit optimizer state (state_dtype="int8", issue 13): the repro and a scratch
model of the candidate fixes. docs/int8-quality.md has the analysis and the numbers this prints.

The repro: AdamW (lr 1e-3, weight_decay 1e-2) on 2^20 float32 params, a fresh heavy-tailed gradient each
step, g = N(0,1) * exp(2 N(0,1)), 5 steps; fastopt with state_dtype="int8" against the same run with float32
state. An "outlier" is a param that ended more than 5 lr (the distance Adam can move it in 5 steps) away.

The scratch model (`model_run`) is the int8 step written out: dequantize m and v with a map, run the
reference float32 AdamW update (fastopt.reference.adamw_step) on the dequantized arrays, requantize with a
quantizer (a map and a rounding rule), absmax per block of 256. With fastopt's maps and its nearest-value
rule it equals fastopt's int8 run bit for bit (checked first, on both host backends), so the other
candidates differ from fastopt only in the map or the rounding rule:
  fastopt        fastopt.precision's tables since the fix ("roundup"): the unsigned map's first midpoint 0.0
                 instead of 5e-8 (a positive value never takes code 0: it reads 1e-7 x absmax at least; an
                 exact 0 still reads 0)
  nearest        fastopt before the fix: the nearest map value, so a v below 5e-8 x absmax reads 0
  nozero         the unsigned map with code 0 = its smallest nonzero value 1e-7 (Li et al. 2023 "DE-0",
                 thu-ml/low-bit-optimizers lpmm/functional.py 'nonlinear-nozero': mapping[0] = mapping[1])
  nozero-1e-8    the unsigned map with code 0 = 1e-8 (one more decade instead of a duplicate code)
  bnb-cuda       bitsandbytes' create_dynamic_map (signed/unsigned), nearest value, zero code kept (what its
                 CUDA kernel and torchao do; the CUDA kernel's sign fix for m is applied too)
  torchao        bnb's maps, nearest value (torchao optim/quant_utils.py quantize_8bit_with_qmap)
  bnb-cpu        bitsandbytes 0.50's CPU quantizer: bnb's maps, each normalized value first put on a
                 65536-point grid over [-1, 1] (csrc/cpu_ops.cpp norm_to_lut_index / build_quantize_lut), so
                 every |x| / absmax below ~3e-5 goes to the code nearest 1.5e-5: no zero code in practice
Where bitsandbytes is importable, its own AdamW8bit runs on the CPU too (the bnb-cpu model is checked
against it), and fastopt itself runs with the tables before the fix too (proposed_maps("nearest"):
precision._maps patched) on both host backends, checked equal to the nearest model.

Run: .venv/bin/python bench/int8_outliers.py [--n 1048576] [--steps 5] [--json out.json]   (17 s)
     .venv/bin/python bench/int8_outliers.py --optimizers            every unsigned-map optimizer (10 s)
     .venv/bin/python bench/int8_outliers.py --seeds 150             AdamW over 150 seeds (30 s)
     .venv/bin/python bench/int8_outliers.py --seeds 60 --names Adam,NAdam,AdaBelief,Yogi
     .venv/bin/python bench/int8_outliers.py --trace                 the worst element of the repro
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import numpy as np

LR, WD = 1e-3, 1e-2
BLOCK = 256


# ---------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------

def make_grads(kind: str, n: int, steps: int, seed: int) -> list:
    """`steps` float32 gradients of n elements: "heavy" N(0,1) exp(2 N(0,1)) (the repro), "lognormal"
    1e-2 N(0,1) exp(N(0,1)) (bench_libraries.py's), "normal" N(0,1)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        base = rng.standard_normal(n)
        if kind == "heavy":
            g = base * np.exp(2.0 * rng.standard_normal(n))
        elif kind == "lognormal":
            g = 1e-2 * base * np.exp(rng.standard_normal(n))
        elif kind == "normal":
            g = base
        else:
            raise ValueError(f"Invalid kind: {kind!r} (heavy, lognormal or normal)")
        out.append(g.astype(np.float32))
    return out


# ---------------------------------------------------------------------------------------------------
# fastopt itself
# ---------------------------------------------------------------------------------------------------

def host_backends() -> tuple:
    """The host backends to run: the NumPy reference, and the compiled one where it is built."""
    from fastopt.backends import dispatch
    return ("numpy", "cython") if dispatch.cython_available() else ("numpy",)


def fastopt_run(p0, grads, state_dtype=None, backend=None):
    """Final params of fastopt.AdamW on a copy of p0 stepping through `grads`."""
    import fastopt
    p = p0.copy()
    opt = fastopt.AdamW([p], lr=LR, weight_decay=WD, state_dtype=state_dtype, backend=backend)
    for g in grads:
        opt.step([g])
    return p


# ---------------------------------------------------------------------------------------------------
# Maps and quantizers of the scratch model
# ---------------------------------------------------------------------------------------------------

def midpoints(values) -> np.ndarray:
    """fastopt's midpoints of a map (precision._maps: float64 mean rounded to float32)."""
    v = np.asarray(values, dtype=np.float32)
    return ((v[:-1].astype(np.float64) + v[1:]) / 2).astype(np.float32)


def bnb_dynamic_map(signed: bool) -> np.ndarray:
    """bitsandbytes' create_dynamic_map(signed, max_exponent_bits=7, total_bits=8) (functional.py; torchao's
    optim/quant_utils.py copies it): per decade 10^(i-6), i = 0..6, the means of linspace(0.1, 1, k + 1)
    (k = 2^i signed, 2^(i+1) unsigned), negated too when signed; plus 0 and 1.0 (computed with torch in
    float32, as bitsandbytes does: the same bits as its table)."""
    import torch  # torch's float32 linspace and products: the same bits as bitsandbytes' table
    data = []
    for i in range(7):
        k = 2 ** i if signed else 2 ** (i + 1)
        b = torch.linspace(0.1, 1, k + 1, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist()
        if signed:
            data += (-(10 ** (i - 6)) * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    return np.sort(np.array(data, dtype=np.float32))


class Quantizer:
    """A map (256 float32 values, ascending) and a rounding rule: "nearest" (fastopt: the number of
    midpoints below x, ties down), "bnb-cpu" (bitsandbytes' CPU LUT: x first on a 65536-point grid over
    [-1, 1]) or "bnb-cuda" (nearest, then a code whose sign differs from m's moves one toward it)."""

    def __init__(self, values, rule="nearest", mid=None):
        self.values = np.asarray(values, dtype=np.float32)
        assert self.values.shape == (256,) and np.all(np.diff(self.values) >= 0)
        self.mid = midpoints(self.values) if mid is None else np.asarray(mid, dtype=np.float32)
        self.rule = rule
        if rule == "bnb-cpu":  # csrc/cpu_ops.cpp build_quantize_lut: code of each grid point
            grid = (np.float32(-1.0) + (np.float32(2.0) * np.arange(65536, dtype=np.float32)) / np.float32(65535))
            mids = (np.float32(0.5) * (self.values[:-1] + self.values[1:])).astype(np.float32)
            self.lut = np.searchsorted(mids, grid, side="left").astype(np.uint8)

    def codes(self, normalized):
        x = np.asarray(normalized, dtype=np.float32)
        if self.rule == "bnb-cpu":  # norm_to_lut_index: (clamp(x) + 1) * 0.5 * 65535 + 0.5, truncated
            idx = ((np.clip(x, -1, 1) + np.float32(1.0)) * np.float32(0.5) * np.float32(65535) + np.float32(0.5))
            return self.lut[idx.astype(np.uint16)]
        c = np.searchsorted(self.mid, x, side="left")
        if self.rule == "bnb-cuda":  # kernels.cu: keep m's sign (a negative m never reads as 0 or +)
            wrong = np.signbit(self.values[c]) != np.signbit(x)
            c = np.where(wrong, c + np.where(x > 0, 1, -1), c)
        return c.astype(np.uint8)


def quantize(x, q: Quantizer):
    """(codes, absmax) of float32 x, blocks of 256 (fastopt's scale rule: an all-zero block scales by 1)."""
    nb = -(-x.size // BLOCK)
    pad = np.zeros(nb * BLOCK, np.float32)
    pad[:x.size] = x
    blocks = pad.reshape(nb, BLOCK)
    absmax = np.abs(blocks).max(axis=1).astype(np.float32)
    scale = np.where(absmax > 0, absmax, np.float32(1.0)).astype(np.float32)
    return q.codes(blocks / scale[:, None]).reshape(-1)[:x.size], absmax


def dequantize(codes, absmax, q: Quantizer):
    return q.values[codes] * np.repeat(absmax, BLOCK)[:codes.size]


def model_run(p0, grads, qm: Quantizer, qv: Quantizer, stats=None):
    """Final params of the scratch int8 AdamW: dequantize, reference float32 update, requantize."""
    from fastopt.reference import adamw_step
    p = p0.copy()
    n = p.size
    cm, am = np.zeros(n, np.uint8), np.zeros(-(-n // BLOCK), np.float32)
    cv, av = cm.copy(), am.copy()
    for t, g in enumerate(grads, start=1):
        m, v = dequantize(cm, am, qm), dequantize(cv, av, qv)
        if stats is not None:
            stats.setdefault("v_read_zero_nonzero_m", []).append(int(np.count_nonzero((v == 0) & (m != 0))))
        adamw_step(p, g, m, v, step=t, lr=LR, weight_decay=WD)
        cm, am = quantize(m, qm)
        cv, av = quantize(v, qv)
    return p


def candidates() -> dict:
    """name -> (quantizer of m, quantizer of v)."""
    from fastopt.precision import dynamic_map, dynamic_midpoints
    s, u = dynamic_map(True), dynamic_map(False)
    nozero = u.copy()
    nozero[0] = u[1]
    deeper = u.copy()
    deeper[0] = np.float32(1e-8)
    bs, bu = bnb_dynamic_map(True), bnb_dynamic_map(False)
    bnb_nozero = bu.copy()
    bnb_nozero[0] = bu[1]
    return {
        "fastopt": (Quantizer(s), Quantizer(u, mid=dynamic_midpoints(False))),  # roundup, since the fix
        "nearest": (Quantizer(s), Quantizer(u)),  # fastopt before the fix: the zero code for tiny v
        "nozero": (Quantizer(s), Quantizer(nozero)),
        "nozero-1e-8": (Quantizer(s), Quantizer(deeper)),
        "bnb-cuda": (Quantizer(bs, "bnb-cuda"), Quantizer(bu)),
        "bnb-cuda-nozero": (Quantizer(bs, "bnb-cuda"), Quantizer(bnb_nozero)),
        "torchao": (Quantizer(bs), Quantizer(bu)),
        "bnb-cpu": (Quantizer(bs, "bnb-cpu"), Quantizer(bu, "bnb-cpu")),
    }


def proposed_tables(signed: bool, variant: str = "roundup") -> tuple:
    """(map values, midpoints) of a variant (docs/int8-quality.md §5); the signed map is unchanged.
    "roundup" (the fix, fastopt's tables since it landed): the unsigned map's values unchanged, its first
    midpoint 0.0 instead of 5e-8, so a positive value never takes code 0 (it rounds up to 1e-7 at least) while
    an exact zero still does. "nearest": fastopt's tables before the fix (every midpoint). "nozero" (Li et al.'s
    DE-0): the unsigned map's code 0 reads 1e-7 (a duplicate of code 1)."""
    from fastopt.precision import dynamic_map
    values = np.array(dynamic_map(signed), dtype=np.float32)
    if signed:
        return values, midpoints(values)
    if variant == "roundup":
        mid = midpoints(values)
        mid[0] = np.float32(0.0)
        return values, mid
    if variant == "nearest":
        return values, midpoints(values)
    if variant == "nozero":
        values[0] = values[1]
        return values, midpoints(values)
    raise ValueError(f"Invalid variant: {variant!r} (roundup, nearest or nozero)")


@contextlib.contextmanager
def proposed_maps(variant: str = "roundup"):
    """Within the block, fastopt itself (reference and compiled CPU backend, which takes its tables from
    precision.py) quantizes with the tables of proposed_tables(variant): precision._maps replaced, the
    derived caches cleared before and after. For experiments only ("nearest": fastopt before the fix)."""
    from fastopt import precision
    original = precision._maps
    table = {s: proposed_tables(s, variant) for s in (False, True)}

    def patched(signed):
        values, mid = (a.copy() for a in table[bool(signed)])
        values.setflags(write=False)
        mid.setflags(write=False)
        return values, mid

    def reset():  # every table derived from the maps (the compiled backend reads quantizer_arrays())
        precision.quantizer_tables.cache_clear()
        precision.quantizer_arrays.cache_clear()

    precision._maps = patched
    reset()
    try:
        yield
    finally:
        precision._maps = original
        reset()


# ---------------------------------------------------------------------------------------------------
# bitsandbytes itself (CPU), where installed
# ---------------------------------------------------------------------------------------------------

def bnb_run(p0, grads):
    """Final params of bitsandbytes.optim.AdamW8bit on the CPU, or None without bitsandbytes."""
    try:
        import io
        import contextlib
        import torch
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import bitsandbytes as bnb
    except Exception:
        return None
    p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = bnb.optim.AdamW8bit([p], lr=LR, weight_decay=WD, min_8bit_size=1)
    for g in grads:
        p.grad = torch.from_numpy(g.copy())
        opt.step()
    return p.detach().numpy().copy()


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------

def distance(p, exact, steps) -> dict:
    d = np.abs(p.astype(np.float64) - exact) / LR
    return {"outliers": int(np.count_nonzero(d > steps)), "worst_lr": round(float(d.max()), 3),
            "mean_lr": float(f"{d.mean():.4g}"), "q999_lr": float(f"{np.quantile(d, 0.999):.4g}")}


def measure(n=2 ** 20, steps=5, seed=0, kinds=("heavy", "lognormal", "normal"), check=True) -> dict:
    out = {}
    rng = np.random.default_rng(seed + 1)
    p0 = rng.standard_normal(n).astype(np.float32)
    for kind in kinds:
        grads = make_grads(kind, n, steps, seed)
        exact = fastopt_run(p0, grads)
        row = {}
        t0 = time.perf_counter()
        for label, variant, name in (("fastopt int8 (cython = numpy = model)", None, "fastopt"),
                                     ("fastopt int8 before the fix (cython = numpy = model)", "nearest", "nearest")):
            with (proposed_maps(variant) if variant else contextlib.nullcontext()):
                fo = {b: fastopt_run(p0, grads, "int8", b) for b in host_backends()}
            qm, qv = candidates()[name]
            stats = {}
            model = model_run(p0, grads, qm, qv, stats)
            if check:  # the scratch model is fastopt's int8 step: same bits on both host backends
                for b, pb in fo.items():
                    assert np.array_equal(pb.view(np.uint32), model.view(np.uint32)), f"model != fastopt ({b}, {name})"
            row[label] = dict(distance(fo["numpy"], exact, steps), v_read_zero_nonzero_m=stats["v_read_zero_nonzero_m"])
        for name, (qm, qv) in candidates().items():
            if name in ("fastopt", "nearest"):
                continue
            stats = {}
            row[f"model {name}"] = dict(distance(model_run(p0, grads, qm, qv, stats), exact, steps),
                                        v_read_zero_nonzero_m=stats["v_read_zero_nonzero_m"])
        pb = bnb_run(p0, grads)
        if pb is not None:
            row["bitsandbytes AdamW8bit (CPU)"] = distance(pb, exact, steps)
            qm, qv = candidates()["bnb-cpu"]
            mb = model_run(p0, grads, qm, qv)
            row["bitsandbytes AdamW8bit (CPU)"]["model bnb-cpu max |diff| / lr"] = float(
                f"{np.abs(mb.astype(np.float64) - pb).max() / LR:.3g}")
        row["seconds"] = round(time.perf_counter() - t0, 1)
        out[kind] = row
    return out


# Unsigned-map optimizers (and two without one) against float32 state: the per-optimizer table
SWEEP = [("Adam", {}), ("Adam", {"amsgrad": True}), ("AdamW", {}), ("NAdam", {}), ("RAdam", {}), ("AdaBelief", {}),
         ("Adamax", {}), ("Yogi", {}), ("Adagrad", {}), ("RMSprop", {}), ("Adadelta", {}), ("Rprop", {}),
         ("Lion", {}), ("SGD", {"momentum": 0.9})]


def _class_run(cls, p0, grads, state_dtype, backend, **options):
    p = p0.copy()
    opt = cls([p], state_dtype=state_dtype, backend=backend, **options)
    for g in grads:
        opt.step([g])
    return p


def optimizer_sweep(n=2 ** 16 + 37, steps=5, seed=3, kinds=("heavy", "normal")) -> list:
    """Each SWEEP optimizer (its default lr) with int8 state, before and with the fix, against float32
    state: how many params end further from the float32 run than that run's largest move, and the worst
    distance (absolute)."""
    import fastopt
    p0 = np.random.default_rng(7).standard_normal(n).astype(np.float32)
    rows = []
    for kind in kinds:
        grads = make_grads(kind, n, steps, seed)
        for name, options in SWEEP:
            cls = getattr(fastopt, name)
            backend = host_backends()[-1]
            exact = _class_run(cls, p0, grads, None, backend, **options)
            with proposed_maps("nearest"):
                today = _class_run(cls, p0, grads, "int8", backend, **options)
            fixed = {b: _class_run(cls, p0, grads, "int8", b, **options) for b in host_backends()}
            assert len({v.tobytes() for v in fixed.values()}) == 1, "the fix differs between host backends"
            move = float(np.abs(exact - p0).max())
            d0, d1 = np.abs(today - exact), np.abs(fixed[backend] - exact)
            rows.append({"grads": kind, "optimizer": name, "options": options, "largest_float32_move": move,
                         "before_fix": {"beyond": int(np.count_nonzero(d0 > move)), "worst": float(d0.max())},
                         "fix": {"beyond": int(np.count_nonzero(d1 > move)), "worst": float(d1.max())}})
    return rows


def seed_sweep(seeds=150, n=2 ** 16 + 37, steps=5, names=("AdamW",), first=1000) -> dict:
    """Over `seeds` fresh draws of params and heavy grads (AdamW by default, lr 1e-3): the count before the fix of
    params beyond 2 x steps x lr of the float32 run (min, median) and the fix's worst distance in lr
    (max, median): what tests/test_int8_quality.py's bound rests on."""
    import fastopt
    out = {name: ([], []) for name in names}
    backend = host_backends()[-1]
    for seed in range(first, first + seeds):
        rng = np.random.default_rng(seed)
        p0 = rng.standard_normal(n).astype(np.float32)
        grads = [(rng.standard_normal(n) * np.exp(2 * rng.standard_normal(n))).astype(np.float32) for _ in range(steps)]
        for name in names:
            options = {"amsgrad": True} if name == "Adam" else {}
            cls = getattr(fastopt, name)
            exact = _class_run(cls, p0, grads, None, backend, lr=LR, **options)
            with proposed_maps("nearest"):
                today = _class_run(cls, p0, grads, "int8", backend, lr=LR, **options)
            fixed = _class_run(cls, p0, grads, "int8", backend, lr=LR, **options)
            out[name][0].append(int(np.count_nonzero(np.abs(today - exact) > 2 * steps * LR)))
            out[name][1].append(float(np.abs(fixed - exact).max() / LR))
    return {name: {"before_fix_beyond_2x_min": min(t), "before_fix_beyond_2x_median": float(np.median(t)),
                   "fix_worst_lr_max": round(max(f), 3), "fix_worst_lr_median": round(float(np.median(f)), 3)}
            for name, (t, f) in out.items()}


def trace(n=2 ** 20, steps=5, seed=0) -> list:
    """The worst element of the repro (AdamW, heavy grads, the tables before the fix): per step its gradient, the
    block's largest |g|, the m and v the int8 step reads and the float32 state holds, and the param's
    total move both ways."""
    from fastopt.reference import adamw_step
    p0 = np.random.default_rng(seed + 1).standard_normal(n).astype(np.float32)
    grads = make_grads("heavy", n, steps, seed)
    qm, qv = candidates()["nearest"]
    exact = fastopt_run(p0, grads)
    i = int(np.argmax(np.abs(model_run(p0, grads, qm, qv) - exact)))
    b = slice(i // BLOCK * BLOCK, (i // BLOCK + 1) * BLOCK)
    p, pf = p0.copy(), p0.copy()
    m32, v32 = np.zeros(n, np.float32), np.zeros(n, np.float32)
    cm, am = np.zeros(n, np.uint8), np.zeros(-(-n // BLOCK), np.float32)
    cv, av = cm.copy(), am.copy()
    rows = []
    for t, g in enumerate(grads, start=1):
        m, v = dequantize(cm, am, qm), dequantize(cv, av, qv)
        row = {"step": t, "element": i, "g": float(g[i]), "block_max_abs_g": float(np.abs(g[b]).max()),
               "int8_reads_m": float(m[i]), "int8_reads_v": float(v[i]), "v_absmax": float(av[i // BLOCK]),
               "float32_m": float(m32[i]), "float32_v": float(v32[i])}
        adamw_step(p, g, m, v, step=t, lr=LR, weight_decay=WD)
        adamw_step(pf, g, m32, v32, step=t, lr=LR, weight_decay=WD)
        row.update(int8_moved=float(p[i] - p0[i]), float32_moved=float(pf[i] - p0[i]))
        rows.append(row)
        cm, am = quantize(m, qm)
        cv, av = quantize(v, qv)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2 ** 20)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default="heavy,lognormal,normal")
    ap.add_argument("--json", default=None)
    ap.add_argument("--optimizers", action="store_true", help="the per-optimizer sweep (2^16 + 37 params)")
    ap.add_argument("--seeds", type=int, default=0, help="the seed sweep over this many seeds (2^16 + 37 params)")
    ap.add_argument("--names", default="AdamW", help="optimizer classes of the seed sweep (Adam: AMSGrad)")
    ap.add_argument("--trace", action="store_true", help="the worst element of the repro, step by step")
    a = ap.parse_args(argv)
    if a.optimizers:
        res = {"optimizer_sweep": optimizer_sweep()}
    elif a.seeds:
        res = {"seed_sweep": seed_sweep(a.seeds, names=tuple(a.names.split(",")))}
    elif a.trace:
        res = {"trace": trace(a.n, a.steps, a.seed)}
    else:
        res = measure(a.n, a.steps, a.seed, tuple(a.kinds.split(",")))
        res = {"n": a.n, "steps": a.steps, "seed": a.seed, "lr": LR, "weight_decay": WD,
               "outlier": f"|p - p(float32 state)| > {a.steps} lr", "results": res}
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
