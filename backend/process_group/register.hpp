#pragma once

#include <torch/csrc/utils/pybind.h>

namespace ep {
// Binds Config and ProcessGroupEP into torch_ep._C.
void register_process_group(pybind11::module_& m);
}  // namespace ep
