// Tells a CUDA transport which of this rank's exported segments torch's caching allocator frees,
// so that its peers close their mappings of them (backend/transport/cuda/peer_mappings.hpp).
#pragma once

#include "backend/transport/cuda/cuda_transport.hpp"

namespace ep {

// Where `transport` releases mappings (unless TORCH_EP_RELEASE_PEER_MAPPINGS=0): from now on, each
// segment the caching allocator frees on its device is reported to its exports. The allocator's
// trace hook is attached once per process and holds the transports' exports weakly.
void report_segment_frees(const CudaTransport& transport);

}  // namespace ep
