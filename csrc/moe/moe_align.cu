// moe_align: routed rows sorted by expert (stable), each expert's segment padded to a multiple of block_m with the
// sentinel N, the expert of every block_m row block (-1 past the padded total), and the padded total - on the device,
// into buffers whose sizes depend only on (N, E, block_m), so the caller never waits for the host.
//
// Grid: one thread block per expert. Block e counts every expert (shared-memory histogram; it needs the padded sizes
// of the experts before it), then compacts its own rows in input order: each tile of blockDim rows is ranked with a
// warp ballot + a prefix over the warps, so the order is deterministic. Block 0 also writes everything past the last
// segment. The ids are read E + 1 times, from L2 after the first (N * 4 bytes: 128 KiB for 4096 tokens x top-8).
// Layout as in fused-MoE dispatch of LLM inference engines (vLLM's moe_align_block_size), written for static sizes.
#include "common.cuh"
#include "moe/moe_align.h"

namespace ditkern {
namespace {

constexpr int kThreads = 512;

template <typename IdT>
__global__ void __launch_bounds__(kThreads) moe_align_kernel(MoeAlignArgs a) {
  extern __shared__ int counts[];  // [E]
  __shared__ int warp_tot[kThreads / 32];
  __shared__ long long red[2][kThreads / 32];
  const IdT* ids = reinterpret_cast<const IdT*>(a.ids);
  int* sorted = reinterpret_cast<int*>(a.sorted_ids);
  int* block_expert = reinterpret_cast<int*>(a.block_expert);
  const int E = static_cast<int>(a.num_experts);
  const int64_t N = a.N, bm = a.block_m;
  const int e = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;

  for (int i = threadIdx.x; i < E; i += blockDim.x) counts[i] = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const int64_t v = static_cast<int64_t>(ids[i]);
    if (v >= 0 && v < E) atomicAdd(&counts[v], 1);  // out-of-range ids are placed nowhere
  }
  __syncthreads();

  // segment start of expert e and the padded total: two block reductions
  long long before = 0, total = 0;
  for (int i = threadIdx.x; i < E; i += blockDim.x) {
    const long long p = (counts[i] + bm - 1) / bm * bm;
    total += p;
    if (i < e) before += p;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    before += __shfl_xor_sync(0xffffffffu, before, o);
    total += __shfl_xor_sync(0xffffffffu, total, o);
  }
  if (lane == 0) {
    red[0][warp] = before;
    red[1][warp] = total;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    long long b = 0, t = 0;
    for (int w = 0; w < n_warps; ++w) {
      b += red[0][w];
      t += red[1][w];
    }
    red[0][0] = b;
    red[1][0] = t;
  }
  __syncthreads();
  const int64_t seg_start = red[0][0], padded_total = red[1][0];
  const int64_t cnt = counts[e];
  const int64_t seg_end = seg_start + (cnt + bm - 1) / bm * bm;

  // stable compaction of this expert's rows
  int64_t run = seg_start;
  for (int64_t base = 0; base < N; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const bool hit = i < N && static_cast<int64_t>(ids[i]) == e;
    const unsigned mask = __ballot_sync(0xffffffffu, hit);
    const int in_warp = __popc(mask & ((1u << lane) - 1u));
    if (lane == 0) warp_tot[warp] = __popc(mask);
    __syncthreads();
    int offset = 0, tile = 0;
    for (int w = 0; w < n_warps; ++w) {
      const int c = warp_tot[w];
      offset += w < warp ? c : 0;
      tile += c;
    }
    if (hit) sorted[run + offset + in_warp] = static_cast<int>(i);
    run += tile;
    __syncthreads();  // warp_tot is rewritten by the next tile
  }
  for (int64_t r = seg_start + cnt + threadIdx.x; r < seg_end; r += blockDim.x) sorted[r] = static_cast<int>(N);
  for (int64_t b = seg_start / bm + threadIdx.x; b < seg_end / bm; b += blockDim.x) block_expert[b] = e;

  if (e == 0) {
    for (int64_t r = padded_total + threadIdx.x; r < a.max_rows; r += blockDim.x) sorted[r] = static_cast<int>(N);
    for (int64_t b = padded_total / bm + threadIdx.x; b < a.max_blocks; b += blockDim.x) block_expert[b] = -1;
    if (threadIdx.x == 0) *reinterpret_cast<int*>(a.num_post_pad) = static_cast<int>(padded_total);
  }
}

}  // namespace

void moe_align_launch(const MoeAlignArgs& a) {
  if (a.num_experts <= 0) throw std::invalid_argument("ditkern._C.moe_align: num_experts must be positive");
  if (a.num_experts > 8192) throw std::invalid_argument("ditkern._C.moe_align: at most 8192 experts");
  if (a.block_m < 1 || (a.block_m & (a.block_m - 1)))
    throw std::invalid_argument("ditkern._C.moe_align: block_m must be a power of two");
  if (a.N < 0 || a.N >= 0x7fffffffLL) throw std::invalid_argument("ditkern._C.moe_align: N must be in [0, 2^31 - 1)");
  if (a.max_rows != a.max_blocks * a.block_m)
    throw std::invalid_argument("ditkern._C.moe_align: max_rows must equal max_blocks * block_m");
  if (a.N == 0 || a.max_blocks == 0) return;
  DeviceGuard guard(a.device, "moe_align");
  const size_t smem = static_cast<size_t>(a.num_experts) * sizeof(int);
  const auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  const unsigned grid = static_cast<unsigned>(a.num_experts);
  if (a.ids_int64) {
    moe_align_kernel<int64_t><<<grid, kThreads, smem, stream>>>(a);
  } else {
    moe_align_kernel<int32_t><<<grid, kThreads, smem, stream>>>(a);
  }
  check_cuda(cudaGetLastError(), "moe_align (launch)");
}

}  // namespace ditkern
