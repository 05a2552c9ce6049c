// backend/transport/cuda/peer_mappings.cpp on the host, against a fake CUDA runtime that counts
// each IPC mapping's references as the driver does (tests/test_peer_mappings_host.py builds it).
// Two ranks are two threads of this process, meeting through an in-memory rendezvous.
#include <cuda.h>
#include <cuda_runtime.h>

#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>

#include "backend/transport/cuda/peer_mappings.hpp"

// ---- the fake driver: allocations of rank 0 at fixed addresses; handles name them
namespace {
std::mutex driver_mutex;
std::map<uint64_t, int> mapped;  // buffer id -> references held by the importer
int failures = 0;
#define EXPECT(cond, ...)            \
  do {                               \
    if (!(cond)) {                   \
      std::printf(__VA_ARGS__);      \
      std::printf(" (line %d)\n", __LINE__); \
      ++failures;                    \
    }                                \
  } while (0)

constexpr uint64_t kSegment = 1 << 24;  // allocation i spans [(i + 1) * kSegment, (i + 2) * kSegment)
uint64_t id_of(const cudaIpcMemHandle_t& h) {
  uint64_t id;
  std::memcpy(&id, h.reserved, sizeof(id));
  return id;
}
cudaIpcMemHandle_t handle_of(uint64_t id) {
  cudaIpcMemHandle_t h{};
  std::memcpy(h.reserved, &id, sizeof(id));
  return h;
}
char* importer_address(uint64_t id) { return reinterpret_cast<char*>(0x7000000000ull + id * kSegment); }
}  // namespace

extern "C" {
CUresult cuPointerGetAttributes(unsigned int, CUpointer_attribute*, void** data, CUdeviceptr ptr) {
  const uint64_t id = ptr / kSegment - 1;
  *static_cast<unsigned long long*>(data[0]) = id;
  *static_cast<CUdeviceptr*>(data[1]) = (id + 1) * kSegment;
  *static_cast<size_t*>(data[2]) = kSegment;
  return CUDA_SUCCESS;
}
cudaError_t cudaIpcGetMemHandle(cudaIpcMemHandle_t* handle, void* base) {
  *handle = handle_of(reinterpret_cast<uint64_t>(base) / kSegment - 1);
  return cudaSuccess;
}
cudaError_t cudaIpcOpenMemHandle(void** ptr, cudaIpcMemHandle_t handle, unsigned int) {
  std::lock_guard<std::mutex> lock(driver_mutex);
  ++mapped[id_of(handle)];  // opened again: the same address, one reference more
  *ptr = importer_address(id_of(handle));
  return cudaSuccess;
}
cudaError_t cudaIpcCloseMemHandle(void* ptr) {
  std::lock_guard<std::mutex> lock(driver_mutex);
  const uint64_t id = (reinterpret_cast<uint64_t>(ptr) - 0x7000000000ull) / kSegment;
  EXPECT(mapped[id] > 0, "closed allocation %llu, which was not mapped", (unsigned long long)id);
  --mapped[id];
  return cudaSuccess;
}
cudaError_t cudaGetLastError() { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "fake"; }
}

// ---- two ranks in one process
class LocalRendezvous : public ep::Rendezvous {
 public:
  LocalRendezvous(int rank, LocalRendezvous* shared) : rank_(rank), shared_(shared ? shared : this) {}
  int rank() const override { return rank_; }
  int size() const override { return 2; }
  void set(const std::string& key, const std::vector<uint8_t>& value) override {
    std::lock_guard<std::mutex> lock(shared_->mutex_);
    shared_->values_[key] = value;
    shared_->cv_.notify_all();
  }
  std::vector<uint8_t> get(const std::string& key) override {
    std::unique_lock<std::mutex> lock(shared_->mutex_);
    shared_->cv_.wait(lock, [&] { return shared_->values_.count(key) > 0; });
    return shared_->values_[key];
  }
  void barrier(const std::string& tag) override {
    set(tag + "/" + std::to_string(rank_), {1});
    get(tag + "/" + std::to_string(1 - rank_));
  }

 private:
  int rank_;
  LocalRendezvous* shared_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::map<std::string, std::vector<uint8_t>> values_;
};

int references(uint64_t id) {
  std::lock_guard<std::mutex> lock(driver_mutex);
  return mapped[id];
}

