// All-to-all between ranks of different nodes over NVSHMEM puts: RDMA (IBGDA or IBRC) between
// real nodes, P2P where the peers share a node or a GPU. The NVSHMEM world is the group: PE p is
// group rank p.
//
// Each rank's symmetric buffer holds, for every source PE, `num_slots` slots of `chunk_bytes`
// and one 64-bit "full" signal per slot; beside them one "credit" signal per (destination,
// slot), and a send stage per (destination, slot): RDMA puts go from registered memory. A message of any size streams through its slots in chunks. Chunk i of the pair
// (me -> p) goes to slot i % S of p's buffer with nvshmemx_putmem_signal_on_stream, which sets
// full[me][i % S] at p to i / S + 1 once the data is there; p waits for that value, copies the
// chunk out, and sets credit[p][i % S] here to i / S + 1; chunk i + S waits for that credit.
// Counters only grow, so nothing is reset between calls. Everything is queued on one stream,
// round by round (round k: the k-th chunk to every peer, then the k-th from every peer), which
// cannot deadlock: a send of round k needs only the peer's receives of round k - S.
//
// With `device_driven` (Options.internode_a2a_device) one launch does it all instead
// (kernels/internode_exchange.cuh): a block per (peer, slot) sends, another receives, the chunks
// of that slot in order, with the same signal values and counters, so the two ways can take turns;
// peers NVSHMEM reaches by P2P get their puts straight from the input, with no stage.
//
// Waits run in a kernel with the group's deadline (kernels/internode.cuh). A wait that times out
// lets the stream go on and is raised, naming the peer, by the next call; after it the exchange
// takes no more calls. Both sides must agree on every message's size (the MoE records or the
// all_to_all split sizes say so); a disagreement shows up as such a timeout.
// Header without NVSHMEM types: host files that use it need no NVSHMEM include path.
#pragma once

#include <cuda_runtime.h>

#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "backend/transport/cuda/call_order.hpp"
#include "backend/transport/host/host_transport.hpp"  // SendBuffer, RecvBuffer

namespace ep {

struct NvshmemExchangeConfig {
  int device = 0;
  size_t chunk_bytes = 4 << 20;  // one slot
  int num_slots = 2;             // slots per source: chunks in flight per pair
  std::chrono::milliseconds timeout{std::chrono::minutes(30)};
  // One launch per call moves every chunk (kernels/internode_exchange.cuh: a block per peer and
  // slot), instead of rounds the host queues; the same slots and signals.
  bool device_driven = false;
};

class NvshmemExchange {
 public:
  // Collective over every PE (nvshmem_malloc); NVSHMEM must be initialised and attached.
  NvshmemExchange(int rank, int size, const NvshmemExchangeConfig& config);
  ~NvshmemExchange();
  NvshmemExchange(const NvshmemExchange&) = delete;
  NvshmemExchange& operator=(const NvshmemExchange&) = delete;

  // sends[p] / recvs[p] for every rank p; data moves only with the ranks of `peers` (not this
  // rank), in both directions, and every rank of `peers` must make the matching call. Queued on
  // `stream`, after this exchange's previous call whatever stream that ran on; the buffers must
  // stay valid until it gets there.
  void all_to_all(const std::vector<int>& peers, const std::vector<SendBuffer>& sends,
                  const std::vector<RecvBuffer>& recvs, cudaStream_t stream, const char* op_name);
  bool device_driven() const { return device_driven_; }
  // Raises what a wait kernel reported since the last call (a peer that never came).
  void check(const char* op_name);
  // What failed, or "": check's text without raising, for Work.wait() polling while a wait
  // kernel may still report (the first report fails the exchange for good).
  std::string error();
  // The group was aborted (`why`): every later call raises, and the device exchange's waits,
  // queued calls' included, end at once (gave_up_). Any thread.
  void abort(const std::string& why);
  // Bytes put to other PEs so far.
  uint64_t bytes_sent() const { return bytes_sent_; }

 private:
  char* slot(char* base, int src, int index) const;
  char* send_slot(char* base, int dst, int index) const;
  uint64_t* full_signal(char* base, int src, int index) const;
  uint64_t* credit_signal(char* base, int dst, int index) const;

  // The call in one launch (device-driven), or in rounds the host queues.
  void all_to_all_on_device(const std::vector<int>& peers, const std::vector<SendBuffer>& sends,
                            const std::vector<RecvBuffer>& recvs, cudaStream_t stream);
  void all_to_all_in_rounds(const std::vector<int>& peers, const std::vector<SendBuffer>& sends,
                            const std::vector<RecvBuffer>& recvs, cudaStream_t stream);

  int rank_, size_, num_slots_;
  size_t chunk_bytes_;
  bool device_driven_;
  int device_;
  std::chrono::milliseconds timeout_;
  // Symmetric: [receive slots: size x slots x chunk][send stages: size x slots x chunk]
  //            [full: size x slots][credit: size x slots] (uint64 signals)
  char* base_ = nullptr;
  std::vector<uint64_t> chunks_sent_, chunks_received_;  // per peer, over the exchange's life
  int* error_host_ = nullptr;
  int* error_device_ = nullptr;
  uint32_t* gave_up_ = nullptr;  // the device exchange's blocks read this, not the host-mapped word
  std::mutex error_mutex_;  // error() runs on the caller's thread and on Work.wait()'s
  std::string failed_;
  std::string last_op_;  // of the last call, named in its error
  CallOrder order_;      // the calls, in turn on the device
  uint64_t bytes_sent_ = 0;
};

}  // namespace ep
