#pragma once
#include <cstdint>

namespace ditkern {

// Arguments of the fused (gated residual +) norm + adaLN modulate kernel. Pointers are device addresses (0 = absent).
// Row strides are in elements; every tensor has unit stride along D. Modulation strides of 0 broadcast.
struct AdalnArgs {
  uintptr_t x, y, gate, shift, scale, weight, bias, h_out, out;
  int64_t B, S, D;
  int64_t sx_b, sx_s, sy_b, sy_s, sg_b, sg_s, ssh_b, ssh_s, ssc_b, ssc_s, sh_b, sh_s, so_b, so_s;
  int x_dtype;    // 0 fp32, 1 fp16, 2 bf16 (x, y, h_out, out)
  int mod_dtype;  // gate/shift/scale: 0 fp32 or x_dtype; weight/bias are always fp32
  int is_rms;
  float eps;
  uintptr_t stream;
  int device;
};

void adaln_modulate_launch(const AdalnArgs& a);

}  // namespace ditkern
