// Exceptions in the CPU kernels' OpenMP regions (std::bad_alloc from a per-thread buffer, say). One that
// leaves a parallel region terminates the process, and a thread that skipped the region's worksharing loop
// would leave the others waiting at its barrier. So each thread runs its setup and each work item through
// capture(), which keeps the first exception and lets the thread go on (skipping the work once anything
// failed); rethrow() after the region raises it on the calling thread, where the torch layer turns it into
// a Python error.
#pragma once

#include <atomic>
#include <exception>
#include <mutex>

namespace r2lm {

class ParallelErrors {
 public:
  // f() unless an earlier call failed; whether it ran to completion.
  template <typename F>
  bool capture(F&& f) noexcept {
    if (failed_.load(std::memory_order_relaxed)) return false;
    try {
      f();
      return true;
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!first_) first_ = std::current_exception();
      failed_.store(true, std::memory_order_relaxed);
      return false;
    }
  }

  void rethrow() const {
    if (first_) std::rethrow_exception(first_);
  }

 private:
  std::atomic<bool> failed_{false};
  std::mutex mutex_;
  std::exception_ptr first_;
};

}  // namespace r2lm
