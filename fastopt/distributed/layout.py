"""Where every parameter element lives in a sharded optimizer: buckets, shards, offsets.

Pure bookkeeping, no arrays and no communication, so that the optimizer, the checkpoint writer and the
re-sharding loader all compute the same answer from (shapes, dtypes, world size, bucket size).

Params are grouped by dtype (in order of first appearance) and, within a dtype, cut into buckets of
consecutive params of at most `bucket_bytes` (a param larger than that is a bucket of its own; params
are never split between buckets). A bucket's params are packed one after another into a flat buffer of
`world * shard` elements: rank r owns elements [r * shard, (r + 1) * shard). `shard` is ceil(numel /
world) rounded up to a multiple of ALIGN_BYTES, so every shard starts on a vector (and cache line)
boundary; the tail of the last shards is padding (zero gradients, never copied to a user's array).

The gradient buffer that is reduce-scattered has the same layout, so a param's gradient can be a view of
it (ShardedOptimizer.grads) and the reduce-scatter then needs no copy.

`segment` (8-bit state, state_dtype="int8": precision.QUANT_BLOCK = 256): each param starts at a multiple
of `segment` elements in its bucket (the gap before it is padding) and `shard` is a multiple of it too, so
every 256-element block of a param's 8-bit state is the same block as in a single process (blocks of a
tensor counted from its first element) and no block straddles a shard cut or two params.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ALIGN_BYTES = 64  # an AVX-512 vector and a cache line
DEFAULT_BUCKET_BYTES = 32 << 20  # per-bucket overlap granularity; one bucket per dtype below this size


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Bucket:
    """Consecutive params of one dtype that share a flat buffer and one pair of collectives."""

    index: int
    dtype: np.dtype
    params: tuple[int, ...]     # flat param numbers, in order
    offsets: tuple[int, ...]    # element offset of each param in the bucket's flat buffer
    sizes: tuple[int, ...]      # element count of each param
    numel: int                  # sum of sizes
    shard: int                  # elements per rank (aligned; numel <= world * shard)
    world: int
    segment: int = 1            # every param starts at a multiple of this (and shard is one)

    @property
    def align(self) -> int:
        return max(1, ALIGN_BYTES // self.dtype.itemsize)

    def shard_range(self, rank: int) -> tuple[int, int]:
        return rank * self.shard, (rank + 1) * self.shard

    def pieces(self, lo: int, hi: int):
        """(param number, first element, last element + 1, bucket offset) for each param overlapping the
        bucket range [lo, hi)."""
        for p, off, n in zip(self.params, self.offsets, self.sizes):
            a, b = max(lo, off), min(hi, off + n)
            if a < b:
                yield p, a - off, b - off, a


@dataclass(frozen=True)
class ShardLayout:
    """The buckets of a list of params for a world size."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    world: int
    bucket_bytes: int
    buckets: tuple[Bucket, ...]
    segment: int = 1

    @classmethod
    def build(cls, shapes, dtypes, world: int, bucket_bytes: int, segment: int = 1) -> "ShardLayout":
        """The layout of params `shapes`/`dtypes` over `world` ranks; segment > 1: each param starts at a
        multiple of `segment` elements and shards are multiples of it (see the module docstring)."""
        shapes = tuple(tuple(int(d) for d in s) for s in shapes)
        dtypes = tuple(np.dtype(d) for d in dtypes)
        order: dict = {}
        for i, dt in enumerate(dtypes):
            order.setdefault(dt, []).append(i)
        buckets = []
        for dt, members in order.items():
            current: list[int] = []
            nbytes = 0
            for i in members:
                size = int(np.prod(shapes[i], dtype=np.int64))
                if current and nbytes + size * dt.itemsize > bucket_bytes:
                    buckets.append(cls._bucket(len(buckets), dt, current, shapes, world, segment))
                    current, nbytes = [], 0
                current.append(i)
                nbytes += size * dt.itemsize
            buckets.append(cls._bucket(len(buckets), dt, current, shapes, world, segment))
        return cls(shapes, dtypes, world, bucket_bytes, tuple(buckets), segment)

    @staticmethod
    def _bucket(index, dtype, params, shapes, world, segment=1) -> Bucket:
        sizes = tuple(int(np.prod(shapes[i], dtype=np.int64)) for i in params)
        padded = [_round_up(n, segment) for n in sizes]
        offsets = tuple(int(x) for x in np.concatenate([[0], np.cumsum(padded)[:-1]]).astype(np.int64))
        numel = offsets[-1] + sizes[-1] if sizes else 0  # the end of the last param (padding between included)
        align = max(1, ALIGN_BYTES // dtype.itemsize)
        align = align * segment // math.gcd(align, segment)
        shard = _round_up(max(1, -(-numel // world)), align)
        return Bucket(index, dtype, tuple(params), offsets, sizes, numel, shard, world, segment)

    def locate(self, param: int) -> tuple[Bucket, int, int]:
        """(bucket, offset, size) of a param."""
        for b in self.buckets:
            if param in b.params:
                j = b.params.index(param)
                return b, b.offsets[j], b.sizes[j]
        raise IndexError(f"no param {param}")

    def shard_elements(self, rank: int) -> int:
        """Elements of state per state name that `rank` keeps (padding included)."""
        return sum(b.shard for b in self.buckets)

    def describe(self) -> list[dict]:
        """The buckets as JSON-ready dicts (for a checkpoint manifest)."""
        return [{"dtype": b.dtype.name, "params": list(b.params), "offsets": list(b.offsets), "numel": b.numel,
                 "shard": b.shard} for b in self.buckets]
