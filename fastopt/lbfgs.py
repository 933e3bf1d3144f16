"""L-BFGS as torch.optim.LBFGS, over NumPy or CuPy arrays: `fastopt.LBFGS`.

    opt = fastopt.LBFGS([w, b], lr=1, line_search_fn="strong_wolfe")
    def closure():
        loss, (gw, gb) = loss_and_grads(w, b)     # the gradients, in the order of the params
        return loss, [gw, gb]
    for _ in range(10):
        opt.step(closure)

The algorithm, its order of operations and its stopping rules are torch.optim.LBFGS's (torch 2.13), so that
float64 trajectories agree with torch's to rounding (the only differences are the summation orders of the
dot products and sums): see `lbfgs_step`. The scalars (y.s, rho, H_diag, the two-loop coefficients, g.d)
are NumPy scalars of the flat vectors' dtype where torch keeps 0-d tensors, and Python floats where torch
has Python floats, so float32 runs round as torch's do too (NumPy 2's scalar promotion is torch's).

Cost model. A step is closure evaluations plus vector work over the n elements of all params:
- the gradient of each evaluation is gathered into ONE contiguous buffer (torch's _gather_flat_grad): one
  pass; the direction, the history pairs (y, s) and the params' snapshot are contiguous buffers of the same
  dtype (the params' promoted dtype);
- each iteration: y = g - g_prev and s = t d (one pass each, s reused from the previous iteration's
  progress check), 2 + 2 m dot products (BLAS) and 2 m axpys (m = history length) for the two-loop
  recursion, one pass for -g, one for the update x += t d;
- every axpy (y += a x, the params' update included) is ONE pass: fastopt's compiled SGD kernel (p -= lr g,
  with `maximize` for the sign) for large vectors (>= AXPY_KERNEL_MIN elements, multi-threaded), a NumPy
  multiply and add through a scratch buffer below that, where the kernel's call overhead costs more than
  the second pass;
- one copy of the params per step(), taken before the first write, restores them if the step raises
  (the line search reuses it as its starting point for the first iteration, as torch clones the params);
- the line search evaluates at x + t d computed from its snapshot x, as torch, but does not copy x back
  after each trial: only before the next trial, and not at all when the step it returns is the last trial.
No array of the state is written during a step: the step builds the new history and direction in other
buffers and commits them at its end, which is what lets a failed step leave the optimizer unchanged.
Buffers are recycled rather than allocated (a fresh buffer costs page faults, more than a pass over it):
the ones this step made once nothing uses them, and, in the NumPy class, the old state's dropped ones
(popped history, the replaced direction and gradient) after the step has succeeded.
"""
from __future__ import annotations

import importlib
import math
import numbers

import numpy as np

from fastopt.arrays import array_device, array_module, as_numpy
from fastopt.functional import sgd_step
from fastopt.specs import COMPOSITE, Hyper, as_bool, groups_repr, shown

__all__ = ["LBFGS", "ParamVector", "lbfgs_step", "check_group", "SPEC", "AXPY_KERNEL_MIN", "STATE_KEYS"]

SPEC = COMPOSITE["lbfgs"]
_HYPERS: dict[str, Hyper] = {h.name: h for h in SPEC.hypers}

# vectors at least this long go through the compiled one-pass axpy; shorter ones through NumPy: two passes,
# but no ~10 us of validation and dispatch per call, and while the vectors sit in cache the second pass is
# cheap (one thread, float64: NumPy 59 us vs the kernel 72 us at 131072 elements, 457 vs 379 us at 524288)
AXPY_KERNEL_MIN = 1 << 18

# torch.optim.LBFGS's state keys (kept under the first param): counters, the last direction and step, the
# history, the scale of the initial Hessian, the last gradient and loss, the two-loop coefficients
STATE_KEYS = ("func_evals", "n_iter", "d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad",
              "prev_loss", "al")
_ARRAY_KEYS = ("d", "prev_flat_grad")
_LIST_KEYS = ("old_dirs", "old_stps")
_SCALAR_LIST_KEYS = ("ro", "al")
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")

# the group key that may be absent (torch.optim.LBFGS < 2.15 has no maximize; its step reads group.get("maximize", False))
_OPTIONAL_KEY = "maximize"

SINGLE_GROUP_MESSAGE = "LBFGS doesn't support per-parameter options (parameter groups)"  # torch's words
LINE_SEARCH_MESSAGE = "only 'strong_wolfe' is supported"                                # torch's words


# ---------------------------------------------------------------------------------------------------
# Hyperparameters
# ---------------------------------------------------------------------------------------------------

def _check_int(name, value, low=1):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {shown(value)} ({type(value).__name__})")
    value = int(value)
    if value < low:
        raise ValueError(f"Invalid {name}: {shown(value)} (must be >= {low})")
    return value


