// The CUDA translation unit of the build: runtime queries used by build_info(). Kernels
// for the GPU paths (issues 4-6) live beside it; this file keeps nvcc in every CI build.
#include <cuda_runtime.h>

#include "runtime.h"

namespace llmk {
namespace cuda {

int runtime_version() {
  int v = 0;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : 0;
}

int driver_version() {
  int v = 0;
  return cudaDriverGetVersion(&v) == cudaSuccess ? v : 0;
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver / no device" error
    return 0;
  }
  return n;
}

std::vector<std::string> device_names() {
  std::vector<std::string> names;
  const int n = device_count();
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, i) == cudaSuccess)
      names.push_back(std::string(prop.name) + " (sm_" + std::to_string(prop.major) +
                      std::to_string(prop.minor) + ")");
  }
  return names;
}

}  // namespace cuda
}  // namespace llmk
