// Weight-only FP4 / FP6 / int4 GEMV for small M: the adaLN modulation linears (M = batch size) and other calls with
// at most 16 rows, where the layer is bound by reading the weights (4-6.5 bits each instead of 16).
//
//   out[m, n] = sum_g scale[n, g] * sum_{k in g} (x[m, k] * inv_smooth[k]) * value(code[n, k]) + bias[n]
//
// Design (the weight stream is the only large traffic; everything else is arranged around keeping it at 16-byte
// loads with the next ones in flight):
// - x is staged once per block in shared memory as fp32, already multiplied by inv_smooth (exactly the reference's
//   fp32 product), zero beyond K: [M][K_pad / 32 chunks][36 floats], 16-byte loads where x's rows allow. The 4 floats
//   of padding per 32-float chunk put the 8 lanes of each quarter-warp on 8 different 16-byte bank groups when every
//   lane reads its own chunk, so the LDS.128 reads are conflict-free. Blocks are persistent (grid <= SMs x resident
//   blocks), so x is staged once per block, not once per row. Shared memory: M * K_pad * 4.5 bytes (FLUX K=3072,
//   M=16: 216 KiB, sm_90 only; ditkern/ops/fpx_linear.py refuses what does not fit and Triton runs it).
// - A warp owns kRows = 4 rows at a time; lane l reads chunks l, l + 32, ... of each: a chunk is 32 codes, one
//   16-byte load of FP4 codes (FP6: 16 bytes of the high plane + 8 bytes of the low plane; two 8-byte loads for the
//   high plane when K_pad % 64 == 32 leaves FP6 rows 8-byte aligned), plus the chunk's group scale, once per chunk
//   (G is a power of two >= 32, so a chunk never straddles a group). The next chunk's loads are issued before the
//   current one is decoded (register double buffer).
// - Decoding (fpx_decode.cuh): two shifts and two LOP3 per two codes yield fp16 bits equal to value * 2**-pow, then
//   one exact cvt to fp32 per code; the 2**pow goes into the output. No table, no per-code multiply.
// - Each x value read from shared memory (two LDS.128 per 8 codes and row of x) feeds 4 weight rows. fp32
//   accumulation: for M <= 4 a per-chunk partial sum per (row, m), then acc += partial * scale; for M > 4 the scale
//   is folded into the decoded weights (one multiply per code instead of a second accumulator set in registers).
// - Warp-shuffle reduction per (row, m) at the end of the rows; lane 0 adds the bias and stores.
// Compiled per code width (4 / 6) and M bucket (1, 2, 4, 16); the format and x's dtype are runtime values (the
// format is recognised from the value table the caller passes, which the decoder must reproduce exactly).
// Semantics as ditkern/ops/fpx_linear.py's reference up to fp32 rounding order; sums are formed in units of 2**-pow
// (pow <= 17), so an output below ~2**-109 in magnitude loses precision to fp32 subnormals.
#include "common.cuh"
#include "fpx/fpx_decode.cuh"
#include "fpx/fpx_gemv.h"

#include <algorithm>
#include <cmath>
#include <string>

