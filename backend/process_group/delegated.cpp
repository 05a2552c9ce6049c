// ProcessGroupEP's delegated half: every collective but all_to_all goes to the inner backend of
// its tensors' device (barriers to the CPU one), with AVG and PREMUL_SUM emulated on Gloo, which
// lacks them.
#include "backend/process_group/process_group_ep.hpp"

#include "backend/process_group/work.hpp"

namespace ep {

c10::intrusive_ptr<c10d::Work> ProcessGroupEP::broadcast(std::vector<at::Tensor>& tensors,
                                                         const c10d::BroadcastOptions& opts) {
  return inner_for(tensors, "broadcast")->broadcast(tensors, opts);
}
double ProcessGroupEP::premul_factor(const c10d::ReduceOp& op) {
  auto* s = dynamic_cast<c10d::NCCLPreMulSumSupplement*>(op.supplement_.get());
  TORCH_CHECK_VALUE(s, "PREMUL_SUM needs a factor");
  return s->tensor_factor.defined() ? s->tensor_factor.item<double>() : s->double_factor;
}

bool ProcessGroupEP::needs_emulation(const c10d::Backend& inner, const c10d::ReduceOp& op) const {
  return inner.getBackendName() == "gloo" && (op == c10d::ReduceOp::AVG || op == c10d::ReduceOp::PREMUL_SUM);
}

std::vector<at::Tensor> ProcessGroupEP::scaled_copies(const std::vector<at::Tensor>& tensors,
                                                      const c10d::ReduceOp& op) {
  if (op != c10d::ReduceOp::PREMUL_SUM) return tensors;
  const double factor = premul_factor(op);
  std::vector<at::Tensor> out;
  for (const auto& t : tensors) out.push_back(t.mul(factor));  // never scale the caller's input
  return out;
}

c10::intrusive_ptr<c10d::Work> ProcessGroupEP::emulate_reduction(
    const c10d::ReduceOp& op, std::vector<at::Tensor> results, std::vector<at::Tensor> outputs, c10d::OpType type,
    const std::function<c10::intrusive_ptr<c10d::Work>()>& launch_sum) {
  const int size = getSize();
  const bool average = op == c10d::ReduceOp::AVG;
  return with_future(launch_sum(), outputs, type, [results, outputs, size, average]() {
    for (size_t i = 0; i < results.size(); ++i) {
      if (average) {  // integer AVG truncates, as NCCL's ncclAvg does
        if (at::isIntegralType(results[i].scalar_type(), /*includeBool=*/true)) results[i].div_(size, "trunc");
        else results[i].div_(size);
      }
      if (i < outputs.size() && !results[i].is_same(outputs[i])) outputs[i].copy_(results[i]);
    }
  });
}

c10::intrusive_ptr<c10d::Work> ProcessGroupEP::with_future(c10::intrusive_ptr<c10d::Work> inner_work,
                                                           std::vector<at::Tensor> outputs, c10d::OpType type,
                                                           std::function<void()> finish) {
  auto work = c10::make_intrusive<EPWork>(getRank(), type, "ep:delegated", outputs);
  // Finished on the worker thread: Gloo's Works do not all offer getFuture().
  host_worker_.enqueue([work, inner_work, finish = std::move(finish)]() mutable {
    std::exception_ptr error;
    try {
      inner_work->wait();
      if (finish) finish();
    } catch (...) {
      error = as_dist_error(std::current_exception());
    }
    inner_work.reset();  // its tensors go before the caller goes on, as in host_all_to_all
    finish = nullptr;
    work->complete(error);
  });
  return work;
}

c10::intrusive_ptr<c10d::Work> ProcessGroupEP::allreduce(std::vector<at::Tensor>& tensors,
                                                         const c10d::AllreduceOptions& opts) {
  auto inner = inner_for(tensors, "all_reduce");
  if (!needs_emulation(*inner, opts.reduceOp)) return inner->allreduce(tensors, opts);
  auto operands = scaled_copies(tensors, opts.reduceOp);
  return emulate_reduction(opts.reduceOp, operands, tensors, c10d::OpType::ALLREDUCE, [&] {
    c10d::AllreduceOptions o = opts;
    o.reduceOp = c10d::ReduceOp::SUM;
    return inner->allreduce(operands, o);
  });
}
c10::intrusive_ptr<c10d::Work> ProcessGroupEP::allreduce_sparse(std::vector<at::Tensor>& tensors,
                                                                const c10d::AllreduceOptions& opts) {
  return inner_for(tensors, "all_reduce")->allreduce_sparse(tensors, opts);
}
c10::intrusive_ptr<c10d::Work> ProcessGroupEP::allreduce_coalesced(std::vector<at::Tensor>& tensors,
                                                                   const c10d::AllreduceCoalescedOptions& opts) {
  auto inner = inner_for(tensors, "all_reduce_coalesced");
  if (!needs_emulation(*inner, opts.reduceOp)) return inner->allreduce_coalesced(tensors, opts);
  auto operands = scaled_copies(tensors, opts.reduceOp);
  return emulate_reduction(opts.reduceOp, operands, tensors, c10d::OpType::ALLREDUCE_COALESCED, [&] {
    c10d::AllreduceCoalescedOptions o = opts;
    o.reduceOp = c10d::ReduceOp::SUM;
    return inner->allreduce_coalesced(operands, o);
  });
}
c10::intrusive_ptr<c10d::Work> ProcessGroupEP::reduce(std::vector<at::Tensor>& tensors,
                                                      const c10d::ReduceOptions& opts) {
  auto inner = inner_for(tensors, "reduce");
  if (!needs_emulation(*inner, opts.reduceOp)) return inner->reduce(tensors, opts);
  auto operands = scaled_copies(tensors, opts.reduceOp);
  // Only the root's tensor receives the result; the others keep their input.
  const bool root = opts.rootRank == getRank();
  return emulate_reduction(opts.reduceOp, root ? operands : std::vector<at::Tensor>{},
                           root ? tensors : std::vector<at::Tensor>{}, c10d::OpType::REDUCE, [&] {
                             c10d::ReduceOptions o = opts;
                             o.reduceOp = c10d::ReduceOp::SUM;
                             return inner->reduce(operands, o);
                           });
}
c10::intrusive_ptr<c10d::Work> ProcessGroupEP::allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                                         std::vector<at::Tensor>& inputs,
                                                         const c10d::AllgatherOptions& opts) {
  return inner_for(inputs, "all_gather")->allgather(outputs, inputs, opts);
}
c10::intrusive_ptr<c10d::Work> ProcessGroupEP::_allgather_base(at::Tensor& output, at::Tensor& input,
                                                               const c10d::AllgatherOptions& opts) {
  return inner_for(input, "all_gather_into_tensor")->_allgather_base(output, input, opts);
}
c10::intrusive_ptr<c10d::Work> ProcessGroupEP::allgather_coalesced(std::vector<std::vector<at::Tensor>>& outputs,
                                                                   std::vector<at::Tensor>& inputs,
                                                                   const c10d::AllgatherOptions& opts) {
  return inner_for(inputs, "all_gather_coalesced")->allgather_coalesced(outputs, inputs, opts);
}
c10::intrusive_ptr<c10d::Work> ProcessGroupEP::allgather_into_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                                               std::vector<at::Tensor>& inputs,
                                                                               const c10d::AllgatherOptions& opts) {
  return inner_for(inputs, "all_gather_into_tensor_coalesced")->allgather_into_tensor_coalesced(outputs, inputs, opts);
}
c10::intrusive_ptr<c10d::Work> ProcessGroupEP::gather(std::vector<std::vector<at::Tensor>>& outputs,
                                                      std::vector<at::Tensor>& inputs,
                                                      const c10d::GatherOptions& opts) {
  return inner_for(inputs, "gather")->gather(outputs, inputs, opts);
}
c10::intrusive_ptr<c10d::Work> ProcessGroupEP::scatter(std::vector<at::Tensor>& outputs,
                                                       std::vector<std::vector<at::Tensor>>& inputs,
                                                       const c10d::ScatterOptions& opts) {
  return inner_for(outputs, "scatter")->scatter(outputs, inputs, opts);
}
c10::intrusive_ptr<c10d::Work> ProcessGroupEP::reduce_scatter(std::vector<at::Tensor>& outputs,
                                                              std::vector<std::vector<at::Tensor>>& inputs,
                                                              const c10d::ReduceScatterOptions& opts) {
  auto inner = inner_for(outputs, "reduce_scatter");
  if (!needs_emulation(*inner, opts.reduceOp)) {
    auto w = inner->reduce_scatter(outputs, inputs, opts);
    return inner->getBackendName() == "gloo" ? with_future(w, outputs, c10d::OpType::REDUCE_SCATTER) : w;
  }
  std::vector<std::vector<at::Tensor>> operands;
  for (const auto& list : inputs) operands.push_back(scaled_copies(list, opts.reduceOp));
  return emulate_reduction(opts.reduceOp, outputs, outputs, c10d::OpType::REDUCE_SCATTER, [&] {
    c10d::ReduceScatterOptions o = opts;
    o.reduceOp = c10d::ReduceOp::SUM;
    return inner->reduce_scatter(outputs, operands, o);
  });
}
c10::intrusive_ptr<c10d::Work> ProcessGroupEP::_reduce_scatter_base(at::Tensor& output, at::Tensor& input,
                                                                    const c10d::ReduceScatterOptions& opts) {
  auto inner = inner_for(input, "reduce_scatter_tensor");
  if (!needs_emulation(*inner, opts.reduceOp)) {
    auto w = inner->_reduce_scatter_base(output, input, opts);
    return inner->getBackendName() == "gloo" ? with_future(w, {output}, c10d::OpType::_REDUCE_SCATTER_BASE) : w;
  }
  at::Tensor operand = scaled_copies({input}, opts.reduceOp)[0];
  return emulate_reduction(opts.reduceOp, {output}, {output}, c10d::OpType::_REDUCE_SCATTER_BASE, [&] {
    c10d::ReduceScatterOptions o = opts;
    o.reduceOp = c10d::ReduceOp::SUM;
    return inner->_reduce_scatter_base(output, operand, o);
  });
}
c10::intrusive_ptr<c10d::Work> ProcessGroupEP::reduce_scatter_tensor_coalesced(
    std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs, const c10d::ReduceScatterOptions& opts) {
  return inner_for(inputs, "reduce_scatter_tensor_coalesced")->reduce_scatter_tensor_coalesced(outputs, inputs, opts);
}
c10::intrusive_ptr<c10d::Work> ProcessGroupEP::send(std::vector<at::Tensor>& tensors, int dst_rank, int tag) {
  return inner_for(tensors, "send")->send(tensors, dst_rank, tag);
}
c10::intrusive_ptr<c10d::Work> ProcessGroupEP::recv(std::vector<at::Tensor>& tensors, int src_rank, int tag) {
  return inner_for(tensors, "recv")->recv(tensors, src_rank, tag);
}
c10::intrusive_ptr<c10d::Work> ProcessGroupEP::recvAnysource(std::vector<at::Tensor>& tensors, int tag) {
  return inner_for(tensors, "recv")->recvAnysource(tensors, tag);
}
// Barriers go through the CPU backend: it works whatever device the ranks use.
c10::intrusive_ptr<c10d::Work> ProcessGroupEP::barrier(const c10d::BarrierOptions& opts) {
  return cpu_backend("barrier")->barrier(opts);
}
void ProcessGroupEP::monitoredBarrier(const c10d::BarrierOptions& opts, bool wait_all_ranks) {
  cpu_backend("monitored_barrier")->monitoredBarrier(opts, wait_all_ranks);
}
void ProcessGroupEP::setSequenceNumberForGroup() {
  std::lock_guard<std::mutex> lock(state_mutex_);
  if (cpu_backend_) cpu_backend_->setSequenceNumberForGroup();
}
uint64_t ProcessGroupEP::getSequenceNumberForGroup() {
  std::lock_guard<std::mutex> lock(state_mutex_);
  return cpu_backend_ ? cpu_backend_->getSequenceNumberForGroup() : 0;
}

}  // namespace ep
