// NEON backend (aarch64: Jetson, Raspberry Pi): not written yet, so every format goes to the
// portable path there (quant_linear.cpp falls back when a backend returns false).
#include "blocks.h"

namespace pq {
bool gemm_neon(int, const uint8_t*, int64_t, int64_t, int64_t, const QX&, float*, int64_t) {
  return false;
}
}  // namespace pq
