// Device-side plumbing shared by the CUDA entry points (update.cu, reduce.cu); never included by the
// CPU build. Holds: the dtype configuration of one compiled module, float16 conversions, 16-byte
// vector loads, the multi-tensor table layout, the grad_scale read and a deterministic block sum.
//
// One RawModule is compiled per device, params' dtype and state dtype, selected with -DFASTOPT_DTYPE:
//   0 float32 data, float32 state, float32 math
//   1 float64 data, float64 state, float64 math
//   2 float16 params and grads, float32 state, float32 math (fp16 moments would underflow)
//   3 bfloat16 params and grads, float32 state, float32 math
// (-DFASTOPT_GRAD=0: with float32 grads instead of the 16-bit params' own dtype)
// and, for another state dtype (state_dtype=, DESIGN.md "Precision"), -DFASTOPT_STATE: 0 float32, 2 float16,
// 3 bfloat16 (float32 params: any of them; 16-bit params: float32 or their own dtype), 4 8-bit block-wise
// state (state_dtype="int8": the module's update entries are update.cu's _q8 ones). 16-bit values are
// widened exactly and stored rounded to nearest even, as the CPU loops do (precision.cuh for bfloat16).
// FASTOPT_BLOCK (threads per block) and FASTOPT_CHUNK (elements per block of a multi-tensor launch)
// come from the launcher (fastopt/backends/cupy_backend.py) so both sides agree.
#pragma once
#include "common.cuh"
#include "precision.cuh"

#ifndef FASTOPT_DTYPE
#define FASTOPT_DTYPE 0
#endif
#ifndef FASTOPT_BLOCK
#define FASTOPT_BLOCK 256
#endif
#ifndef FASTOPT_CHUNK
#define FASTOPT_CHUNK 4096
#endif

namespace fastopt {
namespace dev {

typedef long long i64;

// float16 without cuda_fp16.h: NVRTC has no CUDA headers on its search path unless a toolkit is
// installed, so the two conversions are written in PTX (round to nearest even, like torch's .half()).
struct half_t {
    unsigned short bits;
};
#ifdef FASTOPT_CPU_EMULATION  // tests/gpu/cuda_emulator.py runs these kernels on the CPU: F16C, same rounding
__device__ __forceinline__ float half_to_float(half_t h) { return _cvtsh_ss(h.bits); }
__device__ __forceinline__ half_t float_to_half(float f) {
    half_t h;
    h.bits = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
    return h;
}
#else
__device__ __forceinline__ float half_to_float(half_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.bits));
    return f;
}
__device__ __forceinline__ half_t float_to_half(float f) {
    half_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
    return h;
}
#endif

// bfloat16: the top half of a float32, converted by precision.cuh's software (the CPU loops' bits)
struct bf16_t {
    unsigned short bits;
};

#if FASTOPT_DTYPE == 0
typedef float T;  // params and grads
typedef float M;  // math
#define FASTOPT_DEFAULT_STATE 0
#elif FASTOPT_DTYPE == 1
typedef double T;
typedef double M;
#define FASTOPT_DEFAULT_STATE 1
#elif FASTOPT_DTYPE == 2
typedef half_t T;
typedef float M;
#define FASTOPT_DEFAULT_STATE 0
#elif FASTOPT_DTYPE == 3
typedef bf16_t T;
typedef float M;
#define FASTOPT_DEFAULT_STATE 0
#else
#error "FASTOPT_DTYPE must be 0 (float32), 1 (float64), 2 (float16) or 3 (bfloat16)"
#endif

// The grads: the params' dtype, or with -DFASTOPT_GRAD=0 float32 grads of 16-bit params (the CPU loops take
// them too: a float32 gradient, say a mean reduced in float32, is used without a rounding to 16 bits).
#ifndef FASTOPT_GRAD
typedef T G;
#elif FASTOPT_GRAD == 0 && (FASTOPT_DTYPE == 2 || FASTOPT_DTYPE == 3)
typedef float G;
#else
#error "FASTOPT_GRAD=0 (float32 grads) is for float16 and bfloat16 params"
#endif

