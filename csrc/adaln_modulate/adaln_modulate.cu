// Fused (gated residual +) layer/RMS norm + adaLN modulate, one thread block per row, the row in registers.
//
//   h   = x + gate * y                   (when y is given; gate optional), stored rounded to x's dtype
//   n   = norm(h) * weight + bias        (fp32 statistics, one reduction pass; see below)
//   out = n * (1 + scale) + shift
// Layout [B, S, D], unit stride along D, 16-byte vector loads and stores (VEC = 16 / sizeof(T) elements), so the
// Python side only selects this backend when D and every row stride are multiples of VEC and pointers are aligned.
//
// Each thread holds NV vectors of the row (vector k*blockDim.x + threadIdx.x, coalesced); NV (1, 2 or 4) is a template
// argument and blockDim.x the smallest multiple of 32 with blockDim.x * NV * VEC >= D, the launcher picking NV for
// the most bytes in flight per SM (adaln_vectors_per_thread: FLUX 3072 bf16 = 96 threads x 4 vectors, SD3 1536 =
// 96 x 2, PixArt 1152 = 96 x 2 with 72 busy, Wan 5120 = 160 x 4).
// Every global load of the row (x, y, gate, and the modulation/affine operands) is issued before the reduction, so a
// block has all its bytes in flight at once and nothing is re-read.
// Statistics: each thread's mean and centred sum of squares over its own elements (exact, in registers), merged
// across the block with Chan et al.'s pairwise update (n, mean, M2) - warp shuffles, then one shared-memory exchange
// of the per-warp triples and a single __syncthreads, after which every thread merges the warp triples in the same
// order (so all threads of a row use bit-identical mean and rstd). The pairwise update is backward stable: the
// variance has a relative error of O(log2(D) * 2^-24), with no E[x^2] - mean^2 cancellation. RMS norm needs only
// the sum of squares (the same single exchange).
// DiT adaLN-Zero (arXiv 2212.09748); the fusion of the residual add with the next norm follows the fused
// residual-norm-scale-shift kernels of inference engines (TARGETS.md); Chan, Golub & LeVeque 1979 for the merge.
#include "adaln_modulate/adaln_modulate.h"
#include "common.cuh"

namespace ditkern {
namespace {

constexpr int kMaxThreads = 512;  // per row; with NV <= 4 this covers D <= 16384 (16-bit) / 8192 (fp32)

// VEC elements of type E as raw 16-byte words: loaded early, widened to fp32 where they are used (a loaded operand
// costs VEC * sizeof(E) / 4 registers, not VEC).
template <typename E, int VEC>
struct Raw {
  static constexpr int kWords = VEC * static_cast<int>(sizeof(E)) / 16;
  static_assert(kWords >= 1 && VEC * sizeof(E) == kWords * 16, "whole 16-byte words");
  uint4 w[kWords];
  __device__ __forceinline__ void load(const E* p) {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = reinterpret_cast<const uint4*>(p)[i];
  }
  __device__ __forceinline__ float operator[](int j) const { return to_float<E>(reinterpret_cast<const E*>(w)[j]); }
};

// (n, mean, M2) += (nb, mb, m2b): Chan's pairwise update. Counts are exact in fp32 (D <= 2^24).
__device__ __forceinline__ void chan_merge(float& n, float& m, float& m2, float nb, float mb, float m2b) {
  if (nb == 0.f) return;
  if (n == 0.f) {
    n = nb, m = mb, m2 = m2b;
    return;
  }
  const float nn = n + nb;
  const float d = mb - m;
  const float fb = nb / nn;
  m = fmaf(d, fb, m);
  m2 = m2 + m2b + d * d * n * fb;
  n = nn;
}

// (kMaxThreads, 1): without the minimum of one block per SM, ptxas for sm_80 held NV = 2 to 64 registers and spilled
template <typename T, typename M, int NV>
__global__ void __launch_bounds__(kMaxThreads, 1) adaln_modulate_kernel(AdalnArgs a) {
  constexpr int VEC = 16 / sizeof(T);
  __shared__ float red[3][32];  // per-warp (n, mean, M2), or the per-warp sum of squares for RMS

  const int64_t r = blockIdx.x;
  const int64_t b = r / a.S, s = r % a.S;
  const int D = static_cast<int>(a.D);
  const int tid = threadIdx.x;
  const T* x = reinterpret_cast<const T*>(a.x) + b * a.sx_b + s * a.sx_s;
  const T* y = a.y ? reinterpret_cast<const T*>(a.y) + b * a.sy_b + s * a.sy_s : nullptr;
  const M* gate = a.gate ? reinterpret_cast<const M*>(a.gate) + b * a.sg_b + s * a.sg_s : nullptr;
  const M* shift = a.shift ? reinterpret_cast<const M*>(a.shift) + b * a.ssh_b + s * a.ssh_s : nullptr;
  const M* scale = a.scale ? reinterpret_cast<const M*>(a.scale) + b * a.ssc_b + s * a.ssc_s : nullptr;
  const float* weight = reinterpret_cast<const float*>(a.weight);
  const float* bias = reinterpret_cast<const float*>(a.bias);
  T* h_out = a.h_out ? reinterpret_cast<T*>(a.h_out) + b * a.sh_b + s * a.sh_s : nullptr;
  T* out = reinterpret_cast<T*>(a.out) + b * a.so_b + s * a.so_s;

  // ---- every load of the row first (independent, all in flight together) ----
  // shift/scale join them where the raw operands fit the register budget (kEarly); otherwise they, like the fp32
  // weight/bias (L1/L2-resident [D] vectors shared by every row), are loaded after the reduction
  constexpr bool kEarly = NV * VEC * (2 * sizeof(T) + 3 * sizeof(M)) <= 96 * 4;
  // an absent operand's words stay unset: every use of them is behind a select on its pointer
  Raw<T, VEC> rx[NV], ry[NV];
  Raw<M, VEC> rg[NV], rsh[NV], rsc[NV];
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int i = (k * blockDim.x + tid) * VEC;
    if (i < D) {
      rx[k].load(x + i);
      if (y) ry[k].load(y + i);
      if (gate) rg[k].load(gate + i);
      if (kEarly && shift) rsh[k].load(shift + i);
      if (kEarly && scale) rsc[k].load(scale + i);
    }
  }

