"""capturable=True: an optimizer class step that a CUDA graph can capture and replay (issue 11, Deliver 4).

A replayed graph repeats the captured launches with the captured arguments, so nothing that the host
computes per step may travel by value. The step's scalars (spec.scalars: bias corrections, the
schedule's lr, ...) are therefore precomputed on the host for a range of steps, and the step picks its
row on the device: one launch per step (the backend's select_scalars) advances a device step counter per
param group and copies the group's row for that step into a fixed device buffer, which the update kernels
read (backend run(..., scalars_at=)). Eager steps take the same path, so a replay equals the eager step
it repeats bit for bit, and both equal capturable=False (the rows are spec.scalars' own numbers).

    opt = fastopt.Adam(params, lr=fastopt.schedules.cosine(1e-3, 10_000), capturable=True)
    opt.step(grads)                        # warm-up, outside the capture: tables and rows uploaded
    graph = capture(lambda: opt.step(grads))   # e.g. cupy stream.begin_capture() / end_capture()
    for batch in data:
        ...                                # write this step's gradients into `grads`
        graph.launch(stream)               # one launch per step; the step counter advances on the device

Rows. For group g: the scalars of steps base + 1 ... base + n, base = the group's step count when the
rows were made, n <= MAX_ROWS. The table stops early once the rows no longer change (STEADY equal rows in
a row, and the same row at far steps: Adam's bias corrections with beta2 = 0.999 reach 1.0 in float64 by
step ~36,700), and past its end the last row is used. A table that never settles (Adagrad's lr_decay, a
schedule that keeps changing) ends after MAX_ROWS steps: a step past it is not taken (the device skip
flag) and is counted, and `opt.steps()`, `state_dict()` and `skipped_steps` then raise; `refresh()`
(opt.refresh_capture()) re-bases the rows at the device counter, outside a capture. The rows are
recomputed when a group's values change (between eager steps; in a capture that raises), which reads the
device counters once (a synchronisation).

Kernel variants that change with the step (SGD's first momentum step, RAdam's rectification from step
~6) are compiled in, so a graph holds the captured one: capturing before the variant has settled raises,
and after a capture the eager steps use the settled variant too.
"""
from __future__ import annotations

import numpy as np

from fastopt.specs import LR_SLOT

__all__ = ["MAX_ROWS", "STEADY", "WIDTH", "scalar_rows", "CapturedScalars", "OUTSIDE_CAPTURE"]

OUTSIDE_CAPTURE = ("capturable=True keeps the step's scalars on the device, and they are (re)computed outside a "
                   "CUDA graph capture: run one step before capturing, and again after changing a param group's "
                   "values, loading a state dict or adding a param group")

WIDTH = 16            # float64 per row: device.cuh Scalars
MAX_ROWS = 1 << 16    # steps per table (8 MiB of device memory per group)
STEADY = 256          # equal rows in a row before a table may end early
_FAR = (2, 16, 1 << 10)  # the last row must also be the row of steps base + n * these, and of 2**40


def _row(spec, hp, lr, t):
    """The scalars row of step t (lr the group's value or schedule, evaluated at t - 1 as the class does),
    and the kernel variant."""
    lr_t = lr(t - 1) if callable(lr) else lr
    hp_t = dict(hp, lr=spec.hypers[0].validate(lr_t))  # hypers[0] is lr (optim._make_class checks)
    values = spec.scalars(hp_t, t, 1.0)
    if len(values) > LR_SLOT:
        raise ValueError(f"{spec.name}: {len(values)} scalars do not fit a capturable row ({LR_SLOT} + lr)")
    row = np.zeros(WIDTH)
    row[:len(values)] = values
    row[LR_SLOT] = hp_t["lr"]
    return row, spec.variant(hp_t, t)


def scalar_rows(spec, hp, lr, base, max_rows=None):
    """(rows, steady, variant, settled): float64 rows (n, WIDTH) of steps base + 1 ... base + n; steady:
    the last row holds for every later step; variant: the kernel variant of the last row; settled: the
    first step from which the variant stays that one (within the rows)."""
    rows, variants = [], []
    equal = 0
    for t in range(base + 1, base + (max_rows or MAX_ROWS) + 1):
        row, variant = _row(spec, hp, lr, t)
        if rows and variant == variants[-1] and np.array_equal(row, rows[-1]):
            equal += 1
            if equal >= STEADY and _holds_later(spec, hp, lr, t, row, variant):
                break
        else:
            equal = 0
        rows.append(row)
        variants.append(variant)
    steady = equal >= STEADY
    settled = base + 1
    for i in range(len(variants) - 1, 0, -1):
        if variants[i - 1] != variants[-1]:
            settled = base + 1 + i
            break
    return np.array(rows), steady, variants[-1], settled


def _holds_later(spec, hp, lr, t, row, variant) -> bool:
    for far in (*(t * k for k in _FAR), 1 << 40):
        try:
            later, v = _row(spec, hp, lr, far)
        except (ValueError, OverflowError, ZeroDivisionError):
            return False
        if v != variant or not np.array_equal(later, row):
            return False
    return True