namespace ditkern {
namespace {

using namespace fpx;

constexpr int kWarps = 8;                        // warps per block
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 4;                         // rows of W per warp at a time
constexpr int kChunk = 32;                       // codes per lane per step (one 16-byte load of 4-bit codes)
constexpr int kXStride = kChunk + 4;             // floats per staged x chunk (16 B padding: conflict-free LDS.128)

template <int BITS> struct Chunk;
template <> struct Chunk<4> { uint4 hi[kRows]; float s[kRows]; };
template <> struct Chunk<6> { uint4 hi[kRows]; uint2 lo[kRows]; float s[kRows]; };

// Per row of a warp's tile: where its codes and scales start (computed once per tile, not per chunk).
struct RowPtrs {
  const uint8_t* code[kRows];
  const uint8_t* scale[kRows];
};

// The codes and the group scale of chunk `ch` (32 codes) of the tile's rows. The 16 code bytes of a high plane / FP4
// row: one LDG.128 when rows are 16-byte aligned (FP4 always; FP6 when K_pad % 64 == 0), else two LDG.64 (FP6 rows of
// 3 * K_pad / 4 bytes are always 8-byte aligned). Uniform branches, once per chunk for all rows.
template <int BITS>
__device__ __forceinline__ void load_chunk(Chunk<BITS>& c, const RowPtrs& p, int ch, int64_t lo_off, int g_shift,
                                           int scale_kind, bool aligned16) {
  if (aligned16) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) c.hi[r] = __ldg(reinterpret_cast<const uint4*>(p.code[r]) + ch);
  } else {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const uint2 u = __ldg(reinterpret_cast<const uint2*>(p.code[r]) + 2 * ch);
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(p.code[r]) + 2 * ch + 1);
      c.hi[r] = make_uint4(u.x, u.y, v.x, v.y);
    }
  }
  if constexpr (BITS == 6) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) c.lo[r] = __ldg(reinterpret_cast<const uint2*>(p.code[r] + lo_off) + ch);
  }
  const int g = ch >> g_shift;
  if (scale_kind == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) c.s[r] = __ldg(reinterpret_cast<const float*>(p.scale[r]) + g);
  } else if (scale_kind == 1) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      c.s[r] = __uint_as_float(uint32_t(__ldg(reinterpret_cast<const unsigned short*>(p.scale[r]) + g)) << 16);
    }
  } else {
#pragma unroll
    for (int r = 0; r < kRows; ++r) c.s[r] = __uint_as_float(uint32_t(__ldg(p.scale[r] + g)) << 23);
  }
}

__device__ __forceinline__ uint32_t word(const uint4& v, int q) {
  return q == 0 ? v.x : q == 1 ? v.y : q == 2 ? v.z : v.w;
}

// The 8 codes 8q .. 8q + 7 of row r of a chunk as fp32 value * 2**-pow, in code order.
template <int BITS>
__device__ __forceinline__ void decode8(const Chunk<BITS>& c, int r, int q, const Decoder& d, float* w) {
  uint32_t lo = 0;
  if constexpr (BITS == 6) lo = q < 2 ? c.lo[r].x : c.lo[r].y;
  uint32_t h[4];
  chunk_pairs<BITS>(word(c.hi[r], q), lo, q, d, h);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h[j]));
    w[j] = f.x;
    w[j + 4] = f.y;
  }
}

