"""Adafactor exactly as torch.optim.Adafactor (torch 2.13), for NumPy (and CuPy) arrays.

    opt = fastopt.Adafactor(params, lr=1e-2)          # params: a list of arrays or of param-group dicts
    for batch in data:
        opt.step(grads)                               # grads: a list in the order of the params (None: skip)

Update rule (per param, t its own step count, as torch; fastopt.specs.ADAFACTOR.rule):

    t += 1;  w = t^beta2_decay;  rho = min(lr, 1/sqrt(t));  alpha = max(eps2, RMS(p)) * rho
    p *= 1 - lr * weight_decay                                  (decoupled; alpha uses p before it)
    g = -g if maximize
    ndim >= 2, the last two dims factored (m rows, n cols), leading dims batched:
        row_var = lerp(row_var, mean over cols of g^2, w)       shape (..., m, 1)
        col_var = lerp(col_var, mean over rows of g^2, w)       shape (..., 1, n)
        V = row_var * col_var / max(mean over rows of row_var, eps1)
    ndim < 2:  variance = lerp(variance, g^2, w);  V = variance
    U = g * rsqrt(max(V, eps1^2));  p -= alpha / max(1, RMS(U) / d) * U

torch's order of operations (step count, beta2_t, rho, alpha from the param BEFORE the decay, decoupled
decay, the factors, the clipping by d, the update; Python-float host arithmetic as torch's .item() path,
norms rounded to the dtype as torch's tensors report them, inf when a float32 sum of squares overflows,
as torch's); the row/col means as torch's norm, squared, divided by the length; lerp with torch's two
branches (w < 0.5: a + w (b - a), else b + (w - 1)(b - a)).
Where the arithmetic is rearranged for speed (U from per-row and per-column rsqrt factors, RMS(U) in
closed form, the step coefficient folded into the row factor), results differ from torch's by a few ulps
(float64: ~1e-15 relative after 50 steps; the tests require 1e-9). eps1 None: finfo(dtype).eps of the
group's FIRST param with a gradient, used for the whole group (torch rebinds eps1 in its loop: in a group
mixing float32 and float64 params the float64 ones get float32's eps, as in torch).
State (torch's names and shapes): "step" (the count), "row_var" (..., m, 1) and "col_var" (..., 1, n) for
ndim >= 2: m + n floats per matrix; "variance" (the param's shape) for 0-d and 1-D params.

Cost model (bytes of memory traffic per element per step, s = itemsize: 4 for float32, 8 for float64).
RMS(U) must be known before any p is written, and U needs the row/column means of the whole matrix, so
the update cannot be one pass; each param is cut into cache-sized blocks (BLOCK_BYTES: whole matrices,
or row ranges of one) and each pass streams the blocks once, with the block's temporaries (g^2, U) in
one cache-resident workspace: never a param-sized temporary (torch's loop allocates four).
    factored (ndim >= 2): 5 s (20 B/elem float32).
        pass 1 reads g and p. Row AND column means of g^2 in ONE pass over g in memory: the block is
        squared once into the workspace and both reductions read the square from cache (BLAS gemv for the
        row sums; one gemm [1; 1/row_var]^T g^2 for the column sums and W_j = sum_i g_ij^2 / row_var_i,
        the row factor being final once its row is summed). NumPy has no one-loop reduction over two axes,
        so this is the fewest passes over g in memory it allows: one (in-cache sweeps: four). Then
        sum(U^2) = sum_j rm W_j / col_var_j: RMS(U) without a pass over U. Same sweep: sum of squares of p.
        pass 3 reads g and p, writes p: U rebuilt from the O(m + n) factors, decay and update.
        When a clamp applies (a zero row or column, V below eps1^2 somewhere, or nan/inf factors), the
        closed form is not exact and pass 2 reads g once more for sum(U^2): 6 s.
    vector (ndim < 2): 8 s (32 B/elem float32). pass 1 reads g, p and the variance, writes the variance
        (sum(U^2) = sum(g^2 / v) from the same block); pass 3 reads g, variance and p, writes p.
A param that fits one block (and, when a clamp applies, keeps its U between passes 2 and 3) reads its
arrays from cache after pass 1. Fewer memory passes need compiled code: a fused kernel would still
need pass 1 (the factors) before pass 3 (the update), so 5 s is the floor for this algorithm unless U or
g^2 is stored (more bytes). kernels/cpu is another engineer's: the NumPy version is what ships. A
non-contiguous param of ndim > 2 whose leading dims cannot be merged without a copy (e.g. a
channels_last conv weight through fastopt.torch) runs as one block over its own strides, with a
param-sized workspace. CuPy arrays run as one block per param (one launch per operation).

Bad input raises before anything is written (hyperparameters of every group, every grad's kind, dtype
and shape, state arrays, grads sharing memory with a param or a state): params and state are left
byte-for-byte unchanged. Params: float32 or float64 (torch's algorithm in the param's own precision), or
16-bit (float16; bfloat16 as ml_dtypes' bfloat16 on the CPU: CuPy has none): README "Precision", float32
math and float32 state. A 16-bit param (grad in its dtype or float32) is widened to float32 (exact), the
float32 update above runs on it with the float32 state ("row_var"/"col_var" or "variance", float32 whatever
the param's dtype), and the new value is stored back rounded to nearest even (fastopt.precision's
store_rounded: the kernels' bits, NaN kept): a 16-bit step equals the float32 step from the same values,
then rounded, bit for bit. eps1 None is finfo of the param's own dtype as torch's (bfloat16: 2^-7, float16:
2^-10). torch.optim.Adafactor runs 16-bit params in their own precision (state and every intermediate
rounded to 16 bits), so it differs from this by a few 16-bit ulps (tests/test_adafactor.py measures it).
Two float32 param-sized buffers per 16-bit param (the widened p and g, kept in the Workspace between steps);
traffic per element on top of the float32 update's: the widening reads p and g (2 + 2 bytes) and writes
their copies (4 + 4; none for a float32 grad), the store reads the new p (4) and writes it (2), through
store_rounded's temporaries. A param with no elements: torch raises ZeroDivisionError (its RMS divides by
numel after advancing the step); here its step advances and nothing else happens.

Threads: a NumPy step runs on one BLAS thread (fastopt.blas; its products are over cache-sized blocks,
cheaper than OpenBLAS's thread hand-off): same bits, measured 1.7-2.0 s -> 1.1-1.2 s for `fastopt train
-o adafactor` on digits on the shared 2-core VM.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fastopt.arrays import array_device, array_module, as_numpy, check_disjoint, no_self_overlap, refuse_masked
from fastopt.blas import one_blas_thread
from fastopt.grad_guard import GuardedSteps, scaled
from fastopt.optim import as_param_groups
from fastopt.precision import is_16bit, is_bfloat16, store_rounded
from fastopt.specs import COMPOSITE, as_bool, as_float, groups_repr, saved_count, shown

__all__ = ["Adafactor", "check_hyperparameters", "check_eps", "state_shapes", "group_eps1", "check_state",
           "new_state", "check_param", "as_array", "Workspace", "update", "BLOCK_BYTES",
           "state_dtype", "grad_dtype_ok", "one_blas_thread_on_host"]

SPEC = COMPOSITE["adafactor"]
HYPERS = {h.name: h for h in SPEC.hypers}
# torch's wording of each bound, "<label> should be <bound> but is: <value>"
_BOUND = {"lr": ">= 0", "beta2_decay": "<= 0", "d": ">= 1", "weight_decay": ">= 0"}
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# the working set of one block: g's block, p's block and the workspace block sit in a 1 MiB L2
BLOCK_BYTES = 256 * 1024


# ---- hyperparameters --------------------------------------------------------------------------------

def _check_float(name, value):
    h = HYPERS[name]
    x = as_float(name, value, h.label)
    if not h.check(x):
        raise ValueError(f"{h.label} should be {_BOUND[name]} but is: {value}")
    if not math.isfinite(x):  # inf passes torch's checks, but would turn every param into inf or nan
        raise ValueError(f"{h.label} should be finite but is: {value}")
    return x


def check_eps(eps):
    """torch's eps pair (eps1 or None, eps2) as a tuple of Python floats (eps1 may stay None)."""
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise TypeError(f"eps must be a pair (eps1 or None, eps2), got {shown(eps)} ({type(eps).__name__})")
    out = []
    for k, e in enumerate(eps):
        label = f"epsilon{k + 1}"
        if e is None and k == 0:
            out.append(None)
            continue
        x = as_float(label, e, label)
        if not 0.0 <= x:
            raise ValueError(f"{label} should be >= 0 but is: {e}")
        if not math.isfinite(x):
            raise ValueError(f"{label} should be finite but is: {e}")
        out.append(x)
    return tuple(out)


