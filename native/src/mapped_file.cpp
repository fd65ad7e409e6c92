#include "mapped_file.h"
#include "memlock.h"

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <system_error>
#include <unistd.h>
#include <vector>

namespace mlxpool {

namespace {

[[noreturn]] void fail(int err, const std::string& what, const std::string& path) {
  throw std::system_error(err, std::generic_category(), what + " " + path);
}

}  // namespace

std::size_t page_size() { return static_cast<std::size_t>(::sysconf(_SC_PAGESIZE)); }

MappedFile::MappedFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(errno, "open", path);
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    fail(err, "stat", path);
  }
  size_ = static_cast<std::size_t>(st.st_size);
  if (size_ > 0) {
    data_ = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
    if (data_ == MAP_FAILED) {
      int err = errno;
      data_ = nullptr;
      ::close(fd);
      fail(err, "mmap", path);
    }
  }
  ::close(fd);  // the mapping keeps the file referenced
}

MappedFile::~MappedFile() {
  if (data_ == nullptr) return;
  if (locked_) sys_munlock(data_, size_);
  ::munmap(data_, size_);
}

void MappedFile::prefetch() const {
  if (data_ != nullptr && ::madvise(data_, size_, MADV_WILLNEED) != 0) fail(errno, "madvise", path_);
}

std::uint64_t MappedFile::touch() const {
  const auto* bytes = static_cast<const volatile unsigned char*>(data_);
  std::uint64_t sum = 0;
  const std::size_t step = page_size();
  for (std::size_t off = 0; off < size_; off += step) sum += bytes[off];
  return sum;
}

std::uint64_t MappedFile::prefetch_range(std::size_t offset, std::size_t length) const {
  if (data_ == nullptr || offset >= size_) return 0;
  length = std::min(length, size_ - offset);
  const std::size_t page = page_size();
  const std::size_t first = offset / page * page;  // madvise wants a page-aligned start
  auto* base = static_cast<unsigned char*>(data_);
  // WILLNEED starts the reads asynchronously; a failure only loses the hint.
  (void)::madvise(base + first, offset + length - first, MADV_WILLNEED);
  const auto* bytes = static_cast<const volatile unsigned char*>(data_);
  std::uint64_t sum = 0;
  for (std::size_t off = first; off < offset + length; off += page) sum += bytes[off];
  return sum;
}

void MappedFile::lock() {
  if (locked_ || data_ == nullptr) {
    locked_ = data_ != nullptr;
    return;
  }
  if (sys_mlock(data_, size_) != 0) fail(errno, "mlock", path_);
  locked_ = true;
}

void MappedFile::unlock() {
  if (!locked_) return;
  if (sys_munlock(data_, size_) != 0) fail(errno, "munlock", path_);
  locked_ = false;
}

std::size_t MappedFile::pages() const {
  const std::size_t page = page_size();
  return (size_ + page - 1) / page;
}

std::size_t MappedFile::resident_pages() const {
  if (data_ == nullptr) return 0;
#ifdef __APPLE__
  // Darwin declares the vector as char*; same MINCORE_INCORE bit (0x1). Not run here.
  std::vector<char> vec(pages());
#else
  std::vector<unsigned char> vec(pages());
#endif
  if (::mincore(data_, size_, vec.data()) != 0) fail(errno, "mincore", path_);
  std::size_t resident = 0;
  for (auto v : vec) resident += (static_cast<unsigned char>(v) & 1u);
  return resident;
}

}  // namespace mlxpool
