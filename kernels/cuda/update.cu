// Optimizer-update entry points for CuPy RawModule (fastopt/backends/cupy_backend.py). The
// per-element math is the shared kernels/cuda/<family>.cuh (the CPU loops run the same code); this file
// only moves memory: 16-byte vector loads when every pointer of a tensor is aligned, one launch for a
// single array (grid-stride) or for a whole list (a table of tensors, one block per chunk, like
// torch's multi_tensor_apply). Entry names: fo_<family>_v<variant> and fo_<family>_v<variant>_multi
// (two-phase families: fo_<family>_moments_multi, _trust, _apply_multi);
// the variant bits are those of fastopt/specs.py (`variant`), baked in as template arguments. The list
// of families and variants is generated from the registry (families.cuh, included at the end).
#include "device.cuh"
#include "ops.cuh"

namespace fastopt {
namespace dev {

// The functors (one per family, in its <family>.cuh: the Params struct it reads, which state slots it
// uses, the call into the shared math with the variant's flags as constants) are instantiated with the
// module's math type M by the entry points at the end of this file. `at`: the scalars on the device (a row
// that fo_select_scalars wrote for this step: capturable=True, so that a CUDA graph replays every step with
// its own bias corrections), else NULL and `sc`, by value.
template <class Op>
__device__ __forceinline__ Op make_op(const Scalars& sc, const void* gs, int gs_kind, const double* at) {
    Op op;
    op.h = load_scalars<typename Op::P, M>(sc, at);
    if (gs_kind != 0) op.h.grad_scale = op.h.grad_scale * device_scale(gs, gs_kind);
    return op;
}

struct Ptrs {
    T* __restrict__ p;
    const G* __restrict__ g;
    S* __restrict__ s0;
    S* __restrict__ s1;
    S* __restrict__ s2;
    S* __restrict__ s3;  // a fourth state (Op::USED bit 8: Adan), else NULL
    T* __restrict__ c;   // the Kahan compensation (FASTOPT_ROUND 1: the table's c column), else NULL
    unsigned key;        // stochastic rounding (FASTOPT_ROUND 2): the call's key and
    i64 index0;          // the index of the tensor's first element
};

// The new param p (float math) of element i of its tensor, stored by the module's rounding; p_old: the
// param as loaded (Kahan's reference point, as the CPU loops' fo_kahan_store is given it).
__device__ __forceinline__ void store_param(const Ptrs& a, i64 i, M p_old, M p, T& out) {
#if FASTOPT_ROUND == 1
    fo_u16 pb, cb;
    fo_kahan_store<FMT>(float(p_old), FMT().load(a.c[i].bits), float(p), pb, cb);
    out.bits = pb;
    a.c[i].bits = cb;
#elif FASTOPT_ROUND == 2
    (void)p_old;
    out.bits = FMT().store_sr(float(p), fo_random_bits(a.key, fo_u64(a.index0 + i)));
#else
    (void)a;
    (void)i;
    (void)p_old;
    out = store<T>(p);
#endif
}

template <class Op>
__device__ __forceinline__ void update_one(const Op& op, const Ptrs& a, i64 i) {
    M p = load(a.p[i]), x0 = M(0), x1 = M(0), x2 = M(0), x3 = M(0);
    const M p_old = p;
    if (Op::USED & 1) x0 = load(a.s0[i]);
    if (Op::USED & 2) x1 = load(a.s1[i]);
    if (Op::USED & 4) x2 = load(a.s2[i]);
    if (Op::USED & 8) x3 = load(a.s3[i]);
    fo_op_call(op, p, load(a.g[i]), x0, x1, x2, x3);
    store_param(a, i, p_old, p, a.p[i]);
    if (Op::USED & 1) a.s0[i] = store<S>(x0);
    if (Op::USED & 2) a.s1[i] = store<S>(x1);
    if (Op::USED & 4) a.s2[i] = store<S>(x2);
    if (Op::USED & 8) a.s3[i] = store<S>(x3);
}

// The vectors j, j + nt, ..., j + (K - 1) nt (elements [VEC*j, VEC*j + VEC) each) with 16-byte loads and
// stores: every load first, then the math and the stores, so that a thread has K 16-byte loads per
// stream outstanding. K = 1: one vector. K = IN_FLIGHT: a multi-tensor block's thread owns 4 float32
// vectors of its chunk; one at a time, each waits for its loads before the next is issued.
// FASTOPT_IN_FLIGHT (cuda_source.IN_FLIGHT, default 1: one at a time) is a variant: 4 raises Adam's
// multi-tensor kernel from 46 to 128 registers on sm_90 (2 blocks per SM instead of 5), and on an H200 it was
// no faster (CUDA graphs of 200-tensor steps: 0.94x at 2^22 elements, 0.99x at 2^27), so 1 stays.
#ifndef FASTOPT_IN_FLIGHT
#define FASTOPT_IN_FLIGHT 1
#endif
enum { IN_FLIGHT = FASTOPT_IN_FLIGHT };
template <int K, class Op>
__device__ __forceinline__ void update_vecs(const Op& op, const Ptrs& a, i64 j, i64 nt) {
    Vec<T, VEC> pv[K];
    Vec<G, VEC> gv[K];  // float32 grads of 16-bit params: two 16-byte loads, as float32 state
    Vec<S, VEC> v0[K], v1[K], v2[K], v3[K];
#pragma unroll
    for (int u = 0; u < K; ++u) {
        const i64 ju = j + u * nt;
        pv[u] = load_vec(a.p, ju);
        gv[u] = load_vec(a.g, ju);
        if (Op::USED & 1) v0[u] = load_vec(a.s0, ju);
        if (Op::USED & 2) v1[u] = load_vec(a.s1, ju);
        if (Op::USED & 4) v2[u] = load_vec(a.s2, ju);
        if (Op::USED & 8) v3[u] = load_vec(a.s3, ju);
    }
#pragma unroll
    for (int u = 0; u < K; ++u) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            M p = load(pv[u].v[k]), x0 = M(0), x1 = M(0), x2 = M(0), x3 = M(0);
            const M p_old = p;
            if (Op::USED & 1) x0 = load(v0[u].v[k]);
            if (Op::USED & 2) x1 = load(v1[u].v[k]);
            if (Op::USED & 4) x2 = load(v2[u].v[k]);
            if (Op::USED & 8) x3 = load(v3[u].v[k]);
            fo_op_call(op, p, load(gv[u].v[k]), x0, x1, x2, x3);
            store_param(a, (j + u * nt) * VEC + k, p_old, p, pv[u].v[k]);
            if (Op::USED & 1) v0[u].v[k] = store<S>(x0);
            if (Op::USED & 2) v1[u].v[k] = store<S>(x1);
            if (Op::USED & 4) v2[u].v[k] = store<S>(x2);
            if (Op::USED & 8) v3[u].v[k] = store<S>(x3);
        }
        const i64 ju = j + u * nt;
        store_vec(a.p, ju, pv[u]);
        if (Op::USED & 1) store_vec(a.s0, ju, v0[u]);
        if (Op::USED & 2) store_vec(a.s1, ju, v1[u]);
        if (Op::USED & 4) store_vec(a.s2, ju, v2[u]);
        if (Op::USED & 8) store_vec(a.s3, ju, v3[u]);
    }
}

