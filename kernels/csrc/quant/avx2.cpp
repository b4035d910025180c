// AVX2/FMA/F16C backend: weights are unpacked to int8 in registers and multiplied with int8
// activations (maddubs), as ggml does; the weights of a row are read once per call and applied
// to up to 4 activation rows at a time (x stays in L1). Built into every x86-64 extension
// with a target pragma and chosen at run time (quant_linear.cpp checks the CPU).
#include "blocks.h"
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

namespace pq {
namespace {

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi); __m128 sh = _mm_movehdup_ps(lo); __m128 s = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, s); s = _mm_add_ss(s, sh); return _mm_cvtss_f32(s);
}
inline float h2f(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return _cvtsh_ss(h); }
inline __m256i load(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }
// 16 bytes -> 32 nibbles: the low nibbles are values 0..15, the high ones 16..31
inline __m256i nibbles32(const uint8_t* p) {
  const __m128i t = _mm_loadu_si128((const __m128i*)p);
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0xF));
}
// 32 bits -> 32 bytes, 0xFF where the bit is set
inline __m256i bits32(const uint8_t* p) {
  uint32_t v; std::memcpy(&v, p, 4);
  const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                         0x0101010101010101, 0x0000000000000000);
  __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)v), shuf);
  b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1));
}

// ---- 32-element formats: signed int8 weights, one fp16 scale per block ---------------------
template <int FMT> inline __m256i weights32(const uint8_t* b);
template <> inline __m256i weights32<Q8_0>(const uint8_t* b) { return load(b + 2); }
template <> inline __m256i weights32<Q4_0>(const uint8_t* b) {
  return _mm256_sub_epi8(nibbles32(b + 2), _mm256_set1_epi8(8));
}
template <> inline __m256i weights32<Q5_0>(const uint8_t* b) {  // (nibble | bit << 4) - 16
  const __m256i hi = _mm256_andnot_si256(bits32(b + 2), _mm256_set1_epi8((char)0xF0));
  return _mm256_or_si256(nibbles32(b + 6), hi);
}
template <int FMT> constexpr int64_t block_bytes() {
  return FMT == Q8_0 ? 34 : FMT == Q4_0 ? 18 : 22;
}

template <int FMT, int MR>
void rows_b32(const uint8_t* w, const QX& x, int64_t m0, float* out) {
  const int64_t K = x.K, nb = K / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MR];
  for (int r = 0; r < MR; r++) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* blk = w + b * block_bytes<FMT>();
    const float d = h2f(blk);
    const __m256i q = weights32<FMT>(blk), aq = _mm256_sign_epi8(q, q);
    for (int r = 0; r < MR; r++) {
      const int64_t m = m0 + r;
      const __m256i s = _mm256_sign_epi8(load(x.q32 + m * K + b * 32), q);
      const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aq, s), ones);  // int32 x8
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * x.d32[m * nb + b]),
                               acc[r]);
    }
  }
  for (int r = 0; r < MR; r++) out[r] = hsum(acc[r]);
}

// ---- Q4_K / Q5_K: unsigned 4/5-bit weights, 8 sub-blocks of 32 with 6-bit scale and min ----
// The 12 packed bytes -> 8 scale bytes then 8 min bytes (ggml's utmp shuffle).
inline void unpack_k4(const uint8_t* p, uint8_t out[16]) {
  uint32_t u[4];
  std::memcpy(u, p, 12);
  const uint32_t m1 = 0x3f3f3f3f, m2 = 0x0f0f0f0f, m3 = 0x03030303;
  u[3] = ((u[2] >> 4) & m2) | (((u[1] >> 6) & m3) << 4);
  const uint32_t mins_lo = u[1] & m1;
  u[1] = (u[2] & m2) | (((u[0] >> 6) & m3) << 4);
  u[2] = mins_lo;
  u[0] &= m1;
  std::memcpy(out, u, 16);
}

