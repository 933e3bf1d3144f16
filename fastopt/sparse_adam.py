"""SparseAdam: torch.optim.SparseAdam for row-sparse gradients (embedding tables), on NumPy or CuPy arrays.

    emb = np.random.randn(100_000, 256).astype(np.float32)
    opt = fastopt.SparseAdam([emb], lr=1e-3)
    opt.step([(rows, row_grads)])        # rows: int array (nnz,), row_grads: (nnz, 256); repeats are summed

A gradient is a pair (indices, values), torch's sparse COO layout:
- indices 1-D, shape (nnz,): row numbers into the param's first dim; values has shape (nnz, *param.shape[1:]);
- or indices 2-D, shape (k, nnz) (torch's `sparse_tensor.indices()`): positions over the param's first k dims;
  values has shape (nnz, *param.shape[k:]).
Repeated positions are summed first (torch's `grad.coalesce()`, in the order given), then only the positions
present are updated (lazy Adam: the other rows of p, exp_avg and exp_avg_sq stay as they are):

    g = -g if maximize
    m[r] += (g - m[r]) * (1 - beta1)
    v[r] += (g * g - v[r]) * (1 - beta2)
    p[r] -= lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m[r] / (sqrt(v[r]) + eps)

with t the param's own step count (+1 on every step that gives the param a gradient, an empty one (nnz = 0)
included, as torch counts it; an empty gradient writes nothing else). The operations, their order and their
scalars are torch's (_functional.sparse_adam): float32 and float64 results agree with torch.optim.SparseAdam to
rounding, not bit for bit: torch's CPU float32 sqrt is off by one ulp on some inputs (NumPy's is correctly
rounded), and torch sums repeated indices in the order of an unstable sort (here: in the order given).
16-bit params: each operation rounds to the param's dtype and the scalars are float32, like torch's opmath.

Cost. After coalescing, the touched rows are processed in chunks of about CHUNK_ELEMENTS elements: gather
the chunk's rows of m, v (and of the gradient when it had repeats, was unsorted or is negated), update them
in chunk-sized buffers reused for the whole call (18 NumPy calls per chunk, gathers and scatters included, all
on data that stays in the L2 cache), scatter m and v back, then gather, update and scatter the chunk of p.
Memory traffic per touched element is Adam's: read g, p, m, v and write p, m, v (28 bytes in float32, 56 in
float64), plus the index arrays. Nothing is allocated in proportion to nnz x row width (the buffers are
chunk-sized); repeated or unsorted indices cost a sort (np.unique) of the nnz indices. On CuPy the whole set
of rows is one chunk (kernel launches, not cache, are the limit there), and the index checks read the
indices' min and max back to the host (one synchronisation per gradient).

Bad input (a grad that is not a pair, indices of a float or bool dtype, not 1-D/2-D, out of range or
negative, values of the wrong shape or dtype, a bad hyperparameter) raises naming the argument before any
array is written: the whole call (every param) is checked first.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import numpy as np

from fastopt.arrays import array_device, array_module, as_numpy, check_disjoint, to_host, writable_view
from fastopt.grad_guard import GuardedSteps, scaled, sum_of_squares
from fastopt.optim import as_param_groups
from fastopt.specs import COMPOSITE, as_step, groups_repr, shown

__all__ = ["SparseAdam", "sparse_adam_step", "prepare_step", "PreparedStep", "check_calls_disjoint", "CHUNK_ELEMENTS"]

SPEC = COMPOSITE["sparse_adam"]
_HYPER = {h.name: h for h in SPEC.hypers}
_GROUP_KEYS = ("lr", "betas", "eps", "maximize")
# elements per chunk of rows on the host: the 3-4 buffers of this size (float32: 4 x 128 KiB) stay in L2. On the
# benchmark's 4096-row x 256 update (shared 2-core VM) 4K-element chunks are slower (per-call overhead of the 18 NumPy
# calls per chunk) and one chunk for everything is slower (the buffers spill to memory); 16K-64K are within noise
CHUNK_ELEMENTS = 32768
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


# ---------------------------------------------------------------------------------------------------
# array module helpers (NumPy or CuPy, from the params' type)
# ---------------------------------------------------------------------------------------------------

def _kind(a) -> str:
    return "cupy" if type(a).__module__.startswith("cupy") else "numpy"


def _take(xp, a, rows, out):
    """out[...] = a[rows] along axis 0 (out is a reused buffer). NumPy: mode='clip' because the rows are
    checked already and the default mode='raise' buffers `out` (a copy per call)."""
    if xp is np:
        np.take(a, rows, axis=0, out=out, mode="clip")
    else:
        xp.take(a, rows, axis=0, out=out)


def _shares_memory(xp, a, b) -> bool:
    if xp is np:
        return np.may_share_memory(a, b)
    return bool(xp.may_share_memory(a, b))


def _compute_scalar(dtype):
    """The type of the scalars in the update: float64 for float64 data, float32 otherwise (16-bit data: each
    operation computes in float32 and rounds to the data's dtype, like torch's opmath)."""
    return float if dtype == np.float64 else np.float32


# ---------------------------------------------------------------------------------------------------
# checks (no writes)
# ---------------------------------------------------------------------------------------------------

def _check_param(p, name: str):
    """A writable, C-contiguous float array (NumPy or CuPy; host buffers are viewed as NumPy)."""
    if not hasattr(p, "shape") or not hasattr(p, "dtype"):
        array_device(p, name)  # TypeError naming it for what is not an array at all
    p = writable_view(p, name)
    if not isinstance(p, np.ndarray) and _kind(p) != "cupy":
        raise TypeError(f"{name}: SparseAdam updates NumPy or CuPy arrays (or what exposes its memory to them), got "
                        f"{type(p).__module__}.{type(p).__name__}")
    if np.dtype(p.dtype).name not in _FLOAT_NAMES:
        raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 array, got dtype {p.dtype}")
    if _kind(p) == "numpy" and not p.flags.writeable:
        raise ValueError(f"{name} is read-only")
    if not p.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (its rows are gathered and scattered in place), got strides "
                         f"{p.strides} for shape {p.shape}")
    return p


def _check_state(s, p, name: str):
    """A state array matching its param: same kind, shape and dtype, writable, contiguous, not the param."""
    if s is None:
        raise ValueError(f"{name} is missing (None)")
    s = _check_param(s, name)
    if _kind(s) != _kind(p):
        raise TypeError(f"{name} is a {_kind(s)} array but its param is a {_kind(p)} array")
    if s.dtype != p.dtype:
        raise TypeError(f"{name} has dtype {s.dtype} but its param has dtype {p.dtype}")
    if s.shape != p.shape:
        raise ValueError(f"{name} has shape {tuple(s.shape)} but its param has shape {tuple(p.shape)}")
    if _shares_memory(array_module(p), s, p):
        raise ValueError(f"{name} shares memory with its param")
    return s


def _as_index_array(indices, p, where: str):
    """The indices as an integer array of the param's kind: a NumPy view of a host array (a torch CPU tensor
    included), a list of ints, or for CuPy params a CuPy array (a host index array is copied to the GPU)."""
    xp = array_module(p)
    if isinstance(indices, (list, tuple)):
        try:
            arr = np.asarray(indices)
        except ValueError as e:  # a ragged list
            raise ValueError(f"{where} indices must be a rectangular list of integers: {e}") from None
        if arr.size == 0:
            arr = arr.astype(np.intp)  # np.asarray([]) is float64
    elif xp is np:
        if array_device(indices, f"{where} indices") == "device":
            raise TypeError(f"{where} indices are a GPU array ({type(indices).__name__}) but the param is a NumPy "
                            f"array")
        arr = as_numpy(indices, f"{where} indices")
    elif isinstance(indices, np.ndarray) or hasattr(indices, "__cuda_array_interface__"):
        array_device(indices, f"{where} indices")  # (a masked array or a lazily negated tensor: refused)
        arr = xp.asarray(indices)  # CuPy params: a CuPy view of a GPU array (a torch CUDA tensor), or a copy
    else:
        raise TypeError(f"{where} indices must be an integer array, got {type(indices).__name__}")
    if np.dtype(arr.dtype).kind not in "iu":
        raise TypeError(f"{where} indices must be an integer array, got dtype {arr.dtype}")
    return arr if xp is np else xp.asarray(arr)


def _as_values_array(values, p, where: str):
    """The values as an array of the param's kind: NumPy (any host array, viewed) or CuPy (a GPU array, viewed);
    no copy between host and device."""
    xp = array_module(p)
    if values is None or isinstance(values, (list, tuple, numbers.Number)):
        raise TypeError(f"{where} values must be an array, got {type(values).__name__}")
    device = array_device(values, f"{where} values")
    if xp is np:
        if device == "device":
            raise TypeError(f"{where} values are a GPU array ({type(values).__name__}) but the param is a NumPy array")
        return as_numpy(values, f"{where} values")
    if device != "device":
        raise TypeError(f"{where} values are a host array ({type(values).__name__}) but the param is a CuPy array")
    return xp.asarray(values)


class _Plan:
    """One param's checked gradient, coalesced: u (sorted unique flat row numbers), vals (the values as
    (nnz, D)), src (None: row j of the gradient is vals[j]; else vals[src[j]] plus the repeats), dup_pos /
    dup_row / dup_bounds (the repeats: values row dup_pos[i] adds to gradient row dup_row[i], sorted by row;
    None when there are none)."""

    __slots__ = ("u", "vals", "src", "dup_pos", "dup_row", "nrows", "width")

    def __init__(self, u, vals, src, dup_pos, dup_row, nrows, width):
        self.u, self.vals, self.src, self.dup_pos, self.dup_row = u, vals, src, dup_pos, dup_row
        self.nrows, self.width = nrows, width


def _check_grad(grad, p, where: str, pname: str):
    """Check one gradient (indices, values) against its param and coalesce its indices (read-only: nothing
    is written). Returns a _Plan, or None for an empty gradient (nnz = 0)."""
    if not isinstance(grad, (tuple, list)) or len(grad) != 2:
        raise TypeError(f"{where} must be an (indices, values) pair or None, got {shown(grad)} "
                        f"({type(grad).__name__})")
    indices, values = grad
    xp = array_module(p)
    indices = _as_index_array(indices, p, where)
    if indices.ndim == 1:
        k, nnz = 1, int(indices.shape[0])
        if p.ndim == 0:
            raise ValueError(f"{where} indices are 1-D (row numbers) but {pname} is 0-d: give 2-D indices of shape "
                             f"(0, nnz)")
    elif indices.ndim == 2:
        k, nnz = int(indices.shape[0]), int(indices.shape[1])
        if k > p.ndim:
            raise ValueError(f"{where} indices have shape {tuple(indices.shape)}: {k} index dims but {pname} has only "
                             f"{p.ndim} dims (shape {tuple(p.shape)})")
    else:
        raise ValueError(f"{where} indices must be 1-D (rows) or 2-D (k, nnz), got shape {tuple(indices.shape)}")
    values = _as_values_array(values, p, where)
    if values.dtype != p.dtype:
        raise TypeError(f"{where} values have dtype {values.dtype} but {pname} has dtype {p.dtype}")
    expected = (nnz, *p.shape[k:])
    if tuple(values.shape) != expected:
        raise ValueError(f"{where} values have shape {tuple(values.shape)}, expected {expected} (nnz = {nnz} from "
                         f"the indices, then {pname}'s shape {tuple(p.shape)} after its first {k} dims)")
    if nnz == 0:
        return None
    # range: every index dim within the param's dim (negative indices are refused, not wrapped)
    ind2 = indices.reshape(k, nnz) if indices.ndim == 2 else indices.reshape(1, nnz)
    if k:
        lo = to_host(ind2.min(axis=1)).tolist()
        hi = to_host(ind2.max(axis=1)).tolist()
        for j in range(k):
            n = int(p.shape[j])
            if lo[j] < 0 or hi[j] >= n:
                bad = lo[j] if lo[j] < 0 else hi[j]
                what = "row index" if indices.ndim == 1 else f"index in dim {j}"
                raise ValueError(f"{where} indices out of range: {what} {bad} for {pname} of shape {tuple(p.shape)} "
                                 f"(must be in [0, {n}))")
    nrows = math.prod(int(n) for n in p.shape[:k])
    width = math.prod(int(n) for n in p.shape[k:])
    # the flat row number of each entry (row-major over the first k dims), as intp
    if k == 0:
        lin = xp.zeros(nnz, dtype=np.intp)
    else:
        lin = ind2[0].astype(np.intp, copy=False)
        for j in range(1, k):
            lin = lin * int(p.shape[j]) + ind2[j].astype(np.intp, copy=False)
    vals = values.reshape(nnz, width)
    if nnz == 1 or bool((lin[1:] > lin[:-1]).all()):
        # already coalesced (torch's coalesce() gives sorted unique indices): the values are used in place
        return _Plan(lin, vals, None, None, None, nrows, width)
    # coalesce: sorted unique rows, the first occurrence of each (np.unique sorts stably when asked for
    # return_index), and the repeats, added in the order given (torch adds them in the order of its own,
    # unstable, sort: the sums agree to rounding)
    u, first, inv = xp.unique(lin, return_index=True, return_inverse=True)
    inv = inv.reshape(-1)
    if int(u.shape[0]) == nnz:
        return _Plan(u, vals, first, None, None, nrows, width)
    dup_pos = xp.flatnonzero(first[inv] != xp.arange(nnz))
    dup_row = inv[dup_pos]
    order = xp.argsort(dup_row, kind="stable")  # by row, and within a row in the order given
    return _Plan(u, vals, first, dup_pos[order], dup_row[order], nrows, width)


def _hyper(name: str, value):
    return _HYPER[name].validate(value)


def _lr(value):
    """lr, checked. A NumPy float32 scalar keeps its type, so that the step size is computed in float32
    (_step_size), as torch.optim.SparseAdam computes it for a float32 tensor lr."""
    checked = _hyper("lr", value)
    return np.float32(checked) if isinstance(value, np.float32) else checked


def _check_betas(betas, where=""):
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{where}betas must be a pair (beta1, beta2), got {shown(betas)} ({type(betas).__name__})")
    return _hyper("beta1", betas[0]), _hyper("beta2", betas[1])


# ---------------------------------------------------------------------------------------------------
# the update (after every check)
# ---------------------------------------------------------------------------------------------------

def _step_size(lr, step: int, beta1: float, beta2: float):
    """lr * sqrt(1 - beta2^t) / (1 - beta1^t): in float64, or each operation in float32 for a NumPy float32 lr
    (torch's with a float32 tensor lr: the two bias corrections are Python floats rounded to float32)."""
    bias_correction1, root = 1.0 - beta1 ** step, math.sqrt(1.0 - beta2 ** step)
    if isinstance(lr, np.float32):
        return np.float32(lr * np.float32(root)) / np.float32(bias_correction1)
    return lr * root / bias_correction1


def _update(p, m, v, plan: _Plan, step: int, lr: float, beta1: float, beta2: float, eps: float,
            maximize: bool) -> None:
    """Apply one coalesced row-sparse Adam update (plan) to p, m, v in place. The operations, their order and
    their scalars are torch's (_functional.sparse_adam), chunk by chunk of rows."""
    xp = array_module(p)
    scalar = _compute_scalar(p.dtype)
    c1, c2 = scalar(1.0 - beta1), scalar(1.0 - beta2)
    step_size = _step_size(lr, step, beta1, beta2)
    neg_step, eps_s = scalar(-step_size), scalar(eps)
    width, u, vals = plan.width, plan.u, plan.vals
    p2, m2, v2 = p.reshape(plan.nrows, width), m.reshape(plan.nrows, width), v.reshape(plan.nrows, width)
    n = int(u.shape[0])
    rows_per_chunk = n if xp is not np else max(1, min(n, CHUNK_ELEMENTS // max(width, 1)))
    A = xp.empty((rows_per_chunk, width), p.dtype)   # m rows, then the update
    B = xp.empty_like(A)                             # v rows, then the denominator
    T = xp.empty_like(A)                             # scratch, then p rows
    own_grad = plan.src is not None or maximize
    G = xp.empty_like(A) if own_grad else None       # the chunk's gradient rows, when not used in place
    if plan.dup_row is not None:
        # where each chunk's repeats start in the row-sorted repeat list
        starts = to_host(xp.searchsorted(plan.dup_row, xp.arange(0, n + rows_per_chunk, rows_per_chunk))).tolist()
    for c, s in enumerate(range(0, n, rows_per_chunk)):
        e = min(n, s + rows_per_chunk)
        rows = u[s:e]
        a, b, t = A[:e - s], B[:e - s], T[:e - s]
        if own_grad:
            g = G[:e - s]
            if plan.src is None:
                xp.negative(vals[s:e], out=g)
            else:
                _take(xp, vals, plan.src[s:e], g)
                if plan.dup_row is not None and starts[c + 1] > starts[c]:
                    lo, hi = starts[c], starts[c + 1]
                    xp.add.at(g, plan.dup_row[lo:hi] - s, vals[plan.dup_pos[lo:hi]])
                if maximize:  # torch negates before summing: -(a) + -(b) == -(a + b) exactly
                    xp.negative(g, out=g)
        else:
            g = vals[s:e]
        _take(xp, m2, rows, a)
        _take(xp, v2, rows, b)
        # v += (g*g - v) * (1 - beta2)
        xp.multiply(g, g, out=t)
        xp.subtract(t, b, out=t)
        xp.multiply(t, c2, out=t)
        xp.add(b, t, out=b)
        # m += (g - m) * (1 - beta1)
        xp.subtract(g, a, out=t)
        xp.multiply(t, c1, out=t)
        xp.add(a, t, out=a)
        m2[rows] = a
        v2[rows] = b
        # p += -step_size * (m / (sqrt(v) + eps))
        xp.sqrt(b, out=b)
        xp.add(b, eps_s, out=b)
        xp.divide(a, b, out=a)
        xp.multiply(a, neg_step, out=a)
        _take(xp, p2, rows, t)
        xp.add(t, a, out=t)
        p2[rows] = t


# ---------------------------------------------------------------------------------------------------
# functional API
# ---------------------------------------------------------------------------------------------------

def _as_list(x):
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


def _coalesced(plan: _Plan):
    """The plan's gradient rows in the order of plan.u, repeated rows summed in the values' dtype in the order
    given (as _update sums them): the values themselves when already coalesced."""
    if plan.src is None:
        return plan.vals
    g = plan.vals[plan.src]  # a copy: the first occurrence of each row
    if plan.dup_row is not None:
        array_module(g).add.at(g, plan.dup_row, plan.vals[plan.dup_pos])
    return g


class PreparedStep:
    """A checked SparseAdam call (prepare_step's result): run() applies it. Everything that can fail on the
    data was checked when it was made, so that a caller with several calls (one per param group) checks
    them all before the first write."""

    __slots__ = ("work", "hyper", "written", "read")

    def __init__(self, work, hyper, written, read):
        self.work, self.hyper = work, hyper
        self.written = written  # (name, array) of the params and states run() writes
        self.read = read        # (name, values) of the gradients' values it reads

    def sum_of_squares(self) -> float:
        """The sum of squares of the call's coalesced gradients (the dense gradients'; clip_grad_norm= and
        skip_nonfinite=), row by row in the order of the rows, as torch's coalesced values."""
        return sum(sum_of_squares([_coalesced(plan)]) for _, _, _, plan, _ in self.work)

    def scaled(self, coef: float) -> PreparedStep:
        """The same call with the coalesced gradients times coef (repeated rows summed first, then scaled, as
        torch's coalesce then clipping; new arrays, the caller's are not written)."""
        work = [(p, m, v, _Plan(pl.u, scaled(_coalesced(pl), coef), None, None, None, pl.nrows, pl.width), t)
                for p, m, v, pl, t in self.work]
        return PreparedStep(work, self.hyper, self.written, self.read)

    def run(self) -> None:
        """Apply the update (in place). Once: running it twice applies it twice."""
        lr, beta1, beta2, eps, maximize = self.hyper
        for p, m, v, plan, t in self.work:
            _update(p, m, v, plan, t, lr, beta1, beta2, eps, maximize)


def prepare_step(params, grads, exp_avg, exp_avg_sq, *, step, lr: float = 1e-3, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, maximize: bool = False,
                 param_numbers=None) -> PreparedStep:
    """Check a sparse_adam_step call (same arguments) and coalesce its gradients, writing nothing; the
    result's run() applies it. param_numbers: the params' numbers in error messages (None: 0, 1, ...; a class
    numbers its params across groups, and fastopt.torch's skips those without a grad)."""
    single = not isinstance(params, (list, tuple))
    params = _as_list(params)
    grads = [grads] if single else _as_list(grads)
    ms, vs = _as_list(exp_avg), _as_list(exp_avg_sq)
    n = len(params)
    for name, lst in (("grads", grads), ("exp_avg", ms), ("exp_avg_sq", vs)):
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} entries but params has {n}")
    per_param = isinstance(step, (list, tuple))
    steps = list(step) if per_param else [step] * n
    if len(steps) != n:
        raise ValueError(f"step has {len(steps)} entries but params has {n}")

    def name(base, i):
        return base if single else f"{base}[{i if param_numbers is None else param_numbers[i]}]"

    steps = [as_step(s, name("step", i) if per_param else "step") for i, s in enumerate(steps)]
    hyper = (_lr(lr), _hyper("beta1", beta1), _hyper("beta2", beta2), _hyper("eps", eps),
             _hyper("maximize", maximize))
    work = []
    kinds = set()
    for i in range(n):
        pn = name("params", i)
        p = _check_param(params[i], pn)
        kinds.add(_kind(p))
        if len(kinds) > 1:
            raise TypeError(f"{pn}: one call updates arrays of one kind (got NumPy and CuPy params)")
        if grads[i] is None:
            continue
        m = _check_state(ms[i], p, name("exp_avg", i))
        v = _check_state(vs[i], p, name("exp_avg_sq", i))
        if _shares_memory(array_module(p), m, v):
            raise ValueError(f"{name('exp_avg', i)} and {name('exp_avg_sq', i)} share memory")
        plan = _check_grad(grads[i], p, name("grads", i), pn)
        if plan is not None:
            work.append((p, m, v, plan, steps[i], i))
    # every array written (params, states) apart from every other and from the values read (a param given
    # twice, two params that are views of one buffer, a grad's values inside a param)
    written = [(name(base, w[5]), a) for w in work for base, a in zip(("params", "exp_avg", "exp_avg_sq"), w)]
    read = [(name("grads", w[5]) + " values", w[3].vals) for w in work]
    check_disjoint(written, read)
    return PreparedStep([w[:5] for w in work], hyper, written, read)


def check_calls_disjoint(calls) -> None:
    """ValueError when prepared calls of one step (one per param group) share memory that one of them writes:
    each call checked its own arrays; a param of one group that is another's state or gradient values would be
    read by one call after another wrote it."""
    if len(calls) > 1:
        check_disjoint([w for call in calls for w in call.written], [r for call in calls for r in call.read])


def sparse_adam_step(params, grads, exp_avg, exp_avg_sq, *, step, lr: float = 1e-3, beta1: float = 0.9,
                     beta2: float = 0.999, eps: float = 1e-8, maximize: bool = False) -> None:
    """One SparseAdam update, in place, of every param that has a gradient (torch.optim.SparseAdam's rule):

        duplicates summed; then for each row r present, with t = step:
        g = -g if maximize
        m[r] += (g - m[r]) * (1 - beta1);   v[r] += (g * g - v[r]) * (1 - beta2)
        p[r] -= lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m[r] / (sqrt(v[r]) + eps)

    params, exp_avg, exp_avg_sq: one array or lists of arrays (C-contiguous float arrays, NumPy or CuPy; a
    state array has its param's shape and dtype). grads: for one param, a pair (indices, values) (see the
    module docstring: 1-D row indices or 2-D (k, nnz) COO indices) or None (skipped); for a list of params, a
    list of those. step: the 1-based step number, one int for every param or a list with one per param.
    lr > 0, beta1 and beta2 in [0, 1), eps > 0 (torch's checks and messages); a NumPy float32 lr computes the
    step size in float32, as torch does with a float32 tensor lr. Everything is checked before
    the first write; an empty gradient (nnz = 0) writes nothing.
    """
    prepare_step(params, grads, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                 maximize=maximize).run()


def _zeros_like(p):
    """Zeros shaped like p, of its dtype and kind; a CuPy param's on its device and producer stream (CuPy's
    zeros_like allocates on the current device, and fills on the current stream)."""
    if isinstance(p, np.ndarray):
        return np.zeros_like(p)
    from fastopt.backends import cupy_backend
    return cupy_backend.device_full(p.shape, 0.0, p.dtype, like=p)


def _data_ptr(a) -> int:
    if isinstance(a, np.ndarray):
        return a.__array_interface__["data"][0]
    return int(a.data.ptr)


# ---------------------------------------------------------------------------------------------------
# the class
# ---------------------------------------------------------------------------------------------------

class SparseAdam(GuardedSteps):
    """torch.optim.SparseAdam over NumPy / CuPy arrays (the rule: see sparse_adam_step and the module
    docstring).

        opt = SparseAdam(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False)
        opt.step(grads)   # one entry per param, in group order: (indices, values) or None (skipped)

    params: a list of arrays, or a list of param-group dicts {"params": [...], "lr": ...} (missing keys take
    the constructor's values). param_groups: list of dicts, editable between steps (hyperparameters are
    checked on every step). state: flat param index -> {"step": int, "exp_avg": array, "exp_avg_sq": array},
    created on the param's first gradient, like torch's; each param counts its own steps (+1 on every step
    that gives it a gradient, an empty one included). state_dict() / load_state_dict(): torch.optim's layout,
    NumPy arrays in place of tensors (a torch.optim.SparseAdam state dict, tensors included, loads here).
    zero_grad(): does nothing (this class keeps no gradients: they are step()'s argument). clip_grad_norm= and
    skip_nonfinite= (keyword-only): fastopt/grad_guard.py, over the coalesced gradients.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 maximize: bool = False, *, clip_grad_norm=None, skip_nonfinite=False):
        self._init_guard(clip_grad_norm, skip_nonfinite)
        self.defaults = self._checked_group({"lr": lr, "betas": betas, "eps": eps, "maximize": maximize}, "")
        self.param_groups: list[dict] = []
        self.state: dict[int, dict] = {}
        groups = as_param_groups(params)
        for group in groups:
            self.add_param_group(group)

    # ---- groups -------------------------------------------------------------------------------------

    @staticmethod
    def _checked_group(group: dict, where: str) -> dict:
        """The group's hyperparameters, checked (torch's messages), as Python values; other keys are kept."""
        out = dict(group)
        unknown = set(group) - set(_GROUP_KEYS) - {"params"}
        if unknown:
            raise TypeError(f"{where}unknown SparseAdam option(s) {sorted(unknown)}; it takes {list(_GROUP_KEYS)}")
        missing = [k for k in _GROUP_KEYS if k not in group]
        if missing:
            raise ValueError(f"{where}missing option(s) {missing}")
        out["lr"] = _hyper("lr", group["lr"])
        out["betas"] = _check_betas(group["betas"], where)
        out["eps"] = _hyper("eps", group["eps"])
        out["maximize"] = _hyper("maximize", group["maximize"])
        return out

    def add_param_group(self, group: dict) -> None:
        """Add {"params": [...], option: value, ...}; missing options take the constructor's values."""
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError("a param group must be a dict with a 'params' key")
        where = f"param group {len(self.param_groups)}: "
        params = group["params"]
        params = [params] if hasattr(params, "shape") else list(params)
        if not params:
            raise ValueError(f"{where}has no params")
        start = self._count()
        checked = [_check_param(p, f"params[{start + i}]") for i, p in enumerate(params)]
        kinds = {_kind(p) for p in checked} | {_kind(p) for p in self._flat_params()}
        if len(kinds) > 1:
            raise TypeError("params: one optimizer updates arrays of one kind (got NumPy and CuPy arrays)")
        known = {(_kind(p), _data_ptr(p)) for p in self._flat_params()}
        for i, p in enumerate(checked):
            key = (_kind(p), _data_ptr(p))
            if key in known and p.size:
                raise ValueError(f"{where}params[{start + i}] appears in more than one place (each param once)")
            known.add(key)
        full = {**self.defaults, **{k: v for k, v in group.items() if k != "params"}}
        full = self._checked_group(full, where)
        full["params"] = checked
        self.param_groups.append(full)

    def _flat_params(self) -> list:
        return [p for g in self.param_groups for p in g["params"]]

    def _count(self) -> int:
        return sum(len(g["params"]) for g in self.param_groups)

    @property
    def params(self) -> list:
        """Every param, in group order (the order of step(grads))."""
        return self._flat_params()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Does nothing, on purpose: gradients are step()'s argument, this class keeps none (fastopt.torch's
        SparseAdam reads and clears p.grad like torch.optim)."""

    # ---- step ---------------------------------------------------------------------------------------

    def step(self, grads) -> None:
        """One update of every param with a gradient. grads: a list, one entry per param in group order, each
        an (indices, values) pair or None (that param is skipped: no state, no step count). Everything is
        checked (every group's options, every param, state and gradient) before the first write."""
        if not isinstance(grads, (tuple, list)):
            raise TypeError(f"grads must be a list with one (indices, values) pair or None per param, got "
                            f"{type(grads).__name__}")
        n = self._count()
        if len(grads) != n:
            raise ValueError(f"grads has {len(grads)} entries but the optimizer has {n} params")
        calls, new_states, counted = [], {}, []
        start = 0
        for gi, group in enumerate(self.param_groups):
            hp = self._checked_group(group, f"param_groups[{gi}]: ")
            params = list(group["params"])
            ms, vs, steps = [], [], []
            for j, p in enumerate(params):
                i = start + j
                st = self.state.get(i)
                if grads[i] is None:
                    ms.append(None), vs.append(None), steps.append(1)
                    continue
                if st is None:  # created on the first gradient, like torch; kept only if the step goes ahead
                    p = _check_param(p, f"params[{i}]")
                    st = new_states[i] = {"step": 0, "exp_avg": _zeros_like(p), "exp_avg_sq": _zeros_like(p)}
                count = st.get("step")
                if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
                    raise ValueError(f"state[{i}]['step'] must be a count >= 0, got {shown(count)}")
                ms.append(st.get("exp_avg")), vs.append(st.get("exp_avg_sq"))
                steps.append(as_step(int(count) + 1, f"state[{i}]['step'] + 1"))
                counted.append((i, steps[-1]))
            calls.append(prepare_step(params, grads[start:start + len(params)], ms, vs, step=steps, lr=hp["lr"],
                                      beta1=hp["betas"][0], beta2=hp["betas"][1], eps=hp["eps"],
                                      maximize=hp["maximize"], param_numbers=range(start, start + len(params))))
            start += len(params)
        check_calls_disjoint(calls)
        coef = self.guard_sum(lambda: sum(call.sum_of_squares() for call in calls))
        if coef is None:
            return
        if coef != 1.0:
            calls = [call.scaled(coef) for call in calls]
        self.state.update(new_states)
        for call in calls:
            call.run()
        for i, t in counted:
            self.state[i]["step"] = t

    # ---- state dict ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """{"state": {index: {"step": int, "exp_avg": ndarray, "exp_avg_sq": ndarray}}, "param_groups":
        [{"lr", "betas", "eps", "maximize", "params": [indices]}]}: torch.optim.SparseAdam's layout, host
        copies (never the live arrays)."""
        groups, index = [], 0
        for g in self.param_groups:
            out = {k: v for k, v in g.items() if k != "params"}
            out["params"] = list(range(index, index + len(g["params"])))
            index += len(g["params"])
            groups.append(out)
        state = {i: {"step": int(st["step"]), "exp_avg": to_host(st["exp_avg"]),
                     "exp_avg_sq": to_host(st["exp_avg_sq"])} for i, st in sorted(self.state.items())}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Load a state dict of this class or of torch.optim.SparseAdam (tensors or arrays) for the same params
        in the same groups. The group options come from it (the params stay); state arrays are copied, cast to
        the param's dtype like torch does. Everything is checked before anything is replaced."""
        if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict must be a mapping with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, the optimizer has "
                             f"{len(self.param_groups)}")
        new_groups, id_map, index = [], {}, 0
        for gi, (saved, live) in enumerate(zip(saved_groups, self.param_groups)):
            if not isinstance(saved, Mapping) or "params" not in saved:
                raise ValueError(f"state_dict param_groups[{gi}] must be a mapping with 'params'")
            if len(saved["params"]) != len(live["params"]):
                raise ValueError(f"state_dict param_groups[{gi}] has {len(saved['params'])} params, the optimizer's "
                                 f"group has {len(live['params'])}")
            options = {k: v for k, v in saved.items() if k != "params"}
            group = self._checked_group(options, f"state_dict param_groups[{gi}]: ")
            group["params"] = live["params"]
            new_groups.append(group)
            for saved_id in saved["params"]:
                if saved_id in id_map:  # its state would go to one param only
                    raise ValueError(f"state_dict param_groups[{gi}] lists param {shown(saved_id)} a second time")
                id_map[saved_id] = index
                index += 1
        params = self._flat_params()
        new_state = {}
        saved_state = state_dict["state"]
        if not isinstance(saved_state, Mapping):
            raise ValueError("state_dict['state'] must be a mapping")
        for key, entry in saved_state.items():
            if key not in id_map:
                raise ValueError(f"state_dict state has an entry for param {shown(key)}, which no group lists")
            i = id_map[key]
            p = params[i]
            where = f"state_dict state[{shown(key)}]"
            if not isinstance(entry, Mapping) or set(entry) != {"step", "exp_avg", "exp_avg_sq"}:
                raise ValueError(f"{where} must have exactly 'step', 'exp_avg', 'exp_avg_sq', got "
                                 f"{sorted(map(str, entry)) if isinstance(entry, Mapping) else type(entry).__name__}")
            count = entry["step"]
            if hasattr(count, "item") and getattr(count, "shape", None) in ((), (1,)):
                count = count.item()
            if isinstance(count, float) and count.is_integer():
                count = int(count)
            if isinstance(count, bool) or not isinstance(count, numbers.Integral) or not 0 <= count < 2 ** 53:
                raise ValueError(f"{where}['step'] must be a whole number >= 0, got {shown(entry['step'])}")
            arrays = {}
            for name in ("exp_avg", "exp_avg_sq"):
                host = _host_array(entry[name], f"{where}['{name}']")
                if tuple(host.shape) != tuple(p.shape):
                    raise ValueError(f"{where}['{name}'] has shape {tuple(host.shape)} but params[{i}] has shape "
                                     f"{tuple(p.shape)}")
                if np.dtype(host.dtype).name not in _FLOAT_NAMES:
                    raise TypeError(f"{where}['{name}'] must be a float array, got dtype {host.dtype}")
                arrays[name] = host
            new_state[i] = (int(count), arrays)
        # every check passed: copy in (fresh arrays on the params' device, in the param's dtype)
        state = {}
        for i, (count, arrays) in sorted(new_state.items()):
            p = params[i]
            xp = array_module(p)
            st = {"step": count}
            for name, host in arrays.items():
                st[name] = xp.array(np.array(host, dtype=p.dtype, copy=True)) if xp is not np else \
                    np.array(host, dtype=p.dtype, copy=True)
            state[i] = st
        self.param_groups = new_groups
        self.state = state

    def __repr__(self):
        return groups_repr("SparseAdam", self.param_groups, _GROUP_KEYS)


def _host_array(x, where: str) -> np.ndarray:
    """A saved state array (NumPy, CuPy, a torch tensor on any device, anything exposing its memory) as a
    NumPy array (not a copy when already one: the caller copies)."""
    if isinstance(x, np.ndarray):
        return x
    try:
        return to_host(x)
    except TypeError:
        raise TypeError(f"{where} must be an array, got {type(x).__name__}") from None