// Elements [begin, end), thread t of nt. vec requires begin % VEC == 0 and aligned pointers. GROUPED: a
// multi-tensor block's threads take IN_FLIGHT vectors at a time; the single-array kernel's grid gives
// each thread one vector (and keeps its registers: no grouped path compiled in).
template <bool GROUPED, class Op>
__device__ __forceinline__ void update_range(const Op& op, const Ptrs& a, i64 begin, i64 end, i64 t, i64 nt,
                                             bool vec) {
    if (vec) {
        const i64 vend = end / VEC;
        i64 j = begin / VEC + t;
        if (GROUPED && IN_FLIGHT > 1)
            for (; j + (IN_FLIGHT - 1) * nt < vend; j += IN_FLIGHT * nt) update_vecs<IN_FLIGHT>(op, a, j, nt);
        for (; j < vend; j += nt) update_vecs<1>(op, a, j, nt);
        begin = vend * VEC;
    }
    for (i64 i = begin + t; i < end; i += nt) update_one(op, a, i);
}

__device__ __forceinline__ Ptrs table_ptrs(const i64* rec, const Scalars& sc) {
    Ptrs a = {reinterpret_cast<T*>(rec[F_P]), reinterpret_cast<const G*>(rec[F_G]),
              reinterpret_cast<S*>(rec[F_S0]), reinterpret_cast<S*>(rec[F_S1]), reinterpret_cast<S*>(rec[F_S2]),
              reinterpret_cast<S*>(rec[F_S3]), reinterpret_cast<T*>(rec[F_C]), unsigned(sc.key), i64(sc.index0)};
    return a;
}

