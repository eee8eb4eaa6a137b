#pragma once
#include <cstdint>

namespace ditkern {

// Arguments of moe_align: device pointers, sizes. See ditkern/ops/moe.py for the layout it produces.
struct MoeAlignArgs {
  uintptr_t ids;          // [N] expert ids, int32 (ids_int64 = 0) or int64 (1)
  int ids_int64;
  int64_t N;              // routed rows = tokens * top_k
  int64_t num_experts;
  int64_t block_m;        // power of two >= 16
  uintptr_t sorted_ids;   // [max_rows] int32 out
  uintptr_t block_expert; // [max_blocks] int32 out
  uintptr_t num_post_pad; // [1] int32 out
  int64_t max_rows, max_blocks;
  uintptr_t stream;
  int device;
};

void moe_align_launch(const MoeAlignArgs& a);

}  // namespace ditkern
