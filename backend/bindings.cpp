// torch_ep._C: one register_* call per subsystem.
#include <torch/csrc/utils/pybind.h>

#include "backend/ops/moe_protocol.hpp"
#include "backend/ops/register_low_latency.hpp"
#include "backend/ops/register_moe.hpp"
#include "backend/process_group/register.hpp"

PYBIND11_MODULE(_C, m) {
  m.doc() = "torch_ep native extension";
  ep::register_process_group(m);
  ep::register_low_latency(m);
  ep::register_moe(m);
  m.attr("max_matrix_ranks") = ep::moe::kMaxMatrixRanks;
#ifdef TORCH_EP_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