  // ---- the (residual-added) row in fp32 registers; h stored ----
  float v[NV][VEC];
  int n_mine = 0;  // vectors this thread holds
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int i = (k * blockDim.x + tid) * VEC;
    if (i < D) {
      ++n_mine;
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[k][j] = rx[k][j];
      if (y) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float g = gate ? rg[k][j] : 1.f;  // selects, not branches: one code path for every operand mix
          v[k][j] = to_float<T>(from_float<T>(v[k][j] + ry[k][j] * g));  // the stored residual stream
        }
        store_vec<T, VEC>(h_out + i, v[k]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[k][j] = 0.f;
    }
  }

  // ---- statistics: one block-wide reduction ----
  const int lane = tid & 31, warp = tid >> 5, n_warps = (blockDim.x + 31) >> 5;
  float mean = 0.f, rstd;
  if (a.is_rms) {
    float sq = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k)
#pragma unroll
      for (int j = 0; j < VEC; ++j) sq = fmaf(v[k][j], v[k][j], sq);  // unheld vectors are 0
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sq += __shfl_down_sync(0xffffffffu, sq, o);
    if (lane == 0) red[0][warp] = sq;
    __syncthreads();
    sq = 0.f;
    for (int w = 0; w < n_warps; ++w) sq += red[0][w];
    rstd = rsqrtf(sq / D + a.eps);
  } else {
    float cnt = static_cast<float>(n_mine * VEC), m = 0.f, m2 = 0.f;
    if (n_mine) {
      float sum = 0.f;
#pragma unroll
      for (int k = 0; k < NV; ++k)
#pragma unroll
        for (int j = 0; j < VEC; ++j) sum += v[k][j];
      m = sum / cnt;
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        if (k < n_mine) {  // a thread's vectors are k = 0 .. n_mine - 1
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const float c = v[k][j] - m;
            m2 = fmaf(c, c, m2);
          }
        }
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float nb = __shfl_down_sync(0xffffffffu, cnt, o);
      const float mb = __shfl_down_sync(0xffffffffu, m, o);
      const float m2b = __shfl_down_sync(0xffffffffu, m2, o);
      if (lane + o < 32) chan_merge(cnt, m, m2, nb, mb, m2b);
    }
    if (lane == 0) red[0][warp] = cnt, red[1][warp] = m, red[2][warp] = m2;
    __syncthreads();
    cnt = m = m2 = 0.f;
    for (int w = 0; w < n_warps; ++w) chan_merge(cnt, m, m2, red[0][w], red[1][w], red[2][w]);
    mean = m;
    rstd = rsqrtf(m2 / D + a.eps);
  }

  // ---- normalise, modulate, store ----
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int i = (k * blockDim.x + tid) * VEC;
    if (i < D) {
      if (!kEarly && shift) rsh[k].load(shift + i);
      if (!kEarly && scale) rsc[k].load(scale + i);
      Raw<float, VEC> rw, rb;
      if (weight) rw.load(weight + i);
      if (bias) rb.load(bias + i);
      float n[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        // absent operands as their identity (selects: multiplying by 1 and adding 0 are exact)
        const float w = weight ? rw[j] : 1.f, bb = bias ? rb[j] : 0.f;
        const float sc = scale ? rsc[k][j] : 0.f, sh = shift ? rsh[k][j] : 0.f;
        n[j] = ((v[k][j] - mean) * rstd * w + bb) * (1.f + sc) + sh;
      }
      store_vec<T, VEC>(out + i, n);
    }
  }
}