def check_hyperparameters(values: Mapping) -> dict:
    """A group's hyperparameters (torch's names) checked and normalised: floats as Python floats, eps a
    tuple, maximize a bool. torch's error messages ("Learning rate should be >= 0 but is: -1"), and
    non-finite values refused too. Keys other than the hyperparameters are ignored. (fastopt.torch adds
    "lr_dtype" to the result for a 0-d Tensor lr: update() then follows torch's tensor arithmetic.)"""
    hp = {name: _check_float(name, values[name]) for name in ("lr", "beta2_decay", "d", "weight_decay")}
    hp["eps"] = check_eps(values["eps"])
    hp["maximize"] = as_bool("maximize", values["maximize"])
    return hp


# finfo(bfloat16).eps (torch.finfo; np.finfo does not know ml_dtypes' bfloat16)
_BF16_EPS = 2.0 ** -7


def group_eps1(hp: dict, dtype) -> float:
    """eps1 of a group: the given one, else finfo(dtype).eps of the group's first param with a gradient
    (its own dtype, 16-bit ones too, as torch)."""
    if hp["eps"][0] is not None:
        return hp["eps"][0]
    return _BF16_EPS if is_bfloat16(dtype) else float(np.finfo(dtype).eps)


def state_dtype(dtype) -> np.dtype:
    """The dtype of a param's state arrays: float32 for 16-bit params (README, "Precision"), else the
    param's own."""
    return np.dtype(np.float32) if is_16bit(dtype) else np.dtype(dtype)


def grad_dtype_ok(grad_dtype, param_dtype) -> bool:
    """A grad's dtype is the param's, or float32 for a 16-bit param."""
    return grad_dtype == param_dtype or (is_16bit(param_dtype) and grad_dtype == np.float32)


# ---- arrays -----------------------------------------------------------------------------------------