template <class Op>
__device__ __forceinline__ void single_kernel(T* p, const G* g, S* s0, S* s1, S* s2, S* s3, i64 n,
                                              const Scalars& sc, const void* gs, int gs_kind, int vec,
                                              const unsigned char* skip, const double* at) {
    if (skipped(skip)) return;
    const Op op = make_op<Op>(sc, gs, gs_kind, at);
    const Ptrs a = {p, g, s0, s1, s2, s3, nullptr, unsigned(sc.key), i64(sc.index0)};  // Kahan: the table path
    update_range<false>(op, a, 0, n, i64(blockIdx.x) * blockDim.x + threadIdx.x, i64(gridDim.x) * blockDim.x,
                        vec != 0);
}

template <class Op>
__device__ __forceinline__ void multi_kernel(const i64* tensors, const i64* chunks, const Scalars& sc,
                                             const void* gs, int gs_kind, const unsigned char* skip,
                                             const double* at) {
    if (skipped(skip)) return;
    const Op op = make_op<Op>(sc, gs, gs_kind, at);
    const ChunkRange r = chunk_range(tensors, chunks);
    update_range<true>(op, table_ptrs(r.rec, sc), r.begin, r.end, threadIdx.x, blockDim.x, r.rec[F_VEC] != 0);
}

// A family whose functor reads one number per tensor (Op::coef: LARS's trust ratio, spec.tensor_coefs):
// coefs[t] for the tensor of this block's chunk, computed by the launcher between a norms pass and this.
template <class Op>
__device__ __forceinline__ void multi_kernel_coef(const i64* tensors, const i64* chunks, const Scalars& sc,
                                                  const void* gs, int gs_kind, const unsigned char* skip,
                                                  const double* coefs, const double* at) {
    if (skipped(skip)) return;
    const ChunkRange r = chunk_range(tensors, chunks);
    Op op = make_op<Op>(sc, gs, gs_kind, at);
    op.coef = M(coefs[r.tensor]);
    update_range<true>(op, table_ptrs(r.rec, sc), r.begin, r.end, threadIdx.x, blockDim.x, r.rec[F_VEC] != 0);
}

// ---- 8-bit state (FASTOPT_STATE 4: state_dtype="int8", precision.QuantizedState) ----
// One block per chunk of a tensor (FASTOPT_CHUNK elements: whole 256-element quantization blocks, since chunks
// start at multiples of FASTOPT_CHUNK). Thread t takes groups of Q8_GROUP consecutive elements, t, t + BLOCK, ...
// (a row each), so every warp-wide load reads contiguous memory and a quantization block (64 groups) is two
// whole warps of one row. Per row: the params, grads and codes loaded, the states dequantized (map[code] *
// absmax), the family's float32 math, the new param stored; then per state and quantization block the absmax
// (the largest |x| bit pattern, NaN above every number: warp shuffles, then the block's warps through shared
// memory) and the codes (x / absmax through fo_quantize with the host's tables): fo_quantize_block's bits, so
// the codes and scales equal the CPU loops' and the NumPy reference's.
enum { Q8_GROUP = 4, Q8_ROWS = FASTOPT_CHUNK / (Q8_GROUP * FASTOPT_BLOCK), Q8_WARPS = FASTOPT_BLOCK / 32,
       Q8_WARPS_PER_QBLOCK = FO_QUANT_BLOCK / Q8_GROUP / 32 };
