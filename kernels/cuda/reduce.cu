// Norms and clipping for CuPy RawModule (fastopt/backends/cupy_backend.py), over the same multi-tensor
// table as update.cu (the `p` slot holds the gradient). Reductions are two-stage and deterministic:
// a fixed chunking (FASTOPT_CHUNK elements per block) and fixed-order tree sums in float64, so the
// same arrays give the same bits on every run. Results stay on the device: the total norm and the
// clipping coefficient are 0-d device arrays that the scale kernel and the update kernels read
// (grad_scale), so "clip then update" never waits for the host.
#include "clip.cuh"
#include "device.cuh"

// Stage 1: partials[block] = sum of squares of this block's chunk. Aligned tensors are read in 16-byte
// vectors (each thread's few vectors of the chunk unrolled, so that their loads are in flight together)
// into four accumulators; the order is fixed, so the sums are the same from run to run.
extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK)
    fo_sumsq_chunks(const long long* tensors, const long long* chunks, double* partials) {
    using namespace fastopt::dev;
    __shared__ double shared[FASTOPT_BLOCK];
    const ChunkRange r = chunk_range(tensors, chunks);
    const T* x = reinterpret_cast<const T*>(r.rec[F_P]);
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    i64 begin = r.begin;
    if (r.rec[F_VEC] != 0) {  // chunks start at multiples of FASTOPT_CHUNK elements: vector-aligned
        const i64 vend = r.end / VEC;
#pragma unroll 4
        for (i64 j = begin / VEC + threadIdx.x; j < vend; j += blockDim.x) {
            const Vec<T, VEC> v = load_vec(x, j);
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const double xi = double(load(v.v[k]));
                acc[k % 4] += xi * xi;
            }
        }
        begin = vend * VEC;
    }
    for (i64 i = begin + threadIdx.x; i < r.end; i += blockDim.x) {
        const double xi = double(load(x[i]));
        acc[0] += xi * xi;
    }
    const double total = block_sum((acc[0] + acc[1]) + (acc[2] + acc[3]), shared);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// Stage 2, one block per tensor: out[t] = sum of its chunks' partials (sum of squares of tensor t).
extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK)
    fo_sumsq_tensors(const long long* tensors, const double* partials, double* out) {
    using namespace fastopt::dev;
    __shared__ double shared[FASTOPT_BLOCK];
    const i64* rec = tensors + i64(TENSOR_FIELDS) * blockIdx.x;
    const i64 first = rec[F_FIRST];
    const i64 nchunks = (rec[F_N] + FASTOPT_CHUNK - 1) / FASTOPT_CHUNK;
    double acc = 0.0;
    for (i64 c = threadIdx.x; c < nchunks; c += blockDim.x) acc += partials[first + c];
    acc = block_sum(acc, shared);
    if (threadIdx.x == 0) out[blockIdx.x] = acc;
}

// sqrt(sum of sq[0..n)) over one block in a fixed order; valid in thread 0.
__device__ __forceinline__ double total_norm(const double* sq, long long n, double* shared) {
    double acc = 0.0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) acc += sq[i];
    return sqrt(fastopt::dev::block_sum(acc, shared));
}

// One block: norm[0] = sqrt(sum of sq[0..n)); with coef != NULL also the clipping coefficient
// min(1, max_norm / (norm + 1e-6)) (clip.cuh, NaN propagates like torch).
extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK)
    fo_global_norm(const double* sq, long long n, double* norm, double max_norm, double* coef) {
    __shared__ double shared[FASTOPT_BLOCK];
    const double total = total_norm(sq, n, shared);
    if (threadIdx.x == 0) {
        norm[0] = total;
        if (coef != nullptr) coef[0] = fastopt::clip_coefficient<double>(total, max_norm);
    }
}

// The optimizer's per-step guard (fastopt.optim, clip_grad_norm and skip_nonfinite on the GPU), one
// block, everything on the device:
//   total = sqrt(sum of sq[0..n))      the global gradient norm, summed in the order of fo_global_norm
//   found_inf[0] = !isfinite(total)    when found_inf != NULL (skip_nonfinite); the update kernels read it
//   skipped[0] += found_inf[0]         when skipped != NULL: the optimizer's skip counter
//   coef[0] = clip coefficient         when coef != NULL (clip_grad_norm); 1 on a skipped step
//   norm[0] = total                    when norm != NULL
extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK)
    fo_step_guard(const double* sq, long long n, double max_norm, double* coef, unsigned char* found_inf,
                  long long* skipped, double* norm) {
    __shared__ double shared[FASTOPT_BLOCK];
    const double total = total_norm(sq, n, shared);
    if (threadIdx.x == 0) {
        const bool bad = found_inf != nullptr && !isfinite(total);
        if (found_inf != nullptr) found_inf[0] = bad ? 1 : 0;
        if (skipped != nullptr && bad) skipped[0] += 1;
        if (coef != nullptr) coef[0] = bad ? 1.0 : fastopt::clip_coefficient<double>(total, max_norm);
        if (norm != nullptr) norm[0] = total;
    }
}