// x (times inv_smooth) -> shared memory, fp32, [M][K_pad / 32][kXStride], zero for k >= K. 16-byte loads where the
// rows allow it.
template <typename T>
__device__ void stage_x(const FpxGemvArgs& a, float* xs) {
  const T* x = reinterpret_cast<const T*>(a.x);
  const float* inv = reinterpret_cast<const float*>(a.inv_smooth);
  const int K = static_cast<int>(a.K), kp8 = static_cast<int>(a.K_pad / 8), nch = static_cast<int>(a.K_pad / kChunk);
  const bool vec = (a.x % 16 == 0) && ((a.sx_m * sizeof(T)) % 16 == 0) && (a.inv_smooth % 16 == 0);
  for (int i = threadIdx.x; i < a.M * kp8; i += blockDim.x) {
    const int m = i / kp8, k = (i - m * kp8) * 8;
    const T* xr = x + m * a.sx_m + k;
    float v[8];
    if (vec && k + 8 <= K) {
      load_vec<T, 8>(xr, v);
      if (inv) {
        float s[8];
        load_vec<float, 8>(inv + k, s);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] *= s[j];
      }
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = k + j < K ? to_float<T>(xr[j]) * (inv ? inv[k + j] : 1.f) : 0.f;
    }
    float4* dst = reinterpret_cast<float4*>(xs + (m * nch + k / kChunk) * kXStride + k % kChunk);
    dst[0] = make_float4(v[0], v[1], v[2], v[3]);
    dst[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
}

// One chunk (32 codes) of kRows rows against the M staged rows of x. MB: compile-time bound on M (M <= MB).
template <int BITS, int MB>
__device__ __forceinline__ void compute_chunk(const Chunk<BITS>& c, const float* xc, int xrow, int M,
                                              const Decoder& d, float (&acc)[kRows][MB]) {
  constexpr bool kFold = MB > 4;  // fold the scale into the weights: one accumulator set only
  float part[kRows][kFold ? 1 : MB];
  if constexpr (!kFold) {
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int m = 0; m < MB; ++m) part[r][m] = 0.f;
  }
#pragma unroll
  for (int q = 0; q < kChunk / 8; ++q) {
    float w[kRows][8];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      decode8<BITS>(c, r, q, d, w[r]);
      if constexpr (kFold) {
#pragma unroll
        for (int j = 0; j < 8; ++j) w[r][j] *= c.s[r];
      }
    }
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      // M >= 1: row 0 unguarded for the small buckets (at M > 4 the guard keeps ptxas from hoisting the decode of
      // later sub-chunks, which spills FP6 on sm_80 / sm_89)
      if ((MB <= 4 && m == 0) || m < M) {
        const float4 x0 = *reinterpret_cast<const float4*>(xc + m * xrow + 8 * q);
        const float4 x1 = *reinterpret_cast<const float4*>(xc + m * xrow + 8 * q + 4);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          float& dst = kFold ? acc[r][m] : part[r][kFold ? 0 : m];
          dst = fmaf(x0.x, w[r][0], dst);
          dst = fmaf(x0.y, w[r][1], dst);
          dst = fmaf(x0.z, w[r][2], dst);
          dst = fmaf(x0.w, w[r][3], dst);
          dst = fmaf(x1.x, w[r][4], dst);
          dst = fmaf(x1.y, w[r][5], dst);
          dst = fmaf(x1.z, w[r][6], dst);
          dst = fmaf(x1.w, w[r][7], dst);
        }
      }
    }
  }
  if constexpr (!kFold) {
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int m = 0; m < MB; ++m) acc[r][m] = fmaf(part[r][m], c.s[r], acc[r][m]);
  }
}

template <typename T>
__device__ __forceinline__ void store(const FpxGemvArgs& a, int m, int64_t row, float v) {
  reinterpret_cast<T*>(a.out)[m * a.so_m + row] = from_float<T>(v);
}

// Compiled per code width and M bucket only: the format (shifts, masks, power of two) and x's dtype (staging and the
// final store, outside the main loop) are runtime values.
template <int BITS, int MB>
__global__ void __launch_bounds__(kThreads) fpx_gemv_kernel(FpxGemvArgs a, Decoder d) {
  extern __shared__ float4 xs_raw[];
  float* xs = reinterpret_cast<float*>(xs_raw);
  if (a.x_dtype == 0) stage_x<float>(a, xs);
  else if (a.x_dtype == 1) stage_x<__half>(a, xs);
  else stage_x<__nv_bfloat16>(a, xs);
  __syncthreads();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int M = static_cast<int>(a.M);
  const int nch = static_cast<int>(a.K_pad / kChunk);
  const int xrow = nch * kXStride;
  const bool aligned16 = a.packed % 16 == 0 && a.sp_n % 16 == 0;
  const float* xl = xs + lane * kXStride;
  const float out_scale = __uint_as_float(uint32_t(127 + d.pow) << 23);  // 2**pow
  const int64_t lo_off = a.K_pad / 2;                                   // FP6: the low plane
  const int g_shift = __ffs(a.group_size / kChunk) - 1;                  // chunk -> group (G a power of two)
  const int scale_log2 = a.scale_kind == 0 ? 2 : a.scale_kind == 1 ? 1 : 0;
  const int64_t tiles = (a.N + kRows - 1) / kRows;
  for (int64_t tile = int64_t(blockIdx.x) * kWarps + warp; tile < tiles; tile += int64_t(gridDim.x) * kWarps) {
    RowPtrs p;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t n = min(tile * kRows + r, a.N - 1);  // rows past N: re-read the last row
      p.code[r] = reinterpret_cast<const uint8_t*>(a.packed) + n * a.sp_n;
      p.scale[r] = reinterpret_cast<const uint8_t*>(a.scales) + (n * a.ss_n << scale_log2);
      // opaque to the compiler, so the 8 row pointers stay in registers instead of being recomputed (64-bit
      // multiplies, clamps) for every chunk: ~20% fewer instructions per chunk at M <= 4; at M > 4 the FMAs dominate
      // and the 16 registers would spill on sm_80 / sm_89
      if constexpr (MB <= 4) {
        asm volatile("" : "+l"(p.code[r]));
        asm volatile("" : "+l"(p.scale[r]));
      }
    }

    float acc[kRows][MB];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int m = 0; m < MB; ++m) acc[r][m] = 0.f;

    // register double buffer: the next chunk's loads are in flight while this one is decoded
    Chunk<BITS> cur, nxt;
    if (lane < nch) load_chunk<BITS>(cur, p, lane, lo_off, g_shift, a.scale_kind, aligned16);
