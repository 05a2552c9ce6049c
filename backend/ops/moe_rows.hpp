// Packed rows: what the MoE ops' host-side paths move, a [rows, bytes] uint8 tensor whose
// columns are the fields of a row side by side (x | scales | ids | weights). Works on any device.
#pragma once

#include <ATen/ATen.h>

#include "backend/common/errors.hpp"
#include "backend/ops/moe_ops.hpp"

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

// A dispatch's received rows (x | scales | local expert ids unless `cached` | weights) as its
// outputs on x's device, padded to num_worst_tokens where asked: real rows first, then padding
// that routes nowhere. Leaves meta and counts to the caller.
inline DispatchOutputs unpack_dispatch_rows(const at::Tensor& rows, const DispatchArgs& a, bool cached, int64_t rank,
                                            int64_t call_id) {
  const int64_t M = rows.size(0), H = a.x.size(1), K = cached ? 0 : a.topk_idx->size(1);
  const at::TensorOptions opts = a.x.options();
  DispatchOutputs o;
  int64_t at = 0;
  o.recv_x = unpack(rows, at, H, a.x.scalar_type());
  o.recv_x_scales = a.x_scales ? unpack(rows, at, a.x_scales->size(1), at::kFloat)
                               : placeholder(a.placeholders, opts.dtype(at::kFloat));
  o.recv_topk_idx = cached ? placeholder(a.placeholders, opts.dtype(at::kLong)) : unpack(rows, at, K, at::kLong);
  o.recv_topk_weights = a.topk_weights ? unpack(rows, at, K, at::kFloat) : placeholder(a.placeholders, opts.dtype(at::kFloat));
  if (a.num_worst_tokens > 0) {
    TORCH_CHECK_VALUE(M <= a.num_worst_tokens, dispatch_overflow_message(call_id, rank, M, a.num_worst_tokens,
                                                                         /*dropped=*/false));
    auto pad = [&](const at::Tensor& t, double value) {
      if (!t.defined() || t.dim() < 2) return t;  // a placeholder
      at::Tensor out = at::full({a.num_worst_tokens, t.size(1)}, value, t.options());
      out.narrow(0, 0, M).copy_(t);
      return out;
    };
    o.recv_x = pad(o.recv_x, 0);
    o.recv_x_scales = pad(o.recv_x_scales, 0);
    o.recv_topk_idx = pad(o.recv_topk_idx, -1);
    o.recv_topk_weights = pad(o.recv_topk_weights, 0);
  }
  return o;
}

}  // namespace ep::moe
