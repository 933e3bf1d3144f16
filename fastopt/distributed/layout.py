"""Where every parameter element lives in a sharded optimizer: buckets, shards, offsets.

Pure bookkeeping, no arrays and no communication, so that the optimizer, the checkpoint writer and the
re-sharding loader all compute the same answer from (shapes, dtypes, world size, bucket size).

Params are grouped by dtype (in order of first appearance) and, within a dtype, cut into buckets of
consecutive params of at most `bucket_bytes` (a param larger than that is a bucket of its own; params
are never split between buckets). A bucket's params are packed one after another into a flat buffer of
`world * shard` elements: rank r owns elements [r * shard, (r + 1) * shard). `shard` is ceil(numel /
world) rounded up to a multiple of ALIGN_BYTES, so every shard starts on a vector (and cache line)
boundary; the tail of the last shards is padding (zero gradients, never copied to a user's array).

The gradient buffer that is reduce-scattered has `shard + pad` elements per rank instead of `shard`:
the element at index `shard` of each rank's block is a control slot (a failed-validation count that
rides along with the gradients, so that a rank whose gradients were rejected tells every other rank
within the same collective instead of leaving them waiting), the rest is padding that keeps blocks
aligned.
"""
from __future__ import annotations

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

    @property
    def align(self) -> int:
        return max(1, ALIGN_BYTES // self.dtype.itemsize)

    @property
    def grad_block(self) -> int:
        """Elements per rank in the reduce-scattered gradient buffer: the shard, a control slot, padding."""
        return self.shard + self.align

    def shard_range(self, rank: int) -> tuple[int, int]:
        return rank * self.shard, (rank + 1) * self.shard

    def pieces(self, lo: int, hi: int):
        """(param number, first element, last element + 1, bucket offset) for each param overlapping the
        bucket range [lo, hi)."""
        for p, off, n in zip(self.params, self.offsets, self.sizes):
            a, b = max(lo, off), min(hi, off + n)
            if a < b:
                yield p, a - off, b - off, a

    def grad_segments(self, off: int, n: int):
        """(position in the gradient buffer, count) of the bucket elements [off, off + n): split where a
        shard ends, because the gradient buffer has a control block after each shard."""
        while n > 0:
            rank, within = divmod(off, self.shard)
            take = min(n, self.shard - within)
            yield rank * self.grad_block + within, take
            off += take
            n -= take


@dataclass(frozen=True)
class ShardLayout:
    """The buckets of a list of params for a world size."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    world: int
    bucket_bytes: int
    buckets: tuple[Bucket, ...]

    @classmethod
    def build(cls, shapes, dtypes, world: int, bucket_bytes: int) -> "ShardLayout":
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
                    buckets.append(cls._bucket(len(buckets), dt, current, shapes, world))
                    current, nbytes = [], 0
                current.append(i)
                nbytes += size * dt.itemsize
            buckets.append(cls._bucket(len(buckets), dt, current, shapes, world))
        return cls(shapes, dtypes, world, bucket_bytes, tuple(buckets))

    @staticmethod
    def _bucket(index, dtype, params, shapes, world) -> Bucket:
        sizes = tuple(int(np.prod(shapes[i], dtype=np.int64)) for i in params)
        offsets = tuple(int(x) for x in np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64))
        numel = sum(sizes)
        align = max(1, ALIGN_BYTES // dtype.itemsize)
        shard = _round_up(max(1, -(-numel // world)), align)
        return Bucket(index, dtype, tuple(params), offsets, sizes, numel, shard, world)

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
