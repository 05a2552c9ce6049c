// torch_ep._C: one register_* call per subsystem.
#include <torch/csrc/utils/pybind.h>

#include <tuple>

#include "backend/common/phase_clock.hpp"
#include "backend/ops/moe_protocol.hpp"
#include "backend/ops/register_low_latency.hpp"
#include "backend/ops/register_moe.hpp"
#include "backend/process_group/register.hpp"
#include "backend/transport/cuda/kernel_preload.hpp"  // no CUDA includes: CPU builds use its struct

PYBIND11_MODULE(_C, m) {
  m.doc() = "torch_ep native extension";
  ep::register_process_group(m);
  ep::register_low_latency(m);
  ep::register_moe(m);
  m.attr("max_matrix_ranks") = ep::moe::kMaxMatrixRanks;
  // The host phases' steady clock (backend/common/phase_clock.hpp), for tools/*_profile.py.
  m.def("_phase_clock", &ep::phase_clock::enable, pybind11::arg("on"));
  m.def("_take_phase_times", [] {
    std::vector<std::tuple<std::string, int64_t, int64_t>> out;
    for (const ep::phase_clock::Total& t : ep::phase_clock::take()) out.emplace_back(t.phase, t.calls, t.ns);
    return out;
  }, "[(phase, calls, ns)] since the last take, cleared");
#ifdef TORCH_EP_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
  // The kernels loaded at the transports' set-up (backend/transport/cuda/kernel_preload.hpp).
  m.def("_kernels_preloaded", [] {
#ifdef TORCH_EP_WITH_CUDA
    const ep::KernelPreload p = ep::kernels_preloaded();
#else
    ep::KernelPreload p;
    p.skipped = "built without CUDA";
#endif
    return pybind11::dict(pybind11::arg("modules") = p.modules, pybind11::arg("functions") = p.functions,
                          pybind11::arg("skipped") = p.skipped, pybind11::arg("error") = p.error);
  }, "{modules, functions, skipped, error}: this process's kernels loaded at set-up, why none were, the first failure");
}
