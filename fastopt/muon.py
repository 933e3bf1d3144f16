"""Muon (torch.optim.Muon) for NumPy and CuPy arrays: momentum orthogonalized by a Newton-Schulz iteration.

    opt = fastopt.Muon(weight_matrices, lr=0.02, momentum=0.95)   # 2-D params only, like torch
    for batch in data:
        opt.step(grads)        # a list of arrays in the order of opt.params (None: no gradient, skipped)

Update rule, per 2-D param p (m x n) with gradient g and momentum buffer B (torch.optim.Muon, torch 2.13):

    B = lerp(B, g, 1 - momentum)                      (= momentum * B + (1 - momentum) * g)
    U = lerp(g, B, momentum) if nesterov else B
    X = bfloat16(U), as U^T when m > n (then X is n x m);  X = bfloat16(X / max(bfloat16(||X||_F), eps))
    ns_steps times:  G = bf16(X X^T);  V = bf16(b G + c G G);  X = bf16(a X + V X)    ((a, b, c) = ns_coefficients)
    p *= 1 - lr * weight_decay                        (decoupled weight decay, skipped when it is 1)
    p -= lr * s * X (transposed back),  s = sqrt(max(1, m / n))   (adjust_lr_fn None or "original")
                                        s = 0.2 * sqrt(max(m, n)) ("match_rms_adamw")
                                        s = sqrt(m / n)           ("spectral_unclamped", torch 2.15)

Precision, as torch computes it on the CPU. torch runs the Newton-Schulz iteration in bfloat16 whatever the
param's dtype (`grad.bfloat16()`), with float32 sums inside each matmul and one rounding to bfloat16 per
matrix op. Here each matrix holds bfloat16 values in float32 storage: the products of two bfloat16 numbers
are exact in float32, the sums are float32 (the array module's own sgemm: BLAS / cuBLAS) and every result is
rounded to bfloat16 (round to nearest even, on the bits) where torch rounds. The output equals torch's bit for
bit except where a float32 sum lands within its rounding error of a bfloat16 tie, when the two libraries'
summation orders round it apart (about 1 in 10^4 elements of a 768-wide gram matrix; rarer the shorter the
sums); the iteration then carries that one-ulp difference on, so updates agree to a few bfloat16 ulps. A
float64 param is rounded to bfloat16 through float32, as torch's conversion does. The momentum buffer and
the param update stay in the param's dtype. For float32 they are torch's fused multiply-adds (torch's lerp and
add(alpha=) are FMAs), formed here in float64, exact but for the final rounding: float32 momentum buffers equal
torch's bit for bit. A tall matrix (m > n) is not transposed as torch does: X stays in the param's
orientation and the matmuls take transposed operands (X^T X, X V^T: the same products), so no matrix is
ever copied across.

Cost model. Per matrix (r = min(m, n), c = max(m, n)) and step: ns_steps * (2 r^2 c + 2 r^3 + 2 r^2 c)
flops, i.e. 2 * ns_steps * (3 matmuls: X X^T, G G, V X) multiply-adds (NumPy computes X X^T with syrk, half
of that), which dominate; plus elementwise passes over memory: per iteration 7 over the m x n iterate (the
bfloat16 rounding is 5 integer passes, a X and the sum 2; the r x r ones are smaller), and per step about 20
over the param (the two lerps, 3 each, and the update, 2 or 3, with float64 temporaries in cache-sized blocks;
the NaN mask, the norm, the division and two roundings of the input). bench/bench_muon.py measures the step
against its matmuls alone on GPT-2 shapes (768 x 768, 768 x 3072, 3072 x 768): 1.13-1.16x on one core,
1.18-1.22x on two (bench/results/muon-cpu.json). torch.optim.Muon's step is ~1.8x faster on that CPU: its
bfloat16 matmuls run on avx512_bf16 at about twice float32 BLAS's rate, a floor this NumPy code cannot go
below. Work arrays are allocated once per (shape, dtype) and reused; the state is one buffer per param.

16-bit params (float16; bfloat16 as ml_dtypes' bfloat16 on the CPU: CuPy has no bfloat16) keep their
buffer in their own dtype, as torch; the lerps and the update are torch's float32 math (the same FMAs)
rounded to 16 bits, the nesterov term rounded to the param's dtype before the conversion to bfloat16.

Differences from torch.optim.Muon, on purpose: every check runs before the first write (torch raises
ns_steps >= 100 or a bad coefficient tuple from inside step(), after updating earlier params), and those
two are checked at construction too; ns_steps must be an int in [0, 100) and eps finite; a size-0 param is
left alone (torch divides by zero in the lr adjustment for an m x 0 param). torch 2.13 with a bfloat16 param
and nesterov=False normalises the momentum buffer itself in place (`.bfloat16()` of a bfloat16 tensor is
the tensor, then `div_`; fixed upstream in pytorch/pytorch#194664): here the buffer is never written by the
iteration. torch's bfloat16 add(alpha=) is matched (alpha rounded to bfloat16, one float32 FMA) except in
the elements its loop leaves to a scalar tail (the last < 64 in memory), which now and then round one ulp
apart.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from fastopt.arrays import array_device, array_module, as_numpy, check_disjoint, no_self_overlap, to_host
from fastopt.blas import one_blas_thread, steady_blas_count
from fastopt.grad_guard import GuardedSteps, scaled
from fastopt.optim import as_param_groups
from fastopt.precision import is_bfloat16
from fastopt.specs import COMPOSITE, as_bool, as_float, groups_repr, shown

__all__ = ["Muon", "check_hyperparameters", "adjusted_lr", "muon_update", "Workspace", "ADJUST_LR_FNS"]

SPEC = COMPOSITE["muon"]
_HYPERS = {h.name: h for h in SPEC.hypers}
HYPER_KEYS = tuple(h.name for h in SPEC.hypers)
ADJUST_LR_FNS = (None, "original", "match_rms_adamw", "spectral_unclamped")
MAX_NS_STEPS = 100  # torch: "Number of steps must be less than 100"


def _nonneg(name, value):
    """lr / weight_decay / momentum: a finite real >= 0, with torch's message for a negative value."""
    h = _HYPERS[name]
    v = as_float(name, value, h.label)
    if math.isnan(v) or v < 0.0:
        raise ValueError(f"{h.label} should be >= 0 but is: {shown(value)}")  # torch's words
    if not math.isfinite(v):
        raise ValueError(f"Invalid {name}: {v} (must be finite)")
    return v


