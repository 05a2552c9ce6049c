#include "backend/process_group/fault_log.hpp"

#include <algorithm>
#include <cctype>
#include <condition_variable>
#include <set>
#include <thread>

namespace ep {
namespace {

constexpr size_t kMaxMessageBytes = 1000;  // of a record in the store
constexpr size_t kQuotedBytes = 400;       // of a record quoted in another rank's error
constexpr int kMaxHops = 8;
constexpr int64_t kMaxScanned = 16;        // earliest records read where the peer left none
constexpr auto kPoll = std::chrono::milliseconds(50);

std::string clip(const std::string& s, size_t n) { return s.size() <= n ? s : s.substr(0, n) + "..."; }

// Runs `work` on a thread of its own and waits for it at most `limit`: a TCP store whose host
// died may hold a call until its own timeout (minutes). Empty where `work` threw or ran late; a
// late one finishes alone, holding only what it captured.
std::optional<std::string> run_bounded(std::function<std::string()> work, std::chrono::milliseconds limit) {
  struct Task {
    std::mutex mutex;
    std::condition_variable cv;
    bool done = false;
    std::optional<std::string> result;
  };
  auto task = std::make_shared<Task>();
  try {
    std::thread([task, work = std::move(work)] {
      std::optional<std::string> result;
      try {
        result = work();
      } catch (...) {  // the store is gone or refuses: the caller goes on without it
      }
      std::lock_guard<std::mutex> lock(task->mutex);
      task->result = std::move(result);
      task->done = true;
      task->cv.notify_all();
    }).detach();
  } catch (const std::exception&) {
    return std::nullopt;
  }
  std::unique_lock<std::mutex> lock(task->mutex);
  if (!task->cv.wait_for(lock, limit, [&] { return task->done; })) return std::nullopt;
  return task->result;
}

}  // namespace

std::string serialize_fault(const FaultRecord& r) {
  return "v1\n" + std::to_string(r.rank) + "\n" + std::to_string(r.peer) + "\n" + std::to_string(r.time_ms) + "\n" +
         r.op + "\n" + clip(r.message, kMaxMessageBytes);
}

std::optional<FaultRecord> parse_fault(const std::string& text) {
  std::vector<std::string> fields;
  size_t at = 0;
  for (int i = 0; i < 5; ++i) {
    const size_t nl = text.find('\n', at);
    if (nl == std::string::npos) return std::nullopt;
    fields.push_back(text.substr(at, nl - at));
    at = nl + 1;
  }
  if (fields[0] != "v1") return std::nullopt;
  FaultRecord r;
  try {
    r.rank = std::stoi(fields[1]);
    r.peer = std::stoi(fields[2]);
    r.time_ms = std::stoll(fields[3]);
  } catch (const std::exception&) {
    return std::nullopt;
  }
  r.op = fields[4];
  r.message = text.substr(at);
  return r;
}

int first_peer_named(const std::string& message, int self) {
  auto word_char = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
  for (size_t i = message.find("rank"); i != std::string::npos; i = message.find("rank", i + 1)) {
    if (i > 0 && word_char(message[i - 1])) continue;
    size_t j = i + 4;
    if (message.compare(j, 3, "(s)") == 0) j += 3;
    else if (message.compare(j, 1, "s") == 0) j += 1;
    if (j >= message.size() || message[j] != ' ') continue;
    // "rank(s) 0, 1": a list of several other ranks (a watchdog's "every peer of the op") names
    // none of them as the one it waited for, so it blames no one.
    int named = -1, others = 0;
    for (++j; j < message.size() && std::isdigit(static_cast<unsigned char>(message[j]));) {
      size_t end = j;
      while (end < message.size() && std::isdigit(static_cast<unsigned char>(message[end]))) ++end;
      if (end - j > 9) break;
      const int r = std::stoi(message.substr(j, end - j));
      if (r != self && others++ == 0) named = r;
      if (message.compare(end, 2, ", ") != 0) break;
      j = end + 2;
    }
    if (others == 1) return named;
    if (others > 1) return -1;
  }
  return -1;
}

std::string op_named(const std::string& message) {
  std::string s = message.rfind("torch_ep: ", 0) == 0 ? message.substr(10) : message;
  s = s.substr(0, s.find(':'));
  s = s.substr(0, s.find(" on rank "));
  const bool name = !s.empty() && std::all_of(s.begin(), s.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_';
  });
  return name ? s : "";
}