def check_group(group: dict, line_search_error=ValueError) -> dict:
    """The hyperparameters of LBFGS's param group, checked: lr a real >= 0 (torch: "Invalid learning rate"),
    max_iter and history_size ints >= 1, max_eval an int >= 1 or None (then max_iter * 5 // 4, as torch's
    constructor), the tolerances finite reals, line_search_fn None or "strong_wolfe", maximize a bool (a group
    without the key minimizes: torch's group.get("maximize", False); torch < 2.15 has no such key). Returns the
    values as Python floats/ints/bools; raises TypeError / ValueError naming the argument and echoing the value.
    `line_search_error`: the class for a bad line_search_fn (fastopt.torch raises torch's RuntimeError)."""
    missing = [name for name in _HYPERS if name not in group and name != _OPTIONAL_KEY]
    if missing:
        raise ValueError(f"LBFGS param group is missing {', '.join(missing)}")
    lr = _HYPERS["lr"].validate(group["lr"])
    hp = {
        # a Python int or float is used as given, as torch does (lr=1 leaves t = 1, an int, in the state)
        "lr": group["lr"] if type(group["lr"]) in (int, float) else lr,
        "max_iter": _check_int("max_iter", group["max_iter"]),
        "tolerance_grad": _HYPERS["tolerance_grad"].validate(group["tolerance_grad"]),
        "tolerance_change": _HYPERS["tolerance_change"].validate(group["tolerance_change"]),
        "history_size": _check_int("history_size", group["history_size"]),
    }
    max_eval = group["max_eval"]
    hp["max_eval"] = hp["max_iter"] * 5 // 4 if max_eval is None else _check_int("max_eval", max_eval)
    fn = group["line_search_fn"]
    if fn is not None and fn != "strong_wolfe":
        if line_search_error is ValueError:
            raise ValueError(f"Invalid line_search_fn: {shown(fn)} ({LINE_SEARCH_MESSAGE}, or None)")
        raise line_search_error(LINE_SEARCH_MESSAGE)
    hp["line_search_fn"] = fn
    hp["maximize"] = as_bool("maximize", group.get("maximize", False))
    return hp


# ---------------------------------------------------------------------------------------------------
# The flat vector space of the params
# ---------------------------------------------------------------------------------------------------

def _scalar(x):
    """A reduction's result as a NumPy scalar of its dtype (a CuPy 0-d array comes to the host)."""
    if isinstance(x, np.generic):
        return x
    if isinstance(x, np.ndarray):
        return x[()]
    return x.get()[()]