#pragma unroll 1
    for (int ch = lane; ch < nch; ch += 32) {
      if (ch + 32 < nch) load_chunk<BITS>(nxt, p, ch + 32, lo_off, g_shift, a.scale_kind, aligned16);
      compute_chunk<BITS, MB>(cur, xl + (ch - lane) * kXStride, xrow, M, d, acc);
      cur = nxt;
    }

#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        if (m < M) {
          float v = acc[r][m];
#pragma unroll
          for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
          const int64_t row = tile * kRows + r;
          if (lane == 0 && row < a.N) {
            v *= out_scale;
            if (a.bias) v += reinterpret_cast<const float*>(a.bias)[row];
            if (a.x_dtype == 0) store<float>(a, m, row, v);
            else if (a.x_dtype == 1) store<__half>(a, m, row, v);
            else store<__nv_bfloat16>(a, m, row, v);
          }
        }
      }
    }
  }
}

// Whether the decoder of `fmt` reproduces `lut` exactly (value and sign of zero), for every code in every position
// of a 32-bit word (and both halves of an FP6 low-plane word), neighbours all-ones so that a leaking mask shows.
bool decode_matches(int fmt, const float* lut) {
  const Decoder d = decoder(fmt);
  const int n = 1 << d.bits;
  const float out = std::ldexp(1.0f, d.pow);
  for (int code = 0; code < n; ++code) {
    for (int pos = 0; pos < 8; ++pos) {
      for (int half = 0; half < (d.bits == 6 ? 2 : 1); ++half) {
        uint32_t hi = 0, lo16 = 0;
        for (int i = 0; i < 8; ++i) {
          const uint32_t c = i == pos ? code : n - 1;
          hi |= (d.bits == 4 ? c : c >> 2) << (4 * i);
          lo16 |= (c & 3) << (2 * i);
        }
        const uint32_t lo_s = byte_perm(lo16 << (16 * half), 0u, lo_spread_selector(half)) << d.lo_shift;
        const int j = pos & 3;
        const uint32_t h = d.bits == 4 ? fp4_pair(hi, j, d) : fp6_pair(hi, lo_s, j, d);
        const float got = half_bits_to_float(pos < 4 ? h & 0xFFFFu : h >> 16) * out;
        if (got != lut[code] || std::signbit(got) != std::signbit(lut[code])) return false;
      }
    }
  }
  return true;
}