def _coefficients(value):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or not hasattr(value, "__iter__"):
        raise TypeError(f"ns_coefficients must be a tuple of three numbers (a, b, c), got {shown(value)}")
    if len(value) != 3:
        raise ValueError(f"Coefficients must be a tuple of exactly 3 values (ns_coefficients: {shown(value)})")
    out = []
    for i, x in enumerate(value):
        x = as_float(f"ns_coefficients[{i}]", x)
        if not math.isfinite(x):
            raise ValueError(f"Invalid ns_coefficients[{i}]: {x} (must be finite)")
        out.append(x)
    return tuple(out)


def _ns_steps(value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"ns_steps must be an int, got {shown(value)} ({type(value).__name__})")
    v = int(value)
    if v >= MAX_NS_STEPS:
        raise ValueError(f"Number of steps must be less than 100 for computational efficiency (ns_steps: {v})")
    if v < 0:
        raise ValueError(f"Invalid ns_steps: {v} (must be >= 0)")
    return v


def check_hyperparameters(group) -> dict:
    """The group's hyperparameters (torch's names) checked and as plain Python values: lr, weight_decay,
    momentum (finite, >= 0; torch's words for a negative one), nesterov (bool), ns_coefficients (three
    finite numbers), eps (finite), ns_steps (int in [0, 100)), adjust_lr_fn (None, "original",
    "match_rms_adamw", "spectral_unclamped"). TypeError / ValueError naming the argument and its value; checks
    in torch's order."""
    missing = [k for k in HYPER_KEYS if k not in group]
    if missing:
        raise KeyError(f"param group has no {missing[0]!r}")
    lr = group["lr"]
    if hasattr(lr, "numel") and hasattr(lr, "item"):  # a 1-element torch tensor lr (torch.optim takes it)
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr = lr.item()
    out = {"lr": _nonneg("lr", lr), "momentum": _nonneg("momentum", group["momentum"]),
           "weight_decay": _nonneg("weight_decay", group["weight_decay"])}
    fn = group["adjust_lr_fn"]
    if fn is not None and (not isinstance(fn, str) or fn not in ADJUST_LR_FNS):
        raise ValueError(f"Adjust learning rate function {fn} is not supported")
    out["adjust_lr_fn"] = fn
    out["nesterov"] = as_bool("nesterov", group["nesterov"])
    out["ns_coefficients"] = _coefficients(group["ns_coefficients"])
    eps = as_float("eps", group["eps"], "epsilon")
    if not math.isfinite(eps):
        raise ValueError(f"Invalid eps: {eps} (must be finite)")
    out["eps"] = eps
    out["ns_steps"] = _ns_steps(group["ns_steps"])
    return out


