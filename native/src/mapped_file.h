// A read-only memory mapping of one weight file: the unit the weight manager
// maps, prefetches and (later) pins. Plain C++ so it can be tested without Python.
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
  const std::string& path() const { return path_; }
  // Ask the kernel to read the whole file ahead (madvise WILLNEED).
  void prefetch() const;
  // Touch one byte per page so every page is resident; returns a checksum of the
  // touched bytes so the compiler cannot drop the reads.
  std::uint64_t touch() const;

 private:
  std::string path_;
  void* data_ = nullptr;
  std::size_t size_ = 0;
};

std::size_t page_size();

}  // namespace mlxpool
