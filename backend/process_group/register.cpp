#include "backend/process_group/register.hpp"

#include <pybind11/chrono.h>
#include <pybind11/stl.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include "backend/common/arena_allocator.hpp"
#include "backend/process_group/fault_log.hpp"
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
      .def_readwrite("comm_pool_bytes", &Config::comm_pool_bytes)
      .def_readwrite("num_sms", &Config::num_sms)
      .def_readwrite("auto_sms_dispatch", &Config::auto_sms_dispatch)
      .def_readwrite("auto_sms_dispatch_fp8", &Config::auto_sms_dispatch_fp8)
      .def_readwrite("auto_sms_combine", &Config::auto_sms_combine)
      .def_readwrite("moe_copy_dispatch", &Config::moe_copy_dispatch)
      .def_readwrite("moe_copy_dispatch_fp8", &Config::moe_copy_dispatch_fp8)
      .def_readwrite("moe_copy_combine", &Config::moe_copy_combine)
      .def_readwrite("moe_push", &Config::moe_push)
      .def_readwrite("moe_pool_bytes", &Config::moe_pool_bytes)
      .def_readwrite("moe_device_records", &Config::moe_device_records)
      .def_readwrite("moe_one_launch", &Config::moe_one_launch)
      .def_readwrite("ranks_per_node", &Config::ranks_per_node)
      .def_readwrite("launch_local_world_size", &Config::launch_local_world_size)
      .def_readwrite("blocking_wait", &Config::blocking_wait)
      .def_readwrite("force_remote", &Config::force_remote)
      .def_readwrite("all_to_all_v_device", &Config::all_to_all_v_device)
      .def_readwrite("all_to_all_device", &Config::all_to_all_device)
      .def_readwrite("all_to_all_lanes", &Config::all_to_all_lanes)
      .def_readwrite("all_to_all_slot_bytes", &Config::all_to_all_slot_bytes)
      .def_readwrite("all_to_all_pool_blocks", &Config::all_to_all_pool_blocks)
      .def_readwrite("all_to_all_pool_piece_bytes", &Config::all_to_all_pool_piece_bytes)
      .def_readwrite("all_to_all_kernel_bytes", &Config::all_to_all_kernel_bytes)
      .def_readwrite("all_to_all_one_launch", &Config::all_to_all_one_launch)
      .def_readwrite("all_to_all_eager_bytes", &Config::all_to_all_eager_bytes)
      .def_readwrite("internode_device", &Config::internode_device)
      .def_readwrite("internode_a2a_device", &Config::internode_a2a_device)
      .def_readwrite("internode_node_p2p", &Config::internode_node_p2p)
      .def_readwrite("internode_capacity", &Config::internode_capacity)
      .def_readwrite("internode_row_bytes", &Config::internode_row_bytes)
      .def_readwrite("internode_combine_rows", &Config::internode_combine_rows);

  py::class_<Topology>(m, "Topology", "Where the ranks of an 'ep' group sit (backend/transport/topology.hpp).")
      .def_readonly("rank", &Topology::rank)
      .def_readonly("size", &Topology::size)
      .def_readonly("ranks_per_node", &Topology::ranks_per_node)
      .def_readonly("num_nodes", &Topology::num_nodes)
      .def_readonly("node", &Topology::node)
      .def_readonly("local_rank", &Topology::local_rank)
      .def_readonly("source", &Topology::source, "where ranks_per_node came from")
      .def_readonly("problem", &Topology::problem, "why the hosts form no nodes, or ''")
      .def_property_readonly("node_ranks", &Topology::node_ranks)
      .def_property_readonly("rail_ranks", &Topology::rail_ranks)
      .def("__repr__", [](const Topology& t) {
        return "Topology(rank=" + std::to_string(t.rank) + ", size=" + std::to_string(t.size) +
               ", ranks_per_node=" + std::to_string(t.ranks_per_node) + ", num_nodes=" + std::to_string(t.num_nodes) +
               ", node=" + std::to_string(t.node) + ", local_rank=" + std::to_string(t.local_rank) + ", source='" +
               t.source + "')";
      });

  py::class_<ProcessGroupEP, c10d::Backend, c10::intrusive_ptr<ProcessGroupEP>>(m, "ProcessGroupEP")
      .def(py::init<const c10::intrusive_ptr<c10d::Store>&, int, int, Config, c10::intrusive_ptr<c10d::Backend>,
                    c10::intrusive_ptr<c10d::Backend>>(),
           py::arg("store"), py::arg("rank"), py::arg("size"), py::arg("config"), py::arg("cpu_backend"),
           py::arg("cuda_backend") = nullptr, py::call_guard<py::gil_scoped_release>())
      // By value: a reference would keep the backend alive from Python.
      .def_property_readonly("config", [](const ProcessGroupEP& pg) { return pg.config(); })
      .def_property_readonly("topology", [](const ProcessGroupEP& pg) { return pg.topology(); })
      .def_property_readonly("num_nodes", [](const ProcessGroupEP& pg) { return pg.topology().num_nodes; })
      .def_property_readonly("ranks_per_node", [](const ProcessGroupEP& pg) { return pg.topology().ranks_per_node; })
      .def_property_readonly("internode_path", &ProcessGroupEP::internode_path,
                             "'' on one node; 'nvshmem' once CUDA traffic crosses nodes on NVSHMEM; 'host' before")
      .def_property_readonly("rail_bytes", &ProcessGroupEP::rail_bytes,
                             "bytes the MoE ops' hierarchical route sent to other nodes (the rail hop: RDMA)")
      .def_property_readonly("node_bytes", &ProcessGroupEP::node_bytes,
                             "bytes the MoE ops' hierarchical route sent to other ranks of this node (NVLink)")
      .def_property_readonly("host_path", &ProcessGroupEP::host_path,
                              "'shm' or 'gloo' once the first CPU all_to_all has chosen, else ''")
      .def_property_readonly("host_one_copy", &ProcessGroupEP::host_one_copy,
                              "True when large CPU messages move by one process_vm_readv copy")
      .def_property_readonly("cuda_path", &ProcessGroupEP::cuda_path,
                              "'cuda' or 'delegated' once the first CUDA all_to_all has chosen, else ''")
      .def("check_errors", &ProcessGroupEP::check_errors, py::call_guard<py::gil_scoped_release>(),
           "Raises what the group's CUDA dispatch/combine kernels reported (torch_ep.check_errors)")
      .def("_comm_pool_allocator", &ProcessGroupEP::comm_pool_allocator, py::arg("device"),
           "The torch allocator of this group's comm pool on cuda:device (collective the first time); "
           "torch_ep.comm_pool wraps it in a torch.cuda.MemPool")
      .def("_comm_pool_stats", &ProcessGroupEP::comm_pool_stats, py::call_guard<py::gil_scoped_release>(),
           "[arena bytes, bytes torch holds in it, 1 if the last all_to_all_single went with one copy] "
           "(waits for the device), or [] without a comm pool: for tests")
      .def("_moe_pool_stats", &ProcessGroupEP::moe_pool_stats, py::call_guard<py::gil_scoped_release>(),
           "[arena bytes, bytes torch holds in it] of the MoE pool (TORCH_EP_MOE_PUSH), or [] without one: for tests")
      .def("_moe_pool_offset", &ProcessGroupEP::moe_pool_offset, py::arg("ptr"), py::arg("bytes"),
           "the offset of [ptr, ptr + bytes) in this rank's MoE arena, or -1: for tests")
      .def("_moe_exchanges", &ProcessGroupEP::moe_exchanges,
           "host record exchanges this rank's MoE transport made (a dispatch with device records makes none): "
           "for tests")
      .def("_peer_mappings", &ProcessGroupEP::peer_mappings, py::call_guard<py::gil_scoped_release>(),
           "[open, waiting to be closed] peers' allocations mapped by the MoE transport, then by all_to_all's: "
           "for tests");

  // The comm pool's range allocator alone, for CPU tests of its bookkeeping.
  py::class_<ArenaAllocator>(m, "_ArenaAllocator")
      .def(py::init<size_t, size_t>(), py::arg("bytes"), py::arg("alignment"))
      .def("allocate", &ArenaAllocator::allocate, py::arg("bytes"))
      .def("free", &ArenaAllocator::free, py::arg("offset"))
      .def_property_readonly("bytes", &ArenaAllocator::bytes)
      .def_property_readonly("used", &ArenaAllocator::used)
      .def_property_readonly("largest_free", &ArenaAllocator::largest_free)
      .def_property_readonly("num_allocations", &ArenaAllocator::num_allocations);

  // The fault log alone, on any store: for CPU tests of what an error gains from the records
  // other ranks left (ProcessGroupEP keeps one per group, under FaultLog::instance_prefix).
  py::class_<FaultLog, std::shared_ptr<FaultLog>>(m, "_FaultLog")
      .def(py::init<c10::intrusive_ptr<c10d::Store>, std::string, int, int>(), py::arg("store"), py::arg("prefix"),
           py::arg("rank"), py::arg("size"))
      .def("record", &FaultLog::record, py::arg("message"), py::arg("wait") = true,
           py::call_guard<py::gil_scoped_release>())
      .def("explain", &FaultLog::explain, py::arg("message"), py::call_guard<py::gil_scoped_release>())
      .def("report", &FaultLog::report, py::arg("message"), py::call_guard<py::gil_scoped_release>());
  m.def("_first_peer_named", &first_peer_named, py::arg("message"), py::arg("rank"));
  m.def("_fault_instance_prefix", [](const c10::intrusive_ptr<c10d::Store>& store, int rank) {
    return FaultLog::instance_prefix(*store, rank);
  }, py::arg("store"), py::arg("rank"));

  // The argument checks alone, for tests of their messages on inputs no group would accept.
  m.def("_check_all_to_all_single",
        [](const at::Tensor& output, const at::Tensor& input, const std::vector<int64_t>& output_split_sizes,
           const std::vector<int64_t>& input_split_sizes, int group_size) {
          check_all_to_all_single(output, input, output_split_sizes, input_split_sizes, group_size);
        });
}

}  // namespace ep