static_assert(FASTOPT_CHUNK % (Q8_GROUP * FASTOPT_BLOCK) == 0, "an 8-bit chunk is whole rows of groups");
static_assert(FO_QUANT_BLOCK % (Q8_GROUP * 32) == 0, "a quantization block is whole warps of a row");
static_assert(FASTOPT_BLOCK % (FO_QUANT_BLOCK / Q8_GROUP) == 0, "a row is whole quantization blocks");
static_assert(FASTOPT_BLOCK >= 256, "the maps (256 entries) are copied to shared memory by one pass of the block");

// One row's group of a thread: its params, grads and codes as loaded, where it starts and how many of its
// Q8_GROUP elements exist (the tensor's tail), and whether it moves by whole vectors.
struct Q8Row {
    Vec<T, Q8_GROUP> p;
    Vec<G, Q8_GROUP> g;
    Vec<unsigned char, Q8_GROUP> c[4];  // the codes of s0-s2 and a fourth state (Adan's)
    i64 i0;
    int valid;
    bool whole;
};

template <class Op>
__device__ __forceinline__ void q8_load(Q8Row& w, const Ptrs& a, unsigned char* const* codes, const ChunkRange& r,
                                        int u, bool vec) {
    w.i0 = r.begin + (i64(u) * FASTOPT_BLOCK + threadIdx.x) * Q8_GROUP;  // the group's first element
    const i64 left = r.end - w.i0;
    w.valid = left <= 0 ? 0 : (left < Q8_GROUP ? int(left) : int(Q8_GROUP));
    w.whole = vec && w.valid == Q8_GROUP;
    if (w.whole) {
        w.p = reinterpret_cast<const Vec<T, Q8_GROUP>*>(a.p + w.i0)[0];
        w.g = reinterpret_cast<const Vec<G, Q8_GROUP>*>(a.g + w.i0)[0];
#pragma unroll
        for (int k = 0; k < 4; ++k)
            if (Op::USED & (1 << k)) w.c[k] = reinterpret_cast<const Vec<unsigned char, Q8_GROUP>*>(codes[k] + w.i0)[0];
        return;
    }
#pragma unroll
    for (int j = 0; j < Q8_GROUP; ++j) {  // unrolled with a guard: a runtime bound would put w in local memory
        if (j >= w.valid) continue;
        w.p.v[j] = a.p[w.i0 + j];
        w.g.v[j] = a.g[w.i0 + j];
#pragma unroll
        for (int k = 0; k < 4; ++k)
            if (Op::USED & (1 << k)) w.c[k].v[j] = codes[k][w.i0 + j];
    }
}

// The row's update: the states dequantized (map[code] * the block's absmax), the family's math, the new params
// stored by the module's rounding; x: the new states (0 beyond the tail), quantized once the absmax is known.
template <class Op>
__device__ __forceinline__ void q8_update(Q8Row& w, const Op& op, const Ptrs& a, float* const* absmax,
                                          const float* const* map, float (*x)[Q8_GROUP]) {
    float scale[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int k = 0; k < 4; ++k)
        if ((Op::USED & (1 << k)) && w.valid > 0) scale[k] = absmax[k][w.i0 / FO_QUANT_BLOCK];
#pragma unroll
    for (int j = 0; j < Q8_GROUP; ++j) {
        x[0][j] = x[1][j] = x[2][j] = x[3][j] = 0.0f;
        if (j >= w.valid) continue;
        M p = load(w.p.v[j]), s[4] = {M(0), M(0), M(0), M(0)};
        const M p_old = p;
#pragma unroll
        for (int k = 0; k < 4; ++k)
            if (Op::USED & (1 << k)) s[k] = fo_dequantize(w.c[k].v[j], scale[k], map[k]);
        fo_op_call(op, p, load(w.g.v[j]), s[0], s[1], s[2], s[3]);
        store_param(a, w.i0 + j, p_old, p, w.p.v[j]);
#pragma unroll
        for (int k = 0; k < 4; ++k) x[k][j] = float(s[k]);
    }
    if (w.whole) {
        reinterpret_cast<Vec<T, Q8_GROUP>*>(a.p + w.i0)[0] = w.p;
    } else {
#pragma unroll
        for (int j = 0; j < Q8_GROUP; ++j)
            if (j < w.valid) a.p[w.i0 + j] = w.p.v[j];
    }
}

