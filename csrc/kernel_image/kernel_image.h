#pragma once

namespace ditkern {

// What the runtime says about running ditkern's kernels on `device`: cudaFuncGetAttributes on a kernel of this
// extension, which loads (or JIT-compiles from the embedded PTX) the module for that device. `error` is the
// cudaError_t code (0 = runnable; 209 cudaErrorNoKernelImageForDevice / 98 cudaErrorInvalidDeviceFunction = no SASS
// image and no PTX that can JIT); binary_version / ptx_version are the SASS and PTX versions the runtime picked
// (e.g. 90 / 100), valid when error == 0.
struct KernelImageStatus {
  int error;
  int binary_version;
  int ptx_version;
};

KernelImageStatus kernel_image_status(int device);

}  // namespace ditkern
