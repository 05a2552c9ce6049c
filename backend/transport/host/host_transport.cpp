#include "backend/transport/host/host_transport.hpp"

#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <new>
#include <cstdio>
#include <thread>

#include "backend/common/errors.hpp"

namespace ep {

// Segment layout, owned by one rank (its inbox):
//   [SegmentHeader][ChannelControl x size][slots: size x num_slots x slot_stride]
// The slots of channel `src` start at slots_offset + src * num_slots * slot_stride; each slot
// is a 64-byte SlotHeader followed by slot_bytes of payload.
struct HostTransport::SegmentHeader {
  Doorbell doorbell;                 // rung by peers when a slot for us fills or one of ours frees
  alignas(64) std::atomic<uint32_t> failed;  // set when the owner hit an error; peers stop waiting
  char failure[448];                 // the first error of the chain that stopped the owner, before `failed`
};
struct HostTransport::ChannelControl {
  alignas(64) std::atomic<uint64_t> head;  // slots published by the sender
  alignas(64) std::atomic<uint64_t> tail;  // slots released by the receiver (the owner), after use
};
struct alignas(64) HostTransport::SlotHeader {
  uint64_t message_seq;    // which call of this (sender, receiver) pair
  uint64_t message_bytes;  // the whole message's size, checked against the receiver's split
  uint64_t source_pid;     // one-copy messages: where the data is (else 0)
  uint64_t source_addr;
};

namespace {

constexpr size_t kAlign = 64;
size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

struct SharedConfig {  // rank 0's choice, so that every rank lays out segments identically
  uint64_t slot_bytes;
  uint64_t num_slots;
  char id[48];
};

}  // namespace

size_t HostTransport::controls_offset() { return round_up(sizeof(SegmentHeader), kAlign); }

HostTransport::SegmentHeader* HostTransport::header(int owner) const {
  return reinterpret_cast<SegmentHeader*>(segments_[owner].data());
}

HostTransport::ChannelControl* HostTransport::channel(int owner, int src) const {
  return reinterpret_cast<ChannelControl*>(segments_[owner].data() + controls_offset()) + src;
}

HostTransport::SlotHeader* HostTransport::slot(int owner, int src, uint64_t index) const {
  size_t slots_offset = controls_offset() + round_up(sizeof(ChannelControl) * size_, kAlign);
  size_t offset = slots_offset + (size_t(src) * num_slots_ + index % num_slots_) * slot_stride_;
  return reinterpret_cast<SlotHeader*>(segments_[owner].data() + offset);
}

HostTransport::HostTransport(Rendezvous& rdv, const HostTransportConfig& config, const std::string& tag)
    : rank_(rdv.rank()), size_(rdv.size()), timeout_(config.timeout),
      send_seq_(rdv.size(), 0), recv_seq_(rdv.size(), 0) {
  for (int r = 0; r < size_; ++r) group_ranks_.push_back(rdv.group_rank(r));
  SharedConfig shared{};
  if (rank_ == 0) {
    shared.slot_bytes = round_up(std::max<size_t>(config.slot_bytes, kAlign), kAlign);
    shared.num_slots = std::max(config.num_slots, 1);
    std::string id = ShmSegment::unique_id();
    std::strncpy(shared.id, id.c_str(), sizeof(shared.id) - 1);
    const auto* p = reinterpret_cast<const uint8_t*>(&shared);
    rdv.set(tag + "/config", std::vector<uint8_t>(p, p + sizeof(shared)));
  } else {
    auto bytes = rdv.get(tag + "/config");
    std::memcpy(&shared, bytes.data(), sizeof(shared));
  }
  slot_bytes_ = shared.slot_bytes;
  num_slots_ = static_cast<int>(shared.num_slots);
  slot_stride_ = sizeof(SlotHeader) + slot_bytes_;
  unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  spin_ = unsigned(size_) <= cores ? 4000 : 0;

  size_t bytes = controls_offset() + round_up(sizeof(ChannelControl) * size_, kAlign) +
                 size_t(size_) * num_slots_ * slot_stride_;
  segments_ = ShmSegment::map_per_rank(rdv, tag, "/torch_ep_" + std::string(shared.id), bytes);
  peers_ = PeerProcesses(rdv, tag);
  one_copy_ = config.one_copy && probe_one_copy(rdv, tag);
}

namespace {
// Reads `bytes` from another process; false when the kernel refuses (ptrace policy).
bool read_remote(pid_t pid, uint64_t addr, void* dst, size_t bytes) {
  auto* out = static_cast<char*>(dst);
  while (bytes > 0) {
    iovec local{out, bytes};
    iovec remote{reinterpret_cast<void*>(addr), bytes};
    const ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
    if (n <= 0) {
      if (n < 0 && errno == EINTR) continue;
      return false;
    }
    out += n, addr += n, bytes -= size_t(n);
  }
  return true;
}
}  // namespace

bool HostTransport::probe_one_copy(Rendezvous& rdv, const std::string& tag) {
  // Every rank publishes where a known value lives and reads every peer's (at the pid that
  // peers_ gathered); one copy is used only if every rank could read every peer (the answer
  // must be the same on all ranks).
  static const uint64_t kMagic = 0x746f7263685f6570ull;  // "torch_ep"
  const uint64_t where = reinterpret_cast<uint64_t>(&kMagic);
  const auto* p = reinterpret_cast<const uint8_t*>(&where);
  auto all = rdv.all_gather(tag + "/one_copy_probe", std::vector<uint8_t>(p, p + sizeof(where)));
  uint8_t ok = 1;
  for (int r = 0; r < size_ && ok; ++r) {
    if (r == rank_) continue;
    uint64_t addr = 0, value = 0;
    std::memcpy(&addr, all[r].data(), sizeof(addr));
    ok = read_remote(pid_t(peers_.pid(r)), addr, &value, sizeof(value)) && value == kMagic;
  }
  for (const auto& verdict : rdv.all_gather(tag + "/one_copy_ok", {ok}))
    if (!verdict[0]) return false;
  return true;
}

HostTransport::~HostTransport() = default;

void HostTransport::stop(const std::string& message, const std::string& cause) {
  {
    std::lock_guard<std::mutex> lock(broken_mutex_);
    if (!broken_.load()) {
      broken_message_ = message;
      SegmentHeader* mine = header(rank_);
      const std::string& shared = cause.empty() ? message : cause;
      std::strncpy(mine->failure, shared.c_str(), sizeof(mine->failure) - 1);
      mine->failed.store(1, std::memory_order_release);
      broken_.store(true);
    }
  }
  // Our own bell too: a wait in progress on another thread (abort) wakes up and sees it.
  for (int p = 0; p < size_; ++p) header(p)->doorbell.ring();
}

void HostTransport::abort(const std::string& why) { stop(why); }

void HostTransport::raise_broken() const {
  std::lock_guard<std::mutex> lock(broken_mutex_);
  throw CommError("torch_ep: this group's host transport stopped after an earlier error and takes no more "
                  "calls; destroy the process group. The error was: " + broken_message_);
}

void HostTransport::fail(const std::string& message, const std::string& cause) {
  stop(message, cause);
  throw CommError(message);
}

void HostTransport::check_slot(const SlotHeader* s, int src, size_t expected_bytes, const char* op_name) {
  const int me = rank_;
  if (s->message_seq != recv_seq_[src])
    fail(std::string(op_name) + ": rank " + name(me) + " received message #" +
         std::to_string(s->message_seq) + " from rank " + name(src) + " while expecting #" +
         std::to_string(recv_seq_[src]) + ": the ranks issued collectives in different orders");
  if (s->message_bytes != expected_bytes)
    fail(std::string(op_name) + ": rank " + name(me) + " expects " + std::to_string(expected_bytes) +
         " bytes from rank " + name(src) + ", but rank " + name(src) + " sends " +
         std::to_string(s->message_bytes) + " bytes: the ranks' split sizes disagree");
}

void HostTransport::all_to_all(const std::vector<SendBuffer>& sends, const std::vector<RecvBuffer>& recvs,
                               const char* op_name) {
  if (broken_.load()) raise_broken();
  const int me = rank_;
  if (sends[me].bytes != recvs[me].bytes)
    fail(std::string(op_name) + ": rank " + name(me) + " sends " + std::to_string(sends[me].bytes) +
         " bytes to itself but expects " + std::to_string(recvs[me].bytes));
  if (sends[me].bytes && sends[me].ptr != recvs[me].ptr) std::memcpy(recvs[me].ptr, sends[me].ptr, sends[me].bytes);

  // Agreement: a receiver checks the first slot (sequence number and size) of every peer's
  // message before it takes any slot, and a send counts as done only once the receiver has
  // taken all of its slots. So when any pair disagrees, the receiver that sees it fails, and
  // every other rank, whose message to that receiver is never taken, fails with it: all ranks
  // raise in the same call, and none returns with data from a call its peers rejected.
  std::vector<size_t> sent(size_, 0), received(size_, 0);
  std::vector<uint64_t> end_slot(size_, 0);  // head once the whole message to a peer is out
  std::vector<char> posted(size_, 0), send_done(size_, 0), recv_done(size_, 0), checked(size_, 0);
  posted[me] = send_done[me] = recv_done[me] = checked[me] = 1;
  int pending = 2 * (size_ - 1), unchecked = size_ - 1;
  const auto start = std::chrono::steady_clock::now();
  auto last_liveness_check = start;
  Doorbell& my_bell = header(me)->doorbell;

  while (pending > 0) {
    const uint32_t seen = my_bell.snapshot();
    bool progressed = false;
    // Peers in rotated order, so that rank r's first chunk goes to r+1 and the load spreads.
    for (int i = 1; i < size_; ++i) {
      const int dst = (me + i) % size_;
      if (send_done[dst]) continue;
      ChannelControl* ch = channel(dst, me);
      const uint64_t tail = ch->tail.load(std::memory_order_acquire);
      if (!posted[dst]) {
        uint64_t head = ch->head.load(std::memory_order_relaxed);
        const uint64_t head_before = head;
        const auto* src = static_cast<const char*>(sends[dst].ptr);
        if (one_copy_ && sends[dst].bytes >= kOneCopyBytes) {
          // One slot holds where the data is; the receiver reads it straight from our memory.
          if (head - tail < uint64_t(num_slots_)) {
            SlotHeader* s = slot(dst, me, head);
            s->message_seq = send_seq_[dst];
            s->message_bytes = sends[dst].bytes;
            s->source_pid = uint64_t(getpid());
            s->source_addr = reinterpret_cast<uint64_t>(src);
            sent[dst] = sends[dst].bytes;
            posted[dst] = 1;
            ch->head.store(++head, std::memory_order_release);
          }
        } else {
          while (!posted[dst] && head - tail < uint64_t(num_slots_)) {
            SlotHeader* s = slot(dst, me, head);
            const size_t n = std::min(slot_bytes_, sends[dst].bytes - sent[dst]);
            s->message_seq = send_seq_[dst];
            s->message_bytes = sends[dst].bytes;
            s->source_pid = 0;
            if (n) std::memcpy(reinterpret_cast<char*>(s) + sizeof(SlotHeader), src + sent[dst], n);
            sent[dst] += n;
            posted[dst] = sent[dst] == sends[dst].bytes;
            ch->head.store(++head, std::memory_order_release);
          }
        }
        if (posted[dst]) end_slot[dst] = head;
        if (head != head_before) {
          header(dst)->doorbell.ring();
          progressed = true;
        }
      }
      if (posted[dst] && ch->tail.load(std::memory_order_acquire) >= end_slot[dst]) {
        send_done[dst] = 1;
        ++send_seq_[dst];
        --pending;
        progressed = true;
      }
    }
    for (int i = 1; i < size_ && unchecked > 0; ++i) {
      const int src = (me - i + size_) % size_;
      if (checked[src]) continue;
      ChannelControl* ch = channel(me, src);
      const uint64_t tail = ch->tail.load(std::memory_order_relaxed);
      if (tail < ch->head.load(std::memory_order_acquire)) {
        check_slot(slot(me, src, tail), src, recvs[src].bytes, op_name);
        checked[src] = 1;
        --unchecked;
        progressed = true;
      }
    }
    for (int i = 1; i < size_ && unchecked == 0; ++i) {
      const int src = (me - i + size_) % size_;
      if (recv_done[src]) continue;
      ChannelControl* ch = channel(me, src);
      uint64_t tail = ch->tail.load(std::memory_order_relaxed);
      const uint64_t head = ch->head.load(std::memory_order_acquire);
      const uint64_t tail_before = tail;
      auto* dst = static_cast<char*>(recvs[src].ptr);
      while (!recv_done[src] && tail < head) {
        const SlotHeader* s = slot(me, src, tail);
        check_slot(s, src, recvs[src].bytes, op_name);
        if (s->source_pid) {  // one copy, straight out of the sender's memory
          if (!read_remote(pid_t(s->source_pid), s->source_addr, dst, recvs[src].bytes))
            fail(std::string(op_name) + ": rank " + name(me) + " could not read rank " +
                 name(src) + "'s data: " + errno_string(errno));
          received[src] = recvs[src].bytes;
        } else {
          const size_t n = std::min(slot_bytes_, recvs[src].bytes - received[src]);
          if (n) std::memcpy(dst + received[src], reinterpret_cast<const char*>(s) + sizeof(SlotHeader), n);
          received[src] += n;
        }
        ch->tail.store(++tail, std::memory_order_release);  // after the data is out: the sender may go on
        if (received[src] == recvs[src].bytes) {
          recv_done[src] = 1;
          ++recv_seq_[src];
          --pending;
        }
      }
      if (tail != tail_before) {
        header(src)->doorbell.ring();
        progressed = true;
      }
    }
    if (progressed || pending == 0) continue;

    if (broken_.load()) raise_broken();
    for (int p = 0; p < size_; ++p) {
      const SegmentHeader* peer = header(p);
      if (p != me && peer->failed.load(std::memory_order_acquire)) {
        const std::string cause(peer->failure, strnlen(peer->failure, sizeof(peer->failure)));
        fail(std::string(op_name) + ": rank " + name(me) + " stopped because peer rank " +
                 name(p) + " failed: " + cause,
             cause);
      }
    }
    const auto now = std::chrono::steady_clock::now();
    if (now - last_liveness_check >= kLivenessPeriod) {  // a killed peer is named at once, not at the timeout
      last_liveness_check = now;
      for (int p = 0; p < size_; ++p)
        if ((!checked[p] || !send_done[p] || !recv_done[p]) && peers_.gone(p))
          fail(peers_.gone_message(op_name, name(me), p, name(p)));
    }
    const auto elapsed = now - start;
    // Past the timeout, a rank that has every peer's message but waits on one to take its own
    // gets a grace: that peer may be stuck waiting on a third rank, and its own error, which
    // names that rank, should reach us first (checked above). A rank still waiting for a
    // message fails at the timeout itself.
    const bool all_arrived = unchecked == 0;
    const auto grace = all_arrived ? std::min<std::chrono::milliseconds>(timeout_ / 2, std::chrono::milliseconds(2000))
                                   : std::chrono::milliseconds(0);
    if (elapsed > timeout_ + grace) {
      // Name the peer holding the call up: first one whose message never came (nothing is taken
      // before every peer's has), then one that has not taken ours, then one still sending.
      int peer = -1;
      std::string what;
      for (int pass = 0; pass < 3 && peer < 0; ++pass)
        for (int i = 1; i < size_ && peer < 0; ++i) {
          const int p = (me + i) % size_;
          if (pass == 0 && !checked[p]) peer = p, what = "waiting for rank " + name(p) + " to arrive";
          if (pass == 1 && !send_done[p])
            peer = p, what = posted[p] ? "waiting for rank " + name(p) + " to take its data"
                                       : "sending to rank " + name(p);
          if (pass == 2 && !recv_done[p]) peer = p, what = "receiving from rank " + name(p);
        }
      std::string msg = std::string(op_name) + ": timed out on rank " + name(me) + " after " +
                        std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(elapsed).count()) +
                        " ms " + what + " (" + std::to_string(received[peer]) + "/" +
                        std::to_string(recvs[peer].bytes) + " bytes received from it, " + std::to_string(sent[peer]) +
                        "/" + std::to_string(sends[peer].bytes) + " sent): the peer never arrived or stalled";
      stop(msg);  // peers waiting on us stop now, not at their own timeout
      throw TimeoutError(msg);
    }
    my_bell.wait(seen, spin_, std::chrono::microseconds(20000));
  }
}

}  // namespace ep