class ParamVector:
    """The params seen as one vector of n elements (torch's flat view: each param's elements in row-major
    order, params in order), and the vector operations L-BFGS needs, over NumPy or CuPy arrays.

    `params`: the arrays to update in place (any strides; one kind: all NumPy or all CuPy). `dtype`: the
    flat vectors' dtype, the params' promoted dtype (torch.cat's rule). Flat vectors (gradient, direction,
    history, snapshot) are contiguous 1-D arrays of that dtype, all made here.
    """

    def __init__(self, params: list):
        self.params = list(params)
        self.xp = array_module(self.params[0]) if self.params else np
        dtypes = [np.dtype(p.dtype) for p in self.params]
        if len(set(dtypes)) == 1:
            self.dtype = dtypes[0]
        else:
            try:
                self.dtype = np.result_type(*dtypes)
            except TypeError:  # e.g. float16 with ml_dtypes' bfloat16: torch.cat gives float32
                self.dtype = np.dtype(np.float32)
        self.shapes = [tuple(p.shape) for p in self.params]
        self.sizes = [int(p.size) for p in self.params]
        self.offsets = np.cumsum([0] + self.sizes).tolist()
        self.n = self.offsets[-1]
        # the compiled one-pass update needs a C-contiguous param of the flat dtype
        self._direct = [p.dtype == self.dtype and p.flags.c_contiguous and p.size > 0 for p in self.params]
        self._kernel = self.xp is not np or self.n >= AXPY_KERNEL_MIN
        self._scratch = None
        self._at = None   # (x, t, d) when the params hold x + t d computed from the snapshot x
        self.writes = 0   # in-place writes to the params so far (fastopt.torch bumps autograd's versions by it)
        # flat buffers are recycled (a fresh one costs page faults, more than a pass over it): _made holds
        # every buffer made or reused in the current step, _free those nobody uses any more. The state's
        # buffers that a step drops (popped history, the last direction and gradient) join _free only at the
        # step's end, and only when recycle_state is set (the NumPy class: its state is its own; the torch
        # front end's state tensors are torch's and stay untouched once dropped, as in torch).
        self.recycle_state = False
        self._made: dict = {}
        self._free: list = []
        self._retired: list = []

    # --- flat vectors ------------------------------------------------------------------------------
    def begin_step(self) -> None:
        self._made = {id(b): b for b in self._free}
        self._retired = []

    def end_step(self, ok: bool) -> None:
        """Kept for the next step: the free buffers (at most what this step used at its peak)."""
        self._free = self._free + self._retired if ok else []
        self._made, self._retired = {}, []
        self._at = None

    def take(self):
        """A flat buffer (contents undefined): a recycled one of this step, else a new one."""
        buf = self._free.pop() if self._free else self.xp.empty(self.n, self.dtype)
        self._made[id(buf)] = buf
        if self._at is not None and any(buf is a for a in self._at):
            self._at = None
        return buf

    def give(self, buf) -> None:
        """buf is used by nobody any more: recycled now if this step made it; a buffer of the old state
        once the step has succeeded, if recycle_state (else it is left alone)."""
        if buf is None or any(b is buf for b in self._free) or any(b is buf for b in self._retired):
            return
        if self._made.get(id(buf)) is buf:
            self._free.append(buf)
        elif self.recycle_state and getattr(buf, "shape", None) == (self.n,) and buf.dtype == self.dtype \
                and (buf.flags.c_contiguous if hasattr(buf, "flags") else True):
            self._retired.append(buf)

    def slices(self, flat):
        """The views of a flat vector shaped like each param."""
        o = self.offsets
        return [flat[o[i]:o[i + 1]].reshape(shape) for i, shape in enumerate(self.shapes)]

    def gather(self, grads) -> object:
        """A new flat vector holding the grads (None: zeros, as torch's _gather_flat_grad). The grads were
        checked by the caller (one per param, its shape and dtype)."""
        flat = self.take()
        for view, g in zip(self.slices(flat), grads):
            if g is None:
                view[...] = 0
            else:
                self.xp.copyto(view, g, casting="same_kind")
        return flat

    def snapshot(self, out=None):
        """The params copied into a flat vector (exact: the flat dtype holds every param's values)."""
        flat = self.take() if out is None else out
        for view, p in zip(self.slices(flat), self.params):
            self.xp.copyto(view, p, casting="same_kind")
        self._at = (flat, None, None)
        return flat

    def restore(self, x) -> None:
        """params = x (a snapshot): back to the same bytes."""
        self.writes += 1
        for p, view in zip(self.params, self.slices(x)):
            self.xp.copyto(p, view, casting="same_kind")
        self._at = (x, None, None)

    # --- arithmetic --------------------------------------------------------------------------------
    def __getstate__(self):  # pickling, deepcopy: the array module by name
        state = dict(self.__dict__)
        state["xp"] = self.xp.__name__
        return state

    def __setstate__(self, state):
        state["xp"] = np if state["xp"] == "numpy" else importlib.import_module(state["xp"])
        self.__dict__.update(state)

    def axpy(self, y, a, x) -> None:
        """y += a * x over flat vectors, in one pass when the kernel applies (torch: y.add_(x, alpha=a))."""
        if self._kernel and math.isfinite(a):
            lr = float(a)
            # fastopt's SGD kernel: p -= lr * g, or p += lr * g with maximize: one read of each, one write
            sgd_step(y, x, lr=abs(lr), maximize=lr > 0)
            return
        if self._scratch is None:
            self._scratch = self.xp.empty(self.n, self.dtype)
        tmp = self._scratch
        self.xp.multiply(x, a, out=tmp)
        self.xp.add(y, tmp, out=y)

    def add(self, t, d) -> None:
        """params += t * d (torch's _add_grad); t is a float or a scalar of the flat dtype. One multi-tensor
        kernel call (one pass per param) for the C-contiguous params of the flat dtype when the vector is
        large; NumPy's multiply and add for the others (small vectors, strided or lower-precision params)."""
        self._at = None
        self.writes += 1
        views = self.slices(d)
        direct = [i for i, ok in enumerate(self._direct) if ok]
        if self._kernel and direct and math.isfinite(t):
            lr = float(t)
            sgd_step([self.params[i] for i in direct], [views[i] for i in direct], lr=abs(lr), maximize=lr > 0)
        else:
            direct = []
        done = set(direct)
        if self.dtype.itemsize < 4 and isinstance(t, float):
            # torch's alpha: the Python float to float32, then to 16 bits (NumPy rounds it to 16 bits at once,
            # which differs where the float32 value is a 16-bit tie)
            t = self.dtype.type(np.float32(t))
        for i, (p, v) in enumerate(zip(self.params, views)):
            if i in done or p.size == 0:
                continue
            if p.dtype == self.dtype:
                p += self.xp.multiply(v, t)
            else:  # computed in the flat dtype, rounded once to the param's (torch's mixed-dtype add_)
                self.xp.add(p, self.xp.multiply(v, t), out=p, casting="same_kind")

    def move(self, x, t, d) -> None:
        """params = x + t d, computed as torch does (restore x, then add t d); nothing to do when the params
        already hold exactly that (the last trial of a line search is usually the step it returns)."""
        at = self._at
        if at is not None and at[0] is x and at[1] is t and at[2] is d:
            return
        if at is None or at[0] is not x or at[1] is not None:
            self.restore(x)
        self.add(t, d)
        self._at = (x, t, d)

    def neg(self, g):
        return self.xp.negative(g, out=self.take())

    def sub(self, a, b):
        return self.xp.subtract(a, b, out=self.take())

    def mul(self, a, t):
        """a * t into a new flat vector. For 16-bit vectors and a Python float t (the line search's step),
        torch multiplies in float32 (t rounded to float32, one rounding to 16 bits at the end), where NumPy's
        float16 loop would round t to float16 first."""
        out = self.take()
        if self.dtype.itemsize < 4 and isinstance(t, float):
            wide = a.astype(np.float32)
            wide *= np.float32(t)
            out[...] = wide.astype(self.dtype)
            return out
        return self.xp.multiply(a, t, out=out)

    def dot(self, a, b):
        return _scalar(self.xp.dot(a, b))

    def abs_max(self, v):
        """max |v| as torch's v.abs().max() (NaN propagates), read twice instead of writing |v|."""
        return _scalar(self.xp.maximum(v.max(), -v.min()))

    def abs_sum(self, v):
        """sum |v| as torch's v.abs().sum(): 16-bit vectors summed in float32 and rounded once (NumPy sums
        ml_dtypes' bfloat16 in bfloat16, rounding every partial sum: half of the sums came out another value)."""
        tmp = self.xp.abs(v, out=self.take())
        if self.dtype.itemsize < 4:
            total = np.asarray(_scalar(tmp.sum(dtype=np.float32))).astype(self.dtype)[()]
        else:
            total = _scalar(tmp.sum())
        self.give(tmp)
        return total


# ---------------------------------------------------------------------------------------------------
# The step: torch.optim.LBFGS.step and its line search, over a ParamVector
# ---------------------------------------------------------------------------------------------------

