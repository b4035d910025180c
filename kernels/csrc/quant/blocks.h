// GGUF (ggml) block layouts and the shared interface of pice's quantized matmul backends.
// Torch-free on purpose: the SIMD backends are compiled with target pragmas, and must not
// instantiate torch's inline functions with instructions the CPU may lack.
#pragma once
#include <cstdint>
#include <cstring>

namespace pq {

// ggml type ids (gguf.GGMLQuantizationType), used as the format code everywhere.
enum Fmt : int { F32 = 0, F16 = 1, Q4_0 = 2, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q5_K = 13,
                 Q6_K = 14, BF16 = 30 };

// elements and bytes per block; a row of K elements is K / elems * bytes bytes
inline bool block_shape(int fmt, int64_t* elems, int64_t* bytes) {
  switch (fmt) {
    case F32: *elems = 1; *bytes = 4; return true;
    case F16: case BF16: *elems = 1; *bytes = 2; return true;
    case Q4_0: *elems = 32; *bytes = 18; return true;
    case Q5_0: *elems = 32; *bytes = 22; return true;
    case Q8_0: *elems = 32; *bytes = 34; return true;
    case Q4_K: *elems = 256; *bytes = 144; return true;
    case Q5_K: *elems = 256; *bytes = 176; return true;
    case Q6_K: *elems = 256; *bytes = 210; return true;
    default: return false;
  }
}

inline float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) { bits = sign; }
    else {  // subnormal: normalise
      int e = -1; uint32_t m = man;
      do { e++; m <<= 1; } while ((m & 0x400) == 0);
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((m & 0x3ff) << 13);
    }
  } else if (exp == 31) { bits = sign | 0x7f800000 | (man << 13); }
  else { bits = sign | ((exp + 112) << 23) | (man << 13); }
  float f; std::memcpy(&f, &bits, 4); return f;
}
inline float bf16_to_fp32(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16; float f; std::memcpy(&f, &bits, 4); return f;
}
inline float load_fp16(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return fp16_to_fp32(h); }

// Q4_K / Q5_K: 8 six-bit (scale, min) pairs packed in 12 bytes (ggml get_scale_min_k4)
inline void scales_k4(const uint8_t* q, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 8; j++) {
    if (j < 4) { sc[j] = q[j] & 63; mn[j] = q[j + 4] & 63; }
    else {
      sc[j] = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
      mn[j] = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
  }
}

// Activations of one call, quantized once and shared by every weight segment:
//  q32/d32: int8 per 32-block with a float scale (for Q4_0, Q5_0, Q8_0);
//  qk/dk/bsum: int8 per 256-block with a float scale and int16 sums per 16 (for K-quants);
//  xf: the fp32 activations themselves (F16/BF16 weights and the portable path).
struct QX {
  const float* xf = nullptr;
  const int8_t* q32 = nullptr; const float* d32 = nullptr;
  const int8_t* qk = nullptr; const float* dk = nullptr; const int16_t* bsum = nullptr;
  int64_t M = 0, K = 0;
};

// y[m * ldy + n] = dot(x[m], w[n]) for n in [n0, n1) and every m < x.M; w holds N rows of
// row_bytes each. Each backend returns false for a format it does not handle.
bool gemm_portable(int fmt, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1,
                   const QX& x, float* y, int64_t ldy);
bool gemm_avx2(int fmt, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1,
               const QX& x, float* y, int64_t ldy);
bool gemm_neon(int fmt, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1,
               const QX& x, float* y, int64_t ldy);
// one row of K elements -> fp32
bool dequant_row(int fmt, const uint8_t* src, float* dst, int64_t K);
// activations x [M, K] -> int8 blocks of `block` values with one scale each (amax / 127,
// round to nearest even); with bsum, also the int16 sums of every 16 quantized values
void quantize_acts(const float* x, int64_t nblocks, int64_t block, int8_t* q, float* d,
                   int16_t* bsum);
// the SIMD backends this CPU can run (checked at run time)
bool cpu_has_avx2();
bool cpu_has_neon_dot();

}  // namespace pq
