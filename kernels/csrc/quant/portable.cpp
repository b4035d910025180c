// Portable C++ for every format: row dequantisation (prefill tiles, embedding rows, the tests'
// bridge to the torch reference) and a dequantise-then-dot GEMM used where no SIMD backend
// handles a format. Mirrors ggml's dequantize_row_* bit for bit.
#include "blocks.h"
#include <algorithm>
#include <cmath>
#include <vector>
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

namespace pq {

static void deq_q8_0(const uint8_t* b, float* y) {
  const float d = load_fp16(b);
  for (int i = 0; i < 32; i++) y[i] = d * (float)(int8_t)b[2 + i];
}
static void deq_q4_0(const uint8_t* b, float* y) {
  const float d = load_fp16(b); const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; j++) {
    y[j] = d * (float)((qs[j] & 0xF) - 8); y[j + 16] = d * (float)((qs[j] >> 4) - 8);
  }
}
static void deq_q5_0(const uint8_t* b, float* y) {
  const float d = load_fp16(b); uint32_t qh; std::memcpy(&qh, b + 2, 4); const uint8_t* qs = b + 6;
  for (int j = 0; j < 16; j++) {
    const int h0 = ((qh >> j) << 4) & 0x10, h1 = (qh >> (j + 12)) & 0x10;
    y[j] = d * (float)(((qs[j] & 0xF) | h0) - 16);
    y[j + 16] = d * (float)(((qs[j] >> 4) | h1) - 16);
  }
}
static void deq_q4_k(const uint8_t* b, float* y) {
  const float d = load_fp16(b), dmin = load_fp16(b + 2);
  uint8_t sc[8], mn[8]; scales_k4(b + 4, sc, mn);
  const uint8_t* q = b + 16;
  for (int c = 0; c < 4; c++, q += 32) {
    const float d1 = d * sc[2 * c], m1 = dmin * mn[2 * c];
    const float d2 = d * sc[2 * c + 1], m2 = dmin * mn[2 * c + 1];
    for (int l = 0; l < 32; l++) *y++ = d1 * (float)(q[l] & 0xF) - m1;
    for (int l = 0; l < 32; l++) *y++ = d2 * (float)(q[l] >> 4) - m2;
  }
}
static void deq_q5_k(const uint8_t* b, float* y) {
  const float d = load_fp16(b), dmin = load_fp16(b + 2);
  uint8_t sc[8], mn[8]; scales_k4(b + 4, sc, mn);
  const uint8_t* qh = b + 16; const uint8_t* ql = b + 48;
  uint8_t u1 = 1, u2 = 2;
  for (int c = 0; c < 4; c++, ql += 32, u1 <<= 2, u2 <<= 2) {
    const float d1 = d * sc[2 * c], m1 = dmin * mn[2 * c];
    const float d2 = d * sc[2 * c + 1], m2 = dmin * mn[2 * c + 1];
    for (int l = 0; l < 32; l++) *y++ = d1 * (float)((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
    for (int l = 0; l < 32; l++) *y++ = d2 * (float)((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
  }
}
static void deq_q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b; const uint8_t* qh = b + 128;
  const int8_t* sc = (const int8_t*)(b + 192); const float d = load_fp16(b + 208);
  for (int n = 0; n < 256; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
    for (int l = 0; l < 32; l++) {
      const int is = l / 16;
      const int q1 = (int)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = (int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * sc[is] * q1; y[l + 32] = d * sc[is + 2] * q2;
      y[l + 64] = d * sc[is + 4] * q3; y[l + 96] = d * sc[is + 6] * q4;
    }
  }
}

bool dequant_row(int fmt, const uint8_t* src, float* dst, int64_t K) {
  int64_t elems, bytes;
  if (!block_shape(fmt, &elems, &bytes)) return false;
  const int64_t nb = K / elems;
  for (int64_t i = 0; i < nb; i++) {
    const uint8_t* b = src + i * bytes; float* y = dst + i * elems;
    switch (fmt) {
      case F32: std::memcpy(y, b, 4); break;
      case F16: { uint16_t h; std::memcpy(&h, b, 2); *y = fp16_to_fp32(h); break; }
      case BF16: { uint16_t h; std::memcpy(&h, b, 2); *y = bf16_to_fp32(h); break; }
      case Q4_0: deq_q4_0(b, y); break;
      case Q5_0: deq_q5_0(b, y); break;
      case Q8_0: deq_q8_0(b, y); break;
      case Q4_K: deq_q4_k(b, y); break;
      case Q5_K: deq_q5_k(b, y); break;
      case Q6_K: deq_q6_k(b, y); break;
      default: return false;
    }
  }
  return true;
}

bool gemm_portable(int fmt, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1,
                   const QX& x, float* y, int64_t ldy) {
  std::vector<float> row(x.K);
  for (int64_t n = n0; n < n1; n++) {
    if (!dequant_row(fmt, w + n * row_bytes, row.data(), x.K)) return false;
    for (int64_t m = 0; m < x.M; m++) {
      const float* xr = x.xf + m * x.K; float s = 0.f;
      for (int64_t k = 0; k < x.K; k++) s += row[k] * xr[k];
      y[m * ldy + n] = s;
    }
  }
  return true;
}

void quantize_acts(const float* x, int64_t nblocks, int64_t block, int8_t* q, float* d,
                   int16_t* bsum) {
  for (int64_t i = 0; i < nblocks; i++) {
    const float* xb = x + i * block; int8_t* qb = q + i * block;
    float amax = 0.f;
    for (int64_t k = 0; k < block; k++) amax = std::max(amax, std::fabs(xb[k]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    d[i] = amax / 127.f;
    for (int64_t k = 0; k < block; k++) qb[k] = (int8_t)std::nearbyint(xb[k] * inv);
    if (bsum != nullptr)
      for (int64_t g = 0; g < block / 16; g++) {
        int s = 0;
        for (int k = 0; k < 16; k++) s += qb[g * 16 + k];
        bsum[i * (block / 16) + g] = (int16_t)s;
      }
  }
}

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_neon_dot() {
#if defined(__aarch64__) && defined(__linux__)
  return (getauxval(AT_HWCAP) & (1UL << 20)) != 0;  // HWCAP_ASIMDDP: sdot/udot
#elif defined(__aarch64__)
  return true;
#else
  return false;
#endif
}

}  // namespace pq
