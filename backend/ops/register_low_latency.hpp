#pragma once

#include <torch/csrc/utils/pybind.h>

namespace ep {
// Binds the low-latency ops' argument checks and NVSHMEM runtime into torch_ep._C.
void register_low_latency(pybind11::module_& m);
}  // namespace ep
