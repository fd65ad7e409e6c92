// A read-only memory mapping of one weight file: the unit the weight manager maps,
// prefetches, pins (mlock) and inspects (mincore). Plain C++ so it can be tested
// without Python; every failing system call throws std::system_error with its errno.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace mlxpool {

class MappedFile {
 public:
  explicit MappedFile(const std::string& path);  // throws std::system_error
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  std::size_t size() const { return size_; }
  const unsigned char* data() const { return static_cast<const unsigned char*>(data_); }
  const std::string& path() const { return path_; }
  // Ask the kernel to read the whole file ahead (madvise WILLNEED); returns at once.
  void prefetch() const;
  // The same for the pages of [offset, offset + length) only (clamped to the file):
  // what the prefetch pool does one layer at a time. Returns the touched-bytes checksum.
  std::uint64_t prefetch_range(std::size_t offset, std::size_t length) const;
  // Touch one byte per page so every page is resident; returns a checksum of the
  // touched bytes so the compiler cannot drop the reads.
  std::uint64_t touch() const;
  // Pin every page in memory (mlock). Fails with EPERM/ENOMEM when RLIMIT_MEMLOCK
  // (and the lack of CAP_IPC_LOCK) forbids it; the mapping is then left unlocked.
  void lock();
  // Undo lock(); a no-op when not locked. The destructor unlocks too (munmap does).
  void unlock();
  bool locked() const { return locked_; }
  // Pages of the mapping resident in memory right now (mincore).
  std::size_t resident_pages() const;
  // Pages the mapping spans.
  std::size_t pages() const;

 private:
  std::string path_;
  void* data_ = nullptr;
  std::size_t size_ = 0;
  bool locked_ = false;
};

std::size_t page_size();

}  // namespace mlxpool
