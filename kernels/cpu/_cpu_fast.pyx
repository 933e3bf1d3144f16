# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# distutils: language = c++
"""Compiled CPU backend: validation of the arrays, and one parallel region per call over all chunks of
all tensors. The per-element math is in kernels/cuda/*.cuh, the element loops in cpu_loops.hpp.

Every check happens before the first write, so an error leaves all arrays unchanged.
"""
from libc.stdint cimport int64_t, uintptr_t
from libc.stdlib cimport malloc, calloc, free, qsort
from libc.string cimport memcpy, memcmp
from cpython.ref cimport PyObject
from libc.math cimport sqrt
from cython.parallel cimport prange
cimport numpy as cnp

import numpy as np

cnp.import_array()

# OpenMP through a shim rather than `cimport openmp`: a serial build (FASTOPT_OPENMP=0, or a compiler without
# OpenMP) must not reference omp_* symbols, or the module fails to import.
cdef extern from "platform.hpp" nogil:
    int fastopt_omp_max_threads()
    int fastopt_get_thread_override()
    void fastopt_set_thread_override(int n)
    int FASTOPT_OPENMP
    const char* FASTOPT_ISA_DISPATCH

cdef extern from "cpu_loops.hpp" namespace "fastopt" nogil:
    ctypedef struct FoQuantizer:
        const float* mid
        const unsigned char* bucket

cdef extern from "cpu_loops.hpp" namespace "fastopt::cpu" nogil:
    ctypedef struct Int8Codec:  # one map's codec (int8_simd.hpp): used only by pointer here
        pass
    Int8Codec int8_codec(const float* map, FoQuantizer q)
    int run_chunk(int layout, int kind, int variant, void* const* ptrs, int64_t n, const double* s,
                  double coef, double* acc, unsigned int key, unsigned long long index0)
    int run_chunk_int8(int layout, int kind, int variant, void* const* ptrs, float* const* absmax,
                       const Int8Codec* const* codecs, int64_t n, const double* s,
                       double coef, unsigned int key, unsigned long long index0)
    double sumsq(int dtype, const void* x, int64_t n)
    void scale(int dtype, void* x, int64_t n, double c)
    void clamp(int dtype, void* x, int64_t n, double c)
    cdef enum:
        KIND_TWO_PHASE, KIND_TOUCH, KIND_TOUCH_APPLY
    ctypedef struct FamilyVariant:
        int kind
        const char* family
        int variant
    const FamilyVariant* FAMILY_VARIANTS "fastopt::cpu::FAMILY_VARIANTS"
    const int FAMILY_VARIANT_COUNT "fastopt::cpu::FAMILY_VARIANT_COUNT"
    const char* const* TWO_PHASE_NAMES "fastopt::cpu::TWO_PHASE_NAMES"
    const int TWO_PHASE_COUNT "fastopt::cpu::TWO_PHASE_COUNT"
    double two_phase_scaled_lr(int index, double lr, double param_norm, double update_norm)
    cdef enum:
        DTYPE_F32, DTYPE_F64, DTYPE_BF16, DTYPE_F16
    cdef enum:
        ROUND_NEAREST, ROUND_KAHAN, ROUND_STOCHASTIC
        LANES "fastopt::cpu::LANES"

def _family_table():
    # the generated family table compiled into cpu_loops.hpp (kernels/cuda/families.cuh, from the registry)
    cdef int i
    out = {}
    for i in range(FAMILY_VARIANT_COUNT):
        out.setdefault(FAMILY_VARIANTS[i].family.decode(), (FAMILY_VARIANTS[i].kind, []))[1].append(
            FAMILY_VARIANTS[i].variant)
    return {name: (kind, tuple(variants)) for name, (kind, variants) in out.items()}


# family (OptimizerSpec.kernel) -> the variants compiled for it: the registry's, as of the build
FAMILY_VARIANTS_BUILT = {name: variants for name, (kind, variants) in _family_table().items()}
# kernel name -> kind: the elementwise families from the generated table, the two-phase families (their
# phase 1; phase 2 is the next kind), then the bandwidth-ceiling kernels
KINDS = {name: kind for name, (kind, variants) in _family_table().items()}
KINDS.update({TWO_PHASE_NAMES[i].decode(): KIND_TWO_PHASE + 2 * i for i in range(TWO_PHASE_COUNT)})
KINDS.update({"touch": KIND_TOUCH, "touch_apply": KIND_TOUCH_APPLY})

# Work is split into chunks of CHUNK elements (fixed, so reductions sum in the same order whatever the
# thread count); below PARALLEL_MIN elements in total the call stays on one thread, where waking the
# OpenMP team costs more than it saves.
DEF CHUNK = 1 << 15
DEF PARALLEL_MIN = 1 << 16
DEF MAX_SCALARS = 16
DEF SLOTS = 7          # p, g, state0, state1, state2, the Kahan compensation, state3 (Adan's fourth state)
DEF COMP = 5           # the slot of the Kahan compensation (kahan=True)
DEF INT8_SLOTS = 7     # run_int8's pointers per tensor: p, g, three states' codes, the compensation, a fourth's

# How this module was built: OpenMP or serial, and the runtime ISA dispatch (platform.hpp).
OPENMP = bool(FASTOPT_OPENMP)
CHUNK_ELEMENTS = CHUNK  # the elements of a chunk (a tensor's last may hold fewer)
ISA_DISPATCH = FASTOPT_ISA_DISPATCH.decode()

cdef int _num_threads = fastopt_omp_max_threads()
cdef int _pool_started = 0  # a parallel region of more than one thread has run here: OpenMP's threads exist
cdef int _fork_capped = 0   # a forked child of such a process: one thread, whatever an override says


def set_num_threads(int n):
    """Threads used by the CPU kernels (default: OpenMP's, i.e. OMP_NUM_THREADS or the core count). A
    serial build accepts any n >= 1 and keeps running on one thread (get_num_threads() says 1)."""
    global _num_threads, _fork_capped
    if n < 1:
        raise ValueError(f"Invalid num_threads: {n}")
    _num_threads = n if FASTOPT_OPENMP else 1
    _fork_capped = 0  # asked for explicitly (in a forked child too)


def get_num_threads():
    return _num_threads


def after_fork_in_child():
    """os.register_at_fork's after_in_child: OpenMP's threads do not survive fork, and in a child of a process
    that had started them, libgomp's first parallel region waits for them forever (a DataLoader worker that
    steps a NumPy optimizer hung). There the kernels run on one thread (set_num_threads(n) in the child asks
    for more, at that risk). True when the count was lowered."""
    global _num_threads, _pool_started, _fork_capped
    fastopt_set_thread_override(0)
    if not _pool_started:
        return False
    _num_threads = 1
    _pool_started = 0
    _fork_capped = 1  # a fastopt.torch step's override (torch's count survives fork) would ask for more
    return True


def get_thread_override():
    return fastopt_get_thread_override()


def set_thread_override(int n):
    """The kernels called from this (Python) thread run on n threads (0: the process-wide count again),
    set_num_threads left as it is; returns the previous override. A serial build runs on one thread."""
    if n < 0:
        raise ValueError(f"Invalid thread override: {n}")
    previous = fastopt_get_thread_override()
    fastopt_set_thread_override(n if FASTOPT_OPENMP or n == 0 else 1)
    return previous


cdef struct Chunk:
    int tensor
    int64_t start
    int64_t n
    int64_t offset  # the elements of the chunks before it in its array: where the threads' shares start

cdef struct Span:
    uintptr_t start
    uintptr_t end
    int batch      # which batch of check_disjoint
    int slot       # which argument: 0 params, 1 grads, 2.. states
    int index      # which tensor of the list
    int written


cdef int _cmp_span(const void* a, const void* b) noexcept nogil:
    cdef uintptr_t x = (<const Span*> a).start, y = (<const Span*> b).start
    return -1 if x < y else (1 if x > y else 0)