#ifndef FASTOPT_STATE
#define FASTOPT_STATE FASTOPT_DEFAULT_STATE
#endif
#if FASTOPT_STATE == 0
typedef float S;  // optimizer state
#elif FASTOPT_STATE == 1
typedef double S;
#elif FASTOPT_STATE == 2
typedef half_t S;
#elif FASTOPT_STATE == 3
typedef bf16_t S;
#elif FASTOPT_STATE == 4  // 8-bit block-wise state (update.cu's _q8 entries): uint8 codes, float32 math
typedef float S;
#if FASTOPT_DTYPE == 1
#error "8-bit state (FASTOPT_STATE 4) is for float32, float16 and bfloat16 params"
#endif
#else
#error "FASTOPT_STATE must be 0 (float32), 1 (float64), 2 (float16), 3 (bfloat16) or 4 (8-bit)"
#endif

__device__ __forceinline__ M load(float x) { return M(x); }
__device__ __forceinline__ M load(double x) { return M(x); }
__device__ __forceinline__ M load(half_t x) { return M(half_to_float(x)); }
__device__ __forceinline__ M load(bf16_t x) { return M(fo_bf16_to_float(x.bits)); }
template <typename X> __device__ __forceinline__ X store(M x);
template <> __device__ __forceinline__ float store<float>(M x) { return float(x); }
template <> __device__ __forceinline__ double store<double>(M x) { return double(x); }
template <> __device__ __forceinline__ half_t store<half_t>(M x) { return float_to_half(float(x)); }
template <> __device__ __forceinline__ bf16_t store<bf16_t>(M x) {
    bf16_t h;
    h.bits = fo_float_to_bf16(float(x));
    return h;
}

// How the new params are stored (a module per mode, -DFASTOPT_ROUND; 16-bit params only, as on the CPU):
//   0 rounded to nearest even
//   1 Kahan-compensated (kahan=True): the compensation, in the params' dtype, is the table's c column (F_C)
//   2 stochastically rounded (stochastic_rounding=True): element i of a tensor gets
//     fo_random_bits(key, index0 + i), key and index0 in the Scalars (precision.StochasticRounding)
#ifndef FASTOPT_ROUND
#define FASTOPT_ROUND 0
#endif
#if FASTOPT_ROUND != 0
#if FASTOPT_DTYPE == 2
typedef Fp16Format FMT;
#elif FASTOPT_DTYPE == 3
typedef Bf16Format FMT;
#else
#error "FASTOPT_ROUND (Kahan, stochastic rounding) is for float16 and bfloat16 params"
#endif
#endif

// Elements per 16-byte load of the params; state arrays move the same number of elements per step
// (two 16-byte loads for float32 state of 16-bit params, one 8-byte load for 16-bit state of float32 params).
enum { VEC = 16 / sizeof(T) };

// A vector of N elements, aligned to its size (at most 16 bytes), so that an array of them has no padding.
template <typename X, int N>
struct alignas(sizeof(X) * N < 16 ? sizeof(X) * N : 16) Vec {
    X v[N];
};

template <typename X>
__device__ __forceinline__ Vec<X, VEC> load_vec(const X* base, i64 j) {
    return reinterpret_cast<const Vec<X, VEC>*>(base)[j];
}
template <typename X>
__device__ __forceinline__ void store_vec(X* base, i64 j, const Vec<X, VEC>& x) {
    reinterpret_cast<Vec<X, VEC>*>(base)[j] = x;
}

// The kernels' float64 hyperparameters (fastopt/specs.py scalars), passed by value: no host-to-device
// copy per call. Field count = the largest *Params struct.
struct Scalars {
    double v[16];
    unsigned long long key;     // stochastic rounding (FASTOPT_ROUND 2): the call's key (fo_random_key)
    unsigned long long index0;  // and the index of each tensor's first element (a shard's offset in its whole)
};

