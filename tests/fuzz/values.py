"""The bad-input dimensions: what an array slot or a hyperparameter can be given instead of a good value,
and what the contract says about it. Tables (tables.py) take the product of these with the registry.

Array dimensions: `Dim(name, expr, make, read)`: `make(a, rng)` turns a good float32/float64 array into
the bad object; `expr` is how the reproduction line writes it (x = the good array); `read` is the
expectation when the slot is only read (grads; the input of global_norm): a slot that is written
always expects an error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import numpy as np

F4, F8 = np.dtype(np.float32), np.dtype(np.float64)


@dataclass(frozen=True)
class Dim:
    name: str
    expr: str
    make: Callable
    read: str = "error"


def _readonly(a, rng):
    b = a.copy()
    b.flags.writeable = False
    return b


def _masked(a, rng):
    mask = np.zeros(a.shape, bool)
    mask.flat[:: 2] = True  # at least one masked element: updating it silently would ignore the mask
    return np.ma.masked_array(a.copy(), mask=mask)


def _strided(a, rng):
    buf = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    buf[..., ::2] = a
    return buf[..., ::2]


def _reversed(a, rng):
    return np.ascontiguousarray(a[::-1])[::-1]


def _other_float(a, rng):
    return a.astype(F8 if a.dtype == F4 else F4)


def _int_view(a, rng):
    return a.copy().view(np.int32 if a.dtype == F4 else np.int64)  # the same bytes, another dtype


def _grow(a, rng):
    return np.ones((a.shape[0] + 1,) + a.shape[1:], a.dtype)


# Every dimension applies to one element (an array slot, or one entry of a list slot). Shapes of the
# tables' arrays are 2-D with more than one row and column, so Fortran order and reversed or strided
# views are really non-contiguous.
ELEMENT_DIMS = [
    Dim("int64", "x.astype(np.int64)", lambda a, r: a.astype(np.int64)),
    Dim("int32", "x.astype(np.int32)", lambda a, r: a.astype(np.int32)),
    Dim("uint8", "x.astype(np.uint8)", lambda a, r: a.astype(np.uint8)),
    Dim("bool", "x.astype(bool)", lambda a, r: a.astype(bool)),
    Dim("complex64", "x.astype(np.complex64)", lambda a, r: a.astype(np.complex64)),
    Dim("complex128", "x.astype(np.complex128)", lambda a, r: a.astype(np.complex128)),
    Dim("float16", "x.astype(np.float16)", lambda a, r: a.astype(np.float16)),
    Dim("longdouble", "x.astype(np.longdouble)", lambda a, r: a.astype(np.longdouble)),
    Dim("object", "x.astype(object)", lambda a, r: a.astype(object)),
    Dim("byteswapped", "x.astype(x.dtype.newbyteorder())", lambda a, r: a.astype(a.dtype.newbyteorder())),
    Dim("structured", "np.zeros(x.shape, [('x', x.dtype)])", lambda a, r: np.zeros(a.shape, [("x", a.dtype)])),
    Dim("other_float", "x.astype(float64 <-> float32)", _other_float),
    Dim("int_view", "x.view(int32 / int64)", _int_view),
    Dim("shape_grow", "np.ones((x.shape[0] + 1, ...), x.dtype)", _grow),
    Dim("shape_0d", "np.array(x.flat[0])", lambda a, r: np.array(a.flat[0])),
    Dim("shape_flat", "x.reshape(-1)", lambda a, r: a.reshape(-1).copy()),
    Dim("fortran", "np.asfortranarray(x)", lambda a, r: np.asfortranarray(a)),
    Dim("reversed", "np.ascontiguousarray(x[::-1])[::-1] (negative strides)", _reversed),
    Dim("strided", "buf[..., ::2] (non-contiguous slice)", _strided),
    Dim("readonly", "read-only copy of x", _readonly, read="ok"),
    Dim("masked", "np.ma.masked_array(x, mask=every other element)", _masked),
    Dim("none", "None", lambda a, r: None),
    Dim("pylist", "x.tolist()", lambda a, r: a.tolist()),
    Dim("float", "1.0", lambda a, r: 1.0),
    Dim("str", "'x'", lambda a, r: "x"),
    Dim("bytes", "x.tobytes()", lambda a, r: a.tobytes()),
    Dim("bytearray", "bytearray(x.tobytes())", lambda a, r: bytearray(a.tobytes())),
    Dim("dict", "{'x': x}", lambda a, r: {"x": a}),
]

HUGE_INT = 10 ** 400  # float(HUGE_INT) raises OverflowError: the contract wants ValueError


def bad_real_values(check=None, inf_ok=False):
    """(label, value, expectation) for a float hyperparameter / bound. `check` is the registry's valid
    range (None: any finite value); a finite value outside it is an error, inside it anything goes
    (1e308 may overflow the update, which is not an input error). inf_ok: +inf is allowed (Hyper.inf_ok)."""
    def ranged(v):
        return "error" if check is not None and not check(v) else "any"
    inf = "any" if inf_ok else "error"
    return [
        ("nan", math.nan, "error"), ("inf", math.inf, inf), ("-inf", -math.inf, "error"),
        ("np.float64(nan)", np.float64("nan"), "error"), ("np.float32(inf)", np.float32("inf"), inf),
        ("10**400", HUGE_INT, "error"), ("-10**400", -HUGE_INT, "error"),
        ("True", True, "error"), ("np.bool_(False)", np.bool_(False), "error"),
        ("'0.1'", "0.1", "error"), ("None", None, "error"), ("[0.1]", [0.1], "error"), ("1j", 1j, "error"),
        ("np.array([0.1])", np.array([0.1]), "error"),
        ("-1.0", -1.0, ranged(-1.0)), ("1e308", 1e308, ranged(1e308)), ("-1e-300", -1e-300, ranged(-1e-300)),
        ("1.0", 1.0, ranged(1.0)), ("Fraction(1, 10)", Fraction(1, 10), "any"), ("np.array(0.1)", np.array(0.1), "any"),
    ]


def ok_real_values(good):
    """(label, value, plain value): NumPy scalars must work and give the bits of the Python number."""
    return [(f"np.float32({good!r})", np.float32(good), float(np.float32(good))),
            (f"np.float64({good!r})", np.float64(good), float(good)),
            ("np.int64(0)", np.int64(0), 0.0)]


BAD_BOOL_VALUES = [("1", 1, "error"), ("0", 0, "error"), ("2", 2, "error"), ("'True'", "True", "error"),
                   ("None", None, "error"), ("1.0", 1.0, "error"), ("[True]", [True], "error"),
                   ("np.bool_(True)", np.bool_(True), "any")]

BAD_STEP_VALUES = [
    ("0", 0, "error"), ("-1", -1, "error"), ("1.0", 1.0, "error"), ("1.5", 1.5, "error"), ("True", True, "error"),
    ("'1'", "1", "error"), ("None", None, "error"), ("10**400", HUGE_INT, "error"), ("-10**400", -HUGE_INT, "error"),
    ("np.float64(2.0)", np.float64(2.0), "error"), ("[1]", [1], "error"), ("nan", math.nan, "error"),
    ("2**40", 2 ** 40, "any"), ("2**63", 2 ** 63, "any"), ("2**70", 2 ** 70, "any"),
]
OK_STEP_VALUES = [("np.int64(3)", np.int64(3), 3), ("np.uint8(2)", np.uint8(2), 2), ("np.int32(1)", np.int32(1), 1)]

BAD_GRAD_SCALE = [
    ("10**400", HUGE_INT, "error"), ("'x'", "x", "error"), ("True", True, "error"), ("[1.0]", [1.0], "error"),
    ("np.ones(2)", np.ones(2), "error"), ("np.array(1)", np.array(1), "error"), ("1j", 1j, "error"),
    ("np.ones((1,))", np.ones((1,)), "error"), ("nan", math.nan, "any"), ("-1.0", -1.0, "any"),
    ("np.array(0.5, '>f8')", np.array(0.5, ">f8"), "any"), ("inf", math.inf, "any"),
]
OK_GRAD_SCALE = [("np.float32(0.5)", np.float32(0.5), 0.5), ("np.array(0.25)", np.array(0.25), 0.25),
                 ("np.int64(2)", np.int64(2), 2.0)]

BAD_BACKENDS = [("'tpu'", "tpu"), ("123", 123), ("''", ""), ("'cupy'", "cupy"), ("'numba'", "numba"),
                ("b'cython'", b"cython"), ("['numpy']", ["numpy"])]