std::string root_cause_suffix(int self, int peer, const std::function<std::optional<FaultRecord>(int)>& lookup,
                              const std::vector<FaultRecord>& earlier) {
  if (peer < 0) return "";
  std::string lead;
  int start = peer;
  if (const auto first = lookup(peer)) {
    if (first->peer == self) return "";  // it stopped because of this rank: nothing came before
    lead = "; rank " + std::to_string(peer) + " had stopped first";
  } else {
    // Perhaps the peer is stuck and has not noticed yet: the earliest record that is not
    // about this rank stands in.
    auto it = std::find_if(earlier.begin(), earlier.end(), [&](const FaultRecord& r) {
      return r.rank != self && r.rank != peer && r.peer != self && r.peer != peer;
    });
    if (it == earlier.end()) return "";
    start = it->rank;
    lead = "; rank " + std::to_string(peer) + " recorded no error, but rank " + std::to_string(start) +
           " had stopped first";
  }
  // Follow each record to the rank it blames, until one that recorded nothing (the likely
  // dead one) or one that stopped because of a rank already on the chain.
  std::vector<FaultRecord> chain;
  std::set<int> visited{self};
  int end = -1;
  for (int cur = start; int(chain.size()) < kMaxHops;) {
    const auto r = lookup(cur);
    if (!r) {
      end = cur;
      break;
    }
    if (!chain.empty() && visited.count(r->peer)) break;
    visited.insert(cur);
    chain.push_back(*r);
    if (r->peer < 0 || visited.count(r->peer)) break;
    cur = r->peer;
  }
  if (chain.empty()) return "";  // the record went away between two reads
  std::string s = lead;
  const size_t n = chain.size();
  if (n >= 2) s += ", after rank " + std::to_string(chain[1].rank);
  if (n >= 4) s += ", ...";
  if (n >= 3) s += ", which had stopped after rank " + std::to_string(chain[n - 1].rank);
  s += ": " + clip(chain.back().message, kQuotedBytes);
  if (end >= 0) s += "; rank " + std::to_string(end) + " recorded no error (it may have died)";
  return s;
}

// ----------------------------------------------------------------------------- FaultLog

struct FaultLog::Shared {
  c10::intrusive_ptr<c10d::Store> store;
  std::string prefix;
  int rank, size;
  std::atomic<bool> unreachable{false};  // a call ran past its deadline or failed: ask no more
  std::atomic<int64_t> order{0};         // where this rank's record came in the store's order; 0: none

  std::string key(int r) const { return prefix + std::to_string(r); }
  std::optional<FaultRecord> lookup(int r) {
    if (r < 0 || r >= size || !store->check({key(r)})) return std::nullopt;
    const std::vector<uint8_t> bytes = store->get(key(r));
    return parse_fault(std::string(bytes.begin(), bytes.end()));
  }
  // The records that reached the store before this rank's (all, where it has none), in order.
  std::vector<FaultRecord> earlier() {
    std::vector<FaultRecord> out;
    const int64_t mine = order.load();
    const int64_t count = store->add(prefix + "count", 0);  // reads without waiting
    const int64_t last = std::min(mine > 0 ? mine - 1 : count, kMaxScanned);
    for (int64_t n = 1; n <= last; ++n) {
      const std::string k = prefix + "order/" + std::to_string(n);
      if (!store->check({k})) continue;  // counted, not yet named
      const std::vector<uint8_t> who = store->get(k);
      if (auto r = lookup(std::atoi(std::string(who.begin(), who.end()).c_str())); r && r->rank != rank)
        out.push_back(*r);
    }
    return out;
  }
};