def _cubic_interpolate(x1, f1, g1, x2, f2, g2, bounds=None):
    """torch's _cubic_interpolate (minimum of the cubic through two points with slopes, clamped), with the
    same operand types (g1, g2 scalars of the flat dtype)."""
    if bounds is not None:
        xmin_bound, xmax_bound = bounds
    else:
        xmin_bound, xmax_bound = (x1, x2) if x1 <= x2 else (x2, x1)
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1 ** 2 - g1 * g2
    if d2_square >= 0:
        d2 = np.sqrt(d2_square)
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            min_pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(min_pos, xmin_bound), xmax_bound)
    return (xmin_bound + xmax_bound) / 2.0


def _strong_wolfe(obj_func, vec, x, t, d, f, g, gtd, c1=1e-4, c2=0.9, tolerance_change=1e-9, max_ls=25):
    """torch's _strong_wolfe: bracketing then zoom by cubic interpolation. Gradients are fresh buffers from
    each evaluation and never written, so the brackets hold them without torch's clones."""
    d_norm = vec.abs_max(d)
    f_new, g_new = obj_func(x, t, d)
    ls_func_evals = 1
    gtd_new = vec.dot(g_new, d)

    t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
    done = False
    ls_iter = 0
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new], [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, bracket_f, bracket_g = [t], [f_new], [g_new]
            done = True
            break
        if gtd_new >= 0:
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new], [gtd_prev, gtd_new]
            break
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        tmp = t
        t = _cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(min_step, max_step))
        t_prev, f_prev, g_prev, gtd_prev = tmp, f_new, g_new, gtd_new
        f_new, g_new = obj_func(x, t, d)
        ls_func_evals += 1
        gtd_new = vec.dot(g_new, d)
        ls_iter += 1

    if ls_iter == max_ls:
        bracket, bracket_f, bracket_g = [0, t], [f, f_new], [g, g_new]

    insuf_progress = False
    low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        t = _cubic_interpolate(bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1])
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:
            if insuf_progress or t >= max(bracket) or t <= min(bracket):
                if abs(t - max(bracket)) < abs(t - min(bracket)):
                    t = max(bracket) - eps
                else:
                    t = min(bracket) + eps
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False

        f_new, g_new = obj_func(x, t, d)
        ls_func_evals += 1
        gtd_new = vec.dot(g_new, d)
        ls_iter += 1

        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
            bracket[high_pos], bracket_f[high_pos] = t, f_new
            bracket_g[high_pos], bracket_gtd[high_pos] = g_new, gtd_new
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                bracket[high_pos], bracket_f[high_pos] = bracket[low_pos], bracket_f[low_pos]
                bracket_g[high_pos], bracket_gtd[high_pos] = bracket_g[low_pos], bracket_gtd[low_pos]
            bracket[low_pos], bracket_f[low_pos] = t, f_new
            bracket_g[low_pos], bracket_gtd[low_pos] = g_new, gtd_new

    return bracket_f[low_pos], bracket_g[low_pos], bracket[low_pos], ls_func_evals


def lbfgs_step(vec: ParamVector, evaluate, state: dict, hp: dict):
    """One torch.optim.LBFGS step. `evaluate()` runs the closure at the params' current values and returns
    (loss as the closure gave it, float(loss), the gradient as a new flat vector of vec's dtype). `state`: the
    current state (torch's keys; read, never written). `hp`: check_group's values.

    Returns (the first evaluation's loss as the closure gave it, the new state dict). If anything raises
    (the closure included), the params are restored to their values at the call, byte for byte, and the
    exception propagates; the caller then keeps its old state.
    """
    vec.begin_step()
    x0 = vec.snapshot()
    try:
        with np.errstate(all="ignore"):  # torch's 0-d tensors divide by zero and overflow silently
            result = _lbfgs_step(vec, evaluate, state, hp, x0)
    except BaseException:
        vec.restore(x0)
        vec.end_step(ok=False)
        raise
    vec.give(x0)
    vec.end_step(ok=True)
    return result


