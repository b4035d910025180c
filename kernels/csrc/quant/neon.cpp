// NEON backend for aarch64 (Jetson Orin, Raspberry Pi 5: ARMv8.2 with the dot-product
// instructions): weights unpacked to int8 in registers, multiplied with the int8 activations by
// sdot (vdotq_s32), 4 activation rows per pass over a weight row. Compiled with a target pragma
// and used only where the CPU reports ASIMDDP (quant_linear.cpp checks); elsewhere every format
// falls back to the portable path.
#include "blocks.h"
#if defined(__aarch64__)
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod+fp16")
#include <arm_neon.h>

namespace pq {
namespace {

inline int32x4_t dot(int32x4_t acc, int8x16_t a, int8x16_t b) { return vdotq_s32(acc, a, b); }
inline int8x16_t s8(uint8x16_t v) { return vreinterpretq_s8_u8(v); }

// 32 values of a 32-block format as two signed int8x16 halves (values 0..15, 16..31)
template <int FMT> inline void weights32(const uint8_t* b, int8x16_t* lo, int8x16_t* hi);
template <> inline void weights32<Q8_0>(const uint8_t* b, int8x16_t* lo, int8x16_t* hi) {
  *lo = vld1q_s8((const int8_t*)b + 2); *hi = vld1q_s8((const int8_t*)b + 18);
}
template <> inline void weights32<Q4_0>(const uint8_t* b, int8x16_t* lo, int8x16_t* hi) {
  const uint8x16_t q = vld1q_u8(b + 2);
  *lo = vsubq_s8(s8(vandq_u8(q, vdupq_n_u8(0xF))), vdupq_n_s8(8));
  *hi = vsubq_s8(s8(vshrq_n_u8(q, 4)), vdupq_n_s8(8));
}
inline uint8x16_t bit4(uint8_t b0, uint8_t b1) {  // bit e of (b0, b1) -> 0x10 in lane e
  static const uint8_t kMask[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
  const uint8x16_t v = vcombine_u8(vdup_n_u8(b0), vdup_n_u8(b1));
  return vandq_u8(vtstq_u8(v, vld1q_u8(kMask)), vdupq_n_u8(0x10));
}
template <> inline void weights32<Q5_0>(const uint8_t* b, int8x16_t* lo, int8x16_t* hi) {
  const uint8x16_t q = vld1q_u8(b + 6);
  *lo = vsubq_s8(s8(vorrq_u8(vandq_u8(q, vdupq_n_u8(0xF)), bit4(b[2], b[3]))), vdupq_n_s8(16));
  *hi = vsubq_s8(s8(vorrq_u8(vshrq_n_u8(q, 4), bit4(b[4], b[5]))), vdupq_n_s8(16));
}
template <int FMT> constexpr int64_t block_bytes() {
  return FMT == Q8_0 ? 34 : FMT == Q4_0 ? 18 : 22;
}

template <int FMT, int MR>
void rows_b32(const uint8_t* w, const QX& x, int64_t m0, float* out) {
  const int64_t K = x.K, nb = K / 32;
  float32x4_t acc[MR];
  for (int r = 0; r < MR; r++) acc[r] = vdupq_n_f32(0.f);
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* blk = w + b * block_bytes<FMT>();
    const float d = load_fp16(blk);
    int8x16_t lo, hi;
    weights32<FMT>(blk, &lo, &hi);
    for (int r = 0; r < MR; r++) {
      const int8_t* xq = x.q32 + (m0 + r) * K + b * 32;
      const int32x4_t p = dot(dot(vdupq_n_s32(0), lo, vld1q_s8(xq)), hi, vld1q_s8(xq + 16));
      acc[r] = vmlaq_n_f32(acc[r], vcvtq_f32_s32(p), d * x.d32[(m0 + r) * nb + b]);
    }
  }
  for (int r = 0; r < MR; r++) out[r] = vaddvq_f32(acc[r]);
}

template <bool FIVE, int MR>
void rows_q45k(const uint8_t* w, const QX& x, int64_t m0, float* out) {
  const int64_t K = x.K, nb = K / 256;
  float sum[MR];
  for (int r = 0; r < MR; r++) sum[r] = 0.f;
  const uint8x16_t m4 = vdupq_n_u8(0xF), one = vdupq_n_u8(1);
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* blk = w + b * (FIVE ? 176 : 144);
    const float d = load_fp16(blk), dmin = load_fp16(blk + 2);
    uint8_t sc[8], mn[8]; scales_k4(blk + 4, sc, mn);
    const uint8_t* qs = blk + (FIVE ? 48 : 16);
    int8x16_t wv[8][2];
    for (int c = 0; c < 4; c++)
      for (int h = 0; h < 2; h++) {
        const uint8x16_t q = vld1q_u8(qs + 32 * c + 16 * h);
        uint8x16_t lo = vandq_u8(q, m4), hi = vshrq_n_u8(q, 4);
        if (FIVE) {  // sub-block j takes bit j of qh[l]
          const uint8x16_t qh = vld1q_u8(blk + 16 + 16 * h);
          lo = vorrq_u8(lo, vshlq_n_u8(vandq_u8(vshlq_u8(qh, vdupq_n_s8(-2 * c)), one), 4));
          hi = vorrq_u8(hi, vshlq_n_u8(vandq_u8(vshlq_u8(qh, vdupq_n_s8(-2 * c - 1)), one), 4));
        }
        wv[2 * c][h] = s8(lo); wv[2 * c + 1][h] = s8(hi);
      }
    for (int r = 0; r < MR; r++) {
      const int64_t m = m0 + r;
      const int8_t* xq = x.qk + m * K + b * 256;
      int32_t isum = 0, msum = 0;
      const int16_t* bs = x.bsum + m * (K / 16) + b * 16;
      for (int j = 0; j < 8; j++) {
        const int32x4_t p = dot(dot(vdupq_n_s32(0), wv[j][0], vld1q_s8(xq + 32 * j)),
                                wv[j][1], vld1q_s8(xq + 32 * j + 16));
        isum += vaddvq_s32(p) * sc[j];
        msum += mn[j] * (bs[2 * j] + bs[2 * j + 1]);
      }
      const float xd = x.dk[m * nb + b];
      sum[r] += d * xd * (float)isum - dmin * xd * (float)msum;
    }
  }
  for (int r = 0; r < MR; r++) out[r] = sum[r];
}

template <int MR>
void rows_q6k(const uint8_t* w, const QX& x, int64_t m0, float* out) {
  const int64_t K = x.K, nb = K / 256;
  float sum[MR];
  for (int r = 0; r < MR; r++) sum[r] = 0.f;
  const uint8x16_t m4 = vdupq_n_u8(0xF), m2 = vdupq_n_u8(3);
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* blk = w + b * 210;
    const int8_t* sc = (const int8_t*)(blk + 192);
    const float d = load_fp16(blk + 208);
    int8x16_t wv[16];  // 16 groups of 16 values, in order
    for (int h = 0; h < 2; h++)
      for (int e = 0; e < 2; e++) {  // lanes 0..15 / 16..31 of each 32-value row
        const uint8x16_t qa = vld1q_u8(blk + 64 * h + 16 * e);
        const uint8x16_t qb = vld1q_u8(blk + 64 * h + 32 + 16 * e);
        const uint8x16_t hb = vld1q_u8(blk + 128 + 32 * h + 16 * e);
        const auto hi = [&](int shift) {
          return vshlq_n_u8(vandq_u8(vshlq_u8(hb, vdupq_n_s8(-shift)), m2), 4);
        };
        wv[8 * h + 0 + e] = s8(vorrq_u8(vandq_u8(qa, m4), hi(0)));
        wv[8 * h + 2 + e] = s8(vorrq_u8(vandq_u8(qb, m4), hi(2)));
        wv[8 * h + 4 + e] = s8(vorrq_u8(vshrq_n_u8(qa, 4), hi(4)));
        wv[8 * h + 6 + e] = s8(vorrq_u8(vshrq_n_u8(qb, 4), hi(6)));
      }
    for (int r = 0; r < MR; r++) {
      const int64_t m = m0 + r;
      const int8_t* xq = x.qk + m * K + b * 256;
      const int16_t* bs = x.bsum + m * (K / 16) + b * 16;
      int32_t isum = 0;
      for (int g = 0; g < 16; g++)
        isum += sc[g] * (vaddvq_s32(dot(vdupq_n_s32(0), wv[g], vld1q_s8(xq + 16 * g))) -
                         32 * bs[g]);
      sum[r] += d * x.dk[m * nb + b] * (float)isum;
    }
  }
  for (int r = 0; r < MR; r++) out[r] = sum[r];
}