template <bool FIVE, int MR>
void rows_q45k(const uint8_t* w, const QX& x, int64_t m0, float* out) {
  const int64_t K = x.K, nb = K / 256;
  const __m256i m4 = _mm256_set1_epi8(0xF), one = _mm256_set1_epi8(1);
  __m256 acc[MR], accm[MR];
  for (int r = 0; r < MR; r++) { acc[r] = _mm256_setzero_ps(); accm[r] = _mm256_setzero_ps(); }
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* blk = w + b * (FIVE ? 176 : 144);
    const float d = h2f(blk), dmin = h2f(blk + 2);
    alignas(16) uint8_t sm[16];
    unpack_k4(blk + 4, sm);
    // mins as int16, each twice: [m0 m0 m1 m1 ... m7 m7] against the 16 sums of 16 activations
    const __m128i mn = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i*)(sm + 8)));
    const __m256i mins = _mm256_set_m128i(_mm_unpackhi_epi16(mn, mn), _mm_unpacklo_epi16(mn, mn));
    const uint8_t* qs = blk + (FIVE ? 48 : 16);
    __m256i wv[8];
    for (int c = 0; c < 4; c++) {
      const __m256i q = load(qs + 32 * c);
      wv[2 * c] = _mm256_and_si256(q, m4);
      wv[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
    }
    if (FIVE) {  // the fifth bit of sub-block j is bit j of qh[l]
      const __m256i hb = load(blk + 16);
      for (int j = 0; j < 8; j++)
        wv[j] = _mm256_or_si256(wv[j], _mm256_slli_epi16(
            _mm256_and_si256(_mm256_srli_epi16(hb, j), one), 4));
    }
    for (int r = 0; r < MR; r++) {
      const int64_t m = m0 + r;
      const int8_t* xq = x.qk + m * K + b * 256;
      __m256i sum = _mm256_setzero_si256();
      for (int j = 0; j < 8; j++)
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(
            _mm256_maddubs_epi16(wv[j], load(xq + 32 * j)), _mm256_set1_epi16(sm[j])));
      const float xd = x.dk[m * nb + b];
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(d * xd), acc[r]);
      const __m256i msum = _mm256_madd_epi16(load(x.bsum + m * (K / 16) + b * 16), mins);
      accm[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(msum), _mm256_set1_ps(dmin * xd), accm[r]);
    }
  }
  for (int r = 0; r < MR; r++) out[r] = hsum(_mm256_sub_ps(acc[r], accm[r]));
}

// ---- Q6_K: unsigned 6-bit weights minus 32, int8 scale per 16 ------------------------------
template <int MR>
void rows_q6k(const uint8_t* w, const QX& x, int64_t m0, float* out) {
  const int64_t K = x.K, nb = K / 256;
  const __m256i m4 = _mm256_set1_epi8(0xF), m2 = _mm256_set1_epi8(3);
  __m256 acc[MR];
  for (int r = 0; r < MR; r++) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* blk = w + b * 210;
    const int8_t* sc = (const int8_t*)(blk + 192);
    const float d = h2f(blk + 208);
    __m256i wv[8], scv[8];
    for (int h = 0; h < 2; h++) {  // two halves of 128 values
      const __m256i qa = load(blk + 64 * h), qb = load(blk + 64 * h + 32);
      const __m256i hb = load(blk + 128 + 32 * h);
      const auto hi = [&](int shift) {
        return _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, shift), m2), 4);
      };
      wv[4 * h + 0] = _mm256_or_si256(_mm256_and_si256(qa, m4), hi(0));
      wv[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(qb, m4), hi(2));
      wv[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qa, 4), m4), hi(4));
      wv[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qb, 4), m4), hi(6));
    }
    for (int j = 0; j < 8; j++)  // values 32j..32j+31: scales sc[2j] (first 16), sc[2j+1]
      scv[j] = _mm256_set_m128i(_mm_set1_epi16(sc[2 * j + 1]), _mm_set1_epi16(sc[2 * j]));
    // 32 * scale per 16 values, as int16, against the 16 sums of 16 activations (the -32)
    const __m256i sc32 = _mm256_slli_epi16(
        _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)sc)), 5);
    for (int r = 0; r < MR; r++) {
      const int64_t m = m0 + r;
      const int8_t* xq = x.qk + m * K + b * 256;
      __m256i sum = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_madd_epi16(
          load(x.bsum + m * (K / 16) + b * 16), sc32));
      for (int j = 0; j < 8; j++)
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(
            _mm256_maddubs_epi16(wv[j], load(xq + 32 * j)), scv[j]));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(d * x.dk[m * nb + b]),
                               acc[r]);
    }
  }
  for (int r = 0; r < MR; r++) out[r] = hsum(acc[r]);
}

// ---- F16 / BF16 weights against fp32 activations ----------------------------------------------
template <bool BF, int MR>
void rows_half(const uint8_t* w, const QX& x, int64_t m0, float* out) {
  const int64_t K = x.K, K8 = K - K % 8;
  const uint16_t* wr = (const uint16_t*)w;
  __m256 acc[MR];
  for (int r = 0; r < MR; r++) acc[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K8; k += 8) {
    const __m128i h = _mm_loadu_si128((const __m128i*)(wr + k));
    const __m256 wv = BF ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                         : _mm256_cvtph_ps(h);
    for (int r = 0; r < MR; r++)
      acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.xf + (m0 + r) * K + k), acc[r]);
  }
  for (int r = 0; r < MR; r++) {
    float s = hsum(acc[r]);
    for (int64_t k = K8; k < K; k++)
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

bool gemm_avx2(int fmt, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1,
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
bool gemm_avx2(int, const uint8_t*, int64_t, int64_t, int64_t, const QX&, float*, int64_t) {
  return false;
}
}  // namespace pq
#endif
