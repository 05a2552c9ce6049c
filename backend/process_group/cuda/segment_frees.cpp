#include "backend/process_group/cuda/segment_frees.hpp"

#include <c10/cuda/CUDACachingAllocator.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <vector>

namespace ep {
namespace {

namespace alloc = c10::cuda::CUDACachingAllocator;

struct Watched {
  int device;
  std::weak_ptr<ExportTable> exports;
};

// Leaked on purpose: the hook cannot be detached, and may run while statics are destroyed at exit.
std::mutex& registry_mutex() {
  static auto* m = new std::mutex;
  return *m;
}
std::vector<Watched>& registry() {
  static auto* r = new std::vector<Watched>;
  return *r;
}

// Runs on every allocator event of the process, under the allocator's lock: a segment's free
// alone does anything, and that is cheap (no CUDA call, no allocation through torch).
void on_allocator_event(const alloc::TraceEntry& e) {
  if (e.action_ != alloc::TraceEntry::SEGMENT_FREE) return;
  std::lock_guard<std::mutex> lock(registry_mutex());
  for (Watched& w : registry()) {
    if (w.device != e.device_) continue;
    // The transport's last owner may drop it meanwhile: ours is then the table's last reference,
    // and its destructor only unmaps its log of shared memory.
    if (std::shared_ptr<ExportTable> exports = w.exports.lock()) exports->forget(e.addr_, e.size_);
  }
}

}  // namespace

void report_segment_frees(const CudaTransport& transport) {
  if (!transport.releases_mappings()) return;
  // An allocator without trace hooks (cudaMallocAsync's) exports nothing over CUDA IPC either.
  static const bool attached = [] {
    try {
      alloc::attachAllocatorTraceTracker(on_allocator_event);
      return true;
    } catch (const std::exception&) {
      return false;
    }
  }();
  if (!attached) return;
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto& r = registry();
  // Transports that are gone leave their entries here: drop them as new ones come.
  r.erase(std::remove_if(r.begin(), r.end(), [](const Watched& w) { return w.exports.expired(); }), r.end());
  r.push_back({transport.device(), transport.exports()});
  transport.exports()->frees_reported();
}

}  // namespace ep
