"""ShardedOptimizer: ZeRO stage 1 (optimizer state sharded across ranks) over an existing engine.

    from mpi4py import MPI
    opt = fastopt.distributed.ShardedOptimizer("adamw", params, MPI.COMM_WORLD, lr=1e-3, clip_grad_norm=1.0)
    for batch in my_share_of_the_data:
        opt.step(local_grads(params, batch))     # params (identical on every rank) updated in place

Layout (fastopt/distributed/layout.py): the params are packed into one flat buffer per dtype (cut into
buckets of at most `bucket_bytes`), each cut into world-size shards; this rank keeps optimizer state
for its shard only, allocated with fastopt.init_state, and updates it with the registry's functional
`<name>_step`, so the update is the single-process kernel.

One step:
  1. every check (count, kind, dtype and shape of each gradient, the learning rate) on this rank;
  2. the gradients are packed into the bucket's send buffer (one copy; none for gradients that are the
     optimizer's own views, `opt.grads`), then reduce-scatter (sum) per bucket, non-blocking where the
     engine has it (a rank whose checks failed joins it without packing). The sum is formed in the
     gradients' dtype (float32 for 16-bit params) and divided by the world size in the update, so float32
     gradients whose sum passes 3.4e38 give inf (a skipped step with skip_nonfinite) where the mean would not;
  3. ONE all-reduce of a few numbers: the count of ranks whose checks failed (then every rank raises
     here, nothing updated anywhere, instead of waiting in a collective for a rank that gave up), the
     step's lr as exact integers (a schedule that gives the ranks different lrs, e.g. ReduceLROnPlateau fed
     each rank's own loss, is refused on every rank, nothing updated) and, with clip_grad_norm /
     skip_nonfinite, this shard's sum of squares and a non-finite flag, which give
     the global norm of the mean gradient, and with LARS per param the sums of squares of the pieces of it
     and of its summed gradient this rank holds (see below; the all-reduce then waits for the reduce-scatter);
  4. per bucket, as soon as its gradients are in: the fused update of the shard with grad_scale =
     1/world (the mean), times the clip coefficient (LARS: with its params' trust ratios), then the
     all-gather of the bucket's params starts;
  5. the gathered params are copied into the user's arrays (skipped for arrays that are the optimizer's
     own views: `opt.params`).

Params: copied in at construction and out after each step (NumPy arrays cannot be re-pointed at other
memory; for torch tensors the same rule keeps one behaviour). Train on `opt.params` (views of the flat
buffer, in the engine's type: NumPy arrays, torch tensors, CuPy arrays) to avoid the copy, or pass
copy_params=False and read them from there. Likewise, writing the gradients into `opt.grads` (views of
the send buffer) and passing those to step() avoids packing them.

Construction checks, before any collective: params (one list, floating point, writable, no two
sharing memory), the optimizer name, every hyperparameter (by building the single-process class on a
one-element buffer: the same checks and messages as fastopt.Adam(...) and friends), bucket_bytes. Then
ONE all-reduce carries the count of ranks whose checks failed (each raises its own error, the others a
ValueError saying so: no rank waits for one that gave up) and compares three 64-bit digests across ranks
(shapes and dtypes; the params' bytes; the optimizer and its hyperparameters): every rank raises the same
ValueError when any differs.

Precision (README "Precision"; the single-process classes' options, checked by them): state_dtype=
("float32", "bfloat16", "float16", the params' dtype, or "int8"), kahan=True and stochastic_rounding=True
with seed= (16-bit params). 16-bit params live in 16-bit flat buffers (the all-gather moves 2 bytes per
element) while their gradients are packed, reduce-scattered and applied in float32 (summing 16-bit
gradients over ranks would round at every addition; MPI has no bfloat16 sum); a 16-bit state or the
Kahan compensation ("kahan_comp", the params' dtype) is sharded like any state. On host arrays and on GPU
arrays alike (the CuPy kernels take float32 grads of 16-bit params too), each rank's result equals the
single-process class with the same options on the separate tensors, applied to the mean gradient in float32,
bit for bit:
  - stochastic rounding keys element i of a param by (seed, the step, i) as the class does: the update of
    a shard runs one call per piece of a param it holds, with index_offset = the piece's first element in
    its param, so the bits do not depend on the world size or the cut;
  - state_dtype="int8" (8-bit block-wise state, 256-element blocks): the flat layout starts every param
    at a multiple of 256 elements and cuts shards at multiples of 256 (layout.ShardLayout segment=256),
    so each block of a param is the single process's block (counted from the param's first element) and
    lies in one shard; the update takes the shard's pieces of params as one list call (the padding
    between params is never read), each piece with its codes and its blocks' scales. State bytes per
    rank: 1 byte per element and state plus 4 per 256 (+ the padding), 1/world of the total.

LARS (spec.tensor_coefs: one trust ratio per param, from the norms of the whole param and of its scaled
gradient, and its ndim for exclude_1d) while a shard holds flat pieces of params: in step 3 each rank adds,
per param, the float64 sums of squares of the pieces of params and of summed gradients it holds (the
backend's sumsq_per_tensor) to the same all-reduce (2 numbers per param; with LARS that all-reduce waits
for the reduce-scatters, as with clip/skip); every rank computes the ratios from the totals with the scale
the kernel applies (1/world times the clip coefficient), as the class computes them from its mean gradient,
and updates its pieces in one list call with their params' ratios given (functional.apply_update's
tensor_coefs=). Each element is updated by its owner only and all-gathered, so every rank holds the same
bits; against the class the sums are added in another order (tolerance in tests/distributed/test_lars.py).

LAMB (spec.two_phase: its trust ratio ||p|| / ||u|| per param needs the norm of the update direction u, which
exists only once the moments are written) takes a second all-reduce: after step 3 (which must come first:
the failed-checks count, the skip and the clip coefficient, which scales g inside the first pass, are known
before anything is written), each rank runs the first pass on the pieces of params it holds (the backend's
run_phase1: the moments written, per piece the float64 sums of p^2 and u^2), ONE all-reduce of those sums per
param (2 per param, plus a failed flag), the scaled learning rates on the host (lr x ||p|| / ||u||, 1 when
either is 0: reference.lamb_trust_ratio, the kernels' formula in float64), and the second pass (run_phase2)
on its pieces with their params' scaled lr (one call per piece with stochastic rounding, keyed by its
index_offset). Bit for bit with the class at world 1; at larger worlds u's sums are added per piece, then
over ranks (tolerance in tests/distributed/test_lamb.py). Every other registry optimizer's update is
elementwise. The composite optimizers outside the registry (Adafactor's factored state, Muon, L-BFGS) are
not taken.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import re

import numpy as np

from fastopt import functional, optim, reference
from fastopt.arrays import no_self_overlap
from fastopt.backends.dispatch import backend_for
from fastopt.precision import QUANT_BLOCK, QuantizedState, is_16bit
from fastopt.clip import clip_coefficient, global_norm
from fastopt.distributed.checkpoint import load as load_checkpoint, save as save_checkpoint
from fastopt.distributed.comm import as_communicator
from fastopt.distributed.layout import DEFAULT_BUCKET_BYTES, ShardLayout
from fastopt.schedules import Schedule, is_schedule
from fastopt.specs import COMPOSITE, REGISTRY, as_bool, get_spec

__all__ = ["ShardedOptimizer", "DEFAULT_BUCKET_BYTES", "unsupported_reason"]



_BY_CLASS_NAME = {spec.class_name: spec for spec in REGISTRY.values()}
_COMPOSITE_CLASS_NAMES = {spec.class_name for spec in COMPOSITE.values()}


def unsupported_reason(spec) -> str | None:
    """Why `spec`'s update cannot be sharded (None: it can). A shard holds pieces of tensors, so the
    update must be elementwise given numbers per tensor that the step can reduce across ranks: before the
    update (spec.tensor_coefs: LARS's norms of p and g, summed per piece and all-reduced) or between its two
    passes (spec.two_phase: LAMB's norms of p and u, from the backends' run_phase1 / run_phase2); and the
    state must be shaped like the param (a factored state, like Adafactor's row and column statistics, is
    per tensor). An optimizer whose update couples the elements of a tensor in some other way must declare
    it in its spec."""
    if spec.two_phase and spec.name not in reference.TWO_PHASE:  # a new two-phase family needs its split passes
        return "a two-phase update without separate passes (reference.TWO_PHASE, the backends' run_phase1/2)"
    probe = np.zeros((2, 3))
    shapes = {name: tuple(a.shape) for name, a in functional.init_state(spec.name, probe).items()}
    if any(s != probe.shape for s in shapes.values()):
        return f"its state is not shaped like the param ({shapes} for a (2, 3) param), so it is per tensor"
    return None


def _resolve_optimizer(name_or_class):
    """(spec, class) of a registry name or a fastopt optimizer class."""
    if isinstance(name_or_class, str):
        spec = get_spec(name_or_class)
    elif isinstance(name_or_class, type) and issubclass(name_or_class, optim.Optimizer) and \
            getattr(name_or_class, "spec", None) is not None:
        spec = name_or_class.spec
    elif isinstance(name_or_class, type) and (name_or_class.__module__ or "").startswith("fastopt.torch") and \
            name_or_class.__name__ in _BY_CLASS_NAME:  # fastopt.torch's classes carry the registry's class names
        spec = _BY_CLASS_NAME[name_or_class.__name__]
    elif isinstance(name_or_class, type) and (name_or_class.__module__ or "").startswith("fastopt") and \
            name_or_class.__name__ in _COMPOSITE_CLASS_NAMES:  # Adafactor, Muon, SparseAdam, LBFGS: not in the registry
        raise ValueError(f"ShardedOptimizer does not support {name_or_class.__module__}.{name_or_class.__name__}: it "
                         f"shards the registry's optimizers ({', '.join(REGISTRY)}), whose update a rank can apply "
                         f"to its pieces of the tensors; this one reads whole tensors")
    else:
        raise TypeError(f"name_or_class must be a registry name ({', '.join(REGISTRY)}) or a fastopt optimizer "
                        f"class, got {name_or_class!r}")
    reason = unsupported_reason(spec)
    if reason is not None:
        raise ValueError(f"ShardedOptimizer does not support {spec.name!r}: {reason}")
    return spec, getattr(optim, spec.class_name)


def _numpy_keywords(spec, name_or_class, hyperparameters: dict) -> dict:
    """A fastopt.torch class's keywords as the NumPy class takes them: torch's tuples (spec.torch_groups: Rprop's
    etas and step_sizes, Adan's three betas) spread into the registry's names, then beta1 and beta2 as betas."""
    if not (isinstance(name_or_class, type) and (name_or_class.__module__ or "").startswith("fastopt.torch")):
        return hyperparameters
    out = dict(hyperparameters)
    for key, names in spec.torch_groups.items():
        if key not in out:
            continue
        value = out.pop(key)
        if not isinstance(value, (tuple, list)) or len(value) != len(names):
            raise ValueError(f"{key} must be a tuple of {len(names)} numbers {names}, got {value!r}")
        out.update(zip(names, value))
    return spec.class_keywords(out)


def _param_list(params) -> list:
    if isinstance(params, dict) or (isinstance(params, (list, tuple)) and any(isinstance(p, dict) for p in params)):
        raise TypeError("params: ShardedOptimizer takes one list of arrays (param groups are not supported)")
    if hasattr(params, "shape"):
        return [params]
    if params is None or isinstance(params, (str, bytes)):
        raise TypeError(f"params must be a list of arrays, got {type(params).__name__}")
    try:
        params = list(params)
    except TypeError:
        raise TypeError(f"params must be a list of arrays, got {type(params).__name__}") from None
    if not params:
        raise ValueError("params: ShardedOptimizer got an empty parameter list")
    return params


def _is_numpy(a) -> bool:
    return isinstance(a, np.ndarray)


def _byte_range(a) -> tuple[int, int]:
    """[first byte, last byte + 1) spanned by an array (NumPy or CuPy)."""
    if _is_numpy(a):
        lo, hi = np.byte_bounds(a) if hasattr(np, "byte_bounds") else np.lib.array_utils.byte_bounds(a)
        return lo, hi
    start = a.data.ptr
    span = sum((n - 1) * abs(s) for n, s in zip(a.shape, a.strides)) + a.itemsize if a.size else 0
    low = start + sum((n - 1) * s for n, s in zip(a.shape, a.strides) if s < 0) if a.size else start
    return low, low + span


def _address(a) -> int:
    """The address of an array's first element (NumPy or CuPy)."""
    return a.__array_interface__["data"][0] if _is_numpy(a) else a.data.ptr


def _to_host(a) -> np.ndarray:
    return a if _is_numpy(a) else a.get()


def _write(target, host) -> None:
    """target[...] = host (NumPy): in place for a host array, else copied to the device on the stream of the
    target's backend (the update kernels' stream), in order before the next step's kernels."""
    if _is_numpy(target):
        target[...] = host
    else:
        backend_for([target]).upload(target, host, target)


def _digest_values(*digests: bytes) -> np.ndarray:
    """Each 8-byte digest as four 16-bit integers (exact in float64, also summed over many ranks)."""
    return np.concatenate([np.frombuffer(d, dtype="<u2").astype(np.float64) for d in digests])


def _hp_text(value) -> str:
    """A hyperparameter as text that is equal on every rank when the values are equal: numbers as Python
    floats (0.01 and np.float64(0.01) alike), a schedule's own repr without the addresses of the functions it
    may wrap, any other callable by its type (a lambda's repr holds its address)."""
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_hp_text(v) for v in value) + ")"
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        return repr(float(value))
    if isinstance(value, Schedule):
        return _ADDRESS.sub("", repr(value))
    if callable(value):
        return f"<callable {type(value).__qualname__}>"
    return repr(value)


_LR_SLOTS = 8  # the length of _comparable(a float's bytes)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # "<function f at 0x7f...>": differs between processes


def _comparable(*digests: bytes) -> np.ndarray:
    """8-byte digests (or a float's 8 bytes) as 16-bit integers and their squares ([d..., d^2...]): summed over
    the ranks by an all-reduce, they tell every rank alike whether all ranks gave the same (_differing)."""
    d = _digest_values(*digests)
    return np.concatenate([d, d * d])


def _differing(total: np.ndarray, world: int) -> np.ndarray:
    """From the sums over `world` ranks of digest components d and of their squares ([sum d..., sum d^2...]):
    per component, whether any rank's differs. All n equal <=> n * sum(d^2) == (sum d)^2 (Cauchy-Schwarz);
    exact integers, the same answer on every rank."""
    n = total.size // 2
    return world * total[n:] != total[:n] * total[:n]


class ShardedOptimizer:
    """ZeRO-1 sharded optimizer (see the module docstring). Arguments:

    name_or_class: a registry name ("adam") or class (fastopt.Adam, or fastopt.torch.Adam: the same update);
        every registry optimizer is taken (unsupported_reason says why one would not be).
    params: a list of arrays, identical on every rank (NumPy for MPI, torch tensors for torch.distributed,
        CuPy arrays for NCCL); updated in place after each step (unless copy_params=False).
    comm: an mpi4py communicator, a torch.distributed process group (or the torch.distributed module: the
        default group), a CuPy NcclCommunicator, or a fastopt.distributed Communicator.
    hyperparameters: the single-process class's keywords (lr, betas=(b1, b2), weight_decay, ...,
        clip_grad_norm=, skip_nonfinite=, backend=, and the precision options state_dtype=, kahan=,
        stochastic_rounding=, seed=: see the module docstring), checked by it; lr may be a
        schedule.
    bucket_bytes: bucket size (communication and update overlap per bucket).
    """

    def __init__(self, name_or_class, params, comm, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 copy_params: bool = True, **hyperparameters):
        comm = as_communicator(comm)  # (without a communicator there is no collective to join)
        self.comm, self.rank, self.world_size = comm, comm.rank, comm.size
        # the checks of this rank: a failure still joins the construction's one collective (every rank then
        # raises, instead of the others waiting in it for a rank that gave up)
        try:
            views = self._configure(name_or_class, params, bucket_bytes, copy_params, hyperparameters)
            error = None
        except Exception as e:  # noqa: BLE001  (raised after the collective)
            views, error = None, e
        self._check_same_on_every_rank(views, error)  # the one collective of the construction
        self._allocate()
        for b in self.layout.buckets:
            flat = self._flat[b.index][1]
            for i, off, n in zip(b.params, b.offsets, b.sizes):
                flat[off:off + n] = views[i].reshape(-1)
        self._init_states()
        self._own = self._views_of(self._flat)
        self._grads = self._views_of(self._send)
        self._grad_address = [_address(self.comm.as_array(g, "grads")) for g in self._grads]
        # the send buffers' bytes, fixed for the optimizer's life: a gradient inside them is read before packing
        self._send_spans = [_byte_range(send) for _, send in self._send if send.size]

    def _configure(self, name_or_class, params, bucket_bytes, copy_params, hyperparameters) -> list:
        """This rank's checks of the arguments (no collective) and the optimizer's configuration; returns the
        params' views in the engine's type."""
        comm = self.comm
        spec, cls = _resolve_optimizer(name_or_class)
        hyperparameters = _numpy_keywords(spec, name_or_class, hyperparameters)
        params = _param_list(params)
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, numbers.Integral) or bucket_bytes < 1:
            raise ValueError(f"Invalid bucket_bytes: {bucket_bytes!r} (a positive number of bytes)")
        copy_params = as_bool("copy_params", copy_params)
        views = [comm.as_array(p, f"params[{i}]") for i, p in enumerate(params)]
        self._check_params(views)
        dtypes = [np.dtype(v.dtype) for v in views]
        # the single-process class checks every hyperparameter and option on a one-element buffer per dtype
        probes = [comm.alloc(1, dt)[1] for dt in dict.fromkeys(dtypes)]
        probe = cls(probes, **hyperparameters)  # checks state_dtype, kahan, stochastic_rounding and seed too
        self._precision = {"state_dtype": probe.state_dtype, "kahan": probe.kahan,
                           "stochastic_rounding": probe.stochastic_rounding, "seed": probe.seed}
        int8 = isinstance(probe.state_dtype, str) and probe.state_dtype == "int8"
        exported = probe.export_state().hyperparameters[0]
        lr0 = exported["lr"](0) if is_schedule(exported["lr"]) else exported["lr"]
        checked, _ = spec.validate(dict(exported, lr=lr0), 1)  # Python floats and bools, as the class uses
        self.spec = spec
        # fixed for the optimizer's life: every rank must take the same collectives (compared across ranks)
        self._clip, self._skip, self._backend = probe.clip_grad_norm, probe.skip_nonfinite, probe.backend
        self._hp = dict(checked, lr=exported["lr"])  # registry names; lr may be a schedule
        self._options = {name: checked[name] for name in spec.state_options}  # decide the state arrays
        self._step_fn = getattr(functional, spec.function_name)
        self.layout = ShardLayout.build([v.shape for v in views], dtypes, comm.size, int(bucket_bytes),
                                        QUANT_BLOCK if int8 else 1)
        self._int8 = int8
        # LARS: each param's trust ratio from the sums of squares of the whole param and its mean gradient
        # (per-piece sums, all-reduced with the step's few scalars) and its real ndim (exclude_1d)
        self._norms = spec.tensor_coefs is not None
        self._ndims = [len(s) for s in self.layout.shapes]
        self.copy_params = bool(copy_params)
        self._user = views
        self.steps = 0              # updates applied
        self.skipped_steps = 0      # steps skipped for a NaN/Inf gradient (skip_nonfinite)
        return views

    def _views_of(self, buffers) -> list:
        """Per param (in the user's order), its view of a per-bucket flat buffer, in the engine's type."""
        out = [None] * len(self.layout.shapes)
        for b in self.layout.buckets:
            for i, off, n in zip(b.params, b.offsets, b.sizes):
                out[i] = self.comm.native_view(buffers[b.index][0], off, off + n, self.layout.shapes[i])
        return out

    # ---- construction -------------------------------------------------------------------------

    @staticmethod
    def _check_params(views):
        for i, v in enumerate(views):
            if np.dtype(v.dtype).kind != "f" and not is_16bit(v.dtype):  # ml_dtypes' bfloat16 is kind "V"
                raise TypeError(f"params[{i}] has dtype {v.dtype}; the optimizer updates floating-point arrays")
            if _is_numpy(v) and not v.flags.writeable:
                raise ValueError(f"params[{i}] is read-only")
            if not no_self_overlap(v):
                raise ValueError(f"params[{i}] has elements that share memory (shape {tuple(v.shape)}, strides "
                                 f"{tuple(v.strides)}: a broadcast or overlapping view); each element must have "
                                 f"memory of its own (pass a copy)")
        ranges = sorted((*_byte_range(v), i) for i, v in enumerate(views) if v.size)
        for (lo1, hi1, i1), (lo2, hi2, i2) in zip(ranges, ranges[1:]):
            if lo2 < hi1:
                raise ValueError(f"params[{min(i1, i2)}] and params[{max(i1, i2)}] share memory (each array may be "
                                 f"optimised once)")

    def _config_text(self) -> str:
        hp = ", ".join(f"{k}={_hp_text(v)}" for k, v in sorted(self._hp.items()))
        precision = " ".join(f"{k}={v!r}" for k, v in self._precision.items())
        return (f"{self.spec.name}({hp}) clip_grad_norm={self.clip_grad_norm!r} skip_nonfinite={self.skip_nonfinite} "
                f"bucket_bytes={self.layout.bucket_bytes} {precision}")

    def _check_same_on_every_rank(self, views, error):
        """One all-reduce of the count of ranks whose own checks failed (`error`: raised here after it, the
        other ranks raise a ValueError pointing at it) and of three digests (structure, contents,
        configuration): every rank raises the same error when any of them differs between ranks."""
        if error is None:
            structure = hashlib.blake2b(digest_size=8)
            contents = hashlib.blake2b(digest_size=8)
            for v in views:
                structure.update(f"{tuple(v.shape)}:{np.dtype(v.dtype).str};".encode())
                contents.update(np.ascontiguousarray(_to_host(v)).reshape(-1).view(np.uint8))
            config = hashlib.blake2b(self._config_text().encode(), digest_size=8)
            compared = _comparable(structure.digest(), contents.digest(), config.digest())
        else:
            compared = np.zeros(24)  # the same length on every rank; its sums are not read when a rank failed
        total = self.comm.all_reduce_sum(np.concatenate([[0.0 if error is None else 1.0], compared]))
        if total[0]:
            if error is not None:
                raise error
            raise ValueError(f"ShardedOptimizer: the arguments failed the checks on {int(total[0])} other rank(s) "
                             f"(see their error); this is rank {self.rank}")
        differs = _differing(total[1:], self.world_size)
        what = [name for name, bad in zip(("the shapes or dtypes of the params", "the values of the params",
                                           "the optimizer, its hyperparameters or bucket_bytes"),
                                          differs.reshape(3, 4).any(axis=1)) if bad]
        if what:
            raise ValueError(
                f"ShardedOptimizer: {' and '.join(what)} differ between the {self.world_size} ranks (every rank "
                f"must pass the same params, e.g. broadcast from rank 0, and the same arguments); this is rank "
                f"{self.rank}: {len(views)} params, {self._config_text()}")

    @staticmethod
    def grad_dtype(dtype) -> np.dtype:
        """The dtype gradients of `dtype` params are reduced and applied in: float32 for 16-bit params."""
        return np.dtype(np.float32) if is_16bit(dtype) else np.dtype(dtype)

    def _allocate(self):
        comm = self.comm
        self._flat, self._send, self._recv, self._states = [], [], [], []
        for b in self.layout.buckets:
            self._flat.append(comm.alloc(b.world * b.shard, b.dtype))
            self._send.append(comm.alloc(b.world * b.shard, self.grad_dtype(b.dtype)))
            self._recv.append(comm.alloc(b.shard, self.grad_dtype(b.dtype)))

    def _init_states(self):
        """This rank's state for its shard of each bucket, made once the params are in the flat buffers:
        a state that starts as a copy of the param (schedule-free's z) copies the shard's params; 8-bit
        state is a QuantizedState over the whole shard (codes per element, one scale per 256)."""
        spec, options = self.spec, self._options
        precision = {"state_dtype": self._precision["state_dtype"], "kahan": self._precision["kahan"]}
        self._pieces = []
        for b in self.layout.buckets:
            lo, hi = b.shard_range(self.rank)
            self._states.append(functional.init_state(spec.name, self._flat[b.index][1][lo:hi], **precision,
                                                      **options))
            # (param, first element in the param, element count, offset in the shard) of each piece held
            self._pieces.append([(i, e0, e1 - e0, pos - lo) for i, e0, e1, pos in b.pieces(lo, hi)])

    # ---- introspection ------------------------------------------------------------------------

    @property
    def params(self) -> list:
        """The optimizer's own params: views of its flat buffers (engine type), in the order of the params
        given; always up to date after a step. Training on these skips the copy into the user's arrays."""
        return list(self._own)

    @property
    def clip_grad_norm(self) -> float | None:
        """Max global L2 norm of the mean gradient (None: no clipping). Read-only: every rank must agree."""
        return self._clip

    @property
    def skip_nonfinite(self) -> bool:
        """Skip (on every rank) steps where any rank's gradient has a NaN/Inf. Read-only."""
        return self._skip

    @property
    def backend(self) -> str | None:
        """The backend forced for the update kernels (None: from the arrays' type). Read-only."""
        return self._backend

    @property
    def grads(self) -> list:
        """Gradient views of the send buffer (engine type, shaped like the params; float32 for 16-bit params):
        write this rank's gradients into them and pass them to step() to skip packing. Overwritten by nobody
        but you."""
        return list(self._grads)

    @property
    def hyperparameters(self) -> dict:
        """Registry-named hyperparameters (lr may be a schedule)."""
        return dict(self._hp)

    def shard_params(self) -> list:
        """This rank's shard of each bucket's params (live views, padding included)."""
        return [self._flat[b.index][1][slice(*b.shard_range(self.rank))] for b in self.layout.buckets]

    def shard_states(self) -> list[dict]:
        """Per bucket, this rank's state arrays (name -> live array, padding included)."""
        return [dict(s) for s in self._states]

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds."""
        return sum(int(a.nbytes) for s in self._states for a in s.values())  # QuantizedState: codes + scales

    @property
    def precision(self) -> dict:
        """The precision options (state_dtype, kahan, stochastic_rounding, seed), as the class checked them."""
        return dict(self._precision)

    def lr_for_next_step(self) -> float:
        lr = self._hp["lr"]
        return self.spec.hypers[0].validate(lr(self.steps) if is_schedule(lr) else lr)

    def __repr__(self):
        return (f"ShardedOptimizer({self.spec.class_name}, rank {self.rank} of {self.world_size}, "
                f"{len(self._user)} params in {len(self.layout.buckets)} bucket(s), {self.comm.engine})")

    # ---- the step -----------------------------------------------------------------------------

    def _grad_views(self, grads):
        if not isinstance(grads, (list, tuple)):
            if len(self._user) == 1 and hasattr(grads, "shape"):
                grads = [grads]
            else:
                raise TypeError(f"grads must be a list of arrays (one per param, in the order of the params), got "
                                f"{type(grads).__name__}")
        if len(grads) != len(self._user):
            raise ValueError(f"grads has {len(grads)} arrays but the optimizer has {len(self._user)} params")
        out = []
        for i, (g, p) in enumerate(zip(grads, self._user)):
            if g is None:
                raise TypeError(f"grads[{i}] is None")
            v = self.comm.as_array(g, f"grads[{i}]")
            if np.dtype(v.dtype) not in (np.dtype(p.dtype), self.grad_dtype(p.dtype)):
                also = " (or float32)" if is_16bit(p.dtype) else ""
                raise TypeError(f"grads[{i}] has dtype {v.dtype} but params[{i}] has {p.dtype}{also}")
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"grads[{i}] has shape {tuple(v.shape)} but params[{i}] has {tuple(p.shape)}")
            out.append(v)
        return out

    def _pack(self, views):
        """Copy the gradients into the send buffers (not those that are the optimizer's own views). A gradient
        in another place of a send buffer (opt.grads passed in another order) is read before any is written."""
        sends = [self._send[b.index][1] for b in self.layout.buckets]
        spans = self._send_spans
        copies = []
        for b, send in zip(self.layout.buckets, sends):
            for i, off, n in zip(b.params, b.offsets, b.sizes):
                g = views[i]
                # not for the optimizer's own gradient views (opt.grads): same first byte, contiguous
                if n and not (_address(g) == self._grad_address[i] and g.flags.c_contiguous):
                    lo, hi = _byte_range(g)
                    if any(lo < end and start < hi for start, end in spans):
                        g = g.copy()
                    copies.append((send, off, n, g))
        for send, off, n, g in copies:
            send[off:off + n] = g.reshape(-1)

    def step(self, grads) -> bool:
        """One update with this rank's local gradients (a list in the order of the params); the mean over
        ranks is applied. Returns False when the step was skipped (skip_nonfinite and a NaN/Inf gradient on
        any rank), else True. A rejected gradient raises on every rank, with nothing updated anywhere."""
        error = None
        try:
            views = self._grad_views(grads)
            lr = self.lr_for_next_step()
        except Exception as e:  # noqa: BLE001  (any error of this rank's checks or its schedule: raised after the
            error, views = e, None  # collectives, which every rank joins, so that no rank waits for this one)
        comm, buckets = self.comm, self.layout.buckets
        guard = self.clip_grad_norm is not None or self.skip_nonfinite
        sync = guard or self._norms  # the all-reduce carries numbers computed from the reduced gradients
        # [ranks whose checks failed, this step's lr as exact integers (_comparable)]
        head = np.concatenate([[0.0 if error is None else 1.0],
                               _comparable(np.float64(lr).tobytes()) if error is None else np.zeros(_LR_SLOTS)])
        # without clip/skip/norms the head travels alone, started before the reduce-scatter so that both are in
        # flight together (one synchronisation, not two)
        early = None if sync else comm.start_all_reduce_sum(head)
        if error is None:
            self._pack(views)
        # a rank whose checks failed still joins the reduce-scatter (the sums it feeds are discarded by every
        # rank): the ranks learn about it from the all-reduce, before anything is updated
        pending = [comm.reduce_scatter(self._send[b.index][0], self._recv[b.index][0]) for b in buckets]
        sq = 0.0
        norms = np.zeros(2 * len(self._ndims) if self._norms else 0)  # same length on every rank, failed or not
        if sync:
            for r in pending:
                r.wait()
            pending = [None] * len(buckets)
            if error is None and guard:
                for b in buckets:
                    norm = float(global_norm(self._recv[b.index][1]))
                    sq += norm * norm
            if error is None and self._norms:
                norms = self._piece_sumsq()
        # ONE all-reduce: the head, [sum of squares, ranks with a non-finite gradient] and, for LARS, per param
        # the sums of squares of the params and of the summed gradients over the pieces
        total = comm.all_reduce_sum(np.concatenate([head, [sq, 0.0 if math.isfinite(sq) else 1.0], norms])) \
            if sync else early.wait()
        head, total = total[:head.size], total[head.size:]
        if head[0]:
            for r in pending:
                if r is not None:
                    r.wait()
            if error is not None:
                raise error
            raise ValueError(f"step: the gradients of {int(head[0])} other rank(s) failed the checks there (see "
                             f"their error); nothing was updated on any rank")
        if _differing(head[1:], self.world_size).any():
            raise ValueError(f"step: the learning rate differs between the ranks (this is rank {self.rank}, lr "
                             f"{lr!r}): each rank would update its shard with its own; a schedule must give the "
                             f"same lr on every rank (e.g. ReduceLROnPlateau fed the all-reduced validation loss, "
                             f"not each rank's own); nothing was updated on any rank")
        scale = 1.0 / self.world_size
        if guard:
            if self.skip_nonfinite and (total[1] > 0 or not math.isfinite(total[0])):
                self.skipped_steps += 1
                return False
            if self.clip_grad_norm is not None:
                norm = math.sqrt(total[0]) / self.world_size  # the norm of the mean gradient
                scale = float(clip_coefficient(norm, self.clip_grad_norm)) * scale
        hp = dict(self._hp, lr=lr)
        if self.spec.two_phase:
            self._two_phase_step(hp, scale, pending)
            return True
        coefs = None
        if self._norms:  # the ratios of the whole params, from the scaled (mean, clipped) gradient as the class
            n = len(self._ndims)
            coefs = self.spec.tensor_coefs(hp, scale, total[2:2 + n], total[2 + n:], self._ndims)
        gathers = []
        for b in buckets:
            if pending[b.index] is not None:
                pending[b.index].wait()
            self._update(b, hp, scale, coefs)
            gathers.append(comm.all_gather(self._wire(self._flat[b.index][0]), b.shard))
        self._finish_step(gathers)
        return True

    def _two_phase_step(self, hp, scale, pending) -> None:
        """LAMB after step 3 (see the module docstring): first pass per bucket, the second all-reduce, the
        scaled lrs, second pass and all-gather per bucket."""
        comm, buckets = self.comm, self.layout.buckets
        n = len(self._ndims)
        hp, step = self.spec.validate(hp, self.steps + 1)  # as functional.apply_update checks them
        sums = np.zeros(1 + 2 * n)  # [this rank failed, sum p^2 per param..., sum u^2 per param...]
        calls, error = [], None
        for b in buckets:
            if pending[b.index] is not None:
                pending[b.index].wait()
            if error is not None:
                continue
            try:
                calls.append(self._phase1(b, hp, step, scale, sums[1:1 + n], sums[1 + n:]))
            except (TypeError, ValueError, MemoryError) as e:  # no rank may wait alone in the all-reduce below
                error, sums[0] = e, 1.0
        total = comm.all_reduce_sum(sums)
        if total[0]:
            raise error if error is not None else RuntimeError(
                f"step: the first LAMB pass failed on {int(total[0])} other rank(s) (see their error), after the "
                f"moments of some pieces were written")
        scaled_lr = np.array([hp["lr"] * reference.lamb_trust_ratio(total[1 + i], total[1 + n + i])
                              for i in range(n)])
        gathers = []
        for b, bucket_calls in zip(buckets, calls):
            for be, prepared, call, stochastic in bucket_calls:
                be.run_phase2(prepared, self.spec, hp, step, scale, scaled_lr[[i for i, _, _, _ in call]],
                              **({} if stochastic is None else {"stochastic": stochastic}))
            gathers.append(comm.all_gather(self._wire(self._flat[b.index][0]), b.shard))
        self._finish_step(gathers)

    def _finish_step(self, gathers) -> None:
        """After the updates: wait for the params' all-gathers, count the step, copy the params out."""
        for g in gathers:
            g.wait()
        self.steps += 1
        if self.copy_params:
            self._copy_out()

    def _phase1(self, b, hp, step, scale, param_sumsq, update_sumsq) -> list:
        """The first pass of a two-phase update on this rank's pieces of bucket b (one list call, one call per
        piece with stochastic rounding); adds each piece's sums of p^2 and u^2 to its param's entries.
        Returns [(backend, prepared call, pieces, rounding)] for the second pass."""
        pieces = self._pieces[b.index]
        if not pieces:
            return []
        lo, hi = b.shard_range(self.rank)
        params, grads, states = self._flat[b.index][1][lo:hi], self._recv[b.index][1], self._states[b.index]
        spec = self.spec
        sr, comp = self._precision["stochastic_rounding"], states.get("kahan_comp")
        out = []
        for call in ([pieces] if not sr else [[piece] for piece in pieces]):
            given = {name: None if states.get(name) is None else [states[name][at:at + m] for _, _, m, at in call]
                     for name in spec.states}
            tail, names = spec.plan_call(hp, given.__getitem__)
            if comp is not None:
                tail, names = functional.with_kahan(tail, names, [comp[at:at + m] for _, _, m, at in call])
            ps = [params[at:at + m] for _, _, m, at in call]
            arrays = (ps, [grads[at:at + m] for _, _, m, at in call]) + tail
            be = backend_for(ps, self.backend)
            prepared = be.prepare(arrays, names)
            # keyed like the single-process class: (seed, its step count), element e0 + j of the param
            stochastic = functional.rounding_options(step, sr, self._precision["seed"], call[0][1], comp is not None)
            extra = {} if stochastic is None else {"stochastic": stochastic}
            sums = np.asarray(be.run_phase1(prepared, spec, hp, step, scale, **extra), dtype=np.float64)
            for (i, _, _, _), (pp, uu) in zip(call, sums):
                param_sumsq[i] += pp  # a param's pieces in one shard of one bucket: one piece
                update_sumsq[i] += uu
            out.append((be, prepared, call, stochastic))
        return out

    def _piece_sumsq(self) -> np.ndarray:
        """Per param, the float64 sums of squares of the pieces of its params and of its summed gradients that
        this rank holds (zeros for the others): [params..., grads...], to be all-reduced."""
        n = len(self._ndims)
        out = np.zeros(2 * n)
        for b in self.layout.buckets:
            pieces = self._pieces[b.index]
            if not pieces:
                continue
            lo, _ = b.shard_range(self.rank)
            params, grads = self._flat[b.index][1][lo:], self._recv[b.index][1]
            be = backend_for([params[:1]], self.backend)
            for k, arrays in enumerate(([params[at:at + m] for _, _, m, at in pieces],
                                        [grads[at:at + m] for _, _, m, at in pieces])):
                sums = np.asarray(_to_host(be.sumsq_per_tensor(arrays)), dtype=np.float64)
                for (i, _, _, _), v in zip(pieces, sums):
                    out[k * n + i] += v  # a param's pieces in one shard of one bucket: one piece
        return out

    def _update(self, b, hp, scale, coefs=None) -> None:
        """The fused update of this rank's shard of bucket b: one call over the whole shard, or (8-bit
        state, stochastic rounding, per-param coefficients `coefs`: LARS) over the pieces of params the shard
        holds, each with its param's coefficient (see the module docstring)."""
        lo, hi = b.shard_range(self.rank)
        params, grads, states = self._flat[b.index][1][lo:hi], self._recv[b.index][1], self._states[b.index]
        step = self.steps + 1
        kwargs = {"step": step} if self.spec.uses_step else {}
        if not self._int8 and not self._precision["stochastic_rounding"] and coefs is None:
            self._step_fn(params, grads, **states, **kwargs, **hp, grad_scale=scale, backend=self.backend)
            return
        pieces = self._pieces[b.index]
        if not pieces:
            return

        def part(a, at, n):  # a piece of a shard array: 8-bit state with its blocks' scales
            if isinstance(a, QuantizedState):
                return QuantizedState(a.codes[at:at + n], a.absmax[at // QUANT_BLOCK:-(-(at + n) // QUANT_BLOCK)],
                                      a.signed)
            return a[at:at + n]

        spec = self.spec
        comp = states.get("kahan_comp")
        calls = [pieces] if not self._precision["stochastic_rounding"] else [[piece] for piece in pieces]
        for call in calls:
            ps = [params[at:at + n] for _, _, n, at in call]
            gs = [grads[at:at + n] for _, _, n, at in call]
            st = tuple(None if states.get(name) is None else [part(states[name], at, n) for _, _, n, at in call]
                       for name in spec.states)
            kc = None if comp is None else [comp[at:at + n] for _, _, n, at in call]
            tc = None if coefs is None else coefs[[i for i, _, _, _ in call]]
            # keyed like the single-process class: (seed, its step count), element e0 + j of the param
            functional.apply_update(spec, ps, gs, st, dict(hp), step, grad_scale=scale, backend=self.backend,
                                    kahan_comp=kc, stochastic_rounding=self._precision["stochastic_rounding"],
                                    seed=self._precision["seed"], index_offset=call[0][1], key_step=step,
                                    tensor_coefs=tc)

    @staticmethod
    def _wire(native):
        """A flat buffer as the engine moves it: bfloat16 NumPy and CuPy buffers as their uint16 bits (neither
        MPI nor CuPy's NCCL names bfloat16; the all-gather only moves bytes). torch tensors as they are."""
        dtype = getattr(native, "dtype", None)
        if isinstance(dtype, np.dtype) and dtype.itemsize == 2 and dtype.kind == "V":
            return native.view(np.uint16)
        return native

    def _copy_out(self):
        for b in self.layout.buckets:
            flat = self._flat[b.index][1]
            for i, off, n in zip(b.params, b.offsets, b.sizes):
                if n:
                    user = self._user[i]
                    user[...] = flat[off:off + n].reshape(user.shape)

    # ---- checkpoints (fastopt/distributed/checkpoint.py) -----------------------------------------

    def save(self, path) -> None:
        """Sharded checkpoint into directory `path` (collective: every rank calls it). See
        fastopt.distributed.checkpoint."""
        save_checkpoint(self, path)

    def load(self, path) -> None:
        """Restore from a sharded checkpoint saved at any world size (collective)."""
        load_checkpoint(self, path)

    # ---- used by the checkpoint module ----------------------------------------------------------

    def restore(self, steps: int, skipped_steps: int, hyperparameters: dict, shard_params: list,
                shard_states: list) -> None:
        """Write checked checkpoint data (collective: ends with the all-gather of the params). `shard_params`:
        per bucket, this rank's shard (host arrays); `shard_states`: per bucket, name -> host array."""
        for b in self.layout.buckets:
            lo, hi = b.shard_range(self.rank)
            _write(self._flat[b.index][1][lo:hi], shard_params[b.index])
            for name, target in self._states[b.index].items():
                src = shard_states[b.index][name]
                if isinstance(target, QuantizedState):  # 8-bit state: codes and scales (host arrays)
                    _write(target.codes, src.codes)
                    _write(target.absmax, src.absmax)
                else:
                    _write(target, src)
        keep_schedule = is_schedule(self._hp["lr"])
        self._hp.update({k: v for k, v in hyperparameters.items() if not (k == "lr" and keep_schedule)})
        self._options = {name: hyperparameters[name] for name in self.spec.state_options}
        self.steps, self.skipped_steps = int(steps), int(skipped_steps)
        for r in [self.comm.all_gather(self._wire(self._flat[b.index][0]), b.shard) for b in self.layout.buckets]:
            r.wait()
        if self.copy_params:
            self._copy_out()