template <bool BF, int MR>
void rows_half(const uint8_t* w, const QX& x, int64_t m0, float* out) {
  const int64_t K = x.K, K4 = K - K % 4;
  const uint16_t* wr = (const uint16_t*)w;
  float32x4_t acc[MR];
  for (int r = 0; r < MR; r++) acc[r] = vdupq_n_f32(0.f);
  for (int64_t k = 0; k < K4; k += 4) {
    const uint16x4_t h = vld1_u16(wr + k);
    const float32x4_t wv = BF ? vreinterpretq_f32_u32(vshll_n_u16(h, 16))
                              : vcvt_f32_f16(vreinterpret_f16_u16(h));
    for (int r = 0; r < MR; r++) acc[r] = vfmaq_f32(acc[r], wv, vld1q_f32(x.xf + (m0 + r) * K + k));
  }
  for (int r = 0; r < MR; r++) {
    float s = vaddvq_f32(acc[r]);
    for (int64_t k = K4; k < K; k++)
      s += (BF ? bf16_to_fp32(wr[k]) : fp16_to_fp32(wr[k])) * x.xf[(m0 + r) * K + k];
    out[r] = s;
  }
}

template <int MR>
bool rows(int fmt, const uint8_t* w, const QX& x, int64_t m0, float* out) {
  switch (fmt) {
    case Q8_0: rows_b32<Q8_0, MR>(w, x, m0, out); return true;
    case Q4_0: rows_b32<Q4_0, MR>(w, x, m0, out); return true;
    case Q5_0: rows_b32<Q5_0, MR>(w, x, m0, out); return true;
    case Q4_K: rows_q45k<false, MR>(w, x, m0, out); return true;
    case Q5_K: rows_q45k<true, MR>(w, x, m0, out); return true;
    case Q6_K: rows_q6k<MR>(w, x, m0, out); return true;
    case F16: rows_half<false, MR>(w, x, m0, out); return true;
    case BF16: rows_half<true, MR>(w, x, m0, out); return true;
    default: return false;
  }
}

}  // namespace

bool gemm_neon(int fmt, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1,
               const QX& x, float* y, int64_t ldy) {
  float out[4];
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* wr = w + n * row_bytes;
    for (int64_t m0 = 0; m0 < x.M; m0 += 4) {
      const int64_t mr = x.M - m0 < 4 ? x.M - m0 : 4;
      const bool ok = mr == 4 ? rows<4>(fmt, wr, x, m0, out)
                    : mr == 3 ? rows<3>(fmt, wr, x, m0, out)
                    : mr == 2 ? rows<2>(fmt, wr, x, m0, out) : rows<1>(fmt, wr, x, m0, out);
      if (!ok) return false;
      for (int64_t r = 0; r < mr; r++) y[(m0 + r) * ldy + n] = out[r];
    }
  }
  return true;
}

}  // namespace pq
#pragma GCC pop_options
#else
namespace pq {
bool gemm_neon(int, const uint8_t*, int64_t, int64_t, int64_t, const QX&, float*, int64_t) {
  return false;
}
}  // namespace pq
#endif
