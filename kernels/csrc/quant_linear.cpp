// Quantized linear layers for CPU inference on GGUF-format weights kept as they are in memory
// (uint8 rows of ggml blocks). Activations are quantized to int8 per row (one scale per block of
// one row), weights unpacked in registers by the best backend this CPU has (chosen at run time).
// Every row count takes the same path and each output row is computed by one thread in a fixed
// order, so a row's result never depends on the other rows of the batch.
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>
#include "quant/blocks.h"

namespace {

using pq::QX;

enum Backend { PORTABLE = 0, AVX2 = 1, NEON = 2 };

int detect_backend() {
  if (pq::cpu_has_avx2()) return AVX2;
  if (pq::cpu_has_neon_dot()) return NEON;
  return PORTABLE;
}

int g_backend = detect_backend();
const char* kNames[] = {"portable", "avx2", "neon"};

std::string backend() { return kNames[g_backend]; }

void set_backend(const std::string& name) {  // tests compare the backends on one machine
  const int best = detect_backend();
  if (name == "portable") { g_backend = PORTABLE; return; }
  TORCH_CHECK(name == kNames[best], "backend ", name, " is not available on this CPU");
  g_backend = best;
}

bool gemm(int fmt, const uint8_t* w, int64_t rb, int64_t n0, int64_t n1, const QX& x, float* y,
          int64_t ldy) {
  if (g_backend == AVX2 && pq::gemm_avx2(fmt, w, rb, n0, n1, x, y, ldy)) return true;
  if (g_backend == NEON && pq::gemm_neon(fmt, w, rb, n0, n1, x, y, ldy)) return true;
  return pq::gemm_portable(fmt, w, rb, n0, n1, x, y, ldy);
}

bool is_k_quant(int fmt) { return fmt == pq::Q4_K || fmt == pq::Q5_K || fmt == pq::Q6_K; }
bool is_b32(int fmt) { return fmt == pq::Q4_0 || fmt == pq::Q5_0 || fmt == pq::Q8_0; }

// x: [M, K] -> int8 blocks (pq::quantize_acts), rows split across threads
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t block, int8_t* q, float* d,
                   int16_t* bsum) {
  const int64_t nb = K / block;  // a few rows are quantized in less time than a thread wakes
  at::parallel_for(0, M, std::max<int64_t>(1, (1 << 16) / K), [&](int64_t lo, int64_t hi) {
    pq::quantize_acts(x + lo * K, (hi - lo) * nb, block, q + lo * K, d + lo * nb,
                      bsum == nullptr ? nullptr : bsum + lo * (K / 16));
  });
}

int64_t row_bytes_of(int fmt, int64_t K) {
  int64_t elems, bytes;
  TORCH_CHECK(pq::block_shape(fmt, &elems, &bytes), "unsupported weight format ", fmt);
  TORCH_CHECK(K % elems == 0, "row length ", K, " is not a multiple of the block ", elems);
  return K / elems * bytes;
}

torch::Tensor dequantize(torch::Tensor w, int64_t fmt, int64_t K) {
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.is_contiguous() && w.dim() == 2, "w: uint8 [N, bytes]");
  const int64_t rb = row_bytes_of(fmt, K), N = w.size(0);
  TORCH_CHECK(w.size(1) == rb, "w rows hold ", w.size(1), " bytes, format needs ", rb);
  auto y = torch::empty({N, K}, torch::kFloat32);
  const uint8_t* wp = w.data_ptr<uint8_t>(); float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; n++) pq::dequant_row(fmt, wp + n * rb, yp + n * K, K);
  });
  return y;
}

// Rows `ids` of a quantized [N, K] matrix (an embedding lookup) -> [T, K] fp32
torch::Tensor embedding(torch::Tensor w, int64_t fmt, int64_t K, torch::Tensor ids) {
  const int64_t rb = row_bytes_of(fmt, K), T = ids.numel();
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.is_contiguous() && w.size(1) == rb, "bad w");
  auto idx = ids.to(torch::kLong).contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; t++) TORCH_CHECK(ip[t] >= 0 && ip[t] < w.size(0), "id out of range");
  auto y = torch::empty({T, K}, torch::kFloat32);
  const uint8_t* wp = w.data_ptr<uint8_t>(); float* yp = y.data_ptr<float>();
  for (int64_t t = 0; t < T; t++) pq::dequant_row(fmt, wp + ip[t] * rb, yp + t * K, K);
  return y;
}