def _lbfgs_step(vec, evaluate, state, hp, x0):
    lr, max_iter, max_eval = hp["lr"], hp["max_iter"], hp["max_eval"]
    tolerance_grad, tolerance_change = hp["tolerance_grad"], hp["tolerance_change"]
    line_search_fn, history_size = hp["line_search_fn"], hp["history_size"]

    new = dict(state)
    func_evals = state.get("func_evals", 0)
    total_iter = state.get("n_iter", 0)
    if hp.get("maximize", False):  # (an hp built by hand for torch < 2.15's groups may lack it)
        # torch 2.15: the loss and the flat gradient negated as they are read (-float(loss), flat_grad.neg_()),
        # so the algorithm minimizes -f; the state holds -f's values (prev_loss, gradients) and step() returns
        # the closure's first loss as the closure gave it
        minimize_evaluate = evaluate

        def evaluate():
            orig, value, flat = minimize_evaluate()
            vec.xp.negative(flat, out=flat)   # a fresh buffer of this step: negated in place, exact
            return orig, -value, flat

    orig_loss, loss, flat_grad = evaluate()
    current_evals = 1
    func_evals += 1
    opt_cond = vec.abs_max(flat_grad) <= tolerance_grad
    if opt_cond:
        new["func_evals"], new["n_iter"] = func_evals, total_iter
        vec.give(flat_grad)
        return orig_loss, new

    d, t = state.get("d"), state.get("t")
    old_dirs, old_stps, ro = (None if state.get(k) is None else list(state[k]) for k in ("old_dirs", "old_stps", "ro"))
    H_diag = state.get("H_diag")
    prev_flat_grad, prev_loss = state.get("prev_flat_grad"), state.get("prev_loss")
    al = list(state["al"]) if "al" in state else None
    s_next = None   # t d from the last progress check: the next iteration's s

    n_iter = 0
    x_buf = None
    while n_iter < max_iter:
        n_iter += 1
        total_iter += 1

        # direction
        if total_iter == 1:
            d = vec.neg(flat_grad)
            old_dirs, old_stps, ro = [], [], []
            H_diag = 1
        else:
            y = vec.sub(flat_grad, prev_flat_grad)
            if prev_flat_grad is not flat_grad:
                vec.give(prev_flat_grad)
            if s_next is not None and s_next[0] is d and s_next[1] is t:
                s = s_next[2]
            else:
                s = vec.mul(d, t)
            s_next = None
            vec.give(d)   # the last direction: s holds what is still needed of it
            ys = vec.dot(y, s)
            if ys > 1e-10:
                if len(old_dirs) == history_size:
                    vec.give(old_dirs.pop(0))
                    vec.give(old_stps.pop(0))
                    ro.pop(0)
                old_dirs.append(y)
                old_stps.append(s)
                ro.append(1.0 / ys)
                H_diag = ys / vec.dot(y, y)
            else:
                vec.give(y)
                vec.give(s)
            num_old = len(old_dirs)
            if al is None or len(al) < history_size:  # scratch, one slot per pair (history_size raised: more)
                al = (al or []) + [None] * (history_size - len(al or []))
            q = vec.neg(flat_grad)
            for i in range(num_old - 1, -1, -1):
                al[i] = vec.dot(old_stps[i], q) * ro[i]
                vec.axpy(q, -al[i], old_dirs[i])
            if not (type(H_diag) is int and H_diag == 1):  # q * 1 is q
                vec.xp.multiply(q, H_diag, out=q)
            d = r = q
            for i in range(num_old):
                be_i = vec.dot(old_dirs[i], r) * ro[i]
                vec.axpy(r, al[i] - be_i, old_stps[i])

        prev_flat_grad = flat_grad   # never written afterwards: no copy needed
        prev_loss = loss

        # step length
        if total_iter == 1:
            t = min(1.0, 1.0 / vec.abs_sum(flat_grad)) * lr
        else:
            t = lr
        gtd = vec.dot(flat_grad, d)
        if gtd > -tolerance_change:
            break

        ls_func_evals = 0
        if line_search_fn is not None:
            if n_iter == 1:
                x_init = x0   # the params have not moved in this step yet
            else:
                x_buf = x_init = vec.snapshot(x_buf)
            trials = []

            def obj_func(x, t, d):
                vec.move(x, t, d)
                _, f, g = evaluate()
                trials.append(g)
                return f, g

            loss, flat_grad, t, ls_func_evals = _strong_wolfe(
                obj_func, vec, x_init, t, d, loss, flat_grad, gtd, max_ls=max_eval - current_evals)
            for g in trials:   # the gradients of the trials not taken
                if g is not flat_grad:
                    vec.give(g)
            del trials[:]
            vec.move(x_init, t, d)
            opt_cond = vec.abs_max(flat_grad) <= tolerance_grad
        else:
            vec.add(t, d)
            if n_iter != max_iter:
                _, loss, flat_grad = evaluate()
                opt_cond = vec.abs_max(flat_grad) <= tolerance_grad
                ls_func_evals = 1

        current_evals += ls_func_evals
        func_evals += ls_func_evals

        # stopping rules
        if n_iter == max_iter:
            break
        if current_evals >= max_eval:
            break
        if opt_cond:
            break
        s_next = (d, t, vec.mul(d, t))
        if vec.abs_max(s_next[2]) <= tolerance_change:
            break
        if abs(loss - prev_loss) < tolerance_change:
            break

    if s_next is not None:
        vec.give(s_next[2])
    if flat_grad is not prev_flat_grad:
        vec.give(flat_grad)
    vec.give(x_buf)

    # torch's key order: the counters, al (made in the loop), then what the end of its step assigns
    new["func_evals"], new["n_iter"] = func_evals, total_iter
    if al is not None:
        new["al"] = al
    new.update(d=d, t=t, old_dirs=old_dirs, old_stps=old_stps, ro=ro, H_diag=H_diag, prev_flat_grad=prev_flat_grad,
               prev_loss=prev_loss)
    return orig_loss, new


# ---------------------------------------------------------------------------------------------------
# State checks (load_state_dict)
# ---------------------------------------------------------------------------------------------------

def _as_state_array(value, name, n, dtype, xp):
    """A state vector from a state dict (NumPy/CuPy array, CPU tensor, ...) as a new 1-D array of the
    flat dtype and length n; TypeError / ValueError naming it."""
    if array_device(value, name) == "device":
        if xp is np:
            raise TypeError(f"{name} is a GPU array but the params are NumPy arrays")
        arr = xp.asarray(value)
    else:
        arr = np.asarray(as_numpy(value, name) if not isinstance(value, np.ndarray) else value)
    if np.dtype(arr.dtype).name not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
    if arr.size != n or arr.ndim != 1:
        raise ValueError(f"{name} must be a vector of {n} elements (the params' total size), got shape "
                         f"{tuple(arr.shape)}")
    out = xp.empty(n, dtype)
    out[...] = xp.asarray(arr)  # cast to the flat dtype, as torch casts state to the params' dtype
    return out