int format_of(const FpxGemvArgs& a) {
  for (int fmt = 0; fmt < kNumFormats; ++fmt) {
    if (decoder(fmt).bits == a.bits && decode_matches(fmt, a.lut)) return fmt;
  }
  throw std::invalid_argument("ditkern._C.fpx_gemv: the value table matches none of fp4_e2m1, int4, fp6_e3m2, "
                              "fp6_e2m3");
}

template <int BITS, int MB>
void launch(const FpxGemvArgs& a, const Decoder& d, size_t smem, cudaStream_t st) {
  auto kernel = fpx_gemv_kernel<BITS, MB>;
  if (smem > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)), "fpx_gemv");
  }
  int sms = 0, per_sm = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, a.device), "fpx_gemv");
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem), "fpx_gemv");
  const int64_t blocks = (a.N + kRows * kWarps - 1) / (kRows * kWarps);
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(sms) * std::max(per_sm, 1)));
  kernel<<<static_cast<unsigned>(grid), kThreads, smem, st>>>(a, d);
}

template <int BITS>
void launch_m(const FpxGemvArgs& a, const Decoder& d, size_t smem, cudaStream_t st) {
  if (a.M <= 1) launch<BITS, 1>(a, d, smem, st);
  else if (a.M <= 2) launch<BITS, 2>(a, d, smem, st);
  else if (a.M <= 4) launch<BITS, 4>(a, d, smem, st);
  else launch<BITS, 16>(a, d, smem, st);  // FMA-bound from here on; an M=8 bucket would cost compile time only
}

}  // namespace

size_t fpx_gemv_shared_bytes(int64_t M, int64_t K_pad) {
  return size_t(M) * size_t(K_pad / kChunk) * kXStride * sizeof(float);
}

void fpx_gemv_launch(const FpxGemvArgs& a) {
  if (a.M < 1 || a.M > kFpxMaxM) throw std::invalid_argument("ditkern._C.fpx_gemv: M must be in [1, 16]");
  if (a.bits != 4 && a.bits != 6) throw std::invalid_argument("ditkern._C.fpx_gemv: bits must be 4 or 6");
  if (a.group_size < kChunk || a.group_size & (a.group_size - 1)) {
    throw std::invalid_argument("ditkern._C.fpx_gemv: group_size must be a power of two >= 32");
  }
  if (a.K_pad % kChunk || a.K_pad % a.group_size || a.K < 1 || a.K > a.K_pad) {
    throw std::invalid_argument("ditkern._C.fpx_gemv: K_pad must be a multiple of 32 and of group_size, K <= K_pad");
  }
  if (a.packed % 16 || a.sp_n % 8) {
    throw std::invalid_argument("ditkern._C.fpx_gemv: packed must be 16-byte aligned with rows a multiple of 8 bytes");
  }
  if (a.scale_kind < 0 || a.scale_kind > 2) {
    throw std::invalid_argument("ditkern._C.fpx_gemv: scale_kind must be 0, 1 or 2");
  }
  if (a.x_dtype < 0 || a.x_dtype > 2) throw std::invalid_argument("ditkern._C.fpx_gemv: x_dtype must be 0, 1 or 2");
  DeviceGuard guard(a.device, "fpx_gemv");
  const int fmt = format_of(a);
  const size_t smem = fpx_gemv_shared_bytes(a.M, a.K_pad);
  int optin = 0;
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, a.device), "fpx_gemv");
  if (smem > size_t(optin)) {
    throw std::invalid_argument("ditkern._C.fpx_gemv: x needs " + std::to_string(smem) + " bytes of shared memory (M=" +
                                std::to_string(a.M) + ", K_pad=" + std::to_string(a.K_pad) + "), the device allows " +
                                std::to_string(optin));
  }
  cudaStream_t st = reinterpret_cast<cudaStream_t>(a.stream);
  const Decoder d = decoder(fmt);
  if (d.bits == 4) launch_m<4>(a, d, smem, st);
  else launch_m<6>(a, d, smem, st);
  check_cuda(cudaGetLastError(), "fpx_gemv");
}

}  // namespace ditkern
