// Shared device helpers for ditkern's CUDA kernels (no torch headers: raw pointers in, raw pointers out).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace ditkern {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Load N consecutive elements as 16-byte vectors (the caller guarantees 16-byte alignment) and widen to fp32.
template <typename T, int N> __device__ __forceinline__ void load_vec(const T* ptr, float* out) {
  constexpr int kPer = 16 / sizeof(T);
  static_assert((N * sizeof(T)) % 16 == 0, "load_vec moves whole 16-byte vectors");
#pragma unroll
  for (int c = 0; c < N / kPer; ++c) {
    uint4 raw = reinterpret_cast<const uint4*>(ptr)[c];
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < kPer; ++j) out[c * kPer + j] = to_float<T>(e[j]);
  }
}

// Narrow N fp32 values to T and store them as 16-byte vectors.
template <typename T, int N> __device__ __forceinline__ void store_vec(T* ptr, const float* in) {
  constexpr int kPer = 16 / sizeof(T);
  static_assert((N * sizeof(T)) % 16 == 0, "store_vec moves whole 16-byte vectors");
#pragma unroll
  for (int c = 0; c < N / kPer; ++c) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int j = 0; j < kPer; ++j) e[j] = from_float<T>(in[c * kPer + j]);
    reinterpret_cast<uint4*>(ptr)[c] = raw;
  }
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024). `red` holds 32 floats of shared memory; the
// leading barrier makes back-to-back calls safe.
__device__ __forceinline__ float block_sum(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int n_warps = blockDim.x >> 5;
    v = lane < n_warps ? red[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) red[0] = v;
  }
  __syncthreads();
  return red[0];
}

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("ditkern._C.") + what + ": CUDA error " + std::to_string(int(err)) + " (" +
                             cudaGetErrorName(err) + "): " + cudaGetErrorString(err));
  }
}

// Makes `device` current for the launch and restores the caller's device afterwards.
struct DeviceGuard {
  int prev = -1;
  DeviceGuard(int device, const char* what) {
    check_cuda(cudaGetDevice(&prev), what);
    if (prev != device) check_cuda(cudaSetDevice(device), what);
  }
  ~DeviceGuard() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev && prev >= 0) cudaSetDevice(prev);
  }
};

}  // namespace ditkern
