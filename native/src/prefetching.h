// A fixed pool of native threads that pages file-backed weights in ahead of use
// (madvise WILLNEED, then one read per page), in the order ranges are submitted: the
// loader submits the model's layers in layer order, a few layers ahead of where it
// copies. Threads start in the constructor and are joined by close() (and the
// destructor), never detached; close() drops work not yet started.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "mapped_file.h"

namespace mlxpool {

constexpr std::size_t kMaxPrefetchThreads = 64;

class Prefetcher {
 public:
  explicit Prefetcher(std::size_t threads);  // 1..kMaxPrefetchThreads, else std::invalid_argument
  ~Prefetcher();
  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;

  // Queue [offset, offset + length) of `file`; std::logic_error once closed.
  void submit(std::shared_ptr<const MappedFile> file, std::size_t offset, std::size_t length);
  void wait();   // until every submitted range is done (or dropped by close)
  void close();  // drop queued ranges, join every thread; idempotent
  std::size_t threads() const { return threads_.size(); }
  std::size_t running() const { return running_.load(); }  // threads not yet joined
  std::uint64_t bytes_done() const { return bytes_done_.load(); }
  bool closed() const;

 private:
  struct Job {
    std::shared_ptr<const MappedFile> file;
    std::size_t offset, length;
  };
  void work();

  mutable std::mutex mu_;
  std::mutex join_mu_;  // two close() calls must not join the same thread twice
  std::condition_variable wake_, idle_;
  std::deque<Job> queue_;
  std::size_t busy_ = 0;
  bool closed_ = false;
  std::atomic<std::size_t> running_{0};
  std::atomic<std::uint64_t> bytes_done_{0};
  std::atomic<std::uint64_t> checksum_{0};
  std::vector<std::thread> threads_;
};

}  // namespace mlxpool
