#include "backend/transport/cuda/kernel_preload.hpp"

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <set>
#include <vector>

#include "backend/common/env_switch.hpp"
#include "backend/kernels/module_kernels.hpp"
#include "backend/transport/cuda/driver_entry_point.hpp"

namespace ep {
namespace {

// A kernel of each module. The -rdc files share one module: counted once (modules go by handle).
const void* (*const kModuleKernels[])() = {
    kernels::all_to_all_module_kernel,  kernels::all_to_all_v_module_kernel, kernels::internode_module_kernel,
    kernels::moe_module_kernel,         kernels::moe_bulk_module_kernel,     kernels::moe_push_module_kernel,
    kernels::moe_records_module_kernel, kernels::moe_unroll_module_kernel,
#ifdef TORCH_EP_WITH_NVSHMEM
    kernels::low_latency_dispatch_module_kernel, kernels::low_latency_combine_module_kernel,
    kernels::internode_notify_module_kernel,     kernels::internode_dispatch_module_kernel,
    kernels::internode_combine_module_kernel,    kernels::internode_exchange_module_kernel,
#endif
};

std::mutex preload_mutex;
KernelPreload preload_state;   // under preload_mutex
std::set<int> devices_loaded;  // under preload_mutex

std::string failure(const char* call, cudaError_t error) {
  cudaGetLastError();  // not left for the next launch's check
  return std::string(call) + ": " + cudaGetErrorName(error);
}

#if CUDART_VERSION >= 12050
// The driver's functions, found through the runtime: linked by name, the ones from 12.4 would keep
// _C from loading on an older driver.
struct Driver {
  PFN_cuModuleGetLoadingMode_v11070 loading_mode = nullptr;
  PFN_cuFuncGetModule_v11000 module_of = nullptr;
  PFN_cuModuleGetFunctionCount_v12040 function_count = nullptr;
  PFN_cuModuleEnumerateFunctions_v12040 enumerate = nullptr;
  PFN_cuFuncLoad_v12040 load = nullptr;
  PFN_cuGetErrorName_v6000 error_name = nullptr;

  std::string failure(const char* call, CUresult result) const {
    const char* name = nullptr;
    if (error_name) error_name(result, &name);
    return std::string(call) + ": " + (name ? name : "CUresult " + std::to_string(int(result)));
  }
};

// Fills `d`; returns why nothing is to be loaded, or "".
std::string find_driver(Driver& d) {
  driver_entry_point("cuGetErrorName", 6000, &d.error_name);
  if (!driver_entry_point("cuModuleGetLoadingMode", 11070, &d.loading_mode) ||
      !driver_entry_point("cuFuncGetModule", 11000, &d.module_of) ||
      !driver_entry_point("cuModuleGetFunctionCount", 12040, &d.function_count) ||
      !driver_entry_point("cuModuleEnumerateFunctions", 12040, &d.enumerate) ||
      !driver_entry_point("cuFuncLoad", 12040, &d.load))
    return "the driver has no cuModuleEnumerateFunctions or cuFuncLoad (CUDA 12.4+)";
  CUmoduleLoadingMode mode = CU_MODULE_LAZY_LOADING;
  if (d.loading_mode(&mode) == CUDA_SUCCESS && mode == CU_MODULE_EAGER_LOADING)
    return "eager module loading (CUDA_MODULE_LOADING=EAGER): every kernel is loaded at start";
  return "";
}

// Loads every kernel of the module holding `kernel`, unless `seen` has it; returns the first failure.
std::string load_module(const Driver& d, const void* kernel, std::vector<CUmodule>& seen, KernelPreload& out) {
  cudaFunction_t function = nullptr;
  if (cudaError_t e = cudaGetFuncBySymbol(&function, kernel); e != cudaSuccess) return failure("cudaGetFuncBySymbol", e);
  CUmodule module = nullptr;
  if (CUresult r = d.module_of(&module, reinterpret_cast<CUfunction>(function)); r != CUDA_SUCCESS)
    return d.failure("cuFuncGetModule", r);
  if (std::find(seen.begin(), seen.end(), module) != seen.end()) return "";
  seen.push_back(module);
  unsigned int count = 0;
  if (CUresult r = d.function_count(&count, module); r != CUDA_SUCCESS) return d.failure("cuModuleGetFunctionCount", r);
  std::vector<CUfunction> functions(count);
  if (CUresult r = d.enumerate(functions.data(), count, module); r != CUDA_SUCCESS)
    return d.failure("cuModuleEnumerateFunctions", r);
  std::string error;
  int loaded = 0;
  for (CUfunction f : functions) {
    const CUresult r = d.load(f);
    if (r == CUDA_SUCCESS)
      ++loaded;
    else if (error.empty())
      error = d.failure("cuFuncLoad", r);
  }
  ++out.modules;
  out.functions += loaded;
  return error;
}
#endif

}  // namespace

void preload_kernels(int device) {
  // On unless TORCH_EP_PRELOAD_KERNELS=0 (a value other than 0 or 1 raises, naming it).
  const bool on = env_switch_on_by_default("TORCH_EP_PRELOAD_KERNELS");
  std::lock_guard<std::mutex> lock(preload_mutex);
  if (!devices_loaded.insert(device).second) return;
  if (!on) {
    preload_state.skipped = "TORCH_EP_PRELOAD_KERNELS=0";
    return;
  }
#if CUDART_VERSION >= 12050
  int before = -1;
  if (cudaError_t e = cudaGetDevice(&before); e != cudaSuccess) {
    if (preload_state.error.empty()) preload_state.error = failure("cudaGetDevice", e);
    return;
  }
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) {
    if (preload_state.error.empty()) preload_state.error = failure("cudaSetDevice", e);
    return;
  }
  static Driver driver;
  static const std::string unusable = find_driver(driver);  // once the device's context is up
  if (!unusable.empty()) {
    preload_state.skipped = unusable;
  } else {
    std::vector<CUmodule> seen;
    for (const void* (*kernel_of)() : kModuleKernels) {
      const std::string error = load_module(driver, kernel_of(), seen, preload_state);
      if (!error.empty() && preload_state.error.empty()) preload_state.error = error;
    }
  }
  if (before != device) cudaSetDevice(before);
#else
  preload_state.skipped = "built with CUDA < 12.5 (no cudaGetDriverEntryPointByVersion)";
#endif
}

KernelPreload kernels_preloaded() {
  std::lock_guard<std::mutex> lock(preload_mutex);
  return preload_state;
}

}  // namespace ep
