// Argument checks for the ops torch_ep runs itself. They run on the calling thread before any
// communication, so bad input raises at once (ValueError / TypeError naming the argument) and
// the group stays usable.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace ep {

// Byte counts and offsets of each rank's block, indexed by peer.
struct AllToAllLayout {
  std::vector<size_t> send_bytes, send_offsets;
  std::vector<size_t> recv_bytes, recv_offsets;
};

AllToAllLayout check_all_to_all_single(const at::Tensor& output, const at::Tensor& input,
                                       const std::vector<int64_t>& output_split_sizes,
                                       const std::vector<int64_t>& input_split_sizes, int group_size);

void check_all_to_all(const std::vector<at::Tensor>& output_tensor_list,
                      const std::vector<at::Tensor>& input_tensor_list, int group_size);

}  // namespace ep