cdef object _as_ndarray(object obj, str name):
    """Zero-copy NumPy view of an array-like that exposes its memory (buffer protocol,
    __array_interface__, DLPack), so that in-place updates land in the caller's memory. ndarray
    subclasses (memmap) are used as they are, except masked arrays, whose mask the kernels would ignore."""
    if isinstance(obj, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array; pass its data (np.ma.getdata) or fill it")
    if cnp.PyArray_Check(obj):
        return obj
    from fastopt.arrays import as_numpy
    return as_numpy(obj, name)


cdef str _label(tuple names, int slot, int index, bint is_list, object indices=None):
    """How a message names an array: names[slot], with its position in the caller's list (indices:
    the caller's numbering of the list, e.g. an optimizer's param order)."""
    if not is_list:
        return names[slot]
    return f"{names[slot]}[{index if indices is None else indices[index]}]"


# ml_dtypes' bfloat16 is a user dtype (number >= NPY_USERDEF, 256) that NumPy numbers at registration: found by name the first
# time one is seen (ml_dtypes is not imported here; without it no such array exists)
cdef int _bf16_type = -1

# The storage dtypes of the kernels (cpu_loops.hpp DTYPE_*): element size, name (in messages)
cdef int[4] _ITEMSIZE = [4, 8, 2, 2]
_CODE_NAMES = ("float32", "float64", "bfloat16", "float16")
# what the errors say fastopt updates (the same text as backends/validate.py HostArrays.dtypes_text)
DTYPES_TEXT = "float32, float64, float16 or bfloat16"


cdef int _dtype_code(cnp.ndarray a):
    """The kernel dtype of `a`; -1 for anything else, including non-native byte order."""
    global _bf16_type
    cdef int t = cnp.PyArray_TYPE(a)
    if not cnp.PyArray_ISNOTSWAPPED(a):
        return -1
    if t == cnp.NPY_FLOAT32:
        return DTYPE_F32
    if t == cnp.NPY_FLOAT64:
        return DTYPE_F64
    if t == cnp.NPY_FLOAT16:
        return DTYPE_F16
    if t == _bf16_type:
        return DTYPE_BF16
    if _bf16_type < 0 and t >= 256 and _is_bfloat16((<object> a).dtype):
        _bf16_type = t
        return DTYPE_BF16
    return -1


cdef bint _is_bfloat16(object dtype):
    return dtype.name == "bfloat16" and dtype.itemsize == 2


cdef inline bint _is16(int code) noexcept nogil:
    return code == DTYPE_BF16 or code == DTYPE_F16


cdef inline int _state_code(int param_code) noexcept nogil:
    """The default dtype of a `param_code` param's optimizer state: float32 for 16-bit params."""
    return DTYPE_F32 if _is16(param_code) else param_code


cdef inline bint _state_ok(int param_code, int code) noexcept nogil:
    """The state dtypes of a `param_code` param (state_dtype=, DESIGN.md "Precision"): float64 params keep
    float64 state; float32 params float32, bfloat16 or float16; 16-bit params float32 or their own dtype."""
    if param_code == DTYPE_F64:
        return code == DTYPE_F64
    if param_code == DTYPE_F32:
        return code == DTYPE_F32 or _is16(code)
    return code == DTYPE_F32 or code == param_code


cdef str _states_text(int param_code):
    """The state dtypes of _state_ok, in words."""
    if param_code == DTYPE_F32:
        return "float32, bfloat16 or float16"
    return f"float32 or {_CODE_NAMES[param_code]}"


cdef inline int _layout(int p, int g, int st) noexcept nogil:
    """cpu_loops.hpp FASTOPT_LAYOUT: the dtypes of one call's params, grads and states."""
    return p | (g << 2) | (st << 4)


cdef class _Batch:
    """The validated arrays of one call: kept alive, their pointers, and the chunk table. prepare()
    returns one; run() applies a kernel to it; check_disjoint() compares several."""
    cdef list keep
    cdef tuple names
    cdef object indices
    cdef bint is_list
    cdef int read_only_slot
    cdef int ntensors
    cdef int nslots
    cdef int dtype            # the params' (slot 0's) storage dtype
    cdef int state_code       # the states' storage dtype (all of them share one)
    cdef bint has_comp        # a Kahan compensation in slot COMP (kahan=True)
    cdef int[SLOTS] codes     # each slot's storage dtype (an unused slot: what it would have)
    cdef int layout           # the kernels' dtype layout (params, grads, states)
    cdef void** ptrs          # ntensors * SLOTS
    cdef int64_t* sizes       # ntensors
    cdef Chunk* chunks
    cdef int nchunks
    cdef int64_t total
    cdef object owner         # a bound batch (bind_grads) shares sizes and chunks with its fixed batch
    cdef bint shares          # ... and then must not free them. A C flag: __dealloc__ may not read `owner`,
                              # which the garbage collector's tp_clear can have set to None already (a batch
                              # in a reference cycle, e.g. through an exception's traceback): a double free

    def __len__(self):
        """The number of arrays in each list of the call."""
        return self.ntensors

    def __dealloc__(self):
        free(self.ptrs)
        if not self.shares:
            free(self.sizes)
            free(self.chunks)


cdef _Batch _collect(tuple arrays, tuple names, int read_only_slot, object indices=None, bint grads_later=False):
    """Validate arrays = (params, grads, state0, ...) and build the batch. Each entry is one array or
    a list of arrays (all entries the same form), or None for an unused state slot (entries 2 and up
    only; grads_later: the grads too, which bind_grads fills in). names[k] names entry k in error
    messages, indices[i] numbers array i of the lists there. Entry read_only_slot is only read (-1:
    every entry is written)."""
    cdef int nslots = len(arrays)
    if nslots > SLOTS:
        raise ValueError("too many arrays per tensor")
    cdef object first = arrays[0]
    cdef bint is_list = isinstance(first, (list, tuple))
    cdef int n, i, k, code, ref_code = -1, grad_code = -1, ndim, state_code = -1
    cdef object ref_dtype = None, grad_dtype = None
    cdef str state_first = None
    cdef list lists = []
    cdef object entry, obj
    cdef cnp.ndarray a, p
    cdef _Batch b = _Batch()
    cdef int64_t size, c, nch

    for k in range(nslots):
        entry = arrays[k]
        if entry is None:           # a state slot this variant does not use
            if k == 0 or (k == 1 and not grads_later):  # a NULL pointer would reach the kernel
                raise TypeError(f"{names[k]} must be {'a list of arrays' if is_list else 'an array'}, got None")
            lists.append(None)
            continue
        if isinstance(entry, (list, tuple)) != is_list:
            raise TypeError(
                f"{names[k]} must be {'a list of arrays' if is_list else 'one array'}, like {names[0]}; "
                f"got {type(entry).__name__}")
        if is_list:
            if len(entry) != len(first):
                raise ValueError(f"{names[k]} has {len(entry)} arrays but {names[0]} has {len(first)}")
            lists.append(entry)
        else:
            lists.append((entry,))
    n = len(lists[0])
    if indices is not None and len(indices) != n:
        raise ValueError("indices must number every array")

    b.names = names
    b.indices = indices
    b.is_list = is_list
    b.read_only_slot = read_only_slot
    b.keep = []
    b.nslots = nslots
    b.ntensors = n
    b.ptrs = <void**> malloc(max(n, 1) * SLOTS * sizeof(void*))
    b.sizes = <int64_t*> malloc(max(n, 1) * sizeof(int64_t))
    if b.ptrs == NULL or b.sizes == NULL:
        raise MemoryError()
    for i in range(n * SLOTS):
        b.ptrs[i] = NULL

    b.total = 0
    nch = 0
    for i in range(n):
        for k in range(nslots):
            if lists[k] is None:
                b.keep.append(None)
                continue
            obj = lists[k][i]
            if obj is None:  # the message of the Python checks (validate.check_arrays)
                raise TypeError(f"{_label(names, k, i, is_list, indices)} must be an array, got None")
            if not cnp.PyArray_CheckExact(obj):
                obj = _as_ndarray(obj, _label(names, k, i, is_list, indices))
            a = <cnp.ndarray> obj
            b.keep.append(a)
            code = _dtype_code(a)
            if k == 0:
                p = a
                if code < 0:
                    raise TypeError(
                        f"{_label(names, k, i, is_list, indices)} has dtype {_dtype_text(a)}; fastopt updates "
                        f"{DTYPES_TEXT} arrays (native byte order) on the CPU")
                if ref_code < 0:
                    ref_code = code
                    ref_dtype = a.dtype
                elif code != ref_code:
                    raise TypeError(
                        f"{_label(names, k, i, is_list, indices)} has dtype {a.dtype} but "
                        f"{_label(names, 0, 0, is_list, indices)} has {ref_dtype}: one call "
                        f"updates one dtype (group the arrays by dtype)")
            else:
                _check_like_param(a, code, p, ref_code, names, k, i, is_list, indices, state_code, state_first)
                if k == 1:
                    grad_code = _check_grads_alike(a, code, grad_code, grad_dtype, names, i, is_list, indices)
                    grad_dtype = a.dtype
                elif k != COMP and state_code < 0:  # the first state fixes the call's state dtype
                    state_code = code
                    state_first = _label(names, k, i, is_list, indices)
            if not cnp.PyArray_IS_C_CONTIGUOUS(a):
                raise ValueError(f"{_label(names, k, i, is_list, indices)} is not C-contiguous")
            if k != read_only_slot and not cnp.PyArray_ISWRITEABLE(a):
                raise ValueError(f"{_label(names, k, i, is_list, indices)} is read-only")
            b.ptrs[i * SLOTS + k] = cnp.PyArray_DATA(a)
        size = cnp.PyArray_SIZE(p)
        b.sizes[i] = size
        b.total += size
        nch += (size + CHUNK - 1) // CHUNK
    b.dtype = ref_code
    b.state_code = state_code if state_code >= 0 else _state_code(ref_code)
    b.has_comp = nslots > COMP and lists[COMP] is not None
    if grad_code < 0:  # no grads (yet: bind_grads), or no arrays
        grad_code = ref_code
    _set_codes(b, ref_code, grad_code)

    _check_disjoint([b])

    b.chunks = <Chunk*> malloc(max(nch, 1) * sizeof(Chunk))
    if b.chunks == NULL:
        raise MemoryError()
    b.nchunks = 0
    for i in range(n):
        c = 0
        while c < b.sizes[i]:
            b.chunks[b.nchunks].tensor = i
            b.chunks[b.nchunks].start = c
            b.chunks[b.nchunks].n = min(<int64_t> CHUNK, b.sizes[i] - c)
            b.chunks[b.nchunks].offset = _next_offset(b.chunks, b.nchunks)
            b.nchunks += 1
            c += CHUNK
    return b


cdef str _dtype_text(cnp.ndarray a):
    """float32, or >f4 where the byte order is what is wrong."""
    return str(a.dtype) if cnp.PyArray_ISNOTSWAPPED(a) else a.dtype.str


cdef void _set_codes(_Batch b, int param_code, int grad_code) noexcept:
    """Each slot's dtype and the kernels' layout, from the params', grads' and b.state_code; a Kahan
    compensation (b.has_comp) has the params' dtype and selects the Kahan store."""
    cdef int k
    b.codes[0] = param_code
    b.codes[1] = grad_code
    for k in range(2, SLOTS):
        b.codes[k] = b.state_code
    b.codes[COMP] = param_code
    b.layout = _layout(param_code, grad_code, b.state_code) | ((ROUND_KAHAN << 6) if b.has_comp else 0)


cdef int _check_grads_alike(cnp.ndarray a, int code, int first_code, object first_dtype, tuple names,
                            Py_ssize_t i, bint is_list, object indices) except -1:
    """The grads of one call share one dtype (16-bit params take grads in their dtype or float32, but
    not a mix in one call). Returns the grads' dtype code."""
    if first_code >= 0 and code != first_code:
        raise TypeError(
            f"{_label(names, 1, i, is_list, indices)} has dtype {a.dtype} but "
            f"{_label(names, 1, 0, is_list, indices)} has {first_dtype}: the grads of one call have one dtype")
    return code


cdef int _check_like_param(cnp.ndarray a, int code, cnp.ndarray p, int param_code, tuple names, int k,
                           Py_ssize_t i, bint is_list, object indices, int state_code=-1,
                           str state_first=None) except -1:
    """A grad, state or compensation array against its param: the same shape, and a dtype that fits (a grad
    of a 16-bit param: its dtype or float32; a state: one of _state_ok's, the same as the call's first
    state `state_first` (dtype state_code) when there was one; the Kahan compensation: the 16-bit param's)."""
    cdef int ndim
    if k == 1:
        if code != param_code and not (_is16(param_code) and code == DTYPE_F32):
            if _is16(param_code):
                raise TypeError(
                    f"{_label(names, k, i, is_list, indices)} has dtype {_dtype_text(a)}, expected {p.dtype} or "
                    f"float32 (the dtype of {_label(names, 0, i, is_list, indices)}, or float32)")
            raise TypeError(
                f"{_label(names, k, i, is_list, indices)} has dtype {_dtype_text(a)}, expected {p.dtype} "
                f"(the dtype of {_label(names, 0, i, is_list, indices)})")
    elif k == COMP:
        if not _is16(param_code):
            raise TypeError(
                f"{_label(names, k, i, is_list, indices)}: a Kahan compensation (kahan=True) is for float16 or "
                f"bfloat16 params, but {_label(names, 0, i, is_list, indices)} has dtype {p.dtype}")
        if code != param_code:
            raise TypeError(
                f"{_label(names, k, i, is_list, indices)} has dtype {_dtype_text(a)}, expected {p.dtype} (the "
                f"Kahan compensation has the dtype of {_label(names, 0, i, is_list, indices)})")
    elif state_code >= 0:
        if code != state_code:
            raise TypeError(
                f"{_label(names, k, i, is_list, indices)} has dtype {_dtype_text(a)}, expected "
                f"{_CODE_NAMES[state_code]} (the dtype of {state_first}: the states of one call have one dtype)")
    elif code < 0 or not _state_ok(param_code, code):
        if param_code == DTYPE_F64:
            raise TypeError(
                f"{_label(names, k, i, is_list, indices)} has dtype {_dtype_text(a)}, expected {p.dtype} "
                f"(the dtype of {_label(names, 0, i, is_list, indices)})")
        raise TypeError(
            f"{_label(names, k, i, is_list, indices)} has dtype {_dtype_text(a)}, expected "
            f"{_states_text(param_code)} (the state of {_label(names, 0, i, is_list, indices)}, a {p.dtype} param; "
            f"see fastopt.init_state's state_dtype)")
    ndim = cnp.PyArray_NDIM(a)
    if ndim != cnp.PyArray_NDIM(p) or not cnp.PyArray_CompareLists(cnp.PyArray_DIMS(a), cnp.PyArray_DIMS(p), ndim):
        raise ValueError(
            f"{_label(names, k, i, is_list, indices)} has shape {(<object> a).shape}, expected "
            f"{(<object> p).shape} (the shape of {_label(names, 0, i, is_list, indices)})")
    return 0


cdef _check_disjoint(list batches):
    """No array of the batches may share memory with an array that is written (arrays only read, like
    the grads, may share with each other)."""
    cdef _Batch b
    cdef cnp.ndarray a
    cdef Span* spans
    cdef int nspans = 0, total = 0, i, k, j, bi
    cdef uintptr_t max_end_any = 0, max_end_written = 0
    for b in batches:
        total += b.ntensors * b.nslots
    spans = <Span*> malloc(max(total, 1) * sizeof(Span))
    if spans == NULL:
        raise MemoryError()
    try:
        for bi in range(len(batches)):
            b = <_Batch> batches[bi]
            for i in range(b.ntensors):
                if b.sizes[i] == 0:
                    continue
                for k in range(b.nslots):
                    if b.keep[i * b.nslots + k] is None:
                        continue
                    a = <cnp.ndarray> b.keep[i * b.nslots + k]
                    spans[nspans].start = <uintptr_t> cnp.PyArray_DATA(a)
                    spans[nspans].end = spans[nspans].start + <uintptr_t> cnp.PyArray_NBYTES(a)
                    spans[nspans].slot = k
                    spans[nspans].index = i
                    spans[nspans].batch = bi
                    spans[nspans].written = 0 if k == b.read_only_slot else 1
                    nspans += 1
        qsort(spans, nspans, sizeof(Span), _cmp_span)
        for i in range(nspans):
            if (spans[i].start < max_end_written) or (spans[i].written and spans[i].start < max_end_any):
                for j in range(i):  # name the culprit pair (error path only)
                    if spans[j].end > spans[i].start and (spans[j].written or spans[i].written):
                        raise ValueError(f"{_span_label(batches, &spans[i])} shares memory with "
                                         f"{_span_label(batches, &spans[j])}")
            if spans[i].end > max_end_any:
                max_end_any = spans[i].end
            if spans[i].written and spans[i].end > max_end_written:
                max_end_written = spans[i].end
    finally:
        free(spans)


cdef str _span_label(list batches, Span* sp):
    cdef _Batch b = <_Batch> batches[sp.batch]
    return _label(b.names, sp.slot, sp.index, b.is_list, b.indices)


def prepare(tuple arrays, tuple names, indices=None, int read_only_slot=1):
    """Check arrays = (params, grads, *states) for one kernel call (see _collect) and return the batch
    for run(); nothing is written. indices: the callers' numbering of the lists in messages."""
    return _collect(arrays, names, read_only_slot, indices)


def check_disjoint(list batches):
    """ValueError when an array of one prepared batch shares memory with an array another one writes
    (an optimizer checks all its calls of a step before the first runs)."""
    _check_disjoint(batches)


# ---------------------------------------------------------------------------------------------------
# Validated once: the arrays of an optimizer's calls that stay the same from step to step (params and
# states), and a per-step binding of the grads to them (the Python twin is backends/validate.py)
# ---------------------------------------------------------------------------------------------------

# what a snapshot keeps of an array's flags: the two that validation reads
cdef int _SNAPSHOT_FLAGS = cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_WRITEABLE


cdef class _Snapshot:
    """What the checks read of a list of ndarrays: per array its data pointer, dtype object, C-contiguous and
    writeable flags and shape (the dtypes kept alive, so that comparing pointers is sound)."""
    cdef list descr_refs
    cdef Py_ssize_t n
    cdef void** data
    cdef void** descrs
    cdef int* flags
    cdef int* ndims
    cdef Py_ssize_t* dim_offset
    cdef cnp.npy_intp* dims

    def __cinit__(self, list views):
        cdef Py_ssize_t j, ndim_total = 0, off = 0
        cdef int d
        cdef cnp.ndarray v
        self.n = len(views)
        for v in views:
            ndim_total += cnp.PyArray_NDIM(v)
        self.data = <void**> malloc(max(self.n, 1) * sizeof(void*))
        self.descrs = <void**> malloc(max(self.n, 1) * sizeof(void*))
        self.flags = <int*> malloc(max(self.n, 1) * sizeof(int))
        self.ndims = <int*> malloc(max(self.n, 1) * sizeof(int))
        self.dim_offset = <Py_ssize_t*> malloc(max(self.n, 1) * sizeof(Py_ssize_t))
        self.dims = <cnp.npy_intp*> malloc(max(ndim_total, 1) * sizeof(cnp.npy_intp))
        if (self.data == NULL or self.descrs == NULL or self.flags == NULL or self.ndims == NULL
                or self.dim_offset == NULL or self.dims == NULL):
            raise MemoryError()
        for j in range(self.n):
            v = <cnp.ndarray> views[j]
            self.data[j] = cnp.PyArray_DATA(v)
            self.descrs[j] = <void*> cnp.PyArray_DESCR(v)
            self.flags[j] = cnp.PyArray_FLAGS(v) & _SNAPSHOT_FLAGS
            self.ndims[j] = cnp.PyArray_NDIM(v)
            self.dim_offset[j] = off
            for d in range(self.ndims[j]):
                self.dims[off + d] = cnp.PyArray_DIMS(v)[d]
            off += self.ndims[j]
        self.descr_refs = [v.dtype for v in views]

    def __dealloc__(self):
        free(self.data); free(self.descrs); free(self.flags); free(self.ndims); free(self.dim_offset); free(self.dims)

    cdef bint same(self, Py_ssize_t j, cnp.ndarray v):
        """Array j of the snapshot as v is now (same memory, dtype object, flags, shape)."""
        cdef int d
        if (cnp.PyArray_DATA(v) != self.data[j] or <void*> cnp.PyArray_DESCR(v) != self.descrs[j]
                or (cnp.PyArray_FLAGS(v) & _SNAPSHOT_FLAGS) != self.flags[j]
                or cnp.PyArray_NDIM(v) != self.ndims[j]):
            return False
        for d in range(self.ndims[j]):
            if cnp.PyArray_DIMS(v)[d] != self.dims[self.dim_offset[j] + d]:
                return False
        return True


cdef int _first_overlap(const Span* spans, int n, uintptr_t start, uintptr_t end) noexcept:
    """Index of a span of spans[:n] (pairwise disjoint, sorted by start: their ends are sorted too) overlapping
    [start, end), or -1."""
    cdef int lo = 0, hi = n, mid
    while lo < hi:  # the first span whose end is past start
        mid = (lo + hi) // 2
        if spans[mid].end <= start:
            lo = mid + 1
        else:
            hi = mid
    if lo < n and spans[lo].start < end:
        return lo
    return -1


cdef class _Fixed:
    """Every array but the grads of an optimizer's kernel calls (params and states, all written),
    validated once by prepare_fixed with the checks of prepare(), plus a snapshot of what those checks
    looked at (_Snapshot). bind_grads compares the snapshot (a few loads per array; objects that are not
    NumPy arrays, e.g. torch tensors, are viewed again, since their storage may have changed) and validates
    everything again, with prepare()'s messages, when anything differs."""
    cdef list calls          # [(arrays, names, indices)] as given (lists copied)
    cdef list batches        # one _Batch per call, grads slot empty
    cdef list sources        # the caller's object of every array, in snapshot order
    cdef list views          # the checked ndarray of every array
    cdef _Snapshot snapshot
    cdef Span* written       # the non-empty arrays' spans, sorted by start (pairwise disjoint)
    cdef int nwritten

    def __len__(self):
        """The number of kernel calls."""
        return len(self.batches)

    def __dealloc__(self):
        free(self.written)

    cdef _check(self):
        """Validate every call (prepare()'s checks and messages) and all of them against each other,
        then take the snapshot. On an error the previous state is kept (and fails again)."""
        cdef list batches = []
        cdef _Batch b
        cdef cnp.ndarray v
        cdef int i, k, bi, nw = 0
        cdef Span* written
        for arrays, names, indices in self.calls:
            if len(arrays) < 2 or arrays[1] is not None:
                raise ValueError("prepare_fixed: each call is (params, None, *states); bind_grads adds the grads")
            batches.append(_collect(arrays, names, -1, indices, True))
        _check_disjoint(batches)
        sources, views = [], []
        for bi in range(len(batches)):
            b = <_Batch> batches[bi]
            arrays = self.calls[bi][0]
            for i in range(b.ntensors):
                for k in range(b.nslots):
                    obj = b.keep[i * b.nslots + k]
                    if obj is None:
                        continue
                    sources.append(arrays[k][i] if b.is_list else arrays[k])
                    views.append(obj)
                    if b.sizes[i] != 0:
                        nw += 1
        snapshot = _Snapshot(views)
        written = <Span*> malloc(max(nw, 1) * sizeof(Span))
        if written == NULL:
            raise MemoryError()
        nw = 0
        for bi in range(len(batches)):
            b = <_Batch> batches[bi]
            for i in range(b.ntensors):
                if b.sizes[i] == 0:
                    continue
                for k in range(b.nslots):
                    obj = b.keep[i * b.nslots + k]
                    if obj is None:
                        continue
                    v = <cnp.ndarray> obj
                    written[nw].start = <uintptr_t> cnp.PyArray_DATA(v)
                    written[nw].end = written[nw].start + <uintptr_t> cnp.PyArray_NBYTES(v)
                    written[nw].batch = bi
                    written[nw].slot = k
                    written[nw].index = i
                    written[nw].written = 1
                    nw += 1
        qsort(written, nw, sizeof(Span), _cmp_span)
        free(self.written)
        self.written = written
        self.nwritten = nw
        self.snapshot = snapshot
        self.batches = batches
        self.sources = sources
        self.views = views

    cdef bint _is_current(self):
        """Every array still as the snapshot saw it (same memory, dtype object, flags, shape)."""
        cdef Py_ssize_t j
        cdef object src
        cdef list sources = self.sources, views = self.views
        for j in range(self.snapshot.n):
            src = sources[j]
            obj = views[j]
            if src is not obj:  # a torch tensor, memoryview...: view it again (its storage may have moved)
                try:
                    obj = _as_ndarray(src, "array")
                except (TypeError, ValueError, BufferError, RuntimeError):
                    return False
            if not self.snapshot.same(j, <cnp.ndarray> obj):
                return False
        return True

    cdef int _first_overlap(self, uintptr_t start, uintptr_t end) noexcept:
        """Index of a written span overlapping [start, end), or -1."""
        return _first_overlap(self.written, self.nwritten, start, end)


def prepare_fixed(calls):
    """Check the arrays of an optimizer's kernel calls that stay the same from step to step, once.

    calls: [(arrays, names, indices), ...], one per kernel call, in prepare()'s layout with None for the
    grads: arrays = (params, None, *states). Every array gets prepare()'s checks (kind, dtype, byte order,
    shape, C-contiguous, writable: all are written) and no two may share memory, across all calls.
    Writes nothing. Returns the object bind_grads takes."""
    cdef _Fixed fixed = _Fixed()
    fixed.calls = [(tuple(list(a) if isinstance(a, (list, tuple)) else a for a in arrays), tuple(names),
                    None if indices is None else list(indices)) for arrays, names, indices in calls]
    fixed._check()
    return fixed


def bind_grads(_Fixed fixed, grads_per_call):
    """The prepared calls (for run()) of one step: grads_per_call[c] is the grads of call c.

    First the fixed arrays are compared with prepare_fixed's snapshot and validated again when anything
    changed (prepare()'s errors). Then each grad gets prepare()'s checks against its param (None, kind,
    dtype, shape, C-contiguous; the count and form of the list) and no grad may share memory with any
    fixed array of any call (grads may share with each other). Writes nothing."""
    cdef _Batch b, nb
    cdef cnp.ndarray a, p
    cdef int c, i, n, nslots, ndim, hit, code, grad_code
    cdef uintptr_t start
    cdef list out = []
    cdef tuple names
    cdef bint is_list
    if not fixed._is_current():
        fixed._check()
    if len(grads_per_call) != len(fixed.batches):
        raise ValueError(f"bind_grads: {len(grads_per_call)} grads lists for {len(fixed.batches)} calls")
    for c in range(len(fixed.batches)):
        b = <_Batch> fixed.batches[c]
        names, indices, is_list, n, nslots = b.names, b.indices, b.is_list, b.ntensors, b.nslots
        grads = grads_per_call[c]
        if grads is None:
            raise TypeError(f"{names[1]} must be {'a list of arrays' if is_list else 'an array'}, got None")
        if isinstance(grads, (list, tuple)) != is_list:
            raise TypeError(f"{names[1]} must be {'a list of arrays' if is_list else 'one array'}, like {names[0]}; "
                            f"got {type(grads).__name__}")
        if not is_list:
            grads = (grads,)
        elif len(grads) != n:
            raise ValueError(f"{names[1]} has {len(grads)} arrays but {names[0]} has {n}")
        nb = _Batch()
        nb.owner = b
        nb.shares = True
        nb.names, nb.indices, nb.is_list, nb.read_only_slot = names, indices, is_list, 1
        nb.ntensors, nb.nslots, nb.dtype = n, nslots, b.dtype
        nb.state_code, nb.has_comp = b.state_code, b.has_comp
        grad_code, grad_dtype = -1, None
        nb.sizes, nb.chunks, nb.nchunks, nb.total = b.sizes, b.chunks, b.nchunks, b.total
        nb.ptrs = <void**> malloc(max(n, 1) * SLOTS * sizeof(void*))
        if nb.ptrs == NULL:
            raise MemoryError()
        memcpy(nb.ptrs, b.ptrs, max(n, 1) * SLOTS * sizeof(void*))
        nb.keep = list(b.keep)
        for i in range(n):
            obj = grads[i]
            if obj is None:
                raise TypeError(f"{_label(names, 1, i, is_list, indices)} must be an array, got None")
            if not cnp.PyArray_CheckExact(obj):
                obj = _as_ndarray(obj, _label(names, 1, i, is_list, indices))
            a = <cnp.ndarray> obj
            p = <cnp.ndarray> b.keep[i * nslots]
            code = _dtype_code(a)
            _check_like_param(a, code, p, b.dtype, names, 1, i, is_list, indices)
            grad_code = _check_grads_alike(a, code, grad_code, grad_dtype, names, i, is_list, indices)
            grad_dtype = a.dtype
            if not cnp.PyArray_IS_C_CONTIGUOUS(a):
                raise ValueError(f"{_label(names, 1, i, is_list, indices)} is not C-contiguous")
            nb.keep[i * nslots + 1] = a
            nb.ptrs[i * SLOTS + 1] = cnp.PyArray_DATA(a)
        _set_codes(nb, b.dtype, grad_code if grad_code >= 0 else b.dtype)
        out.append(nb)
    for c in range(len(out)):  # grads are read: they may share with each other, not with a written array
        nb = <_Batch> out[c]
        for i in range(nb.ntensors):
            if nb.sizes[i] == 0:
                continue
            a = <cnp.ndarray> nb.keep[i * nb.nslots + 1]
            start = <uintptr_t> cnp.PyArray_DATA(a)
            hit = fixed._first_overlap(start, start + <uintptr_t> cnp.PyArray_NBYTES(a))
            if hit >= 0:  # named in the order of prepare(): the one starting later first
                grad = _label(nb.names, 1, i, nb.is_list, nb.indices)
                other = _span_label(fixed.batches, &fixed.written[hit])
                if start >= fixed.written[hit].start:
                    raise ValueError(f"{grad} shares memory with {other}")
                raise ValueError(f"{other} shares memory with {grad}")
    return out


cdef inline int _threads_for(int64_t total) noexcept nogil:
    global _pool_started
    cdef int n = fastopt_get_thread_override()
    if total < PARALLEL_MIN or _fork_capped:
        return 1
    if n <= 0:
        n = _num_threads
    if n > 1:
        _pool_started = 1
    return n


# Each thread of a parallel region takes one share: a contiguous run of chunks holding about 1 / nshares of
# the elements. Splitting the chunks by count instead (prange's static schedule) left ResNet-50's list
# 10% heavier on one of two threads, its small tensors' chunks bunched at one end. Which thread runs a chunk
# changes no result: every reduction keeps one partial per chunk.

cdef inline int64_t _next_offset(const Chunk* chunks, int c) noexcept nogil:
    """Chunk c's offset, from the chunk before it (0 for the first)."""
    return 0 if c == 0 else chunks[c - 1].offset + chunks[c - 1].n


cdef inline int _share_start(const Chunk* chunks, int nch, int share, int nshares) noexcept nogil:
    """The first chunk of share `share` of `nshares` (share == nshares: nch): the first chunk that starts at or
    past that share's even split of the elements."""
    if share <= 0 or nch == 0:
        return 0
    if share >= nshares:
        return nch
    cdef int64_t first = chunks[0].offset
    cdef int64_t total = chunks[nch - 1].offset + chunks[nch - 1].n - first
    cdef int64_t target = first + total // nshares * share + total % nshares * share // nshares
    cdef int lo = 0, hi = nch, mid
    while lo < hi:
        mid = (lo + hi) // 2
        if chunks[mid].offset < target:
            lo = mid + 1
        else:
            hi = mid
    return lo


ctypedef struct ShareSpan:
    int first  # the share's first chunk
    int end    # one past its last


cdef inline ShareSpan _share_span(const Chunk* chunks, int nch, int share, int nshares) noexcept nogil:
    """The chunks [first, end) of share `share` of `nshares`: where it starts and where the next one does."""
    cdef ShareSpan span
    span.first = _share_start(chunks, nch, share, nshares)
    span.end = _share_start(chunks, nch, share + 1, nshares)
    return span


cdef inline int _chunk(int layout, const int* codes, int kind, int variant, void** base, const Chunk* ch,
                       const int* slot_map, const double* s, double coef, double* acc, unsigned int key,
                       unsigned long long offset) noexcept nogil:
    """Run one chunk: base = the tensor's SLOTS pointers; slot_map[j] = which of them is kernel slot j;
    codes[k]: the dtype of slot k (its element size); the chunk's first element is element offset + start
    of the stochastic rounding's counter."""
    cdef void* ptrs[SLOTS]
    cdef int j, k
    for j in range(SLOTS):
        k = slot_map[j]
        ptrs[j] = NULL if (k < 0 or base[k] == NULL) else <void*> (<char*> base[k] + ch.start * _ITEMSIZE[codes[k]])
    return run_chunk(layout, kind, variant, ptrs, ch.n, s, coef, acc, key, offset + <unsigned long long> ch.start)


cdef int _run_share(_Batch b, int share, int nshares, int layout, int kind, int variant, const double* s,
                    const int* slot_map, const double* coef_per_tensor, double* partials, unsigned int key,
                    unsigned long long offset) noexcept nogil:
    """The chunks of one share (_share_span); the number that had no kernel."""
    cdef int c, bad = 0
    cdef const Chunk* chunks = b.chunks
    cdef ShareSpan span = _share_span(chunks, b.nchunks, share, nshares)
    for c in range(span.first, span.end):
        bad += _chunk(layout, b.codes, kind, variant, &b.ptrs[chunks[c].tensor * SLOTS], &chunks[c], slot_map, s,
                      coef_per_tensor[chunks[c].tensor] if coef_per_tensor != NULL else 0.0,
                      &partials[2 * LANES * c] if partials != NULL else NULL, key, offset) != 0
    return bad


cdef int _run(_Batch b, int layout, int kind, int variant, const double* s, const int* slot_map,
              const double* coef_per_tensor, double* partials, unsigned int key=0,
              unsigned long long offset=0) except -1:
    cdef int share, bad = 0
    cdef int nthreads = _threads_for(b.total)
    with nogil:
        for share in prange(nthreads, schedule='static', num_threads=nthreads):
            bad += _run_share(b, share, nthreads, layout, kind, variant, s, slot_map, coef_per_tensor, partials, key,
                              offset)
    if bad:
        raise ValueError(f"no CPU kernel for kind {kind} variant {variant} layout {layout}")
    return 0


def shares(_Batch b, int nshares):
    """[(first chunk, end chunk, elements)] of each of nshares threads' shares of the batch (_share_span): what a
    parallel region of that many threads runs. For the tests: the shares are contiguous, cover every chunk
    and hold the elements evenly (to within one chunk)."""
    if nshares < 1:
        raise ValueError(f"nshares must be at least 1, got {nshares}")
    out = []
    cdef int k, c
    cdef int64_t n
    cdef ShareSpan span
    for k in range(nshares):
        span = _share_span(b.chunks, b.nchunks, k, nshares)
        n = 0
        for c in range(span.first, span.end):
            n += b.chunks[c].n
        out.append((span.first, span.end, n))
    return out


cdef int[SLOTS] _IDENTITY_SLOTS = [0, 1, 2, 3, 4, 5, 6]
cdef int[SLOTS] _APPLY_SLOTS = [0, -1, 2, 3, -1, 5, -1]


cdef void _load_scalars(tuple scalars, double* out) except *:
    cdef int i
    if len(scalars) > MAX_SCALARS:
        raise ValueError("too many kernel scalars")
    for i in range(len(scalars)):
        out[i] = scalars[i]


def update(str kernel, int variant, tuple arrays, tuple names, tuple scalars, double lr=0.0, bint stochastic=False,
           unsigned int key=0, unsigned long long index_offset=0):
    """Validate arrays = (params, grads, *states[, kahan_comp]) and apply kernel `kernel` in place (see run)."""
    cdef _Batch b = _collect(arrays, names, 1)
    run(b, kernel, variant, scalars, lr, stochastic, key, index_offset)


cdef double[::1] _tensor_coefs(object coefs, int ntensors):
    """coefs as a float64 array of one number per tensor (at least one element: a pointer to take)."""
    a = np.asarray(coefs, dtype=np.float64).reshape(-1)
    if a.shape[0] != ntensors:
        raise ValueError(f"{a.shape[0]} coefficients for {ntensors} arrays")
    out = np.zeros(max(ntensors, 1), dtype=np.float64)
    out[:ntensors] = a
    return out


def param_ndims(_Batch b):
    """The number of dimensions of each param of a prepared call (spec.tensor_coefs reads them)."""
    return tuple((<cnp.ndarray> b.keep[i * b.nslots]).ndim for i in range(b.ntensors))


def check_rounding(_Batch b, bint stochastic):
    """ValueError unless stochastic rounding fits the batch: 16-bit params, no Kahan compensation."""
    if stochastic and not _is16(b.dtype):
        raise ValueError(f"stochastic_rounding=True is for float16 or bfloat16 params; these are "
                         f"{_CODE_NAMES[b.dtype]}")
    if stochastic and b.has_comp:
        raise ValueError("kahan and stochastic_rounding are mutually exclusive: a Kahan compensation "
                         "(kahan_comp) and stochastic_rounding=True in one call")


cdef int _begin(_Batch b, bint stochastic, tuple scalars, double* s) except -1:
    """The checks every update entry point makes before its first write; returns the layout to run."""
    cdef int layout = b.layout
    if b.read_only_slot != 1:
        raise ValueError("run: the batch was not prepared for an update (grads read-only)")
    check_rounding(b, stochastic)
    if stochastic:
        layout = (layout & 63) | (ROUND_STOCHASTIC << 6)
    _load_scalars(scalars, s)
    return layout


cdef int _two_phase_kind(str kernel, str entry) except -1:
    """The phase-1 kind of a two-phase family (spec.two_phase: LAMB); ValueError naming kernel otherwise."""
    kind = KINDS.get(kernel)
    if kind is None or not KIND_TWO_PHASE <= kind < KIND_TOUCH:
        names = sorted(k for k, v in KINDS.items() if KIND_TWO_PHASE <= v < KIND_TOUCH)
        raise ValueError(f"{entry}: kernel must be a two-phase family ({', '.join(names)}), got {kernel!r}")
    return kind


cdef int _phase1(_Batch b, int layout, int kind, const double* s, double* sums) except -1:
    """Phase 1 of a two-phase family (writes the moments); sums[2 i], sums[2 i + 1] = sum p^2, sum u^2 of
    tensor i, from the chunk partials (LANES accumulators per chunk) in lane then chunk order: deterministic."""
    cdef int i, c, j
    cdef double sp, su
    cdef double* partials = <double*> calloc(2 * LANES * b.nchunks, sizeof(double))
    if partials == NULL:
        raise MemoryError()
    try:
        _run(b, layout, kind, 0, s, _IDENTITY_SLOTS, NULL, partials)
        for i in range(b.ntensors):
            sums[2 * i] = 0.0
            sums[2 * i + 1] = 0.0
        for c in range(b.nchunks):
            i = b.chunks[c].tensor
            sp = 0.0
            su = 0.0
            for j in range(LANES):
                sp += partials[2 * LANES * c + j]
                su += partials[2 * LANES * c + LANES + j]
            sums[2 * i] += sp
            sums[2 * i + 1] += su
    finally:
        free(partials)
    return 0


cdef int _phase2(_Batch b, int layout, int kind, const double* s, const double* scaled_lr, unsigned int key,
                 unsigned long long index_offset) except -1:
    """Phase 2 of a two-phase family: p -= scaled_lr[tensor] * u, from p and the stored moments."""
    return _run(b, layout, kind + 1, 0, s, _APPLY_SLOTS, scaled_lr, NULL, key, index_offset)


def run(_Batch b, str kernel, int variant, tuple scalars, double lr=0.0, bint stochastic=False,
        unsigned int key=0, unsigned long long index_offset=0, tensor_coefs=None):
    """Apply kernel `kernel` in place to a prepared batch (params, grads, *states[, kahan_comp]).

    scalars: the kernel's hyperparameters in the order of its *Params struct (specs.py computes them).
    A two-phase family (spec.two_phase: LAMB) runs both phases here: run_phase1's pass and sums, lr times
    the family's trust ratio per tensor, run_phase2's pass. `lr` is read by two-phase families only.
    The new params are rounded to nearest even, or with the batch's Kahan compensation, or (stochastic,
    16-bit params) stochastically with fastopt.precision.random_bits(key, index_offset + i) for element
    i of each tensor (key: precision.random_key(seed, step)).
    tensor_coefs: one float64 per tensor for a family whose functor reads one (spec.tensor_coefs: LARS); 0 for
    the others.
    """
    cdef double s[MAX_SCALARS]
    cdef int kind = KINDS[kernel]
    cdef double* coefs = NULL
    cdef int i
    cdef int layout = _begin(b, stochastic, scalars, s)
    cdef double[::1] per_tensor
    cdef const double* per_tensor_ptr = NULL
    if tensor_coefs is not None:
        per_tensor = _tensor_coefs(tensor_coefs, b.ntensors)
        per_tensor_ptr = &per_tensor[0]
    if b.nchunks == 0:
        return
    if not KIND_TWO_PHASE <= kind < KIND_TOUCH:
        _run(b, layout, kind, variant, s, _IDENTITY_SLOTS, per_tensor_ptr, NULL, key, index_offset)
        return
    cdef int family = (kind - KIND_TWO_PHASE) // 2
    coefs = <double*> malloc(2 * b.ntensors * sizeof(double))
    if coefs == NULL:
        raise MemoryError()
    try:
        _phase1(b, layout, kind, s, coefs)
        for i in range(b.ntensors):  # in place: coefs[i] is written after coefs[2 i], coefs[2 i + 1] are read
            coefs[i] = two_phase_scaled_lr(family, lr, sqrt(coefs[2 * i]), sqrt(coefs[2 * i + 1]))
        _phase2(b, layout, kind, s, coefs, key, index_offset)
    finally:
        free(coefs)


def run_phase1(_Batch b, str kernel, int variant, tuple scalars, bint stochastic=False):
    """Phase 1 of a two-phase family (spec.two_phase: LAMB) alone, as run() does it: the moments written,
    and a float64 array (ntensors, 2) returned: sum p^2 and sum u^2 of each tensor (u: the update direction),
    summed in run()'s deterministic order. A caller holding pieces of tensors (a shard) adds the pieces'
    sums, computes lr * trust ratio per tensor and hands them to run_phase2. `variant` is not read (the
    two-phase families have one variant, as in run()); `stochastic` selects the layout run() would use."""
    cdef double s[MAX_SCALARS]
    cdef int kind = _two_phase_kind(kernel, "run_phase1")
    cdef int layout = _begin(b, stochastic, scalars, s)
    out = np.zeros((b.ntensors, 2), dtype=np.float64)
    cdef double[:, ::1] sums = out
    if b.nchunks == 0:
        return out
    _phase1(b, layout, kind, s, &sums[0, 0])
    return out


cdef double[::1] _scaled_lr(object scaled_lr, int ntensors):
    """scaled_lr as a float64 array of one finite number per tensor (at least one element: a pointer to
    take); TypeError / ValueError naming scaled_lr before anything is written."""
    try:
        a = np.asarray(scaled_lr)
    except (TypeError, ValueError) as e:
        raise TypeError(f"scaled_lr must be a host array or list of real numbers, got "
                        f"{type(scaled_lr).__name__} ({e})") from None
    if a.dtype.kind not in "fiu":
        raise TypeError(f"scaled_lr must hold real numbers, got dtype {a.dtype}: {scaled_lr!r}")
    if a.ndim > 1 or a.size != ntensors:
        raise ValueError(f"scaled_lr has shape {a.shape}: one lr per array of the batch ({ntensors}) was expected")
    a = a.astype(np.float64).reshape(-1)
    if not np.isfinite(a).all():
        raise ValueError(f"scaled_lr must be finite, got {scaled_lr!r}")
    out = np.zeros(max(ntensors, 1), dtype=np.float64)
    out[:ntensors] = a
    return out


def run_phase2(_Batch b, str kernel, tuple scalars, scaled_lr, bint stochastic=False, unsigned int key=0,
               unsigned long long index_offset=0):
    """Phase 2 of a two-phase family alone: p -= scaled_lr[i] * u for tensor i, u from p and the moments
    run_phase1 wrote; scaled_lr: one finite float64 per tensor (lr times the whole tensor's trust ratio).
    Rounding as run(). Every check (scaled_lr's length and values included) before any write."""
    cdef double s[MAX_SCALARS]
    cdef int kind = _two_phase_kind(kernel, "run_phase2")
    cdef int layout = _begin(b, stochastic, scalars, s)
    cdef double[::1] lrs = _scaled_lr(scaled_lr, b.ntensors)
    if b.nchunks == 0:
        return
    _phase2(b, layout, kind, s, &lrs[0], key, index_offset)


def touch(tuple arrays, int phase=0):
    """Bandwidth ceiling: the memory traffic of an update with trivial math. arrays = (p, g, *states
    [, kahan_comp]) (None for an unused state slot), any layout the updates take.
    phase 0: p and the states read and written, g read (every single-pass optimizer); a Kahan
    compensation (the sixth array) read and written too; a fourth state is the seventh array.
    LAMB's two passes: phase 1: p and g read, the two states read and written;
    phase 2: p read and written, the two states read."""
    cdef double s[1]
    cdef tuple names = ("params", "grads", "state0", "state1", "state2", "kahan_comp", "state3")[:len(arrays)]
    cdef _Batch b = _collect(arrays, names, 1)
    cdef int nstates = sum(a is not None for a in arrays[2:COMP]) + sum(a is not None for a in arrays[COMP + 1:])
    if b.nchunks == 0:
        return
    if phase == 2:
        _run(b, b.layout, KIND_TOUCH_APPLY, 0, s, _APPLY_SLOTS, NULL, NULL)
    elif phase == 1:
        _run(b, b.layout, KIND_TOUCH, 4 + nstates, s, _IDENTITY_SLOTS, NULL, NULL)
    else:
        _run(b, b.layout, KIND_TOUCH, nstates, s, _IDENTITY_SLOTS, NULL, NULL)


cdef _Batch _collect_grads(object grads, bint written):
    # grads alone: the general collector with grads in the first slot; a batch from prepare_grads
    # (checked as written, which covers reading) is used as it is, and for reading only, a prepared
    # update too (its grads slot: see _grads_slot)
    cdef _Batch b
    if isinstance(grads, _Batch):
        b = <_Batch> grads
        if b.nslots == 1 and not (written and b.read_only_slot == 0):
            return b
        if not written and b.nslots > 1 and b.read_only_slot == 1:
            return b
        raise ValueError("grads: the batch was not prepared by prepare_grads")
    return _collect((grads,), ("grads",), -1 if written else 0)


cdef inline int _grads_slot(_Batch b) noexcept:
    """Where a batch keeps the grads: slot 0 of a grads batch, slot 1 of a prepared update."""
    return 1 if b.nslots > 1 else 0


def prepare_grads(grads, str name="grads", indices=None):
    """Check arrays (one or a list) for an in-place operation, nothing written: the clip functions
    check every array before the first write, then pass the batch to the functions below; an
    optimizer checks its params this way."""
    if isinstance(grads, _Batch):
        return _collect_grads(grads, True)
    return _collect((grads,), (name,), -1, indices)


def sumsq_per_tensor(grads, bint params=False):
    """Sum of squares of each array (float64), deterministic: fixed chunks summed in order. grads:
    arrays, a batch from prepare_grads, or a prepared update (its grads; with params=True its params)."""
    cdef _Batch b = _collect_grads(grads, False)
    cdef double* partials = <double*> malloc(max(b.nchunks, 1) * sizeof(double))
    cdef int c
    cdef int slot = 0 if params else _grads_slot(b)
    cdef int nthreads = _threads_for(b.total)
    cdef int share
    cdef double[::1] out = np.zeros(b.ntensors, dtype=np.float64)
    if partials == NULL:
        raise MemoryError()
    try:
        with nogil:
            for share in prange(nthreads, schedule='static', num_threads=nthreads):
                _sumsq_share(b, share, nthreads, slot, partials)
        for c in range(b.nchunks):
            out[b.chunks[c].tensor] += partials[c]
    finally:
        free(partials)
    return np.asarray(out)


cdef void _sumsq_share(_Batch b, int share, int nshares, int slot, double* partials) noexcept nogil:
    """partials[c] = the sum of squares of chunk c of slot `slot`, for the chunks of one share."""
    cdef int c
    cdef const Chunk* ch
    cdef ShareSpan span = _share_span(b.chunks, b.nchunks, share, nshares)
    for c in range(span.first, span.end):
        ch = &b.chunks[c]
        partials[c] = sumsq(b.codes[slot], <char*> b.ptrs[ch.tensor * SLOTS + slot] + ch.start * _ITEMSIZE[b.codes[slot]],
                            ch.n)


cdef void _elementwise_share(_Batch b, int share, int nshares, int op, double value, const double* coefs) noexcept nogil:
    """op 0: scale by value (coefs: by coefs[i] for tensor i); op 1: clamp to [-value, value]; one share's chunks."""
    cdef int c
    cdef const Chunk* ch
    cdef void* x
    cdef ShareSpan span = _share_span(b.chunks, b.nchunks, share, nshares)
    for c in range(span.first, span.end):
        ch = &b.chunks[c]
        x = <char*> b.ptrs[ch.tensor * SLOTS] + ch.start * _ITEMSIZE[b.dtype]
        if op == 0:
            scale(b.dtype, x, ch.n, coefs[ch.tensor] if coefs != NULL else value)
        else:
            clamp(b.dtype, x, ch.n, value)


cdef _elementwise(object grads, int op, double value, object per_tensor=None):
    """op 0: scale by value (or by per_tensor[i] for tensor i); op 1: clamp to [-value, value]."""
    cdef _Batch b = _collect_grads(grads, True)
    cdef int share
    cdef int nthreads = _threads_for(b.total)
    cdef double[::1] coefs
    cdef const double* coef_ptr = NULL
    if per_tensor is not None:
        coefs = np.ascontiguousarray(per_tensor, dtype=np.float64)
        if coefs.shape[0] != b.ntensors:
            raise ValueError(f"{coefs.shape[0]} coefficients for {b.ntensors} arrays")
        if b.ntensors:
            coef_ptr = &coefs[0]
    if b.nchunks == 0:
        return
    with nogil:
        for share in prange(nthreads, schedule='static', num_threads=nthreads):
            _elementwise_share(b, share, nthreads, op, value, coef_ptr)


def scale_(grads, double coef):
    """grads <- grads * coef, in place."""
    _elementwise(grads, 0, coef)


def scale_each_(grads, coefs):
    """grads[i] <- grads[i] * coefs[i], in place, in one parallel region."""
    _elementwise(grads, 0, 0.0, coefs)


def clamp_(grads, double clip_value):
    """grads <- clip(grads, -clip_value, clip_value), in place."""
    _elementwise(grads, 1, clip_value)


# ---- 8-bit state (state_dtype="int8") ----

cdef inline void* _data_or_null(object a):
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray> a)


