#include "prefetching.h"

#include <stdexcept>
#include <string>

namespace mlxpool {

Prefetcher::Prefetcher(std::size_t threads) {
  if (threads == 0 || threads > kMaxPrefetchThreads)
    throw std::invalid_argument("prefetch threads must be 1.." + std::to_string(kMaxPrefetchThreads) + ", got " +
                                std::to_string(threads));
  threads_.reserve(threads);
  for (std::size_t i = 0; i < threads; ++i) {
    running_.fetch_add(1);
    threads_.emplace_back([this] { work(); });
  }
}

Prefetcher::~Prefetcher() { close(); }

void Prefetcher::submit(std::shared_ptr<const MappedFile> file, std::size_t offset, std::size_t length) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) throw std::logic_error("prefetcher is closed");
    queue_.push_back(Job{std::move(file), offset, length});
  }
  wake_.notify_one();
}

void Prefetcher::wait() {
  std::unique_lock<std::mutex> lock(mu_);
  idle_.wait(lock, [this] { return queue_.empty() && busy_ == 0; });
}

void Prefetcher::close() {
  std::lock_guard<std::mutex> joining(join_mu_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_ && threads_.empty()) return;
    closed_ = true;
    queue_.clear();
  }
  wake_.notify_all();
  for (auto& t : threads_)
    if (t.joinable()) t.join();
  threads_.clear();
  idle_.notify_all();
}

bool Prefetcher::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return closed_;
}

void Prefetcher::work() {
  while (true) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [this] { return closed_ || !queue_.empty(); });
      if (closed_) break;
      job = std::move(queue_.front());
      queue_.pop_front();
      ++busy_;
    }
    checksum_.fetch_add(job.file->prefetch_range(job.offset, job.length));
    bytes_done_.fetch_add(job.length);
    job.file.reset();  // the mapping may go as soon as nobody else holds it
    {
      std::lock_guard<std::mutex> lock(mu_);
      --busy_;
    }
    idle_.notify_all();
  }
  running_.fetch_sub(1);
  idle_.notify_all();
}

}  // namespace mlxpool
