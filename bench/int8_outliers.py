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
  fastopt        fastopt.precision.dynamic_map (unsigned code 0 = 0.0), nearest value (today)
  roundup        the proposal: fastopt's maps, the unsigned map's first midpoint 0.0 instead of 5e-8 (a
                 positive value never takes code 0: it reads 1e-7 x absmax at least; an exact 0 still reads 0)
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
against it), and fastopt itself runs with the proposal's tables (proposed_maps: precision._maps patched)
on both host backends, checked equal to the roundup model.

Run: .venv/bin/python bench/int8_outliers.py [--n 1048576] [--steps 5] [--json out.json]
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
    from fastopt.precision import dynamic_map
    s, u = dynamic_map(True), dynamic_map(False)
    nozero = u.copy()
    nozero[0] = u[1]
    deeper = u.copy()
    deeper[0] = np.float32(1e-8)
    _, roundup_mid = proposed_tables(False, "roundup")
    bs, bu = bnb_dynamic_map(True), bnb_dynamic_map(False)
    bnb_nozero = bu.copy()
    bnb_nozero[0] = bu[1]
    return {
        "fastopt": (Quantizer(s), Quantizer(u)),
        "roundup": (Quantizer(s), Quantizer(u, mid=roundup_mid)),
        "nozero": (Quantizer(s), Quantizer(nozero)),
        "nozero-1e-8": (Quantizer(s), Quantizer(deeper)),
        "bnb-cuda": (Quantizer(bs, "bnb-cuda"), Quantizer(bu)),
        "bnb-cuda-nozero": (Quantizer(bs, "bnb-cuda"), Quantizer(bnb_nozero)),
        "torchao": (Quantizer(bs), Quantizer(bu)),
        "bnb-cpu": (Quantizer(bs, "bnb-cpu"), Quantizer(bu, "bnb-cpu")),
    }


def proposed_tables(signed: bool, variant: str = "roundup") -> tuple:
    """(map values, midpoints) of the fix (docs/int8-quality.md, "Fix"); the signed map is unchanged.
    "roundup" (the proposal): the unsigned map's values unchanged, its first midpoint 0.0 instead of 5e-8,
    so a positive value never takes code 0 (it rounds up to 1e-7 at least) while an exact zero still does.
    "nozero" (Li et al.'s DE-0): the unsigned map's code 0 reads 1e-7 (a duplicate of code 1)."""
    from fastopt.precision import dynamic_map
    values = np.array(dynamic_map(signed), dtype=np.float32)
    if signed:
        return values, midpoints(values)
    if variant == "roundup":
        mid = midpoints(values)
        mid[0] = np.float32(0.0)
        return values, mid
    if variant == "nozero":
        values[0] = values[1]
        return values, midpoints(values)
    raise ValueError(f"Invalid variant: {variant!r} (roundup or nozero)")


@contextlib.contextmanager
def proposed_maps(variant: str = "roundup"):
    """Within the block, fastopt itself (reference and compiled CPU backend, which takes its tables from
    precision.py) quantizes with the tables of proposed_tables(variant): precision._maps replaced, the
    derived caches cleared before and after. For experiments only: the port belongs in precision.py."""
    from fastopt import precision
    from fastopt.backends import cython_backend
    original = precision._maps
    table = {s: proposed_tables(s, variant) for s in (False, True)}

    def patched(signed):
        values, mid = (a.copy() for a in table[bool(signed)])
        values.setflags(write=False)
        mid.setflags(write=False)
        return values, mid

    def reset():
        precision.quantizer_tables.cache_clear()
        cython_backend._MAPS = None

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
        fo = {b: fastopt_run(p0, grads, "int8", b) for b in host_backends()}
        qm, qv = candidates()["fastopt"]
        stats = {}
        model = model_run(p0, grads, qm, qv, stats)
        if check:  # the scratch model is fastopt's int8 step: same bits on both host backends
            for b, pb in fo.items():
                assert np.array_equal(pb.view(np.uint32), model.view(np.uint32)), f"model != fastopt ({b})"
        row["fastopt int8 (cython = numpy = model)"] = dict(distance(fo["numpy"], exact, steps),
                                                           v_read_zero_nonzero_m=stats["v_read_zero_nonzero_m"])
        for name, (qm, qv) in candidates().items():
            if name == "fastopt":
                continue
            stats = {}
            row[f"model {name}"] = dict(distance(model_run(p0, grads, qm, qv, stats), exact, steps),
                                        v_read_zero_nonzero_m=stats["v_read_zero_nonzero_m"])
        with proposed_maps("roundup"):
            fixed = {b: fastopt_run(p0, grads, "int8", b) for b in host_backends()}
        if check:
            qm, qv = candidates()["roundup"]
            model = model_run(p0, grads, qm, qv)
            for b, pb in fixed.items():
                assert np.array_equal(pb.view(np.uint32), model.view(np.uint32)), f"fix != roundup model ({b})"
        row["fastopt int8 with the fix (cython = numpy = roundup model)"] = distance(fixed["numpy"], exact, steps)
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2 ** 20)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default="heavy,lognormal,normal")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
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