// Rows whose loads a thread issues before it updates any of them (FASTOPT_IN_FLIGHT, as the other multi-tensor
// kernels take it: 1 one row at a time; up to Q8_ROWS): the table's pointers may alias as far as the compiler
// knows, so a row's loads are not moved above the previous row's stores by themselves.
enum { Q8_IN_FLIGHT = IN_FLIGHT < 1 ? 1 : (IN_FLIGHT > Q8_ROWS ? int(Q8_ROWS) : int(IN_FLIGHT)) };
static_assert(Q8_ROWS % Q8_IN_FLIGHT == 0, "rows in flight divide a chunk's rows");

template <class Op, bool COEF>
__device__ __forceinline__ void q8_kernel(const i64* tensors, const i64* chunks, const Scalars& sc, const void* gs,
                                          int gs_kind, const double* coefs, const float* maps, const float* mids,
                                          const unsigned char* buckets, int signed_mask, const unsigned char* skip,
                                          const double* at) {
    __shared__ float smap[2][256], smid[2][256];       // row 0 the unsigned map, row 1 the signed one
    __shared__ unsigned stop[4][Q8_ROWS][Q8_WARPS];     // each warp's largest |x| bits per state and row
    if (skipped(skip)) return;
    for (int k = threadIdx.x; k < 256; k += FASTOPT_BLOCK) {
        smap[0][k] = maps[k];
        smap[1][k] = maps[256 + k];
        smid[0][k] = mids[k];
        smid[1][k] = mids[256 + k];
    }
    const ChunkRange r = chunk_range(tensors, chunks);
    Op op = make_op<Op>(sc, gs, gs_kind, at);
    if constexpr (COEF) op.coef = M(coefs[r.tensor]);
    const Ptrs a = table_ptrs(r.rec, sc);  // p, g, the Kahan compensation, the rounding key and index0
    unsigned char* codes[4];  // s0-s2 and a fourth state (Adan's: F_S3, its scales F_A3)
    float* absmax[4];
    const float* map[4];
    int row[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        codes[k] = reinterpret_cast<unsigned char*>(r.rec[k < 3 ? F_S0 + k : F_S3]);
        absmax[k] = reinterpret_cast<float*>(r.rec[k < 3 ? F_A0 + k : F_A3]);
        row[k] = (signed_mask >> k) & 1;
        map[k] = smap[row[k]];
    }
    const bool vec = r.rec[F_VEC] != 0;
    __syncthreads();  // the maps are in shared memory
    float x[4][Q8_ROWS][Q8_GROUP];
    int valid[Q8_ROWS];
#pragma unroll
    for (int u0 = 0; u0 < Q8_ROWS; u0 += Q8_IN_FLIGHT) {
        Q8Row w[Q8_IN_FLIGHT];
#pragma unroll
        for (int v = 0; v < Q8_IN_FLIGHT; ++v) q8_load<Op>(w[v], a, codes, r, u0 + v, vec);
#pragma unroll
        for (int v = 0; v < Q8_IN_FLIGHT; ++v) {
            float xs[4][Q8_GROUP];
            q8_update(w[v], op, a, absmax, map, xs);
            valid[u0 + v] = w[v].valid;
#pragma unroll
            for (int k = 0; k < 4; ++k)
#pragma unroll
                for (int j = 0; j < Q8_GROUP; ++j) x[k][u0 + v][j] = xs[k][j];
        }
    }
    // the absmax of each quantization block: the largest |x| bit pattern of its elements (the tail's missing
    // elements count as 0), per warp by shuffles, then across the block's warps in shared memory
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        if (!(Op::USED & (1 << k))) continue;
#pragma unroll
        for (int u = 0; u < Q8_ROWS; ++u) {
            fo_u32 top = 0;
#pragma unroll
            for (int j = 0; j < Q8_GROUP; ++j) {
                const fo_u32 b = fo_float_bits(x[k][u][j]) & 0x7fffffffu;
                top = b > top ? b : top;
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                const fo_u32 other = __shfl_xor_sync(0xffffffffu, top, o);
                top = other > top ? other : top;
            }
            if (lane == 0) stop[k][u][warp] = top;
        }
    }
    __syncthreads();
    const int first_warp = warp - warp % Q8_WARPS_PER_QBLOCK;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        if (!(Op::USED & (1 << k))) continue;
        const FoQuantizer q = {smid[row[k]], buckets + 65536 * row[k]};
