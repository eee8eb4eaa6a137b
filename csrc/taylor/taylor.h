#pragma once
#include <cstdint>

namespace ditkern {

// Fused Taylor-extrapolation kernels (see ditkern/ops/taylor.py). Tensors are [B, N] contiguous in one dtype
// (0 fp32, 1 fp16, 2 bf16); coefficients are [B] fp32 and mask [B] int32 (device pointers; 0 = absent).
struct TaylorArgs {
  uintptr_t x, base, d0, d1, d2, out;
  uintptr_t c1, c2, mask;  // update: c1, c2, mask; forecast: a1, a2 (mask unused)
  int64_t B, N;
  int order;
  int dtype;
  uintptr_t stream;
  int device;
};

void taylor_update_launch(const TaylorArgs& a);
void taylor_forecast_launch(const TaylorArgs& a);

}  // namespace ditkern
