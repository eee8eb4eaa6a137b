// Fused (gated residual +) layer/RMS norm + adaLN modulate, one thread block per row.
//
//   h   = x + gate * y                   (when y is given; gate optional), stored rounded to x's dtype
//   n   = norm(h) * weight + bias        (fp32 statistics; two-pass variance over the row kept in shared memory)
//   out = n * (1 + scale) + shift
// Layout [B, S, D], unit stride along D, 16-byte vector loads and stores (VEC = 16 / sizeof(T) elements), so the
// Python side only selects this backend when D and every row stride are multiples of VEC and pointers are aligned.
// DiT adaLN-Zero (arXiv 2212.09748); the fusion of the residual add with the next norm follows the fused
// residual-norm-scale-shift kernels of inference engines (TARGETS.md).
#include "adaln_modulate/adaln_modulate.h"
#include "common.cuh"

namespace ditkern {
namespace {

template <typename T, typename M>
__global__ void __launch_bounds__(1024) adaln_modulate_kernel(AdalnArgs a) {
  constexpr int VEC = 16 / sizeof(T);
  extern __shared__ float row[];  // [D] fp32: the (residual-added) row, read back by the thread that wrote it
  __shared__ float red[32];

  const int64_t r = blockIdx.x;
  const int64_t b = r / a.S, s = r % a.S;
  const int D = static_cast<int>(a.D);
  const T* x = reinterpret_cast<const T*>(a.x) + b * a.sx_b + s * a.sx_s;
  const T* y = a.y ? reinterpret_cast<const T*>(a.y) + b * a.sy_b + s * a.sy_s : nullptr;
  const M* gate = a.gate ? reinterpret_cast<const M*>(a.gate) + b * a.sg_b + s * a.sg_s : nullptr;
  const M* shift = a.shift ? reinterpret_cast<const M*>(a.shift) + b * a.ssh_b + s * a.ssh_s : nullptr;
  const M* scale = a.scale ? reinterpret_cast<const M*>(a.scale) + b * a.ssc_b + s * a.ssc_s : nullptr;
  const float* weight = reinterpret_cast<const float*>(a.weight);
  const float* bias = reinterpret_cast<const float*>(a.bias);
  T* h_out = a.h_out ? reinterpret_cast<T*>(a.h_out) + b * a.sh_b + s * a.sh_s : nullptr;
  T* out = reinterpret_cast<T*>(a.out) + b * a.so_b + s * a.so_s;

  float sum = 0.f;
  for (int i = threadIdx.x * VEC; i < D; i += blockDim.x * VEC) {
    float v[VEC];
    load_vec<T, VEC>(x + i, v);
    if (y) {
      float yv[VEC];
      load_vec<T, VEC>(y + i, yv);
      if (gate) {
        float g[VEC];
        load_vec<M, VEC>(gate + i, g);
#pragma unroll
        for (int j = 0; j < VEC; ++j) yv[j] *= g[j];
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = to_float<T>(from_float<T>(v[j] + yv[j]));  // the stored residual stream
      store_vec<T, VEC>(h_out + i, v);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      row[i + j] = v[j];
      sum += v[j];
    }
  }
  const float mean = a.is_rms ? 0.f : block_sum(sum, red) / D;
  float sq = 0.f;
  for (int i = threadIdx.x * VEC; i < D; i += blockDim.x * VEC) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float c = row[i + j] - mean;
      sq += c * c;
    }
  }
  const float rstd = rsqrtf(block_sum(sq, red) / D + a.eps);
  for (int i = threadIdx.x * VEC; i < D; i += blockDim.x * VEC) {
    float n[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) n[j] = (row[i + j] - mean) * rstd;
    if (weight) {
      float w[VEC];
      load_vec<float, VEC>(weight + i, w);
#pragma unroll
      for (int j = 0; j < VEC; ++j) n[j] *= w[j];
    }
    if (bias) {
      float bb[VEC];
      load_vec<float, VEC>(bias + i, bb);
#pragma unroll
      for (int j = 0; j < VEC; ++j) n[j] += bb[j];
    }
    if (scale) {
      float sc[VEC];
      load_vec<M, VEC>(scale + i, sc);
#pragma unroll
      for (int j = 0; j < VEC; ++j) n[j] *= 1.f + sc[j];
    }
    if (shift) {
      float sh[VEC];
      load_vec<M, VEC>(shift + i, sh);
#pragma unroll
      for (int j = 0; j < VEC; ++j) n[j] += sh[j];
    }
    store_vec<T, VEC>(out + i, n);
  }
}

template <typename T, typename M>
void launch(const AdalnArgs& a) {
  constexpr int VEC = 16 / sizeof(T);
  const int64_t vectors = (a.D + VEC - 1) / VEC;
  int threads = static_cast<int>(((vectors + 31) / 32) * 32);
  threads = threads < 32 ? 32 : (threads > 256 ? 256 : threads);
  const size_t smem = static_cast<size_t>(a.D) * sizeof(float);
  auto kernel = adaln_modulate_kernel<T, M>;
  if (smem > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
               "adaln_modulate (shared memory)");
  }
  kernel<<<static_cast<unsigned>(a.B * a.S), threads, smem, reinterpret_cast<cudaStream_t>(a.stream)>>>(a);
  check_cuda(cudaGetLastError(), "adaln_modulate (launch)");
}

}  // namespace

void adaln_modulate_launch(const AdalnArgs& a) {
  if (a.B * a.S == 0 || a.D == 0) return;
  if (a.B * a.S > 0x7fffffffLL) throw std::invalid_argument("ditkern._C.adaln_modulate: B*S exceeds the grid limit");
  if (a.mod_dtype != 0 && a.mod_dtype != a.x_dtype)
    throw std::invalid_argument("ditkern._C.adaln_modulate: modulation dtype must be fp32 or x's dtype");
  DeviceGuard guard(a.device, "adaln_modulate");
  const bool mod_f32 = a.mod_dtype == 0;
  switch (a.x_dtype) {
    case 0: launch<float, float>(a); break;
    case 1: mod_f32 ? launch<__half, float>(a) : launch<__half, __half>(a); break;
    case 2: mod_f32 ? launch<__nv_bfloat16, float>(a) : launch<__nv_bfloat16, __nv_bfloat16>(a); break;
    default: throw std::invalid_argument("ditkern._C.adaln_modulate: x dtype code must be 0, 1 or 2");
  }
}

}  // namespace ditkern
