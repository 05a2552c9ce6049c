// One kernel of each file's CUDA module, for backend/transport/cuda/kernel_preload.cpp, which
// loads every kernel of the module that holds it (lazy loading would load it at its first launch,
// which may wait for the device). Each .cu file with kernels defines its own; the files built
// with -rdc (NVSHMEM builds only) share one device-linked module. Host-only, torch-free.
#pragma once

namespace ep::kernels {

// Built apart (no -rdc): a module each.
const void* all_to_all_module_kernel();
const void* all_to_all_v_module_kernel();
const void* internode_module_kernel();
const void* moe_module_kernel();
const void* moe_bulk_module_kernel();
const void* moe_push_module_kernel();
const void* moe_records_module_kernel();
const void* moe_unroll_module_kernel();

// Built with -rdc and device-linked with libnvshmem_device.a (TORCH_EP_WITH_NVSHMEM only).
const void* low_latency_dispatch_module_kernel();
const void* low_latency_combine_module_kernel();
const void* internode_notify_module_kernel();
const void* internode_dispatch_module_kernel();
const void* internode_combine_module_kernel();
const void* internode_exchange_module_kernel();

}  // namespace ep::kernels