cdef inline int _chunk_int8(int layout, int kind, int variant, void** base, float** absmax,
                            const unsigned char* signs, const Int8Codec* codecs, int psize, int gsize,
                            const Chunk* ch, const double* s, double coef, unsigned int key,
                            unsigned long long offset) noexcept nogil:
    """One chunk of one tensor: base = {p, g, codes0, codes1, codes2, comp, codes3}, absmax = the tensor's four
    scale arrays (NULL where unused), signs its four states' maps (codecs[0] unsigned, codecs[1] signed); the
    chunk starts on a 256-block boundary (CHUNK is a multiple)."""
    cdef void* ptrs[SLOTS]  # run_chunk_int8's pointer array: the update's slots (codes3: Adan's fourth state)
    cdef float* am[4]
    cdef const Int8Codec* cp[4]
    cdef int k, slot
    ptrs[0] = <void*> (<char*> base[0] + ch.start * psize)
    ptrs[1] = <void*> (<char*> base[1] + ch.start * gsize)
    for k in range(4):
        slot = 2 + k if k < 3 else 6
        if base[slot] == NULL:
            ptrs[slot] = NULL
            am[k] = NULL
        else:
            ptrs[slot] = <void*> (<char*> base[slot] + ch.start)
            am[k] = absmax[k] + ch.start // 256
        cp[k] = &codecs[1 if signs[k] else 0]
    if base[5] == NULL:
        ptrs[5] = NULL
    else:
        ptrs[5] = <void*> (<char*> base[5] + ch.start * psize)
    return run_chunk_int8(layout, kind, variant, ptrs, am, cp, ch.n, s, coef, key,
                          offset + <unsigned long long> ch.start)