#pragma unroll
        for (int u = 0; u < Q8_ROWS; ++u) {
            if (valid[u] == 0) continue;
            const i64 i0 = r.begin + (i64(u) * FASTOPT_BLOCK + threadIdx.x) * Q8_GROUP;
            fo_u32 top = 0;
#pragma unroll
            for (int w = 0; w < Q8_WARPS_PER_QBLOCK; ++w) {
                const fo_u32 b = stop[k][u][first_warp + w];
                top = b > top ? b : top;
            }
            const float am = fo_bits_float(top);
            const float scale = am > 0.0f ? am : 1.0f;  // an all-zero block: every code is zero's (as on the CPU)
            if (i0 % FO_QUANT_BLOCK == 0) absmax[k][i0 / FO_QUANT_BLOCK] = am;
            Vec<unsigned char, Q8_GROUP> cv;
#pragma unroll
            for (int j = 0; j < Q8_GROUP; ++j) cv.v[j] = fo_quantize(x[k][u][j] / scale, q);
            if (vec && valid[u] == Q8_GROUP) {
                reinterpret_cast<Vec<unsigned char, Q8_GROUP>*>(codes[k] + i0)[0] = cv;
            } else {
#pragma unroll
                for (int j = 0; j < Q8_GROUP; ++j)
                    if (j < valid[u]) codes[k][i0 + j] = cv.v[j];
            }
        }
    }
}

}  // namespace dev
}  // namespace fastopt

// KIND (the CPU kind) is unused here: the rows of families.cuh are shared with the CPU loops. s3 is a fourth
// state (Adan's; NULL for the others, which never read it).
#define FO_UPDATE_ENTRIES(KIND, FAMILY, OP, V)                                                              \
    extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK)                                             \
        fo_##FAMILY##_v##V(fastopt::dev::T* p, const fastopt::dev::G* g, fastopt::dev::S* s0,               \
                           fastopt::dev::S* s1, fastopt::dev::S* s2, fastopt::dev::S* s3, long long n,      \
                           fastopt::dev::Scalars sc, const void* gs, int gs_kind, int vec,                  \
                           const unsigned char* skip, const double* at) {                                   \
        fastopt::dev::single_kernel<fastopt::OP<fastopt::dev::M, V> >(p, g, s0, s1, s2, s3, n, sc, gs,      \
                                                                      gs_kind, vec, skip, at);             \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK)                                             \
        fo_##FAMILY##_v##V##_multi(const long long* tensors, const long long* chunks,                       \
                                   fastopt::dev::Scalars sc, const void* gs, int gs_kind,                   \
                                   const unsigned char* skip, const double* at) {                           \
        fastopt::dev::multi_kernel<fastopt::OP<fastopt::dev::M, V> >(tensors, chunks, sc, gs, gs_kind, skip,  \
                                                                     at);                                   \
    }

