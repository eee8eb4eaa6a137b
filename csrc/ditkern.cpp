// pybind11 module ditkern._C: thin bindings over the CUDA launchers. No torch headers: the Python side passes
// device pointers, sizes, strides and the CUDA stream, so one build serves every torch version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include <string>
#include <tuple>
#include <vector>

#include "adaln_modulate/adaln_modulate.h"
#include "fpx/fpx_gemv.h"
#include "kernel_image/kernel_image.h"
#include "moe/moe_align.h"
#include "taylor/taylor.h"

namespace py = pybind11;

static void adaln_modulate(uintptr_t x, uintptr_t y, uintptr_t gate, uintptr_t shift, uintptr_t scale,
                           uintptr_t weight, uintptr_t bias, uintptr_t h_out, uintptr_t out, int64_t B, int64_t S,
                           int64_t D, const std::vector<int64_t>& strides, int x_dtype, int mod_dtype, int is_rms,
                           double eps, uintptr_t stream, int device) {
  if (strides.size() != 14) throw std::invalid_argument("ditkern._C.adaln_modulate: strides must have 14 entries");
  ditkern::AdalnArgs a{x, y, gate, shift, scale, weight, bias, h_out, out, B, S, D,
                       strides[0], strides[1], strides[2], strides[3], strides[4], strides[5], strides[6],
                       strides[7], strides[8], strides[9], strides[10], strides[11], strides[12], strides[13],
                       x_dtype, mod_dtype, is_rms, static_cast<float>(eps), stream, device};
  py::gil_scoped_release release;
  ditkern::adaln_modulate_launch(a);
}

static void moe_align(uintptr_t ids, int ids_int64, int64_t N, int64_t E, int64_t block_m, uintptr_t sorted_ids, uintptr_t block_expert, uintptr_t num_post_pad, int64_t max_rows, int64_t max_blocks, uintptr_t stream, int device) {
  ditkern::MoeAlignArgs a{ids, ids_int64, N, E, block_m, sorted_ids, block_expert, num_post_pad, max_rows, max_blocks, stream, device};
  py::gil_scoped_release release;
  ditkern::moe_align_launch(a);
}

static ditkern::TaylorArgs taylor_args(uintptr_t x, uintptr_t base, uintptr_t d0, uintptr_t d1, uintptr_t d2,
                                       uintptr_t out, uintptr_t c1, uintptr_t c2, uintptr_t mask, int64_t B, int64_t N,
                                       int order, int dtype, uintptr_t stream, int device) {
  return ditkern::TaylorArgs{x, base, d0, d1, d2, out, c1, c2, mask, B, N, order, dtype, stream, device};
}

static void taylor_update(uintptr_t x, uintptr_t base, uintptr_t d0, uintptr_t d1, uintptr_t d2, uintptr_t out,
                          uintptr_t c1, uintptr_t c2, uintptr_t mask, int64_t B, int64_t N, int order, int dtype,
                          uintptr_t stream, int device) {
  auto a = taylor_args(x, base, d0, d1, d2, out, c1, c2, mask, B, N, order, dtype, stream, device);
  py::gil_scoped_release release;
  ditkern::taylor_update_launch(a);
}

static void taylor_forecast(uintptr_t x, uintptr_t base, uintptr_t d0, uintptr_t d1, uintptr_t d2, uintptr_t out,
                            uintptr_t a1, uintptr_t a2, uintptr_t mask, int64_t B, int64_t N, int order, int dtype,
                            uintptr_t stream, int device) {
  auto a = taylor_args(x, base, d0, d1, d2, out, a1, a2, mask, B, N, order, dtype, stream, device);
  py::gil_scoped_release release;
  ditkern::taylor_forecast_launch(a);
}

