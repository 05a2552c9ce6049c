#include "backend/process_group/validate.hpp"

#include <c10/util/Exception.h>

namespace ep {
namespace {

int64_t row_elements(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

// Splits count rows (dim 0). Empty splits mean an even split.
void plan_side(const char* tensor_name, const char* splits_name, const at::Tensor& t,
               const std::vector<int64_t>& splits, int group_size, std::vector<size_t>& bytes,
               std::vector<size_t>& offsets) {
  const int64_t rows = t.dim() == 0 ? 1 : t.size(0);
  const size_t row_bytes = size_t(row_elements(t)) * t.element_size();
  std::vector<int64_t> counts(group_size);
  if (splits.empty()) {
    TORCH_CHECK_VALUE(rows % group_size == 0, "all_to_all_single: ", tensor_name, " has ", rows,
                      " rows (dim 0), which do not split evenly among ", group_size, " ranks; pass ", splits_name);
    std::fill(counts.begin(), counts.end(), rows / group_size);
  } else {
    TORCH_CHECK_VALUE(int64_t(splits.size()) == group_size, "all_to_all_single: ", splits_name, " has ",
                      splits.size(), " entries, expected ", group_size, " (one per rank of the group)");
    int64_t sum = 0;
    for (int r = 0; r < group_size; ++r) {
      TORCH_CHECK_VALUE(splits[r] >= 0, "all_to_all_single: ", splits_name, "[", r, "] is ", splits[r],
                        ", expected a count >= 0");
      sum += splits[r];
    }
    TORCH_CHECK_VALUE(sum == rows, "all_to_all_single: ", splits_name, " sum to ", sum, " but ", tensor_name,
                      " has ", rows, " rows (dim 0)");
    counts = splits;
  }
  bytes.resize(group_size);
  offsets.resize(group_size);
  size_t offset = 0;
  for (int r = 0; r < group_size; ++r) {
    offsets[r] = offset;
    bytes[r] = size_t(counts[r]) * row_bytes;
    offset += bytes[r];
  }
}

}  // namespace

AllToAllLayout check_all_to_all_single(const at::Tensor& output, const at::Tensor& input,
                                       const std::vector<int64_t>& output_split_sizes,
                                       const std::vector<int64_t>& input_split_sizes, int group_size) {
  TORCH_CHECK_VALUE(output.device() == input.device(), "all_to_all_single: input is on ", input.device(),
                    " but output is on ", output.device(), "; both must be on one device");
  TORCH_CHECK_TYPE(output.scalar_type() == input.scalar_type(), "all_to_all_single: output has dtype ",
                   output.scalar_type(), " but input has dtype ", input.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(!output.is_sparse() && !input.is_sparse(), "all_to_all_single: sparse tensors are not supported");
  TORCH_CHECK_VALUE(output.dim() == 0 || input.dim() == 0 || row_elements(output) == row_elements(input),
                    "all_to_all_single: output rows hold ", row_elements(output), " elements but input rows hold ",
                    row_elements(input), "; both tensors must have the same shape after dim 0");
  AllToAllLayout layout;
  plan_side("input", "input_split_sizes", input, input_split_sizes, group_size, layout.send_bytes,
            layout.send_offsets);
  plan_side("output", "output_split_sizes", output, output_split_sizes, group_size, layout.recv_bytes,
            layout.recv_offsets);
  return layout;
}

void check_all_to_all(const std::vector<at::Tensor>& outputs, const std::vector<at::Tensor>& inputs,
                      int group_size) {
  TORCH_CHECK_VALUE(int(inputs.size()) == group_size, "all_to_all: input_tensor_list has ", inputs.size(),
                    " tensors, expected ", group_size, " (one per rank of the group)");
  TORCH_CHECK_VALUE(int(outputs.size()) == group_size, "all_to_all: output_tensor_list has ", outputs.size(),
                    " tensors, expected ", group_size, " (one per rank of the group)");
  const at::Tensor& first = inputs[0];
  for (int r = 0; r < group_size; ++r) {
    for (const auto* list : {&inputs, &outputs}) {
      const at::Tensor& t = (*list)[r];
      const char* name = list == &inputs ? "input_tensor_list" : "output_tensor_list";
      TORCH_CHECK_VALUE(t.device() == first.device(), "all_to_all: ", name, "[", r, "] is on ", t.device(),
                        " but input_tensor_list[0] is on ", first.device(), "; all tensors must be on one device");
      TORCH_CHECK_TYPE(t.scalar_type() == first.scalar_type(), "all_to_all: ", name, "[", r, "] has dtype ",
                       t.scalar_type(), " but input_tensor_list[0] has dtype ", first.scalar_type(),
                       "; all tensors must have one dtype");
      TORCH_CHECK_VALUE(!t.is_sparse(), "all_to_all: ", name, "[", r, "] is sparse, which is not supported");
    }
  }
}

}  // namespace ep
