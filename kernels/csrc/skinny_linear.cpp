// fp32 linear on x86 CPUs (AVX2 + FMA): y[M, N] = x[M, K] @ w[N, K]^T for any M. Each thread
// streams its share of weight rows and applies every row of a tile of x to them (the tile stays
// in L2), so a decode step reads the weights once. Rows of x go in blocks of up to 6 (templated
// so the 2 x MR accumulators stay in registers). Every output element is one thread's sum over
// k in the same order whatever M is: a row's result does not depend on the rest of the batch.
#include <torch/extension.h>
#include <immintrin.h>
#include <algorithm>
static inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi); __m128 sh = _mm_movehdup_ps(lo); __m128 s = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, s); s = _mm_add_ss(s, sh); return _mm_cvtss_f32(s);
}
template <int MR>
static inline void rows_block(const float* xp, const float* w0, const float* w1, bool two,
                             int64_t K, int64_t K8, float* yp, int64_t N, int64_t n) {
  __m256 a0[MR], a1[MR];
  for (int r = 0; r < MR; r++) { a0[r] = _mm256_setzero_ps(); a1[r] = _mm256_setzero_ps(); }
  for (int64_t k = 0; k < K8; k += 8) {
    const __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k);
    for (int r = 0; r < MR; r++) {
      const __m256 xv = _mm256_loadu_ps(xp + r * K + k);
      a0[r] = _mm256_fmadd_ps(v0, xv, a0[r]);
      a1[r] = _mm256_fmadd_ps(v1, xv, a1[r]);
    }
  }
  for (int r = 0; r < MR; r++) {
    float s0 = hsum(a0[r]), s1 = hsum(a1[r]);
    const float* xr = xp + r * K;
    for (int64_t k = K8; k < K; k++) { s0 += w0[k] * xr[k]; s1 += w1[k] * xr[k]; }
    yp[r * N + n] = s0;
    if (two) yp[r * N + n + 1] = s1;
  }
}
torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32, "fp32 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.dim() == 2 && w.dim() == 2 &&
              x.size(1) == w.size(1), "x [M, K] and w [N, K], contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>(); const float* wp = w.data_ptr<float>(); float* yp = y.data_ptr<float>();
  const int64_t K8 = K - K % 8;
  const int64_t tile = std::max<int64_t>(6, (1 << 16) / K / 6 * 6);  // about 256 KB of x
  for (int64_t t0 = 0; t0 < M; t0 += tile) {
    const int64_t tm = std::min(tile, M - t0);
    const float* xt = xp + t0 * K; float* yt = yp + t0 * N;
    at::parallel_for(0, (N + 1) / 2, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t n = 2 * lo; n < std::min(N, 2 * hi); n += 2) {  // 2 weight rows share x loads
        const bool two = n + 1 < N;
        const float* w0 = wp + n * K; const float* w1 = two ? w0 + K : w0;
        int64_t m0 = 0;
        for (; m0 + 6 <= tm; m0 += 6)
          rows_block<6>(xt + m0 * K, w0, w1, two, K, K8, yt + m0 * N, N, n);
        switch (tm - m0) {
          case 5: rows_block<5>(xt + m0 * K, w0, w1, two, K, K8, yt + m0 * N, N, n); break;
          case 4: rows_block<4>(xt + m0 * K, w0, w1, two, K, K8, yt + m0 * N, N, n); break;
          case 3: rows_block<3>(xt + m0 * K, w0, w1, two, K, K8, yt + m0 * N, N, n); break;
          case 2: rows_block<2>(xt + m0 * K, w0, w1, two, K, K8, yt + m0 * N, N, n); break;
          case 1: rows_block<1>(xt + m0 * K, w0, w1, two, K, K8, yt + m0 * N, N, n); break;
          default: break;
        }
      }
    });
  }
  return y;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skinny_linear", &skinny_linear, "y = x @ w.T for fp32 x (AVX2/FMA), any number of rows");
}
