#include "mapped_file.h"

#include <cerrno>
#include <cstdint>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <system_error>
#include <unistd.h>

namespace mlxpool {

std::size_t page_size() { return static_cast<std::size_t>(::sysconf(_SC_PAGESIZE)); }

MappedFile::MappedFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::system_error(errno, std::generic_category(), "open " + path);
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    throw std::system_error(err, std::generic_category(), "stat " + path);
  }
  size_ = static_cast<std::size_t>(st.st_size);
  if (size_ > 0) {
    data_ = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
    if (data_ == MAP_FAILED) {
      int err = errno;
      data_ = nullptr;
      ::close(fd);
      throw std::system_error(err, std::generic_category(), "mmap " + path);
    }
  }
  ::close(fd);  // the mapping keeps the file referenced
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(data_, size_);
}

void MappedFile::prefetch() const {
  if (data_ != nullptr && ::madvise(data_, size_, MADV_WILLNEED) != 0)
    throw std::system_error(errno, std::generic_category(), "madvise " + path_);
}

std::uint64_t MappedFile::touch() const {
  const auto* bytes = static_cast<const volatile unsigned char*>(data_);
  std::uint64_t sum = 0;
  const std::size_t step = page_size();
  for (std::size_t off = 0; off < size_; off += step) sum += bytes[off];
  return sum;
}

}  // namespace mlxpool