// A family that reads one number per tensor (spec.tensor_coefs: LARS): only the multi-tensor entry (the
// launcher sends a single array through it too), with the per-tensor numbers last.
#define FO_PER_TENSOR_ENTRIES(KIND, FAMILY, OP, V)                                                          \
    extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK)                                             \
        fo_##FAMILY##_v##V##_multi(const long long* tensors, const long long* chunks,                       \
                                   fastopt::dev::Scalars sc, const void* gs, int gs_kind,                   \
                                   const unsigned char* skip, const double* coefs, const double* at) {      \
        fastopt::dev::multi_kernel_coef<fastopt::OP<fastopt::dev::M, V> >(tensors, chunks, sc, gs, gs_kind,  \
                                                                          skip, coefs, at);                 \
    }

// A family's variant with 8-bit state (the int8 modules): the multi-tensor entry only (one array goes through
// it too). COEF: the functor reads a number per tensor (tensor_coefs[t]: LARS; NULL otherwise). maps, mids:
// the unsigned then the signed dynamic map and quantizer midpoints (256 float32 each), buckets their 65536-entry
// bucket tables (precision.quantizer_tables); bit k of signed_mask: state k takes the signed map.
#define FO_INT8_ENTRIES(KIND, FAMILY, OP, V, COEF)                                                         \
    extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK)                                             \
        fo_##FAMILY##_v##V##_q8(const long long* tensors, const long long* chunks, fastopt::dev::Scalars sc, \
                                const void* gs, int gs_kind, const double* tensor_coefs, const float* maps,  \
                                const float* mids, const unsigned char* buckets, int signed_mask,            \
                                const unsigned char* skip, const double* at) {                               \
        fastopt::dev::q8_kernel<fastopt::OP<fastopt::dev::M, V>, COEF>(tensors, chunks, sc, gs, gs_kind,     \
                                                                       tensor_coefs, maps, mids, buckets,    \
                                                                       signed_mask, skip, at);               \
    }

