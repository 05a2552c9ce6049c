#pragma once

#include <torch/csrc/utils/pybind.h>

namespace ep {
// Binds what the MoE ops need besides their torch ops (torch_ep.combine_buffer) into torch_ep._C.
void register_moe(pybind11::module_& m);
}  // namespace ep