// The scalars of a capturable step (a device row, fo_select_scalars), read through the read-only cache.
// A separate path from the by-value one (make_op): one pointer for both made the compiler copy the
// by-value struct to local memory and read both through generic loads.
template <typename P, typename MT>
__device__ __forceinline__ P load_params_at(const double* __restrict__ at) {
    P h;
    MT* f = reinterpret_cast<MT*>(&h);
#pragma unroll
    for (unsigned i = 0; i < sizeof(P) / sizeof(MT); ++i) f[i] = static_cast<MT>(__ldg(at + i));
    return h;
}

template <typename P, typename MT>
__device__ __forceinline__ P load_scalars(const Scalars& sc, const double* at) {
    if (at != nullptr) return load_params_at<P, MT>(at);
    return load_params<P, MT>(sc.v);
}

// grad_scale may live on the device (a 0-d array: a clipping coefficient, a loss scale) so that
// "clip then update" needs no host synchronisation. kind: 0 none, 1 float16, 2 float32, 3 float64, 4 bfloat16.
__device__ __forceinline__ M device_scale(const void* gs, int kind) {
    if (kind == 1) return M(half_to_float(*static_cast<const half_t*>(gs)));
    if (kind == 4) return M(fo_bf16_to_float(*static_cast<const unsigned short*>(gs)));
    if (kind == 2) return M(*static_cast<const float*>(gs));
    if (kind == 3) return M(*static_cast<const double*>(gs));
    return M(1);
}

// skip_nonfinite on the device: a flag (a 0-d bool array written by fo_step_guard) that makes every
// update kernel return before touching memory, so a step with a NaN/Inf gradient is skipped without a
// host round trip. NULL: never skip.
__device__ __forceinline__ bool skipped(const unsigned char* skip) { return skip != nullptr && *skip != 0; }

// Multi-tensor table (one int64 buffer, cached by the launcher while the pointers repeat):
//   tensors: TENSOR_FIELDS int64 per tensor: p, g, s0, s1, s2 (0 when unused), n, vec (all pointers
//            16-byte aligned), first chunk index, s3 (a fourth state: Adan's; 0 when unused), with 8-bit
//            state (s0..s3 then hold the uint8 codes) a0, a1, a2: the float32 absmax per 256 of s0..s2,
//            c: the Kahan compensation of the params (FASTOPT_ROUND 1; 0 otherwise), and a3: s3's absmax
//   chunks:  one int64 per block: tensor index << 32 | chunk index within the tensor
enum { TENSOR_FIELDS = 14, F_P = 0, F_G = 1, F_S0 = 2, F_S1 = 3, F_S2 = 4, F_N = 5, F_VEC = 6, F_FIRST = 7, F_S3 = 8,
       F_A0 = 9, F_C = 12, F_A3 = 13 };

struct ChunkRange {
    const i64* rec;  // the tensor's record
    int tensor;
    i64 begin, end;  // element range of this block
};

__device__ __forceinline__ ChunkRange chunk_range(const i64* tensors, const i64* chunks) {
    ChunkRange r;
    i64 c = chunks[blockIdx.x];
    r.tensor = int(c >> 32);
    r.rec = tensors + i64(TENSOR_FIELDS) * r.tensor;
    r.begin = (c & 0xffffffffLL) * i64(FASTOPT_CHUNK);
    i64 end = r.begin + FASTOPT_CHUNK;
    r.end = end < r.rec[F_N] ? end : r.rec[F_N];
    return r;
}

// Sum of one double per thread over the block, in a fixed tree order (deterministic run to run).
// Every thread of the block must call it; the result is valid in thread 0.
__device__ __forceinline__ double block_sum(double x, double* shared) {
    shared[threadIdx.x] = x;
    __syncthreads();
    for (int s = FASTOPT_BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
        __syncthreads();
    }
    double total = shared[0];
    __syncthreads();  // shared may be reused right after
    return total;
}

}  // namespace dev
}  // namespace fastopt
