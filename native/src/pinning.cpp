#include "pinning.h"

#include <algorithm>
#include <cerrno>
#include <iterator>
#include <sys/mman.h>
#include <system_error>
#include <vector>

#include "mapped_file.h"
#include "memlock.h"

namespace mlxpool {

namespace {

std::uintptr_t page_down(std::uintptr_t a) { return a / page_size() * page_size(); }
std::uintptr_t page_up(std::uintptr_t a) { return (a + page_size() - 1) / page_size() * page_size(); }

}  // namespace

std::size_t PinSet::new_bytes(std::uintptr_t first, std::uintptr_t last) const {
  std::size_t covered = 0;
  auto it = spans_.upper_bound(first);
  if (it != spans_.begin()) --it;
  for (; it != spans_.end() && it->first < last; ++it) {
    std::uintptr_t lo = std::max(first, it->first), hi = std::min(last, it->second);
    if (hi > lo) covered += hi - lo;
  }
  return (last - first) - covered;
}

int PinSet::add(const void* addr, std::size_t len) {
  if (len == 0) return 0;
  const auto a = reinterpret_cast<std::uintptr_t>(addr);
  std::uintptr_t first = page_down(a), last = page_up(a + len);
  const std::size_t extra = new_bytes(first, last);
  if (extra == 0) return 0;
  if (bytes_ + extra > budget_) return ENOBUFS;
  if (sys_mlock(reinterpret_cast<const void*>(first), last - first) != 0) return errno;
  // Merge [first, last) with every span it touches.
  auto it = spans_.upper_bound(first);
  if (it != spans_.begin() && std::prev(it)->second >= first) --it;
  while (it != spans_.end() && it->first <= last) {
    first = std::min(first, it->first);
    last = std::max(last, it->second);
    it = spans_.erase(it);
  }
  spans_.emplace(first, last);
  bytes_ += extra;
  return 0;
}

void PinSet::release() {
  for (const auto& [lo, hi] : spans_) (void)sys_munlock(reinterpret_cast<const void*>(lo), hi - lo);
  spans_.clear();
  bytes_ = 0;
}

std::size_t PinSet::resident_bytes() const {
  std::size_t total = 0;
  for (const auto& [lo, hi] : spans_) total += mlxpool::resident_bytes(reinterpret_cast<const void*>(lo), hi - lo);
  return total;
}

std::size_t resident_bytes(const void* addr, std::size_t len) {
  if (len == 0) return 0;
  const auto a = reinterpret_cast<std::uintptr_t>(addr);
  const std::uintptr_t first = page_down(a), last = page_up(a + len);
  const std::size_t page = page_size();
#ifdef __APPLE__
  std::vector<char> vec((last - first) / page);  // Darwin's vector type; not run here
#else
  std::vector<unsigned char> vec((last - first) / page);
#endif
  if (::mincore(reinterpret_cast<void*>(first), last - first, vec.data()) != 0)
    throw std::system_error(errno, std::generic_category(), "mincore");
  std::size_t resident = 0;
  for (auto v : vec) resident += (static_cast<unsigned char>(v) & 1u);
  return resident * page;
}

}  // namespace mlxpool