// g *= coef in place. mode 0: coef = host_coef; 1: coef = coef_ptr[0] (device, one for all);
// 2: per tensor, coef = clip_coefficient(sqrt(coef_ptr[t]), max_norm) from its sum of squares
// (clip_by_norm). A coefficient of exactly 1 skips the block: no memory traffic when nothing clips.
extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK)
    fo_scale_multi(const long long* tensors, const long long* chunks, int mode, double host_coef,
                   const double* coef_ptr, double max_norm) {
    using namespace fastopt::dev;
    const ChunkRange r = chunk_range(tensors, chunks);
    double c = host_coef;
    if (mode == 1) c = coef_ptr[0];
    if (mode == 2) c = fastopt::clip_coefficient<double>(sqrt(coef_ptr[r.tensor]), max_norm);
    if (c == 1.0) return;
    const M coef = M(c);
    T* x = reinterpret_cast<T*>(r.rec[F_P]);
    for (i64 i = r.begin + threadIdx.x; i < r.end; i += blockDim.x) x[i] = store<T>(load(x[i]) * coef);
}

// g = clamp(g, -c, c) in place (clip.cuh: NaN stays NaN).
extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK)
    fo_clamp_multi(const long long* tensors, const long long* chunks, double clip_value) {
    using namespace fastopt::dev;
    const ChunkRange r = chunk_range(tensors, chunks);
    const M c = M(clip_value);
    T* x = reinterpret_cast<T*>(r.rec[F_P]);
    for (i64 i = r.begin + threadIdx.x; i < r.end; i += blockDim.x) x[i] = store<T>(fastopt::clamp_math<M>(load(x[i]), c));
}

// Bandwidth ceiling for the benchmark: the memory traffic of an update with NS states and trivial
// math (p and states read and written, g read), one array, grid-stride, same vector width.
extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK)
    fo_touch(fastopt::dev::T* p, const fastopt::dev::T* g, fastopt::dev::S* s0, fastopt::dev::S* s1,
             fastopt::dev::S* s2, long long n, int ns) {
    using namespace fastopt::dev;
    const i64 nt = i64(gridDim.x) * blockDim.x;
    for (i64 i = i64(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += nt) {
        const M gi = load(g[i]);
        p[i] = store<T>(load(p[i]) + gi);
        if (ns > 0) s0[i] = store<S>(load(s0[i]) + gi);
        if (ns > 1) s1[i] = store<S>(load(s1[i]) + gi);
        if (ns > 2) s2[i] = store<S>(load(s2[i]) + gi);
    }
}

// capturable=True (fastopt/capture.py): the step's scalars chosen on the device, so that a CUDA graph of a
// class step replays each step with its own bias corrections and schedule. Per group g (one thread each):
// t = ++counters[g] (attempted steps, as the host counts on the GPU); out[16 g + k] = rows of g at t:
// rows[(g * capacity + t - 1 - meta[2 g + 1]) * 16 + k], the host's precomputed scalars for steps
// base + 1 .. base + nrows (meta[2 g] = nrows | steady << 62: past the last row, the last one, which the
// host found constant from there on). A step past the rows of a group that is not steady is not taken:
// *flag = 1 (every update kernel of the step returns at once) and *overflow += 1, which the host reports
// at its next call. own_flag: *flag is this kernel's (cleared when the step goes ahead), else the
// guard's (only ever set here).
extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK)
    fo_select_scalars(const double* rows, long long capacity, const long long* meta, int ngroups,
                      long long* counters, double* out, unsigned char* flag, int own_flag, long long* overflow) {
    __shared__ int past;
    if (threadIdx.x == 0) past = 0;
    __syncthreads();
    const long long steady = 1LL << 62;
    for (int g = threadIdx.x; g < ngroups; g += blockDim.x) {
        const long long t = counters[g] + 1;
        counters[g] = t;
        const long long nrows = meta[2 * g] & (steady - 1);
        long long i = t - 1 - meta[2 * g + 1];
        if (i >= nrows || i < 0) {
            if (!(meta[2 * g] & steady) || i < 0) atomicExch(&past, 1);
            i = nrows - 1;
        }
        const double* row = rows + (g * capacity + (i < 0 ? 0 : i)) * 16;
        for (int k = 0; k < 16; ++k) out[16 * g + k] = row[k];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        if (past) {
            *flag = 1;
            *overflow += 1;
        } else if (own_flag) {
            *flag = 0;
        }
    }
}