class CapturedScalars:
    """The device side of capturable=True for one optimizer: per group a table of rows (capacity
    MAX_ROWS), meta (its row count with the steady bit, its base step), the step counters, the selected
    rows, a skip flag of its own (used without skip_nonfinite) and the count of steps past the rows. All
    allocated once for the optimizer's groups (a graph keeps their addresses); add_param_group makes a
    new set (the optimizer keeps the old one alive for graphs captured before it)."""

    _STEADY_BIT = 1 << 62

    def __init__(self, backend, like, ngroups, counts):
        self.backend, self.like, self.ngroups = backend, like, ngroups
        self.capacity = MAX_ROWS
        self.rows = backend.device_zeros(ngroups * self.capacity * WIDTH, np.float64, like)
        self.meta = backend.device_zeros(2 * ngroups, np.int64, like)
        self.counters = backend.device_zeros(ngroups, np.int64, like)
        self.out = backend.device_zeros(ngroups * WIDTH, np.float64, like)
        self.flag = backend.device_zeros(1, np.uint8, like)
        self.overflow = backend.device_zeros(1, np.int64, like)
        self.keys = [None] * ngroups        # what each group's rows were made from
        self.variants = [None] * ngroups    # (variant of the rows' end, step from which it holds)
        self.captured = False               # a step ran inside a capture: eager steps use settled variants
        self.host_counts = list(counts)     # the counters as the host last set or read them
        self._meta_host = np.zeros(2 * ngroups, dtype=np.int64)
        backend.upload(self.counters, np.array(counts, dtype=np.int64), like)

    def row(self, gi):
        """The device row group gi's kernels read (valid after select())."""
        return self.out[gi * WIDTH:(gi + 1) * WIDTH]

    def check_step(self, keys, host_steps) -> bool:
        """Whether the step about to run is being captured; part of the step's validation phase, so
        nothing is written when it raises. Inside a capture the step can neither make rows (a group's
        `keys` changed: host work and uploads a graph would not replay) nor launch a kernel variant that
        still changes with the step (a first step, a rectification: a graph holds one kernel)."""
        if not self.backend.capturing(self.like):
            return False
        for gi, key in enumerate(keys):
            if self.keys[gi] is None or self.keys[gi] != key:
                raise RuntimeError(OUTSIDE_CAPTURE)
            settled = self.variants[gi][1]
            if host_steps[gi] < settled:
                raise RuntimeError(f"capturable=True: the kernel of param group {gi} changes with the step until "
                                   f"step {settled} (a first step, a rectification), and a CUDA graph holds one "
                                   f"kernel: run eager steps up to step {settled - 1} before capturing")
        return True

    def ensure(self, gi, key, spec, hp, lr):
        """Rows for group gi made from (hp, lr) unless they already are (`key` identifies both); outside a
        capture (check_step said so)."""
        if self.keys[gi] is not None and self.keys[gi] == key:
            return
        self.rebuild(gi, key, spec, hp, lr, self.read_counts()[gi])

    def rebuild(self, gi, key, spec, hp, lr, base):
        rows, steady, variant, settled = scalar_rows(spec, hp, lr, base, self.capacity)
        start = gi * self.capacity * WIDTH
        self.backend.upload(self.rows[start:start + rows.size], rows.ravel(), self.like)
        self._meta_host[2 * gi] = len(rows) | (self._STEADY_BIT if steady else 0)
        self._meta_host[2 * gi + 1] = base
        self.backend.upload(self.meta, self._meta_host, self.like)
        self.keys[gi] = key
        self.variants[gi] = (variant, settled)

    def variant_step(self, gi, host_step, capturing):
        """The step number whose kernel variant this step launches: the host's count on eager steps before
        any capture, the settled variant's from the first capture on (check_step made sure it holds)."""
        if capturing or self.captured:
            self.captured = True
            return max(host_step, self.variants[gi][1])
        return host_step

    def select(self, found_inf):
        """One launch: every group's counter advanced and its row selected; returns the skip flag the update
        kernels read (the guard's, which a step past the rows also sets, else this object's)."""
        own = found_inf is None
        flag = self.flag.reshape(()) if own else found_inf
        self.backend.select_scalars(self.rows, self.capacity, self.meta, self.counters, self.out, flag, own,
                                    self.overflow, self.like)
        return flag

    def read_counts(self):
        """The device step counters (a synchronisation); steps past the rows included (check() says)."""
        counts = [int(x) for x in _host(self.counters)]
        self.host_counts = counts
        return counts

    def overflowed(self) -> int:
        return int(_host(self.overflow)[0])

    def check(self):
        """RuntimeError when steps went past a group's rows (they were not taken); a synchronisation."""
        n = self.overflowed()
        if n:
            raise RuntimeError(f"capturable=True: {n} step(s) ran past the {self.capacity} precomputed steps of a param "
                               f"group whose scalars keep changing, and were not taken; call "
                               f"opt.refresh_capture() outside a capture (it re-bases the rows at the current "
                               f"step) and capture again")

    def refresh(self, spec, hps, lrs):
        """Re-base every group's rows at its device counter, forgetting the steps that went past the rows
        (they were not taken, so they are not counted)."""
        lost = self.overflowed()
        counts = [c - lost for c in self.read_counts()]
        keys = self.keys
        self.set_counts(counts)
        for gi in range(self.ngroups):
            self.rebuild(gi, keys[gi], spec, hps[gi], lrs[gi], counts[gi])

    def set_counts(self, counts):
        """The step counters (a state dict loaded) and no step past the rows; the rows are re-based at the
        next step."""
        self.backend.upload(self.counters, np.array(counts, dtype=np.int64), self.like)
        self.backend.upload(self.overflow, np.zeros(1, dtype=np.int64), self.like)
        self.host_counts = list(counts)
        self.keys = [None] * self.ngroups


def _host(a):
    """A small device array's values on the host (a synchronisation)."""
    if hasattr(a, "get"):
        return np.asarray(a.get())
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    return np.asarray(a)
