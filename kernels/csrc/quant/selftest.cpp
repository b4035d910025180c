// Torch-free self-test of a SIMD backend against the portable dequantisation: random valid
// blocks of every format, activations quantized as the kernels quantize them, results compared
// to float rounding. Built and run by tests/kernels/test_quant_selftest.py: natively, and for
// aarch64 with a cross compiler under qemu-user (so the NEON path is tested on x86 CI).
// Usage: selftest avx2|neon ; exit status 0 when every case passes.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>
#include "blocks.h"

using namespace pq;

static uint16_t to_fp16(float f) {  // normal range only, round toward zero: enough for scales
  uint32_t b; std::memcpy(&b, &f, 4);
  const uint32_t sign = (b >> 16) & 0x8000; const int e = (int)((b >> 23) & 0xff) - 127 + 15;
  if (e <= 0) return (uint16_t)sign;
  return (uint16_t)(sign | (e << 10) | ((b >> 13) & 0x3ff));
}

static void put16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }

// random bytes are valid blocks once their fp16 scale fields hold sane values
static std::vector<uint8_t> random_rows(int fmt, int64_t n, int64_t k, std::mt19937& rng) {
  int64_t elems, bytes; block_shape(fmt, &elems, &bytes);
  std::vector<uint8_t> w(n * k / elems * bytes);
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> scale(0.002f, 0.05f), val(-1.f, 1.f);
  for (auto& b : w) b = (uint8_t)byte(rng);
  for (int64_t i = 0; i < n * k / elems; i++) {
    uint8_t* b = w.data() + i * bytes;
    switch (fmt) {
      case Q4_0: case Q5_0: case Q8_0: put16(b, to_fp16(scale(rng))); break;
      case Q4_K: case Q5_K: put16(b, to_fp16(scale(rng))); put16(b + 2, to_fp16(scale(rng))); break;
      case Q6_K: put16(b + 208, to_fp16(scale(rng))); break;
      case F16: put16(b, to_fp16(val(rng))); break;
      case BF16: { float f = val(rng); uint32_t u; std::memcpy(&u, &f, 4); put16(b, (uint16_t)(u >> 16)); break; }
      default: break;
    }
  }
  return w;
}

int main(int argc, char** argv) {
  const std::string backend = argc > 1 ? argv[1] : "avx2";
  if ((backend == "avx2" && !cpu_has_avx2()) || (backend == "neon" && !cpu_has_neon_dot())) {
    std::printf("backend %s: not supported by this CPU\n", backend.c_str());
    return 2;
  }
  std::mt19937 rng(7);
  int passed = 0, failed = 0;
  const int fmts[] = {Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K, F16, BF16};
  for (int fmt : fmts) {
    const bool kq = fmt == Q4_K || fmt == Q5_K || fmt == Q6_K, half = fmt == F16 || fmt == BF16;
    const int64_t K = kq ? 512 : half ? 100 : 352, N = 37;
    int64_t elems, bytes; block_shape(fmt, &elems, &bytes);
    const int64_t rb = K / elems * bytes;
    auto w = random_rows(fmt, N, K, rng);
    for (int64_t M : {1, 2, 3, 4, 5, 8, 13}) {
      std::vector<float> x(M * K), y(M * N), ref(M * N), xd(M * K), row(K);
      std::normal_distribution<float> nd;
      for (auto& v : x) v = nd(rng);
      const int64_t block = kq ? 256 : 32;
      std::vector<int8_t> q(M * K); std::vector<float> d(M * K / 32 + 1);
      std::vector<int16_t> bs(M * K / 16 + 1);
      QX qx; qx.xf = x.data(); qx.M = M; qx.K = K;
      if (!half) {
        quantize_acts(x.data(), M * K / block, block, q.data(), d.data(), bs.data());
        if (kq) { qx.qk = q.data(); qx.dk = d.data(); qx.bsum = bs.data(); }
        else { qx.q32 = q.data(); qx.d32 = d.data(); }
        for (int64_t i = 0; i < M * K; i++) xd[i] = q[i] * d[i / block];  // what the kernel sees
      } else {
        xd = x;
      }
      const bool ok = backend == "avx2" ? gemm_avx2(fmt, w.data(), rb, 0, N, qx, y.data(), N)
                                        : gemm_neon(fmt, w.data(), rb, 0, N, qx, y.data(), N);
      float worst = 0.f, scale = 1e-6f;
      for (int64_t n = 0; n < N; n++) {
        dequant_row(fmt, w.data() + n * rb, row.data(), K);
        for (int64_t m = 0; m < M; m++) {
          double s = 0;
          for (int64_t k = 0; k < K; k++) s += (double)row[k] * xd[m * K + k];
          ref[m * N + n] = (float)s;
          scale = std::fmax(scale, std::fabs((float)s));
        }
      }
      for (int64_t i = 0; i < M * N; i++) worst = std::fmax(worst, std::fabs(y[i] - ref[i]));
      const bool good = ok && worst <= 1e-4f * scale + 1e-4f;
      good ? passed++ : failed++;
      if (!good) std::printf("FAIL fmt=%d M=%lld: max |diff| %g of %g\n", fmt, (long long)M, worst, scale);
    }
  }
  std::printf("%s: %d passed, %d failed\n", backend.c_str(), passed, failed);
  return failed ? 1 : 0;
}
