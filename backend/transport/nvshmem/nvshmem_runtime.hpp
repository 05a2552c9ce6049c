// The NVSHMEM runtime as torch_ep uses it: the host library is initialised by nvshmem4py
// (torch_ep/low_latency.py, once per process, unique id shared over the group), or was already
// initialised by someone else in the process (torch shares the same libnvshmem_host.so.3).
// This module then registers its own copy of the device state (the nvshmemi_device_state_d of
// the libnvshmem_device.a linked into torch_ep._C) with that host library.
//
// Header without NVSHMEM types, so that code using it needs no NVSHMEM include path.
#pragma once

#include <cstddef>

#include "backend/transport/rendezvous.hpp"

namespace ep::nvshmem {

// nvshmemx_init_status(): 0 not initialised, 1 bootstrapped, 2 initialised, 3 limited
// multi-process-per-GPU (team and collective APIs abort), 4 full multi-process-per-GPU.
int init_status();

// Registers this module's device state with the initialised host library and checks that
// this process is PE `rank` of `size`. Idempotent. Throws CommError with what to do otherwise.
void attach(int rank, int size);
bool attached();

// Defaults NVSHMEM_DISABLE_LOCAL_ONLY_PROXY=1 where NVSHMEM_REMOTE_TRANSPORT is "none" (a setting
// of the user's stands), before NVSHMEM initialises: both of torch_ep's ways in call it.
void default_local_only_env();

// Initialises NVSHMEM over `rdv` where nothing has yet (rank 0's unique id goes through the
// store; every rank of `rdv` calls this, as PE rdv.rank() of rdv.size()), then attach(). Reads
// NVSHMEM's environment (transports, heap size) as it is, but for default_local_only_env().
void init_over(Rendezvous& rdv, int device);

// Collective over every PE (nvshmem_malloc / nvshmem_free); throws when the heap is too small.
void* malloc_symmetric(size_t bytes);
void free_symmetric(void* ptr);

// This PE's address of `pe`'s copy of the symmetric `ptr`, or null where it cannot be mapped.
void* peer_ptr(void* ptr, int pe);

// TORCH_EP_WHATIF_COPY_PUTS=1 (read once; 0 or unset: off; else ValueError, raised by the first
// read, which the buffers' set-up makes): the what-if of backend/kernels/whatif_puts.cuh, for
// measurements on one machine; puts to ranks NVSHMEM maps here move by the kernels' own copies.
bool whatif_copy_puts();

}  // namespace ep::nvshmem
