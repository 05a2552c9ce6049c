// Packed rows: what the MoE ops' host-side paths move, a [rows, bytes] uint8 tensor whose
// columns are the fields of a row side by side (x | scales | ids | weights). Works on any device.
#pragma once

#include <ATen/ATen.h>

namespace ep::moe {

// A 2-D tensor's rows as raw bytes, [rows, width * element size].
inline at::Tensor as_bytes(const at::Tensor& t) {
  const int64_t width = t.size(1) * int64_t(t.element_size());
  // An empty tensor can carry strides (e.g. 0 from a broadcast) that view() refuses.
  if (t.numel() == 0) return at::empty({t.size(0), width}, t.options().dtype(at::kByte));
  return t.contiguous().view(at::kByte).reshape({t.size(0), width});
}

// Columns [at, at + bytes) of packed rows, as a [rows, width] tensor of `dtype`; advances `at`.
inline at::Tensor unpack(const at::Tensor& rows, int64_t& at, int64_t width, at::ScalarType dtype) {
  const int64_t bytes = width * int64_t(c10::elementSize(dtype));
  at::Tensor t = rows.narrow(1, at, bytes).clone(at::MemoryFormat::Contiguous).view(dtype);  // offset 0: aligned
  at += bytes;
  return t;
}

}  // namespace ep::moe
