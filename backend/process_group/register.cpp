#include "backend/process_group/register.hpp"

#include <pybind11/chrono.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include "backend/process_group/process_group_ep.hpp"

namespace py = pybind11;

namespace ep {

void register_process_group(py::module_& m) {
  // Importing torch.distributed registers c10d's pybind types (Store, Backend) that ours build on.
  py::module_::import("torch.distributed");

  py::class_<Config>(m, "Config", "Settings of one 'ep' group; built by torch_ep.Options.")
      .def(py::init<>())
      .def_readwrite("timeout", &Config::timeout)
      .def_readwrite("host_transport", &Config::host_transport)
      .def_readwrite("host_slot_bytes", &Config::host_slot_bytes)
      .def_readwrite("host_num_slots", &Config::host_num_slots)
      .def_readwrite("host_one_copy", &Config::host_one_copy)
      .def_readwrite("cuda_buffer_bytes", &Config::cuda_buffer_bytes)
      .def_readwrite("num_sms", &Config::num_sms)
      .def_readwrite("ranks_per_node", &Config::ranks_per_node)
      .def_readwrite("blocking_wait", &Config::blocking_wait);

  py::class_<ProcessGroupEP, c10d::Backend, c10::intrusive_ptr<ProcessGroupEP>>(m, "ProcessGroupEP")
      .def(py::init<const c10::intrusive_ptr<c10d::Store>&, int, int, Config, c10::intrusive_ptr<c10d::Backend>,
                    c10::intrusive_ptr<c10d::Backend>>(),
           py::arg("store"), py::arg("rank"), py::arg("size"), py::arg("config"), py::arg("cpu_backend"),
           py::arg("cuda_backend") = nullptr, py::call_guard<py::gil_scoped_release>())
      // By value: a reference would keep the backend alive from Python.
      .def_property_readonly("config", [](const ProcessGroupEP& pg) { return pg.config(); })
      .def_property_readonly("host_path", &ProcessGroupEP::host_path,
                              "'shm' or 'gloo' once the first CPU all_to_all has chosen, else ''")
      .def_property_readonly("host_one_copy", &ProcessGroupEP::host_one_copy,
                              "True when large CPU messages move by one process_vm_readv copy")
      .def_property_readonly("cuda_path", &ProcessGroupEP::cuda_path,
                              "'cuda' or 'delegated' once the first CUDA all_to_all has chosen, else ''");

  // The argument checks alone, for tests of their messages on inputs no group would accept.
  m.def("_check_all_to_all_single",
        [](const at::Tensor& output, const at::Tensor& input, const std::vector<int64_t>& output_split_sizes,
           const std::vector<int64_t>& input_split_sizes, int group_size) {
          check_all_to_all_single(output, input, output_split_sizes, input_split_sizes, group_size);
        });
}

}  // namespace ep