// ---- Two-phase families (spec.two_phase: LAMB), around a per-tensor reduction, all on the device ----
//   fo_<family>_moments_multi: new states; per block: sum of p^2 and u^2 (float64) -> partials[2 * block]
//   fo_<family>_trust:         per tensor (one block each): sum its blocks' partials in order,
//                              scaled_lr[t] = lr * trust ratio (float64, as the CPU loop)
//   fo_<family>_apply_multi:   p -= scaled_lr[t] * u, u recomputed from the new states (same bits)
// The family's <family>.cuh provides PARAMS<M>, <family>_moments_math (returns u), <family>_apply_math and
// <family>_trust_ratio. With a set skip flag the moments kernel writes zero partials (so the trust kernel
// reads only written memory) and touches nothing else; the apply kernel returns at once: params and
// states keep their bytes.
#define FO_TWO_PHASE_ENTRIES(FAMILY, PARAMS)                                                                 \
    extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK)                                              \
        fo_##FAMILY##_moments_multi(const long long* tensors, const long long* chunks,                       \
                                    fastopt::dev::Scalars sc, const void* gs, int gs_kind, double* partials, \
                                    const unsigned char* skip, const double* at) {                           \
        using namespace fastopt;                                                                             \
        using namespace fastopt::dev;                                                                        \
        __shared__ double shared[FASTOPT_BLOCK];                                                             \
        if (skipped(skip)) { /* the whole block: block_sum's barriers stay uniform */                        \
            if (threadIdx.x == 0) {                                                                          \
                partials[2 * i64(blockIdx.x)] = 0.0;                                                         \
                partials[2 * i64(blockIdx.x) + 1] = 0.0;                                                     \
            }                                                                                                \
            return;                                                                                          \
        }                                                                                                    \
        PARAMS<M> h = load_scalars<PARAMS<M>, M>(sc, at);                                                    \
        if (gs_kind != 0) h.grad_scale = h.grad_scale * device_scale(gs, gs_kind);                           \
        const ChunkRange r = chunk_range(tensors, chunks);                                                   \
        const Ptrs a = table_ptrs(r.rec, sc);                                                                \
        double pp = 0.0, uu = 0.0;                                                                           \
        for (i64 i = r.begin + threadIdx.x; i < r.end; i += blockDim.x) {                                    \
            const M p = load(a.p[i]);                                                                        \
            M s0 = load(a.s0[i]), s1 = load(a.s1[i]);                                                        \
            const double u = double(FAMILY##_moments_math<M>(p, load(a.g[i]), s0, s1, h));                   \
            a.s0[i] = store<S>(s0);                                                                          \
            a.s1[i] = store<S>(s1);                                                                          \
            pp += double(p) * double(p);                                                                     \
            uu += u * u;                                                                                     \
        }                                                                                                    \
        pp = block_sum(pp, shared);                                                                          \
        uu = block_sum(uu, shared);                                                                          \
        if (threadIdx.x == 0) {                                                                              \
            partials[2 * i64(blockIdx.x)] = pp;                                                              \
            partials[2 * i64(blockIdx.x) + 1] = uu;                                                          \
        }                                                                                                    \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK)                                              \
        fo_##FAMILY##_trust(const long long* tensors, const double* partials, double lr, double* scaled_lr,  \
                            const double* lr_at) { /* lr_at: the lr on the device (capturable), else NULL */ \
        using namespace fastopt;                                                                             \
        using namespace fastopt::dev;                                                                        \
        __shared__ double shared[FASTOPT_BLOCK];                                                             \
        const i64* rec = tensors + i64(TENSOR_FIELDS) * blockIdx.x;                                          \
        const i64 first = rec[F_FIRST];                                                                      \
        const i64 nchunks = (rec[F_N] + FASTOPT_CHUNK - 1) / FASTOPT_CHUNK;                                  \
        double pp = 0.0, uu = 0.0;                                                                           \
        for (i64 c = threadIdx.x; c < nchunks; c += blockDim.x) {                                            \
            pp += partials[2 * (first + c)];                                                                 \
            uu += partials[2 * (first + c) + 1];                                                             \
        }                                                                                                    \
        pp = block_sum(pp, shared);                                                                          \
        uu = block_sum(uu, shared);                                                                          \
        if (threadIdx.x == 0)                                                                                \
            scaled_lr[blockIdx.x] = (lr_at != nullptr ? *lr_at : lr) * FAMILY##_trust_ratio<double>(sqrt(pp),  \
                                                                                               sqrt(uu));   \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK)                                              \
        fo_##FAMILY##_apply_multi(const long long* tensors, const long long* chunks,                         \
                                  fastopt::dev::Scalars sc, const double* scaled_lr,                         \
                                  const unsigned char* skip, const double* at) {                             \
        using namespace fastopt;                                                                             \
        using namespace fastopt::dev;                                                                        \
        if (skipped(skip)) return; /* the trust kernel ran on zero partials: its output is not used */       \
        const PARAMS<M> h = load_scalars<PARAMS<M>, M>(sc, at); /* grad_scale unused in phase 2 */           \
        const ChunkRange r = chunk_range(tensors, chunks);                                                   \
        const Ptrs a = table_ptrs(r.rec, sc);                                                                \
        const M lr = M(scaled_lr[r.tensor]);                                                                 \
        for (i64 i = r.begin + threadIdx.x; i < r.end; i += blockDim.x) {                                    \
            M p = load(a.p[i]);                                                                              \
            const M p_old = p;                                                                               \
            FAMILY##_apply_math<M>(p, load(a.s0[i]), load(a.s1[i]), h, lr);                                  \
            store_param(a, i, p_old, p, a.p[i]); /* the module's rounding (Kahan: the c column) */           \
        }                                                                                                    \
    }

// Every family and variant of the registry (fastopt/specs.py `kernel`, `variants`, `two_phase`): the
// generated table families.cuh includes each <family>.cuh and invokes FO_UPDATE_ENTRIES once per variant
// and FO_TWO_PHASE_ENTRIES once per two-phase family, or in an 8-bit state module FO_INT8_ENTRIES once per
// variant of the families that take 8-bit state.
#if FASTOPT_STATE == 4  // an 8-bit state module: its _q8 entries only (cuda_source.kernel_names(key))
#undef FO_UPDATE_ENTRIES
#undef FO_PER_TENSOR_ENTRIES
#undef FO_TWO_PHASE_ENTRIES
#else
#undef FO_INT8_ENTRIES
#endif
#include "families.cuh"