def adjusted_lr(lr: float, adjust_lr_fn, shape) -> float:
    """torch's _adjust_lr (A, B = shape[:2]: rows, i.e. fan-out, and cols, fan-in): lr * sqrt(max(1, A / B))
    (None, "original"), lr * 0.2 * sqrt(max(A, B)) ("match_rms_adamw") or lr * sqrt(A / B) ("spectral_unclamped",
    torch 2.15: Bernstein's scaling, no clamp at 1, so a wide matrix gets a factor below 1). Accepted on every
    torch version (torch < 2.15 has no "spectral_unclamped")."""
    return lr * lr_ratio(adjust_lr_fn, shape)


def lr_ratio(adjust_lr_fn, shape) -> float:
    """The factor adjusted_lr multiplies the lr by (torch's adjusted_ratio)."""
    a, b = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, a / b))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(a, b))
    if adjust_lr_fn == "spectral_unclamped":
        return math.sqrt(a / b)
    return 1.0


# ---- the numerics ------------------------------------------------------------------------------------

class Workspace:
    """Work arrays of the update, one set per (shape, dtype, array module), kept between steps (allocating
    ~10 matrices per param per step would cost page faults and, on the GPU, allocator traffic)."""

    def __init__(self):
        self._sets = {}

    def get(self, xp, shape, dtype):
        key = (xp.__name__, tuple(shape), np.dtype(dtype).str)
        w = self._sets.get(key)
        if w is None:
            m, n = shape
            r = min(m, n)
            w = {"D": xp.empty(_work_size(xp, m, n), xp.float64),  # float64 blocks: FMA emulation, update
                 "X": xp.empty((m, n), xp.float32), "Y": xp.empty((m, n), xp.float32),
                 "G": xp.empty((r, r), xp.float32), "V": xp.empty((r, r), xp.float32),
                 "T": xp.empty((r, r), xp.float32),
                 "bits": xp.empty(m * n, xp.uint32), "nan": xp.empty((m, n), bool)}
            if _is16(np.dtype(dtype)):  # float32 blocks of the 16-bit lerps/update, the 16-bit nesterov term
                w["F"] = xp.empty(_work_size(xp, m, n), xp.float32)
                w["H"] = xp.empty((m, n), dtype)
            # each iterate's bits and its scratch for _round_bits, made once (not per rounding: 19 per step)
            w["bits_of"] = {id(w[k]): (w[k].reshape(-1).view(xp.uint32), w["bits"][:w[k].size])
                            for k in ("X", "Y", "G", "V")}
            self._sets[key] = w
        return w

    def clear(self):
        self._sets.clear()

    def __getstate__(self):  # pickling, deepcopy: scratch only (and keyed by id), made again on use
        return {"_sets": {}}


def _round_bf16(x, bits):
    """x (a C-contiguous float32 array) rounded in place to bfloat16 values, round to nearest even, as torch's
    float -> bfloat16 conversion (Inf stays Inf, overflow rounds to Inf). NaN payloads with the low 15 bits
    all set would carry into Inf or -0: muon_update puts the input's NaNs back after its first rounding; inside
    the iteration NaNs are the FPU's canonical ones, which round to NaN."""
    xp = array_module(x)
    u = x.reshape(-1).view(xp.uint32)
    _round_bits(xp, u, bits[:u.size])
    return x


_SIXTEEN, _ONE, _HALF_MINUS, _HIGH = np.uint32(16), np.uint32(1), np.uint32(0x7FFF), np.uint32(0xFFFF0000)


def _round_bits(xp, u, t):
    """_round_bf16 on the bits u (uint32) of a float32 array, t the scratch of u's size."""
    xp.right_shift(u, _SIXTEEN, out=t)
    xp.bitwise_and(t, _ONE, out=t)
    xp.add(u, t, out=u)
    xp.add(u, _HALF_MINUS, out=u)
    xp.bitwise_and(u, _HIGH, out=u)


# float64 work per block on the CPU: 32768 elements (256 KiB) stay in the L2 cache between the passes of a
# block, so the float64 temporaries of the FMA emulation cost cache traffic, not memory traffic (a lerp of a
# 768 x 3072 matrix: 7 ms in one sweep, ~2.5 ms in blocks). One block on the GPU (one launch per pass).
_BLOCK = 1 << 15


