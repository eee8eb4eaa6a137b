// A kernel that exists to be asked about: every .cu file is compiled with the same -gencode list (one ninja rule in
// setup.py), so this translation unit carries exactly the SASS images and PTX every kernel of ditkern._C carries, and
// whether it can load on a device answers the question for all of them - before the first real launch fails with
// "no kernel image is available for execution on the device".
#include <cuda_runtime.h>

#include "kernel_image/kernel_image.h"

namespace ditkern {
namespace {

__global__ void kernel_image_probe_kernel(int* out) {
  if (out) *out = 1;
}

}  // namespace

KernelImageStatus kernel_image_status(int device) {
  KernelImageStatus s{0, 0, 0};
  int prev = -1;
  cudaError_t err = cudaGetDevice(&prev);
  if (err == cudaSuccess && prev != device) err = cudaSetDevice(device);
  if (err == cudaSuccess) {
    cudaFuncAttributes attr{};
    err = cudaFuncGetAttributes(&attr, kernel_image_probe_kernel);
    if (err == cudaSuccess) {
      s.binary_version = attr.binaryVersion;
      s.ptx_version = attr.ptxVersion;
    }
    if (prev >= 0 && prev != device) cudaSetDevice(prev);
  }
  // A failed query must not leave a sticky error for the caller's next cudaGetLastError (the launch checks).
  cudaGetLastError();
  s.error = int(err);
  return s;
}

}  // namespace ditkern
