#include "backend/transport/rendezvous.hpp"

#include "backend/common/errors.hpp"

namespace ep {

std::vector<std::vector<uint8_t>> Rendezvous::all_gather(const std::string& tag,
                                                         const std::vector<uint8_t>& value) {
  set(tag + "/" + std::to_string(rank()), value);
  std::vector<std::vector<uint8_t>> all(size());
  for (int r = 0; r < size(); ++r) {
    if (r == rank()) {
      all[r] = value;
      continue;
    }
    try {
      all[r] = get(tag + "/" + std::to_string(r));
    } catch (const TimeoutError& e) {
      throw TimeoutError("rank " + std::to_string(r) + " never arrived: " + e.what());
    }
  }
  return all;
}

std::vector<uint8_t> to_bytes(const std::string& s) { return {s.begin(), s.end()}; }

}  // namespace ep