static void fpx_gemv(uintptr_t x, uintptr_t packed, uintptr_t scales, uintptr_t bias, uintptr_t inv_smooth,
                     uintptr_t out, int64_t M, int64_t N, int64_t K, int64_t K_pad, const std::vector<int64_t>& strides,
                     int group_size, int bits, int x_dtype, int scale_kind, const std::vector<float>& lut,
                     uintptr_t stream, int device) {
  if (strides.size() != 4) throw std::invalid_argument("ditkern._C.fpx_gemv: strides must have 4 entries");
  if (lut.size() != (size_t(1) << bits)) throw std::invalid_argument("ditkern._C.fpx_gemv: lut needs 2**bits entries");
  ditkern::FpxGemvArgs a{x, packed, scales, bias, inv_smooth, out, M, N, K, K_pad,
                         strides[0], strides[1], strides[2], strides[3], group_size, bits, x_dtype, scale_kind, {},
                         stream, device};
  for (size_t i = 0; i < lut.size(); ++i) a.lut[i] = lut[i];
  py::gil_scoped_release release;
  ditkern::fpx_gemv_launch(a);
}

// (error code, message) of cudaGetDeviceCount: tells `ditkern info` whether a driver and a device are present.
static std::tuple<int, std::string, int> cuda_status() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  return {int(err), std::string(cudaGetErrorString(err)), err == cudaSuccess ? count : 0};
}

static int cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

// setup.py defines these from DITKERN_CUDA_ARCH: the SASS architectures and the PTX embedded in every kernel.
#ifndef DITKERN_ARCHS
#define DITKERN_ARCHS ""
#endif
#ifndef DITKERN_PTX
#define DITKERN_PTX ""
#endif
#ifndef DITKERN_LINEINFO
#define DITKERN_LINEINFO 0
#endif

static std::vector<std::string> split_archs(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    size_t end = s.find(';', start);
    if (end == std::string::npos) end = s.size();
    if (end > start) out.push_back(s.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

static py::dict build_info() {
  py::dict d;
  d["archs"] = split_archs(DITKERN_ARCHS);  // SASS: sm_<arch> for each
  d["ptx"] = split_archs(DITKERN_PTX);      // PTX: compute_<ptx> for each (JIT-compiled on newer GPUs)
  d["cuda_runtime"] = int(CUDART_VERSION);
  d["lineinfo"] = bool(DITKERN_LINEINFO);
  return d;
}

// (error code, "cudaErrorName: message", SASS version, PTX version) of loading ditkern's kernels on `device`.
static std::tuple<int, std::string, int, int> kernel_image_status(int device) {
  ditkern::KernelImageStatus s;
  {
    py::gil_scoped_release release;  // a PTX JIT can take a while
    s = ditkern::kernel_image_status(device);
  }
  auto err = static_cast<cudaError_t>(s.error);
  return {s.error, std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err), s.binary_version,
          s.ptx_version};
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "ditkern CUDA kernels (raw-pointer bindings; see ditkern/ops for the public API)";
  m.def("adaln_modulate", &adaln_modulate, "fused (gated residual +) norm + adaLN modulate");
  m.def("moe_align", &moe_align, "MoE rows sorted by expert, padded per expert to block_m (static sizes, no host sync)");
  m.def("taylor_update", &taylor_update, "Taylor divided-difference state update (in place)");
  m.def("taylor_forecast", &taylor_forecast, "Taylor forecast + residual add");
  m.def("fpx_gemv", &fpx_gemv, "weight-only FP4/FP6/int4 GEMV for M <= 16");
  m.def("cuda_status", &cuda_status, "(error code, message, device count) from cudaGetDeviceCount");
  m.def("cuda_runtime_version", &cuda_runtime_version, "CUDA runtime version the extension was built with");
  m.def("build_info", &build_info, "{'archs': SASS architectures, 'ptx': embedded PTX, 'cuda_runtime', 'lineinfo'}");
  m.def("kernel_image_status", &kernel_image_status, py::arg("device"),
        "(cudaError code, message, SASS version, PTX version) of cudaFuncGetAttributes on a ditkern kernel");
}