def _row_blocks(xp, m, n):
    """Row ranges of an m x n matrix with about _BLOCK elements each (one range on the GPU)."""
    rows = m if xp is not np else max(1, _BLOCK // max(n, 1))
    for r0 in range(0, m, rows):
        yield r0, min(m, r0 + rows)


def _work_size(xp, m, n) -> int:
    return m * n if xp is not np else min(m * n, max(n, (_BLOCK // max(n, 1)) * n))


_BF16: dict = {}  # dtype -> is_bfloat16(dtype): its name lookup costs ~10 us, several times per step


def _is_bf16(dtype) -> bool:
    hit = _BF16.get(dtype)
    if hit is None:
        hit = _BF16[dtype] = is_bfloat16(dtype)
    return hit


def _is16(dtype) -> bool:
    """float16 or bfloat16 (ml_dtypes): torch computes their lerp and add in float32 and rounds the result."""
    return dtype == np.float16 or _is_bf16(dtype)


def _lerp_into(out, start, end, weight, D, F=None):
    """out = torch.lerp(start, end, weight) (out may be start): start + w (end - start) when |w| < 0.5,
    else end + (w - 1)(end - start), torch's branches. float32 and 16-bit: w in float32 and one float32 FMA
    as torch (product and sum in float64, exact but for the rounding to float32, which the store into out, or
    into F for 16-bit data, makes; 16-bit data then rounded once more, into out, as torch's float32 math
    stored to 16 bits); float64: two roundings (NumPy has no FMA). 2-D arrays of one shape; D (float64) and
    F (float32, for 16-bit data) the work blocks (_work_size). out may be float32 for float64 inputs."""
    xp = array_module(D)
    sixteen = _is16(start.dtype)
    if start.dtype == np.float32 or sixteen:
        w = np.float32(weight)               # torch's scalar weight, in the tensor's math type
        small = bool(abs(w) < 0.5)
        coef = float(w) if small else float(w - np.float32(1.0))
        diff_dtype = np.float32                # end - start rounded to float32, as torch
    else:
        small = abs(weight) < 0.5
        coef = weight if small else weight - 1.0
        diff_dtype = np.float64
    base = start if small else end
    m, n = out.shape
    for r0, r1 in _row_blocks(xp, m, n):
        d = D[:(r1 - r0) * n].reshape(r1 - r0, n)
        xp.subtract(end[r0:r1], start[r0:r1], out=d, dtype=diff_dtype)
        xp.multiply(d, coef, out=d)
        if sixteen:
            f = F[:(r1 - r0) * n].reshape(r1 - r0, n)
            xp.add(d, base[r0:r1], out=f, dtype=np.float64)           # the FMA, rounded to float32
            xp.copyto(out[r0:r1], f, casting="unsafe")                # then to the 16-bit out
        else:
            xp.add(d, base[r0:r1], out=out[r0:r1], dtype=np.float64)  # the sum in float64, rounded once into out


def _apply_update(param, update, decay, alpha, D, F=None):
    """param = param * decay + alpha * update, as torch's param.mul_(decay).add_(update, alpha=alpha): the
    multiplication rounded to the param's dtype, then one FMA for float32 and 16-bit params (float64 product
    and sum, exact but for the rounding to float32; 16-bit params then rounded to their dtype, F the float32
    block) or two roundings for float64. decay == 1 skips the multiplication (exact anyway)."""
    xp = array_module(D)
    m, n = param.shape
    sixteen = _is16(param.dtype)
    if param.dtype == np.float32 or sixteen:
        decay, alpha = np.float32(decay), float(np.float32(alpha))  # torch's scalars in float32 math
    if _is_bf16(param.dtype):
        # bfloat16 + bfloat16 with alpha: torch casts alpha to the tensors' dtype first (float16 + bfloat16
        # promotes to float32, which keeps alpha in float32)
        alpha = float(np.asarray(np.float32(alpha)).astype(param.dtype).astype(np.float32))
    for r0, r1 in _row_blocks(xp, m, n):
        d = D[:(r1 - r0) * n].reshape(r1 - r0, n)
        p = param[r0:r1]
        if sixteen:
            f = F[:(r1 - r0) * n].reshape(r1 - r0, n)
            if decay != 1.0:
                xp.multiply(p, decay, out=f, dtype=np.float32)
                xp.copyto(p, f, casting="unsafe")
            xp.multiply(update[r0:r1], alpha, out=d, dtype=np.float64)
            xp.add(d, p, out=f, dtype=np.float64)
            xp.copyto(p, f, casting="unsafe")
            continue
        if decay != 1.0:
            xp.multiply(p, decay, out=p)
        xp.multiply(update[r0:r1], alpha, out=d, dtype=np.float64)
        xp.add(d, p, out=p, dtype=np.float64)


def _newton_schulz(w, coefficients, ns_steps, eps):
    """torch's _zeropower_via_newtonschulz on w["X"] (bfloat16 values already), in place; returns the array
    holding the result (X or Y). torch transposes a tall matrix (m > n) so that the gram matrix is the small
    one; here X stays in the param's orientation and the matmuls take the transposes instead (BLAS reads a
    transposed operand in place), so no matrix is ever copied across: with Z = X^T (torch's iterate),
    Z Z^T = X^T X and V Z = (X V^T)^T, the same products summed."""
    xp = array_module(w["X"])
    X, Y, G, V, T, bits = w["X"], w["Y"], w["G"], w["V"], w["T"], w["bits"]
    bits_of = w["bits_of"]  # id(matrix) -> (its bits, scratch)
    tall = X.shape[0] > X.shape[1]
    a, b, c = (np.float32(v) for v in coefficients)
    # X /= max(||X||, eps), each in bfloat16 (torch: norm() of a bfloat16 tensor is a bfloat16 0-d tensor)
    flat = X.reshape(-1)
    norm = xp.sqrt(xp.asarray(xp.vdot(flat, flat), dtype=xp.float32)).reshape(1)
    _round_bf16(norm, bits)
    eps32 = np.float32(eps)
    floor = _round_bf16(np.array([eps32], np.float32), np.empty(1, np.uint32))[0]
    norm = xp.where(norm < eps32, floor, norm)  # clamp(min=eps): NaN stays NaN
    xp.divide(X, norm, out=X)
    _round_bits(xp, *bits_of[id(X)])
    for _ in range(ns_steps):
        if tall:
            xp.matmul(X.T, X, out=G)
        else:
            xp.matmul(X, X.T, out=G)
        _round_bits(xp, *bits_of[id(G)])
        xp.matmul(G, G, out=V)                    # addmm(G, G, G, beta=b, alpha=c) = c (G G) + b G
        xp.multiply(V, c, out=V)
        xp.multiply(G, b, out=T)
        xp.add(V, T, out=V)
        _round_bits(xp, *bits_of[id(V)])
        if tall:                                  # addmm(X, V, X, beta=a) = V X + a X
            xp.matmul(X, V.T, out=Y)
        else:
            xp.matmul(V, X, out=Y)
        xp.multiply(X, a, out=X)
        xp.add(Y, X, out=Y)
        _round_bits(xp, *bits_of[id(Y)])
        X, Y = Y, X
    return X


# Small matrices on the CPU: each matmul of the iteration takes ~20 us (128 x 64), less than OpenBLAS's hand-off
# to its threads (fastopt.blas). Below this many multiply-adds per matmul (r^2 c) the iteration runs with one
# BLAS thread. sgemm's bits may depend on the thread count (fastopt.blas), so the larger ones run with BLAS's count
# held steady against other threads' one-thread blocks.
SINGLE_THREAD_MACS = 1 << 22


def _newton_schulz_small(w, coefficients, ns_steps, eps, m, n):
    """_newton_schulz, with one BLAS thread for matrices below SINGLE_THREAD_MACS multiply-adds per matmul, and
    BLAS's count held steady for the others (NumPy arrays; CuPy's cuBLAS has no such count)."""
    r, c = min(m, n), max(m, n)
    if array_module(w["X"]) is not np:
        return _newton_schulz(w, coefficients, ns_steps, eps)
    with one_blas_thread() if r * r * c < SINGLE_THREAD_MACS else steady_blas_count():
        return _newton_schulz(w, coefficients, ns_steps, eps)


def muon_update(param, grad, buf, hp: dict, workspace: Workspace) -> None:
    """One Muon update of one 2-D param, in place on `param` and `buf` (its momentum buffer), with `grad`
    only read; hp: check_hyperparameters' values. Arrays of one module (NumPy or CuPy), float32, float64,
    float16 or bfloat16, same shape and dtype, any strides; the caller checked all of this (nothing here
    validates)."""
    if param.size == 0:
        return
    xp = array_module(param)
    m, n = param.shape
    w = workspace.get(xp, param.shape, param.dtype)
    D, F = w["D"], w.get("F")
    momentum = hp["momentum"]
    _lerp_into(buf, buf, grad, 1.0 - momentum, D, F)
    X = w["X"]
    if hp["nesterov"] and "H" in w:
        # 16-bit: torch's nesterov term is a 16-bit tensor (rounded to it), then converted to bfloat16
        _lerp_into(w["H"], grad, buf, momentum, D, F)
        xp.copyto(X, w["H"], casting="same_kind")
    elif hp["nesterov"]:
        _lerp_into(X, grad, buf, momentum, D)  # the store into float32 rounds, as torch's .bfloat16() of float64
    else:
        xp.copyto(X, buf, casting="same_kind")
    # the input's NaNs are kept as NaNs (the rounding on the bits could turn some payloads into Inf)
    nan = w["nan"]
    xp.not_equal(X, X, out=nan)
    _round_bf16(X, w["bits"])
    if xp is not np or nan.any():  # on the GPU unconditionally: asking any() would wait for the device
        xp.copyto(X, np.float32("nan"), where=nan)
    out = _newton_schulz_small(w, hp["ns_coefficients"], hp["ns_steps"], hp["eps"], m, n)
    lr, ratio = hp["lr"], lr_ratio(hp["adjust_lr_fn"], param.shape)
    if hp.get("lr_dtype") is None:
        decay, alpha = 1.0 - lr * hp["weight_decay"], lr * ratio
    else:  # torch with a 0-d Tensor lr (fastopt.torch): both are tensor arithmetic in the lr's dtype
        T = hp["lr_dtype"].type
        decay, alpha = float(T(1) - T(T(lr) * T(hp["weight_decay"]))), float(T(T(lr) * T(ratio)))
    _apply_update(param, out, decay, -alpha, D, F)


# ---- the NumPy / CuPy class ----------------------------------------------------------------------------

def _as_array(p, what):
    """The user's NumPy / CuPy array itself; a NumPy view of another host object; a CuPy view of a device one."""
    if array_device(p, what) == "device":
        if type(p).__module__.startswith("cupy"):
            return p
        import cupy
        return cupy.asarray(p)
    return p if isinstance(p, np.ndarray) else as_numpy(p, what)


def _writable(a) -> bool:
    flags = getattr(a, "flags", None)
    return True if flags is None or not hasattr(flags, "writeable") else bool(flags.writeable)


def _check_param(p, what):
    if p.ndim != 2:
        raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter with size: "
                         f"{tuple(p.shape)} ({what})")
    dtype = np.dtype(p.dtype)
    if dtype not in (np.float32, np.float64, np.float16) and not _is_bf16(dtype):
        if dtype.kind == "c":
            raise TypeError(f"Muon does not support complex parameters ({what}: {p.dtype})")
        raise TypeError(f"{what} must be float32, float64, float16 or bfloat16, got {p.dtype}")
    if not _writable(p):
        raise ValueError(f"{what} is read-only")
    if not no_self_overlap(p):
        raise ValueError(f"{what} has overlapping elements (strides {p.strides} for shape {tuple(p.shape)}): an "
                         f"in-place update would write an element twice")


class Muon(GuardedSteps):
    """torch.optim.Muon for NumPy / CuPy 2-D arrays (see the module docstring for the rule, precision, cost).

    Muon(params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
         ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn=None, *,
         clip_grad_norm=None, skip_nonfinite=False)

    params: a list of 2-D float32/float64/float16/bfloat16 arrays (all NumPy or all CuPy) or of param-group dicts
    {"params": [...], "lr": ...} (missing keys take the constructor's values). Attributes: param_groups (list
    of dicts, editable between steps; checked at every step), state ({flat index: {"momentum_buffer":
    array}}, made at a param's first gradient, like torch), params (the flat order of step(grads)).
    step(grads): grads in the order of opt.params, None for a param without a gradient (skipped, as torch
    skips p.grad None). state_dict() / load_state_dict(): torch.optim's layout, NumPy arrays in place of
    tensors; a torch.optim.Muon state dict (tensors) loads too. Every check of a call runs before its first
    write: a bad call raises and leaves params, buffers and groups as they were. clip_grad_norm= (global-norm
    clipping of the step's gradients, clip_grad_norm_ semantics) and skip_nonfinite= (a NaN/Inf gradient
    skips the step, counted in skipped_steps): fastopt/grad_guard.py.
    """

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.7750, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn=None, *,
                 clip_grad_norm=None, skip_nonfinite=False):
        self._init_guard(clip_grad_norm, skip_nonfinite)
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                    "ns_coefficients": ns_coefficients, "eps": eps, "ns_steps": ns_steps,
                    "adjust_lr_fn": adjust_lr_fn}
        check_hyperparameters(defaults)
        self.defaults = defaults
        self.param_groups: list[dict] = []
        self.state: dict[int, dict] = {}
        self._workspace = Workspace()
        self._ranges: dict = {}  # check_disjoint's cache
        for group in as_param_groups(params):
            self.add_param_group(group)

    @property
    def params(self) -> list:
        """Every param, in group order: the order of step(grads) and of the state dict's indices."""
        return [p for g in self.param_groups for p in g["params"]]

    def add_param_group(self, group: dict) -> None:
        """Add {"params": [...], hyperparameter: value, ...}; missing keys take the defaults. Checked in full
        (hyperparameters, 2-D float params, one kind of array, no param twice) before it is added."""
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError("a param group must be a dict with a 'params' key")
        gi = len(self.param_groups)
        unknown = set(group) - set(HYPER_KEYS) - {"params"}
        if unknown:
            raise TypeError(f"Muon: unknown hyperparameter(s) {', '.join(sorted(unknown))} in param group {gi} "
                            f"(valid: {', '.join(HYPER_KEYS)})")
        params = group["params"]
        if hasattr(params, "shape"):
            params = [params]
        else:
            try:
                params = list(params)
            except TypeError:
                raise TypeError(f"param group {gi}: params must be a list of arrays, got "
                                f"{type(params).__name__}") from None
        if not params:
            raise ValueError(f"param group {gi} has no params")
        start = len(self.params)
        arrays = [_as_array(p, f"params[{start + i}]") for i, p in enumerate(params)]
        for i, p in enumerate(arrays):
            _check_param(p, f"params[{start + i}]")
        kinds = {array_module(p).__name__ for p in self.params + arrays}
        if len(kinds) > 1:
            raise TypeError(f"params: one optimizer updates arrays of one kind, got {' and '.join(sorted(kinds))}")
        seen = {id(p) for p in self.params}
        for i, p in enumerate(arrays):
            if id(p) in seen:
                raise ValueError(f"param group {gi}: params[{start + i}] appears in more than one place")
            seen.add(id(p))
        full = dict(self.defaults)
        full.update({k: v for k, v in group.items() if k != "params"})
        check_hyperparameters(full)
        full["params"] = arrays
        self.param_groups.append(full)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Does nothing, on purpose: this class keeps no gradients (they are step()'s argument). It exists
        so that a loop written for torch.optim runs; fastopt.torch.Muon reads p.grad as torch does."""

    # ---- the step ------------------------------------------------------------------------------------

    def _plan(self, grads):
        """Every check of a step, nothing written: [(param, grad, flat index, hp)] for the params with a grad."""
        params = self.params
        if not isinstance(grads, (list, tuple)):
            if len(params) == 1 and hasattr(grads, "shape"):
                grads = [grads]
            else:
                raise TypeError(f"grads must be a list of arrays (one per param, in the order of opt.params), "
                                f"got {type(grads).__name__}")
        if len(grads) != len(params):
            raise ValueError(f"grads has {len(grads)} entries but the optimizer has {len(params)} params")
        hps = []
        for gi, group in enumerate(self.param_groups):
            try:
                hps.append(check_hyperparameters(group))
            except KeyError as e:
                raise ValueError(f"param group {gi}: {e.args[0]}") from None
        plan, written, read = [], [], []
        i = 0
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                g = grads[i]
                what = f"params[{i}]"
                p = _as_array(p, what)   # group["params"] may be edited between steps: checked every step
                _check_param(p, what)
                buf = self.state.get(i, {}).get("momentum_buffer")
                xp = array_module(p)
                if buf is not None and (array_module(buf) is not xp or tuple(buf.shape) != tuple(p.shape)
                                        or buf.dtype != p.dtype):
                    raise ValueError(f"{what} ({xp.__name__}, {tuple(p.shape)}, {p.dtype}) does not match its "
                                     f"momentum buffer ({array_module(buf).__name__}, {tuple(buf.shape)}, "
                                     f"{buf.dtype}): a param swapped for a different one")
                if g is not None:
                    gwhat = f"grads[{i}]"
                    g = _as_array(g, gwhat)
                    if array_module(g) is not xp:
                        raise TypeError(f"{gwhat} is a {array_module(g).__name__} array but its param is a "
                                        f"{xp.__name__} array")
                    if tuple(g.shape) != tuple(p.shape):
                        raise ValueError(f"{gwhat} has shape {tuple(g.shape)} but its param has shape "
                                         f"{tuple(p.shape)}")
                    if g.dtype != p.dtype:
                        raise TypeError(f"{gwhat} has dtype {g.dtype} but its param has dtype {p.dtype}")
                    if xp.may_share_memory(g, p) or (buf is not None and xp.may_share_memory(g, buf)):
                        raise ValueError(f"{gwhat} shares memory with its param or its momentum buffer")
                    plan.append((p, g, i, hps[gi]))
                    written.append((what, p))
                    if buf is not None:
                        written.append((f"state[{i}]['momentum_buffer']", buf))
                    read.append((gwhat, g))
                i += 1
        # across params: each is written before the next is read (a grad that is another param, two params
        # that are views of one buffer)
        self._ranges = check_disjoint(written, read, self._ranges)
        return plan

    def step(self, grads) -> None:
        """One Muon update of every param whose gradient is not None (grads: in the order of opt.params).
        Checks everything first (hyperparameters of every group, each grad's kind, shape, dtype, overlap);
        a bad call raises before anything is written."""
        plan = self._plan(grads)
        coef = self.guard([g for _, g, _, _ in plan])
        if coef is None:
            return
        for p, g, i, hp in plan:
            if coef != 1.0:
                g = scaled(g, coef)
            st = self.state.setdefault(i, {})
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = array_module(p).zeros(p.shape, p.dtype)
            muon_update(p, g, st["momentum_buffer"], hp, self._workspace)

    # ---- state dicts ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """torch.optim's layout: {"state": {index: {"momentum_buffer": NumPy copy}}, "param_groups": [{the
        group's hyperparameters, "params": [indices]}]}."""
        groups, i = [], 0
        for group in self.param_groups:
            d = {k: group[k] for k in HYPER_KEYS}
            d["params"] = list(range(i, i + len(group["params"])))
            i += len(group["params"])
            groups.append(d)
        state = {k: {"momentum_buffer": to_host(v["momentum_buffer"])} for k, v in sorted(self.state.items())}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this class or of torch.optim.Muon (tensors are read through NumPy): same
        number of groups and of params per group; buffers of the params' shapes, cast to the params' dtype
        (as torch does). The groups' hyperparameters are the saved ones. Checked in full before anything
        is replaced; the buffers are new arrays (copies) on the params' device."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"state", "param_groups"}:
            raise ValueError("state_dict must be a dict with the keys 'state' and 'param_groups'")
        saved, state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(saved, (list, tuple)) or len(saved) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(saved) if hasattr(saved, '__len__') else saved!r} "
                             f"param groups, the optimizer has {len(self.param_groups)}")
        new_groups, index = [], {}
        for gi, (mine, theirs) in enumerate(zip(self.param_groups, saved)):
            if not isinstance(theirs, dict) or "params" not in theirs:
                raise ValueError(f"loaded param group {gi} is not a dict with a 'params' key")
            if len(theirs["params"]) != len(mine["params"]):
                raise ValueError(f"loaded param group {gi} has {len(theirs['params'])} params, the optimizer's has "
                                 f"{len(mine['params'])}")
            hp = {k: theirs[k] for k in HYPER_KEYS if k in theirs}
            missing = set(HYPER_KEYS) - set(hp)
            if missing:
                raise ValueError(f"loaded param group {gi} has no {sorted(missing)[0]!r}")
            extra = set(theirs) - set(HYPER_KEYS) - {"params"}
            if extra:
                raise ValueError(f"loaded param group {gi} has unknown key(s) {', '.join(map(str, sorted(extra)))}")
            check_hyperparameters(hp)
            if isinstance(hp["ns_coefficients"], list):
                hp["ns_coefficients"] = tuple(hp["ns_coefficients"])
            for saved_id, p in zip(theirs["params"], mine["params"]):
                if saved_id in index:  # its state would go to one param only, and the later indices shift
                    raise ValueError(f"loaded param group {gi} lists param {shown(saved_id)} a second time")
                index[saved_id] = (len(index), p)
            new_groups.append(hp)
        if not isinstance(state, dict):
            raise ValueError("the state dict's 'state' must be a dict")
        new_state = {}
        for key, entry in state.items():
            if key not in index:
                raise ValueError(f"loaded state has an entry for param {key!r}, which no param group lists")
            i, p = index[key]
            if not isinstance(entry, dict) or set(entry) != {"momentum_buffer"}:
                raise ValueError(f"loaded state of param {key!r} must be {{'momentum_buffer': array}}, got keys "
                                 f"{sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__}")
            value = entry["momentum_buffer"]
            if hasattr(value, "detach"):  # a torch tensor (bfloat16 read as float32: exact, NumPy has none)
                value = value.detach().cpu()
                value = (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()
            value = to_host(value) if type(value).__module__.startswith("cupy") else np.asarray(value)
            if value.dtype.kind != "f" and not is_bfloat16(value.dtype):
                raise TypeError(f"loaded momentum_buffer of param {key!r} has dtype {value.dtype} (a float array)")
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"loaded momentum_buffer of param {key!r} has shape {tuple(value.shape)}, the "
                                 f"param has {tuple(p.shape)}")
            new_state[i] = value
        # checked: write
        self.state = {}
        for i, value in sorted(new_state.items()):
            p = self.params[i]
            buf = array_module(p).array(value, dtype=p.dtype)  # a copy, on the param's device
            self.state[i] = {"momentum_buffer": buf}
        for group, hp in zip(self.param_groups, new_groups):
            group.update(hp)

    def __repr__(self):
        return groups_repr("Muon", self.param_groups, HYPER_KEYS)