def _is_cupy(a) -> bool:
    return type(a).__module__.startswith("cupy")


def as_array(x, name):
    """A NumPy or CuPy array over x's own memory (CuPy for device objects); TypeError otherwise."""
    if isinstance(x, np.ndarray) or _is_cupy(x):
        refuse_masked(x, name)
        return x
    if array_device(x, name) == "device":
        try:
            import cupy
        except ImportError:
            raise TypeError(f"{name} is a GPU array ({type(x).__name__}): fastopt.Adafactor needs CuPy for "
                            f"it") from None
        return cupy.asarray(x)
    return as_numpy(x, name)


def check_param(p, name):
    if p.dtype not in FLOAT_DTYPES and not is_16bit(p.dtype):
        raise TypeError(f"{name} has dtype {p.dtype}: Adafactor takes float32, float64, float16 or bfloat16 "
                        f"params")
    if isinstance(p, np.ndarray) and not p.flags.writeable:
        raise ValueError(f"{name} is read-only")
    if not no_self_overlap(p):
        raise ValueError(f"{name} has overlapping elements (strides {p.strides} for shape {p.shape}): an "
                         f"in-place update would write an element twice")


def state_shapes(shape: tuple) -> dict:
    """torch's state arrays of a param of this shape: name -> shape (besides "step")."""
    shape = tuple(shape)
    if len(shape) > 1:
        return {"row_var": shape[:-1] + (1,), "col_var": shape[:-2] + (1, shape[-1])}
    return {"variance": shape}


def new_state(p) -> dict:
    """Fresh state of a param: step 0 and zero arrays of torch's shapes, on p's device, in p's dtype
    (float32 for a 16-bit param)."""
    xp = array_module(p)
    state = {"step": 0}
    for name, shape in state_shapes(p.shape).items():
        state[name] = xp.zeros(shape, dtype=state_dtype(p.dtype))
    return state


def check_state(state: Mapping, p, where: str) -> None:
    """The state arrays of p (as kept by the NumPy class, or NumPy/CuPy views of torch's tensors) fit it."""
    for name, shape in state_shapes(p.shape).items():
        a = state.get(name)
        if a is None:
            raise ValueError(f"{where}: state '{name}' is missing")
        if type(a) is not type(p):
            raise TypeError(f"{where}: state '{name}' is a {type(a).__name__}, the param a {type(p).__name__}")
        if tuple(a.shape) != shape:
            raise ValueError(f"{where}: state '{name}' has shape {tuple(a.shape)}, expected {shape}")
        if a.dtype != state_dtype(p.dtype):
            raise TypeError(f"{where}: state '{name}' has dtype {a.dtype}, expected {state_dtype(p.dtype)} "
                            f"(the param is {p.dtype})")
        if isinstance(a, np.ndarray) and not a.flags.writeable:
            raise ValueError(f"{where}: state '{name}' is read-only")


class Workspace:
    """One flat scratch array per (array module, dtype, slot), grown on demand: the block temporaries
    (slot "block") and the float32 copies of 16-bit params and grads ("p16", "g16")."""

    def __init__(self):
        self._arrays = {}

    def get(self, xp, dtype, size: int, slot: str = "block"):
        key = (xp.__name__, np.dtype(dtype).str, slot)
        a = self._arrays.get(key)
        if a is None or a.size < size:
            a = xp.empty(max(size, 1), dtype=dtype)
            self._arrays[key] = a
        return a

    def __getstate__(self):  # pickling, deepcopy: scratch only, made again on use
        return {"_arrays": {}}


# ---- the update -------------------------------------------------------------------------------------

def _sumsq(x) -> float:
    """Sum of squares of x as a Python float: a BLAS dot per block in the dtype, the blocks summed in
    float64. A float32 sum that overflows is inf, as torch's float32 norm (|p| ~ 1e20 gives an inf RMS and
    an inf step in both)."""
    xp = array_module(x)
    v = x.reshape(-1) if xp is not np or x.flags.c_contiguous else np.ascontiguousarray(x).reshape(-1)
    return float(xp.dot(v, v))


def _lerp_into(a, end, w, dtype):
    """a = torch.lerp(a, end, w) with torch's two branches; end is scratch (overwritten)."""
    xp = array_module(a)
    wd = dtype.type(w)
    if abs(wd) < 0.5:
        xp.subtract(end, a, out=end)             # end - a
        xp.multiply(end, wd, out=end)
        xp.add(a, end, out=a)                    # a + w (end - a)
    else:
        xp.subtract(end, a, out=a)               # end - a
        xp.multiply(a, wd - dtype.type(1), out=a)
        xp.add(end, a, out=a)                    # end + (w - 1)(end - a)


def _rounded(x: float, dtype) -> float:
    """A norm as torch reports it: rounded to the tensor's dtype."""
    return float(dtype.type(x))


def _matrices(a, L, m, n):
    """a as (L, m, n) without a copy, or None when its leading dims do not merge."""
    if a.ndim == 2:
        return a[None]
    if a.flags.c_contiguous:
        return a.reshape(L, m, n)
    if isinstance(a, np.ndarray):
        try:
            return np.reshape(a, (L, m, n), copy=False)
        except (ValueError, TypeError):
            return None
    return None


