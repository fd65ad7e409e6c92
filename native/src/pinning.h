// Locking memory we did not map ourselves: the buffers MLX computes from (its arrays,
// reached through the buffer protocol). A PinSet locks page spans within a byte budget,
// counts each page once however many arrays share it, and unlocks everything on
// release() or destruction. Refusals (EPERM, ENOMEM, EAGAIN: RLIMIT_MEMLOCK without
// CAP_IPC_LOCK) are returned as errno, not thrown: the caller warns and serves on.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>

namespace mlxpool {

class PinSet {
 public:
  explicit PinSet(std::size_t budget_bytes) : budget_(budget_bytes) {}
  ~PinSet() { release(); }
  PinSet(const PinSet&) = delete;
  PinSet& operator=(const PinSet&) = delete;

  // Lock the pages under [addr, addr + len). 0 on success (or nothing new to lock);
  // ENOBUFS when the new pages would exceed the budget (nothing locked); else the
  // errno of a refused mlock (nothing locked).
  int add(const void* addr, std::size_t len);
  void release();  // unlock every page of the set
  std::size_t bytes() const { return bytes_; }  // distinct bytes locked (whole pages)
  std::size_t budget() const { return budget_; }
  std::size_t spans() const { return spans_.size(); }
  std::size_t resident_bytes() const;  // of the locked pages, those in memory (mincore)

 private:
  std::size_t new_bytes(std::uintptr_t first, std::uintptr_t last) const;
  std::size_t budget_;
  std::size_t bytes_ = 0;
  std::map<std::uintptr_t, std::uintptr_t> spans_;  // start -> end, disjoint, page-aligned
};

// Bytes of [addr, addr + len) in memory now (whole pages, mincore), for any mapping.
std::size_t resident_bytes(const void* addr, std::size_t len);

}  // namespace mlxpool
