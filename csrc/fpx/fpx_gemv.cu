// Weight-only FP4 / FP6 / int4 GEMV for small M: the adaLN modulation linears (M = batch size) and other calls with
// at most 16 rows, where the layer is purely bound by reading the weights (4-6.5 bits each instead of 16).
//
//   out[m, n] = sum_g scale[n, g] * sum_{k in g} (x[m, k] * inv_smooth[k]) * value(code[n, k]) + bias[n]
//
// One warp per output row n; each lane decodes 8 consecutive codes at a time (FP4: one 32-bit load; FP6: three
// 16-bit loads, 6 bytes) through a 64-entry value table in shared memory, multiplies them with up to 16 rows of x
// held in fp32, and applies the group's scale to the 8-code partial sum (G is a multiple of 8, so 8 codes never
// straddle a group). Warp-shuffle reduction, fp32 throughout. Packed layout: ditkern/quant/formats.py (rows of
// K_pad * bits / 8 bytes; K_pad a multiple of 32, so rows are 4-byte (FP4) / 2-byte (FP6) aligned).
#include "common.cuh"
#include "fpx/fpx_gemv.h"

namespace ditkern {
namespace {

template <int SCALE_KIND>
__device__ __forceinline__ float load_scale(const void* base, int64_t idx) {
  if constexpr (SCALE_KIND == 0) {
    return reinterpret_cast<const float*>(base)[idx];
  } else if constexpr (SCALE_KIND == 1) {
    const uint32_t b = reinterpret_cast<const uint16_t*>(base)[idx];
    return __uint_as_float(b << 16);
  } else {
    const uint32_t e = reinterpret_cast<const uint8_t*>(base)[idx];
    return __uint_as_float(e << 23);
  }
}

template <int BITS>
__device__ __forceinline__ void load_codes8(const uint8_t* row, int64_t chunk, int* c) {
  if constexpr (BITS == 4) {
    const uint32_t w = reinterpret_cast<const uint32_t*>(row)[chunk];  // 8 codes, low nibble first
#pragma unroll
    for (int j = 0; j < 8; ++j) c[j] = (w >> (4 * j)) & 15;
  } else {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(row + 6 * chunk);  // 8 codes in 6 bytes
    const uint64_t w = uint64_t(p[0]) | (uint64_t(p[1]) << 16) | (uint64_t(p[2]) << 32);
#pragma unroll
    for (int j = 0; j < 8; ++j) c[j] = int((w >> (6 * j)) & 63);
  }
}

template <typename T, int BITS, int SCALE_KIND>
__global__ void __launch_bounds__(256) fpx_gemv_kernel(FpxGemvArgs a) {
  __shared__ float lut[64];
  for (int i = threadIdx.x; i < (1 << BITS); i += blockDim.x) lut[i] = a.lut[i];
  __syncthreads();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * (blockDim.x >> 5) + warp;
  if (n >= a.N) return;
  const int M = static_cast<int>(a.M);
  const T* x = reinterpret_cast<const T*>(a.x);
  const float* inv = reinterpret_cast<const float*>(a.inv_smooth);
  const uint8_t* row = reinterpret_cast<const uint8_t*>(a.packed) + n * a.sp_n;
  const void* scales = reinterpret_cast<const void*>(a.scales);

  float acc[kFpxMaxM];
#pragma unroll
  for (int m = 0; m < kFpxMaxM; ++m) acc[m] = 0.f;

  const int64_t chunks = (a.K + 7) / 8;  // codes beyond K are zero codes; x is never read beyond K
  for (int64_t ch = lane; ch < chunks; ch += 32) {
    int c[8];
    load_codes8<BITS>(row, ch, c);
    float w[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) w[j] = lut[c[j]];
    const int64_t k0 = ch * 8;
    const float s = load_scale<SCALE_KIND>(scales, n * a.ss_n + k0 / a.group_size);
    if (inv) {
#pragma unroll
      for (int j = 0; j < 8; ++j) w[j] *= (k0 + j < a.K) ? inv[k0 + j] : 0.f;
    }
#pragma unroll
    for (int m = 0; m < kFpxMaxM; ++m) {
      if (m < M) {
        const T* xr = x + m * a.sx_m + k0;
        float part = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) part += (k0 + j < a.K) ? to_float<T>(xr[j]) * w[j] : 0.f;
        acc[m] += part * s;
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kFpxMaxM; ++m) {
    if (m < M) {
      float v = acc[m];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) {
        if (a.bias) v += reinterpret_cast<const float*>(a.bias)[n];
        reinterpret_cast<T*>(a.out)[m * a.so_m + n] = from_float<T>(v);
      }
    }
  }
}

template <typename T, int BITS>
void launch_scale(const FpxGemvArgs& a, dim3 grid, dim3 block, cudaStream_t st) {
  switch (a.scale_kind) {
    case 0: fpx_gemv_kernel<T, BITS, 0><<<grid, block, 0, st>>>(a); break;
    case 1: fpx_gemv_kernel<T, BITS, 1><<<grid, block, 0, st>>>(a); break;
    case 2: fpx_gemv_kernel<T, BITS, 2><<<grid, block, 0, st>>>(a); break;
    default: throw std::invalid_argument("ditkern._C.fpx_gemv: scale_kind must be 0, 1 or 2");
  }
}

template <typename T>
void launch_bits(const FpxGemvArgs& a, dim3 grid, dim3 block, cudaStream_t st) {
  if (a.bits == 4) launch_scale<T, 4>(a, grid, block, st);
  else if (a.bits == 6) launch_scale<T, 6>(a, grid, block, st);
  else throw std::invalid_argument("ditkern._C.fpx_gemv: bits must be 4 or 6");
}

}  // namespace

void fpx_gemv_launch(const FpxGemvArgs& a) {
  if (a.M < 1 || a.M > kFpxMaxM) throw std::invalid_argument("ditkern._C.fpx_gemv: M must be in [1, 16]");
  if (a.group_size % 8) throw std::invalid_argument("ditkern._C.fpx_gemv: group_size must be a multiple of 8");
  if (a.K_pad % 32) throw std::invalid_argument("ditkern._C.fpx_gemv: K_pad must be a multiple of 32");
  DeviceGuard guard(a.device, "fpx_gemv");
  const dim3 block(256);
  const dim3 grid(static_cast<unsigned>((a.N + 7) / 8));
  cudaStream_t st = reinterpret_cast<cudaStream_t>(a.stream);
  switch (a.x_dtype) {
    case 0: launch_bits<float>(a, grid, block, st); break;
    case 1: launch_bits<__half>(a, grid, block, st); break;
    case 2: launch_bits<__nv_bfloat16>(a, grid, block, st); break;
    default: throw std::invalid_argument("ditkern._C.fpx_gemv: x_dtype must be 0, 1 or 2");
  }
  check_cuda(cudaGetLastError(), "fpx_gemv");
}

}  // namespace ditkern
