// The CUDA driver's functions found through the runtime rather than linked by name: code that
// calls them still loads on a driver older than the functions (kernel_preload.cpp), and a
// stand-alone probe needs no libcuda at link time (tools/vmm_share.hpp). Torch-free.
#pragma once

#include <cuda_runtime.h>

namespace ep {

#if CUDART_VERSION >= 12050
// *fn = the driver's `symbol` of ABI `version` (as its PFN_<symbol>_v<version> type says); false
// where this driver lacks it (the runtime's error cleared).
template <class Fn>
bool driver_entry_point(const char* symbol, unsigned int version, Fn* fn) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  if (cudaGetDriverEntryPointByVersion(symbol, &p, version, cudaEnableDefault, &found) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  *fn = reinterpret_cast<Fn>(p);
  return found == cudaDriverEntryPointSuccess && p;
}
#endif

}  // namespace ep
