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

#include <array>

namespace ep {

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (C10_UNLIKELY(at::globalContext().deterministicAlgorithms() &&
                   at::globalContext().deterministicFillUninitializedMemory()) ||
      options.device().type() != at::kCUDA)
    return at::empty(sizes, options);
  return at::Tensor(at::detail::empty_cuda(sizes, options));
}

// One output of empty_outputs_together: [rows, cols] of `dtype`, made only where `wanted`.
struct OutputShape {
  bool wanted;
  int64_t rows, cols;
  at::ScalarType dtype;
};

// Small outputs that live and die together (a dispatch's ids, weights and scales beside recv_x) in
// one allocation: each a tensor of its own over one storage, at offsets aligned to 256 bytes. One
// call into the caching allocator, and one free later, where each tensor took one of each (about
// 1 us of host time apiece; issue 18). The block stays allocated while any of them lives, so
// recv_x, whose size dwarfs theirs, keeps an allocation of its own. Unwanted shapes give undefined
// tensors. `apart`: each in an allocation of its own (TORCH_EP_OUTPUTS_TOGETHER=0 for dispatch:
// moe_cuda.cpp).
template <size_t N>
std::array<at::Tensor, N> empty_outputs_together(const std::array<OutputShape, N>& shapes,
                                                 const at::TensorOptions& options, bool apart = false) {
  std::array<at::Tensor, N> out;
  const bool together = !apart && !(at::globalContext().deterministicAlgorithms() &&
                                    at::globalContext().deterministicFillUninitializedMemory()) &&
                        options.device().type() == at::kCUDA;
  std::array<int64_t, N> offset{};
  int64_t bytes = 0;
  for (size_t i = 0; i < N; ++i) {
    const OutputShape& s = shapes[i];
    if (!s.wanted) continue;
    if (!together) {  // each apart, as empty_output makes them (deterministic mode fills each by its dtype)
      out[i] = empty_output({s.rows, s.cols}, options.dtype(s.dtype));
      continue;
    }
    offset[i] = bytes;
    bytes += (s.rows * s.cols * int64_t(c10::elementSize(s.dtype)) + 255) / 256 * 256;
  }
  if (!together) return out;
  const at::TensorBase block = at::detail::empty_cuda({bytes}, options.dtype(at::kByte));
  for (size_t i = 0; i < N; ++i) {
    const OutputShape& s = shapes[i];
    if (!s.wanted) continue;
    out[i] = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(block.storage()),
                                                      c10::DispatchKeySet(c10::DispatchKey::CUDA),
                                                      c10::scalarTypeToTypeMeta(s.dtype));
    c10::TensorImpl* impl = out[i].unsafeGetTensorImpl();
    impl->set_sizes_contiguous({s.rows, s.cols});
    impl->set_storage_offset(offset[i] / int64_t(c10::elementSize(s.dtype)));
  }
  return out;
}

// moe_ops.hpp's placeholder(), made as empty_output makes a tensor.
inline at::Tensor placeholder_output(bool wanted, const at::TensorOptions& options) {
  return wanted ? empty_output({0}, options) : at::Tensor();
}

}  // namespace ep
