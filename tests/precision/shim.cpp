// Array wrappers around kernels/cuda/precision.cuh for tests/test_precision.py (built with the host
// C++ compiler, loaded with ctypes): each applies one header function to every element.
#include "precision.cuh"

using namespace fastopt;

extern "C" {

void to_bf16(const float* x, fo_u16* out, long n) { for (long i = 0; i < n; ++i) out[i] = fo_float_to_bf16(x[i]); }
void from_bf16(const fo_u16* h, float* out, long n) { for (long i = 0; i < n; ++i) out[i] = fo_bf16_to_float(h[i]); }
void to_fp16(const float* x, fo_u16* out, long n) { for (long i = 0; i < n; ++i) out[i] = fo_float_to_fp16(x[i]); }
void from_fp16(const fo_u16* h, float* out, long n) { for (long i = 0; i < n; ++i) out[i] = fo_fp16_to_float(h[i]); }

void to_bf16_sr(const float* x, const fo_u32* r, fo_u16* out, long n) {
    for (long i = 0; i < n; ++i) out[i] = fo_float_to_bf16_sr(x[i], r[i]);
}
void to_fp16_sr(const float* x, const fo_u32* r, fo_u16* out, long n) {
    for (long i = 0; i < n; ++i) out[i] = fo_float_to_fp16_sr(x[i], r[i]);
}

fo_u32 random_key(fo_u64 seed, fo_u64 step) { return fo_random_key(seed, step); }
void random_bits(fo_u32 key, const fo_u64* index, fo_u32* out, long n) {
    for (long i = 0; i < n; ++i) out[i] = fo_random_bits(key, index[i]);
}

void kahan_store(int fp16, const fo_u16* p, const fo_u16* c, const float* p_new, fo_u16* p_out, fo_u16* c_out, long n) {
    for (long i = 0; i < n; ++i) {
        if (fp16) fo_kahan_store<Fp16Format>(fo_fp16_to_float(p[i]), fo_fp16_to_float(c[i]), p_new[i], p_out[i], c_out[i]);
        else fo_kahan_store<Bf16Format>(fo_bf16_to_float(p[i]), fo_bf16_to_float(c[i]), p_new[i], p_out[i], c_out[i]);
    }
}

void quantize_blockwise(const float* x, long n, const float* mid, const unsigned char* bucket, unsigned char* codes,
                        float* absmax) {
    const FoQuantizer q = {mid, bucket};
    for (long start = 0, b = 0; start < n; start += FO_QUANT_BLOCK, ++b) {
        const long len = n - start < FO_QUANT_BLOCK ? n - start : FO_QUANT_BLOCK;
        absmax[b] = fo_quantize_block(x + start, static_cast<unsigned>(len), q, codes + start);
    }
}

// The code of each already-normalized value (the per-element quantizer alone, for every float pattern)
void quantize_normalized(const float* y, long n, const float* mid, const unsigned char* bucket, unsigned char* codes) {
    const FoQuantizer q = {mid, bucket};
    for (long i = 0; i < n; ++i) codes[i] = fo_quantize(y[i], q);
}

void dequantize_blockwise(const unsigned char* codes, const float* absmax, const float* map, float* out, long n) {
    for (long i = 0; i < n; ++i) out[i] = fo_dequantize(codes[i], absmax[i / FO_QUANT_BLOCK], map);
}

}
