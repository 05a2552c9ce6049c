#include "backend/process_group/work.hpp"

#include <c10/util/Exception.h>

#include "backend/common/errors.hpp"

namespace ep {

EPWork::EPWork(int rank, c10d::OpType type, const char* profiling_title, std::vector<at::Tensor> outputs)
    : c10d::Work(rank, type, profiling_title),
      outputs_(std::move(outputs)),
      future_(c10::make_intrusive<c10::ivalue::Future>(c10::ListType::create(c10::TensorType::get()))) {}

void EPWork::complete(std::exception_ptr error) {
  finish(error);
  if (error) future_->setError(error);
  else future_->markCompleted(c10::IValue(outputs_));
}

std::exception_ptr as_dist_error(std::exception_ptr error) {
  try {
    std::rethrow_exception(error);
  } catch (const c10::Error&) {
    return std::current_exception();  // already a torch error (ValueError, TypeError, ...)
  } catch (const std::exception& e) {
    try {
      C10_THROW_ERROR(DistBackendError, e.what());
    } catch (...) {
      return std::current_exception();
    }
  }
}

}  // namespace ep
