"""Low-precision storage, in plain NumPy: the reference of kernels/cuda/precision.cuh.

Every function here computes, element for element, the same bits as its C counterpart (the CPU
loops and the CUDA kernels include that header), and tests/test_precision.py checks it:

- 16-bit conversions: `to_bf16` / `from_bf16` (bfloat16 as its uint16 bit pattern, so nothing here
  needs ml_dtypes), `to_fp16` / `from_fp16` (NumPy's float16 rounding, which is IEEE's);
- stochastic rounding: `to_bf16_sr` / `to_fp16_sr`, rounding up with probability equal to the
  distance from the lower neighbour, with bits from `random_bits(random_key(seed, step), index)`,
  a pure function of seed, step and element index;
- `kahan_store`: a Kahan-compensated 16-bit parameter update (optimi's scheme);
- block-wise 8-bit state (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"):
  `dynamic_map`, `quantize_blockwise`, `dequantize_blockwise`.

All arithmetic is float32 (as in the kernels' math for 16-bit data) and uint32.
"""
from __future__ import annotations

import threading
from functools import lru_cache

import numpy as np

QUANT_BLOCK = 256  # elements per absmax block (FO_QUANT_BLOCK)

_U32 = np.uint32


def _bits(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def _float(bits) -> np.ndarray:
    return np.ascontiguousarray(bits, dtype=np.uint32).view(np.float32)


# ---------------------------------------------------------------------------------------------------
# 16-bit conversions
# ---------------------------------------------------------------------------------------------------

def from_bf16(h) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32."""
    return _float(np.asarray(h, dtype=np.uint16).astype(np.uint32) << _U32(16))


def to_bf16(x) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even; NaN stays (quiet) NaN."""
    u = _bits(x)
    nan = (u & _U32(0x7FFFFFFF)) > _U32(0x7F800000)
    rounded = (u + _U32(0x7FFF) + ((u >> _U32(16)) & _U32(1))) >> _U32(16)
    return np.where(nan, (u >> _U32(16)) | _U32(0x40), rounded).astype(np.uint16)


def to_bf16_sr(x, random) -> np.ndarray:
    """float32 -> bfloat16 bits, rounded stochastically with 16 of the given random bits."""
    u = _bits(x)
    special = (u & _U32(0x7FFFFFFF)) >= _U32(0x7F800000)
    rounded = (u + (np.asarray(random, dtype=np.uint32) & _U32(0xFFFF))) >> _U32(16)
    return np.where(special, to_bf16(x), rounded).astype(np.uint16)


def from_fp16(h) -> np.ndarray:
    """float16 bit patterns (uint16) -> float32."""
    return np.asarray(h, dtype=np.uint16).view(np.float16).astype(np.float32)


def to_fp16(x) -> np.ndarray:
    """float32 -> float16 bit patterns, round to nearest even (IEEE, NumPy's own cast); NaN quiet."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore"):
        h = x.astype(np.float16).view(np.uint16)
    # one NaN pattern per sign (0x7e00), as the C code writes it
    return np.where(np.isnan(x), (h & np.uint16(0x8000)) | np.uint16(0x7E00), h).astype(np.uint16)


def to_fp16_sr(x, random) -> np.ndarray:
    """float32 -> float16 bits, rounded stochastically: 13 random bits in the normal range, a
    comparison of the exact fraction with 24 random bits in the subnormal range (grid 2^-24)."""
    u = _bits(x)
    r = np.asarray(random, dtype=np.uint32)
    sign = (u >> _U32(16)) & _U32(0x8000)
    a = u & _U32(0x7FFFFFFF)
    b = a + (r & _U32(0x1FFF))
    with np.errstate(over="ignore", invalid="ignore"):
        normal = np.where(b >= _U32(0x47800000), _U32(0x7C00), (b - _U32(0x38000000)) >> _U32(13))
        q = _float(a) * np.float32(16777216.0)
        whole = np.where(a < _U32(0x38800000), q, 0).astype(np.uint32)
    fraction = q - whole.astype(np.float32)
    up = (r >> _U32(8)).astype(np.float32) * np.float32(5.9604644775390625e-08) < fraction
    sub = whole + up.astype(np.uint32)
    out = sign | np.where(a >= _U32(0x38800000), normal, sub)
    return np.where(a >= _U32(0x7F800000), to_fp16(x), out).astype(np.uint16)


FORMATS = {
    "bfloat16": (from_bf16, to_bf16, to_bf16_sr),
    "float16": (from_fp16, to_fp16, to_fp16_sr),
}


# ---------------------------------------------------------------------------------------------------
# Counter-based random bits
# ---------------------------------------------------------------------------------------------------

def _mix32(x):
    x = np.asarray(x, dtype=np.uint32)
    x = x ^ (x >> _U32(16))
    x = x * _U32(0x21F0AAAD)
    x = x ^ (x >> _U32(15))
    x = x * _U32(0x735A2D97)
    return x ^ (x >> _U32(15))


def random_key(seed: int, step: int) -> int:
    """The per-call key of fo_random_key: seed (uint64) and step folded into 32 bits."""
    seed, step = int(seed) % 2 ** 64, int(step) % 2 ** 64
    with np.errstate(over="ignore"):
        h = _mix32(_U32(seed & 0xFFFFFFFF) ^ _U32(0x9E3779B9))
        h = _mix32(h ^ _U32(seed >> 32))
        h = _mix32(h ^ _U32(step & 0xFFFFFFFF))
        return int(_mix32(h ^ _U32(step >> 32)))


def random_bits(key: int, index) -> np.ndarray:
    """32 random bits per element index (uint64 indices), as fo_random_bits."""
    index = np.asarray(index, dtype=np.uint64)
    lo = (index & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    hi = (index >> np.uint64(32)).astype(np.uint32)
    with np.errstate(over="ignore"):
        h = _mix32(_U32(key) ^ lo)
        return _mix32(h ^ hi ^ _U32(0x85EBCA6B))


# ---------------------------------------------------------------------------------------------------
# Kahan-compensated 16-bit update
# ---------------------------------------------------------------------------------------------------

def kahan_store(p_bits, c_bits, p_new, dtype: str = "bfloat16"):
    """(new p bits, new compensation bits): the stored param p and compensation c (16-bit patterns)
    after the optimizer computed p_new (float32) from p."""
    load, store, _ = FORMATS[dtype]
    p, c = load(p_bits), load(c_bits)
    p_new = np.asarray(p_new, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf where a param overflowed: not kept
        total = c + (p_new - p)
        # p_new inf or NaN is stored as it is, and a param stored non-finite keeps no compensation:
        # Kahan's differences of infinities would turn an overflowed param (inf to nearest) into NaN
        p_out = store(np.where(np.isfinite(p_new), p + total, p_new))
        stored = load(p_out)
        c_out = store(np.where(np.isfinite(stored), total + (p - stored), np.float32(0.0)))
    return p_out, c_out


# ---------------------------------------------------------------------------------------------------
# Block-wise 8-bit quantization
# ---------------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _maps(signed: bool) -> tuple[np.ndarray, np.ndarray]:
    # Dynamic tree quantization: a code spends its leading zero bits on a decimal exponent E (the
    # value's order of magnitude, 10^-E) and the bits after the first one on a linear fraction of
    # (0.1, 1] at that order, so small values keep relative precision (second moments span many
    # decades). Signed: 7 bits per sign, E = 0..6; unsigned: 8 bits, E = 0..7.
    bits = 7 if signed else 8
    mags = []
    for e in range(bits):
        f = bits - 1 - e  # fraction bits at this exponent
        steps = np.arange(1, 2 ** f + 1, dtype=np.float64) / 2 ** f
        mags.append(10.0 ** -e * (0.1 + 0.9 * steps))
    mags = np.concatenate(mags)
    # signed: 127 magnitudes per sign and zero twice (the "negative zero" code), 256 codes in all
    values = np.concatenate([-mags, [0.0, 0.0], mags]) if signed else np.concatenate([[0.0], mags])
    values = np.sort(values).astype(np.float32)
    assert values.size == 256
    mid = ((values[:-1].astype(np.float64) + values[1:]) / 2).astype(np.float32)
    if not signed:
        # Round up to the smallest nonzero value, never down to zero: the unsigned map holds second moments,
        # and a v read back as 0 under a surviving first moment m makes Adam's next step m / (0 + eps),
        # unbounded (heavy-tailed grads: thousands of params per 2^20 moved > 5 lr off the float32-state run,
        # the worst by 1e5 lr; docs/int8-quality.md). Exact zeros (fresh state, frozen rows) keep code 0.
        mid[0] = 0.0
    values.setflags(write=False)
    mid.setflags(write=False)
    return values, mid


def dynamic_map(signed: bool) -> np.ndarray:
    """The 256 values (float32, ascending) an 8-bit code stands for, times the block's absmax."""
    return _maps(bool(signed))[0]


def dynamic_midpoints(signed: bool) -> np.ndarray:
    """The 255 decision boundaries of the quantizer (float32, ascending): a code is the number of them below
    value / absmax. The midpoints between consecutive map values, except the unsigned map's first, which is
    0.0: a positive value takes at least code 1 (the smallest nonzero value, 1e-7), never zero's code."""
    return _maps(bool(signed))[1]


@lru_cache(maxsize=None)
def quantizer_tables(signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """The compiled quantizer's tables (kernels/cuda/precision.cuh FoQuantizer): the 255 midpoints then
    +inf (float32, 256), and for each of the 65536 values of a float32's top 16 bits the number of
    midpoints below the smallest float with those bits (uint8; 0 for NaN patterns). A code is then
    bucket[bits >> 16] + (mid[that] < x): exactly searchsorted(midpoints, x, "left"), because no bucket
    (a 2^-7 relative range) holds more than one midpoint (the map's spacing is coarser; asserted here)."""
    mid = dynamic_midpoints(signed)
    top = np.arange(65536, dtype=np.uint32) << 16
    negative = top >= 0x80000000
    # the smallest float of each bucket: the top pattern with zero low bits, or all-ones ones when negative
    low = np.where(negative, top | 0xFFFF, top).view(np.float32)
    high = np.where(negative, top, top | 0xFFFF).view(np.float32)
    nan = np.isnan(low) | np.isnan(high)
    below = np.where(nan, 0, np.searchsorted(mid, low, side="left"))
    inside = np.where(nan, 0, np.searchsorted(mid, high, side="left")) - below
    assert inside.max() <= 1, "a quantizer bucket holds two midpoints"
    padded = np.append(mid, np.float32(np.inf)).astype(np.float32)
    buckets = below.astype(np.uint8)
    padded.setflags(write=False)
    buckets.setflags(write=False)
    return padded, buckets


@lru_cache(maxsize=None)
def quantizer_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the compiled 8-bit loops take (the CPU's run_int8, the CUDA _q8 kernels), row 0 for the unsigned map
    and row 1 for the signed one: the maps (float32, 2 x 256), the padded midpoints (float32, 2 x 256) and the
    buckets (uint8, 2 x 65536) of quantizer_tables. Read-only, C-contiguous."""
    tables = [quantizer_tables(False), quantizer_tables(True)]
    out = (np.ascontiguousarray(np.stack([dynamic_map(False), dynamic_map(True)]), dtype=np.float32),
           np.ascontiguousarray(np.stack([t[0] for t in tables]), dtype=np.float32),
           np.ascontiguousarray(np.stack([t[1] for t in tables]), dtype=np.uint8))
    for a in out:
        a.setflags(write=False)
    return out


def quantize_blockwise(x, signed: bool, block: int = QUANT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8, absmax float32 per block) of a float32 array's flattened values."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    nblocks = -(-x.size // block)
    padded = np.zeros(nblocks * block, np.float32)
    padded[:x.size] = x
    blocks = padded.reshape(nblocks, block)
    # fmax-style but NaN-propagating, like fo_max_nan: a NaN anywhere makes the absmax NaN
    absmax = np.abs(blocks).max(axis=1) if nblocks else np.zeros(0, np.float32)
    scale = np.where(absmax > 0, absmax, np.float32(1.0)).astype(np.float32)
    with np.errstate(invalid="ignore"):
        normalized = blocks / scale[:, None]
    codes = np.searchsorted(dynamic_midpoints(signed), normalized, side="left")
    codes[np.isnan(normalized)] = 0  # the C binary search sends NaN to code 0
    return codes.reshape(-1)[:x.size].astype(np.uint8), absmax.astype(np.float32)


def dequantize_blockwise(codes, absmax, signed: bool, block: int = QUANT_BLOCK) -> np.ndarray:
    """float32 values of quantized state (the inverse of quantize_blockwise up to the map's spacing)."""
    codes = np.asarray(codes, dtype=np.uint8).reshape(-1)
    scale = np.repeat(np.asarray(absmax, dtype=np.float32), block)[:codes.size]
    return dynamic_map(signed)[codes] * scale


# ---------------------------------------------------------------------------------------------------
# 16-bit params in the reference: widen, float32 math, round to nearest even
# ---------------------------------------------------------------------------------------------------

def is_bfloat16(dtype) -> bool:
    """ml_dtypes' bfloat16, in either byte order (by name: nothing here imports ml_dtypes)."""
    dtype = np.dtype(dtype)
    # the cheap attributes first: every array of every call asks, and dtype.name is computed in Python on
    # each read (about 2 us)
    return dtype.kind == "V" and dtype.itemsize == 2 and dtype.name == "bfloat16"


def is_16bit(dtype) -> bool:
    """float16 (native byte order) or bfloat16 storage: float32 math, float32 state (README, "Precision")."""
    dtype = np.dtype(dtype)
    # attributes, not dtype == np.float16, which converts the type to a dtype on every call (about 1 us)
    return dtype.itemsize == 2 and ((dtype.kind == "f" and dtype.isnative) or is_bfloat16(dtype))


def widen(a) -> np.ndarray:
    """A float32 copy of a 16-bit array (exact); a float32/float64 array itself."""
    return a.astype(np.float32) if is_16bit(a.dtype) else a


def store_rounded(dst, value) -> None:
    """dst[...] = value (float32), rounded to dst's 16-bit dtype to nearest even with the kernels' bits
    (to_bf16 / to_fp16: NaN stays a quiet NaN of the same sign)."""
    bits = to_bf16(value) if is_bfloat16(dst.dtype) else to_fp16(value)
    dst.view(np.uint16)[...] = bits.reshape(dst.shape)


def step_16bit(fn, arrays, written, **kwargs) -> None:
    """Run the reference update `fn(*arrays, **kwargs)` as the CPU kernels run it for 16-bit storage:
    every 16-bit array is widened to float32 (exactly), the update runs in float32 (the reference in
    float32 equals the float32 kernels bit for bit: same operations, same order, no FMA), and each
    16-bit array in `written` (positions) is stored back rounded to nearest even. float32 arrays (the
    state of 16-bit params, float32 grads) are used as they are."""
    wide = [None if a is None else widen(a) for a in arrays]
    fn(*wide, **kwargs)
    for k in written:
        a = arrays[k]
        if a is not None and wide[k] is not a:
            store_rounded(a, wide[k])


# ---------------------------------------------------------------------------------------------------
# Rounding of the new param: Kahan-compensated and stochastic (kahan=True, stochastic_rounding=True)
# ---------------------------------------------------------------------------------------------------

STATE_DTYPES = ("float32", "bfloat16", "float16")  # state_dtype= names (and the params' own dtype)


class StochasticRounding:
    """How a call rounds its new 16-bit params stochastically: element i of a tensor gets the bits
    random_bits(random_key(seed, step), index_offset + i), i its flat (C-order) index in the tensor.
    `step` is the step being taken (the classes: the group's step; the functional API: its `step`
    argument, 0 for the functions without one). A tensor that is a shard of a larger one (a slice of a
    flat buffer) passes the position of its first element in the whole as index_offset, so the bits do
    not depend on how the whole is cut."""

    __slots__ = ("seed", "step", "index_offset", "key")

    def __init__(self, seed: int, step: int, index_offset: int = 0):
        self.check(seed, index_offset)
        self.seed, self.step, self.index_offset = int(seed), int(step), int(index_offset)
        self.key = random_key(self.seed, self.step)

    @staticmethod
    def check(seed, index_offset) -> None:
        """TypeError / ValueError naming seed or index_offset unless each is an int in [0, 2**64)."""
        for name, value in (("seed", seed), ("index_offset", index_offset)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if not 0 <= int(value) < 2 ** 64:
                raise ValueError(f"Invalid {name}: {value} (an integer in [0, 2**64))")

    def __repr__(self):
        return f"StochasticRounding(seed={self.seed}, step={self.step}, index_offset={self.index_offset})"


def format_of(dtype) -> str:
    """"bfloat16" or "float16": the FORMATS key of a 16-bit dtype."""
    return "bfloat16" if is_bfloat16(dtype) else "float16"


def step_rounded(fn, arrays, written, comp=None, stochastic: StochasticRounding | None = None, **kwargs) -> None:
    """step_16bit with the new 16-bit param (arrays[0]) stored by kahan_store with the compensation `comp`
    (the param's dtype, updated too), or stochastically (to_bf16_sr / to_fp16_sr with the bits of
    `stochastic`), instead of to nearest even: the reference of the kernels' Kahan and stochastic stores
    (kernels/cpu/cpu_loops.hpp run_staged). The states are stored as step_16bit stores them."""
    if comp is None and stochastic is None:
        step_16bit(fn, arrays, written, **kwargs)
        return
    p = arrays[0]
    fmt = format_of(p.dtype)
    wide = [None if a is None else widen(a) for a in arrays]
    fn(*wide, **kwargs)
    for k in written:
        a = arrays[k]
        if k == 0 or a is None or wide[k] is a:
            continue
        store_rounded(a, wide[k])
    new = wide[0].reshape(-1)
    bits = p.view(np.uint16).reshape(-1)
    if comp is not None:
        c = comp.view(np.uint16).reshape(-1)
        p_out, c_out = kahan_store(bits, c, new, fmt)
        bits[...] = p_out
        c[...] = c_out
    else:
        index = np.arange(new.size, dtype=np.uint64) + np.uint64(stochastic.index_offset)
        bits[...] = FORMATS[fmt][2](new, random_bits(stochastic.key, index))


def rounded_as(dtype):
    """x -> x (float32) rounded to the 16-bit `dtype` to nearest even and widened back: what a float32
    value reads as once stored in a 16-bit array."""
    load, store, _ = FORMATS[format_of(dtype)]
    return lambda x: load(store(x)).reshape(np.shape(x))


# ---------------------------------------------------------------------------------------------------
# 8-bit state (state_dtype="int8"): one QuantizedState per state array
# ---------------------------------------------------------------------------------------------------

# States that are never negative (second moments, accumulators, step sizes): they take the unsigned
# dynamic map (8 bits of magnitude); every other state takes the signed map (first moments, prev).
NONNEGATIVE_STATES = frozenset({"state_sum", "square_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_avg_var",
                                "exp_inf", "acc_delta", "step_size"})

# Optimizers whose state cannot be 8 bits: LAMB (two-phase: its trust ratio's norms come from the exact
# moments of the first pass), ASGD (ax is the averaged params, an output of the optimizer) and the
# schedule-free ones (z is the iterate itself, from which the params are interpolated): quantizing those
# would lose the params, not the statistics.
INT8_REFUSED = {
    "lamb": "LAMB's trust ratio needs the exact moments of its first pass (a two-phase update)",
    "asgd": "ASGD's ax is the averaged params, an output that must stay exact",
    "schedule_free_sgd": "schedule-free's z is the iterate the params are interpolated from",
    "schedule_free_adamw": "schedule-free's z is the iterate the params are interpolated from",
}


def quant_blocks(size: int) -> int:
    """The number of absmax blocks of a tensor of `size` elements: ceil(size / 256)."""
    return -(-int(size) // QUANT_BLOCK)


def signed_state(name: str) -> bool:
    """Whether registry state `name` is quantized with the signed map (it may be negative)."""
    return name not in NONNEGATIVE_STATES


_assignments = 0
_assignments_lock = threading.Lock()  # `+=` from two threads could lose a count


def _count_assignment() -> None:
    global _assignments
    with _assignments_lock:
        _assignments += 1


def quantized_state_assignments() -> int:
    """How many attribute assignments QuantizedState objects have had in this process. Each is counted after
    it took effect, so a step plan that read this count and then found its QuantizedStates holding the arrays
    it checked knows, while the count stays the same, that they still hold them (without reading each)."""
    return _assignments


class QuantizedState:
    """One state array stored in 8 bits (state_dtype="int8"; Dettmers et al. 2022): `codes` (uint8, the
    param's shape, C-contiguous) index the dynamic map (signed or unsigned: `signed`), scaled by `absmax`
    (float32, one per block of 256 consecutive elements in C order, ceil(size / 256) of them):
        value[i] = dynamic_map(signed)[codes[i]] * absmax[i // 256]
    A `<name>_step` call takes one QuantizedState where it takes a state array (all states of the call
    quantized, or none); it dequantizes, runs the float32 update and requantizes in place (codes and absmax
    rewritten: absmax = max |value| of the block, each code the map value nearest value / absmax, except
    that a positive value never takes the unsigned map's zero code: see dynamic_midpoints)."""

    __slots__ = ("codes", "absmax", "signed")

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        _count_assignment()  # after the assignment: see quantized_state_assignments

    def __init__(self, codes, absmax, signed: bool):
        if not isinstance(signed, (bool, np.bool_)):
            raise TypeError(f"signed must be a bool, got {signed!r}")
        # not counted: nothing can hold a new object's arrays yet (and views are made per step: 0.4 us, not 4)
        init = object.__setattr__
        init(self, "codes", codes)
        init(self, "absmax", absmax)
        init(self, "signed", bool(signed))

    @classmethod
    def from_float(cls, x, signed: bool) -> "QuantizedState":
        """The quantized form of float values `x` (new arrays; codes shaped like x)."""
        x = np.asarray(x)
        codes, absmax = quantize_blockwise(x, signed)
        return cls(codes.reshape(x.shape), absmax, signed)

    @property
    def shape(self) -> tuple:
        return tuple(self.codes.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes of storage: one per element plus four per block of 256."""
        return int(self.codes.nbytes) + int(self.absmax.nbytes)

    def dequantize(self) -> np.ndarray:
        """The float32 values (a new array, the codes' shape)."""
        return dequantize_blockwise(np.asarray(self.codes), np.asarray(self.absmax), self.signed).reshape(self.shape)

    def store(self, values) -> None:
        """Quantize float32 `values` (the codes' shape) into codes and absmax, in place."""
        codes, absmax = quantize_blockwise(values, self.signed)
        self.codes.reshape(-1)[...] = codes
        self.absmax[...] = absmax

    def copy(self) -> "QuantizedState":
        return QuantizedState(np.array(self.codes, copy=True), np.array(self.absmax, copy=True), self.signed)

    def __repr__(self):
        return (f"QuantizedState(shape={self.shape}, blocks={np.shape(self.absmax)[0] if np.ndim(self.absmax) else '?'},"
                f" signed={self.signed})")
