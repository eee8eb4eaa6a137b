// Taylor-extrapolation state update and forecast (TaylorSeer arXiv 2503.06923; confidence-gated Taylor
// arXiv 2508.02240), elementwise over [B, N] with 16-byte vectors; grid.y = batch item, grid-stride over N.
//   update   (mask[b] != 0): f = x - base; d1' = (f - d0) * c1[b]; d2' = (d1' - d1) * c2[b]; d0' = f
//   forecast: out = base + d0 + a1[b] * d1 + a2[b] * d2
// The Python side selects this backend only for one dtype throughout, contiguous rows, 16-byte aligned pointers and
// N a multiple of the vector width.
#include "common.cuh"
#include "taylor/taylor.h"

namespace ditkern {
namespace {

template <typename T>
__global__ void taylor_update_kernel(TaylorArgs a) {
  constexpr int VEC = 16 / sizeof(T);
  const int64_t b = blockIdx.y;
  if (reinterpret_cast<const int32_t*>(a.mask)[b] == 0) return;
  const float c1 = reinterpret_cast<const float*>(a.c1)[b];
  const float c2 = reinterpret_cast<const float*>(a.c2)[b];
  const int64_t row = b * a.N;
  const T* x = reinterpret_cast<const T*>(a.x) + row;
  const T* base = a.base ? reinterpret_cast<const T*>(a.base) + row : nullptr;
  T* d0 = reinterpret_cast<T*>(a.d0) + row;
  T* d1 = a.d1 ? reinterpret_cast<T*>(a.d1) + row : nullptr;
  T* d2 = a.d2 ? reinterpret_cast<T*>(a.d2) + row : nullptr;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; i < a.N;
       i += int64_t(gridDim.x) * blockDim.x * VEC) {
    float f[VEC], v[VEC];
    load_vec<T, VEC>(x + i, f);
    if (base) {
      load_vec<T, VEC>(base + i, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) f[j] -= v[j];
    }
    if (a.order >= 1) {
      float n1[VEC];
      load_vec<T, VEC>(d0 + i, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) n1[j] = (f[j] - v[j]) * c1;
      if (a.order >= 2) {
        load_vec<T, VEC>(d1 + i, v);
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[j] = (n1[j] - v[j]) * c2;
        store_vec<T, VEC>(d2 + i, v);
      }
      store_vec<T, VEC>(d1 + i, n1);
    }
    store_vec<T, VEC>(d0 + i, f);
  }
}

template <typename T>
__global__ void taylor_forecast_kernel(TaylorArgs a) {
  constexpr int VEC = 16 / sizeof(T);
  const int64_t b = blockIdx.y;
  const float a1 = reinterpret_cast<const float*>(a.c1)[b];
  const float a2 = reinterpret_cast<const float*>(a.c2)[b];
  const int64_t row = b * a.N;
  const T* base = a.base ? reinterpret_cast<const T*>(a.base) + row : nullptr;
  const T* d0 = reinterpret_cast<const T*>(a.d0) + row;
  const T* d1 = a.d1 ? reinterpret_cast<const T*>(a.d1) + row : nullptr;
  const T* d2 = a.d2 ? reinterpret_cast<const T*>(a.d2) + row : nullptr;
  T* out = reinterpret_cast<T*>(a.out) + row;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; i < a.N;
       i += int64_t(gridDim.x) * blockDim.x * VEC) {
    float o[VEC], v[VEC];
    load_vec<T, VEC>(d0 + i, o);
    if (a.order >= 1) {
      load_vec<T, VEC>(d1 + i, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) o[j] += a1 * v[j];
    }
    if (a.order >= 2) {
      load_vec<T, VEC>(d2 + i, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) o[j] += a2 * v[j];
    }
    if (base) {
      load_vec<T, VEC>(base + i, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) o[j] += v[j];
    }
    store_vec<T, VEC>(out + i, o);
  }
}

template <typename T>
void launch(const TaylorArgs& a, bool update) {
  constexpr int VEC = 16 / sizeof(T), THREADS = 256;
  const int64_t blocks_needed = (a.N / VEC + THREADS - 1) / THREADS;
  // enough blocks in flight to cover the GPU a few times over, grid-stride beyond that
  const unsigned gx = static_cast<unsigned>(blocks_needed < 4096 ? (blocks_needed > 0 ? blocks_needed : 1) : 4096);
  dim3 grid(gx, static_cast<unsigned>(a.B));
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  if (update) {
    taylor_update_kernel<T><<<grid, THREADS, 0, stream>>>(a);
  } else {
    taylor_forecast_kernel<T><<<grid, THREADS, 0, stream>>>(a);
  }
  check_cuda(cudaGetLastError(), update ? "taylor_update (launch)" : "taylor_forecast (launch)");
}

void dispatch(const TaylorArgs& a, bool update) {
  const char* what = update ? "taylor_update" : "taylor_forecast";
  if (a.B > 65535) throw std::invalid_argument(std::string("ditkern._C.") + what + ": batch exceeds 65535");
  if (a.order < 0 || a.order > 2) throw std::invalid_argument(std::string("ditkern._C.") + what + ": order must be 0..2");
  if (a.B == 0 || a.N == 0) return;
  DeviceGuard guard(a.device, what);
  switch (a.dtype) {
    case 0: launch<float>(a, update); break;
    case 1: launch<__half>(a, update); break;
    case 2: launch<__nv_bfloat16>(a, update); break;
    default: throw std::invalid_argument(std::string("ditkern._C.") + what + ": dtype code must be 0, 1 or 2");
  }
}

}  // namespace

void taylor_update_launch(const TaylorArgs& a) { dispatch(a, true); }
void taylor_forecast_launch(const TaylorArgs& a) { dispatch(a, false); }

}  // namespace ditkern
