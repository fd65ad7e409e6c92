// mlock/munlock as the kernel sees them, for every file that pins memory.
#pragma once

#include <cstddef>
#include <sys/mman.h>
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace mlxpool {

// On Linux the system call is made directly: ASan's interceptors turn the libc
// functions into silent no-ops, which would hide a refused pin from the
// sanitizer-built tests.
inline int sys_mlock(const void* addr, std::size_t len) {
#ifdef __linux__
  return static_cast<int>(::syscall(SYS_mlock, addr, len));
#else
  return ::mlock(addr, len);  // macOS: not run here
#endif
}

inline int sys_munlock(const void* addr, std::size_t len) {
#ifdef __linux__
  return static_cast<int>(::syscall(SYS_munlock, addr, len));
#else
  return ::munlock(addr, len);
#endif
}

}  // namespace mlxpool