template <typename T, typename M, int NV>
void launch_nv(const AdalnArgs& a, int threads) {
  adaln_modulate_kernel<T, M, NV>
      <<<static_cast<unsigned>(a.B * a.S), threads, 0, reinterpret_cast<cudaStream_t>(a.stream)>>>(a);
  check_cuda(cudaGetLastError(), "adaln_modulate (launch)");
}

// NV for a row of D elements of `elt` bytes, and the block size in *threads_out; 0 when D needs more than
// kMaxThreads x 4 vectors. NV is one of 1, 2, 4 (each NV is one kernel per dtype pair: 15 kernels, which keeps the
// extension's build time near what it was). The choice maximises the predicted HBM bytes in flight per SM, which is
// what a memory-bound row kernel's bandwidth follows: resident threads are register-bound (65536 / registers), each
// holding NV vectors of which the busy fraction carries data, so the score is NV * busy / registers(NV), registers
// ~ 32 + 20 * NV (ptxas: ~55 / 64-76 / 102-120 at NV = 1 / 2 / 4). FLUX 3072 / Wan 5120 (16-bit): 4 vectors x 96 /
// 160 threads, all busy; SD3 1536: 2 x 96, all busy; PixArt 1152: 2 x 96 with 75% busy (1 x 160 would be 90% busy
// but hold 0.8x the bytes).
int adaln_vectors_per_thread(int64_t D, int elt, int* threads_out) {
  const int64_t n_vec = D / (16 / elt);
  int best_nv = 0, best_threads = 0;
  double best_score = -1.0;
  for (int nv : {1, 2, 4}) {
    const int64_t threads = ((n_vec + nv - 1) / nv + 31) / 32 * 32;
    if (threads > kMaxThreads) continue;
    const double busy = static_cast<double>(n_vec) / static_cast<double>(threads * nv);
    const double score = nv * busy / (32.0 + 20.0 * nv);
    if (score > best_score) best_nv = nv, best_threads = static_cast<int>(threads), best_score = score;
  }
  if (threads_out) *threads_out = best_threads;
  return best_nv;
}

template <typename T, typename M>
void launch(const AdalnArgs& a) {
  int threads = 0;
  const int nv = adaln_vectors_per_thread(a.D, sizeof(T), &threads);
  switch (nv) {
    case 1: launch_nv<T, M, 1>(a, threads); break;
    case 2: launch_nv<T, M, 2>(a, threads); break;
    case 4: launch_nv<T, M, 4>(a, threads); break;
    default:
      throw std::invalid_argument("ditkern._C.adaln_modulate: D=" + std::to_string(a.D) +
                                  " exceeds the register-resident row (at most 512 threads x 4 vectors of 16 bytes)");
  }
}

}  // namespace

void adaln_modulate_launch(const AdalnArgs& a) {
  if (a.B * a.S == 0 || a.D == 0) return;
  if (a.B * a.S > 0x7fffffffLL) throw std::invalid_argument("ditkern._C.adaln_modulate: B*S exceeds the grid limit");
  if (a.mod_dtype != 0 && a.mod_dtype != a.x_dtype)
    throw std::invalid_argument("ditkern._C.adaln_modulate: modulation dtype must be fp32 or x's dtype");
  const int elt = a.x_dtype == 0 ? 4 : 2;
  if (a.D % (16 / elt))
    throw std::invalid_argument("ditkern._C.adaln_modulate: D must be a multiple of the 16-byte vector");
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