def _as_state_scalar(value, name, dtype, allow=(float,)):
    """A state scalar: a 0-d array or tensor becomes a NumPy scalar of the flat dtype (torch keeps a 0-d
    tensor of the params' dtype), a Python float or int stays as it is (torch keeps those too)."""
    if value is None and None in allow:
        return None
    if type(value) in (float, int) and type(value) in allow:
        return value  # as torch stored it (a non-finite value too: torch keeps what it computed)
    shape = getattr(value, "shape", None)
    if shape == () or isinstance(value, np.generic):
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().double().item()
            return np.dtype(dtype).type(value)
        arr = value.get() if type(value).__module__.startswith("cupy") else np.asarray(value)
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"{name} must be a real number, got dtype {arr.dtype}")
        return np.dtype(dtype).type(arr[()])
    raise TypeError(f"{name} must be a number (a float, or a 0-d array), got {shown(value)} "
                    f"({type(value).__name__})")


def check_state(state: dict, n: int, dtype, xp) -> dict:
    """A loaded state (torch's keys) converted to what lbfgs_step reads, checked whole before anything is
    used: arrays become new vectors of the flat dtype (torch casts them to the params' dtype), 0-d
    arrays/tensors NumPy scalars of it. Raises TypeError/ValueError naming the entry."""
    unknown = [k for k in state if k not in STATE_KEYS]
    if unknown:
        raise ValueError(f"LBFGS state has unknown entries {unknown}; expected some of {list(STATE_KEYS)}")
    out = {}
    for key in ("func_evals", "n_iter"):
        if key in state:
            v = state[key]
            if hasattr(v, "shape") and v.shape == ():
                v = v.item()
            out[key] = _check_int(f"state {key!r}", v, low=0)
    for key in _ARRAY_KEYS:
        if key in state:
            out[key] = None if state[key] is None else _as_state_array(state[key], f"state {key!r}", n, dtype, xp)
    for key in _LIST_KEYS + _SCALAR_LIST_KEYS:
        if key in state:
            v = state[key]
            if v is not None and not isinstance(v, (list, tuple)):
                raise TypeError(f"state {key!r} must be a list, got {type(v).__name__}")
            if v is None:
                out[key] = None
            elif key in _LIST_KEYS:
                out[key] = [_as_state_array(a, f"state {key!r}[{i}]", n, dtype, xp) for i, a in enumerate(v)]
            else:
                allow = (float, None) if key == "al" else (float,)
                out[key] = [_as_state_scalar(a, f"state {key!r}[{i}]", dtype, allow) for i, a in enumerate(v)]
    lengths = {k: len(out[k]) for k in ("old_dirs", "old_stps", "ro") if out.get(k) is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"LBFGS state: old_dirs, old_stps and ro must have the same length, got {lengths}")
    if "t" in state:
        out["t"] = _as_state_scalar(state["t"], "state 't'", dtype, (float, int, None))
    if "H_diag" in state:
        out["H_diag"] = _as_state_scalar(state["H_diag"], "state 'H_diag'", dtype, (float, int, None))
    if "prev_loss" in state:
        v = state["prev_loss"]
        if v is not None:
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
                if getattr(v, "shape", None) == ():
                    v = float(v.item())
                else:
                    raise TypeError(f"state 'prev_loss' must be a float, got {shown(v)} ({type(v).__name__})")
            v = float(v)
        out["prev_loss"] = v
    return out


def check_resumable(state: dict, history_size: int) -> None:
    """ValueError unless a checked state past its first iteration (n_iter > 0) holds what the next step reads, as
    torch's LBFGS saves it: the last direction d and step t, the history (old_dirs, old_stps, ro: at most
    history_size pairs), H_diag and prev_flat_grad. (`al` is scratch, written before it is read: the step pads it.)"""
    n_iter = state.get("n_iter", 0)
    if not n_iter:
        return
    missing = [k for k in ("d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad") if state.get(k) is None]
    if missing:
        raise ValueError(f"LBFGS state after {n_iter} iteration(s) lacks {', '.join(repr(k) for k in missing)}, "
                         f"which the next step reads")
    pairs = len(state["old_dirs"])
    if pairs > history_size:
        raise ValueError(f"LBFGS state holds {pairs} history pairs, more than history_size={history_size}")


# ---------------------------------------------------------------------------------------------------
# The NumPy / CuPy class
# ---------------------------------------------------------------------------------------------------

def _param_view(p, name):
    """The array to update for a param (a NumPy view of a host object, the CuPy array itself) and its checks:
    a floating dtype, writable."""
    if array_device(p, name) == "device":
        if not type(p).__module__.startswith("cupy"):
            import cupy
            p = cupy.asarray(p)
        view = p
    else:
        view = as_numpy(p, name)
        if not view.flags.writeable:
            raise ValueError(f"{name} is read-only: LBFGS updates params in place")
    if np.dtype(view.dtype).name not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating-point dtype (float16, bfloat16, float32, float64), "
                        f"got {view.dtype}")
    return view


