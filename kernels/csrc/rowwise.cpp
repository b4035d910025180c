// Row-independent CPU attention and gated activation. Each query row (token, head) is computed
// by one thread over exactly its own keys, in the same order whatever else is in the step: no
// padding to the longest neighbour, no blocking chosen by the number of rows, the same code for
// a prompt token and a decoded one. So a request's numbers do not depend on its batch.
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

// dot over D with 8 running sums (vectorised by the compiler, same order on every call)
inline float dot(const float* a, const float* b, int64_t D) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t D8 = D - D % 8;
  for (int64_t d = 0; d < D8; d += 8)
    for (int l = 0; l < 8; l++) acc[l] += a[d + l] * b[d + l];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (int64_t d = D8; d < D; d++) s += a[d] * b[d];
  return s;
}

// q: [T, H, D]; k, v: [B, L, KVH, D] (each sequence's context, gathered); seq[t], pos[t]: the
// sequence and absolute position of query t, which sees keys (pos - window, pos] (window 0: all
// of [0, pos]). Returns [T, H, D].
torch::Tensor attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor seq,
                        torch::Tensor pos, double scale, int64_t window) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k.dtype() == torch::kFloat32 &&
              v.dtype() == torch::kFloat32, "float32 q, k, v");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes(), "q [T, H, D], k/v [B, L, KVH, D]");
  q = q.contiguous(); k = k.contiguous(); v = v.contiguous();
  auto sq = seq.to(torch::kLong).contiguous(), ps = pos.to(torch::kLong).contiguous();
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t B = k.size(0), L = k.size(1), KVH = k.size(2);
  TORCH_CHECK(k.size(3) == D && H % KVH == 0 && sq.numel() == T && ps.numel() == T, "shapes");
  const int64_t* sp = sq.data_ptr<int64_t>(); const int64_t* pp = ps.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; t++)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < B && pp[t] >= 0 && pp[t] < L, "token ", t,
                " outside the gathered context");
  auto out = torch::empty({T, H, D}, torch::kFloat32);
  const float* qp = q.data_ptr<float>(); const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>(); float* op = out.data_ptr<float>();
  const int64_t group = H / KVH, row = KVH * D;  // floats per key position
  const float sc = (float)scale;
  // threads only for enough work: a parallel region on a busy 2-core machine can wait a whole
  // scheduler tick for its second thread, far longer than one decode row's attention takes
  const int64_t grain = std::max<int64_t>(1, (1 << 20) / std::max<int64_t>(1, L * D));
  at::parallel_for(0, T * H, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> w(L), acc(D);
    for (int64_t i = lo; i < hi; i++) {
      const int64_t t = i / H, h = i % H, b = sp[t], p = pp[t];
      const int64_t j0 = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
      const float* qr = qp + i * D;
      const float* kb = kp + (b * L) * row + (h / group) * D;
      const float* vb = vp + (b * L) * row + (h / group) * D;
      float mx = -INFINITY;
      for (int64_t j = j0; j <= p; j++) {
        w[j] = dot(qr, kb + j * row, D) * sc;
        mx = std::max(mx, w[j]);
      }
      float sum = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = j0; j <= p; j++) {
        const float e = std::exp(w[j] - mx);
        sum += e;
        const float* vr = vb + j * row;
        for (int64_t d = 0; d < D; d++) acc[d] += e * vr[d];
      }
      float* o = op + i * D;
      for (int64_t d = 0; d < D; d++) o[d] = acc[d] / sum;
    }
  });
  return out;
}

// gate_up: [M, 2I] -> act(gate) * up: [M, I]; act 0 silu, 1 gelu (erf), 2 gelu (tanh). Rows are
// split across threads; inside a row, torch's vectorised op runs on that row alone, so where a
// row's elements fall between vector and scalar code depends on the row length only.
torch::Tensor gated_act(torch::Tensor gate_up, int64_t act) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 &&
              gate_up.dtype() == torch::kFloat32, "gate_up: float32 [M, 2I]");
  TORCH_CHECK(act >= 0 && act <= 2, "act must be 0 (silu), 1 (gelu) or 2 (gelu tanh)");
  const int64_t M = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = torch::empty({M, I}, torch::kFloat32);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, I)),
                   [&](int64_t lo, int64_t hi) {
    for (int64_t m = lo; m < hi; m++) {  // new tensors only: no in-place op on the caller's
      auto g = gate_up[m].narrow(0, 0, I), u = gate_up[m].narrow(0, I, I);
      auto a = act == 0 ? at::silu(g) : at::gelu(g, act == 1 ? "none" : "tanh");
      auto r = at::mul(a, u).contiguous();
      std::memcpy(op + m * I, r.data_ptr<float>(), I * sizeof(float));
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention", &attention, "row-independent attention over gathered contexts");
  m.def("gated_act", &gated_act, "act(gate) * up, row by row");
}
