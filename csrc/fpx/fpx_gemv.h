// Weight-only FP4 / FP6 / int4 GEMV for small M (<= 16 rows): out = (x * inv_smooth) @ W_hat.T + bias.
#pragma once
#include <cstddef>
#include <cstdint>

namespace ditkern {

constexpr int kFpxMaxM = 16;

struct FpxGemvArgs {
  uintptr_t x, packed, scales, bias, inv_smooth, out;  // bias / inv_smooth: fp32 or 0
  int64_t M, N, K, K_pad;
  int64_t sx_m, sp_n, ss_n, so_m;  // row strides in elements (x, out), bytes (packed), elements (scales)
  int group_size;
  int bits;        // 4 or 6
  int x_dtype;     // 0 fp32, 1 fp16, 2 bf16 (out has x's dtype)
  int scale_kind;  // 0 fp32, 1 bf16, 2 e8m0 (uint8 biased exponent)
  float lut[64];   // value of every code (16 or 64 entries), exact: names the format (checked against the decoder)
  uintptr_t stream;
  int device;
};

void fpx_gemv_launch(const FpxGemvArgs& a);

// Dynamic shared memory of one launch: x staged as fp32, M x K_pad floats plus 1/8 padding (must fit the device's
// opt-in limit per block; ditkern/ops/fpx_linear.py checks the same bound before choosing the CUDA backend).
size_t fpx_gemv_shared_bytes(int64_t M, int64_t K_pad);

}  // namespace ditkern