class LBFGS:
    """L-BFGS (torch.optim.LBFGS's algorithm and options) over NumPy or CuPy arrays, closure-driven.

    LBFGS(params, lr=1, max_iter=20, max_eval=None, tolerance_grad=1e-7, tolerance_change=1e-9,
          history_size=100, line_search_fn=None, *, maximize=False)

    maximize: a bool, torch 2.15's option (torch.optim.LBFGS before 2.15 has none): the closure's loss and
        gradient are negated as they are read, so the step maximizes the objective; the state then holds the
        negated values (prev_loss, prev_flat_grad, ...: exactly those of maximize=False on -f) and step()
        still returns the first loss as the closure returned it.

    params: a list of arrays, or a list holding ONE param-group dict {"params": [...], ...} (L-BFGS has one
        group: torch's rule and error). Arrays: NumPy or CuPy (or host objects exposing their memory, e.g.
        torch CPU tensors), floating-point, writable, updated in place.
    step(closure): closure() evaluates the objective at the params' current values and returns
        (loss, grads): loss a real number (anything float() takes), grads a list with one gradient per param,
        in the order of the params, each of its param's shape and dtype, or None for "no gradient" (zeros,
        as torch treats a param whose .grad is None). It is called up to max_eval times per step. step
        returns the loss of the first call, as the closure returned it.
    param_groups: [dict] with "params" and the hyperparameters (maximize included), editable between steps
        (checked each step).
    state: {0: {...}} once a step ran: torch's state (kept under the first param): func_evals, n_iter, d, t,
        old_dirs, old_stps, ro, H_diag, prev_flat_grad, prev_loss, al; vectors are flat arrays of the
        params' (promoted) dtype, torch's 0-d tensors are NumPy scalars of that dtype.
    state_dict() / load_state_dict(): torch.optim's layout ({"state": {0: {...}}, "param_groups": [{...,
        "params": [0, 1, ...]}]}), arrays in place of tensors, copies both ways; load_state_dict also takes
        a torch.optim.LBFGS state dict (CPU tensors are read as arrays; a group without "maximize", torch's
        before 2.15, minimizes); a group key this class does not know raises ValueError, nothing changed.
    zero_grad(): does nothing (the closure returns the gradients); there for torch-shaped training loops.

    Update rule:

    {rule}

    Errors: bad hyperparameters raise TypeError/ValueError naming the argument (lr < 0: "Invalid learning
    rate: -1"), at construction and at each step before the first closure call. A closure result that is
    not (loss, grads) with one gradient of the right shape and dtype per param raises TypeError/ValueError;
    whatever raises during a step (the closure's own exceptions included) leaves the params at their values
    before the step, byte for byte, and the state unchanged.

    Cost: see the module docstring (fastopt/lbfgs.py): per iteration a few passes over the n elements plus
    2 m + 2 dot products and 2 m one-pass axpys (m = history length), the closure calls aside.
    """

    def __init__(self, params, lr=1, max_iter=20, max_eval=None, tolerance_grad=1e-7, tolerance_change=1e-9,
                 history_size=100, line_search_fn=None, *, maximize=False):
        if max_eval is None and not isinstance(max_iter, (bool, np.bool_)) and isinstance(max_iter, numbers.Integral):
            max_eval = int(max_iter) * 5 // 4  # torch's default, stored in the group
        defaults = {"lr": lr, "max_iter": max_iter, "max_eval": max_eval, "tolerance_grad": tolerance_grad,
                    "tolerance_change": tolerance_change, "history_size": history_size,
                    "line_search_fn": line_search_fn, "maximize": maximize}
        check_group(defaults)
        if isinstance(params, dict) or not hasattr(params, "__iter__") or hasattr(params, "shape"):
            raise TypeError("params must be a list of arrays or a list of one param-group dict, got "
                            f"{type(params).__name__}")
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        if isinstance(params[0], dict):
            if len(params) != 1 or not all(isinstance(g, dict) for g in params):
                raise ValueError(SINGLE_GROUP_MESSAGE)
            group = dict(params[0])
            if "params" not in group:
                raise ValueError("param group must have a 'params' key")
            unknown = [k for k in group if k != "params" and k not in defaults]
            if unknown:
                raise ValueError(f"param group has unknown options {unknown}")
            group["params"] = list(group["params"])
            for k, v in defaults.items():
                group.setdefault(k, v)
            check_group(group)
        else:
            group = dict(defaults, params=params)
        if any(isinstance(p, dict) for p in group["params"]):
            raise ValueError(SINGLE_GROUP_MESSAGE)
        self.defaults = defaults
        self.param_groups = [group]
        self.state: dict = {}
        self._vec = None
        self._vec_key = None
        self._check_params()

    # --- params ------------------------------------------------------------------------------------
    def _check_params(self) -> ParamVector:
        """The ParamVector of the group's params, rebuilt when the group's arrays changed; everything
        checked before any write."""
        if len(self.param_groups) != 1:
            raise ValueError(SINGLE_GROUP_MESSAGE)
        params = self.param_groups[0]["params"]
        vec = self._vec
        if (vec is not None and len(params) == len(self._vec_key)
                and all(a is b for a, b in zip(params, self._vec_key))
                and all(tuple(v.shape) == shape for v, shape in zip(vec.params, vec.shapes))):
            self._check_views(vec)   # the same arrays as checked: only what can change in place
            return vec
        if not params:
            raise ValueError("LBFGS: the param group has no params")
        views = [_param_view(p, f"params[{i}]") for i, p in enumerate(params)]
        kinds = {type(v).__module__.split(".")[0] for v in views}
        if len(kinds) > 1:
            raise TypeError("params mix NumPy and CuPy arrays: one LBFGS updates arrays of one kind")
        if sum(int(v.size) for v in views) == 0:
            raise ValueError("LBFGS needs at least one param element (every param has size 0)")
        vec = ParamVector(views)
        vec.recycle_state = True   # the state's arrays are this optimizer's own (state_dict() copies them)
        if self._vec is not None and (vec.n != self._vec.n or vec.dtype != self._vec.dtype) and self.state:
            raise ValueError(f"params changed from {self._vec.n} elements of {self._vec.dtype} to {vec.n} of "
                             f"{vec.dtype}: the LBFGS state no longer fits them")
        self._vec, self._vec_key = vec, list(params)  # the objects, kept alive: identity is meaningful
        return vec

    def _check_views(self, vec):
        for i, v in enumerate(vec.params):
            if isinstance(v, np.ndarray) and not v.flags.writeable:
                raise ValueError(f"params[{i}] is read-only: LBFGS updates params in place")

    def _check_grads(self, vec, grads):
        if isinstance(grads, dict) or not isinstance(grads, (list, tuple)):
            raise TypeError(f"the closure's grads must be a list (one gradient per param), got "
                            f"{type(grads).__name__}")
        if len(grads) != len(vec.params):
            raise ValueError(f"the closure returned {len(grads)} gradients for {len(vec.params)} params")
        out = []
        for i, (g, p) in enumerate(zip(grads, vec.params)):
            if g is None:
                out.append(None)
                continue
            name = f"grads[{i}]"
            if vec.xp is np:
                if array_device(g, name) != "host":
                    raise TypeError(f"{name} is a GPU array but the params are NumPy arrays")
                g = as_numpy(g, name)
            else:
                g = vec.xp.asarray(g)
            if g.dtype != p.dtype:
                raise TypeError(f"{name} has dtype {g.dtype}, its param {p.dtype}")
            if tuple(g.shape) != tuple(p.shape):
                raise ValueError(f"{name} has shape {tuple(g.shape)}, its param {tuple(p.shape)}")
            out.append(g)
        return out

    # --- the step ----------------------------------------------------------------------------------
    def step(self, closure):
        """One L-BFGS step (up to max_iter iterations, max_eval closure calls); returns the first loss, as the
        closure returned it (with maximize too)."""
        if not callable(closure):
            raise TypeError(f"closure must be callable (returning (loss, grads)), got {type(closure).__name__}")
        vec = self._check_params()
        hp = check_group(self.param_groups[0])
        state = self.state.get(0, {})

        def evaluate():
            result = closure()
            if not isinstance(result, (tuple, list)) or len(result) != 2:
                raise TypeError(f"the closure must return (loss, grads), got {shown(result)} "
                                f"({type(result).__name__})")
            loss, grads = result
            try:
                value = float(loss)
            except (TypeError, ValueError):
                raise TypeError(f"the closure's loss must be a real number, got {shown(loss)} "
                                f"({type(loss).__name__})") from None
            return loss, value, vec.gather(self._check_grads(vec, grads))

        loss, new = lbfgs_step(vec, evaluate, state, hp)
        self.state[0] = new
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: the closure returns the gradients (kept for torch-shaped loops)."""

    def __repr__(self):
        return groups_repr(type(self).__name__, self.param_groups)

    # --- state dicts -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch.optim's layout, with copies of the state's arrays (host copies for CuPy state)."""
        group = self.param_groups[0]
        groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": list(range(len(group["params"])))}]
        state = {}
        if 0 in self.state:
            state[0] = {k: _copy_value(v) for k, v in self.state[0].items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this layout (from fastopt.LBFGS or torch.optim.LBFGS): hyperparameters and
        state, checked whole before anything changes; arrays are copied in, as the flat dtype."""
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict or "state" not in state_dict:
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups'")
        groups = state_dict["param_groups"]
        if len(groups) != 1:
            raise ValueError(SINGLE_GROUP_MESSAGE)
        saved = dict(groups[0])
        ids = list(saved.pop("params", []))
        group = self.param_groups[0]
        if len(ids) != len(group["params"]):
            raise ValueError(f"loaded state dict has a group with {len(ids)} params, this optimizer's has "
                             f"{len(group['params'])}")
        unknown = [k for k in saved if k not in self.defaults]
        if unknown:
            raise ValueError(f"loaded param group has unknown options {unknown}")
        saved.setdefault("maximize", False)  # torch's group.get("maximize", False): torch < 2.15 saves no key
        new_group = dict(group)
        new_group.update(saved)
        check_group(new_group)
        vec = self._check_params()
        states = state_dict["state"]
        if not isinstance(states, dict):
            raise TypeError(f"state_dict['state'] must be a dict, got {type(states).__name__}")
        if len(states) > 1:
            raise ValueError(f"LBFGS keeps its state under the first param; the state dict has {len(states)} entries")
        new_state = {}
        if states:
            (key, entry), = states.items()
            if key != ids[0]:
                raise ValueError(f"LBFGS keeps its state under the first param ({ids[0]}), got {key!r}")
            if not isinstance(entry, dict):
                raise TypeError(f"state_dict['state'][{key!r}] must be a dict, got {type(entry).__name__}")
            new_state[0] = check_state(dict(entry), vec.n, vec.dtype, vec.xp)
            check_resumable(new_state[0], new_group["history_size"])
        group.update(saved)
        self.state = new_state


LBFGS.__doc__ = LBFGS.__doc__.replace("    {rule}", "\n".join("        " + line for line in SPEC.rule.splitlines()))


def _copy_value(v):
    if isinstance(v, list):
        return [_copy_value(a) for a in v]
    if isinstance(v, np.ndarray):
        return v.copy()
    if type(v).__module__.startswith("cupy") and hasattr(v, "get"):
        return v.get()
    return v  # Python numbers, NumPy scalars, None: immutable
