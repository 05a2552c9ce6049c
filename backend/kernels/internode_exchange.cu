// The device-driven hop of all_to_all between nodes (internode_exchange.cuh). Per chunk i of a
// pair (me -> peer), as NvshmemExchange's host-queued rounds do it: wait for the credit of the
// slot's previous chunk, put the chunk into the peer's slot i % S of mine with its full signal SET
// to i / S + 1, and, receiving, wait for that signal, copy the chunk out and SET the peer's credit.
// Peers NVSHMEM reaches by P2P take the put straight from the input; others (RDMA) from a stage in
// symmetric memory, since a NIC puts only from registered memory.
#include <nvshmem.h>
#include <nvshmemx.h>

#include "backend/kernels/copy.cuh"
#include "backend/kernels/internode_exchange.cuh"
#include "backend/kernels/module_kernels.hpp"
#include "backend/kernels/sync.cuh"
#include "backend/kernels/whatif_puts.cuh"

namespace ep::kernels {
namespace {

struct Slots {  // NvshmemExchange's layout of the symmetric buffer
  const ExchangeParams& p;
  __device__ char* slot(int src, uint64_t index) const {
    return p.base + (uint64_t(src) * p.num_slots + index) * p.chunk_bytes;
  }
  __device__ char* stage(int dst, uint64_t index) const { return slot(p.size + dst, index); }
  __device__ uint64_t* full(int src, uint64_t index) const {
    return reinterpret_cast<uint64_t*>(p.base + 2 * uint64_t(p.size) * p.num_slots * p.chunk_bytes) +
           uint64_t(src) * p.num_slots + index;
  }
  __device__ uint64_t* credit(int dst, uint64_t index) const {
    return full(0, 0) + uint64_t(p.size) * p.num_slots + uint64_t(dst) * p.num_slots + index;
  }
};

// Thread 0 waits (bounded) until *word >= value; the block learns whether it came. A block that
// gives up marks *gave_up too, which ends the others' waits at once: it lives in device memory,
// so every block may read it as often as it likes (a read of the host-mapped error word crosses
// PCIe, and one per warp at every block's start cost 1.3 ms a call at 2x2).
__device__ bool block_wait(const uint64_t* word, uint64_t value, uint64_t deadline, int peer, int* error,
                           uint32_t* gave_up) {
  __shared__ int came;
  if (threadIdx.x == 0) {
    came = 1;
    while (load_acquire(word) < value) {
      if (*reinterpret_cast<volatile uint32_t*>(gave_up) != 0) {
        came = 0;
        break;
      }
      if (now_ns() > deadline) {
        report_first(error, 1 + peer);  // every code is a timeout
        atomicExch(gave_up, 1u);
        came = 0;
        break;
      }
      __nanosleep(128);
    }
    __threadfence();
  }
  __syncthreads();
  return came;
}

// kCopyPuts: the what-if of whatif_puts.cuh (ExchangeParams::whatif_copy_puts), an instance of its own.
template <bool kCopyPuts>
__global__ void __launch_bounds__(kExchangeThreads) exchange_kernel(const __grid_constant__ ExchangeParams p) {
  const Slots at{p};
  const uint64_t S = p.num_slots, C = p.chunk_bytes;
  const bool sending = blockIdx.x % 2 == 0;
  const uint64_t pair = blockIdx.x / 2;
  const ExchangePeer& peer = p.peers[pair / S];
  const uint64_t slot = pair % S;
  // A block that starts late (the grid need not be resident) after another gave up on a peer
  // ends at once, rather than waiting out a timeout of its own.
  if (*reinterpret_cast<volatile uint32_t*>(p.gave_up) != 0) return;
  const uint64_t deadline = now_ns() + p.timeout_ns;
  if (sending) {
    const uint64_t chunks = (peer.send_bytes + C - 1) / C;
    const bool direct = nvshmem_ptr(p.base, peer.pe) != nullptr;
    // The chunks of this call that use `slot`: i = sent_before + k with i % S == slot.
    for (uint64_t k = (slot + S - peer.sent_before % S) % S; k < chunks; k += S) {
      const uint64_t i = peer.sent_before + k, n = peer.send_bytes - k * C < C ? peer.send_bytes - k * C : C;
      if (i >= S && !block_wait(at.credit(peer.pe, slot), i / S, deadline, peer.pe, p.error, p.gave_up)) return;
      const char* src = peer.send + k * C;
      if (!direct) {
        block_copy<4>(at.stage(peer.pe, slot), src, n);
        __syncthreads();
        src = at.stage(peer.pe, slot);
      }
      // The blocking kind: the stage (or input) may be reused once it returns.
      put_signal_block<kCopyPuts, true>(at.slot(p.rank, slot), src, n, at.full(p.rank, slot), i / S + 1,
                                        NVSHMEM_SIGNAL_SET, peer.pe);
    }
  } else {
    const uint64_t chunks = (peer.recv_bytes + C - 1) / C;
    for (uint64_t k = (slot + S - peer.received_before % S) % S; k < chunks; k += S) {
      const uint64_t j = peer.received_before + k, n = peer.recv_bytes - k * C < C ? peer.recv_bytes - k * C : C;
      if (!block_wait(at.full(peer.pe, slot), j / S + 1, deadline, peer.pe, p.error, p.gave_up)) return;
      // L1 is not coherent with the peer's writes, and this block read the slot's previous chunk.
      block_copy<4>(peer.recv + k * C, at.slot(peer.pe, slot), n, CachedGlobalLoad{});
      __syncthreads();
      if (threadIdx.x == 0) {
        __threadfence();
        nvshmemx_signal_op(at.credit(p.rank, slot), j / S + 1, NVSHMEM_SIGNAL_SET, peer.pe);
      }
    }
  }
}

}  // namespace

cudaError_t launch_exchange(const ExchangeParams& p, cudaStream_t stream) {
  if (p.num_peers <= 0) return cudaSuccess;
  if (p.num_peers > kMaxExchangePeers || p.num_slots < 1) return cudaErrorInvalidValue;
  const int grid = 2 * p.num_peers * p.num_slots;
  if (p.whatif_copy_puts)
    exchange_kernel<true><<<grid, kExchangeThreads, 0, stream>>>(p);
  else
    exchange_kernel<false><<<grid, kExchangeThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

const void* internode_exchange_module_kernel() { return reinterpret_cast<const void*>(exchange_kernel<false>); }

}  // namespace ep::kernels