int main() {
  LocalRendezvous rdv0(0, nullptr), rdv1(1, &rdv0);
  ep::PeerMappings* m[2] = {nullptr, nullptr};
  std::thread other([&] { m[1] = new ep::PeerMappings(rdv1, "t"); });
  m[0] = new ep::PeerMappings(rdv0, "t");
  other.join();
  ep::ExportTable exports0(m[0]->take_own_log());
  exports0.frees_reported();
  ep::PeerMappings& importer = *m[1];
  std::atomic<uint64_t> tracked{0}, completed{0};

  // Rank 0 exports allocations 0..3 (an offset inside each); rank 1 maps them once.
  cudaIpcMemHandle_t h[4];
  for (uint64_t i = 0; i < 4; ++i) {
    uint64_t offset = 0;
    EXPECT(exports0.export_allocation(reinterpret_cast<void*>((i + 1) * kSegment + 64), &h[i], &offset, nullptr) &&
               offset == 64 && id_of(h[i]) == i,
           "export %llu", (unsigned long long)i);
    auto hold = importer.hold();
    EXPECT(importer.open(0, h[i]) == importer_address(i) && importer.open(0, h[i]) == importer_address(i),
           "open %llu", (unsigned long long)i);
  }
  for (uint64_t i = 0; i < 4; ++i) EXPECT(references(i) == 1, "allocation %llu mapped once", (unsigned long long)i);
  EXPECT(importer.open_count() == 4, "four open");

  // Rank 0 frees allocation 1 while 5 calls of rank 1 are tracked, 3 of them complete.
  tracked = 5;
  completed = 3;
  exports0.forget((1 + 1) * kSegment, kSegment);
  {
    auto hold = importer.hold();  // a call between its lookups and its tracking: the watchdog's sweep waits
    std::thread watchdog([&] { importer.sweep(tracked, completed); });
    watchdog.join();
  }
  EXPECT(importer.open_count() == 4 && importer.closing_count() == 0, "a held sweep does nothing");
  importer.sweep(tracked, completed);
  EXPECT(importer.open_count() == 3 && importer.closing_count() == 1 && references(1) == 1,
         "retired, not closed while calls 4 and 5 run");
  completed = 4;
  tracked = 7;  // later calls do not hold it back
  importer.sweep(tracked, completed);
  EXPECT(references(1) == 1, "still open after call 4");
  completed = 5;
  importer.sweep(tracked, completed);
  EXPECT(references(1) == 0 && importer.closing_count() == 0, "closed once call 5 is complete");

  // Freed, then met again before the close (an address the driver handed back): mapped twice, closed once.
  exports0.forget((2 + 1) * kSegment, kSegment);
  importer.sweep(tracked, completed);
  {
    auto hold = importer.hold();
    EXPECT(importer.open(0, h[2]) == importer_address(2) && references(2) == 2, "met again while closing");
  }
  completed = 7;
  importer.sweep(tracked, completed);
  EXPECT(references(2) == 1 && importer.open_count() == 3, "the new mapping stays open");

  // A segment without exports, and one whose export the exporter no longer has, log nothing.
  exports0.forget(100 * kSegment, kSegment);
  exports0.forget((1 + 1) * kSegment, kSegment);
  importer.sweep(tracked, completed);
  EXPECT(importer.open_count() == 3, "nothing retired by frees of other segments");

  // The exporter laps the importer's reading (more than the log holds): every mapping of that
  // peer goes, and calls map what they meet again.
  for (uint64_t i = 10; i < 10 + ep::FreedExportsLog::kEntries + 5; ++i) {
    cudaIpcMemHandle_t x;
    uint64_t offset;
    exports0.export_allocation(reinterpret_cast<void*>((i + 1) * kSegment), &x, &offset, nullptr);
    exports0.forget((i + 1) * kSegment, kSegment);
  }
  importer.sweep(tracked, completed);
  EXPECT(importer.open_count() == 0 && importer.closing_count() == 0, "lapped: all retired and closed");
  for (uint64_t i = 0; i < 4; ++i) EXPECT(references(i) == 0, "allocation %llu closed", (unsigned long long)i);

  // The destructor closes what is open and what waits.
  {
    auto hold = importer.hold();
    importer.open(0, h[0]);
    importer.open(0, h[3]);
  }
  exports0.forget((3 + 1) * kSegment, kSegment);
  tracked = 9;
  importer.sweep(tracked, completed);
  EXPECT(importer.open_count() == 1 && importer.closing_count() == 1, "one open, one waiting");
  delete m[1];
  delete m[0];
  EXPECT(references(0) == 0 && references(3) == 0, "the destructor closed both");
  return failures ? 1 : 0;
}