FaultLog::FaultLog(c10::intrusive_ptr<c10d::Store> store, std::string prefix, int rank, int size)
    : shared_(std::make_shared<Shared>()), rank_(rank) {
  shared_->store = std::move(store);
  shared_->prefix = std::move(prefix);
  shared_->rank = rank;
  shared_->size = size;
}

std::string FaultLog::instance_prefix(c10d::Store& store, int rank) {
  // A counter per rank: each rank's n-th group on this store (torch gives each group name a
  // store prefix of its own) is instance n, however the ranks' creations interleave.
  const int64_t n = store.add("ep/fault/instances/" + std::to_string(rank), 1);
  return "ep/fault/" + std::to_string(n - 1) + "/";
}

void FaultLog::record(const std::string& message, bool wait) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (recorded_) return;
    recorded_ = true;
  }
  if (shared_->unreachable.load()) return;
  FaultRecord r;
  r.rank = rank_;
  r.peer = first_peer_named(message, rank_);
  r.time_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                  std::chrono::system_clock::now().time_since_epoch()).count();
  r.op = op_named(message);
  r.message = message;
  const std::string text = serialize_fault(r);
  auto done = run_bounded(
      [s = shared_, text]() {
        s->store->set(s->key(s->rank), std::vector<uint8_t>(text.begin(), text.end()));
        const int64_t n = s->store->add(s->prefix + "count", 1);
        s->order = n;
        const std::string who = std::to_string(s->rank);
        s->store->set(s->prefix + "order/" + std::to_string(n), std::vector<uint8_t>(who.begin(), who.end()));
        return std::string();
      },
      wait ? kDeadline - kGrace : std::chrono::milliseconds(0));
  if (!done && wait) shared_->unreachable = true;
}

std::string FaultLog::explain(const std::string& message) {
  const int peer = first_peer_named(message, rank_);
  if (peer < 0) return message;
  bool waited_before = false;  // the grace for this peer was spent once: look, do not wait
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (auto it = suffixes_.find(peer); it != suffixes_.end()) return message + it->second;
    waited_before = !graced_.insert(peer).second;
  }
  // A peer seen gone will record nothing: look once, do not wait for it.
  if (message.find("exited") != std::string::npos) waited_before = true;
  std::string suffix;
  if (!shared_->unreachable.load()) {
    auto found = run_bounded(
        [s = shared_, peer, grace = waited_before ? std::chrono::milliseconds(0) : kGrace]() {
          std::map<int, std::optional<FaultRecord>> seen;  // one read per rank and explanation
          auto lookup = [&](int r) {
            auto it = seen.find(r);
            if (it == seen.end()) it = seen.emplace(r, s->lookup(r)).first;
            return it->second;
          };
          const auto grace_end = std::chrono::steady_clock::now() + grace;
          std::optional<FaultRecord> first = s->lookup(peer);
          while (!first && std::chrono::steady_clock::now() < grace_end) {
            std::this_thread::sleep_for(kPoll);
            first = s->lookup(peer);
          }
          seen.emplace(peer, first);
          const std::vector<FaultRecord> earlier = first ? std::vector<FaultRecord>() : s->earlier();
          return root_cause_suffix(s->rank, peer, lookup, earlier);
        },
        kDeadline);
    if (found) suffix = *found;
    else shared_->unreachable = true;
  }
  // Only a cause found is kept: a peer that had recorded nothing yet may record later.
  std::lock_guard<std::mutex> lock(mutex_);
  if (!suffix.empty()) suffixes_.emplace(peer, suffix);
  return message + suffix;
}

}  // namespace ep