cdef _check_quantizer(cnp.ndarray maps, cnp.ndarray mids, cnp.ndarray buckets):
    if maps.dtype != np.float32 or mids.dtype != np.float32 or buckets.dtype != np.uint8 \
            or maps.ndim != 2 or mids.ndim != 2 or buckets.ndim != 2 or maps.shape[0] != 2 or maps.shape[1] != 256 \
            or mids.shape[0] != 2 or mids.shape[1] != 256 or buckets.shape[0] != 2 or buckets.shape[1] != 65536 \
            or not maps.flags.c_contiguous or not mids.flags.c_contiguous or not buckets.flags.c_contiguous:
        raise ValueError("run_int8: maps and mids must be float32 (2, 256) and buckets uint8 (2, 65536), C-contiguous")


def run_int8(str kernel, int variant, int layout, list tensors, tuple scalars, cnp.ndarray maps, cnp.ndarray mids,
             cnp.ndarray buckets, unsigned int key=0, unsigned long long index_offset=0, tensor_coefs=None):
    """Apply elementwise kernel `kernel` to tensors with 8-bit states, in place, in one parallel region.

    tensors: per tensor (p, g, codes0, codes1, codes2, comp, codes3, absmax0, absmax1, absmax2, absmax3, signed0,
    signed1, signed2, signed3; the fourth state: Adan's): NumPy arrays already validated by the caller (fastopt.backends.validate: dtypes, shapes,
    C-contiguous, writeable, disjoint, absmax of ceil(size / 256)), None for unused slots. layout: the params'
    and grads' dtype codes and the rounding (P | G << 2 | rounding << 6). maps (2, 256) float32, mids (2, 256)
    float32 and buckets (2, 65536) uint8: row 0 the unsigned map, row 1 the signed (fastopt.precision.dynamic_map
    and quantizer_tables: the 255 midpoints then +inf, and the midpoints below each float32 top-16-bit pattern).
    Chunks are CHUNK elements of one tensor (a multiple of 256: no quantization block straddles two threads).
    tensor_coefs: one float64 per tensor for a family whose functor reads one (spec.tensor_coefs), as run()."""
    cdef double s[MAX_SCALARS]
    cdef int kind = KINDS[kernel]
    cdef int nt = len(tensors), t, k, nch = 0
    cdef int64_t size, total = 0
    cdef tuple entry
    cdef void** base
    cdef float** absmax
    cdef unsigned char* signs
    cdef Chunk* chunks
    if kind >= KIND_TWO_PHASE:
        raise ValueError(f"run_int8: {kernel!r} is not an elementwise kernel")
    _check_quantizer(maps, mids, buckets)
    _load_scalars(scalars, s)
    cdef double[::1] per_tensor = _tensor_coefs(tensor_coefs if tensor_coefs is not None else np.zeros(nt), nt)
    for t in range(nt):
        size = (<cnp.ndarray> tensors[t][0]).size
        nch += <int> ((size + CHUNK - 1) // CHUNK)
        total += size
    if nch == 0:
        return
    base = <void**> malloc(nt * INT8_SLOTS * sizeof(void*))
    absmax = <float**> malloc(nt * 4 * sizeof(float*))
    signs = <unsigned char*> malloc(nt * 4)
    chunks = <Chunk*> malloc(nch * sizeof(Chunk))
    if base == NULL or absmax == NULL or signs == NULL or chunks == NULL:
        free(base); free(absmax); free(signs); free(chunks)
        raise MemoryError()
    try:
        nch = 0
        for t in range(nt):
            entry = tensors[t]
            for k in range(INT8_SLOTS):
                base[t * INT8_SLOTS + k] = _data_or_null(entry[k])
            for k in range(4):
                absmax[t * 4 + k] = <float*> _data_or_null(entry[7 + k])
                signs[t * 4 + k] = 1 if entry[11 + k] else 0
            nch = _add_chunks(chunks, nch, t, (<cnp.ndarray> entry[0]).size)
        _launch_int8(kind, variant, layout, nt, base, absmax, signs, chunks, nch, total, s, &per_tensor[0], key,
                     index_offset, maps, mids, buckets)
    finally:
        free(base); free(absmax); free(signs); free(chunks)


cdef int _add_chunks(Chunk* chunks, int nch, int t, int64_t size) noexcept:
    """Tensor t's chunks of CHUNK elements (a multiple of 256) appended at chunks[nch]; the new count."""
    cdef int64_t start = 0
    while start < size:
        chunks[nch].tensor = t
        chunks[nch].start = start
        chunks[nch].n = min(<int64_t> CHUNK, size - start)
        chunks[nch].offset = _next_offset(chunks, nch)
        nch += 1
        start += CHUNK
    return nch


cdef int _int8_share(int share, int nshares, int layout, int kind, int variant, void** base, float** absmax,
                     const unsigned char* signs, const float* map_rows, const float* mid_rows,
                     const unsigned char* bucket_rows, int psize, int gsize, const Chunk* chunks, int nch,
                     const double* s, const double* per_tensor, unsigned int key,
                     unsigned long long index_offset) noexcept nogil:
    """_chunk_int8 over the chunks of one share (_share_span); the number that had no kernel. The two maps'
    codecs are made here, once per share (int8_codec compares the tables with its per-thread cache: 2 KiB
    per map), not per chunk."""
    cdef int c, t, bad = 0
    cdef ShareSpan span = _share_span(chunks, nch, share, nshares)
    cdef FoQuantizer q
    cdef Int8Codec codecs[2]  # row 0 of the tables: the unsigned map; row 1: the signed one
    if span.first >= span.end:
        return 0
    for c in range(2):
        q.mid = mid_rows + 256 * c
        q.bucket = bucket_rows + 65536 * c
        codecs[c] = int8_codec(map_rows + 256 * c, q)
    for c in range(span.first, span.end):
        t = chunks[c].tensor
        bad += _chunk_int8(layout, kind, variant, &base[t * INT8_SLOTS], &absmax[t * 4], &signs[t * 4], codecs,
                           psize, gsize, &chunks[c], s, per_tensor[t], key, index_offset) != 0
    return bad


cdef int _launch_int8(int kind, int variant, int layout, int nt, void** base, float** absmax,
                      const unsigned char* signs, const Chunk* chunks, int nch, int64_t total, const double* s,
                      const double* per_tensor, unsigned int key, unsigned long long index_offset,
                      cnp.ndarray maps, cnp.ndarray mids, cnp.ndarray buckets) except -1:
    """One parallel region of _chunk_int8 over the chunks: base (nt x INT8_SLOTS pointers, grads filled in),
    absmax and signed (nt x 4) per tensor; the quantizer rows by each state's map (maps, mids and buckets
    checked by the caller)."""
    cdef int psize = _ITEMSIZE[layout & 3], gsize = _ITEMSIZE[(layout >> 2) & 3]
    cdef int bad = 0
    cdef const float* map_rows = <const float*> cnp.PyArray_DATA(maps)
    cdef const float* mid_rows = <const float*> cnp.PyArray_DATA(mids)
    cdef const unsigned char* bucket_rows = <const unsigned char*> cnp.PyArray_DATA(buckets)
    cdef int share, nthreads = _threads_for(total)
    with nogil:
        for share in prange(nthreads, schedule='static', num_threads=nthreads):
            bad += _int8_share(share, nthreads, layout, kind, variant, base, absmax, signs, map_rows, mid_rows,
                               bucket_rows, psize, gsize, chunks, nch, s, per_tensor, key, index_offset)
    if bad:
        raise ValueError(f"no 8-bit CPU kernel for kind {kind} variant {variant} layout {layout}")
    return 0


# ---------------------------------------------------------------------------------------------------
# 8-bit state in the step loop: the arrays of an optimizer's calls, checked by backends/validate.py (its
# messages), kept as run_int8's pointer tables with a snapshot of what the checks read; each step compares
# the snapshot and takes the grads in C, and sends anything it does not accept back to the Python checks
# ---------------------------------------------------------------------------------------------------

cdef class Int8Plan:
    """The checked arrays of an optimizer's 8-bit-state calls (validate.prepare_fixed's lists: NumPy params,
    Kahan compensations and QuantizedState of NumPy codes and absmax). Holds per call run_int8's tables (grads
    left out), a snapshot of every array (data pointer, dtype object, C-contiguous and writeable flags, shape),
    the arrays each QuantizedState held and its map, and the written spans sorted for the grads' overlap
    search. bind() is the fast path of a step; it never raises for a bad input: it returns None and the
    caller runs the Python checks, which raise with their messages or accept."""
    cdef list views          # every checked ndarray, in snapshot order (kept alive)
    cdef _Snapshot snapshot
    cdef list qstates        # (QuantizedState, its codes, its absmax, its signed) as checked
    cdef object assignments  # precision.quantized_state_assignments
    cdef long long seen      # its count when qstates were last found current
    cdef list params         # per call the checked params list
    cdef list is_list        # per call
    cdef Span* written
    cdef int nwritten
    cdef int ncalls
    cdef int* first          # ncalls + 1: each call's first tensor in the tables
    cdef int* first_chunk    # ncalls + 1
    cdef int* param_code     # ncalls
    cdef void** base         # tensors x INT8_SLOTS (slot 1, the grads, NULL)
    cdef float** absmax      # tensors x 4
    cdef unsigned char* signs  # tensors x 4
    cdef int64_t* sizes      # tensors
    cdef Chunk* chunks

    def __init__(self, list calls, assignments):
        """calls: per call (params, [s0, s1, s2, s3] (lists or None), comps or None, is_list),
        the lists validate checked (params and comps ndarrays, states QuantizedState of ndarrays);
        assignments: precision.quantized_state_assignments (a QuantizedState's arrays are read again only
        after its count moved)."""
        cdef int c, i, k, t, nt = 0, nch = 0, nw = 0
        cdef cnp.ndarray v
        views, qstates = [], []
        self.assignments = assignments
        self.seen = assignments()  # before the states' arrays are read below
        self.ncalls = len(calls)
        for call in calls:
            nt += len(call[0])
        self.first = <int*> malloc((self.ncalls + 1) * sizeof(int))
        self.first_chunk = <int*> malloc((self.ncalls + 1) * sizeof(int))
        self.param_code = <int*> malloc(max(self.ncalls, 1) * sizeof(int))
        self.base = <void**> calloc(max(nt, 1) * INT8_SLOTS, sizeof(void*))
        self.absmax = <float**> calloc(max(nt, 1) * 4, sizeof(float*))
        self.signs = <unsigned char*> calloc(max(nt, 1) * 4, 1)
        self.sizes = <int64_t*> malloc(max(nt, 1) * sizeof(int64_t))
        if (self.first == NULL or self.first_chunk == NULL or self.param_code == NULL or self.base == NULL
                or self.absmax == NULL or self.signs == NULL or self.sizes == NULL):
            raise MemoryError()
        self.params, self.is_list = [], []
        t = 0
        for c in range(self.ncalls):
            params, states, comps, is_list = calls[c]
            self.params.append(list(params))
            self.is_list.append(bool(is_list))
            self.first[c] = t
            self.param_code[c] = _dtype_code(<cnp.ndarray> params[0]) if len(params) else DTYPE_F32
            for i in range(len(params)):
                v = <cnp.ndarray> params[i]
                views.append(v)
                self.base[t * INT8_SLOTS] = cnp.PyArray_DATA(v)
                self.sizes[t] = cnp.PyArray_SIZE(v)
                nch += <int> ((self.sizes[t] + CHUNK - 1) // CHUNK)
                if comps is not None:
                    v = <cnp.ndarray> comps[i]
                    views.append(v)
                    self.base[t * INT8_SLOTS + COMP] = cnp.PyArray_DATA(v)
                for k in range(4):
                    if states[k] is None:
                        continue
                    q = states[k][i]
                    qstates.append((q, q.codes, q.absmax, q.signed))
                    views.append(q.codes)
                    views.append(q.absmax)
                    self.base[t * INT8_SLOTS + (2 + k if k < 3 else 6)] = cnp.PyArray_DATA(<cnp.ndarray> q.codes)
                    self.absmax[t * 4 + k] = <float*> cnp.PyArray_DATA(<cnp.ndarray> q.absmax)
                    self.signs[t * 4 + k] = 1 if q.signed else 0
                t += 1
        self.first[self.ncalls] = t
        self.chunks = <Chunk*> malloc(max(nch, 1) * sizeof(Chunk))
        if self.chunks == NULL:
            raise MemoryError()
        nch = 0
        for c in range(self.ncalls):
            self.first_chunk[c] = nch
            for t in range(self.first[c], self.first[c + 1]):
                nch = _add_chunks(self.chunks, nch, t - self.first[c], self.sizes[t])
        self.first_chunk[self.ncalls] = nch
        self.snapshot = _Snapshot(views)
        for v in views:
            if cnp.PyArray_NBYTES(v):
                nw += 1
        self.written = <Span*> malloc(max(nw, 1) * sizeof(Span))
        if self.written == NULL:
            raise MemoryError()
        nw = 0
        for v in views:
            if cnp.PyArray_NBYTES(v):
                self.written[nw].start = <uintptr_t> cnp.PyArray_DATA(v)
                self.written[nw].end = self.written[nw].start + <uintptr_t> cnp.PyArray_NBYTES(v)
                nw += 1
        qsort(self.written, nw, sizeof(Span), _cmp_span)
        self.nwritten = nw
        self.views = views
        self.qstates = qstates

    def __dealloc__(self):
        free(self.written); free(self.first); free(self.first_chunk); free(self.param_code)
        free(self.base); free(self.absmax); free(self.signs); free(self.sizes); free(self.chunks)

    cdef bint _is_current(self):
        """Every QuantizedState still holds the arrays and map it was checked with (read only when some
        QuantizedState was assigned to since they last were: 3 attribute reads per state cost more than the
        rest of a step of small tensors), and every array is as the snapshot saw it."""
        cdef Py_ssize_t j
        cdef list views = self.views
        cdef long long count = self.assignments()  # before the reads: a later assignment moves it again
        if count != self.seen:
            for q, codes, absmax, signed_ in self.qstates:
                if q.codes is not codes or q.absmax is not absmax or q.signed != signed_:
                    return False
            self.seen = count
        for j in range(self.snapshot.n):
            if not self.snapshot.same(j, <cnp.ndarray> views[j]):
                return False
        return True

    def bind(self, grads_per_call):
        """Per call (grads list, Int8Bound) when the arrays are as checked and the grads pass every check (the
        Python checks' rules: exact NumPy arrays, one dtype per call, the params' own or float32 for 16-bit
        params, the params' shapes, C-contiguous, no memory shared with an array any call of the plan writes);
        None otherwise (the caller's Python checks then raise or accept)."""
        cdef int c, i, n, code, gcode, pcode, nd
        cdef cnp.ndarray a, p
        cdef uintptr_t start, end
        cdef Int8Bound bound
        if not isinstance(grads_per_call, (list, tuple)) or len(grads_per_call) != self.ncalls:
            return None
        if not self._is_current():
            return None
        out = []
        for c in range(self.ncalls):
            grads = grads_per_call[c]
            params = <list> self.params[c]
            n = len(params)
            if self.is_list[c]:
                if not isinstance(grads, (list, tuple)) or len(grads) != n:
                    return None
                grads = list(grads)
            else:
                grads = [grads]
            pcode = self.param_code[c]
            gcode = -1
            bound = Int8Bound.__new__(Int8Bound)
            bound.plan, bound.call, bound.grads = self, c, grads
            bound.gptrs = <void**> malloc(max(n, 1) * sizeof(void*))
            if bound.gptrs == NULL:
                raise MemoryError()
            for i in range(n):
                obj = grads[i]
                if not cnp.PyArray_CheckExact(obj):
                    return None
                a = <cnp.ndarray> obj
                p = <cnp.ndarray> params[i]
                code = _dtype_code(a)
                if code < 0 or (code != pcode and not (_is16(pcode) and code == DTYPE_F32)):
                    return None
                if gcode < 0:
                    gcode = code
                elif code != gcode:
                    return None
                nd = cnp.PyArray_NDIM(a)
                if (nd != cnp.PyArray_NDIM(p) or not cnp.PyArray_CompareLists(cnp.PyArray_DIMS(a), cnp.PyArray_DIMS(p), nd)
                        or not cnp.PyArray_IS_C_CONTIGUOUS(a)):
                    return None
                bound.gptrs[i] = cnp.PyArray_DATA(a)
                if cnp.PyArray_SIZE(a):
                    start = <uintptr_t> cnp.PyArray_DATA(a)
                    end = start + <uintptr_t> cnp.PyArray_NBYTES(a)
                    if _first_overlap(self.written, self.nwritten, start, end) >= 0:
                        return None
            out.append((grads, bound))
        return out


cdef class Int8Bound:
    """One call of an Int8Plan with its grads (Int8Plan.bind): what run_int8_bound launches."""
    cdef Int8Plan plan
    cdef int call
    cdef list grads          # kept alive while the pointers are used
    cdef void** gptrs

    def __dealloc__(self):
        free(self.gptrs)


def run_int8_bound(Int8Bound bound, str kernel, int variant, int layout, tuple scalars, cnp.ndarray maps,
                   cnp.ndarray mids, cnp.ndarray buckets, unsigned int key=0, unsigned long long index_offset=0,
                   tensor_coefs=None):
    """run_int8 on a bound call of an Int8Plan (its tables, the bound grads): the same parallel region, with
    no per-tensor work in Python."""
    cdef double s[MAX_SCALARS]
    cdef int kind = KINDS[kernel]
    cdef Int8Plan plan = bound.plan
    cdef int c = bound.call, t0 = plan.first[c], nt = plan.first[c + 1] - plan.first[c], t
    cdef int ch0 = plan.first_chunk[c], nch = plan.first_chunk[c + 1] - plan.first_chunk[c]
    cdef int64_t total = 0
    cdef void** base
    if kind >= KIND_TWO_PHASE:
        raise ValueError(f"run_int8: {kernel!r} is not an elementwise kernel")
    _check_quantizer(maps, mids, buckets)
    _load_scalars(scalars, s)
    cdef double[::1] per_tensor = _tensor_coefs(tensor_coefs if tensor_coefs is not None else np.zeros(nt), nt)
    if nch == 0:
        return
    base = <void**> malloc(nt * INT8_SLOTS * sizeof(void*))
    if base == NULL:
        raise MemoryError()
    try:
        memcpy(base, &plan.base[t0 * INT8_SLOTS], nt * INT8_SLOTS * sizeof(void*))
        for t in range(nt):
            base[t * INT8_SLOTS + 1] = bound.gptrs[t]
            total += plan.sizes[t0 + t]
        _launch_int8(kind, variant, layout, nt, base, &plan.absmax[t0 * 4], &plan.signs[t0 * 4],
                     &plan.chunks[ch0], nch, total, s, &per_tensor[0], key, index_offset, maps, mids, buckets)
    finally:
        free(base)
