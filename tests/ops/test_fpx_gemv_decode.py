"""The CUDA GEMV's decoder (csrc/fpx/fpx_decode.cuh, compiled here as host C++) against ditkern.formats: every code of
every format, packed by ``formats.pack`` (FP6 as two bit planes), decoded 32-code chunk by chunk from the same 16 + 8
bytes and 32-bit words that fpx_gemv.cu's ``decode8`` reads. Runs without a GPU; needs a C++17 compiler."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ditkern.quant import formats as F

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
FORMAT_IDS = {"fp4_e2m1": 0, "int4": 1, "fp6_e3m2": 2, "fp6_e2m3": 3}  # fpx::kFp4E2m1 ... in fpx_decode.cuh

HARNESS = r"""
#include <cmath>
#include <cstdio>
#include <vector>
#include "fpx/fpx_decode.cuh"
using namespace ditkern::fpx;
static uint32_t le32(const std::vector<int>& p, int at) {
  return uint32_t(p[at]) | uint32_t(p[at + 1]) << 8 | uint32_t(p[at + 2]) << 16 | uint32_t(p[at + 3]) << 24;
}
int main() {
  int fmt, N, kp, row;
  while (std::scanf("%d %d %d %d", &fmt, &N, &kp, &row) == 4) {
    std::vector<int> p(N * row);
    for (int& b : p) std::scanf("%d", &b);
    const Decoder d = decoder(fmt);
    for (int n = 0; n < N; ++n) {
      std::vector<float> v(kp);
      for (int ch = 0; ch < kp / 32; ++ch) {
        for (int q = 0; q < 4; ++q) {
          const uint32_t hi = le32(p, n * row + 16 * ch + 4 * q);
          const uint32_t lo = d.bits == 6 ? le32(p, n * row + kp / 2 + 8 * ch + 4 * (q / 2)) : 0u;
          uint32_t h[4];
          if (d.bits == 4) chunk_pairs<4>(hi, lo, q, d, h);
          else chunk_pairs<6>(hi, lo, q, d, h);
          for (int j = 0; j < 4; ++j) {
            v[32 * ch + 8 * q + j] = std::ldexp(half_bits_to_float(h[j] & 0xFFFFu), d.pow);
            v[32 * ch + 8 * q + j + 4] = std::ldexp(half_bits_to_float(h[j] >> 16), d.pow);
          }
        }
      }
      for (float x : v) std::printf("%a ", x);
      std::printf("\n");
    }
  }
}
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler")
    tmp = tmp_path_factory.mktemp("fpx_decode")
    (tmp / "harness.cpp").write_text(HARNESS)
    exe = tmp / "harness"
    subprocess.run([CXX, "-std=c++17", "-O0", f"-I{CSRC}", str(tmp / "harness.cpp"), "-o", str(exe)], check=True)
    return exe


def test_gemv_decoder_reads_the_packed_layout_exactly(harness):
    torch.manual_seed(0)
    cases, want = [], []
    for name, fid in FORMAT_IDS.items():
        fmt = F.FORMATS[name]
        for kp in (96, 128):  # 96: K_pad % 64 == 32, FP6 rows of 72 bytes (the GEMV's 8-byte-aligned case)
            codes = torch.randint(0, 1 << fmt.bits, (3, kp), dtype=torch.uint8)
            codes[0, : 1 << fmt.bits] = torch.arange(1 << fmt.bits, dtype=torch.uint8)  # every code at least once
            packed = F.pack(codes, fmt)
            cases.append(f"{fid} 3 {kp} {packed.shape[1]}\n" + " ".join(map(str, packed.flatten().tolist())))
            want.append(F.decode(codes, fmt))
    out = subprocess.run([str(harness)], input="\n".join(cases) + "\n", capture_output=True, text=True, check=True)
    rows = out.stdout.splitlines()
    for i, w in enumerate(want):
        g = torch.tensor([[float.fromhex(t) for t in rows[3 * i + r].split()] for r in range(3)])
        assert torch.equal(g, w) and torch.equal(torch.signbit(g), torch.signbit(w))  # -0.0 codes included
