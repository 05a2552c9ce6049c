// torch_ep's kernels loaded at set-up. Under CUDA's lazy loading (the default since 12.2) a
// kernel's code is loaded at its first launch, and that load may wait for the device: behind one
// of our kernels spinning on a lost peer, the host would be held until that wait times out. The
// transports call preload_kernels() before any kernel of ours can spin. Torch-free.
#pragma once

#include <string>

namespace ep {

struct KernelPreload {
  int modules = 0;      // modules whose kernels were loaded (all devices)
  int functions = 0;    // kernels loaded
  std::string skipped;  // why nothing was loaded, where it was not: switched off, eager loading, old driver
  std::string error;    // the first failure (set-up goes on: kernels then load at their first launch)
};

// Loads every kernel of torch_ep's modules on `device`, once per device and process; best effort
// (a failure is kept in kernels_preloaded().error). TORCH_EP_PRELOAD_KERNELS=0 turns it off;
// another value than 0 or 1 raises (env_switch).
void preload_kernels(int device);

KernelPreload kernels_preloaded();

}  // namespace ep
