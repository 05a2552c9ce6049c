// The per-call outputs of the CUDA ops, allocated without a round trip through the dispatcher.
//
// Why: at::empty inside an op's kernel dispatches again from the top (key set, kernel lookup, a
// profiler range), about 1 us a tensor, several under torch.profiler, and a dispatch allocates
// up to six; issue 18 asks for 30 us of host time per call. at::empty's CUDA kernel itself calls
// at::detail::empty_cuda (the caching allocator, and whatever MemPool the caller routes to), so
// the tensors are the same. Only in deterministic mode does that kernel do more (it fills the
// memory), and there the dispatcher's path is kept.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/EmptyTensor.h>

namespace ep {

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (C10_UNLIKELY(at::globalContext().deterministicAlgorithms() &&
                   at::globalContext().deterministicFillUninitializedMemory()) ||
      options.device().type() != at::kCUDA)
    return at::empty(sizes, options);
  return at::Tensor(at::detail::empty_cuda(sizes, options));
}

// moe_ops.hpp's placeholder(), made as empty_output makes a tensor.
inline at::Tensor placeholder_output(bool wanted, const at::TensorOptions& options) {
  return wanted ? empty_output({0}, options) : at::Tensor();
}

}  // namespace ep