def _blocks_3d(L, m, n, block):
    """(row index, col index, first row block of its matrices) for (L, m, n) views, each block at most
    `block` elements (at least one row)."""
    if m * n <= block:
        lb = max(1, block // (m * n))
        for l0 in range(0, L, lb):
            ls = slice(l0, min(L, l0 + lb))
            yield (ls, slice(None)), (ls,), True
        return
    rb = max(1, block // n)
    for lo in range(L):
        ls = slice(lo, lo + 1)
        for r0 in range(0, m, rb):
            yield (ls, slice(r0, min(m, r0 + rb))), (ls,), r0 == 0


def update(p, g, state: Mapping, t: float, hp: Mapping, eps1: float, workspace: Workspace, block=None) -> None:
    """One Adafactor step of one param, in place: p and its state arrays ("row_var"/"col_var" or
    "variance"; not "step", which the caller advanced to t, the number of this step). p, g and the state
    arrays are checked arrays of one module and dtype (NumPy or CuPy, any non-overlapping strides); for a
    16-bit p the state is float32 and g p's dtype or float32 (the module docstring, 16-bit params)."""
    if p.size == 0:
        return  # nothing to update (torch raises ZeroDivisionError here: its RMS divides by numel)
    xp = array_module(p)
    if is_16bit(p.dtype):
        _update_16bit(p, g, state, t, hp, eps1, workspace, block, xp)
        return
    dtype = p.dtype
    if block is None:
        block = max(1, BLOCK_BYTES // p.itemsize) if xp is np else p.size  # GPU: one launch per op
    lr, wd, d, eps2 = hp["lr"], hp["weight_decay"], hp["d"], hp["eps"][1]
    w = t ** hp["beta2_decay"]
    eps1sq = eps1 * eps1
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # inf and nan propagate, as in torch
        _update(p, g, state, w, t, eps1, eps1sq, lr, wd, d, eps2, hp["maximize"], hp.get("lr_dtype"), workspace,
                block, xp, dtype)


def _widened(xp, a, workspace, slot):
    """A float32 copy of a (exact), in the workspace's `slot` buffer, C-ordered in a's shape."""
    wide = workspace.get(xp, np.float32, a.size, slot)[:a.size].reshape(a.shape)
    xp.copyto(wide, a)
    return wide


def _update_16bit(p, g, state, t, hp, eps1, workspace, block, xp):
    """The float32 update of the widened p and g (and the float32 state), then p stored rounded to nearest
    even: float32 math, one rounding per step."""
    p32 = _widened(xp, p, workspace, "p16")
    g32 = g if g.dtype == np.float32 else _widened(xp, g, workspace, "g16")
    update(p32, g32, state, t, hp, eps1, workspace, block)
    if xp is np:
        store_rounded(p, p32)  # the kernels' round-to-nearest-even bits
    else:
        xp.copyto(p, p32, casting="same_kind")  # CuPy float16: its cast rounds to nearest even


def _update(p, g, state, w, t, eps1, eps1sq, lr, wd, d, eps2, maximize, lr_dtype, workspace, block, xp, dtype):
    stats = _factored_stats if p.ndim > 1 else _vector_stats
    sumsq_p, sumsq_u, blocks, scaled_u = stats(p, g, state, w, eps1, eps1sq, workspace, block, xp, dtype)
    numel = p.size
    rms_p = max(eps2, _rounded(math.sqrt(sumsq_p), dtype) / (numel ** 0.5))
    denom = max(1.0, _rounded(math.sqrt(sumsq_u), dtype) / ((numel ** 0.5) * d))
    if lr_dtype is None:
        coef = -(rms_p * min(lr, 1 / (t ** 0.5))) / denom
        decay = 1 - lr * wd
    else:
        # torch with a 0-d Tensor lr (fastopt.torch): rho = min(lr, 1/sqrt(t)) is that tensor unless
        # 1/sqrt(t) < lr, and then alpha, the coefficient and the decay factor are tensor arithmetic in
        # the lr's dtype (float32: rounded at each operation)
        T = lr_dtype.type
        if not (1 / (t ** 0.5) < lr):
            coef = float(T(-T(T(rms_p) * T(lr))) / T(denom))
        else:
            coef = -(rms_p * (1 / (t ** 0.5))) / denom
        decay = float(T(T(1) - T(T(lr) * T(wd))))
    coef = dtype.type(coef)
    if maximize:
        coef = -coef  # U of -g is -(U of g), exactly: the sign goes on the coefficient
    decay = dtype.type(decay) if wd != 0 else None
    # pass 3: p = p * decay + coef * U, block by block
    for blk in blocks:
        u, p_b = scaled_u(blk, coef)
        if decay is not None:
            xp.multiply(p_b, decay, out=p_b)
        xp.add(p_b, u, out=p_b)


def _factored_stats(p, g, state, w, eps1, eps1sq, workspace, block, xp, dtype):
    """Passes 1 and 2 of a param with ndim >= 2: the factors updated, sums of squares of p and of U;
    returns them with the blocks and scaled_u(block, coef) -> (coef * U, p) of a block, for pass 3.

    U = g * rsqrt(max(r c / rm, eps1^2)) is built as g * min(a_i b_j, cap) with a = rsqrt(r / rm) and
    b = rsqrt(c) computed once per row and column (rsqrt is monotone, so the clamp moves outside; cap =
    rsqrt(eps1^2) in the dtype, torch's value for a clamped entry): no per-element sqrt or division, and
    the clamp itself is skipped when max(a) * max(b) <= cap (then no entry reaches it; a nan or inf in the
    factors fails the test and takes the clamp, which propagates nan as torch's). In pass 3 coef goes into
    a (O(m)). The roundings differ from torch's (r c / rm, then rsqrt, then * g, then * coef) by a few ulps."""
    row_var, col_var = state["row_var"], state["col_var"]
    shape = p.shape
    m, n = shape[-2], shape[-1]
    L = p.size // (m * n)
    p3, g3 = _matrices(p, L, m, n), _matrices(g, L, m, n)
    rv3, cv3 = _matrices(row_var, L, m, 1), _matrices(col_var, L, 1, n)
    rowsum = xp.empty(row_var.shape, dtype)
    colsum = xp.empty(col_var.shape, dtype)
    wsum = xp.empty(col_var.shape, dtype)
    if all(v is not None for v in (p3, g3, rv3, cv3)):
        r3, c3, w3 = rowsum.reshape(L, m, 1), colsum.reshape(L, 1, n), wsum.reshape(L, 1, n)  # ours
        blocks = list(_blocks_3d(L, m, n, block))
        size = min(L, block // (m * n)) * m * n if m * n <= block else min(m, max(1, block // n)) * n
    else:  # leading dims that do not merge: one block over the param's own strides
        p3, g3, rv3, r3, c3, w3 = p, g, row_var, rowsum, colsum, wsum
        blocks = [((Ellipsis,), (Ellipsis,), True)]
        size = p.size
    work = workspace.get(xp, dtype, size)
    ones = xp.ones((n, 1), dtype)
    lhs = xp.empty(2 * (size // n), dtype)  # [1; 1/row_var] of a block's rows

    def scratch(shape_b):
        return work[:math.prod(shape_b)].reshape(shape_b)

    # pass 1, from one read of each block of g (squared once into the cache-resident workspace, then read
    # from cache): the row sums of g^2 (BLAS gemv) and, as the rows are then complete, the new row factor;
    # in ONE gemm [1; 1/row_var]^T g^2: the column sums and W_j = sum_i g_ij^2 / row_var_i, from which
    # sum(U^2) = sum_j rm W_j / col_var_j without a pass over U (when no clamp applies, see below);
    # the sum of squares of p in the same sweep
    sumsq_p = 0.0
    for rows, cols, first in blocks:
        g_b = g3[rows]
        sq = scratch(g_b.shape)
        xp.multiply(g_b, g_b, out=sq)
        rs = r3[rows]
        xp.matmul(sq, ones, out=rs)
        xp.sqrt(rs, out=rs)                      # torch: norm over the row, squared, divided by n
        xp.multiply(rs, rs, out=rs)
        xp.divide(rs, dtype.type(n), out=rs)
        rv = rv3[rows]
        _lerp_into(rv, rs, w, dtype)
        lead, k = rv.shape[:-2], rv.shape[-2]
        left = lhs[:2 * math.prod(lead) * k].reshape(*lead, 2, k)
        left[..., 0, :] = 1
        xp.divide(dtype.type(1), rv[..., 0], out=left[..., 1, :])
        both = xp.matmul(left, sq)               # (..., 2, n): O(n) per block
        if first:
            c3[cols] = both[..., 0:1, :]
            w3[cols] = both[..., 1:2, :]
        else:
            c3[cols] += both[..., 0:1, :]
            w3[cols] += both[..., 1:2, :]
        sumsq_p += _sumsq(p3[rows])
    xp.sqrt(colsum, out=colsum)
    xp.multiply(colsum, colsum, out=colsum)
    xp.divide(colsum, dtype.type(m), out=colsum)
    _lerp_into(col_var, colsum, w, dtype)
    rm = xp.mean(row_var, axis=-2, keepdims=True)
    xp.maximum(rm, dtype.type(eps1), out=rm)
    # the per-row and per-column factors of rsqrt(V), into the sums' arrays (free now)
    a, b = rowsum, colsum
    xp.divide(row_var, rm, out=a)
    xp.sqrt(a, out=a)
    xp.divide(dtype.type(1), a, out=a)
    xp.sqrt(col_var, out=b)
    xp.divide(dtype.type(1), b, out=b)
    cap = dtype.type(dtype.type(1) / np.sqrt(dtype.type(eps1sq)))  # torch's rsqrt of a clamped entry
    clamp = not bool(dtype.type(float(xp.max(a))) * dtype.type(float(xp.max(b))) <= cap)

    def build_u(rows, cols, a3):
        g_b = g3[rows]
        u = scratch(g_b.shape)
        xp.multiply(a3[rows], c3[cols], out=u)
        if clamp:
            xp.minimum(u, cap, out=u)
        xp.multiply(u, g_b, out=u)
        return u

    if not clamp:
        # every factor finite and positive, no entry clamped: sum(U^2) = sum rm * W_j / col_var_j
        xp.divide(wsum, col_var, out=wsum)
        per = xp.sum(wsum, axis=-1, keepdims=True, dtype=np.float64)
        return sumsq_p, float(xp.sum(per * rm)), blocks, _scaled_u_factory(blocks, build_u, r3, p3, xp, None)
    # pass 2 (only when a clamp applies: a zero row or column, V below eps1^2, or nan/inf): RMS(U) from U
    sumsq_u = 0.0
    u = None
    for rows, cols, _ in blocks:
        u = build_u(rows, cols, r3)
        sumsq_u += _sumsq(u)
    kept = u if len(blocks) == 1 else None  # one block: U is still in the workspace
    return sumsq_p, sumsq_u, blocks, _scaled_u_factory(blocks, build_u, r3, p3, xp, kept, clamp=True)


def _scaled_u_factory(blocks, build_u, r3, p3, xp, kept, clamp=False):
    """scaled_u(block, coef) -> (coef * U of the block, p's block) for pass 3. Without a clamp coef goes
    into the row factor (O(m)); with one, U is built (or kept from pass 2) and then scaled."""
    scaled = {}

    def scaled_u(blk, coef):
        rows, cols, _ = blk
        if kept is not None:
            xp.multiply(kept, coef, out=kept)
            return kept, p3[rows]
        if clamp:  # the clamp comes before the scaling
            u = build_u(rows, cols, r3)
            xp.multiply(u, coef, out=u)
            return u, p3[rows]
        if "a" not in scaled:
            scaled["a"] = xp.multiply(r3, coef)
        return build_u(rows, cols, scaled["a"]), p3[rows]

    return scaled_u


def _vector_stats(p, g, state, w, eps1, eps1sq, workspace, block, xp, dtype):
    """Pass 1 of a param with ndim < 2, block by block: g^2, the variance's lerp (torch's two branches),
    sum(U^2) = sum(g^2 / max(v, eps1^2)) with no square root, and the sum of squares of p. Pass 3 builds
    U = g / sqrt(max(v, eps1^2)) (one rounding less than torch's rsqrt then multiply). The max is skipped
    for a block whose minimum is >= eps1^2 (a nan fails the test and takes the max, which propagates it as
    torch's clamp)."""
    variance = state["variance"]
    if p.ndim == 0:
        p, g, variance = p.reshape(1), g.reshape(1), variance.reshape(1)
    N = p.size
    size = min(block, N)
    work = workspace.get(xp, dtype, 2 * size)
    e2 = dtype.type(eps1sq)
    wd = dtype.type(w)
    small = abs(wd) < 0.5
    coeff = wd if small else wd - dtype.type(1)
    blocks = [slice(k, min(N, k + size)) for k in range(0, N, size)]
    clamped = {}
    sumsq_p = sumsq_u = 0.0
    for sl in blocks:
        k = sl.stop - sl.start
        g_b, v_b = g[sl], variance[sl]
        sq, tmp = work[:k], work[size:size + k]
        xp.multiply(g_b, g_b, out=sq)
        # torch.lerp(v, g^2, w): w < 0.5: v + w (g^2 - v); else g^2 + (w - 1)(g^2 - v); g^2 kept
        xp.subtract(sq, v_b, out=tmp)
        xp.multiply(tmp, coeff, out=tmp)
        xp.add(v_b if small else sq, tmp, out=v_b)
        clamp = clamped[sl.start] = not bool(xp.min(v_b) >= e2)
        if clamp:
            xp.maximum(v_b, e2, out=tmp)
            xp.divide(sq, tmp, out=tmp)
        else:
            xp.divide(sq, v_b, out=tmp)
        sumsq_u += float(tmp.sum())  # pairwise within the block, float64 across blocks
        sumsq_p += _sumsq(p[sl])

    def scaled_u(sl, coef):
        u = work[:sl.stop - sl.start]
        if clamped[sl.start]:
            xp.maximum(variance[sl], e2, out=u)
            xp.sqrt(u, out=u)
        else:
            xp.sqrt(variance[sl], out=u)
        xp.divide(g[sl], u, out=u)
        xp.multiply(u, coef, out=u)
        return u, p[sl]

    return sumsq_p, sumsq_u, blocks, scaled_u


def one_blas_thread_on_host(p):
    """The context a step runs in: one BLAS thread for NumPy params (every product here is over one
    cache-sized block, smaller than OpenBLAS's thread hand-off costs; fastopt.blas), nothing for CuPy."""
    return one_blas_thread() if isinstance(p, np.ndarray) else _NO_CONTEXT


class _NoContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NO_CONTEXT = _NoContext()


# ---- the NumPy class --------------------------------------------------------------------------------

_HP_KEYS = ("lr", "beta2_decay", "eps", "d", "weight_decay", "maximize")


class Adafactor(GuardedSteps):
    """Adafactor as torch.optim.Adafactor, over NumPy (or CuPy) arrays; the update rule and the cost model
    are in this module's docstring (fastopt.adafactor).

    Adafactor(params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0, *,
              maximize=False, clip_grad_norm=None, skip_nonfinite=False)

    params: a list of arrays (one group) or of dicts {"params": [...], <hyperparameter>: value} (missing
    keys take the constructor's values). float32, float64, float16 or bfloat16 (ml_dtypes) arrays, writable,
    any non-overlapping strides; they are updated in place (16-bit ones: float32 math and state, the result
    rounded to nearest even). Hyperparameters have torch's names, defaults, ranges and messages (and must
    be finite); lr is a number (change param_groups[i]["lr"] between steps to schedule it).

    step(grads): grads is a list with one array (same kind, dtype and shape) or None per param, in the
    order of the groups' params; None skips the param (its step count does not advance, like a param
    whose .grad is None in torch). Everything is checked before anything is written. clip_grad_norm= (global-
    norm clipping of the step's gradients, clip_grad_norm_ semantics) and skip_nonfinite= (a NaN/Inf gradient
    skips the step, counted in skipped_steps): fastopt/grad_guard.py.

    state: flat param index -> {"step": int, "row_var", "col_var"} (ndim >= 2) or {"step": int, "variance"}
    (ndim < 2), made at a param's first step; state_dict() / load_state_dict() in torch.optim's layout
    ({"state": {i: {...}}, "param_groups": [{..., "params": [i, ...]}]}, NumPy arrays for tensors, "step" a
    0-d float32 array as torch's tensor): a torch.optim.Adafactor state dict (tensors) loads here and this
    one loads into torch (tensors from the arrays), and training continues identically.
    """

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0, *,
                 maximize=False, clip_grad_norm=None, skip_nonfinite=False):
        self._init_guard(clip_grad_norm, skip_nonfinite)
        self.defaults = check_hyperparameters(dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d,
                                                   weight_decay=weight_decay, maximize=maximize))
        self.defaults["eps"] = eps if isinstance(eps, tuple) else tuple(eps)
        self.param_groups: list[dict] = []
        self.state: dict[int, dict] = {}
        self._workspace = Workspace()
        self._ranges: dict = {}  # check_disjoint's cache
        self._sizes: list[int] = []
        if isinstance(params, np.ndarray) or _is_cupy(params):
            raise TypeError("params must be a list of arrays or of param-group dicts, got one array: pass [array]")
        for group in as_param_groups(params):
            self.add_param_group(group)

    # ---- groups -------------------------------------------------------------------------------------

    def add_param_group(self, group: Mapping) -> None:
        """Add a group {"params": [...], hyperparameters...}; missing hyperparameters take the defaults."""
        if not isinstance(group, Mapping):
            raise TypeError(f"a param group must be a dict, got {type(group).__name__}")
        if "params" not in group:
            raise ValueError("a param group needs 'params'")
        params = group["params"]
        params = [params] if isinstance(params, np.ndarray) or _is_cupy(params) else list(params)
        new = dict(group)
        new["params"] = params
        for key in _HP_KEYS:
            new.setdefault(key, self.defaults[key])
        check_hyperparameters(new)
        known = {id(p) for g in self.param_groups for p in g["params"]}
        ids = set()
        for j, p in enumerate(params):
            a = as_array(p, f"params[{j}]")
            check_param(a, f"params[{j}]")
            if id(p) in known or id(p) in ids:
                raise ValueError("some parameters appear in more than one parameter group")
            ids.add(id(p))
        self.param_groups.append(new)
        self._sizes.append(len(params))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Does nothing, on purpose: gradients are step()'s argument, so there is nothing to clear (it exists
        so that a loop written for torch.optim runs; fastopt.torch.Adafactor reads p.grad as torch does)."""

    @property
    def params(self) -> list:
        """Every param, in the order of step()'s grads."""
        return [p for g in self.param_groups for p in g["params"]]

    # ---- step ---------------------------------------------------------------------------------------

    def _plan(self, grads):
        """Everything checked, nothing written: per param with a grad (index, p, g, state, hp, eps1)."""
        if isinstance(grads, np.ndarray) or _is_cupy(grads) or not isinstance(grads, (list, tuple)):
            raise TypeError(f"grads must be a list (one array or None per param), got {type(grads).__name__}")
        for gi, group in enumerate(self.param_groups):
            if not isinstance(group.get("params"), list) or len(group["params"]) != self._sizes[gi]:
                raise ValueError(f"param_groups[{gi}]['params'] must stay a list of {self._sizes[gi]} params "
                                 f"(use add_param_group to add params)")
        total = sum(self._sizes)
        if len(grads) != total:
            raise ValueError(f"grads has {len(grads)} entries, the optimizer {total} params")
        plan, written, read = [], [], []
        i = 0
        for gi, group in enumerate(self.param_groups):
            hp = check_hyperparameters(group)
            eps1 = None
            for p_obj in group["params"]:
                g_obj = grads[i]
                name = f"params[{i}]"
                if g_obj is not None:
                    p = as_array(p_obj, name)
                    check_param(p, name)
                    # a NumPy scalar grad (read only) is taken as a 0-d array
                    g = as_array(np.asarray(g_obj) if isinstance(g_obj, np.generic) else g_obj, f"grads[{i}]")
                    if type(g) is not type(p):
                        raise TypeError(f"grads[{i}] is a {type(g).__name__}, {name} a {type(p).__name__}")
                    if not grad_dtype_ok(g.dtype, p.dtype):
                        raise TypeError(f"grads[{i}] has dtype {g.dtype}, {name} {p.dtype} (a grad is in its "
                                        f"param's dtype, or float32 for a 16-bit param)")
                    if tuple(g.shape) != tuple(p.shape):
                        raise ValueError(f"grads[{i}] has shape {tuple(g.shape)}, {name} {tuple(p.shape)}")
                    state = self.state.get(i)
                    if state is not None:
                        check_state(state, p, f"state of {name}")
                        written += [(f"state of {name}: {k}", state[k]) for k in state_shapes(p.shape)]
                    if eps1 is None:
                        eps1 = group_eps1(hp, p.dtype)  # the group's first param with a grad (torch)
                    plan.append((i, p, g, state, hp, eps1))
                    written.append((name, p))
                    read.append((f"grads[{i}]", g))
                i += 1
        self._ranges = check_disjoint(written, read, self._ranges)
        return plan

    def step(self, grads) -> None:
        """One Adafactor step of every param whose grad is not None (see the class docstring)."""
        plan = self._plan(grads)
        coef = self.guard([entry[2] for entry in plan])
        if coef is None:
            return
        with one_blas_thread_on_host(plan[0][1] if plan else None):
            for i, p, g, state, hp, eps1 in plan:
                if coef != 1.0:
                    g = scaled(g, coef)
                if state is None:
                    state = self.state[i] = new_state(p)
                t = state["step"] + 1
                state["step"] = t
                update(p, g, state, float(t), hp, eps1, self._workspace)

    # ---- state dict ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """torch.optim's layout with NumPy arrays (copies) for tensors; "step" a 0-d float32 array."""
        from fastopt.arrays import to_host
        state = {}
        for i, s in self.state.items():
            entry = {"step": np.array(float(s["step"]), dtype=np.float32)}
            for k, v in s.items():
                if k != "step":
                    entry[k] = to_host(v)
            state[i] = entry
        groups, start = [], 0
        for group, size in zip(self.param_groups, self._sizes):
            g = {k: v for k, v in group.items() if k != "params"}
            g["params"] = list(range(start, start + size))
            groups.append(g)
            start += size
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Load a state dict of this class or of torch.optim.Adafactor (tensors are read as arrays, floating
        state cast to the param's dtype as torch does). Checked in full before anything changes."""
        if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups'")
        saved_groups = list(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, the optimizer "
                             f"{len(self.param_groups)}")
        index_of, new_groups, start = {}, [], 0
        for gi, (saved, size) in enumerate(zip(saved_groups, self._sizes)):
            if not isinstance(saved, Mapping):
                raise ValueError(f"param group {gi} of state_dict must be a dict, got {type(saved).__name__}")
            ids = list(saved.get("params", ()))
            if len(ids) != size:
                raise ValueError(f"param group {gi} of state_dict has {len(ids)} params, the optimizer's {size}")
            for k, saved_id in enumerate(ids):
                if saved_id in index_of:  # its state would go to one param only
                    raise ValueError(f"param group {gi} of state_dict lists param {shown(saved_id)} a second time")
                index_of[saved_id] = start + k
            merged = dict(saved)
            for key in _HP_KEYS:
                if key not in merged:
                    raise ValueError(f"param group {gi} of state_dict has no '{key}'")
            merged["eps"] = tuple(merged["eps"]) if isinstance(merged["eps"], list) else merged["eps"]
            if hasattr(merged["lr"], "item") and getattr(merged["lr"], "shape", None) in ((), (1,)):
                merged["lr"] = float(merged["lr"].item())  # torch's 1-element Tensor lr
            check_hyperparameters(merged)
            merged["params"] = self.param_groups[gi]["params"]
            new_groups.append(merged)
            start += size
        flat = self.params
        new_state = {}
        for saved_id, entry in dict(state_dict["state"]).items():
            if saved_id not in index_of:
                raise ValueError(f"state_dict has state for param {shown(saved_id)}, which no group lists")
            i = index_of[saved_id]
            where = f"state of param {i}"
            if not isinstance(entry, Mapping):
                raise TypeError(f"{where} must be a dict, got {type(entry).__name__}")
            if not entry:
                continue
            p = as_array(flat[i], f"params[{i}]")
            shapes = state_shapes(p.shape)
            extra = set(entry) - set(shapes) - {"step"}
            if extra or "step" not in entry:
                raise ValueError(f"{where} has keys {sorted(map(str, entry))}, expected {['step', *shapes]}")
            t = saved_count(entry["step"], f"{where}: step")
            arrays = {}
            for name, shape in shapes.items():
                if name not in entry:
                    raise ValueError(f"{where}: '{name}' is missing")
                a = entry[name]
                if hasattr(a, "detach") and str(a.dtype) == "torch.bfloat16":
                    a = a.detach().cpu().float()  # NumPy has no bfloat16 tensors: float32 is exact
                a = np.asarray(a.get() if _is_cupy(a) else a)
                if a.dtype.kind != "f" and not is_bfloat16(a.dtype):
                    raise TypeError(f"{where}: '{name}' has dtype {a.dtype}, expected a float array")
                if a.shape != shape:
                    raise ValueError(f"{where}: '{name}' has shape {a.shape}, expected {shape}")
                arrays[name] = a
            new_state[i] = (p, t, arrays)
        # checked: apply
        xps = {}
        state = {}
        for i, (p, t, arrays) in new_state.items():
            xp = xps.setdefault(type(p), array_module(p))
            s = {"step": int(t)}
            for name, a in arrays.items():
                s[name] = xp.array(a, dtype=state_dtype(p.dtype))  # a copy, in the state's dtype and module
            state[i] = s
        for group, merged in zip(self.param_groups, new_groups):
            group.clear()
            group.update(merged)
        self.state = state

    def __repr__(self):
        return groups_repr(type(self).__name__, self.param_groups)


_RULE = "\n".join("        " + line for line in SPEC.rule.splitlines())
Adafactor.__doc__ += f"\n    Update rule (per param):\n\n{_RULE}\n"