// y = x @ concat(W_s)^T for weight segments W_s [N_s, K] (each in its own format).
// x: [M, K] fp32; ws[s]: uint8 [N_s, row_bytes]; returns [M, sum N_s] fp32.
torch::Tensor qlinear(torch::Tensor x, std::vector<torch::Tensor> ws, std::vector<int64_t> fmts) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x: float32 [M, K]");
  TORCH_CHECK(ws.size() == fmts.size() && !ws.empty(), "one format per weight segment");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  int64_t total = 0;
  std::vector<int64_t> offs, rbs;
  bool need32 = false, needk = false;
  for (size_t s = 0; s < ws.size(); s++) {
    const int64_t rb = row_bytes_of((int)fmts[s], K);
    TORCH_CHECK(ws[s].dtype() == torch::kUInt8 && ws[s].is_contiguous() && ws[s].dim() == 2 &&
                ws[s].size(1) == rb, "segment ", s, ": uint8 [N, ", rb, "] expected");
    offs.push_back(total); rbs.push_back(rb); total += ws[s].size(0);
    need32 |= is_b32((int)fmts[s]); needk |= is_k_quant((int)fmts[s]);
  }
  auto y = torch::empty({M, total}, torch::kFloat32);
  if (M == 0) return y;
  QX q; q.xf = x.data_ptr<float>(); q.M = M; q.K = K;
  torch::Tensor q32, d32, qk, dk, bs;
  if (g_backend != PORTABLE && need32) {
    TORCH_CHECK(K % 32 == 0, "K must be a multiple of 32");
    q32 = torch::empty({M, K}, torch::kInt8); d32 = torch::empty({M, K / 32}, torch::kFloat32);
    quantize_rows(q.xf, M, K, 32, q32.data_ptr<int8_t>(), d32.data_ptr<float>(), nullptr);
    q.q32 = q32.data_ptr<int8_t>(); q.d32 = d32.data_ptr<float>();
  }
  if (g_backend != PORTABLE && needk) {
    TORCH_CHECK(K % 256 == 0, "K must be a multiple of 256");
    qk = torch::empty({M, K}, torch::kInt8); dk = torch::empty({M, K / 256}, torch::kFloat32);
    bs = torch::empty({M, K / 16}, torch::kInt16);
    quantize_rows(q.xf, M, K, 256, qk.data_ptr<int8_t>(), dk.data_ptr<float>(),
                  bs.data_ptr<int16_t>());
    q.qk = qk.data_ptr<int8_t>(); q.dk = dk.data_ptr<float>(); q.bsum = bs.data_ptr<int16_t>();
  }
  float* yp = y.data_ptr<float>();
  // chunks of 8 weight rows, split across threads; rows of x in tiles of about 128 KB of int8
  // activations, which stay in L2 while every weight row streams past them once per tile
  std::vector<std::pair<int64_t, int64_t>> chunks;  // (segment, first row)
  for (size_t s = 0; s < ws.size(); s++)
    for (int64_t n = 0; n < ws[s].size(0); n += 8) chunks.emplace_back((int64_t)s, n);
  const int64_t tile = std::max<int64_t>(4, (1 << 17) / K / 4 * 4);
  bool ok = true;
  for (int64_t m0 = 0; m0 < M; m0 += tile) {
    QX t = q;  // rows [m0, m0 + t.M) of x
    t.M = std::min(tile, M - m0);
    t.xf = q.xf + m0 * K;
    if (q.q32 != nullptr) { t.q32 = q.q32 + m0 * K; t.d32 = q.d32 + m0 * (K / 32); }
    if (q.qk != nullptr) {
      t.qk = q.qk + m0 * K; t.dk = q.dk + m0 * (K / 256); t.bsum = q.bsum + m0 * (K / 16);
    }
    float* yt = yp + m0 * total;
    at::parallel_for(0, (int64_t)chunks.size(), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; c++) {
        const auto [s, n0] = chunks[c];
        const int64_t n1 = std::min(n0 + 8, ws[s].size(0));
        if (!gemm((int)fmts[s], ws[s].data_ptr<uint8_t>(), rbs[s], n0, n1, t, yt + offs[s],
                  total))
          ok = false;
      }
    });
  }
  TORCH_CHECK(ok, "no kernel for a weight format");
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qlinear", &qlinear, "y = x @ concat(W)^T over quantized weight segments");
  m.def("dequantize", &dequantize, "quantized [N, bytes] -> fp32 [N, K]");
  m.def("embedding", &embedding, "rows of a quantized matrix -> fp32");
  m.def("backend", &backend, "the SIMD backend in use");
  m.def("set_backend", &set_backend, "portable, or the best this CPU has");
}
